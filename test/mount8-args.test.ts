/**
 * The mount-helper argv (`qcow2fs IMAGE DIR -o OPTS`, as mount.fuse3 runs it) turned into a
 * `qcow2fs mount` argv: qcow2fs options mapped, generic mount options ignored, unknown ones
 * refused by name. Pure functions; the end-to-end runs are in mount8-helper.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { cliArgs, mountArgsFromHelper, splitOptions, wrapperScript } from '../src/cli/helper';
import { UsageError } from '../src/errors';

const COMMANDS = ['mount', 'umount', 'info', 'snapshot', 'install-helper'];

describe('mount-helper argv', () => {
  it('maps every qcow2fs option', () => {
    const out = mountArgsFromHelper([
      '/img/a.qcow2',
      '/mnt/a',
      '-o',
      'ro,snapshot=-odd name,all_snapshots,forensic,allow_backing=/img/base,force_share,format=qcow2,l2_cache_size=4M,read_ahead=2M,allow_other,log_level=debug,log_file=/tmp/q.log',
    ]);
    expect(out.slice(0, 3)).toEqual(['mount', '/img/a.qcow2', '/mnt/a']);
    expect(out).toContain('--read-only');
    expect(out).toContain('--snapshot=-odd name');
    expect(out).toContain('--all-snapshots');
    expect(out).toContain('--forensic');
    expect(out).toContain('--allow-backing=/img/base');
    expect(out).toContain('--force-share');
    expect(out).toContain('--format=qcow2');
    expect(out).toContain('--l2-cache-size=4M');
    expect(out).toContain('--read-ahead=2M');
    expect(out).toContain('--allow-other');
    expect(out).toContain('--log-level=debug');
    expect(out).toContain('--log-file=/tmp/q.log');
    expect(mountArgsFromHelper(['i', 'm', '-o', 'rw,overlay=/x/o.qcow2'])).toEqual(['mount', 'i', 'm', '--overlay=/x/o.qcow2']);
  });

  it('lets the last of ro/rw win, and accepts several -o', () => {
    expect(mountArgsFromHelper(['i', 'm', '-o', 'ro', '-o', 'rw'])).not.toContain('--read-only');
    expect(mountArgsFromHelper(['i', 'm', '-orw,ro'])).toContain('--read-only');
    expect(mountArgsFromHelper(['i', 'm'])).toEqual(['mount', 'i', 'm']);
  });

  it('ignores the generic options mount(8), fstab and systemd pass', () => {
    const generic =
      'defaults,auto,noauto,nofail,user,users,nouser,owner,group,_netdev,dev,nodev,suid,nosuid,exec,noexec,sync,async,dirsync,' +
      'atime,noatime,relatime,norelatime,strictatime,nostrictatime,lazytime,nolazytime,nodiratime,' +
      'x-systemd.automount,x-systemd.device-timeout=10s,x-gvfs-show,comment=x,fsname=/img/a.qcow2,subtype=qcow2fs';
    expect(mountArgsFromHelper(['/img/a.qcow2', '/mnt/a', '-o', generic])).toEqual(['mount', '/img/a.qcow2', '/mnt/a']);
  });

  it('refuses unknown qcow2fs options and malformed values by name', () => {
    expect(() => mountArgsFromHelper(['i', 'm', '-o', 'ro,bogus'])).toThrow(/unknown mount option "bogus"/);
    expect(() => mountArgsFromHelper(['i', 'm', '-o', 'uid=1000'])).toThrow(/unknown mount option "uid=1000"/);
    expect(() => mountArgsFromHelper(['i', 'm', '-o', 'snapshot'])).toThrow(/snapshot needs a value/);
    expect(() => mountArgsFromHelper(['i', 'm', '-o', 'ro=1'])).toThrow(/ro takes no value/);
    expect(() => mountArgsFromHelper(['i', 'm', '-o'])).toThrow(UsageError);
    expect(() => mountArgsFromHelper(['i', 'm', '-x'])).toThrow(/unknown argument "-x"/);
    expect(() => mountArgsFromHelper(['i', 'm', 'extra'])).toThrow(/got 3 arguments/);
  });

  it('splits option lists with quotes and escaped commas', () => {
    expect(splitOptions('ro,snapshot="a,b",log_file=/x\\,y')).toEqual(['ro', 'snapshot=a,b', 'log_file=/x,y']);
    expect(() => splitOptions('snapshot="a')).toThrow(/unbalanced/);
  });

  it('dispatches only non-command first arguments to the helper form', () => {
    expect(cliArgs(['mount', 'a', 'b'], COMMANDS)).toEqual(['mount', 'a', 'b']);
    expect(cliArgs(['--help'], COMMANDS)).toEqual(['--help']);
    expect(cliArgs(['/img/disk.qcow2', '/mnt/d', '-o', 'ro'], COMMANDS)).toEqual(['mount', '/img/disk.qcow2', '/mnt/d', '--read-only']);
    expect(cliArgs(['disk.qcow2'], COMMANDS)).toEqual(['disk.qcow2']);
  });

  it('writes a wrapper that names node and the launcher by absolute path, safely quoted', () => {
    const w = wrapperScript('/opt/node 20/bin/node', "/srv/it's/bin/qcow2fs");
    expect(w.startsWith('#!/bin/sh\n')).toBe(true);
    expect(w).toContain(`\nexport QCOW2FS_NODE='/opt/node 20/bin/node'\nexec '/srv/it'\\''s/bin/qcow2fs' "$@"\n`);
  });
});
