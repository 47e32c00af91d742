/**
 * Daemonizing a mount. The launching command re-runs itself detached with `--ready-fd 3`; the
 * daemon opens the image, mounts, and reports `{"ok":true}` or `{"error":"..."}` on fd 3, then
 * closes it. The launcher returns only then, with the daemon's error as its own. The daemon keeps
 * none of the caller's stdin/stdout/stderr, so `out=$(qcow2fs mount ...)` returns at once.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { ImageError, UsageError } from '../errors';

export interface ReadyMessage {
  ok?: boolean;
  error?: string;
  /** The exit status the error means (README "Exit codes"): 2 usage, 1 anything else. */
  code?: number;
}

/**
 * The daemon's environment: the caller's, with the thread pool sized for concurrent FUSE requests,
 * and without NODE_EXTRA_CA_CERTS: the daemon makes no TLS connections, and Node reads that
 * certificate file at start-up (about 30 ms of mount time on a 2-core machine).
 */
function daemonEnv(): NodeJS.ProcessEnv {
  // MALLOC_ARENA_MAX: glibc gives each thread that mallocs its own arena (up to 8 per core);
  // the pool threads (decompression, reads) need no more than two: ~3.5 MiB less peak RSS.
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? '16',
    MALLOC_ARENA_MAX: process.env.MALLOC_ARENA_MAX ?? '2',
  };
  delete env.NODE_EXTRA_CA_CERTS;
  return env;
}

/** Runs `process.execPath script ...args` as a detached daemon and waits for its ready message. */
export function launchDaemon(script: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], {
      detached: true,
      cwd: '/',
      stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
      env: daemonEnv(),
    });
    const pipe = child.stdio[3] as NodeJS.ReadableStream | null;
    let text = '';
    let settled = false;
    const finish = (err: Error | null): void => {
      if (settled) return;
      settled = true;
      if (err) {
        reject(err);
        return;
      }
      child.unref();
      (pipe as unknown as { destroy?: () => void })?.destroy?.();
      resolve(child.pid ?? 0);
    };
    pipe?.on('data', (d: Buffer) => {
      text += d.toString('utf8');
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      let msg: ReadyMessage;
      try {
        msg = JSON.parse(text.slice(0, nl)) as ReadyMessage;
      } catch {
        finish(new Error(`daemon sent a bad ready message: ${text.slice(0, 200)}`));
        return;
      }
      if (msg.ok) finish(null);
      else if (msg.code === 1) finish(new ImageError(msg.error ?? 'daemon failed to mount'));
      else finish(new UsageError(msg.error ?? 'daemon failed to mount'));
    });
    child.on('error', (err) => finish(new Error(`cannot start the daemon: ${err.message}`)));
    child.on('exit', (code, signal) => {
      finish(new Error(`the daemon exited (${signal ?? `status ${code}`}) before the mount was ready; run with --foreground --log-level debug to see why`));
    });
  });
}

/** In the daemon: tell the launcher how mounting went, then close the pipe. */
export function signalReady(fd: number | undefined, msg: ReadyMessage): void {
  if (fd === undefined) return;
  try {
    fs.writeSync(fd, JSON.stringify(msg) + '\n');
    fs.closeSync(fd);
  } catch {
    // The launcher is gone; nobody to tell.
  }
}
