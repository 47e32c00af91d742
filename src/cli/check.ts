/**
 * `qcow2fs check IMAGE [-r leaks|all]`: qemu-img check's findings, counts, output (human and
 * JSON) and exit statuses: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only,
 * 63 the format has no checks (raw).
 */
import * as fs from 'node:fs';
import type { Argv } from 'yargs';
import { describeSystemError, UsageError } from '../errors';
import { probeFormat } from '../image/probe';
import { FdFile, type HostFile } from '../io/file';
import { lockImageFile, lockProfile } from '../io/lock';
import { checkQcow2, type CheckCounts, type CheckOutcome, type RepairMode } from '../qcow2/check';
import { reportError, setupLogging, type GlobalArgs } from './common';
import { qemuJson, type JsonValue } from './qemu-json';
import { Progress } from './progress';

interface CheckArgs extends GlobalArgs {
  image: string;
  repair?: string;
  output: string;
  format?: string;
  quiet: boolean;
  progress?: boolean;
  'force-share': boolean;
}

export const EXIT_CHECK_CLEAN = 0;
export const EXIT_CHECK_FAILED = 1;
export const EXIT_CHECK_CORRUPT = 2;
export const EXIT_CHECK_LEAKS = 3;
export const EXIT_CHECK_UNSUPPORTED = 63;

/** qemu-img check --output json: the same keys, present under the same conditions, same order. */
export function checkJson(c: CheckCounts, filename: string): JsonValue {
  const opt = (n: number): number | undefined => (n !== 0 ? n : undefined);
  return {
    'image-end-offset': opt(c.imageEndOffset),
    'compressed-clusters': opt(c.compressedClusters),
    'total-clusters': opt(c.totalClusters),
    corruptions: opt(c.corruptions),
    'corruptions-fixed': opt(c.corruptionsFixed),
    'check-errors': c.checkErrors,
    leaks: opt(c.leaks),
    'leaks-fixed': opt(c.leaksFixed),
    'allocated-clusters': opt(c.allocatedClusters),
    filename,
    format: 'qcow2',
    'fragmented-clusters': opt(c.fragmentedClusters),
  };
}

/**
 * printf("%.Nf") of a double: the exact binary value rounded half-to-even, as glibc does
 * (Number.toFixed rounds exact ties up: 3.125 would print 3.13 where qemu-img prints 3.12).
 */
export function cFixed(x: number, digits: number): string {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const bits = view.getBigUint64(0);
  const negative = bits >> 63n === 1n;
  const expBits = Number((bits >> 52n) & 0x7ffn);
  let mantissa = bits & ((1n << 52n) - 1n);
  let exp: number;
  if (expBits === 0) exp = -1074;
  else {
    mantissa |= 1n << 52n;
    exp = expBits - 1075;
  }
  let num = mantissa * 10n ** BigInt(digits);
  let den = 1n;
  if (exp >= 0) num <<= BigInt(exp);
  else den <<= BigInt(-exp);
  let q = num / den;
  const r2 = (num % den) * 2n;
  if (r2 > den || (r2 === den && (q & 1n) === 1n)) q++;
  const s = q.toString().padStart(digits + 1, '0');
  return `${negative ? '-' : ''}${digits ? `${s.slice(0, -digits)}.${s.slice(-digits)}` : s}`;
}

