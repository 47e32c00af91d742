/**
 * `qcow2fs create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o OPTIONS] IMAGE [SIZE]`: a new image
 * with qemu-img create's options, option rules and preallocation modes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { describeSystemError, UsageError } from '../errors';
import { outputKind } from '../io/file';
import { openImage, resolveBackingPath } from '../image/open';
import { compressionTypeByName, DEFAULT_CLUSTER_BITS, validateCreateOptions, type Preallocation, type Qcow2CreateOptions } from '../qcow2/create';
import { createQcow2, preallocateExtents } from '../qcow2/create-image';
import { parseSize, runCommand, type GlobalArgs } from './common';
import { Progress } from './progress';

interface CreateArgs extends GlobalArgs {
  image: string;
  size?: string;
  format: string;
  backing?: string;
  'backing-format'?: string;
  options?: string | string[];
  unsafe: boolean;
  quiet: boolean;
  progress?: boolean;
}

const QCOW2_OPTIONS = ['size', 'cluster_size', 'compat', 'lazy_refcounts', 'refcount_bits', 'extended_l2', 'compression_type', 'preallocation', 'backing_file', 'backing_fmt'];
const RAW_OPTIONS = ['size', 'preallocation'];

/** Parses "-o a=b,c=d" lists (several -o accumulate; later values win). */
export function parseOptionList(lists: readonly string[], allowed: readonly string[], format: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const list of lists) {
    for (const item of list.split(',')) {
      if (item === '') continue;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? 'on' : item.slice(eq + 1);
      if (!allowed.includes(key)) throw new UsageError(`-o ${key}: not an option of the ${format} format (known: ${allowed.join(', ')})`);
      out.set(key, value);
    }
  }
  return out;
}

function onOff(key: string, v: string | undefined, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  throw new UsageError(`-o ${key}=${v}: expected on or off`);
}

function powerOfTwoLog(key: string, v: number): number {
  const bits = Math.log2(v);
  if (!Number.isInteger(bits)) throw new UsageError(`-o ${key}=${v}: must be a power of two`);
  return bits;
}

export function parsePreallocation(v: string | undefined, format: string): Preallocation {
  const p = v ?? 'off';
  if (p !== 'off' && p !== 'metadata' && p !== 'falloc' && p !== 'full') throw new UsageError(`-o preallocation=${p}: expected off, metadata, falloc or full`);
  if (format === 'raw' && p === 'metadata') throw new UsageError('-o preallocation=metadata: raw images have no metadata to preallocate');
  return p;
}

/** qcow2 creation options from -o (size and backing are settled by the caller). */
export function qcow2OptionsFrom(o: Map<string, string>): Omit<Qcow2CreateOptions, 'sizeBytes' | 'backingFile' | 'backingFormat'> {
  const compat = o.get('compat') ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new UsageError(`-o compat=${compat}: expected 0.10 or 1.1`);
  const clusterBits = o.has('cluster_size') ? powerOfTwoLog('cluster_size', parseSize(o.get('cluster_size')!, '-o cluster_size')) : DEFAULT_CLUSTER_BITS;
  const refcountBits = o.has('refcount_bits') ? Number(o.get('refcount_bits')) : 16;
  if (!Number.isInteger(refcountBits) || refcountBits < 1 || refcountBits > 64) throw new UsageError(`-o refcount_bits=${o.get('refcount_bits')}: must be a power of two up to 64`);
  return {
    version,
    clusterBits,
    refcountOrder: powerOfTwoLog('refcount_bits', refcountBits),
    lazyRefcounts: onOff('lazy_refcounts', o.get('lazy_refcounts'), false),
    extendedL2: onOff('extended_l2', o.get('extended_l2'), false),
    compressionType: compressionTypeByName(o.get('compression_type') ?? 'zlib'),
  };
}

/** -o given once is a string, given several times an array. */
export function optionLists(v: string | string[] | undefined): string[] {
  return v === undefined ? [] : Array.isArray(v) ? v : [v];
}

export function roundUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}

/** Virtual size and probed format of a backing file named relative to `image`'s directory. */
async function backingInfo(image: string, backing: string, format: string | undefined): Promise<{ size: number; format: string }> {
  const p = resolveBackingPath(path.resolve(image), backing);
  if (fs.existsSync(image) && fs.existsSync(p) && fs.realpathSync(p) === fs.realpathSync(image)) {
    throw new UsageError(`backing file ${backing} is the image being created`);
  }
  const opened = await openImage(p, { readOnly: true, ...(format === 'qcow2' || format === 'raw' ? { format } : {}), l2CacheBytes: 0 });
  try {
    return { size: opened.device.size, format: opened.chain[0]!.format };
  } finally {
    await opened.device.close();
  }
}

