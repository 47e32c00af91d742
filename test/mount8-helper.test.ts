/**
 * qcow2fs as a Linux filesystem type: `qcow2fs install-helper` as docs/MOUNTING.md says, then
 * mount(8) with -t fuse.qcow2fs and with an fstab line, umount(8), fusermount -u, a daemon
 * killed with SIGKILL, and logging to a file. Runs as root with FUSE (CI does).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, daemonPids, fileState, forceCleanup, waitGone } from './support/daemons';
import { isMounted, qcow2fs, qemuImg, qemuIo, qemuRawSha, removeScratch, run, scratchDir, sha256File, need } from './support/env';

const HELPER = '/usr/local/sbin/qcow2fs';
let previousHelper: Buffer | null = null;
let dir: string;
let image: string;
const mountpoints: string[] = [];

function mountpoint(): string {
  const mp = scratchDir('m8');
  mountpoints.push(mp);
  return mp;
}

/** The /proc/mounts line of a mountpoint: source, type, options. */
function procMount(mp: string): { source: string; fstype: string; options: string[] } | undefined {
  const line = fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .filter((l) => l.split(' ')[1] === mp)
    .pop();
  if (!line) return undefined;
  const [source, , fstype, options] = line.split(' ');
  return { source: source!, fstype: fstype!, options: options!.split(',') };
}

beforeAll(() => {
  need('root', '/dev/fuse', 'mount', 'umount', 'fusermount', 'qemu-img', 'qemu-io');
  expect(fs.existsSync('/sbin/mount.fuse3') || fs.existsSync('/sbin/mount.fuse'), 'mount.fuse3 (package fuse3)').toBe(true);
  previousHelper = fs.existsSync(HELPER) ? fs.readFileSync(HELPER) : null;
  const r = qcow2fs(['install-helper']);
  expect(r.code, r.stderr).toBe(0);
  expect(fs.readFileSync(HELPER, 'utf8')).toMatch(/^export QCOW2FS_NODE='\/.+node'\nexec '\/.+\/bin\/qcow2fs' "\$@"$/m);

  dir = scratchDir('m8img');
  image = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-f', 'qcow2', image, '32M');
  qemuIo(image, ['write -P 0x11 0 1M', 'write -P 0x12 20M 512k']);
  qemuImg('snapshot', '-c', 's1', image);
  qemuIo(image, ['write -P 0x21 512k 1M', 'write -P 0x22 31M 1M']);
  qemuImg('snapshot', '-c', 's2', image);
  qemuIo(image, ['write -P 0x31 0 64k', 'write -z 20M 256k']);
});

afterAll(() => {
  for (const mp of mountpoints) forceCleanup(mp);
  if (previousHelper) fs.writeFileSync(HELPER, previousHelper, { mode: 0o755 });
  else qcow2fs(['install-helper', '--uninstall']);
  removeScratch();
});

