/**
 * `qcow2fs snapshot -l` prints what `qemu-img snapshot -l` prints, byte for byte, in two time
 * zones; `--output json` equals the snapshots array of `qemu-img info --output json`; the
 * verbs that need the write path say so and leave the image alone.
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

  it('formats sizes as QEMU does', () => {
    expect(qemuSizeString(0)).toBe('0 B');
    expect(qemuSizeString(999)).toBe('999 B');
    expect(qemuSizeString(1000)).toBe('0.977 KiB');
    expect(qemuSizeString(1536)).toBe('1.5 KiB');
    expect(qemuSizeString(10 * 1024 * 1024)).toBe('10 MiB');
    expect(qemuSizeString(123456789)).toBe('118 MiB');
    expect(qemuSizeString(1024 ** 3)).toBe('1 GiB');
  });

  it('refuses a raw image and a missing one in one line', () => {
    const raw = path.join(dir, 'disk.raw');
    fs.writeFileSync(raw, Buffer.alloc(65536));
    const r = qcow2fs(['snapshot', '-l', raw]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/raw images have no internal snapshots/);
    const m = qcow2fs(['snapshot', '-l', path.join(dir, 'missing.qcow2')]);
    expect(m.code).not.toBe(0);
    expect(m.stderr).toMatch(/no such file or directory/);
  });
});

describe('snapshot -c / -a / -d', () => {
  it('say clearly that they are not supported yet, and change nothing', () => {
    const before = fileState(image);
    for (const args of [['-c', 'new'], ['-a', 'first'], ['-d', 'first']]) {
      const r = qcow2fs(['snapshot', ...args, image]);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/not supported yet/);
    }
    const both = qcow2fs(['snapshot', '-l', '-c', 'x', image]);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/exactly one of -l, -c NAME, -a NAME, -d NAME/);
    expect(fileState(image)).toEqual(before);
  });
});
