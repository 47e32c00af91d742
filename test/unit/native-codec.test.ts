/**
 * The native codec addon (native/codec/codec.c: libdeflate, libzstd on the thread pool) against
 * the fallback decoders (Node's zlib, WebAssembly zstd), on clusters compressed by qemu-img:
 * both must decode every cluster to the source bytes, and agree on damaged ones (both reject,
 * or both produce the same cluster). Nothing a damaged stream holds may write past the cluster.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { codecAddon, compressCluster, DecompressError, decompressCluster, decompressClusterFromFile, useNativeCodec } from '../../src/qcow2/codec';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from '../../src/qcow2/header';
import { compressedDescriptor } from '../../src/qcow2/l2';
import { need, qemuImg, removeScratch, rng, scratchDir, seededBytes } from '../support/env';

beforeAll(() => {
  need('qemu-img');
  // The addon is optional at run time (reads fall back), but this test is about it: like a
  // missing tool, a missing addon fails here, it never skips.
  if (codecAddon() === null) {
    throw new Error('missing for this test: native/codec/build/Release/qcow2fs_codec.node (apt-get install libzstd-dev libdeflate-dev, or run scripts/setup-system.sh as root; then npm run build)');
  }
});
afterEach(() => useNativeCodec(true));
afterAll(() => removeScratch());

/** Source data: text-like runs with random stretches (compressible, not trivially). */
function source(size: number, seed: number): Buffer {
  const buf = Buffer.alloc(size);
  const pick = rng(seed);
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, 100 + Math.floor(pick() * 3000));
    if (pick() < 0.3) seededBytes(seed + off, len).copy(buf, off);
    else buf.write(`row ${off} = ${Math.floor(pick() * 1e6)}; `.repeat(Math.ceil(len / 16)).slice(0, len), off, 'latin1');
    off += len;
  }
  return buf;
}

/** Compressed clusters of a qemu-made image: [guest offset, the descriptor's bytes, host offset]. */
function qemuClusters(codec: string, clusterSize: number, src: Buffer, keep?: { image?: string }): Array<[number, Buffer, number]> {
  const dir = scratchDir('ncodec');
  fs.writeFileSync(path.join(dir, 'src.raw'), src);
  const img = path.join(dir, 'c.qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},compression_type=${codec}`, path.join(dir, 'src.raw'), img);
  if (keep) keep.image = img;
  const file = fs.readFileSync(img);
  const clusterBits = file.readUInt32BE(20);
  const l1Size = file.readUInt32BE(36);
  const l1Offset = Number(file.readBigUInt64BE(40));
  const out: Array<[number, Buffer, number]> = [];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(file.readBigUInt64BE(l1Offset + 8 * i) & 0x00ffffff_fffffe00n);
    if (l2 === 0) continue;
    for (let j = 0; j < clusterSize / 8; j++) {
      const hi = file.readUInt32BE(l2 + 8 * j);
      const lo = file.readUInt32BE(l2 + 8 * j + 4);
      if (!(hi & 0x40000000)) continue;
      const d = compressedDescriptor(hi, lo, clusterBits);
      out.push([(i * (clusterSize / 8) + j) * clusterSize, Buffer.from(file.subarray(d.hostOffset, d.hostOffset + d.compressedBytes)), d.hostOffset]);
    }
  }
  return out;
}

/** Decodes with the addon or the fallback: the cluster, or 'error' for a DecompressError. */
async function decode(native: boolean, type: number, src: Buffer, clusterSize: number, into?: Buffer): Promise<Buffer | 'error'> {
  useNativeCodec(native);
  try {
    return Buffer.from(await decompressCluster(type, src, clusterSize, into));
  } catch (err) {
    if (err instanceof DecompressError) return 'error';
    throw err;
  }
}

const codecs = [
  ['zlib', COMPRESSION_ZLIB],
  ['zstd', COMPRESSION_ZSTD],
] as const;

