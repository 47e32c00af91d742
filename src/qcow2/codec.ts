/**
 * Compressed-cluster codecs (qcow2 spec: "Compressed Clusters", header compression_type).
 * zlib: raw deflate (QEMU writes a 4 KiB window). zstd: one or more zstd frames.
 *
 * Decompression goes to the native addon (native/codec/codec.c: libdeflate and libzstd on
 * libuv's thread pool, so clusters decode in parallel off the JS thread, straight into the
 * caller's buffer). Where the addon was not built (or QCOW2FS_NO_NATIVE_CODEC is set): Node's
 * zlib on the thread pool, and the zstd library compiled to WebAssembly (@bokuweb/zstd-wasm:
 * installs from the npm registry alone; Node 20 has no zstd) on the JS thread. Both paths
 * accept and reject the same data: the output must be exactly one cluster.
 */
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from './header';

export class DecompressError extends Error {}

// ---- the native addon ------------------------------------------------------------------------

interface CodecAddon {
  /** Resolves with the bytes written to dst, or a negative CODEC_* code (corrupt data). */
  decompress(type: number, src: Uint8Array, dst: Uint8Array): Promise<number>;
  /** The same, reading the compressed bytes from fd first (on the pool thread; zeros past EOF). */
  decompressFile(type: number, fd: number, position: number, length: number, dst: Uint8Array): Promise<number>;
  /** The decoder as a C function table (an external), for the FUSE binding's own threads. */
  api?(): unknown;
}

/** native/codec/codec.c's result codes. */
const CODEC_MESSAGES: Record<number, string> = {
  [-1]: 'corrupt data',
  [-2]: 'the data decodes to more than a cluster',
  [-3]: 'no complete frame (bad magic number or truncated)',
  [-4]: 'out of memory for the decoder',
  [-5]: 'reading the compressed bytes failed',
};

let codecAddonCache: CodecAddon | null | undefined;

/** The native codec addon, or null where it was not built or QCOW2FS_NO_NATIVE_CODEC is set. */
export function codecAddon(): CodecAddon | null {
  if (codecAddonCache === undefined) {
    codecAddonCache = null;
    if (process.env.QCOW2FS_NO_NATIVE_CODEC === undefined) {
      try {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        codecAddonCache = require(path.resolve(__dirname, '..', '..', 'native', 'codec', 'build', 'Release', 'qcow2fs_codec.node')) as CodecAddon;
      } catch {
        codecAddonCache = null; // the fallbacks below: slower, same result
      }
    }
  }
  return codecAddonCache;
}

/**
 * The native decoder for the FUSE binding (which decodes compressed clusters on its worker
 * threads, see src/fuse/direct-read.ts), or null where the addon is not there.
 */
export function nativeDecoderApi(): unknown {
  return codecAddon()?.api?.() ?? null;
}

/** @internal tests: force the fallback decoders (false) or the addon again (true). */
export function useNativeCodec(on: boolean): void {
  codecAddonCache = on ? undefined : null;
  if (on) codecAddon();
}

function checkResult(type: number, r: number, clusterSize: number): void {
  if (r < 0) throw new DecompressError(`${type === COMPRESSION_ZSTD ? 'zstd' : 'zlib'}: ${CODEC_MESSAGES[r] ?? `error ${r}`}`);
  if (r !== clusterSize) throw new DecompressError(`decompressed ${r} bytes, expected a cluster of ${clusterSize}`);
}

async function nativeDecompress(addon: CodecAddon, type: number, src: Uint8Array, out: Buffer): Promise<Buffer> {
  const r = await addon.decompress(type, src, out);
  checkResult(type, r, out.length);
  return out;
}

/**
 * Reads `bytes` compressed bytes at `position` of descriptor fd and decompresses them into
 * `into` (exactly clusterSize bytes), all on the thread pool. Returns false, having done
 * nothing, where the native addon is not available (the caller reads and calls
 * decompressCluster). A failed read or corrupt data is a DecompressError.
 */
export async function decompressClusterFromFile(type: number, fd: number, position: number, bytes: number, clusterSize: number, into: Buffer): Promise<boolean> {
  const addon = codecAddon();
  if (!addon || (type !== COMPRESSION_ZLIB && type !== COMPRESSION_ZSTD) || bytes > 8 * 1024 * 1024) return false;
  if (into.length < clusterSize) throw new RangeError('decompressClusterFromFile: output buffer smaller than a cluster');
  checkResult(type, await addon.decompressFile(type, fd, position, bytes, into.subarray(0, clusterSize)), clusterSize);
  return true;
}

