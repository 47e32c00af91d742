/**
 * The four systems every workload runs on: (a) qcow2fs, (b) QEMU's own FUSE export
 * (qemu-storage-daemon), (c) libqcow's qcowmount (read-only), (d) the plain raw file, no FUSE
 * (the ceiling). Each attach returns the file to run the workload on, and the daemon's PID for
 * its RSS and CPU counters; each registers its undo with the cleanup stack.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { rawFileName } from '../fuse/layout';
import { findMount } from '../fuse/mounts';
import { onCleanup } from './cleanup';
import { commandLine, exec, firstLine, isInterrupted, must, sleep } from './exec';
import { findProcesses, processAlive } from './host';

/** 'baseline': another qcow2fs build (--compare DIR), to measure an optimisation in the same run. */
export type SystemId = 'qcow2fs' | 'baseline' | 'qsd' | 'qcowmount' | 'raw';

export interface AttachRequest {
  /** The qcow2 image (for 'raw': the raw file). */
  image: string;
  writable: boolean;
  virtualBytes: number;
}

export interface Attached {
  /** The flat raw view to run the workload on. */
  file: string;
  /** The serving daemon's PID (found lazily: the search in /proc is not part of any timing). */
  pid(): number | null;
  detach(): Promise<void>;
}

export interface BenchSystem {
  id: SystemId;
  label: string;
  /** Whether the system can serve writes at all (qcowmount cannot). */
  canWrite: boolean;
  /** Whether it reads qcow2 images (false: it gets the raw equivalent). */
  servesQcow2: boolean;
  attach(req: AttachRequest): Promise<Attached>;
  /** The commands it runs, for docs/PERFORMANCE.md. */
  commandTemplate(writable: boolean): string;
}

const READY_TIMEOUT_MS = 20_000;

async function waitUntil(what: string, ok: () => boolean, failed: () => string | null, timeoutMs = READY_TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (ok()) return;
    const why = failed();
    if (why !== null) throw new Error(why);
    if (Date.now() > deadline) throw new Error(`${what}: not ready after ${timeoutMs} ms`);
    await sleep(1);
  }
}

function sizeIs(file: string, bytes: number): boolean {
  try {
    return fs.statSync(file).size === bytes;
  } catch {
    return false;
  }
}

function isFuseMounted(mountpoint: string): boolean {
  return findMount(mountpoint)?.fstype.startsWith('fuse') ?? false;
}

/** Ends a daemon we started: SIGTERM, then SIGKILL if it lingers; then a lazy unmount if still mounted. */
async function stopDaemon(pid: number | null, mountpoint: string): Promise<void> {
  if (pid !== null && processAlive(pid)) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // Gone meanwhile.
    }
    const deadline = Date.now() + 15_000;
    while (processAlive(pid) && Date.now() < deadline) await sleep(10);
    if (processAlive(pid)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Gone meanwhile.
      }
    }
  }
  if (isFuseMounted(mountpoint)) await exec('fusermount', ['-u', '-z', mountpoint], { forCleanup: true });
}

function once<T>(f: () => T): () => T {
  let done = false;
  let v: T;
  return () => {
    if (!done) {
      v = f();
      done = true;
    }
    return v;
  };
}

/**
 * `qcow2fsBin`: the launcher to benchmark (this checkout's bin/qcow2fs, or another build's);
 * `baselineBin`: another build to run side by side as 'baseline'.
 */
