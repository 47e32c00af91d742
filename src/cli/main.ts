/** The qcow2fs command line: one module per verb, registered here. */
// Concurrent FUSE requests run on libuv's thread pool; size it before anything uses it.
process.env.UV_THREADPOOL_SIZE ??= '16';

import * as fs from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv } from 'yargs';
import { EXIT_USAGE, type GlobalArgs } from './common';
import { registerCheck } from './check';
import { registerInstallHelper } from './helper';
import { registerInfo } from './info';
import { registerMap } from './map';
import { registerMount } from './mount';
import { registerSnapshot } from './snapshot';
import { registerCommit } from './commit';
import { registerConvert } from './convert';
import { registerCreate } from './create';
import { registerResize } from './resize';
import { registerUmount } from './umount';

function version(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
    return pkg.version;
  } catch {
    return 'unknown';
  }
}

export function buildCli(args: string[]): Argv<GlobalArgs> {
  let y = yargs(args)
    .scriptName('qcow2fs')
    .usage('$0 <command> [options]\n\nMount qcow2 disk images as flat raw files, and inspect them.')
    .option('log-level', { type: 'string', describe: 'fatal, error, warn (default), info, debug, trace, silent', global: true })
    .option('log-json', { type: 'boolean', describe: 'log JSON lines (pino) instead of text', global: true })
    .option('log-file', { type: 'string', describe: 'append logs to this file (daemons log nowhere else)', global: true })
    .version(version())
    .help()
    .alias('h', 'help')
    .strict()
    .demandCommand(1, 'give a command; see --help')
    .recommendCommands()
    .wrap(Math.min(110, process.stdout.columns || 100)) as unknown as Argv<GlobalArgs>;
  y = registerMount(y);
  y = registerUmount(y);
  y = registerInfo(y);
  y = registerMap(y);
  y = registerCheck(y);
  y = registerSnapshot(y);
  y = registerInstallHelper(y);
  y = registerCreate(y);
  y = registerConvert(y);
  y = registerResize(y);
  y = registerCommit(y);
  return y.fail((msg, err) => {
    if (err) throw err;
    process.stderr.write(`qcow2fs: ${msg.split('\n')[0]}\nTry "qcow2fs --help".\n`);
    process.exit(EXIT_USAGE);
  });
}

if (require.main === module) {
  void buildCli(process.argv.slice(2)).parseAsync();
}
