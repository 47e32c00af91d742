/**
 * `qcow2fs convert [-f FMT] [-O qcow2|raw] [-c] [-o OPTIONS] [-l SNAPSHOT] [-p] SRC DST`: copies
 * what SRC shows (its whole backing chain flattened, or one of its snapshots) into a new file:
 * a sparse raw file, or a compact qcow2 (zero clusters dropped, optionally compressed).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { convertToQcow2, convertToRaw } from '../image/convert';
import { openImage } from '../image/open';
import type { ImageFormat } from '../image/probe';
import { validateCreateOptions, type Qcow2CreateOptions } from '../qcow2/create';
import { runCommand, type GlobalArgs } from './common';
import { optionLists, parseOptionList, qcow2OptionsFrom } from './create';
import { Progress } from './progress';

interface ConvertArgs extends GlobalArgs {
  source: string;
  destination: string;
  format?: string;
  'output-format': string;
  compress: boolean;
  options?: string | string[];
  snapshot?: string;
  progress: boolean;
  quiet: boolean;
  'force-share': boolean;
}

const OUTPUT_OPTIONS = ['cluster_size', 'compat', 'lazy_refcounts', 'refcount_bits', 'extended_l2', 'compression_type'];

/** -l accepts "NAME_OR_ID", "snapshot.name=NAME" or "snapshot.id=ID", as qemu-img does. */
export function snapshotArgument(v: string): string {
  const m = /^snapshot\.(name|id)=(.*)$/.exec(v);
  return m ? m[2]! : v;
}

function sameFile(a: string, b: string): boolean {
  try {
    const sa = fs.statSync(a);
    const sb = fs.statSync(b);
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return false;
  }
}

export function registerConvert(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<ConvertArgs>(
    'convert <source> <destination>',
    'Copy an image (its backing chain flattened, or a snapshot) into a new raw or qcow2 file (like qemu-img convert)',
    (c) =>
      c
        .positional('source', { type: 'string', demandOption: true, describe: 'image to read (qcow2 or raw)' })
        .positional('destination', { type: 'string', demandOption: true, describe: 'file to write (an existing file is overwritten)' })
        .option('format', { alias: 'f', type: 'string', describe: 'source format (qcow2 or raw); probed by default' })
        .option('output-format', { alias: 'O', type: 'string', default: 'raw', describe: 'raw or qcow2' })
        .option('compress', { alias: 'c', type: 'boolean', default: false, describe: 'compress clusters (qcow2 output; clusters that do not shrink stay uncompressed)' })
        .option('options', { alias: 'o', type: 'string', requiresArg: true, describe: 'qcow2 output options: ' + OUTPUT_OPTIONS.join(', ') })
        .option('snapshot', { alias: 'l', type: 'string', describe: 'copy this internal snapshot (id or name; snapshot.name=NAME and snapshot.id=ID also work)' })
        .option('progress', { alias: 'p', type: 'boolean', default: false, describe: 'show progress on stderr' })
        .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'print nothing on success' })
        .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'read even while another process writes the image (like qemu-img -U; the result may be inconsistent)' })
        .example('$0 convert -O qcow2 disk.raw disk.qcow2', 'raw to qcow2, zero clusters left out')
        .example('$0 convert disk.qcow2 disk.raw', 'qcow2 to a sparse raw file')
        .example('$0 convert -O qcow2 -c -o compression_type=zstd overlay.qcow2 flat.qcow2', 'the chain flattened into one compressed file')
        .example('$0 convert -l before-upgrade -O qcow2 vm.qcow2 old.qcow2', 'a snapshot as an image of its own')
        .epilog('Exit status: 0 done, 1 failure (the destination is removed), 2 bad arguments.') as unknown as Argv<ConvertArgs>,
    runCommand<ConvertArgs>(async (argv) => {
      const out = argv['output-format'];
      if (out !== 'qcow2' && out !== 'raw') throw new UsageError(`-O ${out}: expected qcow2 or raw`);
      if (argv.format !== undefined && argv.format !== 'qcow2' && argv.format !== 'raw') throw new UsageError(`-f ${argv.format}: expected qcow2 or raw`);
      if (argv.compress && out !== 'qcow2') throw new UsageError('-c needs -O qcow2');
      const o = parseOptionList(optionLists(argv.options), out === 'qcow2' ? OUTPUT_OPTIONS : [], out);
      if (!fs.existsSync(argv.source)) throw new UsageError(`source ${argv.source}: no such file or directory`);
      if (sameFile(argv.source, argv.destination)) throw new UsageError('the destination is the source file');
      const opened = await openImage(argv.source, {
        readOnly: true,
        lock: argv['force-share'] ? 'share' : 'qemu',
        ...(argv.format ? { format: argv.format as ImageFormat } : {}),
        ...(argv.snapshot !== undefined ? { snapshot: snapshotArgument(argv.snapshot) } : {}),
      });
      try {
        for (const layer of opened.chain) {
          if (sameFile(layer.path, argv.destination)) throw new UsageError(`the destination is ${path.basename(layer.path)}, a file of the source's backing chain`);
        }
        const src = opened.device;
        const progress = argv.progress && !argv.quiet ? new Progress(process.stderr) : null;
        const onProgress = progress ? (f: number): void => progress.update(f) : undefined;
        if (out === 'raw') {
          await convertToRaw(src, argv.destination, onProgress);
        } else {
          const opts: Qcow2CreateOptions = { ...qcow2OptionsFrom(o), sizeBytes: Math.ceil(src.size / 512) * 512, backingFile: null, backingFormat: null };
          validateCreateOptions(opts);
          await convertToQcow2(src, argv.destination, opts, argv.compress, onProgress);
        }
        progress?.done();
      } finally {
        await opened.device.close();
      }
    }),
  ) as unknown as Argv<GlobalArgs>;
}
