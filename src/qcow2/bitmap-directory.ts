/**
 * Persistent dirty bitmaps (qcow2 spec: "Bitmaps extension", "Bitmap directory", "Bitmap
 * table"). Only reading: info lists the bitmaps, check counts the clusters they reference.
 * Decoding is pure and validates each entry the way the spec constrains it.
 */
import { ImageError } from '../errors';
import type { HostFile } from '../io/file';
import { AUTOCLEAR_BITMAPS, type Qcow2Header } from './header';

export const BITMAP_FLAG_IN_USE = 1 << 0;
export const BITMAP_FLAG_AUTO = 1 << 1;
export const BITMAP_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
const BITMAP_FLAGS_KNOWN = BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO | BITMAP_FLAG_EXTRA_DATA_COMPATIBLE;
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
/** Limits from the spec and QEMU: larger values are hostile. */
export const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;
export const MAX_BITMAP_TABLE_ENTRIES = 0x8000000;
export const MAX_BITMAP_NAME_BYTES = 1023;
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
const DIRECTORY_ENTRY_HEADER_BYTES = 24;

export interface BitmapDirectoryEntry {
  name: string;
  bitmapTableOffset: number;
  /** Entries (64-bit) in the bitmap table. */
  bitmapTableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  extraDataSize: number;
}

/** Decodes the directory (the bytes at bitmap_directory_offset) holding `count` entries. */
export function decodeBitmapDirectory(dir: Buffer, count: number, clusterSize: number): BitmapDirectoryEntry[] {
  const out: BitmapDirectoryEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + DIRECTORY_ENTRY_HEADER_BYTES > dir.length) throw new ImageError(`bitmap directory entry ${i} runs past the directory's end`);
    const tableBig = dir.readBigUInt64BE(off);
    const bitmapTableSize = dir.readUInt32BE(off + 8);
    const flags = dir.readUInt32BE(off + 12);
    const type = dir.readUInt8(off + 16);
    const granularityBits = dir.readUInt8(off + 17);
    const nameSize = dir.readUInt16BE(off + 18);
    const extraDataSize = dir.readUInt32BE(off + 20);
    const nameOff = off + DIRECTORY_ENTRY_HEADER_BYTES + extraDataSize;
    if (extraDataSize > dir.length || nameOff + nameSize > dir.length) throw new ImageError(`bitmap directory entry ${i} runs past the directory's end`);
    const name = dir.subarray(nameOff, nameOff + nameSize).toString('utf8');
    const where = `bitmap "${name}"`;
    if (tableBig > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError(`${where}: bitmap_table_offset ${tableBig} is out of range`);
    const bitmapTableOffset = Number(tableBig);
    if (bitmapTableOffset === 0 || bitmapTableOffset % clusterSize !== 0) {
      throw new ImageError(`${where}: bitmap_table_offset 0x${bitmapTableOffset.toString(16)} is not aligned to the cluster size`);
    }
    if (bitmapTableSize === 0 || bitmapTableSize > MAX_BITMAP_TABLE_ENTRIES) throw new ImageError(`${where}: bitmap_table_size ${bitmapTableSize} is out of range`);
    if (flags & ~BITMAP_FLAGS_KNOWN) throw new ImageError(`${where}: reserved flags 0x${flags.toString(16)} are set`);
    if (type !== BITMAP_TYPE_DIRTY_TRACKING) throw new ImageError(`${where}: type ${type} is not a dirty tracking bitmap`);
    if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS) {
      throw new ImageError(`${where}: granularity_bits ${granularityBits} is out of range (${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS})`);
    }
    if (nameSize === 0 || nameSize > MAX_BITMAP_NAME_BYTES) throw new ImageError(`bitmap directory entry ${i}: name_size ${nameSize} is out of range`);
    out.push({ name, bitmapTableOffset, bitmapTableSize, flags, type, granularityBits, extraDataSize });
    off = Math.ceil((nameOff + nameSize) / 8) * 8;
  }
  if (off !== dir.length) throw new ImageError(`bitmap directory is ${dir.length} bytes but its ${count} entries take ${off}`);
  return out;
}

/** Bits of a bitmap table entry (spec: "Bitmap table"). */
export const BITMAP_TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
export const BITMAP_TABLE_RESERVED_MASK = 0xff000000000001fen;
export const BITMAP_TABLE_ALL_ONES = 1n;

/** A bitmap table entry: the data cluster it names (0 = none), or null if the entry is invalid. */
export function bitmapTableEntryOffset(entry: bigint, clusterSize: number): number | null {
  if (entry & BITMAP_TABLE_RESERVED_MASK) return null;
  const offset = Number(entry & BITMAP_TABLE_OFFSET_MASK);
  if (offset !== 0 && ((entry & BITMAP_TABLE_ALL_ONES) !== 0n || offset % clusterSize !== 0)) return null;
  return offset;
}

/** The flags as qemu-img info names them, in its order. */
export function bitmapFlagNames(flags: number): string[] {
  const out: string[] = [];
  if (flags & BITMAP_FLAG_IN_USE) out.push('in-use');
  if (flags & BITMAP_FLAG_AUTO) out.push('auto');
  return out;
}

/**
 * Reads the bitmap directory named by the header. Bitmaps whose autoclear bit is clear were
 * written by software that did not maintain them: QEMU ignores them, and so do we (empty list).
 */
export async function readBitmapDirectory(file: HostFile, header: Qcow2Header, fileSize: number): Promise<BitmapDirectoryEntry[]> {
  const ext = header.bitmaps;
  if (ext === null || (header.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n || ext.nbBitmaps === 0) return [];
  const clusterSize = 2 ** header.clusterBits;
  const where = `bitmap directory at 0x${ext.bitmapDirectoryOffset.toString(16)}`;
  if (ext.bitmapDirectorySize === 0 || ext.bitmapDirectorySize > MAX_BITMAP_DIRECTORY_BYTES) {
    throw new ImageError(`bitmap_directory_size ${ext.bitmapDirectorySize} is out of range`, file.path);
  }
  if (ext.bitmapDirectoryOffset === 0 || ext.bitmapDirectoryOffset % clusterSize !== 0) throw new ImageError(`${where} is not aligned to the cluster size`, file.path);
  if (ext.bitmapDirectoryOffset + ext.bitmapDirectorySize > fileSize) throw new ImageError(`${where} lies past the end of the file`, file.path);
  const dir = Buffer.alloc(ext.bitmapDirectorySize);
  await file.pread(dir, ext.bitmapDirectoryOffset);
  try {
    return decodeBitmapDirectory(dir, ext.nbBitmaps, clusterSize);
  } catch (err) {
    if (err instanceof ImageError && !err.file) throw new ImageError(err.message, file.path);
    throw err;
  }
}
