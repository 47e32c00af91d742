/**
 * The qcow2 header and its extensions (qcow2 spec: "Header", "Header extensions").
 * decodeHeader() is pure: it takes the first bytes of the file and its length, validates every
 * field against the spec and sane limits, and returns a typed record or throws ImageError naming
 * the field and value.
 */
import { ImageError, UnsupportedError } from '../errors';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

/** Incompatible feature bits (spec: "incompatible_features"). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_FDE = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Limits QEMU also enforces; anything beyond them is hostile. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME_BYTES = 1023;
export const MAX_VIRTUAL_SIZE = Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512);

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface UnknownExtension {
  type: number;
  length: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  sizeBytes: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Byte offset just past the extension area's end marker. */
  extensionsEnd: number;
  backingFile: string | null;
  backingFormat: string | null;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | null;
  externalDataFile: string | null;
  hasEncryptionHeader: boolean;
  unknownExtensions: UnknownExtension[];
}

/** Derived geometry, computed once. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntryBytes: number;
  l2Entries: number;
  /** log2(l2Entries). */
  l2Bits: number;
  subclusterBits: number;
  subclusterSize: number;
  refcountBits: number;
  /** Standard L2 entries may carry the zero flag (bit 0): version 3 only; in version 2 it is corruption. */
  zeroFlagAllowed: boolean;
}

export function geometryOf(h: Qcow2Header): Geometry {
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const clusterSize = 2 ** h.clusterBits;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntryBytes;
  const subclusterBits = extendedL2 ? h.clusterBits - 5 : h.clusterBits;
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    extendedL2,
    l2EntryBytes,
    l2Entries,
    l2Bits: Math.log2(l2Entries),
    subclusterBits,
    subclusterSize: 2 ** subclusterBits,
    refcountBits: 2 ** h.refcountOrder,
    zeroFlagAllowed: h.version >= 3,
  };
}

function u64(buf: Buffer, off: number, field: string): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError(`${field} ${v} is out of range`);
  return Number(v);
}

const INCOMPAT_BIT_NAMES: Record<number, string> = {
  0: 'dirty',
  1: 'corrupt',
  2: 'external data file',
  3: 'compression type',
  4: 'extended L2 entries',
};

/** How many bytes of the file decodeHeader() may need: the whole first cluster, at most 2 MiB. */
export const HEADER_PROBE_BYTES = 2 ** MAX_CLUSTER_BITS;

/**
 * Decodes and validates the header. `head` holds the file's first bytes (at least the first
 * cluster, or the whole file if shorter); `fileSize` is the file's length. `forCheck` lets through
 * what QEMU's open lets through and its check then reports: an active L1 table or a refcount table
 * (partly) past the end of the file (zeros there), a refcount table at offset 0 or of no clusters;
 * check reports those as corruptions instead of refusing the image.
 */
