/**
 * `qcow2fs snapshot -l` prints what `qemu-img snapshot -l` prints, byte for byte, in two time
 * zones; `--output json` equals the snapshots array of `qemu-img info --output json`; -c/-a/-d
 * change snapshots as qemu-img snapshot does, and never while the image is mounted read-write.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuSizeString } from '../src/cli/snapshot';
import { fileState } from './support/daemons';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir } from './support/env';

let dir: string;
let image: string;

beforeAll(() => {
  need('qemu-img', 'qemu-io');
  dir = scratchDir('snapl');
  image = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-f', 'qcow2', image, '8M');
  qemuIo(image, ['write -P 0x11 0 64k']);
  qemuImg('snapshot', '-c', 'first', image);
  qemuImg('snapshot', '-c', 'a name longer than the tag column', image);
  qemuImg('snapshot', '-c', 'café ünïcode', image);
  qemuImg('snapshot', '-c', 'with/slash', image);
});

afterAll(() => removeScratch());

describe('snapshot -l', () => {
  for (const tz of ['UTC', 'America/New_York', 'Asia/Kolkata']) {
    it(`prints qemu-img snapshot -l's table exactly (TZ=${tz})`, () => {
      const env = { ...process.env, TZ: tz };
      const want = run('qemu-img', ['snapshot', '-l', image], { env });
      const got = qcow2fs(['snapshot', '-l', image], { env });
      expect(got.code, got.stderr).toBe(0);
      expect(want.code).toBe(0);
      expect(got.stdout).toBe(want.stdout);
      expect(got.stdout.split('\n').length).toBe(7);
    });
  }

  it('prints nothing for an image without snapshots, like qemu-img', () => {
    const bare = path.join(dir, 'bare.qcow2');
    qemuImg('create', '-f', 'qcow2', bare, '1M');
    const got = qcow2fs(['snapshot', '-l', bare]);
    expect(got.code).toBe(0);
    expect(got.stdout).toBe(run('qemu-img', ['snapshot', '-l', bare]).stdout);
    expect(got.stdout).toBe('');
  });

  it('--output json equals the snapshots of qemu-img info --output json', () => {
    const got = qcow2fs(['snapshot', '-l', '--output', 'json', image]);
    expect(got.code, got.stderr).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output', 'json', image)) as { snapshots: unknown[] };
    expect(JSON.parse(got.stdout)).toEqual(info.snapshots);
    expect(info.snapshots).toHaveLength(4);
  });

  it('reads a snapshot table larger than the first read (64 KiB): 80 snapshots with 1 KiB names', () => {
    const big = path.join(dir, 'many.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', big, '1M');
    const long = 'n'.repeat(1000);
    for (let i = 0; i < 80; i++) qemuImg('snapshot', '-c', `${i}-${long}`, big);
    const got = qcow2fs(['snapshot', '-l', '--output', 'json', big]);
    expect(got.code, got.stderr).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output', 'json', big)) as { snapshots: unknown[] };
    expect(info.snapshots).toHaveLength(80);
    expect(JSON.parse(got.stdout)).toEqual(info.snapshots);
  });

  it('formats sizes as QEMU does', () => {
    expect(qemuSizeString(0)).toBe('0 B');
    expect(qemuSizeString(999)).toBe('999 B');
    expect(qemuSizeString(1000)).toBe('0.977 KiB');
    expect(qemuSizeString(1536)).toBe('1.5 KiB');
    expect(qemuSizeString(10 * 1024 * 1024)).toBe('10 MiB');
    expect(qemuSizeString(123456789)).toBe('118 MiB');
    expect(qemuSizeString(1024 ** 3)).toBe('1 GiB');
  });

  it('lists nothing for a raw image as qemu-img does, refuses to create one there, and refuses a missing image, in one line', () => {
    const raw = path.join(dir, 'disk.raw');
    fs.writeFileSync(raw, Buffer.alloc(65536));
    const l = qcow2fs(['snapshot', '-l', raw]);
    const q = run('qemu-img', ['snapshot', '-l', raw]);
    expect({ code: l.code, out: l.stdout }).toEqual({ code: q.code, out: q.stdout });
    expect(l.code).toBe(0);
    expect(qcow2fs(['snapshot', '-l', '--output', 'json', raw]).stdout).toBe('[]\n');
    const r = qcow2fs(['snapshot', '-c', 'x', raw]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/raw images have no internal snapshots/);
    const m = qcow2fs(['snapshot', '-l', path.join(dir, 'missing.qcow2')]);
    expect(m.code).not.toBe(0);
    expect(m.stderr).toMatch(/no such file or directory/);
  });
});

describe('snapshot -c / -a / -d', () => {
  it('create, apply and delete like qemu-img snapshot; QEMU agrees at each step', async () => {
    const img = path.join(dir, 'ops.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 0x21 0 1M']);
    const sum = (): string => {
      const out = path.join(dir, 'ops.raw');
      qemuImg('convert', '-O', 'raw', img, out);
      const b = fs.readFileSync(out).toString('base64');
      fs.rmSync(out);
      return b;
    };
    const original = sum();
    const c = qcow2fs(['snapshot', '-c', 'before', img]);
    expect(c.code, c.stderr).toBe(0);
    expect(c.stdout).toBe('');
    expect(run('qemu-img', ['snapshot', '-l', img]).stdout).toMatch(/\bbefore\b/);
    expect(run('qemu-img', ['check', img]).code).toBe(0);
    qemuIo(img, ['write -P 0x99 512k 2M']);
    expect(sum()).not.toBe(original);
    const dup = qcow2fs(['snapshot', '-c', 'before', img]);
    expect(dup.code).not.toBe(0);
    expect(dup.stderr).toMatch(/already exists/);
    const a = qcow2fs(['snapshot', '-a', 'before', img]);
    expect(a.code, a.stderr).toBe(0);
    expect(sum()).toBe(original);
    expect(run('qemu-img', ['check', img]).code).toBe(0);
    const d = qcow2fs(['snapshot', '-d', 'before', img]);
    expect(d.code, d.stderr).toBe(0);
    expect(run('qemu-img', ['snapshot', '-l', img]).stdout).not.toMatch(/before/);
    expect(run('qemu-img', ['check', img]).code).toBe(0);
    const missing = qcow2fs(['snapshot', '-d', 'nope', img]);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('refuses to change snapshots of an image mounted read-write, and bad combinations', async () => {
    const before = fileState(image);
    const mp = scratchDir('snapmp');
    const m = qcow2fs(['mount', image, mp]);
    expect(m.code, m.stderr).toBe(0);
    try {
      const r = qcow2fs(['snapshot', '-c', 'new', image]);
      expect(r.code).not.toBe(0);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/lock/);
    } finally {
      expect(qcow2fs(['umount', mp]).code).toBe(0);
    }
    const both = qcow2fs(['snapshot', '-l', '-c', 'x', image]);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/exactly one of -l, -c NAME, -a NAME, -d NAME/);
    expect(fileState(image).sha256).toEqual(before.sha256);
  });
});
