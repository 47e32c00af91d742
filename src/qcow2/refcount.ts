/**
 * Refcounts and the cluster allocator (qcow2 spec: "Host cluster management"; QEMU's
 * qcow2-refcount.c). The refcount table lives in memory; refcount blocks go through a bounded
 * cache in which dirty blocks are pinned until written back. Every host cluster in use has a
 * refcount > 0, the header, the tables and the refcount structures themselves included.
 *
 * Ordering is the caller's: blocks are written by writeDirtyBlocks(), the table (which points at
 * blocks) by writeTable() after a barrier, and the L2/L1 entries that rely on refcounts only
 * after both are durable. New blocks and a grown table always go to clusters nothing uses.
 */
import { CorruptionError, ImageError } from '../errors';
import type { HostFile } from '../io/file';
import { TableCache } from './cache';
import { rangesOverlap, type Qcow2Header } from './header';
import { getRefcount, refcountEntriesPerBlock, refcountMax as maxRefcount, setRefcount } from './refcount-decode';

/** A region of the image file that must never be handed out (for validation of the table). */
export interface FixedRegion {
  offset: number;
  length: number;
  what: string;
}

export interface RefcountOptions {
  file: HostFile;
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
  /** Current length of the image file. */
  fileSize: number;
  /** Bytes of refcount blocks to cache. */
  cacheBytes: number;
  /** Metadata the table's entries must not point into. */
  regions: readonly FixedRegion[];
  /** Writes refcount_table_offset and refcount_table_clusters to the header (durably). */
  commitTableLocation(offset: number, clusters: number): Promise<void>;
}

const TWO32 = 4294967296;

/** Writes refcount_table_offset and refcount_table_clusters (header bytes 48..59) durably. */
export async function writeRefcountTableLocation(file: HostFile, offset: number, clusters: number): Promise<void> {
  const b = Buffer.alloc(12);
  b.writeUInt32BE(Math.floor(offset / TWO32), 0);
  b.writeUInt32BE(offset % TWO32, 4);
  b.writeUInt32BE(clusters, 8);
  await file.pwrite(b, 48);
  await file.flush();
}

/** The refcount structures of an image, as its header describes them. */
export function loadImageRefcounts(
  file: HostFile,
  header: Qcow2Header,
  opts: {
    fileSize: number;
    cacheBytes: number;
    regions?: readonly FixedRegion[];
    /** Called after a grown table's location is durable in the header; absent: the table must not move. */
    onTableMoved?(offset: number, clusters: number): void;
    /** Overrides the header's table location (after a caller moved the table). */
    table?: { offset: number; clusters: number };
  },
): Promise<RefcountManager> {
  return RefcountManager.load({
    file,
    clusterBits: header.clusterBits,
    refcountOrder: header.refcountOrder,
    tableOffset: opts.table?.offset ?? header.refcountTableOffset,
    tableClusters: opts.table?.clusters ?? header.refcountTableClusters,
    fileSize: opts.fileSize,
    cacheBytes: opts.cacheBytes,
    regions: opts.regions ?? [],
    commitTableLocation: async (offset, clusters) => {
      if (!opts.onTableMoved) throw new Error('internal: the refcount table may not move here');
      await writeRefcountTableLocation(file, offset, clusters);
      opts.onTableMoved(offset, clusters);
    },
  });
}

export class RefcountManager {
  readonly clusterSize: number;
  readonly entriesPerBlock: number;
  private readonly order: number;
  private readonly maxValue: number;
  private table: Float64Array;
  private tableOffset: number;
  private tableClusters: number;
  private readonly blocks: TableCache;
  private readonly dirtyBlocks = new Set<number>();
  private readonly dirtyTableClusters = new Set<number>();
  /** No free cluster below this index. */
  private freeHint = 0;
  /** One past the highest cluster index in use (file end or allocations beyond it). */
  private endCluster: number;

  private constructor(private readonly o: RefcountOptions, table: Float64Array) {
    this.clusterSize = 2 ** o.clusterBits;
    this.order = o.refcountOrder;
    this.entriesPerBlock = refcountEntriesPerBlock(o.clusterBits, o.refcountOrder);
    this.maxValue = maxRefcount(o.refcountOrder);
    this.table = table;
    this.tableOffset = o.tableOffset;
    this.tableClusters = o.tableClusters;
    this.endCluster = Math.ceil(o.fileSize / this.clusterSize);
    this.blocks = new TableCache(Math.max(o.cacheBytes, 8 * this.clusterSize), (off) => this.loadBlock(off));
  }

