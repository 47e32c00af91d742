/**
 * bin/qcow2fs's shell fast path (src/cli/relay.ts): run as a command, a plain `mount` starts the
 * daemon's Node process from the shell, with no Node launcher. It must be indistinguishable from
 * the Node launcher (`node bin/qcow2fs`, which never takes the shell path): same messages, same
 * exit statuses, same daemon command line, ready when it returns, nothing left behind on errors.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { COMMANDS } from '../src/cli/verbs';
import { daemonPids, forceCleanup } from './support/daemons';
import { BIN, isMounted, need, qemuImg, qemuIo, qemuRawSha, removeScratch, run, scratchDir, sha256File, type RunResult } from './support/env';

const MiB = 1024 * 1024;
let dir: string;
let img: string;
const mountpoints: string[] = [];

function mountpoint(): string {
  const mp = scratchDir('shmp');
  mountpoints.push(mp);
  return mp;
}

/** As a command: /bin/sh runs the shell part (the #! line). */
const viaShell = (args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): RunResult => run(BIN, args, opts);
/** As `node bin/qcow2fs`: the Node launcher only. */
const viaNode = (args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): RunResult => run(process.execPath, [BIN, ...args], opts);

beforeAll(() => {
  need('root', '/dev/fuse', 'fusermount', 'qemu-img', 'qemu-io', 'setsid');
  dir = scratchDir('sh');
  img = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, String(16 * MiB));
  qemuIo(img, ['write -q -P 0x5a 0 1M']);
  qemuImg('snapshot', '-c', 'snap one', img);
  fs.writeFileSync(path.join(dir, 'corrupt.qcow2'), Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(508, 0xff)]));
  fs.writeFileSync(path.join(dir, 'file'), 'x');
  fs.mkdirSync(path.join(dir, 'full'));
  fs.writeFileSync(path.join(dir, 'full', 'keep'), 'x');
});

afterAll(() => {
  for (const mp of mountpoints) forceCleanup(mp);
  removeScratch();
});

describe('the shell part of bin/qcow2fs', () => {
  it('knows the same verbs as the CLI (anything else with two arguments is the mount-helper form)', () => {
    const text = fs.readFileSync(BIN, 'utf8');
    const m = /^\s*(mount\|[a-z|-]+)\|-\*\) q_cmd=\$1 ;;$/m.exec(text);
    expect(m, 'the verb list in bin/qcow2fs').not.toBeNull();
    expect(m![1]!.split('|').sort()).toEqual([...COMMANDS].sort());
  });

  it('is POSIX sh, and its JavaScript comment is not cut short', () => {
    const text = fs.readFileSync(BIN, 'utf8');
    const shellPart = text.slice(text.indexOf('":" /*') + 6, text.indexOf('\n*/\n'));
    expect(shellPart).not.toContain('*/');
    const file = path.join(dir, 'part.sh');
    fs.writeFileSync(file, shellPart);
    const r = run('sh', ['-n', file]);
    expect(r.code, r.stderr).toBe(0);
    if (fs.existsSync('/bin/dash')) expect(run('dash', ['-n', file]).code).toBe(0);
  });
});

