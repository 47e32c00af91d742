/**
 * The one interface the FUSE layer and the toolkit know. A qcow2 image, a raw file, a snapshot
 * view and an overlay are all BlockDevices.
 */

/** How a guest range is backed, as reported by status(). */
export type ExtentKind = 'data' | 'zero' | 'backing' | 'hole';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /** Depth in the chain where the answer came from (0 = this image). */
  depth: number;
  /** Host offset in the file at `depth`, for uncompressed data. */
  hostOffset?: number;
  compressed?: boolean;
}

/**
 * How a guest range is stored, as far as cached metadata tells without I/O: for a read path that
 * answers reads without the engine (the FUSE layer's direct read map). `length` is how far the
 * answer holds (> 0).
 */
export type PlainRun =
  /**
   * Host bytes of an open descriptor, host-contiguous; bytes past the file's end read as zeros.
   * `writable`: writes may go to the same host bytes, with nothing else to update.
   */
  | { kind: 'data'; length: number; fd: number; hostOffset: number; writable: boolean }
  /**
   * `allocatable`: a write may give these clusters fresh host clusters (from reserveFresh) without
   * the engine, which takes them into its metadata later (MappingObserver.takeAllocations).
   */
  | { kind: 'zero'; length: number; allocatable?: boolean }
  /**
   * One compressed cluster of `clusterBytes` (length: from the offset asked to its end):
   * `compressedBytes` at hostOffset of fd, `compression` the header's compression_type.
   */
  | { kind: 'compressed'; length: number; fd: number; hostOffset: number; compressedBytes: number; compression: number; clusterBytes: number }
  /** Anything else (metadata not cached, ...): only the engine can read it. */
  | { kind: 'other'; length: number };

/** Told about mapping changes, so that caches of plainRunCached() answers stay true. */
export interface MappingObserver {
  /** The mapping of guest bytes [offset, +length) changes; called before the change can be seen. */
  changed(offset: number, length: number): void;
  /** Host space that held guest data is being freed and may be reused once this returns. */
  freeing(): void;
  /**
   * Clusters the observer allocated itself (writes to `allocatable` clusters, into clusters from
   * reserveFresh), not yet in the engine's metadata: moves them into `out` as pairs [guest
   * cluster, host offset] and returns the pair count (0: none). The engine takes them before it
   * looks at those clusters' metadata, and calls adopted() once they are in it.
   */
  takeAllocations?(out: Float64Array): number;
  adopted?(pairs: number): void;
  /** Whether there are such allocations now (cheap: reads and status take them first). */
  pendingAllocations?(): boolean;
}

export interface BlockDevice {
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** A short description for logs and errors ("qcow2 /path/img.qcow2"). */
  readonly description: string;
  /** Fills buf with the guest bytes at [offset, offset + buf.length); the range must lie inside size. */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * read() done synchronously when everything it needs is at hand (metadata cached, host data in
   * the page cache); false when it is not, and then buf may be partly written: call read(). Saves
   * the Promise chain on the hot path of small reads (FUSE requests).
   */
  readCached?(buf: Uint8Array, offset: number): boolean;
  /** Granule of plainRunCached() answers (the cluster size); present with it. */
  readonly mapGranuleBytes?: number;
  /** Guest bytes one metadata table maps (a qcow2 L2 table): a cheap unit to learn mappings in. */
  readonly mapRegionBytes?: number;
  /** See PlainRun; [offset, +maxLength) must lie inside size. */
  plainRunCached?(offset: number, maxLength: number): PlainRun;
  /**
   * Registers the one observer of mapping changes (null removes it). A writable device without
   * this method must not have its plainRunCached() answers cached.
   */
  observeMappings?(obs: MappingObserver | null): void;
  /** Data was written to `writable` plainRunCached() ranges by someone else: flush() must sync it. */
  noteExternalWrites?(): void;
  /**
   * `clusters` fresh host clusters of the descriptor `fd` (contiguous, reading as zeros, their
   * refcount taken) for a MappingObserver that allocates itself; null when the device cannot.
   */
  reserveFresh?(clusters: number): Promise<{ fd: number; hostOffset: number } | null>;
  /** Gives back reserved clusters [hostOffset, +bytes) that were not used. */
  releaseFresh?(hostOffset: number, bytes: number): Promise<void>;
  /** Takes the observer's allocations (takeAllocations) into the metadata now. */
  settleAllocations?(): Promise<void>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** The range reads as zeros afterwards, and its host space may be given back. */
  discard(offset: number, length: number): Promise<void>;
  /** Grows (or, where allowed, shrinks) the virtual size; absent when the device cannot. */
  resize?(newSizeBytes: number): Promise<void>;
  /** Durable on return. */
  flush(): Promise<void>;
  status(offset: number, length: number): Promise<Extent[]>;
  /** Bytes the device's own file(s) occupy on the host disk (for st_blocks). */
  allocatedBytes(): Promise<number>;
  close(): Promise<void>;
}

export function checkRange(dev: { size: number; description: string }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > dev.size) {
    throw new RangeError(`${dev.description}: request [${offset}, +${length}) outside the device (size ${dev.size})`);
  }
}
