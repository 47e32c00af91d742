#!/usr/bin/env node
'use strict';
/*
 * Builds native/qcow2fs_lock.node (fcntl OFD locks, native/ofd_lock.c) and qcow2fs_io.node
 * (preadv2 RWF_NOWAIT, native/pread_nowait.c) with node-gyp, which
 * npm bundles. Runs from `npm run build` and from `npm ci` (the root package's own install script
 * runs even where npm skips dependencies' scripts). Skips the build when the addon is newer than
 * its sources. Headers come from npm's nodedir setting, else from the running Node's own
 * <prefix>/include/node, so no download is needed.
 */
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const dir = path.resolve(__dirname, '..', 'native');
const outs = ['qcow2fs_lock.node', 'qcow2fs_io.node'].map((f) => path.join(dir, 'build', 'Release', f));
const sources = ['ofd_lock.c', 'pread_nowait.c', 'binding.gyp'].map((f) => path.join(dir, f));

function mtime(p) {
  try {
    return fs.statSync(p).mtimeMs;
  } catch {
    return -1;
  }
}

if (process.argv.includes('--if-needed') && Math.min(...outs.map(mtime)) > Math.max(...sources.map(mtime))) process.exit(0);

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
const args = [gyp, 'rebuild', '--directory', dir, '--loglevel', 'warn'];
const prefix = path.resolve(path.dirname(process.execPath), '..');
if (!process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) {
  args.push(`--nodedir=${prefix}`);
}
const r = spawnSync(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'] });
if (r.status !== 0 || !outs.every((o) => fs.existsSync(o))) {
  process.stderr.write('build-native: building the native addons failed (needs g++, make, python3)\n');
  process.exit(1);
}
