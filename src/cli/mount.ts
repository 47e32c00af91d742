/**
 * `qcow2fs mount IMAGE MOUNTPOINT`: the arguments, the plan both processes agree on, and the
 * launcher. Without --foreground the command starts a detached daemon (src/cli/daemon-main.ts)
 * and returns once the mount is ready (or with the daemon's error). Serving lives in
 * mount-serve.ts, loaded only by the process that serves, so the launcher stays light.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { launchDaemon } from '../fuse/daemon';
import { checkMountpoint, realMountpoint } from '../fuse/mounts';
import { log } from '../log';
import { GLOBAL_OPTIONS, parseSize, runCommand, type GlobalArgs, type GlobalSpec } from './common';

export interface MountArgs extends GlobalArgs {
  image: string;
  mountpoint: string;
  'read-only': boolean;
  foreground: boolean;
  format?: string;
  'allow-other': boolean;
  'l2-cache-size'?: string;
  'read-ahead'?: string;
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
  /** The kernel's read-ahead on the raw files, bytes (0: leave the kernel's default). */
  readAheadBytes: number;
}

/** Read-ahead by default: 1 MiB (the kernel's 128 KiB halves cold sequential reads here). */
const DEFAULT_READ_AHEAD = 1024 * 1024;
const MAX_READ_AHEAD = 64 * 1024 * 1024;

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
  const readAheadBytes = argv['read-ahead'] === undefined ? DEFAULT_READ_AHEAD : parseSize(argv['read-ahead'], '--read-ahead');
  if (readAheadBytes !== 0 && (readAheadBytes < 4096 || readAheadBytes > MAX_READ_AHEAD)) {
    throw new UsageError(`--read-ahead ${argv['read-ahead']}: expected 0 (the kernel's default) or 4K to 64M`);
  }
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
    readAheadBytes,
  };
}

export function mountCommandHandler(argv: MountArgs): Promise<number | void> {
  // The engine and the FUSE binding load only where the mount is served, not in the launcher.
  if (argv.foreground || argv['ready-fd'] !== undefined) return (require('./mount-serve') as typeof import('./mount-serve')).serve(argv);
  return daemonize(argv);
}

/**
 * What `mount` checks before it starts a daemon (usage errors thrown here), and the arguments the
 * daemon then serves: already checked, paths absolute since the daemon runs in /.
 */
export function daemonMountArgs(argv: MountArgs): { plan: MountPlan; daemonArgs: MountArgs } {
  const plan = planMount(argv);
  // Stale and busy mountpoints first: stat() of a stale one fails with ENOTCONN, not ENOENT.
  checkMountpoint(plan.mountpoint);
  if (!fs.existsSync(plan.image)) throw new UsageError(`image ${plan.image}: no such file or directory`);
  const daemonArgs: MountArgs = {
    image: plan.image,
    mountpoint: plan.mountpoint,
    'read-only': !!argv['read-only'],
    foreground: false,
    'all-snapshots': !!argv['all-snapshots'],
    forensic: plan.forensic,
    'allow-other': !!argv['allow-other'],
    'force-share': plan.forceShare,
    'ready-fd': 3,
    ...(plan.snapshot !== undefined ? { snapshot: plan.snapshot } : {}),
    ...(argv['allow-backing'] ? { 'allow-backing': argv['allow-backing'].map((d) => path.resolve(d)) } : {}),
    ...(plan.overlay !== undefined ? { overlay: plan.overlay } : {}),
    ...(argv.format ? { format: argv.format } : {}),
    ...(argv['l2-cache-size'] ? { 'l2-cache-size': argv['l2-cache-size'] } : {}),
    ...(argv['read-ahead'] !== undefined ? { 'read-ahead': argv['read-ahead'] } : {}),
    ...(argv['log-level'] ? { 'log-level': argv['log-level'] } : {}),
    ...(argv['log-json'] ? { 'log-json': true } : {}),
    ...(argv['log-file'] ? { 'log-file': path.resolve(argv['log-file']) } : {}),
  };
  return { plan, daemonArgs };
}

async function daemonize(argv: MountArgs): Promise<void> {
  const { plan, daemonArgs } = daemonMountArgs(argv);
  // The image path and --daemon-of stay in the daemon's command line: ps, findDaemons() and lock
  // messages name the mount by them.
  const args = [plan.image, plan.mountpoint, '--daemon-of', plan.mountpoint, '--args', JSON.stringify(daemonArgs)];
  const pid = await launchDaemon(path.resolve(__dirname, 'daemon-main.js'), args);
  log.info({ pid, mountpoint: plan.mountpoint }, 'daemon ready');
}

/** One mount option: what yargs is told, and what the launcher's fast parser accepts. */
interface OptionSpec {
  name: keyof MountArgs & string;
  type: 'boolean' | 'string' | 'number';
  alias?: string[];
  array?: true;
  hidden?: true;
  describe?: string;
}

