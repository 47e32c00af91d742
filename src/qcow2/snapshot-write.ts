/**
 * Creating, reverting to and deleting internal snapshots (qcow2 spec: "Snapshots"; QEMU's
 * qcow2-snapshot.c and qcow2_update_snapshot_refcount). Offline operations on an image opened
 * read-write and not in use by anyone else.
 *
 * Crash ordering: refcounts only ever run ahead of the references (increments are durable before
 * the tables that add references; the tables that drop references are durable before the
 * decrements), so an interrupted operation leaves leaked clusters, never corruption.
 */
import { ImageError, UsageError } from '../errors';
import type { Qcow2Image } from './image';
import { compressedDescriptor, entryOffset, OFLAG_COMPRESSED_HI, OFLAG_COPIED_HI, writeEntry } from './l2';
import type { RefcountManager } from './refcount';
import { findSnapshot, type SnapshotEntry } from './snapshot';

const TWO32 = 4294967296;
const EXTRA_DATA_BYTES = 24; // vm_state_size_large, disk_size, icount

/** Encodes a snapshot table (every entry with 24 bytes of extra data, padded to 8 bytes). */
export function encodeSnapshotTable(entries: readonly SnapshotEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of entries) {
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const len = Math.ceil((40 + EXTRA_DATA_BYTES + id.length + name.length) / 8) * 8;
    const b = Buffer.alloc(len);
    b.writeUInt32BE(Math.floor(s.l1TableOffset / TWO32), 0);
    b.writeUInt32BE(s.l1TableOffset % TWO32, 4);
    b.writeUInt32BE(s.l1Size, 8);
    b.writeUInt16BE(id.length, 12);
    b.writeUInt16BE(name.length, 14);
    b.writeUInt32BE(s.dateSeconds >>> 0, 16);
    b.writeUInt32BE(s.dateNanoseconds >>> 0, 20);
    b.writeBigUInt64BE(s.vmClockNanoseconds, 24);
    b.writeUInt32BE(s.vmStateSize > 0xffffffff ? 0 : s.vmStateSize, 32);
    b.writeUInt32BE(EXTRA_DATA_BYTES, 36);
    b.writeBigUInt64BE(BigInt(s.vmStateSize), 40);
    b.writeBigUInt64BE(BigInt(s.diskSizeBytes ?? 0), 48);
    b.writeBigUInt64BE(s.icount ?? 0n, 56);
    id.copy(b, 64);
    name.copy(b, 64 + id.length);
    parts.push(b);
  }
  return Buffer.concat(parts);
}

interface Ctx {
  img: Qcow2Image;
  rc: RefcountManager;
  cs: number;
}

async function context(img: Qcow2Image): Promise<Ctx> {
  if (!img.writer) throw new UsageError(`${img.file.path} is open read-only`);
  await img.writer.flush();
  return { img, rc: await img.writer.loadRefcounts(), cs: img.geometry.clusterSize };
}

async function readL1(ctx: Ctx, offset: number, size: number): Promise<number[]> {
  const raw = Buffer.alloc(size * 8);
  if (size > 0) await ctx.img.file.pread(raw, offset);
  const out: number[] = [];
  for (let i = 0; i < size; i++) out.push(entryOffset(raw.readUInt32BE(i * 8), raw.readUInt32BE(i * 8 + 4)));
  return out;
}

async function l2At(ctx: Ctx, offset: number): Promise<Buffer> {
  const c = ctx.img.l2Cache;
  return c.peek(offset) ?? (await c.get(offset));
}

/** Host ranges an L2 entry holds a reference to (none when unallocated). */
function entryRange(ctx: Ctx, table: Buffer, i: number): { offset: number; bytes: number } | null {
  const at = i * ctx.img.geometry.l2EntryBytes;
  const hi = table.readUInt32BE(at);
  const lo = table.readUInt32BE(at + 4);
  if (hi & OFLAG_COMPRESSED_HI) {
    const d = compressedDescriptor(hi, lo, ctx.img.geometry.clusterBits);
    return { offset: d.hostOffset, bytes: d.compressedBytes };
  }
  const host = entryOffset(hi, lo);
  return host === 0 ? null : { offset: host, bytes: ctx.cs };
}

/**
 * Before anything is written: every L2 table of the tree, and every cluster its entries point
 * at, lies inside the file and is aligned (a corrupt entry would otherwise have its refcounts
 * changed, or fail halfway through). Throws an ImageError naming the first bad one.
 */
