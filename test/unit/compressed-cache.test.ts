/**
 * The decompressed-cluster cache of the read path: one load per cluster, its byte bound,
 * recycled buffers never handed out while a reader may still copy from them, read-ahead on
 * sequential reads only, forget() during a load, close() waiting for read-ahead.
 */
import { describe, expect, it } from 'vitest';
import type { Mapping } from '../../src/qcow2/cluster';
import { CompressedClusterCache } from '../../src/qcow2/compressed-cache';

const CS = 4096;

/** A disk of compressed clusters only: guest cluster i lives at host offset (i + 1) * CS, filled with i & 0xff. */
function fixture(opts: { capacity?: number; window?: number; jobs?: number; delay?: () => Promise<void> } = {}) {
  const loads: number[] = [];
  const loader = async (hostOffset: number, _bytes: number, into: Buffer): Promise<void> => {
    loads.push(hostOffset);
    await (opts.delay ?? (() => new Promise<void>((r) => setImmediate(r))))();
    into.fill((hostOffset / CS - 1) & 0xff, 0, CS);
  };
  const lookup = async (guest: number, max: number): Promise<Mapping> => {
    const i = Math.floor(guest / CS);
    return { kind: 'compressed', length: Math.min(max, CS - (guest % CS)), hostOffset: (i + 1) * CS, compressedBytes: 100, offsetInCluster: guest % CS };
  };
  const cache = new CompressedClusterCache(
    { clusterSize: CS, capacityBytes: opts.capacity ?? 8 * CS, windowBytes: opts.window ?? 0, jobs: opts.jobs ?? 2, diskSize: () => 1024 * CS },
    loader,
    lookup,
  );
  return { cache, loads };
}

async function readCluster(cache: CompressedClusterCache, i: number, len = CS): Promise<Buffer> {
  const dst = Buffer.alloc(len);
  await cache.read(dst, (i + 1) * CS, 100, 0);
  return dst;
}

describe('CompressedClusterCache', () => {
  it('loads a cluster once for concurrent readers and serves hits from the cache', async () => {
    const { cache, loads } = fixture();
    const got = await Promise.all([readCluster(cache, 3), readCluster(cache, 3), readCluster(cache, 3, 10)]);
    for (const b of got) expect(b.every((x) => x === 3)).toBe(true);
    await readCluster(cache, 3);
    expect(loads).toEqual([4 * CS]);
  });

  it('stays within its capacity and recycles buffers without corrupting any reader', async () => {
    const { cache } = fixture({ capacity: 4 * CS });
    // Many concurrent readers over more clusters than the cache holds: each must see its own data.
    for (let round = 0; round < 20; round++) {
      const ids = Array.from({ length: 12 }, (_, k) => (round * 7 + k * 5) % 40);
      const got = await Promise.all(ids.map((i) => readCluster(cache, i)));
      got.forEach((b, k) => expect(b.every((x) => x === ids[k]), `cluster ${ids[k]}`).toBe(true));
      expect(cache.sizeBytes).toBeLessThanOrEqual(4 * CS);
    }
  });

  it('decodes a bounded number of clusters at once under a deep queue of reads', async () => {
    let active = 0;
    let peak = 0;
    const delay = async (): Promise<void> => {
      active++;
      peak = Math.max(peak, active);
      await new Promise<void>((r) => setTimeout(r, 1));
      active--;
    };
    // 4 clusters of capacity, 2 read-ahead jobs: at most max(jobs + 2, 4) = 4 loads at once.
    const { cache, loads } = fixture({ capacity: 4 * CS, delay });
    const ids = Array.from({ length: 64 }, (_, k) => (k * 13) % 64);
    const got = await Promise.all(ids.map((i) => readCluster(cache, i)));
    got.forEach((b, k) => expect(b.every((x) => x === ids[k]), `cluster ${ids[k]}`).toBe(true));
    expect(loads.length).toBe(64);
    expect(peak).toBe(4);
  });

  it('a failed load reaches every waiting reader and is retried by the next read', async () => {
    let fail = true;
    const cache = new CompressedClusterCache(
      { clusterSize: CS, capacityBytes: 8 * CS, windowBytes: 0, jobs: 1, diskSize: () => 100 * CS },
      async (_off, _bytes, into) => {
        await new Promise((r) => setImmediate(r));
        if (fail) throw new Error('corrupt');
        into.fill(9);
      },
      () => Promise.reject(new Error('unused')),
    );
    const dst = Buffer.alloc(CS);
    const r = await Promise.allSettled([cache.read(dst, CS, 1, 0), cache.read(dst, CS, 1, 0)]);
    expect(r.map((x) => x.status)).toEqual(['rejected', 'rejected']);
    fail = false;
    await cache.read(dst, CS, 1, 0);
    expect(dst.every((x) => x === 9)).toBe(true);
  });

  it('forget() during a load keeps the result out of the cache', async () => {
    const { cache, loads } = fixture();
    const p = readCluster(cache, 1);
    cache.forget(2 * CS);
    expect((await p).every((x) => x === 1)).toBe(true);
    await readCluster(cache, 1);
    expect(loads).toEqual([2 * CS, 2 * CS]);
  });

  it('reads ahead on sequential reads, not on random ones, and close() waits for it', async () => {
    const { cache, loads } = fixture({ window: 8 * CS, capacity: 32 * CS, jobs: 2 });
    await readCluster(cache, 500);
    cache.noteRead(500 * CS, 501 * CS); // first read: no history, no read-ahead
    await readCluster(cache, 200);
    cache.noteRead(200 * CS, 201 * CS); // a jump: still none
    await new Promise((r) => setTimeout(r, 20));
    expect(loads).toEqual([501 * CS, 201 * CS]);
    await readCluster(cache, 201);
    cache.noteRead(201 * CS, 202 * CS); // continues the last read: the next 8 clusters load ahead
    await new Promise((r) => setTimeout(r, 50));
    expect(new Set(loads.slice(3))).toEqual(new Set([203, 204, 205, 206, 207, 208, 209, 210].map((i) => i * CS)));
    // Those reads are now hits.
    const before = loads.length;
    for (let i = 202; i < 210; i++) expect((await readCluster(cache, i)).every((x) => x === i)).toBe(true);
    expect(loads.length).toBe(before);
    cache.noteRead(209 * CS, 210 * CS);
    await cache.close();
    const after = loads.length;
    await new Promise((r) => setTimeout(r, 20));
    expect(loads.length).toBe(after); // nothing starts after close()
  });
});
