/**
 * Test support for mount lifecycles: find a mount's daemon, wait for it to exit, see how it
 * opened its files, and clean up whatever a failed test left mounted.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isMounted, run, sha256File } from './env';

/** PIDs of qcow2fs daemons serving `mountpoint` (their command line names it after --daemon-of). */
export function daemonPids(mountpoint: string): number[] {
  const mp = path.resolve(mountpoint);
  const out: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let argv: string[];
    try {
      argv = fs.readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    const i = argv.indexOf('--daemon-of');
    if (i >= 0 && argv[i + 1] === mp) out.push(Number(name));
  }
  return out;
}

export function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** Waits until every pid has exited; false on timeout. */
export async function waitGone(pids: number[], timeoutMs = 15_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (pids.some(alive)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 25));
  }
  return true;
}

/** The daemon's open descriptors onto regular files: target path and access mode (0 = O_RDONLY). */
export function openFiles(pid: number): Array<{ target: string; accessMode: number }> {
  const out: Array<{ target: string; accessMode: number }> = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    if (!target.startsWith('/')) continue;
    const info = fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    const m = /^flags:\s*([0-7]+)/m.exec(info);
    out.push({ target, accessMode: m ? parseInt(m[1]!, 8) & 3 : -1 });
  }
  return out;
}

/** Last-resort cleanup for a test's mountpoint: lazy unmount, kill its daemons. */
export function forceCleanup(mountpoint: string): void {
  for (const pid of daemonPids(mountpoint)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone.
    }
  }
  if (isMounted(mountpoint)) run('umount', ['-i', '-l', mountpoint]);
  if (isMounted(mountpoint)) run('fusermount', ['-u', '-z', mountpoint]);
}

/** What must not change on a read-only mount: content, mtime (ns) and size. */
export interface FileState {
  sha256: string;
  mtimeNs: bigint;
  size: number;
}

export function fileState(p: string): FileState {
  const st = fs.statSync(p, { bigint: true });
  return { sha256: sha256File(p), mtimeNs: st.mtimeNs, size: Number(st.size) };
}

/** The direct maps' counters a daemon logs at unmount ('direct read map closed', debug, JSON). */
export interface DirectMapCounters {
  hits: number;
  misses: number;
  writes: number;
  allocs: number;
  decoded: number;
  decodedAhead: number;
  /** Reads that waited for room in the decoded-cluster cache. */
  decodeWaits: number;
}

/** Sums the counters of every direct map in a daemon's JSON log file (--log-level debug --log-json). */
export function directMapCounters(logFile: string): DirectMapCounters {
  const sum: DirectMapCounters = { hits: 0, misses: 0, writes: 0, allocs: 0, decoded: 0, decodedAhead: 0, decodeWaits: 0 };
  for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
    if (!line.includes('direct read map closed')) continue;
    const rec = JSON.parse(line) as Partial<DirectMapCounters>;
    for (const k of Object.keys(sum) as Array<keyof DirectMapCounters>) sum[k] += rec[k] ?? 0;
  }
  return sum;
}

/** The OFD lock bytes held on a file, as "TYPE@byte" strings, from /proc/locks (QEMU's image locks). */
export function ofdLockBytes(file: string): string[] {
  const ino = fs.statSync(file).ino;
  return fs
    .readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f[1] === 'OFDLCK' && f[5]?.endsWith(`:${ino}`))
    .flatMap((f) => {
      const out: string[] = [];
      for (let b = Number(f[6]); b <= Number(f[7]); b++) out.push(`${f[3]}@${b}`);
      return out;
    })
    .sort();
}
