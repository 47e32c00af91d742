/**
 * Writes a fresh qcow2 file front to back, without the general allocating write path: guest
 * clusters are given in increasing order and appended (each L2 table just before the first
 * cluster it maps), then the refcount blocks, the refcount table and the L1 table are appended,
 * and the header is written last. Until that final header write (after a flush) the file is not
 * a valid image, so an interruption never leaves something that looks complete.
 *
 * Every host cluster from 0 to the end of the appended area is in use exactly once, except the
 * clusters holding compressed data, which are shared by as many compressed clusters as touch
 * them; so the refcounts are "1 everywhere" plus a small map of exceptions.
 */
import * as fs from 'node:fs';
import { describeSystemError, UsageError } from '../errors';
import { FdFile, outputKind } from '../io/file';
import { encodeCompressedDescriptor, OFLAG_COMPRESSED_HI, OFLAG_ZERO_LO, writeEntry } from './l2';
import { encodeHeaderCluster, l1EntriesFor, type Qcow2CreateOptions } from './create';
import { refcountEntriesPerBlock, refcountMax, setRefcount } from './refcount-decode';

/** Appended data is gathered into writes of about this size. */
const WRITE_BATCH_BYTES = 8 * 1024 * 1024;

export interface LayoutResult {
  /** File length in bytes. */
  fileSize: number;
  /** Host extents [offset, length) of clusters allocated by preallocate(), in file order. */
  preallocated: Array<[number, number]>;
}

export class Qcow2LayoutWriter {
  private readonly cs: number;
  private readonly entryBytes: number;
  private readonly l2Entries: number;
  private readonly l1Size: number;
  private readonly l1: Float64Array;
  /** Next free byte of the file. */
  private tail: number;
  private curL1Index = -1;
  private curL2: Buffer | null = null;
  private curL2Offset = 0;
  private lastGuestCluster = -1;
  /** Clusters referenced more than once (shared by compressed data), with their refcount. */
  private readonly shared = new Map<number, number>();
  private readonly maxRefcount: number;
  /**
   * Room left behind compressed data: [zNext, zEnd) inside the cluster where the last compressed
   * cluster ended, when other clusters were appended after it. Later compressed clusters that fit
   * go there (as QEMU keeps packing compressed data into its current cluster).
   */
  private zNext = 0;
  private zEnd = 0;
  private pendingStart = 0;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private readonly preallocated: Array<[number, number]> = [];
  private finished = false;

  private constructor(
    readonly file: FdFile,
    readonly opts: Qcow2CreateOptions,
  ) {
    this.cs = 2 ** opts.clusterBits;
    this.entryBytes = opts.extendedL2 ? 16 : 8;
    this.l2Entries = this.cs / this.entryBytes;
    this.l1Size = l1EntriesFor(opts.sizeBytes, opts.clusterBits, opts.extendedL2);
    this.l1 = new Float64Array(this.l1Size);
    this.tail = this.cs;
    this.maxRefcount = refcountMax(opts.refcountOrder);
  }

  /** Creates (or truncates) `path`. The caller validated `opts`. */
  static async create(path: string, opts: Qcow2CreateOptions): Promise<Qcow2LayoutWriter> {
    // Only a regular file (or a new one): abort() removes what it wrote.
    if (outputKind(path) === 'block-device') throw new UsageError(`${path}: is a block device; a qcow2 image is written to a regular file (raw output can go to a device)`);
    let file: FdFile;
    try {
      file = await FdFile.create(path, false);
    } catch (err) {
      throw new UsageError(describeSystemError(err, path));
    }
    return new Qcow2LayoutWriter(file, opts);
  }

  get clusterSize(): number {
    return this.cs;
  }

  /** Guest clusters in the image. */
  get guestClusters(): number {
    return Math.ceil(this.opts.sizeBytes / this.cs);
  }

