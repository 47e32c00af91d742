/**
 * The mount lifecycle and CLI surface of issue 2: `out=$(qcow2fs mount ...)` returns at once,
 * relative paths, one-line errors for bad mountpoints and images, umount waits for the daemon,
 * SIGTERM/SIGINT unmount cleanly, --help examples, --version, and `info` agreeing with qemu-img.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BIN, isMounted, need, qcow2fs, qemuImg, qemuIo, qemuRawSha, REPO, removeScratch, run, scratchDir, sha256File, withMount,
} from './support/env';

const MiB = 1024 * 1024;

beforeAll(() => need('qemu-img', 'qemu-io', 'pgrep', '/dev/fuse', 'fusermount'));
afterAll(() => removeScratch());

function smallImage(dir: string, name = 'disk.qcow2'): string {
  const img = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', img, String(8 * MiB));
  qemuIo(img, ['write -q -P 0x5a 1000 300000']);
  return img;
}

function daemonPids(mp: string): number[] {
  return run('pgrep', ['-f', `daemon-of ${mp}`]).stdout.split('\n').filter(Boolean).map(Number);
}

/** Alive and not a zombie (a reparented daemon may wait unreaped when PID 1 does not reap). */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 25));
  }
  return cond();
}

function oneLine(r: { code: number; stderr: string }, pattern: RegExp): void {
  expect(r.code).not.toBe(0);
  const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^qcow2fs: /);
  expect(lines[0]).toMatch(pattern);
  expect(r.stderr).not.toMatch(/^\s+at /m);
}

/** Best-effort cleanup for tests that mount by hand. */
function forceUnmount(mp: string): void {
  if (isMounted(mp)) {
    if (qcow2fs(['umount', mp]).code !== 0) run('fusermount', ['-u', '-z', mp]);
  }
}

describe('mount returns promptly with the caller\'s pipes closed', () => {
  it('closes stdout/stderr pipes when the mount is ready (spawned with pipes)', async () => {
    const dir = scratchDir('pipes');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    try {
      const t0 = Date.now();
      const result = await new Promise<{ code: number | null; stdout: string; stderr: string; ms: number }>((resolve, reject) => {
        const child = spawn(process.execPath, [BIN, 'mount', img, mp], { stdio: ['pipe', 'pipe', 'pipe'] });
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        const timer = setTimeout(() => reject(new Error('mount kept its stdio pipes open for 10 s')), 10_000);
        // 'close' fires only once every holder of the pipes (the daemon too) has closed them.
        child.on('close', (code) => {
          clearTimeout(timer);
          resolve({ code, stdout, stderr, ms: Date.now() - t0 });
        });
      });
      expect(result.stderr).toBe('');
      expect(result.code).toBe(0);
      expect(result.ms).toBeLessThan(5000);
      expect(isMounted(mp)).toBe(true);
      expect(daemonPids(mp)).toHaveLength(1);
      expect(fs.statSync(path.join(mp, 'disk.raw')).size).toBe(8 * MiB);
    } finally {
      forceUnmount(mp);
    }
  });

  it('works inside $( ) in a shell', () => {
    const dir = scratchDir('subst');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    try {
      const script = `out=$("${process.execPath}" "${BIN}" mount "${img}" "${mp}"); rc=$?; echo "rc=$rc out=[$out]"`;
      const t0 = Date.now();
      const r = run('timeout', ['20', 'sh', '-c', script]);
      expect(r.code).toBe(0);
      expect(r.stdout.trim()).toBe('rc=0 out=[]');
      expect(Date.now() - t0).toBeLessThan(5000);
      expect(isMounted(mp)).toBe(true);
    } finally {
      forceUnmount(mp);
    }
  });
});

