/** `qcow2fs umount MOUNTPOINT [--lazy]`: unmount, then wait until the daemon has flushed, closed the image and exited. */
import { execFile } from 'node:child_process';
import type { Argv } from 'yargs';
import { ImageError, UsageError } from '../errors';
import { FUSE_SUBTYPE } from '../fuse/mount';
import { findDaemons, findMount, isStaleFuseMount, processAlive, realMountpoint, takeDaemonFailure } from '../fuse/mounts';
import { log } from '../log';
import { runCommand, type GlobalArgs } from './common';

interface UmountArgs extends GlobalArgs {
  mountpoint: string;
  lazy: boolean;
  timeout: number;
}

function run(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, (err, _stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
      resolve({ code, stderr: String(stderr).trim() || (err ? err.message : '') });
    });
  });
}

export async function unmount(mountpointArg: string, opts: { lazy: boolean; timeoutSeconds: number }): Promise<void> {
  const mp = realMountpoint(mountpointArg);
  const stale = isStaleFuseMount(mp);
  const entry = findMount(mp);
  if (!entry) throw new UsageError(`${mp} is not mounted`);
  if (entry.fstype !== `fuse.${FUSE_SUBTYPE}` && !stale) throw new UsageError(`${mp} is not a qcow2fs mount (it is ${entry.fstype})`);
  const daemons = findDaemons(mp);
  log.debug({ mountpoint: mp, daemons, stale }, 'unmounting');

  // -i: never run a umount.<type> helper, whatever is installed; we are the one doing the waiting.
  const args = opts.lazy || stale ? ['-i', '-l', mp] : ['-i', mp];
  const useUmount = process.getuid?.() === 0;
  const r = useUmount ? await run('umount', args) : await run('fusermount', opts.lazy || stale ? ['-u', '-z', mp] : ['-u', mp]);
  if (r.code !== 0) {
    if (/busy/i.test(r.stderr)) throw new UsageError(`${mp} is busy (a process has files open or its working directory there); close them, or use --lazy`);
    throw new UsageError(`cannot unmount ${mp}: ${r.stderr}`);
  }
  if (stale) process.stderr.write(`qcow2fs: ${mp} was a stale mount (its daemon had died); cleaned up\n`);

  if (opts.lazy) {
    // The daemon ends by itself when the last open file on the detached mount closes.
    return;
  }
  // Now ask the daemons to finish (flush, close, exit) and wait for them.
  for (const pid of daemons) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // Already gone.
    }
  }
  const deadline = Date.now() + opts.timeoutSeconds * 1000;
  for (const pid of daemons) {
    while (processAlive(pid)) {
      if (Date.now() > deadline) throw new UsageError(`daemon ${pid} for ${mp} did not exit within ${opts.timeoutSeconds} s (still flushing?)`);
      await new Promise((r2) => setTimeout(r2, 25));
    }
  }
  // A daemon that could not flush or close the image says so before it exits.
  for (const pid of daemons) {
    const failure = takeDaemonFailure(pid);
    if (failure !== null) throw new ImageError(`unmounted, but the image was not saved completely: ${failure}`);
  }
}

export function registerUmount(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<UmountArgs>(
    'umount <mountpoint>',
    'Flush and unmount a qcow2fs mount; returns once the daemon has closed the image and exited',
    (c) =>
      c
        .positional('mountpoint', { type: 'string', demandOption: true, describe: 'where the image is mounted' })
        .option('lazy', { alias: 'l', type: 'boolean', default: false, describe: 'detach even if busy (umount -l)' })
        .option('timeout', { type: 'number', default: 600, describe: 'seconds to wait for the daemon to exit' })
        .example('$0 umount /mnt/disk', 'unmount and wait for the daemon')
        .example('$0 umount --lazy /mnt/disk', 'detach a busy mount now; the daemon exits when the last file closes') as unknown as Argv<UmountArgs>,
    runCommand<UmountArgs>(async (argv) => {
      await unmount(argv.mountpoint, { lazy: argv.lazy, timeoutSeconds: argv.timeout });
    }),
  ) as unknown as Argv<GlobalArgs>;
}
