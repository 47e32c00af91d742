/**
 * Allocating writes done by the binding (src/fuse/direct-read.ts, vendor/fuse-native
 * qcow2fs_allocate_locked): a write to an unallocated cluster that reads as zeros takes a fresh
 * host cluster from a pool the engine reserved, and the engine takes the allocation into its L2
 * tables later. The dangers: an allocation the engine never learns of (data lost, or a leak), one
 * it learns of too late (a read, discard or copy-on-write of the engine working from stale
 * metadata), two allocations of one cluster (concurrent writers), a pool cluster that is not
 * zeros, and pool clusters left allocated at unmount. So, through a mounted raw file with
 * O_DIRECT, on images of every layout, with the periodic hand-over turned off
 * (QCOW2FS_ALLOC_SETTLE_MS) so that only reads, writes, discards and flushes hand over:
 *  - rounds of concurrent non-overlapping writes (qemu-io aio_write, many in flight, several in
 *    one cluster), read back at once, then some discarded again at once (fallocate), and the
 *    whole raw file compared with a reference image that got the same writes through qemu-io;
 *  - reads that the engine serves (spanning a compressed cluster) right after a native
 *    allocation next to it, compared byte for byte with the reference;
 *  - after unmounting: qemu-img check clean with no leaks (unused pool clusters given back), the
 *    file no longer than the image end offset, equal to the reference, snapshots unchanged, and
 *    the daemon's own count shows native allocations happened.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qemuImg, qemuIo, REPO, removeScratch, rng, run, scratchDir, sha256File, withMount } from './support/env';
import { directMapCounters } from './support/daemons';
import { expectCheckClean, expectSameContent } from './support/oracle';

afterAll(removeScratch);

// Hand over only on reads, writes, discards and flushes (never by the timer) during this file.
process.env.QCOW2FS_ALLOC_SETTLE_MS = '3600000';

const MiB = 1024 * 1024;
const SIZE = 40 * MiB;

interface Case {
  name: string;
  opts: string;
  /** Write unit (bytes): writes are multiples of it, placed on its boundaries. */
  unit: number;
  fill: string[];
  snapshot?: boolean;
  /** Clusters the binding must have allocated at least (the disk has few big clusters). */
  minAllocs?: number;
  /** A compressed backing file (the image is an overlay on it). */
  compressedBacking?: boolean;
  /** Disk size (default SIZE). */
  size?: number;
}

const CASES: Case[] = [
  {
    name: '64K clusters, internal snapshot, zero clusters (with and without a host cluster)',
    opts: 'cluster_size=64k',
    unit: 4096,
    fill: ['write -P 0x11 0 4M', 'write -z 1M 512k', 'write -z -u 2M 256k', 'write -P 0x12 20M 1M'],
    snapshot: true,
  },
  { name: '4K clusters', opts: 'cluster_size=4k', unit: 1024, fill: ['write -P 0x21 0 2M'] },
  { name: '512-byte clusters', opts: 'cluster_size=512', unit: 512, fill: ['write -P 0x31 0 1M'] },
  { name: '2M clusters', opts: 'cluster_size=2M', unit: 65536, fill: ['write -P 0x41 0 4M', 'write -z -u 8M 2M'], snapshot: true, minAllocs: 1 },
  {
    name: 'extended_l2',
    opts: 'extended_l2=on,cluster_size=64k',
    unit: 2048,
    fill: ['write -P 0x51 0 2M', 'write -P 0x52 4M 4k', 'write -z 5M 8k', 'write -z -u 6M 64k'],
  },
  { name: 'v2 (compat=0.10)', opts: 'compat=0.10,cluster_size=64k', unit: 4096, fill: ['write -P 0x61 0 2M'], snapshot: true },
  // Only clusters whose backing is a hole are allocatable by the binding (about 52 of them, and
  // fewer when the engine gets to a cluster first on a loaded machine).
  { name: 'overlay on a compressed backing file with holes', opts: 'cluster_size=64k', unit: 4096, fill: [], compressedBacking: true, minAllocs: 25 },
  // The last cluster is partial: writes into it allocate a whole host cluster.
  { name: 'odd size (40 MiB + 12 KiB), 64K clusters', opts: 'cluster_size=64k', unit: 4096, fill: ['write -P 0x71 0 1M'], size: SIZE + 12 * 1024 },
];

interface Write {
  off: number;
  len: number;
  pattern: number;
}

/** Non-overlapping writes spread over the disk, several landing in one cluster, in random order. */
function planWrites(r: () => number, unit: number, count: number, round: number, size = SIZE): Write[] {
  const writes: Write[] = [];
  let pos = Math.floor(r() * 64) * unit;
  while (writes.length < count && pos < size) {
    const len = unit * (1 + Math.floor(r() * (r() < 0.2 ? 64 : 4)));
    if (pos + len > size) break;
    writes.push({ off: pos, len, pattern: 1 + ((round * 97 + writes.length) % 250) });
    // Mostly small gaps (neighbours in one cluster), sometimes a jump.
    pos += len + unit * (r() < 0.7 ? Math.floor(r() * 3) : Math.floor(r() * 4096));
  }
  for (let i = writes.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [writes[i], writes[j]] = [writes[j]!, writes[i]!];
  }
  return writes;
}

