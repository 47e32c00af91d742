/**
 * The workloads, one small declarative entry each: which image it starts from, whether it
 * writes (then qcowmount sits it out and every run gets a fresh copy), what it measures and in
 * which unit. The runner (runner.ts) does the rest the same way for all of them.
 */
import type { FioJob } from './fio';
import type { SizeProfile } from './profile';

/**
 * data: the allocated data image; zlib/zstd: the same data compressed; empty-data: a fresh empty
 * image of the data image's size; empty-fs: a fresh empty image for ext4; big-snap: 1 TiB with
 * 3 internal snapshots.
 */
export type ImageKind = 'data' | 'zlib' | 'zstd' | 'empty-data' | 'empty-fs' | 'big-snap';

export type Unit = 'MiB/s' | 'IOPS' | 's' | 'ms';

export type Measure =
  /** A fio job; the figure is its bandwidth (MiB/s) or IOPS. */
  | { kind: 'fio'; job: (s: SizeProfile) => FioJob }
  /** losetup, mkfs.ext4, mount, untar the tree, sync, umount (timed); then e2fsck -fn must pass. */
  | { kind: 'fs-populate' }
  /** From starting the mount to a 4 KiB read of the raw file's first sector. */
  | { kind: 'mount-to-ready' };

export interface Workload {
  id: string;
  title: string;
  image: ImageKind;
  writes: boolean;
  /**
   * Drop the page cache before the run (the raw file is cold; the source image is then re-read
   * into the cache unless --cold-source). Off for mount time: a cold cache there would time
   * loading node / QEMU from disk, not mounting.
   */
  dropCaches: boolean;
  unit: Unit;
  better: 'higher' | 'lower';
  measure: Measure;
}

const seqRead = (direct: boolean) => (s: SizeProfile): FioJob => ({
  rw: 'read', blockSize: '1M', ioengine: 'psync', iodepth: 1, direct, sizeBytes: s.dataBytes,
});

const randRead = (qd: 1 | 16) => (s: SizeProfile): FioJob => ({
  rw: 'randread', blockSize: '4k', ioengine: qd === 1 ? 'psync' : 'libaio', iodepth: qd, direct: true,
  sizeBytes: s.dataBytes, ioBytes: s.randomIoBytes, runtimeCapS: s.randomRuntimeCapS,
});

const randWrite = (s: SizeProfile): FioJob => ({
  rw: 'randwrite', blockSize: '4k', ioengine: 'psync', iodepth: 1, direct: true,
  sizeBytes: s.dataBytes, ioBytes: s.randomIoBytes, runtimeCapS: s.randomRuntimeCapS, endFsync: true,
});

export const WORKLOADS: readonly Workload[] = [
  { id: 'seq-read', title: 'Sequential read 1 MiB, buffered, cold', image: 'data', writes: false, dropCaches: true, unit: 'MiB/s', better: 'higher', measure: { kind: 'fio', job: seqRead(false) } },
  { id: 'seq-read-direct', title: 'Sequential read 1 MiB, O_DIRECT', image: 'data', writes: false, dropCaches: true, unit: 'MiB/s', better: 'higher', measure: { kind: 'fio', job: seqRead(true) } },
  { id: 'rand-read-qd1', title: 'Random read 4 KiB, QD1 (psync, O_DIRECT)', image: 'data', writes: false, dropCaches: true, unit: 'IOPS', better: 'higher', measure: { kind: 'fio', job: randRead(1) } },
  { id: 'rand-read-qd16', title: 'Random read 4 KiB, QD16 (libaio, O_DIRECT)', image: 'data', writes: false, dropCaches: true, unit: 'IOPS', better: 'higher', measure: { kind: 'fio', job: randRead(16) } },
  { id: 'seq-read-zlib', title: 'Sequential read 1 MiB, zlib-compressed image', image: 'zlib', writes: false, dropCaches: true, unit: 'MiB/s', better: 'higher', measure: { kind: 'fio', job: seqRead(false) } },
  { id: 'seq-read-zstd', title: 'Sequential read 1 MiB, zstd-compressed image', image: 'zstd', writes: false, dropCaches: true, unit: 'MiB/s', better: 'higher', measure: { kind: 'fio', job: seqRead(false) } },
  { id: 'mount-ready', title: 'Mount to readable raw file, 1 TiB image with 3 snapshots', image: 'big-snap', writes: false, dropCaches: false, unit: 'ms', better: 'lower', measure: { kind: 'mount-to-ready' } },
  {
    id: 'seq-write', title: 'Sequential allocating write 1 MiB + final fsync, empty image', image: 'empty-data', writes: true, dropCaches: true, unit: 'MiB/s', better: 'higher',
    measure: { kind: 'fio', job: (s) => ({ rw: 'write', blockSize: '1M', ioengine: 'psync', iodepth: 1, direct: false, sizeBytes: s.seqWriteBytes, endFsync: true }) },
  },
  { id: 'rand-write-empty', title: 'Random write 4 KiB, O_DIRECT, QD1, empty image', image: 'empty-data', writes: true, dropCaches: true, unit: 'IOPS', better: 'higher', measure: { kind: 'fio', job: randWrite } },
  { id: 'rand-write-alloc', title: 'Random write 4 KiB, O_DIRECT, QD1, allocated image', image: 'data', writes: true, dropCaches: true, unit: 'IOPS', better: 'higher', measure: { kind: 'fio', job: randWrite } },
  { id: 'fs-populate', title: 'ext4: mkfs, mount, untar many small files, sync, umount (then e2fsck -fn)', image: 'empty-fs', writes: true, dropCaches: true, unit: 's', better: 'lower', measure: { kind: 'fs-populate' } },
];
