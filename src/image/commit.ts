/**
 * Committing an overlay (qemu-img commit): every guest range the overlay itself maps (data or
 * zeros, depth 0) is written into its backing file, which grows first if the overlay is larger;
 * the backing file is flushed; only then is the overlay emptied. At every moment the overlay
 * still shows the same disk: the ranges being changed in the backing file are exactly those the
 * overlay covers, until the overlay is emptied, by which time the backing file holds them.
 */
import * as path from 'node:path';
import { describeSystemError, ImageError, UsageError } from '../errors';
import { lockImageFile, lockProfile } from '../io/lock';
import { FdFile } from '../io/file';
import { Qcow2Image, readHeader } from '../qcow2/image';
import { emptyQcow2 } from '../qcow2/shrink';
import type { BlockDevice } from './blockdev';
import { openImage, resolveBackingPath } from './open';
import { parseFormat } from './probe';
import { RawImage } from './raw';

const COPY_CHUNK_BYTES = 4 * 1024 * 1024;

export interface CommitResult {
  /** Guest bytes written into the backing file. */
  bytesCommitted: number;
  backingPath: string;
}

export interface CommitOptions {
  /** Leave the overlay's data in place (qemu-img commit -d). */
  keepOverlay: boolean;
  progress?: (fraction: number) => void;
}

/** The top layer's own ranges, merged: [offset, length, whether they are zeros (no data)]. */
async function overlayRanges(top: BlockDevice): Promise<Array<[number, number, boolean]>> {
  const out: Array<[number, number, boolean]> = [];
  const step = 1 << 30;
  for (let pos = 0; pos < top.size; pos += step) {
    for (const e of await top.status(pos, Math.min(step, top.size - pos))) {
      if (e.depth !== 0 || (e.kind !== 'data' && e.kind !== 'zero')) continue;
      const zero = e.kind === 'zero';
      const last = out[out.length - 1];
      if (last && last[0] + last[1] === e.offset && last[2] === zero) last[1] += e.length;
      else out.push([e.offset, e.length, zero]);
    }
  }
  return out;
}

export async function commitOverlay(overlayPath: string, opts: CommitOptions): Promise<CommitResult> {
  // The overlay is opened alone (its backing file is opened once, writable, below) and locked
  // as QEMU locks an image it writes: both files are ours for the whole operation.
  let file: FdFile;
  try {
    file = await FdFile.open(overlayPath, false);
  } catch (err) {
    throw new UsageError(describeSystemError(err, `overlay ${overlayPath}`));
  }
  let bytesCommitted = 0;
  let backingPath: string;
  try {
    lockImageFile(file, lockProfile({ writable: true, format: 'qcow2' }), 'image');
    const known = await readHeader(file);
    const h = known.header;
    if (h.backingFile === null) throw new UsageError(`${overlayPath} has no backing file to commit into`);
    const top = await Qcow2Image.open(file, { readOnly: true, backing: null, l2CacheBytes: 0 }, known);
    backingPath = resolveBackingPath(path.resolve(overlayPath), h.backingFile);
    const backingFormat = h.backingFormat ? parseFormat(h.backingFormat, `${overlayPath}: backing format`) : undefined;
    const ranges = await overlayRanges(top);
    const total = ranges.reduce((a, [, l]) => a + l, 0);
    const base = await openImage(backingPath, { readOnly: false, ...(backingFormat ? { format: backingFormat } : {}) });
    try {
      const dev = base.device;
      if (dev.size < top.size) {
        // The backing file grows to the overlay's size first (as qemu-img commit does).
        if (dev instanceof Qcow2Image) await dev.resize(Math.ceil(top.size / 512) * 512);
        else if (dev instanceof RawImage) {
          await dev.file.truncate(top.size);
          dev.size = top.size;
        } else throw new ImageError(`cannot grow ${backingPath}`);
      }
      const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK_BYTES, Math.max(total, 1)));
      for (const [start, length, zero] of ranges) {
        if (zero) {
          // Zeros in the overlay: zeros in the backing file too, without writing data clusters
          // (zero clusters, or unallocated where nothing shows through; holes in a raw file).
          await dev.discard(start, length);
          bytesCommitted += length;
          opts.progress?.(total ? bytesCommitted / total : 1);
          continue;
        }
        for (let pos = start; pos < start + length; pos += buf.length) {
          const n = Math.min(buf.length, start + length - pos);
          const chunk = buf.subarray(0, n);
          await top.read(chunk, pos);
          await dev.write(chunk, pos);
          bytesCommitted += n;
          opts.progress?.(total ? bytesCommitted / total : 1);
        }
      }
      await dev.flush();
    } finally {
      await base.device.close();
    }
    // Only now that the backing file holds the data durably does the overlay let go of it.
    if (!opts.keepOverlay) await emptyQcow2(top);
  } finally {
    await file.close();
  }
  opts.progress?.(1);
  return { bytesCommitted, backingPath };
}
