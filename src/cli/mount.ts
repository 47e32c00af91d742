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
import { Layout, rawFileName, safeFileName, type NodeMeta } from '../fuse/layout';
import { checkMountpoint, FuseMount } from '../fuse/mount';
import { realMountpoint } from '../fuse/mounts';
import { openImage, type OpenedImage } from '../image/open';
import { parseFormat } from '../image/probe';
import { openSnapshotViews } from '../image/snapshot-views';
import { log } from '../log';
import type { SnapshotEntry } from '../qcow2/snapshot';
import { parseSize, runCommand, type GlobalArgs } from './common';
import { forensicInfo } from './forensic-info';

export interface MountArgs extends GlobalArgs {
  image: string;
  mountpoint: string;
  'read-only': boolean;
  foreground: boolean;
  format?: string;
  'allow-other': boolean;
  'l2-cache-size'?: string;
  snapshot?: string;
  'all-snapshots': boolean;
  forensic: boolean;
  'allow-backing'?: string[];
  overlay?: string;
  'force-share': boolean;
  'ready-fd'?: number;
  'daemon-of'?: string;
}

/** What a mount serves, decided from the arguments once (launcher and daemon agree). */
export interface MountPlan {
  image: string;
  mountpoint: string;
  readOnly: boolean;
  snapshot?: string;
  allSnapshots: boolean;
  forensic: boolean;
  /** Forensic mounts refuse backing files outside these directories. */
  allowedBackingDirs?: string[];
  overlay?: string;
  forceShare: boolean;
}

export function planMount(argv: MountArgs): MountPlan {
  const image = path.resolve(argv.image);
  // The kernel lists the mount under its real path; the daemon watches for that one.
  const mountpoint = realMountpoint(argv.mountpoint);
  const forensic = !!argv.forensic;
  const snapshot = argv.snapshot;
  if (snapshot !== undefined && snapshot === '') throw new UsageError('--snapshot needs a snapshot name or id');
  const readOnly = !!argv['read-only'] || snapshot !== undefined || forensic;
  const overlay = argv.overlay === undefined ? undefined : path.resolve(argv.overlay);
  if (overlay !== undefined && (snapshot !== undefined || forensic || argv['read-only'])) {
    throw new UsageError('--overlay sends writes to the overlay file; it cannot be combined with --read-only, --snapshot or --forensic');
  }
  const allowBacking = (argv['allow-backing'] ?? []).map((d) => path.resolve(d));
  if (allowBacking.length > 0 && !forensic) throw new UsageError('--allow-backing only applies to --forensic mounts');
  if (argv['force-share'] && !readOnly) throw new UsageError('--force-share is only possible with a read-only mount (--read-only, --snapshot or --forensic)');
  let allowedBackingDirs: string[] | undefined;
  if (forensic) {
    let realImage = image;
    try {
      realImage = fs.realpathSync(image);
    } catch {
      // Reported when the image is opened.
    }
    allowedBackingDirs = [path.dirname(realImage), ...allowBacking];
  }
  return {
    image,
    mountpoint,
    readOnly,
    ...(snapshot !== undefined ? { snapshot } : {}),
    allSnapshots: !!argv['all-snapshots'] || forensic,
    forensic,
    ...(allowedBackingDirs ? { allowedBackingDirs } : {}),
    ...(overlay !== undefined ? { overlay } : {}),
    forceShare: !!argv['force-share'],
  };
}

function metaOf(st: fs.Stats): NodeMeta {
  return { mtime: st.mtime, atime: st.atime, ctime: st.ctime, uid: st.uid, gid: st.gid };
}

function snapshotMeta(s: SnapshotEntry, base: NodeMeta): NodeMeta {
  const date = new Date(s.dateSeconds * 1000 + Math.floor(s.dateNanoseconds / 1e6));
  return { ...base, mtime: date, atime: date, ctime: date };
}

/** snapshots/<name>.raw; names made safe, and told apart by id when two snapshots share one. */
export function snapshotFileNames(snapshots: readonly SnapshotEntry[]): string[] {
  const safe = snapshots.map((s) => safeFileName(s.name));
  const count = new Map<string, number>();
  for (const n of safe) count.set(n, (count.get(n) ?? 0) + 1);
  return safe.map((n, i) => ((count.get(n) ?? 0) > 1 ? `${n}.id-${safeFileName(snapshots[i]!.id)}.raw` : `${n}.raw`));
}

export async function buildLayout(plan: MountPlan, opened: OpenedImage): Promise<Layout> {
  const st = fs.statSync(plan.image);
  const base = metaOf(st);
  const layout = new Layout(base);
  layout.add(rawFileName(plan.image), { kind: 'device', meta: metaOf(st), device: opened.device });
  if (plan.allSnapshots) {
    const views = await openSnapshotViews(opened);
    const names = snapshotFileNames(views.map((v) => v.snapshot));
    layout.add('snapshots', { kind: 'dir', meta: { ...base }, children: new Map() });
    views.forEach((v, i) => layout.add(`snapshots/${names[i]}`, { kind: 'device', meta: snapshotMeta(v.snapshot, base), device: v.device }));
  }
  if (plan.forensic) {
    const info = await forensicInfo(plan.image, opened, plan.snapshot !== undefined ? { snapshot: plan.snapshot } : {});
    layout.add('info.json', { kind: 'file', meta: { ...base }, content: Buffer.from(JSON.stringify(info, null, 4) + '\n') });
  }
  return layout;
}

