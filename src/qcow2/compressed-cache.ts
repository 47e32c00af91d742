/**
 * Decompressed clusters for the read path: a small LRU cache keyed by the compressed cluster's
 * host offset, with read-ahead for sequential reads and recycled output buffers.
 *
 * - Each cluster is decompressed once, into a cluster-sized buffer, however many requests ask
 *   for it meanwhile (concurrent misses share one load).
 * - Read-ahead: when reads over compressed clusters are sequential, the compressed clusters of
 *   the next `windowBytes` of the disk are decompressed ahead, at most `jobs` at a time. The
 *   native codec runs them on libuv's thread pool, so they decode on the other core while the JS
 *   thread answers FUSE requests; the kernel's own read-ahead sends only a few requests at once.
 * - At most `maxLoads` clusters decode at once; the other loads wait their turn, so a deep queue
 *   of reads of big clusters holds a few decoded clusters rather than one per request.
 * - Buffers of evicted clusters are reused for the next loads instead of being left to the
 *   garbage collector (which collects external memory lazily: a sequential read of a compressed
 *   image used to peak ~90 MiB above an uncompressed one). A buffer is recycled only when
 *   nothing can still read it: readers pin their cluster while they wait for it, and eviction
 *   skips pinned clusters; the writer gets a copy.
 */
import { TableCache } from './cache';
import type { Mapping } from './cluster';

/** Reads the compressed bytes at hostOffset and decompresses them into `into` (a cluster). */
export type ClusterLoader = (hostOffset: number, compressedBytes: number, into: Buffer) => Promise<void>;
/** The image's mapping lookup (guest offset -> what backs it, for how long). */
export type Lookup = (guestOffset: number, maxLength: number) => Promise<Mapping>;

interface Load {
  promise: Promise<Buffer>;
  /** forget() was called meanwhile: the result must not enter the cache. */
  stale: boolean;
}

export interface CompressedCacheOptions {
  clusterSize: number;
  capacityBytes: number;
  /** Read-ahead span in bytes of the disk (0: none). */
  windowBytes: number;
  /** Read-ahead decompressions in flight at most. */
  jobs: number;
  /** The disk's size (read-ahead stops there). */
  diskSize: () => number;
}

const NOOP = (): void => {};
/**
 * Loads at once at most, whatever the cluster size: enough for every libuv thread and core, while
 * a deep queue of reads of 2 MiB clusters holds a few decoded clusters, not one per request.
 */
const MAX_LOADS = 16;

export class CompressedClusterCache {
  /** The LRU of decoded clusters; what it evicts for space is recycled. */
  private readonly cache: TableCache;
  private readonly loading = new Map<number, Load>();
  /** Readers waiting for (then copying from) a cluster, by host offset: pinned in the cache. */
  private readonly pins = new Map<number, number>();
  private readonly free: Buffer[] = [];
  private readonly maxFree: number;
  /** Loads decoding at once at most (each holds a cluster), and those waiting for a turn. */
  private readonly maxLoads: number;
  private activeLoads = 0;
  private readonly turns: Array<() => void> = [];

  // Read-ahead state (guest offsets).
  private lastEnd = -1;
  private raNext = 0;
  private raLimit = 0;
  private epoch = 0;
  private pumping = false;
  private readonly inflight = new Set<Promise<unknown>>();
  private closed = false;

  constructor(
    private readonly opts: CompressedCacheOptions,
    private readonly loader: ClusterLoader,
    private readonly lookup: Lookup,
  ) {
    this.maxLoads = Math.min(MAX_LOADS, Math.max(opts.jobs + 2, Math.floor(opts.capacityBytes / opts.clusterSize)));
    // Room for a buffer per load: random reads of big clusters evict one cluster per load.
    this.maxFree = Math.max(this.maxLoads, Math.min(8, Math.floor(opts.capacityBytes / opts.clusterSize / 4)));
    this.cache = new TableCache(opts.capacityBytes, () => Promise.reject(new Error('internal: loads go through load()')), (_k, buf) => this.recycle(buf));
  }

  /** Copies dst.length bytes of the cluster, from offsetInCluster, into dst. */
  async read(dst: Uint8Array, hostOffset: number, compressedBytes: number, offsetInCluster: number): Promise<void> {
    const hit = this.cache.peek(hostOffset);
    if (hit) {
      dst.set(hit.subarray(offsetInCluster, offsetInCluster + dst.length));
      return;
    }
    this.pins.set(hostOffset, (this.pins.get(hostOffset) ?? 0) + 1);
    this.cache.pin(hostOffset);
    try {
      const buf = await this.load(hostOffset, compressedBytes);
      dst.set(buf.subarray(offsetInCluster, offsetInCluster + dst.length));
    } finally {
      const n = this.pins.get(hostOffset)! - 1;
      if (n > 0) {
        this.pins.set(hostOffset, n);
      } else {
        this.pins.delete(hostOffset);
        this.cache.unpin(hostOffset);
      }
    }
  }

