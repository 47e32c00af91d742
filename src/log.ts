/**
 * The one pino logger. Quiet by default (warnings and errors only); `--log-level debug` for
 * detail; `--log-json` keeps pino's JSON lines; `--log-file` sends them to a file (daemons).
 * Without --log-json, lines are rendered as `qcow2fs: LEVEL: message key=value ...` for people.
 */
import pino, { type Logger, type DestinationStream } from 'pino';
import { Writable } from 'node:stream';

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LogOptions {
  level?: LogLevel;
  json?: boolean;
  /** Append logs to this file instead of stderr. */
  file?: string;
}

const LEVEL_NAMES: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** Renders pino JSON lines as short human lines. */
class HumanStream extends Writable {
  constructor(private readonly out: NodeJS.WritableStream) {
    super();
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    for (const line of chunk.toString('utf8').split('\n')) {
      if (!line) continue;
      try {
        const rec = JSON.parse(line) as Record<string, unknown>;
        const { level, msg, time: _t, pid: _p, hostname: _h, ...rest } = rec;
        const extra = Object.entries(rest)
          .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
          .join(' ');
        this.out.write(`qcow2fs: ${LEVEL_NAMES[level as number] ?? level}: ${String(msg ?? '')}${extra ? ' ' + extra : ''}\n`);
      } catch {
        this.out.write(line + '\n');
      }
    }
    cb();
  }
}

function makeLogger(opts: LogOptions): Logger {
  const level = opts.level ?? 'warn';
  let dest: DestinationStream;
  if (opts.file) {
    const fileDest = pino.destination({ dest: opts.file, append: true, sync: true, mkdir: true });
    dest = opts.json ? fileDest : (new HumanStream(fileDest as unknown as NodeJS.WritableStream) as unknown as DestinationStream);
  } else {
    dest = opts.json ? pino.destination({ fd: 2, sync: true }) : (new HumanStream(process.stderr) as unknown as DestinationStream);
  }
  return pino({ level, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime }, dest);
}

/** The process-wide logger; replaced by configureLogging() once options are parsed. */
export let log: Logger = makeLogger({});

export function configureLogging(opts: LogOptions): Logger {
  log = makeLogger(opts);
  return log;
}
