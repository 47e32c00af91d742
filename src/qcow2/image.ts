/**
 * A qcow2 image as a BlockDevice (QEMU's qcow2.c: open and the read path). The active layer or,
 * with `snapshot`, a read-only view through a snapshot's L1 table. Unallocated ranges come from
 * the backing device, or read as zeros.
 */
import type { BlockDevice, Extent, MappingObserver, PlainRun } from '../image/blockdev';
import { checkRange } from '../image/blockdev';
import { CorruptionError, ImageError, ReadOnlyError } from '../errors';
import { FdFile, type HostFile } from '../io/file';
import { log } from '../log';
import { TableCache } from './cache';
import { ClusterMapper, type L1Table, type Mapping, type MetadataRegions } from './cluster';
import { DecompressError, decompressCluster, decompressClusterFromFile } from './codec';
import { CompressedClusterCache } from './compressed-cache';
import { decodeHeader, geometryOf, HEADER_PROBE_BYTES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, rangesOverlap, type Geometry, type Qcow2Header } from './header';
import { entryOffset, OFLAG_COPIED_HI } from './l2';
import { decodeSnapshotTable, type SnapshotEntry } from './snapshot';
import { Qcow2Writer } from './writer';

export interface Qcow2OpenOptions {
  readOnly: boolean;
  /** The device unallocated clusters read from; null reads them as zeros. */
  backing: BlockDevice | null;
  /** Bytes of L2 tables to cache (like QEMU's l2-cache-size). */
  l2CacheBytes?: number;
  /** Serve this internal snapshot instead of the active layer (read-only). */
  snapshot?: SnapshotEntry;
}

export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;
/** Decompressed clusters kept (at least the read-ahead window twice over, plus two clusters). */
const DECOMPRESSED_CACHE_BYTES = 4 * 1024 * 1024;
/** Sequential reads of compressed clusters decompress this far ahead (at least one cluster)... */
const READAHEAD_BYTES = 1024 * 1024;
/** ...with at most this many clusters decoding at once (besides the request's own). */
const READAHEAD_JOBS = 4;

interface Region {
  offset: number;
  length: number;
  what: string;
}

export class Qcow2Image implements BlockDevice {
  private sizeBytes: number;
  readonly readOnly: boolean;
  readonly description: string;
  readonly geometry: Geometry;
  readonly l1: L1Table;
  private readonly mapper: ClusterMapper;
  /** L2 tables by host offset; the writer pins the dirty ones. */
  readonly l2Cache: TableCache;
  private readonly decompressed: CompressedClusterCache;
  private fileSizeBytes: number;
  private readonly regions: Region[];
  private closed = false;
  /** The write path; null on read-only opens. */
  readonly writer: Qcow2Writer | null;
  /** Told by the writer before a mapping changes (see plainRunCached). */
  mappingObserver: MappingObserver | null = null;

  private constructor(
    readonly file: HostFile,
    readonly header: Qcow2Header,
    readonly snapshots: SnapshotEntry[],
    l1: L1Table,
    fileSize: number,
    regions: Region[],
    readonly backing: BlockDevice | null,
    opts: Qcow2OpenOptions,
  ) {
    this.geometry = geometryOf(header);
    this.l1 = l1;
    this.fileSizeBytes = fileSize;
    this.regions = regions;
    this.readOnly = opts.readOnly || opts.snapshot !== undefined;
    this.sizeBytes = opts.snapshot?.diskSizeBytes ?? header.sizeBytes;
    this.description = file.path + (opts.snapshot ? ` (snapshot ${opts.snapshot.name})` : '');
    const clusterSize = this.geometry.clusterSize;
    this.l2Cache = new TableCache(Math.max(opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES, 4 * clusterSize), (off) => this.loadTable(off));
    const metadata: MetadataRegions = {
      fileSize: () => this.fileSizeBytes,
      overlaps: (offset, length) => this.overlappingRegion(offset, length),
    };
    this.mapper = new ClusterMapper(this.geometry, this.l2Cache, metadata, file.path);
    const window = Math.max(READAHEAD_BYTES, clusterSize);
    this.decompressed = new CompressedClusterCache(
      {
        clusterSize,
        capacityBytes: Math.max(DECOMPRESSED_CACHE_BYTES, 2 * window + 2 * clusterSize),
        windowBytes: window,
        jobs: READAHEAD_JOBS,
        diskSize: () => this.sizeBytes,
      },
      (off, bytes, into) => this.loadCompressed(off, bytes, into),
      (guestOffset, maxLength) => this.mapper.lookup(this.l1, guestOffset, maxLength),
    );
    this.writer = this.readOnly ? null : new Qcow2Writer(this);
  }