  /** A copy of the whole cluster (the caller may keep it as long as it likes). */
  async cluster(hostOffset: number, compressedBytes: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(this.opts.clusterSize);
    await this.read(out, hostOffset, compressedBytes, 0);
    return out;
  }

  /** The host cluster was freed: drop it, and keep a load in flight from caching it. */
  forget(hostOffset: number): void {
    this.cache.delete(hostOffset);
    // A reader still waiting keeps its pin (delete() dropped it from the cache's set).
    if (this.pins.has(hostOffset)) this.cache.pin(hostOffset);
    const l = this.loading.get(hostOffset);
    if (l) {
      l.stale = true;
      this.loading.delete(hostOffset);
    }
  }

  get sizeBytes(): number {
    return this.cache.sizeBytes;
  }

  /**
   * A read of [offset, end) touched compressed clusters: when it continues the previous one,
   * decompress the following window ahead.
   */
  noteRead(offset: number, end: number): void {
    if (this.opts.windowBytes <= 0 || this.closed) return;
    const sequential = this.lastEnd >= 0 && offset >= this.lastEnd - this.opts.windowBytes && offset <= this.lastEnd + this.opts.clusterSize;
    if (!sequential) {
      this.lastEnd = end;
      this.raNext = end;
      this.raLimit = end;
      this.epoch++;
      return;
    }
    if (end > this.lastEnd) this.lastEnd = end;
    if (this.raNext < this.lastEnd) this.raNext = this.lastEnd;
    this.raLimit = Math.min(this.lastEnd + this.opts.windowBytes, this.opts.diskSize());
    void this.pump();
  }

  /** Stops read-ahead and waits for what is in flight (before the image file closes). */
  async close(): Promise<void> {
    this.closed = true;
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
    this.cache.clear();
    this.free.length = 0;
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.closed && this.inflight.size < this.opts.jobs && this.raNext < this.raLimit) {
        const epoch = this.epoch;
        const at = this.raNext;
        let m: Mapping;
        try {
          m = await this.lookup(at, this.raLimit - at);
        } catch {
          // A bad L2 entry: the read itself will report it; read no further ahead.
          if (epoch === this.epoch) this.raLimit = this.raNext;
          continue;
        }
        if (epoch !== this.epoch || this.closed) continue; // the reader jumped elsewhere meanwhile
        this.raNext = Math.max(this.raNext, at + m.length);
        if (m.kind !== 'compressed' || this.cache.has(m.hostOffset) || this.loading.has(m.hostOffset)) continue;
        const p = this.load(m.hostOffset, m.compressedBytes).then(NOOP, NOOP); // a failure shows on the real read
        this.inflight.add(p);
        void p.then(() => {
          this.inflight.delete(p);
          void this.pump();
        });
      }
    } finally {
      this.pumping = false;
    }
  }

  private load(key: number, compressedBytes: number): Promise<Buffer> {
    const hit = this.cache.peek(key);
    if (hit) return Promise.resolve(hit);
    const running = this.loading.get(key);
    if (running) return running.promise;
    const state: Load = { promise: Promise.resolve(Buffer.alloc(0)), stale: false };
    state.promise = this.turn().then(async () => {
      const into = this.free.pop() ?? Buffer.allocUnsafeSlow(this.opts.clusterSize);
      try {
        await this.loader(key, compressedBytes, into);
      } catch (err) {
        if (!state.stale) this.loading.delete(key);
        // Nobody saw this buffer (the loader settles only after the decoder is done with it).
        this.recycle(into);
        throw err;
      } finally {
        this.endTurn();
      }
      if (!state.stale) {
        this.loading.delete(key);
        this.cache.insert(key, into);
      }
      return into;
    });
    this.loading.set(key, state);
    return state.promise;
  }

  /** Resolves when this load may start (fewer than maxLoads are decoding). */
  private turn(): Promise<void> {
    if (this.activeLoads < this.maxLoads) {
      this.activeLoads++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.turns.push(resolve));
  }

  private endTurn(): void {
    const next = this.turns.shift();
    if (next) next();
    else this.activeLoads--;
  }

  private recycle(buf: Buffer): void {
    if (this.free.length < this.maxFree && !this.closed) this.free.push(buf);
  }
}