describe('relative paths', () => {
  it('resolves the image and the mountpoint from the caller\'s working directory', () => {
    const dir = scratchDir('rel');
    fs.mkdirSync(path.join(dir, 'images'));
    fs.mkdirSync(path.join(dir, 'mnt'));
    const img = smallImage(path.join(dir, 'images'), 'rel disk.qcow2');
    const mp = path.join(dir, 'mnt');
    try {
      const r = qcow2fs(['mount', '--read-only', 'images/rel disk.qcow2', './mnt'], { cwd: dir });
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(isMounted(mp)).toBe(true);
      expect(sha256File(path.join(mp, 'rel disk.raw'))).toBe(qemuRawSha(img));
      const u = qcow2fs(['umount', 'mnt'], { cwd: dir });
      expect(u.code).toBe(0);
      expect(isMounted(mp)).toBe(false);
    } finally {
      forceUnmount(mp);
    }
  });
});

describe('symlinked mountpoint', () => {
  it('stays mounted and unmounts through the symlink (the kernel lists the real path)', async () => {
    const dir = scratchDir('symlink');
    const img = smallImage(dir);
    const real = path.join(dir, 'real');
    fs.mkdirSync(real);
    fs.symlinkSync('real', path.join(dir, 'link'));
    fs.symlinkSync(dir, path.join(dir, 'self')); // a symlinked parent directory too
    const via = path.join(dir, 'self', 'link');
    try {
      const r = qcow2fs(['mount', '--read-only', img, via]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const pids = daemonPids(real);
      expect(pids).toHaveLength(1);
      // The daemon must not mistake the symlink for an unmount (it polls every 250 ms).
      await new Promise((res) => setTimeout(res, 1000));
      expect(alive(pids[0]!)).toBe(true);
      expect(isMounted(real)).toBe(true);
      expect(sha256File(path.join(via, 'disk.raw'))).toBe(qemuRawSha(img));
      oneLine(qcow2fs(['mount', img, via]), /is busy/);
      const u = qcow2fs(['umount', via]);
      expect(u.stderr).toBe('');
      expect(u.code).toBe(0);
      expect(alive(pids[0]!)).toBe(false);
      expect(isMounted(real)).toBe(false);
    } finally {
      forceUnmount(real);
    }
  });
});

describe('mount errors are one line', () => {
  it('refuses a busy mountpoint, a missing mountpoint, a missing image and a file as mountpoint', async () => {
    const dir = scratchDir('errs');
    const img = smallImage(dir);
    await withMount(img, ['--read-only'], (_raw, mp) => {
      const again = qcow2fs(['mount', img, mp]);
      oneLine(again, /is busy: .* is already mounted there/);
      expect(daemonPids(mp)).toHaveLength(1);
    });
    const mp = scratchDir('mnt');
    oneLine(qcow2fs(['mount', img, path.join(dir, 'no-such-dir')]), /no-such-dir.*no such file or directory/);
    oneLine(qcow2fs(['mount', path.join(dir, 'missing.qcow2'), mp]), /missing\.qcow2.*no such file or directory/);
    const file = path.join(dir, 'regular-file');
    fs.writeFileSync(file, 'x');
    oneLine(qcow2fs(['mount', img, file]), /regular-file.*not a directory/);
    oneLine(qcow2fs(['mount', dir, mp]), /is a directory/);
    const full = path.join(dir, 'full');
    fs.mkdirSync(full);
    fs.writeFileSync(path.join(full, 'precious.txt'), 'keep');
    oneLine(qcow2fs(['mount', img, full]), /full is not empty/);
    expect(isMounted(full)).toBe(false);
    oneLine(qcow2fs(['umount', mp]), /not mounted/);
    expect(isMounted(mp)).toBe(false);
    expect(daemonPids(mp)).toEqual([]);
  });

  it('an image on a block device that fills up: fsync\'d data kept, the failure reported by umount (exit 1, one line)', async () => {
    need('qemu-img', 'qemu-io', 'losetup', '/dev/loop-control', 'root', 'dd');
    const dir = scratchDir('devfull');
    const backing = path.join(dir, 'dev.img');
    fs.writeFileSync(backing, Buffer.alloc(24 * MiB));
    const img = path.join(dir, 'q.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '100M');
    const dev = run('losetup', ['-f', '--show', backing]).stdout.trim();
    const mp = scratchDir('mnt');
    try {
      expect(run('dd', [`if=${img}`, `of=${dev}`, 'conv=fsync', 'status=none']).code).toBe(0);
      expect(qcow2fs(['mount', dev, mp]).code).toBe(0);
      const raw = path.join(mp, fs.readdirSync(mp).find((f) => f.endsWith('.raw'))!);
      const fd = fs.openSync(raw, 'r+');
      fs.writeSync(fd, Buffer.alloc(MiB, 0x41), 0, MiB, 0);
      fs.fsyncSync(fd);
      let failed = false;
      try {
        for (let i = 0; i < 48; i++) fs.writeSync(fd, Buffer.alloc(MiB, i + 1), 0, MiB, 8 * MiB + i * MiB);
        fs.fsyncSync(fd);
      } catch {
        failed = true;
      }
      try {
        fs.closeSync(fd); // the close flushes too, and fails likewise
      } catch {
        failed = true;
      }
      expect(failed, 'writing 48 MiB onto a 24 MiB device fails').toBe(true);
      const u = qcow2fs(['umount', mp]);
      expect(u.code).toBe(1);
      expect(u.stderr.trim().split('\n')).toHaveLength(1);
      expect(u.stderr).toMatch(/not saved completely: .*no space left on device/);
      expect(isMounted(mp)).toBe(false);
      // What was fsync'd is there, and QEMU finds no corruption.
      const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x41 0 1M', dev]);
      expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|error/i);
      expect(run('qemu-img', ['check', dev]).code).not.toBe(2);
    } finally {
      if (isMounted(mp)) forceUnmount(mp);
      run('losetup', ['-d', dev]);
    }
  });

  it('exit status 2 for what the user can fix, 1 for a bad image (README "Exit codes"), from the shell and the Node launcher', async () => {
    const dir = scratchDir('codes');
    const img = smallImage(dir);
    const bad = path.join(dir, 'truncated.qcow2');
    fs.writeFileSync(bad, fs.readFileSync(img).subarray(0, 100));
    const hostile = path.join(dir, 'hostile.qcow2');
    const h = Buffer.from(fs.readFileSync(img));
    h.writeBigUInt64BE(1n << 50n, 40); // l1_table_offset far past the end of the file
    fs.writeFileSync(hostile, h);
    const mp = scratchDir('mnt');
    for (const launch of [(a: string[]) => qcow2fs(a), (a: string[]) => run(process.execPath, [path.join(REPO, 'dist', 'cli', 'main.js'), ...a])]) {
      expect(launch(['mount', bad, mp]).code, 'truncated image').toBe(1);
      expect(launch(['mount', hostile, mp]).code, 'hostile image').toBe(1);
      expect(launch(['mount', path.join(dir, 'missing.qcow2'), mp]).code, 'missing image').toBe(2);
      expect(launch(['mount', img, path.join(dir, 'no-such-dir')]).code, 'missing mountpoint').toBe(2);
      expect(isMounted(mp)).toBe(false);
    }
    await withMount(img, ['--read-only'], (_raw, busy) => {
      expect(qcow2fs(['mount', img, busy]).code, 'busy mountpoint').toBe(2);
    });
  });
});

describe('argument errors of every verb are one line with the details', () => {
  it('missing arguments and bad choices', () => {
    const dir = scratchDir('argerr');
    const img = smallImage(dir);
    oneLine(qcow2fs(['info']), /Not enough non-option arguments/);
    oneLine(qcow2fs(['info', '--output', 'xml', img]), /Invalid values: .*output.*"xml".*"human", "json"/);
    oneLine(qcow2fs(['map', '-f', 'vmdk', img]), /Invalid values: .*"vmdk"/);
    oneLine(qcow2fs(['convert', img]), /need at least 2/);
  });
});

describe('--read-ahead', () => {
  it("sets the kernel's read-ahead on the mount (1 MiB by default, 0: the kernel's 128 KiB); bad values are one line", async () => {
    const dir = scratchDir('ra');
    const img = smallImage(dir);
    const readAheadKib = (mp: string): number => {
      const dev = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').map((l) => l.split(' ')).find((f) => f[4] === mp)?.[2];
      return Number(fs.readFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, 'utf8'));
    };
    for (const [args, kib] of [[[], 1024], [['--read-ahead', '4M'], 4096], [['--read-ahead', '0'], 128]] as const) {
      await withMount(img, ['--read-only', ...args], (raw, mp) => {
        expect(readAheadKib(mp), args.join(' ')).toBe(kib);
        expect(fs.readFileSync(raw).subarray(1000, 1010).equals(Buffer.alloc(10, 0x5a))).toBe(true);
      });
    }
    const mp = scratchDir('mnt');
    oneLine(qcow2fs(['mount', '--read-ahead', '1K', img, mp]), /--read-ahead 1K: expected 0 .* or 4K to 64M/);
    oneLine(qcow2fs(['mount', '--read-ahead', 'lots', img, mp]), /--read-ahead "lots"/);
    expect(isMounted(mp)).toBe(false);
  });
});

