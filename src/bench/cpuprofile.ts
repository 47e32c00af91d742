/**
 * `node dist/bench/cpuprofile.js FILE.cpuprofile [N]`: the top N functions of a V8 CPU profile
 * (from `node --cpu-prof`) by self time and by total (inclusive) time, with percentages.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  hitCount?: number;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface HotSpot {
  name: string;
  selfMs: number;
  totalMs: number;
}

function label(f: CallFrame): string {
  const fn = f.functionName || '(anonymous)';
  if (!f.url) return fn;
  const file = f.url.replace(/^file:\/\//, '');
  const short = file.includes('node_modules') ? file.slice(file.lastIndexOf('node_modules')) : path.relative(process.cwd(), file);
  return `${fn} ${short}:${f.lineNumber + 1}`;
}

/** Self and total milliseconds per function (merged over every place it appears in the tree). */
export function hotSpots(p: CpuProfile): { spots: HotSpot[]; totalMs: number } {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) {
    const id = p.samples[i]!;
    selfUs.set(id, (selfUs.get(id) ?? 0) + (p.timeDeltas[i + 1] ?? p.timeDeltas[i] ?? 0));
  }
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const self = new Map<string, number>();
  const total = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const n = byId.get(id)!;
    const name = label(n.callFrame);
    self.set(name, (self.get(name) ?? 0) + us);
    // Inclusive time: credit each distinct function on the stack once.
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const nm = label(byId.get(cur)!.callFrame);
      if (seen.has(nm)) continue;
      seen.add(nm);
      total.set(nm, (total.get(nm) ?? 0) + us);
    }
  }
  const spots = [...total.keys()].map((name) => ({ name, selfMs: (self.get(name) ?? 0) / 1000, totalMs: total.get(name)! / 1000 }));
  return { spots, totalMs: (p.endTime - p.startTime) / 1000 };
}

function main(): void {
  const [file, nArg] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node dist/bench/cpuprofile.js FILE.cpuprofile [N]\n');
    process.exit(2);
  }
  const n = Number(nArg ?? 25);
  const { spots, totalMs } = hotSpots(JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile);
  const busy = spots.filter((s) => !/^\((idle|program|garbage collector)\)/.test(s.name)).reduce((a, s) => a + s.selfMs, 0);
  const pct = (ms: number): string => ((100 * ms) / totalMs).toFixed(1).padStart(5) + '%';
  const out: string[] = [`profile ${totalMs.toFixed(0)} ms wall, ${busy.toFixed(0)} ms in JS/native (not idle)`, '', 'by self time:'];
  for (const s of [...spots].sort((a, b) => b.selfMs - a.selfMs).slice(0, n)) out.push(`${pct(s.selfMs)} ${s.selfMs.toFixed(0).padStart(7)} ms  ${s.name}`);
  out.push('', 'by total time:');
  for (const s of [...spots].sort((a, b) => b.totalMs - a.totalMs).slice(0, n)) out.push(`${pct(s.totalMs)} ${s.totalMs.toFixed(0).padStart(7)} ms  ${s.name}`);
  process.stdout.write(out.join('\n') + '\n');
}

if (require.main === module) main();
