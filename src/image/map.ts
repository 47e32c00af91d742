/**
 * The allocation map of an image chain, in the terms and with the merging rules of `qemu-img
 * map`: each guest range is answered by the first layer that has it (its depth), as data, zero
 * or (below the last layer) unallocated zeros, with the host offset when there is one.
 */
import { Qcow2Image } from '../qcow2/image';
import { qcow2LayerStatus, type LayerStatus } from '../qcow2/block-status';
import type { ChainLayer } from './open';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset in the file at `depth`, when valid. */
  offset?: number;
  /** The file at `depth` when an offset is given (for the human format). */
  file?: string;
}

/** qemu-img map asks at most this much per call; the answers are merged anyway. */
const PROBE_BYTES = 1 << 30;

async function layerStatus(layer: ChainLayer, offset: number, bytes: number): Promise<LayerStatus> {
  const dev = layer.device;
  if (dev instanceof Qcow2Image) return qcow2LayerStatus(dev, offset, bytes);
  // Raw: every byte is data at the same offset. (QEMU also asks the host file system for holes,
  // which Node cannot do without lseek(SEEK_DATA); holes show as data here.)
  return { length: bytes, data: true, zero: false, allocated: true, hostOffset: offset };
}

/** Status of [offset, +bytes) through the chain, as qemu-img map's per-range query. */
export async function chainStatus(chain: readonly ChainLayer[], offset: number, bytes: number): Promise<MapEntry> {
  for (let depth = 0; ; depth++) {
    const layer = chain[depth]!;
    const n = Math.min(bytes, layer.device.size - offset);
    const st = await layerStatus(layer, offset, n);
    const below = chain[depth + 1];
    if (st.data || st.zero || below === undefined || offset >= below.device.size) {
      // Unallocated in the last layer, or past the end of a shorter backing file: zeros.
      const entry: MapEntry = { start: offset, length: st.length, depth, present: st.allocated, zero: st.zero || !st.data, data: st.data };
      if (st.hostOffset !== undefined) {
        entry.offset = st.hostOffset;
        entry.file = layer.path;
      }
      return entry;
    }
    bytes = st.length;
  }
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if (a.file !== b.file) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/**
 * Walks [start, start + length) of the chain's top device and calls `emit` with each merged entry
 * in order (qemu-img map's coalescing). `merge` may relax the comparison (the human format
 * ignores zero/data distinctions of unmapped ranges).
 */
export async function mapChain(
  chain: readonly ChainLayer[],
  start: number,
  length: number,
  emit: (e: MapEntry) => void | Promise<void>,
): Promise<void> {
  const end = start + length;
  let cur: MapEntry | null = null;
  let pos = start;
  while (pos < end) {
    const next = await chainStatus(chain, pos, Math.min(PROBE_BYTES, end - pos));
    if (cur !== null && mergeable(cur, next)) {
      cur.length += next.length;
    } else {
      if (cur !== null) await emit(cur);
      cur = next;
    }
    pos += next.length;
  }
  if (cur !== null) await emit(cur);
}
