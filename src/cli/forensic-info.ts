/**
 * MOUNTPOINT/info.json of a forensic mount: what `qemu-img info --output json` says about the
 * image (same field names and values), plus each file's size in bytes, each snapshot's
 * recorded disk size, and the whole backing chain with real paths. Built once at mount time
 * from the opened chain and fstat, so it reads nothing more from the evidence.
 */
import * as fs from 'node:fs';
import type { OpenedImage } from '../image/open';
import { Qcow2Image } from '../qcow2/image';
import { imageInfoJson } from './info';

type Json = Record<string, unknown>;

function fileFacts(p: string): { real: string; sizeBytes: number; actualBytes: number; mtime: string } {
  const st = fs.statSync(p);
  let real = p;
  try {
    real = fs.realpathSync(p);
  } catch {
    // Keep the path as opened.
  }
  return { real, sizeBytes: st.size, actualBytes: st.blocks * 512, mtime: st.mtime.toISOString() };
}

export async function forensicInfo(imagePath: string, opened: OpenedImage, opts: { snapshot?: string }): Promise<Json> {
  const top = opened.chain[0];
  if (!top) throw new Error('internal: empty chain');
  const info: Json = { ...(await imageInfoJson(top.device, top.format, imagePath)) };
  const facts = fileFacts(imagePath);
  info['file-size'] = facts.sizeBytes;
  info['file-mtime'] = facts.mtime;
  if (top.device instanceof Qcow2Image) {
    const img = top.device;
    // A --snapshot view is smaller or larger than the image; describe the image itself.
    info['virtual-size'] = img.header.sizeBytes;
    if (Array.isArray(info.snapshots)) {
      info.snapshots = (info.snapshots as Json[]).map((s, i) => {
        const disk = img.snapshots[i]?.diskSizeBytes;
        const damage = img.snapshots[i]?.damage;
        // A damaged snapshot has no file under snapshots/: say why.
        const out = disk === null || disk === undefined ? s : { ...s, 'disk-size': disk };
        return damage ? { ...out, 'qcow2fs-damaged': damage } : out;
      });
    }
  }
  info['backing-chain'] = opened.chain.slice(1).map((layer, i) => {
    const f = fileFacts(layer.path);
    const dev = layer.device;
    return {
      depth: i + 1,
      filename: f.real,
      format: layer.format,
      'virtual-size': dev instanceof Qcow2Image ? dev.header.sizeBytes : dev.size,
      'file-size': f.sizeBytes,
      'actual-size': f.actualBytes,
      'file-mtime': f.mtime,
    };
  });
  info.qcow2fs = {
    mount: 'forensic',
    'read-only': true,
    ...(opts.snapshot !== undefined ? { 'raw-file-shows-snapshot': opts.snapshot } : {}),
  };
  return info;
}