async function checkTree(ctx: Ctx, l2Offsets: readonly number[], what: string): Promise<void> {
  const { img, cs } = ctx;
  const g = img.geometry;
  const fileSize = img.fileSize;
  const hex = (n: number): string => `0x${n.toString(16)}`;
  const bad = (msg: string): never => {
    throw new ImageError(`${what}: ${msg}; nothing was changed (qcow2fs check -r all repairs what it can)`, img.file.path);
  };
  for (let i = 0; i < l2Offsets.length; i++) {
    const l2 = l2Offsets[i]!;
    if (l2 === 0) continue;
    if (l2 % cs !== 0 || l2 < cs || l2 + cs > Math.ceil(fileSize / cs) * cs) bad(`the L2 table of L1 index ${i} at ${hex(l2)} is not an aligned cluster inside the file`);
    const table = await l2At(ctx, l2);
    for (let j = 0; j < g.l2Entries; j++) {
      const at = j * g.l2EntryBytes;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      if (hi & OFLAG_COMPRESSED_HI) {
        const d = compressedDescriptor(hi, lo, g.clusterBits);
        if (d.hostOffset < cs || d.hostOffset >= fileSize) bad(`L2 entry (L1 index ${i}, L2 index ${j}): compressed cluster offset ${hex(d.hostOffset)} lies outside the file`);
        continue;
      }
      const host = entryOffset(hi, lo);
      if (host === 0) continue;
      if (host % cs !== 0) bad(`L2 entry (L1 index ${i}, L2 index ${j}): data cluster offset ${hex(host)} is not aligned to a cluster`);
      if (host < cs || host >= fileSize) bad(`L2 entry (L1 index ${i}, L2 index ${j}): data cluster offset ${hex(host)} lies outside the file`);
    }
  }
}

/** Adds delta to the refcount of every cluster reachable from an L1 table, and to its L2 tables. */
async function adjustTree(ctx: Ctx, l2Offsets: readonly number[], delta: number): Promise<void> {
  for (const l2 of l2Offsets) {
    if (l2 === 0) continue;
    const table = await l2At(ctx, l2);
    for (let i = 0; i < ctx.img.geometry.l2Entries; i++) {
      const r = entryRange(ctx, table, i);
      if (r) for (const freed of await ctx.rc.adjust(r.offset, r.bytes, delta)) ctx.img.forgetCluster(freed);
    }
    for (const freed of await ctx.rc.adjust(l2, ctx.cs, delta)) ctx.img.forgetCluster(freed);
  }
}

/**
 * Sets every COPIED flag of the active layer to (refcount == 1), as the spec requires, writing the
 * L2 tables and the L1 table that change.
 */
async function fixCopiedFlags(ctx: Ctx): Promise<void> {
  const { img, rc, cs } = ctx;
  const l1 = img.l1;
  const g = img.geometry;
  let l1Changed = false;
  for (let i = 0; i < l1.l2Offsets.length; i++) {
    const l2 = l1.l2Offsets[i]!;
    if (l2 === 0) continue;
    const owned = (await rc.get(l2 / cs)) === 1;
    if ((l1.copied[i] === 1) !== owned) {
      l1.copied[i] = owned ? 1 : 0;
      l1Changed = true;
    }
    // Shared tables are walked too: their entries must lose COPIED when a snapshot shares them.
    const table = await l2At(ctx, l2);
    let changed = false;
    for (let k = 0; k < g.l2Entries; k++) {
      const at = k * g.l2EntryBytes;
      const hi = table.readUInt32BE(at);
      if (hi & OFLAG_COMPRESSED_HI) continue;
      const host = entryOffset(hi, table.readUInt32BE(at + 4));
      if (host === 0) continue;
      const want = (await rc.get(host / cs)) === 1;
      if (((hi & OFLAG_COPIED_HI) !== 0) !== want) {
        table.writeUInt32BE((want ? hi | OFLAG_COPIED_HI : hi & ~OFLAG_COPIED_HI) >>> 0, at);
        changed = true;
      }
    }
    if (changed) await img.file.pwrite(table, l2);
  }
  if (l1Changed) await writeActiveL1(ctx);
  await img.file.flush();
}

async function writeActiveL1(ctx: Ctx): Promise<void> {
  const l1 = ctx.img.l1;
  const buf = Buffer.alloc(l1.l2Offsets.length * 8);
  for (let i = 0; i < l1.l2Offsets.length; i++) writeEntry(buf, i * 8, l1.l2Offsets[i]!, l1.copied[i] === 1);
  await ctx.img.file.pwrite(buf, l1.tableOffset);
}

