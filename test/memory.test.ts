/**
 * Memory stays bounded (issue 2 acceptance): the daemon serving a 1 TiB image read at 10,000
 * random offsets stays under 200 MiB RSS. The image has 1,024 L2 tables (64 MiB of metadata,
 * twice the default L2 cache), so an unbounded cache would show.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { need, qemuImg, qemuIo, removeScratch, rng, run, scratchDir, seededBytes, withMount } from './support/env';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const LIMIT_BYTES = 200 * MiB;

beforeAll(() => need('qemu-img', 'qemu-io', 'pgrep', '/dev/fuse', 'fusermount'));
afterAll(() => removeScratch());

function procStatusBytes(pid: number, field: 'VmHWM' | 'VmRSS'): number {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text);
  if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * KiB;
}

describe('memory of the daemon on a 1 TiB image', () => {
  it('stays under 200 MiB after 10,000 random 4 KiB reads', async () => {
    const dir = scratchDir('mem');
    const img = path.join(dir, 'huge.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, String(TiB));
    // One 4 KiB write in every GiB (at a varying place), so each GiB has its own L2 table.
    const src = path.join(dir, 'src.bin');
    fs.writeFileSync(src, seededBytes(7, 4 * KiB));
    const pick = rng(77);
    const writes: number[] = [];
    for (let g = 0; g < 1024; g++) writes.push(g * GiB + Math.floor(pick() * (512 * MiB / 4096)) * 4096);
    qemuIo(img, writes.map((off) => `write -q -s ${src} ${off} 4096`));
    const expected = fs.readFileSync(src);

    await withMount(img, ['--read-only'], (raw, mp) => {
      const pids = run('pgrep', ['-f', `daemon-of ${mp}`]).stdout.trim().split('\n').filter(Boolean).map(Number);
      expect(pids).toHaveLength(1);
      const pid = pids[0]!;
      const startRss = procStatusBytes(pid, 'VmRSS');
      const fd = fs.openSync(raw, 'r');
      const buf = Buffer.alloc(4 * KiB);
      const zero = Buffer.alloc(4 * KiB);
      let dataHits = 0;
      const t0 = Date.now();
      try {
        for (let i = 0; i < 10_000; i++) {
          // Every 10th read lands on written data (checked against what qemu-io wrote); the rest anywhere.
          const onData = i % 10 === 0;
          const off = onData ? writes[Math.floor(pick() * writes.length)]! : Math.floor(pick() * (TiB / 4096)) * 4096;
          const n = fs.readSync(fd, buf, 0, buf.length, off);
          expect(n).toBe(buf.length);
          if (onData) {
            expect(buf.equals(expected), `data at ${off}`).toBe(true);
            dataHits++;
          } else if (!writes.includes(off)) {
            expect(buf.equals(zero), `hole at ${off}`).toBe(true);
          }
        }
      } finally {
        fs.closeSync(fd);
      }
      const seconds = (Date.now() - t0) / 1000;
      const hwm = procStatusBytes(pid, 'VmHWM');
      const rss = procStatusBytes(pid, 'VmRSS');
      console.log(
        `memory: daemon ${pid} after 10,000 random 4 KiB reads of a 1 TiB image in ${seconds.toFixed(1)} s: ` +
          `VmHWM ${(hwm / MiB).toFixed(1)} MiB, VmRSS ${(rss / MiB).toFixed(1)} MiB (at start ${(startRss / MiB).toFixed(1)} MiB)`,
      );
      expect(dataHits).toBe(1000);
      expect(hwm).toBeLessThan(LIMIT_BYTES);
      expect(rss).toBeLessThan(LIMIT_BYTES);
    });
  });
});
