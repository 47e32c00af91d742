/**
 * Forensic and read-only mounts: every file of the chain opened O_RDONLY, writes refused with
 * EROFS, SHA-256 and mtime of the image and its backing files unchanged across mount, reads,
 * attempted writes and unmount; info.json agrees with `qemu-img info --output json`; backing
 * files outside the image's directory refused unless --allow-backing; dirty or corrupt-flagged
 * images served without repair.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { daemonPids, fileState, forceCleanup, openFiles, type FileState } from './support/daemons';
import { isMounted, need, qcow2fs, qemuImg, qemuIo, qemuRawSha, removeScratch, scratchDir, sha256File, withMount } from './support/env';

type Json = Record<string, unknown>;

let evidence: string;
let base: string;
let mid: string;
let top: string;

function states(files: string[]): Record<string, FileState> {
  return Object.fromEntries(files.map((f) => [f, fileState(f)]));
}

/** Every way to write through a mount; each must fail with EROFS. */
function attemptWrites(mp: string, raw: string): void {
  const erofs = /EROFS/;
  expect(() => fs.openSync(raw, 'r+')).toThrow(erofs);
  expect(() => fs.writeFileSync(raw, 'x')).toThrow(erofs);
  expect(() => fs.truncateSync(raw, 0)).toThrow(erofs);
  expect(() => fs.writeFileSync(path.join(mp, 'new-file'), 'x')).toThrow(erofs);
  expect(() => fs.mkdirSync(path.join(mp, 'new-dir'))).toThrow(erofs);
  expect(() => fs.chmodSync(raw, 0o666)).toThrow(erofs);
  expect(() => fs.utimesSync(raw, new Date(0), new Date(0))).toThrow(erofs);
  expect(() => fs.unlinkSync(raw)).toThrow(erofs);
  expect(() => fs.renameSync(raw, path.join(mp, 'moved.raw'))).toThrow(erofs);
}

beforeAll(() => {
  need('/dev/fuse', 'fusermount', 'qemu-img', 'qemu-io');
  evidence = scratchDir('evidence');
  base = path.join(evidence, 'base.raw');
  mid = path.join(evidence, 'mid.qcow2');
  top = path.join(evidence, 'top.qcow2');
  qemuImg('create', '-f', 'raw', base, '16M');
  qemuIo(base, ['write -P 0x0b 0 4M', 'write -P 0x0c 12M 1M'], 'raw');
  qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid);
  qemuIo(mid, ['write -P 0x1b 1M 1M']);
  qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
  qemuIo(top, ['write -P 0x2b 2M 512k']);
  qemuImg('snapshot', '-c', 'acquired', top);
  qemuIo(top, ['write -P 0x3b 3M 1M', 'write -z 0 64k']);
  qemuImg('snapshot', '-c', 'later', top);
  qemuIo(top, ['write -P 0x4b 15M 1M']);
});

afterAll(() => removeScratch());

