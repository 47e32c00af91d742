/** The qcow2fs command line: one module per verb, registered here. */
// Concurrent FUSE requests run on libuv's thread pool; size it before anything uses it.
process.env.UV_THREADPOOL_SIZE ??= '16';

import * as fs from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv } from 'yargs';
import { EXIT_USAGE, GLOBAL_OPTIONS, type GlobalArgs } from './common';
import { COMMANDS, type Verb } from './verbs';

type Register = (y: Argv<GlobalArgs>) => Argv<GlobalArgs>;

/*
 * Each verb's module is loaded only when that verb runs (or for --help): `qcow2fs mount` must not
 * pay for loading convert's or check's code, since mount-to-ready time is a target.
 */
const VERBS: Record<Verb, () => Register> = {
  mount: () => (require('./mount') as typeof import('./mount')).registerMount,
  umount: () => (require('./umount') as typeof import('./umount')).registerUmount,
  info: () => (require('./info') as typeof import('./info')).registerInfo,
  map: () => (require('./map') as typeof import('./map')).registerMap,
  check: () => (require('./check') as typeof import('./check')).registerCheck,
  snapshot: () => (require('./snapshot') as typeof import('./snapshot')).registerSnapshot,
  'install-helper': () => (require('./helper') as typeof import('./helper')).registerInstallHelper,
  create: () => (require('./create') as typeof import('./create')).registerCreate,
  convert: () => (require('./convert') as typeof import('./convert')).registerConvert,
  resize: () => (require('./resize') as typeof import('./resize')).registerResize,
  commit: () => (require('./commit') as typeof import('./commit')).registerCommit,
};


/** Global options that take a value: the word after them is not the verb. */
const VALUE_OPTIONS = new Set(GLOBAL_OPTIONS.filter((o) => o.type === 'string').map((o) => `--${o.name}`));

/** The verb `args` run, when it is plain to see (first word that is not an option or its value). */
export function verbOf(args: readonly string[]): Verb | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') return undefined;
    if (VALUE_OPTIONS.has(a)) {
      i++;
      continue;
    }
    if (a.startsWith('-')) continue;
    return (COMMANDS as readonly string[]).includes(a) ? (a as Verb) : undefined;
  }
  return undefined;
}

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
    .version(version())
    .help()
    .alias('h', 'help')
    .strict()
    .demandCommand(1, 'give a command; see --help')
    .recommendCommands()
    // An array option takes one value per use (--allow-backing A --allow-backing B), so it never
    // swallows the image and mountpoint after it.
    .parserConfiguration({ 'greedy-arrays': false })
    .wrap(Math.min(110, process.stdout.columns || 100)) as unknown as Argv<GlobalArgs>;
  for (const o of GLOBAL_OPTIONS) y = y.option(o.name, { type: o.type, describe: o.describe, global: true }) as unknown as Argv<GlobalArgs>;
  // Only the verb being run, unless there is none to see (help, a typo): then all of them.
  const verb = verbOf(args);
  for (const name of verb !== undefined ? [verb] : COMMANDS) y = VERBS[name]!()(y);
  return y.fail((msg, err) => {
    if (err) throw err;
    // One line: yargs puts the details of some messages ("Invalid values:") on the next lines.
    const text = msg.split('\n').map((l) => l.trim()).filter((l) => l !== '').join(' ');
    process.stderr.write(`qcow2fs: ${text} (see qcow2fs --help)\n`);
    process.exit(EXIT_USAGE);
  });
}

if (require.main === module) {
  void buildCli(process.argv.slice(2)).parseAsync();
}