  /** Reads and validates the refcount table. */
  static async load(o: RefcountOptions): Promise<RefcountManager> {
    const cs = 2 ** o.clusterBits;
    const raw = Buffer.alloc(o.tableClusters * cs);
    await o.file.pread(raw, o.tableOffset);
    const n = raw.length / 8;
    const table = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const hi = raw.readUInt32BE(i * 8);
      const lo = raw.readUInt32BE(i * 8 + 4);
      const off = hi * TWO32 + lo;
      if (off === 0) continue;
      const where = `refcount table entry ${i}: refcount block offset 0x${off.toString(16)}`;
      if (off % cs !== 0 || off >= 2 ** 56) throw new ImageError(`${where} is not aligned to the cluster size`, o.file.path);
      if (off + cs > Math.ceil(o.fileSize / cs) * cs) throw new ImageError(`${where} lies past the end of the file`, o.file.path);
      for (const r of o.regions) {
        if (rangesOverlap(off, cs, r.offset, r.length)) throw new ImageError(`${where} points into the ${r.what}`, o.file.path);
      }
      table[i] = off;
    }
    return new RefcountManager(o, table);
  }

  get tableLocation(): { offset: number; clusters: number } {
    return { offset: this.tableOffset, clusters: this.tableClusters };
  }

  /** One past the last cluster in use, in bytes: the file's logical end. */
  get endBytes(): number {
    return this.endCluster * this.clusterSize;
  }

  get dirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.dirtyTableClusters.size > 0;
  }

  get tableDirty(): boolean {
    return this.dirtyTableClusters.size > 0;
  }

  get dirtyBytes(): number {
    return this.dirtyBlocks.size * this.clusterSize;
  }

  private async loadBlock(offset: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(this.clusterSize);
    await this.o.file.pread(buf, offset);
    return buf;
  }

  /** The refcount block for block index bi, or null when none exists. */
  private async block(bi: number): Promise<Buffer | null> {
    const off = bi < this.table.length ? this.table[bi]! : 0;
    if (off === 0) return null;
    return this.blocks.peek(off) ?? (await this.blocks.get(off));
  }

  private markDirty(bi: number, buf: Buffer): void {
    const off = this.table[bi]!;
    if (!this.dirtyBlocks.has(off)) {
      this.dirtyBlocks.add(off);
      // Pin before (re)inserting: a full cache must not evict the block being dirtied.
      this.blocks.pin(off);
      if (this.blocks.peek(off) !== buf) this.blocks.insert(off, buf);
    }
  }

  async get(cluster: number): Promise<number> {
    const bi = Math.floor(cluster / this.entriesPerBlock);
    const b = await this.block(bi);
    return b === null ? 0 : getRefcount(b, cluster - bi * this.entriesPerBlock, this.order);
  }

  /** Adds delta to each cluster's refcount in [offset, offset + bytes). */
  async adjust(offset: number, bytes: number, delta: number): Promise<number[]> {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    const freed: number[] = [];
    for (let c = first; c <= last; c++) {
      const bi = Math.floor(c / this.entriesPerBlock);
      const b = delta > 0 ? await this.ensureBlock(bi) : await this.block(bi);
      const idx = c - bi * this.entriesPerBlock;
      const old = b === null ? 0 : getRefcount(b, idx, this.order);
      const v = old + delta;
      if (v < 0) throw new CorruptionError(`${this.o.file.path}: refcount of cluster 0x${(c * this.clusterSize).toString(16)} would drop below zero`);
      if (v > this.maxValue) throw new ImageError(`refcount of cluster 0x${(c * this.clusterSize).toString(16)} would exceed the ${1 << this.order}-bit maximum`, this.o.file.path);
      setRefcount(b!, idx, this.order, v);
      this.markDirty(bi, b!);
      if (v === 0) {
        freed.push(c * this.clusterSize);
        if (c < this.freeHint) this.freeHint = c;
      }
      if (v > 0 && c >= this.endCluster) this.endCluster = c + 1;
    }
    return freed;
  }

  /**
   * Allocates `n` contiguous free clusters (refcount 0 -> 1) and returns the host offset of the
   * first. Reuses freed clusters before growing the file. A range without a refcount block is
   * free by definition; blocks created for the run go after it, so they never split it.
   */
  async allocate(n: number): Promise<number> {
    const epb = this.entriesPerBlock;
    let c = Math.max(this.freeHint, 1);
    let runStart = -1;
    let firstFree = -1;
    outer: for (;;) {
      const bi = Math.floor(c / epb);
      const b = await this.block(bi);
      const end = (bi + 1) * epb;
      if (b === null) {
        if (firstFree < 0) firstFree = c;
        if (runStart < 0) runStart = c;
        if (end - runStart >= n) break;
        c = end;
        continue;
      }
      for (let i = c; i < end; i++) {
        if (getRefcount(b, i - bi * epb, this.order) !== 0) {
          runStart = -1;
          continue;
        }
        if (firstFree < 0) firstFree = i;
        if (runStart < 0) runStart = i;
        if (i - runStart + 1 === n) break outer;
      }
      c = end;
    }
    // Reserve the run first: new refcount blocks are placed past the end of what is in use.
    if (runStart + n > this.endCluster) this.endCluster = runStart + n;
    await this.adjust(runStart * this.clusterSize, n * this.clusterSize, 1);
    this.freeHint = firstFree === runStart ? runStart + n : firstFree;
    return runStart * this.clusterSize;
  }

  /**
   * Allocates `n` clusters at the end of what is in use (refcount 0 -> 1): never used since the
   * image was opened and past the end the file had then, so they read as zeros.
   */
  async allocateFresh(n: number): Promise<number> {
    const start = this.endCluster;
    // Reserve the run first: new refcount blocks are placed past it.
    this.endCluster = start + n;
    await this.adjust(start * this.clusterSize, n * this.clusterSize, 1);
    return start * this.clusterSize;
  }

  /**
   * Gives back clusters of allocateFresh() that were never used (no entry refers to them); when
   * they are the last in use, the end moves back too.
   */
  async releaseFresh(offset: number, bytes: number): Promise<void> {
    await this.adjust(offset, bytes, -1);
    if (offset + bytes === this.endBytes) this.endCluster = offset / this.clusterSize;
  }

  /**
   * One past the last cluster in use, looking back from the end over at most `maxScan` free
   * clusters (the file may be cut there: nothing refers to what lies past it).
   */
  async usedEnd(maxScan = 1 << 20): Promise<number> {
    let c = this.endCluster;
    while (c > 1 && this.endCluster - c < maxScan && (await this.get(c - 1)) === 0) c--;
    return c * this.clusterSize;
  }

  /** The block for bi, creating it (and growing the table) when missing. */
  private async ensureBlock(bi: number): Promise<Buffer> {
    const existing = await this.block(bi);
    if (existing) return existing;
    if (bi >= this.table.length) await this.growTable(bi + 1);
    const again = await this.block(bi);
    if (again) return again; // the table growth created it
    // The new block goes to the first cluster past everything in use; if that cluster is in
    // another block's range, that block is found (or made) the same way.
    const cluster = this.endCluster++;
    const off = cluster * this.clusterSize;
    const buf = Buffer.alloc(this.clusterSize);
    this.installBlock(bi, off, buf);
    if (Math.floor(cluster / this.entriesPerBlock) === bi) setRefcount(buf, cluster - bi * this.entriesPerBlock, this.order, 1);
    else await this.adjust(off, this.clusterSize, 1);
    return buf;
  }

  private installBlock(bi: number, off: number, buf: Buffer): void {
    this.table[bi] = off;
    this.blocks.pin(off);
    this.blocks.insert(off, buf);
    this.dirtyBlocks.add(off);
    this.dirtyTableClusters.add(Math.floor((bi * 8) / this.clusterSize));
  }

  /**
   * Moves the refcount table to a larger one at the end of the file, with new blocks for the
   * clusters the table itself and those blocks occupy. Durable on return: blocks, then table,
   * then header; the old table's clusters are released last.
   */
  private async growTable(minEntries: number): Promise<void> {
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const epb = this.entriesPerBlock;
    const oldTable = this.table;
    let entries = Math.ceil(Math.max(minEntries + 1, oldTable.length * 2) / perCluster) * perCluster;
    const start = Math.max(this.endCluster, 1);
    let newBlocks: number[] = [];
    for (;;) {
      const tableClusters = entries / perCluster;
      const regionEnd = start + tableClusters + newBlocks.length;
      const needed: number[] = [];
      for (let bi = Math.floor(start / epb); bi <= Math.floor((regionEnd - 1) / epb); bi++) {
        if (bi >= oldTable.length || oldTable[bi] === 0) needed.push(bi);
      }
      const maxBi = needed.length ? needed[needed.length - 1]! : 0;
      if (maxBi >= entries) {
        entries = Math.ceil((maxBi + 1) / perCluster) * perCluster;
        continue;
      }
      if (needed.length === newBlocks.length) {
        newBlocks = needed;
        break;
      }
      newBlocks = needed;
    }
    const tableClusters = entries / perCluster;
    if (tableClusters * cs > 64 * 1024 * 1024) throw new ImageError('the refcount table would exceed 64 MiB', this.o.file.path);
    // All dirty blocks reach the disk before anything points at the new table.
    await this.writeDirtyBlocks();
    const table = new Float64Array(entries);
    table.set(oldTable);
    this.table = table;
    newBlocks.forEach((bi, k) => {
      const off = (start + tableClusters + k) * cs;
      this.installBlock(bi, off, Buffer.alloc(cs));
    });
    const regionEnd = start + tableClusters + newBlocks.length;
    this.endCluster = Math.max(this.endCluster, regionEnd);
    await this.adjust(start * cs, (regionEnd - start) * cs, 1);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.tableOffset = start * cs;
    this.tableClusters = tableClusters;
    await this.writeDirtyBlocks();
    await this.o.file.flush();
    this.dirtyTableClusters.clear();
    await this.o.file.pwrite(this.encodeTable(0, tableClusters), this.tableOffset);
    await this.o.file.flush();
    await this.o.commitTableLocation(this.tableOffset, tableClusters);
    // Nothing refers to the old table any more.
    await this.adjust(oldOffset, oldClusters * cs, -1);
  }

  private encodeTable(firstCluster: number, clusters: number): Buffer {
    const perCluster = this.clusterSize / 8;
    const buf = Buffer.alloc(clusters * this.clusterSize);
    for (let k = 0; k < clusters * perCluster; k++) {
      const v = this.table[firstCluster * perCluster + k] ?? 0;
      buf.writeUInt32BE(Math.floor(v / TWO32), k * 8);
      buf.writeUInt32BE(v % TWO32, k * 8 + 4);
    }
    return buf;
  }

  /** Writes every dirty refcount block (no barrier). */
  async writeDirtyBlocks(): Promise<void> {
    if (this.dirtyBlocks.size === 0) return;
    const offs = [...this.dirtyBlocks].sort((a, b) => a - b);
    this.dirtyBlocks.clear();
    await Promise.all(
      offs.map(async (off) => {
        const buf = this.blocks.peek(off);
        if (!buf) throw new Error(`internal: dirty refcount block 0x${off.toString(16)} not cached`);
        await this.o.file.pwrite(buf, off);
      }),
    );
    for (const off of offs) if (!this.dirtyBlocks.has(off)) this.blocks.unpin(off);
  }

  /**
   * Makes every refcount change durable in the required order: blocks, barrier, then the table
   * clusters that point at new blocks, barrier. (Also a barrier for data written before it.)
   */
  async persist(): Promise<void> {
    await this.writeDirtyBlocks();
    if (this.tableDirty) {
      await this.o.file.flush();
      await this.writeTable();
    }
    await this.o.file.flush();
  }

  /** Writes the dirty clusters of the refcount table (call after the blocks are durable). */
  async writeTable(): Promise<void> {
    const clusters = [...this.dirtyTableClusters].sort((a, b) => a - b);
    this.dirtyTableClusters.clear();
    for (const k of clusters) await this.o.file.pwrite(this.encodeTable(k, 1), this.tableOffset + k * this.clusterSize);
  }

  /** Every refcount block's offset, for callers that must not touch them. */
  blockOffsets(): number[] {
    return [...this.table].filter((o) => o !== 0);
  }

}