export function decodeHeader(head: Buffer, fileSize: number, opts: { forCheck?: boolean } = {}): Qcow2Header {
  if (fileSize < 72 || head.length < 72) throw new ImageError(`file is truncated: ${fileSize} bytes is too short for a qcow2 header`);
  const magic = head.readUInt32BE(0);
  if (magic !== QCOW2_MAGIC) throw new ImageError(`bad magic 0x${magic.toString(16)}: not a qcow2 image`);
  const version = head.readUInt32BE(4);
  if (version === 1) throw new UnsupportedError('version 1 (qcow, not qcow2) is not supported');
  if (version !== 2 && version !== 3) throw new UnsupportedError(`version ${version} is not supported (only 2 and 3)`);

  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new ImageError(`cluster_bits ${clusterBits} is out of range (${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`);
  }
  const clusterSize = 2 ** clusterBits;

  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(head, 8, 'backing_file_offset'),
    backingFileSize: head.readUInt32BE(16),
    clusterBits,
    sizeBytes: 0,
    cryptMethod: head.readUInt32BE(32),
    l1Size: head.readUInt32BE(36),
    l1TableOffset: u64(head, 40, 'l1_table_offset'),
    refcountTableOffset: u64(head, 48, 'refcount_table_offset'),
    refcountTableClusters: head.readUInt32BE(56),
    nbSnapshots: head.readUInt32BE(60),
    snapshotsOffset: u64(head, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: COMPRESSION_ZLIB,
    extensionsEnd: 72,
    backingFile: null,
    backingFormat: null,
    featureNames: [],
    bitmaps: null,
    externalDataFile: null,
    hasEncryptionHeader: false,
    unknownExtensions: [],
  };

  const sizeBig = head.readBigUInt64BE(24);
  if (sizeBig > BigInt(MAX_VIRTUAL_SIZE)) throw new ImageError(`size ${sizeBig} is too large (above 2^53)`);
  h.sizeBytes = Number(sizeBig);

  if (version === 3) {
    if (head.length < 104) throw new ImageError(`file is truncated: ${fileSize} bytes is too short for a version 3 header`);
    h.incompatibleFeatures = head.readBigUInt64BE(72);
    h.compatibleFeatures = head.readBigUInt64BE(80);
    h.autoclearFeatures = head.readBigUInt64BE(88);
    h.refcountOrder = head.readUInt32BE(96);
    h.headerLength = head.readUInt32BE(100);
    if (h.headerLength < 104) throw new ImageError(`header_length ${h.headerLength} is too small (at least 104 for version 3)`);
    if (h.headerLength % 8 !== 0) throw new ImageError(`header_length ${h.headerLength} is not a multiple of 8`);
    if (h.headerLength > clusterSize) throw new ImageError(`header_length ${h.headerLength} is larger than the cluster size ${clusterSize}`);
    if (h.headerLength > head.length) throw new ImageError(`file is truncated: ${fileSize} bytes is too short for header_length ${h.headerLength}`);
    if (h.headerLength > 104) h.compressionType = head.readUInt8(104);
  }
  if (h.refcountOrder > 6) throw new ImageError(`refcount_order ${h.refcountOrder} is out of range (0..6)`);

  // The first cluster holds the header, its extensions and the backing file name.
  if (head.length < Math.min(clusterSize, fileSize)) throw new ImageError('internal: header probe too short');

  if (h.cryptMethod === 1) throw new UnsupportedError('encryption (crypt_method 1, AES) is not supported');
  if (h.cryptMethod === 2) throw new UnsupportedError('encryption (crypt_method 2, LUKS) is not supported');
  if (h.cryptMethod !== 0) throw new ImageError(`crypt_method ${h.cryptMethod} is invalid`);

  decodeExtensions(head, h, clusterSize, fileSize);
  checkIncompatibleFeatures(h);

  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedError(`compression_type ${h.compressionType} is not supported (0 zlib, 1 zstd)`);
  }
  if (h.compressionType === COMPRESSION_ZLIB && (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n) {
    throw new ImageError('the compression type feature bit is set but compression_type is zlib (QEMU refuses this too)');
  }
  if (h.compressionType !== COMPRESSION_ZLIB && (h.incompatibleFeatures & INCOMPAT_COMPRESSION) === 0n) {
    throw new ImageError(`compression_type ${h.compressionType} is set but the compression type feature bit is not`);
  }
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n && clusterBits < 14) {
    throw new ImageError(`extended L2 entries need a cluster size of at least 16 KiB (cluster_bits ${clusterBits})`);
  }

  // Backing file name (spec: must lie in the first cluster, no longer than 1023 bytes).
  // An empty name (size 0) is no backing file, as for QEMU.
  if (h.backingFileOffset !== 0 && h.backingFileSize !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME_BYTES) throw new ImageError(`backing_file_size ${h.backingFileSize} is too large (at most ${MAX_BACKING_NAME_BYTES})`);
    const end = h.backingFileOffset + h.backingFileSize;
    if (end > clusterSize) throw new ImageError(`backing_file_offset ${h.backingFileOffset} + size ${h.backingFileSize} lies outside the first cluster`);
    if (end > fileSize) throw new ImageError(`backing_file_offset ${h.backingFileOffset} + size ${h.backingFileSize} lies past the end of the file`);
    if (h.backingFileOffset < h.headerLength) throw new ImageError(`backing_file_offset ${h.backingFileOffset} overlaps the header`);
    const name = head.subarray(h.backingFileOffset, end);
    if (name.includes(0)) throw new ImageError('backing file name contains a NUL byte');
    h.backingFile = name.toString('utf8');
  }

  // L1 table.
  const geometry = geometryOf(h);
  const bytesPerL1Entry = geometry.clusterSize * geometry.l2Entries;
  const l1Needed = Math.ceil(h.sizeBytes / bytesPerL1Entry);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw new ImageError(`l1_size ${h.l1Size} is too large (at most ${MAX_L1_BYTES / 8} entries)`);
  if (h.l1Size < l1Needed) throw new ImageError(`l1_size ${h.l1Size} is too small for size ${h.sizeBytes} (needs ${l1Needed})`);
  if (h.l1Size > 0) {
    if (h.l1TableOffset === 0 || h.l1TableOffset % clusterSize !== 0) throw new ImageError(`l1_table_offset 0x${h.l1TableOffset.toString(16)} is not aligned to the cluster size`);
    if (!opts.forCheck && h.l1TableOffset + h.l1Size * 8 > fileSize) throw new ImageError(`l1_table_offset 0x${h.l1TableOffset.toString(16)} + l1_size ${h.l1Size} lies past the end of the file (${fileSize} bytes)`);
  }

  // Refcount table.
  if ((h.refcountTableOffset === 0 && !opts.forCheck) || h.refcountTableOffset % clusterSize !== 0) {
    throw new ImageError(`refcount_table_offset 0x${h.refcountTableOffset.toString(16)} is not aligned to the cluster size`);
  }
  if (h.refcountTableClusters === 0 && !opts.forCheck) throw new ImageError('refcount_table_clusters 0: the image has no refcount table');
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) throw new ImageError(`refcount_table_clusters ${h.refcountTableClusters} is too large`);
  if (!opts.forCheck && h.refcountTableOffset + h.refcountTableClusters * clusterSize > fileSize) {
    throw new ImageError(`refcount_table_offset 0x${h.refcountTableOffset.toString(16)} + ${h.refcountTableClusters} clusters lies past the end of the file`);
  }

  // Snapshot table (entries are validated when read).
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw new ImageError(`nb_snapshots ${h.nbSnapshots} is too large (at most ${MAX_SNAPSHOTS})`);
  // QEMU checks the offset even when there are no snapshots.
  if (h.snapshotsOffset % clusterSize !== 0) throw new ImageError(`snapshots_offset 0x${h.snapshotsOffset.toString(16)} is not aligned to the cluster size`);
  if (h.nbSnapshots > 0) {
    if (h.snapshotsOffset === 0) throw new ImageError('snapshots_offset 0 with snapshots: the table would overlap the header');
    if (h.snapshotsOffset >= fileSize) throw new ImageError(`snapshots_offset 0x${h.snapshotsOffset.toString(16)} lies past the end of the file`);
  }

  // Metadata regions must not overlap the header cluster.
  if (h.l1Size > 0 && h.l1TableOffset < clusterSize) throw new ImageError(`l1_table_offset 0x${h.l1TableOffset.toString(16)} overlaps the header`);
  if (h.refcountTableOffset < clusterSize && !opts.forCheck) throw new ImageError(`refcount_table_offset 0x${h.refcountTableOffset.toString(16)} overlaps the header`);
  if (h.l1Size > 0 && rangesOverlap(h.l1TableOffset, h.l1Size * 8, h.refcountTableOffset, h.refcountTableClusters * clusterSize)) {
    throw new ImageError(`l1_table_offset 0x${h.l1TableOffset.toString(16)} overlaps the refcount table`);
  }
  return h;
}

