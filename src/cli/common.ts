/** Shared CLI plumbing: one-line errors and exit codes, size parsing and formatting. */
import { isUserFacing, UsageError } from '../errors';
import { configureLogging, log, LOG_LEVELS, type LogLevel } from '../log';

export const EXIT_OK = 0;
/** The operation failed (bad image, cannot mount, I/O error). */
export const EXIT_FAILURE = 1;
/** Wrong arguments. */
export const EXIT_USAGE = 2;

export interface GlobalArgs {
  'log-level'?: string;
  'log-json'?: boolean;
  'log-file'?: string;
}

/** The options every command takes (registered globally by main.ts). */
export interface GlobalSpec {
  name: keyof GlobalArgs & string;
  type: 'boolean' | 'string';
  alias?: string[];
  describe: string;
}

export const GLOBAL_OPTIONS: readonly GlobalSpec[] = [
  { name: 'log-level', type: 'string', describe: 'fatal, error, warn (default), info, debug, trace, silent' },
  { name: 'log-json', type: 'boolean', describe: 'log JSON lines (pino) instead of text' },
  { name: 'log-file', type: 'string', describe: 'append logs to this file (daemons log nowhere else)' },
];

export function setupLogging(argv: GlobalArgs): void {
  const level = (argv['log-level'] ?? 'warn') as LogLevel;
  if (!LOG_LEVELS.includes(level)) throw new UsageError(`--log-level ${level}: expected one of ${LOG_LEVELS.join(', ')}`);
  configureLogging({ level, json: !!argv['log-json'], ...(argv['log-file'] ? { file: argv['log-file'] } : {}) });
}

/** What reportError prints for an error (one line, newline included) and the exit status it means. */
export function formatError(err: unknown): { text: string; code: number } {
  if (isUserFacing(err)) return { text: `qcow2fs: ${err.message}\n`, code: err instanceof UsageError ? EXIT_USAGE : EXIT_FAILURE };
  const msg = err instanceof Error ? err.message : String(err);
  return { text: `qcow2fs: error: ${msg.split('\n')[0]}\n`, code: EXIT_FAILURE };
}

/** Prints one line for the user; the stack only with --log-level debug. */
export function reportError(err: unknown): number {
  const { text, code } = formatError(err);
  process.stderr.write(text);
  log.debug({ stack: err instanceof Error ? err.stack : undefined }, 'error details');
  return code;
}

/** Runs a command handler: any error becomes a one-line message and a non-zero exit. */
export function runCommand<A extends GlobalArgs>(fn: (argv: A) => Promise<number | void>): (argv: A) => Promise<void> {
  return async (argv: A) => {
    let code: number;
    try {
      setupLogging(argv);
      code = (await fn(argv)) ?? EXIT_OK;
    } catch (err) {
      code = reportError(err);
    }
    process.exitCode = code;
  };
}

const UNITS: Record<string, number> = { '': 1, B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4, P: 1024 ** 5, E: 1024 ** 6 };

/** Parses "10G", "512M", "1.5T", "4096" (qemu-img's suffixes are powers of 1024). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)(?:i?[bB])?\s*$/.exec(text);
  if (!m) throw new UsageError(`${what} "${text}": expected a number with an optional K, M, G, T suffix`);
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isFinite(value) || value > Number.MAX_SAFE_INTEGER) throw new UsageError(`${what} "${text}" is too large`);
  return Math.floor(value);
}

/**
 * "1 GiB", "1.5 MiB", "100 MiB", "0.977 GiB", "512 B", as qemu-img prints sizes: the unit keeps
 * the number below 1000, printed with three significant digits (printf %0.3g).
 */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  const x = bytes / (1000 / 1024);
  // frexp's exponent: x = m * 2^e with 0.5 <= m < 1.
  const e = x >= 1 ? Math.floor(Math.log2(x)) + 1 : 0;
  const i = Math.min(units.length - 1, Math.max(0, Math.trunc((e - 1) / 10)));
  return `${Number((bytes / 2 ** (10 * i)).toPrecision(3))} ${units[i]}`;
}
