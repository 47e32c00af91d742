/**
 * Compressed clusters decoded by the binding's own threads (vendor/fuse-native qcow2fs_zread,
 * published by src/fuse/direct-read.ts): a cache of decoded clusters shared by libfuse's worker
 * threads and read-ahead helper threads. The dangers: wrong bytes of a cluster (offsets inside
 * it, the last partial cluster of an odd-sized disk), a cluster mixed up with another one
 * (cache keys, concurrent loads), stale copies after a write replaced the cluster, and a backing
 * file whose clusters are another size. So, for every cluster size, zlib and zstd, version 2 and
 * 3, extended L2 and backing chains, images made by `qemu-img convert -c` from a raw source:
 *  - the mounted raw file read whole (buffered) equals the source, byte for byte;
 *  - unaligned O_DIRECT reads (every request reaches the daemon) equal the source slices, and so
 *    do four such readers at once over the same clusters;
 *  - the daemon's own count (debug log at unmount) shows the clusters were decoded natively,
 *    by read-ahead too, except where the backing file's cluster size differs (the engine reads it);
 *  - in a read-write mount, writes into compressed clusters (copy-on-write) read back at once and
 *    the image equals a qemu-io reference that got the same writes; qemu-img check is clean.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import * as zlib from 'node:zlib';
import { peakRssBytes } from '../src/bench/host';
import { compressCluster } from '../src/qcow2/codec';
import { COMPRESSION_ZSTD } from '../src/qcow2/header';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, seededBytes, withMount } from './support/env';
import { daemonPids, directMapCounters } from './support/daemons';
import { expectCheckClean, expectSameContent, writeRoundAndCompare } from './support/oracle';

afterAll(removeScratch);

const KiB = 1024;
const MiB = 1024 * KiB;

interface Case {
  name: string;
  /** Options of `qemu-img convert -c -O qcow2 -o ...`. */
  opts: string;
  size: number;
  /** Convert into a backing file and put an overlay with these options over it. */
  overlay?: string;
  snapshot?: boolean;
  /** Whether the binding is expected to decode (not when the backing file's cluster size differs). */
  native: boolean;
}

const CASES: Case[] = [
  { name: 'zlib, 64K clusters', opts: 'compression_type=zlib,cluster_size=64k', size: 12 * MiB, native: true },
  { name: 'zstd, 64K clusters, internal snapshot', opts: 'compression_type=zstd,cluster_size=64k', size: 12 * MiB, snapshot: true, native: true },
  { name: 'zstd, 4K clusters', opts: 'compression_type=zstd,cluster_size=4k', size: 8 * MiB, native: true },
  { name: 'zlib, 512-byte clusters', opts: 'compression_type=zlib,cluster_size=512', size: 3 * MiB, native: true },
  { name: 'zstd, 2M clusters', opts: 'compression_type=zstd,cluster_size=2M', size: 24 * MiB, native: true },
  { name: 'zstd, extended L2', opts: 'compression_type=zstd,cluster_size=64k,extended_l2=on', size: 12 * MiB, native: true },
  { name: 'zlib, version 2, odd size', opts: 'compat=0.10,cluster_size=64k', size: 10 * MiB + 3584, native: true },
  { name: 'overlay over a zstd backing file', opts: 'compression_type=zstd,cluster_size=64k', size: 12 * MiB, overlay: 'cluster_size=64k', native: true },
  { name: 'overlay with 4K clusters over a 64K zlib backing file', opts: 'cluster_size=64k', size: 12 * MiB, overlay: 'cluster_size=4k', native: false },
];

/** Segments of 192 KiB: random, one byte repeated, text, zeros, half random. */
function source(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  const seg = 192 * KiB;
  const text = Buffer.from('the quick brown fox jumps over the lazy qcow2 cluster 0123456789\n');
  for (let off = 0, i = 0; off < size; off += seg, i++) {
    const len = Math.min(seg, size - off);
    switch (i % 5) {
      case 0:
        seededBytes(seed + i, len).copy(b, off);
        break;
      case 1:
        b.fill(1 + (i % 250), off, off + len);
        break;
      case 2:
        for (let p = off; p < off + len; p += text.length) text.copy(b, p, 0, Math.min(text.length, off + len - p));
        break;
      case 3:
        break;
      default:
        seededBytes(seed + i, len >> 1).copy(b, off);
    }
  }
  return b;
}

/** dd with O_DIRECT of [offset, +length) (512-byte aligned) of file; resolves with the bytes. */
function directRead(file: string, offset: number, length: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const p = spawn('dd', [`if=${file}`, 'iflag=direct,skip_bytes,count_bytes', `skip=${offset}`, `count=${length}`, 'bs=64k', 'status=none']);
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => (code === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`dd ${offset}+${length}: exit ${code}: ${err}`))));
  });
}