/** The daemon's (or --foreground's) side: open, mount, report ready, serve until stopped. */
async function serve(argv: MountArgs): Promise<void> {
  const readyFd = argv['ready-fd'];
  let opened: OpenedImage | null = null;
  let mount: FuseMount;
  try {
    const plan = planMount(argv);
    opened = await openImage(plan.image, {
      readOnly: plan.readOnly,
      ...(argv.format ? { format: parseFormat(argv.format, '--format') } : {}),
      ...(argv['l2-cache-size'] ? { l2CacheBytes: parseSize(argv['l2-cache-size'], '--l2-cache-size') } : {}),
      ...(plan.snapshot !== undefined ? { snapshot: plan.snapshot } : {}),
      ...(plan.allowedBackingDirs ? { allowedBackingDirs: plan.allowedBackingDirs } : {}),
      ...(plan.overlay !== undefined ? { overlay: plan.overlay } : {}),
      lock: plan.forceShare ? 'share' : 'qemu',
    });
    const layout = await buildLayout(plan, opened);
    mount = await FuseMount.mount(plan.mountpoint, layout, {
      fsname: plan.image,
      readOnly: plan.readOnly || opened.device.readOnly,
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
  const plan = planMount(argv);
  // Stale and busy mountpoints first: stat() of a stale one fails with ENOTCONN, not ENOENT.
  checkMountpoint(plan.mountpoint);
  if (!fs.existsSync(plan.image)) throw new UsageError(`image ${plan.image}: no such file or directory`);
  // The image path stays in the daemon's command line: ps and findDaemons() name the mount by it.
  const args = ['mount', plan.image, plan.mountpoint, '--ready-fd', '3', '--daemon-of', plan.mountpoint];
  if (argv['read-only']) args.push('--read-only');
  if (plan.snapshot !== undefined) args.push(`--snapshot=${plan.snapshot}`);
  if (argv['all-snapshots']) args.push('--all-snapshots');
  if (plan.forensic) args.push('--forensic');
  for (const d of argv['allow-backing'] ?? []) args.push(`--allow-backing=${path.resolve(d)}`);
  if (plan.overlay !== undefined) args.push(`--overlay=${plan.overlay}`);
  if (plan.forceShare) args.push('--force-share');
  if (argv.format) args.push(`--format=${argv.format}`);
  if (argv['allow-other']) args.push('--allow-other');
  if (argv['l2-cache-size']) args.push(`--l2-cache-size=${argv['l2-cache-size']}`);
  if (argv['log-level']) args.push(`--log-level=${argv['log-level']}`);
  if (argv['log-json']) args.push('--log-json');
  if (argv['log-file']) args.push(`--log-file=${path.resolve(argv['log-file'])}`);
  const script = path.resolve(__dirname, 'main.js');
  const pid = await launchDaemon(script, args);
  log.info({ pid, mountpoint: plan.mountpoint }, 'daemon ready');
}

export function mountOptions<T>(c: Argv<T>): Argv<T> {
  return c
    .option('read-only', { alias: ['r', 'ro'], type: 'boolean', default: false, describe: 'open the image and every backing file O_RDONLY; writes fail with EROFS' })
    .option('snapshot', { alias: 's', type: 'string', describe: 'show this internal snapshot (id or name) instead of the active layer, read-only' })
    .option('all-snapshots', { type: 'boolean', default: false, describe: 'also show every internal snapshot as MOUNTPOINT/snapshots/<name>.raw (read-only; mtime = snapshot date)' })
    .option('forensic', { type: 'boolean', default: false, describe: 'read-only, all snapshots, MOUNTPOINT/info.json; backing files only from the image\'s directory' })
    .option('allow-backing', { type: 'string', array: true, describe: 'forensic: also allow backing files from this directory (repeatable)' })
    .option('overlay', { type: 'string', describe: 'send writes to this qcow2 overlay (created if missing); IMAGE is never written' })
    .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'read-only: mount even while another process (QEMU) writes the image, like qemu-img -U' })
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
        .example('$0 mount --snapshot before-upgrade disk.qcow2 /mnt/s', 'the raw file shows that internal snapshot, read-only')
        .example('$0 mount --forensic evidence.qcow2 /mnt/e', 'read-only, every snapshot under /mnt/e/snapshots/, /mnt/e/info.json')
        .example('$0 mount -f disk.qcow2 /mnt/d --log-level debug', 'stay in the foreground with debug logs')
        .example('mount -t fuse.qcow2fs disk.qcow2 /mnt/d -o ro,snapshot=s1', 'through mount(8), after "qcow2fs install-helper"; see docs/MOUNTING.md') as unknown as Argv<MountArgs>,
    runCommand<MountArgs>(mountCommandHandler),
  ) as unknown as Argv<GlobalArgs>;
}
