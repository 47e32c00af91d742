/**
 * FUSE operations mapped onto the layout's BlockDevices. Errors from the engine become errno
 * values: ReadOnlyError -> EROFS, anything else -> EIO (logged once per distinct message, so a
 * corrupt L2 entry read in a loop does not flood the log). The daemon never dies of a bad request.
 */
import type FuseTypes from 'fuse-native';
import Fuse from './binding';
import { ReadOnlyError, UsageError } from '../errors';
import type { BlockDevice } from '../image/blockdev';
import { log } from '../log';
import type { DirectReadMap } from './direct-read';
import type { Layout, LayoutNode } from './layout';

const O_ACCMODE = 3;
const O_RDONLY = 0;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const MAX_LOGGED_ERRORS = 1000;
// fallocate(2) modes (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_NO_HIDE_STALE = 0x04;
const FALLOC_FL_ZERO_RANGE = 0x10;

export interface OpsOptions {
  readOnly: boolean;
}

/** Live counters the lifecycle looks at (a lazily unmounted filesystem ends when the last file closes). */
export interface OpsState {
  openHandles: number;
  /** Direct read maps by FUSE path, filled once mounted: told what the engine served. */
  directReads?: Map<string, DirectReadMap>;
}

export function makeOps(layout: Layout, opts: OpsOptions, state: OpsState = { openHandles: 0 }): FuseTypes.FuseOps {
  const logged = new Set<string>();
  const allocatedCache = new Map<BlockDevice, { at: number; bytes: number }>();

  function errno(err: unknown, op: string, path: string): number {
    if (err instanceof ReadOnlyError) return Fuse.EROFS;
    const msg = err instanceof Error ? err.message : String(err);
    if (!logged.has(msg) && logged.size < MAX_LOGGED_ERRORS) {
      logged.add(msg);
      log.error({ op, path }, msg);
    }
    return Fuse.EIO;
  }

  async function blocksOf(dev: BlockDevice): Promise<number> {
    const now = Date.now();
    const c = allocatedCache.get(dev);
    if (c && now - c.at < 1000) return c.bytes / 512;
    const bytes = await dev.allocatedBytes();
    allocatedCache.set(dev, { at: now, bytes });
    return bytes / 512;
  }

  async function statOf(node: LayoutNode): Promise<FuseTypes.FuseStat> {
    const { mtime, atime, ctime, uid, gid } = node.meta;
    if (node.kind === 'dir') {
      return { mode: S_IFDIR | (opts.readOnly ? 0o555 : 0o755), nlink: 2, size: 4096, uid, gid, mtime, atime, ctime };
    }
    if (node.kind === 'file') {
      return { mode: S_IFREG | 0o444, nlink: 1, size: node.content.length, blocks: Math.ceil(node.content.length / 512), uid, gid, mtime, atime, ctime };
    }
    const dev = node.device;
    return {
      mode: S_IFREG | (dev.readOnly ? 0o444 : 0o644),
      nlink: 1,
      size: dev.size,
      blksize: 4096,
      blocks: await blocksOf(dev),
      uid,
      gid,
      mtime,
      atime,
      ctime,
    };
  }

  function device(path: string): BlockDevice | undefined {
    const n = layout.lookup(path);
    return n?.kind === 'device' ? n.device : undefined;
  }

  /** truncate(2) of the raw file: growing grows the virtual disk; shrinking is refused. */
  function resizeDevice(dev: BlockDevice, size: number, path: string, cb: (code: number) => void): void {
    if (size === dev.size) return cb(0);
    if (!dev.resize) return cb(Fuse.EINVAL);
    const resized = (): void => {
      for (const m of state.directReads?.values() ?? []) m.resized();
      cb(0);
    };
    if (size < dev.size) {
      log.warn({ path }, `refusing to shrink ${dev.description} from ${dev.size} to ${size} bytes (use "qcow2fs resize --shrink" offline)`);
      return cb(Fuse.EINVAL);
    }
    dev.resize(size).then(resized, (err) => {
      // A size this image cannot take (a version 2 image with snapshots, an L1 table too big).
      if (err instanceof UsageError) {
        log.warn({ path }, err.message);
        return cb(Fuse.EOPNOTSUPP);
      }
      cb(errno(err, 'truncate', path));
    });
  }

  /** Writes the binding did itself reach the device (its flush syncs them) and the file's mtime. */
  function syncDirectWrites(path: string): void {
    if (state.directReads?.get(path)?.syncWrites()) {
      const node = layout.lookup(path);
      if (node) node.meta.mtime = node.meta.ctime = new Date();
    }
  }

  let nextHandle = 1;

  return {
    getattr(path, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind === 'device' && !node.device.readOnly) syncDirectWrites(path);
      statOf(node).then(
        (st) => cb(0, st),
        (err) => cb(errno(err, 'getattr', path)),
      );
    },
    readdir(path, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind !== 'dir') return cb(Fuse.ENOTDIR);
      cb(0, ['.', '..', ...node.children.keys()]);
    },
    open(path, flags, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind === 'dir') return cb(Fuse.EISDIR);
      const writable = (flags & O_ACCMODE) !== O_RDONLY;
      if (writable && (node.kind === 'file' || node.device.readOnly)) return cb(Fuse.EROFS);
      state.openHandles++;
      cb(0, nextHandle++);
    },
    release(_path, _fd, cb) {
      state.openHandles = Math.max(0, state.openHandles - 1);
      cb(0);
    },
    read(path, _fd, buf, len, pos, cb) {
      const node = layout.lookup(path);
      if (!node || node.kind === 'dir') return cb(Fuse.ENOENT);
      if (node.kind === 'file') {
        const n = Math.max(0, Math.min(len, node.content.length - pos));
        if (n > 0) node.content.copy(buf, 0, pos, pos + n);
        return cb(n);
      }
      const dev = node.device;
      const n = Math.max(0, Math.min(len, dev.size - pos));
      if (n === 0) return cb(0);
      const dst = n === buf.length ? buf : buf.subarray(0, n);
      // Not answered by the binding's direct read map: tell it what the engine now knows.
      const direct = state.directReads?.get(path);
      // Fast path: cached metadata and page-cached data answer on this thread, without Promises.
      try {
        if (dev.readCached?.(dst, pos)) {
          direct?.learn(pos, n);
          return cb(n);
        }
      } catch (err) {
        return cb(errno(err, 'read', path));
      }
      dev.read(dst, pos).then(
        () => {
          direct?.learn(pos, n);
          cb(n);
        },
        (err) => cb(errno(err, 'read', path)),
      );
    },
    write(path, _fd, buf, len, pos, cb) {
      const dev = device(path);
      if (!dev) return cb(Fuse.EROFS);
      if (dev.readOnly) return cb(Fuse.EROFS);
      if (pos >= dev.size) return cb(Fuse.ENOSPC);
      const n = Math.min(len, dev.size - pos);
      dev.write(buf.subarray(0, n), pos).then(
        () => {
          const node = layout.lookup(path);
          if (node) node.meta.mtime = node.meta.ctime = new Date();
          // The clusters may now be written in place: let the binding do the next writes itself.
          state.directReads?.get(path)?.learn(pos, n, true);
          cb(n);
        },
        (err) => cb(errno(err, 'write', path)),
      );
    },
    flush(path, _fd, cb) {
      // close(2) of a writer: make what it wrote durable, as fsync would.
      const dev = device(path);
      if (!dev || dev.readOnly) return cb(0);
      syncDirectWrites(path);
      dev.flush().then(
        () => cb(0),
        (err) => cb(errno(err, 'flush', path)),
      );
    },
    fsync(path, _datasync, _fd, cb) {
      const dev = device(path);
      if (!dev || dev.readOnly) return cb(0);
      syncDirectWrites(path);
      dev.flush().then(
        () => cb(0),
        (err) => cb(errno(err, 'fsync', path)),
      );
    },
    truncate(path, size, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind !== 'device' || node.device.readOnly) return cb(Fuse.EROFS);
      resizeDevice(node.device, size, path, cb);
    },
    ftruncate(path, _fd, size, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind !== 'device' || node.device.readOnly) return cb(Fuse.EROFS);
      resizeDevice(node.device, size, path, cb);
    },
    /**
     * Discard and zeroing of the raw file (fstrim, blkdiscard and mkfs through a loop device):
     * PUNCH_HOLE and ZERO_RANGE both make the range read as zeros (BlockDevice.discard). Plain
     * allocation inside the disk is a no-op (clusters are allocated on write); anything that
     * would change the size or shift data is refused.
     */
    fallocate(path, _fd, mode, offset, length, cb) {
      const node = layout.lookup(path);
      if (!node) return cb(Fuse.ENOENT);
      if (node.kind !== 'device' || node.device.readOnly) return cb(Fuse.EROFS);
      const dev = node.device;
      if (offset < 0 || length <= 0) return cb(Fuse.EINVAL);
      const known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_NO_HIDE_STALE | FALLOC_FL_ZERO_RANGE;
      if (mode & ~known) return cb(Fuse.EOPNOTSUPP);
      const zeroing = (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) !== 0;
      if (offset >= dev.size) return cb(zeroing || mode & FALLOC_FL_KEEP_SIZE ? 0 : Fuse.EOPNOTSUPP);
      const n = Math.min(length, dev.size - offset);
      if (!zeroing) return cb(offset + length <= dev.size || mode & FALLOC_FL_KEEP_SIZE ? 0 : Fuse.EOPNOTSUPP);
      dev.discard(offset, n).then(
        () => {
          node.meta.mtime = node.meta.ctime = new Date();
          cb(0);
        },
        (err) => cb(errno(err, 'fallocate', path)),
      );
    },
    utimens(path, _atime, _mtime, cb) {
      cb(layout.lookup(path) ? 0 : Fuse.ENOENT);
    },
    chmod(_path, _mode, cb) {
      cb(Fuse.EPERM);
    },
    chown(_path, _uid, _gid, cb) {
      cb(Fuse.EPERM);
    },
    create(_path, _mode, cb) {
      cb(opts.readOnly ? Fuse.EROFS : Fuse.EPERM);
    },
    unlink(_path, cb) {
      cb(opts.readOnly ? Fuse.EROFS : Fuse.EPERM);
    },
    statfs(_path, cb) {
      const total = layout.devices().reduce((s, d) => s + d.size, 0);
      const blocks = Math.min(Math.ceil(total / 4096), 0xffffffff);
      cb(0, { bsize: 4096, frsize: 4096, blocks, bfree: 0, bavail: 0, files: 16, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 });
    },
  };
}
