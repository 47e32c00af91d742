/**
 * Positional I/O on a file descriptor. Everything the engines read or write goes through the
 * HostFile interface, so tests can interpose (e.g. to record writes and flush barriers for
 * crash-state replay) without the engines knowing.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describeSystemError, UsageError } from '../errors';

export interface HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  /** Reads exactly buf.length bytes at `offset`; bytes past end of file read as zeros. Returns bytes really read. */
  pread(buf: Uint8Array, offset: number): Promise<number>;
  /** Reads all of buf at `offset` from the page cache on this thread; false (buf maybe partly written) if it cannot. */
  preadCached?(buf: Uint8Array, offset: number): boolean;
  /** Writes all of buf at `offset`. */
  pwrite(buf: Uint8Array, offset: number): Promise<void>;
  /** Writes the buffers back to back starting at `offset`, in as few system calls as it can. */
  pwritev(bufs: readonly Uint8Array[], offset: number): Promise<void>;
  /** Makes every completed write durable (fdatasync). A barrier for crash ordering. */
  flush(): Promise<void>;
  /** Current file length in bytes. */
  size(): Promise<number>;
  truncate(sizeBytes: number): Promise<void>;
  stat(): Promise<fs.Stats>;
  close(): Promise<void>;
  readonly fd: number;
}

/**
 * The size of a block device (fstat gives 0 for one): its 512-byte sectors in sysfs, found by
 * device number. 0 when sysfs does not say.
 */
export function blockDeviceBytes(st: fs.Stats): number {
  // glibc's dev_t: major in bits 8-19 and 44-63, minor in bits 0-7 and 20-43.
  const dev = BigInt(st.rdev);
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  try {
    const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
    return Number.isSafeInteger(sectors) && sectors >= 0 ? sectors * 512 : 0;
  } catch {
    return 0;
  }
}

/**
 * What an output path (convert, create) is: missing, a regular file (both written, and removed
 * again if the command fails), a block device (written in place, never removed or truncated),
 * or something else, refused before anything is opened: a character device, FIFO, socket or
 * directory is never written to, and never removed.
 */
export function outputKind(path: string): 'missing' | 'file' | 'block-device' {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    throw new UsageError(describeSystemError(err, path));
  }
  if (st.isFile()) return 'file';
  if (st.isBlockDevice()) return 'block-device';
  const what = st.isDirectory() ? 'a directory' : st.isCharacterDevice() ? 'a character device' : st.isFIFO() ? 'a FIFO' : st.isSocket() ? 'a socket' : 'not a regular file';
  throw new UsageError(`${path}: is ${what}; the output must be a regular file or a block device`);
}