  get size(): number {
    return this.sizeBytes;
  }

  /** @internal the writer grows the disk. */
  setSize(sizeBytes: number): void {
    this.sizeBytes = sizeBytes;
  }

  /** The image file's logical length (including clusters allocated but not yet written back). */
  get fileSize(): number {
    return this.fileSizeBytes;
  }

  /** @internal */
  noteFileEnd(bytes: number): void {
    if (bytes > this.fileSizeBytes) this.fileSizeBytes = bytes;
  }

  /** Metadata regions (header, L1, refcount table, snapshot table) that data never overlaps. */
  metadataRegions(): readonly Region[] {
    return this.regions;
  }

  /** @internal the writer moves tables. */
  setRegion(what: string, offset: number, length: number): void {
    const r = this.regions.find((x) => x.what === what);
    if (r) {
      r.offset = offset;
      r.length = length;
    } else {
      this.regions.push({ offset, length, what });
    }
  }

  /** @internal a cluster whose refcount dropped to zero: drop cached copies of it. */
  forgetCluster(hostOffset: number): void {
    this.l2Cache.delete(hostOffset);
    this.decompressed.forget(hostOffset);
  }

  /** The L2 table of l1Index in the layer served (through the cache), or null. */
  l2Table(l1Index: number): Promise<Buffer | null> {
    return this.mapper.l2Table(this.l1, l1Index);
  }

  /** One whole decompressed cluster (a copy: the cache reuses its own buffers). */
  decompressedCluster(hostOffset: number, compressedBytes: number): Promise<Buffer> {
    return this.decompressed.cluster(hostOffset, compressedBytes);
  }

  static async open(file: HostFile, opts: Qcow2OpenOptions, known?: { header: Qcow2Header; fileSize: number }): Promise<Qcow2Image> {
    let { header, fileSize } = known ?? (await readHeader(file));
    if (!opts.readOnly && !opts.snapshot && header.incompatibleFeatures & INCOMPAT_DIRTY && !(header.incompatibleFeatures & INCOMPAT_CORRUPT)) {
      // Lazy refcounts were not written back before the image was last closed: rebuild them
      // before writing (as QEMU does on a read-write open). Read-only opens repair nothing.
      log.info({ image: file.path }, 'the image was not closed cleanly (lazy refcounts): repairing refcounts');
      // The checker loads only when an image needs repair (mount time is a target).
      const { checkQcow2 } = require('./check') as typeof import('./check');
      const outcome = await checkQcow2(file, 'all', { message: (line) => log.debug({ image: file.path }, line) });
      if (outcome.failure !== null || outcome.counts.corruptions > 0 || outcome.counts.checkErrors > 0) {
        throw new ImageError(
          `the dirty bit is set and the refcounts could not be repaired (${outcome.failure ?? `${outcome.counts.corruptions} corruptions left`}): mount it read-only, or run "qcow2fs check -r all"`,
          file.path,
        );
      }
      ({ header, fileSize } = await readHeader(file));
    }
    const g = geometryOf(header);
    const cs = g.clusterSize;
    const roundUp = (n: number): number => Math.ceil(n / cs) * cs;

    // backing_file_size means nothing without backing_file_offset (QEMU ignores it then).
    const headerEnd = Math.max(header.extensionsEnd, header.backingFileOffset !== 0 ? header.backingFileOffset + header.backingFileSize : 0, header.headerLength);
    const regions: Region[] = [
      { offset: 0, length: roundUp(headerEnd), what: 'image header' },
      { offset: header.refcountTableOffset, length: header.refcountTableClusters * cs, what: 'refcount table' },
    ];
    if (header.l1Size > 0) regions.push({ offset: header.l1TableOffset, length: roundUp(header.l1Size * 8), what: 'L1 table' });

    let snapshots: SnapshotEntry[] = [];
    if (header.nbSnapshots > 0) {
      const ctx = { version: header.version, clusterSize: cs, fileSize, bytesPerL1Entry: cs * g.l2Entries, diskSize: header.sizeBytes };
      const decoded = await readSnapshotTable(file, header.snapshotsOffset, header.nbSnapshots, ctx);
      snapshots = decoded.entries;
      const snapRegion = { offset: header.snapshotsOffset, length: roundUp(decoded.tableBytes), what: 'snapshot table' };
      for (const r of regions) {
        if (rangesOverlap(snapRegion.offset, snapRegion.length, r.offset, r.length)) {
          throw new ImageError(`snapshots_offset 0x${header.snapshotsOffset.toString(16)} overlaps the ${r.what}`, file.path);
        }
      }
      regions.push(snapRegion);
    }

    let l1Offset = header.l1TableOffset;
    let l1Size = header.l1Size;
    if (opts.snapshot) {
      if (opts.snapshot.damage) throw new ImageError(`snapshot ${opts.snapshot.name} (id ${opts.snapshot.id}) is damaged: ${opts.snapshot.damage}`, file.path);
      l1Offset = opts.snapshot.l1TableOffset;
      l1Size = opts.snapshot.l1Size;
    }
    const l1 = await readL1(file, l1Offset, l1Size, cs, fileSize, regions, opts.snapshot ? `snapshot ${opts.snapshot.name} ` : '');

    if (!opts.readOnly && !opts.snapshot && header.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw new ImageError('image is marked corrupt: mount it read-only, or repair it with "qcow2fs check -r all"', file.path);
    }
    if (header.incompatibleFeatures & INCOMPAT_DIRTY) log.debug({ image: file.path }, 'image has the dirty bit set (lazy refcounts)');
    const image = new Qcow2Image(file, header, snapshots, l1, fileSize, regions, opts.backing, opts);
    // Validate the refcount structures now, so a bad image fails at open, not at the first write.
    if (image.writer) await image.writer.loadRefcounts();
    return image;
  }

