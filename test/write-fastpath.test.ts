/**
 * The fast write paths, with QEMU as the oracle:
 * - the writer's in-place path (writes inside clusters the layer owns: no lock, plan or commit);
 * - new clusters past the end of the file written without their zero fill (the file is extended
 *   at flush), on plain and extended-L2 images, with and without a backing file;
 * - through the mount: hot ranges rewritten (fast and slow path mixed on the same clusters) and
 *   read back at once.
 * The same writes go through qemu-io into a reference image; qemu-img compare must find the two
 * equal and qemu-img check must find no corruption and no leak.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FdFile } from '../src/io/file';
import { Qcow2Image, readHeader } from '../src/qcow2/image';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, withMount } from './support/env';

afterAll(removeScratch);

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

function checkClean(image: string): void {
  const check = run('qemu-img', ['check', '--output', 'json', image]);
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const report = JSON.parse(check.stdout) as { leaks?: number; corruptions?: number };
  expect(report.corruptions ?? 0).toBe(0);
  expect(report.leaks ?? 0).toBe(0);
}

function expectSame(image: string, ref: string): void {
  const cmp = run('qemu-img', ['compare', image, ref]);
  expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
}

/** Writes through the engine and the same writes through qemu-io (in batches). */
async function writeBoth(image: string, ref: string, writes: { off: number; len: number; pattern: number }[], flushEvery = 50): Promise<void> {
  const file = await FdFile.open(image, false);
  const { header, fileSize } = await readHeader(file);
  const dev = await Qcow2Image.open(file, { readOnly: false, backing: null }, { header, fileSize });
  try {
    for (let i = 0; i < writes.length; i++) {
      const w = writes[i]!;
      await dev.write(Buffer.alloc(w.len, w.pattern), w.off);
      if (i % flushEvery === flushEvery - 1) await dev.flush();
    }
  } finally {
    await dev.close();
  }
  for (let i = 0; i < writes.length; i += 200) {
    qemuIo(ref, writes.slice(i, i + 200).map((w) => `write -P ${w.pattern} ${w.off} ${w.len}`));
  }
}

function randomWrites(seed: number, n: number, maxLen: number, align = 1): { off: number; len: number; pattern: number }[] {
  const r = rng(seed);
  const out: { off: number; len: number; pattern: number }[] = [];
  for (let i = 0; i < n; i++) {
    const len = Math.max(align, Math.floor((1 + Math.floor(r() * maxLen)) / align) * align);
    const off = Math.floor((r() * (SIZE - len)) / align) * align;
    out.push({ off, len, pattern: 1 + (i % 250) });
  }
  return out;
}

describe('in-place fast path (engine)', () => {
  it.each([
    { name: '64K clusters', opts: 'cluster_size=64k' },
    { name: '4K clusters', opts: 'cluster_size=4k' },
    { name: 'extended_l2', opts: 'extended_l2=on' },
  ])('random writes into an allocated image match qemu-io: $name', async (c) => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('fast');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, String(SIZE));
    // Mostly allocated (fast path), with holes, a zero range and a partly allocated extended-L2 cluster.
    qemuIo(image, ['write -P 0x11 0 40M', 'write -z 8M 1M', 'write -P 0x12 48M 4k', 'write -P 0x13 56M 3M']);
    const ref = path.join(dir, 'ref.qcow2');
    fs.copyFileSync(image, ref);
    await writeBoth(image, ref, randomWrites(7, 1500, 200_000));
    checkClean(image);
    expectSame(image, ref);
  });
});

describe('new clusters past the end of the file: no zero fill', () => {
  it.each([
    { name: 'plain', opts: 'cluster_size=64k', backing: false },
    { name: 'extended_l2', opts: 'extended_l2=on', backing: false },
    { name: 'overlay on a qcow2 backing file', opts: 'cluster_size=64k', backing: true },
  ])('small writes into an empty image match qemu-io: $name', async (c) => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('sparse');
    const image = path.join(dir, 'disk.qcow2');
    const ref = path.join(dir, 'ref.qcow2');
    if (c.backing) {
      const base = path.join(dir, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(SIZE / 2)); // shorter than the overlay
      qemuIo(base, ['write -P 0x77 0 20M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, '-b', 'base.qcow2', '-F', 'qcow2', image, String(SIZE));
    } else {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, String(SIZE));
    }
    fs.copyFileSync(image, ref);
    const writes = randomWrites(11, 800, 8192, 512);
    if (c.backing) {
      // Qcow2Image.open with backing: null would read zeros; go through the mount instead.
      await withMount(image, [], (raw) => {
        const fd = fs.openSync(raw, 'r+');
        try {
          for (const w of writes) fs.writeSync(fd, Buffer.alloc(w.len, w.pattern), 0, w.len, w.off);
        } finally {
          fs.closeSync(fd);
        }
      });
      for (let i = 0; i < writes.length; i += 200) qemuIo(ref, writes.slice(i, i + 200).map((w) => `write -P ${w.pattern} ${w.off} ${w.len}`));
    } else {
      await writeBoth(image, ref, writes, 100);
    }
    checkClean(image);
    expectSame(image, ref);
    // The file covers every cluster it maps (it was extended before the entries were written).
    const info = JSON.parse(qemuImg('check', '--output', 'json', image)) as { 'image-end-offset'?: number };
    expect(fs.statSync(image).size).toBeGreaterThanOrEqual(info['image-end-offset'] ?? 0);
  });
});

describe('through the mount', () => {
  it('keeps overlapping writes in order and reads see every write', async () => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('hot');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', image, String(SIZE));
    qemuIo(image, ['write -P 0x11 0 16M']);
    const ref = path.join(dir, 'ref.raw');
    qemuImg('convert', '-O', 'raw', image, ref);
    const r = rng(5);
    await withMount(image, [], (raw) => {
      const fd = fs.openSync(raw, 'r+');
      const rfd = fs.openSync(ref, 'r+');
      try {
        for (let i = 0; i < 600; i++) {
          // Hot spots: the same few ranges rewritten (allocated and new clusters), then read back.
          const base = [0, 5 * MiB, 20 * MiB, 40 * MiB][i % 4]!;
          const len = 1 + Math.floor(r() * 150_000);
          const off = base + Math.floor(r() * 200_000);
          const buf = Buffer.alloc(len, 1 + (i % 250));
          fs.writeSync(fd, buf, 0, len, off);
          fs.writeSync(rfd, buf, 0, len, off);
          if (i % 3 === 0) {
            const got = Buffer.alloc(4096);
            const want = Buffer.alloc(4096);
            const at = off + Math.floor(len / 2);
            fs.readSync(fd, got, 0, 4096, at);
            fs.readSync(rfd, want, 0, 4096, at);
            expect(got.equals(want), `read at ${at} after write ${i}`).toBe(true);
          }
          if (i % 100 === 99) fs.fsyncSync(fd);
        }
      } finally {
        fs.closeSync(fd);
        fs.closeSync(rfd);
      }
    });
    checkClean(image);
    const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, ref]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
  });
});
