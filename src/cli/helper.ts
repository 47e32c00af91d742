/**
 * mount(8) integration. `mount -t fuse.qcow2fs IMAGE DIR -o OPTS` (and an fstab line of type
 * fuse.qcow2fs) runs /sbin/mount.fuse3, which runs `qcow2fs IMAGE DIR -o OPTS` through /bin/sh
 * with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin and nothing else of the
 * caller's environment. This module turns that mount-helper argv into a `qcow2fs mount` argv,
 * and `qcow2fs install-helper` puts a wrapper on that PATH that names node by its absolute path
 * (node itself may live where mount's PATH does not look).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { describeSystemError, UsageError } from '../errors';
import { runCommand, type GlobalArgs } from './common';

/** Options mount(8), mount.fuse3 and fstab pass that mean nothing to a FUSE image mount. */
const GENERIC_OPTIONS = new Set([
  'defaults', 'auto', 'noauto', 'nofail', 'user', 'nouser', 'users', 'owner', 'group', '_netdev',
  'dev', 'nodev', 'suid', 'nosuid', 'exec', 'noexec', 'sync', 'async', 'dirsync',
  'atime', 'noatime', 'diratime', 'nodiratime', 'relatime', 'norelatime', 'strictatime', 'nostrictatime',
  'lazytime', 'nolazytime', 'iversion', 'noiversion', 'mand', 'nomand', 'silent', 'loud',
]);
/** Generic options with a value (or a prefix) that are ignored likewise. */
const GENERIC_PREFIXES = ['x-', 'X-', 'comment=', 'fsname=', 'subtype=', 'uhelper=', 'helper=', 'user='];

const QCOW2FS_OPTIONS =
  'ro, rw, snapshot=NAME, overlay=FILE, all_snapshots, forensic, allow_backing=DIR, force_share, format=FMT, ' +
  'l2_cache_size=SIZE, read_ahead=SIZE, allow_other, log_level=LEVEL, log_file=FILE';

/** Splits an -o list on commas, keeping "quoted" values and backslash-escaped commas whole. */
export function splitOptions(list: string): string[] {
  const out: string[] = [];
  let cur = '';
  let quoted = false;
  for (let i = 0; i < list.length; i++) {
    const c = list[i]!;
    if (c === '\\' && i + 1 < list.length) {
      cur += list[++i];
    } else if (c === '"') {
      quoted = !quoted;
    } else if (c === ',' && !quoted) {
      out.push(cur);
      cur = '';
    } else {
      cur += c;
    }
  }
  if (quoted) throw new UsageError(`mount options "${list}": unbalanced double quote`);
  out.push(cur);
  return out.filter((o) => o !== '');
}

/**
 * The `qcow2fs mount` argv for a mount-helper call `IMAGE MOUNTPOINT [-o OPTS]...`; values are
 * passed as --name=value so a snapshot named "-x" stays a value.
 */
export function mountArgsFromHelper(args: readonly string[]): string[] {
  const positional: string[] = [];
  const options: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '-o') {
      const v = args[++i];
      if (v === undefined) throw new UsageError('-o needs a list of mount options');
      options.push(...splitOptions(v));
    } else if (a.startsWith('-o') && a.length > 2) {
      options.push(...splitOptions(a.slice(2)));
    } else if (a.startsWith('-') && a !== '-') {
      throw new UsageError(`unknown argument "${a}" in mount-helper form (qcow2fs IMAGE MOUNTPOINT -o OPTIONS)`);
    } else {
      positional.push(a);
    }
  }
  if (positional.length !== 2) {
    throw new UsageError(`mount-helper form takes IMAGE MOUNTPOINT [-o OPTIONS], got ${positional.length} arguments; see "qcow2fs --help"`);
  }
  const out = ['mount', positional[0]!, positional[1]!];
  let readOnly = false;
  const flags: string[] = [];
  for (const opt of options) {
    const eq = opt.indexOf('=');
    const name = eq < 0 ? opt : opt.slice(0, eq);
    const value = eq < 0 ? undefined : opt.slice(eq + 1);
    const needValue = (): string => {
      if (value === undefined || value === '') throw new UsageError(`mount option ${name} needs a value (${name}=...)`);
      return value;
    };
    const noValue = (): void => {
      if (value !== undefined) throw new UsageError(`mount option ${name} takes no value`);
    };
    switch (name) {
      case 'ro':
        noValue();
        readOnly = true;
        break;
      case 'rw':
        noValue();
        readOnly = false;
        break;
      case 'snapshot':
        flags.push(`--snapshot=${needValue()}`);
        break;
      case 'overlay':
        flags.push(`--overlay=${needValue()}`);
        break;
      case 'all_snapshots':
        noValue();
        flags.push('--all-snapshots');
        break;
      case 'forensic':
        noValue();
        flags.push('--forensic');
        break;
      case 'allow_backing':
        flags.push(`--allow-backing=${needValue()}`);
        break;
      case 'force_share':
        noValue();
        flags.push('--force-share');
        break;
      case 'format':
        flags.push(`--format=${needValue()}`);
        break;
      case 'l2_cache_size':
        flags.push(`--l2-cache-size=${needValue()}`);
        break;
      case 'read_ahead':
        flags.push(`--read-ahead=${needValue()}`);
        break;
      case 'allow_other':
        noValue();
        flags.push('--allow-other');
        break;
      case 'log_level':
        flags.push(`--log-level=${needValue()}`);
        break;
      case 'log_file':
        flags.push(`--log-file=${needValue()}`);
        break;
      default:
        if (GENERIC_OPTIONS.has(opt) || GENERIC_PREFIXES.some((p) => opt.startsWith(p))) break;
        throw new UsageError(`unknown mount option "${opt}": qcow2fs takes ${QCOW2FS_OPTIONS}, and ignores generic mount options`);
    }
  }
  if (readOnly) out.push('--read-only');
  return [...out, ...flags];
}

