/**
 * Issue 3 acceptance: 1,000 seeded random writes (1 byte to 4 MiB, unaligned, crossing cluster and
 * L2 boundaries) through the mounted raw file and into a raw reference, on every kind of image.
 * After a clean unmount QEMU must agree: check clean (no leaks), compare equal, snapshots and
 * backing files unchanged.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, seededBytes, sha256File, withMount } from './support/env';

const SIZE = 256 * 1024 * 1024;
const WRITES = 1000;

interface Case {
  name: string;
  create: string[]; // qemu-img create -o options
  /** Extra preparation (snapshots, compression, overlays); returns files that must not change. */
  prepare?: (dir: string, image: string) => string[];
}

function seed(image: string): void {
  qemuIo(image, ['write -P 0x11 0 3M', 'write -P 0x22 100M 5M', 'write -z 150M 2M', 'write -P 0x33 200M 64k']);
}

const cases: Case[] = [
  { name: 'compat 0.10', create: ['compat=0.10'] },
  { name: 'cluster 512', create: ['cluster_size=512'] },
  { name: 'cluster 64K', create: ['cluster_size=64k'] },
  { name: 'cluster 2M', create: ['cluster_size=2M'] },
  { name: 'refcount_bits 1', create: ['refcount_bits=1'] },
  { name: 'refcount_bits 16', create: ['refcount_bits=16'] },
  { name: 'refcount_bits 64', create: ['refcount_bits=64'] },
  { name: 'extended_l2', create: ['extended_l2=on'] },
  { name: 'lazy_refcounts', create: ['lazy_refcounts=on'] },
  {
    name: 'zlib-compressed source',
    create: [],
    prepare: (dir, image) => {
      const tmp = path.join(dir, 'c.tmp');
      qemuImg('convert', '-c', '-O', 'qcow2', image, tmp);
      fs.renameSync(tmp, image);
      return [];
    },
  },
  {
    name: 'three internal snapshots',
    create: [],
    prepare: (_dir, image) => {
      qemuImg('snapshot', '-c', 's1', image);
      qemuIo(image, ['write -P 0x44 1M 4M']);
      qemuImg('snapshot', '-c', 's2', image);
      qemuIo(image, ['write -P 0x55 90M 20M']);
      qemuImg('snapshot', '-c', 's3', image);
      return [];
    },
  },
  {
    name: 'overlay on qcow2 backing',
    create: [],
    prepare: (dir, image) => {
      const base = path.join(dir, 'base.qcow2');
      fs.renameSync(image, base);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', image);
      return [base];
    },
  },
  {
    name: 'overlay on raw backing',
    create: [],
    prepare: (dir, image) => {
      const base = path.join(dir, 'base.raw');
      qemuImg('convert', '-O', 'raw', image, base);
      fs.rmSync(image);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', image);
      return [base];
    },
  },
];

/** Write lengths: mostly small, some medium, a few up to 4 MiB. */
function pickLength(r: () => number): number {
  const p = r();
  if (p < 0.7) return 1 + Math.floor(r() * 65536);
  if (p < 0.95) return 1 + Math.floor(r() * 512 * 1024);
  return 1 + Math.floor(r() * 4 * 1024 * 1024);
}

afterAll(removeScratch);

describe.each(cases)('1,000 random writes: $name', (c) => {
  it('matches a raw reference and passes qemu-img check', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('ws');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', ...(c.create.length ? ['-o', c.create.join(',')] : []), image, String(SIZE));
    seed(image);
    const frozen = c.prepare?.(dir, image) ?? [];
    const frozenSums = frozen.map(sha256File);
    const snapshots = (JSON.parse(qemuImg('info', '--output', 'json', image)) as { snapshots?: { name: string }[] }).snapshots ?? [];
    const snapSums = snapshots.map((s) => {
      const out = path.join(dir, `snap-${s.name}.raw`);
      qemuImg('convert', '-l', `snapshot.name=${s.name}`, '-O', 'raw', image, out);
      const sum = sha256File(out);
      fs.rmSync(out);
      return sum;
    });
    const ref = path.join(dir, 'ref.raw');
    qemuImg('convert', '-O', 'raw', image, ref);

    await withMount(image, [], (raw) => {
      const r = rng(0xc0ffee ^ c.name.length * 7919);
      const fd = fs.openSync(raw, 'r+');
      const rfd = fs.openSync(ref, 'r+');
      try {
        for (let i = 0; i < WRITES; i++) {
          const len = pickLength(r);
          const off = Math.floor(r() * (SIZE - len));
          const data = seededBytes(i + 1, Math.min(len, 4096));
          const buf = len <= 4096 ? data : Buffer.alloc(len, i & 0xff);
          if (len > 4096) data.copy(buf, 0);
          expect(fs.writeSync(fd, buf, 0, len, off)).toBe(len);
          fs.writeSync(rfd, buf, 0, len, off);
          if (i % 250 === 249) fs.fsyncSync(fd);
        }
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
        fs.closeSync(rfd);
      }
    });

    const check = run('qemu-img', ['check', '--output', 'json', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const report = JSON.parse(check.stdout) as { 'leaks'?: number; 'corruptions'?: number };
    expect(report.corruptions ?? 0).toBe(0);
    expect(report.leaks ?? 0).toBe(0);
    const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, ref]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    snapshots.forEach((s, k) => {
      const out = path.join(dir, `after-${s.name}.raw`);
      qemuImg('convert', '-l', `snapshot.name=${s.name}`, '-O', 'raw', image, out);
      expect(sha256File(out), `snapshot ${s.name}`).toBe(snapSums[k]);
      fs.rmSync(out);
    });
    frozen.forEach((f, k) => expect(sha256File(f), `${f} must not change`).toBe(frozenSums[k]));
    // The lazy-refcounts dirty bit is set while mounted and cleared on a clean unmount.
    const info = JSON.parse(qemuImg('info', '--output', 'json', image)) as { 'dirty-flag'?: boolean };
    expect(info['dirty-flag'] ?? false).toBe(false);
  });
});