  overlappingRegion(offset: number, length: number): string | null {
    for (const r of this.regions) if (rangesOverlap(offset, length, r.offset, r.length)) return r.what;
    return null;
  }

  private async loadTable(hostOffset: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(this.geometry.clusterSize);
    const n = await this.file.pread(buf, hostOffset);
    if (n < buf.length) throw new CorruptionError(`${this.file.path}: L2 table at 0x${hostOffset.toString(16)} is truncated by the end of the file`);
    return buf;
  }

  private async loadCompressed(hostOffset: number, bytes: number, into: Buffer): Promise<void> {
    const type = this.header.compressionType;
    const cs = this.geometry.clusterSize;
    try {
      // The native codec reads and decodes on a pool thread; otherwise read here, then decode.
      if (this.file instanceof FdFile && (await decompressClusterFromFile(type, this.file.fd, hostOffset, bytes, cs, into))) return;
      const src = Buffer.allocUnsafe(bytes);
      await this.file.pread(src, hostOffset);
      await decompressCluster(type, src, cs, into);
    } catch (err) {
      if (err instanceof DecompressError) {
        throw new CorruptionError(`${this.file.path}: compressed cluster at 0x${hostOffset.toString(16)}: ${err.message}`);
      }
      throw err;
    }
  }

  async readBacking(dst: Uint8Array, guestOffset: number): Promise<void> {
    const b = this.backing;
    const n = b === null ? 0 : Math.max(0, Math.min(dst.length, b.size - guestOffset));
    if (n > 0) await b!.read(dst.subarray(0, n), guestOffset);
    if (n < dst.length) dst.fill(0, n);
  }

  lookup(guestOffset: number, maxLength: number): Promise<Mapping> {
    return this.mapper.lookup(this.l1, guestOffset, maxLength);
  }

