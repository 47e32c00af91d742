/** Reading the kernel's mount table (/proc/self/mountinfo) and finding our daemons in /proc. */
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface MountEntry {
  mountpoint: string;
  fstype: string;
  source: string;
}

/** Undoes the octal escapes (\040 for space ...) of mountinfo fields. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export function listMounts(): MountEntry[] {
  const text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    out.push({ mountpoint: unescape(left[4] ?? ''), fstype: right[0] ?? '', source: unescape(right[1] ?? '') });
  }
  return out;
}

export function findMount(mountpoint: string): MountEntry | undefined {
  // The last entry wins: mounts stack.
  return listMounts()
    .filter((m) => m.mountpoint === mountpoint)
    .pop();
}

/**
 * True when stat(2) of the path fails with ENOTCONN (or ECONNABORTED, which some kernels return
 * for a connection torn down mid-request): a FUSE mount whose daemon is gone.
 */
export function isStaleFuseMount(mountpoint: string): boolean {
  try {
    fs.statSync(mountpoint);
    return false;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'ENOTCONN' || code === 'ECONNABORTED';
  }
}

/** PIDs of qcow2fs daemons serving `mountpoint` (found by their command line). */
export function findDaemons(mountpoint: string): number[] {
  const pids: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    if (pid === process.pid) continue;
    let argv: string[];
    try {
      argv = fs.readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    if (!argv.includes('--daemon-of') ) continue;
    const i = argv.indexOf('--daemon-of');
    if (argv[i + 1] === mountpoint) pids.push(pid);
  }
  return pids;
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A zombie still answers kill(0); look at its state.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z';
  } catch {
    return false;
  }
}

/**
 * Descriptors of this process that are open on /dev/fuse. libfuse holds one per session and
 * closes it when its loop ends (the kernel connection is gone), so a lazily detached mount whose
 * last open file was closed shows up here even though no RELEASE ever reached us.
 */
export function fuseDeviceFds(): Set<number> {
  const out = new Set<number>();
  let names: string[];
  try {
    names = fs.readdirSync('/proc/self/fd');
  } catch {
    return out;
  }
  for (const name of names) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${name}`) === '/dev/fuse') out.add(Number(name));
    } catch {
      // Closed meanwhile.
    }
  }
  return out;
}

/**
 * The path the kernel lists a mount under (/proc/self/mountinfo holds real paths): `p` with
 * symlinks resolved. A stale FUSE mount cannot be stat'ed, so then resolve the symlinks leading
 * to it and the parent directory, and keep the last component.
 */
export function canonicalMountpoint(p: string, depth = 0): string {
  const abs = path.resolve(p);
  try {
    return fs.realpathSync(abs);
  } catch {
    // Missing, or a dead FUSE mount: resolve what can be resolved.
  }
  try {
    if (depth < 40 && fs.lstatSync(abs).isSymbolicLink()) {
      return canonicalMountpoint(path.resolve(path.dirname(abs), fs.readlinkSync(abs)), depth + 1);
    }
  } catch {
    // lstat of a stale mountpoint fails too.
  }
  try {
    return path.join(fs.realpathSync(path.dirname(abs)), path.basename(abs));
  } catch {
    return abs;
  }
}
