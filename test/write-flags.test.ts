/**
 * Header flags around writes (issue 3): lazy_refcounts dirty bit set while writing and cleared on
 * clean close; a dirty image is mounted read-only without repair; persistent bitmaps get their
 * autoclear bit cleared before the first write (QEMU then treats them as inconsistent).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir, sha256File, withMount } from './support/env';

afterAll(removeScratch);

const INCOMPAT_OFFSET = 72;
const AUTOCLEAR_OFFSET = 88;

function headerU64(image: string, at: number): bigint {
  const fd = fs.openSync(image, 'r');
  const b = Buffer.alloc(8);
  fs.readSync(fd, b, 0, 8, at);
  fs.closeSync(fd);
  return b.readBigUInt64BE();
}

describe('lazy refcounts', () => {
  it('sets the dirty bit while writing and clears it on unmount', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('lazy');
    const image = path.join(dir, 'lazy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '16M');
    expect(headerU64(image, INCOMPAT_OFFSET) & 1n).toBe(0n);
    await withMount(image, [], (raw) => {
      const fd = fs.openSync(raw, 'r+');
      fs.writeSync(fd, Buffer.alloc(10000, 9), 0, 10000, 123456);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      expect(headerU64(image, INCOMPAT_OFFSET) & 1n).toBe(1n);
    });
    expect(headerU64(image, INCOMPAT_OFFSET) & 1n).toBe(0n);
    expect(run('qemu-img', ['check', image]).code).toBe(0);
  });

  it('mounts a dirty image read-only without touching it, and refuses it read-write with a hint', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('dirty');
    const image = path.join(dir, 'dirty.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '16M');
    qemuIo(image, ['write -P 5 0 1M']);
    const fd = fs.openSync(image, 'r+');
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(1n);
    fs.writeSync(fd, b, 0, 8, INCOMPAT_OFFSET);
    fs.closeSync(fd);
    const before = sha256File(image);
    const mtime = fs.statSync(image).mtimeMs;
    await withMount(image, ['--read-only'], (raw) => {
      const got = Buffer.alloc(4096);
      const rfd = fs.openSync(raw, 'r');
      fs.readSync(rfd, got, 0, 4096, 0);
      fs.closeSync(rfd);
      expect(got.every((x) => x === 5)).toBe(true);
    });
    expect(sha256File(image)).toBe(before);
    expect(fs.statSync(image).mtimeMs).toBe(mtime);
    const mp = scratchDir('dirtymp');
    const r = qcow2fs(['mount', image, mp]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/dirty/);
    expect(sha256File(image)).toBe(before);
  });
});

describe('persistent bitmaps', () => {
  it('clears the bitmaps autoclear bit before the first write; never corrupts', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('bitmap');
    const image = path.join(dir, 'bm.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, '16M');
    qemuImg('bitmap', '--add', image, 'b0');
    qemuIo(image, ['write -P 1 0 1M']);
    expect(headerU64(image, AUTOCLEAR_OFFSET) & 1n).toBe(1n);
    // Reading does not touch the bit.
    await withMount(image, [], () => undefined);
    expect(headerU64(image, AUTOCLEAR_OFFSET) & 1n).toBe(1n);
    await withMount(image, [], (raw) => {
      const fd = fs.openSync(raw, 'r+');
      fs.writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, 2 * 1024 * 1024);
      fs.closeSync(fd);
    });
    expect(headerU64(image, AUTOCLEAR_OFFSET) & 1n).toBe(0n);
    // QEMU now ignores the stale bitmaps; their clusters count as leaks, never as corruption.
    const check = run('qemu-img', ['check', '--output', 'json', image]);
    expect([0, 3]).toContain(check.code);
    expect((JSON.parse(check.stdout) as { corruptions?: number }).corruptions ?? 0).toBe(0);
  });
});
