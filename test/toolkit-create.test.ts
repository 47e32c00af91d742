import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir } from './support/env';

afterAll(removeScratch);

interface Info {
  'virtual-size': number;
  'actual-size': number;
  'cluster-size'?: number;
  filename: string;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { data: Record<string, unknown> };
}

function info(img: string): Info {
  return JSON.parse(qemuImg('info', '--output', 'json', img)) as Info;
}

/** Creates the same image with both tools (in `dir`, same relative names) and returns the paths. */
function both(dir: string, name: string, args: string[]): { ours: string; theirs: string } {
  const ours = `${name}-ours.qcow2`;
  const theirs = `${name}-qemu.qcow2`;
  const sub = (n: string): string[] => args.map((a) => (a === '@' ? n : a));
  const r = qcow2fs(['create', '-q', ...sub(ours)], { cwd: dir });
  expect({ name, code: r.code, err: r.stderr }).toEqual({ name, code: 0, err: '' });
  const q = run('qemu-img', ['create', '-q', '-f', 'qcow2', ...sub(theirs)], { cwd: dir });
  expect({ name, code: q.code, err: q.stderr }).toEqual({ name, code: 0, err: '' });
  return { ours: path.join(dir, ours), theirs: path.join(dir, theirs) };
}

/** st_size, du and qemu-img's disk size within two clusters of qemu-img create's. */
function expectSizesClose(a: string, b: string, clusterSize: number, label: string): void {
  const sa = fs.statSync(a);
  const sb = fs.statSync(b);
  const slack = 2 * clusterSize;
  expect({ label, size: Math.abs(sa.size - sb.size) <= slack, sizes: [sa.size, sb.size] }).toEqual({ label, size: true, sizes: [sa.size, sb.size] });
  expect({ label, du: Math.abs(sa.blocks - sb.blocks) * 512 <= slack, dus: [sa.blocks * 512, sb.blocks * 512] }).toEqual({ label, du: true, dus: [sa.blocks * 512, sb.blocks * 512] });
  const ia = info(a)['actual-size'];
  const ib = info(b)['actual-size'];
  expect({ label, disk: Math.abs(ia - ib) <= slack }).toEqual({ label, disk: true });
}

/** Everything qemu-img info says except names and sizes on the host. */
function shape(i: Info): unknown {
  const { filename: _f, 'actual-size': _a, ...rest } = i;
  return rest;
}