export function makeSystems(mountRoot: string, qcow2fsBin: string, baselineBin?: string): BenchSystem[] {
  fs.mkdirSync(mountRoot, { recursive: true });

  const qcow2fsSystem = (id: 'qcow2fs' | 'baseline', label: string, bin: string): BenchSystem => ({
    id,
    label,
    canWrite: true,
    servesQcow2: true,
    commandTemplate: (w) => `bin/qcow2fs mount${w ? '' : ' -r'} IMAGE MP   # file MP/<name>.raw; qcow2fs umount MP`,
    async attach(req) {
      const mp = path.join(mountRoot, id);
      fs.mkdirSync(mp, { recursive: true });
      // Run as users run it: the command itself (its #! line), not `node bin/qcow2fs`.
      const r = await exec(bin, ['mount', ...(req.writable ? [] : ['-r']), req.image, mp]);
      if (r.code !== 0) throw new Error(`qcow2fs mount: ${firstLine(r.stderr) || `exit status ${r.code}`}`);
      const pid = once(() => findProcesses((a) => a.includes('--daemon-of') && a[a.indexOf('--daemon-of') + 1] === mp)[0] ?? null);
      const undo = onCleanup(`${label} mount ${mp}`, async () => {
        const p = pid();
        const u = await exec(process.execPath, [bin, 'umount', mp], { timeoutMs: 120_000, forCleanup: true });
        if (u.code !== 0 || (p !== null && processAlive(p)) || isFuseMounted(mp)) await stopDaemon(p, mp);
      });
      const file = path.join(mp, rawFileName(req.image));
      return { file, pid, detach: undo };
    },
  });
  const qcow2fs = qcow2fsSystem('qcow2fs', 'qcow2fs', qcow2fsBin);
  const baseline = baselineBin ? [qcow2fsSystem('baseline', 'baseline', baselineBin)] : [];

  const qsd: BenchSystem = {
    id: 'qsd',
    label: 'QSD',
    canWrite: true,
    servesQcow2: true,
    commandTemplate: (w) => commandLine('qemu-storage-daemon', qsdArgs('IMAGE', 'EXPORT_FILE', w)) + '   # EXPORT_FILE: an existing regular file',
    async attach(req) {
      const exportFile = path.join(mountRoot, 'qsd-export.raw');
      if (isFuseMounted(exportFile)) throw new Error(`${exportFile} is still mounted from an earlier run`);
      fs.writeFileSync(exportFile, '');
      if (isInterrupted()) throw new Error('interrupted');
      const child = spawn('qemu-storage-daemon', qsdArgs(req.image, exportFile, req.writable), {
        detached: true, // its own process group: a Ctrl-C reaches us, and we stop it in order
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      let exited: string | null = null;
      child.stderr?.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
      child.on('exit', (code, sig) => (exited = `qemu-storage-daemon exited (${sig ?? `status ${code}`}): ${firstLine(stderr)}`));
      child.on('error', (e) => (exited = `cannot run qemu-storage-daemon: ${e.message}`));
      const pid = child.pid ?? null;
      const undo = onCleanup(`qemu-storage-daemon ${exportFile}`, () => stopDaemon(exited === null ? pid : null, exportFile));
      try {
        await waitUntil('qemu-storage-daemon', () => isFuseMounted(exportFile) && sizeIs(exportFile, req.virtualBytes), () => exited);
      } catch (err) {
        await undo();
        throw err;
      }
      return { file: exportFile, pid: () => pid, detach: undo };
    },
  };

  const qcowmount: BenchSystem = {
    id: 'qcowmount',
    label: 'qcowmount',
    canWrite: false,
    servesQcow2: true,
    commandTemplate: () => 'qcowmount IMAGE MP   # file MP/qcow1; fusermount -u MP',
    async attach(req) {
      if (req.writable) throw new Error('qcowmount is read-only');
      const mp = path.join(mountRoot, 'qcowmount');
      fs.mkdirSync(mp, { recursive: true });
      const file = path.join(mp, 'qcow1');
      // qcowmount forks into the background once mounted, or fails before.
      const r = await exec('qcowmount', [req.image, mp]);
      if (r.code !== 0) {
        const why = r.stderr.split('\n').find((l) => /unsupported|unable to open file/i.test(l)) ?? firstLine(r.stderr);
        throw new Error(`qcowmount: ${why.trim() || `exit status ${r.code}`}`);
      }
      const pid = once(() => findProcesses((a) => path.basename(a[0] ?? '') === 'qcowmount' && a.includes(mp))[0] ?? null);
      const undo = onCleanup(`qcowmount ${mp}`, async () => {
        const p = pid();
        await exec('fusermount', ['-u', mp], { forCleanup: true });
        const deadline = Date.now() + 5000;
        while (p !== null && processAlive(p) && Date.now() < deadline) await sleep(10);
        if ((p !== null && processAlive(p)) || isFuseMounted(mp)) await stopDaemon(p, mp);
      });
      try {
        await waitUntil('qcowmount', () => sizeIs(file, req.virtualBytes), () => null);
      } catch (err) {
        await undo();
        throw err;
      }
      return { file, pid, detach: undo };
    },
  };

  const raw: BenchSystem = {
    id: 'raw',
    label: 'raw file',
    canWrite: true,
    servesQcow2: false,
    commandTemplate: () => '(none: the workload runs on the raw file itself)',
    attach(req) {
      return Promise.resolve({ file: req.image, pid: () => null, detach: () => Promise.resolve() });
    },
  };

  return [qcow2fs, ...baseline, qsd, qcowmount, raw];
}

function qsdArgs(image: string, exportFile: string, writable: boolean): string[] {
  const ro = writable ? '' : ',read-only=on';
  return [
    '--blockdev', `driver=file,node-name=file0,filename=${image}${ro}`,
    '--blockdev', `driver=qcow2,node-name=disk0,file=file0${ro}`,
    '--export', `type=fuse,id=exp0,node-name=disk0,mountpoint=${exportFile},writable=${writable ? 'on' : 'off'}`,
  ];
}

/** Unmounts whatever an interrupted earlier run left under `mountRoot`. */
export async function clearStaleMounts(mountRoot: string): Promise<void> {
  for (const name of ['qcow2fs', 'baseline', 'qcowmount', 'qsd-export.raw', 'fs']) {
    const mp = path.join(mountRoot, name);
    const m = findMount(mp);
    if (!m) continue;
    if (m.fstype.startsWith('fuse')) await exec('fusermount', ['-u', '-z', mp], { forCleanup: true });
    else await must('umount', ['-l', mp], { forCleanup: true });
  }
}