describe('errors and exit statuses are the Node launcher\'s', () => {
  it('prints the same one line with the same status for bad arguments, files, mountpoints and images', () => {
    const mp = mountpoint();
    const cases: string[][] = [
      ['mount', img, path.join(dir, 'no-such-dir')],
      ['mount', path.join(dir, 'missing.qcow2'), mp],
      ['mount', img, path.join(dir, 'file')],
      ['mount', img, path.join(dir, 'full')],
      ['mount', dir, mp],
      ['mount', path.join(dir, 'corrupt.qcow2'), mp],
      ['mount', '--format', 'qcow2', path.join(dir, 'file'), mp],
      ['mount', '--format', 'vmdk', img, mp],
      ['mount', '-r', '--l2-cache-size', 'lots', img, mp],
      ['mount', '-r', '--read-ahead', '1K', img, mp],
      ['mount', '--snapshot', 'no such snapshot', img, mp],
      ['mount', '--overlay', path.join(dir, 'o.qcow2'), '-r', img, mp],
      ['mount', '--force-share', img, mp],
      ['mount', '--allow-backing', dir, img, mp],
      ['mount', '--log-level', 'loud', img, mp],
      ['mount', '--frobnicate', img, mp],
      ['mount', img],
      ['mount', img, mp, 'extra'],
      [img, mp, '-o', 'bogus'],
      [img, mp, '-o', 'ro,snapshot=nosuch'],
      [img, mp, '-o', 'ro', 'extra'],
      [img, mp, '-o'],
    ];
    for (const args of cases) {
      const want = viaNode(args);
      const got = viaShell(args);
      expect(want.code, args.join(' ')).not.toBe(0);
      expect(got, args.join(' ')).toEqual(want);
      expect(isMounted(mp)).toBe(false);
      // On an error, the daemon is gone when the command returns.
      expect(daemonPids(mp), args.join(' ')).toEqual([]);
    }
  });

  it('refuses a busy mountpoint as the Node launcher does, and leaves the mount\'s one daemon alone', () => {
    const mp = mountpoint();
    const r = viaShell(['mount', '-r', img, mp]);
    expect(r).toEqual({ code: 0, stdout: '', stderr: '' });
    try {
      const pids = daemonPids(mp);
      expect(pids).toHaveLength(1);
      const want = viaNode(['mount', '-r', img, mp]);
      expect(want.code).toBe(2);
      expect(want.stderr).toMatch(/is busy/);
      expect(viaShell(['mount', '-r', img, mp])).toEqual(want);
      expect(viaShell([img, mp, '-o', 'ro'])).toEqual(want);
      expect(daemonPids(mp)).toEqual(pids);
    } finally {
      expect(viaShell(['umount', mp]).code).toBe(0);
    }
  });

  it('reports a daemon that dies before it is ready, with status 1', () => {
    const mp = mountpoint();
    const hook = path.join(dir, 'die.js');
    // Loaded into every Node process of the mount; acts only in the daemon.
    fs.writeFileSync(
      hook,
      `if (process.argv.includes('--daemon-of')) {
         if (process.env.DIE === 'kill') process.kill(process.pid, 'SIGKILL');
         else setImmediate(() => { throw new Error('boom'); });
       }\n`,
    );
    const env = { ...process.env, NODE_OPTIONS: `--require ${hook}` };
    const want = viaNode(['mount', '-r', img, mp], { env });
    expect(want.code).toBe(1);
    expect(want.stderr).toBe('qcow2fs: error: the daemon exited (status 1) before the mount was ready; run with --foreground --log-level debug to see why\n');
    expect(viaShell(['mount', '-r', img, mp], { env })).toEqual(want);
    // Killed by a signal: the shell cannot tell which.
    const killed = viaShell(['mount', '-r', img, mp], { env: { ...env, DIE: 'kill' } });
    expect(killed.code).toBe(1);
    expect(killed.stderr).toBe('qcow2fs: error: the daemon exited before the mount was ready; run with --foreground --log-level debug to see why\n');
    expect(isMounted(mp)).toBe(false);
  });
});

