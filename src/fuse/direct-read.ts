/**
 * Direct read maps: reads answered by the binding's worker threads without the JS thread.
 *
 * A FUSE request normally wakes four threads (kernel -> libfuse worker -> JS -> worker ->
 * kernel); QEMU's export wakes two. The vendored binding (vendor/fuse-native, qcow2fs_fast_read)
 * keeps, per raw file, a direct-mapped table of guest clusters: "host bytes of descriptor fd at
 * this offset" or "zeros". A read whose clusters all have a slot is answered on the worker with
 * pread (contiguous clusters merged); any other read goes to the engine as before.
 *
 * The map only caches the engine's answers (BlockDevice.plainRunCached, from cached metadata):
 *  - after the engine has served a read, the clusters it touched are published; the first time
 *    a region is read through the engine, the whole region is (what one L2 table maps, at most
 *    WINDOW_CLUSTERS clusters), so random reads stop missing after one read per region;
 *  - the engine's writer tells the device's MappingObserver before a mapping changes
 *    (invalidate) and before host clusters are freed (quiesce: wait for direct reads that may
 *    have seen the old slot), so a direct read never sees a stale or reused host cluster;
 *  - only devices that are read-only or report their mapping changes get a map.
 * Writes work the same way: a slot may say "writable" (a cluster the active layer owns, which
 * the engine itself would write in place); a write whose clusters all are is done on the worker
 * with pwrite, and counted; the count reaches the device (noteExternalWrites) before every
 * flush/fsync, so the flush syncs them.
 * Allocating writes too: a zero slot may say "allocatable" (PlainRun 'zero', allocatable: no host
 * cluster, nothing of the engine deciding about it). The binding then takes a fresh host cluster
 * from a pool the engine reserved (BlockDevice.reserveFresh: zeros, refcount taken), makes the
 * slot writable there, logs the pair (guest cluster, host) and writes. The engine takes the log
 * (MappingObserver.takeAllocations) into its L2 tables before it next looks at those clusters'
 * metadata (its writes, discards, flushes, reads and status: pendingAllocations), when the log
 * is half full, and every SETTLE_INTERVAL_MS; until it has, the map refuses publishes (they would be stale). Unused pool
 * clusters go back at close.
 * QCOW2FS_NO_DIRECT_READ=1 turns it off (A/B measurements, debugging); QCOW2FS_NO_NATIVE_ALLOC=1
 * only the allocating writes.
 */
import type FuseTypes from 'fuse-native';
import type { BlockDevice, MappingObserver, PlainRun } from '../image/blockdev';
import { log } from '../log';
import { nativeDecoderApi } from '../qcow2/codec';

/** Slots per map at most (24 bytes each, touched lazily): 2^18 covers 16 GiB of 64 KiB clusters. */
const MAX_SLOT_BITS = 18;
/** Clusters published at once when a region is first read through the engine. */
const WINDOW_CLUSTERS = 8192;
/** Regions remembered as published whole (then the set starts again). */
const MAX_REGIONS_REMEMBERED = 65536;
/** Runs [first cluster, clusters, fd, host] per native publish call. */
const BATCH = 256;
/** Flag added to a slot's fd: writes may go to the same host bytes (see PlainRun.writable). */
const SLOT_WRITABLE = 0x40000000;
/** Half the binding's allocation log (QCOW2FS_ALLOC_LOG_PAIRS): it asks to be taken then. */
const ALLOC_LOG_HALF = 4096;
/** A slot's fd for zeros that a write may allocate. */
const SLOT_ALLOCATABLE = -2;
/**
 * A compressed cluster's slot: fd | SLOT_COMPRESSED (| SLOT_ZSTD), host = offset + (512-byte
 * sectors its bytes touch) * 2^CHOST_BITS, exact in a double. Published only where that fits.
 */
const SLOT_COMPRESSED = 0x20000000;
const SLOT_ZSTD = 0x10000000;
const CHOST_BITS = 39;
const MAX_CFD = 0x0fffffff;
const MAX_CSECTORS = 2 ** (53 - CHOST_BITS) - 1;

/** Whether the binding decodes compressed clusters itself (decided once per process). */
let nativeDecode: boolean | undefined;

