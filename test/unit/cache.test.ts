/** The bounded metadata cache: LRU order, the byte bound, shared loads, pinning. */
import { describe, expect, it } from 'vitest';
import { TableCache } from '../../src/qcow2/cache';

function loaderCounting(size = 1024): { load: (k: number) => Promise<Buffer>; calls: number[] } {
  const calls: number[] = [];
  return {
    calls,
    load: async (k: number) => {
      calls.push(k);
      return Buffer.alloc(size, k & 0xff);
    },
  };
}

describe('TableCache', () => {
  it('never holds more than its capacity, evicting the least recently used', async () => {
    const l = loaderCounting();
    const cache = new TableCache(4 * 1024, l.load);
    for (let k = 1; k <= 4; k++) await cache.get(k);
    expect(cache.sizeBytes).toBe(4096);
    expect(cache.peek(1)).toBeDefined(); // 1 is now the most recent; 2 is the oldest
    await cache.get(5);
    expect(cache.sizeBytes).toBeLessThanOrEqual(4096);
    expect(cache.peek(2)).toBeUndefined();
    for (const k of [1, 3, 4, 5]) expect(cache.peek(k), `key ${k}`).toBeDefined();
    for (let k = 100; k < 1100; k++) {
      await cache.get(k);
      expect(cache.sizeBytes).toBeLessThanOrEqual(4096);
    }
    expect(l.calls).toHaveLength(5 + 1000);
    const again = await cache.get(1099);
    expect(again[0]).toBe(1099 & 0xff);
    expect(l.calls).toHaveLength(1005); // a hit loads nothing
  });

  it('shares one load between concurrent misses of a key', async () => {
    let resolveLoad: (b: Buffer) => void = () => undefined;
    let loads = 0;
    const cache = new TableCache(1 << 20, () => {
      loads++;
      return new Promise<Buffer>((r) => (resolveLoad = r));
    });
    const a = cache.get(7);
    const b = cache.get(7);
    resolveLoad(Buffer.from('table'));
    expect((await a).toString()).toBe('table');
    expect(await b).toBe(await a);
    expect(loads).toBe(1);
  });

  it('does not cache a failed load, and retries it next time', async () => {
    let fail = true;
    const cache = new TableCache(1 << 20, async () => {
      if (fail) throw new Error('EIO');
      return Buffer.from('ok');
    });
    await expect(cache.get(1)).rejects.toThrow('EIO');
    expect(cache.sizeBytes).toBe(0);
    fail = false;
    expect((await cache.get(1)).toString()).toBe('ok');
  });

  it('keeps pinned entries past the bound until unpinned', async () => {
    const l = loaderCounting();
    const cache = new TableCache(2 * 1024, l.load);
    await cache.get(1);
    cache.pin(1);
    for (let k = 2; k < 10; k++) await cache.get(k);
    expect(cache.peek(1)).toBeDefined();
    expect(cache.sizeBytes).toBeLessThanOrEqual(2 * 1024);
    cache.unpin(1);
    await cache.get(10);
    await cache.get(11);
    expect(cache.peek(1)).toBeUndefined();
    expect(cache.sizeBytes).toBeLessThanOrEqual(2 * 1024);
  });

  it('insert replaces an entry without counting it twice; delete and clear release bytes', () => {
    const cache = new TableCache(10_000, async () => Buffer.alloc(0));
    cache.insert(1, Buffer.alloc(1000));
    cache.insert(1, Buffer.alloc(3000));
    expect(cache.sizeBytes).toBe(3000);
    cache.insert(2, Buffer.alloc(500));
    cache.delete(1);
    expect(cache.sizeBytes).toBe(500);
    cache.clear();
    expect(cache.sizeBytes).toBe(0);
    expect(cache.peek(2)).toBeUndefined();
  });
});
