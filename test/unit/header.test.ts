/**
 * Header decoding against qemu-img: images made with many creation options are decoded and every
 * field qemu-img info reports (and the ones the spec fixes, like the L1 size) must agree.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageError, UnsupportedError } from '../../src/errors';
import {
  COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, decodeHeader, describeIncompatible, geometryOf, HEADER_PROBE_BYTES, INCOMPAT_EXTL2,
} from '../../src/qcow2/header';
import { need, qemuImg, removeScratch, run, scratchDir } from '../support/env';

beforeAll(() => need('qemu-img'));
afterAll(() => removeScratch());

interface QemuInfo {
  'virtual-size': number;
  'cluster-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { data: { compat: string; 'compression-type'?: string; 'extended-l2'?: boolean; 'lazy-refcounts'?: boolean; 'refcount-bits': number } };
}

function head(file: string): { buf: Buffer; size: number } {
  const all = fs.readFileSync(file);
  return { buf: all.subarray(0, Math.min(all.length, HEADER_PROBE_BYTES)), size: all.length };
}

const variants: Array<[string, string[], number]> = [
  ['v2', ['-o', 'compat=0.10'], 10 * 2 ** 20],
  ['v3-512', ['-o', 'cluster_size=512'], 3 * 2 ** 20 + 512],
  ['v3-2M-zstd', ['-o', 'cluster_size=2M,compression_type=zstd'], 2 ** 40],
  ['extl2', ['-o', 'extended_l2=on,cluster_size=128K'], 5 * 2 ** 30],
  ['refcount1', ['-o', 'refcount_bits=1,lazy_refcounts=on'], 2 ** 20],
  ['refcount64', ['-o', 'refcount_bits=64'], 2 ** 20],
  ['backing', ['-u', '-b', 'base image.raw', '-F', 'raw'], 7 * 2 ** 20],
  ['backing-v2', ['-u', '-b', '/abs/base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10'], 7 * 2 ** 20],
];

describe('decodeHeader on qemu-img images', () => {
  for (const [name, opts, size] of variants) {
    it(`${name}: fields agree with qemu-img info`, () => {
      const dir = scratchDir('hdr');
      const img = path.join(dir, `${name}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', ...opts, img, String(size));
      const info = JSON.parse(qemuImg('info', '--output', 'json', img)) as QemuInfo;
      const { buf, size: fileSize } = head(img);
      const h = decodeHeader(buf, fileSize);
      const g = geometryOf(h);
      const d = info['format-specific'].data;
      expect(h.sizeBytes).toBe(info['virtual-size']);
      expect(g.clusterSize).toBe(info['cluster-size']);
      expect(h.version).toBe(d.compat === '0.10' ? 2 : 3);
      expect(g.refcountBits).toBe(d['refcount-bits']);
      expect(h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib').toBe(d['compression-type'] ?? 'zlib');
      expect(g.extendedL2).toBe(d['extended-l2'] ?? false);
      expect((h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n).toBe(d['lazy-refcounts'] ?? false);
      expect(h.backingFile ?? undefined).toBe(info['backing-filename']);
      expect(h.backingFormat ?? undefined).toBe(info['backing-filename-format']);
      // The spec fixes the geometry: one L1 entry per L2 table of cluster_size / entry bytes entries.
      expect(g.l2EntryBytes).toBe(g.extendedL2 ? 16 : 8);
      expect(g.l2Entries * g.l2EntryBytes).toBe(g.clusterSize);
      expect(g.subclusterSize).toBe(g.extendedL2 ? g.clusterSize / 32 : g.clusterSize);
      expect(h.l1Size).toBe(Math.ceil(h.sizeBytes / (g.clusterSize * g.l2Entries)));
      expect(h.l1TableOffset % g.clusterSize).toBe(0);
      expect(h.refcountTableOffset % g.clusterSize).toBe(0);
      expect(h.cryptMethod).toBe(0);
      expect(h.nbSnapshots).toBe(0);
      if (h.version === 3) {
        expect(h.headerLength).toBeGreaterThanOrEqual(104);
        // QEMU writes its feature name table when it fits in the first cluster.
        if (g.clusterSize >= 4096) expect(h.featureNames.some((f) => f.type === 'incompatible' && f.bit === 0 && /dirty/.test(f.name))).toBe(true);
        expect(describeIncompatible(h).includes('extended L2 entries') || (h.incompatibleFeatures & INCOMPAT_EXTL2) === 0n).toBe(true);
      } else {
        expect(h.headerLength).toBe(72);
        expect(h.refcountOrder).toBe(4);
      }
      expect(h.extensionsEnd).toBeGreaterThanOrEqual(h.headerLength);
      if (h.backingFile !== null) expect(h.backingFileOffset).toBeGreaterThanOrEqual(h.extensionsEnd);
    });
  }
});

describe('decodeHeader refusals', () => {
  function image(opts: string[] = []): { buf: Buffer; size: number } {
    const dir = scratchDir('hdr');
    const img = path.join(dir, 'x.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', ...opts, img, '1M');
    return head(img);
  }

  it('decides as qemu-img does on odd header fields: what it opens opens, what it refuses is refused', () => {
    const dir = scratchDir('hdr-odd');
    const cases: Array<[string, (b: Buffer) => void, boolean]> = [
      // An empty backing file name is no backing file; its size means nothing without an offset.
      ['backing_file_size 0 with an offset', (b) => { b.writeBigUInt64BE(512n, 8); b.writeUInt32BE(0, 16); }, true],
      ['backing_file_size without an offset', (b) => b.writeUInt32BE(0xffffffff, 16), true],
      ['the compression type bit on a zlib image', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(72) | 8n, 72), false],
      ['snapshots_offset unaligned without snapshots', (b) => b.writeBigUInt64BE(12345n, 64), false],
    ];
    for (const [what, edit, opens] of cases) {
      const img = path.join(dir, 'x.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
      const all = fs.readFileSync(img);
      edit(all);
      fs.writeFileSync(img, all);
      const qemuOpens = run('qemu-img', ['info', img]).code === 0;
      let ours = true;
      try {
        decodeHeader(all.subarray(0, Math.min(all.length, HEADER_PROBE_BYTES)), all.length);
      } catch (err) {
        expect(err, what).toBeInstanceOf(ImageError);
        ours = false;
      }
      expect({ what, qemuOpens, ours }).toEqual({ what, qemuOpens: opens, ours: opens });
    }
  });

  it('names unknown incompatible bits, by the feature table name when it has one', () => {
    const { buf, size } = image();
    buf.writeBigUInt64BE(1n << 40n, 72);
    expect(() => decodeHeader(buf, size)).toThrow(UnsupportedError);
    expect(() => decodeHeader(buf, size)).toThrow(/bit 40/);
  });

  it('refuses encryption and external data files as unsupported, not as corrupt', () => {
    const { buf, size } = image();
    buf.writeUInt32BE(2, 32);
    expect(() => decodeHeader(buf, size)).toThrow(UnsupportedError);
    const b2 = image().buf;
    b2.writeBigUInt64BE(1n << 2n, 72);
    expect(() => decodeHeader(b2, size)).toThrow(/external data file/);
  });

  it('throws ImageError (never a RangeError) for every truncation of a header', () => {
    const { buf } = image(['-u', '-b', 'base.qcow2', '-F', 'qcow2']);
    for (let len = 0; len <= 512; len++) {
      const cut = Buffer.from(buf.subarray(0, len));
      try {
        decodeHeader(cut, len);
        throw new Error(`accepted a ${len}-byte file`);
      } catch (err) {
        expect(err, `length ${len}`).toBeInstanceOf(ImageError);
      }
    }
  });

  it('throws ImageError (never anything else) when any single header byte is flipped', () => {
    const { buf, size } = image(['-u', '-b', 'base.qcow2', '-F', 'qcow2']);
    for (let at = 0; at < 512; at++) {
      for (const flip of [0x01, 0x80, 0xff]) {
        const b = Buffer.from(buf);
        b[at] = b[at]! ^ flip;
        try {
          decodeHeader(b, size);
        } catch (err) {
          expect(err, `byte ${at} ^ 0x${flip.toString(16)}: ${String(err)}`).toBeInstanceOf(ImageError);
        }
      }
    }
  });
});