  private async flushPending(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const buf = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.pendingBytes);
    await this.file.pwrite(buf, this.pendingStart);
    this.pending = [];
    this.pendingBytes = 0;
  }

  /** Queues bytes at the current tail; the buffer must not be modified afterwards. */
  private async append(buf: Buffer): Promise<void> {
    if (this.pendingBytes > 0 && this.pendingStart + this.pendingBytes !== this.tail) await this.flushPending();
    if (this.pendingBytes === 0) this.pendingStart = this.tail;
    this.pending.push(buf);
    this.pendingBytes += buf.length;
    this.tail += buf.length;
    if (this.pendingBytes >= WRITE_BATCH_BYTES) await this.flushPending();
  }

  private alignTail(): void {
    this.tail = Math.ceil(this.tail / this.cs) * this.cs;
  }

  private async writeCurrentL2(): Promise<void> {
    if (this.curL2 === null) return;
    await this.file.pwrite(this.curL2, this.curL2Offset);
    this.curL2 = null;
  }

  /** The L2 table and entry position for a guest cluster, reserving the table on first use. */
  private async entryFor(guestCluster: number): Promise<{ table: Buffer; at: number }> {
    if (!Number.isInteger(guestCluster) || guestCluster <= this.lastGuestCluster || guestCluster >= this.guestClusters) {
      throw new Error(`internal: guest cluster ${guestCluster} out of order (after ${this.lastGuestCluster}, of ${this.guestClusters})`);
    }
    this.lastGuestCluster = guestCluster;
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    if (l1Index !== this.curL1Index) {
      await this.writeCurrentL2();
      this.alignTail();
      this.curL1Index = l1Index;
      this.curL2 = Buffer.alloc(this.cs);
      this.curL2Offset = this.tail;
      this.l1[l1Index] = this.tail;
      this.tail += this.cs;
    }
    return { table: this.curL2!, at: (guestCluster % this.l2Entries) * this.entryBytes };
  }

  /** Maps a guest cluster to a new host cluster holding `data` (at most one cluster; zero-padded). */
  async data(guestCluster: number, data: Buffer): Promise<void> {
    const { table, at } = await this.entryFor(guestCluster);
    this.alignTail();
    writeEntry(table, at, this.tail, true);
    if (this.opts.extendedL2) table.writeUInt32BE(0xffffffff, at + 12);
    if (data.length > this.cs) throw new Error('internal: data larger than a cluster');
    await this.append(data.length === this.cs ? data : Buffer.concat([data, Buffer.alloc(this.cs - data.length)]));
  }

  /**
   * Maps a guest cluster to a new host cluster without writing it (preallocation). With extended
   * L2 its subclusters stay unallocated, as qemu-img leaves them: reads still come from the
   * backing file, or are zeros without one.
   */
  async preallocate(guestCluster: number): Promise<void> {
    const { table, at } = await this.entryFor(guestCluster);
    this.alignTail();
    writeEntry(table, at, this.tail, true);
    const last = this.preallocated[this.preallocated.length - 1];
    if (last && last[0] + last[1] === this.tail) last[1] += this.cs;
    else this.preallocated.push([this.tail, this.cs]);
    this.tail += this.cs;
  }

  /**
   * Maps every guest cluster at once: all L2 tables first, then one contiguous data area (what
   * qemu-img does for falloc and full preallocation, so the data can be reserved in one piece).
   * Must be the first mapping call. Subclusters stay unallocated, as in preallocate().
   */
  async preallocateAll(): Promise<void> {
    if (this.lastGuestCluster !== -1) throw new Error('internal: preallocateAll after other mappings');
    const n = this.guestClusters;
    const tables = Math.ceil(n / this.l2Entries);
    this.alignTail();
    const l2Start = this.tail;
    const dataStart = l2Start + tables * this.cs;
    for (let i = 0; i < tables; i++) {
      const table = Buffer.alloc(this.cs);
      const first = i * this.l2Entries;
      const end = Math.min(first + this.l2Entries, n);
      for (let g = first; g < end; g++) {
        const at = (g - first) * this.entryBytes;
        writeEntry(table, at, dataStart + g * this.cs, true);
      }
      this.l1[i] = l2Start + i * this.cs;
      this.tail = l2Start + i * this.cs;
      await this.append(table);
    }
    this.tail = dataStart + n * this.cs;
    this.preallocated.push([dataStart, n * this.cs]);
    this.lastGuestCluster = n - 1;
  }

  /** Marks a guest cluster as reading zeros (version 3); on version 2 it stays unallocated. */
  async zero(guestCluster: number): Promise<void> {
    if (this.opts.version === 2) {
      if (guestCluster <= this.lastGuestCluster) throw new Error('internal: guest cluster out of order');
      this.lastGuestCluster = guestCluster;
      return;
    }
    const { table, at } = await this.entryFor(guestCluster);
    if (this.opts.extendedL2) table.writeUInt32BE(0xffffffff, at + 8);
    else table.writeUInt32BE(OFLAG_ZERO_LO, at + 4);
  }

  /**
   * Stores an already compressed cluster, packed right after the previous compressed data: at
   * the tail, or in the room left in the cluster where the previous one ended when other
   * clusters (data, L2 tables) were appended since and it fits there.
   */
  async compressed(guestCluster: number, bytes: Buffer): Promise<void> {
    const { table, at } = await this.entryFor(guestCluster);
    const cs = this.cs;
    // A cluster can be shared by as many compressed clusters as its refcount width allows.
    const room = (offset: number): boolean => offset % cs === 0 || (this.shared.get(Math.floor(offset / cs)) ?? 1) < this.maxRefcount;
    let start: number;
    // The room is behind the tail once something else was appended after the compressed data.
    const inGap = this.zEnd <= this.tail && this.zNext + bytes.length <= this.zEnd && room(this.zNext);
    if (inGap) {
      start = this.zNext;
    } else {
      if (this.tail % cs !== 0 && !room(this.tail)) this.alignTail();
      start = this.tail;
    }
    // Starting inside a cluster means an earlier compressed cluster already uses it.
    if (start % cs !== 0) {
      const c = Math.floor(start / cs);
      this.shared.set(c, (this.shared.get(c) ?? 1) + 1);
    }
    const [hi, lo] = encodeCompressedDescriptor(start, bytes.length, this.opts.clusterBits);
    table.writeUInt32BE((hi | OFLAG_COMPRESSED_HI) >>> 0, at);
    table.writeUInt32BE(lo, at + 4);
    if (inGap) {
      await this.file.pwrite(bytes, start);
      this.zNext = start + bytes.length;
    } else {
      await this.append(bytes);
      this.zNext = this.tail;
      this.zEnd = Math.ceil(this.tail / cs) * cs;
    }
  }

  /** Writes the refcount structures, the L1 table and finally the header; closes the file. */
  async finish(): Promise<LayoutResult> {
    if (this.finished) throw new Error('internal: finish() called twice');
    this.finished = true;
    await this.writeCurrentL2();
    await this.flushPending();
    const cs = this.cs;
    const used = Math.ceil(this.tail / cs);
    const l1Clusters = Math.max(1, Math.ceil((this.l1Size * 8) / cs));
    const perBlock = refcountEntriesPerBlock(this.opts.clusterBits, this.opts.refcountOrder);
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const total = used + blocks + tableClusters + l1Clusters;
      const b = Math.ceil(total / perBlock);
      const t = Math.ceil((b * 8) / cs);
      if (b === blocks && t === tableClusters) break;
      blocks = b;
      tableClusters = t;
    }
    const total = used + blocks + tableClusters + l1Clusters;
    const refblockStart = used * cs;
    const reftableOffset = (used + blocks) * cs;
    const l1Offset = (used + blocks + tableClusters) * cs;
    const reftable = Buffer.alloc(tableClusters * cs);
    // Refcount blocks are written in batches: every in-use cluster has refcount 1 but the shared ones.
    const batch: Buffer[] = [];
    let batchStart = refblockStart;
    for (let k = 0; k < blocks; k++) {
      const block = Buffer.alloc(cs);
      const first = k * perBlock;
      const end = Math.min(first + perBlock, total);
      for (let c = first; c < end; c++) setRefcount(block, c - first, this.opts.refcountOrder, this.shared.get(c) ?? 1);
      reftable.writeBigUInt64BE(BigInt(refblockStart + k * cs), k * 8);
      batch.push(block);
      if (batch.length * cs >= WRITE_BATCH_BYTES || k === blocks - 1) {
        await this.file.pwrite(Buffer.concat(batch), batchStart);
        batchStart += batch.length * cs;
        batch.length = 0;
      }
    }
    await this.file.pwrite(reftable, reftableOffset);
    const l1 = Buffer.alloc(this.l1Size * 8);
    for (let i = 0; i < this.l1Size; i++) if (this.l1[i]) writeEntry(l1, i * 8, this.l1[i]!, true);
    await this.file.pwrite(l1, l1Offset);
    await this.file.flush();
    const header = encodeHeaderCluster(this.opts, {
      l1TableOffset: l1Offset,
      l1Size: this.l1Size,
      refcountTableOffset: reftableOffset,
      refcountTableClusters: tableClusters,
    });
    await this.file.pwrite(header, 0);
    await this.file.flush();
    const fileSize = await this.file.size();
    await this.file.close();
    return { fileSize, preallocated: this.preallocated };
  }

  /** Gives up: closes and removes the partial file. */
  async abort(): Promise<void> {
    this.finished = true;
    await this.file.close().catch(() => undefined);
    await fs.promises.rm(this.file.path, { force: true }).catch(() => undefined);
  }
}
