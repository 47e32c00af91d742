/**
 * Hostile and broken images (issue 2, "Bad input"). Each image is made by qemu-img/qemu-io and
 * then has bytes edited. Problems visible at open: `qcow2fs info` and `qcow2fs mount` exit
 * non-zero with exactly one stderr line naming the field and value, no stack trace, and the file
 * is unchanged (SHA-256 and mtime). Problems found only while reading (a bad L2 entry): the
 * mount works, that range fails with EIO, other ranges still read, the daemon lives on, and the
 * error is logged once.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  isMounted, need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir, seededBytes, sha256File, withMount,
} from './support/env';

const KiB = 1024;
const MiB = 1024 * KiB;

beforeAll(() => need('qemu-img', 'qemu-io', '/dev/fuse', 'fusermount', 'pgrep'));
afterAll(() => removeScratch());

// ---- byte editing -----------------------------------------------------------------------------

/** Header field offsets (qcow2 spec, "Header"). */
const H = {
  magic: 0, version: 4, backingFileOffset: 8, backingFileSize: 16, clusterBits: 20, size: 24, cryptMethod: 32,
  l1Size: 36, l1TableOffset: 40, refcountTableOffset: 48, refcountTableClusters: 56, nbSnapshots: 60,
  snapshotsOffset: 64, incompatibleFeatures: 72, refcountOrder: 96, headerLength: 100, compressionType: 104,
} as const;

function patch(file: string, edit: (b: Buffer) => Buffer | void): void {
  const buf = fs.readFileSync(file);
  fs.writeFileSync(file, edit(buf) ?? buf);
}
const u32 = (file: string, at: number, v: number): void => patch(file, (b) => void b.writeUInt32BE(v >>> 0, at));
const u64 = (file: string, at: number, v: bigint): void => patch(file, (b) => void b.writeBigUInt64BE(v, at));
const readU64 = (file: string, at: number): bigint => fs.readFileSync(file).readBigUInt64BE(at);
const readU32 = (file: string, at: number): number => fs.readFileSync(file).readUInt32BE(at);

/** A 4 MiB qcow2 (64 KiB clusters) with every cluster written, so L1/L2 tables exist. */
function baseImage(dir: string, name = 'img.qcow2', createOpts: string[] = []): string {
  const img = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', ...createOpts, img, String(4 * MiB));
  const src = path.join(dir, `${name}.src`);
  fs.writeFileSync(src, seededBytes(name.length * 7 + 1, 256 * KiB));
  qemuIo(img, [`write -q -s ${src} 0 ${4 * MiB}`]);
  return img;
}

function l2TableOffset(img: string, l1Index = 0): number {
  const l1 = Number(readU64(img, H.l1TableOffset));
  return Number(readU64(img, l1 + 8 * l1Index) & 0x00ffffff_fffffe00n);
}

// ---- assertions -------------------------------------------------------------------------------

function stderrLines(s: string): string[] {
  return s.split('\n').filter((l) => l.trim() !== '');
}

function daemonsOf(mp: string): string[] {
  const r = run('pgrep', ['-f', `daemon-of ${mp}`]);
  return stderrLines(r.stdout);
}

function expectOneLineError(r: { code: number; stderr: string }, pattern: RegExp, what: string): void {
  expect(r.code, `${what}: exit status`).not.toBe(0);
  const lines = stderrLines(r.stderr);
  expect(lines, `${what}: stderr ${JSON.stringify(r.stderr)}`).toHaveLength(1);
  expect(lines[0], what).toMatch(/^qcow2fs: /);
  expect(lines[0], what).toMatch(pattern);
  expect(r.stderr, what).not.toMatch(/^\s+at /m);
  expect(r.stderr, what).not.toMatch(/internal|TypeError|RangeError|ERR_/);
}

