import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir, sha256File, withMount } from './support/env';

afterAll(removeScratch);

interface Source {
  name: string;
  make(img: string): void;
}

const M = 1024 * 1024;

/** Images with data all over, including past the points we shrink to. */
const sources: Source[] = [
  {
    name: 'v3 64k',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
      qemuIo(img, ['write -P 1 0 2M', 'write -P 2 20M 3M', 'write -z 30M 1M', 'write -P 3 60M 4M']);
    },
  },
  {
    name: 'v2 512-byte clusters',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', img, '3M');
      qemuIo(img, ['write -P 4 0 100k', 'write -P 5 1M 512k', 'write -P 6 2900k 100k']);
    },
  },
  {
    name: '4k clusters, written full',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '32M');
      qemuIo(img, ['write -P 7 0 32M']);
    },
  },
  {
    name: 'snapshots sharing L2 tables',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
      qemuIo(img, ['write -P 8 0 16M']);
      qemuImg('snapshot', '-c', 'one', img);
      qemuIo(img, ['write -P 9 1M 1M']);
      qemuImg('snapshot', '-c', 'two', img);
    },
  },
  {
    name: 'compressed',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
      qemuIo(img, ['write -c -P 10 0 64k', 'write -c -P 11 64k 64k', 'write -c -P 12 9M 1M', 'write -P 13 15M 1M']);
    },
  },
  {
    name: 'extended L2, zstd, refcount_bits=2',
    make: (img) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,compression_type=zstd,refcount_bits=2', img, '16M');
      qemuIo(img, ['write -P 14 0 6k', 'write -c -P 15 5M 64k', 'write -P 16 12M 40k']);
    },
  },
];

interface Info {
  'virtual-size': number;
}

function vsize(img: string): number {
  return (JSON.parse(qemuImg('info', '--output', 'json', img)) as Info)['virtual-size'];
}

/** Resizes a copy with each tool; both must agree on what the image then shows. */
function bothResize(dir: string, src: Source, n: number, args: string[]): { ours: string; theirs: string; code: number } {
  const base = path.join(dir, `s${n}.qcow2`);
  if (!fs.existsSync(base)) src.make(base);
  const tag = args.join('').replace(/[^a-z0-9+-]/gi, '_');
  const ours = path.join(dir, `s${n}-${tag}-ours.qcow2`);
  const theirs = path.join(dir, `s${n}-${tag}-qemu.qcow2`);
  fs.copyFileSync(base, ours);
  fs.copyFileSync(base, theirs);
  // A negative size must follow "--" so that it is not taken for an option.
  const neg = args.some((a) => /^-\d/.test(a));
  const build = (img: string): string[] => {
    const flags = args.filter((a) => a.startsWith('--'));
    const size = args.filter((a) => !a.startsWith('--'));
    return [...flags, img, ...(neg ? ['--'] : []), ...size];
  };
  const r = qcow2fs(['resize', '-q', ...build(ours)]);
  const q = run('qemu-img', ['resize', '-q', ...build(theirs)]);
  expect({ src: src.name, args, ours: r.code === 0, err: r.stderr }).toEqual({ src: src.name, args, ours: q.code === 0, err: q.code === 0 ? '' : r.stderr });
  return { ours, theirs, code: r.code };
}