export function rangesOverlap(a: number, aLen: number, b: number, bLen: number): boolean {
  return a < b + bLen && b < a + aLen;
}

function decodeExtensions(head: Buffer, h: Qcow2Header, clusterSize: number, fileSize: number): void {
  let off = h.version === 3 ? h.headerLength : 72;
  // Extensions end at the end marker, and never run into the backing file name or the first cluster's end.
  const limit = Math.min(clusterSize, fileSize, h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize);
  const seen = new Set<number>();
  for (;;) {
    if (off + 8 > limit) {
      // A v2 image may end its header area without an end marker only if nothing follows.
      if (off >= limit) break;
      throw new ImageError(`header extension at offset ${off} is truncated`);
    }
    const type = head.readUInt32BE(off);
    const length = head.readUInt32BE(off + 4);
    if (type === EXT_END) {
      off += 8;
      break;
    }
    const dataOff = off + 8;
    if (dataOff + length > limit) throw new ImageError(`header extension 0x${type.toString(16)} length ${length} runs past the header area`);
    const data = head.subarray(dataOff, dataOff + length);
    if (seen.has(type) && type !== 0) throw new ImageError(`header extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = data.toString('utf8').replace(/\0+$/, '');
        break;
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= length; i += 48) {
          const t = data.readUInt8(i);
          const bit = data.readUInt8(i + 1);
          const name = data.subarray(i + 2, i + 48).toString('utf8').replace(/\0.*$/s, '');
          h.featureNames.push({ type: t === 0 ? 'incompatible' : t === 1 ? 'compatible' : 'autoclear', bit, name });
        }
        break;
      case EXT_BITMAPS:
        if (length < 24) throw new ImageError(`bitmaps extension length ${length} is too short`);
        h.bitmaps = {
          nbBitmaps: data.readUInt32BE(0),
          bitmapDirectorySize: Number(data.readBigUInt64BE(8)),
          bitmapDirectoryOffset: Number(data.readBigUInt64BE(16)),
        };
        break;
      case EXT_FDE:
        h.hasEncryptionHeader = true;
        break;
      case EXT_DATA_FILE:
        h.externalDataFile = data.toString('utf8').replace(/\0+$/, '');
        break;
      default:
        h.unknownExtensions.push({ type, length });
    }
    off = dataOff + Math.ceil(length / 8) * 8;
  }
  h.extensionsEnd = off;
}

function featureName(h: Qcow2Header, bit: number): string {
  const named = h.featureNames.find((f) => f.type === 'incompatible' && f.bit === bit);
  return named?.name || INCOMPAT_BIT_NAMES[bit] || `unknown feature`;
}

function checkIncompatibleFeatures(h: Qcow2Header): void {
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const bits: string[] = [];
    for (let b = 0; b < 64; b++) if (unknown & (1n << BigInt(b))) bits.push(`${featureName(h, b)} (bit ${b})`);
    throw new UnsupportedError(`unsupported incompatible feature: ${bits.join(', ')}`);
  }
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n || h.externalDataFile !== null) {
    throw new UnsupportedError(`external data file${h.externalDataFile ? ` "${h.externalDataFile}"` : ''} is not supported`);
  }
  if (h.hasEncryptionHeader) throw new UnsupportedError('full disk encryption header found: encrypted images are not supported');
}

/** Names of the set bits, for info and error messages. */
export function describeIncompatible(h: Qcow2Header): string[] {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) if (h.incompatibleFeatures & (1n << BigInt(b))) out.push(featureName(h, b));
  return out;
}
