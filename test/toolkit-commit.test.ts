import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeRaw } from './toolkit-corpus';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir, sha256File } from './support/env';

afterAll(removeScratch);

interface MapEntry {
  depth: number;
  present: boolean;
}

/** What QEMU reads from an image, as a file hash. */
function shows(img: string, dir: string): string {
  const out = path.join(dir, `shows-${path.basename(img)}.raw`);
  qemuImg('convert', '-O', 'raw', img, out);
  const h = sha256File(out);
  fs.rmSync(out);
  return h;
}

interface Case {
  name: string;
  /** Builds base + overlay in dir; returns the overlay path and the base path. */
  build(dir: string): { overlay: string; base: string };
}

const cases: Case[] = [
  {
    name: 'qcow2 base, overlay with data, zeros and a discard',
    build(dir) {
      const base = path.join(dir, 'base.qcow2');
      const overlay = path.join(dir, 'ov.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
      qemuIo(base, ['write -P 1 0 16M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overlay);
      qemuIo(overlay, ['write -P 2 1M 1M', 'write -z 4M 192k', 'write -P 3 15M 1M', 'write -P 4 8M 4k']);
      return { overlay, base };
    },
  },
  {
    name: 'raw base, larger overlay (the base grows)',
    build(dir) {
      const base = path.join(dir, 'base.raw');
      const overlay = path.join(dir, 'ov.qcow2');
      makeRaw(base, 4 * 1024 * 1024, 21, true);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay, '6M');
      qemuIo(overlay, ['write -P 5 0 64k', 'write -P 6 5M 512k']);
      return { overlay, base };
    },
  },
  {
    name: 'extended L2 overlay with partial subclusters, zstd-compressed base',
    build(dir) {
      const base = path.join(dir, 'base.qcow2');
      const overlay = path.join(dir, 'ov.qcow2');
      const src = path.join(dir, 'src.raw');
      makeRaw(src, 8 * 1024 * 1024, 5, true);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', src, base);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2', overlay);
      qemuIo(overlay, ['write -P 7 2k 2k', 'write -P 8 70k 10k', 'write -z 3M 4k', 'write -P 9 7M 1M']);
      return { overlay, base };
    },
  },
  {
    name: 'overlay with an internal snapshot (kept after emptying)',
    build(dir) {
      const base = path.join(dir, 'base.qcow2');
      const overlay = path.join(dir, 'ov.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
      qemuIo(base, ['write -P 1 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overlay);
      qemuIo(overlay, ['write -P 2 0 1M']);
      qemuImg('snapshot', '-c', 'snap', overlay);
      qemuIo(overlay, ['write -P 3 512k 1M']);
      return { overlay, base };
    },
  },
];

describe('commit', () => {
  for (const c of cases) {
    it(`${c.name}: the backing file receives what the overlay showed; the overlay is emptied; same as qemu-img commit`, () => {
      need('qemu-img', 'qemu-io');
      const dir = scratchDir('commit');
      const qdir = path.join(dir, 'qemu');
      fs.mkdirSync(qdir);
      const { overlay, base } = c.build(dir);
      // The same pair for qemu-img commit, in another directory (relative backing names).
      for (const f of fs.readdirSync(dir)) if (f !== 'qemu') fs.copyFileSync(path.join(dir, f), path.join(qdir, f));
      const before = shows(overlay, dir);
      const hasSnapshot = c.name.includes('snapshot');
      const r = qcow2fs(['commit', overlay]);
      expect({ code: r.code, err: r.stderr, out: r.stdout }).toEqual({ code: 0, err: '', out: 'Image committed.\n' });
      qemuImg('commit', '-q', path.join(qdir, path.basename(overlay)));

      expect(shows(base, dir)).toBe(before);
      expect(shows(overlay, dir)).toBe(before);
      for (const img of [base, overlay]) if (img.endsWith('.qcow2')) expect({ img, check: run('qemu-img', ['check', img]).code }).toEqual({ img, check: 0 });
      // Nothing left in the overlay's active layer.
      const map = JSON.parse(qemuImg('map', '--output', 'json', overlay)) as MapEntry[];
      expect(map.filter((e) => e.depth === 0 && e.present)).toEqual([]);
      // The backing file reads as qemu-img commit's.
      const qbase = path.join(qdir, path.basename(base));
      const fmt = base.endsWith('.raw') ? ['-f', 'raw', '-F', 'raw'] : [];
      expect(run('qemu-img', ['compare', '-q', ...fmt, base, qbase]).code).toBe(0);
      expect(fs.statSync(overlay).size).toBeLessThanOrEqual(fs.statSync(path.join(qdir, path.basename(overlay))).size + 4 * 65536);
      if (hasSnapshot) {
        // The snapshot keeps its own clusters; where it has none it reads the (changed) backing
        // file, exactly as after qemu-img commit.
        const a = path.join(dir, 'snap-ours.raw');
        const b = path.join(dir, 'snap-qemu.raw');
        qemuImg('convert', '-l', 'snapshot.name=snap', '-O', 'raw', overlay, a);
        qemuImg('convert', '-l', 'snapshot.name=snap', '-O', 'raw', path.join(qdir, path.basename(overlay)), b);
        expect(sha256File(a)).toBe(sha256File(b));
        const own = fs.readFileSync(a).subarray(0, 1024 * 1024);
        expect(own.equals(Buffer.alloc(own.length, 2))).toBe(true);
      }
    });
  }

  it("zeros of the overlay become zeros of the base without data clusters (the same data/zero map as qemu-img's)", () => {
    need('qemu-img', 'qemu-io');
    const maps: string[] = [];
    for (const who of ['qemu', 'ours']) {
      const dir = scratchDir(`commitz-${who}`);
      const base = path.join(dir, 'base.qcow2');
      const top = path.join(dir, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, String(8 * 1024 * 1024));
      qemuIo(base, ['write -P 0x5a 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -z 4M 1M', 'write -z -u 6M 64k', 'write -P 0x33 7M 6k']);
      if (who === 'qemu') qemuImg('commit', '-q', top);
      else expect(qcow2fs(['commit', top]).code).toBe(0);
      expect(run('qemu-img', ['check', base]).code).toBe(0);
      const json = JSON.parse(run('qemu-img', ['map', '--output', 'json', base]).stdout) as Array<{ start: number; length: number; zero: boolean; data: boolean }>;
      // Where the data and the zeros are (QEMU writes zero clusters where we may leave the
      // clusters unallocated: both read as zeros and hold no data).
      const merged: string[] = [];
      for (const e of json) {
        const key = `${e.zero}/${e.data}`;
        const last = merged[merged.length - 1];
        if (last?.endsWith(key)) merged[merged.length - 1] = `${last.split(' ')[0]}-${e.start + e.length} ${key}`.replace(/^(\d+)-\d+-/, '$1-');
        else merged.push(`${e.start}-${e.start + e.length} ${key}`);
      }
      maps.push(merged.join('\n'));
    }
    expect(maps[1]).toBe(maps[0]);
  });

  it('-d keeps the overlay; a three-file chain commits into the middle file only', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('commit-chain');
    const base = path.join(dir, 'base.qcow2');
    const mid = path.join(dir, 'mid.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuIo(base, ['write -P 1 0 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid);
    qemuIo(mid, ['write -P 2 1M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 3 1536k 1M']);
    const baseBefore = sha256File(base);
    const topBefore = shows(top, dir);
    const topMap = qemuImg('map', '--output', 'json', top);
    expect(qcow2fs(['commit', '-q', '-d', top]).code).toBe(0);
    expect(sha256File(base)).toBe(baseBefore);
    expect(shows(mid, dir)).toBe(topBefore);
    expect(qemuImg('map', '--output', 'json', top)).toBe(topMap);
    expect(run('qemu-img', ['check', mid]).code).toBe(0);
  });

  it('bad input: no backing file, missing file, raw overlay; one-line errors, nothing changed', () => {
    need('qemu-img');
    const dir = scratchDir('commit-bad');
    const lone = path.join(dir, 'lone.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', lone, '1M');
    const raw = path.join(dir, 'r.raw');
    fs.writeFileSync(raw, Buffer.alloc(65536));
    for (const f of [lone, raw, path.join(dir, 'missing.qcow2')]) {
      const before = fs.existsSync(f) ? sha256File(f) : null;
      const r = qcow2fs(['commit', f]);
      expect({ f, failed: r.code !== 0 }).toEqual({ f, failed: true });
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      if (before) expect(sha256File(f)).toBe(before);
    }
  });
});
