/**
 * Opening a whole chain: image -> backing -> backing ... Each layer is probed (or told its format
 * by the backing-format extension), relative backing names are resolved from the directory of
 * the file that names them, loops and absurd depths are refused. Backing files are always opened
 * read-only: writing the active layer never changes them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describeSystemError, ImageError, UnsupportedError, UsageError } from '../errors';
import { FdFile, type HostFile } from '../io/file';
import { lockImageFile, lockProfile } from '../io/lock';
import { log } from '../log';
import { Qcow2Image, readHeader } from '../qcow2/image';
import { findSnapshot } from '../qcow2/snapshot';
import type { BlockDevice } from './blockdev';
import { parseFormat, probeFormat, type ImageFormat } from './probe';
import { RawImage } from './raw';

export const MAX_CHAIN_DEPTH = 64;

export interface OpenOptions {
  readOnly: boolean;
  /** Format of the top image; probed when absent. */
  format?: ImageFormat;
  /** Serve this internal snapshot (id or name) of the top image, read-only. */
  snapshot?: string;
  l2CacheBytes?: number;
  /** When set, every backing file must live under one of these directories (forensic mode). */
  allowedBackingDirs?: string[];
  /**
   * QEMU-compatible image locks (io/lock.ts): 'qemu' (default) takes what QEMU takes, so QEMU
   * and qcow2fs refuse to write what the other uses; 'share' is qemu-img's -U (read-only, lets
   * others write); 'none' takes no locks (in-process tests that open one file twice).
   */
  lock?: 'qemu' | 'share' | 'none';
  /** Writes go to this qcow2 overlay whose backing file is the image (issue 4; not built yet). */
  overlay?: string;
}

/** One layer of an opened chain, for info and forensic reports. */
export interface ChainLayer {
  path: string;
  format: ImageFormat;
  device: BlockDevice;
}

export interface OpenedImage {
  device: BlockDevice;
  chain: ChainLayer[];
}

async function openFile(p: string, readOnly: boolean, what: string): Promise<HostFile> {
  try {
    const st = await fs.promises.stat(p);
    if (st.isDirectory()) throw new UsageError(`${what} ${p}: is a directory`);
    return await FdFile.open(p, readOnly);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(describeSystemError(err, `${what} ${p}`));
  }
}

async function readHead(file: HostFile): Promise<Buffer> {
  const head = Buffer.alloc(512);
  await file.pread(head, 0);
  return head;
}

/** Resolves a backing file name the way QEMU does: relative to the directory of the overlay. */
export function resolveBackingPath(overlayPath: string, backingName: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(backingName) && !backingName.startsWith('/')) {
    const proto = backingName.slice(0, backingName.indexOf(':'));
    if (proto !== 'file') throw new UnsupportedError(`${overlayPath}: backing file "${backingName.slice(0, 80)}" uses protocol "${proto}", which is not supported`);
    backingName = backingName.slice('file:'.length);
  }
  return path.isAbsolute(backingName) ? backingName : path.join(path.dirname(overlayPath), backingName);
}

export async function openImage(imagePath: string, opts: OpenOptions): Promise<OpenedImage> {
  if (opts.overlay !== undefined) return openOverlay(imagePath, opts.overlay, { ...opts, overlay: undefined });
  // A snapshot view never writes: open the file O_RDONLY too, not just the view.
  if (opts.snapshot !== undefined && !opts.readOnly) opts = { ...opts, readOnly: true };
  if (opts.lock === 'share' && !opts.readOnly) throw new UsageError('--force-share needs a read-only open (--read-only)');
  if (opts.allowedBackingDirs) opts = { ...opts, allowedBackingDirs: opts.allowedBackingDirs.map(realDir) };
  const chain: ChainLayer[] = [];
  const seen: string[] = [];
  try {
    const device = await openLayer(path.resolve(imagePath), opts.format, opts.readOnly, 0, opts, chain, seen, opts.snapshot);
    return { device, chain };
  } catch (err) {
    // Close whatever was opened below the failure.
    for (const layer of chain) await layer.device.close().catch(() => undefined);
    throw err;
  }
}

/**
 * Writes go to a qcow2 overlay whose backing file is the image; the image itself is opened
 * read-only (as the overlay's backing) and never changes. A missing overlay is created with the
 * image's virtual size, a relative backing name and the backing format recorded; an existing one
 * is reused when its backing file is the image.
 */
