/**
 * Consistency check and repair of a qcow2 file (QEMU's qcow2-refcount.c check, qemu-img check).
 *
 * One pass recomputes every cluster's reference count in memory from the structures that use
 * clusters (header, active and snapshot L1 tables, their L2 tables and data clusters, the snapshot
 * table, the refcount table and blocks, the bitmap directory and tables), validating each entry on
 * the way, then compares with the refcounts on disk and checks the COPIED flags of the active
 * tables. Counts (corruptions, leaks, check errors) and the repair rules follow qemu-img so that
 * both tools agree on every image:
 *  - `leaks`: refcounts higher than the references are lowered;
 *  - `all`: also refcounts that are too low are raised, COPIED flags rewritten, unaligned
 *    preallocated clusters turned into zero clusters, and broken refcount structures rebuilt.
 * Repairs write through the HostFile directly, ordered so that a crash in the middle can leave
 * leaks but never new corruption: raised refcounts first, flags next, lowered refcounts last, each
 * step flushed; a rebuilt refcount structure is written completely before the header points to it.
 * This reads the file on its own (not through Qcow2Image), because the engine refuses to open
 * exactly the damage that check must report.
 */
import { ImageError } from '../errors';
import type { HostFile } from '../io/file';
import {
  BITMAP_FLAG_IN_USE,
  bitmapTableEntryOffset,
  decodeBitmapDirectory,
  MAX_BITMAP_DIRECTORY_BYTES,
  type BitmapDirectoryEntry,
} from './bitmap-directory';
import { AUTOCLEAR_BITMAPS, decodeHeader, HEADER_PROBE_BYTES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_L1_BYTES, type Qcow2Header } from './header';
import { compressedDescriptor, entryOffset, OFLAG_COMPRESSED_HI, OFLAG_COPIED_HI, OFLAG_ZERO_LO } from './l2';
import { getRefcount, refcountEntriesPerBlock, refcountMax, setRefcount } from './refcount-decode';

export type RepairMode = 'none' | 'leaks' | 'all';

export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export interface CheckHooks {
  /** One diagnostic line per finding (qemu-img prints these on stderr). */
  message(line: string): void;
  /** Fraction (0..1) of the current pass done, for a progress display. */
  progress?(fraction: number): void;
}

export interface CheckOutcome {
  counts: CheckCounts;
  /** Set when the check could not complete (qemu-img: "Check failed: ..."), exit status 1. */
  failure: string | null;
  /** Counts found and repaired by the repairing pass (qemu-img prints them before re-checking). */
  repaired: { leaks: number; corruptions: number } | null;
}

const REFTABLE_RESERVED_MASK = 0x1ffn;
const REFTABLE_OFFSET_MASK = 0xfffffffffffffe00n;
/** Bits 1..8 and 56..61 of a standard L2 entry, bits 0..8 and 56..62 of an L1 entry. */
const L2_STD_RESERVED_HI = 0x3f000000;
const L2_STD_RESERVED_LO = 0x1fe;
const L1_RESERVED_HI = 0x7f000000;
const L1_RESERVED_LO = 0x1ff;
/** Refcount blocks kept in memory while comparing; dirty ones are written back first. */
const REFBLOCK_CACHE_BYTES = 64 * 1024 * 1024;

function hex(n: number | bigint): string {
  return n.toString(16);
}

function entryHex(hi: number, lo: number): string {
  return hi === 0 ? hex(lo >>> 0) : hex(hi >>> 0) + (lo >>> 0).toString(16).padStart(8, '0');
}

function emptyCounts(): CheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

/** The snapshot fields check needs, decoded leniently: bad values are findings, not open errors. */
interface SnapshotRef {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
}

class CheckFailure extends Error {}

