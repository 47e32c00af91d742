/**
 * `qcow2fs commit OVERLAY`: writes the overlay's own data into its backing file, then empties
 * the overlay (like qemu-img commit); the pair to `mount --overlay`.
 */
import * as fs from 'node:fs';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { commitOverlay } from '../image/commit';
import { runCommand, type GlobalArgs } from './common';
import { Progress } from './progress';

interface CommitArgs extends GlobalArgs {
  overlay: string;
  'keep-overlay': boolean;
  progress: boolean;
  quiet: boolean;
}

export function registerCommit(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<CommitArgs>(
    'commit <overlay>',
    "Write an overlay's changes into its backing file, then empty the overlay (like qemu-img commit)",
    (c) =>
      c
        .positional('overlay', { type: 'string', demandOption: true, describe: 'qcow2 overlay with a backing file' })
        .option('keep-overlay', { alias: 'd', type: 'boolean', default: false, describe: 'leave the overlay as it is afterwards' })
        .option('progress', { alias: 'p', type: 'boolean', default: false, describe: 'show progress on stderr' })
        .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'print nothing on success' })
        .example('$0 mount --overlay changes.qcow2 disk.qcow2 /mnt/d', 'work on an overlay; disk.qcow2 stays untouched')
        .example('$0 commit changes.qcow2', 'then keep the changes: disk.qcow2 receives them, the overlay is emptied')
        .epilog(
          'The backing file is written in place: other overlays on top of it become invalid, as with qemu-img. ' +
            'Neither file may be mounted meanwhile.\nExit status: 0 committed, 1 failure, 2 bad arguments.',
        ) as unknown as Argv<CommitArgs>,
    runCommand<CommitArgs>(async (argv) => {
      if (!fs.existsSync(argv.overlay)) throw new UsageError(`overlay ${argv.overlay}: no such file or directory`);
      const progress = argv.progress && !argv.quiet ? new Progress(process.stderr) : null;
      await commitOverlay(argv.overlay, { keepOverlay: argv['keep-overlay'], ...(progress ? { progress: (f: number) => progress.update(f) } : {}) });
      progress?.done();
      if (!argv.quiet) process.stdout.write('Image committed.\n');
    }),
  ) as unknown as Argv<GlobalArgs>;
}