  /**
   * read() on this thread, without Promises, when it needs nothing but cached L2 tables, host data
   * in the page cache (preadv2 RWF_NOWAIT), zeros, and backing reads that can be served the same
   * way; false otherwise (buf may be partly written; read() then does the whole request).
   * Compressed clusters always take read().
   */
  readCached(buf: Uint8Array, offset: number): boolean {
    checkRange(this, offset, buf.length);
    const file = this.file;
    if (!file.preadCached || this.allocationsPending()) return false;
    let pos = 0;
    while (pos < buf.length) {
      const m = this.mapper.lookupCached(this.l1, offset + pos, buf.length - pos);
      if (m === undefined) return false;
      if (m.kind === 'data') {
        if (!file.preadCached(buf.subarray(pos, pos + m.length), m.hostOffset)) return false;
      } else if (m.kind === 'zero') {
        buf.fill(0, pos, pos + m.length);
      } else if (m.kind === 'unallocated') {
        // As readBacking: the backing file's bytes, zeros past its end (or without one).
        const b = this.backing;
        const inBacking = b === null ? 0 : Math.max(0, Math.min(m.length, b.size - (offset + pos)));
        if (inBacking > 0 && !b!.readCached?.(buf.subarray(pos, pos + inBacking), offset + pos)) return false;
        buf.fill(0, pos + inBacking, pos + m.length);
      } else {
        return false;
      }
      pos += m.length;
    }
    return true;
  }

  get mapGranuleBytes(): number {
    return this.geometry.clusterSize;
  }

  get mapRegionBytes(): number {
    return this.geometry.clusterSize * this.geometry.l2Entries;
  }

  /**
   * What lookupCached() says about [offset, +maxLength), reduced to "host bytes of a descriptor",
   * "zeros" or "other"; unallocated ranges ask the backing device the same. Never does I/O.
   * Throws CorruptionError on a bad L2 entry, as a read would.
   */
  plainRunCached(offset: number, maxLength: number): PlainRun {
    checkRange(this, offset, maxLength);
    const m = this.mapper.lookupCached(this.l1, offset, maxLength);
    if (m === undefined) {
      const perTable = this.geometry.clusterSize * this.geometry.l2Entries;
      return { kind: 'other', length: Math.min(maxLength, perTable - (offset % perTable)) };
    }
    switch (m.kind) {
      case 'data':
        if (!(this.file instanceof FdFile)) return { kind: 'other', length: m.length };
        return { kind: 'data', length: m.length, fd: this.file.fd, hostOffset: m.hostOffset, writable: this.writer?.canWriteInPlace(offset, m.length) ?? false };
      case 'zero':
        return this.zeroAnswer(offset, m.length);
      case 'compressed':
        if (!(this.file instanceof FdFile)) return { kind: 'other', length: m.length };
        return {
          kind: 'compressed',
          length: m.length,
          fd: this.file.fd,
          hostOffset: m.hostOffset,
          compressedBytes: m.compressedBytes,
          compression: this.header.compressionType,
          clusterBytes: this.geometry.clusterSize,
        };
      case 'unallocated': {
        const b = this.backing;
        // Standard entries found unallocated have no host and no flags: nothing to check again.
        const free = !this.geometry.extendedL2;
        if (b === null || offset >= b.size) return this.zeroAnswer(offset, m.length, free);
        const inBacking = Math.min(m.length, b.size - offset);
        const run = b.plainRunCached ? b.plainRunCached(offset, inBacking) : { kind: 'other' as const, length: inBacking };
        // The backing file's bytes are read-only from here: a write allocates in this layer
        // (where the backing file reads as zeros, a fresh cluster of this layer reads the same).
        if (run.kind === 'data') return run.writable ? { ...run, writable: false } : run;
        if (run.kind === 'zero') return this.zeroAnswer(offset, run.length, free);
        return run;
      }
    }
  }

  /** A 'zero' PlainRun from offset: as long as whether a write may allocate it natively stays the same. */
  private zeroAnswer(offset: number, length: number, entriesFree = false): PlainRun {
    if (!this.writer) return { kind: 'zero', length };
    const f = this.writer.freshRun(offset, length, entriesFree);
    return { kind: 'zero', length: f.length, allocatable: f.allocatable };
  }

  observeMappings(obs: MappingObserver | null): void {
    this.mappingObserver = obs;
  }

  noteExternalWrites(): void {
    this.writer?.noteExternalWrites();
  }

  /**
   * The mapping observer allocated clusters that the metadata does not show yet: reads and
   * status must have the writer take them first (settleAllocations), or they would see zeros.
   */
  private allocationsPending(): boolean {
    return this.writer !== null && (this.mappingObserver?.pendingAllocations?.() ?? false);
  }

