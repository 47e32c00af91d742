/**
 * Concurrent writes (issue 3): writes into the same unallocated cluster must neither
 * double-allocate nor lose data; writes to different clusters run in parallel.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../src/image/open';
import { need, qemuImg, qemuIo, removeScratch, run, scratchDir, seededBytes } from './support/env';

afterAll(removeScratch);

describe.each([
  { name: 'standard L2, with backing', opts: 'cluster_size=64k', backing: true },
  { name: 'extended L2', opts: 'extended_l2=on,cluster_size=64k', backing: false },
  { name: '512-byte clusters', opts: 'cluster_size=512', backing: true },
])('concurrent writes: $name', (c) => {
  it('keep every write and allocate each cluster once', async () => {
    need('qemu-img', 'qemu-io');
    const dir = scratchDir('conc');
    const image = path.join(dir, 'disk.qcow2');
    const ref = path.join(dir, 'ref.raw');
    if (c.backing) {
      const base = path.join(dir, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '32M');
      qemuIo(base, ['write -P 0x77 0 32M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, '-b', 'base.qcow2', '-F', 'qcow2', image);
    } else {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, '32M');
    }
    qemuImg('convert', '-O', 'raw', image, ref);
    const { device } = await openImage(image, { readOnly: false });
    const expected = fs.readFileSync(ref);
    const writes: Promise<void>[] = [];
    // 128 writes of 300 bytes scattered through the same 64 KiB region (one or many clusters)...
    for (let i = 0; i < 128; i++) {
      const off = 1_000_000 + i * 500;
      const data = seededBytes(i + 1, 300);
      data.copy(expected, off);
      writes.push(device.write(data, off));
    }
    // ...and 64 writes of 40 KiB to different clusters, all at once.
    for (let i = 0; i < 64; i++) {
      const off = 4_000_000 + i * 300_000 + (i % 5) * 777;
      const data = seededBytes(1000 + i, 40_000);
      data.copy(expected, off);
      writes.push(device.write(data, off));
    }
    await Promise.all(writes);
    const back = Buffer.alloc(expected.length);
    await device.read(back, 0);
    expect(back.equals(expected)).toBe(true);
    await device.close();
    fs.writeFileSync(ref, expected);
    const check = run('qemu-img', ['check', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const cmp = run('qemu-img', ['compare', '-F', 'raw', image, ref]);
    expect(cmp.code, cmp.stdout).toBe(0);
  });
});