// ---- fallbacks ---------------------------------------------------------------------------------

function inflateRaw(src: Uint8Array, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // chunkSize = one cluster: the whole cluster inflates in one thread-pool job. With the
    // default 16 KiB chunks a 64 KiB cluster took 4-5 round trips through the pool and the
    // stream machinery, and a Buffer.concat (profile: zlib's processCallback was 28% of the
    // daemon's time on a sequential read of a zlib image).
    // QEMU's verdict: whatever fills the cluster (a stream that goes on, or that needs input past
    // the descriptor's bytes, still gives its first cluster; up to 16 clusters of output here).
    const opts = { chunkSize: Math.max(clusterSize, 64 * 1024), maxOutputLength: 16 * clusterSize, finishFlush: zlib.constants.Z_SYNC_FLUSH };
    zlib.inflateRaw(src, opts, (err, out) => {
      if (err) reject(new DecompressError(`zlib: ${err.message}`));
      else resolve(out.length > clusterSize ? out.subarray(0, clusterSize) : out);
    });
  });
}

function deflateRaw(src: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // QEMU's settings (qcow2-threads.c): a 4 KiB window, the default level, memLevel 9.
    zlib.deflateRaw(src, { windowBits: 12, level: 6, memLevel: 9 }, (err, out) => (err ? reject(err) : resolve(out)));
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
  if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
    // A skippable frame: magic, 4-byte little-endian size, that many bytes.
    if (n < 8) throw new DecompressError('zstd: truncated skippable frame');
    const len = 8 + ((src[4]! | (src[5]! << 8) | (src[6]! << 16) | (src[7]! << 24)) >>> 0);
    if (len > n) throw new DecompressError('zstd: truncated skippable frame');
    return len;
  }
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

async function zstdDecompress(src: Uint8Array, clusterSize: number, into?: Buffer): Promise<Buffer> {
  const m = await loadZstd();
  zstdBuffers(m, src.length, clusterSize);
  m.HEAPU8.set(src, zstdSrc);
  let inOff = 0;
  let outOff = 0;
  // QEMU writes one frame; accept several (skippable and empty ones too), as its streaming
  // decoder would.
  while (outOff < clusterSize) {
    const frameLen = zstdFrameLength(src.subarray(inOff));
    const r = m._ZSTD_decompress(zstdDst + outOff, clusterSize - outOff, zstdSrc + inOff, frameLen);
    if (m._ZSTD_isError(r)) throw new DecompressError('zstd: corrupt frame');
    outOff += r;
    inOff += frameLen;
  }
  const out = into && outOff <= into.length ? into.subarray(0, outOff) : Buffer.allocUnsafe(outOff);
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

/**
 * Decompresses one cluster; the result is exactly clusterSize bytes or a DecompressError.
 * `into` (at least clusterSize bytes) is where the cluster goes when given: the result is then
 * its first clusterSize bytes (the fallback zlib path still allocates, and copies).
 */
export async function decompressCluster(type: number, src: Uint8Array, clusterSize: number, into?: Buffer): Promise<Buffer> {
  if (into !== undefined && into.length < clusterSize) throw new RangeError('decompressCluster: output buffer smaller than a cluster');
  if (type !== COMPRESSION_ZLIB && type !== COMPRESSION_ZSTD) throw new DecompressError(`compression type ${type} is not supported`);
  const addon = codecAddon();
  let out: Buffer;
  if (addon) out = await nativeDecompress(addon, type, src, into ? into.subarray(0, clusterSize) : Buffer.allocUnsafe(clusterSize));
  else if (type === COMPRESSION_ZLIB) out = await inflateRaw(src, clusterSize);
  else out = await zstdDecompress(src, clusterSize, into);
  if (out.length !== clusterSize) throw new DecompressError(`decompressed ${out.length} bytes, expected a cluster of ${clusterSize}`);
  if (into !== undefined && (out.buffer !== into.buffer || out.byteOffset !== into.byteOffset)) {
    into.set(out);
    return into.subarray(0, clusterSize);
  }
  return out;
}

/** Compresses one cluster's bytes with the image's codec. */
export function compressCluster(type: number, src: Uint8Array): Promise<Buffer> {
  if (type === COMPRESSION_ZLIB) return deflateRaw(src);
  if (type === COMPRESSION_ZSTD) return zstdCompress(src);
  return Promise.reject(new Error(`compression type ${type} is not supported`));
}