/** Writes a new snapshot table to fresh clusters, points the header at it, frees the old one. */
async function replaceSnapshotTable(ctx: Ctx, entries: SnapshotEntry[]): Promise<void> {
  const { img, rc, cs } = ctx;
  const h = img.header;
  const bytes = encodeSnapshotTable(entries);
  let offset = 0;
  if (bytes.length > 0) {
    offset = await rc.allocate(Math.ceil(bytes.length / cs));
    img.noteFileEnd(rc.endBytes);
    await ctx.rc.persist();
    await img.file.pwrite(bytes, offset);
    await img.file.flush();
  }
  const oldOffset = h.snapshotsOffset;
  const oldBytes = img.snapshots.reduce((s, e) => s + e.entryBytes, 0);
  const hb = Buffer.alloc(12);
  hb.writeUInt32BE(entries.length, 0);
  hb.writeUInt32BE(Math.floor(offset / TWO32), 4);
  hb.writeUInt32BE(offset % TWO32, 8);
  await img.file.pwrite(hb, 60);
  await img.file.flush();
  h.nbSnapshots = entries.length;
  h.snapshotsOffset = offset;
  img.snapshots.splice(0, img.snapshots.length, ...entries);
  img.setRegion('snapshot table', offset, Math.ceil(bytes.length / cs) * cs);
  if (oldBytes > 0 && oldOffset !== 0) await rc.adjust(oldOffset, oldBytes, -1);
  await ctx.rc.persist();
}

/**
 * A snapshot whose L1 table cannot be used makes every change of the snapshot table unsafe (its
 * clusters' references are unknown): refused in one line, nothing written.
 */
function refuseDamaged(img: Qcow2Image): void {
  const bad = img.snapshots.find((s) => s.damage);
  if (bad) throw new ImageError(`snapshot ${bad.name} (id ${bad.id}) is damaged: ${bad.damage}; snapshots cannot be changed in this image`, img.file.path);
}

function nextSnapshotId(entries: readonly SnapshotEntry[]): string {
  let max = 0;
  for (const s of entries) {
    const n = Number(s.id);
    if (Number.isInteger(n) && n > max) max = n;
  }
  return String(max + 1);
}

/** `snapshot -c NAME`: the active layer's current state becomes snapshot NAME. */
export async function createSnapshot(img: Qcow2Image, name: string, now = new Date()): Promise<SnapshotEntry> {
  if (name.length === 0 || Buffer.byteLength(name) > 65535) throw new UsageError('a snapshot name must be 1 to 65535 bytes');
  if (img.snapshots.some((s) => s.name === name)) throw new UsageError(`snapshot "${name}" already exists in ${img.file.path}`);
  refuseDamaged(img);
  if (img.geometry.refcountBits < 2) throw new ImageError('snapshots need refcount_bits of 2 or more', img.file.path);
  const ctx = await context(img);
  const { rc, cs } = ctx;
  const l1 = img.l1;
  const l1Size = l1.l2Offsets.length;
  await checkTree(ctx, [...l1.l2Offsets], 'cannot take a snapshot of a corrupt active layer');
  // 1. A copy of the L1 table (snapshot L1 entries carry no COPIED flags).
  let l1Offset = 0;
  if (l1Size > 0) {
    l1Offset = await rc.allocate(Math.ceil((l1Size * 8) / cs));
    const buf = Buffer.alloc(l1Size * 8);
    for (let i = 0; i < l1Size; i++) writeEntry(buf, i * 8, l1.l2Offsets[i]!, false);
    await img.file.pwrite(buf, l1Offset);
  }
  // 2. Everything the active layer references gains a reference.
  await adjustTree(ctx, [...l1.l2Offsets], +1);
  img.noteFileEnd(rc.endBytes);
  await ctx.rc.persist();
  // 3. Nothing is owned alone any more: clear COPIED flags before the snapshot becomes visible.
  await fixCopiedFlags(ctx);
  // 4. The snapshot table.
  const ms = now.getTime();
  const entry: SnapshotEntry = {
    l1TableOffset: l1Offset,
    l1Size,
    id: nextSnapshotId(img.snapshots),
    name,
    dateSeconds: Math.floor(ms / 1000),
    dateNanoseconds: (ms % 1000) * 1_000_000,
    vmClockNanoseconds: 0n,
    vmStateSize: 0,
    diskSizeBytes: img.size,
    icount: 0n,
    extraDataSize: EXTRA_DATA_BYTES,
    entryBytes: 0,
  };
  entry.entryBytes = encodeSnapshotTable([entry]).length;
  await replaceSnapshotTable(ctx, [...img.snapshots, entry]);
  return entry;
}

function mustFind(img: Qcow2Image, idOrName: string): SnapshotEntry {
  const sn = findSnapshot(img.snapshots, idOrName);
  if (!sn) throw new UsageError(`${img.file.path}: no snapshot with id or name "${idOrName}"`);
  refuseDamaged(img);
  return sn;
}

