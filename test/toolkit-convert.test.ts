import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCorpus, makeRaw, type CorpusImage } from './toolkit-corpus';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir } from './support/env';

let corpus: CorpusImage[] = [];
beforeAll(() => {
  corpus = buildCorpus('convert');
});
afterAll(removeScratch);

function convert(args: string[]): void {
  const r = qcow2fs(['convert', ...args]);
  expect({ args, code: r.code, err: r.stderr }).toEqual({ args, code: 0, err: '' });
}

function compareEqual(a: string, b: string, extra: string[] = []): boolean {
  return run('qemu-img', ['compare', ...extra, a, b]).code === 0;
}

function checkJson(img: string): { code: number; compressed: number; allocated: number } {
  const r = run('qemu-img', ['check', '--output', 'json', img]);
  const j = JSON.parse(r.stdout) as { 'compressed-clusters'?: number; 'allocated-clusters'?: number };
  return { code: r.code, compressed: j['compressed-clusters'] ?? 0, allocated: j['allocated-clusters'] ?? 0 };
}

describe('convert', () => {
  it('every corpus image to qcow2 and to raw: qemu-img compare equal, qemu-img check clean, sizes sensible', () => {
    need('qemu-img');
    const dir = scratchDir('conv-corpus');
    for (const img of corpus) {
      const q = path.join(dir, `${img.name}.qcow2`);
      const r = path.join(dir, `${img.name}.raw`);
      convert(['-O', 'qcow2', img.path, q]);
      convert(['-O', 'raw', img.path, r]);
      expect({ img: img.name, check: checkJson(q).code }).toEqual({ img: img.name, check: 0 });
      expect({ img: img.name, qcow2: compareEqual(img.path, q), raw: compareEqual(img.path, r, ['-F', 'raw']) }).toEqual({ img: img.name, qcow2: true, raw: true });
      // No larger than what qemu-img convert makes, give or take a few clusters of metadata.
      const ref = path.join(dir, `${img.name}.ref.qcow2`);
      qemuImg('convert', '-O', 'qcow2', img.path, ref);
      const cs = (JSON.parse(qemuImg('info', '--output', 'json', q)) as { 'cluster-size': number })['cluster-size'];
      expect({ img: img.name, ok: fs.statSync(q).size <= fs.statSync(ref).size + 4 * cs }).toEqual({ img: img.name, ok: true });
      expect(fs.statSync(r).size).toBe(JSON.parse(qemuImg('info', '--output', 'json', img.path))['virtual-size'] as number);
    }
  });

  it('raw -> qcow2 -> raw round trip; raw output is sparse', () => {
    need('qemu-img');
    const dir = scratchDir('conv-raw');
    const src = path.join(dir, 'src.raw');
    makeRaw(src, 24 * 1024 * 1024 + 4096, 99);
    const q = path.join(dir, 'a.qcow2');
    const back = path.join(dir, 'back.raw');
    convert(['-O', 'qcow2', src, q]);
    convert(['-f', 'qcow2', q, back]);
    expect(fs.readFileSync(back).equals(fs.readFileSync(src))).toBe(true);
    // Only a quarter of the source holds data: the copy keeps the holes.
    expect(fs.statSync(back).blocks * 512).toBeLessThan(fs.statSync(back).size / 2);
    expect(checkJson(q).allocated).toBe(Math.ceil(6 * 1024 * 1024 / 65536) + 1);
  });

  it('-c with compressible and incompressible clusters alternating: packed as tightly as by qemu-img, for every refcount width', () => {
    need('qemu-img');
    const dir = scratchDir('conv-alt');
    const src = path.join(dir, 'alt.raw');
    const parts: Buffer[] = [];
    // Hash output does not compress (xorshift bytes do, a little).
    const noise = (seed: number): Buffer => Buffer.concat(Array.from({ length: 2048 }, (_, k) => createHash('sha256').update(`${seed}/${k}`).digest()));
    for (let i = 0; i < 64; i++) parts.push(i % 2 === 0 ? noise(i) : Buffer.from(`cluster ${i} `.repeat(7000).slice(0, 65536)));
    fs.writeFileSync(src, Buffer.concat(parts));
    for (const opts of ['refcount_bits=16', 'refcount_bits=1', 'refcount_bits=2,cluster_size=4k', 'compression_type=zstd']) {
      const ours = path.join(dir, 'ours.qcow2');
      const ref = path.join(dir, 'ref.qcow2');
      convert(['-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, src, ours]);
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, src, ref);
      expect({ opts, check: checkJson(ours).code }).toEqual({ opts, check: 0 });
      expect({ opts, same: compareEqual(ours, src, ['-f', 'qcow2', '-F', 'raw']) }).toEqual({ opts, same: true });
      expect({ opts, compressed: checkJson(ours).compressed }).toEqual({ opts, compressed: checkJson(ref).compressed });
      expect(fs.statSync(ours).size, opts).toBeLessThanOrEqual(fs.statSync(ref).size * 1.1);
    }
  });

  it('compaction: an image full of zeroed clusters shrinks at least 5x', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('conv-compact');
    const src = path.join(dir, 'zeros.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '64M');
    // Clusters allocated and written with zeros (not zero flags), plus a little real data.
    qemuIo(src, ['write -P 0 0 60M', 'write -P 0x42 61M 1M']);
    const out = path.join(dir, 'compact.qcow2');
    convert(['-O', 'qcow2', src, out]);
    expect(compareEqual(src, out)).toBe(true);
    expect(checkJson(out).code).toBe(0);
    const before = fs.statSync(src).blocks;
    const after = fs.statSync(out).blocks;
    expect(before / after).toBeGreaterThanOrEqual(5);
  });

  for (const codec of ['zlib', 'zstd']) {
    it(`-c with ${codec}: QEMU reads it back, clusters that do not shrink stay uncompressed`, () => {
      need('qemu-img');
      const dir = scratchDir(`conv-${codec}`);
      const src = path.join(dir, 'mixed.raw');
      // Half compressible text, half random bytes.
      const text = Buffer.from('qcow2fs compresses this line well. '.repeat(1 << 17)).subarray(0, 4 << 20);
      const fd = fs.openSync(src, 'w');
      fs.writeSync(fd, text, 0, text.length, 0);
      fs.closeSync(fd);
      makeRaw(path.join(dir, 'rand.raw'), 4 << 20, 5, true);
      fs.appendFileSync(src, fs.readFileSync(path.join(dir, 'rand.raw')));
      for (const o of [`compression_type=${codec}`, `compression_type=${codec},cluster_size=4k`, `compression_type=${codec},refcount_bits=1`, `compression_type=${codec},extended_l2=on`]) {
        const out = path.join(dir, 'c.qcow2');
        convert(['-c', '-O', 'qcow2', '-o', o, src, out]);
        const c = checkJson(out);
        expect({ o, code: c.code }).toEqual({ o, code: 0 });
        expect(compareEqual(src, out)).toBe(true);
        // The text clusters are compressed, the random ones are not.
        expect(c.compressed).toBeGreaterThan(0);
        expect(c.compressed).toBeLessThan(c.allocated);
        // As small as qemu-img's own compressed copy (refcount_bits=1 forbids sharing clusters
        // between compressed clusters, so there both are about as large as the source).
        const ref = path.join(dir, 'ref.qcow2');
        qemuImg('convert', '-c', '-O', 'qcow2', '-o', o, src, ref);
        expect({ o, ok: fs.statSync(out).size <= fs.statSync(ref).size + 2 * 65536 }).toEqual({ o, ok: true });
        if (!o.includes('refcount_bits=1')) expect(fs.statSync(out).size).toBeLessThan(fs.statSync(src).size * 0.7);
        const info = JSON.parse(qemuImg('info', '--output', 'json', out)) as { 'format-specific': { data: { 'compression-type': string } } };
        expect(info['format-specific'].data['compression-type']).toBe(codec);
      }
    });
  }

  it('a backing chain is flattened; a snapshot can be copied', () => {
    need('qemu-img');
    const dir = scratchDir('conv-chain');
    const top = corpus.find((c) => c.backed)!;
    const flat = path.join(dir, 'flat.qcow2');
    convert(['-O', 'qcow2', top.path, flat]);
    expect(compareEqual(top.path, flat)).toBe(true);
    expect(JSON.parse(qemuImg('info', '--output', 'json', flat))['backing-filename']).toBeUndefined();

    const snaps = corpus.find((c) => c.name === 'snapshots.qcow2')!;
    for (const sel of ['first', 'snapshot.name=second', 'snapshot.id=1']) {
      const out = path.join(dir, 'snap.qcow2');
      const ref = path.join(dir, 'snap-ref.raw');
      convert(['-l', sel, '-O', 'qcow2', snaps.path, out]);
      const qsel = sel.includes('=') ? sel : `snapshot.name=${sel}`;
      qemuImg('convert', '-l', qsel, '-O', 'raw', snaps.path, ref);
      expect({ sel, same: compareEqual(ref, out, ['-f', 'raw']) }).toEqual({ sel, same: true });
    }
    // The active layer differs from the first snapshot, so the selection matters.
    expect(compareEqual(snaps.path, path.join(dir, 'snap.qcow2'))).toBe(false);
  });

  it('output options: v2, extended L2, cluster sizes', () => {
    need('qemu-img');
    const src = corpus.find((c) => c.name === 'v3-cs65536.qcow2')!;
    const dir = scratchDir('conv-opts');
    for (const o of ['compat=0.10', 'extended_l2=on', 'cluster_size=512', 'cluster_size=2M', 'refcount_bits=64,lazy_refcounts=on']) {
      const out = path.join(dir, 'o.qcow2');
      convert(['-O', 'qcow2', '-o', o, src.path, out]);
      expect({ o, code: checkJson(out).code, same: compareEqual(src.path, out) }).toEqual({ o, code: 0, same: true });
    }
  });

  it('-p shows progress; bad input gives one-line errors and leaves no file', () => {
    need('qemu-img');
    const dir = scratchDir('conv-bad');
    const src = corpus.find((c) => c.name === 'v2.qcow2')!;
    const p = qcow2fs(['convert', '-p', '-O', 'qcow2', src.path, path.join(dir, 'p.qcow2')]);
    expect(p.code).toBe(0);
    expect(p.stderr).toContain('(100.00/100%)');
    const cases: Array<[string[], number]> = [
      [['convert', '-c', src.path, path.join(dir, 'x.raw')], 2],
      [['convert', '-O', 'vmdk', src.path, path.join(dir, 'x.vmdk')], 2],
      [['convert', '-l', 'nosuch', '-O', 'qcow2', corpus.find((c) => c.name === 'snapshots.qcow2')!.path, path.join(dir, 'x.qcow2')], 2],
      [['convert', '-O', 'qcow2', '-o', 'cluster_size=3000', src.path, path.join(dir, 'x.qcow2')], 2],
      [['convert', path.join(dir, 'missing.qcow2'), path.join(dir, 'x.qcow2')], 2],
      [['convert', '-O', 'qcow2', src.path, src.path], 2],
    ];
    const before = fs.readFileSync(src.path);
    for (const [args, code] of cases) {
      const r = qcow2fs(args);
      expect({ args, code: r.code }).toEqual({ args, code });
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    expect(fs.readFileSync(src.path).equals(before)).toBe(true);
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('x.'))).toEqual([]);
  });

  it('outputs that are not regular files: raw onto a block device in place (zeros too); devices and FIFOs never removed', () => {
    need('qemu-img', 'qemu-io', 'losetup', '/dev/loop-control', 'root', 'mknod', 'mkfifo');
    const dir = scratchDir('conv-dev');
    const src = path.join(dir, 'src.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '8M');
    qemuIo(src, ['write -P 0x3c 1M 2M', 'write -z 4M 1M']);
    const want = path.join(dir, 'want.raw');
    qemuImg('convert', '-O', 'raw', src, want);
    const backing = path.join(dir, 'dev.img');
    fs.writeFileSync(backing, Buffer.alloc(12 * 1024 * 1024, 0xee)); // old bytes that must not show through
    const small = path.join(dir, 'small.img');
    fs.writeFileSync(small, Buffer.alloc(4 * 1024 * 1024, 0xee));
    const lo = run('losetup', ['-f', '--show', backing]).stdout.trim();
    const loSmall = run('losetup', ['-f', '--show', small]).stdout.trim();
    try {
      expect(lo).toMatch(/^\/dev\/loop\d+$/);
      convert(['-O', 'raw', src, lo]);
      const got = Buffer.alloc(8 * 1024 * 1024);
      const fd = fs.openSync(lo, 'r');
      fs.readSync(fd, got, 0, got.length, 0);
      fs.closeSync(fd);
      expect(got.equals(fs.readFileSync(want)), 'the device holds the disk').toBe(true);
      expect(fs.statSync(lo).isBlockDevice()).toBe(true);
      // info sees the device's size, as qemu-img does.
      const info = JSON.parse(qcow2fs(['info', '--output', 'json', lo]).stdout) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(12 * 1024 * 1024);
      // Refused, one line, the node left alone: qcow2 onto a device, a device too small, resize of a device.
      for (const args of [['convert', '-O', 'qcow2', src, lo], ['create', '-q', lo, '1M'], ['convert', '-O', 'raw', src, loSmall], ['resize', '-f', 'raw', lo, '64M']]) {
        const r = qcow2fs(args);
        expect({ args, code: r.code }).toEqual({ args, code: 2 });
        expect(r.stderr.trim().split('\n')).toHaveLength(1);
      }
      expect([lo, loSmall].map((d) => fs.statSync(d).isBlockDevice())).toEqual([true, true]);
    } finally {
      run('losetup', ['-d', lo]);
      run('losetup', ['-d', loSmall]);
    }
    const chr = path.join(dir, 'null');
    expect(run('mknod', ['-m', '666', chr, 'c', '1', '3']).code).toBe(0);
    const fifo = path.join(dir, 'fifo');
    expect(run('mkfifo', [fifo]).code).toBe(0);
    for (const args of [['convert', '-O', 'raw', src, chr], ['convert', '-O', 'qcow2', src, fifo], ['create', '-q', '-f', 'raw', chr, '1M'], ['create', '-q', fifo, '1M']]) {
      const r = qcow2fs(args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).toMatch(/is a (character device|FIFO); the output must be a regular file or a block device/);
    }
    expect(fs.statSync(chr).isCharacterDevice()).toBe(true);
    expect(fs.statSync(fifo).isFIFO()).toBe(true);
  });
});
