/**
 * The mount daemon's entry point, started in one of two ways:
 *   node daemon-main.js IMAGE MOUNTPOINT --daemon-of MOUNTPOINT --args JSON
 * by `qcow2fs mount` run through Node (daemonize() in mount.ts): JSON holds the launcher's
 * already-parsed and checked mount arguments, so the daemon loads no argument parser;
 *   node daemon-main.js IMAGE MOUNTPOINT --daemon-of MOUNTPOINT --relay-fd 3 -- ARGS...
 * by the shell part of bin/qcow2fs, which then starts no Node launcher at all: the daemon checks
 * ARGS as the launcher would and answers the shell on fd 3 (relay.ts).
 * Either way only the engine and the FUSE binding stand between start-up and a ready mount.
 * IMAGE and --daemon-of stay readable in the command line for ps, `qcow2fs umount` and lock
 * messages (findDaemons, processesUsing).
 */
process.env.UV_THREADPOOL_SIZE ??= '16';

import { runCommand } from './common';
import type { MountArgs } from './mount';
import { relayArgv, relayMain } from './relay';

function daemonArgs(argv: readonly string[]): MountArgs | undefined {
  const i = argv.indexOf('--args');
  if (i < 0 || i + 1 >= argv.length) return undefined;
  try {
    return JSON.parse(argv[i + 1]!) as MountArgs;
  } catch {
    return undefined;
  }
}

const relay = relayArgv(process.argv.slice(2));
if (relay) {
  relayMain(relay);
} else {
  const args = daemonArgs(process.argv);
  if (!args || args['ready-fd'] === undefined) {
    process.stderr.write('qcow2fs: daemon-main.js is started by "qcow2fs mount"; run that instead\n');
    process.exit(2);
  }
  const { serve } = require('./mount-serve') as typeof import('./mount-serve');
  void runCommand<MountArgs>(serve)(args);
}