/** A growable in-memory refcount array, saturating at the image's refcount width like QEMU's. */
class RefArray {
  counts: Uint32Array;
  size: number;
  constructor(
    size: number,
    readonly max: number,
  ) {
    this.counts = new Uint32Array(Math.max(size, 1));
    this.size = size;
  }
  grow(size: number): void {
    if (size <= this.size) return;
    if (size > this.counts.length) {
      const next = new Uint32Array(Math.max(size, Math.ceil(this.counts.length * 1.5)));
      next.set(this.counts);
      this.counts = next;
    }
    this.size = size;
  }
  get(i: number): number {
    return i < this.size ? this.counts[i]! : 0;
  }
}

/** One pass over the image: what QEMU's qcow2_check_refcounts (plus the snapshot table) does. */
class CheckPass {
  readonly res = emptyCounts();
  private header!: Qcow2Header;
  private cs = 0;
  private clusterBits = 0;
  private order = 0;
  private refsPerBlock = 0;
  private fileSize = 0;
  private reftable: bigint[] = [];
  private refs!: RefArray;
  private rebuild = false;
  private l1Active: { hi: Uint32Array; lo: Uint32Array; offset: number } = { hi: new Uint32Array(0), lo: new Uint32Array(0), offset: 0 };
  private snapshots: SnapshotRef[] = [];
  private snapshotsBytes = 0;
  private bitmapsUsable = false;
  private readonly refblocks = new Map<number, Buffer>();
  private readonly dirtyRefblocks = new Set<number>();
  private quiet = false;
  private corruptionSignalled = false;

  constructor(
    private readonly file: HostFile,
    private readonly fix: RepairMode,
    private readonly hooks: CheckHooks,
  ) {}

  private msg(line: string): void {
    if (!this.quiet) this.hooks.message(line);
  }

  /** QEMU reports the first corruption met while reading metadata once, and then no more. */
  private signalCorruption(what: string): void {
    if (this.corruptionSignalled) return;
    this.corruptionSignalled = true;
    this.msg(
      this.fix !== 'none'
        ? `qcow2: Marking image as corrupt: ${what}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${what}; further non-fatal corruption events will be suppressed`,
    );
  }

  private get fixErrors(): boolean {
    return this.fix === 'all';
  }
  /**
   * Reads at a table offset taken from the file: bytes past its end read as zeros (as QEMU's
   * reads do), also at offsets no file can reach (up to 2^56, past what pread takes).
   */
  private async readAt(buf: Buffer, offset: number): Promise<void> {
    if (offset + buf.length > Number.MAX_SAFE_INTEGER) {
      buf.fill(0);
      return;
    }
    await this.file.pread(buf, offset);
  }

  private get fixLeaks(): boolean {
    return this.fix !== 'none';
  }

  // ---- loading ---------------------------------------------------------------------------------

  async load(): Promise<void> {
    this.fileSize = await this.file.size();
    const head = Buffer.alloc(Math.min(HEADER_PROBE_BYTES, this.fileSize));
    await this.file.pread(head, 0);
    this.header = decodeHeader(head, this.fileSize, { forCheck: true });
    const h = this.header;
    this.clusterBits = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.order = h.refcountOrder;
    this.refsPerBlock = refcountEntriesPerBlock(h.clusterBits, h.refcountOrder);

    const rt = Buffer.alloc(h.refcountTableClusters * this.cs);
    await this.readAt(rt, h.refcountTableOffset);
    this.reftable = [];
    for (let i = 0; i < rt.length; i += 8) this.reftable.push(rt.readBigUInt64BE(i));

    const l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size > 0) await this.readAt(l1, h.l1TableOffset);
    const hi = new Uint32Array(h.l1Size);
    const lo = new Uint32Array(h.l1Size);
    for (let i = 0; i < h.l1Size; i++) {
      hi[i] = l1.readUInt32BE(i * 8);
      lo[i] = l1.readUInt32BE(i * 8 + 4);
    }
    this.l1Active = { hi, lo, offset: h.l1TableOffset };
    await this.loadSnapshots();
    this.bitmapsUsable = h.bitmaps !== null && (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n && h.bitmaps.nbBitmaps > 0;
  }

