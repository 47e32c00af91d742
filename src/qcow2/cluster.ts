/**
 * The one question everything asks: what backs the guest range starting at `guestOffset`, and
 * for how long does that answer stay the same? (qcow2 spec: "Cluster mapping"; QEMU's
 * qcow2_get_host_offset / qcow2_get_subcluster_type.) Reads, status/map and st_blocks are all
 * built on lookup(); the run-merging logic lives here only.
 */
import { CorruptionError } from '../errors';
import type { Geometry } from './header';
import type { TableCache } from './cache';
import { compressedDescriptor, entryOffset, OFLAG_COMPRESSED_HI, OFLAG_ZERO_LO } from './l2';

export type Mapping =
  /** Uncompressed data at hostOffset for `length` bytes, host-contiguous. */
  | { kind: 'data'; length: number; hostOffset: number }
  /** Reads as zeros (zero flag or zero subcluster bit); `allocated` when a host cluster is kept. */
  | { kind: 'zero'; length: number; allocated: boolean }
  /** Part of one compressed cluster, starting offsetInCluster bytes into it. */
  | { kind: 'compressed'; length: number; hostOffset: number; compressedBytes: number; offsetInCluster: number }
  /** Not allocated in this layer: the backing file (or zeros) answers. */
  | { kind: 'unallocated'; length: number };

/** An L1 table in memory: the L2 table offset of each entry (0 = none) and its COPIED flag. */
export interface L1Table {
  /** Host offset of the table itself in the image file. */
  tableOffset: number;
  l2Offsets: Float64Array;
  copied: Uint8Array;
}

/** Regions of the image file that data clusters must never point into. */
export interface MetadataRegions {
  /** File length in bytes (grows as clusters are allocated). */
  fileSize(): number;
  /** Returns a description of the metadata structure overlapping [offset, +length), or null. */
  overlaps(offset: number, length: number): string | null;
}

const K_UNALLOC = 0;
const K_ZERO = 1;
const K_ZERO_ALLOC = 2;
const K_DATA = 3;
const K_COMPRESSED = 4;

export class ClusterMapper {
  private readonly clusterSize: number;
  private readonly granuleSize: number;
  private readonly bytesPerL2Table: number;
  /** Result registers of classify(), to keep the hot loop free of allocations. */
  private rKind = 0;
  private rHost = 0;
  private rCBytes = 0;

  constructor(
    private readonly g: Geometry,
    private readonly l2Cache: TableCache,
    private readonly regions: MetadataRegions,
    private readonly describe: string,
  ) {
    this.clusterSize = g.clusterSize;
    this.granuleSize = g.subclusterSize;
    this.bytesPerL2Table = g.clusterSize * g.l2Entries;
  }

  /** Loads (through the cache) the L2 table for l1Index of `l1`, or null if none. */
  async l2Table(l1: L1Table, l1Index: number): Promise<Buffer | null> {
    const l2Offset = l1Index < l1.l2Offsets.length ? l1.l2Offsets[l1Index]! : 0;
    if (l2Offset === 0) return null;
    return this.l2Cache.peek(l2Offset) ?? (await this.l2Cache.get(l2Offset));
  }

  /** lookup() without a Promise when the L2 table is cached or absent; undefined when it must be loaded. */
  lookupCached(l1: L1Table, guestOffset: number, maxLength: number): Mapping | undefined {
    const l1Index = Math.floor(guestOffset / this.bytesPerL2Table);
    const toTableEnd = (l1Index + 1) * this.bytesPerL2Table - guestOffset;
    const l2Offset = l1Index < l1.l2Offsets.length ? l1.l2Offsets[l1Index]! : 0;
    if (l2Offset === 0) return { kind: 'unallocated', length: Math.min(maxLength, toTableEnd) };
    const table = this.l2Cache.peek(l2Offset);
    if (table === undefined) return undefined;
    return this.lookupInTable(table, l1Index, guestOffset, Math.min(maxLength, toTableEnd));
  }

  async lookup(l1: L1Table, guestOffset: number, maxLength: number): Promise<Mapping> {
    const hit = this.lookupCached(l1, guestOffset, maxLength);
    if (hit !== undefined) return hit;
    // The L2 table exists but is not cached: load it, then answer as lookupCached would.
    const l1Index = Math.floor(guestOffset / this.bytesPerL2Table);
    const table = await this.l2Cache.get(l1.l2Offsets[l1Index]!);
    const toTableEnd = (l1Index + 1) * this.bytesPerL2Table - guestOffset;
    return this.lookupInTable(table, l1Index, guestOffset, Math.min(maxLength, toTableEnd));
  }