/** info and mount (read-write and read-only) refuse the image; no file of `files` changes. */
function expectRefused(image: string, pattern: RegExp, files: string[] = [image], args: string[] = [], inChain = false): void {
  const before = files.map((f) => ({ f, sha: sha256File(f), mtime: fs.statSync(f).mtimeMs }));
  if (inChain) {
    const top = qcow2fs(['info', ...args, image]);
    expect(top.stderr).toBe('');
    expect(top.code).toBe(0);
    expect(top.stdout).toMatch(/^backing file: /m);
    expectOneLineError(qcow2fs(['info', '--backing-chain', ...args, image]), pattern, 'info --backing-chain');
  } else {
    expectOneLineError(qcow2fs(['info', ...args, image]), pattern, 'info');
  }
  for (const ro of [[], ['--read-only']]) {
    const mp = scratchDir('mnt');
    const r = qcow2fs(['mount', ...args, ...ro, image, mp]);
    try {
      expectOneLineError(r, pattern, `mount ${ro.join(' ')}`);
      expect(isMounted(mp)).toBe(false);
      expect(daemonsOf(mp)).toEqual([]);
    } finally {
      if (isMounted(mp)) run('fusermount', ['-u', '-z', mp]);
    }
  }
  for (const b of before) {
    expect(sha256File(b.f), `${b.f} changed`).toBe(b.sha);
    expect(fs.statSync(b.f).mtimeMs, `${b.f} mtime changed`).toBe(b.mtime);
  }
}

// ---- images refused at open -------------------------------------------------------------------

interface OpenCase {
  name: string;
  /** Builds the hostile image in `dir`; returns its path and the files that must not change. */
  make(dir: string): string | { image: string; files: string[] };
  error: RegExp;
  /** Extra arguments for info and mount. */
  args?: string[];
  /**
   * The problem lies in the backing chain: plain `info` describes only the named file and
   * succeeds (as qemu-img info does); `info --backing-chain` and mount refuse it.
   */
  inChain?: boolean;
}

