/**
 * `npm run bench [-- --quick] [--only a,b] [--systems a,b] [--reps N] [--workdir DIR]`
 * Side-by-side benchmark of qcow2fs, QEMU's FUSE export, qcowmount and the plain raw file
 * (issue 6). Prints a Markdown table and writes docs/PERFORMANCE.md.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { cleanupAll, installSignalCleanup } from './cleanup';
import { exec } from './exec';
import { fioCommandLine } from './fio';
import { machineInfo } from './host';
import { prepareImages } from './images';
import { FULL, QUICK, type SizeProfile } from './profile';
import { rowsOf, resourceTable, resultsTable, writeDoc } from './report';
import { runAll } from './runner';
import { clearStaleMounts, makeSystems, type SystemId } from './systems';
import { ensureTools } from './tools';
import { WORKLOADS, type Workload } from './workloads';

const REPO = path.resolve(__dirname, '..', '..');

const USAGE = `usage: npm run bench -- [options]
  --quick            smaller images, fewer repetitions (whole run < 5 minutes)
  --reps N           repetitions per system and workload (default 3; quick 2)
  --only IDS         comma-separated workload ids (default all): ${WORKLOADS.map((w) => w.id).join(', ')}
  --reads            only the workloads that do not write
  --systems IDS      comma-separated systems (default qcow2fs,qsd,qcowmount,raw)
  --workdir DIR      images and mount points (default /var/tmp/qcow2fs-bench)
  --rebuild-images   rebuild the images even if the work directory has them
  --cold-source      do not page-cache the source image before each run
  --compare DIR      also run the qcow2fs build in checkout DIR as "baseline" (interleaved, same
                     images), with a qcow2fs / baseline ratio: before/after an optimisation
  --qcow2fs DIR      benchmark the qcow2fs build in checkout DIR (default: this one), e.g. to
                     compare before/after an optimisation
  --doc FILE         where to write the report (default docs/PERFORMANCE.md); --no-doc: do not`;

interface Options {
  sizes: SizeProfile;
  repetitions: number;
  workloads: Workload[];
  systems: SystemId[];
  workdir: string;
  rebuild: boolean;
  coldSource: boolean;
  doc: string | null;
  /** The checkout whose bin/qcow2fs (and dist/) is benchmarked. */
  qcow2fsRepo: string;
  baselineRepo: string | null;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      reps: { type: 'string' },
      only: { type: 'string' },
      reads: { type: 'boolean', default: false },
      systems: { type: 'string' },
      workdir: { type: 'string', default: '/var/tmp/qcow2fs-bench' },
      'rebuild-images': { type: 'boolean', default: false },
      'cold-source': { type: 'boolean', default: false },
      doc: { type: 'string' },
      qcow2fs: { type: 'string' },
      compare: { type: 'string' },
      'no-doc': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    process.exit(0);
  }
  const sizes = values.quick ? QUICK : FULL;
  const repetitions = values.reps !== undefined ? Number(values.reps) : sizes.repetitions;
  if (!Number.isInteger(repetitions) || repetitions < 1) throw new Error(`--reps: expected a positive integer, got ${values.reps}`);
  let workloads = [...WORKLOADS];
  if (values.only) {
    const ids = values.only.split(',').map((s) => s.trim());
    for (const id of ids) if (!WORKLOADS.some((w) => w.id === id)) throw new Error(`--only: unknown workload ${id}`);
    workloads = workloads.filter((w) => ids.includes(w.id));
  }
  if (values.reads) workloads = workloads.filter((w) => !w.writes);
  const allSystems: SystemId[] = ['qcow2fs', 'baseline', 'qsd', 'qcowmount', 'raw'];
  const systems = values.systems ? (values.systems.split(',').map((s) => s.trim()) as SystemId[]) : allSystems;
  if (values.compare && !systems.includes('baseline')) systems.push('baseline');
  for (const s of systems) if (!allSystems.includes(s)) throw new Error(`--systems: unknown system ${s} (expected ${allSystems.join(', ')})`);
  return {
    sizes,
    repetitions,
    workloads,
    systems,
    workdir: path.resolve(values.workdir!),
    rebuild: values['rebuild-images']!,
    coldSource: values['cold-source']!,
    qcow2fsRepo: path.resolve(values.qcow2fs ?? REPO),
    baselineRepo: values.compare ? path.resolve(values.compare) : null,
    doc: values['no-doc'] ? null : path.resolve(values.doc ?? path.join(REPO, 'docs', 'PERFORMANCE.md')),
  };
}

