// Types for the parts of fuse-native (which ships none) that qcow2fs uses.
declare module 'fuse-native' {
  namespace Fuse {
  type Cb<T extends unknown[] = []> = (err: number, ...rest: T) => void;
  interface FuseStat {
    mode: number;
    uid: number;
    gid: number;
    size: number;
    nlink?: number;
    ino?: number;
    blksize?: number;
    blocks?: number;
    atime: Date | number;
    mtime: Date | number;
    ctime: Date | number;
  }
  interface FuseStatfs {
    bsize: number;
    frsize: number;
    blocks: number;
    bfree: number;
    bavail: number;
    files: number;
    ffree: number;
    favail: number;
    fsid: number;
    flag: number;
    namemax: number;
  }
  interface FuseOps {
    init?(cb: Cb): void;
    getattr?(path: string, cb: Cb<[FuseStat?]>): void;
    fgetattr?(path: string, fd: number, cb: Cb<[FuseStat?]>): void;
    readdir?(path: string, cb: Cb<[string[]?, FuseStat[]?]>): void;
    open?(path: string, flags: number, cb: Cb<[number?]>): void;
    release?(path: string, fd: number, cb: Cb): void;
    read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void): void;
    write?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void): void;
    flush?(path: string, fd: number, cb: Cb): void;
    fsync?(path: string, datasync: boolean, fd: number, cb: Cb): void;
    truncate?(path: string, size: number, cb: Cb): void;
    ftruncate?(path: string, fd: number, size: number, cb: Cb): void;
    /** vendor/fuse-native only (mode: FALLOC_FL_* bits). */
    fallocate?(path: string, fd: number, mode: number, offset: number, length: number, cb: Cb): void;
    statfs?(path: string, cb: Cb<[FuseStatfs?]>): void;
    utimens?(path: string, atime: number, mtime: number, cb: Cb): void;
    chmod?(path: string, mode: number, cb: Cb): void;
    chown?(path: string, uid: number, gid: number, cb: Cb): void;
    access?(path: string, mode: number, cb: Cb): void;
    create?(path: string, mode: number, cb: Cb<[number?]>): void;
    unlink?(path: string, cb: Cb): void;
  }
  interface FuseOptions {
    fsname?: string;
    subtype?: string;
    allowOther?: boolean;
    defaultPermissions?: boolean;
    kernelCache?: boolean;
    maxRead?: number;
    timeout?: number | false;
    force?: boolean;
    mkdir?: boolean;
    debug?: boolean;
    /** vendor/fuse-native only: add FUSE_ASYNC_DIO to libfuse 2.9's INIT answer. */
    asyncDio?: boolean;
    /** vendor/fuse-native only: add FUSE_MAX_PAGES with this many pages (0: the kernel's 32). */
    maxPages?: number;
  }
  /** vendor/fuse-native only: the native side of direct read maps (see src/fuse/direct-read.ts). */
  interface DirectReadMapsNative {
    /** A map for the file at `path`; its index, or -1. */
    attach(path: string, clusterBits: number, slotBits: number, sizeBytes: number): number;
    /**
     * Sets the slots of `count` runs [first guest cluster, clusters, fd (-1: zeros, -2: zeros and
     * allocatable), host offset of the first] (host clusters consecutive); refused (false) unless
     * `adopted` equals the allocations done natively so far.
     */
    publish(index: number, runs: Float64Array, count: number, adopted: number): boolean;
    /** Empties the slots of clusters [firstCluster, +count); count -1: every slot. */
    invalidate(index: number, firstCluster: number, count: number): void;
    /** Returns once no direct read that started before the call is still running. */
    quiesce(index: number): void;
    setSize(index: number, sizeBytes: number): void;
    /** Every later read goes to JS; returns once running direct reads have ended. */
    disable(index: number): void;
    /**
     * [reads answered natively, reads handed to JS, writes done natively, writes handed to JS,
     * clusters allocated natively, of them not taken yet, pool bytes left, compressed clusters
     * decoded natively, of them by read-ahead, reads that waited for room in the decoded-cluster
     * cache].
     */
    stats(index: number): [number, number, number, number, number, number, number, number, number, number];
    /** Moves native allocations [guest cluster, host offset, ...] from the log into out; the pair count. */
    takeAllocations(index: number, out: Float64Array): number;
    /** Adds fresh host clusters [host, +bytes) of fd to the pool; false when the pool is full. */
    supply(index: number, fd: number, host: number, bytes: number): boolean;
    /** Empties the pool: [host, bytes, ...] of what was left. */
    takePool(index: number): number[];
    /** Native allocations not taken yet. */
    pending(index: number): number;
    /** cb runs (on the JS thread) when the pool runs low or the allocation log is half full. */
    onLow(index: number, cb: () => void): void;
    /**
     * Gives the binding the codec addon's decoder (its api() external), for every map: slots may
     * then say "compressed" (fd | 0x20000000, | 0x10000000 for zstd; host = offset + (512-byte
     * sectors its bytes touch) * 2^39).
     * False where the binding or the table does not fit.
     */
    setCodec(api: unknown): boolean;
  }
  }
  class Fuse {
    constructor(mnt: string, ops: FuseOps, opts?: FuseOptions);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    protected _fuseOptions(): string;
    /** vendor/fuse-native only: the INIT flags answered to the kernel (0 with the stock binary). */
    initFlags?(): number;
    /** vendor/fuse-native only: direct read maps of this mount (null before mounting). */
    directReadMaps?(): Fuse.DirectReadMapsNative | null;
    /** True for vendor/fuse-native's own build, false for the stock prebuilt binary. */
    static readonly patched?: boolean;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly EPERM: number;
    static readonly ENOENT: number;
    static readonly EIO: number;
    static readonly EBADF: number;
    static readonly EACCES: number;
    static readonly EBUSY: number;
    static readonly EEXIST: number;
    static readonly ENOTDIR: number;
    static readonly EISDIR: number;
    static readonly EINVAL: number;
    static readonly EFBIG: number;
    static readonly ENOSPC: number;
    static readonly EROFS: number;
    static readonly ENOSYS: number;
    static readonly EOPNOTSUPP: number;
    static readonly ENOTCONN: number;
  }
  export = Fuse;
}