describe('create agrees with qemu-img create', () => {
  it('option combinations: qemu-img check clean, qemu-img info shows the options, sizes within two clusters', () => {
    need('qemu-img');
    const dir = scratchDir('create');
    const combos: Array<[string, string, number]> = [
      ['default', '', 65536],
      ['v2', 'compat=0.10', 65536],
      ['cs512', 'cluster_size=512', 512],
      ['cs4k', 'cluster_size=4k', 4096],
      ['cs2m', 'cluster_size=2M', 2 * 1024 * 1024],
      ['lazy', 'lazy_refcounts=on', 65536],
      ['rc1', 'refcount_bits=1', 65536],
      ['rc8', 'refcount_bits=8', 65536],
      ['rc64', 'refcount_bits=64', 65536],
      ['extl2', 'extended_l2=on', 65536],
      ['extl2-32k', 'extended_l2=on,cluster_size=32k', 32768],
      ['zstd', 'compression_type=zstd', 65536],
      ['all', 'compat=1.1,lazy_refcounts=on,refcount_bits=32,extended_l2=on,compression_type=zstd,cluster_size=128k', 131072],
    ];
    for (const [name, o, cs] of combos) {
      for (const size of ['1G', '3073k']) {
        const { ours, theirs } = both(dir, `${name}-${size}`, [...(o ? ['-o', o] : []), '@', size]);
        expect({ name, size, check: run('qemu-img', ['check', ours]).code }).toEqual({ name, size, check: 0 });
        expect({ name, size, info: shape(info(ours)) }).toEqual({ name, size, info: shape(info(theirs)) });
        expectSizesClose(ours, theirs, cs, `${name} ${size}`);
        // Our own check and info agree as well.
        expect(qcow2fs(['check', ours]).code).toBe(0);
      }
    }
  });

  for (const prealloc of ['off', 'metadata', 'falloc', 'full']) {
    it(`preallocation=${prealloc}: ls -l, du and disk size like qemu-img's, map like qemu-img's, reads zeros`, () => {
      need('qemu-img');
      const dir = scratchDir(`create-${prealloc}`);
      for (const [o, cs] of [[`preallocation=${prealloc}`, 65536], [`preallocation=${prealloc},cluster_size=4k`, 4096]] as const) {
        const { ours, theirs } = both(dir, `p-${cs}`, ['-o', o, '@', '64M']);
        expect(run('qemu-img', ['check', ours]).code).toBe(0);
        expectSizesClose(ours, theirs, cs, `${o}`);
        expect(run('qemu-img', ['compare', '-q', ours, theirs]).code).toBe(0);
        // Same guest ranges mapped (offsets differ: our layout puts metadata at the end).
        const strip = (img: string): unknown =>
          (JSON.parse(qemuImg('map', '--output', 'json', img)) as Array<Record<string, unknown>>).map(({ offset: _o, ...e }) => e);
        expect({ o, map: strip(ours) }).toEqual({ o, map: strip(theirs) });
      }
    });
  }

  it('extended L2 with each preallocation mode: the same map as qemu-img (subclusters left unallocated)', () => {
    need('qemu-img');
    const dir = scratchDir('createxl2');
    const noOffsets = (img: string): string => run('qemu-img', ['map', '--output', 'json', img]).stdout.replace(/, "offset": \d+/g, '');
    for (const prealloc of ['metadata', 'falloc', 'full']) {
      const theirs = path.join(dir, `q-${prealloc}.qcow2`);
      const ours = path.join(dir, `o-${prealloc}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `extended_l2=on,preallocation=${prealloc}`, theirs, '4M');
      const r = qcow2fs(['create', '-f', 'qcow2', '-o', `extended_l2=on,preallocation=${prealloc}`, ours, '4M']);
      expect(r.code, r.stderr).toBe(0);
      expect(run('qemu-img', ['check', ours]).code).toBe(0);
      expect(noOffsets(ours), prealloc).toBe(noOffsets(theirs));
      expect(run('qemu-img', ['compare', theirs, ours]).code).toBe(0);
    }
  });

  it('raw images with each preallocation mode', () => {
    need('qemu-img');
    const dir = scratchDir('create-raw');
    for (const prealloc of ['off', 'falloc', 'full']) {
      const ours = path.join(dir, `r-${prealloc}-ours.raw`);
      const theirs = path.join(dir, `r-${prealloc}-qemu.raw`);
      expect(qcow2fs(['create', '-q', '-f', 'raw', '-o', `preallocation=${prealloc}`, ours, '10M']).code).toBe(0);
      qemuImg('create', '-q', '-f', 'raw', '-o', `preallocation=${prealloc}`, theirs, '10M');
      const a = fs.statSync(ours);
      const b = fs.statSync(theirs);
      expect(a.size).toBe(b.size);
      expect(Math.abs(a.blocks - b.blocks) * 512).toBeLessThanOrEqual(8192);
    }
    expect(qcow2fs(['create', '-f', 'raw', '-o', 'preallocation=metadata', path.join(dir, 'x.raw'), '1M']).code).toBe(2);
  });

  it('backing files: size taken from the backing file, name stored as given, format recorded or probed', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('create-backing');
    fs.mkdirSync(path.join(dir, 'sub'));
    qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'sub', 'base.qcow2'), '48M');
    qemuIo(path.join(dir, 'sub', 'base.qcow2'), ['write -P 0x5a 1M 1M']);
    qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'sub', 'base.raw'), '3M');
    // Relative to the new image's directory, as qemu-img stores it.
    const { ours, theirs } = both(path.join(dir, 'sub'), 'ov', ['-b', 'base.qcow2', '-F', 'qcow2', '@']);
    expect(shape(info(ours))).toEqual(shape(info(theirs)));
    expect(info(ours)['backing-filename']).toBe('base.qcow2');
    expect(run('qemu-img', ['compare', '-q', ours, path.join(dir, 'sub', 'base.qcow2')]).code).toBe(0);
    // From another directory: the name is kept, and resolved from the image's directory.
    const fromTop = path.join('sub', 'ov2.qcow2');
    expect(qcow2fs(['create', '-q', '-b', 'base.raw', fromTop], { cwd: dir }).code).toBe(0);
    const i2 = info(path.join(dir, fromTop));
    expect(i2['backing-filename']).toBe('base.raw');
    expect(i2['backing-filename-format']).toBe('raw'); // probed, then recorded
    expect(i2['virtual-size']).toBe(3 * 1024 * 1024);
    // A different size than the backing file's.
    expect(qcow2fs(['create', '-q', '-b', 'base.qcow2', '-F', 'qcow2', path.join(dir, 'sub', 'big.qcow2'), '100M']).code).toBe(0);
    expect(info(path.join(dir, 'sub', 'big.qcow2'))['virtual-size']).toBe(100 * 1024 * 1024);
    // -u: the backing file is not opened.
    expect(qcow2fs(['create', '-q', '-u', '-b', 'nowhere.qcow2', '-F', 'qcow2', path.join(dir, 'u.qcow2'), '1M']).code).toBe(0);
    expect(info(path.join(dir, 'u.qcow2'))['backing-filename']).toBe('nowhere.qcow2');
    // extended L2 + backing + preallocation: clusters allocated, data still from the backing file.
    const { ours: po, theirs: pq } = both(path.join(dir, 'sub'), 'pre', ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on,preallocation=metadata', '@']);
    expect(run('qemu-img', ['check', po]).code).toBe(0);
    expect(qemuImg('map', '--output', 'json', po)).toBe(qemuImg('map', '--output', 'json', pq));
    expect(run('qemu-img', ['compare', '-q', po, path.join(dir, 'sub', 'base.qcow2')]).code).toBe(0);
  });

  it('refuses what qemu-img refuses, with one-line errors and nothing created', () => {
    need('qemu-img');
    const dir = scratchDir('create-bad');
    qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'b.qcow2'), '1M');
    const cases: string[][] = [
      ['-o', 'compat=0.10,lazy_refcounts=on', '@', '1M'],
      ['-o', 'cluster_size=3000', '@', '1M'],
      ['-o', 'cluster_size=4M', '@', '1M'],
      ['-o', 'refcount_bits=3', '@', '1M'],
      ['-o', 'compat=0.10,refcount_bits=8', '@', '1M'],
      ['-o', 'extended_l2=on,cluster_size=4k', '@', '1M'],
      ['-o', 'compat=0.10,compression_type=zstd', '@', '1M'],
      ['-o', 'bogus=1', '@', '1M'],
      ['@', '1Q'],
      ['@'],
      ['-b', 'b.qcow2', '-F', 'qcow2', '-o', 'preallocation=metadata', '@'],
      ['-b', 'missing.qcow2', '@'],
    ];
    for (const args of cases) {
      const ours = args.map((a) => (a === '@' ? path.join(dir, 'x-ours.qcow2') : a));
      const theirs = args.map((a) => (a === '@' ? path.join(dir, 'x-qemu.qcow2') : a));
      const r = qcow2fs(['create', ...ours], { cwd: dir });
      const q = run('qemu-img', ['create', '-f', 'qcow2', ...theirs], { cwd: dir });
      expect({ args, qemuFails: q.code !== 0 }).toEqual({ args, qemuFails: true });
      expect({ args, oursFails: r.code !== 0 }).toEqual({ args, oursFails: true });
      expect(r.stderr.trim().split('\n').length).toBeLessThanOrEqual(2);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      expect(fs.existsSync(path.join(dir, 'x-ours.qcow2'))).toBe(false);
    }
  });

  it('sizes: suffixes, rounding up to 512 bytes, large sparse images open instantly', () => {
    need('qemu-img');
    const dir = scratchDir('create-size');
    for (const [s, bytes] of [['1000', 1024], ['1.5M', 1.5 * 1024 * 1024], ['2G', 2 * 1024 ** 3], ['4T', 4 * 1024 ** 4], ['65536b', 65536]] as const) {
      const img = path.join(dir, `s-${s}.qcow2`);
      expect(qcow2fs(['create', '-q', img, s]).code).toBe(0);
      expect(info(img)['virtual-size']).toBe(bytes);
      expect(run('qemu-img', ['check', img]).code).toBe(0);
    }
  });
});