async function createRaw(image: string, sizeBytes: number, prealloc: Preallocation, progress?: (f: number) => void): Promise<void> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(image, 'w', 0o644);
  } catch (err) {
    throw new UsageError(describeSystemError(err, image));
  }
  try {
    await fh.truncate(sizeBytes);
    if (prealloc === 'falloc' || prealloc === 'full') await preallocateExtents(image, fh.fd, [[0, sizeBytes]], prealloc, progress);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

export function registerCreate(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<CreateArgs>(
    'create <image> [size]',
    'Create a new qcow2 or raw image (like qemu-img create)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'file to create (an existing file is overwritten)' })
        .positional('size', { type: 'string', describe: 'virtual size, with K, M, G, T, P, E suffixes (powers of 1024); default: the backing file\'s size' })
        .option('format', { alias: 'f', type: 'string', default: 'qcow2', describe: 'qcow2 or raw' })
        .option('backing', { alias: 'b', type: 'string', describe: 'backing file, stored as given (relative names are relative to IMAGE\'s directory)' })
        .option('backing-format', { alias: 'F', type: 'string', describe: 'backing file format (qcow2 or raw); probed and recorded when not given' })
        .option('options', { alias: 'o', type: 'string', requiresArg: true, describe: 'comma-separated options: ' + QCOW2_OPTIONS.join(', ') })
        .option('unsafe', { alias: 'u', type: 'boolean', default: false, describe: 'do not open the backing file (SIZE and -F are then required)' })
        .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'print nothing on success' })
        .option('progress', { alias: 'p', type: 'boolean', describe: 'show progress while preallocating (default: on a terminal, for 256 MiB and more)' })
        .example('$0 create disk.qcow2 20G', 'an empty 20 GiB image, 64 KiB clusters, version 3')
        .example('$0 create -b base.qcow2 -F qcow2 overlay.qcow2', 'an overlay of base.qcow2, as large as it')
        .example('$0 create -o cluster_size=2M,preallocation=metadata vm.qcow2 100G', 'every cluster mapped up front, data left sparse')
        .example('$0 create -f raw -o preallocation=full disk.raw 4G', 'a raw file with all of its space written')
        .epilog(
          'Options (-o): cluster_size=512..2M, compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=1|2|4|8|16|32|64, ' +
            'extended_l2=on|off, compression_type=zlib|zstd, preallocation=off|metadata|falloc|full, backing_file=, backing_fmt=.\n' +
            'Preallocation: metadata maps every cluster (the file is as long as the disk, but sparse); falloc also reserves ' +
            'the space (with fallocate(1)); full writes zeros to all of it. With a backing file, preallocation needs extended_l2=on.\n' +
            'Exit status: 0 created, 1 failure (nothing usable is left behind), 2 bad arguments.',
        ) as unknown as Argv<CreateArgs>,
    runCommand<CreateArgs>(async (argv) => {
      const format = argv.format;
      if (format !== 'qcow2' && format !== 'raw') throw new UsageError(`-f ${format}: expected qcow2 or raw`);
      const o = parseOptionList(optionLists(argv.options), format === 'qcow2' ? QCOW2_OPTIONS : RAW_OPTIONS, format);
      const prealloc = parsePreallocation(o.get('preallocation'), format);
      const backing = argv.backing ?? o.get('backing_file') ?? null;
      let backingFormat = argv['backing-format'] ?? o.get('backing_fmt') ?? null;
      if (backingFormat !== null && backingFormat !== 'qcow2' && backingFormat !== 'raw') throw new UsageError(`-F ${backingFormat}: expected qcow2 or raw`);
      const sizeText = argv.size ?? o.get('size');
      let sizeBytes = sizeText !== undefined ? parseSize(sizeText, 'size') : null;
      if (backing !== null) {
        if (format === 'raw') throw new UsageError('raw images cannot have a backing file');
        if (argv.unsafe) {
          if (sizeBytes === null) throw new UsageError('-u: give the SIZE, the backing file is not opened');
          if (backingFormat === null) throw new UsageError('-u: give the backing format with -F, the backing file is not opened');
        } else {
          const info = await backingInfo(argv.image, backing, backingFormat ?? undefined);
          sizeBytes ??= info.size;
          backingFormat ??= info.format;
        }
      }
      if (sizeBytes === null) throw new UsageError('give the image SIZE (or a backing file to take it from)');
      // Refused before "Formatting ..." is printed: create makes image files only.
      if (outputKind(argv.image) === 'block-device') throw new UsageError(`${argv.image}: is a block device; create makes image files`);
      sizeBytes = roundUp512(sizeBytes);
      const size = process.stderr.isTTY && sizeBytes >= 256 * 1024 * 1024 && (prealloc === 'falloc' || prealloc === 'full');
      const progress = (argv.progress ?? (size && !argv.quiet)) ? new Progress(process.stderr) : null;
      const onProgress = progress ? (f: number): void => progress.update(f) : undefined;
      if (format === 'raw') {
        if (!argv.quiet) process.stdout.write(`Formatting '${argv.image}', fmt=raw size=${sizeBytes}${prealloc !== 'off' ? ` preallocation=${prealloc}` : ''}\n`);
        await createRaw(argv.image, sizeBytes, prealloc, onProgress);
        progress?.done();
        return;
      }
      const opts: Qcow2CreateOptions = { ...qcow2OptionsFrom(o), sizeBytes, backingFile: backing, backingFormat };
      validateCreateOptions(opts);
      if (backing !== null && prealloc !== 'off' && !opts.extendedL2) {
        throw new UsageError('a backing file and preallocation can only be used together with extended_l2=on');
      }
      if (!argv.quiet) {
        const words = [
          `cluster_size=${2 ** opts.clusterBits}`,
          `extended_l2=${opts.extendedL2 ? 'on' : 'off'}`,
          ...(prealloc !== 'off' ? [`preallocation=${prealloc}`] : []),
          `compression_type=${opts.compressionType === 1 ? 'zstd' : 'zlib'}`,
          `size=${sizeBytes}`,
          ...(backing !== null ? [`backing_file=${backing}`, `backing_fmt=${backingFormat}`] : []),
          ...(opts.version === 2 ? ['compat=0.10'] : []),
          `lazy_refcounts=${opts.lazyRefcounts ? 'on' : 'off'}`,
          `refcount_bits=${2 ** opts.refcountOrder}`,
        ];
        process.stdout.write(`Formatting '${argv.image}', fmt=qcow2 ${words.join(' ')}\n`);
      }
      await createQcow2(argv.image, opts, prealloc, onProgress);
      progress?.done();
    }),
  ) as unknown as Argv<GlobalArgs>;
}
