/**
 * Acceptance matrix of issue 2: for each kind of image QEMU can make, the SHA-256 of the mounted
 * .raw equals the SHA-256 of `qemu-img convert -O raw` of the same image. Images are built at test
 * time with qemu-img/qemu-io; data comes from seeded source files (qemu-io write -s), so an
 * offset bug inside a write shows up (a constant pattern would hide it).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  isMounted, need, qcow2fs, qemuImg, qemuIo, qemuRawSha, removeScratch, rng, scratchDir, seededBytes, sha256File, sh, withMount,
} from './support/env';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

beforeAll(() => need('qemu-img', 'qemu-io', '/dev/fuse', 'fusermount'));
afterAll(() => removeScratch());

/** One write of seeded bytes at an offset: qemu-io repeats the source file to fill `len`. */
interface SeededWrite {
  offset: number;
  length: number;
  seed: number;
}

/** Writes seeded data with qemu-io (one invocation for all writes). */
function qemuWrites(image: string, writes: SeededWrite[], extraCmds: string[] = [], format = 'qcow2'): void {
  const dir = scratchDir('src');
  const cmds = writes.map((w) => {
    const src = path.join(dir, `s${w.seed}.bin`);
    if (!fs.existsSync(src)) fs.writeFileSync(src, seededBytes(w.seed, Math.min(w.length, 256 * KiB)));
    return `write -q -s ${src} ${w.offset} ${w.length}`;
  });
  qemuIo(image, [...cmds, ...extraCmds], format);
}

function statSize(file: string): number {
  return fs.statSync(file).size;
}

/** Mounts read-only and asserts size and SHA-256 equal QEMU's raw conversion. */
async function expectSameAsQemu(image: string, args: string[] = ['--read-only']): Promise<void> {
  const want = qemuRawSha(image);
  const virtualSize = (JSON.parse(qemuImg('info', '--output', 'json', image)) as { 'virtual-size': number })['virtual-size'];
  await withMount(image, args, (raw) => {
    expect(statSize(raw)).toBe(virtualSize);
    expect(sha256File(raw)).toBe(want);
  });
}

/** Writes at unaligned offsets, some crossing cluster and L2-table boundaries, in scrambled order. */
function unalignedWrites(clusterSize: number, sizeBytes: number, seed: number): SeededWrite[] {
  const l2Span = (clusterSize / 8) * clusterSize; // guest bytes one L2 table covers
  const out: SeededWrite[] = [];
  const pick = rng(seed);
  // Straddle the first L2 boundaries (when they lie inside the disk).
  for (let k = 1; k <= 3; k++) {
    const b = k * l2Span;
    if (b + clusterSize < sizeBytes) out.push({ offset: b - 333, length: 777 + clusterSize, seed: seed + k });
  }
  // Cross cluster boundaries at odd offsets.
  for (let i = 0; i < 24; i++) {
    const len = 1 + Math.floor(pick() * Math.min(3 * clusterSize, 200 * KiB));
    const off = Math.floor(pick() * (sizeBytes - len));
    out.push({ offset: off, length: len, seed: seed + 100 + i });
  }
  out.push({ offset: 0, length: 1, seed: seed + 7 });
  out.push({ offset: sizeBytes - 3, length: 3, seed: seed + 8 });
  return out;
}

describe('compat 0.10 (version 2 header)', () => {
  it('reads what QEMU reads', async () => {
    const dir = scratchDir('v2');
    const img = path.join(dir, 'v2.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', img, String(6 * MiB));
    qemuWrites(img, unalignedWrites(64 * KiB, 6 * MiB, 10), ['write -z 131072 65536', 'discard 262144 131072']);
    const info = JSON.parse(qemuImg('info', '--output', 'json', img)) as { 'format-specific': { data: { compat: string } } };
    expect(info['format-specific'].data.compat).toBe('0.10');
    await expectSameAsQemu(img);
  });
});