export function checkHuman(c: CheckCounts): string {
  const out: string[] = [];
  if (!(c.corruptions || c.leaks || c.checkErrors)) {
    out.push('No errors were found on the image.\n');
  } else {
    if (c.corruptions) out.push(`\n${c.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
    if (c.leaks) out.push(`\n${c.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
    if (c.checkErrors) out.push(`\n${c.checkErrors} internal errors have occurred during the check.\n`);
  }
  if (c.totalClusters !== 0 && c.allocatedClusters !== 0) {
    const pct = (n: number, d: number): string => cFixed((n * 100) / d, 2);
    out.push(
      `${c.allocatedClusters}/${c.totalClusters} = ${pct(c.allocatedClusters, c.totalClusters)}% allocated, ` +
        `${pct(c.fragmentedClusters, c.allocatedClusters)}% fragmented, ${pct(c.compressedClusters, c.allocatedClusters)}% compressed clusters\n`,
    );
  }
  if (c.imageEndOffset) out.push(`Image end offset: ${c.imageEndOffset}\n`);
  return out.join('');
}

export function checkExitCode(o: CheckOutcome): number {
  if (o.failure !== null || o.counts.checkErrors) return EXIT_CHECK_FAILED;
  if (o.counts.corruptions) return EXIT_CHECK_CORRUPT;
  if (o.counts.leaks) return EXIT_CHECK_LEAKS;
  return EXIT_CHECK_CLEAN;
}

async function openForCheck(p: string, writable: boolean): Promise<HostFile> {
  try {
    if ((await fs.promises.stat(p)).isDirectory()) throw new UsageError(`image ${p}: is a directory`);
    return await FdFile.open(p, !writable);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(describeSystemError(err, `image ${p}`));
  }
}

async function runCheck(argv: CheckArgs): Promise<number> {
  const repair = (argv.repair ?? 'none') as RepairMode;
  if (!['none', 'leaks', 'all'].includes(repair)) throw new UsageError(`-r ${argv.repair}: expected "leaks" or "all"`);
  if (argv.output !== 'human' && argv.output !== 'json') throw new UsageError(`--output ${argv.output}: expected "human" or "json"`);
  if (argv.format !== undefined && argv.format !== 'qcow2' && argv.format !== 'raw') throw new UsageError(`--format ${argv.format}: expected "qcow2" or "raw"`);
  const file = await openForCheck(argv.image, repair !== 'none');
  try {
    const head = Buffer.alloc(512);
    await file.pread(head, 0);
    const format = argv.format ?? probeFormat(head, argv.image);
    if (format === 'raw') {
      process.stderr.write('qcow2fs: this image format (raw) does not support checks\n');
      return EXIT_CHECK_UNSUPPORTED;
    }
    // As qemu-img check: nobody may write the image meanwhile; repairing also needs write access.
    if (argv['force-share'] && repair !== 'none') throw new UsageError('--force-share cannot be combined with -r');
    lockImageFile(file, lockProfile({ writable: repair !== 'none', format: 'qcow2', forceShare: argv['force-share'] }));
    const size = await file.size();
    const showProgress = argv.progress ?? (!argv.quiet && process.stderr.isTTY === true && size >= 256 * 1024 * 1024);
    const progress = showProgress ? new Progress(process.stderr) : null;
    const outcome = await checkQcow2(file, repair, {
      message: (line) => {
        progress?.clear();
        process.stderr.write(line + '\n');
      },
      ...(progress ? { progress: (f: number) => progress.update(f) } : {}),
    });
    progress?.done();
    const c = outcome.counts;
    if (outcome.repaired && argv.output === 'human' && !argv.quiet) {
      process.stdout.write(
        'The following inconsistencies were found and repaired:\n\n' +
          `    ${outcome.repaired.leaks} leaked clusters\n    ${outcome.repaired.corruptions} corruptions\n\n` +
          'Double checking the fixed image now...\n',
      );
    }
    if (outcome.failure === null && !argv.quiet) {
      process.stdout.write(argv.output === 'json' ? qemuJson(checkJson(c, argv.image)) : checkHuman(c));
    }
    if (outcome.failure !== null) process.stderr.write(`qcow2fs: Check failed: ${outcome.failure}\n`);
    else if (c.checkErrors) process.stderr.write('qcow2fs: Check failed\n');
    return checkExitCode(outcome);
  } finally {
    await file.close();
  }
}

export function registerCheck(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y.command<CheckArgs>(
    'check <image>',
    'Check the refcounts and tables of a qcow2 image, and repair them (like qemu-img check)',
    (c) =>
      c
        .positional('image', { type: 'string', demandOption: true, describe: 'qcow2 image file' })
        .option('repair', { alias: 'r', type: 'string', describe: 'repair: "leaks" (drop refcounts nothing uses) or "all" (also raise refcounts, fix flags, rebuild refcount structures)' })
        .option('output', { type: 'string', default: 'human', describe: 'human or json' })
        .option('format', { alias: 'f', type: 'string', describe: 'image format (qcow2; raw has nothing to check)' })
        .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'print no summary (findings still go to stderr)' })
        .option('force-share', { alias: 'U', type: 'boolean', default: false, describe: 'check even while another process writes the image (findings may be spurious)' })
        .option('progress', { alias: 'p', type: 'boolean', describe: 'show progress on stderr (default: on a terminal, for images of 256 MiB and more)' })
        .example('$0 check disk.qcow2', 'report corruptions and leaked clusters; writes nothing')
        .example('$0 check -r leaks disk.qcow2', 'free clusters that nothing references')
        .example('$0 check -r all --output json disk.qcow2', 'repair everything repairable, report as qemu-img does')
        .epilog(
          'Exit status: 0 no errors, 1 the check could not be completed (or bad arguments), 2 corruptions found, ' +
            '3 leaked clusters found (no corruption), 63 the format does not support checks. After a repair, the ' +
            'image is checked again and the status describes what remains.',
        ) as unknown as Argv<CheckArgs>,
    async (argv) => {
      let code: number;
      try {
        setupLogging(argv);
        code = await runCheck(argv);
      } catch (err) {
        reportError(err);
        // qemu-img exits 1 for anything that stops the check; 2 would mean "corruptions found".
        code = EXIT_CHECK_FAILED;
      }
      process.exitCode = code;
    },
  ) as unknown as Argv<GlobalArgs>;
}