  async reserveFresh(clusters: number): Promise<{ fd: number; hostOffset: number } | null> {
    if (!this.writer || !(this.file.fd >= 0)) return null;
    const hostOffset = await this.writer.reserveFresh(clusters);
    return { fd: this.file.fd, hostOffset };
  }

  async releaseFresh(hostOffset: number, bytes: number): Promise<void> {
    await this.writer?.releaseFresh(hostOffset, bytes);
  }

  async settleAllocations(): Promise<void> {
    await this.writer?.settleAllocations();
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    checkRange(this, offset, buf.length);
    if (this.allocationsPending()) await this.writer!.settleAllocations();
    const pending: Promise<void>[] = [];
    let pos = 0;
    let compressed = false;
    try {
      while (pos < buf.length) {
        const m = await this.mapper.lookup(this.l1, offset + pos, buf.length - pos);
        const dst = buf.subarray(pos, pos + m.length);
        switch (m.kind) {
          case 'data':
            pending.push(this.file.pread(dst, m.hostOffset).then(() => undefined));
            break;
          case 'zero':
            dst.fill(0);
            break;
          case 'compressed':
            pending.push(this.decompressed.read(dst, m.hostOffset, m.compressedBytes, m.offsetInCluster));
            compressed = true;
            break;
          case 'unallocated':
            pending.push(this.readBacking(dst, offset + pos));
            break;
        }
        pos += m.length;
      }
      if (compressed) this.decompressed.noteRead(offset, offset + buf.length);
      if (pending.length === 1) await pending[0];
      else if (pending.length > 1) await Promise.all(pending);
    } catch (err) {
      // Never return while host reads of this request still run: the caller may close the file
      // next, and a late rejection would go unhandled (fatal in the daemon).
      await Promise.allSettled(pending);
      throw err;
    }
  }

  async status(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, offset, length);
    if (this.allocationsPending()) await this.writer!.settleAllocations();
    const out: Extent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const m = await this.mapper.lookup(this.l1, pos, end - pos);
      if (m.kind === 'unallocated' && this.backing) {
        const inBacking = Math.max(0, Math.min(m.length, this.backing.size - pos));
        if (inBacking > 0) {
          for (const e of await this.backing.status(pos, inBacking)) out.push({ ...e, depth: e.depth + 1 });
        }
        if (inBacking < m.length) out.push({ offset: pos + inBacking, length: m.length - inBacking, kind: 'hole', depth: 1 });
      } else if (m.kind === 'unallocated') {
        out.push({ offset: pos, length: m.length, kind: 'hole', depth: 0 });
      } else if (m.kind === 'zero') {
        out.push({ offset: pos, length: m.length, kind: 'zero', depth: 0 });
      } else if (m.kind === 'data') {
        out.push({ offset: pos, length: m.length, kind: 'data', depth: 0, hostOffset: m.hostOffset });
      } else {
        out.push({ offset: pos, length: m.length, kind: 'data', depth: 0, compressed: true });
      }
      pos += m.length;
    }
    return mergeExtents(out);
  }

  async allocatedBytes(): Promise<number> {
    const st = await this.file.stat();
    return st.blocks * 512;
  }

  /** Not async: the writer's fast path returns its pwrite's promise, without another hop. */
  write(buf: Uint8Array, offset: number): Promise<void> {
    try {
      if (!this.writer) throw new ReadOnlyError(`${this.description} is read-only`);
      checkRange(this, offset, buf.length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.writer.write(buf, offset);
  }

  /** Grows the virtual disk (shrinking is refused). */
  async resize(newSizeBytes: number): Promise<void> {
    if (!this.writer) throw new ReadOnlyError(`${this.description} is read-only`);
    await this.writer.resize(newSizeBytes);
  }

  /** The range reads as zeros afterwards; whole clusters give their host space back (see Qcow2Writer.writeZeroes). */
  async discard(offset: number, length: number): Promise<void> {
    if (!this.writer) throw new ReadOnlyError(`${this.description} is read-only`);
    checkRange(this, offset, length);
    await this.writer.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    if (this.writer) await this.writer.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.decompressed.close();
      if (this.writer) await this.writer.close();
    } finally {
      this.l2Cache.clear();
      await this.file.close();
      if (this.backing) await this.backing.close();
    }
  }
}

