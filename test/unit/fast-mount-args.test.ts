/**
 * The launcher's yargs-free parser for `qcow2fs mount` (fastMountArgs) must mean exactly what yargs
 * means, or give up (undefined) so that yargs parses. Checked against yargs itself on a table of
 * command lines, including the awkward ones.
 */
import { describe, expect, it } from 'vitest';
import yargs from 'yargs';
import { GLOBAL_OPTIONS } from '../../src/cli/common';
import { fastMountArgs, mountOptions, type MountArgs } from '../../src/cli/mount';
import { verbOf } from '../../src/cli/main';

const KEYS: (keyof MountArgs)[] = [
  'image', 'mountpoint', 'read-only', 'foreground', 'format', 'allow-other', 'l2-cache-size', 'snapshot',
  'all-snapshots', 'forensic', 'allow-backing', 'overlay', 'force-share', 'log-level', 'log-json', 'log-file',
];

function viaYargs(args: string[]): Record<string, unknown> {
  let y = yargs(['mount', ...args]).strict().exitProcess(false).fail((msg, err) => {
    throw err ?? new Error(msg);
  });
  for (const o of GLOBAL_OPTIONS) y = y.option(o.name, { type: o.type, global: true });
  const parsed = y
    .command('mount <image> <mountpoint>', '', (c) => mountOptions(c.positional('image', { type: 'string' }).positional('mountpoint', { type: 'string' })))
    .parseSync() as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const k of KEYS) if (parsed[k] !== undefined) out[k] = parsed[k];
  return out;
}

function viaFast(args: string[]): Record<string, unknown> | undefined {
  const fast = fastMountArgs(args) as unknown as Record<string, unknown> | undefined;
  if (!fast) return undefined;
  const out: Record<string, unknown> = {};
  for (const k of KEYS) if (fast[k] !== undefined) out[k] = fast[k];
  return out;
}

describe('fastMountArgs agrees with yargs', () => {
  const taken: string[][] = [
    ['disk.qcow2', '/mnt/d'],
    ['-r', 'disk.qcow2', '/mnt/d'],
    ['--ro', 'disk.qcow2', '/mnt/d'],
    ['disk.qcow2', '/mnt/d', '--read-only'],
    ['--no-read-only', 'disk.qcow2', '/mnt/d'],
    ['-s', 'snap one', 'disk.qcow2', '/mnt/d'],
    ['--snapshot=2', 'disk.qcow2', '/mnt/d'],
    ['--snapshot', 'before', '--all-snapshots', 'disk.qcow2', '/mnt/d'],
    ['--forensic', 'e.qcow2', '/mnt/e', '--log-level', 'debug', '--log-json'],
    ['--overlay', 'o.qcow2', 'base.qcow2', 'mp'],
    ['-U', '-r', 'disk.qcow2', 'mp', '--format=qcow2', '--l2-cache-size', '4M'],
    ['--allow-other', 'disk.qcow2', 'mp', '--log-file=/tmp/x.log'],
  ];
  for (const args of taken) {
    it(`takes: ${args.join(' ')}`, () => {
      const fast = viaFast(args);
      expect(fast).toBeDefined();
      expect(fast).toEqual(viaYargs(args));
    });
  }

  const leftToYargs: string[][] = [
    ['--help'],
    ['-h', 'a', 'b'],
    ['-f', 'disk.qcow2', 'mp'],
    ['--foreground', 'disk.qcow2', 'mp'],
    ['-rU', 'disk.qcow2', 'mp'],
    ['--snapshot', 'a', '--snapshot', 'b', 'disk.qcow2', 'mp'],
    ['--allow-backing', '/x', 'disk.qcow2', 'mp'],
    ['--bogus', 'disk.qcow2', 'mp'],
    ['disk.qcow2'],
    ['disk.qcow2', 'mp', 'extra'],
    ['--', 'disk.qcow2', 'mp'],
    ['--snapshot', '-r', 'disk.qcow2', 'mp'],
    ['--read-only=false', 'disk.qcow2', 'mp'],
    ['--ready-fd', '3', 'disk.qcow2', 'mp'],
    ['--readOnly', 'disk.qcow2', 'mp'],
    ['disk.qcow2', 'mp', '--snapshot'],
  ];
  for (const args of leftToYargs) {
    it(`leaves to yargs: ${args.join(' ')}`, () => {
      expect(fastMountArgs(args)).toBeUndefined();
    });
  }
});

describe('verbOf', () => {
  it('finds the verb past global options and their values', () => {
    expect(verbOf(['mount', 'a', 'b'])).toBe('mount');
    expect(verbOf(['--log-level', 'debug', 'info', 'x'])).toBe('info');
    expect(verbOf(['--log-json', 'check', 'x'])).toBe('check');
    expect(verbOf(['--help'])).toBeUndefined();
    expect(verbOf(['mout', 'a'])).toBeUndefined();
  });
});