describe('resize agrees with qemu-img resize', () => {
  it('grow: +SIZE and SIZE, including L1 tables that must move; check clean, same size and data as qemu-img', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('resize-grow');
    sources.forEach((src, n) => {
      for (const args of [['+1M'], ['+3G'], ['100G']]) {
        const { ours, theirs } = bothResize(dir, src, n, args);
        expect({ src: src.name, args, check: run('qemu-img', ['check', ours]).code }).toEqual({ src: src.name, args, check: 0 });
        expect({ src: src.name, args, size: vsize(ours) }).toEqual({ src: src.name, args, size: vsize(theirs) });
        expect({ src: src.name, args, same: run('qemu-img', ['compare', '-q', ours, theirs]).code }).toEqual({ src: src.name, args, same: 0 });
        // The new part reads zeros and is writable by QEMU afterwards.
        qemuIo(ours, [`write -P 0x77 ${vsize(ours) - 65536} 65536`]);
        expect(run('qemu-img', ['check', ours]).code).toBe(0);
      }
    });
  });

  it('shrink with --shrink: check clean, same data and about the same file size as qemu-img; snapshots untouched', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('resize-shrink');
    sources.forEach((src, n) => {
      if (src.name.startsWith('v2')) return; // see the refusal test
      for (const args of [['--shrink', '5M'], ['--shrink', '-1M'], ['--shrink', '9000k']]) {
        const { ours, theirs } = bothResize(dir, src, n, args);
        const label = { src: src.name, args };
        expect({ ...label, check: run('qemu-img', ['check', ours]).code }).toEqual({ ...label, check: 0 });
        expect({ ...label, size: vsize(ours) }).toEqual({ ...label, size: vsize(theirs) });
        expect({ ...label, same: run('qemu-img', ['compare', '-q', ours, theirs]).code }).toEqual({ ...label, same: 0 });
        const cs = (JSON.parse(qemuImg('info', '--output', 'json', ours)) as { 'cluster-size': number })['cluster-size'];
        expect({ ...label, fileSizeClose: fs.statSync(ours).size <= fs.statSync(theirs).size + 2 * cs }).toEqual({ ...label, fileSizeClose: true });
        // Internal snapshots still hold what they held before: QEMU reads them (cut to the new
        // size) the same in both results, and in full through our engine they are unchanged.
        for (const snap of ['one', 'two']) {
          if (!src.name.startsWith('snapshots')) continue;
          const a = path.join(dir, 'a.raw');
          const b = path.join(dir, 'b.raw');
          qemuImg('convert', '-l', `snapshot.name=${snap}`, '-O', 'raw', ours, a);
          qemuImg('convert', '-l', `snapshot.name=${snap}`, '-O', 'raw', theirs, b);
          expect({ ...label, snap, same: sha256File(a) === sha256File(b) }).toEqual({ ...label, snap, same: true });
          expect(qcow2fs(['convert', '-l', snap, ours, a]).code).toBe(0);
          qemuImg('convert', '-l', `snapshot.name=${snap}`, '-O', 'raw', path.join(dir, `s${n}.qcow2`), b);
          expect(fs.statSync(a).size).toBe(16 * M);
          expect({ ...label, snap, full: sha256File(a) === sha256File(b) }).toEqual({ ...label, snap, full: true });
        }
      }
    });
  });

  it('refusals: shrinking without --shrink, version 2 with snapshots; the image is left unchanged', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('resize-refuse');
    const img = path.join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 1 0 8M']);
    const v2 = path.join(dir, 'v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '8M');
    qemuImg('snapshot', '-c', 's', v2);
    for (const [args, file] of [[['resize', img, '4M'], img], [['resize', img, '--', '-1M'], img], [['resize', v2, '16M'], v2], [['resize', '--shrink', v2, '4M'], v2]] as const) {
      const before = sha256File(file);
      const r = qcow2fs([...args]);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(sha256File(file)).toBe(before);
      const q = run('qemu-img', [...args]);
      expect(q.code).not.toBe(0);
    }
    // A qcow2 disk is whole sectors: qemu-img refuses +1 too; the image is left unchanged.
    const before = sha256File(img);
    const odd = qcow2fs(['resize', img, '+1']);
    expect(odd.code).toBe(2);
    expect(odd.stderr).toMatch(/must be a multiple of 512/);
    expect(run('qemu-img', ['resize', img, '+1']).code).not.toBe(0);
    expect(sha256File(img)).toBe(before);
    expect(qcow2fs(['resize', path.join(dir, 'missing.qcow2'), '1G']).code).toBe(2);
    expect(qcow2fs(['resize', img]).code).toBe(2);
  });

  it('an overlay grown over a larger backing file reads zeros there, as after qemu-img resize (offline and through the mount)', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('resize-overlay');
    const base = path.join(dir, 'base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    qemuIo(base, ['write -P 0xab 0 64M']);
    // Old sizes on and off cluster boundaries; growing within and past the backing file's end.
    const cases: Array<{ old: number; grow: number; how: 'resize' | 'truncate' }> = [
      { old: 32 * M, grow: 64 * M, how: 'resize' },
      { old: 32 * M + 1536, grow: 60 * M, how: 'truncate' },
      { old: 20 * M, grow: 100 * M, how: 'truncate' },
      { old: 8 * M + 512, grow: 80 * M, how: 'resize' },
    ];
    for (const [n, c] of cases.entries()) {
      const ours = path.join(dir, `o${n}.qcow2`);
      const ref = path.join(dir, `r${n}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', ours, String(c.old));
      qemuIo(ours, ['write -P 0x11 0 1M', `write -P 0x12 ${c.old - 4096} 4096`]);
      fs.copyFileSync(ours, ref);
      if (c.how === 'resize') {
        expect(qcow2fs(['resize', '-q', ours, String(c.grow)]).code).toBe(0);
      } else {
        await withMount(ours, [], (raw) => {
          expect(run('truncate', ['-s', String(c.grow), raw]).code).toBe(0);
          // Read back at once, through the mount: zeros from the old end on.
          const fd = fs.openSync(raw, 'r');
          const got = Buffer.alloc(1 * M);
          fs.readSync(fd, got, 0, got.length, c.old);
          fs.closeSync(fd);
          expect(got.every((x) => x === 0), 'the new area through the mount').toBe(true);
        });
      }
      qemuImg('resize', '-q', ref, String(c.grow));
      expect({ n, check: run('qemu-img', ['check', ours]).code }).toEqual({ n, check: 0 });
      expect({ n, same: run('qemu-img', ['compare', ours, ref]).stdout.trim() }).toEqual({ n, same: 'Images are identical.' });
      expect(qemuImg('map', '--output', 'json', ours)).toBe(qemuImg('map', '--output', 'json', ref));
    }
    // Version 2 has no zero clusters: zeros are written (qemu-img refuses this one), never the backing bytes.
    const v2 = path.join(dir, 'v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2', v2, '16M');
    expect(qcow2fs(['resize', '-q', v2, '48M']).code).toBe(0);
    expect(run('qemu-img', ['check', v2]).code).toBe(0);
    const r = run('qemu-io', ['-r', '-c', 'read -P 0 16M 32M', '-c', 'read -P 0xab 0 16M', v2]);
    expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|error/i);
    // Over a sparse backing file, zeros only where it has data: 2 MiB written, not 1 GiB.
    const sparse = path.join(dir, 'sparse.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', sparse, '1G');
    qemuIo(sparse, ['write -P 0x5c 600M 2M']);
    const v2s = path.join(dir, 'v2s.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'sparse.qcow2', '-F', 'qcow2', v2s, '64M');
    expect(qcow2fs(['resize', '-q', v2s, '1G']).code).toBe(0);
    expect(run('qemu-img', ['check', v2s]).code).toBe(0);
    expect(run('qemu-io', ['-r', '-c', 'read -P 0 64M 960M', v2s]).stdout).not.toMatch(/Pattern verification failed/);
    expect(fs.statSync(v2s).size).toBeLessThan(8 * M);
  });

  it('truncate through the mount refuses to resize a version 2 image with snapshots, as qemu-img does', async () => {
    need('qemu-img', '/dev/fuse');
    const dir = scratchDir('resize-v2-mount');
    const v2 = path.join(dir, 'v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '8M');
    qemuImg('snapshot', '-c', 's', v2);
    await withMount(v2, [], (raw) => {
      const t = run('truncate', ['-s', '16M', raw]);
      expect(t.code).not.toBe(0);
      expect(t.stderr).toMatch(/Operation not supported/);
      expect(fs.statSync(raw).size).toBe(8 * M);
    });
    expect(vsize(v2)).toBe(8 * M);
    expect(run('qemu-img', ['snapshot', '-a', 's', v2]).code).toBe(0);
  });

  it('raw images grow and shrink like qemu-img', () => {
    need('qemu-img');
    const dir = scratchDir('resize-raw');
    const a = path.join(dir, 'a.raw');
    const b = path.join(dir, 'b.raw');
    fs.writeFileSync(a, Buffer.alloc(3 * M, 1));
    fs.copyFileSync(a, b);
    for (const args of [['+1M'], ['--shrink', '2M'], ['10M']]) {
      const flags = args.filter((x) => x.startsWith('--'));
      const size = args.filter((x) => !x.startsWith('--'));
      expect(qcow2fs(['resize', '-q', '-f', 'raw', ...flags, a, ...size]).code).toBe(0);
      qemuImg('resize', '-q', '-f', 'raw', ...flags, b, ...size);
      expect(fs.statSync(a).size).toBe(fs.statSync(b).size);
      expect(sha256File(a)).toBe(sha256File(b));
    }
  });
});
