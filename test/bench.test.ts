/**
 * The benchmark harness (issue 6): its figures must come from the right files and its reports
 * must say what was measured. Pure parts are checked directly; the systems are attached for
 * real (qcow2fs, QEMU's FUSE export, qcowmount, raw) on a small image and compared with
 * `qemu-img convert -O raw`, and every mount must be gone after detach.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { cleanupAll, onCleanup } from '../src/bench/cleanup';
import { hotSpots } from '../src/bench/cpuprofile';
import { writeDataFile, writeTree } from '../src/bench/data';
import { fioArgs, runFio } from '../src/bench/fio';
import { cpuSeconds, peakRssBytes } from '../src/bench/host';
import { FULL, QUICK } from '../src/bench/profile';
import { formatValue, keptLog, median, renderDoc, resultsTable, rowsOf, summarize } from '../src/bench/report';
import type { Sample } from '../src/bench/runner';
import { systemsFor } from '../src/bench/runner';
import { makeSystems } from '../src/bench/systems';
import { WORKLOADS } from '../src/bench/workloads';
import { BIN, need, qemuImg, qemuIo, qemuRawSha, removeScratch, scratchDir, sha256File } from './support/env';
import { findMount } from '../src/fuse/mounts';

afterAll(() => removeScratch());

const MiB = 1024 * 1024;

describe('workload table', () => {
  it('has unique ids, and fio jobs stay inside their images in both profiles', () => {
    const ids = WORKLOADS.map((w) => w.id);
    expect(new Set(ids).size).toBe(ids.length);
    for (const sizes of [FULL, QUICK]) {
      for (const w of WORKLOADS) {
        if (w.measure.kind !== 'fio') continue;
        const job = w.measure.job(sizes);
        const limit = w.image === 'empty-fs' ? sizes.fsImageBytes : sizes.dataBytes;
        expect(job.sizeBytes, w.id).toBeLessThanOrEqual(limit);
        expect(job.rw.includes('write'), w.id).toBe(w.writes);
      }
    }
    expect(FULL.repetitions).toBeGreaterThanOrEqual(3);
    expect(FULL.dataBytes).toBe(2 * 1024 * MiB);
    expect(FULL.seqWriteBytes).toBe(1024 * MiB);
  });

  it('keeps qcowmount out of writes and the raw file out of mount time', () => {
    const systems = makeSystems(scratchDir('sys'), BIN);
    for (const w of WORKLOADS) {
      const ids = systemsFor(w, systems).map((s) => s.id);
      expect(ids.includes('qcowmount'), w.id).toBe(!w.writes);
      expect(ids.includes('raw'), w.id).toBe(w.measure.kind !== 'mount-to-ready');
      expect(ids, w.id).toContain('qcow2fs');
      expect(ids, w.id).toContain('qsd');
    }
  });
});

describe('fio jobs', () => {
  it('builds the command line from the job record', () => {
    const read = fioArgs({ rw: 'randread', blockSize: '4k', ioengine: 'libaio', iodepth: 16, direct: true, sizeBytes: 8 * MiB, ioBytes: MiB, runtimeCapS: 5 }, '/x/f.raw', 'j');
    expect(read).toEqual(expect.arrayContaining(['--rw=randread', '--bs=4k', '--ioengine=libaio', '--iodepth=16', '--direct=1', `--size=${8 * MiB}`, `--io_size=${MiB}`, '--runtime=5', '--readonly', '--filename=/x/f.raw']));
    const write = fioArgs({ rw: 'write', blockSize: '1M', ioengine: 'psync', iodepth: 1, direct: false, sizeBytes: MiB, endFsync: true }, '/x/f.raw', 'w');
    expect(write).toContain('--end_fsync=1');
    expect(write).not.toContain('--readonly');
  });

  it('reports bytes moved from a real run, and a one-line error from a failing one', async () => {
    need('fio');
    const dir = scratchDir('fio');
    const f = path.join(dir, 'f.raw');
    fs.writeFileSync(f, Buffer.alloc(4 * MiB, 7));
    const r = await runFio({ rw: 'read', blockSize: '1M', ioengine: 'psync', iodepth: 1, direct: false, sizeBytes: 4 * MiB }, f, 't');
    expect(r.bytesMoved).toBe(4 * MiB);
    expect(r.bandwidth).toBeGreaterThan(0);
    const bad = runFio({ rw: 'read', blockSize: '1M', ioengine: 'psync', iodepth: 1, direct: false, sizeBytes: 4 * MiB }, path.join(dir, 'missing.raw'), 't');
    await expect(bad).rejects.toThrow(/^[^\n]+$/);
  });
});

describe('report', () => {
  const sample = (system: Sample['system'], value: number | undefined, error?: string): Sample => ({
    workload: 'seq-read', system, rep: 1, ...(value !== undefined ? { value } : {}), ...(error ? { error } : {}),
  });

  it('takes medians and ranges, and names the error when every run failed', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    const s = summarize([sample('qcow2fs', 10), sample('qcow2fs', 30), sample('qcow2fs', 20)])!;
    expect([s.median, s.min, s.max, s.n, s.failed]).toEqual([20, 10, 30, 3, 0]);
    const f = summarize([sample('qcow2fs', undefined, 'Read-only file system (fio write)')])!;
    expect(f.n).toBe(0);
    expect(f.firstError).toBe('Read-only file system (fio write)');
    expect(formatValue(12345, 'IOPS')).toBe('12.3k');
    expect(formatValue(480.4, 'MiB/s')).toBe('480');
  });

  it('prints the ratio to QSD and to the best peer, and n/a with the error', () => {
    const systems = makeSystems(scratchDir('sys'), BIN);
    const samples = [
      sample('qcow2fs', 600), sample('qcow2fs', 400), sample('qcow2fs', 500),
      sample('qsd', 250), sample('qcowmount', 1000), sample('raw', 2000),
      { ...sample('qcow2fs', undefined, 'Read-only file system (fio write)'), workload: 'seq-write' },
      { ...sample('qsd', 100), workload: 'seq-write' },
    ];
    const table = resultsTable(rowsOf(WORKLOADS, samples, systems), systems);
    const lines = table.split('\n');
    const seq = lines.find((l) => l.startsWith('| Sequential read 1 MiB, buffered'))!;
    expect(seq).toContain('| 500 (400–600) |');
    expect(seq).toContain('| 2.00× | 0.50× |');
    const write = lines.find((l) => l.startsWith('| Sequential allocating write'))!;
    expect(write).toContain('n/a (error: Read-only file system (fio write))');
    expect(write).toContain('| — |'); // qcowmount does not take part
    expect(lines).toHaveLength(4); // header, rule, two workloads with samples
  });

  it('keeps the optimisation log of an existing doc', () => {
    const old = '# Performance\n\nold table\n\n## Optimisation log\n\n- zlib: one chunk per cluster, 128 -> 149 MiB/s\n';
    expect(keptLog(old)).toBe('## Optimisation log\n\n- zlib: one chunk per cluster, 128 -> 149 MiB/s\n');
    expect(keptLog(null)).toMatch(/^## Optimisation log\n/);
    const doc = renderDoc(
      {
        date: new Date(0), mode: 'quick', repetitions: 2, coldSource: false, results: '| t |', resources: '| r |',
        machine: { cpuModel: 'cpu', cores: 2, ramBytes: 8 * 1024 ** 3, kernel: '6.1', os: 'Debian', node: 'v20', versions: { fio: 'fio-3.33' } },
        imageCommands: ['qemu-img create x'], systemCommands: ['qemu-storage-daemon ...'], workloadCommands: ['fio --name=x'],
        invocation: 'npm run bench -- --quick', qcow2fsBuild: 'commit abc', loadAverage: { start: 0.5, end: 3 },
      },
      keptLog(old),
    );
    expect(doc).toContain('2 cores; RAM 8.0 GiB; kernel 6.1');
    expect(doc).toContain('fio --name=x');
    expect(doc).toContain('at start 0.50, at end 3.00 — **the machine was busy');
    expect(doc.endsWith('- zlib: one chunk per cluster, 128 -> 149 MiB/s\n')).toBe(true);
  });
});

describe('test data', () => {
  it('is deterministic, partly compressible and has no all-zero cluster', () => {
    const dir = scratchDir('data');
    const a = path.join(dir, 'a.raw');
    const b = path.join(dir, 'b.raw');
    writeDataFile(a, 4 * MiB);
    writeDataFile(b, 4 * MiB);
    expect(sha256File(a)).toBe(sha256File(b));
    const bytes = fs.readFileSync(a);
    const packed = zlib.deflateRawSync(bytes, { windowBits: 12 }).length;
    expect(bytes.length / packed).toBeGreaterThan(1.3);
    expect(bytes.length / packed).toBeLessThan(4);
    for (let off = 0; off < bytes.length; off += 65536) expect(bytes.subarray(off, off + 65536).some((x) => x !== 0)).toBe(true);
    const written = writeTree(path.join(dir, 'tree'), 2 * MiB, 200);
    expect(written).toBeGreaterThan(MiB);
    expect(written).toBeLessThan(4 * MiB);
  });
});

describe('cpu profile summary', () => {
  it('splits self and total time per function', () => {
    const frame = (functionName: string) => ({ functionName, url: '', lineNumber: 0 });
    const { spots, totalMs } = hotSpots({
      nodes: [
        { id: 1, callFrame: frame('(root)'), children: [2] },
        { id: 2, callFrame: frame('read'), children: [3] },
        { id: 3, callFrame: frame('inflate') },
      ],
      startTime: 0, endTime: 4000, samples: [2, 3, 3, 3], timeDeltas: [0, 1000, 1000, 1000],
    });
    const by = new Map(spots.map((s) => [s.name, s]));
    expect(totalMs).toBe(4);
    // A sample lasts until the next one (the last one as long as the one before it).
    expect(by.get('inflate')!.selfMs).toBe(3);
    expect(by.get('read')!.selfMs).toBe(1);
    expect(by.get('read')!.totalMs).toBe(4);
    expect(by.get('inflate')!.totalMs).toBe(3);
  });
});

describe('cleanup stack', () => {
  it('undoes newest first and goes on past a failure', async () => {
    const order: string[] = [];
    onCleanup('a', async () => void order.push('a'));
    onCleanup('b', async () => {
      order.push('b');
      throw new Error('b failed');
    });
    const runC = onCleanup('c', async () => void order.push('c'));
    await runC(); // run early: not again later
    onCleanup('d', async () => void order.push('d'));
    const stderr = process.stderr.write;
    process.stderr.write = (() => true) as typeof process.stderr.write;
    try {
      await cleanupAll();
    } finally {
      process.stderr.write = stderr;
    }
    expect(order).toEqual(['c', 'd', 'b', 'a']);
  });
});

describe('systems on a real image', () => {
  it('each shows the image\'s bytes, reports its daemon, and leaves nothing mounted', async () => {
    need('qemu-img', 'qemu-io', 'qemu-storage-daemon', 'qcowmount', 'fusermount', '/dev/fuse');
    const dir = scratchDir('systems');
    const img = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, String(32 * MiB));
    // No zero-flag clusters (write -z): libqcow 20201213 reads them wrong, a peer bug that the
    // benchmark's images avoid too (their data has no all-zero cluster).
    qemuIo(img, ['write -P 0x5a 0 1M', 'write -P 0xa5 17M 3M']);
    const raw = path.join(dir, 'disk.raw');
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, raw);
    const expected = qemuRawSha(img);
    const mnt = path.join(dir, 'mnt');
    for (const sys of makeSystems(mnt, BIN)) {
      const image = sys.servesQcow2 ? img : raw;
      const att = await sys.attach({ image, writable: false, virtualBytes: 32 * MiB });
      try {
        expect(sha256File(att.file), sys.id).toBe(expected);
        const pid = att.pid();
        if (sys.id === 'raw') expect(pid).toBeNull();
        else {
          expect(pid, sys.id).not.toBeNull();
          expect(peakRssBytes(pid!)!, sys.id).toBeGreaterThan(MiB);
          expect(cpuSeconds(pid!)!, sys.id).toBeGreaterThanOrEqual(0);
        }
      } finally {
        await att.detach();
      }
      for (const name of ['qcow2fs', 'qcowmount', 'qsd-export.raw']) expect(findMount(path.join(mnt, name)), `${sys.id} left ${name} mounted`).toBeUndefined();
    }
  });
});
