/**
 * Image locking compatible with QEMU's (block/file-posix.c): qcow2fs takes the very lock bytes
 * QEMU takes (compared through /proc/locks), so QEMU tools refuse to write an image qcow2fs has
 * mounted read-write, and qcow2fs refuses, in one clear line, to mount an image a running
 * qemu-storage-daemon writes; read-only users on both sides coexist.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, forceCleanup, ofdLockBytes, waitGone } from './support/daemons';
import { isMounted, need, qcow2fs, qemuImg, qemuIo, qemuRawSha, removeScratch, run, scratchDir, sha256File, withMount } from './support/env';

let dir: string;
let image: string;

const lockBytes = ofdLockBytes;

/** Locks qemu-io (with `flags`: -r read-only, -U force-share) holds on `file` while it sits at its prompt. */
async function qemuIoLocks(file: string, flags: string[]): Promise<string[]> {
  const child = spawn('qemu-io', [...flags, '-f', 'qcow2', file], { stdio: ['pipe', 'ignore', 'ignore'] });
  try {
    const deadline = Date.now() + 60_000; // a loaded machine may be slow to start it
    let locks: string[] = [];
    while (Date.now() < deadline) {
      locks = lockBytes(file);
      if (locks.length > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    return locks;
  } finally {
    child.stdin.end();
    await new Promise((r) => child.on('close', r));
  }
}

/** Starts qemu-storage-daemon exporting `file` over NBD (writable or not); returns its pid. */
async function startStorageDaemon(file: string, writable: boolean): Promise<number> {
  const pidFile = path.join(dir, `qsd-${Date.now()}.pid`);
  const sock = path.join(dir, `qsd-${Date.now()}.sock`);
  const ro = writable ? '' : ',read-only=on';
  const r = run('qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=file0,filename=${file}${ro}`,
    '--blockdev', `driver=qcow2,node-name=fmt0,file=file0${ro}`,
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', `type=nbd,id=exp0,node-name=fmt0,writable=${writable ? 'on' : 'off'}`,
    '--daemonize', '--pidfile', pidFile,
  ]);
  expect(r.code, r.stderr).toBe(0);
  return Number(fs.readFileSync(pidFile, 'utf8').trim());
}

async function stopStorageDaemon(pid: number): Promise<void> {
  if (alive(pid)) process.kill(pid, 'SIGTERM');
  expect(await waitGone([pid])).toBe(true);
}

beforeAll(() => {
  need('/dev/fuse', 'fusermount', 'qemu-img', 'qemu-io', 'qemu-storage-daemon');
  dir = scratchDir('lock');
  image = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-f', 'qcow2', image, '16M');
  qemuIo(image, ['write -P 0x5a 0 1M']);
});

afterAll(() => removeScratch());

describe('the same locks as QEMU', () => {
  it('holds exactly the lock bytes qemu-io holds: read-write, read-only, and read-only with -U', async () => {
    const qemuRw = await qemuIoLocks(image, []);
    const qemuRo = await qemuIoLocks(image, ['-r']);
    const qemuShared = await qemuIoLocks(image, ['-r', '-U']);
    expect(qemuRw).toEqual(['READ@100', 'READ@101', 'READ@103', 'READ@201', 'READ@203']);
    expect(qemuRo).toEqual(['READ@100', 'READ@201', 'READ@203']);
    await withMount(image, [], () => expect(lockBytes(image)).toEqual(qemuRw));
    await withMount(image, ['--read-only'], () => expect(lockBytes(image)).toEqual(qemuRo));
    await withMount(image, ['--read-only', '--force-share'], () => expect(lockBytes(image)).toEqual(qemuShared));
    expect(lockBytes(image)).toEqual([]);
  });
});

describe('qcow2fs mounted read-write', () => {
  it('makes qemu-img snapshot -c and qemu-io writes fail with QEMU\'s lock error; after umount they work', async () => {
    const before = sha256File(image);
    await withMount(image, [], () => {
      const snap = run('qemu-img', ['snapshot', '-c', 'x', image]);
      expect(snap.code).not.toBe(0);
      expect(snap.stderr).toMatch(/Failed to get "write" lock/);
      const write = run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', image]);
      expect(write.code).not.toBe(0);
      expect(write.stdout + write.stderr).toMatch(/Failed to get "write" lock/);
      // A reader that refuses to share writes is locked out too, as with a running VM...
      expect(run('qemu-img', ['info', image]).stderr).toMatch(/Failed to get shared "write" lock/);
      // ...unless it asks for -U.
      expect(run('qemu-img', ['info', '-U', image]).code).toBe(0);
    });
    expect(sha256File(image)).toBe(before);
    const snap = run('qemu-img', ['snapshot', '-c', 'x', image]);
    expect(snap.code, snap.stderr).toBe(0);
    qemuImg('snapshot', '-d', 'x', image);
  });

  it('refuses a second qcow2fs mount of the same image', async () => {
    await withMount(image, [], () => {
      const mp = scratchDir('mnt');
      const r = qcow2fs(['mount', '-r', image, mp]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Failed to get shared "write" lock \(a qcow2fs mount \(pid \d+\)/);
      expect(isMounted(mp)).toBe(false);
      forceCleanup(mp);
    });
  });
});

describe('qcow2fs mounted read-only', () => {
  it('lets qemu-img info and convert run, and still keeps writers out', async () => {
    const want = qemuRawSha(image);
    await withMount(image, ['--read-only'], (raw) => {
      const info = run('qemu-img', ['info', image]);
      expect(info.code, info.stderr).toBe(0);
      expect(info.stdout).toMatch(/file format: qcow2/);
      expect(qemuRawSha(image)).toBe(want);
      expect(sha256File(raw)).toBe(want);
      expect(run('qemu-img', ['snapshot', '-c', 'x', image]).stderr).toMatch(/Failed to get "write" lock/);
    });
  });
});

describe('a QEMU holding the image', () => {
  it('qemu-storage-daemon exporting it writable: qcow2fs mount fails clearly; read-only only with --force-share', async () => {
    const want = qemuRawSha(image);
    const pid = await startStorageDaemon(image, true);
    try {
      const mp = scratchDir('mnt');
      const rw = qcow2fs(['mount', image, mp]);
      expect(rw.code).not.toBe(0);
      expect(rw.stderr.trim().split('\n')).toHaveLength(1);
      expect(rw.stderr).toMatch(/is in use: Failed to get "write" lock \(qemu-storage-daemon \(pid \d+\)/);
      expect(isMounted(mp)).toBe(false);

      const ro = qcow2fs(['mount', '--read-only', image, mp]);
      expect(ro.code).not.toBe(0);
      expect(ro.stderr).toMatch(/Failed to get shared "write" lock.*--force-share/);
      expect(isMounted(mp)).toBe(false);
      forceCleanup(mp);

      const list = qcow2fs(['snapshot', '-l', image]);
      expect(list.code).not.toBe(0);
      expect(list.stderr).toMatch(/Failed to get shared "write" lock/);
      expect(qcow2fs(['snapshot', '-l', '-U', image]).code).toBe(0);

      await withMount(image, ['--read-only', '--force-share'], (raw) => {
        expect(sha256File(raw)).toBe(want);
      });
      // --force-share is for readers only.
      const bad = qcow2fs(['mount', '--force-share', image, mp]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/--force-share is only possible with a read-only mount/);
    } finally {
      await stopStorageDaemon(pid);
    }
    await withMount(image, [], (raw) => expect(fs.statSync(raw).size).toBe(16 * 1024 * 1024));
  });

  it('qemu-storage-daemon exporting it read-only: qcow2fs read-only mounts work, read-write is refused', async () => {
    const pid = await startStorageDaemon(image, false);
    try {
      await withMount(image, ['--read-only'], (raw) => expect(sha256File(raw)).toBe(qemuRawSha(image)));
      const mp = scratchDir('mnt');
      const rw = qcow2fs(['mount', image, mp]);
      expect(rw.code).not.toBe(0);
      expect(rw.stderr).toMatch(/Failed to get "write" lock/);
      forceCleanup(mp);
    } finally {
      await stopStorageDaemon(pid);
    }
  });
});
