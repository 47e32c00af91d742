/**
 * `qcow2fs snapshot -l|-c NAME|-a NAME|-d NAME IMAGE`, like `qemu-img snapshot`. Listing prints
 * qemu-img's table (same columns, widths and size/date/clock formats) or, with --output json,
 * the `snapshots` array of `qemu-img info --output json`. Creating, applying and deleting need
 * the write path and say so.
 */
import * as fs from 'node:fs';
import type { Argv } from 'yargs';
import { UsageError } from '../errors';
import { openImage } from '../image/open';
import { Qcow2Image } from '../qcow2/image';
import type { SnapshotEntry } from '../qcow2/snapshot';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../qcow2/snapshot-write';
import { runCommand, type GlobalArgs } from './common';

interface SnapshotArgs extends GlobalArgs {
  image: string;
  list: boolean;
  create?: string;
  apply?: string;
  delete?: string;
  output: 'human' | 'json';
  'force-share': boolean;
}

/** icount all ones means "not recorded" (QEMU writes -1 when the VM did not count instructions). */
const ICOUNT_NONE = 0xffffffffffffffffn;

function icountOf(s: SnapshotEntry): bigint | null {
  return s.icount === null || s.icount === ICOUNT_NONE ? null : s.icount;
}

/** Sizes as QEMU prints them: three significant digits, the unit switching once the number reaches 1000. */
export function qemuSizeString(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  while (i < suffixes.length - 1 && bytes >= 1000 * 1024 ** i) i++;
  const v = bytes / 1024 ** i;
  let text = v.toPrecision(3);
  if (text.includes('e')) {
    // C's %g writes the exponent with at least two digits.
    const [m, e] = text.split('e') as [string, string];
    text = `${String(Number(m))}e${e[0]}${e.slice(1).padStart(2, '0')}`;
  } else if (text.includes('.')) {
    text = text.replace(/\.?0+$/, '');
  }
  return `${text} ${suffixes[i]}B`;
}

/** Left-justified in `width` bytes, as printf pads (UTF-8 names count in bytes). */
function padBytes(s: string, width: number): string {
  const n = Buffer.byteLength(s, 'utf8');
  return n >= width ? s : s + ' '.repeat(width - n);
}

function padLeft(s: string, width: number): string {
  return s.length >= width ? s : ' '.repeat(width - s.length) + s;
}

const two = (n: number): string => String(n).padStart(2, '0');

