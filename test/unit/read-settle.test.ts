/**
 * A read that fails part-way (a corrupt L2 entry after good clusters) must not return while its
 * other host reads are still running: the caller may close the file next (the FUSE daemon on
 * unmount, openImage's cleanup), and a late pread would then hit a closed or reused descriptor,
 * or reject with nobody listening (an unhandled rejection kills the daemon).
 */
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CorruptionError } from '../../src/errors';
import { FdFile, type HostFile } from '../../src/io/file';
import { Qcow2Image } from '../../src/qcow2/image';
import * as fs from 'node:fs';
import { need, qemuImg, qemuIo, removeScratch, scratchDir } from '../support/env';

beforeAll(() => need('qemu-img', 'qemu-io'));
afterAll(() => removeScratch());

/** A HostFile whose reads take a while, counting how many are in flight; the rest delegates. */
function slowFile(inner: HostFile, delayMs: number): HostFile & { inFlight: number } {
  const f = Object.create(inner) as HostFile & { inFlight: number };
  f.inFlight = 0;
  f.pread = async (buf: Uint8Array, offset: number): Promise<number> => {
    f.inFlight++;
    try {
      await new Promise((r) => setTimeout(r, delayMs));
      return await inner.pread(buf, offset);
    } finally {
      f.inFlight--;
    }
  };
  f.close = () => inner.close();
  return f;
}

describe('a read failing part-way', () => {
  it('settles every host read before it rejects', async () => {
    const dir = scratchDir('settle');
    const img = path.join(dir, 'img.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    // Cluster 0 data, cluster 1 zero (so a read's first run ends there), cluster 2 corrupt.
    qemuIo(img, ['write -q -P 0x11 0 4M', 'write -q -z 65536 65536']);
    // Make the L2 entry of guest cluster 2 unaligned.
    const b = fs.readFileSync(img);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00ffffff_fffffe00n);
    b.writeBigUInt64BE(b.readBigUInt64BE(l2 + 16) + 0x200n, l2 + 16);
    fs.writeFileSync(img, b);

    const file = slowFile(await FdFile.open(img, true), 50);
    const dev = await Qcow2Image.open(file, { readOnly: true, backing: null });
    try {
      const buf = Buffer.alloc(3 * 65536);
      // Warm the L2 cache so the lookups themselves do not wait on the slow file.
      await dev.read(buf.subarray(0, 512), 0);
      await expect(dev.read(buf, 0)).rejects.toThrow(CorruptionError);
      expect(file.inFlight).toBe(0);
    } finally {
      await dev.close();
    }
  });
});