describe('--forensic', () => {
  it('serves the image and all snapshots read-only, O_RDONLY, and leaves every file of the chain untouched', async () => {
    const want = {
      active: qemuRawSha(top),
      acquired: qemuRawSha(top, ['-l', 'snapshot.name=acquired']),
      later: qemuRawSha(top, ['-l', 'snapshot.name=later']),
    };
    const qemuInfo = JSON.parse(qemuImg('info', '--output', 'json', top)) as Json;
    const qemuChain = JSON.parse(qemuImg('info', '--output', 'json', '--backing-chain', top)) as Json[];
    const before = states([top, mid, base]);

    await withMount(top, ['--forensic'], (raw, mp) => {
      expect(fs.readdirSync(mp).sort()).toEqual(['info.json', 'snapshots', 'top.raw']);
      expect(fs.statSync(raw).mode & 0o777).toBe(0o444);
      expect(sha256File(raw)).toBe(want.active);
      expect(sha256File(path.join(mp, 'snapshots', 'acquired.raw'))).toBe(want.acquired);
      expect(sha256File(path.join(mp, 'snapshots', 'later.raw'))).toBe(want.later);

      // O_RDONLY everywhere: every descriptor the daemon holds on the chain is read-only.
      const [pid] = daemonPids(mp);
      const held = openFiles(pid!).filter((f) => [top, mid, base].includes(f.target));
      expect(held.map((f) => f.target).sort()).toEqual([base, mid, top].sort());
      expect(held.every((f) => f.accessMode === 0)).toBe(true);

      // info.json says what qemu-img info says, plus sizes and the whole chain.
      const infoPath = path.join(mp, 'info.json');
      expect(fs.statSync(infoPath).mode & 0o777).toBe(0o444);
      const info = JSON.parse(fs.readFileSync(infoPath, 'utf8')) as Json;
      expect(info).toMatchObject(qemuInfo);
      expect(info['file-size']).toBe(before[top]!.size);
      const snaps = info.snapshots as Json[];
      expect(snaps.map((s) => [s.id, s.name, s['disk-size']])).toEqual([
        ['1', 'acquired', 16 * 1024 * 1024],
        ['2', 'later', 16 * 1024 * 1024],
      ]);
      const chain = info['backing-chain'] as Json[];
      expect(chain).toHaveLength(2);
      for (const [i, file] of [mid, base].entries()) {
        const q = qemuChain[i + 1]!;
        expect(chain[i]).toMatchObject({
          filename: q.filename,
          format: q.format,
          'virtual-size': q['virtual-size'],
          'actual-size': q['actual-size'],
          'file-size': fs.statSync(file).size,
        });
      }
      expect(chain[0]!.filename).toBe(mid);

      attemptWrites(mp, raw);
      expect(() => fs.openSync(path.join(mp, 'snapshots', 'later.raw'), 'r+')).toThrow(/EROFS/);
      expect(() => fs.writeFileSync(infoPath, '{}')).toThrow(/EROFS/);
      // Still served after the refused writes.
      expect(sha256File(raw)).toBe(want.active);
    });
    expect(states([top, mid, base])).toEqual(before);
  });

  it('refuses a backing file outside the image directory unless --allow-backing names its directory', async () => {
    const other = scratchDir('elsewhere');
    const outside = path.join(other, 'outside-base.qcow2');
    qemuImg('create', '-f', 'qcow2', outside, '8M');
    qemuIo(outside, ['write -P 0x5b 0 1M']);
    const caseDir = scratchDir('case');
    const img = path.join(caseDir, 'suspect.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', outside, '-F', 'qcow2', img);
    qemuIo(img, ['write -P 0x6b 4M 1M']);
    const want = qemuRawSha(img);
    const before = states([img, outside]);

    const mp = scratchDir('mnt');
    const r = qcow2fs(['mount', '--forensic', img, mp]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/backing file .*outside-base\.qcow2 lies outside the allowed directories.*--allow-backing/);
    expect(isMounted(mp)).toBe(false);
    forceCleanup(mp);

    // The option before the image and mountpoint takes one value, not them too.
    const early = qcow2fs(['mount', '--forensic', '--allow-backing', other, img, mp]);
    expect(early.code, early.stderr).toBe(0);
    expect(sha256File(path.join(mp, 'suspect.raw'))).toBe(want);
    expect(qcow2fs(['umount', mp]).code).toBe(0);
    await withMount(img, ['--forensic', '--allow-backing', other], (raw, mnt) => {
      expect(sha256File(raw)).toBe(want);
      const info = JSON.parse(fs.readFileSync(path.join(mnt, 'info.json'), 'utf8')) as Json;
      const chain = info['backing-chain'] as Json[];
      expect(chain.map((l) => [l.filename, l['file-size']])).toEqual([[outside, fs.statSync(outside).size]]);
    });
    expect(states([img, outside])).toEqual(before);
  });
});

describe('read-only mounts of flagged images', () => {
  /** Sets incompatible feature bits (header offset 72, big-endian u64) in place. */
  function setIncompatibleBits(file: string, bits: number): void {
    const fd = fs.openSync(file, 'r+');
    try {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, 79);
      b[0]! |= bits;
      fs.writeSync(fd, b, 0, 1, 79);
    } finally {
      fs.closeSync(fd);
    }
  }

  for (const [label, bits] of [['dirty', 1], ['corrupt', 2], ['dirty and corrupt', 3]] as const) {
    it(`mounts a ${label}-flagged image without repairing it`, async () => {
      const d = scratchDir('flag');
      const img = path.join(d, 'flagged.qcow2');
      qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '8M');
      qemuIo(img, ['write -P 0x7b 0 1M', 'write -P 0x7c 5M 64k']);
      const want = qemuRawSha(img);
      setIncompatibleBits(img, bits);
      const before = fileState(img);
      const header = fs.readFileSync(img).subarray(0, 512);

      for (const args of [['--read-only'], ['--forensic']]) {
        await withMount(img, args, (raw, mp) => {
          expect(sha256File(raw)).toBe(want);
          attemptWrites(mp, raw);
          if (args[0] === '--forensic') {
            const info = JSON.parse(fs.readFileSync(path.join(mp, 'info.json'), 'utf8')) as Json;
            expect(info['dirty-flag']).toBe((bits & 1) !== 0);
            expect((info['format-specific'] as { data: Json }).data.corrupt).toBe((bits & 2) !== 0);
          }
        });
      }
      expect(fileState(img)).toEqual(before);
      expect(fs.readFileSync(img).subarray(0, 512).equals(header)).toBe(true);
      if (bits & 2) {
        // Read-write is refused for a corrupt image, with the way out in the message.
        const mp = scratchDir('mnt');
        const r = qcow2fs(['mount', img, mp]);
        expect(r.code).not.toBe(0);
        expect(r.stderr).toMatch(/marked corrupt.*read-only/);
        forceCleanup(mp);
      }
    });
  }
});
