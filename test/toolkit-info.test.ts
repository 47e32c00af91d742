import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCorpus, type CorpusImage } from './toolkit-corpus';
import { need, qcow2fs, qemuImg, removeScratch, run, scratchDir, withMount } from './support/env';

let corpus: CorpusImage[] = [];
beforeAll(() => {
  corpus = buildCorpus('info');
});
afterAll(removeScratch);

/** Runs both tools from the image's directory with the same relative name, as a user would. */
function both(args: string[], cwd: string): { ours: string; theirs: string } {
  const ours = qcow2fs(['info', ...args], { cwd });
  expect(ours.stderr).toBe('');
  expect(ours.code).toBe(0);
  return { ours: ours.stdout, theirs: qemuImg('info', ...args) };
}

describe('info agrees with qemu-img info', () => {
  it('JSON: every field equal, and the same text, over the whole corpus', () => {
    need('qemu-img');
    expect(corpus.length).toBeGreaterThanOrEqual(15);
    for (const img of corpus) {
      const cwd = path.dirname(img.path);
      const name = path.basename(img.path);
      const ours = qcow2fs(['info', '--output', 'json', name], { cwd });
      expect({ img: img.name, code: ours.code, err: ours.stderr }).toEqual({ img: img.name, code: 0, err: '' });
      const theirs = run('qemu-img', ['info', '--output', 'json', name], { cwd });
      expect(theirs.code).toBe(0);
      expect({ img: img.name, json: JSON.parse(ours.stdout) as unknown }).toEqual({ img: img.name, json: JSON.parse(theirs.stdout) as unknown });
      expect({ img: img.name, text: ours.stdout }).toEqual({ img: img.name, text: theirs.stdout });
    }
  });

  it('human output matches line by line over the corpus', () => {
    need('qemu-img');
    for (const img of corpus) {
      const cwd = path.dirname(img.path);
      const name = path.basename(img.path);
      const ours = qcow2fs(['info', name], { cwd });
      const theirs = run('qemu-img', ['info', name], { cwd });
      expect({ img: img.name, text: ours.stdout }).toEqual({ img: img.name, text: theirs.stdout });
    }
  });

  it('--backing-chain, JSON and human, with relative names from another directory', () => {
    need('qemu-img');
    const top = corpus.find((c) => c.backed)!;
    const parent = path.dirname(path.dirname(top.path));
    const rel = path.join(path.basename(path.dirname(top.path)), path.basename(top.path));
    for (const out of ['json', 'human']) {
      const ours = qcow2fs(['info', '--backing-chain', '--output', out, rel], { cwd: parent });
      const theirs = run('qemu-img', ['info', '--backing-chain', '--output', out, rel], { cwd: parent });
      expect(ours.code).toBe(0);
      expect(ours.stdout).toBe(theirs.stdout);
    }
    const chain = JSON.parse(qcow2fs(['info', '--backing-chain', '--output', 'json', top.path]).stdout) as Array<{ format: string; filename: string }>;
    expect(chain.map((c) => c.format)).toEqual(['qcow2', 'qcow2', 'raw']);
    expect(chain[2]!.filename).toBe(path.join(path.dirname(top.path), 'base.raw'));
  });

  it('bitmap flags (in-use), dirty and corrupt bits edited into the file agree', () => {
    need('qemu-img');
    const src = corpus.find((c) => c.name === 'bitmaps.qcow2')!;
    const dir = scratchDir('info-edit');
    const img = path.join(dir, 'edited.qcow2');
    fs.copyFileSync(src.path, img);
    const buf = fs.readFileSync(img);
    // Find the bitmaps extension and set in_use on its first directory entry.
    let off = buf.readUInt32BE(100);
    let dirOffset = -1;
    while (off + 8 <= 65536) {
      const type = buf.readUInt32BE(off);
      const len = buf.readUInt32BE(off + 4);
      if (type === 0) break;
      if (type === 0x23852875) dirOffset = Number(buf.readBigUInt64BE(off + 8 + 16));
      off += 8 + Math.ceil(len / 8) * 8;
    }
    expect(dirOffset).toBeGreaterThan(0);
    const fd = fs.openSync(img, 'r+');
    try {
      fs.writeSync(fd, Buffer.from([0, 0, 0, 3]), 0, 4, dirOffset + 12); // in_use | auto
      fs.writeSync(fd, Buffer.from([0x03]), 0, 1, 79); // dirty | corrupt
    } finally {
      fs.closeSync(fd);
    }
    const { ours, theirs } = both(['--output', 'json', img], dir);
    expect(ours).toBe(theirs);
    const j = JSON.parse(ours) as { 'dirty-flag': boolean; 'format-specific': { data: { corrupt: boolean; bitmaps: Array<{ flags: string[] }> } } };
    expect(j['dirty-flag']).toBe(true);
    expect(j['format-specific'].data.corrupt).toBe(true);
    expect(j['format-specific'].data.bitmaps[0]!.flags).toEqual(['in-use', 'auto']);
    const h = both([img], dir);
    expect(h.ours).toBe(h.theirs);
    expect(h.ours).toContain('cleanly shut down: no');
  });

  it('without --backing-chain a missing backing file does not matter; with it, a one-line error', () => {
    need('qemu-img');
    const dir = scratchDir('info-missing');
    const base = path.join(dir, 'gone.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', top);
    fs.rmSync(base);
    const ok = qcow2fs(['info', '--output', 'json', top]);
    expect(ok.code).toBe(0);
    expect(ok.stdout).toBe(qemuImg('info', '--output', 'json', top));
    const bad = qcow2fs(['info', '--backing-chain', top]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toContain('gone.qcow2');
  });

  it('bad input: one-line errors and non-zero exits', () => {
    const dir = scratchDir('info-bad');
    const junk = path.join(dir, 'junk.qcow2');
    fs.writeFileSync(junk, Buffer.concat([Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 9]), Buffer.alloc(600)]));
    const cases: Array<[string[], number]> = [
      [['info', path.join(dir, 'nope.qcow2')], 2],
      [['info', dir], 2],
      [['info', junk], 1],
      [['info', '--output', 'xml', junk], 2],
      [['info', '-f', 'qcow2', path.join(__dirname, 'tsconfig.json')], 2],
    ];
    for (const [args, code] of cases) {
      const r = qcow2fs(args);
      expect({ args, code: r.code }).toEqual({ args, code });
      expect(r.stderr.trim().split('\n').length).toBeLessThanOrEqual(2);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
  });

  it('raw images: forced and probed', () => {
    need('qemu-img');
    const raw = corpus.find((c) => c.name === 'plain.raw')!;
    const { ours, theirs } = both(['--output', 'json', '-f', 'raw', raw.path], path.dirname(raw.path));
    expect(ours).toBe(theirs);
  });
});

