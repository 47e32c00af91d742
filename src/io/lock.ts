/**
 * Image locking compatible with QEMU (block/file-posix.c). QEMU guards every image file it opens
 * with open-file-description (OFD) byte-range read locks: for each block permission it uses,
 * it locks byte 100 + bit; for each permission it refuses to share with others, byte 200 + bit.
 * A new user first takes its own bytes, then tests the opposite ones: if another open file
 * holds 200 + bit for a permission it wants, or 100 + bit for one it refuses to share, it
 * backs off with `Failed to get "write" lock` (or `shared "write"`). Taking the very same bytes
 * makes qcow2fs and QEMU see each other both ways.
 *
 * Node has no fcntl(2), so the two calls live in a tiny N-API addon (native/ofd_lock.c, built
 * by `npm run build` / `npm ci`). Locks belong to the open file description: closing the
 * file (or the process dying) releases them, so there is no unlock bookkeeping.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UsageError } from '../errors';
import { log } from '../log';

/** QEMU's block permission bits (BLK_PERM_*), by bit index. */
export const PERM_CONSISTENT_READ = 0;
export const PERM_WRITE = 1;
export const PERM_WRITE_UNCHANGED = 2;
export const PERM_RESIZE = 3;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;

/** First lock byte of the "uses permission" range and of the "does not share it" range. */
export const PERM_LOCK_BASE = 100;
export const SHARED_LOCK_BASE = 200;

const LOCK_UNLOCK = 0;
const LOCK_READ = 1;
const LOCK_WRITE = 2;

/** Which permissions a user of a file takes, and which it refuses to share. */
export interface LockProfile {
  perms: readonly number[];
  unshared: readonly number[];
}

/**
 * What QEMU's qcow2 / raw drivers take on their file (seen in /proc/locks): every user wants
 * consistent reads; a writer also wants write (and resize, for qcow2, which grows its file);
 * nobody shares write or resize, because metadata must not change under a reader either.
 * `forceShare` is qemu-img's -U: read-only, sharing everything.
 */
export function lockProfile(opts: { writable: boolean; format: 'qcow2' | 'raw'; forceShare?: boolean }): LockProfile {
  if (opts.writable && opts.forceShare) throw new UsageError('--force-share is only possible read-only');
  const perms = [PERM_CONSISTENT_READ];
  if (opts.writable) perms.push(PERM_WRITE);
  if (opts.writable && opts.format === 'qcow2') perms.push(PERM_RESIZE);
  return { perms, unshared: opts.forceShare ? [] : [PERM_WRITE, PERM_RESIZE] };
}

interface LockAddon {
  setLock(fd: number, start: number, length: number, type: number): number;
  testLock(fd: number, start: number, length: number, type: number): number;
}

let addon: LockAddon | null | undefined;
let warned = false;

function loadAddon(): LockAddon | null {
  if (addon !== undefined) return addon;
  const file = path.resolve(__dirname, '..', '..', 'native', 'build', 'Release', 'qcow2fs_lock.node');
  try {
    addon = require(file) as LockAddon;
  } catch (err) {
    addon = null;
    log.debug({ file, err: (err as Error).message }, 'lock addon not loaded');
  }
  return addon;
}

/** True when QEMU-compatible locks can be taken (the native addon is built). */
export function lockingAvailable(): boolean {
  return loadAddon() !== null;
}

/** Errors from locking: another process uses the image in a conflicting way. */
export class ImageLockError extends UsageError {}

/** Processes other than this one with `filePath` open, best effort (names the lock holder in messages). */
export function processesUsing(filePath: string): Array<{ pid: number; command: string }> {
  let target: fs.Stats;
  try {
    target = fs.statSync(filePath);
  } catch {
    return [];
  }
  const out: Array<{ pid: number; command: string }> = [];
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  } catch {
    return [];
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    const uses = fds.some((fd) => {
      try {
        const st = fs.statSync(`/proc/${pid}/fd/${fd}`);
        return st.ino === target.ino && st.dev === target.dev;
      } catch {
        return false;
      }
    });
    if (!uses) continue;
    let command = '?';
    try {
      // argv[0], not comm: comm is cut at 15 characters ("qemu-storage-da").
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const isQcow2fs = argv.some((a) => a.endsWith('/cli/daemon-main.js') || a.endsWith('/cli/main.js') || a.endsWith('/bin/qcow2fs')) && argv.includes('--daemon-of');
      command = isQcow2fs ? 'a qcow2fs mount' : path.basename(argv[0] ?? '') || fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
    } catch {
      // Gone meanwhile.
    }
    out.push({ pid: Number(pid), command });
  }
  return out;
}

function describeHolders(filePath: string): string {
  const users = processesUsing(filePath);
  if (users.length === 0) return 'another process';
  return users.map((u) => `${u.command} (pid ${u.pid})`).join(', ');
}

function release(lib: LockAddon, fd: number, profile: LockProfile): void {
  for (const p of profile.perms) lib.setLock(fd, PERM_LOCK_BASE + p, 1, LOCK_UNLOCK);
  for (const p of profile.unshared) lib.setLock(fd, SHARED_LOCK_BASE + p, 1, LOCK_UNLOCK);
}

/**
 * Takes QEMU's locks for `profile` on an open image file, or throws ImageLockError naming the
 * permission (in QEMU's words) and the process in the way. Like QEMU, the bytes are taken
 * first and the conflicts tested after, so two racing openers cannot both succeed.
 */
export function lockImageFile(file: { fd: number; path: string }, profile: LockProfile, role: 'image' | 'backing file' = 'image'): void {
  const lib = loadAddon();
  if (!lib) {
    if (!warned) {
      warned = true;
      log.warn('image locking is unavailable (native addon not built: run "npm run build"); QEMU will not see this mount');
    }
    return;
  }
  const take = (offset: number): void => {
    const err = lib.setLock(file.fd, offset, 1, LOCK_READ);
    if (err !== 0) {
      release(lib, file.fd, profile);
      throw new ImageLockError(`${role} ${file.path}: cannot take lock byte ${offset} (errno ${err})`);
    }
  };
  for (const p of profile.perms) take(PERM_LOCK_BASE + p);
  for (const p of profile.unshared) take(SHARED_LOCK_BASE + p);

  const conflict = (offset: number): boolean => {
    const held = lib.testLock(file.fd, offset, 1, LOCK_WRITE);
    if (held < 0) {
      release(lib, file.fd, profile);
      throw new ImageLockError(`${role} ${file.path}: cannot test lock byte ${offset} (errno ${-held})`);
    }
    return held !== 0;
  };
  for (const p of profile.perms) {
    if (conflict(SHARED_LOCK_BASE + p)) {
      release(lib, file.fd, profile);
      throw new ImageLockError(
        `${role} ${file.path} is in use: Failed to get "${PERM_NAMES[p]}" lock (${describeHolders(file.path)} holds it and does not share ${PERM_NAMES[p]} access); stop that process first`,
      );
    }
  }
  for (const p of profile.unshared) {
    if (conflict(PERM_LOCK_BASE + p)) {
      release(lib, file.fd, profile);
      throw new ImageLockError(
        `${role} ${file.path} is in use: Failed to get shared "${PERM_NAMES[p]}" lock (${describeHolders(file.path)} has it open for ${PERM_NAMES[p]}); stop that process first, or for a read-only view that may change under you add --force-share`,
      );
    }
  }
  log.debug({ file: file.path, perms: profile.perms, unshared: profile.unshared }, 'locked');
}
