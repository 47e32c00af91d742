/**
 * Issue 3 real workflows through the mount: partition + mkfs.ext4 + 5,000 files, verified through
 * QEMU's own reading of the image; then the grow workflow (truncate, sfdisk, resize2fs).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qcow2fs, qemuImg, removeScratch, run, scratchDir, sh, withMount } from './support/env';

afterAll(removeScratch);

function attach(file: string, readOnly = false): { loop: string; part: string } {
  const loop = sh('losetup', ['-f', '--show', '-P', ...(readOnly ? ['-r'] : []), file]).trim();
  const part = `${loop}p1`;
  if (!fs.existsSync(part)) run('partx', ['-a', loop]);
  for (let i = 0; i < 50 && !fs.existsSync(part); i++) spawnWait(100);
  return { loop, part };
}

function spawnWait(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function makeTree(root: string, files: number): void {
  for (let i = 0; i < files; i++) {
    const d = path.join(root, `d${i % 50}`, `e${i % 7}`);
    fs.mkdirSync(d, { recursive: true });
    fs.writeFileSync(path.join(d, `f${i}.txt`), `file ${i}\n`.repeat(1 + (i % 97)));
  }
}

function diffTrees(a: string, b: string): string {
  const r = run('diff', ['-r', '-q', '-x', 'lost+found', a, b]);
  return r.code === 0 ? '' : r.stdout + r.stderr;
}

describe('ext4 on a new 2 GiB image through the mount', () => {
  it('partitions, formats, copies 5,000 files, and QEMU reads them back; then grows by 1 GiB', async () => {
    need('qemu-img', '/dev/fuse', 'losetup', 'sfdisk', 'mkfs.ext4', 'e2fsck', 'resize2fs', 'partx', 'mount', 'root');
    const dir = scratchDir('wf');
    const image = path.join(dir, 'vm.qcow2');
    const src = path.join(dir, 'tree');
    const fsMnt = path.join(dir, 'fs');
    fs.mkdirSync(fsMnt);
    makeTree(src, 5000);
    qemuImg('create', '-q', '-f', 'qcow2', image, '2G');

    await withMount(image, [], (raw) => {
      const { loop, part } = attach(raw);
      try {
        sh('sfdisk', ['-q', loop], { input: 'label: gpt\n,,L\n' });
        if (!fs.existsSync(part)) run('partx', ['-a', loop]);
        sh('mkfs.ext4', ['-q', part]);
        sh('mount', [part, fsMnt]);
        try {
          sh('cp', ['-a', `${src}/.`, fsMnt]);
        } finally {
          sh('umount', [fsMnt]);
        }
        const fsck = run('e2fsck', ['-fn', part]);
        expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
      } finally {
        run('losetup', ['-d', loop]);
      }
    });

    const check = run('qemu-img', ['check', image]);
    expect(check.code, check.stdout).toBe(0);
    // QEMU's view of the image, loop-mounted read-only: the files are all there.
    const qraw = path.join(dir, 'qemu.raw');
    qemuImg('convert', '-O', 'raw', image, qraw);
    {
      const { loop, part } = attach(qraw, true);
      try {
        sh('mount', ['-o', 'ro', part, fsMnt]);
        try {
          expect(diffTrees(src, fsMnt)).toBe('');
        } finally {
          sh('umount', [fsMnt]);
        }
      } finally {
        run('losetup', ['-d', loop]);
      }
    }
    fs.rmSync(qraw);

    // Grow: the raw file by 1 GiB, the partition, the filesystem.
    await withMount(image, [], (raw) => {
      fs.truncateSync(raw, 3 * 1024 ** 3);
      expect(fs.statSync(raw).size).toBe(3 * 1024 ** 3);
      // Shrinking is refused.
      expect(() => fs.truncateSync(raw, 1024 ** 3)).toThrow();
      const { loop, part } = attach(raw);
      try {
        sh('sfdisk', ['-q', '--force', loop], { input: 'label: gpt\n,,L\n' });
        run('partx', ['-u', loop]);
        run('e2fsck', ['-fp', part]);
        sh('resize2fs', [part]);
        const fsck = run('e2fsck', ['-fn', part]);
        expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
        sh('mount', [part, fsMnt]);
        try {
          const df = sh('df', ['-B1', '--output=size', fsMnt]).trim().split('\n').pop()!;
          expect(Number(df)).toBeGreaterThan(2.8 * 1024 ** 3);
          expect(diffTrees(src, fsMnt)).toBe('');
        } finally {
          sh('umount', [fsMnt]);
        }
      } finally {
        run('losetup', ['-d', loop]);
      }
    });
    const info = JSON.parse(qemuImg('info', '--output', 'json', image)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(3 * 1024 ** 3);
    expect(run('qemu-img', ['check', image]).code).toBe(0);
    expect(qcow2fs(['--version']).code).toBe(0);
  });
});

describe('ext4 across an internal snapshot through the mount', () => {
  it('keeps the snapshot\'s filesystem intact while the active one is changed, trimmed and refilled; QEMU reads both back', async () => {
    need('qemu-img', '/dev/fuse', 'losetup', 'mkfs.ext4', 'e2fsck', 'fstrim', 'mount', 'root');
    const dir = scratchDir('wf-snap');
    const image = path.join(dir, 'disk.qcow2');
    const fsDir = path.join(dir, 'fs');
    fs.mkdirSync(fsDir);
    qemuImg('create', '-q', '-f', 'qcow2', image, String(512 * 1024 * 1024));
    const tree1 = path.join(dir, 'tree1');
    makeTree(tree1, 600);
    const withExt4 = (raw: string, fn: () => void, opts: string[] = []): void => {
      const loop = sh('losetup', ['-f', '--show', ...opts, raw]).trim();
      try {
        const m = run('mount', [...(opts.includes('-r') ? ['-o', 'ro'] : []), loop, fsDir]);
        expect(m.code, m.stderr).toBe(0);
        try {
          fn();
        } finally {
          expect(run('umount', [fsDir]).code).toBe(0);
        }
      } finally {
        run('losetup', ['-d', loop]);
      }
    };
    // 1. A filesystem with tree1, then a snapshot of it.
    await withMount(image, [], (raw) => {
      expect(run('mkfs.ext4', ['-q', raw]).code).toBe(0);
      withExt4(raw, () => expect(run('cp', ['-a', `${tree1}/.`, fsDir]).code).toBe(0));
    });
    qemuImg('snapshot', '-c', 's1', image);
    // 2. The active filesystem changed: part deleted, trimmed, a second tree and random data.
    const tree2 = path.join(dir, 'tree2');
    makeTree(tree2, 400);
    const big = path.join(dir, 'big.bin');
    const bigData = Buffer.alloc(8 << 20);
    for (let i = 0; i < bigData.length; i++) bigData[i] = Math.imul(i, 2654435761) >>> 24;
    fs.writeFileSync(big, bigData);
    await withMount(image, [], (raw) => {
      withExt4(raw, () => {
        fs.rmSync(path.join(fsDir, 'd0'), { recursive: true });
        fs.rmSync(path.join(fsDir, 'd1'), { recursive: true });
        expect(run('fstrim', [fsDir]).code).toBe(0);
        expect(run('cp', ['-a', tree2, path.join(fsDir, 'again')]).code).toBe(0);
        expect(run('cp', [big, fsDir]).code).toBe(0);
      });
    });
    const check = run('qemu-img', ['check', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    // 3. QEMU reads both back: the snapshot as it was, the active one as changed.
    const snapRaw = path.join(dir, 's1.raw');
    const activeRaw = path.join(dir, 'active.raw');
    qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=s1', image, snapRaw);
    qemuImg('convert', '-O', 'raw', image, activeRaw);
    for (const r of [snapRaw, activeRaw]) expect(run('e2fsck', ['-fn', r]).code, `e2fsck ${r}`).toBe(0);
    withExt4(snapRaw, () => expect(diffTrees(tree1, fsDir)).toBe(''), ['-r']);
    withExt4(
      activeRaw,
      () => {
        expect(fs.existsSync(path.join(fsDir, 'd0'))).toBe(false);
        expect(diffTrees(tree2, path.join(fsDir, 'again'))).toBe('');
        expect(run('cmp', [big, path.join(fsDir, 'big.bin')]).code).toBe(0);
        expect(run('cmp', [path.join(tree1, 'd7', 'e0', 'f7.txt'), path.join(fsDir, 'd7', 'e0', 'f7.txt')]).code).toBe(0);
      },
      ['-r'],
    );
  });
});
