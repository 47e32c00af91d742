/**
 * The benchmark's external tools and the Debian packages that carry them. Missing ones are
 * installed with apt-get when we are root; otherwise we say exactly what to install.
 */
import { exec } from './exec';

export interface Tool {
  command: string;
  debianPackage: string;
}

export const TOOLS: readonly Tool[] = [
  { command: 'fio', debianPackage: 'fio' },
  { command: 'qemu-img', debianPackage: 'qemu-utils' },
  { command: 'qemu-io', debianPackage: 'qemu-utils' },
  // Debian 12 ships qemu-storage-daemon in qemu-system-common.
  { command: 'qemu-storage-daemon', debianPackage: 'qemu-system-common' },
  { command: 'qcowmount', debianPackage: 'libqcow-utils' },
  { command: 'fusermount', debianPackage: 'fuse3' },
  { command: 'losetup', debianPackage: 'util-linux' },
  { command: 'mkfs.ext4', debianPackage: 'e2fsprogs' },
  { command: 'e2fsck', debianPackage: 'e2fsprogs' },
  { command: 'tar', debianPackage: 'tar' },
];

async function hasCommand(name: string): Promise<boolean> {
  return (await exec('sh', ['-c', `command -v ${name}`])).code === 0;
}

export async function missingTools(): Promise<Tool[]> {
  const out: Tool[] = [];
  for (const t of TOOLS) if (!(await hasCommand(t.command))) out.push(t);
  return out;
}

/** Ensures every tool is present; installs what is missing as root, else throws naming the packages. */
export async function ensureTools(say: (msg: string) => void): Promise<void> {
  let missing = await missingTools();
  if (missing.length === 0) return;
  const packages = [...new Set(missing.map((t) => t.debianPackage))];
  const names = missing.map((t) => t.command).join(', ');
  if (process.getuid?.() !== 0) {
    throw new Error(`missing tools: ${names}; as root run: apt-get install -y --no-install-recommends ${packages.join(' ')}`);
  }
  say(`installing ${packages.join(' ')} (for ${names})`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  let r = await exec('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...packages], { env });
  if (r.code !== 0) {
    // The package lists may be missing or stale; refresh them once.
    await exec('apt-get', ['update', '-qq'], { env });
    r = await exec('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...packages], { env });
  }
  missing = await missingTools();
  if (missing.length > 0) {
    throw new Error(`could not install ${packages.join(' ')}: ${r.stderr.trim().split('\n').pop() ?? ''}`);
  }
}