function readOnce(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeOnce(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/**
 * Writes up to this size are issued synchronously on the calling thread. A buffered write only
 * copies into the page cache (a few microseconds for 128 KiB), while a round trip through
 * libuv's thread pool costs two thread hand-offs; for FUSE requests, which the kernel sends one
 * at a time for a buffered writer, the hand-offs dominated (measured: 255 -> see PERFORMANCE.md).
 */
const SYNC_WRITE_MAX_BYTES = syncWriteMax();

/**
 * 1 MiB: a whole FUSE write request (max_write). Up to 256 KiB before; with 1 MiB, sequential
 * 1 MiB allocating writes went 331-369 -> 376-398 MiB/s (same run, alternating). Most reads and
 * in-place writes no longer reach the JS thread (the direct maps), so blocking it for the ~1 ms
 * of a 1 MiB page-cache copy delays little else. QCOW2FS_SYNC_WRITE_MAX (bytes) overrides.
 */
function syncWriteMax(): number {
  const v = Number(process.env.QCOW2FS_SYNC_WRITE_MAX);
  return Number.isInteger(v) && v >= 0 ? v : 1024 * 1024;
}

function writeAllSync(fd: number, bufs: readonly Uint8Array[], offset: number): void {
  let list = bufs.filter((b) => b.length > 0);
  let pos = offset;
  while (list.length > 0) {
    const total = list.reduce((s, b) => s + b.length, 0);
    const n = list.length === 1 ? fs.writeSync(fd, list[0]!, 0, list[0]!.length, pos) : fs.writevSync(fd, list as NodeJS.ArrayBufferView[], pos);
    pos += n;
    if (n === total) return;
    list = withoutWritten(list, n);
  }
}

/** The buffers still to write after a short write of `n` bytes. */
function withoutWritten(list: readonly Uint8Array[], n: number): Uint8Array[] {
  let skip = n;
  const rest: Uint8Array[] = [];
  for (const b of list) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    rest.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return rest;
}

/** Reads up to this size try the page cache synchronously first (preadv2 RWF_NOWAIT). */
const NOWAIT_READ_MAX_BYTES = 1024 * 1024;

interface IoAddon {
  preadNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
  seekDataHole(fd: number, position: number, wantHole: boolean): number;
  punchHole?(fd: number, position: number, length: number): number;
}

const ENXIO = 6;

/** fallocate(PUNCH_HOLE | KEEP_SIZE): true if the range is now a hole (reads as zeros). */
export function punchHole(fd: number, position: number, length: number): boolean {
  const a = ioAddon();
  return !!a?.punchHole && a.punchHole(fd, position, length) === 0;
}

/**
 * Whether the host file's bytes at [position, +length) start with a hole (reads as zeros, no
 * space used) or with data, and for how many bytes that stays true (SEEK_DATA / SEEK_HOLE).
 * Without the addon, or on a file system without holes, everything is data.
 */
export function hostExtent(fd: number, position: number, length: number): { hole: boolean; length: number } {
  const a = ioAddon();
  if (!a) return { hole: false, length };
  const data = a.seekDataHole(fd, position, false);
  if (data === -ENXIO) return { hole: true, length };
  if (data < 0) return { hole: false, length };
  if (data > position) return { hole: true, length: Math.min(length, data - position) };
  const hole = a.seekDataHole(fd, position, true);
  if (hole < 0 || hole <= position) return { hole: false, length };
  return { hole: false, length: Math.min(length, hole - position) };
}
let ioAddonCache: IoAddon | null | undefined;

/** The preadv2(RWF_NOWAIT) addon (native/pread_nowait.c), or null where it was not built. */
function ioAddon(): IoAddon | null {
  if (ioAddonCache === undefined) {
    ioAddonCache = null;
    if (process.env.QCOW2FS_NO_NOWAIT === undefined) {
      try {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        ioAddonCache = require(path.resolve(__dirname, '..', '..', 'native', 'build', 'Release', 'qcow2fs_io.node')) as IoAddon;
      } catch {
        ioAddonCache = null; // every read goes through the thread pool: slower, same result
      }
    }
  }
  return ioAddonCache;
}

export class FdFile implements HostFile {
  private closed = false;
  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly readOnly: boolean,
  ) {}

  /** Opens `path`; read-only means O_RDONLY, so nothing can ever be written through it. */
  static async open(path: string, readOnly: boolean): Promise<FdFile> {
    const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))),
    );
    return new FdFile(path, fd, readOnly);
  }

  static async create(path: string, exclusive = true): Promise<FdFile> {
    const flags = fs.constants.O_RDWR | fs.constants.O_CREAT | (exclusive ? fs.constants.O_EXCL : fs.constants.O_TRUNC);
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(path, flags, 0o644, (err, fd) => (err ? reject(err) : resolve(fd))),
    );
    return new FdFile(path, fd, false);
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    const nowait = ioAddon();
    if (nowait && buf.length <= NOWAIT_READ_MAX_BYTES) {
      // Served from the page cache on this thread when it can be; what is not cached goes on.
      const n = nowait.preadNowait(this.fd, buf, 0, buf.length, offset);
      if (n === buf.length) return n;
      if (n > 0) done = n;
    }
    while (done < buf.length) {
      const n = await readOnce(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    if (done < buf.length) buf.fill(0, done);
    return done;
  }

  preadCached(buf: Uint8Array, offset: number): boolean {
    const nowait = ioAddon();
    if (!nowait || buf.length > NOWAIT_READ_MAX_BYTES) return false;
    return nowait.preadNowait(this.fd, buf, 0, buf.length, offset) === buf.length;
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new Error(`${this.path}: internal error: write on a read-only file`);
    if (buf.length <= SYNC_WRITE_MAX_BYTES) {
      writeAllSync(this.fd, [buf], offset);
      return;
    }
    let done = 0;
    while (done < buf.length) {
      done += await writeOnce(this.fd, buf, done, buf.length - done, offset + done);
    }
  }

  async pwritev(bufs: readonly Uint8Array[], offset: number): Promise<void> {
    if (bufs.length === 1) return this.pwrite(bufs[0]!, offset);
    if (this.readOnly) throw new Error(`${this.path}: internal error: write on a read-only file`);
    if (bufs.length <= 1024 && bufs.reduce((s, b) => s + b.length, 0) <= SYNC_WRITE_MAX_BYTES) {
      writeAllSync(this.fd, bufs, offset);
      return;
    }
    let list = bufs.filter((b) => b.length > 0);
    let pos = offset;
    while (list.length > 0) {
      // IOV_MAX is 1024 on Linux.
      const batch = list.slice(0, 1024);
      const total = batch.reduce((s, b) => s + b.length, 0);
      const n = await new Promise<number>((resolve, reject) =>
        fs.writev(this.fd, batch as NodeJS.ArrayBufferView[], pos, (err, written) => (err ? reject(err) : resolve(written))),
      );
      pos += n;
      if (n === total) {
        list = list.slice(batch.length);
        continue;
      }
      list = withoutWritten(list, n); // short write: go on with the rest
    }
  }

  flush(): Promise<void> {
    if (this.readOnly) return Promise.resolve();
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  async size(): Promise<number> {
    const st = await this.stat();
    return st.isBlockDevice() ? blockDeviceBytes(st) : st.size;
  }

  stat(): Promise<fs.Stats> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(err) : resolve(st))));
  }

  /**
   * Sets the file's length. A block device has a fixed one: growing within it is a no-op, and
   * past it fails with ENOSPC (ftruncate would say EINVAL).
   */
  async truncate(sizeBytes: number): Promise<void> {
    const st = await this.stat();
    if (st.isBlockDevice()) {
      const room = blockDeviceBytes(st);
      if (sizeBytes <= room) return;
      throw Object.assign(new Error(`ENOSPC: no space left on device ${this.path} (needs ${sizeBytes} bytes, holds ${room})`), { code: 'ENOSPC' });
    }
    await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, sizeBytes, (err) => (err ? reject(err) : resolve())));
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