/** `snapshot -d NAME`: removes the snapshot and releases what only it referenced. */
export async function deleteSnapshot(img: Qcow2Image, idOrName: string): Promise<SnapshotEntry> {
  const sn = mustFind(img, idOrName);
  const ctx = await context(img);
  const l2s = await readL1(ctx, sn.l1TableOffset, sn.l1Size);
  await checkTree(ctx, l2s, `cannot delete snapshot "${sn.name}": its tables are corrupt`);
  // 1. The snapshot disappears from the table (a crash after this only leaks).
  await replaceSnapshotTable(ctx, img.snapshots.filter((s) => s !== sn));
  // 2. Its references go.
  await adjustTree(ctx, l2s, -1);
  if (sn.l1Size > 0) await ctx.rc.adjust(sn.l1TableOffset, Math.ceil((sn.l1Size * 8) / ctx.cs) * ctx.cs, -1);
  await ctx.rc.persist();
  // 3. Clusters now referenced once are owned by the active layer again.
  await fixCopiedFlags(ctx);
  return sn;
}

/** `snapshot -a NAME`: the active layer becomes the snapshot's state (and its disk size). */
export async function applySnapshot(img: Qcow2Image, idOrName: string): Promise<SnapshotEntry> {
  const sn = mustFind(img, idOrName);
  const ctx = await context(img);
  const { rc, cs } = ctx;
  const l1 = img.l1;
  const h = img.header;
  const snapL2s = await readL1(ctx, sn.l1TableOffset, sn.l1Size);
  await checkTree(ctx, snapL2s, `cannot apply snapshot "${sn.name}": its tables are corrupt`);
  await checkTree(ctx, [...l1.l2Offsets], `cannot apply snapshot "${sn.name}": the active layer is corrupt`);
  const oldL2s = [...l1.l2Offsets];
  const oldL1Offset = l1.tableOffset;
  const oldL1Clusters = Math.ceil((oldL2s.length * 8) / cs);
  // 1. The snapshot's tree gains the active layer's reference.
  await adjustTree(ctx, snapL2s, +1);
  // 2. The active L1 becomes a copy of the snapshot's, in new clusters when it must grow.
  let l1Offset = oldL1Offset;
  if (sn.l1Size > oldL1Clusters * (cs / 8) || oldL1Offset === 0) {
    l1Offset = await rc.allocate(Math.max(1, Math.ceil((sn.l1Size * 8) / cs)));
  }
  img.noteFileEnd(rc.endBytes);
  await ctx.rc.persist();
  l1.l2Offsets = Float64Array.from(snapL2s);
  l1.copied = new Uint8Array(snapL2s.length);
  l1.tableOffset = l1Offset;
  const buf = Buffer.alloc(Math.max(snapL2s.length, l1Offset === oldL1Offset ? oldL2s.length : 0) * 8);
  for (let i = 0; i < snapL2s.length; i++) writeEntry(buf, i * 8, snapL2s[i]!, false);
  await img.file.pwrite(buf, l1Offset);
  await img.file.flush();
  const size = sn.diskSizeBytes ?? h.sizeBytes;
  const hb = Buffer.alloc(24);
  hb.writeBigUInt64BE(BigInt(size), 0);
  hb.writeUInt32BE(h.cryptMethod, 8);
  hb.writeUInt32BE(snapL2s.length, 12);
  hb.writeBigUInt64BE(BigInt(l1Offset), 16);
  await img.file.pwrite(hb, 24);
  await img.file.flush();
  h.sizeBytes = size;
  h.l1Size = snapL2s.length;
  h.l1TableOffset = l1Offset;
  img.setSize(size);
  img.setRegion('L1 table', l1Offset, Math.max(1, Math.ceil((snapL2s.length * 8) / cs)) * cs);
  // 3. The old active tree loses its reference.
  await adjustTree(ctx, oldL2s, -1);
  const newL1Clusters = Math.ceil((snapL2s.length * 8) / cs);
  if (l1Offset !== oldL1Offset && oldL1Offset !== 0 && oldL1Clusters > 0) await rc.adjust(oldL1Offset, oldL1Clusters * cs, -1);
  else if (l1Offset === oldL1Offset && oldL1Clusters > newL1Clusters) {
    // The table shrank in place: its tail clusters are no longer part of it.
    await rc.adjust(oldL1Offset + newL1Clusters * cs, (oldL1Clusters - newL1Clusters) * cs, -1);
  }
  await ctx.rc.persist();
  await fixCopiedFlags(ctx);
  return sn;
}
