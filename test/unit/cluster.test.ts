/**
 * ClusterMapper.lookup over hand-made L2 tables: the kind and length of each run, merging of
 * host-contiguous clusters, extended L2 bitmaps, and corrupt entries (qcow2 spec: "Cluster
 * mapping", "Extended L2 Entries").
 */
import { describe, expect, it } from 'vitest';
import { CorruptionError } from '../../src/errors';
import { TableCache } from '../../src/qcow2/cache';
import { ClusterMapper, type L1Table, type Mapping, type MetadataRegions } from '../../src/qcow2/cluster';
import type { Geometry } from '../../src/qcow2/header';

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

function geometry(clusterBits: number, extendedL2: boolean, version = 3): Geometry {
  const clusterSize = 2 ** clusterBits;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const subclusterBits = extendedL2 ? clusterBits - 5 : clusterBits;
  return {
    clusterBits, clusterSize, extendedL2, l2EntryBytes, l2Entries: clusterSize / l2EntryBytes,
    l2Bits: Math.log2(clusterSize / l2EntryBytes), subclusterBits, subclusterSize: 2 ** subclusterBits, refcountBits: 16,
    zeroFlagAllowed: version >= 3,
  };
}

interface Fixture {
  mapper: ClusterMapper;
  l1: L1Table;
  loads: number[];
}

/** One L2 table at host 0x30000 (L1 index 0), a file of `fileSize` bytes, metadata at 0..0x40000. */
function fixture(g: Geometry, entries: Array<{ entry: bigint; bitmap?: bigint }>, fileSize = 64 * 1024 * 1024): Fixture {
  const table = Buffer.alloc(g.clusterSize);
  entries.forEach((e, i) => {
    table.writeBigUInt64BE(e.entry, i * g.l2EntryBytes);
    if (g.extendedL2) table.writeBigUInt64BE(e.bitmap ?? 0n, i * g.l2EntryBytes + 8);
  });
  const loads: number[] = [];
  const cache = new TableCache(1 << 20, async (off) => {
    loads.push(off);
    if (off !== 0x30000) throw new Error(`unexpected L2 load at ${off}`);
    return table;
  });
  const regions: MetadataRegions = {
    fileSize: () => fileSize,
    overlaps: (off, len) => (off < 0x40000 && off + len > 0x30000 ? 'L2 table' : off < 0x10000 ? 'image header' : null),
  };
  const l1: L1Table = { tableOffset: 0x20000, l2Offsets: Float64Array.from([0x30000, 0]), copied: Uint8Array.from([1, 0]) };
  return { mapper: new ClusterMapper(g, cache, regions, 'test.qcow2'), l1, loads };
}

/** Walks [0, end) with lookup() and returns the runs. */
async function runs(f: Fixture, start: number, end: number): Promise<Array<Mapping & { at: number }>> {
  const out: Array<Mapping & { at: number }> = [];
  for (let pos = start; pos < end; ) {
    const m = await f.mapper.lookup(f.l1, pos, end - pos);
    expect(m.length).toBeGreaterThan(0);
    out.push({ ...m, at: pos });
    pos += m.length;
  }
  return out;
}

