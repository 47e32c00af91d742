/**
 * Copying what a BlockDevice shows (a qcow2 chain, a snapshot view, a raw file) into a new image:
 * a sparse raw file, or a compact qcow2 file written front to back by the layout writer. Ranges
 * the source reports as zeros or unallocated are not read; clusters that read as all zeros are
 * dropped; with compression, each cluster that shrinks is stored compressed.
 */
import * as fs from 'node:fs';
import { describeSystemError, UsageError } from '../errors';
import { blockDeviceBytes, outputKind } from '../io/file';
import { compressCluster } from '../qcow2/codec';
import type { Qcow2CreateOptions } from '../qcow2/create';
import { Qcow2LayoutWriter } from '../qcow2/layout-writer';
import type { BlockDevice } from './blockdev';

/** Bytes read from the source per request. */
const READ_CHUNK_BYTES = 4 * 1024 * 1024;
/** Zero runs at least this long become holes in raw output (qemu-img convert -S's default). */
const RAW_SPARSE_BYTES = 4096;
/** Clusters compressed concurrently (zlib runs on the thread pool). */
const COMPRESS_BATCH = 32;

export interface ConvertProgress {
  (fraction: number): void;
}

export interface ConvertStats {
  /** Clusters (qcow2) or bytes (raw) written as data. */
  dataClusters: number;
  compressedClusters: number;
  zeroClustersDropped: number;
}

/** Guest ranges that may hold non-zero data, in order, cluster-aligned. */
async function dataRanges(src: BlockDevice, align: number): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  const step = 1 << 30;
  for (let pos = 0; pos < src.size; pos += step) {
    for (const e of await src.status(pos, Math.min(step, src.size - pos))) {
      if (e.kind !== 'data' && e.kind !== 'backing') continue;
      const start = Math.floor(e.offset / align) * align;
      const end = Math.min(Math.ceil((e.offset + e.length) / align) * align, src.size);
      const last = out[out.length - 1];
      if (last && last[1] >= start) last[1] = Math.max(last[1], end);
      else out.push([start, end]);
    }
  }
  return out;
}

function isZero(buf: Buffer, zero: Buffer): boolean {
  return buf.length === zero.length ? buf.equals(zero) : buf.equals(zero.subarray(0, buf.length));
}

/** The read requests covering `ranges`, in order. */
function chunks(ranges: Array<[number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [start, end] of ranges) for (let pos = start; pos < end; pos += READ_CHUNK_BYTES) out.push([pos, Math.min(READ_CHUNK_BYTES, end - pos)]);
  return out;
}

/**
 * Reads the ranges in chunks, one chunk ahead of the consumer (so reading the source overlaps
 * with writing the destination), handing out cluster-sized pieces in order.
 */
async function* clusters(src: BlockDevice, ranges: Array<[number, number]>, cs: number): AsyncGenerator<{ index: number; data: Buffer }> {
  const list = chunks(ranges);
  const read = (i: number): Promise<Buffer> => {
    const [pos, len] = list[i]!;
    const buf = Buffer.allocUnsafe(len);
    return src.read(buf, pos).then(() => buf);
  };
  let next = list.length ? read(0) : null;
  for (let i = 0; i < list.length; i++) {
    const buf = await next!;
    next = i + 1 < list.length ? read(i + 1) : null;
    // Keep a failing prefetch from being reported as unhandled before it is awaited.
    next?.catch(() => undefined);
    const [pos, len] = list[i]!;
    for (let off = 0; off < len; off += cs) yield { index: (pos + off) / cs, data: buf.subarray(off, Math.min(off + cs, len)) };
  }
}

