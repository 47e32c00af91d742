/**
 * Shared test support: run external tools, build scratch dirs, mount through the real CLI.
 * A test that needs a tool calls need(): when the tool is missing the test FAILS (it never
 * skips), with the command that installs it; scripts/setup-system.sh installs them all.
 */
import { spawn, spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export const REPO = path.resolve(__dirname, '..', '..');
export const BIN = path.join(REPO, 'bin', 'qcow2fs');

const TOOL_PACKAGE: Record<string, string> = {
  'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', fusermount: 'fuse3', fusermount3: 'fuse3',
  sfdisk: 'fdisk', fdisk: 'fdisk', 'mkfs.ext4': 'e2fsprogs', e2fsck: 'e2fsprogs', debugfs: 'e2fsprogs',
  resize2fs: 'e2fsprogs', losetup: 'util-linux', partx: 'util-linux', mount: 'mount', umount: 'mount',
  mmls: 'sleuthkit', fls: 'sleuthkit', fio: 'fio', 'qemu-storage-daemon': 'qemu-system-common', pgrep: 'procps',
  mknod: 'coreutils', mkfifo: 'coreutils',
};

function hasCommand(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

/** Assert that tools (and /dev/fuse or loop devices when asked) exist; throw otherwise. */
export function need(...tools: string[]): void {
  const missing: string[] = [];
  for (const t of tools) {
    if (t === '/dev/fuse' || t === '/dev/loop-control') {
      if (!fs.existsSync(t)) missing.push(t);
    } else if (t === 'root') {
      if (process.getuid?.() !== 0) missing.push('root privileges');
    } else if (!hasCommand(t)) missing.push(t);
  }
  if (missing.length) {
    const pkgs = [...new Set(missing.map((m) => TOOL_PACKAGE[m]).filter(Boolean))];
    throw new Error(`missing for this test: ${missing.join(', ')}` +
      (pkgs.length ? ` (apt-get install ${pkgs.join(' ')}; or run scripts/setup-system.sh as root)` : ''));
  }
}

export interface RunResult { code: number; stdout: string; stderr: string }

/** Run a command synchronously; never throws on a non-zero exit (callers assert on code). */
export function run(cmd: string, args: string[], opts: SpawnSyncOptions = {}): RunResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 256 << 20, timeout: 600_000, ...opts });
  if (r.error) throw r.error;
  return { code: r.status ?? (r.signal ? 128 : 1), stdout: String(r.stdout ?? ''), stderr: String(r.stderr ?? '') };
}

/** Run a command and throw (with its stderr) if it fails. Returns stdout. */
export function sh(cmd: string, args: string[], opts: SpawnSyncOptions = {}): string {
  const r = run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

export const qemuImg = (...args: string[]): string => sh('qemu-img', args);
/** qemu-io on an image; -f qcow2 unless the args already say otherwise. Commands are -c strings. */
export function qemuIo(image: string, cmds: string[], format = 'qcow2'): string {
  const out = sh('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), image]);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}: ${out.trim()}`);
  return out;
}

/**
 * Run the qcow2fs CLI (built dist) as users do, as a command (its #! line: the shell part of
 * bin/qcow2fs, which starts a plain mount's daemon itself), and return its result. Tests that
 * want the Node launcher alone run `process.execPath BIN ...`.
 */
export function qcow2fs(args: string[], opts: SpawnSyncOptions = {}): RunResult {
  return run(BIN, args, opts);
}

/** Run the CLI asynchronously (for commands that must not block the test's event loop). */
export function qcow2fsAsync(args: string[], opts: { cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}

const scratch: string[] = [];
/** A fresh scratch directory under the OS temp dir; removeScratch() deletes them all. */
export function scratchDir(tag = 't'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `qcow2fs-${tag}-`));
  scratch.push(d);
  return d;
}
export function removeScratch(): void {
  for (const d of scratch.splice(0)) {
    try { fs.rmSync(d, { recursive: true, force: true }); } catch { /* a still-mounted dir stays */ }
  }
}

export function sha256File(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(4 << 20);
  try {
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** SHA-256 of what QEMU says the image contains (qemu-img convert -O raw). */
export function qemuRawSha(image: string, extra: string[] = []): string {
  const dir = scratchDir('ref');
  const out = path.join(dir, 'ref.raw');
  qemuImg('convert', ...extra, '-O', 'raw', image, out);
  const sum = sha256File(out);
  fs.rmSync(dir, { recursive: true, force: true });
  return sum;
}

export function isMounted(mountpoint: string): boolean {
  const mp = path.resolve(mountpoint);
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === mp);
}

/** Mount IMAGE with the real CLI (daemonized), run fn with the raw file's path, always unmount. */
export async function withMount<T>(
  image: string,
  extraArgs: string[],
  fn: (raw: string, mountpoint: string) => Promise<T> | T,
): Promise<T> {
  need('/dev/fuse', 'fusermount');
  const mp = scratchDir('mnt');
  const r = qcow2fs(['mount', image, mp, ...extraArgs]);
  if (r.code !== 0) throw new Error(`qcow2fs mount failed (${r.code}): ${r.stderr.trim()}`);
  const name = path.basename(image).replace(/\.[^.]*$/, '') + '.raw';
  try {
    return await fn(path.join(mp, name), mp);
  } finally {
    const u = qcow2fs(['umount', mp]);
    if (u.code !== 0 && isMounted(mp)) {
      run('fusermount', ['-u', '-z', mp]);
      throw new Error(`qcow2fs umount failed (${u.code}): ${u.stderr.trim()}`);
    }
  }
}

/** Deterministic pseudo-random bytes (xorshift32) so failures reproduce from the seed. */
export function seededBytes(seed: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 0x9e3779b9;
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** A small seeded PRNG for choosing offsets/lengths. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x100000000;
  };
}