describe('umount', () => {
  it('returns only after the daemon has exited', () => {
    const dir = scratchDir('umount');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    try {
      expect(qcow2fs(['mount', img, mp]).code).toBe(0);
      const pids = daemonPids(mp);
      expect(pids).toHaveLength(1);
      expect(alive(pids[0]!)).toBe(true);
      const u = qcow2fs(['umount', mp]);
      expect(u.stderr).toBe('');
      expect(u.code).toBe(0);
      // Checked at once, without waiting: umount already waited.
      expect(alive(pids[0]!)).toBe(false);
      expect(isMounted(mp)).toBe(false);
    } finally {
      forceUnmount(mp);
    }
  });

  it('refuses a busy mount with one line, and --lazy detaches it', async () => {
    const dir = scratchDir('lazy');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    try {
      expect(qcow2fs(['mount', img, mp]).code).toBe(0);
      const pid = daemonPids(mp)[0]!;
      const fd = fs.openSync(path.join(mp, 'disk.raw'), 'r');
      try {
        oneLine(qcow2fs(['umount', mp]), /is busy/);
        expect(isMounted(mp)).toBe(true);
        expect(qcow2fs(['umount', '--lazy', mp]).code).toBe(0);
        expect(isMounted(mp)).toBe(false);
        // The open file still reads until it is closed.
        const buf = Buffer.alloc(4);
        expect(fs.readSync(fd, buf, 0, 4, 1000)).toBe(4);
        expect(buf.equals(Buffer.alloc(4, 0x5a))).toBe(true);
      } finally {
        fs.closeSync(fd);
      }
      expect(await waitFor(() => !alive(pid), 10_000)).toBe(true);
    } finally {
      forceUnmount(mp);
    }
  });
});

