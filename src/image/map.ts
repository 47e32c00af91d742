/**
 * The allocation map of an image chain, in the terms and with the merging rules of `qemu-img
 * map`: each guest range is answered by the first layer that has it (its depth), as data, zero
 * or (below the last layer) unallocated zeros, with the host offset when there is one.
 */
import { hostExtent } from '../io/file';
import { Qcow2Image } from '../qcow2/image';
import { loadImageRefcounts } from '../qcow2/refcount';
import { RawImage } from './raw';
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
  if (dev instanceof Qcow2Image) {
    const st = await qcow2LayerStatus(dev, offset, bytes);
    // Like QEMU, on an image that looks metadata-preallocated, data whose host clusters are a
    // hole in the file reads as zeros.
    if (st.data && st.hostOffset !== undefined && (await looksMetadataPreallocated(dev))) {
      const h = hostExtent(dev.file.fd, st.hostOffset, st.length);
      return { ...st, length: h.length, zero: h.hole };
    }
    return st;
  }
  if (dev instanceof RawImage) {
    // Raw: data at the same offset, except where the file has holes (SEEK_DATA/SEEK_HOLE).
    const h = hostExtent(dev.file.fd, offset, bytes);
    return { length: h.length, data: !h.hole, zero: h.hole, allocated: true, hostOffset: offset };
  }
  return { length: bytes, data: true, zero: false, allocated: true, hostOffset: offset };
}

const preallocated = new WeakMap<Qcow2Image, Promise<boolean>>();

/**
 * QEMU asks the host file for holes under data clusters only when the image looks
 * metadata-preallocated: more clusters have a refcount than the file really occupies (plus a
 * ninth, or two clusters). A falloc/full-preallocated file occupies its clusters.
 */
function looksMetadataPreallocated(img: Qcow2Image): Promise<boolean> {
  let p = preallocated.get(img);
  if (!p) {
    p = (async () => {
      const cs = img.geometry.clusterSize;
      const real = Math.floor(((await img.file.stat()).blocks * 512) / cs);
      const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
      const rc = await loadImageRefcounts(img.file, img.header, { fileSize: img.fileSize, cacheBytes: 1024 * 1024 });
      const clusters = Math.ceil(img.fileSize / cs);
      let allocated = 0;
      for (let c = 0; c < clusters; c++) {
        if ((await rc.get(c)) > 0 && ++allocated > threshold) return true;
      }
      return false;
    })();
    preallocated.set(img, p);
  }
  return p;
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
