/** fio jobs as typed records: the command line we run (and print), and the figures we take from its JSON. */
import { commandLine, exec, firstLine } from './exec';

export interface FioJob {
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  blockSize: string;
  ioengine: 'psync' | 'libaio';
  iodepth: number;
  direct: boolean;
  /** The region of the file the job works on. */
  sizeBytes: number;
  /** Stop after this many bytes (random jobs), else the whole region once. */
  ioBytes?: number;
  /** Upper bound on the run time (the job stops early; it is not time-based). */
  runtimeCapS?: number;
  endFsync?: boolean;
}

export interface FioResult {
  bytesMoved: number;
  /** Bytes per second and operations per second of the job's direction. */
  bandwidth: number;
  iops: number;
  runtimeMs: number;
}

export function fioArgs(job: FioJob, file: string, name: string): string[] {
  const args = [
    `--name=${name}`,
    `--filename=${file}`,
    `--rw=${job.rw}`,
    `--bs=${job.blockSize}`,
    `--ioengine=${job.ioengine}`,
    `--iodepth=${job.iodepth}`,
    `--direct=${job.direct ? 1 : 0}`,
    `--size=${job.sizeBytes}`,
  ];
  if (job.ioBytes !== undefined) args.push(`--io_size=${job.ioBytes}`);
  if (job.runtimeCapS !== undefined) args.push(`--runtime=${job.runtimeCapS}`);
  if (job.endFsync) args.push('--end_fsync=1');
  if (job.rw === 'read' || job.rw === 'randread') args.push('--readonly');
  // The same random offsets on every system; no preallocation through FUSE; one summary.
  args.push('--randrepeat=1', '--randseed=4242', '--fallocate=none', '--group_reporting', '--output-format=json');
  return args;
}

export function fioCommandLine(job: FioJob, file: string, name: string): string {
  return commandLine('fio', fioArgs(job, file, name));
}

interface FioDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  runtime: number;
}

interface FioJson {
  jobs: Array<{ error: number; read: FioDirection; write: FioDirection }>;
}

/** The error fio met, in one line (e.g. "Read-only file system" for writes the engine refuses). */
function fioError(stdout: string, stderr: string, code: number): string {
  const line =
    stderr.split('\n').find((l) => /error|fail|denied|not supported|read-only/i.test(l)) ??
    stdout.split('\n').find((l) => /^fio: /.test(l)) ??
    firstLine(stderr);
  const text = (line ?? '').replace(/^fio: /, '').trim();
  // "io_u error on file /path: Read-only file system: write offset=0, buflen=4096" -> the errno text.
  const io = /io_u error on file .*?: (.+?): (?:read|write|sync|trim) offset=/.exec(text);
  return io ? `${io[1]} (fio ${/: (read|write|sync|trim) offset/.exec(text)?.[1] ?? 'I/O'})` : text || `exit status ${code}`;
}

export async function runFio(job: FioJob, file: string, name: string): Promise<FioResult> {
  const r = await exec('fio', fioArgs(job, file, name), { timeoutMs: ((job.runtimeCapS ?? 600) + 120) * 1000 });
  const start = r.stdout.indexOf('{');
  let parsed: FioJson | null = null;
  if (start >= 0) {
    try {
      parsed = JSON.parse(r.stdout.slice(start, r.stdout.lastIndexOf('}') + 1)) as FioJson;
    } catch {
      parsed = null;
    }
  }
  const j = parsed?.jobs[0];
  if (r.code !== 0 || !j || j.error !== 0) throw new Error(fioError(r.stdout, r.stderr, r.code));
  const writes = job.rw === 'write' || job.rw === 'randwrite';
  const d = writes ? j.write : j.read;
  return { bytesMoved: j.read.io_bytes + j.write.io_bytes, bandwidth: d.bw_bytes, iops: d.iops, runtimeMs: d.runtime };
}
