/**
 * Mount lifecycle: mounting a Layout over fuse-native, the ready signal to the launching process,
 * SIGINT/SIGTERM, noticing an unmount done by umount(8)/fusermount, and a clean shutdown that
 * flushes and closes every device before the process exits.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFile } from 'node:child_process';
import type FuseTypes from 'fuse-native';
import Fuse from './binding';
import { UsageError } from '../errors';
import { log } from '../log';
import type { Layout } from './layout';
import { DirectReadMap } from './direct-read';
import { checkMountpoint, findMount } from './mounts';
import { makeOps, type OpsState } from './ops';

export const FUSE_SUBTYPE = 'qcow2fs';
/**
 * Largest write request. libfuse 2.9 reads each request into its channel's buffer (132 KiB);
 * the vendored binding sizes that buffer for max_pages, so writes can be as large as reads.
 * QCOW2FS_FUSE_MAX_WRITE (bytes) overrides, for A/B measurements.
 */
export function maxWriteBytes(patchedBinding: boolean, maxRead: number): number {
  const forced = Number(process.env.QCOW2FS_FUSE_MAX_WRITE ?? NaN);
  if (Number.isInteger(forced) && forced >= 4096) return Math.min(forced, patchedBinding ? maxRead : 128 * 1024);
  return patchedBinding ? maxRead : 128 * 1024;
}
/**
 * Largest read request. Above 128 KiB it needs FUSE_MAX_PAGES in the INIT answer, which only the
 * vendored binding adds (vendor/fuse-native); a read request is small whatever its size (the
 * reply buffer is allocated per request), so libfuse 2.9's buffer does not limit it.
 */
export function maxReadBytes(patchedBinding: boolean): number {
  if (!patchedBinding) return 128 * 1024;
  const pages = Number(process.env.QCOW2FS_FUSE_MAX_PAGES ?? 256);
  return Math.max(32, Math.min(256, Number.isInteger(pages) ? pages : 256)) * 4096;
}
/**
 * Kernel queue for asynchronous requests (reads-ahead, and with FUSE_ASYNC_DIO every O_DIRECT
 * piece): the kernel default is 12, below a queue depth of 16. Not more than 32: libfuse 2
 * starts a worker thread for each request in flight, and at 64 a deep queue of reads of 2 MiB
 * compressed clusters churned through up to 181 threads (175 MiB of peak memory against 142 at
 * 32, with the same IOPS; random 4 KiB reads at QD16 lost nothing).
 */
export const MAX_BACKGROUND = 32;
/** How long stop() waits for fusermount to report back before it goes on (see stop()). */
const UNMOUNT_WAIT_MS = 5000;

export interface FuseMountOptions {
  /** Shown as the mount's source in /proc/mounts (the image path). */
  fsname: string;
  readOnly: boolean;
  allowOther?: boolean;
  debug?: boolean;
  /** The kernel's read-ahead on the mount's files, bytes (0 or absent: the kernel's default). */
  readAheadBytes?: number;
}

/**
 * Sets the kernel's read-ahead for the mount's files: /sys/class/bdi/<its device>/read_ahead_kb.
 * A FUSE mount starts at the kernel's 128 KiB, and its INIT answer (max_readahead) can only
 * lower that. Needs root; without it (or sysfs) the kernel's default stays, said at debug level.
 */
function setReadAhead(mountpoint: string, bytes: number): void {
  const dev = findMount(mountpoint)?.device;
  const file = `/sys/class/bdi/${dev}/read_ahead_kb`;
  try {
    if (!dev || !/^\d+:\d+$/.test(dev)) throw new Error('no device number in mountinfo');
    fs.writeFileSync(file, String(Math.ceil(bytes / 1024)));
    log.debug({ file, kib: Math.ceil(bytes / 1024) }, 'read-ahead set');
  } catch (err) {
    log.debug({ file, err: (err as Error).message }, "read-ahead left at the kernel's default");
  }
}

/** Escapes a value for libfuse's comma-separated -o list. */
function escapeOption(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/,/g, '\\,');
}

/**
 * fuse-native's option list has no `big_writes` or `max_write`, and without them FUSE 2.9 splits
 * every write into 4 KiB requests. Its option string is built by the overridable _fuseOptions(),
 * so we extend that one method instead of patching the package.
 */
class Qcow2fsFuse extends Fuse {
  constructor(
    mnt: string,
    ops: FuseTypes.FuseOps,
    opts: FuseTypes.FuseOptions,
    private readonly extra: string[],
  ) {
    super(mnt, ops, opts);
  }
  protected override _fuseOptions(): string {
    const base = super._fuseOptions();
    const extra = this.extra.join(',');
    return base ? `${base},${extra}` : `-o${extra}`;
  }
}

/** This process's descriptors open on /dev/fuse (its FUSE session channels). */
function fuseDeviceFds(): Set<string> {
  const out = new Set<string>();
  try {
    for (const fd of fs.readdirSync('/proc/self/fd')) {
      try {
        if (fs.readlinkSync(`/proc/self/fd/${fd}`) === '/dev/fuse') out.add(fd);
      } catch {
        // Closed meanwhile.
      }
    }
  } catch {
    // No /proc: the channel check is skipped.
  }
  return out;
}

export class FuseMount {
  private stopped = false;
  private poller: NodeJS.Timeout | null = null;

  private constructor(
    readonly mountpoint: string,
    /** Held for the mount's lifetime: it owns the native FUSE thread's state. */
    readonly fuse: FuseTypes,
    readonly layout: Layout,
    private readonly state: OpsState,
    /** The /dev/fuse descriptors of this mount's session; libfuse closes them when its loop ends. */
    private readonly channelFds: string[],
  ) {}