async function openOverlay(imagePath: string, overlayPath: string, opts: OpenOptions): Promise<OpenedImage> {
  if (opts.readOnly) throw new UsageError('--overlay is for writing; to read the image without changing it, use --read-only alone');
  if (opts.snapshot !== undefined) throw new UsageError('--overlay and --snapshot cannot be combined');
  const image = path.resolve(imagePath);
  const overlay = path.resolve(overlayPath);
  const realImage = (() => {
    try {
      return fs.realpathSync(image);
    } catch (err) {
      throw new UsageError(describeSystemError(err, `image ${imagePath}`));
    }
  })();
  if (fs.existsSync(overlay) && fs.realpathSync(overlay) === realImage) throw new UsageError(`the overlay ${overlayPath} is the image itself`);
  if (!fs.existsSync(overlay)) {
    const base = await openImage(image, { ...opts, readOnly: true, lock: opts.lock === 'none' ? 'none' : 'share' });
    const sizeBytes = base.device.size;
    const format = base.chain[0]!.format;
    await base.device.close();
    let backingName = path.relative(path.dirname(overlay), realImage);
    if (backingName.startsWith('../../../') || backingName.length > 1000) backingName = realImage;
    log.info({ overlay, backing: backingName, format }, 'creating overlay');
    // Loaded here, not at start-up: only --overlay creates images (mount time is a target).
    const { createQcow2 } = require('../qcow2/create-image') as typeof import('../qcow2/create-image');
    await createQcow2(
      overlay,
      {
        sizeBytes,
        clusterBits: 16,
        version: 3,
        refcountOrder: 4,
        extendedL2: false,
        lazyRefcounts: false,
        compressionType: 0,
        backingFile: backingName,
        backingFormat: format,
      },
      'off',
    );
  }
  const opened = await openImage(overlay, opts);
  const backing = opened.chain[1];
  let sameImage = false;
  try {
    sameImage = backing !== undefined && fs.realpathSync(backing.path) === realImage;
  } catch {
    sameImage = false;
  }
  if (opened.chain[0]?.format !== 'qcow2' || !sameImage) {
    await opened.device.close();
    throw new UsageError(`${overlayPath} exists and is not a qcow2 overlay of ${imagePath}${backing ? ` (its backing file is ${backing.path})` : ''}`);
  }
  return opened;
}

/** An allowed backing directory, as the real path backing files are compared with. */
function realDir(dir: string): string {
  try {
    return fs.realpathSync(path.resolve(dir));
  } catch (err) {
    throw new UsageError(describeSystemError(err, `--allow-backing ${dir}`));
  }
}

/** True when `file` (a real path) lies in `dir` or below it. */
export function isInside(file: string, dir: string): boolean {
  return file === dir || file.startsWith(dir.endsWith('/') ? dir : dir + '/');
}

async function openLayer(
  p: string,
  format: ImageFormat | undefined,
  readOnly: boolean,
  depth: number,
  opts: OpenOptions,
  chain: ChainLayer[],
  seen: string[],
  snapshot: string | undefined,
): Promise<BlockDevice> {
  if (depth > MAX_CHAIN_DEPTH) throw new ImageError(`backing chain is deeper than ${MAX_CHAIN_DEPTH} files (at ${p})`);
  const what = depth === 0 ? 'image' : 'backing file';
  // Checked before the file is opened: a forensic mount must not even open what it refuses.
  let real = p;
  try {
    real = await fs.promises.realpath(p);
  } catch {
    // openFile reports the missing file below.
  }
  if (depth > 0 && opts.allowedBackingDirs && !opts.allowedBackingDirs.some((d) => isInside(real, d))) {
    throw new UsageError(
      `backing file ${real} lies outside the allowed directories (${opts.allowedBackingDirs.join(', ')}); pass --allow-backing ${path.dirname(real)} to allow it`,
    );
  }
  const file = await openFile(p, readOnly, what);
  try {
    if (seen.includes(real)) {
      throw new ImageError(`backing chain loops: ${[...seen, real].map((s) => path.basename(s)).join(' -> ')}`);
    }
    seen.push(real);
    const head = await readHead(file);
    const probed = probeFormat(head, p);
    const fmt = format ?? probed;
    if ((opts.lock ?? 'qemu') !== 'none') {
      lockImageFile(file, lockProfile({ writable: !readOnly, format: fmt, forceShare: opts.lock === 'share' }), what);
    }
    if (fmt === 'raw') {
      if (snapshot !== undefined) throw new UsageError(`${p}: raw images have no snapshots`);
      const dev = await RawImage.open(file);
      chain.unshift({ path: p, format: 'raw', device: dev });
      return dev;
    }
    if (probed !== 'qcow2') {
      const magic = head.length >= 4 ? `0x${head.readUInt32BE(0).toString(16).padStart(8, '0')}` : 'missing';
      throw new ImageError(`bad magic ${magic}: not a qcow2 image`, p);
    }
    const known = await readHeader(file);
    const header = known.header;
    let backing: BlockDevice | null = null;
    if (header.backingFile !== null) {
      const backingPath = resolveBackingPath(p, header.backingFile);
      const backingFormat = header.backingFormat ? parseFormat(header.backingFormat, `${p}: backing format`) : undefined;
      log.debug({ image: p, backing: backingPath, format: backingFormat ?? 'probe' }, 'opening backing file');
      backing = await openLayer(backingPath, backingFormat, true, depth + 1, opts, chain, seen, undefined);
    }
    const base = { readOnly, backing, ...(opts.l2CacheBytes !== undefined ? { l2CacheBytes: opts.l2CacheBytes } : {}) };
    let img = await Qcow2Image.open(file, base, known);
    if (snapshot !== undefined) {
      const snap = findSnapshot(img.snapshots, snapshot);
      if (!snap) {
        await img.close().catch(() => undefined);
        throw new UsageError(`${p}: no snapshot with id or name "${snapshot}"`);
      }
      img = await Qcow2Image.open(file, { ...base, readOnly: true, snapshot: snap }, known);
    }
    chain.unshift({ path: p, format: 'qcow2', device: img });
    return img;
  } catch (err) {
    if (!chain.some((l) => (l.device as { file?: HostFile }).file === file)) await file.close().catch(() => undefined);
    throw err;
  }
}
