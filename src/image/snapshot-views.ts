/**
 * Read-only views of every internal snapshot of an opened image (`--all-snapshots`, forensic
 * mounts). Each view is the same engine reading through the snapshot's L1 table, with the
 * snapshot's recorded disk size. The views borrow the image's file and backing chain, so they
 * take no extra descriptors or locks; closing the image closes what they read from.
 */
import { Qcow2Image } from '../qcow2/image';
import type { SnapshotEntry } from '../qcow2/snapshot';
import type { BlockDevice, Extent, PlainRun } from './blockdev';
import type { OpenedImage } from './open';
import { log } from '../log';

/** L2 cache per snapshot view: snapshots are browsed, not hammered, and there may be many. */
export const SNAPSHOT_VIEW_L2_CACHE_BYTES = 4 * 1024 * 1024;

export interface SnapshotView {
  snapshot: SnapshotEntry;
  device: BlockDevice;
}

/** A device that serves another's I/O but leaves closing its file to the owner. */
class BorrowedDevice implements BlockDevice {
  constructor(private readonly inner: Qcow2Image) {}
  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return true;
  }
  get description(): string {
    return this.inner.description;
  }
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  readCached(buf: Uint8Array, offset: number): boolean {
    return this.inner.readCached(buf, offset);
  }
  get mapGranuleBytes(): number {
    return this.inner.mapGranuleBytes;
  }
  get mapRegionBytes(): number {
    return this.inner.mapRegionBytes;
  }
  plainRunCached(offset: number, maxLength: number): PlainRun {
    const run = this.inner.plainRunCached(offset, maxLength);
    if (run.kind === 'data' && run.writable) return { ...run, writable: false };
    return run.kind === 'zero' && run.allocatable ? { kind: 'zero', length: run.length } : run;
  }
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.write(buf, offset);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  status(offset: number, length: number): Promise<Extent[]> {
    return this.inner.status(offset, length);
  }
  allocatedBytes(): Promise<number> {
    return this.inner.allocatedBytes();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** One read-only view per internal snapshot of the top image (none for raw images). */
export async function openSnapshotViews(opened: OpenedImage, l2CacheBytes = SNAPSHOT_VIEW_L2_CACHE_BYTES): Promise<SnapshotView[]> {
  const top = opened.chain[0]?.device;
  if (!(top instanceof Qcow2Image)) return [];
  const views: SnapshotView[] = [];
  for (const snapshot of top.snapshots) {
    if (snapshot.damage) {
      log.warn({ image: top.file.path, snapshot: snapshot.name, id: snapshot.id }, `snapshot left out: ${snapshot.damage}`);
      continue;
    }
    const img = await Qcow2Image.open(top.file, { readOnly: true, backing: top.backing, snapshot, l2CacheBytes });
    views.push({ snapshot, device: new BorrowedDevice(img) });
  }
  return views;
}
