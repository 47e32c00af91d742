/**
 * L1/L2 entry decoding (qcow2 spec: "Cluster mapping", "Compressed Clusters Descriptor"). The
 * expected values are computed here from the spec's bit layout with BigInt, independently of the
 * engine's 32-bit-halves arithmetic.
 */
import { describe, expect, it } from 'vitest';
import { compressedDescriptor, encodeCompressedDescriptor, entryOffset, writeEntry } from '../../src/qcow2/l2';
import { rng } from '../support/env';

function halves(entry: bigint): [number, number] {
  return [Number(entry >> 32n), Number(entry & 0xffffffffn)];
}

describe('standard L1/L2 entries', () => {
  it('take the host offset from bits 9..55 and ignore flags and reserved bits', () => {
    const cases: Array<[bigint, number]> = [
      [0n, 0],
      [0x0000_0000_0001_0000n, 0x10000],
      [(1n << 63n) | 0x0000_0012_3456_0000n, 0x12_3456_0000], // COPIED flag
      [(1n << 63n) | (1n << 62n) | 0x00ff_ffff_ffff_fe00n, 0xff_ffff_ffff_fe00], // all offset bits
      [0x0000_0000_0002_0001n, 0x20000], // zero flag (bit 0)
      [0x0000_0000_0002_01ffn, 0x20000], // reserved bits 1..8
      [0x7f00_0000_0003_0000n, 0x30000], // reserved bits 56..61
    ];
    for (const [entry, offset] of cases) {
      const [hi, lo] = halves(entry);
      expect(entryOffset(hi, lo), `0x${entry.toString(16)}`).toBe(offset);
    }
  });

  it('writeEntry encodes offset, COPIED and low flags', () => {
    const buf = Buffer.alloc(16);
    writeEntry(buf, 8, 0xab_cdef_1200_0000, true, 1);
    expect(buf.readBigUInt64BE(8)).toBe((1n << 63n) | 0xab_cdef_1200_0000n | 1n);
    writeEntry(buf, 0, 0x20000, false);
    expect(buf.readBigUInt64BE(0)).toBe(0x20000n);
  });
});

describe('compressed cluster descriptors', () => {
  for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
    it(`cluster_bits ${clusterBits}: offset in bits 0..x-1, additional sectors in bits x..61`, () => {
      const x = 62 - (clusterBits - 8);
      const sectorMask = (1n << BigInt(clusterBits - 8)) - 1n;
      const pick = rng(clusterBits * 1000 + 1);
      const offsets = [512, 0x10000 + 17, 2 ** 40 + 511, 2 ** 52 - 1];
      for (let i = 0; i < 200; i++) offsets.push(512 + Math.floor(pick() * 2 ** 45));
      for (const hostOffset of offsets) {
        if (BigInt(hostOffset) >= 1n << BigInt(x)) continue;
        const sectors = BigInt(Math.floor(pick() * Number(sectorMask + 1n)));
        const entry = (1n << 62n) | (sectors << BigInt(x)) | BigInt(hostOffset);
        const [hi, lo] = halves(entry);
        const d = compressedDescriptor(hi, lo, clusterBits);
        expect(d.hostOffset).toBe(hostOffset);
        // "Number of additional 512-byte sectors"; the data starts inside the first sector.
        expect(d.compressedBytes).toBe((Number(sectors) + 1) * 512 - (hostOffset % 512));
        // The COPIED bit never appears on compressed entries, but must not leak into the fields.
        const [hi2, lo2] = halves(entry | (1n << 63n));
        expect(compressedDescriptor(hi2, lo2, clusterBits)).toEqual(d);
      }
    });
  }

  it('encodeCompressedDescriptor is the inverse (sector count covers the last byte)', () => {
    for (const clusterBits of [9, 12, 16, 21]) {
      const pick = rng(clusterBits);
      for (let i = 0; i < 100; i++) {
        const hostOffset = 65536 + Math.floor(pick() * 2 ** 40);
        const maxBytes = 2 ** clusterBits;
        const bytes = 1 + Math.floor(pick() * (maxBytes - 512));
        const [hi, lo] = encodeCompressedDescriptor(hostOffset, bytes, clusterBits);
        const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
        const x = BigInt(62 - (clusterBits - 8));
        expect(entry & ((1n << x) - 1n)).toBe(BigInt(hostOffset));
        const lastSector = Math.floor((hostOffset + bytes - 1) / 512);
        expect(Number(entry >> x)).toBe(lastSector - Math.floor(hostOffset / 512));
        const d = compressedDescriptor(hi, lo, clusterBits);
        expect(d.hostOffset).toBe(hostOffset);
        expect(d.compressedBytes).toBeGreaterThanOrEqual(bytes);
        expect(d.compressedBytes - bytes).toBeLessThan(512);
      }
    }
  });
});
