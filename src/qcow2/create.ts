/**
 * Creating qcow2 files: the creation options (qemu-img create's -o names and rules), their
 * validation, and the pure encoder of the header cluster (qcow2 spec: "Header", "Header
 * extensions"). The file itself is laid out by layout-writer.ts.
 */
import { UsageError } from '../errors';
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  MAX_BACKING_NAME_BYTES,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_VIRTUAL_SIZE,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
} from './header';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface Qcow2CreateOptions {
  sizeBytes: number;
  clusterBits: number;
  version: 2 | 3;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  compressionType: number;
  backingFile: string | null;
  backingFormat: string | null;
}

export const DEFAULT_CLUSTER_BITS = 16;

/** Header length we write for version 3: the 104 fixed bytes plus compression_type, padded to 8. */
export const V3_HEADER_LENGTH = 112;

/** The fields a finished layout fills in. */
export interface HeaderLayout {
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
}

/** L1 entries needed to map `sizeBytes`. */
export function l1EntriesFor(sizeBytes: number, clusterBits: number, extendedL2: boolean): number {
  const l2Entries = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  return Math.ceil(sizeBytes / (2 ** clusterBits * l2Entries));
}

/** Checks the option combination the way qemu-img create does; throws UsageError naming the option. */
export function validateCreateOptions(o: Qcow2CreateOptions): void {
  if (!Number.isSafeInteger(o.sizeBytes) || o.sizeBytes < 0) throw new UsageError(`size ${o.sizeBytes}: the size must not be negative`);
  if (o.sizeBytes > MAX_VIRTUAL_SIZE) throw new UsageError(`size ${o.sizeBytes} is too large`);
  if (o.sizeBytes % 512 !== 0) throw new UsageError(`size ${o.sizeBytes} is not a multiple of 512`);
  if (o.clusterBits < MIN_CLUSTER_BITS || o.clusterBits > MAX_CLUSTER_BITS) throw new UsageError('cluster_size must be a power of two between 512 and 2048k');
  if (o.refcountOrder < 0 || o.refcountOrder > 6) throw new UsageError('refcount_bits must be a power of two and may not exceed 64 bits');
  if (o.version === 2) {
    if (o.lazyRefcounts) throw new UsageError('lazy_refcounts=on needs compat=1.1');
    if (o.refcountOrder !== 4) throw new UsageError('refcount_bits other than 16 need compat=1.1');
    if (o.extendedL2) throw new UsageError('extended_l2=on needs compat=1.1');
    if (o.compressionType !== COMPRESSION_ZLIB) throw new UsageError('compression_type=zstd needs compat=1.1');
  }
  if (o.extendedL2 && o.clusterBits < 14) throw new UsageError('extended_l2=on needs a cluster_size of at least 16384 bytes');
  const l1 = l1EntriesFor(o.sizeBytes, o.clusterBits, o.extendedL2);
  if (l1 * 8 > MAX_L1_BYTES) throw new UsageError(`size ${o.sizeBytes} needs an L1 table larger than ${MAX_L1_BYTES} bytes: use a larger cluster_size`);
  if (o.backingFile !== null) {
    if (Buffer.byteLength(o.backingFile) > MAX_BACKING_NAME_BYTES) throw new UsageError(`backing file name is longer than ${MAX_BACKING_NAME_BYTES} bytes`);
    if (o.backingFile.length === 0 || o.backingFile.includes('\0')) throw new UsageError('backing file name is empty or contains a NUL byte');
  }
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/**
 * Encodes the first cluster: header, header extensions (backing format), end marker, backing
 * file name. No snapshots, no bitmaps; clean (dirty bit clear).
 */
export function encodeHeaderCluster(o: Qcow2CreateOptions, layout: HeaderLayout): Buffer {
  const cs = 2 ** o.clusterBits;
  const buf = Buffer.alloc(cs);
  const headerLength = o.version === 3 ? V3_HEADER_LENGTH : 72;
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(o.version, 4);
  buf.writeUInt32BE(o.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(o.sizeBytes), 24);
  buf.writeUInt32BE(0, 32); // crypt_method
  buf.writeUInt32BE(layout.l1Size, 36);
  buf.writeBigUInt64BE(BigInt(layout.l1TableOffset), 40);
  buf.writeBigUInt64BE(BigInt(layout.refcountTableOffset), 48);
  buf.writeUInt32BE(layout.refcountTableClusters, 56);
  if (o.version === 3) {
    let incompat = 0n;
    if (o.compressionType !== COMPRESSION_ZLIB) incompat |= INCOMPAT_COMPRESSION;
    if (o.extendedL2) incompat |= INCOMPAT_EXTL2;
    buf.writeBigUInt64BE(incompat, 72);
    buf.writeBigUInt64BE(o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n, 80);
    buf.writeBigUInt64BE(0n, 88);
    buf.writeUInt32BE(o.refcountOrder, 96);
    buf.writeUInt32BE(headerLength, 100);
    buf.writeUInt8(o.compressionType, 104);
  }
  let off = headerLength;
  if (o.backingFile !== null && o.backingFormat) {
    const fmt = Buffer.from(o.backingFormat, 'utf8');
    buf.writeUInt32BE(EXT_BACKING_FORMAT, off);
    buf.writeUInt32BE(fmt.length, off + 4);
    fmt.copy(buf, off + 8);
    off += 8 + pad8(fmt.length);
  }
  off += 8; // end of extensions (type 0, length 0)
  if (o.backingFile !== null) {
    const name = Buffer.from(o.backingFile, 'utf8');
    if (off + name.length > cs) throw new UsageError(`backing file name does not fit in the first cluster (${cs} bytes)`);
    name.copy(buf, off);
    buf.writeBigUInt64BE(BigInt(off), 8);
    buf.writeUInt32BE(name.length, 16);
  }
  return buf;
}

export function compressionTypeByName(name: string): number {
  if (name === 'zlib') return COMPRESSION_ZLIB;
  if (name === 'zstd') return COMPRESSION_ZSTD;
  throw new UsageError(`compression_type ${name}: expected zlib or zstd`);
}
