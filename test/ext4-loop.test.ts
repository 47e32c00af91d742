/**
 * A partitioned disk with ext4, as a qcow2 (plain and compressed), mounted through qcow2fs and
 * then through the kernel: `losetup -r -P`, `partx -a` when the partition node is missing,
 * `mount -o ro`. Every file must equal its source.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isMounted, need, qemuImg, removeScratch, run, scratchDir, seededBytes, sh, withMount } from './support/env';

const KiB = 1024;
const MiB = 1024 * KiB;
const PART_START_SECTORS = 2048;

beforeAll(() => need('root', 'qemu-img', 'sfdisk', 'mkfs.ext4', 'losetup', 'partx', 'mount', 'umount', '/dev/fuse', '/dev/loop-control', 'fusermount'));
afterAll(() => removeScratch());

/** A source tree: text, binary, empty and nested files. Returns relative paths of regular files. */
function makeSourceTree(root: string): string[] {
  const files: Record<string, Buffer> = {
    'README.txt': Buffer.from('hello from a qcow2 image\n'),
    'empty': Buffer.alloc(0),
    'bin/random.dat': seededBytes(1, 3 * MiB + 123),
    'bin/small.dat': seededBytes(2, 4095),
    'etc/conf.d/deep/config.ini': Buffer.from('[a]\nkey = value\n'.repeat(500)),
    'var/log/big.log': Buffer.from(Array.from({ length: 40000 }, (_, i) => `line ${i}\n`).join('')),
  };
  for (const [rel, content] of Object.entries(files)) {
    fs.mkdirSync(path.join(root, path.dirname(rel)), { recursive: true });
    fs.writeFileSync(path.join(root, rel), content);
  }
  fs.mkdirSync(path.join(root, 'empty-dir'));
  fs.symlinkSync('README.txt', path.join(root, 'link-to-readme'));
  return Object.keys(files);
}

/** A 64 MiB raw disk: DOS label, one Linux partition from 1 MiB to the end, ext4 built from `src`. */
function makeDisk(dir: string, src: string): string {
  const disk = path.join(dir, 'disk.raw');
  fs.writeFileSync(disk, Buffer.alloc(0));
  fs.truncateSync(disk, 64 * MiB);
  sh('sfdisk', ['-q', disk], { input: `label: dos\nstart=${PART_START_SECTORS}, type=83\n` });
  const partBytes = 64 * MiB - PART_START_SECTORS * 512;
  const fsImg = path.join(dir, 'part.img');
  fs.writeFileSync(fsImg, Buffer.alloc(0));
  fs.truncateSync(fsImg, partBytes);
  sh('mkfs.ext4', ['-q', '-F', '-L', 'qcow2fs', '-d', src, fsImg]);
  // Copy the filesystem into the partition.
  const from = fs.openSync(fsImg, 'r');
  const to = fs.openSync(disk, 'r+');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let off = 0; off < partBytes; off += buf.length) {
      const n = fs.readSync(from, buf, 0, buf.length, off);
      fs.writeSync(to, buf, 0, n, PART_START_SECTORS * 512 + off);
    }
  } finally {
    fs.closeSync(from);
    fs.closeSync(to);
  }
  fs.rmSync(fsImg);
  return disk;
}

/** Attaches `raw` read-only with partitions; makes sure the partition node exists. */
function attachLoop(raw: string): { dev: string; part: string } {
  const dev = sh('losetup', ['-r', '-P', '-f', '--show', raw]).trim();
  expect(dev).toMatch(/^\/dev\/loop\d+$/);
  const part = `${dev}p1`;
  if (!fs.existsSync(part)) run('partx', ['-a', dev]);
  for (let i = 0; i < 100 && !fs.existsSync(part); i++) sh('sleep', ['0.05']);
  return { dev, part };
}

function compareTrees(src: string, mounted: string, files: string[]): void {
  for (const rel of files) {
    const a = fs.readFileSync(path.join(src, rel));
    const b = fs.readFileSync(path.join(mounted, rel));
    expect(b.length, rel).toBe(a.length);
    expect(b.equals(a), rel).toBe(true);
  }
  expect(fs.readlinkSync(path.join(mounted, 'link-to-readme'))).toBe('README.txt');
  expect(fs.statSync(path.join(mounted, 'empty-dir')).isDirectory()).toBe(true);
  const list = (root: string): string[] =>
    (fs.readdirSync(root, { recursive: true }) as string[]).filter((n) => n !== 'lost+found' && !n.startsWith('lost+found/')).sort();
  expect(list(mounted)).toEqual(list(src));
}

for (const variant of ['plain', 'compressed'] as const) {
  describe(`ext4 on a partition, ${variant} qcow2`, () => {
    it('mounts through losetup -r -P and mount -o ro; files equal the source', async () => {
      const dir = scratchDir('ext4');
      const src = path.join(dir, 'src');
      fs.mkdirSync(src);
      const files = makeSourceTree(src);
      const disk = makeDisk(dir, src);
      const img = path.join(dir, `disk-${variant}.qcow2`);
      qemuImg('convert', ...(variant === 'compressed' ? ['-c'] : []), '-f', 'raw', '-O', 'qcow2', disk, img);
      fs.rmSync(disk);
      const fsMount = scratchDir('ext4mnt');
      await withMount(img, ['--read-only'], (raw) => {
        const sfdisk = sh('sfdisk', ['-d', raw]);
        expect(sfdisk).toMatch(/start=\s*2048,.*type=83/);
        const { dev, part } = attachLoop(raw);
        try {
          expect(fs.existsSync(part)).toBe(true);
          sh('mount', ['-o', 'ro', part, fsMount]);
          try {
            compareTrees(src, fsMount, files);
          } finally {
            sh('umount', [fsMount]);
          }
        } finally {
          run('partx', ['-d', dev]);
          sh('losetup', ['-d', dev]);
        }
        expect(isMounted(fsMount)).toBe(false);
      });
    });
  });
}