describe('signals and a dead daemon', () => {
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    it(`${sig} to the daemon unmounts cleanly`, async () => {
      const dir = scratchDir('sig');
      const img = smallImage(dir);
      const sha = sha256File(img);
      const mp = path.join(dir, 'mnt');
      fs.mkdirSync(mp);
      try {
        expect(qcow2fs(['mount', img, mp]).code).toBe(0);
        const pid = daemonPids(mp)[0]!;
        process.kill(pid, sig);
        expect(await waitFor(() => !alive(pid), 10_000)).toBe(true);
        expect(isMounted(mp)).toBe(false);
        expect(fs.readdirSync(mp)).toEqual([]); // not a stale (ENOTCONN) mount
        expect(sha256File(img)).toBe(sha);
      } finally {
        forceUnmount(mp);
      }
    });
  }

  it('a killed daemon leaves a stale mount that mount reports and umount cleans', async () => {
    const dir = scratchDir('dead');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    try {
      expect(qcow2fs(['mount', img, mp]).code).toBe(0);
      const pid = daemonPids(mp)[0]!;
      process.kill(pid, 'SIGKILL');
      expect(await waitFor(() => !alive(pid), 10_000)).toBe(true);
      expect(() => fs.statSync(mp)).toThrow(/ENOTCONN|ECONNABORTED/);
      oneLine(qcow2fs(['mount', img, mp]), /is a stale FUSE mount/);
      oneLine(qcow2fs(['mount', '--read-only', img, mp]), /is a stale FUSE mount/);
      const u = qcow2fs(['umount', mp]);
      expect(u.code).toBe(0);
      expect(isMounted(mp)).toBe(false);
      expect(fs.readdirSync(mp)).toEqual([]);
    } finally {
      if (isMounted(mp)) run('fusermount', ['-u', '-z', mp]);
    }
  });
});

