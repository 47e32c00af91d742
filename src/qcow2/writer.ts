/**
 * The write path (QEMU's qcow2_co_pwritev_part, qcow2-cluster.c allocation and COW).
 *
 * A write is cut into runs of clusters inside one L2 table. For each run:
 *   A. under the metadata lock: classify every cluster (write in place, or copy-on-write into a
 *      newly allocated cluster), make the L2 table writable (allocate it, or copy it when a
 *      snapshot shares it), allocate the new clusters contiguously, mark the guest clusters
 *      in flight so a concurrent write to the same cluster waits instead of double-allocating;
 *   B. without the lock: read what the partial clusters keep (backing file, old cluster,
 *      decompressed cluster, zeros) and write data + fill with one pwritev per host-contiguous
 *      stretch;
 *   C. under the lock: point the L2 entries at the new clusters and queue the old clusters'
 *      refcount decrements, which are applied only once the new L2 entries are on disk.
 *
 * Metadata is written back by flushLocked() in dependency order: refcount blocks (and the data
 * already written) -> barrier -> refcount table -> barrier -> L2 tables -> barrier -> L1 ->
 * barrier -> deferred decrements. A crash anywhere leaves at most leaked clusters.
 */
import { CorruptionError, ImageError, UsageError } from '../errors';
import { log } from '../log';
import type { Qcow2Image } from './image';
import { AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY } from './header';
import { compressedDescriptor, entryOffset, OFLAG_COMPRESSED_HI, OFLAG_COPIED_HI, OFLAG_ZERO_LO, writeEntry } from './l2';
import { AsyncMutex } from './mutex';
import { loadImageRefcounts, type RefcountManager } from './refcount';

/** Largest write the in-place fast path takes (a synchronous page-cache copy, see io/file.ts). */
const FAST_PATH_MAX_BYTES = 256 * 1024;
const RESOLVED: Promise<void> = Promise.resolve();

/** Longest run handled in one pass, in clusters (bounds fill buffers and lock hold times). */
const MAX_RUN_CLUSTERS = 1024;
const MAX_RUN_BYTES = 16 * 1024 * 1024;
/** Write back dirty metadata once this much is pinned in the caches. */
const DIRTY_BUDGET_BYTES = 16 * 1024 * 1024;
/** Write back dirty metadata this long after it was first dirtied (bounds what a crash loses). */
const WRITEBACK_DELAY_MS = 5000;

type FillSource =
  | { kind: 'zero' }
  | { kind: 'backing' }
  | { kind: 'host'; hostOffset: number } // old cluster's host offset (same in-cluster offset)
  | { kind: 'buffer'; buf: Buffer }; // a decompressed cluster

interface FillPiece {
  from: number; // in-cluster byte offsets
  to: number;
  src: FillSource;
}

/** What one guest cluster of a run needs. */
interface ClusterJob {
  guestCluster: number;
  l2Index: number;
  /** This write's bytes inside the cluster. */
  dataStart: number;
  dataEnd: number;
  /** Host cluster written to (existing or newly allocated). */
  target: number;
  isNew: boolean;
  /** The in-cluster range written to the host (data plus fills). */
  writeStart: number;
  writeEnd: number;
  fills: FillPiece[];
  /** The L2 entry must change (new cluster, COPIED/zero flag, subcluster bits). */
  updateEntry: boolean;
  /** Extended L2: subcluster bitmaps after the write (zero bits high word, alloc bits low word). */
  zeroBits: number;
  allocBits: number;
  /** Host ranges whose refcount drops once the new entry is durable. */
  frees: { offset: number; bytes: number }[];
}

interface EntryState {
  hi: number;
  lo: number;
  compressed: boolean;
  host: number;
  copied: boolean;
  zeroFlag: boolean;
  zeroBits: number;
  allocBits: number;
}

export class Qcow2Writer {
  readonly lock = new AsyncMutex();
  private refcounts: RefcountManager | null = null;
  private prepared = false;
  private setDirtyBit = false;
  private readonly inflight = new Map<number, Promise<void>>();
  private readonly dirtyL2 = new Set<number>();
  private readonly dirtyL1 = new Set<number>();
  private pendingFrees: { offset: number; bytes: number }[] = [];
  /** During a resize that zeroes the new area: whole clusters below this get the zero flag even where no backing file shows through. */
  private zeroFlagsBelow = 0;
  /**
   * Data writes completed so far, and how many of them the last flush covered. A flush makes
   * durable what had completed when it started; a write that completes while it runs (the fast
   * path takes no lock) stays unflushed until the next one.
   */
  private writesDone = 0;
  private writesFlushed = 0;
  /**
   * New clusters past the end of the file were written without their zero fill (they read as
   * zeros already): the file may end before its last allocated cluster, and flushLocked() must
   * extend it before any entry pointing there becomes durable.
   */
  private fileMayBeShort = false;
  private writebackTimer: NodeJS.Timeout | null = null;
  private failed: Error | null = null;
  /**
   * Guest clusters [planFirst, planLast] of the planRun/zeroRun under way (they run under the
   * lock, one at a time; -1: none): none of them is "allocatable" by the mapping observer (see
   * freshRun), so it cannot allocate a cluster the engine is deciding about.
   */
  private planFirst = -1;
  private planLast = -1;
  /**
   * An entry changed since the last flush that needs the data it points at durable before it
   * (a cluster written by the engine: reused, copied or filled), or an entry was removed: the
   * flush orders data, refcounts and tables with barriers between. False when only the mapping
   * observer's allocations were adopted (see flushLocked).
   */
  private orderedData = false;
  /** Reserved clusters were given back: at close, the file loses what lies past the clusters in use. */
  private trimOnClose = false;
  /** Pairs [guest cluster, host offset] taken from the mapping observer (see adoptAllocations). */
  private adoptBuf: Float64Array | null = null;
  /** In-place fast-path writes still running (they take no lock): frees wait for them. */
  private fastWritesRunning = 0;
  private fastWritesDrained: (() => void) | null = null;
  private readonly cs: number;
  private readonly bytesPerL2: number;

  constructor(private readonly img: Qcow2Image) {
    this.cs = img.geometry.clusterSize;
    this.bytesPerL2 = this.cs * img.geometry.l2Entries;
  }

  // ---------------------------------------------------------------- setup

  /** First write: load refcounts, set the dirty bit (lazy refcounts), clear bitmaps' autoclear bit. */
  private async prepare(): Promise<RefcountManager> {
    if (this.refcounts && this.prepared) return this.refcounts;
    const img = this.img;
    const h = img.header;
    this.refcounts ??= await this.loadRefcounts();
    if (h.version === 3 && h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS && !(h.incompatibleFeatures & INCOMPAT_DIRTY)) {
      h.incompatibleFeatures |= INCOMPAT_DIRTY;
      await this.writeHeaderU64(72, h.incompatibleFeatures);
      this.setDirtyBit = true;
    }
    if (h.version === 3 && h.autoclearFeatures & AUTOCLEAR_BITMAPS) {
      // We do not update persistent bitmaps: tell readers they are stale (spec: autoclear bits).
      h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
      await this.writeHeaderU64(88, h.autoclearFeatures);
      log.info({ image: img.file.path }, 'persistent bitmaps marked inconsistent (not maintained by qcow2fs)');
    }
    this.prepared = true;
    return this.refcounts;
  }

