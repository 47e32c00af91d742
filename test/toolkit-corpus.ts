/**
 * The toolkit's test corpus: small images built by qemu-img and qemu-io at test time, covering
 * the format's variants (v2/v3, every cluster size class, compression with zlib and zstd,
 * extended L2, snapshots, backing chains, bitmaps, refcount widths, zero clusters).
 */
import * as path from 'node:path';
import { need, qemuImg, qemuIo, scratchDir, seededBytes } from './support/env';
import * as fs from 'node:fs';

export interface CorpusImage {
  name: string;
  /** Path of the top image. */
  path: string;
  /** Has a backing file. */
  backed: boolean;
}

/** Typical writes: data at the start, a run in the middle, zeroed and discarded ranges. */
function writeMix(img: string, clusterSize: number, sizeBytes: number): void {
  const cs = clusterSize;
  const cmds = [
    `write -P 0x11 0 ${cs * 3}`,
    `write -P 0x22 ${Math.floor(sizeBytes / 2)} ${cs * 2}`,
    `write -z ${cs * 5} ${cs * 2}`,
    `write -P 0x33 ${cs * 9} ${cs}`,
    `discard ${cs * 9} ${cs}`,
    `write -P 0x44 ${sizeBytes - cs} ${cs}`,
  ];
  qemuIo(img, cmds);
}

/** A raw file with pseudo-random data and holes (every fourth 256 KiB written), or dense. */
export function makeRaw(file: string, sizeBytes: number, seed: number, dense = false): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, sizeBytes);
    const chunk = 256 * 1024;
    for (let off = 0; off < sizeBytes; off += (dense ? 1 : 4) * chunk) {
      fs.writeSync(fd, seededBytes(seed + off, Math.min(chunk, sizeBytes - off)), 0, Math.min(chunk, sizeBytes - off), off);
    }
  } finally {
    fs.closeSync(fd);
  }
}

export function buildCorpus(tag = 'corpus'): CorpusImage[] {
  need('qemu-img', 'qemu-io');
  const dir = scratchDir(tag);
  const out: CorpusImage[] = [];
  const add = (name: string, backed = false): string => {
    const p = path.join(dir, name);
    out.push({ name, path: p, backed });
    return p;
  };
  const M = 1024 * 1024;

  let p = add('v2.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p, '16M');
  writeMix(p, 65536, 16 * M);

  for (const cs of [512, 4096, 65536, 2 * M]) {
    p = add(`v3-cs${cs}.qcow2`);
    const size = cs === 512 ? 3 * M + 1536 : cs === 2 * M ? 64 * M : 20 * M + 4096;
    qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, p, String(size));
    writeMix(p, cs, size);
  }

  const raw = path.join(dir, 'src.raw');
  makeRaw(raw, 8 * M, 7);
  p = add('zlib.qcow2');
  qemuImg('convert', '-c', '-O', 'qcow2', raw, p);
  qemuIo(p, ['write -P 0x55 1M 64k']);
  p = add('zstd.qcow2');
  qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, p);

  p = add('extl2.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', p, '8M');
  qemuIo(p, ['write -P 0x66 0 2k', 'write -P 0x67 6k 4k', 'write -z 64k 8k', 'write -P 0x68 1M 64k', 'write -z 1M 2k', 'discard 1058k 2k']);

  p = add('snapshots.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', p, '8M');
  qemuIo(p, ['write -P 1 0 192k']);
  qemuImg('snapshot', '-c', 'first', p);
  qemuIo(p, ['write -P 2 64k 64k', 'write -P 3 2M 64k']);
  qemuImg('snapshot', '-c', 'second', p);
  qemuIo(p, ['write -P 4 0 64k', 'discard 2M 64k']);

  // A chain: raw base <- qcow2 mid <- qcow2 top, named relatively.
  const base = path.join(dir, 'base.raw');
  makeRaw(base, 4 * M, 11, true);
  const mid = path.join(dir, 'mid.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid);
  qemuIo(mid, ['write -P 0x77 1M 128k', 'write -z 0 64k']);
  p = add('top.qcow2', true);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p, '6M');
  qemuIo(p, ['write -P 0x88 1088k 64k', 'write -P 0x89 5M 64k']);

  p = add('bitmaps.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', p, '32M');
  qemuImg('bitmap', '--add', p, 'b0');
  qemuImg('bitmap', '--add', '-g', '128k', '--disable', p, 'b1');
  qemuIo(p, ['write -P 9 0 1M']);
  qemuImg('bitmap', '--add', '-g', '4k', p, 'fine');

  p = add('rc1.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', p, '4M');
  writeMix(p, 65536, 4 * M);
  p = add('rc64-lazy.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64,lazy_refcounts=on', p, '4M');
  writeMix(p, 65536, 4 * M);
  qemuImg('snapshot', '-c', 's', p);

  p = add('prealloc-metadata.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', p, '4M');
  qemuIo(p, ['write -P 5 64k 64k']);

  p = add('empty.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', p, '1G');

  p = add('plain.raw');
  makeRaw(p, 2 * M, 3, true);
  return out;
}