describe('--foreground and request size', () => {
  it('stays attached, serves 1 MiB read requests, and Ctrl-C (SIGINT) unmounts and exits 0', async () => {
    const dir = scratchDir('fg');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    const child = spawn(process.execPath, [BIN, 'mount', '--foreground', '--read-only', img, mp], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      expect(await waitFor(() => isMounted(mp), 10_000), stderr).toBe(true);
      expect(child.exitCode).toBeNull(); // still attached
      const want = qemuRawSha(img);
      expect(sha256File(path.join(mp, 'disk.raw'))).toBe(want);
      // O_DIRECT 1 MiB reads (one request each with FUSE_MAX_PAGES, queued with FUSE_ASYNC_DIO).
      const direct = execFileSync('dd', [`if=${path.join(mp, 'disk.raw')}`, 'iflag=direct', 'bs=1M', 'status=none'], { maxBuffer: 1 << 30 });
      expect(createHash('sha256').update(direct).digest('hex')).toBe(want);
      // Big requests: the kernel was told max_read=1 MiB (fuse-native has no option for it; reads
      // above 128 KiB need FUSE_MAX_PAGES, which the vendored binding adds to the INIT answer).
      const line = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').find((l) => l.split(' ')[4] === mp) ?? '';
      expect(line).toMatch(/max_read=1048576/);
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(isMounted(mp)).toBe(false);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      forceUnmount(mp);
    }
  });
});

describe('--foreground and signals at start-up', () => {
  it('a SIGINT at any moment of start-up never leaves a dead mount behind', async () => {
    const dir = scratchDir('fgsig');
    const img = smallImage(dir);
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    const codes: (number | null)[] = [];
    let sawMounted = 0;
    try {
      // How long until the mount shows; then SIGINTs spread over start-up (before the image is
      // open, once serving) and packed around that moment, where the kernel mount exists but the
      // daemon is not serving yet.
      const t0 = Date.now();
      const probe = spawn(BIN, ['mount', '--foreground', '--read-only', img, mp], { stdio: 'ignore' });
      const probeExit = new Promise((resolve) => probe.on('exit', resolve));
      expect(await waitFor(() => isMounted(mp), 10_000)).toBe(true);
      const shows = Date.now() - t0;
      probe.kill('SIGINT');
      await probeExit;
      const delays = [20, 60, 100, shows + 100, shows + 300];
      for (let d = Math.max(1, shows - 24); d <= shows + 24; d += 4) delays.push(d);
      for (const delay of delays) {
        const child = spawn(BIN, ['mount', '--foreground', '--read-only', img, mp], { stdio: ['ignore', 'ignore', 'pipe'] });
        const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
        await new Promise((r) => setTimeout(r, delay));
        if (isMounted(mp)) sawMounted++;
        child.kill('SIGINT');
        codes.push(await exited);
        // The mount is gone with the process: no "Transport endpoint is not connected" left.
        expect(isMounted(mp), `SIGINT after ${delay} ms left the mount behind`).toBe(false);
        expect(() => fs.readdirSync(mp), `mountpoint after a SIGINT at ${delay} ms`).not.toThrow();
      }
    } finally {
      forceUnmount(mp);
    }
    // Killed before Node set its handlers (no status), interrupted while opening (130), or
    // stopped cleanly (0); some of them once the mount was there.
    expect(codes.every((c) => c === null || c === 0 || c === 130), codes.join(',')).toBe(true);
    expect(sawMounted).toBeGreaterThan(0);
  });
});