function nativeDecodeOn(native: FuseTypes.DirectReadMapsNative): boolean {
  if (nativeDecode === undefined) {
    nativeDecode = false;
    if (process.env.QCOW2FS_NO_NATIVE_DECODE === undefined && typeof native.setCodec === 'function') {
      const api = nativeDecoderApi();
      nativeDecode = api !== null && native.setCodec(api);
    }
  }
  return nativeDecode;
}
/** Fresh clusters reserved at a time (the binding holds two such ranges at most). */
const POOL_BYTES = 32 * 1024 * 1024;
const POOL_MIN_CLUSTERS = 16;
const POOL_MAX_CLUSTERS = 4096;
/**
 * How often allocations done natively are taken into the engine's metadata when nothing else
 * does (QCOW2FS_ALLOC_SETTLE_MS: tests make it long, so that only reads, writes and flushes do).
 */
const SETTLE_INTERVAL_MS = Number(process.env.QCOW2FS_ALLOC_SETTLE_MS) > 0 ? Number(process.env.QCOW2FS_ALLOC_SETTLE_MS) : 500;

export class DirectReadMap implements MappingObserver {
  private readonly clusterSize: number;
  private readonly windowBytes: number;
  /** Regions (of windowBytes) already published whole after a read, and after a write. */
  private readonly published = new Set<number>();
  private readonly publishedForWrites = new Set<number>();
  /** The binding's count of writes it did itself, as last passed on to the device. */
  private nativeWrites = 0;
  private readonly runs = new Float64Array(BATCH * 4);
  private pending = 0;
  private closed = false;
  /** Writes may allocate clusters from a pool (see the top of this file). */
  private readonly allocating: boolean;
  private readonly poolClusters: number;
  /** Native allocations the engine has taken into its metadata. */
  private adoptedCount = 0;
  /** A publish was refused (allocations not taken yet) during the current learn(). */
  private refused = false;
  private poolRequest: Promise<void> | null = null;
  /** The engine has served a write (the pool is reserved from then on). */
  private written = false;
  private settleTimer: NodeJS.Timeout | null = null;
  /** Compressed clusters get slots (the binding decodes them). */
  private readonly decoding: boolean;

  private constructor(
    private readonly native: FuseTypes.DirectReadMapsNative,
    private readonly index: number,
    private readonly dev: BlockDevice,
    readonly path: string,
    clusterBits: number,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.windowBytes = Math.min(this.clusterSize * WINDOW_CLUSTERS, dev.mapRegionBytes ?? Infinity);
    this.decoding = nativeDecodeOn(native);
    this.allocating =
      !dev.readOnly && dev.reserveFresh !== undefined && dev.releaseFresh !== undefined && dev.settleAllocations !== undefined && process.env.QCOW2FS_NO_NATIVE_ALLOC === undefined;
    const diskClusters = Math.ceil(dev.size / this.clusterSize);
    this.poolClusters = Math.max(1, Math.min(diskClusters, Math.max(POOL_MIN_CLUSTERS, Math.min(POOL_MAX_CLUSTERS, Math.floor(POOL_BYTES / this.clusterSize)))));
    if (this.allocating) {
      this.settleTimer = setInterval(() => this.tick(1), SETTLE_INTERVAL_MS);
      this.settleTimer.unref();
      // A range of the pool used up, or the log half full: top up and take it before writes
      // have to wait for JS.
      native.onLow(index, () => this.tick(ALLOC_LOG_HALF));
    }
  }