/** Random 512-aligned ranges: inside one cluster, across clusters, up to 1 MiB. */
function ranges(seed: number, size: number, count: number): Array<[number, number]> {
  const r = rng(seed);
  const out: Array<[number, number]> = [];
  const sectors = Math.floor(size / 512);
  for (let i = 0; i < count; i++) {
    const len = 512 * (1 + Math.floor(r() * (i % 3 === 0 ? 2048 : 40)));
    const first = Math.floor(r() * Math.max(1, sectors - len / 512));
    out.push([first * 512, Math.min(len, size - first * 512)]);
  }
  return out;
}

function makeImage(dir: string, c: Case, src: string): string {
  const compressed = path.join(dir, c.overlay ? 'base.qcow2' : 'disk.qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', c.opts, src, compressed);
  if (c.snapshot) qemuImg('snapshot', '-c', 'before', compressed);
  if (!c.overlay) return compressed;
  const top = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', c.overlay, '-b', 'base.qcow2', '-F', 'qcow2', top, String(c.size));
  return top;
}

describe('compressed clusters decoded by the binding', () => {
  it.each(CASES)('$name: reads equal the source', async (c) => {
    need('qemu-img', '/dev/fuse', 'dd', 'cmp');
    const dir = scratchDir('zdec');
    const src = path.join(dir, 'source.raw');
    const data = source(c.size, c.name.length * 131);
    fs.writeFileSync(src, data);
    const image = makeImage(dir, c, src);
    // The oracle first: QEMU reads the image as the source.
    const viaQemu = path.join(dir, 'qemu.raw');
    qemuImg('convert', '-O', 'raw', image, viaQemu);
    expect(run('cmp', ['-n', String(c.size), viaQemu, src]).code, 'qemu-img convert equals the source').toBe(0);

    const logFile = path.join(dir, 'daemon.log');
    await withMount(image, ['--read-only', '--log-level', 'debug', '--log-json', '--log-file', logFile], async (raw) => {
      expect(fs.statSync(raw).size).toBe(c.size);
      // Twice: the first pass publishes the mappings, the second is answered natively.
      for (let pass = 0; pass < 2; pass++) {
        const cmp = run('cmp', [raw, src]);
        expect(cmp.code, `buffered pass ${pass}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
        run('sh', ['-c', 'echo 1 > /proc/sys/vm/drop_caches']);
      }
      for (const [off, len] of ranges(c.size, c.size, 40)) {
        const got = await directRead(raw, off, len);
        expect(got.equals(data.subarray(off, off + len)), `O_DIRECT ${off}+${len}`).toBe(true);
      }
      // Four readers at once over the same region (the same clusters decoded, waited for, shared).
      const span = Math.min(c.size, 4 * MiB);
      const results = await Promise.all([0, 1, 2, 3].map((k) => directRead(raw, k * 512 * 7, span - k * 512 * 7)));
      results.forEach((got, k) => expect(got.equals(data.subarray(k * 512 * 7, span)), `concurrent reader ${k}`).toBe(true));
    });
    const s = directMapCounters(logFile);
    if (c.native) {
      expect(s.decoded, `clusters decoded natively (${JSON.stringify(s)})`).toBeGreaterThan(0);
      expect(s.decodedAhead, `clusters decoded by read-ahead (${JSON.stringify(s)})`).toBeGreaterThan(0);
      expect(s.hits, JSON.stringify(s)).toBeGreaterThan(s.misses);
    } else {
      expect(s.decoded, 'a backing file of another cluster size is read by the engine').toBe(0);
    }
  });

  it.each(CASES.filter((c) => c.name.startsWith('zstd, 64K') || c.name.startsWith('zstd, extended') || c.name.startsWith('overlay over')))(
    '$name: writes into compressed clusters read back at once, QEMU agrees',
    async (c) => {
      need('qemu-img', 'qemu-io', '/dev/fuse');
      const dir = scratchDir('zdecw');
      const src = path.join(dir, 'source.raw');
      fs.writeFileSync(src, source(c.size, 77));
      const image = makeImage(dir, c, src);
      const ref = path.join(dir, 'ref.qcow2');
      qemuImg('convert', '-O', 'qcow2', image, ref);
      const r = rng(4242 + c.size);
      const logFile = path.join(dir, 'daemon.log');
      await withMount(image, ['--log-level', 'debug', '--log-json', '--log-file', logFile], (raw) => {
        // Warm the map and the decoded cache: a full O_DIRECT pass.
        expect(run('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']).code).toBe(0);
        // Each round compares everything, the untouched compressed clusters around the writes too.
        for (let round = 0; round < 3; round++) writeRoundAndCompare(raw, ref, r, c.size, round, { writes: 40, bigEvery: 4, bigSectors: 300, smallSectors: 24 });
      });
      expectCheckClean(image);
      expectSameContent(image, 'qcow2', ref, 'qcow2');
      if (c.snapshot) {
        const snap = path.join(dir, 'snap.raw');
        qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=before', image, snap);
        expect(run('cmp', [snap, src]).code, 'the snapshot still reads as the source').toBe(0);
      }
      expect(directMapCounters(logFile).decoded).toBeGreaterThan(0);
    },
  );
});

/**
 * Streams QEMU never writes but reads (its decoders fill the cluster and stop): appended at the
 * end of the file, the first cluster's L2 entry pointed at them. Both the binding and the engine
 * must read what qemu-img convert reads.
 */
describe('odd compressed streams read as QEMU reads them', () => {
  const cs = 65536;
  const half = (seed: number): Buffer => Buffer.concat([seededBytes(seed, 8192), Buffer.alloc(cs / 2 - 8192, seed)]);
  const skippable = (payload: number): Buffer => {
    const b = Buffer.alloc(8 + payload, 0x5a);
    b.writeUInt32LE(0x184d2a53, 0);
    b.writeUInt32LE(payload, 4);
    return b;
  };
  const streams: Array<{ name: string; type: 'zlib' | 'zstd'; make: () => Promise<Buffer>; extraSectors?: number }> = [
    {
      name: 'descriptor whose sectors run past the end of the file',
      type: 'zstd',
      make: async () => compressCluster(COMPRESSION_ZSTD, Buffer.concat([half(6), half(7)])),
      extraSectors: 7,
    },
    { name: 'zlib stream decoding to more than a cluster', type: 'zlib', make: async () => zlib.deflateRawSync(Buffer.concat([half(1), half(2), half(3)]), { windowBits: 12 }) },
    {
      name: 'zstd frame, skippable frame, empty frame, frame',
      type: 'zstd',
      make: async () => Buffer.concat([await compressCluster(COMPRESSION_ZSTD, half(4)), skippable(100), await compressCluster(COMPRESSION_ZSTD, Buffer.alloc(0)), await compressCluster(COMPRESSION_ZSTD, half(5))]),
    },
  ];
  for (const env of [{}, { QCOW2FS_NO_NATIVE_DECODE: '1' }]) {
    it.each(streams)(`$name${Object.keys(env).length ? ' (engine)' : ' (binding)'}`, async (c) => {
      need('qemu-img', 'qemu-io', '/dev/fuse', 'cmp');
      const dir = scratchDir('zodd');
      const img = path.join(dir, 'odd.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=64k,compression_type=${c.type}`, img, String(4 * MiB));
      qemuIo(img, ['write -c -P 0x11 0 64k', 'write -P 0x22 64k 1M']);
      const stream = await c.make();
      const file = fs.readFileSync(img);
      const l2 = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(40))) & 0x00ffffff_fffffe00n);
      const host = Math.ceil(file.length / 512) * 512 + 100;
      const sectors = Math.floor((host + stream.length - 1) / 512) - Math.floor(host / 512) + 1 + (c.extraSectors ?? 0);
      const patched = Buffer.concat([file, Buffer.alloc(host - file.length), stream]);
      patched.writeBigUInt64BE((1n << 62n) | (BigInt(sectors - 1) << 54n) | BigInt(host), l2);
      fs.writeFileSync(img, patched);
      const viaQemu = path.join(dir, 'qemu.raw');
      qemuImg('convert', '-O', 'raw', img, viaQemu);
      const first = fs.readFileSync(viaQemu).subarray(0, cs);
      expect(first.equals(Buffer.alloc(cs, 0x11)), 'QEMU reads the new stream, not the old cluster').toBe(false);
      const saved = { ...process.env };
      Object.assign(process.env, env);
      try {
        await withMount(img, ['--read-only'], async (raw) => {
          // Twice: through the engine first, then (mappings published) through the binding.
          for (let pass = 0; pass < 2; pass++) expect(run('cmp', [raw, viaQemu]).code, `pass ${pass}`).toBe(0);
          expect((await directRead(raw, 0, cs)).equals(first)).toBe(true);
        });
      } finally {
        process.env = saved;
      }
    });
  }
});

