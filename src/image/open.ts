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
  const file = await openFile(p, readOnly, what);
  let real = p;
  try {
    real = await fs.promises.realpath(p);
    if (seen.includes(real)) {
      throw new ImageError(`backing chain loops: ${[...seen, real].map((s) => path.basename(s)).join(' -> ')}`);
    }
    seen.push(real);
    if (depth > 0 && opts.allowedBackingDirs) {
      const ok = opts.allowedBackingDirs.some((d) => real === d || real.startsWith(d.endsWith('/') ? d : d + '/'));
      if (!ok) throw new UsageError(`backing file ${real} lies outside the allowed directories (${opts.allowedBackingDirs.join(', ')}); pass --allow-backing DIR`);
    }
    const head = await readHead(file);
    const probed = probeFormat(head, p);
    const fmt = format ?? probed;
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
