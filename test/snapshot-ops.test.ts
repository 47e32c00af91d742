/**
 * Snapshot create / apply / delete on our engine, judged by QEMU: qemu-img check clean after
 * each step, snapshot contents equal to what the image held when they were taken (qemu-img
 * convert -l), apply restores content and the recorded disk size, delete releases clusters.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../src/image/open';
import type { Qcow2Image } from '../src/qcow2/image';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../src/qcow2/snapshot-write';
import { need, qemuImg, qemuIo, removeScratch, run, scratchDir, sha256File } from './support/env';

afterAll(removeScratch);

async function withImage<T>(image: string, fn: (img: Qcow2Image) => Promise<T>): Promise<T> {
  const { device } = await openImage(image, { readOnly: false });
  try {
    return await fn(device as Qcow2Image);
  } finally {
    await device.close();
  }
}

function expectClean(image: string): void {
  const r = run('qemu-img', ['check', image]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
}

function rawSha(image: string, snapshot?: string): string {
  const out = `${image}.${snapshot ?? 'active'}.raw`;
  qemuImg('convert', ...(snapshot ? ['-l', `snapshot.name=${snapshot}`] : []), '-O', 'raw', image, out);
  const sum = sha256File(out);
  fs.rmSync(out);
  return sum;
}

describe.each([
  { name: 'compat 1.1, 64K clusters', opts: 'cluster_size=64k', grow: true },
  { name: '512-byte clusters, 64-bit refcounts', opts: 'cluster_size=512,refcount_bits=64', grow: true },
  { name: 'extended_l2', opts: 'extended_l2=on', grow: true },
  { name: 'compat 0.10', opts: 'compat=0.10', grow: false },
])('snapshot create/apply/delete: $name', (c) => {
  it('agrees with QEMU at every step', async () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('snapops');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, '32M');
    qemuIo(image, ['write -P 1 0 5M', 'write -P 7 9M 300k']);
    const s0 = rawSha(image);
    await withImage(image, (img) => createSnapshot(img, 'first'));
    expectClean(image);
    expect(rawSha(image, 'first')).toBe(s0);
    // QEMU writes after our snapshot must copy-on-write (COPIED flags cleared correctly).
    qemuIo(image, ['write -P 2 1M 2M', 'write -z 4M 128k']);
    expect(rawSha(image, 'first')).toBe(s0);
    const s1 = rawSha(image);
    await withImage(image, (img) => createSnapshot(img, 'second'));
    expectClean(image);
    const list = JSON.parse(qemuImg('info', '--output', 'json', image)) as { snapshots: { id: string; name: string }[] };
    expect(list.snapshots.map((s) => `${s.id}:${s.name}`)).toEqual(['1:first', '2:second']);
    await expect(withImage(image, (img) => createSnapshot(img, 'first'))).rejects.toThrow(/already exists/);

    if (c.grow) qemuImg('resize', '-q', image, '64M');
    qemuIo(image, ['write -P 3 20M 1M']);
    await withImage(image, (img) => applySnapshot(img, 'first'));
    expectClean(image);
    expect(rawSha(image)).toBe(s0);
    const info = JSON.parse(qemuImg('info', '--output', 'json', image)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(32 * 1024 * 1024);
    expect(rawSha(image, 'second')).toBe(s1);

    const before = fs.statSync(image).size;
    await withImage(image, (img) => deleteSnapshot(img, 'second'));
    expectClean(image);
    await withImage(image, (img) => deleteSnapshot(img, '1'));
    expectClean(image);
    expect(rawSha(image)).toBe(s0);
    expect((JSON.parse(qemuImg('info', '--output', 'json', image)) as { snapshots?: unknown[] }).snapshots ?? []).toEqual([]);
    // Released clusters are reused: writing 2 MiB now does not grow the file.
    qemuIo(image, ['write -P 5 12M 1M']);
    expect(fs.statSync(image).size).toBeLessThanOrEqual(before);
    await expect(withImage(image, (img) => deleteSnapshot(img, 'nope'))).rejects.toThrow(/no snapshot/);
  });

  it('interoperates with qemu-img snapshot both ways', async () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('snapx');
    const image = path.join(dir, 'x.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, '16M');
    qemuIo(image, ['write -P 0x10 0 2M']);
    const a = rawSha(image);
    await withImage(image, (img) => createSnapshot(img, 'ours'));
    qemuIo(image, ['write -P 0x20 1M 2M']);
    qemuImg('snapshot', '-c', 'theirs', image);
    const b = rawSha(image);
    qemuIo(image, ['write -P 0x30 0 4M']);
    // QEMU lists and applies ours...
    expect(qemuImg('snapshot', '-l', image)).toMatch(/ours[\s\S]*theirs/);
    qemuImg('snapshot', '-a', 'ours', image);
    expect(rawSha(image)).toBe(a);
    expectClean(image);
    // ...and we apply and delete QEMU's.
    await withImage(image, (img) => applySnapshot(img, 'theirs'));
    expect(rawSha(image)).toBe(b);
    expectClean(image);
    await withImage(image, (img) => deleteSnapshot(img, 'theirs'));
    qemuImg('snapshot', '-d', 'ours', image);
    expectClean(image);
    expect(rawSha(image)).toBe(b);
  });
});

describe('snapshot commands on a corrupt image', () => {
  it('refuse with one line naming the bad L2 entry, and change nothing', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('snapcorrupt');
    const img = path.join(dir, 'c.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, String(64 * 1024 * 1024));
    qemuIo(img, ['write -P 0x55 0 100k']);
    qemuImg('snapshot', '-c', 'good', img);
    qemuIo(img, ['write -P 0x66 0 64k']); // the active layer's first cluster now differs from the snapshot's
    // The active layer's first L2 entry: a data cluster offset that is not cluster-aligned.
    const file = fs.readFileSync(img);
    const l2 = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(40))) & 0x00ffffff_fffffe00n);
    file.writeBigUInt64BE((1n << 63n) | 0x50200n, l2);
    fs.writeFileSync(img, file);
    const sha = sha256File(img);
    const bin = path.join(__dirname, '..', 'bin', 'qcow2fs');
    for (const args of [['-c', 'new'], ['-a', 'good']]) {
      const r = run(bin, ['snapshot', ...args, img]);
      expect(r.code, args.join(' ')).not.toBe(0);
      const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^qcow2fs: .*L2 entry \(L1 index 0, L2 index 0\): data cluster offset 0x50200 is not aligned.*nothing was changed/);
      expect(sha256File(img), `${args.join(' ')} left the image as it was`).toBe(sha);
    }
  });
});
