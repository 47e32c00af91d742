import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCorpus, type CorpusImage } from './toolkit-corpus';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir } from './support/env';
import { ofdLockBytes } from './support/daemons';

let corpus: CorpusImage[] = [];
beforeAll(() => {
  corpus = buildCorpus('check');
});
afterAll(removeScratch);

/** Byte-level access to an image file, for making damage by hand. */
class Bytes {
  private readonly fd: number;
  constructor(readonly file: string) {
    this.fd = fs.openSync(file, 'r+');
  }
  u64(at: number): bigint {
    const b = Buffer.alloc(8);
    fs.readSync(this.fd, b, 0, 8, at);
    return b.readBigUInt64BE(0);
  }
  setU64(at: number, v: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v, 0);
    fs.writeSync(this.fd, b, 0, 8, at);
  }
  setU32(at: number, v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v, 0);
    fs.writeSync(this.fd, b, 0, 4, at);
  }
  u16(at: number): number {
    const b = Buffer.alloc(2);
    fs.readSync(this.fd, b, 0, 2, at);
    return b.readUInt16BE(0);
  }
  setU16(at: number, v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v, 0);
    fs.writeSync(this.fd, b, 0, 2, at);
  }
  close(): void {
    fs.closeSync(this.fd);
  }
  get clusterSize(): number {
    const b = Buffer.alloc(4);
    fs.readSync(this.fd, b, 0, 4, 20);
    return 2 ** b.readUInt32BE(0);
  }
  get l1(): number {
    return Number(this.u64(40));
  }
  get reftable(): number {
    return Number(this.u64(48));
  }
  get refblock0(): number {
    return Number(this.u64(this.reftable));
  }
  /** Host offset of the active L2 table for L1 index 0. */
  get l2(): number {
    return Number(this.u64(this.l1) & OFFSET_MASK);
  }
  /** Address of the active L2 entry for guest cluster `i`. */
  l2e(i: number): number {
    return this.l2 + 8 * i;
  }
  /** Host cluster index of guest cluster `i`. */
  hostCluster(i: number): number {
    return Number(this.u64(this.l2e(i)) & OFFSET_MASK) / this.clusterSize;
  }
  /** Address of the (16-bit) refcount entry of host cluster `c`. */
  rc(c: number): number {
    return this.refblock0 + 2 * c;
  }
  get snapshotL1(): number {
    return Number(this.u64(Number(this.u64(64))));
  }
}

const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;

/**
 * The base image for damage: 8 MiB, 64 KiB clusters, refcount_bits 16. Guest clusters 0..3
 * written, snapshot "s", then guest cluster 0 rewritten (so clusters 1..3 are shared with the
 * snapshot, refcount 2) and guest clusters 16, 17 written (refcount 1).
 */
function baseImage(dir: string, name: string): string {
  const img = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
  qemuIo(img, ['write -P 1 0 256k']);
  qemuImg('snapshot', '-c', 's', img);
  qemuIo(img, ['write -P 2 0 64k', 'write -P 3 1M 128k']);
  return img;
}

interface Damage {
  name: string;
  /** Edit the image; `b` is open on it. */
  make(b: Bytes, img: string): void;
  /** Build a different base image (default: baseImage). */
  base?(dir: string, name: string): string;
  /** qemu-img check -r all leaves it clean (else only the counts are compared). */
  repairable: boolean;
  /** The repair rebuilds the refcount structure: image-end-offset may differ from QEMU's. */
  rebuilds?: boolean;
  /**
   * qemu-img 7.2 -r all fails here (its first read of the broken refcount block marks the image
   * corrupt and disables further writes): we repair, and the data must equal the undamaged image.
   */
  qemuRepairFails?: boolean;
}

