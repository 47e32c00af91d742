import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { getRefcount, refcountEntriesPerBlock, refcountMax, setRefcount } from '../src/qcow2/refcount-decode';
import { need, qemuImg, qemuIo, removeScratch, rng, scratchDir } from './support/env';

afterAll(removeScratch);

describe('refcount entries: pure round trip', () => {
  for (let order = 0; order <= 6; order++) {
    it(`order ${order}: set then get, neighbours untouched`, () => {
      const block = new Uint8Array(512);
      const n = refcountEntriesPerBlock(9, order);
      expect(n).toBe((512 * 8) >> order);
      const max = refcountMax(order);
      const model: number[] = new Array<number>(n).fill(0);
      const r = rng(order + 1);
      for (let k = 0; k < 2000; k++) {
        const i = Math.floor(r() * n);
        const v = k % 7 === 0 ? max : Math.floor(r() * Math.min(max + 1, 2 ** 40));
        setRefcount(block, i, order, v);
        model[i] = v;
      }
      for (let i = 0; i < n; i++) expect(getRefcount(block, i, order)).toBe(model[i]);
    });
  }

  it('rejects values that do not fit and indexes outside the block', () => {
    const block = new Uint8Array(64);
    expect(() => setRefcount(block, 0, 1, 4)).toThrow(RangeError);
    expect(() => setRefcount(block, 0, 4, 65536)).toThrow(RangeError);
    expect(() => getRefcount(block, 32, 4)).toThrow(RangeError);
    expect(() => getRefcount(block, 0, 7)).toThrow(RangeError);
    setRefcount(block, 31, 4, 65535);
    expect(getRefcount(block, 31, 4)).toBe(65535);
    expect(Array.from(block.subarray(62))).toEqual([0xff, 0xff]);
  });

  it('64-bit entries are big-endian', () => {
    const block = new Uint8Array(16);
    setRefcount(block, 1, 6, 0x0102030405);
    expect(Array.from(block.subarray(8))).toEqual([0, 0, 0, 1, 2, 3, 4, 5]);
    expect(getRefcount(block, 1, 6)).toBe(0x0102030405);
  });
});

describe('refcount entries: as QEMU writes them', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`refcount_bits=${bits}: data clusters shared with a snapshot read 2 (or 1 at 1 bit), the rest 1`, () => {
      need('qemu-img', 'qemu-io');
      const dir = scratchDir('rcdec');
      const img = path.join(dir, 'a.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, img, '4M');
      qemuIo(img, ['write -P 1 0 64k', 'write -P 2 1M 128k']);
      if (bits > 1) qemuImg('snapshot', '-c', 's1', img);
      const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as Array<{ data: boolean; offset?: number; length: number }>;
      const file = fs.readFileSync(img);
      const clusterBits = file.readUInt32BE(20);
      const order = file.readUInt32BE(96);
      expect(1 << order).toBe(bits);
      const reftable = Number(file.readBigUInt64BE(48));
      const blockOffset = Number(file.readBigUInt64BE(reftable));
      const block = file.subarray(blockOffset, blockOffset + 2 ** clusterBits);
      const shared = new Set<number>();
      for (const e of map) {
        if (!e.data || e.offset === undefined) continue;
        for (let o = e.offset; o < e.offset + e.length; o += 2 ** clusterBits) shared.add(o >> clusterBits);
      }
      expect(shared.size).toBe(3);
      // The snapshot shares the L2 table too (no write happened after it).
      const l1 = Number(file.readBigUInt64BE(40));
      shared.add(Number(file.readBigUInt64BE(l1) & 0x00fffffffffffe00n) >> clusterBits);
      const clusters = Math.ceil(file.length / 2 ** clusterBits);
      for (let c = 0; c < clusters; c++) {
        const want = shared.has(c) && bits > 1 ? 2 : 1;
        // Header, refcount structures, both L1 tables and the snapshot table: referenced once.
        expect({ c, rc: getRefcount(block, c, order) }).toEqual({ c, rc: want });
      }
      // Entries past the end of the file are free.
      expect(getRefcount(block, clusters, order)).toBe(0);
    });
  }
});