describe('native codec addon', () => {
  for (const [codec, type] of codecs) {
    for (const clusterSize of [512, 4096, 65536, 2 * 1024 * 1024]) {
      it(`${codec}, ${clusterSize}-byte clusters from qemu-img: addon and fallback both give the source`, async () => {
        const size = clusterSize === 2 * 1024 * 1024 ? 6 * 1024 * 1024 : 512 * 1024;
        const src = source(size, clusterSize ^ type);
        const clusters = qemuClusters(codec, clusterSize, src);
        expect(clusters.length).toBeGreaterThan(size / clusterSize / 2);
        const into = Buffer.alloc(clusterSize + 100, 0xee); // bigger than a cluster: only the cluster is written
        for (const [guest, bytes] of clusters) {
          const want = src.subarray(guest, guest + clusterSize);
          const n = await decode(true, type, bytes, clusterSize, into);
          expect(n !== 'error' && n.equals(want), `addon, cluster at ${guest}`).toBe(true);
          expect(into.subarray(clusterSize).every((b) => b === 0xee)).toBe(true);
          const f = await decode(false, type, bytes, clusterSize);
          expect(f !== 'error' && f.equals(want), `fallback, cluster at ${guest}`).toBe(true);
        }
      });
    }

    it(`${codec}: truncated and damaged clusters get the same verdict from both decoders`, async () => {
      const clusterSize = 65536;
      const src = source(8 * clusterSize, 77 + type);
      const clusters = qemuClusters(codec, clusterSize, src).slice(0, 4);
      const pick = rng(1234 + type);
      let rejected = 0;
      for (const [guest, bytes] of clusters) {
        const cases: Buffer[] = [];
        for (let len = 0; len < bytes.length; len += Math.max(1, Math.floor(bytes.length / 40))) cases.push(bytes.subarray(0, len));
        for (let k = 0; k < 60; k++) {
          const bad = Buffer.from(bytes);
          const at = Math.floor(pick() * Math.min(bad.length, 2048)); // the headers and first blocks
          bad[at] ^= 1 << Math.floor(pick() * 8);
          cases.push(bad);
        }
        for (const c of cases) {
          const a = await decode(true, type, c, clusterSize);
          const f = await decode(false, type, c, clusterSize);
          if (a === 'error' || f === 'error') {
            expect([a === 'error', f === 'error'], `cluster at ${guest}, ${c.length} bytes`).toEqual([true, true]);
            rejected++;
          } else {
            expect(a.equals(f)).toBe(true);
          }
        }
      }
      expect(rejected).toBeGreaterThan(40);
    });
  }

  it('zstd: a cluster in several frames decodes; a frame larger than the cluster is refused', async () => {
    const cs = 65536;
    const cluster = source(cs, 9);
    const a = await compressCluster(COMPRESSION_ZSTD, cluster.subarray(0, 20000));
    const b = await compressCluster(COMPRESSION_ZSTD, cluster.subarray(20000));
    const two = Buffer.concat([a, b, Buffer.alloc(700, 0x5a)]); // sector padding after the last frame
    for (const native of [true, false]) {
      const out = await decode(native, COMPRESSION_ZSTD, two, cs);
      expect(out !== 'error' && out.equals(cluster), `native=${native}`).toBe(true);
      const big = await compressCluster(COMPRESSION_ZSTD, Buffer.concat([cluster, cluster]));
      expect(await decode(native, COMPRESSION_ZSTD, big, cs)).toBe('error');
      expect(await decode(native, COMPRESSION_ZSTD, Buffer.concat([a, a, a, a]), cs)).toBe('error'); // 80000 bytes
    }
  });

  it('zlib: a stream longer than the cluster gives its first cluster (as QEMU); bytes after the stream are ignored', async () => {
    const cs = 65536;
    const cluster = source(cs, 10);
    const packed = await compressCluster(COMPRESSION_ZLIB, cluster);
    const big = await compressCluster(COMPRESSION_ZLIB, Buffer.concat([cluster, cluster]));
    for (const native of [true, false]) {
      const out = await decode(native, COMPRESSION_ZLIB, Buffer.concat([packed, Buffer.alloc(600, 0xa5)]), cs);
      expect(out !== 'error' && out.equals(cluster), `native=${native}`).toBe(true);
      const first = await decode(native, COMPRESSION_ZLIB, big, cs);
      expect(first !== 'error' && first.equals(cluster), `native=${native}: the longer stream`).toBe(true);
    }
  });

  for (const [codec, type] of codecs) {
    it(`${codec}: decompressFile reads the cluster's bytes itself (zeros past the end of the file)`, async () => {
      const clusterSize = 65536;
      const src = source(16 * clusterSize, 31 + type);
      const keep: { image?: string } = {};
      const clusters = qemuClusters(codec, clusterSize, src, keep);
      const fd = fs.openSync(keep.image!, 'r');
      try {
        const into = Buffer.alloc(clusterSize);
        for (const [guest, bytes, host] of clusters) {
          expect(await decompressClusterFromFile(type, fd, host, bytes.length, clusterSize, into)).toBe(true);
          expect(into.equals(src.subarray(guest, guest + clusterSize)), `cluster at ${guest}`).toBe(true);
        }
        const end = fs.fstatSync(fd).size;
        await expect(decompressClusterFromFile(type, fd, end - 100, 4096, clusterSize, into)).rejects.toThrow(DecompressError);
        await expect(decompressClusterFromFile(type, fd, end + 65536, 4096, clusterSize, into)).rejects.toThrow(DecompressError);
      } finally {
        fs.closeSync(fd);
      }
    });
  }

  it('refuses bad arguments with a TypeError, not a crash', () => {
    const addon = codecAddon()!;
    expect(() => addon.decompress(5, Buffer.alloc(1), Buffer.alloc(1))).toThrow(TypeError);
    expect(() => addon.decompress(0, 'x' as unknown as Uint8Array, Buffer.alloc(1))).toThrow(TypeError);
    expect(() => (addon.decompress as unknown as (a: number) => unknown)(0)).toThrow(TypeError);
    expect(() => addon.decompressFile(0, -1, 0, 10, Buffer.alloc(1))).toThrow(TypeError);
    expect(() => addon.decompressFile(1, 0, 0, 64 * 1024 * 1024, Buffer.alloc(1))).toThrow(TypeError);
  });

  it('a read error (a descriptor that is not open) is a DecompressError', async () => {
    await expect(decompressClusterFromFile(COMPRESSION_ZSTD, 987654, 0, 100, 512, Buffer.alloc(512))).rejects.toThrow(DecompressError);
  });
});
