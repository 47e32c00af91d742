/**
 * The binding's direct read path (src/fuse/direct-read.ts, vendor/fuse-native qcow2fs_fast_read):
 * reads answered on libfuse's worker threads from a cache of the engine's mappings. The danger is
 * a stale mapping: after a write moves a guest cluster (copy-on-write from a snapshot, a new
 * cluster over a zero or backing cluster, subclusters becoming allocated), a read must see the
 * new data at once. So, through a mounted raw file with O_DIRECT (no page cache: every read
 * reaches the daemon), with the map warmed by a full read first:
 *  - rounds of writes, each read back at once with its pattern (qemu-io -n read -P), and after
 *    each round the whole raw file compared with a reference image that got the same writes
 *    through qemu-io (qemu-img compare -T none);
 *  - after unmounting, qemu-img check clean and qemu-img compare equal to the reference;
 *  - the daemon's own count (debug log at unmount) shows that reads, and writes into clusters
 *    the image owns (done in place by the binding too), really were done natively.
 */
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, withMount } from './support/env';
import { directMapCounters } from './support/daemons';
import { expectCheckClean, expectSameContent, writeRoundAndCompare } from './support/oracle';

afterAll(removeScratch);

const MiB = 1024 * 1024;
const SIZE = 48 * MiB;

interface Case {
  name: string;
  format: 'qcow2' | 'raw';
  opts?: string;
  /** Prepare the image (qemu-io commands) and say whether to take an internal snapshot after. */
  fill: string[];
  snapshot?: boolean;
  backing?: boolean;
}

const CASES: Case[] = [
  {
    name: '64K clusters, internal snapshot (every write copies), zero clusters, holes',
    format: 'qcow2',
    opts: 'cluster_size=64k',
    fill: ['write -P 0x11 0 30M', 'write -z 4M 2M', 'write -P 0x12 40M 1M'],
    snapshot: true,
  },
  { name: '4K clusters', format: 'qcow2', opts: 'cluster_size=4k', fill: ['write -P 0x21 0 20M', 'write -z 2M 1M'] },
  { name: '512-byte clusters', format: 'qcow2', opts: 'cluster_size=512', fill: ['write -P 0x31 0 8M'] },
  { name: '2M clusters', format: 'qcow2', opts: 'cluster_size=2M', fill: ['write -P 0x41 0 20M', 'write -z 24M 4M'], snapshot: true },
  {
    name: 'extended_l2, partly allocated clusters',
    format: 'qcow2',
    opts: 'extended_l2=on,cluster_size=64k',
    fill: ['write -P 0x51 0 16M', 'write -P 0x52 20M 4k', 'write -P 0x53 21M 12k', 'write -z 22M 8k'],
  },
  { name: 'overlay on a shorter qcow2 backing file', format: 'qcow2', opts: 'cluster_size=64k', fill: ['write -P 0x61 30M 1M'], backing: true },
  { name: 'raw image', format: 'raw', fill: ['write -P 0x71 0 16M'] },
];

describe('direct reads (answered by the binding) see every write at once', () => {
  it.each(CASES)('$name', async (c) => {
    need('qemu-img', 'qemu-io', '/dev/fuse');
    const dir = scratchDir('direct');
    const image = path.join(dir, `disk.${c.format}`);
    const ref = path.join(dir, 'ref.qcow2');
    if (c.backing) {
      const base = path.join(dir, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(SIZE / 2));
      qemuIo(base, ['write -P 0x60 0 20M', 'write -z 4M 1M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts!, '-b', 'base.qcow2', '-F', 'qcow2', image, String(SIZE));
    } else if (c.format === 'qcow2') {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts!, image, String(SIZE));
    } else {
      qemuImg('create', '-q', '-f', 'raw', image, String(SIZE));
    }
    qemuIo(image, c.fill, c.format);
    if (c.snapshot) qemuImg('snapshot', '-c', 'before', image);
    // The reference: the same guest content as a standalone qcow2, then the same writes.
    qemuImg('convert', '-O', 'qcow2', '-f', c.format, image, ref);

    const r = rng(c.name.length * 7919);
    const logFile = path.join(dir, 'daemon.log');
    await withMount(image, ['--log-level', 'debug', '--log-json', '--log-file', logFile], (raw) => {
      // Warm the direct read map: one full O_DIRECT pass.
      const dd = run('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']);
      expect(dd.code, dd.stderr).toBe(0);
      for (let round = 0; round < 4; round++) writeRoundAndCompare(raw, ref, r, SIZE, round, { writes: 60, bigEvery: 5, bigSectors: 600, smallSectors: 40 });
    });
    if (c.format === 'qcow2') expectCheckClean(image);
    expectSameContent(image, c.format, ref, 'qcow2');
    if (c.snapshot) {
      // The snapshot did not change: it still reads as the image did when it was taken.
      const snap = path.join(dir, 'snap.raw');
      qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=before', image, snap);
      const before = path.join(dir, 'before.raw');
      const fresh = path.join(dir, 'fresh.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts!, fresh, String(SIZE));
      qemuIo(fresh, c.fill);
      qemuImg('convert', '-O', 'raw', fresh, before);
      expect(run('cmp', [snap, before]).code).toBe(0);
    }
    const { hits, misses, writes } = directMapCounters(logFile);
    // Most reads of the warm-up pass and the read-backs were answered natively, and writes into
    // clusters the image owns were done natively too.
    expect(hits, `hits ${hits}, misses ${misses}`).toBeGreaterThan(misses);
    expect(writes, 'writes done by the binding').toBeGreaterThan(0);
  });
});
