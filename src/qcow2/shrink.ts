/**
 * Shrinking a qcow2 image (what qemu-img resize --shrink does), and emptying its active layer
 * (what qemu-img commit does to the overlay): the virtual size goes down,
 * every cluster mapped past the new end is released, and the file is cut after the last
 * cluster still in use. The L1 table keeps its length, as in QEMU.
 *
 * Order, so that an interruption leaves at worst leaked clusters: the new size is written (and
 * flushed) first, so nothing past it is ever read again; then each L1/L2 entry past the end is
 * cleared (flushed); only then are the refcounts of what they pointed to lowered. An L2 table
 * shared with a snapshot is never edited: the surviving part is copied to a new cluster, whose
 * L1 entry then moves to it. (Refcounts count the L1 tables that reach a cluster, so the copy's
 * surviving entries need no new references.)
 */
import { ImageError, UsageError } from '../errors';
import { AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from './header';
import type { Qcow2Image } from './image';
import { compressedDescriptor, entryOffset, OFLAG_COMPRESSED_HI, writeEntry } from './l2';
import { loadImageRefcounts } from './refcount';
import { getRefcount, refcountEntriesPerBlock, setRefcount } from './refcount-decode';

const TWO32 = 4294967296;

interface HostRange {
  offset: number;
  bytes: number;
}

/** The host ranges an L2 entry references (none for unallocated and plain zero clusters). */
function entryReference(table: Buffer, at: number, clusterBits: number, clusterSize: number): HostRange | null {
  const hi = table.readUInt32BE(at);
  const lo = table.readUInt32BE(at + 4);
  if (hi & OFLAG_COMPRESSED_HI) {
    const d = compressedDescriptor(hi, lo, clusterBits);
    return { offset: d.hostOffset, bytes: d.compressedBytes };
  }
  const host = entryOffset(hi, lo);
  return host === 0 ? null : { offset: host, bytes: clusterSize };
}

function checkWritable(img: Qcow2Image): void {
  const h = img.header;
  const file = img.file;
  if (file.readOnly) throw new Error('internal: needs a writable file');
  if (h.incompatibleFeatures & INCOMPAT_CORRUPT) throw new ImageError('image is marked corrupt: repair it with "qcow2fs check -r all" first', file.path);
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) throw new ImageError('image was not closed cleanly (its refcounts may be stale): run "qcow2fs check -r all" first', file.path);
}

/** Persistent bitmaps are not updated by us: disown them (spec: autoclear bits), durably. */
async function disownBitmaps(img: Qcow2Image): Promise<void> {
  const h = img.header;
  if (h.version === 3 && h.autoclearFeatures & AUTOCLEAR_BITMAPS) {
    const ac = Buffer.alloc(8);
    ac.writeBigUInt64BE(h.autoclearFeatures & ~AUTOCLEAR_BITMAPS);
    await img.file.pwrite(ac, 88);
    await img.file.flush();
  }
}

/**
 * Shrinks `img` (opened read-only over a writable file, nothing cached dirty) to newSize bytes.
 * Returns the new file length.
 */
export async function shrinkQcow2(img: Qcow2Image, newSize: number): Promise<number> {
  const h = img.header;
  checkWritable(img);
  if (!Number.isSafeInteger(newSize) || newSize <= 0 || newSize % 512 !== 0) throw new UsageError(`the new size ${newSize} must be above 0 and a multiple of 512 bytes`);
  if (newSize >= h.sizeBytes) throw new Error('internal: shrink to a size that is not smaller');
  // 1. The new size first: nothing past it is read again, whatever happens next.
  const size = Buffer.alloc(8);
  size.writeBigUInt64BE(BigInt(newSize));
  await img.file.pwrite(size, 24);
  await img.file.flush();
  await disownBitmaps(img);
  return releaseAndTrim(img, Math.ceil(newSize / img.geometry.clusterSize));
}

/**
 * Empties the active layer (what qemu-img commit does to the overlay afterwards): every guest
 * cluster becomes unallocated, so reads go to the backing file again. Snapshots keep their data.
 */
export async function emptyQcow2(img: Qcow2Image): Promise<number> {
  checkWritable(img);
  await disownBitmaps(img);
  return releaseAndTrim(img, 0);
}

