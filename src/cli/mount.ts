/**
 * `qcow2fs mount IMAGE MOUNTPOINT`: open the image chain, build the layout, mount it with FUSE.
 * Without --foreground the command re-runs itself as a detached daemon and returns once the
 * mount is ready (or with the daemon's error).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { launchDaemon, signalReady } from '../fuse/daemon';
import { Layout, rawFileName, type NodeMeta } from '../fuse/layout';
import { checkMountpoint, FuseMount } from '../fuse/mount';
import { canonicalMountpoint } from '../fuse/mounts';
import { openImage, type OpenedImage } from '../image/open';
import { parseFormat } from '../image/probe';
import { log } from '../log';
import { parseSize, runCommand, type GlobalArgs } from './common';

export interface MountArgs extends GlobalArgs {
  image: string;
  mountpoint: string;
  'read-only': boolean;
  foreground: boolean;
  format?: string;
  'allow-other': boolean;
  'l2-cache-size'?: string;
  'ready-fd'?: number;
  'daemon-of'?: string;
}

function metaOf(st: fs.Stats): NodeMeta {
  return { mtime: st.mtime, atime: st.atime, ctime: st.ctime, uid: st.uid, gid: st.gid };
}

export async function buildLayout(imagePath: string, opened: OpenedImage): Promise<Layout> {
  const st = fs.statSync(imagePath);
  const layout = new Layout(metaOf(st));
  layout.add(rawFileName(imagePath), { kind: 'device', meta: metaOf(st), device: opened.device });
  return layout;
}

/** The daemon's (or --foreground's) side: open, mount, report ready, serve until stopped. */
async function serve(argv: MountArgs): Promise<void> {
  const image = path.resolve(argv.image);
  const mountpoint = canonicalMountpoint(argv.mountpoint);
  const readyFd = argv['ready-fd'];
  let opened: OpenedImage | null = null;
  let mount: FuseMount;
  try {
    opened = await openImage(image, {
      readOnly: argv['read-only'],
      ...(argv.format ? { format: parseFormat(argv.format, '--format') } : {}),
      ...(argv['l2-cache-size'] ? { l2CacheBytes: parseSize(argv['l2-cache-size'], '--l2-cache-size') } : {}),
    });
    const layout = await buildLayout(image, opened);
    mount = await FuseMount.mount(mountpoint, layout, {
      fsname: image,
      readOnly: argv['read-only'] || opened.device.readOnly,
      allowOther: argv['allow-other'],
    });
  } catch (err) {
    if (opened) await opened.device.close().catch(() => undefined);
    if (readyFd !== undefined) {
      signalReady(readyFd, { error: err instanceof Error ? err.message : String(err) });
      process.exit(1);
    }
    throw err;
  }
  signalReady(readyFd, { ok: true });
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (why: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'stopping');
      mount.stop().then(resolve, (err: unknown) => {
        log.error(`stop failed: ${(err as Error).message}`);
        resolve();
      });
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGHUP', () => undefined);
    mount.watchExternalUnmount(() => stop('unmounted'));
  });
  // fuse-native's thread may still hold the loop; the image is closed, so leave now.
  process.exit(0);
}

export function mountCommandHandler(argv: MountArgs): Promise<number | void> {
  if (argv.foreground || argv['ready-fd'] !== undefined) return serve(argv);
  return daemonize(argv);
}

async function daemonize(argv: MountArgs): Promise<void> {
  const image = path.resolve(argv.image);
  const mountpoint = canonicalMountpoint(argv.mountpoint);
  if (!fs.existsSync(image)) throw new UsageError(`image ${image}: no such file or directory`);
  // Before starting a daemon: a stale, busy, missing or non-directory mountpoint gets its own message
  // (existsSync would call a stale FUSE mount "no such file").
  checkMountpoint(mountpoint);
  const args = ['mount', image, mountpoint, '--ready-fd', '3', '--daemon-of', mountpoint];
  if (argv['read-only']) args.push('--read-only');
  if (argv.format) args.push('--format', argv.format);
  if (argv['allow-other']) args.push('--allow-other');
  if (argv['l2-cache-size']) args.push('--l2-cache-size', argv['l2-cache-size']);
  if (argv['log-level']) args.push('--log-level', argv['log-level']);
  if (argv['log-json']) args.push('--log-json');
  if (argv['log-file']) args.push('--log-file', path.resolve(argv['log-file']));
  const script = path.resolve(__dirname, 'main.js');
  const pid = await launchDaemon(script, args);
  log.info({ pid, mountpoint }, 'daemon ready');
}

export function mountOptions<T>(c: Argv<T>): Argv<T> {
  return c
    .option('read-only', { alias: ['r', 'ro'], type: 'boolean', default: false, describe: 'open the image and every backing file O_RDONLY; writes fail with EROFS' })
    .option('foreground', { alias: 'f', type: 'boolean', default: false, describe: 'stay attached to the terminal (logs to stderr); Ctrl-C unmounts' })
    .option('format', { type: 'string', describe: 'format of IMAGE (qcow2 or raw); probed by default' })
    .option('allow-other', { type: 'boolean', default: false, describe: 'let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)' })
    .option('l2-cache-size', { type: 'string', describe: 'bytes of L2 tables to cache (default 32M), like QEMU l2-cache-size' })
    .option('ready-fd', { type: 'number', hidden: true })
    .option('daemon-of', { type: 'string', hidden: true });
}

export function registerMount(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<MountArgs>(
    'mount <image> <mountpoint>',
    'Mount IMAGE so that MOUNTPOINT/<name>.raw is its flat raw disk',
    (c) =>
      mountOptions(
        c
          .positional('image', { type: 'string', demandOption: true, describe: 'qcow2 (or raw) image file' })
          .positional('mountpoint', { type: 'string', demandOption: true, describe: 'an existing empty directory' }),
      )
        .example('$0 mount disk.qcow2 /mnt/d', 'shows /mnt/d/disk.raw; returns once it is ready')
        .example('$0 mount -r evidence.qcow2 /mnt/e', 'read-only: nothing can change the image')
        .example('$0 mount -f disk.qcow2 /mnt/d --log-level debug', 'stay in the foreground with debug logs') as unknown as Argv<MountArgs>,
    runCommand<MountArgs>(mountCommandHandler),
  ) as unknown as Argv<GlobalArgs>;
}