describe('help and version', () => {
  it('--help of each verb shows an example; --version prints the package version', () => {
    for (const verb of ['mount', 'umount', 'info']) {
      const r = qcow2fs([verb, '--help']);
      expect(r.code, verb).toBe(0);
      expect(r.stdout, verb).toMatch(/Examples:/);
      expect(r.stdout, verb).toMatch(new RegExp(`qcow2fs ${verb} `));
    }
    const top = qcow2fs(['--help']);
    expect(top.code).toBe(0);
    for (const verb of ['mount', 'umount', 'info']) expect(top.stdout).toMatch(new RegExp(`qcow2fs ${verb}`));
    const pkg = JSON.parse(fs.readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string };
    const v = qcow2fs(['--version']);
    expect(v.code).toBe(0);
    expect(v.stdout.trim()).toBe(pkg.version);
    const bad = qcow2fs(['frobnicate']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).not.toMatch(/^\s+at /m);
    oneLine(qcow2fs(['info', '--log-level', 'loud', path.join(REPO, 'package.json')]), /--log-level loud/);
  });
});

interface QemuInfo {
  'virtual-size': number;
  'cluster-size'?: number;
  format: string;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type: string; data: { compat: string; 'compression-type'?: string; 'extended-l2'?: boolean; 'refcount-bits': number } };
}

describe('info', () => {
  it('prints format, virtual size, cluster size, compat and backing file as qemu-img does', () => {
    const dir = scratchDir('info');
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(3 * MiB));
    const images: Array<[string, string[]]> = [
      ['v2.qcow2', ['-o', 'compat=0.10,cluster_size=4096']],
      ['v3.qcow2', ['-o', 'compat=1.1,cluster_size=512']],
      ['zstd.qcow2', ['-o', 'compression_type=zstd,cluster_size=2M']],
      ['extl2.qcow2', ['-o', 'extended_l2=on,refcount_bits=64']],
      ['overlay.qcow2', ['-b', 'base.raw', '-F', 'raw']],
    ];
    for (const [name, opts] of images) {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', ...opts, img, String(10 * MiB + 512));
      const want = JSON.parse(qemuImg('info', '--output', 'json', img)) as QemuInfo;
      const r = qcow2fs(['info', '--output', 'json', img]);
      expect(r.stderr, name).toBe('');
      expect(r.code, name).toBe(0);
      const got = JSON.parse(r.stdout) as QemuInfo;
      expect(got.format, name).toBe(want.format);
      expect(got['virtual-size'], name).toBe(want['virtual-size']);
      expect(got['cluster-size'], name).toBe(want['cluster-size']);
      expect(got['backing-filename'], name).toBe(want['backing-filename']);
      expect(got['backing-filename-format'], name).toBe(want['backing-filename-format']);
      const wd = want['format-specific']!.data;
      const gd = got['format-specific']!.data;
      expect(gd.compat, name).toBe(wd.compat);
      expect(gd['compression-type'], name).toBe(wd['compression-type']);
      expect(gd['extended-l2'], name).toBe(wd['extended-l2']);
      expect(gd['refcount-bits'], name).toBe(wd['refcount-bits']);
      // The human form names the same values.
      const h = qcow2fs(['info', img]);
      expect(h.code, name).toBe(0);
      expect(h.stdout).toMatch(/^file format: qcow2$/m);
      expect(h.stdout).toContain(`(${want['virtual-size']} bytes)`);
      expect(h.stdout).toMatch(new RegExp(`^cluster_size: ${want['cluster-size']}$`, 'm'));
      expect(h.stdout).toMatch(new RegExp(`^\\s+compat: ${wd.compat.replace('.', '\\.')}$`, 'm'));
      if (want['backing-filename']) expect(h.stdout).toMatch(new RegExp(`^backing file: ${want['backing-filename']}`, 'm'));
    }
    // A raw file is reported as raw, like qemu-img.
    const r = qcow2fs(['info', '--output', 'json', base]);
    expect(r.code).toBe(0);
    expect((JSON.parse(r.stdout) as QemuInfo).format).toBe('raw');
    expect((JSON.parse(r.stdout) as QemuInfo)['virtual-size']).toBe(3 * MiB);
  });
});