describe('a whole-cluster write over a compressed cluster that no longer decodes', () => {
  it('replaces it without reading it, as QEMU does (a partial write still reports EIO)', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('zcorrupt');
    const img = path.join(dir, 'c.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,compression_type=zstd', img, String(4 * MiB));
    qemuIo(img, ['write -c -P 0x11 0 64k', 'write -c -P 0x12 64k 64k']);
    const file = fs.readFileSync(img);
    const l2 = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(40))) & 0x00ffffff_fffffe00n);
    for (const k of [0, 1]) {
      const host = Number(file.readBigUInt64BE(l2 + 8 * k) & ((1n << 54n) - 1n));
      file.fill(0xde, host, host + 16); // no zstd frame there any more
    }
    fs.writeFileSync(img, file);
    // The oracle: QEMU writes the whole cluster without reading it.
    const ref = path.join(dir, 'ref.qcow2');
    fs.copyFileSync(img, ref);
    qemuIo(ref, ['write -P 0x43 0 64k']);
    await withMount(img, [], (raw) => {
      const whole = run('qemu-io', ['-f', 'raw', '-n', '-c', 'write -P 0x43 0 64k', '-c', 'read -P 0x43 0 64k', raw]);
      expect(whole.code, whole.stderr).toBe(0);
      expect(whole.stdout + whole.stderr).not.toMatch(/error|failed/i);
      // A partial write needs the old bytes around it: EIO, as in QEMU.
      const part = run('qemu-io', ['-f', 'raw', '-n', '-c', 'write -P 0x44 65536 4096', raw]);
      expect(part.stdout + part.stderr).toMatch(/Input\/output error/);
    });
    expectCheckClean(img);
    for (const image of [img, ref]) {
      const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x43 0 64k', image]);
      expect(r.stdout + r.stderr, `the replaced cluster of ${path.basename(image)}`).toMatch(/read 65536\/65536 bytes/);
      expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed/);
    }
  });
});

