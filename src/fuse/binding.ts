/**
 * The FUSE binding: fuse-native, as vendored in vendor/fuse-native (same JS API; its native part
 * is rebuilt with the changes listed in vendor/fuse-native/CHANGES.md, chiefly FUSE_ASYNC_DIO and
 * FUSE_MAX_PAGES in the INIT answer). When that copy has not been built it loads the stock
 * prebuilt binary of the fuse-native package by itself; QCOW2FS_FUSE_STOCK=1 forces the stock
 * package altogether (for A/B measurements).
 */
import * as path from 'node:path';
import type StockFuse from 'fuse-native';

function load(): typeof StockFuse {
  if (process.env.QCOW2FS_FUSE_STOCK === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      return require(path.resolve(__dirname, '..', '..', 'vendor', 'fuse-native')) as typeof StockFuse;
    } catch {
      // Not there (a packaged tree without vendor/): the stock package below.
    }
  }
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require('fuse-native') as typeof StockFuse;
}

const Fuse = load();
export default Fuse;
