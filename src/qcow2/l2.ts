/**
 * L1 and L2 table entries (qcow2 spec: "Cluster mapping", "Extended L2 Entries",
 * "Compressed Clusters Descriptor"). Entries are read as two 32-bit halves so that the hot path
 * never touches BigInt; host offsets fit in 56 bits and are exact as JS numbers.
 */

export const L1E_OFFSET_MASK_HI = 0x00ffffff; // bits 32..55 of the entry
export const L1E_OFFSET_MASK_LO = 0xfffffe00; // bits 9..31
export const OFLAG_COPIED_HI = 0x80000000; // bit 63
export const OFLAG_COMPRESSED_HI = 0x40000000; // bit 62
export const OFLAG_ZERO_LO = 0x1; // bit 0 (standard clusters, v3)

const TWO32 = 4294967296;

/** Host offset field (bits 9..55) of an L1 entry or a standard L2 entry. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & L1E_OFFSET_MASK_HI) * TWO32 + ((lo & L1E_OFFSET_MASK_LO) >>> 0);
}

/** Splits a compressed cluster descriptor (bits 0..61 of the L2 entry). */
export function compressedDescriptor(hi: number, lo: number, clusterBits: number): { hostOffset: number; compressedBytes: number } {
  // The host offset takes x = 62 - (cluster_bits - 8) bits, the sector count the rest up to bit 61.
  const x = 62 - (clusterBits - 8);
  const offHiBits = x - 32;
  const hostOffset = (hi & ((1 << offHiBits) - 1)) * TWO32 + (lo >>> 0);
  const sectorBits = clusterBits - 8;
  const extraSectors = (hi >>> offHiBits) & ((1 << sectorBits) - 1);
  // "Number of additional 512-byte sectors"; the first sector is the one the offset lies in.
  const compressedBytes = (extraSectors + 1) * 512 - (hostOffset % 512);
  return { hostOffset, compressedBytes };
}

/** Encodes a compressed cluster descriptor as [hi, lo] (no flags). */
export function encodeCompressedDescriptor(hostOffset: number, compressedBytes: number, clusterBits: number): [number, number] {
  const x = 62 - (clusterBits - 8);
  const offHiBits = x - 32;
  const firstSector = Math.floor(hostOffset / 512);
  const lastSector = Math.floor((hostOffset + compressedBytes - 1) / 512);
  const extraSectors = lastSector - firstSector;
  const hi = ((extraSectors << offHiBits) | Math.floor(hostOffset / TWO32)) >>> 0;
  const lo = hostOffset % TWO32 >>> 0;
  return [hi, lo];
}

/** Writes a 64-bit entry from a host offset and flags. */
export function writeEntry(buf: Buffer, at: number, hostOffset: number, copied: boolean, loFlags = 0): void {
  const hi = (Math.floor(hostOffset / TWO32) & L1E_OFFSET_MASK_HI) | (copied ? OFLAG_COPIED_HI : 0);
  buf.writeUInt32BE(hi >>> 0, at);
  buf.writeUInt32BE(((hostOffset % TWO32) | loFlags) >>> 0, at + 4);
}