  static async mount(mountpoint: string, layout: Layout, opts: FuseMountOptions): Promise<FuseMount> {
    mountpoint = path.resolve(mountpoint);
    checkMountpoint(mountpoint);
    const state: OpsState = { openHandles: 0, directReads: new Map() };
    const ops = makeOps(layout, { readOnly: opts.readOnly }, state);
    const patched = Fuse.patched === true;
    const maxRead = maxReadBytes(patched);
    const extra = [
      'big_writes',
      `max_write=${maxWriteBytes(patched, maxRead)}`,
      `max_read=${maxRead}`,
      'kernel_cache',
      `max_background=${MAX_BACKGROUND}`,
      `congestion_threshold=${(MAX_BACKGROUND * 3) / 4}`,
    ];
    if (opts.readOnly) extra.push('ro');
    if (opts.allowOther) extra.push('default_permissions');
    const fuse = new Qcow2fsFuse(
      mountpoint,
      ops,
      {
        fsname: escapeOption(opts.fsname),
        subtype: FUSE_SUBTYPE,
        allowOther: !!opts.allowOther,
        // Requests may legitimately take long (a flush of a big write-back); never time them out.
        timeout: false,
        debug: !!opts.debug,
        // Vendored binding: let the kernel queue O_DIRECT requests (see vendor/fuse-native/CHANGES.md).
        asyncDio: process.env.QCOW2FS_NO_ASYNC_DIO === undefined,
        maxPages: maxRead / 4096,
      },
      extra,
    );
    const fdsBefore = fuseDeviceFds();
    await new Promise<void>((resolve, reject) =>
      fuse.mount((err) => (err ? reject(new UsageError(`cannot mount on ${mountpoint}: ${err.message}`)) : resolve())),
    );
    const channelFds = [...fuseDeviceFds()].filter((fd) => !fdsBefore.has(fd));
    const observed = new Set<import('../image/blockdev').BlockDevice>();
    for (const [p, dev] of layout.devicePaths()) {
      const map = DirectReadMap.attach(fuse, p, dev, observed);
      if (map) state.directReads!.set(p, map);
    }
    if (opts.readAheadBytes) setReadAhead(mountpoint, opts.readAheadBytes);
    log.info({ mountpoint, source: opts.fsname, patchedBinding: patched, maxRead, directReads: state.directReads!.size }, 'mounted');
    return new FuseMount(mountpoint, fuse, layout, state, channelFds);
  }

  /** True while the kernel still lists our mount. */
  isMounted(): boolean {
    const m = findMount(this.mountpoint);
    return !!m && m.fstype === `fuse.${FUSE_SUBTYPE}`;
  }

  /**
   * False once libfuse's loop has ended and closed its /dev/fuse descriptor: the kernel tore the
   * connection down (the last file of a lazily unmounted mount closed). The RELEASE of that last
   * file may never reach us then, so the open-handle count alone cannot tell.
   */
  channelOpen(): boolean {
    if (this.channelFds.length === 0) return true;
    return this.channelFds.some((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`) === '/dev/fuse';
      } catch {
        return false;
      }
    });
  }

  /**
   * Calls `onGone` once umount(8) or fusermount -u has taken the mount away and no file is open
   * on it any more (after a lazy unmount, open files keep working until closed). The interval
   * also keeps the event loop alive: fuse-native's own handles do not.
   */
  watchExternalUnmount(onGone: () => void, intervalMs = 250): void {
    this.poller = setInterval(() => {
      if (!this.stopped && !this.isMounted() && (this.state.openHandles === 0 || !this.channelOpen())) {
        log.info({ mountpoint: this.mountpoint }, 'unmounted from outside');
        onGone();
      }
    }, intervalMs);
  }

  /** Unmounts (lazily if busy, as on SIGTERM) unless already gone, then flushes and closes every device. */
  /** Unmounts, flushes and closes every device; what failed to flush or close, one line each. */
  async stop(): Promise<string[]> {
    if (this.stopped) return [];
    this.stopped = true;
    const failures: string[] = [];
    if (this.poller) clearInterval(this.poller);
    if (this.isMounted()) {
      await new Promise<void>((resolve) => {
        // Seen once in a full test run: fusermount had unmounted and exited, but its exit never
        // reached Node (a zombie child, no callback), and the daemon waited forever instead of
        // flushing and closing the image. So the wait is bounded; whether the mount is gone is
        // what counts.
        let done = false;
        const finish = (): void => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          resolve();
        };
        const timer = setTimeout(() => {
          if (!done) log.warn({ mountpoint: this.mountpoint }, `fusermount did not report back in ${UNMOUNT_WAIT_MS} ms${this.isMounted() ? '; still mounted' : '; the mount is gone'}`);
          finish();
        }, UNMOUNT_WAIT_MS);
        execFile('fusermount', ['-u', '-z', this.mountpoint], (err) => {
          if (err) log.warn({ mountpoint: this.mountpoint }, `unmount failed: ${err.message.trim()}`);
          finish();
        });
      });
    }
    // No read may still use a device's descriptors once it closes.
    for (const map of this.state.directReads?.values() ?? []) await map.close();
    for (const dev of this.layout.devices()) {
      try {
        await dev.flush();
      } catch (err) {
        log.error({ device: dev.description }, `flush failed: ${(err as Error).message}`);
        failures.push(`${dev.description}: flush failed: ${(err as Error).message}`);
      }
    }
    for (const dev of this.layout.devices()) {
      try {
        await dev.close();
      } catch (err) {
        log.error({ device: dev.description }, `close failed: ${(err as Error).message}`);
        failures.push(`${dev.description}: close failed: ${(err as Error).message}`);
      }
    }
    log.info({ mountpoint: this.mountpoint }, 'stopped');
    return failures;
  }
}
