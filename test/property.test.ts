/**
 * Property-based test (fast-check): random sequences of writes, grows, reopenings and snapshot
 * create/apply/delete run against our engine and an in-memory model. After every sequence our
 * reads equal the model, every snapshot equals the model's copy, and qemu-img check is clean.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../src/image/open';
import type { Qcow2Image } from '../src/qcow2/image';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../src/qcow2/snapshot-write';
import { need, qemuImg, removeScratch, run, scratchDir } from './support/env';

afterAll(removeScratch);

type Cmd =
  | { op: 'write'; at: number; len: number; byte: number }
  | { op: 'grow'; by: number }
  | { op: 'reopen' }
  | { op: 'snap' }
  | { op: 'apply'; pick: number }
  | { op: 'delete'; pick: number };

const MiB = 1024 * 1024;

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  { weight: 12, arbitrary: fc.record({ op: fc.constant('write' as const), at: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), len: fc.integer({ min: 1, max: 300_000 }), byte: fc.integer({ min: 1, max: 255 }) }).map((c) => c as Cmd) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('grow' as const), by: fc.integer({ min: 1, max: 8 }) }).map((c) => c as Cmd) },
  { weight: 2, arbitrary: fc.constant({ op: 'reopen' } as Cmd) },
  { weight: 2, arbitrary: fc.constant({ op: 'snap' } as Cmd) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('apply' as const), pick: fc.nat() }).map((c) => c as Cmd) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('delete' as const), pick: fc.nat() }).map((c) => c as Cmd) },
);

describe.each([
  { name: '4K clusters', opts: 'cluster_size=4k' },
  { name: 'extended_l2, 64K clusters', opts: 'extended_l2=on,cluster_size=64k' },
  { name: '512-byte clusters, 4-bit refcounts', opts: 'cluster_size=512,refcount_bits=4' },
])('model-based: $name', (c) => {
  it('reads, snapshots and qemu-img check agree with the model', async () => {
    need('qemu-img');
    let runNo = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(cmd, { minLength: 5, maxLength: 40 }), async (cmds) => {
        const dir = scratchDir('prop');
        const image = path.join(dir, `p${runNo++}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, image, String(4 * MiB));
        let model = Buffer.alloc(4 * MiB);
        const snaps: { name: string; data: Buffer }[] = [];
        let nextName = 0;
        let img = (await openImage(image, { readOnly: false })).device as Qcow2Image;
        try {
          for (const k of cmds) {
            if (k.op === 'write') {
              const len = Math.min(k.len, model.length);
              const at = Math.floor(k.at * (model.length - len + 1));
              const data = Buffer.alloc(len, k.byte);
              data[0] = (k.byte * 7) & 0xff;
              await img.write(data, at);
              data.copy(model, at);
            } else if (k.op === 'grow') {
              const size = model.length + k.by * 512 * 1024;
              await img.resize(size);
              const m = Buffer.alloc(size);
              model.copy(m);
              model = m;
            } else if (k.op === 'reopen') {
              await img.close();
              img = (await openImage(image, { readOnly: false })).device as Qcow2Image;
            } else if (k.op === 'snap') {
              await img.flush();
              const name = `s${nextName++}`;
              await createSnapshot(img, name);
              snaps.push({ name, data: Buffer.from(model) });
            } else if (snaps.length > 0) {
              const i = k.pick % snaps.length;
              if (k.op === 'apply') {
                await applySnapshot(img, snaps[i]!.name);
                model = Buffer.from(snaps[i]!.data);
                // The in-memory state was rewritten underneath: continue on a fresh open.
                await img.close();
                img = (await openImage(image, { readOnly: false })).device as Qcow2Image;
              } else {
                await deleteSnapshot(img, snaps[i]!.name);
                snaps.splice(i, 1);
                await img.close();
                img = (await openImage(image, { readOnly: false })).device as Qcow2Image;
              }
            }
          }
          expect(img.size).toBe(model.length);
          const back = Buffer.alloc(model.length);
          await img.read(back, 0);
          expect(back.equals(model)).toBe(true);
        } finally {
          await img.close();
        }
        const check = run('qemu-img', ['check', image]);
        expect(check.code, check.stdout + check.stderr).toBe(0);
        for (const s of snaps) {
          const out = path.join(dir, 'snap.raw');
          qemuImg('convert', '-l', `snapshot.name=${s.name}`, '-O', 'raw', image, out);
          // qemu-img convert -l keeps the image's current size; the snapshot's own size is a prefix.
          const got = fs.readFileSync(out);
          const n = Math.min(got.length, s.data.length);
          expect(got.subarray(0, n).equals(s.data.subarray(0, n)), `snapshot ${s.name}`).toBe(true);
          expect(got.subarray(n).every((b) => b === 0)).toBe(true);
        }
        const out = path.join(dir, 'active.raw');
        qemuImg('convert', '-O', 'raw', image, out);
        expect(fs.readFileSync(out).equals(model)).toBe(true);
        fs.rmSync(dir, { recursive: true, force: true });
      }),
      { numRuns: 25, seed: 20261122 },
    );
  });
});
