/**
 * Internal snapshots as raw files: `--snapshot NAME_OR_ID` and `--all-snapshots`, checked
 * against QEMU (`qemu-img convert -l snapshot.name=NAME`) for plain, zlib-compressed and
 * extended_l2 images with 2-3 snapshots each, and a snapshot taken at another virtual size
 * (checked against the image reverted with `qemu-img snapshot -a`).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { forceCleanup } from './support/daemons';
import { need, qcow2fs, qemuImg, qemuIo, qemuRawSha, removeScratch, run, scratchDir, sha256File, withMount } from './support/env';

interface SnapInfo {
  id: string;
  name: string;
  'date-sec': number;
  'date-nsec': number;
}

interface Case {
  label: string;
  image: string;
  snapshots: SnapInfo[];
}

let dir: string;
const cases: Case[] = [];

function snapshotsOf(image: string): SnapInfo[] {
  return (JSON.parse(qemuImg('info', '--output', 'json', image)) as { snapshots?: SnapInfo[] }).snapshots ?? [];
}

function build(label: string, createOpts: string[], steps: Array<{ io?: string[]; snapshot?: string }>): Case {
  const image = path.join(dir, `${label}.qcow2`);
  qemuImg('create', '-f', 'qcow2', ...createOpts, image, '24M');
  for (const s of steps) {
    if (s.io) qemuIo(image, s.io);
    if (s.snapshot) qemuImg('snapshot', '-c', s.snapshot, image);
  }
  const c = { label, image, snapshots: snapshotsOf(image) };
  cases.push(c);
  return c;
}

beforeAll(() => {
  need('/dev/fuse', 'fusermount', 'qemu-img', 'qemu-io');
  dir = scratchDir('snaps');
  build('plain', [], [
    { io: ['write -P 0x11 0 1M', 'write -P 0x12 10M 300k'], snapshot: 's1' },
    { io: ['write -P 0x21 512k 1M', 'write -z 10M 64k', 'discard 23M 1M'], snapshot: 'second/with slash é' },
    { io: ['write -P 0x31 4M 2M'], snapshot: 's3' },
    { io: ['write -P 0x41 0 128k', 'write -P 0x42 23M 512k'] },
  ]);
  build('zlib', [], [
    { io: ['write -c -P 0x51 0 64k', 'write -c -P 0x52 1M 64k', 'write -P 0x53 2M 256k'], snapshot: 'c1' },
    { io: ['write -c -P 0x61 3M 64k', 'write -P 0x64 0 8k', 'write -P 0x62 1M 4k', 'write -c -P 0x63 5M 64k'], snapshot: 'c2' },
    { io: ['write -P 0x71 1M 64k'] },
  ]);
  build('extl2', ['-o', 'extended_l2=on,cluster_size=64k'], [
    { io: ['write -P 0x81 0 4k', 'write -P 0x82 8k 4k', 'write -P 0x83 1M 2k'], snapshot: 'x1' },
    { io: ['write -P 0x91 4k 4k', 'write -z 8k 2k', 'write -P 0x92 3M 68k'], snapshot: 'x2' },
    { io: ['write -P 0xa1 0 2k'], snapshot: 'x3' },
  ]);
});

afterAll(() => removeScratch());

describe('--snapshot NAME_OR_ID', () => {
  it('serves each snapshot of plain, compressed and extended_l2 images as qemu-img convert -l does', async () => {
    for (const c of cases) {
      expect(c.snapshots.length, c.label).toBeGreaterThanOrEqual(2);
      for (const s of c.snapshots) {
        const want = qemuRawSha(c.image, ['-l', `snapshot.name=${s.name}`]);
        await withMount(c.image, ['--snapshot', s.name], (raw) => {
          expect(fs.statSync(raw).mode & 0o777, `${c.label}/${s.name}`).toBe(0o444);
          expect(sha256File(raw), `${c.label}/${s.name}`).toBe(want);
        });
      }
    }
  });

  it('finds a snapshot by id as well as by name, and refuses an unknown one in one line', async () => {
    const c = cases[0]!;
    const second = c.snapshots[1]!;
    const want = qemuRawSha(c.image, ['-l', `snapshot.id=${second.id}`]);
    await withMount(c.image, ['--snapshot', second.id], (raw) => expect(sha256File(raw)).toBe(want));
    const mp = scratchDir('mnt');
    const r = qcow2fs(['mount', c.image, mp, '--snapshot', 'no-such-snapshot']);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/no snapshot with id or name "no-such-snapshot"/);
    forceCleanup(mp);
  });

  it('refuses writes to a snapshot view with EROFS', async () => {
    const c = cases[0]!;
    await withMount(c.image, ['--snapshot', 's1'], (raw) => {
      expect(() => fs.openSync(raw, 'r+')).toThrow(/EROFS/);
    });
  });
});

describe('--all-snapshots', () => {
  it('shows every snapshot as snapshots/<name>.raw with the snapshot date as mtime and QEMU content', async () => {
    for (const c of cases) {
      await withMount(c.image, ['-r', '--all-snapshots'], (raw, mp) => {
        expect(sha256File(raw), c.label).toBe(qemuRawSha(c.image));
        const files = fs.readdirSync(path.join(mp, 'snapshots')).sort();
        const expected = c.snapshots.map((s) => `${s.name.replace(/\//g, '_')}.raw`).sort();
        expect(files, c.label).toEqual(expected);
        for (const s of c.snapshots) {
          const file = path.join(mp, 'snapshots', `${s.name.replace(/\//g, '_')}.raw`);
          const st = fs.statSync(file);
          expect(Math.floor(st.mtimeMs / 1000), `${c.label}/${s.name} mtime`).toBe(s['date-sec']);
          expect(st.mode & 0o777).toBe(0o444);
          expect(sha256File(file), `${c.label}/${s.name}`).toBe(qemuRawSha(c.image, ['-l', `snapshot.name=${s.name}`]));
        }
      });
    }
  });
});

describe('a snapshot taken at another virtual size', () => {
  it('has the recorded size and the content qemu-img snapshot -a restores', async () => {
    const image = path.join(dir, 'resized.qcow2');
    qemuImg('create', '-f', 'qcow2', image, '16M');
    qemuIo(image, ['write -P 0x11 0 1M', 'write -P 0x12 15M 1M']);
    qemuImg('snapshot', '-c', 'small', image);
    qemuImg('resize', image, '40M');
    qemuIo(image, ['write -P 0x21 0 512k', 'write -P 0x22 30M 1M']);
    qemuImg('snapshot', '-c', 'big', image);
    qemuIo(image, ['write -P 0x31 15M 2M']);

    // What `qemu-img snapshot -a small` restores: a 16 MiB disk.
    const reverted = path.join(dir, 'reverted.qcow2');
    fs.copyFileSync(image, reverted);
    qemuImg('snapshot', '-a', 'small', reverted);
    const revertedSha = qemuRawSha(reverted);
    // qemu-img convert -l keeps today's size and pads with zeros; its first 16 MiB must agree.
    const convertOut = path.join(dir, 'small-convert.raw');
    qemuImg('convert', '-l', 'snapshot.name=small', '-O', 'raw', image, convertOut);
    const convertBytes = fs.readFileSync(convertOut);
    expect(convertBytes.length).toBe(40 * 1024 * 1024);
    expect(convertBytes.subarray(16 * 1024 * 1024).every((b) => b === 0)).toBe(true);
    const prefix = path.join(dir, 'small-prefix.raw');
    fs.writeFileSync(prefix, convertBytes.subarray(0, 16 * 1024 * 1024));
    expect(sha256File(prefix)).toBe(revertedSha);

    await withMount(image, ['--snapshot', 'small'], (raw) => {
      expect(fs.statSync(raw).size).toBe(16 * 1024 * 1024);
      expect(sha256File(raw)).toBe(revertedSha);
    });
    await withMount(image, ['-r', '--all-snapshots'], (raw, mp) => {
      expect(fs.statSync(raw).size).toBe(40 * 1024 * 1024);
      expect(fs.statSync(path.join(mp, 'snapshots', 'small.raw')).size).toBe(16 * 1024 * 1024);
      expect(sha256File(path.join(mp, 'snapshots', 'small.raw'))).toBe(revertedSha);
      expect(sha256File(path.join(mp, 'snapshots', 'big.raw'))).toBe(qemuRawSha(image, ['-l', 'snapshot.name=big']));
    });
  });

  it('tells snapshots with the same name apart by id', async () => {
    const image = path.join(dir, 'twins.qcow2');
    qemuImg('create', '-f', 'qcow2', image, '4M');
    qemuIo(image, ['write -P 0x01 0 64k']);
    qemuImg('snapshot', '-c', 'twinA', image);
    qemuIo(image, ['write -P 0x02 0 64k']);
    qemuImg('snapshot', '-c', 'twinB', image);
    // qemu-img refuses duplicate names, but qcow2 allows them: rename twinB in the snapshot table.
    const bytes = fs.readFileSync(image);
    const at = bytes.lastIndexOf(Buffer.from('twinB'));
    expect(at).toBeGreaterThan(0);
    bytes.write('twinA', at);
    fs.writeFileSync(image, bytes);
    expect(snapshotsOf(image).map((s) => `${s.id}:${s.name}`)).toEqual(['1:twinA', '2:twinA']);
    await withMount(image, ['-r', '--all-snapshots'], (_raw, mp) => {
      expect(fs.readdirSync(path.join(mp, 'snapshots')).sort()).toEqual(['twinA.id-1.raw', 'twinA.id-2.raw']);
      for (const id of ['1', '2']) {
        expect(sha256File(path.join(mp, 'snapshots', `twinA.id-${id}.raw`))).toBe(qemuRawSha(image, ['-l', `snapshot.id=${id}`]));
      }
    });
  });
});

describe('an image with one damaged snapshot entry', () => {
  // QEMU opens such an image (it checks a snapshot's L1 table only when it reads the snapshot):
  // the active layer and the other snapshots stay readable, which a forensic user needs most.
  it.each([
    ['an unaligned l1_table_offset', 0, (b: Buffer, e: number) => b.writeBigUInt64BE(b.readBigUInt64BE(e) + 512n, e), /l1_table_offset 0x[0-9a-f]+ is not aligned/],
    ['l1_size 0', 1, (b: Buffer, e: number) => b.writeUInt32BE(0, e + 8), /l1_size 0 is too small for its disk size/],
  ] as const)('%s: opens as QEMU opens it; the active layer and the good snapshots are served, the damaged one is refused in one line, nothing is written', async (_what, _n, damage, message) => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('snap-damaged');
    const image = path.join(dir, 'ev.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, '16M');
    qemuIo(image, ['write -P 1 0 1M']);
    qemuImg('snapshot', '-c', 'good', image);
    qemuIo(image, ['write -P 2 0 1M']);
    qemuImg('snapshot', '-c', 'bad', image);
    qemuIo(image, ['write -P 3 0 1M']);
    // The second entry damaged.
    const buf = fs.readFileSync(image);
    const table = Number(buf.readBigUInt64BE(64));
    const first = 40 + buf.readUInt32BE(table + 36) + buf.readUInt16BE(table + 12) + buf.readUInt16BE(table + 14);
    damage(buf, table + Math.ceil(first / 8) * 8);
    fs.writeFileSync(image, buf);
    const before = sha256File(image);

    // The listing, the map and a copy of the active layer agree with qemu-img.
    expect(qcow2fs(['snapshot', '-l', image]).stdout).toBe(qemuImg('snapshot', '-l', image));
    expect(qcow2fs(['map', '--output', 'json', image]).stdout).toBe(qemuImg('map', '--output', 'json', image));
    const copy = path.join(dir, 'active.raw');
    expect(qcow2fs(['convert', '-O', 'raw', image, copy]).code).toBe(0);
    expect(sha256File(copy)).toBe(qemuRawSha(image));
    // check reports it, with qemu-img's status (2 corrupt; 3 where the damage only leaks clusters).
    const check = qcow2fs(['check', image]).code;
    expect(check).toBe(run('qemu-img', ['check', image]).code);
    expect(check).toBeGreaterThan(1);

    await withMount(image, ['--forensic'], (raw, mp) => {
      expect(sha256File(raw)).toBe(qemuRawSha(image));
      expect(fs.readdirSync(path.join(mp, 'snapshots'))).toEqual(['good.raw']);
      expect(sha256File(path.join(mp, 'snapshots', 'good.raw'))).toBe(qemuRawSha(image, ['-l', 'snapshot.name=good']));
      const info = JSON.parse(fs.readFileSync(path.join(mp, 'info.json'), 'utf8')) as { snapshots: Array<Record<string, unknown>> };
      expect(info.snapshots.map((s) => [s.name, s['qcow2fs-damaged'] !== undefined])).toEqual([['good', false], ['bad', true]]);
    });
    for (const args of [['mount', '--snapshot', 'bad', image, scratchDir('mnt')], ['snapshot', '-c', 'new', image], ['snapshot', '-d', 'good', image], ['snapshot', '-a', 'good', image]]) {
      const r = qcow2fs(args);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/snapshot bad \(id 2\) is damaged: /);
      expect(r.stderr).toMatch(message);
    }
    expect(sha256File(image)).toBe(before);
  });
});
