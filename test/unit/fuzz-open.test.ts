/**
 * Random bit flips anywhere in small qemu-made images (standard, extended L2, 512-byte clusters;
 * with compressed clusters, zero clusters and a snapshot). Opening, reading every byte and
 * status() of the active layer and of the snapshot may fail only with the engine's own error
 * types (ImageError and its CorruptionError/UnsupportedError, UsageError): never a TypeError,
 * RangeError or a hang. Seeded, so a failure reproduces.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageError, UsageError } from '../../src/errors';
import { openImage } from '../../src/image/open';
import { need, qemuImg, qemuIo, removeScratch, rng, scratchDir } from '../support/env';

beforeAll(() => need('qemu-img', 'qemu-io'));
afterAll(() => removeScratch());

const images: Array<[string, string[], string, string[]]> = [
  ['standard', ['-o', 'cluster_size=4096'], '1M', ['write -q -P 1 0 100k', 'write -q -c -P 2 256k 4k', 'write -q -z 512k 8k']],
  ['extended-l2', ['-o', 'cluster_size=16k,extended_l2=on'], '1M', ['write -q -P 1 0 100k', 'write -q -c -P 2 256k 16k', 'write -q -z 512k 8k', 'write -q -P 5 600k 3k']],
  ['512-byte clusters', ['-o', 'cluster_size=512'], '256k', ['write -q -P 1 0 100k', 'write -q -c -P 2 200k 512']],
];

/** Byte offsets of the header cluster, the active L1 table and its L2 tables (spec layout). */
function metadataBytes(file: Buffer): number[] {
  const clusterSize = 2 ** file.readUInt32BE(20);
  const l1Size = file.readUInt32BE(36);
  const l1 = Number(file.readBigUInt64BE(40));
  const starts = [0, l1];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(file.readBigUInt64BE(l1 + 8 * i) & 0x00ffffff_fffffe00n);
    if (l2) starts.push(l2);
  }
  const out: number[] = [];
  for (const s of starts) for (let k = 0; k < Math.min(clusterSize, 4096); k++) out.push(s + k);
  return out;
}

function expected(err: unknown): boolean {
  return err instanceof ImageError || err instanceof UsageError;
}

for (const [name, opts, size, writes] of images) {
  describe(`bit flips in a ${name} image`, () => {
    it('fail only with the engine\'s error types', async () => {
      const dir = scratchDir('fuzz');
      const img = path.join(dir, 'orig.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', ...opts, img, size);
      qemuIo(img, writes);
      qemuImg('snapshot', '-c', 's1', img);
      qemuIo(img, ['write -q -P 4 40k 10k']);
      const orig = fs.readFileSync(img);
      const meta = metadataBytes(orig);
      const target = path.join(dir, 'flipped.qcow2');
      const pick = rng(name.length * 977);
      const outcomes = { opened: 0, refused: 0, readErrors: 0 };
      const buf = Buffer.alloc(64 * 1024);
      for (let iter = 0; iter < 300; iter++) {
        const b = Buffer.from(orig);
        const flips = 1 + Math.floor(pick() * 4);
        const where: number[] = [];
        for (let k = 0; k < flips; k++) {
          // Mostly in metadata (header, L1 and L2 tables), else anywhere.
          const at = pick() < 0.7 ? meta[Math.floor(pick() * meta.length)]! : Math.floor(pick() * b.length);
          b[at] = b[at]! ^ (1 << Math.floor(pick() * 8));
          where.push(at);
        }
        fs.writeFileSync(target, b);
        for (const snapshot of [undefined, 's1']) {
          const what = `iteration ${iter}, flipped bytes ${where.join(',')}${snapshot ? ', snapshot s1' : ''}`;
          let dev;
          try {
            dev = (await openImage(target, { readOnly: true, ...(snapshot ? { snapshot } : {}) })).device;
          } catch (err) {
            expect(expected(err), `${what}: ${String(err)}`).toBe(true);
            outcomes.refused++;
            continue;
          }
          outcomes.opened++;
          try {
            for (let off = 0; off < dev.size; off += buf.length) {
              try {
                await dev.read(buf.subarray(0, Math.min(buf.length, dev.size - off)), off);
              } catch (err) {
                expect(expected(err), `${what}: read at ${off}: ${String(err)}`).toBe(true);
                outcomes.readErrors++;
              }
            }
            try {
              await dev.status(0, dev.size);
            } catch (err) {
              expect(expected(err), `${what}: status: ${String(err)}`).toBe(true);
            }
          } finally {
            await dev.close();
          }
        }
      }
      // The flips did reach both open-time and read-time checks.
      expect(outcomes.refused).toBeGreaterThan(0);
      expect(outcomes.readErrors).toBeGreaterThan(0);
      expect(outcomes.opened).toBeGreaterThan(outcomes.refused);
    });
  });
}