const damages: Damage[] = [
  {
    name: 'leaked cluster (refcount on a cluster nothing uses)',
    make(b, img) {
      const cs = b.clusterSize;
      const n = fs.statSync(img).size / cs;
      fs.truncateSync(img, (n + 1) * cs);
      b.setU16(b.rc(n), 1);
    },
    repairable: true,
  },
  { name: 'refcount too high', make: (b) => b.setU16(b.rc(b.hostCluster(16)), 2), repairable: true },
  { name: 'refcount too low (2 -> 1, shared with a snapshot)', make: (b) => b.setU16(b.rc(b.hostCluster(1)), 1), repairable: true },
  { name: 'refcount zero for a used cluster', make: (b) => b.setU16(b.rc(b.hostCluster(17)), 0), repairable: true, rebuilds: true },
  {
    name: 'L2 entry pointing into the refcount table',
    make: (b) => b.setU64(b.l2e(16), COPIED | BigInt(b.reftable)),
    repairable: true,
  },
  { name: 'COPIED flag missing on an unshared cluster', make: (b) => b.setU64(b.l2e(16), b.u64(b.l2e(16)) & ~COPIED), repairable: true },
  { name: 'COPIED flag set on a shared cluster', make: (b) => b.setU64(b.l2e(2), b.u64(b.l2e(2)) | COPIED), repairable: true },
  { name: 'COPIED flag missing on the L1 entry', make: (b) => b.setU64(b.l1, b.u64(b.l1) & ~COPIED), repairable: true },
  {
    name: 'refcount block not cluster aligned',
    make: (b) => b.setU64(b.reftable, BigInt(b.refblock0 + 512)),
    repairable: true,
    rebuilds: true,
    qemuRepairFails: true,
  },
  {
    name: 'refcount table entry with reserved bits',
    make: (b) => b.setU64(b.reftable, BigInt(b.refblock0) | 1n),
    repairable: true,
    rebuilds: true,
    qemuRepairFails: true,
  },
  // QEMU opens it (the table reads as zeros there) and reports a corruption: so must check.
  { name: 'active L1 table past the end of the file', make: (b) => b.setU64(40, 10n << 30n), repairable: false },
  // A refcount table QEMU's open lets through (its check then reports every refcount as wrong).
  { name: 'refcount table past the end of the file', make: (b) => b.setU64(48, 1n << 30n), repairable: true, rebuilds: true },
  { name: 'refcount table at offset 0 (the header read as one)', make: (b) => b.setU64(48, 0n), repairable: true, rebuilds: true },
  { name: 'refcount table of no clusters', make: (b) => b.setU32(56, 0), repairable: true, rebuilds: true },
  // Offsets no file reaches (past 2^53, where pread stops): read as zeros, reported as QEMU does.
  { name: 'L1 entry pointing past 2^53', make: (b) => b.setU64(b.l1, 0x80ffffffffff0000n), repairable: false },
  { name: 'refcount table entry at 2^56 (the file cannot grow there: rebuilt)', make: (b) => b.setU64(b.reftable + 8, 1n << 56n), repairable: true, rebuilds: true },
  { name: 'L1 entry not cluster aligned', make: (b) => b.setU64(b.l1, b.u64(b.l1) + 512n), repairable: false },
  { name: 'two L2 entries to one cluster', make: (b) => b.setU64(b.l2e(17), b.u64(b.l2e(16))), repairable: true },
  { name: 'L2 entry past the end of the file', make: (b) => b.setU64(b.l2e(20), COPIED | (1000n << 16n)), repairable: false },
  { name: 'L2 entry with reserved bits', make: (b) => b.setU64(b.l2e(16), b.u64(b.l2e(16)) | 2n), repairable: false },
  { name: 'data cluster offset not aligned', make: (b) => b.setU64(b.l2e(16), b.u64(b.l2e(16)) + 512n), repairable: false },
  {
    name: 'preallocated zero cluster not aligned (repaired into a plain zero cluster)',
    make: (b) => b.setU64(b.l2e(17), (b.u64(b.l2e(17)) + 512n) | 1n),
    repairable: true,
  },
  { name: 'L2 entry pointing at the refcount block', make: (b) => b.setU64(b.l2e(16), COPIED | BigInt(b.refblock0)), repairable: true, rebuilds: true },
  {
    name: 'snapshot L1 table not aligned',
    make(b) {
      const entry = Number(b.u64(64));
      b.setU64(entry, b.u64(entry) + 512n);
    },
    repairable: false,
  },
  {
    name: 'compressed cluster with COPIED set',
    base(dir, name) {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
      qemuIo(img, ['write -c -P 7 0 64k', 'write -c -P 8 64k 64k']);
      return img;
    },
    make: (b) => b.setU64(b.l2e(1), b.u64(b.l2e(1)) | COPIED),
    repairable: false,
  },
  {
    name: 'extended L2: subcluster both allocated and zero',
    base(dir, name) {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', img, '4M');
      qemuIo(img, ['write -P 7 0 8k']);
      return img;
    },
    make(b) {
      // Extended entries are 16 bytes: set zero bit 0 where allocation bit 0 is set.
      const at = b.l2 + 8;
      b.setU64(at, b.u64(at) | (1n << 32n));
    },
    repairable: false,
  },
  {
    name: 'lazy refcounts: process killed after writing (dirty bit, refcounts never written)',
    base(dir, name) {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '8M');
      // qemu-io's "abort" ends the process without flushing refcounts or clearing the dirty bit.
      const r = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'abort', img]);
      expect(r.code).not.toBe(0);
      return img;
    },
    make: () => undefined,
    repairable: true,
    rebuilds: true,
  },
  {
    name: 'bitmap table entry with reserved bits (check cannot complete)',
    base(dir, name) {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
      qemuImg('bitmap', '--add', img, 'b0');
      qemuIo(img, ['write -P 3 0 1M']);
      return img;
    },
    make(b) {
      // Find the bitmap directory through the header extension, then its first table entry.
      const head = Buffer.alloc(4096);
      const fd = fs.openSync(b.file, 'r');
      fs.readSync(fd, head, 0, head.length, 0);
      fs.closeSync(fd);
      let off = head.readUInt32BE(100);
      let dir = 0;
      for (;;) {
        const type = head.readUInt32BE(off);
        const len = head.readUInt32BE(off + 4);
        if (type === 0) break;
        if (type === 0x23852875) dir = Number(head.readBigUInt64BE(off + 24));
        off += 8 + Math.ceil(len / 8) * 8;
      }
      const table = Number(b.u64(dir));
      b.setU64(table, b.u64(table) | 2n);
    },
    repairable: false,
  },
];

