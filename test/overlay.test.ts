/**
 * `mount IMAGE DIR --overlay FILE` (issue 4): writes go to a new qcow2 overlay on top of IMAGE;
 * IMAGE stays byte-identical; qemu-img names IMAGE as FILE's backing (relative name, format
 * recorded); FILE equals a reference that got the same writes; an existing overlay is reused.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, sha256File, withMount } from './support/env';

afterAll(removeScratch);

describe('--overlay', () => {
  it('writes to the overlay only; QEMU agrees', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('ovl');
    const image = path.join(dir, 'base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, '64M');
    qemuIo(image, ['write -P 0x31 0 8M', 'write -P 0x32 40M 3M']);
    qemuImg('snapshot', '-c', 'keep', image);
    const sum = sha256File(image);
    const mtime = fs.statSync(image).mtimeMs;
    const ref = path.join(dir, 'ref.raw');
    qemuImg('convert', '-O', 'raw', image, ref);
    const overlay = path.join(dir, 'work', 'changes.qcow2');
    fs.mkdirSync(path.dirname(overlay));
    const r = rng(7);
    const writeSome = (raw: string, n: number): void => {
      const fd = fs.openSync(raw, 'r+');
      const rfd = fs.openSync(ref, 'r+');
      for (let i = 0; i < n; i++) {
        const len = 1 + Math.floor(r() * 200_000);
        const off = Math.floor(r() * (64 * 1024 * 1024 - len));
        const b = Buffer.alloc(len, (i % 200) + 1);
        fs.writeSync(fd, b, 0, len, off);
        fs.writeSync(rfd, b, 0, len, off);
      }
      fs.closeSync(fd);
      fs.closeSync(rfd);
    };
    await withMount(image, ['--overlay', overlay], (raw) => {
      expect(path.basename(raw)).toBe('base.raw');
      writeSome(raw, 200);
    });
    expect(sha256File(image)).toBe(sum);
    expect(fs.statSync(image).mtimeMs).toBe(mtime);
    const info = JSON.parse(qemuImg('info', '--output', 'json', overlay)) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('../base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(info['virtual-size']).toBe(64 * 1024 * 1024);
    expect(run('qemu-img', ['check', overlay]).code).toBe(0);
    expect(run('qemu-img', ['compare', '-F', 'raw', overlay, ref]).code).toBe(0);

    // Reused on the next mount: earlier writes are still there, new ones add up.
    await withMount(image, ['--overlay', overlay], (raw) => writeSome(raw, 50));
    expect(sha256File(image)).toBe(sum);
    expect(run('qemu-img', ['compare', '-F', 'raw', overlay, ref]).code).toBe(0);
    expect(run('qemu-img', ['check', overlay]).code).toBe(0);

    // An overlay of another image is refused; --overlay with --read-only is refused.
    const other = path.join(dir, 'other.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', other, '64M');
    const mp = scratchDir('ovlmp');
    const bad = qcow2fs(['mount', other, mp, '--overlay', overlay]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/not a qcow2 overlay of/);
    const ro = qcow2fs(['mount', image, mp, '--overlay', path.join(dir, 'x.qcow2'), '--read-only']);
    expect(ro.code).not.toBe(0);
    expect(fs.existsSync(path.join(dir, 'x.qcow2'))).toBe(false);
  });
});
