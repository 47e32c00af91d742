/** The machine: what it is (for the report), its page cache, and per-process counters in /proc. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import { exec, must } from './exec';

export interface MachineInfo {
  cpuModel: string;
  cores: number;
  ramBytes: number;
  kernel: string;
  os: string;
  node: string;
  versions: Record<string, string>;
}

function osName(): string {
  try {
    const m = /^PRETTY_NAME="?([^"\n]*)"?/m.exec(fs.readFileSync('/etc/os-release', 'utf8'));
    return m?.[1] ?? os.type();
  } catch {
    return os.type();
  }
}

async function versionOf(cmd: string, args: string[]): Promise<string> {
  const r = await exec(cmd, args).catch(() => null);
  if (!r) return 'missing';
  return (r.stdout + r.stderr).split('\n').find((l) => l.trim())?.trim() ?? '?';
}

export async function machineInfo(): Promise<MachineInfo> {
  const cpus = os.cpus();
  return {
    cpuModel: cpus[0]?.model.trim() ?? '?',
    cores: cpus.length,
    ramBytes: os.totalmem(),
    kernel: os.release(),
    os: osName(),
    node: process.version,
    versions: {
      fio: await versionOf('fio', ['--version']),
      'qemu-img': await versionOf('qemu-img', ['--version']),
      'qemu-storage-daemon': await versionOf('qemu-storage-daemon', ['--version']),
      qcowmount: await versionOf('qcowmount', ['-V']),
    },
  };
}

/** Writes back dirty pages and drops the page cache, dentries and inodes (needs root). */
export async function dropCaches(): Promise<void> {
  await must('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

/** Reads a file once so that its pages are in the page cache (a page-cached image, as in the targets). */
export async function warmFile(path: string): Promise<void> {
  await must('sh', ['-c', 'cat -- "$1" > /dev/null', 'sh', path]);
}

const CLOCK_TICKS_PER_SECOND = 100;

/** CPU seconds (user + system) a process has used so far, from /proc/PID/stat. */
export function cpuSeconds(pid: number): number | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the ")" that ends the command name; utime and stime are fields 14 and 15.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    return (utime + stime) / CLOCK_TICKS_PER_SECOND;
  } catch {
    return null;
  }
}

/** Peak resident set size (VmHWM) of a process in bytes, from /proc/PID/status. */
export function peakRssBytes(pid: number): number | null {
  try {
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.charAt(stat.lastIndexOf(')') + 2) !== 'Z';
  } catch {
    return false;
  }
}

/** PIDs whose command line satisfies `match` (used to find daemons that fork away from us). */
export function findProcesses(match: (argv: string[]) => boolean): number[] {
  const out: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const argv = fs.readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').filter((a) => a.length > 0);
      if (argv.length > 0 && match(argv) && processAlive(Number(name))) out.push(Number(name));
    } catch {
      // Gone meanwhile.
    }
  }
  return out;
}