describe('compat 1.1 (version 3 header)', () => {
  it('reads what QEMU reads, read-write mount too', async () => {
    const dir = scratchDir('v3');
    const img = path.join(dir, 'v3.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'compat=1.1', img, String(6 * MiB));
    qemuWrites(img, unalignedWrites(64 * KiB, 6 * MiB, 20));
    await expectSameAsQemu(img);
    await expectSameAsQemu(img, []);
  });
});

for (const clusterSize of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
  describe(`cluster size ${clusterSize}`, () => {
    it('reads unaligned writes, also across L2-table boundaries', async () => {
      const dir = scratchDir(`cs${clusterSize}`);
      const img = path.join(dir, `cs${clusterSize}.qcow2`);
      // 512-byte clusters: one L2 table covers 32 KiB, so a few MiB span many tables.
      const size = clusterSize === 2 * MiB ? 9 * MiB : 4 * MiB;
      qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, img, String(size));
      qemuWrites(img, unalignedWrites(clusterSize, size, clusterSize));
      const l2Span = (clusterSize / 8) * clusterSize;
      if (l2Span < size) {
        // QEMU's map must show data on both sides of an L2 boundary (so the case really crosses one).
        const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as Array<{ start: number; length: number; data: boolean }>;
        const isData = (off: number): boolean => map.some((e) => e.data && e.start <= off && off < e.start + e.length);
        expect(isData(l2Span - 1) && isData(l2Span)).toBe(true);
      }
      await expectSameAsQemu(img);
    });
  });
}

/** A raw disk of seeded data with zero runs and repetitive (compressible) runs. */
function mixedRaw(file: string, sizeBytes: number, seed: number): void {
  const buf = Buffer.alloc(sizeBytes);
  const pick = rng(seed);
  for (let off = 0; off < sizeBytes; ) {
    const len = Math.min(sizeBytes - off, 1 + Math.floor(pick() * 150 * KiB));
    const kind = Math.floor(pick() * 3);
    if (kind === 0) seededBytes(seed + off, len).copy(buf, off); // incompressible
    else if (kind === 1) buf.fill(`text ${off} compresses well; `, off, off + len); // compressible
    off += len; // kind 2: zeros
  }
  fs.writeFileSync(file, buf);
}

for (const [codec, opts] of [
  ['zlib', 'compression_type=zlib'],
  ['zstd', 'compression_type=zstd'],
] as const) {
  for (const clusterSize of [512, 64 * KiB, 2 * MiB]) {
    describe(`${codec}-compressed, cluster size ${clusterSize}`, () => {
      it('reads compressed clusters (qemu-img convert -c) and compressed writes', async () => {
        const dir = scratchDir(codec);
        const src = path.join(dir, 'src.raw');
        const img = path.join(dir, `${codec}.qcow2`);
        const rawSize = 5 * MiB + 512 * 3;
        mixedRaw(src, rawSize, clusterSize + 1);
        qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `${opts},cluster_size=${clusterSize}`, src, img);
        // Plain writes over some compressed clusters (partial: QEMU decompresses and rewrites).
        qemuWrites(img, [
          { offset: Math.min(3 * clusterSize, 2 * MiB) + 17, length: 100, seed: 1 },
          { offset: MiB + 5, length: 70 * KiB, seed: 2 },
        ]);
        // Compressed writes by qemu-io (whole, unallocated clusters only) into room added at the end.
        const firstNew = Math.ceil(rawSize / clusterSize) * clusterSize;
        qemuImg('resize', '-f', 'qcow2', img, String(rawSize + 3 * clusterSize));
        const seedFile = path.join(dir, 'c.bin');
        fs.writeFileSync(seedFile, Buffer.from('compress me please, '.repeat(64)));
        qemuIo(img, [`write -q -c -s ${seedFile} ${firstNew} ${clusterSize}`, `write -q -c -s ${seedFile} ${firstNew + clusterSize} ${clusterSize}`]);
        const info = JSON.parse(qemuImg('info', '--output', 'json', img)) as { 'format-specific': { data: { 'compression-type': string } } };
        expect(info['format-specific'].data['compression-type']).toBe(codec);
        const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as Array<{ data: boolean; offset?: number }>;
        // Compressed clusters show as data without a host offset.
        expect(map.some((e) => e.data && e.offset === undefined)).toBe(true);
        await expectSameAsQemu(img);
      });
    });
  }
}