describe('mounting through the shell path', () => {
  it('returns once the raw file is readable, with one daemon named by the real mountpoint and the image', () => {
    const base = mountpoint();
    const real = path.join(base, 'real');
    fs.mkdirSync(real);
    fs.symlinkSync('real', path.join(base, 'link'));
    const r = viaShell(['mount', '--read-only', 'disk.qcow2', path.relative(dir, path.join(base, 'link'))], { cwd: dir });
    expect(r).toEqual({ code: 0, stdout: '', stderr: '' });
    try {
      // Readable at once: mount returned only when the daemon said it was ready.
      expect(sha256File(path.join(real, 'disk.raw'))).toBe(qemuRawSha(img));
      const pids = daemonPids(real);
      expect(pids).toHaveLength(1);
      const argv = fs.readFileSync(`/proc/${pids[0]}/cmdline`, 'utf8').split('\0');
      expect(argv).toContain(img);
      expect(argv[argv.indexOf('--daemon-of') + 1]).toBe(real);
      // One Node process on the way: the daemon's parent is not a Node launcher.
      expect(argv.some((a) => a.endsWith('/cli/daemon-main.js'))).toBe(true);
      expect(argv).toContain('--relay-fd');
      // Like the launcher's daemon: in /, its own session, environment as daemonEnv() makes it.
      expect(fs.readlinkSync(`/proc/${pids[0]}/cwd`)).toBe('/');
      const stat = fs.readFileSync(`/proc/${pids[0]}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      expect(Number(fields[3])).toBe(pids[0]); // session id (field 6) is its own pid
      const env = fs.readFileSync(`/proc/${pids[0]}/environ`, 'utf8').split('\0');
      expect(env).toContain(`UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? '16'}`);
      expect(env).toContain(`MALLOC_ARENA_MAX=${process.env.MALLOC_ARENA_MAX ?? '2'}`);
      expect(env.some((e) => e.startsWith('NODE_EXTRA_CA_CERTS='))).toBe(false);
      // It holds none of the caller's stdio.
      for (const fd of ['0', '1', '2']) expect(fs.readlinkSync(`/proc/${pids[0]}/fd/${fd}`)).toBe('/dev/null');
      expect(fs.existsSync(`/proc/${pids[0]}/fd/3`)).toBe(false);
    } finally {
      expect(viaShell(['umount', real]).code).toBe(0);
    }
    expect(isMounted(real)).toBe(false);
  });

  it('mount-helper form, snapshots and options with values take the shell path', () => {
    const mp = mountpoint();
    expect(viaShell([img, mp, '-o', 'ro,snapshot=snap one,all_snapshots'])).toEqual({ code: 0, stdout: '', stderr: '' });
    try {
      const argv = fs.readFileSync(`/proc/${daemonPids(mp)[0]}/cmdline`, 'utf8').split('\0');
      expect(argv).toContain('--relay-fd');
      expect(fs.readdirSync(path.join(mp, 'snapshots'))).toEqual(['snap one.raw']);
    } finally {
      expect(viaShell(['umount', mp]).code).toBe(0);
    }
    const mp2 = mountpoint();
    expect(viaShell(['mount', '-s', 'snap one', '--l2-cache-size', '1M', img, mp2]).code).toBe(0);
    try {
      expect(fs.readFileSync(`/proc/${daemonPids(mp2)[0]}/cmdline`, 'utf8').split('\0')).toContain('--relay-fd');
      expect(sha256File(path.join(mp2, 'disk.raw'))).toBe(qemuRawSha(img, ['-l', 'snapshot.name=snap one']));
    } finally {
      expect(viaShell(['umount', mp2]).code).toBe(0);
    }
  });

  it('hands what it does not take to the Node launcher: log options, bundled flags', () => {
    const mp = mountpoint();
    const log = path.join(dir, 'mount.log');
    // --log-level info: the launcher itself logs "daemon ready" (to the log file here).
    expect(viaShell(['mount', '-rU', '--log-level', 'info', '--log-file', log, img, mp])).toEqual({ code: 0, stdout: '', stderr: '' });
    try {
      const argv = fs.readFileSync(`/proc/${daemonPids(mp)[0]}/cmdline`, 'utf8').split('\0');
      expect(argv).toContain('--args');
      expect(fs.readFileSync(log, 'utf8')).toMatch(/daemon ready/);
    } finally {
      expect(viaShell(['umount', mp]).code).toBe(0);
    }
    // Bundled short flags: the daemon answers "fallback" and the Node launcher mounts.
    expect(viaShell(['mount', '-rU', img, mp])).toEqual({ code: 0, stdout: '', stderr: '' });
    try {
      const argv = fs.readFileSync(`/proc/${daemonPids(mp)[0]}/cmdline`, 'utf8').split('\0');
      expect(daemonPids(mp)).toHaveLength(1);
      expect(argv).toContain('--args');
    } finally {
      expect(viaShell(['umount', mp]).code).toBe(0);
    }
  });

  it('works inside $( ) and with the caller\'s pipes: returns at once, prints nothing', async () => {
    const mp = mountpoint();
    const script = `out=$("${BIN}" mount -r "${img}" "${mp}" 2>&1); rc=$?; echo "rc=$rc out=[$out]"`;
    const t0 = Date.now();
    const r = run('timeout', ['20', 'sh', '-c', script]);
    expect(r.stdout.trim()).toBe('rc=0 out=[]');
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(viaShell(['umount', mp]).code).toBe(0);
    const closed = await new Promise<number | null>((resolve, reject) => {
      const child = spawn(BIN, ['mount', '-r', img, mp], { stdio: ['pipe', 'pipe', 'pipe'] });
      const timer = setTimeout(() => reject(new Error('mount kept its stdio pipes open for 10 s')), 10_000);
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve(code);
      });
    });
    expect(closed).toBe(0);
    expect(isMounted(mp)).toBe(true);
    expect(viaShell(['umount', mp]).code).toBe(0);
  });

  it('--foreground stays attached (the Node launcher serves it)', async () => {
    const mp = mountpoint();
    const child = spawn(BIN, ['mount', '--foreground', '-r', img, mp], { stdio: ['ignore', 'ignore', 'pipe'] });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const end = Date.now() + 10_000;
      while (!isMounted(mp) && Date.now() < end) await new Promise((r) => setTimeout(r, 25));
      expect(isMounted(mp)).toBe(true);
      // Served (the mount shows before the daemon has installed its signal handlers).
      expect(sha256File(path.join(mp, 'disk.raw'))).toBe(qemuRawSha(img));
      await new Promise((r) => setTimeout(r, 200));
      expect(child.exitCode).toBeNull();
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(isMounted(mp)).toBe(false);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});
