/**
 * Everything the benchmark sets up (FUSE mounts, daemons, loop devices, ext4 mounts) registers
 * its undo here. Undos run newest first, so an ext4 mount goes before its loop device and the
 * loop device before the FUSE file under it, on success, on failure and on Ctrl-C alike.
 */
import { stopRunningTools } from './exec';

export type Undo = () => Promise<void>;

interface Entry {
  what: string;
  undo: Undo;
}

const stack: Entry[] = [];
let running: Promise<void> | null = null;

/** Registers an undo; the returned function runs it now (once) and forgets it. */
export function onCleanup(what: string, undo: Undo): () => Promise<void> {
  const entry: Entry = { what, undo };
  stack.push(entry);
  return async () => {
    const i = stack.indexOf(entry);
    if (i < 0) return;
    stack.splice(i, 1);
    await entry.undo();
  };
}

/** Runs every pending undo, newest first; failures are reported and do not stop the others. */
export function cleanupAll(): Promise<void> {
  if (!running) {
    running = (async () => {
      while (stack.length > 0) {
        const e = stack.pop()!;
        try {
          await e.undo();
        } catch (err) {
          process.stderr.write(`bench: cleanup of ${e.what} failed: ${(err as Error).message}\n`);
        }
      }
    })().finally(() => {
      running = null;
    });
  }
  return running;
}

/** On SIGINT/SIGTERM/SIGHUP: clean up, then exit with 128+signal. */
export function installSignalCleanup(): void {
  let caught = false;
  const handler = (sig: NodeJS.Signals, code: number): void => {
    if (caught) {
      process.stderr.write(`bench: ${sig} again; still cleaning up\n`);
      return;
    }
    caught = true;
    process.stderr.write(`\nbench: ${sig}: unmounting and detaching everything...\n`);
    stopRunningTools()
      .then(() => cleanupAll())
      .finally(() => process.exit(code));
  };
  process.on('SIGINT', () => handler('SIGINT', 130));
  process.on('SIGTERM', () => handler('SIGTERM', 143));
  process.on('SIGHUP', () => handler('SIGHUP', 129));
}
