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