interface CheckRun {
  code: number;
  json: Record<string, unknown> | null;
  stdout: string;
  stderr: string[];
}

function ours(args: string[]): CheckRun {
  const r = qcow2fs(['check', ...args]);
  return { code: r.code, json: r.stdout.startsWith('{') ? (JSON.parse(r.stdout) as Record<string, unknown>) : null, stdout: r.stdout, stderr: lines(r.stderr) };
}
function theirs(args: string[]): CheckRun {
  const r = run('qemu-img', ['check', ...args]);
  return { code: r.code, json: r.stdout.startsWith('{') ? (JSON.parse(r.stdout) as Record<string, unknown>) : null, stdout: r.stdout, stderr: lines(r.stderr) };
}
/** Findings only: the final "Check failed" line names the tool. */
function lines(s: string): string[] {
  return s.split('\n').filter((l) => l && !/^(qemu-img|qcow2fs): /.test(l));
}
function withoutFilename(j: Record<string, unknown> | null): Record<string, unknown> | null {
  if (!j) return j;
  const { filename: _f, ...rest } = j;
  return rest;
}

describe('check agrees with qemu-img check', () => {
  it('clean corpus images: same JSON, same human text, exit 0', () => {
    need('qemu-img');
    for (const img of corpus) {
      if (img.name.endsWith('.raw')) continue;
      const a = ours(['--output', 'json', img.path]);
      const b = theirs(['--output', 'json', img.path]);
      expect({ img: img.name, code: a.code, json: a.json, err: a.stderr }).toEqual({ img: img.name, code: 0, json: b.json, err: b.stderr });
      const h = qcow2fs(['check', img.path]);
      expect({ img: img.name, out: h.stdout }).toEqual({ img: img.name, out: qemuImg('check', img.path) });
    }
  });

  it(`${damages.length} kinds of damage: same findings, counts and exit status; -r leaks and -r all repair like qemu-img`, () => {
    need('qemu-img', 'qemu-io');
    expect(damages.length).toBeGreaterThanOrEqual(10);
    const dir = scratchDir('check-damage');
    const mismatches: unknown[] = [];
    const same = (what: Record<string, unknown>, a: unknown, b: unknown): void => {
      if (JSON.stringify(a) !== JSON.stringify(b)) mismatches.push({ ...what, ours: a, qemu: b });
    };
    for (const [n, d] of damages.entries()) {
      const img = (d.base ?? baseImage)(dir, `d${n}.qcow2`);
      const pristine = path.join(dir, `d${n}-pristine.qcow2`);
      fs.copyFileSync(img, pristine);
      const b = new Bytes(img);
      try {
        d.make(b, img);
      } finally {
        b.close();
      }
      const a = ours(['--output', 'json', img]);
      const q = theirs(['--output', 'json', img]);
      same({ damage: d.name, what: 'check' }, { code: a.code, json: a.json, findings: a.stderr }, { code: q.code, json: q.json, findings: q.stderr });
      if (a.code === 0) mismatches.push({ damage: d.name, what: 'damage not detected' });
      same({ damage: d.name, what: 'human' }, qcow2fs(['check', img]).stdout, run('qemu-img', ['check', img]).stdout);

      for (const mode of ['leaks', 'all']) {
        const mine = path.join(dir, `d${n}-${mode}-ours.qcow2`);
        const ref = path.join(dir, `d${n}-${mode}-qemu.qcow2`);
        fs.copyFileSync(img, mine);
        fs.copyFileSync(img, ref);
        const ra = ours(['-r', mode, '--output', 'json', mine]);
        const rq = theirs(['-r', mode, '--output', 'json', ref]);
        const strip = (j: Record<string, unknown> | null): Record<string, unknown> | null => {
          const w = withoutFilename(j);
          if (w && d.rebuilds) delete w['image-end-offset'];
          return w;
        };
        const after = theirs(['--output', 'json', mine]);
        if (mode === 'all' && d.qemuRepairFails) {
          // QEMU 7.2 gives up (exit 1); we repair, and QEMU finds the result clean with the same data.
          if (rq.code !== 1) mismatches.push({ damage: d.name, what: 'qemu-img -r all was expected to fail', code: rq.code });
          same({ damage: d.name, what: 'our repair' }, { code: ra.code, after: after.code }, { code: 0, after: 0 });
          if (run('qemu-img', ['compare', '-q', mine, pristine]).code !== 0) mismatches.push({ damage: d.name, what: 'data changed by repair' });
          continue;
        }
        same({ damage: d.name, what: `-r ${mode}` }, { code: ra.code, json: strip(ra.json) }, { code: rq.code, json: strip(rq.json) });
        // What QEMU thinks of our repair equals what it thinks of its own.
        const afterRef = theirs(['--output', 'json', ref]);
        same({ damage: d.name, what: `after -r ${mode}` }, { code: after.code, json: strip(after.json) }, { code: afterRef.code, json: strip(afterRef.json) });
        if (mode === 'all' && d.repairable) {
          if (after.code !== 0) mismatches.push({ damage: d.name, what: 'not clean after -r all', code: after.code });
          // The guest data QEMU reads is the same after both repairs.
          if (run('qemu-img', ['compare', '-q', mine, ref]).code !== 0) mismatches.push({ damage: d.name, what: 'repairs differ in data' });
        }
      }
    }
    expect(mismatches).toEqual([]);
  });

  it('dirty and corrupt bits are cleared by a successful repair', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('check-bits');
    const img = baseImage(dir, 'bits.qcow2');
    const b = new Bytes(img);
    b.setU64(72, b.u64(72) | 3n);
    const n = fs.statSync(img).size / b.clusterSize;
    fs.truncateSync(img, (n + 1) * b.clusterSize);
    b.setU16(b.rc(n), 1);
    b.close();
    expect(ours([img]).code).toBe(3);
    const r = qcow2fs(['check', '-r', 'leaks', img]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('Double checking the fixed image now...');
    expect(r.stdout).toContain('    1 leaked clusters');
    const info = JSON.parse(qemuImg('info', '--output', 'json', img)) as { 'dirty-flag': boolean; 'format-specific': { data: { corrupt: boolean } } };
    expect(info['dirty-flag']).toBe(false);
    expect(info['format-specific'].data.corrupt).toBe(false);
    expect(theirs([img]).code).toBe(0);
  });

  it('--progress shows qemu-img style progress on stderr, ending at 100%', () => {
    const img = corpus.find((c) => c.name === 'snapshots.qcow2')!;
    const r = qcow2fs(['check', '--progress', img.path]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/\(100\.00\/100%\)\n$/);
    expect(qcow2fs(['check', img.path]).stderr).toBe('');
  });

  it('a check without -r never writes', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('check-ro');
    const img = baseImage(dir, 'ro.qcow2');
    const b = new Bytes(img);
    b.setU16(b.rc(b.hostCluster(1)), 1);
    b.close();
    const before = fs.readFileSync(img);
    fs.chmodSync(img, 0o444);
    expect(ours([img]).code).toBe(2);
    expect(fs.readFileSync(img).equals(before)).toBe(true);
  });

  it('bad input: raw (63), missing file, bad -r, not an image (1)', () => {
    const raw = corpus.find((c) => c.name === 'plain.raw')!;
    expect(qcow2fs(['check', raw.path]).code).toBe(63);
    expect(theirs([raw.path]).code).toBe(63);
    const cases = [['check', '/nonexistent/x.qcow2'], ['check', '-r', 'bogus', corpus[0]!.path], ['check', '-f', 'qcow2', raw.path]];
    for (const args of cases) {
      const r = qcow2fs(args);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});

describe('toolkit verbs respect QEMU image locks', () => {
  it('check, check -r, resize, commit, map, convert and info --backing-chain refuse an image a qemu-io process holds for writing; with -U the readers read it', async () => {
    need('qemu-img', 'qemu-io');
    const { spawn } = await import('node:child_process');
    const dir = scratchDir('check-lock');
    const base = path.join(dir, 'base.qcow2');
    const img = path.join(dir, 'img.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', img);
    // It sleeps far longer than the test runs (killed below): a loaded machine must not see it let go.
    const holder = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 600000', img], { stdio: ['ignore', 'ignore', 'pipe'] });
    let holderErr = '';
    holder.stderr.on('data', (d: Buffer) => (holderErr += d.toString()));
    try {
      // Wait until qemu-io holds its locks, looking at /proc/locks: a probe that opened the image
      // (qemu-img check) could itself make qemu-io's open fail, if it ran just then.
      const until = Date.now() + 60_000;
      while (ofdLockBytes(img).length === 0) {
        expect(holder.exitCode, `qemu-io exited: ${holderErr}`).toBeNull();
        expect(Date.now() < until, 'qemu-io took its image locks within 60 s').toBe(true);
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(run('qemu-img', ['check', img]).code, 'qemu-img check is refused too').not.toBe(0);
      const before = fs.readFileSync(img);
      const out = path.join(dir, 'out.raw');
      for (const args of [['check', img], ['check', '-r', 'all', img], ['resize', img, '8M'], ['commit', img], ['map', img], ['convert', img, out], ['info', '--backing-chain', img]]) {
        const r = qcow2fs(args);
        expect({ args, failed: r.code !== 0 }).toEqual({ args, failed: true });
        expect(r.stderr).toMatch(/in use/);
        expect(r.stderr.trim().split('\n')).toHaveLength(1);
      }
      expect(fs.readFileSync(img).equals(before)).toBe(true);
      expect(qcow2fs(['check', '-U', img]).code).toBe(0);
      // What the refusal suggests works wherever qemu-img takes -U.
      for (const args of [['map', '-U', img], ['map', '--force-share', '--output', 'json', img], ['convert', '-U', img, out], ['info', '-U', '--backing-chain', img]]) {
        const r = qcow2fs(args);
        expect({ args, code: r.code, err: r.stderr }).toEqual({ args, code: 0, err: '' });
      }
      expect(fs.readFileSync(img).equals(before)).toBe(true);
    } finally {
      holder.kill('SIGKILL');
    }
  });
});
