/**
 * The benchmark's images, built with qemu-img / qemu-io (QEMU is the oracle, and the peer).
 * Read-only images are built once per size profile and kept in the work directory (a stamp
 * file says they are complete); images that a workload writes are fresh copies for every run.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { commandLine, must } from './exec';
import { writeDataFile, writeTree } from './data';
import type { SizeProfile } from './profile';

export const TIB = 1024 ** 4;

export interface ImageSet {
  dir: string;
  /** The raw content of the data/zlib/zstd images (and the raw-file ceiling for them). */
  sourceRaw: string;
  data: string;
  zlib: string;
  zstd: string;
  /** 1 TiB virtual size, 3 internal snapshots. */
  bigSnap: string;
  treeTar: string;
  treeBytes: number;
  /** Commands that built the images, for docs/PERFORMANCE.md. */
  commands: string[];
}

const STAMP = 'ready-v1.json';

interface Stamp {
  treeBytes: number;
}

async function run(commands: string[], cmd: string, args: string[]): Promise<void> {
  commands.push(commandLine(cmd, args));
  await must(cmd, args);
}

/** Builds (or reuses) the images of a size profile under `workdir`. */
export async function prepareImages(workdir: string, sizes: SizeProfile, say: (msg: string) => void): Promise<ImageSet> {
  const dir = path.join(workdir, `images-${sizes.name}`);
  const set: ImageSet = {
    dir,
    sourceRaw: path.join(dir, 'source.raw'),
    data: path.join(dir, 'data.qcow2'),
    zlib: path.join(dir, 'zlib.qcow2'),
    zstd: path.join(dir, 'zstd.qcow2'),
    bigSnap: path.join(dir, 'big-1t-3snap.qcow2'),
    treeTar: path.join(dir, 'tree.tar'),
    treeBytes: 0,
    commands: [],
  };
  const c = set.commands;
  const mib = sizes.dataBytes / (1024 * 1024);
  c.push(`# source.raw: ${mib} MiB of deterministic, partly compressible data (src/bench/data.ts)`);
  const bigWrites = [
    ['write -P 0x11 0 64M', 'write -P 0x12 256G 16M', 'write -P 0x13 1023G 1M'],
    ['write -P 0x21 32M 64M', 'write -P 0x22 512G 16M'],
    ['write -P 0x31 0 8M', 'write -P 0x32 768G 16M'],
    ['write -P 0x41 4M 4M', 'write -P 0x42 100G 1M'],
  ];
  const stampFile = path.join(dir, STAMP);
  const steps: Array<[string, string[]]> = [
    ['qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', set.sourceRaw, set.data]],
    ['qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zlib', set.sourceRaw, set.zlib]],
    ['qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', set.sourceRaw, set.zstd]],
    ['qemu-img', ['create', '-q', '-f', 'qcow2', set.bigSnap, '1T']],
  ];
  bigWrites.forEach((writes, i) => {
    steps.push(['qemu-io', ['-f', 'qcow2', ...writes.flatMap((w) => ['-c', w]), set.bigSnap]]);
    if (i < 3) steps.push(['qemu-img', ['snapshot', '-c', `snap${i + 1}`, set.bigSnap]]);
  });
  const treeNote = (): string => `# tree.tar: ${sizes.treeFiles} files, ${set.treeBytes} bytes (src/bench/data.ts): tar -cf tree.tar -C tree .`;

  if (fs.existsSync(stampFile)) {
    for (const [cmd, args] of steps) c.push(commandLine(cmd, args));
    set.treeBytes = (JSON.parse(fs.readFileSync(stampFile, 'utf8')) as Stamp).treeBytes;
    c.push(treeNote());
    say(`reusing images in ${dir}`);
    return set;
  }

  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  say(`building images in ${dir} (${mib} MiB of data; zlib and zstd compression take a while)`);
  writeDataFile(set.sourceRaw, sizes.dataBytes);
  for (const [cmd, args] of steps) await run(c, cmd, args);
  const treeDir = path.join(dir, 'tree');
  set.treeBytes = writeTree(treeDir, sizes.treeBytes, sizes.treeFiles);
  await must('tar', ['-cf', set.treeTar, '-C', treeDir, '.']);
  fs.rmSync(treeDir, { recursive: true, force: true });
  c.push(treeNote());
  fs.writeFileSync(stampFile, JSON.stringify({ treeBytes: set.treeBytes } satisfies Stamp));
  return set;
}

/** A fresh, empty qcow2 image of `bytes` virtual size. */
export async function freshEmptyQcow2(file: string, bytes: number): Promise<void> {
  fs.rmSync(file, { force: true });
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(bytes)]);
}

/** A fresh, sparse raw file of `bytes` (the ceiling's "empty image"). */
export function freshEmptyRaw(file: string, bytes: number): void {
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes);
}

/** An identical, independent copy (a reflink where the filesystem can). */
export async function freshCopy(from: string, to: string): Promise<void> {
  fs.rmSync(to, { force: true });
  await must('cp', ['--reflink=auto', '--sparse=auto', from, to]);
}
