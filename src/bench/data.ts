/**
 * Deterministic, partly compressible test data: a mix of random blocks, text-like blocks and
 * low-entropy blocks, so that zlib/zstd images have real work to do (about 2:1) and no cluster
 * is all zeros (qemu-img convert would leave those unallocated).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

const BLOCK = 4096;
const POOL_BLOCKS = 2048; // 8 MiB pool

/** mulberry32: small, fast, seedable. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

function buildPool(seed: number): Buffer {
  const next = prng(seed);
  const pool = Buffer.allocUnsafe(POOL_BLOCKS * BLOCK);
  const words: Buffer[] = [];
  for (let i = 0; i < 512; i++) {
    const len = 2 + (next() % 9);
    const w = Buffer.allocUnsafe(len);
    for (let j = 0; j < len; j++) w[j] = 97 + (next() % 26);
    words.push(w);
  }
  for (let b = 0; b < POOL_BLOCKS; b++) {
    const block = pool.subarray(b * BLOCK, (b + 1) * BLOCK);
    const kind = next() % 4;
    if (kind === 0) {
      for (let i = 0; i < BLOCK; i += 4) block.writeUInt32LE(next(), i);
    } else if (kind === 3) {
      const period = 8 + (next() % 56);
      for (let i = 0; i < BLOCK; i++) block[i] = i % period === 0 ? next() & 0xff : (i * 7) & 0x3f;
    } else {
      let i = 0;
      while (i < BLOCK) {
        const w = words[next() % words.length]!;
        const n = Math.min(w.length, BLOCK - i);
        w.copy(block, i, 0, n);
        i += n;
        if (i < BLOCK) block[i++] = next() % 9 === 0 ? 10 : 32;
      }
    }
  }
  return pool;
}

/** Writes `bytes` (a multiple of 1 MiB) of test data to `file`. */
export function writeDataFile(file: string, bytes: number, seed = 1): void {
  const pool = buildPool(seed);
  const chunk = Buffer.allocUnsafe(1024 * 1024);
  const blocksPerChunk = chunk.length / BLOCK;
  const fd = fs.openSync(file, 'w');
  try {
    for (let i = 0; i * chunk.length < bytes; i++) {
      const start = (Math.imul(i + 1, 2654435761) >>> 0) % (POOL_BLOCKS - blocksPerChunk);
      pool.copy(chunk, 0, start * BLOCK, (start + blocksPerChunk) * BLOCK);
      // A stamp per block makes every block unique and never all-zero.
      for (let j = 0; j < blocksPerChunk; j++) {
        chunk.writeUInt32LE((i | 0x80000000) >>> 0, j * BLOCK);
        chunk.writeUInt32LE(j | 0x40000000, j * BLOCK + 4);
      }
      fs.writeSync(fd, chunk, 0, chunk.length, i * chunk.length);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Creates a tree of many small files under `dir` (about totalBytes in `files` files). Returns the bytes written. */
export function writeTree(dir: string, totalBytes: number, files: number, seed = 2): number {
  const pool = buildPool(seed);
  const next = prng(seed + 1);
  const mean = totalBytes / files;
  let written = 0;
  for (let i = 0; i < files; i++) {
    const sub = path.join(dir, `d${String(i % 37).padStart(2, '0')}`, `e${String(Math.floor(i / 37) % 23).padStart(2, '0')}`);
    if (i < 37 * 23) fs.mkdirSync(sub, { recursive: true });
    // Sizes spread from tiny to ~4x the mean, like a source tree.
    const u = (next() % 1000) / 1000;
    const size = Math.max(64, Math.min(Math.round(mean * 4 * u * u * 0.75 + 64), pool.length));
    const start = next() % (pool.length - size);
    fs.writeFileSync(path.join(sub, `f${String(i).padStart(6, '0')}.dat`), pool.subarray(start, start + size));
    written += size;
  }
  return written;
}