/** "commit abc1234 (with uncommitted changes)" for the checkout that was measured. */
async function buildOf(repo: string): Promise<string> {
  const head = await exec('git', ['-C', repo, 'log', '-1', '--format=%h %s']);
  if (head.code !== 0) return repo;
  const dirty = (await exec('git', ['-C', repo, 'status', '--porcelain', '--untracked-files=no'])).stdout.trim() !== '';
  return `commit ${head.stdout.trim()}${dirty ? ' (with uncommitted changes)' : ''}`;
}

const say = (msg: string): void => void process.stderr.write(`bench: ${msg}\n`);

async function main(argv: string[]): Promise<number> {
  const o = parseOptions(argv);
  if (process.getuid?.() !== 0) throw new Error('run as root: the benchmark drops page caches, uses loop devices and mounts ext4');
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is missing: this kernel or container has no FUSE');
  installSignalCleanup();
  await ensureTools(say);

  fs.mkdirSync(o.workdir, { recursive: true });
  const mountRoot = path.join(o.workdir, 'mnt');
  await clearStaleMounts(mountRoot);
  if (o.rebuild) fs.rmSync(path.join(o.workdir, `images-${o.sizes.name}`), { recursive: true, force: true });
  const started = Date.now();
  const loadAtStart = os.loadavg()[0]!;
  if (loadAtStart > os.cpus().length / 2) say(`warning: load average ${loadAtStart.toFixed(2)} on ${os.cpus().length} cores: other work will make the figures noisy`);
  const images = await prepareImages(o.workdir, o.sizes, say);
  for (const repo of [o.qcow2fsRepo, ...(o.baselineRepo ? [o.baselineRepo] : [])]) {
    if (!fs.existsSync(path.join(repo, 'dist', 'cli', 'main.js'))) throw new Error(`qcow2fs is not built in ${repo}: run "npm run build" there`);
  }
  const baselineBin = o.baselineRepo ? path.join(o.baselineRepo, 'bin', 'qcow2fs') : undefined;
  const systems = makeSystems(mountRoot, path.join(o.qcow2fsRepo, 'bin', 'qcow2fs'), baselineBin).filter((s) => o.systems.includes(s.id));
  say(`${o.sizes.name} mode: ${o.workloads.length} workloads x ${systems.length} systems x ${o.repetitions} repetitions`);

  const samples = await runAll(o.workloads, systems, {
    sizes: o.sizes,
    images,
    workdir: o.workdir,
    repetitions: o.repetitions,
    coldSource: o.coldSource,
    say,
  });

  const rows = rowsOf(o.workloads, samples, systems);
  const results = resultsTable(rows, systems);
  const resources = resourceTable(o.workloads, samples, systems);
  process.stdout.write(`\n${results}\n\n${resources}\n`);
  say(`done in ${((Date.now() - started) / 1000).toFixed(0)} s`);

  if (o.doc) {
    const workloadCommands = o.workloads.map((w) => {
      const m = w.measure;
      if (m.kind === 'fio') return `# ${w.id}\n${fioCommandLine(m.job(o.sizes), 'FILE', w.id)}`;
      if (m.kind === 'fs-populate') return `# ${w.id}: see Method (ext4)`;
      return `# ${w.id}: see Method (mount to ready)`;
    });
    fs.mkdirSync(path.dirname(o.doc), { recursive: true });
    writeDoc(o.doc, {
      date: new Date(),
      machine: await machineInfo(),
      mode: o.sizes.name,
      repetitions: o.repetitions,
      coldSource: o.coldSource,
      results,
      resources,
      imageCommands: images.commands,
      systemCommands: systems.filter((s) => s.id !== 'baseline').flatMap((s) => (s.canWrite && s.id !== 'raw' ? [s.commandTemplate(false), s.commandTemplate(true)] : [s.commandTemplate(false)])),
      workloadCommands,
      loadAverage: { start: loadAtStart, end: os.loadavg()[0]! },
      qcow2fsBuild: (await buildOf(o.qcow2fsRepo)) + (o.baselineRepo ? `; baseline: ${await buildOf(o.baselineRepo)}` : ''),
      invocation: `npm run bench${argv.length ? ' -- ' + argv.join(' ') : ''}`,
    });
    say(`wrote ${path.relative(process.cwd(), o.doc) || o.doc}`);
  }
  return 0;
}

main(process.argv.slice(2))
  .then(
    (code) => code,
    (err: unknown) => {
      process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
      return 1;
    },
  )
  .then(async (code) => {
    await cleanupAll();
    process.exit(code);
  });
