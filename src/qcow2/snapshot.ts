/**
 * The internal snapshot table (qcow2 spec: "Snapshots"). Decoding is pure and validates every
 * entry; the table itself is read by the image at open.
 */
import { ImageError } from '../errors';
import { MAX_L1_BYTES } from './header';

export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA_BYTES = 1024;

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSeconds: number;
  dateNanoseconds: number;
  vmClockNanoseconds: bigint;
  vmStateSize: number;
  /** Guest disk size when the snapshot was taken, if recorded (extra data). */
  diskSizeBytes: number | null;
  icount: bigint | null;
  extraDataSize: number;
  /** Bytes this entry occupies in the table, padding included. */
  entryBytes: number;
  /**
   * Why this snapshot's L1 table cannot be used (unaligned, out of range, past the end of the
   * file, too small for the snapshot's disk), if so. As QEMU, the image still opens and lists it; reading, applying or deleting it
   * is refused (check reports it).
   */
  damage?: string;
}

/**
 * Decodes `count` entries from `table` (the bytes starting at snapshots_offset).
 * Returns the entries and the table's total length.
 */
export function decodeSnapshotTable(
  table: Buffer,
  count: number,
  /** bytesPerL1Entry: guest bytes one L1 entry maps; diskSize: the image's, for snapshots that record none. */
  ctx: { version: number; clusterSize: number; fileSize: number; bytesPerL1Entry: number; diskSize: number },
): { entries: SnapshotEntry[]; tableBytes: number } {
  const entries: SnapshotEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 40 > table.length) throw new ImageError(`snapshot table entry ${i} is truncated`);
    const l1Big = table.readBigUInt64BE(off);
    const l1Size = table.readUInt32BE(off + 8);
    const idSize = table.readUInt16BE(off + 12);
    const nameSize = table.readUInt16BE(off + 14);
    const dateSeconds = table.readUInt32BE(off + 16);
    const dateNanoseconds = table.readUInt32BE(off + 20);
    const vmClockNanoseconds = table.readBigUInt64BE(off + 24);
    let vmStateSize = table.readUInt32BE(off + 32);
    const extraDataSize = table.readUInt32BE(off + 36);
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_BYTES) throw new ImageError(`snapshot ${i}: extra_data_size ${extraDataSize} is too large`);
    if (ctx.version >= 3 && extraDataSize < 16) throw new ImageError(`snapshot ${i}: extra_data_size ${extraDataSize} is too small for version 3 (at least 16)`);
    const extraOff = off + 40;
    const end = extraOff + extraDataSize + idSize + nameSize;
    if (end > table.length) throw new ImageError(`snapshot table entry ${i} is truncated`);
    let diskSizeBytes: number | null = null;
    let icount: bigint | null = null;
    if (extraDataSize >= 8) {
      const large = table.readBigUInt64BE(extraOff);
      if (large > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError(`snapshot ${i}: vm_state_size ${large} is out of range`);
      if (large > 0n) vmStateSize = Number(large);
    }
    if (extraDataSize >= 16) {
      const ds = table.readBigUInt64BE(extraOff + 8);
      if (ds > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError(`snapshot ${i}: disk_size ${ds} is out of range`);
      diskSizeBytes = Number(ds);
    }
    if (extraDataSize >= 24) icount = table.readBigUInt64BE(extraOff + 16);
    const id = table.subarray(extraOff + extraDataSize, extraOff + extraDataSize + idSize).toString('utf8');
    const name = table.subarray(extraOff + extraDataSize + idSize, end).toString('utf8');
    const l1TableOffset = l1Big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(l1Big);
    let damage: string | undefined;
    if (l1Big > BigInt(Number.MAX_SAFE_INTEGER)) damage = `l1_table_offset 0x${l1Big.toString(16)} is out of range`;
    else if (l1Size * 8 > MAX_L1_BYTES) damage = `l1_size ${l1Size} is too large`;
    else if (l1Size > 0 && (l1TableOffset === 0 || l1TableOffset % ctx.clusterSize !== 0)) damage = `l1_table_offset 0x${l1TableOffset.toString(16)} is not aligned to the cluster size`;
    else if (l1Size > 0 && l1TableOffset + l1Size * 8 > ctx.fileSize) damage = `l1_table_offset 0x${l1TableOffset.toString(16)} + l1_size ${l1Size} lies past the end of the file`;
    else {
      const needed = Math.ceil((diskSizeBytes ?? ctx.diskSize) / ctx.bytesPerL1Entry);
      if (l1Size < needed) damage = `l1_size ${l1Size} is too small for its disk size (needs ${needed})`;
    }
    const entryBytes = Math.ceil((end - off) / 8) * 8;
    entries.push({
      l1TableOffset,
      l1Size,
      id,
      name,
      dateSeconds,
      dateNanoseconds,
      vmClockNanoseconds,
      vmStateSize,
      diskSizeBytes,
      icount,
      extraDataSize,
      entryBytes,
      ...(damage !== undefined ? { damage } : {}),
    });
    off += entryBytes;
    if (off > MAX_SNAPSHOT_TABLE_BYTES) throw new ImageError(`snapshot table is larger than ${MAX_SNAPSHOT_TABLE_BYTES} bytes`);
  }
  return { entries, tableBytes: off };
}

/** Finds a snapshot by id first, then by name, as qemu-img does. */
export function findSnapshot(entries: readonly SnapshotEntry[], idOrName: string): SnapshotEntry | undefined {
  return entries.find((s) => s.id === idOrName) ?? entries.find((s) => s.name === idOrName);
}
