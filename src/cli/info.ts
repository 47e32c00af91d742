/** `qcow2fs info IMAGE`: what qemu-img info prints, in its words and JSON shape. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { openImage, type ChainLayer } from '../image/open';
import { parseFormat } from '../image/probe';
import { Qcow2Image } from '../qcow2/image';
import { AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../qcow2/header';
import { formatSize, runCommand, type GlobalArgs } from './common';

interface InfoArgs extends GlobalArgs {
  image: string;
  output: 'human' | 'json';
  'backing-chain': boolean;
  format?: string;
}

type Json = Record<string, unknown>;

export function snapshotJson(img: Qcow2Image): Json[] {
  return img.snapshots.map((s) => ({
    icount: s.icount === null ? undefined : Number(s.icount),
    'vm-clock-nsec': Number(s.vmClockNanoseconds % 1_000_000_000n),
    name: s.name,
    'date-sec': s.dateSeconds,
    'date-nsec': s.dateNanoseconds,
    'vm-clock-sec': Number(s.vmClockNanoseconds / 1_000_000_000n),
    id: s.id,
    'vm-state-size': s.vmStateSize,
  }));
}

/** One layer's info, in qemu-img's JSON shape. */
export function layerJson(layer: ChainLayer, displayName: string): Json {
  const st = fs.statSync(layer.path);
  const out: Json = {
    'virtual-size': layer.device.size,
    filename: displayName,
    format: layer.format,
    'actual-size': st.blocks * 512,
    'dirty-flag': false,
  };
  if (layer.device instanceof Qcow2Image) {
    const img = layer.device;
    const h = img.header;
    out['cluster-size'] = img.geometry.clusterSize;
    if (img.snapshots.length > 0) out.snapshots = snapshotJson(img);
    const data: Json = { compat: h.version === 2 ? '0.10' : '1.1' };
    if (h.version >= 3) {
      data['compression-type'] = h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib';
      data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
      if (h.bitmaps && (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n) data.bitmaps = [];
      data['refcount-bits'] = img.geometry.refcountBits;
      data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = img.geometry.extendedL2;
    } else {
      data['compression-type'] = 'zlib';
      data['refcount-bits'] = 16;
    }
    out['format-specific'] = { type: 'qcow2', data };
    out['dirty-flag'] = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
    if (h.backingFile !== null) {
      out['backing-filename'] = h.backingFile;
      out['full-backing-filename'] = path.isAbsolute(h.backingFile) ? h.backingFile : path.join(path.dirname(displayName), h.backingFile);
      if (h.backingFormat) out['backing-filename-format'] = h.backingFormat;
    }
  }
  return out;
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

function human(j: Json): string {
  const lines: string[] = [];
  lines.push(`image: ${String(j.filename)}`);
  lines.push(`file format: ${String(j.format)}`);
  const vs = j['virtual-size'] as number;
  lines.push(`virtual size: ${formatSize(vs)} (${vs} bytes)`);
  lines.push(`disk size: ${formatSize(j['actual-size'] as number)}`);
  if (j['cluster-size'] !== undefined) lines.push(`cluster_size: ${String(j['cluster-size'])}`);
  if (j['backing-filename'] !== undefined) {
    lines.push(`backing file: ${String(j['backing-filename'])}${j['full-backing-filename'] !== j['backing-filename'] ? ` (actual path: ${String(j['full-backing-filename'])})` : ''}`);
    if (j['backing-filename-format']) lines.push(`backing file format: ${String(j['backing-filename-format'])}`);
  }
  const snaps = j.snapshots as Json[] | undefined;
  if (snaps && snaps.length) {
    lines.push('Snapshot list:');
    lines.push('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    for (const s of snaps) {
      const d = new Date((s['date-sec'] as number) * 1000);
      const p2 = (n: number): string => String(n).padStart(2, '0');
      const date = `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
      const secs = s['vm-clock-sec'] as number;
      const clock = `${p2(Math.floor(secs / 3600))}:${p2(Math.floor(secs / 60) % 60)}:${p2(secs % 60)}.${String(Math.floor((s['vm-clock-nsec'] as number) / 1e6)).padStart(3, '0')}`;
      lines.push(`${pad(String(s.id), 10)}${pad(String(s.name), 18)}${formatSize(s['vm-state-size'] as number).padStart(7)} ${date} ${clock} ${String(s.icount ?? 0).padStart(10)}`);
    }
  }
  const fsd = j['format-specific'] as { data: Json } | undefined;
  if (fsd) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fsd.data)) {
      if (Array.isArray(v)) continue;
      lines.push(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
    }
  }
  return lines.join('\n');
}

export function registerInfo(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<InfoArgs>(
    'info <image>',
    'Show the image format, sizes, backing file, snapshots and format details (like qemu-img info)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true })
        .option('output', { choices: ['human', 'json'] as const, default: 'human' as const, describe: 'output format' })
        .option('backing-chain', { type: 'boolean', default: false, describe: 'describe every file of the backing chain' })
        .option('format', { alias: 'f', type: 'string', describe: 'format of IMAGE (qcow2 or raw); probed by default' })
        .example('$0 info disk.qcow2', 'human-readable summary')
        .example('$0 info --output json --backing-chain overlay.qcow2', 'the whole chain, as qemu-img prints it') as unknown as Argv<InfoArgs>,
    runCommand<InfoArgs>(async (argv) => {
      if (!fs.existsSync(argv.image)) throw new UsageError(`image ${argv.image}: no such file or directory`);
      const opened = await openImage(argv.image, { readOnly: true, ...(argv.format ? { format: parseFormat(argv.format, '--format') } : {}) });
      try {
        const names: string[] = [argv.image];
        for (let i = 1; i < opened.chain.length; i++) {
          const prev = opened.chain[i - 1]!.device;
          const bf = prev instanceof Qcow2Image ? prev.header.backingFile : null;
          names.push(bf !== null ? (path.isAbsolute(bf) ? bf : path.join(path.dirname(names[i - 1]!), bf)) : opened.chain[i]!.path);
        }
        const layers = argv['backing-chain'] ? opened.chain : opened.chain.slice(0, 1);
        const infos = layers.map((l, i) => layerJson(l, names[i]!));
        if (argv.output === 'json') {
          process.stdout.write(JSON.stringify(argv['backing-chain'] ? infos : infos[0], null, 4) + '\n');
        } else {
          process.stdout.write(infos.map(human).join('\n\n') + '\n');
        }
      } finally {
        await opened.device.close();
      }
    }),
  ) as unknown as Argv<GlobalArgs>;
}