describe('standard L2 entries (64 KiB clusters)', () => {
  const g = geometry(16, false);
  const C = 0x10000;
  const entries = [
    { entry: COPIED | 0x100000n },
    { entry: COPIED | 0x110000n }, // host-contiguous with the previous: one run
    { entry: COPIED | 0x200000n }, // not contiguous: a new run
    { entry: 1n }, // zero flag, no host cluster
    { entry: COPIED | 0x300000n | 1n }, // zero flag with a preallocated cluster
    { entry: 0n },
    { entry: 0n },
    { entry: COMPRESSED | (2n << 54n) | 0x400123n }, // compressed: 3 sectors from 0x400123
  ];

  it('returns one run per kind, merging host-contiguous data', async () => {
    const f = fixture(g, entries);
    const r = await runs(f, 0, 9 * C);
    expect(r).toEqual([
      { at: 0, kind: 'data', length: 2 * C, hostOffset: 0x100000 },
      { at: 2 * C, kind: 'data', length: C, hostOffset: 0x200000 },
      { at: 3 * C, kind: 'zero', length: C, allocated: false },
      { at: 4 * C, kind: 'zero', length: C, allocated: true },
      { at: 5 * C, kind: 'unallocated', length: 2 * C },
      { at: 7 * C, kind: 'compressed', length: C, hostOffset: 0x400123, compressedBytes: 3 * 512 - 0x123, offsetInCluster: 0 },
      { at: 8 * C, kind: 'unallocated', length: C },
    ]);
    expect(f.loads).toEqual([0x30000]); // one table load, then cache hits
  });

  it('starts runs mid-cluster and stops at maxLength', async () => {
    const f = fixture(g, entries);
    expect(await f.mapper.lookup(f.l1, C + 100, 10)).toEqual({ kind: 'data', length: 10, hostOffset: 0x110000 + 100 });
    expect(await f.mapper.lookup(f.l1, 100, 3 * C)).toEqual({ kind: 'data', length: 2 * C - 100, hostOffset: 0x100000 + 100 });
    expect(await f.mapper.lookup(f.l1, 7 * C + 5000, C)).toEqual({
      kind: 'compressed', length: C - 5000, hostOffset: 0x400123, compressedBytes: 3 * 512 - 0x123, offsetInCluster: 5000,
    });
  });

  it('lets compressed bytes run past the end of the file (QEMU reads zeros there; the decoder decides)', async () => {
    const f = fixture(g, [{ entry: 0n }, { entry: COMPRESSED | (255n << 54n) | 0x3fff000n }], 0x4000000);
    expect(await f.mapper.lookup(f.l1, C, 512)).toEqual({ kind: 'compressed', length: 512, hostOffset: 0x3fff000, compressedBytes: 256 * 512, offsetInCluster: 0 });
  });

  it('stops a run at the end of the L2 table; an absent table is one unallocated run', async () => {
    const f = fixture(g, []);
    const span = g.l2Entries * C; // 512 MiB per table
    expect(await f.mapper.lookup(f.l1, span - 100, 1000)).toEqual({ kind: 'unallocated', length: 100 });
    expect(await f.mapper.lookup(f.l1, span, 2 * span)).toEqual({ kind: 'unallocated', length: span });
    expect(await f.mapper.lookup(f.l1, 5 * span, 10)).toEqual({ kind: 'unallocated', length: 10 }); // past l1_size
  });

  it('throws CorruptionError for unaligned, out-of-file and overlapping data clusters', async () => {
    const bad: Array<[bigint, RegExp]> = [
      [0x100200n, /not aligned/],
      [0x7f000000n, /past the end of the file/],
      [0x30000n, /points into the L2 table/],
      [COMPRESSED | 0x7f000000n, /compressed cluster offset 0x7f000000 lies outside the file/],
    ];
    for (const [entry, msg] of bad) {
      const f = fixture(g, [{ entry: 0n }, { entry }], 0x4000000);
      await expect(f.mapper.lookup(f.l1, C, 512)).rejects.toThrow(CorruptionError);
      await expect(f.mapper.lookup(f.l1, C, 512)).rejects.toThrow(msg);
      // The entry before it is still fine, and a run from it stops before the bad entry is needed.
      expect(await f.mapper.lookup(f.l1, 0, C)).toEqual({ kind: 'unallocated', length: C });
    }
  });
});

describe('version 2 images', () => {
  it('treat the zero flag as corruption, as QEMU does; plain entries read normally', async () => {
    const g = geometry(16, false, 2);
    const f = fixture(g, [{ entry: COPIED | 0x100000n }, { entry: 1n }, { entry: COPIED | 0x110000n | 1n }]);
    expect(await f.mapper.lookup(f.l1, 0, 0x10000)).toEqual({ kind: 'data', length: 0x10000, hostOffset: 0x100000 });
    await expect(f.mapper.lookup(f.l1, 0x10000, 512)).rejects.toThrow(/zero flag set in a version 2 image/);
    await expect(f.mapper.lookup(f.l1, 0x20000, 512)).rejects.toThrow(CorruptionError);
  });
});

