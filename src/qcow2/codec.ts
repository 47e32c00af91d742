/**
 * Compressed-cluster codecs (qcow2 spec: "Compressed Clusters", header compression_type).
 * zlib: raw deflate with a 4 KiB window (windowBits -12), decoded on libuv's thread pool so
 * several clusters inflate in parallel. zstd: one or more zstd frames, decoded with the zstd
 * library compiled to WebAssembly (@bokuweb/zstd-wasm: installs from the npm registry alone,
 * nothing to compile, and Node 20 has no zstd of its own).
 */
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from './header';

export class DecompressError extends Error {}

function inflateRaw(src: Uint8Array, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.inflateRaw(src, { maxOutputLength: clusterSize + 1 }, (err, out) => {
      if (err) reject(new DecompressError(`zlib: ${err.message}`));
      else resolve(out);
    });
  });
}

function deflateRaw(src: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.deflateRaw(src, { windowBits: 12, level: 6 }, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

// ---- zstd over WebAssembly -------------------------------------------------------------------

interface ZstdModule {
  _malloc(n: number): number;
  _free(p: number): void;
  _ZSTD_decompress(dst: number, dstCap: number, src: number, srcSize: number): number;
  _ZSTD_compress(dst: number, dstCap: number, src: number, srcSize: number, level: number): number;
  _ZSTD_compressBound(n: number): number;
  _ZSTD_isError(code: number): number;
  HEAPU8: Uint8Array;
}

let zstdReady: Promise<ZstdModule> | null = null;

function loadZstd(): Promise<ZstdModule> {
  if (!zstdReady) {
    zstdReady = (async () => {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const lib = require('@bokuweb/zstd-wasm') as { init(): Promise<void> };
      await lib.init();
      // The package exports only its high-level API; its Emscripten module (for zero-copy
      // calls with our own buffers) sits next to the entry point.
      const entry = require.resolve('@bokuweb/zstd-wasm');
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const mod = require(path.join(path.dirname(entry), 'module.js')) as { Module: ZstdModule };
      return mod.Module;
    })();
  }
  return zstdReady;
}

/**
 * Length of the zstd frame at the start of `src` (zstd format: frame header, blocks, optional
 * checksum). A compressed cluster's descriptor rounds its size up to 512-byte sectors, so the
 * bytes after the frame are padding that a whole-buffer decoder would reject.
 */
export function zstdFrameLength(src: Uint8Array): number {
  const n = src.length;
  if (n < 6) throw new DecompressError('zstd: frame too short');
  const magic = (src[0]! | (src[1]! << 8) | (src[2]! << 16) | (src[3]! << 24)) >>> 0;
  if (magic !== 0xfd2fb528) throw new DecompressError(`zstd: bad frame magic 0x${magic.toString(16)}`);
  const fhd = src[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  let off = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictFlag]!;
  off += fcsFlag === 0 ? (singleSegment ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (off + 3 > n) throw new DecompressError('zstd: truncated block header');
    const bh = src[off]! | (src[off + 1]! << 8) | (src[off + 2]! << 16);
    off += 3;
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new DecompressError('zstd: reserved block type');
    off += type === 1 ? 1 : size;
    if (off > n) throw new DecompressError('zstd: truncated block');
    if (last) break;
  }
  if (checksum) off += 4;
  if (off > n) throw new DecompressError('zstd: truncated checksum');
  return off;
}

/** Persistent WebAssembly buffers: no per-cluster allocation inside the module. */
let zstdSrc = 0;
let zstdSrcCap = 0;
let zstdDst = 0;
let zstdDstCap = 0;

function zstdBuffers(m: ZstdModule, srcLen: number, dstLen: number): void {
  if (srcLen > zstdSrcCap) {
    if (zstdSrc) m._free(zstdSrc);
    zstdSrcCap = Math.max(srcLen, 64 * 1024);
    zstdSrc = m._malloc(zstdSrcCap);
  }
  if (dstLen > zstdDstCap) {
    if (zstdDst) m._free(zstdDst);
    zstdDstCap = Math.max(dstLen, 64 * 1024);
    zstdDst = m._malloc(zstdDstCap);
  }
}

async function zstdDecompress(src: Uint8Array, clusterSize: number): Promise<Buffer> {
  const m = await loadZstd();
  zstdBuffers(m, src.length, clusterSize);
  m.HEAPU8.set(src, zstdSrc);
  let inOff = 0;
  let outOff = 0;
  // QEMU writes one frame; accept several, as its streaming decoder would.
  while (outOff < clusterSize) {
    const frameLen = zstdFrameLength(src.subarray(inOff));
    const r = m._ZSTD_decompress(zstdDst + outOff, clusterSize - outOff, zstdSrc + inOff, frameLen);
    if (m._ZSTD_isError(r)) throw new DecompressError('zstd: corrupt frame');
    if (r === 0) break;
    outOff += r;
    inOff += frameLen;
  }
  const out = Buffer.allocUnsafe(outOff);
  out.set(m.HEAPU8.subarray(zstdDst, zstdDst + outOff));
  return out;
}

async function zstdCompress(src: Uint8Array): Promise<Buffer> {
  const m = await loadZstd();
  const bound = m._ZSTD_compressBound(src.length);
  zstdBuffers(m, src.length, bound);
  m.HEAPU8.set(src, zstdSrc);
  const r = m._ZSTD_compress(zstdDst, bound, zstdSrc, src.length, 3);
  if (m._ZSTD_isError(r)) throw new Error('zstd: compression failed');
  return Buffer.from(m.HEAPU8.subarray(zstdDst, zstdDst + r));
}

/** Decompresses one cluster; the result is exactly clusterSize bytes or a DecompressError. */
export async function decompressCluster(type: number, src: Uint8Array, clusterSize: number): Promise<Buffer> {
  let out: Buffer;
  if (type === COMPRESSION_ZLIB) out = await inflateRaw(src, clusterSize);
  else if (type === COMPRESSION_ZSTD) out = await zstdDecompress(src, clusterSize);
  else throw new DecompressError(`compression type ${type} is not supported`);
  if (out.length !== clusterSize) throw new DecompressError(`decompressed ${out.length} bytes, expected a cluster of ${clusterSize}`);
  return out;
}

/** Compresses one cluster's bytes with the image's codec. */
export function compressCluster(type: number, src: Uint8Array): Promise<Buffer> {
  if (type === COMPRESSION_ZLIB) return deflateRaw(src);
  if (type === COMPRESSION_ZSTD) return zstdCompress(src);
  return Promise.reject(new Error(`compression type ${type} is not supported`));
}
