/** Medians, the Markdown tables, and docs/PERFORMANCE.md (its "Optimisation log" is kept across runs). */
import * as fs from 'node:fs';
import type { MachineInfo } from './host';
import type { Sample } from './runner';
import type { BenchSystem, SystemId } from './systems';
import type { Unit, Workload } from './workloads';

export interface Summary {
  median: number;
  min: number;
  max: number;
  n: number;
  failed: number;
  firstError?: string;
}

export function median(values: readonly number[]): number {
  const v = [...values].sort((a, b) => a - b);
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
}

export function summarize(samples: readonly Sample[]): Summary | null {
  if (samples.length === 0) return null;
  const ok = samples.filter((s) => s.value !== undefined).map((s) => s.value!);
  const failed = samples.length - ok.length;
  const firstError = samples.find((s) => s.error !== undefined)?.error;
  if (ok.length === 0) return { median: NaN, min: NaN, max: NaN, n: 0, failed, ...(firstError ? { firstError } : {}) };
  return { median: median(ok), min: Math.min(...ok), max: Math.max(...ok), n: ok.length, failed, ...(firstError ? { firstError } : {}) };
}

export function formatValue(v: number, unit: Unit): string {
  if (!Number.isFinite(v)) return '?';
  switch (unit) {
    case 'IOPS':
      return v >= 10000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(0);
    case 'MiB/s':
      return v >= 100 ? v.toFixed(0) : v.toFixed(1);
    case 's':
      return v.toFixed(2);
    case 'ms':
      return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }
}

const cellEscape = (s: string): string => s.replace(/\|/g, '\\|').replace(/\s+/g, ' ').slice(0, 120);

function cell(s: Summary | null, unit: Unit): string {
  if (!s) return '—';
  if (s.n === 0) return `n/a (error: ${cellEscape(s.firstError ?? 'unknown')})`;
  const range = s.n > 1 ? ` (${formatValue(s.min, unit)}–${formatValue(s.max, unit)})` : '';
  const warn = s.failed > 0 ? ` ⚠ ${s.failed} failed: ${cellEscape(s.firstError ?? '')}` : '';
  return `${formatValue(s.median, unit)}${range}${warn}`;
}

function ratio(a: Summary | null | undefined, b: Summary | null | undefined): string {
  if (!a || !b || a.n === 0 || b.n === 0 || !(b.median > 0)) return '—';
  return `${(a.median / b.median).toFixed(2)}×`;
}

export interface Row {
  workload: Workload;
  bySystem: Map<SystemId, Summary | null>;
}

export function rowsOf(workloads: readonly Workload[], samples: readonly Sample[], systems: readonly BenchSystem[]): Row[] {
  return workloads
    .filter((w) => samples.some((s) => s.workload === w.id))
    .map((w) => {
      const bySystem = new Map<SystemId, Summary | null>();
      for (const sys of systems) bySystem.set(sys.id, summarize(samples.filter((s) => s.workload === w.id && s.system === sys.id)));
      return { workload: w, bySystem };
    });
}

/** The best of the peers (QSD, qcowmount) in the workload's direction. */
function bestPeer(r: Row): Summary | null {
  const peers = (['qsd', 'qcowmount'] as const).map((id) => r.bySystem.get(id)).filter((s): s is Summary => !!s && s.n > 0);
  if (peers.length === 0) return null;
  return peers.reduce((a, b) => ((r.workload.better === 'higher' ? b.median > a.median : b.median < a.median) ? b : a));
}

export function resultsTable(rows: readonly Row[], systems: readonly BenchSystem[]): string {
  const withBaseline = systems.some((s) => s.id === 'baseline');
  const head = ['Workload', 'Unit', ...systems.map((s) => s.label), 'qcow2fs / QSD', 'qcow2fs / best peer', ...(withBaseline ? ['qcow2fs / baseline'] : [])];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i < 2 ? '---' : '---:')).join('|')}|`];
  for (const r of rows) {
    const q = r.bySystem.get('qcow2fs');
    const unit = `${r.workload.unit} ${r.workload.better === 'higher' ? '↑' : '↓'}`;
    const cells = systems.map((s) => cell(r.bySystem.get(s.id) ?? null, r.workload.unit));
    const vsBaseline = withBaseline ? ` ${ratio(q, r.bySystem.get('baseline'))} |` : '';
    lines.push(`| ${r.workload.title} | ${unit} | ${cells.join(' | ')} | ${ratio(q, r.bySystem.get('qsd'))} | ${ratio(q, bestPeer(r))} |${vsBaseline}`);
  }
  return lines.join('\n');
}

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;

/** Peak RSS (the largest VmHWM over the repetitions) and CPU seconds per GiB moved (median), per daemon. */
export function resourceTable(workloads: readonly Workload[], samples: readonly Sample[], systems: readonly BenchSystem[]): string {
  const daemons = systems.filter((s) => s.id !== 'raw');
  const head = ['Workload', ...daemons.map((s) => `${s.label} peak RSS MiB`), ...daemons.map((s) => `${s.label} CPU s/GiB`)];
  const lines = [`| ${head.join(' | ')} |`, `|---|${daemons.map(() => '---:').join('|')}|${daemons.map(() => '---:').join('|')}|`];
  for (const w of workloads) {
    const mine = samples.filter((s) => s.workload === w.id);
    if (mine.length === 0) continue;
    const rss = daemons.map((d) => {
      const v = mine.filter((s) => s.system === d.id && s.peakRssBytes !== undefined).map((s) => s.peakRssBytes!);
      return v.length ? (Math.max(...v) / MIB).toFixed(1) : '—';
    });
    const cpu = daemons.map((d) => {
      const v = mine
        .filter((s) => s.system === d.id && s.cpuSeconds !== undefined && (s.bytesMoved ?? 0) >= MIB)
        .map((s) => s.cpuSeconds! / (s.bytesMoved! / GIB));
      return v.length ? median(v).toFixed(2) : '—';
    });
    lines.push(`| ${w.title} | ${rss.join(' | ')} | ${cpu.join(' | ')} |`);
  }
  return lines.join('\n');
}

export interface DocInput {
  date: Date;
  machine: MachineInfo;
  mode: string;
  repetitions: number;
  coldSource: boolean;
  results: string;
  resources: string;
  imageCommands: readonly string[];
  systemCommands: readonly string[];
  workloadCommands: readonly string[];
  invocation: string;
  /** 1-minute load average when the run started and when it ended: other work on the machine. */
  loadAverage: { start: number; end: number };
  /** The qcow2fs build measured (commit, and whether its tree had changes). */
  qcow2fsBuild: string;
}

const LOG_HEADING = '## Optimisation log';

const EMPTY_LOG = `${LOG_HEADING}

