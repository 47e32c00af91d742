/**
 * Runs the workloads: for each workload, repetition after repetition, every system in turn
 * (A B C D A B C D ...), each from an identical image, with the page cache dropped before the
 * run. Failures become samples with an error and the run goes on.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { onCleanup } from './cleanup';
import { exec, firstLine, isInterrupted, must, sleep } from './exec';
import { runFio } from './fio';
import { cpuSeconds, dropCaches, peakRssBytes, warmFile } from './host';
import { freshCopy, freshEmptyQcow2, freshEmptyRaw, TIB, type ImageSet } from './images';
import type { SizeProfile } from './profile';
import type { BenchSystem, SystemId } from './systems';
import type { ImageKind, Workload } from './workloads';

export interface Sample {
  workload: string;
  system: SystemId;
  rep: number;
  /** The figure in the workload's unit; absent when the run failed. */
  value?: number;
  error?: string;
  bytesMoved?: number;
  /** The daemon's CPU seconds (user + system) during the measured part. */
  cpuSeconds?: number;
  peakRssBytes?: number;
}

export interface RunOptions {
  sizes: SizeProfile;
  images: ImageSet;
  workdir: string;
  repetitions: number;
  /** Leave the source image out of the page cache too (default: cached, the FUSE file cold). */
  coldSource: boolean;
  say: (msg: string) => void;
}

interface Instance {
  path: string;
  virtualBytes: number;
  dispose(): void;
}

/** The systems that take part in a workload. */
export function systemsFor(w: Workload, systems: readonly BenchSystem[]): BenchSystem[] {
  return systems.filter((s) => (!w.writes || s.canWrite) && !(w.measure.kind === 'mount-to-ready' && !s.servesQcow2));
}

/** The image a run starts from: the shared read-only image, or a fresh copy when the run writes. */
async function instanceFor(kind: ImageKind, writes: boolean, sys: BenchSystem, o: RunOptions): Promise<Instance> {
  const qcow2 = sys.servesQcow2;
  const runDir = path.join(o.workdir, 'run');
  fs.mkdirSync(runDir, { recursive: true });
  const scratch = path.join(runDir, `${sys.id}.${qcow2 ? 'qcow2' : 'raw'}`);
  const fresh = (virtualBytes: number): Instance => ({ path: scratch, virtualBytes, dispose: () => fs.rmSync(scratch, { force: true }) });
  const shared = (p: string, virtualBytes: number): Instance => ({ path: p, virtualBytes, dispose: () => undefined });
  switch (kind) {
    case 'empty-data':
    case 'empty-fs': {
      const bytes = kind === 'empty-data' ? o.sizes.dataBytes : o.sizes.fsImageBytes;
      if (qcow2) await freshEmptyQcow2(scratch, bytes);
      else freshEmptyRaw(scratch, bytes);
      return fresh(bytes);
    }
    case 'big-snap':
      return shared(o.images.bigSnap, TIB);
    default: {
      const src = qcow2 ? o.images[kind] : o.images.sourceRaw;
      if (!writes) return shared(src, o.sizes.dataBytes);
      await freshCopy(src, scratch);
      return fresh(o.sizes.dataBytes);
    }
  }
}

async function readFirstSector(file: string): Promise<void> {
  const fd = fs.openSync(file, 'r');
  try {
    const n = fs.readSync(fd, Buffer.alloc(4096), 0, 4096, 0);
    if (n !== 4096) throw new Error(`short read of ${file}: ${n} bytes`);
  } finally {
    fs.closeSync(fd);
  }
}

/** umount, retried while something still lets go of the mount; lazily as the last resort. */
async function unmountExt4(mnt: string): Promise<void> {
  for (let attempt = 0; attempt < 10; attempt++) {
    const r = await exec('umount', [mnt], { forCleanup: true });
    if (r.code === 0) return;
    await sleep(200);
  }
  await must('umount', ['-l', mnt], { forCleanup: true });
}