describe('extended L2 entries (subclusters)', () => {
  it('reads 4 KiB writes into 64 KiB clusters, zeroed and discarded subclusters', async () => {
    const dir = scratchDir('extl2');
    const img = path.join(dir, 'ext.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64K', img, String(4 * MiB));
    const writes: SeededWrite[] = [];
    for (let i = 0; i < 40; i++) writes.push({ offset: (i * 13 % 64) * 4 * KiB * 3 + 2 * KiB * (i % 2), length: 4 * KiB + (i % 3) * 2048, seed: 300 + i });
    qemuWrites(img, writes, [
      'write -q -z 8192 4096', // zero one subcluster of an allocated cluster
      'write -q -z 1048576 2048', // unaligned: partial subcluster
      'write -q -z -u 2097152 8192',
      'discard -q 12288 4096',
      'discard -q 3145728 65536',
    ]);
    await expectSameAsQemu(img);
  });

  it('reads unallocated subclusters from the backing file', async () => {
    const dir = scratchDir('extl2b');
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', base, String(2 * MiB));
    qemuWrites(base, [{ offset: 0, length: 2 * MiB, seed: 41 }]);
    qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32K', '-b', 'base.qcow2', '-F', 'qcow2', top);
    qemuWrites(top, [
      { offset: 1024, length: 1024, seed: 42 }, // one subcluster of cluster 0 (copy-on-write of 1 KiB only)
      { offset: 40 * KiB, length: 5 * KiB, seed: 43 },
      { offset: 200 * KiB + 100, length: 300, seed: 44 },
    ], ['write -q -z 65536 2048', 'write -q -z 100352 1024', 'discard -q 40960 1024']);
    await expectSameAsQemu(top);
  });

  it('reads compressed clusters in an extended-L2 image', async () => {
    const dir = scratchDir('extl2c');
    const src = path.join(dir, 'src.raw');
    const img = path.join(dir, 'extc.qcow2');
    mixedRaw(src, 3 * MiB, 99);
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=64K', src, img);
    qemuWrites(img, [{ offset: 70 * KiB, length: 3 * KiB, seed: 45 }]);
    await expectSameAsQemu(img);
  });
});

describe('zero clusters and discarded ranges', () => {
  it('reads zeros where QEMU wrote zeroes or discarded, also over a backing file', async () => {
    const dir = scratchDir('zero');
    const base = path.join(dir, 'base.qcow2');
    const img = path.join(dir, 'zero.qcow2');
    qemuImg('create', '-f', 'qcow2', base, String(4 * MiB));
    qemuWrites(base, [{ offset: 0, length: 4 * MiB, seed: 51 }]);
    qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', img);
    qemuWrites(img, [{ offset: 0, length: 2 * MiB, seed: 52 }], [
      'write -q -z 65536 131072', // zero flag on allocated clusters
      'write -q -z -u 524288 196608', // unmapped zero clusters
      'write -q -z 2162688 65536', // zero over backing-only clusters
      'write -q -z 3000000 1000', // partial cluster: QEMU writes real zeros
      'discard -q 1048576 262144', // discard in an overlay leaves zero clusters (backing must not show)
    ]);
    const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as Array<{ zero: boolean; data: boolean; depth: number }>;
    expect(map.some((e) => e.zero && !e.data && e.depth === 0)).toBe(true);
    await expectSameAsQemu(img);
    // And without a backing file: discard makes clusters unallocated, reading zeros.
    const solo = path.join(dir, 'solo.qcow2');
    qemuImg('create', '-f', 'qcow2', solo, String(3 * MiB));
    qemuWrites(solo, [{ offset: 0, length: 3 * MiB, seed: 53 }], ['discard -q 65536 1048576', 'write -q -z -u 2097152 65536', 'write -q -z 2228224 4096']);
    await expectSameAsQemu(solo);
  });
});

