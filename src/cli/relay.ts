/**
 * The daemon's side of bin/qcow2fs's shell fast path, so that a plain `qcow2fs mount` starts one
 * Node process instead of two (each start-up is ~60-90 ms of mount-to-ready time). The shell part
 * of bin/qcow2fs starts this process itself, detached (setsid), in the caller's directory, as
 *   node daemon-main.js IMAGE MOUNTPOINT --daemon-of MOUNTPOINT --relay-fd 3 -- ARGS...
 * where ARGS are the command line bin/qcow2fs was given, MOUNTPOINT the shell's guess of the
 * mountpoint's real path, and fd 3 a pipe it reads. This process does what the Node launcher
 * (launch.ts, daemonize in mount.ts) would do, then serves the mount itself, and answers on fd 3:
 *
 *   "0\n"                       mounted and ready: the shell exits 0 at once.
 *   "1\n" or "2\n", then text   the shell copies the text to its stderr until fd 3 closes (this
 *                               process has exited), then exits with that status: exactly what
 *                               the Node launcher would have printed and returned.
 *   "fallback\n"                not a command line this path takes (not a plain mount, --log-*
 *                               options, a mountpoint the shell resolved differently): the shell
 *                               runs the Node launcher (`node bin/qcow2fs ARGS...`) instead.
 *
 * Nothing is answered only if the process is killed by a signal before it is ready; the shell then
 * reports that the daemon exited.
 */
import * as fs from 'node:fs';
import { EXIT_USAGE, formatError, runCommand } from './common';
import { cliArgs } from './helper';
import { daemonMountArgs, fastMountArgs, type MountArgs } from './mount';
import { COMMANDS } from './verbs';

/** The fixed head of a relay daemon's argv (after node and the script), before the user's args. */
export const RELAY_HEAD = 6;

/** The relay arguments of a daemon's argv (process.argv.slice(2)), or undefined if it is not one. */
export function relayArgv(argv: readonly string[]): { daemonOf: string; fd: number; args: string[] } | undefined {
  if (argv.length < RELAY_HEAD + 1 || argv[2] !== '--daemon-of' || argv[4] !== '--relay-fd' || argv[RELAY_HEAD] !== '--') return undefined;
  const fd = Number(argv[5]);
  if (!Number.isInteger(fd) || fd < 3) return undefined;
  return { daemonOf: argv[3]!, fd, args: argv.slice(RELAY_HEAD + 1) };
}

/**
 * What the relay daemon does with the user's command line: a usage error (reported as the Node
 * launcher would), 'fallback', or the checked arguments to serve.
 */
export function relayPlan(args: readonly string[], daemonOf: string): 'fallback' | MountArgs {
  // bin/qcow2fs's dispatch (dispatchArgs in launch.ts): the mount-helper form becomes `mount ...`.
  const argv = cliArgs(args, COMMANDS);
  const fast = argv[0] === 'mount' ? fastMountArgs(argv.slice(1)) : undefined;
  // Log options make the launcher itself log (to the caller's stderr or a file): its job.
  if (!fast || fast['log-level'] !== undefined || fast['log-json'] || fast['log-file'] !== undefined) return 'fallback';
  const { plan, daemonArgs } = daemonMountArgs(fast);
  // ps, findDaemons() and `qcow2fs umount` find the daemon by --daemon-of: it must be exact.
  if (plan.mountpoint !== daemonOf) return 'fallback';
  return daemonArgs;
}

export function relayMain(relay: { daemonOf: string; fd: number; args: string[] }): void {
  let told = false;
  const tell = (text: string, close: boolean): void => {
    told = true;
    try {
      fs.writeSync(relay.fd, text);
      if (close) fs.closeSync(relay.fd);
    } catch {
      // The shell is gone; nobody to tell.
    }
  };
  // Any exit before an answer (an exception while loading, say) is reported as the Node launcher
  // reports a daemon that exits early. fd 3 stays open until exit, so the shell returns only then.
  process.on('exit', (code) => {
    if (!told) {
      tell(`1\nqcow2fs: error: the daemon exited (status ${code}) before the mount was ready; run with --foreground --log-level debug to see why\n`, false);
    }
  });
  let daemonArgs: MountArgs;
  try {
    const planned = relayPlan(relay.args, relay.daemonOf);
    if (planned === 'fallback') {
      tell('fallback\n', false);
      process.exit(0);
    }
    daemonArgs = planned;
  } catch (err) {
    // cliArgs throws only usage errors (dispatchArgs: status 2); the rest as runCommand reports them.
    const { text, code } = formatError(err);
    tell(`${code}\n${text}`, false);
    process.exit(code);
  }
  // Like the daemon the launcher starts: no hold on the caller's directory.
  process.chdir('/');
  const { serve } = require('./mount-serve') as typeof import('./mount-serve');
  void runCommand<MountArgs>((a) =>
    serve(a, (msg) => {
      // The exit status the launcher gives a daemon's error (launchDaemon).
      if (msg.ok) tell('0\n', true);
      else tell(`${msg.code ?? EXIT_USAGE}\nqcow2fs: ${msg.error ?? 'daemon failed to mount'}\n`, false);
    }),
  )(daemonArgs);
}