/** mkfs.ext4 + mount + untar + sync + umount on a loop device over `file`; returns seconds. */
async function fsPopulate(file: string, o: RunOptions): Promise<number> {
  const loop = (await must('losetup', ['--find', '--show', file])).trim();
  const detachLoop = onCleanup(`loop device ${loop}`, async () => void (await exec('losetup', ['-d', loop], { forCleanup: true })));
  try {
    const mnt = path.join(o.workdir, 'mnt', 'fs');
    fs.mkdirSync(mnt, { recursive: true });
    const t0 = process.hrtime.bigint();
    await must('mkfs.ext4', ['-q', '-F', loop]);
    await must('mount', [loop, mnt]);
    const unmountFs = onCleanup(`ext4 on ${mnt}`, () => unmountExt4(mnt));
    await must('tar', ['-xf', o.images.treeTar, '-C', mnt]);
    await must('sync', ['-f', mnt]);
    await unmountFs();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const fsck = await exec('e2fsck', ['-fn', loop]);
    if (fsck.code !== 0) throw new Error(`e2fsck -fn found problems (status ${fsck.code}): ${firstLine(fsck.stdout + fsck.stderr)}`);
    return seconds;
  } finally {
    await detachLoop();
  }
}

async function runOne(w: Workload, sys: BenchSystem, rep: number, o: RunOptions): Promise<Sample> {
  const sample: Sample = { workload: w.id, system: sys.id, rep };
  let inst: Instance | null = null;
  let detach: (() => Promise<void>) | null = null;
  try {
    inst = await instanceFor(w.image, w.writes, sys, o);
    const req = { image: inst.path, writable: w.writes, virtualBytes: inst.virtualBytes };
    if (w.dropCaches) await dropCaches();
    if (!o.coldSource) await warmFile(inst.path);

    if (w.measure.kind === 'mount-to-ready') {
      const t0 = process.hrtime.bigint();
      const att = await sys.attach(req);
      detach = att.detach;
      await readFirstSector(att.file);
      sample.value = Number(process.hrtime.bigint() - t0) / 1e6;
      sample.bytesMoved = 4096;
      const pid = att.pid();
      if (pid !== null) sample.peakRssBytes = peakRssBytes(pid) ?? undefined;
      return sample;
    }

    const att = await sys.attach(req);
    detach = att.detach;
    const size = fs.statSync(att.file).size;
    if (size !== inst.virtualBytes) throw new Error(`${att.file} is ${size} bytes, expected ${inst.virtualBytes}`);
    const pid = att.pid();
    const cpu0 = pid !== null ? cpuSeconds(pid) : null;
    if (w.measure.kind === 'fio') {
      const job = w.measure.job(o.sizes);
      const r = await runFio(job, att.file, w.id);
      sample.value = w.unit === 'IOPS' ? r.iops : r.bandwidth / (1024 * 1024);
      sample.bytesMoved = r.bytesMoved;
    } else {
      sample.value = await fsPopulate(att.file, o);
      sample.bytesMoved = o.images.treeBytes;
    }
    if (pid !== null) {
      const cpu1 = cpuSeconds(pid);
      if (cpu0 !== null && cpu1 !== null) sample.cpuSeconds = cpu1 - cpu0;
      sample.peakRssBytes = peakRssBytes(pid) ?? undefined;
    }
    return sample;
  } catch (err) {
    sample.error = (err instanceof Error ? err.message : String(err)).split('\n')[0];
    return sample;
  } finally {
    if (detach) {
      try {
        await detach();
      } catch (err) {
        sample.error ??= `detach failed: ${(err as Error).message}`;
      }
    }
    inst?.dispose();
  }
}

function show(s: Sample, w: Workload): string {
  if (s.error !== undefined) return `n/a (error: ${s.error})`;
  const v = s.value!;
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(2)} ${w.unit}`;
}

/** Runs every workload on every system, interleaved, `repetitions` times. */
export async function runAll(workloads: readonly Workload[], systems: readonly BenchSystem[], o: RunOptions): Promise<Sample[]> {
  const samples: Sample[] = [];
  for (const [i, w] of workloads.entries()) {
    const those = systemsFor(w, systems);
    o.say(`[${i + 1}/${workloads.length}] ${w.id}: ${w.title}`);
    for (let rep = 1; rep <= o.repetitions; rep++) {
      for (const sys of those) {
        if (isInterrupted()) throw new Error('interrupted');
        const s = await runOne(w, sys, rep, o);
        samples.push(s);
        o.say(`    rep ${rep}/${o.repetitions} ${sys.label.padEnd(10)} ${show(s, w)}`);
      }
    }
  }
  return samples;
}
