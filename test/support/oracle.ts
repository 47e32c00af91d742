/** QEMU as the oracle: assertions shared by the tests that write through qcow2fs. */
import { expect } from 'vitest';
import { run } from './env';

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
