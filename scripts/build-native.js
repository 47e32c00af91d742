#!/usr/bin/env node
'use strict';
/*
 * Builds the native addons with node-gyp, which npm bundles:
 *   native/            qcow2fs_lock.node (fcntl OFD locks, ofd_lock.c) and qcow2fs_io.node
 *                      (preadv2 RWF_NOWAIT, SEEK_DATA/SEEK_HOLE, pread_nowait.c)
 *   native/codec/      qcow2fs_codec.node (zstd and zlib decompression on the thread pool,
 *                      codec.c; links libzstd, libdeflate and zlib: needs libzstd-dev, libdeflate-dev and zlib1g-dev)
 *   vendor/fuse-native/ fuse.node (the FUSE binding with qcow2fs's changes, CHANGES.md there)
 * Runs from `npm run build` and from `npm ci` (the root package's own install script runs even
 * where npm skips dependencies' scripts). Skips a project whose addons are newer than its
 * sources. Headers come from npm's nodedir setting, else from the running Node's own
 * <prefix>/include/node, so no download is needed.
 *
 * The codec addon and the patched FUSE binding are optional: without the first, compressed
 * clusters decode through Node's zlib and the WebAssembly zstd (slower, same result); without
 * the second, the stock prebuilt fuse-native is used (no async O_DIRECT, 128 KiB reads). A
 * failed build of either only warns.
 */
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const native = path.resolve(__dirname, '..', 'native');
const projects = [
  { dir: native, outs: ['qcow2fs_lock.node', 'qcow2fs_io.node'], sources: ['ofd_lock.c', 'pread_nowait.c', 'binding.gyp'], required: true },
  {
    dir: path.join(native, 'codec'),
    outs: ['qcow2fs_codec.node'],
    sources: ['codec.c', 'binding.gyp'],
    required: false,
    why: 'compressed clusters will decode through Node zlib and WebAssembly zstd (slower); install libzstd-dev, libdeflate-dev and zlib1g-dev (scripts/setup-system.sh)',
  },
  {
    dir: path.resolve(__dirname, '..', 'vendor', 'fuse-native'),
    outs: ['fuse.node'],
    sources: ['fuse-native.c', 'binding.gyp'],
    required: false,
    why: 'the stock prebuilt fuse-native will be used (no async O_DIRECT, 128 KiB reads)',
  },
];

function mtime(p) {
  try {
    return fs.statSync(p).mtimeMs;
  } catch {
    return -1;
  }
}

function findNodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  for (const c of candidates) if (c && fs.existsSync(c)) return c;
  return null;
}

let failed = false;
for (const p of projects) {
  const outs = p.outs.map((f) => path.join(p.dir, 'build', 'Release', f));
  const sources = p.sources.map((f) => path.join(p.dir, f));
  if (process.argv.includes('--if-needed') && Math.min(...outs.map(mtime)) > Math.max(...sources.map(mtime))) continue;
  const gyp = findNodeGyp();
  if (!gyp) {
    process.stderr.write('build-native: node-gyp not found (it ships with npm); image locking will be unavailable\n');
    process.exit(1);
  }
  const args = [gyp, 'rebuild', '--directory', p.dir, '--loglevel', 'warn'];
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (!process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) {
    args.push(`--nodedir=${prefix}`);
  }
  const r = spawnSync(process.execPath, args, { cwd: p.dir, stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0 || !outs.every((o) => fs.existsSync(o))) {
    if (p.required) {
      process.stderr.write('build-native: building the native addons failed (needs g++, make, python3)\n');
      failed = true;
    } else {
      process.stderr.write(`build-native: building ${p.outs.join(', ')} failed: ${p.why}\n`);
    }
  }
}
process.exit(failed ? 1 : 0);
