/**
 * What bin/qcow2fs runs. mount(8)'s `qcow2fs IMAGE DIR -o OPTS` form becomes `mount ...`; a plain
 * `mount` command line goes straight to the launcher without loading yargs (mount-to-ready time
 * is a target); everything else is parsed by the yargs CLI in main.ts.
 */
import { runCommand } from './common';
import { dispatchArgs } from './helper';
import { fastMountArgs, mountCommandHandler, type MountArgs } from './mount';
import { COMMANDS } from './verbs';

export function launch(argv: readonly string[]): void {
  const args = dispatchArgs(argv, COMMANDS);
  if (args[0] === 'mount') {
    const fast = fastMountArgs(args.slice(1));
    if (fast) {
      void runCommand<MountArgs>(mountCommandHandler)(fast);
      return;
    }
  }
  void (require('./main') as typeof import('./main')).buildCli(args).parseAsync();
}
