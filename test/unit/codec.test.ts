/**
 * Compressed clusters written by QEMU (qemu-img convert -c, zlib and zstd, several cluster
 * sizes): each L2 descriptor is decoded and its bytes decompressed, and the result must equal the
 * source cluster. The L1/L2 walk here is written from the spec, apart from the engine.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressCluster, DecompressError, decompressCluster, zstdFrameLength } from '../../src/qcow2/codec';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from '../../src/qcow2/header';
import { compressedDescriptor } from '../../src/qcow2/l2';
import { need, qemuImg, removeScratch, rng, scratchDir, seededBytes } from '../support/env';

beforeAll(() => need('qemu-img'));
afterAll(() => removeScratch());

interface Compressed {
  guestOffset: number;
  hi: number;
  lo: number;
}

/** Every compressed L2 entry of a (standard-L2) qcow2 file. */
function compressedEntries(file: Buffer): { clusterBits: number; entries: Compressed[] } {
  const clusterBits = file.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const l1Size = file.readUInt32BE(36);
  const l1Offset = Number(file.readBigUInt64BE(40));
  const l2Entries = clusterSize / 8;
  const entries: Compressed[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(file.readBigUInt64BE(l1Offset + 8 * i) & 0x00ffffff_fffffe00n);
    if (l2 === 0) continue;
    for (let j = 0; j < l2Entries; j++) {
      const hi = file.readUInt32BE(l2 + 8 * j);
      const lo = file.readUInt32BE(l2 + 8 * j + 4);
      if (hi & 0x40000000) entries.push({ guestOffset: (i * l2Entries + j) * clusterSize, hi, lo });
    }
  }
  return { clusterBits, entries };
}

/** Compressible but varied content: text with numbers, runs, and some random bytes. */
function source(size: number, seed: number): Buffer {
  const buf = Buffer.alloc(size);
  const pick = rng(seed);
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, 100 + Math.floor(pick() * 3000));
    if (pick() < 0.2) seededBytes(seed + off, Math.min(len, 64)).copy(buf, off);
    else buf.write(`record ${off} value ${Math.floor(pick() * 1000)};`.repeat(Math.ceil(len / 30)).slice(0, len), off, 'latin1');
    off += len;
  }
  return buf;
}

for (const [codec, type] of [['zlib', COMPRESSION_ZLIB], ['zstd', COMPRESSION_ZSTD]] as const) {
  for (const clusterSize of [512, 4096, 65536, 2 * 1024 * 1024]) {
    describe(`${codec}, ${clusterSize}-byte clusters written by qemu-img convert -c`, () => {
      it('decodes every descriptor and decompresses to the source cluster', async () => {
        const dir = scratchDir('codec');
        const size = clusterSize === 2 * 1024 * 1024 ? 6 * 1024 * 1024 : 1024 * 1024;
        const src = source(size, clusterSize + type);
        fs.writeFileSync(path.join(dir, 'src.raw'), src);
        const img = path.join(dir, 'c.qcow2');
        qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},compression_type=${codec}`, path.join(dir, 'src.raw'), img);
        const file = fs.readFileSync(img);
        const { clusterBits, entries } = compressedEntries(file);
        expect(2 ** clusterBits).toBe(clusterSize);
        expect(entries.length).toBeGreaterThan(size / clusterSize / 2);
        for (const e of entries) {
          const d = compressedDescriptor(e.hi, e.lo, clusterBits);
          expect(d.hostOffset).toBeGreaterThanOrEqual(clusterSize);
          expect(d.hostOffset + d.compressedBytes).toBeLessThanOrEqual(Math.ceil(file.length / 512) * 512);
          // The descriptor's sector count may cover the next cluster's first bytes: decoders must stop at the stream's end.
          const bytes = Buffer.alloc(d.compressedBytes);
          file.copy(bytes, 0, d.hostOffset, d.hostOffset + d.compressedBytes);
          const out = await decompressCluster(type, bytes, clusterSize);
          expect(out.equals(src.subarray(e.guestOffset, e.guestOffset + clusterSize)), `cluster at ${e.guestOffset}`).toBe(true);
          if (type === COMPRESSION_ZSTD) expect(zstdFrameLength(bytes)).toBeLessThanOrEqual(bytes.length);
        }
      });
    });
  }
}

describe('codec errors', () => {
  it('rejects garbage, truncated streams and wrong lengths with DecompressError', async () => {
    const cluster = source(65536, 5);
    for (const type of [COMPRESSION_ZLIB, COMPRESSION_ZSTD]) {
      const packed = await compressCluster(type, cluster);
      expect((await decompressCluster(type, packed, 65536)).equals(cluster)).toBe(true);
      await expect(decompressCluster(type, Buffer.alloc(300, 0xa5), 65536)).rejects.toThrow(DecompressError);
      await expect(decompressCluster(type, packed.subarray(0, packed.length >> 1), 65536)).rejects.toThrow(DecompressError);
      // A valid stream of the wrong length is not a cluster.
      await expect(decompressCluster(type, await compressCluster(type, cluster.subarray(0, 4096)), 65536)).rejects.toThrow(DecompressError);
      if (type === COMPRESSION_ZSTD) {
        await expect(decompressCluster(type, packed, 4096)).rejects.toThrow(DecompressError);
      } else {
        // QEMU's zlib verdict: a stream that fills the cluster gives it, the rest is ignored.
        expect((await decompressCluster(type, packed, 4096)).equals(cluster.subarray(0, 4096))).toBe(true);
      }
    }
    await expect(decompressCluster(7, Buffer.alloc(10), 512)).rejects.toThrow(DecompressError);
  });
});