describe('info: sizes printed as qemu-img prints them', () => {
  it('virtual size and disk size lines agree for round, odd and just-below-a-unit sizes', () => {
    need('qemu-img');
    const dir = scratchDir('infosizes');
    for (const size of ['512', '1536', '100M', '110M', '1000M', '1023M', '100G', '1G', '10487296', '123457024']) {
      const img = path.join(dir, `s${size}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', img, size);
      const pick = (out: string): string[] => out.split('\n').filter((l) => /^(virtual size|disk size):/.test(l));
      const theirs = pick(run('qemu-img', ['info', img]).stdout);
      const ours = pick(qcow2fs(['info', img]).stdout);
      expect(theirs).toHaveLength(2);
      expect(ours, size).toEqual(theirs);
    }
  });
});

describe('an image of size 0 (qemu-img creates them)', () => {
  it('create, info, map and check agree with qemu-img, and it mounts as an empty raw file', async () => {
    need('qemu-img', '/dev/fuse');
    const dir = scratchDir('size0');
    const theirs = path.join(dir, 'q.qcow2');
    const ours = path.join(dir, 'o.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', theirs, '0');
    const c = qcow2fs(['create', '-f', 'qcow2', ours, '0']);
    expect(c.code, c.stderr).toBe(0);
    expect(run('qemu-img', ['check', ours]).code).toBe(0);
    expect(run('qemu-img', ['compare', theirs, ours]).code).toBe(0);
    for (const args of [['info', '--output', 'json'], ['map', '--output', 'json'], ['check', '--output', 'json'], ['map', '--start-offset', '0']]) {
      const q = run('qemu-img', [...args, theirs]);
      const o = qcow2fs([...args, theirs]);
      expect(o.code, `${args.join(' ')}: ${o.stderr}`).toBe(q.code);
      expect(o.stdout, args.join(' ')).toBe(q.stdout);
    }
    await withMount(theirs, [], (raw) => {
      expect(fs.statSync(raw).size).toBe(0);
      expect(fs.readFileSync(raw).length).toBe(0);
    });
    expect(run('qemu-img', ['check', theirs]).code).toBe(0);
  });
});