  async loadRefcounts(): Promise<RefcountManager> {
    if (this.refcounts) return this.refcounts;
    const img = this.img;
    const h = img.header;
    this.refcounts = await loadImageRefcounts(img.file, h, {
      fileSize: img.fileSize,
      cacheBytes: 4 * 1024 * 1024,
      regions: img.metadataRegions(),
      onTableMoved: (offset, clusters) => {
        h.refcountTableOffset = offset;
        h.refcountTableClusters = clusters;
        img.setRegion('refcount table', offset, clusters * this.cs);
      },
    });
    return this.refcounts;
  }

  private async writeHeaderU64(at: number, v: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v);
    await this.img.file.pwrite(b, at);
    await this.img.file.flush();
  }

  private check(): void {
    if (this.failed) throw new ImageError(`writes disabled after an earlier failure: ${this.failed.message}`, this.img.file.path);
  }

  // ---------------------------------------------------------------- entries

  private entryAt(table: Buffer | null, idx: number): EntryState {
    const ext = this.img.geometry.extendedL2;
    if (table === null) return { hi: 0, lo: 0, compressed: false, host: 0, copied: false, zeroFlag: false, zeroBits: 0, allocBits: 0 };
    const at = idx * this.img.geometry.l2EntryBytes;
    const hi = table.readUInt32BE(at);
    const lo = table.readUInt32BE(at + 4);
    const compressed = (hi & OFLAG_COMPRESSED_HI) !== 0;
    const host = compressed ? 0 : entryOffset(hi, lo);
    if (!compressed && host !== 0) {
      const what = this.img.overlappingRegion(host, this.cs);
      if (host % this.cs !== 0 || what !== null) {
        throw new CorruptionError(`${this.img.file.path}: corrupt L2 entry ${idx}: data cluster offset 0x${host.toString(16)} ${what ? `points into the ${what}` : 'is not aligned'}`);
      }
    }
    return {
      hi,
      lo,
      compressed,
      host,
      copied: (hi & OFLAG_COPIED_HI) !== 0,
      zeroFlag: !ext && (lo & OFLAG_ZERO_LO) !== 0,
      zeroBits: ext ? table.readUInt32BE(at + 8) : 0,
      allocBits: ext ? table.readUInt32BE(at + 12) : 0,
    };
  }

  private setEntry(table: Buffer, idx: number, host: number, zeroBits: number, allocBits: number): void {
    const at = idx * this.img.geometry.l2EntryBytes;
    writeEntry(table, at, host, true);
    if (this.img.geometry.extendedL2) {
      table.writeUInt32BE(zeroBits >>> 0, at + 8);
      table.writeUInt32BE(allocBits >>> 0, at + 12);
    }
  }

  /** The L2 table of l1Index, allocated or copied so that this layer alone owns it. */
  private async writableL2(l1Index: number): Promise<Buffer> {
    const img = this.img;
    const l1 = img.l1;
    const rc = this.refcounts!;
    const old = l1.l2Offsets[l1Index]!;
    if (old !== 0 && l1.copied[l1Index]) return (await img.l2Table(l1Index))!;
    if (old !== 0 && (await rc.get(old / this.cs)) === 1) {
      // COPIED was missing but nobody else uses the table: just claim it.
      l1.copied[l1Index] = 1;
      this.dirtyL1.add(l1Index);
      return (await img.l2Table(l1Index))!;
    }
    const fresh = await rc.allocate(1);
    const table = Buffer.alloc(this.cs);
    if (old !== 0) {
      (await img.l2Table(l1Index))!.copy(table);
      this.pendingFrees.push({ offset: old, bytes: this.cs });
    }
    img.l2Cache.pin(fresh);
    img.l2Cache.insert(fresh, table);
    this.dirtyL2.add(fresh);
    l1.l2Offsets[l1Index] = fresh;
    l1.copied[l1Index] = 1;
    this.dirtyL1.add(l1Index);
    return table;
  }

  // ---------------------------------------------------------------- zeroing

  /**
   * Makes guest bytes [offset, +length) read as zeros (discard; fallocate PUNCH_HOLE and
   * ZERO_RANGE). Whole clusters give up their host cluster: the entry becomes unallocated where
   * no backing file shows through, else "zero" (the zero flag, or every zero bit of an extended
   * entry; version 3), and a version 2 image, which has no zero clusters, gets zeros written
   * where a backing file shows through. Partial clusters get zeros written. The old host
   * clusters are freed at the next flush, once the new entries are durable (as for
   * copy-on-write), so a crash leaves at worst a leak.
   */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check();
    if (length <= 0) return;
    const cs = this.cs;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    // The last cluster counts as whole when the range runs to the end of the disk.
    const b = end >= this.img.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    if (a >= b) return this.writeZeroBytes(offset, length);
    if (offset < a) await this.writeZeroBytes(offset, a - offset);
    if (b < end) await this.writeZeroBytes(b, end - b);
    let pos = a;
    while (pos < b) {
      const step = await this.lock.run(async () => {
        await this.prepare();
        // zeroRun stays inside one L2 table.
        const span = Math.min(b - pos, this.bytesPerL2 - (pos % this.bytesPerL2));
        try {
          await this.claimLocked(pos / this.cs, Math.ceil((pos + span) / this.cs) - 1);
          return await this.zeroRun(pos, b - pos);
        } finally {
          this.planFirst = this.planLast = -1;
        }
      });
      if ('wait' in step) {
        await step.wait;
      } else if ('writeBytes' in step) {
        await this.writeZeroBytes(pos, Math.min(step.writeBytes, this.img.size - pos));
        pos += step.writeBytes;
      } else {
        pos += step.length;
      }
    }
  }

  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    // Bytes that read as zeros already (nothing allocated there, no backing data showing
    // through) need nothing: no write, no cluster allocated for them (as QEMU does). Only the
    // extents with data get zeros written (a version 2 overlay grown over a sparse backing file
    // writes zeros where the backing file has data, not over all of it).
    let chunk: Buffer | null = null;
    for (const e of await this.img.status(offset, length)) {
      if (e.kind === 'zero' || e.kind === 'hole') continue;
      chunk ??= Buffer.alloc(Math.min(length, MAX_RUN_BYTES));
      const end = e.offset + e.length;
      for (let pos = e.offset; pos < end; pos += chunk.length) {
        const n = Math.min(chunk.length, end - pos);
        await this.write(chunk.subarray(0, n), pos);
      }
    }
  }

  /** Zeroes whole clusters from guestOffset within one L2 table (lock held). */
  private async zeroRun(guestOffset: number, maxLength: number): Promise<{ length: number } | { wait: Promise<void> } | { writeBytes: number }> {
    const img = this.img;
    const g = img.geometry;
    const cs = this.cs;
    const l1Index = Math.floor(guestOffset / this.bytesPerL2);
    if (l1Index >= img.l1.l2Offsets.length) throw new CorruptionError(`${img.file.path}: guest offset ${guestOffset} lies beyond the L1 table`);
    const end = Math.min(guestOffset + maxLength, (l1Index + 1) * this.bytesPerL2);
    const length = end - guestOffset;
    const backingEnd = img.backing === null ? 0 : Math.ceil(img.backing.size / cs) * cs;
    if (!g.zeroFlagAllowed && guestOffset < backingEnd) {
      // Version 2 over a backing file: only written zeros hide it.
      return { writeBytes: Math.min(length, backingEnd - guestOffset) };
    }
    const firstCluster = guestOffset / cs;
    const lastCluster = end / cs - 1;
    for (let gc = firstCluster; gc <= lastCluster; gc++) {
      const w = this.inflight.get(gc);
      if (w) return { wait: w };
    }
    let table = await img.l2Table(l1Index);
    const changes: { l2Index: number; zero: boolean }[] = [];
    const frees: { offset: number; bytes: number }[] = [];
    for (let gc = firstCluster; gc <= lastCluster; gc++) {
      const l2Index = gc - l1Index * g.l2Entries;
      const e = this.entryAt(table, l2Index);
      const showsBacking = gc * cs < backingEnd || (g.zeroFlagAllowed && gc * cs < this.zeroFlagsBelow);
      if (!e.compressed && e.host === 0) {
        // Already zeros? Unallocated without backing data, or zero flag / all zero bits.
        const allZeroBits = g.extendedL2 && e.zeroBits === 0xffffffff;
        const unallocated = g.extendedL2 ? e.zeroBits === 0 : !e.zeroFlag;
        if ((unallocated && !showsBacking) || e.zeroFlag || allZeroBits) continue;
      }
      changes.push({ l2Index, zero: showsBacking });
      if (e.compressed) {
        const d = compressedDescriptor(e.hi, e.lo, g.clusterBits);
        frees.push({ offset: d.hostOffset, bytes: d.compressedBytes });
      } else if (e.host !== 0) {
        frees.push({ offset: e.host, bytes: cs });
      }
    }
    if (changes.length === 0) return { length };
    table = await this.writableL2(l1Index);
    const obs = img.mappingObserver;
    if (obs) {
      obs.changed(guestOffset, length);
      if (frees.length > 0) obs.freeing();
    }
    for (const c of changes) {
      const at = c.l2Index * g.l2EntryBytes;
      if (g.extendedL2) {
        writeEntry(table, at, 0, false);
        table.writeUInt32BE(c.zero ? 0xffffffff : 0, at + 8);
        table.writeUInt32BE(0, at + 12);
      } else {
        writeEntry(table, at, 0, false, c.zero ? OFLAG_ZERO_LO : 0);
      }
    }
    this.pendingFrees.push(...frees);
    this.orderedData = true;
    await this.tableChanged(l1Index, table);
    return { length };
  }

  // ---------------------------------------------------------------- write

  write(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return RESOLVED;
    try {
      this.check();
    } catch (err) {
      return Promise.reject(err);
    }
    const fast = this.prepared ? this.tryWriteInPlace(buf, offset) : null;
    return fast ?? this.writeSlow(buf, offset);
  }

  /**
   * The cached, COPIED L2 table of [offset, +len) when every cluster of it qualifies for the
   * in-place path (see tryWriteInPlace), and whether their host clusters are contiguous; else null.
   */
  private inPlaceTable(offset: number, len: number): { table: Buffer; l1Index: number; contiguous: boolean } | null {
    const img = this.img;
    const g = img.geometry;
    const cs = this.cs;
    const l1Index = Math.floor(offset / this.bytesPerL2);
    if ((l1Index + 1) * this.bytesPerL2 < offset + len) return null; // crosses an L2 table
    const l1 = img.l1;
    if (l1Index >= l1.l2Offsets.length || l1.copied[l1Index] !== 1) return null;
    const l2Offset = l1.l2Offsets[l1Index]!;
    if (l2Offset === 0) return null;
    const table = img.l2Cache.peek(l2Offset);
    if (table === undefined) return null;
    const ext = g.extendedL2;
    const entryBytes = g.l2EntryBytes;
    const fileSize = img.fileSize;
    const firstCluster = Math.floor(offset / cs);
    const lastCluster = Math.floor((offset + len - 1) / cs);
    const checkInflight = this.inflight.size > 0;
    // Every cluster must qualify (nothing is written unless all do).
    let runHost = -1;
    let contiguous = true;
    for (let gc = firstCluster; gc <= lastCluster; gc++) {
      if (checkInflight && this.inflight.has(gc)) return null;
      const at = (gc - l1Index * g.l2Entries) * entryBytes;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      if ((hi & OFLAG_COPIED_HI) === 0 || (hi & OFLAG_COMPRESSED_HI) !== 0) return null;
      const host = entryOffset(hi, lo);
      if (host === 0 || host % cs !== 0 || host >= fileSize || img.overlappingRegion(host, cs) !== null) return null;
      if (ext) {
        const gs = g.subclusterSize;
        const cStart = gc * cs;
        const ds = Math.max(offset, cStart) - cStart;
        const de = Math.min(offset + len, cStart + cs) - cStart;
        let touched = 0;
        for (let sc = Math.floor(ds / gs); sc <= Math.floor((de - 1) / gs); sc++) touched |= 1 << sc;
        touched >>>= 0;
        const zeroBits = table.readUInt32BE(at + 8);
        const allocBits = table.readUInt32BE(at + 12);
        if ((allocBits & touched) >>> 0 !== touched || (zeroBits & touched) !== 0) return null;
      } else if ((lo & OFLAG_ZERO_LO) !== 0) {
        return null;
      }
      if (runHost >= 0 && host !== runHost + cs) contiguous = false;
      runHost = host;
    }
    return { table, l1Index, contiguous };
  }

  /**
   * True when writes to [offset, +len) may go straight to the clusters' host bytes now, as the
   * in-place path writes them (the FUSE layer's direct path caches this; mapping changes are
   * reported to the image's MappingObserver, and a failed writer invalidates everything).
   */
  canWriteInPlace(offset: number, len: number): boolean {
    return this.prepared && this.failed === null && len > 0 && this.inPlaceTable(offset, len) !== null;
  }

  /**
   * Whether the clusters from `offset` may be allocated by the mapping observer itself (PlainRun
   * 'zero', allocatable): no host cluster (unallocated, or zero without a preallocated cluster),
   * the L2 table cached or absent, no write of the engine deciding about them; and for how many
   * bytes of [offset, +len) that answer holds (at least to the end of the first cluster).
   * `entriesFree`: the caller's lookup found these entries unallocated (standard layout: no host,
   * no flags), so they need not be read again.
   */
  freshRun(offset: number, len: number, entriesFree = false): { allocatable: boolean; length: number } {
    if (!this.prepared || this.failed !== null || len <= 0) return { allocatable: false, length: len };
    const img = this.img;
    const g = img.geometry;
    const cs = this.cs;
    const l1 = img.l1;
    const firstCluster = Math.floor(offset / cs);
    const lastCluster = Math.floor((offset + len - 1) / cs);
    const checkInflight = this.inflight.size > 0;
    let tableIndex = -1;
    let table: Buffer | null | undefined = null;
    let first: boolean | null = null;
    let gc = firstCluster;
    for (; gc <= lastCluster; gc++) {
      let ok = !(checkInflight && this.inflight.has(gc)) && !(gc >= this.planFirst && gc <= this.planLast);
      const l1Index = Math.floor(gc / g.l2Entries);
      if (l1Index !== tableIndex) {
        tableIndex = l1Index;
        const l2Offset = l1Index < l1.l2Offsets.length ? l1.l2Offsets[l1Index]! : -1;
        table = l2Offset < 0 ? undefined : l2Offset === 0 ? null : img.l2Cache.peek(l2Offset);
      }
      if (table === undefined) {
        ok = false;
      } else if (ok && table !== null && !entriesFree) {
        const at = (gc - l1Index * g.l2Entries) * g.l2EntryBytes;
        const hi = table.readUInt32BE(at);
        ok = (hi & OFLAG_COMPRESSED_HI) === 0 && entryOffset(hi, table.readUInt32BE(at + 4)) === 0 && !(g.extendedL2 && table.readUInt32BE(at + 12) !== 0);
      }
      if (first === null) first = ok;
      else if (ok !== first) break;
    }
    return { allocatable: first === true, length: Math.min(len, gc * cs - offset) };
  }

  /** Fresh clusters for the mapping observer (BlockDevice.reserveFresh): their host offset. */
  reserveFresh(clusters: number): Promise<number> {
    return this.lock.run(async () => {
      this.check();
      const rc = await this.prepare();
      const host = await rc.allocateFresh(clusters);
      this.img.noteFileEnd(rc.endBytes);
      // Their refcounts and the file's length durable now, before any entry can point at them:
      // then flushes that only adopt them need no barrier before the tables (flushLocked).
      const file = this.img.file;
      if ((await file.size()) < rc.endBytes) await file.truncate(rc.endBytes);
      await rc.persist();
      return host;
    });
  }

  /** Reserved clusters that were not used: no entry refers to them, so they are free at once. */
  releaseFresh(hostOffset: number, bytes: number): Promise<void> {
    return this.lock.run(async () => {
      if (this.failed || !this.refcounts) return;
      await this.refcounts.releaseFresh(hostOffset, bytes);
      this.trimOnClose = true;
    });
  }

  /** Takes the mapping observer's own allocations into the metadata (BlockDevice.settleAllocations). */
  settleAllocations(): Promise<void> {
    const obs = this.img.mappingObserver;
    if (!obs?.takeAllocations || this.failed) return RESOLVED;
    return this.lock.run(() => this.settleLocked(0, 0));
  }

  /**
   * Lock held, before planRun/zeroRun decides about guest clusters [first, last]: the mapping
   * observer allocates none of them from now on (planFirst/planLast until the caller resets them;
   * then inflight says so), and what it allocated comes into the metadata first.
   */
  private async claimLocked(first: number, last: number): Promise<void> {
    this.planFirst = first;
    this.planLast = last;
    await this.settleLocked(first * this.cs, (last - first + 1) * this.cs);
  }

  /**
   * Lock held: forgets cached mappings of [offset, +length) (so the observer allocates none of
   * them from now on), then takes every allocation it did into the metadata.
   */
  private async settleLocked(offset: number, length: number): Promise<void> {
    const obs = this.img.mappingObserver;
    if (!obs?.takeAllocations) return;
    if (length > 0) obs.changed(offset, length);
    this.adoptBuf ??= new Float64Array(2048);
    for (;;) {
      const n = obs.takeAllocations(this.adoptBuf);
      if (n === 0) return;
      try {
        await this.adoptAllocations(this.adoptBuf, n);
      } catch (err) {
        // Written data the metadata does not point at: nothing may claim success any more
        // (flushes fail from now on, and nothing bypasses the engine).
        this.failed = err as Error;
        obs.changed(0, this.img.size);
        throw err;
      }
      obs.adopted?.(n);
    }
  }

  /**
   * Entries for clusters the observer allocated and wrote: each was unallocated (or zero without
   * a host cluster) and read as zeros, and its new host cluster is a fresh one of reserveFresh
   * (refcount taken, zeros around what was written), so it becomes a plain allocated entry.
   */
  private async adoptAllocations(pairs: Float64Array, n: number): Promise<void> {
    const g = this.img.geometry;
    const cs = this.cs;
    let l1Index = -1;
    let table: Buffer | null = null;
    for (let i = 0; i < n; i++) {
      const gc = pairs[2 * i]!;
      const host = pairs[2 * i + 1]!;
      const li = Math.floor(gc / g.l2Entries);
      if (li !== l1Index) {
        if (table !== null) await this.tableChanged(l1Index, table);
        l1Index = li;
        table = await this.writableL2(li);
      }
      const l2Index = gc - li * g.l2Entries;
      const e = this.entryAt(table, l2Index);
      if (e.compressed || e.host !== 0 || e.allocBits !== 0) {
        // Cannot happen (such clusters are never allocatable); keep the entry, free the cluster.
        log.error({ guestOffset: gc * cs, host }, 'internal: a natively allocated cluster already has an entry; its data is dropped');
        this.pendingFrees.push({ offset: host, bytes: cs });
        continue;
      }
      this.setEntry(table!, l2Index, host, 0, g.extendedL2 ? 0xffffffff : 0);
    }
    if (table !== null) await this.tableChanged(l1Index, table);
  }

  /** Data was written in place by someone else (the FUSE layer's direct path): the next flush syncs it. */
  noteExternalWrites(): void {
    this.writesDone++;
  }

  /**
   * The fast path: a write that lies wholly inside clusters this layer already owns (COPIED set,
   * no zero flag, every touched subcluster allocated), whose L2 table is cached and COPIED too.
   * Such a write changes no metadata, so it needs no lock, no plan and no commit: the slow path
   * would classify every cluster as "in place, entry unchanged" and do exactly these pwrites.
   * It is decided synchronously from the cached table (JS runs one thing at a time, and every
   * metadata change is made synchronously under the lock, so the table is never half-updated).
   * A cluster in flight (being allocated or having its entry changed by a slow-path write) is
   * left to the slow path, which waits for it. Returns null when the write does not qualify.
   */
  private tryWriteInPlace(buf: Uint8Array, offset: number): Promise<void> | null {
    const len = buf.length;
    if (len > FAST_PATH_MAX_BYTES) return null;
    const q = this.inPlaceTable(offset, len);
    if (q === null) return null;
    const { table, l1Index, contiguous } = q;
    const img = this.img;
    const g = img.geometry;
    const cs = this.cs;
    const entryBytes = g.l2EntryBytes;
    const firstCluster = Math.floor(offset / cs);
    const lastCluster = Math.floor((offset + len - 1) / cs);
    // Second pass: the pwrites, one per host-contiguous stretch.
    const file = img.file;
    this.fastWritesRunning++;
    const done = (): void => {
      this.writesDone++;
      this.fastWriteEnded();
    };
    const failed = (err: unknown): never => {
      this.fastWriteEnded();
      throw err;
    };
    if (contiguous) {
      const at = (firstCluster - l1Index * g.l2Entries) * entryBytes;
      const host = entryOffset(table.readUInt32BE(at), table.readUInt32BE(at + 4)) + (offset - firstCluster * cs);
      return file.pwrite(buf, host).then(done, failed);
    }
    const writes: Promise<void>[] = [];
    for (let gc = firstCluster; gc <= lastCluster; gc++) {
      const at = (gc - l1Index * g.l2Entries) * entryBytes;
      const cStart = gc * cs;
      const ds = Math.max(offset, cStart) - cStart;
      const de = Math.min(offset + len, cStart + cs) - cStart;
      const host = entryOffset(table.readUInt32BE(at), table.readUInt32BE(at + 4));
      writes.push(file.pwrite(buf.subarray(cStart + ds - offset, cStart + de - offset), host + ds));
    }
    return Promise.all(writes).then(done, failed);
  }

  private fastWriteEnded(): void {
    if (--this.fastWritesRunning === 0 && this.fastWritesDrained) {
      this.fastWritesDrained();
      this.fastWritesDrained = null;
    }
  }

  /** Resolves once no in-place fast-path write is running (one that began before a free must not land after it). */
  private fastWritesIdle(): Promise<void> {
    if (this.fastWritesRunning === 0) return RESOLVED;
    return new Promise((resolve) => {
      const prev = this.fastWritesDrained;
      this.fastWritesDrained = () => {
        prev?.();
        resolve();
      };
    });
  }

  private async writeSlow(buf: Uint8Array, offset: number): Promise<void> {
    let pos = 0;
    while (pos < buf.length) {
      const planned = await this.lock.run(async () => {
        await this.prepare();
        try {
          return await this.planRun(offset + pos, buf.length - pos);
        } finally {
          this.planFirst = this.planLast = -1;
        }
      });
      if ('wait' in planned) {
        await planned.wait;
        continue;
      }
      const { jobs, length, done, l1Index } = planned;
      const data = buf.subarray(pos, pos + length);
      try {
        await this.execute(jobs, data, offset + pos);
        this.writesDone++;
        if (jobs.some((j) => j.updateEntry)) await this.lock.run(() => this.commit(l1Index, jobs));
      } catch (err) {
        for (const j of jobs) if (j.updateEntry) this.inflight.delete(j.guestCluster);
        done();
        throw err;
      }
      for (const j of jobs) if (j.updateEntry) this.inflight.delete(j.guestCluster);
      done();
      pos += length;
    }
  }

  /** Step A (lock held). */
  private async planRun(
    guestOffset: number,
    maxLength: number,
  ): Promise<{ wait: Promise<void> } | { jobs: ClusterJob[]; length: number; l1Index: number; done: () => void }> {
    const img = this.img;
    const g = img.geometry;
    const cs = this.cs;
    const l1Index = Math.floor(guestOffset / this.bytesPerL2);
    if (l1Index >= img.l1.l2Offsets.length) throw new CorruptionError(`${img.file.path}: guest offset ${guestOffset} lies beyond the L1 table`);
    const tableEnd = (l1Index + 1) * this.bytesPerL2;
    const end = Math.min(guestOffset + maxLength, tableEnd, guestOffset + MAX_RUN_BYTES);
    const firstCluster = Math.floor(guestOffset / cs);
    const lastCluster = Math.min(Math.floor((end - 1) / cs), firstCluster + MAX_RUN_CLUSTERS - 1);
    const runEnd = Math.min(end, (lastCluster + 1) * cs);
    await this.claimLocked(firstCluster, lastCluster);

    let table = await img.l2Table(l1Index);
    const jobs: ClusterJob[] = [];
    for (let gc = firstCluster; gc <= lastCluster; gc++) {
      const w = this.inflight.get(gc);
      if (w) {
        if (jobs.length === 0) return { wait: w };
        break;
      }
      const cStart = gc * cs;
      const ds = Math.max(guestOffset, cStart) - cStart;
      const de = Math.min(runEnd, cStart + cs) - cStart;
      const l2Index = gc - l1Index * g.l2Entries;
      jobs.push(await this.classify(gc, l2Index, ds, de, this.entryAt(table, l2Index)));
    }
    const length = Math.min(runEnd, (jobs[jobs.length - 1]!.guestCluster + 1) * cs) - guestOffset;

    const needsMeta = jobs.some((j) => j.updateEntry);
    if (needsMeta) {
      const l1WasShared = img.l1.l2Offsets[l1Index] !== 0 && !img.l1.copied[l1Index];
      table = await this.writableL2(l1Index);
      if (l1WasShared) {
        // The entries were classified against the shared table; they are the same in the copy.
      }
      const fresh = jobs.filter((j) => j.isNew);
      if (fresh.length > 0) {
        // Contiguous new clusters, so that adjacent ones go out in one system call.
        const rc = this.refcounts!;
        // Clusters at or past this end were never in use since the image was opened: they lie
        // past the end the file had then, and nothing writes a cluster it has not allocated,
        // so they read as zeros (a hole, or past the end of the file).
        const unusedFrom = rc.endBytes;
        let host = await rc.allocate(fresh.length);
        for (const j of fresh) {
          j.target = host;
          if (host >= unusedFrom && this.fillsReadAsZeros(j)) {
            // Zeros around the data need not be written: write the data alone (for a 4 KiB write
            // into a 64 KiB cluster, 4 KiB instead of 64). The file is extended to cover the
            // cluster before anything that points at it becomes durable (flushLocked).
            j.writeStart = j.dataStart;
            j.writeEnd = j.dataEnd;
            j.fills = [];
            this.fileMayBeShort = true;
          }
          host += cs;
        }
        img.noteFileEnd(rc.endBytes);
      }
    }
    let release!: () => void;
    const inflightDone = new Promise<void>((r) => (release = r));
    for (const j of jobs) if (j.updateEntry) this.inflight.set(j.guestCluster, inflightDone);
    return { jobs, length, l1Index, done: release };
  }

  /** Whether every fill piece of a job is zeros (zero cluster/subcluster, or no backing data there). */
  private fillsReadAsZeros(j: ClusterJob): boolean {
    const backing = this.img.backing;
    const clusterGuest = j.guestCluster * this.cs;
    for (const p of j.fills) {
      const k = p.src.kind;
      if (k === 'zero') continue;
      if (k === 'backing' && (backing === null || clusterGuest + p.from >= backing.size)) continue;
      return false;
    }
    return true;
  }

  /** Decides how one cluster is written; may await a refcount lookup. */
  private async classify(gc: number, l2Index: number, ds: number, de: number, e: EntryState): Promise<ClusterJob> {
    const cs = this.cs;
    const g = this.img.geometry;
    const job: ClusterJob = {
      guestCluster: gc,
      l2Index,
      dataStart: ds,
      dataEnd: de,
      target: 0,
      isNew: false,
      writeStart: ds,
      writeEnd: de,
      fills: [],
      updateEntry: false,
      zeroBits: 0,
      allocBits: 0,
      frees: [],
    };
    const full = (src: (from: number, to: number) => FillPiece[]): void => {
      job.writeStart = 0;
      job.writeEnd = cs;
      job.fills = [...(ds > 0 ? src(0, ds) : []), ...(de < cs ? src(de, cs) : [])];
    };

    if (e.compressed) {
      const d = compressedDescriptor(e.hi, e.lo, g.clusterBits);
      job.isNew = job.updateEntry = true;
      if (ds > 0 || de < cs) {
        // Only the bytes around the write come from the old cluster (a whole-cluster write
        // needs none of it, so it also replaces a cluster that no longer decodes, as QEMU does).
        const buf = await this.img.decompressedCluster(d.hostOffset, d.compressedBytes);
        full((from, to) => [{ from, to, src: { kind: 'buffer', buf } }]);
      } else {
        full(() => []);
      }
      job.allocBits = g.extendedL2 ? 0xffffffff : 0;
      job.frees.push({ offset: d.hostOffset, bytes: d.compressedBytes });
      return job;
    }

    // Is the existing host cluster ours alone?
    let owned = false;
    if (e.host !== 0) {
      owned = e.copied || (await this.refcounts!.get(e.host / cs)) === 1;
    }

    if (!g.extendedL2) {
      if (e.host !== 0 && owned) {
        job.target = e.host;
        if (e.zeroFlag) {
          // A preallocated zero cluster: fill it with zeros around the data, clear the flag.
          full((from, to) => [{ from, to, src: { kind: 'zero' } }]);
          job.updateEntry = true;
        } else if (!e.copied) {
          job.updateEntry = true;
        }
        return job;
      }
      job.isNew = job.updateEntry = true;
      if (e.host !== 0) {
        const old = e.host;
        full((from, to) => [{ from, to, src: e.zeroFlag ? { kind: 'zero' } : { kind: 'host', hostOffset: old } }]);
        job.frees.push({ offset: old, bytes: cs });
      } else {
        full((from, to) => [{ from, to, src: e.zeroFlag ? { kind: 'zero' } : { kind: 'backing' } }]);
      }
      return job;
    }

    // Extended L2: per-subcluster state.
    const gs = g.subclusterSize;
    const firstSub = Math.floor(ds / gs);
    const lastSub = Math.floor((de - 1) / gs);
    let touched = 0;
    for (let s = firstSub; s <= lastSub; s++) touched |= 1 << s;
    touched >>>= 0;
    const subSource = (s: number, forTouched: boolean, oldHost: number): FillSource => {
      const bit = 1 << s;
      if (e.host !== 0 && e.allocBits & bit) return oldHost ? { kind: 'host', hostOffset: oldHost } : { kind: 'zero' };
      if (e.zeroBits & bit) return { kind: 'zero' };
      return forTouched ? { kind: 'backing' } : { kind: 'zero' };
    };
    /** Fill pieces for [from, to), split at subcluster bounds. */
    const pieces = (from: number, to: number, oldHost: number): FillPiece[] => {
      const out: FillPiece[] = [];
      for (let a = from; a < to; ) {
        const s = Math.floor(a / gs);
        const b = Math.min(to, (s + 1) * gs);
        out.push({ from: a, to: b, src: subSource(s, (touched & (1 << s)) !== 0, oldHost) });
        a = b;
      }
      return out;
    };
    job.zeroBits = (e.zeroBits & ~touched) >>> 0;
    job.allocBits = ((e.host !== 0 ? e.allocBits : 0) | touched) >>> 0;

    if (e.host !== 0 && !owned) {
      // Shared with a snapshot: copy the whole cluster, keeping its subcluster layout.
      job.isNew = job.updateEntry = true;
      full((from, to) => pieces(from, to, e.host));
      job.frees.push({ offset: e.host, bytes: cs });
      return job;
    }
    // In place (owned) or a new cluster for an unallocated one: write the touched subclusters,
    // filling the partial first and last ones when they held no data of their own.
    const allocated = (s: number): boolean => e.host !== 0 && (e.allocBits & (1 << s)) !== 0;
    job.writeStart = allocated(firstSub) ? ds : firstSub * gs;
    job.writeEnd = allocated(lastSub) ? de : (lastSub + 1) * gs;
    job.fills = [...pieces(job.writeStart, ds, 0), ...pieces(de, job.writeEnd, 0)];
    if (e.host !== 0) {
      job.target = e.host;
      job.updateEntry = !e.copied || (e.allocBits & touched) !== touched || (e.zeroBits & touched) !== 0;
    } else {
      job.isNew = job.updateEntry = true;
    }
    return job;
  }

  /** Step B: fills and data, one pwritev per host-contiguous stretch. */
  private async execute(jobs: ClusterJob[], data: Uint8Array, guestOffset: number): Promise<void> {
    const cs = this.cs;
    const img = this.img;
    const reads: Promise<void>[] = [];
    const iovs: { host: number; bufs: Uint8Array[]; end: number }[] = [];
    const runBase = Math.floor(guestOffset / cs) * cs;
    for (const j of jobs) {
      const clusterGuest = j.guestCluster * cs;
      const dataOff = clusterGuest + j.dataStart - guestOffset;
      const bufs: Uint8Array[] = [];
      const fillBuf = (from: number, to: number): Buffer => {
        const b = Buffer.alloc(to - from);
        for (const p of j.fills) {
          if (p.to <= from || p.from >= to) continue;
          const dst = b.subarray(p.from - from, p.to - from);
          const src = p.src;
          if (src.kind === 'backing') reads.push(img.readBacking(dst, clusterGuest + p.from));
          else if (src.kind === 'host') reads.push(img.file.pread(dst, src.hostOffset + p.from).then(() => undefined));
          else if (src.kind === 'buffer') src.buf.copy(dst, 0, p.from, p.to);
        }
        return b;
      };
      if (j.writeStart < j.dataStart) bufs.push(fillBuf(j.writeStart, j.dataStart));
      bufs.push(data.subarray(dataOff, dataOff + (j.dataEnd - j.dataStart)));
      if (j.dataEnd < j.writeEnd) bufs.push(fillBuf(j.dataEnd, j.writeEnd));
      const host = j.target + j.writeStart;
      const last = iovs[iovs.length - 1];
      if (last && last.end === host) {
        last.bufs.push(...bufs);
        last.end = j.target + j.writeEnd;
      } else {
        iovs.push({ host, bufs, end: j.target + j.writeEnd });
      }
    }
    void runBase;
    if (reads.length) await Promise.all(reads);
    await Promise.all(iovs.map((v) => img.file.pwritev(v.bufs, v.host)));
  }

  /** Step C (lock held): publish the new mappings. */
  private async commit(l1Index: number, jobs: ClusterJob[]): Promise<void> {
    const table = await this.writableL2(l1Index);
    // Caches of mappings (the FUSE layer's direct read map) forget these clusters first; before
    // host clusters are freed, no read that may still use their old mapping may be running.
    const obs = this.img.mappingObserver;
    if (obs) {
      let first = -1;
      let last = -1;
      let frees = false;
      for (const j of jobs) {
        if (!j.updateEntry) continue;
        if (first < 0 || j.l2Index < first) first = j.l2Index;
        if (j.l2Index > last) last = j.l2Index;
        if (j.frees.length > 0) frees = true;
      }
      if (first >= 0) {
        obs.changed((l1Index * this.img.geometry.l2Entries + first) * this.cs, (last - first + 1) * this.cs);
        if (frees) obs.freeing();
      }
    }
    for (const j of jobs) {
      if (!j.updateEntry) continue;
      let zeroBits = j.zeroBits;
      let allocBits = j.allocBits;
      if (this.img.geometry.extendedL2 && !j.isNew) {
        // In place: merge with the current bitmap (other writers may have touched other subclusters).
        const cur = this.entryAt(table, j.l2Index);
        const mine = j.allocBits;
        allocBits = (cur.allocBits | mine) >>> 0;
        zeroBits = (cur.zeroBits & ~mine) >>> 0;
      }
      this.setEntry(table, j.l2Index, j.target, zeroBits, allocBits);
      this.pendingFrees.push(...j.frees);
    }
    this.orderedData = true;
    await this.tableChanged(l1Index, table);
  }

  /** An L2 table was changed in memory (lock held): keep it cached and dirty, write back in time. */
  private async tableChanged(l1Index: number, table: Buffer): Promise<void> {
    const img = this.img;
    const tableOffset = img.l1.l2Offsets[l1Index]!;
    this.dirtyL2.add(tableOffset);
    img.l2Cache.pin(tableOffset);
    if (img.l2Cache.peek(tableOffset) !== table) img.l2Cache.insert(tableOffset, table);
    if (this.metadataDirtyBytes() > DIRTY_BUDGET_BYTES) await this.flushLocked();
    else this.scheduleWriteback();
  }

  private metadataDirtyBytes(): number {
    return this.dirtyL2.size * this.cs + (this.refcounts?.dirtyBytes ?? 0);
  }

  private scheduleWriteback(): void {
    if (this.writebackTimer) return;
    this.writebackTimer = setTimeout(() => {
      this.writebackTimer = null;
      this.flush().catch((err: unknown) => log.error(`background write-back failed: ${(err as Error).message}`));
    }, WRITEBACK_DELAY_MS);
    this.writebackTimer.unref();
  }

  // ---------------------------------------------------------------- flush

  get hasUnflushed(): boolean {
    return this.writesDone !== this.writesFlushed || this.fileMayBeShort || this.dirtyL2.size > 0 || this.dirtyL1.size > 0 || this.pendingFrees.length > 0 || (this.refcounts?.dirty ?? false);
  }

  /** Makes everything written so far durable, metadata in dependency order. */
  flush(): Promise<void> {
    return this.lock.run(async () => {
      // After a failure nothing is known to be durable: every later flush says so.
      this.check();
      await this.settleLocked(0, 0);
      await this.flushLocked();
    });
  }

  async flushLocked(): Promise<void> {
    if (!this.hasUnflushed) return;
    const img = this.img;
    const file = img.file;
    const rc = this.refcounts!;
    // Writes completed by now are covered by the barrier below; later ones by the next flush.
    const covered = this.writesDone;
    try {
      if (!this.orderedData && !this.fileMayBeShort && !rc.dirty && this.dirtyL1.size === 0 && this.pendingFrees.length === 0) {
        // Only entries for the mapping observer's own allocations changed (adoptAllocations):
        // fresh clusters whose refcounts and place in the file are durable already (reserveFresh)
        // and that read as zeros until their data lands. A crash that keeps an entry but not its
        // data shows zeros, the content before that unsynced write; so data and tables share one
        // barrier.
        await this.writeDirtyL2();
        await file.flush();
        this.writesFlushed = covered;
        return;
      }
      this.orderedData = false;
      // 0. New clusters written without their zero fill may lie past the end of the file: extend
      //    it first, so the barrier below makes the length durable before any entry points there.
      if (this.fileMayBeShort) {
        this.fileMayBeShort = false;
        if ((await file.size()) < rc.endBytes) await file.truncate(rc.endBytes);
      }
      // 1. Refcounts (and the data written so far) before anything that relies on them. persist()
      //    always ends with a barrier.
      await rc.persist();
      // 2. L2 tables, then the L1 entries that point at new ones, then a barrier; none when only
      //    data was written (the barrier of step 1 covered it).
      let unsynced = await this.writeDirtyL2();
      if (this.dirtyL1.size > 0) {
        if (unsynced) await file.flush();
        await this.writeL1();
        unsynced = true;
      }
      if (unsynced) await file.flush();
      // 3. Old clusters are released only now that no durable entry refers to them.
      if (this.pendingFrees.length > 0) {
        await this.fastWritesIdle();
        const frees = this.pendingFrees;
        this.pendingFrees = [];
        for (const f of frees) {
          for (const freed of await rc.adjust(f.offset, f.bytes, -1)) img.forgetCluster(freed);
        }
        await rc.writeDirtyBlocks();
        await file.flush();
      }
      this.writesFlushed = covered;
    } catch (err) {
      this.failed = err as Error;
      // Nothing may bypass the engine any more (canWriteInPlace is false from now on).
      this.img.mappingObserver?.changed(0, this.img.size);
      throw err;
    }
  }


  /** Writes the dirty L2 tables (no barrier); whether there were any. */
  private async writeDirtyL2(): Promise<boolean> {
    const img = this.img;
    const l2 = [...this.dirtyL2];
    this.dirtyL2.clear();
    await Promise.all(
      l2.map(async (off) => {
        const t = img.l2Cache.peek(off);
        if (!t) throw new Error(`internal: dirty L2 table 0x${off.toString(16)} not cached`);
        await img.file.pwrite(t, off);
      }),
    );
    for (const off of l2) if (!this.dirtyL2.has(off)) img.l2Cache.unpin(off);
    return l2.length > 0;
  }

  private async writeL1(): Promise<void> {
    const l1 = this.img.l1;
    const idx = [...this.dirtyL1].sort((a, b) => a - b);
    this.dirtyL1.clear();
    const first = idx[0]!;
    const last = idx[idx.length - 1]!;
    const buf = Buffer.alloc((last - first + 1) * 8);
    for (let i = first; i <= last; i++) writeEntry(buf, (i - first) * 8, l1.l2Offsets[i]!, l1.copied[i] === 1);
    await this.img.file.pwrite(buf, l1.tableOffset + first * 8);
  }

  // ---------------------------------------------------------------- resize

  /**
   * Grows the virtual disk to newSize bytes (shrinking is refused). Where a backing file reaches
   * past the old end (an overlay smaller than its backing file, or one shrunk before), the new
   * area is made to read as zeros, as QEMU's truncate does, rather than showing the backing
   * file's old bytes: zero clusters (version 3), or zeros written where the backing file covers
   * it (version 2, which has no zero clusters; qemu-img refuses that resize). In QEMU's
   * order: the L1 table grows first (the header keeps the old size), then the area is zeroed,
   * then the header takes the new size; a crash in between leaves the old disk.
   */
  async resize(newSize: number): Promise<void> {
    const img = this.img;
    let oldSize = 0;
    let zeroEnd = 0;
    await this.lock.run(async () => {
      this.check();
      oldSize = img.size;
      if (newSize < oldSize) throw new UsageError(`shrinking ${img.file.path} from ${oldSize} to ${newSize} bytes is not supported`);
      if (newSize % 512 !== 0) throw new UsageError(`the new size ${newSize} is not a multiple of 512 bytes`);
      if (newSize === oldSize) return;
      if (img.header.version === 2 && img.snapshots.length > 0) {
        throw new UsageError(`${img.file.path}: a version 2 image with snapshots cannot be resized (its snapshots do not record their size)`);
      }
      await this.growL1(newSize);
      // QEMU zeroes the whole new area when the backing file reaches past the old end; a version 2
      // image only the part the backing file covers (zeros written: past it reads zeros anyway).
      if (img.backing && img.backing.size > oldSize) zeroEnd = img.header.version === 2 ? Math.min(newSize, img.backing.size) : newSize;
      if (zeroEnd > oldSize) img.setSize(newSize); // the zeroing below writes past the old end
      else await this.writeSize(newSize);
    });
    if (zeroEnd <= oldSize) return;
    this.zeroFlagsBelow = zeroEnd; // zero clusters past the backing file's end too, as QEMU's
    try {
      await this.writeZeroes(oldSize, zeroEnd - oldSize);
    } catch (err) {
      if (img.header.sizeBytes === oldSize) img.setSize(oldSize);
      throw err;
    } finally {
      this.zeroFlagsBelow = 0;
    }
    await this.lock.run(async () => {
      this.check();
      await this.flushLocked(); // the zeros are durable before the header shows them
      await this.writeSize(newSize);
    });
  }

  /** Under the lock: an L1 table (and l1_size in the header) for a disk of newSize bytes. */
  private async growL1(newSize: number): Promise<void> {
    const img = this.img;
    const rc = await this.prepare();
    const l1 = img.l1;
    const newL1Size = Math.ceil(newSize / this.bytesPerL2);
    if (newL1Size <= l1.l2Offsets.length) return;
    if (newL1Size * 8 > 32 * 1024 * 1024) throw new UsageError(`size ${newSize} needs an L1 table above 32 MiB`);
    const capacity = Math.ceil((l1.l2Offsets.length * 8) / this.cs) * this.cs / 8;
    const offsets = new Float64Array(newL1Size);
    offsets.set(l1.l2Offsets);
    const copied = new Uint8Array(newL1Size);
    copied.set(l1.copied);
    const oldOffset = l1.tableOffset;
    const oldClusters = Math.ceil((l1.l2Offsets.length * 8) / this.cs);
    l1.l2Offsets = offsets;
    l1.copied = copied;
    if (newL1Size <= capacity && l1.l2Offsets.length > 0 && oldOffset !== 0) {
      for (let i = 0; i < newL1Size; i++) this.dirtyL1.add(i);
      await this.flushLocked();
    } else {
      await this.flushLocked();
      const clusters = Math.ceil((newL1Size * 8) / this.cs);
      const at = await rc.allocate(clusters);
      img.noteFileEnd(rc.endBytes);
      l1.tableOffset = at;
      const buf = Buffer.alloc(clusters * this.cs);
      for (let i = 0; i < newL1Size; i++) writeEntry(buf, i * 8, offsets[i]!, copied[i] === 1);
      await img.file.pwrite(buf, at);
      await rc.persist();
      img.setRegion('L1 table', at, clusters * this.cs);
      if (oldOffset !== 0 && oldClusters > 0) this.pendingFrees.push({ offset: oldOffset, bytes: oldClusters * this.cs });
    }
    await this.writeSizeFields(img.header.sizeBytes);
  }

  /** Under the lock: the header takes the new size, durably. */
  private async writeSize(newSize: number): Promise<void> {
    await this.writeSizeFields(newSize);
    this.img.setSize(newSize);
    this.writesDone++; // the header changed: make sure the flush below runs
    await this.flushLocked();
  }

  /** size, l1_size and l1_table_offset in one write (header bytes 24..47), then a flush. */
  private async writeSizeFields(size: number): Promise<void> {
    const img = this.img;
    const h = img.header;
    const l1 = img.l1;
    const b = Buffer.alloc(24);
    b.writeBigUInt64BE(BigInt(size), 0);
    b.writeUInt32BE(h.cryptMethod, 8);
    b.writeUInt32BE(l1.l2Offsets.length, 12);
    b.writeBigUInt64BE(BigInt(l1.tableOffset), 16);
    await img.file.pwrite(b, 24);
    await img.file.flush();
    h.sizeBytes = size;
    h.l1Size = l1.l2Offsets.length;
    h.l1TableOffset = l1.tableOffset;
  }

  // ---------------------------------------------------------------- close

  /** Flushes everything and clears the dirty bit we set. */
  async close(): Promise<void> {
    if (this.writebackTimer) {
      clearTimeout(this.writebackTimer);
      this.writebackTimer = null;
    }
    await this.lock.run(async () => {
      if (this.failed) return;
      await this.settleLocked(0, 0);
      // Deferred frees dirty refcount blocks again; loop until clean.
      for (let i = 0; i < 4 && this.hasUnflushed; i++) await this.flushLocked();
      const rc = this.refcounts;
      if (this.trimOnClose && rc && !this.hasUnflushed) {
        const end = await rc.usedEnd();
        if ((await this.img.file.size()) > end) {
          await this.img.file.truncate(end);
          await this.img.file.flush();
        }
      }
      if (this.setDirtyBit) {
        const h = this.img.header;
        h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
        await this.writeHeaderU64(72, h.incompatibleFeatures);
        this.setDirtyBit = false;
      }
    });
  }
}
