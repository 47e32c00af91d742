/** Reading the kernel's mount table (/proc/self/mountinfo) and finding our daemons in /proc. */
import * as os from 'node:os';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describeSystemError, UsageError } from '../errors';

export interface MountEntry {
  mountpoint: string;
  fstype: string;
  source: string;
  /** major:minor of the mount's device. */
  device: string;
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
    out.push({ mountpoint: unescape(left[4] ?? ''), fstype: right[0] ?? '', source: unescape(right[1] ?? ''), device: left[2] ?? '' });
  }
  return out;
}

export function findMount(mountpoint: string): MountEntry | undefined {
  // The last entry wins: mounts stack.
  return listMounts()
    .filter((m) => m.mountpoint === mountpoint)
    .pop();
}

/** True when stat(2) of the path fails with ENOTCONN (or ECONNABORTED): a FUSE mount whose daemon is gone. */
export function isStaleFuseMount(mountpoint: string): boolean {
  try {
    fs.statSync(mountpoint);
    return false;
  } catch (err) {
    // ENOTCONN once the daemon is gone; ECONNABORTED while the kernel is still aborting the connection.
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

/** The kernel lists mounts by real path; a stale mount cannot be resolved, so keep it as given. */
export function realMountpoint(p: string): string {
  try {
    return fs.realpathSync(path.resolve(p));
  } catch {
    return path.resolve(p);
  }
}

/** Refuses stale, busy, non-directory and non-empty mountpoints with one clear line each. */
export function checkMountpoint(mountpoint: string): void {
  if (isStaleFuseMount(mountpoint)) {
    throw new UsageError(
      `mountpoint ${mountpoint} is a stale FUSE mount (its daemon died; "Transport endpoint is not connected"): clean it with "qcow2fs umount ${mountpoint}" or "fusermount -u ${mountpoint}"`,
    );
  }
  let st: fs.Stats;
  try {
    st = fs.statSync(mountpoint);
  } catch (err) {
    throw new UsageError(describeSystemError(err, `mountpoint ${mountpoint}`));
  }
  if (!st.isDirectory()) throw new UsageError(`mountpoint ${mountpoint}: not a directory`);
  const existing = findMount(mountpoint);
  if (existing) throw new UsageError(`mountpoint ${mountpoint} is busy: ${existing.source} (${existing.fstype}) is already mounted there`);
  // libfuse 2 refuses to hide files ("fuse failed"); say why instead.
  let entries: string[] = [];
  try {
    entries = fs.readdirSync(mountpoint);
  } catch (err) {
    throw new UsageError(describeSystemError(err, `mountpoint ${mountpoint}`));
  }
  if (entries.length > 0) throw new UsageError(`mountpoint ${mountpoint} is not empty (${entries.length} entries); mount on an empty directory`);
}

/**
 * Where a daemon leaves the failure that ended it (a flush or close of the image that failed at
 * unmount), for `qcow2fs umount` to report: the daemon's own exit status reaches nobody.
 */
function daemonFailureFile(pid: number): string {
  return path.join(os.tmpdir(), `qcow2fs-daemon-${pid}.failed`);
}

export function writeDaemonFailure(pid: number, message: string): void {
  try {
    fs.writeFileSync(daemonFailureFile(pid), message.split('\n')[0]! + '\n', { mode: 0o600 });
  } catch {
    // Nowhere to leave it: the daemon's log still has it.
  }
}

/** The failure a daemon that has exited left behind (removed once read), or null. */
export function takeDaemonFailure(pid: number): string | null {
  const file = daemonFailureFile(pid);
  try {
    const text = fs.readFileSync(file, 'utf8').trim();
    fs.rmSync(file, { force: true });
    return text;
  } catch {
    return null;
  }
}