/**
 * bin/qcow2fs's argv dispatch: a first argument that is no command (and no option) means the
 * mount-helper form; anything else goes to the command line as is.
 */
export function cliArgs(args: readonly string[], commands: readonly string[]): string[] {
  const first = args[0];
  if (first === undefined || first.startsWith('-') || commands.includes(first) || args.length < 2) return [...args];
  return mountArgsFromHelper(args);
}

/** Runs cliArgs for bin/qcow2fs: a bad mount-helper call is one line and exit status 2. */
export function dispatchArgs(args: readonly string[], commands: readonly string[]): string[] {
  try {
    return cliArgs(args, commands);
  } catch (err) {
    process.stderr.write(`qcow2fs: ${(err as Error).message}\n`);
    process.exit(2);
  }
}

// ---- qcow2fs install-helper ----

/** The PATH mount(8) gives helpers (libmount's restricted path); the wrapper must be on it. */
export const MOUNT_HELPER_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
const MARKER = '# qcow2fs mount helper, written by "qcow2fs install-helper"';

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * The wrapper script: absolute node and launcher, because mount(8) runs helpers with a bare PATH.
 * bin/qcow2fs runs $QCOW2FS_NODE (else `node` from PATH), so that its shell part can start a
 * mount's daemon itself, as for `qcow2fs mount`.
 */
export function wrapperScript(nodePath: string, launcher: string): string {
  return [
    '#!/bin/sh',
    MARKER,
    '# mount -t fuse.qcow2fs runs mount.fuse3, which runs "qcow2fs IMAGE DIR -o OPTS" with a minimal PATH.',
    `export QCOW2FS_NODE=${shellQuote(nodePath)}`,
    `exec ${shellQuote(launcher)} "$@"`,
    '',
  ].join('\n');
}

interface InstallArgs extends GlobalArgs {
  dir: string;
  uninstall: boolean;
  force: boolean;
}

function isOurs(file: string): boolean {
  try {
    return fs.readFileSync(file, 'utf8').includes(MARKER);
  } catch {
    return false;
  }
}

export function installHelper(opts: { dir: string; force: boolean }): string {
  const dir = path.resolve(opts.dir);
  const target = path.join(dir, 'qcow2fs');
  const launcher = path.resolve(__dirname, '..', '..', 'bin', 'qcow2fs');
  const nodePath = fs.realpathSync(process.execPath);
  if (fs.existsSync(target) && !isOurs(target) && !opts.force) {
    throw new UsageError(`${target} exists and was not written by "qcow2fs install-helper"; remove it, or pass --force`);
  }
  const tmp = `${target}.tmp-${process.pid}`;
  try {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(tmp, wrapperScript(nodePath, launcher), { mode: 0o755 });
    fs.chmodSync(tmp, 0o755);
    // rename: a mount running right now sees the old or the new script, never half of one.
    fs.renameSync(tmp, target);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw new UsageError(describeSystemError(err, target));
  }
  return target;
}

export function registerInstallHelper(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<InstallArgs>(
    'install-helper',
    'Let mount(8) and /etc/fstab mount qcow2 images (mount -t fuse.qcow2fs IMAGE DIR -o ro,...)',
    (c) =>
      c
        .option('dir', { type: 'string', default: '/usr/local/sbin', describe: 'where to put the qcow2fs wrapper (must be on mount\'s helper PATH)' })
        .option('uninstall', { type: 'boolean', default: false, describe: 'remove the wrapper again' })
        .option('force', { type: 'boolean', default: false, describe: 'replace a qcow2fs file not written by install-helper' })
        .example('$0 install-helper', 'as root; then: mount -t fuse.qcow2fs disk.qcow2 /mnt/d -o ro')
        .example('$0 install-helper --uninstall', 'remove /usr/local/sbin/qcow2fs') as unknown as Argv<InstallArgs>,
    runCommand<InstallArgs>(async (argv) => {
      const dir = path.resolve(argv.dir);
      const target = path.join(dir, 'qcow2fs');
      if (argv.uninstall) {
        if (!fs.existsSync(target)) {
          process.stdout.write(`${target} is not installed\n`);
          return;
        }
        if (!isOurs(target) && !argv.force) throw new UsageError(`${target} was not written by "qcow2fs install-helper"; not removing it (--force to remove anyway)`);
        try {
          fs.rmSync(target);
        } catch (err) {
          throw new UsageError(describeSystemError(err, target));
        }
        process.stdout.write(`removed ${target}\n`);
        return;
      }
      installHelper({ dir, force: argv.force });
      process.stdout.write(`installed ${target}\n`);
      if (!MOUNT_HELPER_PATH.includes(dir)) {
        process.stderr.write(`qcow2fs: warning: ${dir} is not on mount(8)'s helper PATH (${MOUNT_HELPER_PATH.join(':')}); mount -t fuse.qcow2fs will not find it\n`);
      }
      if (!['/sbin/mount.fuse3', '/sbin/mount.fuse', '/usr/sbin/mount.fuse3', '/usr/sbin/mount.fuse'].some((f) => fs.existsSync(f))) {
        process.stderr.write('qcow2fs: warning: mount.fuse3 is missing (apt-get install fuse3); mount -t fuse.qcow2fs needs it\n');
      }
      process.stdout.write('now: mount -t fuse.qcow2fs IMAGE DIR -o ro   (or an fstab line; see docs/MOUNTING.md)\n');
    }),
  ) as unknown as Argv<GlobalArgs>;
}