  /** Reads the snapshot table; only a table that cannot be read at all stops the check. */
  private async loadSnapshots(): Promise<void> {
    const h = this.header;
    this.snapshots = [];
    this.snapshotsBytes = 0;
    if (h.nbSnapshots === 0) return;
    const want = Math.min(this.fileSize - h.snapshotsOffset, 64 * 1024 * 1024);
    const table = Buffer.alloc(Math.max(0, want));
    await this.readAt(table, h.snapshotsOffset);
    let off = 0;
    for (let i = 0; i < h.nbSnapshots; i++) {
      if (off + 40 > table.length) throw new CheckFailure(`snapshot table entry ${i} lies past the end of the file`);
      const l1Big = table.readBigUInt64BE(off);
      const l1Size = table.readUInt32BE(off + 8);
      const idSize = table.readUInt16BE(off + 12);
      const nameSize = table.readUInt16BE(off + 14);
      const extra = table.readUInt32BE(off + 36);
      if (extra > 1024) throw new CheckFailure(`snapshot ${i}: extra_data_size ${extra} is too large`);
      const idOff = off + 40 + extra;
      const end = idOff + idSize + nameSize;
      if (end > table.length) throw new CheckFailure(`snapshot table entry ${i} lies past the end of the file`);
      this.snapshots.push({
        id: table.subarray(idOff, idOff + idSize).toString('utf8'),
        name: table.subarray(idOff + idSize, end).toString('utf8'),
        l1TableOffset: l1Big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(l1Big),
        l1Size,
      });
      off = Math.ceil(end / 8) * 8;
    }
    this.snapshotsBytes = off;
  }

  // ---- counting references -------------------------------------------------------------------

