/**
 * Discard through the mount: fallocate(PUNCH_HOLE) and fallocate(ZERO_RANGE) on the raw file
 * (what fstrim, blkdiscard and mkfs.ext4 send through a loop device). The range must read as
 * zeros afterwards, whole clusters give their host space back, snapshots and backing files never
 * change, and freed clusters reused by later writes never show through stale mappings.
 *
 * Oracle: the same operations through qemu-io into a reference (`write -z` for both kinds: QEMU's
 * `discard` may leave partial clusters as they were, a punched hole may not), compared with
 * qemu-img compare after every round (O_DIRECT, through the mount) and at the end; then
 * qemu-img check must report no corruption and no leak.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, sha256File, withMount } from './support/env';
import { expectCheckClean, expectSameContent } from './support/oracle';

afterAll(removeScratch);

const MiB = 1024 * 1024;
const SIZE = 40 * MiB;

interface Case {
  name: string;
  format: 'qcow2' | 'raw';
  opts?: string;
  fill: string[];
  snapshot?: boolean;
  backing?: boolean;
  compressed?: boolean;
}

const CASES: Case[] = [
  { name: 'v3, 64K clusters, internal snapshot', format: 'qcow2', opts: 'cluster_size=64k', fill: ['write -P 0x11 0 30M', 'write -z 4M 1M'], snapshot: true },
  { name: 'v2 (compat=0.10), no backing file', format: 'qcow2', opts: 'compat=0.10', fill: ['write -P 0x21 0 30M'] },
  { name: 'v2 over a backing file (zeros must be written)', format: 'qcow2', opts: 'compat=0.10', fill: ['write -P 0x31 2M 3M'], backing: true },
  { name: 'v3 overlay over a backing file (zero clusters hide it)', format: 'qcow2', opts: 'cluster_size=64k', fill: ['write -P 0x41 2M 3M'], backing: true },
  { name: 'extended_l2', format: 'qcow2', opts: 'extended_l2=on', fill: ['write -P 0x51 0 20M', 'write -P 0x52 22M 12k'] },
  { name: '512-byte clusters', format: 'qcow2', opts: 'cluster_size=512', fill: ['write -P 0x61 0 6M'] },
  { name: 'compressed clusters', format: 'qcow2', opts: 'cluster_size=64k', fill: [], compressed: true },
  { name: 'raw image', format: 'raw', fill: ['write -P 0x71 0 30M'] },
];

describe('discard (fallocate punch hole / zero range) through the mount', () => {
  it.each(CASES)('$name', async (c) => {
    need('qemu-img', 'qemu-io', 'fallocate', '/dev/fuse');
    const dir = scratchDir('discard');
    const image = path.join(dir, `disk.${c.format}`);
    const ref = path.join(dir, 'ref.qcow2');
    if (c.backing) {
      const base = path.join(dir, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(SIZE / 2));
      qemuIo(base, ['write -P 0x60 0 20M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts!, '-b', 'base.qcow2', '-F', 'qcow2', image, String(SIZE));
    } else if (c.compressed) {
      const src = path.join(dir, 'src.raw');
      qemuImg('create', '-q', '-f', 'raw', src, String(SIZE));
      qemuIo(src, ['write -P 0x81 0 24M'], 'raw');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', c.opts!, src, image);
    } else if (c.format === 'qcow2') {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts!, image, String(SIZE));
    } else {
      qemuImg('create', '-q', '-f', 'raw', image, String(SIZE));
    }
    if (c.fill.length) qemuIo(image, c.fill, c.format);
    if (c.snapshot) qemuImg('snapshot', '-c', 'before', image);
    const snapBefore = path.join(dir, 'snap-before.raw');
    if (c.snapshot) qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=before', image, snapBefore);
    const baseSha = c.backing ? sha256File(path.join(dir, 'base.qcow2')) : '';
    qemuImg('convert', '-O', 'qcow2', '-f', c.format, image, ref);

    const r = rng(c.name.length * 31 + 7);
    await withMount(image, [], (raw) => {
      // Warm the direct maps, so stale mappings would show.
      expect(run('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']).code).toBe(0);
      for (let round = 0; round < 3; round++) {
        const ours: string[] = [];
        const refCmds: string[] = [];
        for (let i = 0; i < 10; i++) {
          // Unaligned and cluster-sized ranges, some past what the fill wrote.
          const len = i % 3 === 0 ? 1 + Math.floor(r() * 3 * MiB) : 512 * (1 + Math.floor(r() * 300));
          const off = Math.floor(r() * (SIZE - len));
          const kind = i % 2 === 0 ? '-p' : '-z';
          const res = run('fallocate', [kind, '-o', String(off), '-l', String(len), raw]);
          expect(res.code, `fallocate ${kind} ${off} ${len}: ${res.stderr}`).toBe(0);
          refCmds.push(`write -z ${off} ${len}`);
          // Then writes, which reuse the freed clusters once a flush has freed them.
          const wlen = 512 * (1 + Math.floor(r() * 400));
          const woff = 512 * Math.floor((r() * (SIZE - wlen)) / 512);
          const p = 1 + ((round * 10 + i) % 250);
          ours.push(`write -P ${p} ${woff} ${wlen}`, `read -P ${p} ${woff} ${wlen}`);
          refCmds.push(`write -P ${p} ${woff} ${wlen}`);
          const w = run('qemu-io', ['-f', 'raw', '-n', ...ours.splice(0).flatMap((cmd) => ['-c', cmd]), raw]);
          expect(w.code, w.stderr).toBe(0);
          expect(w.stdout + w.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
          if (i % 4 === 3) {
            const fd = fs.openSync(raw, 'r+');
            fs.fsyncSync(fd);
            fs.closeSync(fd);
          }
        }
        qemuIo(ref, refCmds);
        expectSameContent(raw, 'raw', ref, 'qcow2', { direct: true, what: `round ${round}` });
      }
    });
    if (c.format === 'qcow2') expectCheckClean(image);
    expectSameContent(image, c.format, ref, 'qcow2');
    if (c.snapshot) {
      const snapAfter = path.join(dir, 'snap-after.raw');
      qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=before', image, snapAfter);
      expect(run('cmp', [snapBefore, snapAfter]).code, 'the snapshot changed').toBe(0);
    }
    if (c.backing) {
      expect(sha256File(path.join(dir, 'base.qcow2')), 'the backing file changed').toBe(baseSha);
    }
  });

  it('fstrim of ext4 on a loop device over the raw file gives the space of deleted files back', async () => {
    need('root', 'qemu-img', 'mkfs.ext4', 'losetup', 'mount', 'umount', 'fstrim', 'e2fsck', '/dev/fuse', '/dev/loop-control');
    const dir = scratchDir('fstrim');
    const image = path.join(dir, 'disk.qcow2');
    const fsDir = path.join(dir, 'fs');
    fs.mkdirSync(fsDir);
    qemuImg('create', '-q', '-f', 'qcow2', image, String(512 * MiB));
    const allocated = (): number =>
      (JSON.parse(run('qemu-img', ['check', '-U', '--output', 'json', image]).stdout) as { 'allocated-clusters'?: number })['allocated-clusters'] ?? 0;
    let before = 0;
    await withMount(image, [], (raw) => {
      const loop = run('losetup', ['--find', '--show', raw]).stdout.trim();
      expect(loop).toMatch(/^\/dev\/loop\d+$/);
      try {
        expect(run('mkfs.ext4', ['-q', '-F', loop]).code).toBe(0);
        expect(run('mount', [loop, fsDir]).code).toBe(0);
        try {
          fs.writeFileSync(path.join(fsDir, 'big'), Buffer.alloc(64 * MiB, 0x5a));
          expect(run('sync', ['-f', fsDir]).code).toBe(0);
          before = allocated();
          fs.rmSync(path.join(fsDir, 'big'));
          expect(run('sync', ['-f', fsDir]).code).toBe(0);
          const trim = run('fstrim', ['-v', fsDir]);
          expect(trim.code, trim.stderr).toBe(0);
        } finally {
          run('umount', [fsDir]);
        }
        const fsck = run('e2fsck', ['-fn', loop]);
        expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
      } finally {
        run('losetup', ['-d', loop]);
      }
    });
    expectCheckClean(image);
    // 64 MiB is 1024 clusters of 64 KiB: at least those came back.
    expect(before - allocated(), `allocated clusters ${before} before the trim, ${allocated()} after`).toBeGreaterThanOrEqual(1000);
  });

  it('gives host space back: discarding everything leaves only metadata allocated', async () => {
    need('qemu-img', 'qemu-io', 'fallocate', '/dev/fuse');
    const dir = scratchDir('discard-all');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, String(SIZE));
    qemuIo(image, ['write -P 0x11 0 32M']);
    await withMount(image, [], (raw) => {
      expect(run('fallocate', ['-p', '-o', '0', '-l', String(SIZE), raw]).code).toBe(0);
    });
    const check = JSON.parse(qemuImg('check', '--output', 'json', image)) as { 'allocated-clusters'?: number; leaks?: number; corruptions?: number };
    expect(check.corruptions ?? 0).toBe(0);
    expect(check.leaks ?? 0).toBe(0);
    expect(check['allocated-clusters'] ?? 0).toBe(0);
    const map = JSON.parse(qemuImg('map', '--output', 'json', image)) as { data: boolean }[];
    expect(map.every((e) => !e.data)).toBe(true);
  });

  it('allocates nothing for partial-cluster discards and zeroing of bytes that read as zeros', async () => {
    need('qemu-img', 'qemu-io', 'fallocate', '/dev/fuse');
    const dir = scratchDir('discard-none');
    const image = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, String(SIZE));
    // A zero cluster (v3 zero flag) and a hole; mkfs.ext4 discards and zeroes such pieces.
    qemuIo(image, ['write -z -u 8M 64k']);
    const before = JSON.parse(qemuImg('check', '--output', 'json', image)) as { 'allocated-clusters'?: number };
    await withMount(image, [], (raw) => {
      for (const [flag, off, len] of [['-p', 4096, 4096], ['-z', 1 * MiB + 512, 8192], ['-p', 8 * MiB + 4096, 4096], ['-z', 8 * MiB + 60 * 1024, 8192], ['-z', 20 * MiB - 4096, 12288]] as const) {
        const f = run('fallocate', [flag, '-o', String(off), '-l', String(len), raw]);
        expect(f.code, f.stderr).toBe(0);
      }
    });
    const after = JSON.parse(qemuImg('check', '--output', 'json', image)) as { 'allocated-clusters'?: number; leaks?: number; corruptions?: number };
    expect(after.corruptions ?? 0).toBe(0);
    expect(after.leaks ?? 0).toBe(0);
    expect(after['allocated-clusters'] ?? 0, 'clusters allocated by zeroing zeros').toBe(before['allocated-clusters'] ?? 0);
    const zeros = path.join(dir, 'zeros.raw');
    qemuImg('create', '-q', '-f', 'raw', zeros, String(SIZE));
    expectSameContent(image, 'qcow2', zeros, 'raw');
  });
});
