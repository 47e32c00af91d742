/**
 * `qcow2fs resize [--shrink] IMAGE [+|-]SIZE`: grows an image (the engine's grow: header, L1
 * table moved when it must grow past its clusters) or, with --shrink, shrinks it, as qemu-img
 * resize does.
 */
import * as fs from 'node:fs';
import type { Argv } from 'yargs';
import { describeSystemError, UsageError } from '../errors';
import { openImage } from '../image/open';
import { probeFormat, type ImageFormat } from '../image/probe';
import { FdFile } from '../io/file';
import { lockImageFile, lockProfile } from '../io/lock';
import { Qcow2Image, readHeader } from '../qcow2/image';
import { shrinkQcow2 } from '../qcow2/shrink';
import { parseSize, runCommand, type GlobalArgs } from './common';

interface ResizeArgs extends GlobalArgs {
  image: string;
  size?: string;
  shrink: boolean;
  format?: string;
  quiet: boolean;
  _: Array<string | number>;
}

/** "+1G" grows by, "-1G" shrinks by, "10G" sets (a qcow2 size must then be whole 512-byte sectors). */
export function targetSize(current: number, text: string): number {
  const rel = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const n = parseSize(rel ? text.slice(1) : text, 'size');
  const want = rel ? current + rel * n : n;
  if (want <= 0) throw new UsageError(`size ${text}: the image would have no size left (now ${current} bytes)`);
  return want;
}

async function openWritable(p: string): Promise<FdFile> {
  try {
    if ((await fs.promises.stat(p)).isDirectory()) throw new UsageError(`image ${p}: is a directory`);
    return await FdFile.open(p, false);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(describeSystemError(err, `image ${p}`));
  }
}

export function registerResize(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<ResizeArgs>(
    'resize <image> [size]',
    'Change the virtual size of an image (like qemu-img resize)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'qcow2 or raw image' })
        .positional('size', { type: 'string', describe: 'new size, or +SIZE / -SIZE (K, M, G, T suffixes); put a negative one after "--"' })
        .option('shrink', { type: 'boolean', default: false, describe: 'allow making the image smaller (data past the new end is lost)' })
        .option('format', { alias: 'f', type: 'string', describe: 'image format (qcow2 or raw); probed by default' })
        .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'print nothing on success' })
        .example('$0 resize disk.qcow2 +10G', 'grow by 10 GiB (then grow the partition and file system inside)')
        .example('$0 resize disk.qcow2 40G', 'set the size to 40 GiB')
        .example('$0 resize --shrink disk.qcow2 -- -5G', 'shrink by 5 GiB; everything past the new end is discarded')
        .epilog(
          'Shrinking needs --shrink, and is refused for version 2 images with snapshots, as by qemu-img. The image must ' +
            'not be mounted read-write meanwhile. Persistent bitmaps are not resized: they are marked stale.\n' +
            'Exit status: 0 resized, 1 failure (an interrupted shrink can leave leaked clusters, never corruption), 2 bad arguments.',
        ) as unknown as Argv<ResizeArgs>,
    runCommand<ResizeArgs>(async (argv) => {
      const sizeText = argv.size ?? (argv._.length > 1 ? String(argv._[argv._.length - 1]) : undefined);
      if (sizeText === undefined) throw new UsageError('give the new SIZE (or +SIZE / -SIZE)');
      if (argv.format !== undefined && argv.format !== 'qcow2' && argv.format !== 'raw') throw new UsageError(`-f ${argv.format}: expected qcow2 or raw`);
      const file = await openWritable(argv.image);
      let format: ImageFormat;
      try {
        const head = Buffer.alloc(512);
        await file.pread(head, 0);
        format = (argv.format as ImageFormat | undefined) ?? probeFormat(head, argv.image);
        lockImageFile(file, lockProfile({ writable: true, format }));
        if (format === 'raw') {
          if ((await file.stat()).isBlockDevice()) throw new UsageError(`${argv.image}: is a block device, whose size resize cannot change`);
          const current = await file.size();
          const want = targetSize(current, sizeText);
          if (want < current && !argv.shrink) throw new UsageError('use --shrink to make the image smaller (data past the new end is lost)');
          await file.truncate(want);
          await file.flush();
        } else {
          const known = await readHeader(file);
          const h = known.header;
          const want = targetSize(h.sizeBytes, sizeText);
          // As qemu-img: a qcow2 disk is whole 512-byte sectors (a raw file takes any size).
          if (want % 512 !== 0) throw new UsageError(`size ${sizeText}: the new size ${want} must be a multiple of 512`);
          if (h.version === 2 && h.nbSnapshots > 0) throw new UsageError(`${argv.image}: a version 2 image with snapshots cannot be resized`);
          if (want < h.sizeBytes) {
            if (!argv.shrink) throw new UsageError('use --shrink to make the image smaller (data past the new end is lost)');
            const img = await Qcow2Image.open(file, { readOnly: true, backing: null, l2CacheBytes: 0 }, known);
            await shrinkQcow2(img, want);
          } else if (want > h.sizeBytes) {
            // Growing goes through the engine's write path; it opens the file itself.
            await file.close();
            const opened = await openImage(argv.image, { readOnly: false, format: 'qcow2' });
            try {
              await (opened.device as Qcow2Image).resize(want);
              await opened.device.flush();
            } finally {
              await opened.device.close();
            }
          }
        }
      } finally {
        await file.close();
      }
      if (!argv.quiet) process.stdout.write('Image resized.\n');
    }),
  ) as unknown as Argv<GlobalArgs>;
}