  /** A map for the raw file at `path` of a mounted Fuse, or null (stock binding, unsuitable device, turned off). */
  static attach(fuse: FuseTypes, path: string, dev: BlockDevice, observed: Set<BlockDevice>): DirectReadMap | null {
    if (process.env.QCOW2FS_NO_DIRECT_READ !== undefined) return null;
    const native = fuse.directReadMaps?.() ?? null;
    if (native === null || !dev.plainRunCached || !dev.mapGranuleBytes) return null;
    // Writes the binding does itself must reach the device's flush.
    if (!dev.readOnly && !dev.noteExternalWrites) return null;
    // A writable device has one observer: a second path to it goes through the engine only.
    if (!dev.readOnly && (!dev.observeMappings || observed.has(dev))) return null;
    const clusterBits = Math.log2(dev.mapGranuleBytes);
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 30) return null;
    const clusters = Math.max(1, Math.ceil(dev.size / dev.mapGranuleBytes));
    const slotBits = Math.min(MAX_SLOT_BITS, Math.max(4, Math.ceil(Math.log2(clusters))));
    const index = native.attach(path, clusterBits, slotBits, dev.size);
    if (index < 0) return null;
    const map = new DirectReadMap(native, index, dev, path, clusterBits);
    dev.observeMappings?.(map);
    observed.add(dev);
    log.debug({ path, clusterBits, slotBits }, 'direct read map attached');
    return map;
  }

  /**
   * After the engine served [offset, +length): publish what cached metadata says about those
   * clusters, or about their whole region the first time it is read.
   */
  learn(offset: number, length: number, afterWrite = false): void {
    if (this.closed || length <= 0) return;
    const region = Math.floor(offset / this.windowBytes);
    // After the first write of a region its clusters may have become writable in place: again.
    const seen = afterWrite ? this.publishedForWrites : this.published;
    // Bounded: tiny clusters on a huge disk make many regions (forgetting one costs a republish).
    if (seen.size >= MAX_REGIONS_REMEMBERED) seen.clear();
    const cs = this.clusterSize;
    let from = Math.floor(offset / cs) * cs;
    const to = Math.min(this.dev.size, Math.ceil((offset + length) / cs) * cs);
    this.refused = false;
    if (!seen.has(region)) {
      seen.add(region);
      const regionEnd = Math.min(this.dev.size, (region + 1) * this.windowBytes);
      this.publishRange(region * this.windowBytes, regionEnd);
      // The request's own clusters were in it, unless the request runs into the next region.
      from = Math.max(from, regionEnd);
    }
    if (from < to) this.publishRange(from, to);
    if (this.refused) {
      // The engine's answers were stale (native allocations not taken yet): again next time.
      seen.delete(region);
      this.settleSoon();
    }
    // The first write reserves the pool; the binding asks for more itself (onLow), the tick too.
    if (afterWrite && !this.written) this.ensurePool();
  }

  /** Publishes every cluster of [start, end) (start cluster-aligned) that one plain run covers whole. */
  private publishRange(start: number, end: number): void {
    const dev = this.dev;
    const cs = this.clusterSize;
    const size = dev.size;
    let pos = start;
    try {
      while (pos < end) {
        const run = dev.plainRunCached!(pos, end - pos);
        if (!(run.length > 0)) break;
        const runEnd = pos + run.length;
        if (run.kind === 'compressed') {
          // A whole cluster of this map's size (a backing file's other cluster size: not here).
          if (this.decoding && run.clusterBytes === cs && pos % cs === 0 && (run.length === cs || runEnd >= size)) this.emitCompressed(pos / cs, run);
        } else if (run.kind !== 'other') {
          // Clusters that start inside the run and end inside it (or at the device's end).
          const first = Math.ceil(pos / cs);
          const end = runEnd >= size ? Math.ceil(size / cs) : Math.floor(runEnd / cs);
          if (end > first) {
            if (run.kind === 'data') this.emit(first, end - first, run.writable ? run.fd + SLOT_WRITABLE : run.fd, run.hostOffset + (first * cs - pos));
            else this.emit(first, end - first, run.allocatable && this.allocating ? SLOT_ALLOCATABLE : -1, 0);
          }
        }
        pos = runEnd;
      }
    } catch {
      // A corrupt entry: the engine reports it when that range is read; publish nothing more.
    }
    this.flushEmits();
  }

  /** Slots for clusters [first, +count): fd and consecutive host clusters from host. */
  private emit(first: number, count: number, fd: number, host: number): void {
    const t = this.runs;
    const i = this.pending * 4;
    t[i] = first;
    t[i + 1] = count;
    t[i + 2] = fd;
    t[i + 3] = host;
    if (++this.pending === BATCH) this.flushEmits();
  }

  /** The slot of compressed cluster `cluster` (see SLOT_COMPRESSED), where its words can say it. */
  private emitCompressed(cluster: number, run: Extract<PlainRun, { kind: 'compressed' }>): void {
    const sectors = (run.compressedBytes + (run.hostOffset % 512)) / 512;
    if (run.fd > MAX_CFD || run.compression > 1 || run.hostOffset >= 2 ** CHOST_BITS || !Number.isInteger(sectors) || sectors > MAX_CSECTORS) return;
    const fd = run.fd + SLOT_COMPRESSED + (run.compression === 1 ? SLOT_ZSTD : 0);
    this.emit(cluster, 1, fd, run.hostOffset + sectors * 2 ** CHOST_BITS);
  }

  private flushEmits(): void {
    if (this.pending === 0) return;
    if (!this.native.publish(this.index, this.runs, this.pending, this.adoptedCount)) this.refused = true;
    this.pending = 0;
  }

  // Native allocations

  takeAllocations(out: Float64Array): number {
    return this.allocating ? this.native.takeAllocations(this.index, out) : 0;
  }

  adopted(pairs: number): void {
    this.adoptedCount += pairs;
  }

  /** Whether the binding allocated clusters the engine has not taken yet (a read must wait for them). */
  pendingAllocations(): boolean {
    return this.allocating && !this.closed && this.native.pending(this.index) > 0;
  }

  private settleSoon(): void {
    if (this.closed || !this.allocating) return;
    this.dev.settleAllocations!().catch((err: unknown) => log.error({ path: this.path }, `taking native allocations failed: ${(err as Error).message}`));
  }

  /**
   * Periodically, and when the binding's pool ran low or its log is half full (onLow): takes the
   * log once it holds `minPending` allocations, and tops the pool up.
   */
  private tick(minPending: number): void {
    if (this.closed) return;
    if (this.native.pending(this.index) >= minPending) this.settleSoon();
    if (this.written) this.ensurePool();
  }

  /**
   * Keeps the binding's pool of fresh clusters at one range or more, once the device was written
   * through the engine (a mount that is never written leaves the image as it was).
   */
  private ensurePool(): void {
    this.written = true;
    if (!this.allocating || this.closed || this.poolRequest !== null) return;
    // Two ranges: one in use, one to go on with while JS reserves the next.
    if (this.native.stats(this.index)[6] >= 2 * this.poolClusters * this.clusterSize) return;
    const bytes = this.poolClusters * this.clusterSize;
    const dev = this.dev;
    let supplied = false;
    this.poolRequest = dev
      .reserveFresh!(this.poolClusters)
      .then(async (r) => {
        if (r === null) return;
        supplied = !this.closed && this.native.supply(this.index, r.fd, r.hostOffset, bytes);
        if (!supplied) await dev.releaseFresh!(r.hostOffset, bytes);
      })
      .catch((err: unknown) => log.debug({ path: this.path, err: (err as Error).message }, 'no fresh clusters for native allocation'))
      .finally(() => {
        this.poolRequest = null;
        // Up to two ranges (one reservation at a time).
        if (supplied) this.ensurePool();
      });
  }

  // MappingObserver (called by the engine's writer, on the JS thread)

  changed(offset: number, length: number): void {
    if (this.closed) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.ceil((offset + length) / this.clusterSize);
    this.native.invalidate(this.index, first, last - first);
  }

  freeing(): void {
    if (!this.closed) this.native.quiesce(this.index);
  }

  /** The device's size changed (truncate of the raw file). */
  resized(): void {
    if (!this.closed) this.native.setSize(this.index, this.dev.size);
  }

  /**
   * [reads answered natively, reads handed to the engine, writes done natively, writes handed to
   * the engine, clusters allocated natively, of them not taken yet, pool bytes left, compressed
   * clusters decoded natively, of them by read-ahead, reads that waited for room in the
   * decoded-cluster cache].
   */
  stats(): [number, number, number, number, number, number, number, number, number, number] {
    return this.native.stats(this.index);
  }

  /**
   * Passes writes the binding did itself on to the device (so its next flush syncs them); true
   * if there were any since the last call. Before every flush/fsync, and for the file's mtime.
   */
  syncWrites(): boolean {
    const writes = this.native.stats(this.index)[2];
    if (writes === this.nativeWrites) return false;
    this.nativeWrites = writes;
    this.dev.noteExternalWrites?.();
    return true;
  }

  /**
   * Before the device closes: no direct read or write runs or starts any more, native
   * allocations are in the engine's metadata, and unused pool clusters are given back.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.native.disable(this.index);
    if (this.settleTimer) clearInterval(this.settleTimer);
    this.settleTimer = null;
    if (this.allocating) {
      await this.poolRequest;
      try {
        await this.dev.settleAllocations!();
        const left = this.native.takePool(this.index);
        // The last range first, so that the file's end can move back over both.
        for (let i = left.length - 2; i >= 0; i -= 2) await this.dev.releaseFresh!(left[i]!, left[i + 1]!);
      } catch (err) {
        log.error({ path: this.path }, `taking native allocations failed: ${(err as Error).message}`);
      }
    }
    this.syncWrites();
    this.closed = true;
    this.dev.observeMappings?.(null);
    const [hits, misses, writes, writeMisses, allocs, , , decoded, decodedAhead, decodeWaits] = this.stats();
    log.debug({ path: this.path, hits, misses, writes, writeMisses, allocs, decoded, decodedAhead, decodeWaits }, 'direct read map closed');
  }
}
