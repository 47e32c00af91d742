/**
 * Mount lifecycle: mounting a Layout over fuse-native, the ready signal to the launching process,
 * SIGINT/SIGTERM, noticing an unmount done by umount(8)/fusermount, and a clean shutdown that
 * flushes and closes every device before the process exits.
 */
import * as fs from 'node:fs';
import { execFile } from 'node:child_process';
import Fuse from 'fuse-native';
import { describeSystemError, UsageError } from '../errors';
import { log } from '../log';
import type { Layout } from './layout';
import { canonicalMountpoint, findMount, fuseDeviceFds, isStaleFuseMount } from './mounts';
import { makeOps, type OpsState } from './ops';

export const FUSE_SUBTYPE = 'qcow2fs';
/** Largest read/write request we ask the kernel for (FUSE 2.9's ceiling without max_pages). */
export const MAX_REQUEST_BYTES = 128 * 1024;

export interface FuseMountOptions {
  /** Shown as the mount's source in /proc/mounts (the image path). */
  fsname: string;
  readOnly: boolean;
  allowOther?: boolean;
  debug?: boolean;
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
    ops: Fuse.FuseOps,
    opts: Fuse.FuseOptions,
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

export function checkMountpoint(mountpoint: string): void {
  if (isStaleFuseMount(mountpoint)) {
    throw new UsageError(
      `mountpoint ${mountpoint} is a stale FUSE mount (its daemon died; "Transport endpoint is not connected"): clean it with "qcow2fs umount ${mountpoint}" or "fusermount -u ${mountpoint}"`,
    );
  }
  let st: fs.Stats;
  try {
    st = fs.statSync(mountpoint);
  } catch (err) {
    throw new UsageError(describeSystemError(err, `mountpoint ${mountpoint}`));
  }
  if (!st.isDirectory()) throw new UsageError(`mountpoint ${mountpoint}: not a directory`);
  const existing = findMount(mountpoint);
  if (existing) throw new UsageError(`mountpoint ${mountpoint} is busy: ${existing.source} (${existing.fstype}) is already mounted there`);
  // libfuse refuses to hide files under a mount (and says only "fuse failed"); say why instead.
  let entries: string[] = [];
  try {
    entries = fs.readdirSync(mountpoint);
  } catch (err) {
    throw new UsageError(describeSystemError(err, `mountpoint ${mountpoint}`));
  }
  if (entries.length > 0) throw new UsageError(`mountpoint ${mountpoint} is not empty (it holds ${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}, e.g. "${entries[0]}"); use an empty directory`);
}

export class FuseMount {
  private stopped = false;
  private poller: NodeJS.Timeout | null = null;

  private constructor(
    readonly mountpoint: string,
    /** Held for the mount's lifetime: it owns the native FUSE thread's state. */
    readonly fuse: Fuse,
    readonly layout: Layout,
    private readonly state: OpsState,
    /** The /dev/fuse descriptors this mount's session opened (empty if unknown). */
    private readonly sessionFds: ReadonlySet<number>,
  ) {}

  static async mount(mountpoint: string, layout: Layout, opts: FuseMountOptions): Promise<FuseMount> {
    mountpoint = canonicalMountpoint(mountpoint);
    checkMountpoint(mountpoint);
    const state: OpsState = { openHandles: 0 };
    const ops = makeOps(layout, { readOnly: opts.readOnly }, state);
    const extra = ['big_writes', `max_write=${MAX_REQUEST_BYTES}`, `max_read=${MAX_REQUEST_BYTES}`, 'kernel_cache'];
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
      },
      extra,
    );
    const fdsBefore = fuseDeviceFds();
    await new Promise<void>((resolve, reject) =>
      fuse.mount((err) => (err ? reject(new UsageError(`cannot mount on ${mountpoint}: ${err.message}`)) : resolve())),
    );
    log.info({ mountpoint, source: opts.fsname }, 'mounted');
    const sessionFds = new Set([...fuseDeviceFds()].filter((fd) => !fdsBefore.has(fd)));
    return new FuseMount(mountpoint, fuse, layout, state, sessionFds);
  }

  /** True while the kernel still lists our mount. */
  isMounted(): boolean {
    const m = findMount(this.mountpoint);
    return !!m && m.fstype === `fuse.${FUSE_SUBTYPE}`;
  }

  /** True once libfuse has closed this session's /dev/fuse descriptor: the kernel connection is over. */
  private sessionEnded(): boolean {
    if (this.sessionFds.size === 0) return false;
    const open = fuseDeviceFds();
    return ![...this.sessionFds].some((fd) => open.has(fd));
  }

  /**
   * Calls `onGone` once umount(8) or fusermount -u has taken the mount away and no file is open
   * on it any more (after a lazy unmount, open files keep working until closed). The kernel does
   * not always deliver RELEASE for the last file of a detached mount, so the end of the FUSE
   * session counts too. The interval also keeps the event loop alive: fuse-native's own handles
   * do not.
   */
  watchExternalUnmount(onGone: () => void, intervalMs = 250): void {
    this.poller = setInterval(() => {
      if (!this.stopped && !this.isMounted() && (this.state.openHandles === 0 || this.sessionEnded())) {
        log.info({ mountpoint: this.mountpoint }, 'unmounted from outside');
        onGone();
      }
    }, intervalMs);
  }

  /** Unmounts (lazily if busy, as on SIGTERM) unless already gone, then flushes and closes every device. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.poller) clearInterval(this.poller);
    if (this.isMounted()) {
      await new Promise<void>((resolve) => {
        execFile('fusermount', ['-u', '-z', this.mountpoint], (err) => {
          if (err) log.warn({ mountpoint: this.mountpoint }, `unmount failed: ${err.message.trim()}`);
          resolve();
        });
      });
    }
    for (const dev of this.layout.devices()) {
      try {
        await dev.flush();
      } catch (err) {
        log.error({ device: dev.description }, `flush failed: ${(err as Error).message}`);
      }
    }
    for (const dev of this.layout.devices()) {
      try {
        await dev.close();
      } catch (err) {
        log.error({ device: dev.description }, `close failed: ${(err as Error).message}`);
      }
    }
    log.info({ mountpoint: this.mountpoint }, 'stopped');
  }
}
