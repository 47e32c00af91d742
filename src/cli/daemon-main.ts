/**
 * The mount daemon's entry point, started by `qcow2fs mount` (see daemonize() in mount.ts) as
 *   node daemon-main.js IMAGE MOUNTPOINT --daemon-of MOUNTPOINT --args JSON
 * JSON holds the launcher's already-parsed and checked mount arguments, so the daemon loads no
 * argument parser: only the engine and the FUSE binding stand between start-up and a ready mount.
 * IMAGE and --daemon-of stay readable in the command line for ps, `qcow2fs umount` and lock
 * messages (findDaemons, processesUsing).
 */
process.env.UV_THREADPOOL_SIZE ??= '16';

import { runCommand } from './common';
import type { MountArgs } from './mount';
import { serve } from './mount-serve';

function daemonArgs(argv: readonly string[]): MountArgs | undefined {
  const i = argv.indexOf('--args');
  if (i < 0 || i + 1 >= argv.length) return undefined;
  try {
    return JSON.parse(argv[i + 1]!) as MountArgs;
  } catch {
    return undefined;
  }
}

const args = daemonArgs(process.argv);
if (!args || args['ready-fd'] === undefined) {
  process.stderr.write('qcow2fs: daemon-main.js is started by "qcow2fs mount"; run that instead\n');
  process.exit(2);
}
void runCommand<MountArgs>(serve)(args);
