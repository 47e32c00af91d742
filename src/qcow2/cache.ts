/**
 * A bounded LRU cache of metadata tables (L2 tables, refcount blocks) and decompressed clusters,
 * keyed by host offset, like QEMU's qcow2-cache.c. Memory is bounded by `capacityBytes`, never by
 * the image's size. Concurrent misses on one key share one load.
 */
export class TableCache {
  private readonly entries = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private bytes = 0;
  /** Entries that must not be evicted (dirty metadata waiting for write-back). */
  private readonly pinned = new Set<number>();

  constructor(
    readonly capacityBytes: number,
    private readonly loader: (key: number) => Promise<Buffer>,
    /** Told of each value evicted for space (not of delete()/clear()), e.g. to reuse its buffer. */
    private readonly onEvict?: (key: number, value: Buffer) => void,
  ) {}

  /** Whether key is cached (without marking it used). */
  has(key: number): boolean {
    return this.entries.has(key);
  }

  /** The cached value if present (and marks it recently used); undefined otherwise. */
  peek(key: number): Buffer | undefined {
    const v = this.entries.get(key);
    if (v !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, v);
    }
    return v;
  }

  /** The cached value, or loads it with `load` (default: the cache's loader) exactly once. */
  get(key: number, load: (key: number) => Promise<Buffer> = this.loader): Promise<Buffer> {
    const v = this.peek(key);
    if (v !== undefined) return Promise.resolve(v);
    let p = this.loading.get(key);
    if (!p) {
      p = load(key).then(
        (buf) => {
          this.loading.delete(key);
          this.insert(key, buf);
          return buf;
        },
        (err: unknown) => {
          this.loading.delete(key);
          throw err;
        },
      );
      this.loading.set(key, p);
    }
    return p;
  }

  insert(key: number, buf: Buffer): void {
    const old = this.entries.get(key);
    if (old) {
      this.bytes -= old.length;
      this.entries.delete(key);
    }
    this.entries.set(key, buf);
    this.bytes += buf.length;
    this.evict();
  }

  pin(key: number): void {
    this.pinned.add(key);
  }

  unpin(key: number): void {
    this.pinned.delete(key);
    this.evict();
  }

  delete(key: number): void {
    const old = this.entries.get(key);
    if (old) {
      this.bytes -= old.length;
      this.entries.delete(key);
    }
    this.pinned.delete(key);
  }

  clear(): void {
    this.entries.clear();
    this.pinned.clear();
    this.bytes = 0;
  }

  get sizeBytes(): number {
    return this.bytes;
  }

  private evict(): void {
    if (this.bytes <= this.capacityBytes) return;
    for (const [k, v] of this.entries) {
      if (this.bytes <= this.capacityBytes) break;
      if (this.pinned.has(k)) continue;
      this.entries.delete(k);
      this.bytes -= v.length;
      this.onEvict?.(k, v);
    }
  }
}
