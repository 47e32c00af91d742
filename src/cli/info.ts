/**
 * `qcow2fs info IMAGE`: what qemu-img info prints, in its words, key names, key order and JSON
 * layout, so that scripts can switch between the two.
 */
import * as fs from 'node:fs';
import type { Argv } from 'yargs';
import { describeSystemError, UsageError } from '../errors';
import type { BlockDevice } from '../image/blockdev';
import { openImage } from '../image/open';
import { probeFormat, type ImageFormat } from '../image/probe';
import { RawImage } from '../image/raw';
import { FdFile } from '../io/file';
import { bitmapFlagNames, readBitmapDirectory, type BitmapDirectoryEntry } from '../qcow2/bitmap-directory';
import { COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../qcow2/header';
import { Qcow2Image, readHeader } from '../qcow2/image';
import { formatSize, runCommand, type GlobalArgs } from './common';
import { qemuJson, type JsonValue } from './qemu-json';
import { snapshotListJson } from './snapshot';

interface InfoArgs extends GlobalArgs {
  image: string;
  output: 'human' | 'json';
  'backing-chain': boolean;
  format?: string;
  'force-share': boolean;
}

type Json = { [key: string]: JsonValue };

/**
 * A backing file name as QEMU combines it with the name of the image naming it: kept as is when
 * absolute, otherwise prefixed with the image name's directory part (no normalisation).
 */
export function combineBackingName(imageName: string, backingName: string): string {
  if (backingName.startsWith('/')) return backingName;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? backingName : imageName.slice(0, slash + 1) + backingName;
}

/** The snapshots array, as `snapshot -l --output json` prints it (one implementation for both). */
export function snapshotJson(img: Qcow2Image): Json[] {
  return snapshotListJson(img.snapshots) as Json[];
}

function bitmapJson(b: BitmapDirectoryEntry): Json {
  return { flags: bitmapFlagNames(b.flags), name: b.name, granularity: 2 ** b.granularityBits };
}

/** One image's info, in qemu-img's JSON shape and key order. */
export async function imageInfoJson(device: BlockDevice, format: ImageFormat, displayName: string): Promise<Json> {
  const actualSize = await device.allocatedBytes();
  if (!(device instanceof Qcow2Image)) {
    return { 'virtual-size': device.size, filename: displayName, format, 'actual-size': actualSize, 'dirty-flag': false };
  }
  const img = device;
  const h = img.header;
  const data: Json = { compat: h.version === 2 ? '0.10' : '1.1', 'compression-type': h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib' };
  if (h.version >= 3) {
    data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
    const bitmaps = await readBitmapDirectory(img.file, h, await img.file.size());
    if (bitmaps.length > 0) data.bitmaps = bitmaps.map(bitmapJson);
    data['refcount-bits'] = img.geometry.refcountBits;
    data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
    data['extended-l2'] = img.geometry.extendedL2;
  } else {
    data['refcount-bits'] = img.geometry.refcountBits;
  }
  const out: Json = {};
  if (h.backingFile !== null && h.backingFormat) out['backing-filename-format'] = h.backingFormat;
  if (img.snapshots.length > 0) out.snapshots = snapshotJson(img);
  out['virtual-size'] = img.header.sizeBytes;
  out.filename = displayName;
  out['cluster-size'] = img.geometry.clusterSize;
  out.format = 'qcow2';
  out['actual-size'] = actualSize;
  out['format-specific'] = { type: 'qcow2', data };
  if (h.backingFile !== null) {
    out['full-backing-filename'] = combineBackingName(displayName, h.backingFile);
    out['backing-filename'] = h.backingFile;
  }
  out['dirty-flag'] = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  return out;
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

const two = (n: number): string => String(n).padStart(2, '0');

/** One line of qemu-img's snapshot table (also used by `snapshot -l`). */
export function snapshotLine(s: Json): string {
  const d = new Date((s['date-sec'] as number) * 1000);
  const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  const secs = s['vm-clock-sec'] as number;
  const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(Math.floor((s['vm-clock-nsec'] as number) / 1e6)).padStart(3, '0')}`;
  const icount = s.icount === undefined ? '' : String(s.icount);
  return `${pad(String(s.id), 10)}${pad(String(s.name), 18)}${formatSize(s['vm-state-size'] as number).padStart(7)} ${date} ${clock} ${icount.padStart(10)}`;
}

export const SNAPSHOT_TABLE_HEADER = 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT';

/** Nested format-specific data, as qemu-img prints it: lists as "[i]:", keys with spaces. */
function dumpSpecific(v: JsonValue, indent: number, lines: string[]): void {
  const p = ' '.repeat(indent);
  if (Array.isArray(v)) {
    v.forEach((x, i) => {
      if (x !== null && typeof x === 'object') {
        lines.push(`${p}[${i}]:`);
        dumpSpecific(x, indent + 4, lines);
      } else {
        lines.push(`${p}[${i}]: ${String(x)}`);
      }
    });
    return;
  }
  if (v === null || typeof v !== 'object') return;
  for (const [k, x] of Object.entries(v)) {
    if (x === undefined) continue;
    const key = k.replace(/-/g, ' ');
    if (x !== null && typeof x === 'object') {
      lines.push(`${p}${key}:`);
      dumpSpecific(x, indent + 4, lines);
    } else {
      lines.push(`${p}${key}: ${String(x)}`);
    }
  }
}

export function humanInfo(j: Json): string {
  const lines: string[] = [];
  lines.push(`image: ${String(j.filename)}`);
  lines.push(`file format: ${String(j.format)}`);
  const vs = j['virtual-size'] as number;
  lines.push(`virtual size: ${formatSize(vs)} (${vs} bytes)`);
  lines.push(`disk size: ${formatSize(j['actual-size'] as number)}`);
  if (j['cluster-size'] !== undefined) lines.push(`cluster_size: ${String(j['cluster-size'])}`);
  if (j['dirty-flag'] === true) lines.push('cleanly shut down: no');
  if (j['backing-filename'] !== undefined) {
    const full = j['full-backing-filename'];
    lines.push(`backing file: ${String(j['backing-filename'])}${full !== j['backing-filename'] ? ` (actual path: ${String(full)})` : ''}`);
    if (j['backing-filename-format']) lines.push(`backing file format: ${String(j['backing-filename-format'])}`);
  }
  const snaps = j.snapshots as Json[] | undefined;
  if (snaps && snaps.length) {
    lines.push('Snapshot list:');
    lines.push(SNAPSHOT_TABLE_HEADER);
    for (const s of snaps) lines.push(snapshotLine(s));
  }
  const fsd = j['format-specific'] as { data: Json } | undefined;
  if (fsd) {
    lines.push('Format specific information:');
    dumpSpecific(fsd.data, 4, lines);
  }
  return lines.join('\n');
}

/** Opens only the named file (no backing chain), as qemu-img info does without --backing-chain. */
async function openTopOnly(p: string, format: ImageFormat | undefined): Promise<{ device: BlockDevice; format: ImageFormat }> {
  let file: FdFile;
  try {
    if ((await fs.promises.stat(p)).isDirectory()) throw new UsageError(`image ${p}: is a directory`);
    file = await FdFile.open(p, true);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(describeSystemError(err, `image ${p}`));
  }
  try {
    const head = Buffer.alloc(512);
    await file.pread(head, 0);
    const probed = probeFormat(head, p);
    const fmt = format ?? probed;
    if (fmt === 'raw') return { device: await RawImage.open(file), format: 'raw' };
    if (probed !== 'qcow2') throw new UsageError(`${p}: bad magic 0x${head.readUInt32BE(0).toString(16).padStart(8, '0')}: not a qcow2 image`);
    const known = await readHeader(file);
    return { device: await Qcow2Image.open(file, { readOnly: true, backing: null, l2CacheBytes: 0 }, known), format: 'qcow2' };
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}

/** Info records for IMAGE (and with `chain`, every file below it), named as qemu-img names them. */
export async function collectInfo(image: string, format: ImageFormat | undefined, chain: boolean, forceShare = false): Promise<Json[]> {
  if (!chain) {
    const top = await openTopOnly(image, format);
    try {
      return [await imageInfoJson(top.device, top.format, image)];
    } finally {
      await top.device.close();
    }
  }
  const opened = await openImage(image, { readOnly: true, lock: forceShare ? 'share' : 'qemu', ...(format ? { format } : {}), l2CacheBytes: 0 });
  try {
    const out: Json[] = [];
    let name = image;
    for (const layer of opened.chain) {
      const j = await imageInfoJson(layer.device, layer.format, name);
      out.push(j);
      name = typeof j['full-backing-filename'] === 'string' ? j['full-backing-filename'] : layer.path;
    }
    return out;
  } finally {
    await opened.device.close();
  }
}

export function registerInfo(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<InfoArgs>(
    'info <image>',
    'Show the image format, sizes, backing file, snapshots and format details (like qemu-img info)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'image file (qcow2 or raw)' })
        .option('output', { choices: ['human', 'json'] as const, default: 'human' as const, describe: 'output format' })
        .option('backing-chain', { type: 'boolean', default: false, describe: 'describe every file of the backing chain' })
        .option('format', { alias: 'f', choices: ['qcow2', 'raw'] as const, describe: 'image format; probed by default' })
        .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'with --backing-chain: read even while another process writes the chain (like qemu-img -U); the image alone is read without a lock' })
        .example('$0 info disk.qcow2', 'human-readable summary')
        .example('$0 info --output json disk.qcow2', 'the same keys and layout as qemu-img info --output json')
        .example('$0 info --output json --backing-chain overlay.qcow2', 'the whole chain, as a JSON list')
        .epilog('Exit status: 0 success, 1 the image cannot be read, 2 bad arguments.') as unknown as Argv<InfoArgs>,
    runCommand<InfoArgs>(async (argv) => {
      const format = argv.format as ImageFormat | undefined;
      const infos = await collectInfo(argv.image, format, argv['backing-chain'], argv['force-share']);
      if (argv.output === 'json') process.stdout.write(qemuJson(argv['backing-chain'] ? infos : infos[0]!));
      else process.stdout.write(infos.map(humanInfo).join('\n\n') + '\n');
    }),
  ) as unknown as Argv<GlobalArgs>;
}
