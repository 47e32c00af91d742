import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCorpus, type CorpusImage } from './toolkit-corpus';
import { need, qcow2fs, qemuImg, qemuIo, removeScratch, run, scratchDir } from './support/env';

let corpus: CorpusImage[] = [];
beforeAll(() => {
  corpus = buildCorpus('map');
});
afterAll(removeScratch);

interface Entry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}


describe('map agrees with qemu-img map', () => {
  it('JSON: identical text over the corpus', () => {
    need('qemu-img');
    let compared = 0;
    for (const img of corpus) {
      const ours = qcow2fs(['map', '--output', 'json', img.path]);
      expect({ img: img.name, code: ours.code, err: ours.stderr }).toEqual({ img: img.name, code: 0, err: '' });
      const theirs = qemuImg('map', '--output', 'json', img.path);
      expect({ img: img.name, map: ours.stdout }).toEqual({ img: img.name, map: theirs });
      compared++;
    }
    expect(compared).toBeGreaterThanOrEqual(14);
  });

  it('the chain reports depths 0, 1 and 2, and zeros past the end of a shorter backing file', () => {
    const top = corpus.find((c) => c.backed)!;
    const entries = JSON.parse(qcow2fs(['map', '--output', 'json', top.path]).stdout) as Entry[];
    expect(new Set(entries.map((e) => e.depth))).toEqual(new Set([0, 1, 2]));
    const last = entries[entries.length - 1]!;
    expect(last.start + last.length).toBe(6 * 1024 * 1024);
    expect(entries.some((e) => e.depth === 0 && !e.present && e.zero && e.start >= 4 * 1024 * 1024)).toBe(true);
  });

  it('holes in the host file: metadata preallocation and sparse raw files read as zeros, as in QEMU', () => {
    need('qemu-img', 'qemu-io');
    const img = corpus.find((c) => c.name === 'prealloc-metadata.qcow2')!;
    const ours = JSON.parse(qcow2fs(['map', '--output', 'json', img.path]).stdout) as Entry[];
    expect(ours.some((e) => e.zero && e.data)).toBe(true);
    const dir = path.dirname(img.path);
    const sparse = path.join(dir, 'sparse-map.raw');
    fs.writeFileSync(sparse, '');
    fs.truncateSync(sparse, 4 * 1024 * 1024);
    const fd = fs.openSync(sparse, 'r+');
    fs.writeSync(fd, Buffer.alloc(65536, 1), 0, 65536, 1024 * 1024);
    fs.closeSync(fd);
    const falloc = path.join(dir, 'falloc-map.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc', falloc, '4M');
    const overlay = path.join(dir, 'over-sparse.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'sparse-map.raw', '-F', 'raw', overlay);
    qemuIo(overlay, ['write -P 3 2M 64k']);
    for (const [f, fmt] of [[sparse, 'raw'], [falloc, 'qcow2'], [overlay, 'qcow2']] as const) {
      expect(qcow2fs(['map', '--output', 'json', '-f', fmt, f]).stdout).toBe(qemuImg('map', '--output', 'json', '-f', fmt, f));
    }
  });

  it('human format: identical over the corpus images without compressed clusters; compressed ones fail as in qemu-img', () => {
    need('qemu-img');
    for (const img of corpus) {
      const cwd = path.dirname(img.path);
      const ours = qcow2fs(['map', img.name], { cwd });
      const theirs = run('qemu-img', ['map', img.name], { cwd });
      expect({ img: img.name, code: ours.code === 0 }).toEqual({ img: img.name, code: theirs.code === 0 });
      if (theirs.code === 0) expect({ img: img.name, out: ours.stdout }).toEqual({ img: img.name, out: theirs.stdout });
      else expect(ours.stderr).toMatch(/compressed/);
    }
  });

  it('a raw file whose size is not whole sectors: info, map and convert as qemu-img (rounded up to 512 bytes)', () => {
    need('qemu-img');
    const dir = scratchDir('map-odd-raw');
    const raw = path.join(dir, 'odd.raw');
    fs.writeFileSync(raw, Buffer.alloc(1000, 0x5a));
    for (const verb of ['info', 'map']) {
      expect(qcow2fs([verb, '--output', 'json', raw]).stdout, verb).toBe(qemuImg(verb, '--output', 'json', raw));
    }
    const ours = path.join(dir, 'ours.raw');
    const theirs = path.join(dir, 'theirs.raw');
    expect(qcow2fs(['convert', '-f', 'raw', '-O', 'raw', raw, ours]).code).toBe(0);
    qemuImg('convert', '-f', 'raw', '-O', 'raw', raw, theirs);
    expect(fs.readFileSync(ours).equals(fs.readFileSync(theirs))).toBe(true);
  });

  it('--start-offset and --max-length', () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('map-range');
    const img = path.join(dir, 'r.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 1 0 1M', 'write -P 2 3M 1M']);
    // Past the end too: qemu-img maps an empty range there.
    for (const [s, l] of [['512k', '3M'], ['1M', '1k'], ['0', '100M'], ['3145728', '1048576'], ['9M', '1M'], ['8M', '0']] as const) {
      const ours = qcow2fs(['map', '--output', 'json', '--start-offset', s, '--max-length', l, img]);
      expect(ours.code).toBe(0);
      expect(ours.stdout).toBe(qemuImg('map', '--output', 'json', '--start-offset', s, '--max-length', l, img));
    }
    const human = qcow2fs(['map', '--start-offset', '9M', img]);
    expect(human.code).toBe(0);
    expect(human.stdout).toBe(qemuImg('map', '--start-offset', '9M', img));
    const bad = qcow2fs(['map', '--start-offset', 'lots', img]);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
  });
});