What each optimisation gained, measured with this benchmark on the same machine (before → after,
medians). Newest last.

`;

/** The existing doc's "Optimisation log" section (to the end of the file), or an empty one. */
export function keptLog(existing: string | null): string {
  if (existing === null) return EMPTY_LOG;
  const at = existing.indexOf(`\n${LOG_HEADING}`);
  if (at < 0) return EMPTY_LOG;
  return existing.slice(at + 1).trimEnd() + '\n';
}

export function renderDoc(d: DocInput, log: string): string {
  const m = d.machine;
  const gib = (m.ramBytes / 1024 ** 3).toFixed(1);
  return `# Performance

Written by \`${d.invocation}\` (src/bench/) on ${d.date.toISOString().replace(/\.\d+Z$/, 'Z')}. The tables are
regenerated on every run; the "Optimisation log" at the end is kept.

## Machine

- CPU: ${m.cpuModel}, ${m.cores} cores; RAM ${gib} GiB; kernel ${m.kernel}; ${m.os}
- Load average (1 min) at start ${d.loadAverage.start.toFixed(2)}, at end ${d.loadAverage.end.toFixed(2)}${
    Math.max(d.loadAverage.start, d.loadAverage.end) > m.cores / 2 ? ' — **the machine was busy with other work: figures are noisy**' : ''
  }
- qcow2fs: ${d.qcow2fsBuild}
- Node ${m.node}; ${Object.entries(m.versions)
    .map(([k, v]) => `${k}: ${v}`)
    .join('; ')}

## Results (${d.mode} mode, ${d.repetitions} repetitions)

Each cell is the median (min–max) over the repetitions. ↑ higher is better, ↓ lower is better.
"qcow2fs / QSD" and "qcow2fs / best peer" are ratios of the medians (best peer: the better of QSD
and qcowmount on that line). QSD is \`qemu-storage-daemon --export type=fuse\`; the raw file (no
FUSE) is the ceiling. "n/a (error: ...)" means that system failed the workload (e.g. EROFS from
a qcow2fs build without the write path; qcowmount cannot read zstd images); "—" means it does not
take part (qcowmount is read-only; mount time means nothing for a plain file).

${d.results}

### Daemon resources

Peak RSS is VmHWM from /proc/PID/status at the end of the run (largest over the repetitions);
CPU s/GiB is the daemon's utime+stime (/proc/PID/stat) during the workload per GiB moved
(median). For the ext4 workload "moved" is the size of the file tree.

${d.resources}

## Method

- Interleaved: for each workload, every repetition runs each system in turn (qcow2fs, QSD,
  qcowmount, raw file, qcow2fs, QSD, ...).
- Identical images: read workloads open the same image read-only on every system
  (qcow2fs \`-r\`, QSD \`read-only=on,writable=off\`, qcowmount is read-only), so nothing can change
  it; workloads that write start from a fresh copy (\`cp --reflink=auto\`) or a fresh
  \`qemu-img create\` on every run (the raw ceiling: a copy of the source data, or a sparse file).
- Caches: before every run \`sync; echo 3 > /proc/sys/vm/drop_caches\`, so the FUSE file is cold;
  ${d.coldSource ? 'the source image was left cold too (--cold-source).' : 'then the source image file is read once (`cat IMAGE > /dev/null`), so the host side is page-cached, as in the issue\'s peer figures. With --cold-source it is left cold.'}
- Mount to ready: from starting the mount command to a completed 4 KiB read of the raw file
  (for qcow2fs \`qcow2fs mount\` returns when ready; for QSD and qcowmount we poll until the
  file has its full size). The page cache is not dropped first, so the figure is mounting, not
  loading node or QEMU from disk.
- ext4: \`losetup --find --show FILE; mkfs.ext4 -q -F LOOP; mount LOOP MNT; tar -xf tree.tar -C MNT;
  sync -f MNT; umount MNT\` is timed; then \`e2fsck -fn LOOP\` must exit 0; \`losetup -d LOOP\`.

## Commands

Images (built once per size profile, reused while their stamp file exists):

\`\`\`sh
${d.imageCommands.join('\n')}
\`\`\`

Systems:

\`\`\`sh
${d.systemCommands.join('\n')}
\`\`\`

Workloads (FILE is the raw file each system shows):

\`\`\`sh
${d.workloadCommands.join('\n')}
\`\`\`

${log}`;
}

export function writeDoc(file: string, d: DocInput): void {
  const existing = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : null;
  fs.writeFileSync(file, renderDoc(d, keptLog(existing)));
}