const openCases: OpenCase[] = [
  // Without a format, a file without the magic is a raw disk (as in QEMU); told it is qcow2, it is refused.
  { name: 'bad magic (--format qcow2)', args: ['--format', 'qcow2'], make: (d) => { const i = baseImage(d); u32(i, H.magic, 0x514649fc); return i; }, error: /bad magic 0x514649fc/ },
  {
    name: 'bad magic in a backing file declared qcow2',
    inChain: true,
    make: (d) => {
      const base = baseImage(d, 'base.qcow2');
      u32(base, H.magic, 0x12345678);
      const top = path.join(d, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'base.qcow2', '-F', 'qcow2', top, String(4 * MiB));
      return { image: top, files: [top, base] };
    },
    error: /base\.qcow2: bad magic 0x12345678/,
  },
  { name: 'version 1', make: (d) => { const i = baseImage(d); u32(i, H.version, 1); return i; }, error: /version 1\b/ },
  { name: 'version 4', make: (d) => { const i = baseImage(d); u32(i, H.version, 4); return i; }, error: /version 4\b/ },
  { name: 'cluster_bits 8', make: (d) => { const i = baseImage(d); u32(i, H.clusterBits, 8); return i; }, error: /cluster_bits 8\b/ },
  { name: 'cluster_bits 22', make: (d) => { const i = baseImage(d); u32(i, H.clusterBits, 22); return i; }, error: /cluster_bits 22\b/ },
  {
    name: 'L1 table offset beyond the file',
    make: (d) => { const i = baseImage(d); u64(i, H.l1TableOffset, 0x40000000n); return i; },
    error: /l1_table_offset 0x40000000.*past the end/,
  },
  {
    name: 'L1 table offset unaligned',
    make: (d) => { const i = baseImage(d); u64(i, H.l1TableOffset, readU64(i, H.l1TableOffset) + 512n); return i; },
    error: /l1_table_offset 0x[0-9a-f]+ is not aligned/,
  },
  { name: 'huge l1_size', make: (d) => { const i = baseImage(d); u32(i, H.l1Size, 0x7fffffff); return i; }, error: /l1_size 2147483647 is too large/ },
  {
    name: 'l1_size running past the end of the file',
    make: (d) => { const i = baseImage(d); u32(i, H.l1Size, 1_000_000); return i; },
    error: /l1_size 1000000.*past the end/,
  },
  {
    name: 'l1_size too small for the disk size',
    make: (d) => { const i = baseImage(d); u64(i, H.size, 1n << 40n); return i; },
    error: /l1_size 1 is too small for size 1099511627776/,
  },
  {
    name: 'L2 table offset unaligned (L1 entry)',
    make: (d) => { const i = baseImage(d); const l1 = Number(readU64(i, H.l1TableOffset)); u64(i, l1, readU64(i, l1) + 0x200n); return i; },
    error: /L1 entry 0: L2 table offset 0x[0-9a-f]+ is not aligned/,
  },
  {
    name: 'L2 table offset inside the refcount table',
    make: (d) => { const i = baseImage(d); const l1 = Number(readU64(i, H.l1TableOffset)); u64(i, l1, (1n << 63n) | readU64(i, H.refcountTableOffset)); return i; },
    error: /L1 entry 0: L2 table offset 0x[0-9a-f]+ points into the refcount table/,
  },
  {
    name: 'L2 table offset inside the L1 table',
    make: (d) => { const i = baseImage(d); const l1 = readU64(i, H.l1TableOffset); u64(i, Number(l1), (1n << 63n) | l1); return i; },
    error: /L2 table offset 0x[0-9a-f]+ points into the L1 table/,
  },
  {
    name: 'L2 table offset past the end of the file',
    make: (d) => { const i = baseImage(d); const l1 = Number(readU64(i, H.l1TableOffset)); u64(i, l1, (1n << 63n) | 0x7fff0000n); return i; },
    error: /L2 table offset 0x7fff0000 lies past the end/,
  },
  {
    name: 'refcount table offset unaligned',
    make: (d) => { const i = baseImage(d); u64(i, H.refcountTableOffset, readU64(i, H.refcountTableOffset) + 8n); return i; },
    error: /refcount_table_offset 0x[0-9a-f]+ is not aligned/,
  },
  {
    name: 'refcount table past the end of the file',
    make: (d) => { const i = baseImage(d); u32(i, H.refcountTableClusters, 100); return i; },
    error: /refcount_table_offset 0x[0-9a-f]+ \+ 100 clusters lies past the end/,
  },
  {
    name: 'L1 table overlapping the refcount table',
    make: (d) => { const i = baseImage(d); u64(i, H.l1TableOffset, readU64(i, H.refcountTableOffset)); return i; },
    error: /l1_table_offset 0x[0-9a-f]+ overlaps the refcount table/,
  },
  { name: 'size above 2^53', make: (d) => { const i = baseImage(d); u64(i, H.size, 1n << 60n); return i; }, error: /size 1152921504606846976 is too large/ },
  {
    name: 'truncated file: header cluster only',
    make: (d) => { const i = baseImage(d); fs.truncateSync(i, 64 * KiB); return i; },
    error: /past the end of the file/,
  },
  { name: 'truncated file: 100 bytes', make: (d) => { const i = baseImage(d); fs.truncateSync(i, 100); return i; }, error: /truncated.*100 bytes/ },
  { name: 'truncated file: 108 bytes', make: (d) => { const i = baseImage(d); fs.truncateSync(i, 108); return i; }, error: /truncated: 108 bytes .*header_length 112/ },
  { name: 'truncated file: 104 bytes', make: (d) => { const i = baseImage(d); fs.truncateSync(i, 104); return i; }, error: /truncated: 104 bytes .*header_length 112/ },
  { name: 'truncated file: 50 bytes', make: (d) => { const i = baseImage(d); fs.truncateSync(i, 50); return i; }, error: /truncated.*50 bytes/ },
  {
    name: 'unknown incompatible feature bit',
    make: (d) => { const i = baseImage(d); u64(i, H.incompatibleFeatures, readU64(i, H.incompatibleFeatures) | (1n << 9n)); return i; },
    error: /incompatible feature.*bit 9/,
  },
  {
    name: 'encryption: AES (crypt_method 1, made by qemu-img)',
    make: (d) => {
      const i = path.join(d, 'aes.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=123456', '-o', 'encrypt.format=aes,encrypt.key-secret=s0', i, '1M');
      return i;
    },
    error: /crypt_method 1\b.*not supported/,
  },
  { name: 'encryption: LUKS (crypt_method 2)', make: (d) => { const i = baseImage(d); u32(i, H.cryptMethod, 2); return i; }, error: /crypt_method 2\b.*not supported/ },
  { name: 'crypt_method 3', make: (d) => { const i = baseImage(d); u32(i, H.cryptMethod, 3); return i; }, error: /crypt_method 3 is invalid/ },
  {
    name: 'external data file (made by qemu-img)',
    make: (d) => {
      const i = path.join(d, 'ext.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(d, 'ext.data')}`, i, '1M');
      return { image: i, files: [i, path.join(d, 'ext.data')] };
    },
    error: /external data file.*not supported/,
  },
  { name: 'header_length too small', make: (d) => { const i = baseImage(d); u32(i, H.headerLength, 96); return i; }, error: /header_length 96 is too small/ },
  { name: 'header_length not a multiple of 8', make: (d) => { const i = baseImage(d); u32(i, H.headerLength, 109); return i; }, error: /header_length 109/ },
  { name: 'header_length larger than a cluster', make: (d) => { const i = baseImage(d); u32(i, H.headerLength, 0x20000); return i; }, error: /header_length 131072/ },
  { name: 'refcount_order 7', make: (d) => { const i = baseImage(d); u32(i, H.refcountOrder, 7); return i; }, error: /refcount_order 7/ },
  {
    name: 'unknown compression_type',
    make: (d) => {
      const i = baseImage(d, 'img.qcow2', ['-o', 'compression_type=zstd']);
      patch(i, (b) => void b.writeUInt8(9, H.compressionType));
      return i;
    },
    error: /compression_type 9/,
  },
  {
    name: 'extended L2 bit on a 4 KiB-cluster image',
    make: (d) => {
      const i = baseImage(d, 'img.qcow2', ['-o', 'cluster_size=4096']);
      u64(i, H.incompatibleFeatures, readU64(i, H.incompatibleFeatures) | (1n << 4n));
      return i;
    },
    error: /extended L2.*cluster_bits 12/,
  },
  {
    name: 'snapshot table past the end of the file',
    make: (d) => {
      const i = baseImage(d);
      qemuImg('snapshot', '-c', 'snap1', i);
      u64(i, H.snapshotsOffset, 0x10000000n);
      return i;
    },
    error: /snapshots_offset 0x10000000.*past the end/,
  },
  {
    name: 'nb_snapshots huge',
    make: (d) => { const i = baseImage(d); qemuImg('snapshot', '-c', 'snap1', i); u32(i, H.nbSnapshots, 0x7fffffff); return i; },
    error: /nb_snapshots 2147483647 is too large/,
  },
  {
    name: 'nb_snapshots larger than the table',
    make: (d) => { const i = baseImage(d); qemuImg('snapshot', '-c', 'snap1', i); u32(i, H.nbSnapshots, 60000); return i; },
    error: /snapshot table entry \d+ is truncated/,
  },
  // A snapshot's unaligned L1 table no longer stops the image from opening (QEMU opens it): see
  // "an image with one damaged snapshot entry" in snapshots-mount.test.ts.
  {
    name: 'huge backing file name length',
    make: (d) => {
      const i = path.join(d, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'base.qcow2', '-F', 'qcow2', i, '1M');
      u32(i, H.backingFileSize, 0xfffffff0);
      return i;
    },
    error: /backing_file_size 4294967280 is too large/,
  },
  {
    name: 'backing file name outside the first cluster',
    make: (d) => {
      const i = path.join(d, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'base.qcow2', '-F', 'qcow2', i, '1M');
      u64(i, H.backingFileOffset, 0xfffcn);
      return i;
    },
    error: /backing_file_offset 65532/,
  },
  {
    name: 'missing backing file',
    inChain: true,
    make: (d) => {
      const i = path.join(d, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'nowhere.qcow2', '-F', 'qcow2', i, '1M');
      return i;
    },
    error: /backing file .*nowhere\.qcow2: no such file/,
  },
  {
    name: 'backing file through a network protocol',
    inChain: true,
    make: (d) => {
      const i = path.join(d, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd://127.0.0.1:10809/x', '-F', 'raw', i, '1M');
      return i;
    },
    error: /protocol "nbd"/,
  },
  {
    name: 'backing loop A -> B -> A',
    inChain: true,
    make: (d) => {
      const a = path.join(d, 'a.qcow2');
      const b = path.join(d, 'b.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a, '1M');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'a.qcow2', '-F', 'qcow2', b, '1M');
      return { image: a, files: [a, b] };
    },
    error: /backing chain loops: a\.qcow2 -> b\.qcow2 -> a\.qcow2/,
  },
  {
    name: 'self-referencing backing file',
    inChain: true,
    make: (d) => {
      const a = path.join(d, 'self.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', a, '1M');
      return a;
    },
    error: /backing chain loops/,
  },
  {
    name: 'backing chain 10,000 files deep',
    inChain: true,
    make: (d) => {
      // One qemu-img template whose 12-byte backing name is rewritten for each link.
      const name = (n: number): string => `c${String(n).padStart(5, '0')}.qcow2`;
      const tpl = path.join(d, 'template.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-u', '-b', name(1), '-F', 'qcow2', tpl, '1M');
      const bytes = fs.readFileSync(tpl);
      const at = bytes.indexOf(Buffer.from(name(1)));
      expect(at).toBeGreaterThan(0);
      for (let n = 0; n < 10_000; n++) {
        bytes.write(name(n + 1), at, 'latin1');
        fs.writeFileSync(path.join(d, name(n)), bytes);
      }
      fs.writeFileSync(path.join(d, name(10_000)), Buffer.alloc(MiB)); // a raw base at the bottom
      return { image: path.join(d, name(0)), files: [path.join(d, name(0)), path.join(d, name(64)), path.join(d, name(9999))] };
    },
    error: /backing chain is deeper than \d+ files/,
  },
  {
    name: 'unsupported backing format',
    inChain: true,
    make: (d) => {
      const i = path.join(d, 'top.qcow2');
      fs.writeFileSync(path.join(d, 'base.vmdk'), Buffer.alloc(64 * KiB));
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'base.vmdk', '-F', 'vmdk', i, '1M');
      return i;
    },
    error: /format "vmdk" is not supported/,
  },
  {
    name: 'a VMDK file given as the image',
    make: (d) => {
      const i = path.join(d, 'disk.vmdk');
      qemuImg('create', '-q', '-f', 'vmdk', i, '1M');
      return i;
    },
    error: /vmdk images are not supported/,
  },
  {
    name: 'header extension running past the header cluster',
    make: (d) => {
      const i = baseImage(d);
      const hl = readU32(i, H.headerLength);
      u32(i, hl + 4, 0x00100000); // length of the first extension
      return i;
    },
    error: /header extension 0x[0-9a-f]+ length 1048576 runs past/,
  },
];

describe('hostile images refused at open', () => {
  it('has at least 20 distinct cases', () => {
    expect(new Set(openCases.map((c) => c.name)).size).toBeGreaterThanOrEqual(20);
  });
  for (const c of openCases) {
    it(`${c.name}: one-line error from info and mount, file unchanged`, () => {
      const dir = scratchDir('hostile');
      const made = c.make(dir);
      const { image, files } = typeof made === 'string' ? { image: made, files: [made] } : made;
      expectRefused(image, c.error, files, c.args, c.inChain);
    });
  }
});

// ---- corruption found while reading ---------------------------------------------------------

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    const n = fs.readSync(fd, buf, 0, length, offset);
    return buf.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

interface ReadCase {
  name: string;
  /** Edits the image (a pristine copy is kept as the reference); returns the bad guest offset. */
  corrupt(image: string): number;
  createOpts?: string[];
  /** Make the image with qemu-img convert -c (compressed clusters). */
  compressed?: boolean;
  log: RegExp;
}

const BAD_INDEX = 40; // guest cluster 40 = 2.5 MiB into the disk
const readCases: ReadCase[] = [
  {
    name: 'L2 entry pointing past the end of the file',
    corrupt: (i) => { u64(i, l2TableOffset(i) + 8 * BAD_INDEX, (1n << 63n) | 0x7ff00000n); return BAD_INDEX * 64 * KiB; },
    log: /data cluster offset 0x7ff00000 lies past the end/,
  },
  {
    name: 'L2 entry with an unaligned data cluster offset',
    corrupt: (i) => { const at = l2TableOffset(i) + 8 * BAD_INDEX; u64(i, at, readU64(i, at) + 0x200n); return BAD_INDEX * 64 * KiB; },
    log: /data cluster offset 0x[0-9a-f]+ is not aligned/,
  },
  {
    name: 'L2 entry pointing into the L1 table',
    corrupt: (i) => { u64(i, l2TableOffset(i) + 8 * BAD_INDEX, (1n << 63n) | readU64(i, H.l1TableOffset)); return BAD_INDEX * 64 * KiB; },
    log: /data cluster offset 0x[0-9a-f]+ points into the L1 table/,
  },
  {
    name: 'compressed descriptor pointing past the end of the file',
    compressed: true,
    corrupt: (i) => {
      // cluster_bits 16: host offset in bits 0..53, additional sectors in bits 54..61 (spec).
      const beyond = BigInt(fs.statSync(i).size + 10 * MiB);
      u64(i, l2TableOffset(i) + 8 * BAD_INDEX, (1n << 62n) | (3n << 54n) | beyond);
      return BAD_INDEX * 64 * KiB;
    },
    log: /compressed cluster .*(outside|past the end of) the file/,
  },
  {
    name: 'compressed cluster holding garbage',
    compressed: true,
    corrupt: (i) => {
      const entry = readU64(i, l2TableOffset(i) + 8 * BAD_INDEX);
      expect(entry >> 62n).toBe(1n); // really a compressed cluster
      const host = Number(entry & ((1n << 54n) - 1n));
      patch(i, (b) => void b.fill(0xa5, host, host + 200));
      return BAD_INDEX * 64 * KiB;
    },
    log: /compressed cluster at 0x[0-9a-f]+: zlib/,
  },
  {
    name: 'zero flag in a version 2 image (QEMU: EIO too)',
    createOpts: ['-o', 'compat=0.10'],
    corrupt: (i) => {
      const at = l2TableOffset(i) + 8 * BAD_INDEX;
      u64(i, at, readU64(i, at) | 1n);
      // The oracle: QEMU refuses to read it as well.
      const q = run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read ${BAD_INDEX * 64 * KiB} 4096`, i]);
      expect(q.stdout + q.stderr).toMatch(/Input\/output error/);
      return BAD_INDEX * 64 * KiB;
    },
    log: /zero flag .*version 2/,
  },
  {
    name: 'extended L2 subcluster marked allocated and zero',
    createOpts: ['-o', 'extended_l2=on'],
    corrupt: (i) => {
      const at = l2TableOffset(i) + 16 * BAD_INDEX;
      patch(i, (b) => { b.writeUInt32BE(0x00000001, at + 8); b.writeUInt32BE(0xffffffff, at + 12); });
      return BAD_INDEX * 64 * KiB;
    },
    log: /subcluster 0 is marked both allocated and zero/,
  },
];

describe('corruption found while reading', () => {
  for (const c of readCases) {
    it(`${c.name}: EIO for that range only, daemon alive, logged once`, async () => {
      const dir = scratchDir('rdcorrupt');
      let img: string;
      if (c.compressed) {
        const src = path.join(dir, 'src.raw');
        const chunk = Buffer.from('compressible text '.repeat(4000));
        const buf = Buffer.alloc(4 * MiB);
        for (let off = 0; off < buf.length; off += chunk.length) chunk.copy(buf, off);
        fs.writeFileSync(src, buf);
        img = path.join(dir, 'img.qcow2');
        qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', src, img);
      } else {
        img = baseImage(dir, 'img.qcow2', c.createOpts ?? []);
      }
      const reference = path.join(dir, 'reference.raw');
      qemuImg('convert', '-O', 'raw', img, reference);
      const bad = c.corrupt(img);
      const sha = sha256File(img);
      const mtime = fs.statSync(img).mtimeMs;
      const logFile = path.join(dir, 'daemon.log');
      const ref = fs.readFileSync(reference);
      await withMount(img, ['--read-only', '--log-file', logFile], (raw, mp) => {
        const pids = daemonsOf(mp);
        expect(pids).toHaveLength(1);
        // Ranges far from the bad cluster read as QEMU read them before the damage.
        expect(readAt(raw, 0, 128 * KiB).equals(ref.subarray(0, 128 * KiB))).toBe(true);
        for (let attempt = 0; attempt < 3; attempt++) {
          expect(() => readAt(raw, bad, 4 * KiB)).toThrow(expect.objectContaining({ code: 'EIO' }));
        }
        expect(daemonsOf(mp)).toEqual(pids);
        const tail = 4 * MiB - 256 * KiB;
        expect(readAt(raw, tail, 256 * KiB).equals(ref.subarray(tail))).toBe(true);
        expect(isMounted(mp)).toBe(true);
      });
      const log = fs.readFileSync(logFile, 'utf8');
      const hits = log.split('\n').filter((l) => c.log.test(l));
      expect(hits, log).toHaveLength(1);
      expect(sha256File(img)).toBe(sha);
      expect(fs.statSync(img).mtimeMs).toBe(mtime);
    });
  }
});
