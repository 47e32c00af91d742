/**
 * Running external tools for the benchmark: asynchronously (so Ctrl-C handlers can run while a
 * tool works), with the output captured and a one-line error when a tool fails.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
  elapsedMs: number;
}

export interface ExecOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Kill the tool (SIGKILL) after this many milliseconds. */
  timeoutMs?: number;
  /** An undo step: runs even after an interrupt. */
  forCleanup?: boolean;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Tools running right now (so an interrupt can stop them before undoing what they use). */
const running = new Set<ChildProcess>();
let interrupted = false;

/**
 * After an interrupt: start no new tool except for cleanup (`forCleanup`), and stop the running
 * ones (a `tar` still writing into the ext4 mount would keep it busy). Resolves once they exited.
 */
export async function stopRunningTools(): Promise<void> {
  interrupted = true;
  const live = [...running];
  for (const c of live) c.kill('SIGTERM');
  const deadline = Date.now() + 5000;
  while ([...running].some((c) => live.includes(c)) && Date.now() < deadline) await sleep(20);
  for (const c of live) if (running.has(c)) c.kill('SIGKILL');
}

export const isInterrupted = (): boolean => interrupted;

/** Runs `cmd args`; resolves with its exit status and output, never rejects on a non-zero status. */
export function exec(cmd: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    if (interrupted && !opts.forCleanup) {
      reject(new Error('interrupted'));
      return;
    }
    const started = process.hrtime.bigint();
    const spawnOpts: SpawnOptions = { stdio: ['ignore', 'pipe', 'pipe'], cwd: opts.cwd, env: opts.env ?? process.env };
    const child = spawn(cmd, args, spawnOpts);
    running.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    let timer: NodeJS.Timeout | null = null;
    if (opts.timeoutMs) timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    child.on('error', (e) => {
      running.delete(child);
      if (timer) clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      running.delete(child);
      if (timer) clearTimeout(timer);
      resolve({
        code: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        elapsedMs: Number(process.hrtime.bigint() - started) / 1e6,
      });
    });
  });
}

/** The first meaningful line of a tool's complaint, for a one-line error. */
export function firstLine(text: string): string {
  const line = text
    .split('\n')
    .map((l) => l.trim())
    .find((l) => l.length > 0);
  return line ?? '';
}

/** Runs `cmd args` and throws a one-line error unless it exits 0. Returns stdout. */
export async function must(cmd: string, args: readonly string[], opts: ExecOptions = {}): Promise<string> {
  const r = await exec(cmd, args, opts);
  if (r.code !== 0) {
    const why = firstLine(r.stderr) || firstLine(r.stdout) || `exit status ${r.code}`;
    throw new Error(`${cmd} ${args.slice(0, 3).join(' ')}${args.length > 3 ? ' ...' : ''}: ${why}`);
  }
  return r.stdout;
}

/** Shell-quotes one word for the commands we print in docs/PERFORMANCE.md. */
export function quote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

export function commandLine(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map(quote).join(' ');
}


