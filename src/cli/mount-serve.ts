/**
 * Serving a mount (the daemon, or `mount --foreground`): open the image chain, build the layout,
 * mount it with FUSE, report ready, serve until unmounted or signalled.
 */
import * as fs from 'node:fs';
import { signalReady, type ReadyMessage } from '../fuse/daemon';
import { Layout, rawFileName, safeFileName, type NodeMeta } from '../fuse/layout';
import { FuseMount } from '../fuse/mount';
import { openImage, type OpenedImage } from '../image/open';
import { parseFormat } from '../image/probe';
import { openSnapshotViews } from '../image/snapshot-views';
import { takeDaemonFailure, writeDaemonFailure } from '../fuse/mounts';
import { log } from '../log';
import type { SnapshotEntry } from '../qcow2/snapshot';
import { formatError, parseSize } from './common';
import { planMount, type MountArgs, type MountPlan } from './mount';

function metaOf(st: fs.Stats): NodeMeta {
  return { mtime: st.mtime, atime: st.atime, ctime: st.ctime, uid: st.uid, gid: st.gid };
}

function snapshotMeta(s: SnapshotEntry, base: NodeMeta): NodeMeta {
  const date = new Date(s.dateSeconds * 1000 + Math.floor(s.dateNanoseconds / 1e6));
  return { ...base, mtime: date, atime: date, ctime: date };
}

/** snapshots/<name>.raw; names made safe, and told apart by id when two snapshots share one. */
export function snapshotFileNames(snapshots: readonly SnapshotEntry[]): string[] {
  const safe = snapshots.map((s) => safeFileName(s.name));
  const count = new Map<string, number>();
  for (const n of safe) count.set(n, (count.get(n) ?? 0) + 1);
  return safe.map((n, i) => ((count.get(n) ?? 0) > 1 ? `${n}.id-${safeFileName(snapshots[i]!.id)}.raw` : `${n}.raw`));
}

export async function buildLayout(plan: MountPlan, opened: OpenedImage): Promise<Layout> {
  const st = fs.statSync(plan.image);
  const base = metaOf(st);
  const layout = new Layout(base);
  layout.add(rawFileName(plan.image), { kind: 'device', meta: metaOf(st), device: opened.device });
  if (plan.allSnapshots) {
    const views = await openSnapshotViews(opened);
    const names = snapshotFileNames(views.map((v) => v.snapshot));
    layout.add('snapshots', { kind: 'dir', meta: { ...base }, children: new Map() });
    views.forEach((v, i) => layout.add(`snapshots/${names[i]}`, { kind: 'device', meta: snapshotMeta(v.snapshot, base), device: v.device }));
  }
  if (plan.forensic) {
    const { forensicInfo } = require('./forensic-info') as typeof import('./forensic-info');
    const info = await forensicInfo(plan.image, opened, plan.snapshot !== undefined ? { snapshot: plan.snapshot } : {});
    layout.add('info.json', { kind: 'file', meta: { ...base }, content: Buffer.from(JSON.stringify(info, null, 4) + '\n') });
  }
  return layout;
}

/**
 * The daemon's (or --foreground's) side: open, mount, report ready, serve until stopped. `tell`
 * reports how mounting went (default: the JSON ready message on --ready-fd, if any); after an
 * error it is told, the process exits with status 1.
 */
export async function serve(argv: MountArgs, tell?: (msg: ReadyMessage) => void): Promise<void> {
  const readyFd = argv['ready-fd'];
  const report = tell ?? (readyFd !== undefined ? (msg: ReadyMessage) => signalReady(readyFd, msg) : undefined);
  let opened: OpenedImage | null = null;
  let mount: FuseMount;
  // Signals: while opening, exit at once (nothing is mounted); from the mount call until serving,
  // remember the request and unmount as soon as the mount exists (otherwise a signal in that
  // window would leave a dead mount behind); then stop cleanly.
  let phase: 'opening' | 'mounting' | 'serving' = 'opening';
  let pendingStop: string | null = null;
  let stopServing: ((why: string) => void) | null = null;
  const onSignal = (why: string): void => {
    if (phase === 'opening') process.exit(why === 'SIGINT' ? 130 : 143);
    if (stopServing) stopServing(why);
    else pendingStop ??= why;
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGHUP', () => undefined);
  try {
    const plan = planMount(argv);
    opened = await openImage(plan.image, {
      readOnly: plan.readOnly,
      ...(argv.format ? { format: parseFormat(argv.format, '--format') } : {}),
      ...(argv['l2-cache-size'] ? { l2CacheBytes: parseSize(argv['l2-cache-size'], '--l2-cache-size') } : {}),
      ...(plan.snapshot !== undefined ? { snapshot: plan.snapshot } : {}),
      ...(plan.allowedBackingDirs ? { allowedBackingDirs: plan.allowedBackingDirs } : {}),
      ...(plan.overlay !== undefined ? { overlay: plan.overlay } : {}),
      lock: plan.forceShare ? 'share' : 'qemu',
    });
    const layout = await buildLayout(plan, opened);
    phase = 'mounting';
    mount = await FuseMount.mount(plan.mountpoint, layout, {
      fsname: plan.image,
      readOnly: plan.readOnly || opened.device.readOnly,
      allowOther: argv['allow-other'],
      readAheadBytes: plan.readAheadBytes,
    });
  } catch (err) {
    if (opened) await opened.device.close().catch(() => undefined);
    if (report) {
      report({ error: err instanceof Error ? err.message : String(err), code: formatError(err).code });
      process.exit(1);
    }
    throw err;
  }
  report?.({ ok: true });
  takeDaemonFailure(process.pid); // one a dead daemon of the same PID left, long ago
  const failures = await new Promise<string[]>((resolve) => {
    let stopping = false;
    const stop = (why: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'stopping');
      mount.stop().then(resolve, (err: unknown) => {
        log.error(`stop failed: ${(err as Error).message}`);
        resolve([`stop failed: ${(err as Error).message}`]);
      });
    };
    phase = 'serving';
    stopServing = stop;
    mount.watchExternalUnmount(() => stop('unmounted'));
    if (pendingStop !== null) stop(pendingStop);
  });
  if (failures.length > 0) {
    // What the data did not survive must not pass in silence: `qcow2fs umount` reports it.
    writeDaemonFailure(process.pid, failures[0]!);
    process.exit(1);
  }
  // fuse-native's thread may still hold the loop; the image is closed, so leave now.
  process.exit(0);
}