  /** Counts one reference to every cluster of [offset, offset + size). */
  private inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.fileSize >= this.cs) {
      this.msg(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`);
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    this.refs.grow(last + 1);
    for (let k = first; k <= last; k++) {
      const rc = this.refs.counts[k]!;
      if (rc >= this.refs.max) {
        this.msg(`ERROR: overflow cluster offset=0x${hex(k * this.cs)}`);
        this.msg('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        this.res.corruptions++;
        continue;
      }
      this.refs.counts[k] = rc + 1;
    }
  }

  private async checkL2(l2Offset: number, fragInfo: boolean): Promise<void> {
    const g = this.header;
    const extended = (g.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    const eb = extended ? 16 : 8;
    const n = this.cs / eb;
    const table = Buffer.alloc(this.cs);
    await this.readAt(table, l2Offset);
    let nextContiguous = 0;
    let dirty = false;
    for (let i = 0; i < n; i++) {
      const at = i * eb;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      const zeroBits = extended ? table.readUInt32BE(at + 8) : 0;
      const allocBits = extended ? table.readUInt32BE(at + 12) : 0;
      const compressed = (hi & OFLAG_COMPRESSED_HI) !== 0;
      const host = entryOffset(hi, lo);
      if (!compressed && ((hi & L2_STD_RESERVED_HI) !== 0 || (lo & L2_STD_RESERVED_LO) !== 0)) {
        this.msg(`ERROR found l2 entry with reserved bits set: ${entryHex(hi, lo)}`);
        this.res.corruptions++;
      }
      if (compressed) {
        const d = compressedDescriptor(hi, lo, this.clusterBits);
        if (hi & OFLAG_COPIED_HI) {
          this.msg(`ERROR: coffset=0x${hex(d.hostOffset)}: copied flag must never be set for compressed clusters`);
          this.res.corruptions++;
        }
        if (zeroBits !== 0 || allocBits !== 0) {
          this.msg(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${entryHex(hi, lo)}`);
          this.res.corruptions++;
          continue;
        }
        this.inc(d.hostOffset, d.compressedBytes);
        if (fragInfo) {
          this.res.allocatedClusters++;
          this.res.compressedClusters++;
          // Compressed clusters share sectors with their neighbours: always fragmented.
          this.res.fragmentedClusters++;
        }
        continue;
      }
      const zeroFlag = !extended && (lo & OFLAG_ZERO_LO) !== 0;
      if (host === 0) {
        // Unallocated, or a plain zero cluster.
        if (extended && allocBits !== 0) {
          this.msg('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          this.res.corruptions++;
        }
        continue;
      }
      // A standard cluster (data, or zero with a host cluster kept).
      if (extended && (zeroBits & allocBits) !== 0) {
        this.msg(`ERROR offset=${hex(host)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        this.res.corruptions++;
      }
      if (host % this.cs !== 0) {
        this.res.corruptions++;
        const containsData = extended ? allocBits !== 0 : !zeroFlag;
        if (!containsData) {
          this.msg(`${this.fixErrors ? 'Repairing' : 'ERROR'} offset=${hex(host)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (this.fixErrors) {
            // The cluster holds no data: make the entry a plain zero cluster and drop its reference.
            if (extended) {
              table.writeUInt32BE(0, at);
              table.writeUInt32BE(0, at + 4);
              table.writeUInt32BE((zeroBits | allocBits) >>> 0, at + 8);
              table.writeUInt32BE(0, at + 12);
            } else {
              table.writeUInt32BE(0, at);
              table.writeUInt32BE(OFLAG_ZERO_LO, at + 4);
            }
            await this.file.pwrite(table.subarray(at, at + eb), l2Offset + at);
            dirty = true;
            this.res.corruptions--;
            this.res.corruptionsFixed++;
            continue;
          }
        } else {
          this.msg(`ERROR offset=${hex(host)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (fragInfo) {
        this.res.allocatedClusters++;
        if (nextContiguous !== 0 && host !== nextContiguous) this.res.fragmentedClusters++;
        nextContiguous = host + this.cs;
      }
      this.inc(host, this.cs);
    }
    if (dirty) await this.file.flush();
  }

  private async checkL1(l1Offset: number, l1Size: number, fragInfo: boolean, onEntry?: (i: number) => void): Promise<void> {
    if (l1Size === 0) return;
    this.inc(l1Offset, l1Size * 8);
    const raw = Buffer.alloc(l1Size * 8);
    await this.readAt(raw, l1Offset);
    for (let i = 0; i < l1Size; i++) {
      onEntry?.(i);
      const hi = raw.readUInt32BE(i * 8);
      const lo = raw.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) {
        this.msg(`ERROR found L1 entry with reserved bits set: ${entryHex(hi, lo)}`);
        this.res.corruptions++;
      }
      const l2Offset = entryOffset(hi, lo);
      this.inc(l2Offset, this.cs);
      if (l2Offset % this.cs !== 0) {
        this.msg(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, fragInfo);
    }
  }

  private async checkBitmaps(): Promise<void> {
    const h = this.header;
    const ext = h.bitmaps;
    if (!this.bitmapsUsable || ext === null) return;
    this.inc(ext.bitmapDirectoryOffset, ext.bitmapDirectorySize);
    let entries: BitmapDirectoryEntry[];
    try {
      if (ext.bitmapDirectorySize === 0 || ext.bitmapDirectorySize > MAX_BITMAP_DIRECTORY_BYTES) throw new ImageError('bitmap directory size is out of range');
      const dir = Buffer.alloc(ext.bitmapDirectorySize);
      await this.readAt(dir, ext.bitmapDirectoryOffset);
      entries = decodeBitmapDirectory(dir, ext.nbBitmaps, this.cs);
      for (const e of entries) {
        if (e.extraDataSize !== 0) throw new ImageError(`bitmap "${e.name}" has extra data`);
        const coveredBytes = e.bitmapTableSize * this.cs * 8 * 2 ** e.granularityBits;
        if (!(e.flags & BITMAP_FLAG_IN_USE) && h.sizeBytes > coveredBytes) throw new ImageError(`bitmap "${e.name}" is too small for the disk`);
      }
    } catch (err) {
      if (!(err instanceof ImageError)) throw err;
      this.res.corruptions++;
      throw new CheckFailure(`bitmap directory: ${err.message}`);
    }
    for (const e of entries) {
      this.inc(e.bitmapTableOffset, e.bitmapTableSize * 8);
      const table = Buffer.alloc(e.bitmapTableSize * 8);
      await this.readAt(table, e.bitmapTableOffset);
      const offsets: number[] = [];
      for (let i = 0; i < e.bitmapTableSize; i++) {
        const off = bitmapTableEntryOffset(table.readBigUInt64BE(i * 8), this.cs);
        if (off === null) {
          // QEMU refuses the whole table when any entry is invalid.
          this.res.corruptions++;
          throw new CheckFailure(`bitmap "${e.name}": invalid bitmap table entry ${i}`);
        }
        offsets.push(off);
      }
      for (const off of offsets) if (off !== 0) this.inc(off, this.cs);
    }
  }

  private async checkRefblocks(): Promise<void> {
    for (let i = 0; i < this.reftable.length; i++) {
      const raw = this.reftable[i]!;
      const offset = Number(raw & REFTABLE_OFFSET_MASK);
      const cluster = Math.floor(offset / this.cs);
      if (raw & REFTABLE_RESERVED_MASK) {
        this.msg(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (offset % this.cs !== 0) {
        this.msg(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (cluster >= this.refs.size) {
        this.res.corruptions++;
        this.msg(`${this.fixErrors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (this.fixErrors) {
          // Grow the file so that the block lies inside it (it reads as zeros); a size the file
          // cannot take leaves the refcount structures to be rebuilt, as QEMU does.
          const failed = await this.file.truncate(offset + this.cs).then(
            () => null,
            (err: NodeJS.ErrnoException) => (err.code === 'EINVAL' ? 'Invalid argument' : 'File too large'),
          );
          if (failed !== null) {
            this.msg(`qcow2fs: Could not resize file: ${failed}`);
            this.msg(`ERROR could not resize image: ${failed}`);
            this.rebuild = true;
            continue;
          }
          this.fileSize = offset + this.cs;
          this.refs.grow(Math.ceil(this.fileSize / this.cs));
          this.res.corruptions--;
          this.res.corruptionsFixed++;
          this.inc(offset, this.cs);
        }
        continue;
      }
      if (offset !== 0) {
        this.inc(offset, this.cs);
        const rc = this.refs.get(cluster);
        if (rc !== 1) {
          this.msg(`ERROR refcount block ${i} refcount=${rc}`);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  /** Recomputes every reference; with includeRefcounts false, leaves out the refcount structures. */
  private async calculate(includeRefcounts = true): Promise<void> {
    const h = this.header;
    this.refs = new RefArray(Math.ceil(this.fileSize / this.cs), Math.min(refcountMax(this.order), 0xffffffff));
    this.inc(0, this.cs);
    const total = h.l1Size + this.snapshots.reduce((a, s) => a + Math.min(s.l1Size, MAX_L1_BYTES / 8), 0);
    let done = 0;
    const tick = (): void => {
      if (++done % 64 === 0) this.hooks.progress?.((0.8 * done) / Math.max(total, 1));
    };
    await this.checkL1(h.l1TableOffset, h.l1Size, true, tick);
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % this.cs !== 0) {
        this.msg(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_BYTES / 8) {
        this.msg(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false, tick);
    }
    this.inc(h.snapshotsOffset, this.snapshotsBytes);
    if (includeRefcounts) this.inc(h.refcountTableOffset, this.reftable.length * 8);
    await this.checkBitmaps();
    if (includeRefcounts) await this.checkRefblocks();
  }

  // ---- refcounts on disk ------------------------------------------------------------------------

  /** The on-disk refcount of a cluster, or null when its refcount block cannot be used. */
  private async diskRefcount(cluster: number): Promise<number | null> {
    const idx = Math.floor(cluster / this.refsPerBlock);
    if (idx >= this.reftable.length) return 0;
    const offset = Number(this.reftable[idx]! & REFTABLE_OFFSET_MASK);
    if (offset === 0) return 0;
    if (offset % this.cs !== 0) {
      this.signalCorruption(`Refblock offset 0x${hex(offset)} unaligned (reftable index: ${idx})`);
      return null;
    }
    const block = await this.refblock(offset);
    return getRefcount(block, cluster % this.refsPerBlock, this.order);
  }

  private async refblock(offset: number): Promise<Buffer> {
    let b = this.refblocks.get(offset);
    if (b === undefined) {
      if (this.refblocks.size * this.cs >= REFBLOCK_CACHE_BYTES) await this.evictRefblocks();
      b = Buffer.alloc(this.cs);
      await this.readAt(b, offset);
      this.refblocks.set(offset, b);
    }
    return b;
  }

  private async evictRefblocks(): Promise<void> {
    await this.writeRefblocks();
    this.refblocks.clear();
  }

  private async writeRefblocks(): Promise<void> {
    if (this.dirtyRefblocks.size === 0) return;
    for (const off of [...this.dirtyRefblocks].sort((a, b) => a - b)) await this.file.pwrite(this.refblocks.get(off)!, off);
    this.dirtyRefblocks.clear();
    await this.file.flush();
  }

  private async setDiskRefcount(cluster: number, value: number): Promise<void> {
    const idx = Math.floor(cluster / this.refsPerBlock);
    const offset = Number(this.reftable[idx]! & REFTABLE_OFFSET_MASK);
    const block = await this.refblock(offset);
    setRefcount(block, cluster % this.refsPerBlock, this.order, value);
    this.dirtyRefblocks.add(offset);
  }

  /**
   * Compares on-disk refcounts with the references. With `fix`, repairs what the mode allows:
   * raised refcounts are written (and flushed) before any lowered one, so that an interruption
   * never leaves a cluster in use with too low a count.
   */
  private async compare(fix: RepairMode): Promise<number> {
    let highest = 0;
    const lower: Array<[number, number]> = [];
    const n = this.refs.size;
    for (let i = 0; i < n; i++) {
      if (i % 65536 === 0) this.hooks.progress?.(0.8 + (0.2 * i) / n);
      const onDisk = await this.diskRefcount(i);
      if (onDisk === null) {
        this.msg(`Can't get refcount for cluster ${i}: Input/output error`);
        this.res.checkErrors++;
        continue;
      }
      const want = this.refs.get(i);
      if (onDisk > 0 || want > 0) highest = i;
      if (onDisk === want) continue;
      let fixing: 'leak' | 'corruption' | null = null;
      if (onDisk === 0) this.rebuild = true;
      else if (onDisk > want && fix !== 'none') fixing = 'leak';
      else if (onDisk < want && fix === 'all') fixing = 'corruption';
      this.msg(`${fixing ? 'Repairing' : onDisk < want ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${onDisk} reference=${want}`);
      if (fixing === 'corruption') {
        await this.setDiskRefcount(i, want);
        this.res.corruptionsFixed++;
      } else if (fixing === 'leak') {
        lower.push([i, want]);
        this.res.leaksFixed++;
      } else if (onDisk < want) {
        this.res.corruptions++;
      } else {
        this.res.leaks++;
      }
    }
    await this.writeRefblocks();
    for (const [i, want] of lower) await this.setDiskRefcount(i, want);
    await this.writeRefblocks();
    return highest;
  }

  /** COPIED must be set exactly on active L1/L2 entries whose cluster has refcount 1. */
  private async checkCopiedFlags(repair: boolean): Promise<void> {
    const { hi: l1hi, lo: l1lo, offset: l1Offset } = this.l1Active;
    const extended = (this.header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    const eb = extended ? 16 : 8;
    for (let i = 0; i < l1hi.length; i++) {
      const hi = l1hi[i]!;
      const lo = l1lo[i]!;
      const l2Offset = entryOffset(hi, lo);
      if (l2Offset === 0) continue;
      const rc = await this.diskRefcount(Math.floor(l2Offset / this.cs));
      if (rc === null) continue;
      if ((rc === 1) !== ((hi & OFLAG_COPIED_HI) !== 0)) {
        this.res.corruptions++;
        this.msg(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${entryHex(hi, lo)} refcount=${rc}`);
        if (repair) {
          const fixed = rc === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0;
          l1hi[i] = fixed;
          const e = Buffer.alloc(8);
          e.writeUInt32BE(fixed, 0);
          e.writeUInt32BE(lo, 4);
          await this.file.pwrite(e, l1Offset + i * 8);
          await this.file.flush();
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      const table = Buffer.alloc(this.cs);
      await this.readAt(table, l2Offset);
      let dirty = 0;
      for (let j = 0; j < this.cs / eb; j++) {
        const at = j * eb;
        const ehi = table.readUInt32BE(at);
        const elo = table.readUInt32BE(at + 4);
        if (ehi & OFLAG_COMPRESSED_HI) continue;
        const host = entryOffset(ehi, elo);
        if (host === 0) continue;
        const drc = await this.diskRefcount(Math.floor(host / this.cs));
        if (drc === null) continue;
        if ((drc === 1) !== ((ehi & OFLAG_COPIED_HI) !== 0)) {
          this.res.corruptions++;
          this.msg(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${entryHex(ehi, elo)} refcount=${drc}`);
          if (repair) {
            table.writeUInt32BE(drc === 1 ? (ehi | OFLAG_COPIED_HI) >>> 0 : (ehi & ~OFLAG_COPIED_HI) >>> 0, at);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        await this.file.pwrite(table, l2Offset);
        await this.file.flush();
        this.res.corruptions -= dirty;
        this.res.corruptionsFixed += dirty;
      }
    }
  }

  // ---- rebuilding the refcount structure -------------------------------------------------------

  /**
   * Writes a new refcount table and blocks after the end of the file, describing every cluster in
   * use (the old refcount structures excluded), then points the header at them. Until the header
   * write, the image still uses the old structures; afterwards the old ones are simply free.
   */
  private async rebuildRefcounts(): Promise<void> {
    this.msg('Rebuilding refcount structure');
    const saved = { res: { ...this.res }, quiet: this.quiet, rebuild: this.rebuild };
    this.quiet = true;
    await this.calculate(false);
    Object.assign(this.res, saved.res);
    this.quiet = saved.quiet;
    this.rebuild = saved.rebuild;
    const refs = this.refs;
    const E = this.refsPerBlock;
    let highestUsed = -1;
    for (let i = refs.size - 1; i >= 0; i--) {
      if (refs.counts[i]! > 0) {
        highestUsed = i;
        break;
      }
    }
    const start = Math.max(Math.ceil(this.fileSize / this.cs), highestUsed + 1);
    const used = new Set<number>();
    for (let i = 0; i <= highestUsed; i++) if (refs.counts[i]! > 0) used.add(Math.floor(i / E));
    let blocks = 0;
    let tableClusters = 0;
    let needed: number[] = [];
    for (;;) {
      const end = start + blocks + tableClusters;
      const all = new Set(used);
      for (let c = start; c < end; c++) all.add(Math.floor(c / E));
      needed = [...all].sort((a, b) => a - b);
      const entries = needed.length ? needed[needed.length - 1]! + 1 : 1;
      const nextTable = Math.ceil((entries * 8) / this.cs);
      if (needed.length === blocks && nextTable === tableClusters) break;
      blocks = needed.length;
      tableClusters = nextTable;
    }
    refs.grow(start + blocks + tableClusters);
    for (let c = start; c < start + blocks + tableClusters; c++) refs.counts[c] = 1;
    const table = Buffer.alloc(tableClusters * this.cs);
    const blockOffset = new Map<number, number>();
    needed.forEach((k, n) => blockOffset.set(k, (start + n) * this.cs));
    for (const [k, off] of blockOffset) {
      const b = Buffer.alloc(this.cs);
      const first = k * E;
      for (let i = 0; i < E && first + i < refs.size; i++) {
        const v = refs.counts[first + i]!;
        if (v) setRefcount(b, i, this.order, v);
      }
      await this.file.pwrite(b, off);
      table.writeBigUInt64BE(BigInt(off), k * 8);
    }
    const tableOffset = (start + blocks) * this.cs;
    await this.file.pwrite(table, tableOffset);
    await this.file.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeBigUInt64BE(BigInt(tableOffset), 0);
    hdr.writeUInt32BE(tableClusters, 8);
    await this.file.pwrite(hdr, 48);
    await this.file.flush();
    this.refblocks.clear();
    this.dirtyRefblocks.clear();
  }

  // ---- the pass ---------------------------------------------------------------------------------

  async run(): Promise<string | null> {
    try {
      await this.load();
      this.res.totalClusters = Math.ceil((Math.ceil(this.header.sizeBytes / 512) * 512) / this.cs);
      await this.calculate();
      const preCompare = { ...this.res };
      let highest = await this.compare('none');
      if (this.rebuild && this.fixErrors) {
        const before = { ...this.res };
        await this.rebuildRefcounts();
        await this.load();
        this.res.corruptions = 0;
        this.res.leaks = 0;
        this.rebuild = false;
        await this.calculate();
        const afterCalc = { ...this.res };
        Object.assign(this.res, emptyCounts());
        this.quiet = true;
        highest = await this.compare('leaks');
        this.quiet = false;
        if (this.rebuild) this.msg('ERROR rebuilt refcount structure is still broken');
        const freshLeaks = this.res.leaks;
        Object.assign(this.res, afterCalc);
        if (this.res.corruptions < before.corruptions) this.res.corruptionsFixed += before.corruptions - this.res.corruptions;
        if (this.res.leaks < before.leaks) this.res.leaksFixed += before.leaks - this.res.leaks;
        this.res.leaks += freshLeaks;
      } else if (this.fix !== 'none') {
        if (this.rebuild) {
          this.msg('ERROR need to rebuild refcount structures');
          this.res.checkErrors++;
          return 'the refcount structures must be rebuilt: repair with -r all';
        }
        if (this.res.leaks || this.res.corruptions) {
          Object.assign(this.res, preCompare);
          highest = await this.compare(this.fix);
        }
      }
      const repairCopied = this.fixErrors || (this.fixLeaks && !this.res.checkErrors && !this.res.corruptions && !this.res.leaks);
      await this.checkCopiedFlags(repairCopied);
      this.res.imageEndOffset = (highest + 1) * this.cs;
      if (this.fix !== 'none' && this.res.checkErrors === 0 && this.res.corruptions === 0) await this.markCleanAndConsistent();
      this.hooks.progress?.(1);
      return null;
    } catch (err) {
      if (err instanceof CheckFailure) return err.message;
      throw err;
    }
  }

  private async markCleanAndConsistent(): Promise<void> {
    const h = this.header;
    if (h.version < 3) return;
    const bits = h.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if (bits === 0n) return;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(h.incompatibleFeatures & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT), 0);
    await this.file.flush();
    await this.file.pwrite(b, 72);
    await this.file.flush();
  }
}

/**
 * Checks (and with `repair`, repairs) the qcow2 file. As qemu-img does, a repairing run that
 * fixed anything is followed by a read-only re-check whose counts are the ones reported.
 */
export async function checkQcow2(file: HostFile, repair: RepairMode, hooks: CheckHooks): Promise<CheckOutcome> {
  if (repair !== 'none' && file.readOnly) throw new Error('internal: repair needs a writable file');
  const first = new CheckPass(file, repair, hooks);
  const failure = await first.run();
  if (failure !== null) return { counts: first.res, failure, repaired: null };
  const fixed = first.res;
  if (fixed.corruptionsFixed === 0 && fixed.leaksFixed === 0) return { counts: fixed, failure: null, repaired: null };
  const again = new CheckPass(file, 'none', hooks);
  const failure2 = await again.run();
  const counts = { ...again.res, corruptionsFixed: fixed.corruptionsFixed, leaksFixed: fixed.leaksFixed };
  return { counts, failure: failure2, repaired: { leaks: fixed.leaksFixed, corruptions: fixed.corruptionsFixed } };
}