/** Unmaps guest clusters from firstDropped on, releases what they used, cuts the file. */
async function releaseAndTrim(img: Qcow2Image, firstDropped: number): Promise<number> {
  const h = img.header;
  const file = img.file;
  const g = img.geometry;
  const cs = g.clusterSize;
  const rc = await loadImageRefcounts(file, h, {
    fileSize: img.fileSize,
    cacheBytes: 4 * 1024 * 1024,
    regions: img.metadataRegions(),
    onTableMoved: () => undefined,
  });

  // 2. Release what lies past the new end, one L2 table at a time.
  const perTable = g.l2Entries;
  const l1 = img.l1;
  const l1Entry = Buffer.alloc(8);
  for (let i = Math.floor(firstDropped / perTable); i < l1.l2Offsets.length; i++) {
    const l2Offset = l1.l2Offsets[i]!;
    if (l2Offset === 0) continue;
    const from = Math.max(0, firstDropped - i * perTable);
    const table = Buffer.alloc(cs);
    await file.pread(table, l2Offset);
    const dropped: HostRange[] = [];
    for (let idx = from; idx < perTable; idx++) {
      const r = entryReference(table, idx * g.l2EntryBytes, g.clusterBits, cs);
      if (r) dropped.push(r);
    }
    // A data cluster's refcount counts the L1 tables (active and snapshots) that reach it, so
    // whatever this L1 entry no longer reaches loses one reference, shared table or not.
    const tableRefcount = await rc.get(l2Offset / cs);
    if (from === 0) {
      // The whole table lies past the end: unhook it from the L1 table.
      l1Entry.fill(0);
      await file.pwrite(l1Entry, l1.tableOffset + i * 8);
      await file.flush();
      await rc.adjust(l2Offset, cs, -1);
    } else {
      // Keep entries [0, from), clear the rest.
      const kept = Buffer.from(table);
      kept.fill(0, from * g.l2EntryBytes);
      if (dropped.length === 0 && table.equals(kept)) continue;
      if (tableRefcount === 1) {
        await file.pwrite(kept, l2Offset);
        await file.flush();
      } else {
        // Shared with a snapshot: edit a copy, then point the L1 entry at it.
        const copyOffset = await rc.allocate(1);
        await rc.persist();
        await file.pwrite(kept, copyOffset);
        await file.flush();
        writeEntry(l1Entry, 0, copyOffset, true);
        await file.pwrite(l1Entry, l1.tableOffset + i * 8);
        await file.flush();
        l1.l2Offsets[i] = copyOffset;
        await rc.adjust(l2Offset, cs, -1);
      }
    }
    for (const r of dropped) await rc.adjust(r.offset, r.bytes, -1);
    await rc.persist();
  }

  // 3. Refcount blocks that now describe only free clusters go too (QEMU: shrinking the
  // refcount table), so that the file can be cut after the last cluster in use.
  await dropEmptyRefcountBlocks(img, rc.tableLocation.offset, rc.tableLocation.clusters);

  // 4. Cut the file after the last cluster in use.
  const fileSize = await file.size();
  const rc2 = await loadImageRefcounts(file, h, { fileSize, cacheBytes: 4 * 1024 * 1024, table: rc.tableLocation });
  let last = Math.ceil(fileSize / cs) - 1;
  while (last > 0 && (await rc2.get(last)) === 0) last--;
  const end = (last + 1) * cs;
  if (end < fileSize) await file.truncate(end);
  await file.flush();
  return Math.min(end, fileSize);
}

/**
 * Removes refcount blocks whose entries are all zero (apart from the block's own cluster, when
 * it describes itself): the table entry is cleared first, then the block's cluster is released
 * in the block that counts it; repeated until nothing changes.
 */
async function dropEmptyRefcountBlocks(img: Qcow2Image, tableOffset: number, tableClusters: number): Promise<void> {
  const file = img.file;
  const h = img.header;
  const cs = img.geometry.clusterSize;
  const order = h.refcountOrder;
  const perBlock = refcountEntriesPerBlock(h.clusterBits, order);
  const raw = Buffer.alloc(tableClusters * cs);
  await file.pread(raw, tableOffset);
  const table: number[] = [];
  for (let k = 0; k < raw.length / 8; k++) table.push(raw.readUInt32BE(k * 8) * TWO32 + raw.readUInt32BE(k * 8 + 4));
  const readBlock = async (off: number): Promise<Buffer> => {
    const b = Buffer.alloc(cs);
    await file.pread(b, off);
    return b;
  };
  for (let changed = true; changed; ) {
    changed = false;
    for (let k = 0; k < table.length; k++) {
      const off = table[k]!;
      if (off === 0) continue;
      const block = await readBlock(off);
      const own = off / cs;
      let used = false;
      for (let i = 0; i < perBlock && !used; i++) {
        const cluster = k * perBlock + i;
        if (cluster !== own && getRefcount(block, i, order) !== 0) used = true;
      }
      if (used) continue;
      table[k] = 0;
      const zero = Buffer.alloc(8);
      await file.pwrite(zero, tableOffset + k * 8);
      await file.flush();
      const home = Math.floor(own / perBlock);
      if (home !== k && table[home]) {
        const counting = await readBlock(table[home]!);
        const idx = own - home * perBlock;
        setRefcount(counting, idx, order, Math.max(0, getRefcount(counting, idx, order) - 1));
        await file.pwrite(counting, table[home]!);
        await file.flush();
      }
      changed = true;
    }
  }
}