  /** Classifies granule (cluster or subcluster) `sub` of L2 entry `idx` into the result registers. */
  private classify(table: Buffer, idx: number, sub: number, l1Index: number): void {
    const g = this.g;
    const at = idx * g.l2EntryBytes;
    const hi = table.readUInt32BE(at);
    const lo = table.readUInt32BE(at + 4);
    if (hi & OFLAG_COMPRESSED_HI) {
      if (g.extendedL2 && (table.readUInt32BE(at + 8) !== 0 || table.readUInt32BE(at + 12) !== 0)) {
        this.corrupt(`compressed cluster has a non-zero subcluster bitmap`, l1Index, idx);
      }
      const d = compressedDescriptor(hi, lo, g.clusterBits);
      if (d.hostOffset < this.clusterSize || d.hostOffset >= this.regions.fileSize()) {
        this.corrupt(`compressed cluster offset 0x${d.hostOffset.toString(16)} lies outside the file`, l1Index, idx);
      }
      // Its sector count may run past the end of the file (QEMU reads zeros there, and so do we:
      // the decoder then decides, as QEMU's does).
      this.rKind = K_COMPRESSED;
      this.rHost = d.hostOffset;
      this.rCBytes = d.compressedBytes;
      return;
    }
    const host = entryOffset(hi, lo);
    if (!g.extendedL2) {
      if (lo & OFLAG_ZERO_LO) {
        // As QEMU does: a version 2 image has no zero clusters, so the bit means damage.
        if (!g.zeroFlagAllowed) this.corrupt(`zero flag set in a version 2 image`, l1Index, idx);
        this.rKind = host === 0 ? K_ZERO : K_ZERO_ALLOC;
        return;
      }
      if (host === 0) {
        this.rKind = K_UNALLOC;
        return;
      }
      this.checkDataCluster(host, l1Index, idx);
      this.rKind = K_DATA;
      this.rHost = host;
      return;
    }
    // Extended L2: bits 0..31 of the bitmap say "allocated", bits 32..63 say "reads as zeros".
    const zeroBits = table.readUInt32BE(at + 8);
    const allocBits = table.readUInt32BE(at + 12);
    const bit = 1 << sub;
    if (host === 0) {
      if (allocBits !== 0) this.corrupt(`unallocated cluster has allocated subclusters (bitmap 0x${allocBits.toString(16)})`, l1Index, idx);
      this.rKind = zeroBits & bit ? K_ZERO : K_UNALLOC;
      return;
    }
    this.checkDataCluster(host, l1Index, idx);
    const a = allocBits & bit;
    const z = zeroBits & bit;
    if (a && z) this.corrupt(`subcluster ${sub} is marked both allocated and zero`, l1Index, idx);
    if (z) {
      this.rKind = K_ZERO_ALLOC;
    } else if (a) {
      this.rKind = K_DATA;
      this.rHost = host + sub * this.granuleSize;
    } else {
      this.rKind = K_UNALLOC;
    }
  }

  private checkDataCluster(host: number, l1Index: number, idx: number): void {
    if (host % this.clusterSize !== 0) this.corrupt(`data cluster offset 0x${host.toString(16)} is not aligned to the cluster size`, l1Index, idx);
    if (host >= this.regions.fileSize()) this.corrupt(`data cluster offset 0x${host.toString(16)} lies past the end of the file`, l1Index, idx);
    const what = this.regions.overlaps(host, this.clusterSize);
    if (what !== null) this.corrupt(`data cluster offset 0x${host.toString(16)} points into the ${what}`, l1Index, idx);
  }

  private corrupt(msg: string, l1Index: number, l2Index: number): never {
    throw new CorruptionError(`${this.describe}: corrupt L2 entry (L1 index ${l1Index}, L2 index ${l2Index}): ${msg}`);
  }

  private lookupInTable(table: Buffer, l1Index: number, guestOffset: number, maxLength: number): Mapping {
    const g = this.g;
    const gs = this.granuleSize;
    const granulesPerCluster = g.extendedL2 ? 32 : 1;
    const inTable = guestOffset - l1Index * this.bytesPerL2Table;
    let granule = Math.floor(inTable / gs);
    let idx = g.extendedL2 ? granule >>> 5 : granule;
    let sub = g.extendedL2 ? granule & 31 : 0;
    this.classify(table, idx, sub, l1Index);
    const kind = this.rKind;
    const intoGranule = inTable - granule * gs;
    if (kind === K_COMPRESSED) {
      const offsetInCluster = inTable - idx * this.clusterSize;
      return {
        kind: 'compressed',
        length: Math.min(maxLength, this.clusterSize - offsetInCluster),
        hostOffset: this.rHost,
        compressedBytes: this.rCBytes,
        offsetInCluster,
      };
    }
    const firstHost = this.rHost + intoGranule;
    let nextHost = this.rHost + gs;
    let length = gs - intoGranule;
    const totalGranules = g.l2Entries * granulesPerCluster;
    while (length < maxLength && ++granule < totalGranules) {
      if (kind === K_UNALLOC) {
        // An all-zero entry is unallocated in every layout: the common case in a fresh table,
        // walked without classify().
        if (!g.extendedL2) {
          const at = granule * 8;
          if (table.readUInt32BE(at) === 0 && table.readUInt32BE(at + 4) === 0) {
            length += gs;
            continue;
          }
        } else if ((granule & 31) === 0) {
          const at = (granule >>> 5) * 16;
          if (table.readUInt32BE(at) === 0 && table.readUInt32BE(at + 4) === 0 && table.readUInt32BE(at + 8) === 0 && table.readUInt32BE(at + 12) === 0) {
            length += 32 * gs;
            granule += 31;
            continue;
          }
        }
      }
      idx = g.extendedL2 ? granule >>> 5 : granule;
      sub = g.extendedL2 ? granule & 31 : 0;
      this.classify(table, idx, sub, l1Index);
      if (this.rKind !== kind) break;
      if (kind === K_DATA) {
        if (this.rHost !== nextHost) break;
        nextHost += gs;
      }
      length += gs;
    }
    length = Math.min(length, maxLength);
    switch (kind) {
      case K_DATA:
        return { kind: 'data', length, hostOffset: firstHost };
      case K_ZERO:
        return { kind: 'zero', length, allocated: false };
      case K_ZERO_ALLOC:
        return { kind: 'zero', length, allocated: true };
      default:
        return { kind: 'unallocated', length };
    }
  }
}