/** Reads [off, +len) of a raw file with O_DIRECT (dd), so the daemon serves it. */
function readDirect(raw: string, off: number, len: number, unit: number, tmp: string): Buffer {
  const out = run('dd', [`if=${raw}`, `of=${tmp}`, `bs=${unit}`, `skip=${off / unit}`, `count=${len / unit}`, 'iflag=direct', 'status=none']);
  expect(out.code, out.stderr).toBe(0);
  return fs.readFileSync(tmp);
}

describe('allocating writes done by the binding match qemu-io', () => {
  it.each(CASES)('$name', async (c) => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('nalloc');
    const size = c.size ?? SIZE;
    const image = path.join(dir, 'disk.qcow2');
    const ref = path.join(dir, 'ref.qcow2');
    if (c.compressedBacking) {
      // Compressed clusters, each followed by a hole, so the engine reads around new clusters.
      const src = path.join(dir, 'src.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', src, String(SIZE));
      const fill: string[] = [];
      for (let off = 0; off < SIZE; off += 256 * 1024) fill.push(`write -P ${1 + ((off >> 18) % 200)} ${off} 64k`);
      qemuIo(src, fill);
      qemuImg('convert', '-q', '-c', '-O', 'qcow2', src, path.join(dir, 'base.qcow2'));
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, '-b', 'base.qcow2', '-F', 'qcow2', image, String(SIZE));
    } else {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, String(size));
      qemuIo(image, c.fill);
    }
    if (c.snapshot) qemuImg('snapshot', '-c', 'before', image);
    const snapBefore = path.join(dir, 'snap-before.raw');
    qemuImg('convert', '-O', 'raw', image, snapBefore);
    // The reference: the same guest content as a standalone qcow2, then the same writes.
    qemuImg('convert', '-O', 'qcow2', image, ref);

    const r = rng(c.name.length * 104729 + c.unit);
    const logFile = path.join(dir, 'daemon.log');
    await withMount(image, ['--log-level', 'debug', '--log-json', '--log-file', logFile], (raw) => {
      // One engine write first: the pool is reserved after the device's first write.
      const first = run('qemu-io', ['-f', 'raw', '-n', '-c', `write -P 0xee 0 ${c.unit}`, raw]);
      expect(first.code, first.stderr).toBe(0);
      qemuIo(ref, [`write -P 0xee 0 ${c.unit}`]);
      for (let round = 0; round < 4; round++) {
        const writes = planWrites(r, c.unit, 120, round, size);
        // Many in flight at once (a thread pool behind qemu-io's aio), then each read back.
        const cmds = [...writes.map((w) => `aio_write -P ${w.pattern} ${w.off} ${w.len}`), 'aio_flush', ...writes.map((w) => `read -P ${w.pattern} ${w.off} ${w.len}`)];
        const out = run('qemu-io', ['-f', 'raw', '-n', '-i', 'threads', ...cmds.flatMap((cmd) => ['-c', cmd]), raw]);
        expect(out.code, out.stderr).toBe(0);
        expect(out.stdout + out.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
        qemuIo(ref, writes.map((w) => `write -P ${w.pattern} ${w.off} ${w.len}`));
        // The disk's last bytes (in a partial cluster when the size is odd), read back at once.
        const tail = `${size - 2 * c.unit} ${2 * c.unit}`;
        const t = run('qemu-io', ['-f', 'raw', '-n', '-c', `write -P ${0xd0 + round} ${tail}`, '-c', `read -P ${0xd0 + round} ${tail}`, raw]);
        expect(t.code, t.stderr).toBe(0);
        expect(t.stdout + t.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
        qemuIo(ref, [`write -P ${0xd0 + round} ${tail}`]);
        // New clusters discarded again at once (the longest writes: whole clusters too; the engine
        // must know of them first).
        const more = planWrites(r, c.unit, 20, round + 10, size).sort((a, b) => b.len - a.len);
        // One process, no close in between (a close flushes, and a flush hands over): FUSE
        // writes are write-through, so each write reaches the daemon before the punch does.
        const script = `
          const fs = require('fs');
          const { punchHole } = require(${JSON.stringify(path.join(REPO, 'dist', 'io', 'file.js'))});
          const [raw, plan] = process.argv.slice(1);
          const fd = fs.openSync(raw, 'r+');
          const writes = JSON.parse(plan);
          for (const w of writes) fs.writeSync(fd, Buffer.alloc(w.len, w.pattern), 0, w.len, w.off);
          for (const w of writes.slice(0, 8)) if (!punchHole(fd, w.off, w.len)) throw new Error('punch hole failed');`;
        const w2 = run(process.execPath, ['-e', script, raw, JSON.stringify(more)]);
        expect(w2.code, w2.stderr).toBe(0);
        qemuIo(ref, more.map((w) => `write -P ${w.pattern} ${w.off} ${w.len}`));
        qemuIo(ref, more.slice(0, 8).map((w) => `write -z ${w.off} ${w.len}`));
        expectSameContent(raw, 'raw', ref, 'qcow2', { direct: true, what: `round ${round}` });
      }
      if (c.compressedBacking) {
        // A new cluster right after a compressed one, then a read of both: the engine serves it.
        const refRaw = path.join(dir, 'ref-now.raw');
        for (let i = 0; i < 8; i++) {
          const at = (8 + 16 * i) * 256 * 1024 + 64 * 1024;
          // In one process (no close, so no flush in between): the read goes to the engine, which
          // must take the allocation first.
          const wr = run('qemu-io', ['-f', 'raw', '-n', '-c', `write -P ${200 + i} ${at} 8k`, '-c', `read -P ${200 + i} -s 65536 -l 8192 ${at - 65536} 128k`, raw]);
          expect(wr.code, wr.stderr).toBe(0);
          expect(wr.stdout + wr.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
          qemuIo(ref, [`write -P ${200 + i} ${at} 8k`]);
          const got = readDirect(raw, at - 64 * 1024, 128 * 1024, 4096, path.join(dir, 'got.bin'));
          qemuImg('convert', '-O', 'raw', ref, refRaw);
          const want = fs.readFileSync(refRaw).subarray(at - 64 * 1024, at + 64 * 1024);
          expect(got.equals(want), `read across a compressed cluster and a new one at ${at}`).toBe(true);
        }
      }
    });
    expectCheckClean(image);
    expectSameContent(image, 'qcow2', ref, 'qcow2');
    // Unused pool clusters were given back: the file ends where its last cluster in use does.
    const info = JSON.parse(run('qemu-img', ['check', '--output', 'json', image]).stdout) as { 'image-end-offset': number };
    expect(fs.statSync(image).size).toBeLessThanOrEqual(info['image-end-offset']);
    if (c.snapshot) {
      const snap = path.join(dir, 'snap.raw');
      qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=before', image, snap);
      expect(run('cmp', [snap, snapBefore]).code, 'the snapshot is unchanged').toBe(0);
    }
    const { allocs, writes } = directMapCounters(logFile);
    expect(allocs, `clusters allocated by the binding (native writes ${writes})`).toBeGreaterThanOrEqual(c.minAllocs ?? 50);
  });
});