export async function convertToQcow2(
  src: BlockDevice,
  dst: string,
  opts: Qcow2CreateOptions,
  compress: boolean,
  progress?: ConvertProgress,
): Promise<ConvertStats> {
  const w = await Qcow2LayoutWriter.create(dst, opts);
  const stats: ConvertStats = { dataClusters: 0, compressedClusters: 0, zeroClustersDropped: 0 };
  try {
    const cs = w.clusterSize;
    const zero = Buffer.alloc(cs);
    const ranges = await dataRanges(src, cs);
    const total = ranges.reduce((a, [s, e]) => a + e - s, 0);
    let done = 0;
    let batch: Array<{ index: number; data: Buffer }> = [];
    const flushBatch = async (): Promise<void> => {
      const packed = compress ? await Promise.all(batch.map((c) => compressCluster(opts.compressionType, padCluster(c.data, cs)))) : null;
      for (const [i, c] of batch.entries()) {
        const z = packed?.[i];
        if (z !== undefined && z.length < cs) {
          await w.compressed(c.index, z);
          stats.compressedClusters++;
        } else {
          // Each read chunk is a fresh buffer, so the writer may keep this view until it writes.
          await w.data(c.index, c.data);
          stats.dataClusters++;
        }
      }
      batch = [];
    };
    for await (const c of clusters(src, ranges, cs)) {
      done += c.data.length;
      if (isZero(c.data, zero)) {
        stats.zeroClustersDropped++;
      } else {
        batch.push(c);
        if (batch.length >= (compress ? COMPRESS_BATCH : 1)) await flushBatch();
      }
      if (progress && c.index % 256 === 0) progress(total ? done / total : 1);
    }
    await flushBatch();
    await w.finish();
    progress?.(1);
    return stats;
  } catch (err) {
    await w.abort();
    throw err;
  }
}

function padCluster(data: Buffer, cs: number): Buffer {
  return data.length === cs ? data : Buffer.concat([data, Buffer.alloc(cs - data.length)]);
}

/**
 * A sparse raw copy: zero runs of RAW_SPARSE_BYTES and more stay holes. A block device as the
 * output is written in place, zeros included (what it held before must not show through), and
 * must be at least as large as the disk; it is never truncated or removed.
 */
export async function convertToRaw(src: BlockDevice, dst: string, progress?: ConvertProgress): Promise<ConvertStats> {
  const device = outputKind(dst) === 'block-device';
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(dst, device ? 'r+' : 'w', 0o644);
  } catch (err) {
    throw new UsageError(describeSystemError(err, dst));
  }
  const stats: ConvertStats = { dataClusters: 0, compressedClusters: 0, zeroClustersDropped: 0 };
  try {
    if (device) {
      const room = blockDeviceBytes(await fh.stat());
      if (room < src.size) throw new UsageError(`${dst}: the block device holds ${room} bytes, less than the disk's ${src.size}`);
    } else {
      await fh.truncate(src.size);
    }
    const g = RAW_SPARSE_BYTES;
    const zero = Buffer.alloc(g);
    const ranges: Array<[number, number]> = device ? [[0, src.size]] : await dataRanges(src, g);
    const total = ranges.reduce((a, [s, e]) => a + e - s, 0);
    let done = 0;
    for (const [start, end] of ranges) {
      for (let pos = start; pos < end; pos += READ_CHUNK_BYTES) {
        const len = Math.min(READ_CHUNK_BYTES, end - pos);
        const buf = Buffer.allocUnsafe(len);
        await src.read(buf, pos);
        // Write maximal runs of non-zero blocks.
        let runStart = -1;
        const writeRun = async (runEnd: number): Promise<void> => {
          await fh.write(buf, runStart, runEnd - runStart, pos + runStart);
          stats.dataClusters += runEnd - runStart;
          runStart = -1;
        };
        for (let off = 0; off < len; off += g) {
          const blockIsData = device || !isZero(buf.subarray(off, Math.min(off + g, len)), zero);
          if (blockIsData && runStart < 0) runStart = off;
          else if (!blockIsData && runStart >= 0) await writeRun(off);
        }
        if (runStart >= 0) await writeRun(len);
        done += len;
        progress?.(total ? done / total : 1);
      }
    }
    await fh.datasync();
    progress?.(1);
    return stats;
  } catch (err) {
    await fh.close().catch(() => undefined);
    if (!device) await fs.promises.rm(dst, { force: true }).catch(() => undefined);
    throw err;
  } finally {
    await fh.close().catch(() => undefined);
  }
}