describe('backing chain qcow2 -> qcow2 -> raw with relative names', () => {
  it('reads the chain, mounted from another working directory too', async () => {
    const dir = scratchDir('chain');
    fs.mkdirSync(path.join(dir, 'images', 'base'), { recursive: true });
    const rawBase = path.join(dir, 'images', 'base', 'base.raw');
    fs.writeFileSync(rawBase, seededBytes(61, 3 * MiB));
    const mid = path.join(dir, 'images', 'mid.qcow2');
    const top = path.join(dir, 'images', 'top.qcow2');
    // Names relative to each overlay's own directory.
    qemuImg('create', '-f', 'qcow2', '-b', 'base/base.raw', '-F', 'raw', mid);
    qemuWrites(mid, [{ offset: 100 * KiB + 1, length: 200 * KiB, seed: 62 }]);
    qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
    qemuWrites(top, [{ offset: 250 * KiB, length: 100 * KiB + 5, seed: 63 }, { offset: 2 * MiB - 1, length: 2, seed: 64 }], ['write -q -z 1048576 65536']);
    // The chain QEMU sees uses relative names.
    const chain = JSON.parse(qemuImg('info', '--output', 'json', '--backing-chain', top)) as Array<{ 'backing-filename'?: string }>;
    expect(chain.map((c) => c['backing-filename'])).toEqual(['mid.qcow2', 'base/base.raw', undefined]);
    const want = qemuRawSha(top);
    await withMount(top, ['--read-only'], (raw) => {
      expect(sha256File(raw)).toBe(want);
    });
    // From an unrelated working directory, with relative image and mountpoint paths.
    const elsewhere = scratchDir('cwd');
    fs.mkdirSync(path.join(elsewhere, 'mnt'));
    const relImage = path.relative(elsewhere, top);
    expect(relImage.startsWith('..')).toBe(true);
    const r = qcow2fs(['mount', '--read-only', relImage, 'mnt'], { cwd: elsewhere });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const mp = path.join(elsewhere, 'mnt');
    try {
      expect(sha256File(path.join(mp, 'top.raw'))).toBe(want);
    } finally {
      const u = qcow2fs(['umount', 'mnt'], { cwd: elsewhere });
      if (u.code !== 0) sh('fusermount', ['-u', '-z', mp]);
      expect(u.code).toBe(0);
    }
    expect(isMounted(mp)).toBe(false);
  });
});

describe('backing file shorter than its overlay', () => {
  it('reads zeros past the end of the backing file', async () => {
    const dir = scratchDir('short');
    const base = path.join(dir, 'base.qcow2');
    const rawBase = path.join(dir, 'rbase.img');
    const top = path.join(dir, 'top.qcow2');
    const top2 = path.join(dir, 'top2.qcow2');
    qemuImg('create', '-f', 'qcow2', base, String(MiB + 512));
    qemuWrites(base, [{ offset: 0, length: MiB + 512, seed: 71 }]);
    qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, String(4 * MiB));
    qemuWrites(top, [{ offset: MiB - 100, length: 1000, seed: 72 }, { offset: 3 * MiB, length: 5000, seed: 73 }]);
    await expectSameAsQemu(top);
    // A raw backing file whose length is not even a multiple of 512.
    fs.writeFileSync(rawBase, seededBytes(74, 700 * KiB + 123));
    qemuImg('create', '-f', 'qcow2', '-b', 'rbase.img', '-F', 'raw', top2, String(2 * MiB));
    qemuWrites(top2, [{ offset: 690 * KiB, length: 64, seed: 75 }]);
    await expectSameAsQemu(top2);
  });
});

describe('virtual size not a multiple of the cluster size', () => {
  it('reads an image of 10 MiB + 512 bytes to its last byte', async () => {
    const dir = scratchDir('odd');
    const img = path.join(dir, 'odd.qcow2');
    const size = 10 * MiB + 512;
    qemuImg('create', '-f', 'qcow2', img, String(size));
    qemuWrites(img, [{ offset: 10 * MiB - 300, length: 812, seed: 81 }, { offset: 5 * MiB + 3, length: 10, seed: 82 }]);
    await expectSameAsQemu(img);
    // And with 2 MiB clusters: the last cluster is mostly outside the disk.
    const img2 = path.join(dir, 'odd2m.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=2M', img2, String(5 * MiB + 1536));
    qemuWrites(img2, [{ offset: 5 * MiB, length: 1536, seed: 83 }]);
    await expectSameAsQemu(img2);
  });
});

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** QEMU's bytes of [offset, +length) of a qcow2 image, through the raw driver's offset/size window. */
function qemuSlice(image: string, offset: number, length: number, out: string): Buffer {
  qemuImg('convert', '-O', 'raw', '--image-opts',
    `driver=raw,offset=${offset},size=${length},file.driver=qcow2,file.file.driver=file,file.file.filename=${image}`, out);
  return fs.readFileSync(out);
}

function readRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    expect(done).toBe(length);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

describe('1 TiB sparse image', () => {
  it('has the right size, and every data region plus random holes equals QEMU', async () => {
    const dir = scratchDir('tib');
    const img = path.join(dir, 'huge.qcow2');
    qemuImg('create', '-f', 'qcow2', img, String(TiB));
    const writes: SeededWrite[] = [
      { offset: 0, length: 4 * KiB, seed: 91 },
      { offset: 512 * MiB - 1000, length: 3000, seed: 92 }, // crosses the first L2 table's end
      { offset: 300 * GiB + 12345, length: 200 * KiB, seed: 93 },
      { offset: 777 * GiB, length: 64 * KiB, seed: 94 },
      { offset: TiB - 5000, length: 5000, seed: 95 },
    ];
    qemuWrites(img, writes, ['write -q -z 600000000000 131072']);
    // Hashing 1 TiB through FUSE would take far too long: compare every region QEMU reports as
    // data (padded to 64 KiB on each side) and 16 random holes, each against QEMU's own bytes.
    const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as MapEntry[];
    const ranges: Array<[number, number]> = [];
    for (const e of map.filter((m) => m.data)) {
      const start = Math.max(0, e.start - 64 * KiB);
      ranges.push([start, Math.min(TiB, e.start + e.length + 64 * KiB) - start]);
    }
    expect(ranges.length).toBeGreaterThanOrEqual(writes.length);
    const pick = rng(4242);
    for (let i = 0; i < 16; i++) ranges.push([Math.floor(pick() * (TiB / 4096 - 16)) * 4096, 64 * KiB]);
    ranges.push([TiB - 64 * KiB, 64 * KiB]);
    const imgBlocks = fs.statSync(img).blocks;
    await withMount(img, ['--read-only'], (raw) => {
      const st = fs.statSync(raw);
      expect(st.size).toBe(TiB);
      expect(st.blocks).toBe(imgBlocks);
      ranges.forEach(([off, len], i) => {
        const want = qemuSlice(img, off, len, path.join(dir, `slice${i}.raw`));
        expect(want.length).toBe(len);
        const got = readRange(raw, off, len);
        expect(got.equals(want), `range ${off}+${len}`).toBe(true);
      });
    });
  });
});

describe('st_blocks and mode', () => {
  it('reports the image allocation as st_blocks (du) and mode 0444 read-only / 0644 read-write', async () => {
    const dir = scratchDir('du');
    const img = path.join(dir, 'du.qcow2');
    qemuImg('create', '-f', 'qcow2', img, String(64 * MiB));
    qemuWrites(img, [{ offset: 0, length: 3 * MiB, seed: 101 }, { offset: 40 * MiB, length: 2 * MiB, seed: 102 }]);
    const imgStat = fs.statSync(img);
    expect(imgStat.blocks * 512).toBeGreaterThan(5 * MiB);
    await withMount(img, ['--read-only'], (raw) => {
      const st = fs.statSync(raw);
      expect(st.mode & 0o777).toBe(0o444);
      expect(st.size).toBe(64 * MiB);
      // du of the raw file tells the image's real allocation, not 64 MiB.
      expect(st.blocks).toBe(imgStat.blocks);
      const du = Number(sh('du', ['-k', raw]).split(/\s/)[0]);
      expect(Math.abs(du * 1024 - imgStat.blocks * 512)).toBeLessThan(64 * KiB);
      expect(() => fs.openSync(raw, 'r+')).toThrow(/EROFS|EACCES/);
    });
    await withMount(img, [], (raw) => {
      expect(fs.statSync(raw).mode & 0o777).toBe(0o644);
    });
    expect(fs.statSync(img).mtimeMs).toBe(imgStat.mtimeMs);
  });
});
