#!/usr/bin/env node
'use strict';
/*
 * Builds native/qcow2fs_lock.node (fcntl OFD locks, native/ofd_lock.c) and qcow2fs_io.node
 * (preadv2 RWF_NOWAIT, native/pread_nowait.c), and vendor/fuse-native's fuse.node (the FUSE
 * binding with qcow2fs's changes; without it the stock prebuilt fuse-native is used) with node-gyp, which
 * npm bundles. Runs from `npm run build` and from `npm ci` (the root package's own install script
 * runs even where npm skips dependencies' scripts). Skips the build when the addon is newer than
 * its sources. Headers come from npm's nodedir setting, else from the running Node's own
 * <prefix>/include/node, so no download is needed.
 */
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
const addons = [
  {
    dir: path.join(root, 'native'),
    outs: ['qcow2fs_lock.node', 'qcow2fs_io.node'],
    sources: ['ofd_lock.c', 'pread_nowait.c', 'binding.gyp'],
    what: 'the native addons (image locking will be unavailable)',
  },
  {
    dir: path.join(root, 'vendor', 'fuse-native'),
    outs: ['fuse.node'],
    sources: ['fuse-native.c', 'binding.gyp'],
    what: 'vendor/fuse-native (the stock fuse-native binary will be used: no async O_DIRECT, 128 KiB reads)',
  },
];

function mtime(p) {
  try {
    return fs.statSync(p).mtimeMs;
  } catch {
    return -1;
  }
}

const ifNeeded = process.argv.includes('--if-needed');

function findNodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  for (const c of candidates) if (c && fs.existsSync(c)) return c;
  return null;
}

const gyp = findNodeGyp();
if (!gyp) {
  process.stderr.write('build-native: node-gyp not found (it ships with npm); image locking will be unavailable\n');
  process.exit(1);
}
const prefix = path.resolve(path.dirname(process.execPath), '..');
let failed = false;
for (const a of addons) {
  const outs = a.outs.map((f) => path.join(a.dir, 'build', 'Release', f));
  const sources = a.sources.map((f) => path.join(a.dir, f));
  if (ifNeeded && Math.min(...outs.map(mtime)) > Math.max(...sources.map(mtime))) continue;
  const args = [gyp, 'rebuild', '--directory', a.dir, '--loglevel', 'warn'];
  if (!process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) {
    args.push(`--nodedir=${prefix}`);
  }
  const r = spawnSync(process.execPath, args, { cwd: a.dir, stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0 || !outs.every((o) => fs.existsSync(o))) {
    process.stderr.write(`build-native: building ${a.what} failed (needs g++, make, python3)\n`);
    failed = true;
  }
}
if (failed) process.exit(1);