/** The mount options, defined once for yargs (mountOptions) and for fastMountArgs. */
const MOUNT_OPTIONS: readonly OptionSpec[] = [
  { name: 'read-only', alias: ['r', 'ro'], type: 'boolean', describe: 'open the image and every backing file O_RDONLY; writes fail with EROFS' },
  { name: 'snapshot', alias: ['s'], type: 'string', describe: 'show this internal snapshot (id or name) instead of the active layer, read-only' },
  { name: 'all-snapshots', type: 'boolean', describe: 'also show every internal snapshot as MOUNTPOINT/snapshots/<name>.raw (read-only; mtime = snapshot date)' },
  { name: 'forensic', type: 'boolean', describe: "read-only, all snapshots, MOUNTPOINT/info.json; backing files only from the image's directory" },
  { name: 'allow-backing', type: 'string', array: true, describe: 'forensic: also allow backing files from this directory (repeatable)' },
  { name: 'overlay', type: 'string', describe: 'send writes to this qcow2 overlay (created if missing); IMAGE is never written' },
  { name: 'force-share', alias: ['U'], type: 'boolean', describe: 'read-only: mount even while another process (QEMU) writes the image, like qemu-img -U' },
  { name: 'foreground', alias: ['f'], type: 'boolean', describe: 'stay attached to the terminal (logs to stderr); Ctrl-C unmounts' },
  { name: 'format', type: 'string', describe: 'format of IMAGE (qcow2 or raw); probed by default' },
  { name: 'allow-other', type: 'boolean', describe: 'let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)' },
  { name: 'l2-cache-size', type: 'string', describe: 'bytes of L2 tables to cache (default 32M), like QEMU l2-cache-size' },
  { name: 'read-ahead', type: 'string', describe: "the kernel's read-ahead on the raw file (default 1M; 0: the kernel's own, 128K); needs root" },
  { name: 'ready-fd', type: 'number', hidden: true },
  { name: 'daemon-of', type: 'string', hidden: true },
];

export function mountOptions<T>(c: Argv<T>): Argv<T> {
  for (const o of MOUNT_OPTIONS) {
    c = c.option(o.name, {
      type: o.type,
      ...(o.alias ? { alias: o.alias } : {}),
      ...(o.array ? { array: true } : {}),
      ...(o.hidden ? { hidden: true } : {}),
      ...(o.describe ? { describe: o.describe } : {}),
      ...(o.type === 'boolean' ? { default: false } : {}),
    });
  }
  return c;
}

/**
 * `qcow2fs mount` arguments parsed without yargs, so that launching a mount does not pay for
 * loading it (mount-to-ready time is a target). Only the plain forms are taken: --name, --no-name,
 * --name=value, --name value, the one-letter aliases alone (-r, -s NAME), the global --log-*
 * options, and exactly two positionals. Anything else (help, --foreground, repeated or unknown
 * options, bundled short flags, array options, "--") returns undefined, and the caller parses
 * with yargs as usual, so the two never disagree on what a command line means.
 */
export function fastMountArgs(args: readonly string[]): MountArgs | undefined {
  const specs = new Map<string, { spec: OptionSpec | GlobalSpec; name: string }>();
  for (const o of [...MOUNT_OPTIONS, ...GLOBAL_OPTIONS]) {
    specs.set(o.name, { spec: o, name: o.name });
    for (const a of o.alias ?? []) specs.set(a, { spec: o, name: o.name });
  }
  const out: Record<string, unknown> = {};
  for (const o of MOUNT_OPTIONS) if (o.type === 'boolean') out[o.name] = false;
  const seen = new Set<string>();
  const positional: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (!a.startsWith('-') || a === '-') {
      positional.push(a);
      continue;
    }
    let key: string;
    let inline: string | undefined;
    let negated = false;
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      key = eq < 0 ? a.slice(2) : a.slice(2, eq);
      inline = eq < 0 ? undefined : a.slice(eq + 1);
      if (key.startsWith('no-') && !specs.has(key)) {
        key = key.slice(3);
        negated = true;
      }
      if (key.length < 2) return undefined;
    } else {
      key = a.slice(1);
      if (key.length !== 1) return undefined;
    }
    const hit = specs.get(key);
    if (!hit || seen.has(hit.name)) return undefined;
    const { spec, name } = hit;
    if (('array' in spec && spec.array) || ('hidden' in spec && spec.hidden) || name === 'foreground') return undefined;
    seen.add(name);
    if (spec.type === 'boolean') {
      if (inline !== undefined) return undefined;
      out[name] = !negated;
      continue;
    }
    if (negated) return undefined;
    let value = inline;
    if (value === undefined) {
      value = args[++i];
      if (value === undefined || value.startsWith('-')) return undefined;
    }
    out[name] = value;
  }
  if (positional.length !== 2) return undefined;
  out.image = positional[0];
  out.mountpoint = positional[1];
  return out as unknown as MountArgs;
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
