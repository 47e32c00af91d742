/**
 * The one pino logger. Quiet by default (warnings and errors only); `--log-level debug` for
 * detail; `--log-json` keeps pino's JSON lines; `--log-file` sends them to a file (daemons).
 * Without --log-json, lines are rendered as `qcow2fs: LEVEL: message key=value ...` for people.
 * pino itself is loaded on the first message that passes the level (loading it costs ~70 ms,
 * paid twice by every `mount`: command and daemon), so a quiet run never loads it.
 */
import type { Logger, DestinationStream } from 'pino';
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
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const pino = require('pino') as typeof import('pino');
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

type Method = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace';
const LEVEL_VALUES: Record<LogLevel, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

/** What the code logs through: pino's methods, with pino created on first real use. */
export interface Log {
  fatal(objOrMsg: unknown, msg?: string): void;
  error(objOrMsg: unknown, msg?: string): void;
  warn(objOrMsg: unknown, msg?: string): void;
  info(objOrMsg: unknown, msg?: string): void;
  debug(objOrMsg: unknown, msg?: string): void;
  trace(objOrMsg: unknown, msg?: string): void;
}

class LazyLog implements Log {
  private logger: Logger | null = null;
  private readonly threshold: number;
  constructor(private readonly opts: LogOptions) {
    this.threshold = LEVEL_VALUES[opts.level ?? 'warn'];
  }
  private emit(method: Method, objOrMsg: unknown, msg?: string): void {
    if (LEVEL_VALUES[method] < this.threshold) return;
    this.logger ??= makeLogger(this.opts);
    if (msg === undefined) this.logger[method](objOrMsg as string);
    else this.logger[method](objOrMsg as object, msg);
  }
  fatal(o: unknown, m?: string): void {
    this.emit('fatal', o, m);
  }
  error(o: unknown, m?: string): void {
    this.emit('error', o, m);
  }
  warn(o: unknown, m?: string): void {
    this.emit('warn', o, m);
  }
  info(o: unknown, m?: string): void {
    this.emit('info', o, m);
  }
  debug(o: unknown, m?: string): void {
    this.emit('debug', o, m);
  }
  trace(o: unknown, m?: string): void {
    this.emit('trace', o, m);
  }
}

/** The process-wide logger; replaced by configureLogging() once options are parsed. */
export let log: Log = new LazyLog({});

export function configureLogging(opts: LogOptions): Log {
  log = new LazyLog(opts);
  return log;
}