describe('a read-write mount that is never written', () => {
  it('reserves nothing: the image file is unchanged (content and mtime) after reads and idle time', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('nalloc-idle');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, String(SIZE));
    qemuIo(image, ['write -P 0x5a 1M 3M']);
    const before = sha256File(image);
    const mtimeBefore = fs.statSync(image).mtimeMs;
    const saved = process.env.QCOW2FS_ALLOC_SETTLE_MS;
    process.env.QCOW2FS_ALLOC_SETTLE_MS = '20';
    try {
      await withMount(image, [], async (raw) => {
        const dd = run('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']);
        expect(dd.code, dd.stderr).toBe(0);
        // Several of the periodic hand-over ticks.
        await new Promise((res) => setTimeout(res, 300));
      });
    } finally {
      process.env.QCOW2FS_ALLOC_SETTLE_MS = saved;
    }
    expect(sha256File(image)).toBe(before);
    expect(fs.statSync(image).mtimeMs, 'nothing was written to the image file').toBe(mtimeBefore);
  });
});

describe('concurrent allocating writes (fio, 4 jobs x QD16, verified)', () => {
  it.each(['cluster_size=64k', 'extended_l2=on,cluster_size=64k', 'cluster_size=4k'])('%s: fio verifies through the mount, and again on what QEMU reads', async (opts) => {
    need('qemu-img', 'fio', '/dev/fuse');
    const dir = scratchDir('nalloc-fio');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, image, String(256 * MiB));
    // Four writers in their own 64 MiB each, sizes 512 B-64 KiB, 16 in flight each: several
    // allocations of neighbouring clusters at once. crc32c headers in every block.
    const job = (file: string, verifyOnly: boolean): string[] => [
      '--name=v', `--filename=${file}`, '--rw=randwrite', '--bsrange=512-64k', '--direct=1', '--ioengine=libaio', '--iodepth=16',
      '--numjobs=4', '--size=64M', '--offset_increment=64M', '--verify=crc32c', '--verify_state_save=0', '--randrepeat=1',
      '--group_reporting', '--output-format=terse', ...(verifyOnly ? ['--verify_only=1'] : ['--do_verify=1']),
    ];
    const logFile = path.join(dir, 'daemon.log');
    await withMount(image, ['--log-level', 'debug', '--log-json', '--log-file', logFile], (raw) => {
      const out = run('fio', job(raw, false));
      expect(out.code, out.stdout + out.stderr).toBe(0);
      expect(out.stdout.trim().split('\n').pop()!.split(';')[4], 'fio errors through the mount').toBe('0');
    });
    expectCheckClean(image);
    const back = path.join(dir, 'back.raw');
    qemuImg('convert', '-O', 'raw', image, back);
    const verify = run('fio', job(back, true));
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect(verify.stdout.trim().split('\n').pop()!.split(';')[4], 'fio errors on what QEMU reads').toBe('0');
    expect(directMapCounters(logFile).allocs).toBeGreaterThan(1000);
  });
});