describe('a deep queue of reads of 2 MiB compressed clusters', () => {
  // libfuse starts a worker thread whenever none is idle, so 64 reads in flight are dozens of
  // threads. Each used to decode its cluster into memory of its own when its cache set was full;
  // the engine held a decoded cluster per request (280 MiB of peak memory here). Both now wait
  // for room in their bounded caches (the binding counts its waits), and every read must still
  // get its own cluster's bytes. The peak memory bound leaves room for the machine's noise (the
  // bench holds the 150 MiB target; this ran at 110-140 MiB).
  it.each([
    ['the binding', {} as Record<string, string>],
    ['the engine', { QCOW2FS_NO_NATIVE_DECODE: '1' } as Record<string, string>],
  ] as const)('decoded by %s: right bytes, bounded memory', async (_who, env) => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('zdeep');
    const clusters = 64;
    const pattern = (k: number): number => 1 + ((k * 37) % 250);
    const src = path.join(dir, 'source.raw');
    const fd = fs.openSync(src, 'w');
    // Each cluster: 16-letter noise (slow enough to decode that reads pile up), with one 64 KiB
    // stretch of the cluster's own pattern where it is read.
    const at = (k: number): number => (k % 32) * 64 * KiB;
    for (let k = 0; k < clusters; k++) {
      const c = seededBytes(k + 1, 2 * MiB);
      for (let i = 0; i < c.length; i++) c[i] = 0x41 + (c[i]! & 15);
      c.fill(pattern(k), at(k), at(k) + 64 * KiB);
      fs.writeSync(fd, c, 0, c.length, k * 2 * MiB);
    }
    fs.closeSync(fd);
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=2M', src, image);
    const saved = { ...process.env };
    Object.assign(process.env, env);
    try {
      const logFile = path.join(dir, 'daemon.log');
      await withMount(image, ['--read-only', '--log-level', 'debug', '--log-json', '--log-file', logFile], (raw, mp) => {
        // A first pass publishes the clusters to the binding (a miss goes to the engine).
        expect(run('cmp', [raw, src]).code).toBe(0);
        const r = rng(17);
        const cmds: string[] = [];
        for (let round = 0; round < 4; round++) {
          const order = Array.from({ length: clusters }, (_, k) => k).sort(() => r() - 0.5);
          for (const k of order) cmds.push(`aio_read -P ${pattern(k)} ${k * 2 * MiB + at(k)} 64k`);
          cmds.push('aio_flush');
        }
        const out = run('qemu-io', ['-r', '-f', 'raw', '-n', '-i', 'threads', ...cmds.flatMap((c) => ['-c', c]), raw]);
        expect(out.code, out.stderr).toBe(0);
        expect(out.stdout + out.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
        expect((out.stdout.match(/read 65536\/65536 bytes/g) ?? []).length).toBe(4 * clusters);
        const [pid] = daemonPids(mp);
        expect(peakRssBytes(pid!), 'the daemon\'s peak memory').toBeLessThan(200 * MiB);
      });
      const s = directMapCounters(logFile);
      if (env.QCOW2FS_NO_NATIVE_DECODE) expect(s.decoded).toBe(0);
      else expect(s.decodeWaits, `reads waited for room in the binding's cache (${JSON.stringify(s)})`).toBeGreaterThan(0);
    } finally {
      process.env = saved;
    }
  });
});
