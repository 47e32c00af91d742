/**
 * Refcount block entries (qcow2 spec: "Host cluster management"): a refcount block is an array
 * of big-endian unsigned integers of refcount_bits = 1 << refcount_order bits (1 to 64). Widths
 * below a byte pack the first entry into the least significant bits of each byte, as QEMU does.
 * Values are JS numbers: a 64-bit refcount above 2^53 cannot occur in a sane image.
 */

/** Entries in one refcount block of `clusterSize` bytes. */
export function refcountEntriesPerBlock(clusterSize: number, refcountOrder: number): number {
  return (clusterSize * 8) >>> refcountOrder;
}

/** Largest refcount a width can hold (capped at MAX_SAFE_INTEGER for 64-bit). */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << refcountOrder) - 1;
}

export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2:
      return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index]!;
    case 4:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 5: {
      const o = index * 4;
      return ((block[o]! << 24) >>> 0) + ((block[o + 1]! << 16) | (block[o + 2]! << 8) | block[o + 3]!);
    }
    case 6: {
      const o = index * 8;
      const hi = ((block[o]! << 24) >>> 0) + ((block[o + 1]! << 16) | (block[o + 2]! << 8) | block[o + 3]!);
      const lo = ((block[o + 4]! << 24) >>> 0) + ((block[o + 5]! << 16) | (block[o + 6]! << 8) | block[o + 7]!);
      return hi * 4294967296 + lo;
    }
    default:
      throw new RangeError(`refcount_order ${refcountOrder} out of range`);
  }
}

export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  if (value < 0 || value > maxRefcount(refcountOrder) || !Number.isInteger(value)) {
    throw new RangeError(`refcount ${value} does not fit in ${1 << refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0: {
      const i = index >>> 3;
      const s = index & 7;
      block[i] = (block[i]! & ~(1 << s)) | (value << s);
      return;
    }
    case 1: {
      const i = index >>> 2;
      const s = (index & 3) * 2;
      block[i] = (block[i]! & ~(3 << s)) | (value << s);
      return;
    }
    case 2: {
      const i = index >>> 1;
      const s = (index & 1) * 4;
      block[i] = (block[i]! & ~(15 << s)) | (value << s);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 5: {
      const o = index * 4;
      block[o] = value >>> 24;
      block[o + 1] = (value >>> 16) & 0xff;
      block[o + 2] = (value >>> 8) & 0xff;
      block[o + 3] = value & 0xff;
      return;
    }
    case 6: {
      const o = index * 8;
      const hi = Math.floor(value / 4294967296);
      const lo = value % 4294967296;
      for (let k = 0; k < 4; k++) {
        block[o + k] = (hi >>> (24 - 8 * k)) & 0xff;
        block[o + 4 + k] = (lo >>> (24 - 8 * k)) & 0xff;
      }
      return;
    }
    default:
      throw new RangeError(`refcount_order ${refcountOrder} out of range`);
  }
}
