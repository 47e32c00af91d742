/** QEMU as the oracle: assertions shared by the tests that write through qcow2fs. */
import { expect } from 'vitest';
import { qemuIo, run } from './env';

/** qemu-img check: exit 0, no corruption, no leak. */
export function expectCheckClean(image: string): void {
  const check = run('qemu-img', ['check', '--output', 'json', image]);
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const report = JSON.parse(check.stdout) as { corruptions?: number; leaks?: number };
  expect(report.corruptions ?? 0, `corruptions in ${image}`).toBe(0);
  expect(report.leaks ?? 0, `leaks in ${image}`).toBe(0);
}

/** qemu-img compare of two images (formats given, optionally O_DIRECT for the first): equal. */
export function expectSameContent(a: string, aFormat: string, b: string, bFormat: string, opts: { direct?: boolean; what?: string } = {}): void {
  const args = ['compare', ...(opts.direct ? ['-T', 'none'] : []), '-f', aFormat, '-F', bFormat, a, b];
  const cmp = run('qemu-img', args);
  expect(cmp.code, `${opts.what ?? 'compare'}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
}

/**
 * One round of random writes through a mounted raw file, each read back at once with its
 * pattern (qemu-io -n: O_DIRECT), the same writes into the qemu-io reference `ref`, then the
 * whole raw file compared with it. `bigEvery`: every that many writes is up to `bigSectors`
 * sectors long, the others up to `smallSectors`.
 */
export function writeRoundAndCompare(
  raw: string,
  ref: string,
  r: () => number,
  size: number,
  round: number,
  o: { writes: number; bigEvery: number; bigSectors: number; smallSectors: number },
): void {
  const cmds: string[] = [];
  const refCmds: string[] = [];
  for (let i = 0; i < o.writes; i++) {
    const len = 512 * (1 + Math.floor(r() * (i % o.bigEvery === 0 ? o.bigSectors : o.smallSectors)));
    const off = 512 * Math.floor((r() * (size - len)) / 512);
    const pattern = 1 + ((round * o.writes + i) % 250);
    cmds.push(`write -P ${pattern} ${off} ${len}`, `read -P ${pattern} ${off} ${len}`);
    refCmds.push(`write -P ${pattern} ${off} ${len}`);
  }
  const out = run('qemu-io', ['-f', 'raw', '-n', ...cmds.flatMap((cmd) => ['-c', cmd]), raw]);
  expect(out.code, out.stderr).toBe(0);
  expect(out.stdout + out.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
  qemuIo(ref, refCmds);
  expectSameContent(raw, 'raw', ref, 'qcow2', { direct: true, what: `round ${round}` });
}
