/**
 * Refcount block entries (qcow2 spec: "Host cluster management"). A refcount block is one
 * cluster holding cluster_size * 8 / refcount_bits entries of refcount_bits = 1 << refcount_order
 * bits each. Entries of 8 bits and more are big-endian integers; narrower entries are packed
 * into bytes starting at the least significant bit (entry 0 is bit 0 of byte 0), as QEMU
 * writes them. Pure functions, no I/O.
 */

/** Largest refcount an entry of this width can hold (capped at 2^53 - 1 for 64-bit entries). */
export function refcountMax(refcountOrder: number): number {
  const bits = 1 << refcountOrder;
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

/** Entries in one refcount block of 2^clusterBits bytes. */
export function refcountEntriesPerBlock(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder);
}

function checkOrder(refcountOrder: number): void {
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw new RangeError(`refcount_order ${refcountOrder} is out of range (0..6)`);
  }
}

function checkIndex(block: Uint8Array, index: number, refcountOrder: number): void {
  const bits = 1 << refcountOrder;
  if (!Number.isInteger(index) || index < 0 || (index + 1) * bits > block.length * 8) {
    throw new RangeError(`refcount index ${index} lies outside a ${block.length}-byte block of ${bits}-bit entries`);
  }
}

/**
 * Reads entry `index`. 64-bit entries above 2^53 - 1 (never legitimate: no image has that many
 * references) read as Number.MAX_SAFE_INTEGER so that callers stay in plain numbers.
 */
export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  checkOrder(refcountOrder);
  checkIndex(block, index, refcountOrder);
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << refcountOrder;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)]!;
      const shift = (index % perByte) * bits;
      return (byte >>> shift) & ((1 << bits) - 1);
    }
    case 3:
      return block[index]!;
    case 4: {
      const at = index * 2;
      return (block[at]! << 8) | block[at + 1]!;
    }
    case 5: {
      const at = index * 4;
      return ((block[at]! << 24) >>> 0) + ((block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!);
    }
    default: {
      const at = index * 8;
      const hi = ((block[at]! << 24) >>> 0) + ((block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!);
      const lo = ((block[at + 4]! << 24) >>> 0) + ((block[at + 5]! << 16) | (block[at + 6]! << 8) | block[at + 7]!);
      if (hi >= 0x200000) return Number.MAX_SAFE_INTEGER;
      return hi * 4294967296 + lo;
    }
  }
}

/** Writes entry `index`; throws RangeError if `value` does not fit the entry width. */
export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  checkOrder(refcountOrder);
  checkIndex(block, index, refcountOrder);
  if (!Number.isSafeInteger(value) || value < 0 || value > refcountMax(refcountOrder)) {
    throw new RangeError(`refcount ${value} does not fit in ${1 << refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << refcountOrder;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4: {
      const at = index * 2;
      block[at] = value >>> 8;
      block[at + 1] = value & 0xff;
      return;
    }
    case 5: {
      const at = index * 4;
      block[at] = value >>> 24;
      block[at + 1] = (value >>> 16) & 0xff;
      block[at + 2] = (value >>> 8) & 0xff;
      block[at + 3] = value & 0xff;
      return;
    }
    default: {
      const at = index * 8;
      const hi = Math.floor(value / 4294967296);
      const lo = value % 4294967296;
      block[at] = hi >>> 24;
      block[at + 1] = (hi >>> 16) & 0xff;
      block[at + 2] = (hi >>> 8) & 0xff;
      block[at + 3] = hi & 0xff;
      block[at + 4] = lo >>> 24;
      block[at + 5] = (lo >>> 16) & 0xff;
      block[at + 6] = (lo >>> 8) & 0xff;
      block[at + 7] = lo & 0xff;
      return;
    }
  }
}