describe('extended L2 entries (64 KiB clusters, 2 KiB subclusters)', () => {
  const g = geometry(16, true);
  const S = 2048;
  const C = 0x10000;
  // Bitmap: bits 0..31 allocated, bits 32..63 reads-as-zero (spec "Extended L2 Entries").
  const bitmap = (alloc: number, zero: number): bigint => (BigInt(zero >>> 0) << 32n) | BigInt(alloc >>> 0);

  it('classifies each subcluster from the bitmaps', async () => {
    const f = fixture(g, [
      { entry: COPIED | 0x100000n, bitmap: bitmap(0b0011, 0b0100) },
      { entry: 0n, bitmap: bitmap(0, 0xffffffff) }, // all zero, nothing allocated
      { entry: COPIED | 0x110000n, bitmap: bitmap(0xffffffff, 0) }, // fully allocated
      { entry: COPIED | 0x120000n, bitmap: bitmap(0xffffffff, 0) }, // contiguous with the previous
    ]);
    const r = await runs(f, 0, 5 * C);
    expect(r).toEqual([
      { at: 0, kind: 'data', length: 2 * S, hostOffset: 0x100000 },
      { at: 2 * S, kind: 'zero', length: S, allocated: true },
      { at: 3 * S, kind: 'unallocated', length: C - 3 * S },
      { at: C, kind: 'zero', length: C, allocated: false },
      { at: 2 * C, kind: 'data', length: 2 * C, hostOffset: 0x110000 },
      { at: 4 * C, kind: 'unallocated', length: C },
    ]);
  });

  it('maps a subcluster to its own place inside the host cluster', async () => {
    const f = fixture(g, [{ entry: COPIED | 0x100000n, bitmap: bitmap(1 << 5, 0) }]);
    expect(await f.mapper.lookup(f.l1, 5 * S + 10, 100)).toEqual({ kind: 'data', length: 100, hostOffset: 0x100000 + 5 * S + 10 });
    expect(await f.mapper.lookup(f.l1, 4 * S, 3 * S)).toEqual({ kind: 'unallocated', length: S });
  });

  it('throws CorruptionError for contradictory bitmaps', async () => {
    const cases: Array<[{ entry: bigint; bitmap: bigint }, RegExp]> = [
      [{ entry: COPIED | 0x100000n, bitmap: bitmap(1, 1) }, /both allocated and zero/],
      [{ entry: 0n, bitmap: bitmap(1, 0) }, /unallocated cluster has allocated subclusters/],
      [{ entry: COMPRESSED | 0x100000n, bitmap: bitmap(0, 1) }, /compressed cluster has a non-zero subcluster bitmap/],
    ];
    for (const [e, msg] of cases) {
      const f = fixture(g, [e]);
      await expect(f.mapper.lookup(f.l1, 0, S)).rejects.toThrow(msg);
    }
  });
});

describe('512-byte clusters', () => {
  it('one L2 table covers 32 KiB; runs stop at its end', async () => {
    const g = geometry(9, false);
    const entries = Array.from({ length: 64 }, (_, i) => ({ entry: COPIED | BigInt(0x100000 + i * 512) }));
    const f = fixture(g, entries);
    expect(g.l2Entries * g.clusterSize).toBe(32 * 1024);
    expect(await f.mapper.lookup(f.l1, 1000, 64 * 1024)).toEqual({ kind: 'data', length: 32 * 1024 - 1000, hostOffset: 0x100000 + 1000 });
    expect(await f.mapper.lookup(f.l1, 32 * 1024, 512)).toEqual({ kind: 'unallocated', length: 512 });
  });
});
