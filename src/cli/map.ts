/**
 * `qcow2fs map IMAGE`: which guest ranges are data, zeros or unallocated, in which file of the
 * chain and at which host offset; qemu-img map's JSON and human formats.
 */
import type { Argv } from 'yargs';
import { ImageError } from '../errors';
import { mapChain, type MapEntry } from '../image/map';
import { openImage, type ChainLayer } from '../image/open';
import type { ImageFormat } from '../image/probe';
import { Qcow2Image } from '../qcow2/image';
import { parseSize, runCommand, type GlobalArgs } from './common';
import { combineBackingName } from './info';

interface MapArgs extends GlobalArgs {
  image: string;
  output: 'human' | 'json';
  format?: string;
  'start-offset'?: string;
  'max-length'?: string;
  'force-share': boolean;
}

/** One line of qemu-img map's JSON list. */
export function mapEntryJson(e: MapEntry): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** printf's "%#-16x": 0x-prefixed hex (plain "0" for zero), left-aligned in 16 columns. */
function hex16(n: number): string {
  return (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);
}

/** The names qemu-img shows for each file of the chain: the top as given, backing files combined. */
function displayNames(image: string, chain: readonly ChainLayer[]): Map<string, string> {
  const names = new Map<string, string>();
  let name = image;
  for (const layer of chain) {
    names.set(layer.path, name);
    const dev = layer.device;
    const backing = dev instanceof Qcow2Image ? dev.header.backingFile : null;
    name = backing !== null ? combineBackingName(name, backing) : layer.path;
  }
  return names;
}

export function registerMap(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<MapArgs>(
    'map <image>',
    'Show which guest ranges are data, zeros or unallocated, and where they live (like qemu-img map)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'image file (qcow2 or raw)' })
        .option('output', { choices: ['human', 'json'] as const, default: 'human' as const, describe: 'output format' })
        .option('format', { alias: 'f', choices: ['qcow2', 'raw'] as const, describe: 'image format; probed by default' })
        .option('start-offset', { type: 'string', describe: 'first guest byte to map (K/M/G suffixes)' })
        .option('max-length', { type: 'string', describe: 'map at most this many bytes' })
        .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'read even while another process writes the image (like qemu-img -U; the result may be inconsistent)' })
        .example('$0 map disk.qcow2', 'the data ranges and their host offsets')
        .example('$0 map --output json overlay.qcow2', 'every range with depth, present, zero, data, offset')
        .epilog(
          'JSON fields: start, length (guest bytes), depth (0 = this file, 1 = its backing file ...), present (allocated ' +
            'in some file of the chain), zero (reads as zeros), data (read from a file), offset (host offset in the file at ' +
            'that depth, when there is one). Raw files are reported as all data: holes in them are not detected.\n' +
            'Exit status: 0 success, 1 the image cannot be read (or, in human format, has compressed clusters), 2 bad arguments.',
        ) as unknown as Argv<MapArgs>,
    runCommand<MapArgs>(async (argv) => {
      const opened = await openImage(argv.image, { readOnly: true, lock: argv['force-share'] ? 'share' : 'qemu', ...(argv.format ? { format: argv.format as ImageFormat } : {}) });
      try {
        const size = opened.device.size;
        const start = argv['start-offset'] !== undefined ? parseSize(argv['start-offset'], '--start-offset') : 0;
        // Past the end, as at it, qemu-img maps an empty range.
        const max = argv['max-length'] !== undefined ? parseSize(argv['max-length'], '--max-length') : size;
        const length = Math.max(0, Math.min(max, size - start));
        const out: string[] = [];
        const flush = (): void => {
          if (out.length) process.stdout.write(out.splice(0).join(''));
        };
        if (argv.output === 'json') {
          let first = true;
          out.push('[');
          await mapChain(opened.chain, start, length, (e) => {
            out.push((first ? '' : ',\n') + mapEntryJson(e));
            first = false;
            if (out.length > 512) flush();
          });
          // An empty range (a disk of size 0, --start-offset at or past its end): qemu-img still prints one entry.
          if (first) out.push(mapEntryJson({ start, length: 0, depth: 0, present: false, zero: false, data: false }));
          out.push(']\n');
          flush();
          return;
        }
        const names = displayNames(argv.image, opened.chain);
        out.push('Offset          Length          Mapped to       File\n');
        await mapChain(opened.chain, start, length, (e) => {
          if (e.data && e.offset === undefined) {
            flush();
            throw new ImageError('file contains compressed clusters: their host ranges cannot be shown (use --output json)');
          }
          if (e.data && !e.zero) out.push(`${hex16(e.start)}${hex16(e.length)}${hex16(e.offset ?? 0)}${names.get(e.file ?? '') ?? e.file ?? ''}\n`);
          if (out.length > 512) flush();
        });
        flush();
      } finally {
        await opened.device.close();
      }
    }),
  ) as unknown as Argv<GlobalArgs>;
}