describe('mount(8) and umount(8)', () => {
  it('mount -t fuse.qcow2fs -o ro,snapshot=NAME serves the snapshot; umount ends the daemon; the image is unchanged', async () => {
    const want = qemuRawSha(image, ['-l', 'snapshot.name=s1']);
    const before = fileState(image);
    const mp = mountpoint();
    const m = run('mount', ['-t', 'fuse.qcow2fs', image, mp, '-o', 'ro,snapshot=s1,nodev,nosuid,noatime']);
    expect(m.code, m.stderr).toBe(0);
    expect(m.stdout + m.stderr).toBe('');
    const entry = procMount(mp);
    expect(entry?.source).toBe(image);
    expect(entry?.fstype).toBe('fuse.qcow2fs');
    expect(entry?.options).toContain('ro');
    const pids = daemonPids(mp);
    expect(pids).toHaveLength(1);
    // The daemon's command line keeps the image path (ps shows what is mounted).
    expect(fs.readFileSync(`/proc/${pids[0]}/cmdline`, 'utf8').split('\0')).toContain(image);
    // One Node process: the wrapper's bin/qcow2fs started the daemon from its shell part.
    expect(fs.readFileSync(`/proc/${pids[0]}/cmdline`, 'utf8').split('\0')).toContain('--relay-fd');
    expect(sha256File(path.join(mp, 'disk.raw'))).toBe(want);

    const u = run('umount', [mp]);
    expect(u.code, u.stderr).toBe(0);
    expect(isMounted(mp)).toBe(false);
    expect(await waitGone(pids)).toBe(true);
    expect(fileState(image)).toEqual(before);
  });

  it('mounts from an fstab line by mountpoint alone (mount -T FILE), and fusermount -u ends it', async () => {
    const mp = mountpoint();
    const fstab = path.join(dir, 'fstab');
    fs.writeFileSync(fstab, `# test fstab\n${image} ${mp} fuse.qcow2fs ro,all_snapshots,noauto,nofail,_netdev,x-systemd.automount 0 0\n`);
    const m = run('mount', ['-T', fstab, mp]);
    expect(m.code, m.stderr).toBe(0);
    expect(procMount(mp)?.fstype).toBe('fuse.qcow2fs');
    const pids = daemonPids(mp);
    expect(pids).toHaveLength(1);
    expect(fs.readdirSync(path.join(mp, 'snapshots')).sort()).toEqual(['s1.raw', 's2.raw']);
    expect(sha256File(path.join(mp, 'disk.raw'))).toBe(qemuRawSha(image));
    expect(sha256File(path.join(mp, 'snapshots', 's2.raw'))).toBe(qemuRawSha(image, ['-l', 'snapshot.name=s2']));

    const u = run('fusermount', ['-u', mp]);
    expect(u.code, u.stderr).toBe(0);
    expect(await waitGone(pids)).toBe(true);
    expect(isMounted(mp)).toBe(false);
  });

  it('-o rw, writes, then umount: the daemon flushes and exits, qemu-img check is clean, logs went to log_file only', async () => {
    const mp = mountpoint();
    const logFile = path.join(dir, 'rw.log');
    const m = run('mount', ['-t', 'fuse.qcow2fs', image, mp, '-o', `rw,log_level=info,log_file=${logFile}`]);
    expect(m.code, m.stderr).toBe(0);
    expect(m.stdout + m.stderr).toBe('');
    expect(procMount(mp)?.options).toContain('rw');
    expect(fs.statSync(path.join(mp, 'disk.raw')).mode & 0o777).toBe(0o644);
    const pids = daemonPids(mp);
    // While mounted read-write, QEMU is locked out.
    const check = run('qemu-img', ['check', image]);
    expect(check.code).not.toBe(0);
    expect(check.stderr).toMatch(/Failed to get shared "write" lock/);
    expect(sha256File(path.join(mp, 'disk.raw'))).toBe(qemuRawSha(image, ['-U']));
    // Real writes through the mount(8)-made mount.
    const fd = fs.openSync(path.join(mp, 'disk.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(1024 * 1024 + 777, 0x5e), 0, 1024 * 1024 + 777, 3 * 1024 * 1024 + 333);
    fs.closeSync(fd);

    expect(run('umount', [mp]).code).toBe(0);
    expect(await waitGone(pids)).toBe(true);
    const after = run('qemu-img', ['check', image]);
    expect(after.code, after.stdout + after.stderr).toBe(0);
    expect(after.stdout).toMatch(/No errors were found/);
    const readBack = run('qemu-io', ['-f', 'qcow2', '-c', `read -P 0x5e ${3 * 1024 * 1024 + 333} ${1024 * 1024 + 777}`, image]);
    expect(readBack.stdout).not.toMatch(/Pattern verification failed/);
    expect(readBack.code).toBe(0);
    const log = fs.readFileSync(logFile, 'utf8');
    expect(log).toMatch(/mounted/);
    expect(log).toMatch(/stopped/);
  });

  it('refuses a non-empty mountpoint clearly', () => {
    const mp = mountpoint();
    fs.writeFileSync(path.join(mp, 'keep.txt'), 'x');
    const m = run('mount', ['-t', 'fuse.qcow2fs', image, mp, '-o', 'ro']);
    expect(m.code).not.toBe(0);
    expect(m.stderr).toMatch(/mountpoint .* is not empty/);
    expect(isMounted(mp)).toBe(false);
  });

  it('refuses unknown qcow2fs options clearly and mounts nothing', () => {
    const mp = mountpoint();
    const m = run('mount', ['-t', 'fuse.qcow2fs', image, mp, '-o', 'ro,bogus_option=1']);
    expect(m.code).not.toBe(0);
    expect(m.stderr).toMatch(/unknown mount option "bogus_option=1"/);
    expect(isMounted(mp)).toBe(false);
    expect(daemonPids(mp)).toEqual([]);
  });
});

describe('stale and busy mounts', () => {
  it('after SIGKILL of the daemon: mount explains, qcow2fs umount cleans up, a new mount works', async () => {
    const mp = mountpoint();
    expect(run('mount', ['-t', 'fuse.qcow2fs', image, mp, '-o', 'ro']).code).toBe(0);
    const [pid] = daemonPids(mp);
    process.kill(pid!, 'SIGKILL');
    expect(await waitGone([pid!])).toBe(true);
    expect(() => fs.statSync(mp)).toThrow(/ENOTCONN|ECONNABORTED/);

    const again = qcow2fs(['mount', image, mp]);
    expect(again.code).not.toBe(0);
    expect(again.stderr.trim().split('\n')).toHaveLength(1);
    expect(again.stderr).toMatch(/stale FUSE mount.*qcow2fs umount/);

    const u = qcow2fs(['umount', mp]);
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(/stale/);
    expect(isMounted(mp)).toBe(false);

    const m = qcow2fs(['mount', '-r', image, mp]);
    expect(m.code, m.stderr).toBe(0);
    expect(sha256File(path.join(mp, 'disk.raw'))).toBe(qemuRawSha(image));
    expect(qcow2fs(['umount', mp]).code).toBe(0);
    expect(daemonPids(mp)).toEqual([]);
  });

  it('qcow2fs umount refuses a busy mount; --lazy detaches it and the daemon ends when the file closes', async () => {
    const mp = mountpoint();
    expect(qcow2fs(['mount', '-r', image, mp]).code).toBe(0);
    const pids = daemonPids(mp);
    const fd = fs.openSync(path.join(mp, 'disk.raw'), 'r');
    try {
      const busy = qcow2fs(['umount', mp]);
      expect(busy.code).not.toBe(0);
      expect(busy.stderr).toMatch(/busy.*--lazy/);
      expect(isMounted(mp)).toBe(true);
      const lazy = qcow2fs(['umount', '--lazy', mp]);
      expect(lazy.code, lazy.stderr).toBe(0);
      expect(isMounted(mp)).toBe(false);
      // The open file still reads through the detached mount.
      const buf = Buffer.alloc(4096);
      fs.readSync(fd, buf, 0, buf.length, 1024 * 1024);
      expect(buf.every((b) => b === 0x21)).toBe(true);
      expect(pids.every(alive)).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
    // The last RELEASE may never arrive after a lazy detach; the daemon must notice the session end anyway.
    expect(await waitGone(pids)).toBe(true);
  });
});