export function formatSnapshotDate(s: SnapshotEntry): string {
  const d = new Date(s.dateSeconds * 1000);
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

export function formatVmClock(ns: bigint): string {
  const secs = ns / 1_000_000_000n;
  const ms = (ns / 1_000_000n) % 1000n;
  return `${two(Number(secs / 3600n))}:${two(Number((secs / 60n) % 60n))}:${two(Number(secs % 60n))}.${String(ms).padStart(3, '0')}`;
}

/** qemu-img snapshot -l's table, or '' when there are no snapshots (qemu-img prints nothing then). */
export function formatSnapshotTable(snapshots: readonly SnapshotEntry[]): string {
  if (snapshots.length === 0) return '';
  const lines = ['Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of snapshots) {
    const icount = icountOf(s);
    lines.push(
      `${padBytes(s.id, 9)} ${padBytes(s.name, 16)} ${padLeft(qemuSizeString(s.vmStateSize), 8)}${padLeft(formatSnapshotDate(s), 20)}` +
        `${padLeft(formatVmClock(s.vmClockNanoseconds), 13)}${padLeft(icount === null ? '' : String(icount), 11)}`,
    );
  }
  return lines.join('\n') + '\n';
}

/** The `snapshots` array of qemu-img info --output json (same keys, same order). */
export function snapshotListJson(snapshots: readonly SnapshotEntry[]): Array<Record<string, unknown>> {
  return snapshots.map((s) => {
    const icount = icountOf(s);
    return {
      ...(icount !== null ? { icount: Number(icount) } : {}),
      'vm-clock-nsec': Number(s.vmClockNanoseconds % 1_000_000_000n),
      name: s.name,
      'date-sec': s.dateSeconds,
      'date-nsec': s.dateNanoseconds,
      'vm-clock-sec': Number(s.vmClockNanoseconds / 1_000_000_000n),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    };
  });
}

export function registerSnapshot(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<SnapshotArgs>(
    'snapshot <image>',
    'List, create, apply or delete internal snapshots (like qemu-img snapshot)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'qcow2 image' })
        .option('list', { alias: 'l', type: 'boolean', default: false, describe: 'list the snapshots' })
        .option('create', { alias: 'c', type: 'string', describe: 'create a snapshot NAME of the active layer' })
        .option('apply', { alias: 'a', type: 'string', describe: 'revert the active layer to snapshot NAME' })
        .option('delete', { alias: 'd', type: 'string', describe: 'delete snapshot NAME (id or name)' })
        .option('output', { choices: ['human', 'json'] as const, default: 'human' as const, describe: 'list format' })
        .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'list even while another process writes the image (like qemu-img -U)' })
        .example('$0 snapshot -l disk.qcow2', 'the table qemu-img snapshot -l prints')
        .example('$0 snapshot -l --output json disk.qcow2', 'the snapshots array of qemu-img info --output json')
        .example('$0 snapshot -c before-upgrade disk.qcow2', 'snapshot the current state')
        .example('$0 snapshot -a before-upgrade disk.qcow2', 'revert the disk to it (and to its size)')
        .example('$0 snapshot -d before-upgrade disk.qcow2', 'delete it and release its clusters') as unknown as Argv<SnapshotArgs>,
    runCommand<SnapshotArgs>(async (argv) => {
      const verbs = [argv.list ? '-l' : null, argv.create !== undefined ? '-c' : null, argv.apply !== undefined ? '-a' : null, argv.delete !== undefined ? '-d' : null].filter(
        (v): v is string => v !== null,
      );
      if (verbs.length !== 1) throw new UsageError(`give exactly one of -l, -c NAME, -a NAME, -d NAME${verbs.length ? ` (got ${verbs.join(' ')})` : ''}`);
      if (!fs.existsSync(argv.image)) throw new UsageError(`image ${argv.image}: no such file or directory`);
      if (!argv.list) {
        if (argv['force-share']) throw new UsageError('--force-share (-U) is only for -l: changing snapshots needs the write lock');
        // Read-write with QEMU's locks: refused while qcow2fs or QEMU has the image open for writing.
        const rw = await openImage(argv.image, { readOnly: false });
        try {
          const top = rw.chain[0]?.device;
          if (!(top instanceof Qcow2Image)) throw new UsageError(`${argv.image}: ${rw.chain[0]?.format ?? 'this'} images have no internal snapshots`);
          if (argv.create !== undefined) await createSnapshot(top, argv.create);
          else if (argv.apply !== undefined) await applySnapshot(top, argv.apply);
          else await deleteSnapshot(top, argv.delete!);
        } finally {
          await rw.device.close();
        }
        return;
      }
      const opened = await openImage(argv.image, { readOnly: true, lock: argv['force-share'] ? 'share' : 'qemu' });
      try {
        const top = opened.chain[0]?.device;
        if (!(top instanceof Qcow2Image)) {
          // As qemu-img: a raw image lists no snapshots (nothing printed, status 0).
          if (argv.output === 'json') process.stdout.write('[]\n');
          return;
        }
        if (argv.output === 'json') process.stdout.write(JSON.stringify(snapshotListJson(top.snapshots), null, 4) + '\n');
        else process.stdout.write(formatSnapshotTable(top.snapshots));
      } finally {
        await opened.device.close();
      }
    }),
  ) as unknown as Argv<GlobalArgs>;
}
