/**
 * `create` for qcow2 files: a fresh image through the layout writer, with qemu-img's
 * preallocation modes (off: nothing mapped; metadata: every cluster mapped, data left sparse;
 * falloc: also reserved on the host; full: also written with zeros).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { Qcow2LayoutWriter } from './layout-writer';
import type { Preallocation, Qcow2CreateOptions } from './create';

export interface PreallocProgress {
  (fraction: number): void;
}

const ZERO_CHUNK_BYTES = 8 * 1024 * 1024;

/**
 * Reserves (falloc) or zero-fills (full) host extents of an open file. Node has no fallocate(2):
 * falloc runs util-linux's fallocate(1) and, where that is missing or the file system refuses,
 * writes zeros instead, as glibc's posix_fallocate does.
 */
export async function preallocateExtents(
  path: string,
  fd: number,
  extents: ReadonlyArray<readonly [number, number]>,
  mode: 'falloc' | 'full',
  progress?: PreallocProgress,
): Promise<void> {
  const total = extents.reduce((a, [, l]) => a + l, 0);
  if (total === 0) return;
  if (mode === 'falloc') {
    let ok = true;
    for (const [off, len] of extents) {
      const r = spawnSync('fallocate', ['-o', String(off), '-l', String(len), path], { stdio: 'ignore' });
      if (r.error || r.status !== 0) {
        ok = false;
        break;
      }
    }
    if (ok) {
      progress?.(1);
      return;
    }
  }
  const zeros = Buffer.alloc(Math.min(ZERO_CHUNK_BYTES, total));
  let done = 0;
  for (const [off, len] of extents) {
    for (let p = 0; p < len; p += zeros.length) {
      const n = Math.min(zeros.length, len - p);
      await new Promise<void>((resolve, reject) =>
        fs.write(fd, zeros, 0, n, off + p, (err) => (err ? reject(err) : resolve())),
      );
      done += n;
      progress?.(done / total);
    }
  }
}

/** Creates a qcow2 file, preallocated as asked. */
export async function createQcow2(path: string, opts: Qcow2CreateOptions, prealloc: Preallocation, progress?: PreallocProgress): Promise<void> {
  const w = await Qcow2LayoutWriter.create(path, opts);
  try {
    if (prealloc === 'falloc' || prealloc === 'full') {
      await w.preallocateAll();
    } else if (prealloc === 'metadata') {
      const n = w.guestClusters;
      for (let c = 0; c < n; c++) {
        await w.preallocate(c);
        if (c % 65536 === 0) progress?.(c / n);
      }
    }
    const result = await w.finish();
    // Holes read as zeros, so the image is already valid; reserving or writing them is extra.
    if (prealloc === 'falloc' || prealloc === 'full') {
      const again = await fs.promises.open(path, 'r+');
      try {
        await preallocateExtents(path, again.fd, result.preallocated, prealloc, progress);
        await again.datasync();
      } finally {
        await again.close();
      }
    }
    progress?.(1);
  } catch (err) {
    await w.abort();
    throw err;
  }
}
