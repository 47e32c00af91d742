/** How big the benchmark's images and runs are: the full run, and --quick (the whole run < 5 minutes). */
export interface SizeProfile {
  name: 'full' | 'quick';
  /** Allocated data in the data, zlib and zstd images (and their virtual size). */
  dataBytes: number;
  /** Bytes written by the sequential allocating write. */
  seqWriteBytes: number;
  /** Bytes moved by each random 4 KiB workload (it stops earlier at randomRuntimeCapS). */
  randomIoBytes: number;
  randomRuntimeCapS: number;
  /** The file tree copied onto ext4: about this many bytes in this many files. */
  treeBytes: number;
  treeFiles: number;
  /** Virtual size of the image that gets the ext4 filesystem. */
  fsImageBytes: number;
  repetitions: number;
}

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

export const FULL: SizeProfile = {
  name: 'full',
  dataBytes: 2 * GiB,
  seqWriteBytes: 1 * GiB,
  randomIoBytes: 256 * MiB,
  randomRuntimeCapS: 30,
  treeBytes: 500 * MiB,
  treeFiles: 20000,
  fsImageBytes: 4 * GiB,
  repetitions: 3,
};

export const QUICK: SizeProfile = {
  name: 'quick',
  dataBytes: 512 * MiB,
  seqWriteBytes: 256 * MiB,
  randomIoBytes: 24 * MiB,
  randomRuntimeCapS: 8,
  treeBytes: 48 * MiB,
  treeFiles: 2000,
  fsImageBytes: 1 * GiB,
  repetitions: 2,
};

export { MiB, GiB };