/** Reads and validates the header of a qcow2 file. */
/**
 * The snapshot table, read in growing pieces (its size is known only by decoding it): a few KiB
 * for the usual handful of snapshots instead of everything up to 64 MiB (mount time).
 */
async function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  ctx: Parameters<typeof decodeSnapshotTable>[2],
): Promise<ReturnType<typeof decodeSnapshotTable>> {
  const most = Math.min(ctx.fileSize - offset, MAX_SNAPSHOT_TABLE_BYTES);
  let want = Math.min(most, Math.max(64 * 1024, count * 1024));
  for (;;) {
    const table = Buffer.alloc(want);
    await file.pread(table, offset);
    try {
      return decodeSnapshotTable(table, count, ctx);
    } catch (err) {
      // "truncated" in a partial read: read more; anything else, or the whole table, is final.
      if (!(err instanceof ImageError) || !/truncated/.test(err.message) || want >= most) throw err;
      want = Math.min(most, want * 8);
    }
  }
}

/** At most this much of the file is read as the snapshot table. */
const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
/** The first read of an image: the header and its extensions, which end within the first cluster. */
const HEADER_FIRST_READ_BYTES = 64 * 1024;

export async function readHeader(file: HostFile): Promise<{ header: Qcow2Header; fileSize: number }> {
  const fileSize = await file.size();
  let head = Buffer.alloc(Math.min(HEADER_FIRST_READ_BYTES, fileSize));
  await file.pread(head, 0);
  // The extensions may run to the end of the first cluster: read it all when it is larger.
  const clusterBits = head.length >= 24 ? head.readUInt32BE(20) : 0;
  const firstCluster = clusterBits >= 9 && 2 ** clusterBits <= HEADER_PROBE_BYTES ? 2 ** clusterBits : HEADER_PROBE_BYTES;
  if (Math.min(firstCluster, fileSize) > head.length) {
    head = Buffer.alloc(Math.min(firstCluster, fileSize));
    await file.pread(head, 0);
  }
  try {
    return { header: decodeHeader(head, fileSize), fileSize };
  } catch (err) {
    if (err instanceof ImageError && !err.file) throw new (err.constructor as typeof ImageError)(err.message, file.path);
    throw err;
  }
}

/** Merges adjacent extents of one kind and depth (host-contiguous for data). */
export function mergeExtents(list: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    const last = out[out.length - 1];
    if (
      last &&
      last.kind === e.kind &&
      last.depth === e.depth &&
      !!last.compressed === !!e.compressed &&
      last.offset + last.length === e.offset &&
      (last.hostOffset === undefined ? e.hostOffset === undefined : e.hostOffset === last.hostOffset + last.length)
    ) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

async function readL1(
  file: HostFile,
  offset: number,
  size: number,
  clusterSize: number,
  fileSize: number,
  regions: readonly Region[],
  what: string,
): Promise<L1Table> {
  const raw = Buffer.alloc(size * 8);
  if (size > 0) await file.pread(raw, offset);
  const l2Offsets = new Float64Array(size);
  const copied = new Uint8Array(size);
  for (let i = 0; i < size; i++) {
    const hi = raw.readUInt32BE(i * 8);
    const lo = raw.readUInt32BE(i * 8 + 4);
    const l2 = entryOffset(hi, lo);
    if (l2 === 0) continue;
    const where = `${what}L1 entry ${i}: L2 table offset 0x${l2.toString(16)}`;
    if (l2 % clusterSize !== 0) throw new ImageError(`${where} is not aligned to the cluster size`, file.path);
    if (l2 + clusterSize > fileSize) throw new ImageError(`${where} lies past the end of the file`, file.path);
    for (const r of regions) {
      if (rangesOverlap(l2, clusterSize, r.offset, r.length)) throw new ImageError(`${where} points into the ${r.what}`, file.path);
    }
    l2Offsets[i] = l2;
    copied[i] = hi & OFLAG_COPIED_HI ? 1 : 0;
  }
  return { tableOffset: offset, l2Offsets, copied };
}
