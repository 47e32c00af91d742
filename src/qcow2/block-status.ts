/**
 * Block status of one qcow2 layer in QEMU's terms (what `qemu-img map` reports per layer): is a
 * guest range data, zero, or unallocated here, and at which host offset, if any. Built on the
 * engine's ClusterMapper (Qcow2Image.lookup); the two cases where the mapping drops the host
 * offset that QEMU reports (zero clusters that keep their host cluster, and unallocated
 * subclusters of an allocated extended-L2 cluster) read the L2 entry again, one cluster at a time.
 */
import { entryOffset, OFLAG_COMPRESSED_HI } from './l2';
import type { Qcow2Image } from './image';

export interface LayerStatus {
  length: number;
  /** Reads from this layer's data (BDRV_BLOCK_DATA). */
  data: boolean;
  /** Reads as zeros because this layer says so (BDRV_BLOCK_ZERO). */
  zero: boolean;
  /** Answered by this layer, not deferred to the backing file (BDRV_BLOCK_ALLOCATED). */
  allocated: boolean;
  /** Host offset in this layer's file, when one is valid (BDRV_BLOCK_OFFSET_VALID). */
  hostOffset?: number;
}

/** Host cluster offset named by the L2 entry for guestOffset (0 if none, or compressed). */
async function hostClusterOf(img: Qcow2Image, guestOffset: number): Promise<number> {
  const g = img.geometry;
  const bytesPerL2 = g.clusterSize * g.l2Entries;
  const l1Index = Math.floor(guestOffset / bytesPerL2);
  const l2Offset = l1Index < img.l1.l2Offsets.length ? img.l1.l2Offsets[l1Index]! : 0;
  if (l2Offset === 0) return 0;
  const idx = Math.floor((guestOffset - l1Index * bytesPerL2) / g.clusterSize);
  const entry = Buffer.alloc(8);
  await img.file.pread(entry, l2Offset + idx * g.l2EntryBytes);
  const hi = entry.readUInt32BE(0);
  if (hi & OFLAG_COMPRESSED_HI) return 0;
  return entryOffset(hi, entry.readUInt32BE(4));
}

export async function qcow2LayerStatus(img: Qcow2Image, offset: number, bytes: number): Promise<LayerStatus> {
  const g = img.geometry;
  const m = await img.lookup(offset, bytes);
  switch (m.kind) {
    case 'data':
      return { length: m.length, data: true, zero: false, allocated: true, hostOffset: m.hostOffset };
    case 'compressed':
      return { length: m.length, data: true, zero: false, allocated: true };
    case 'zero':
    case 'unallocated': {
      const mayHaveHost = m.kind === 'zero' ? m.allocated : g.extendedL2;
      const zero = m.kind === 'zero';
      if (!mayHaveHost) return { length: m.length, data: false, zero, allocated: zero };
      const intoCluster = offset % g.clusterSize;
      const length = Math.min(m.length, g.clusterSize - intoCluster);
      const host = await hostClusterOf(img, offset);
      const out: LayerStatus = { length, data: false, zero, allocated: zero };
      if (host !== 0) out.hostOffset = host + intoCluster;
      return out;
    }
  }
}
