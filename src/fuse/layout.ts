/**
 * What a mount shows: a small read-only tree of directories, block devices (shown as raw files)
 * and static files (info.json). The FUSE ops only walk this tree; they know nothing of qcow2.
 */
import type { BlockDevice } from '../image/blockdev';

export interface NodeMeta {
  mtime: Date;
  atime: Date;
  ctime: Date;
  uid: number;
  gid: number;
}

export type LayoutNode =
  | { kind: 'dir'; meta: NodeMeta; children: Map<string, LayoutNode> }
  | { kind: 'device'; meta: NodeMeta; device: BlockDevice }
  | { kind: 'file'; meta: NodeMeta; content: Buffer };

export class Layout {
  readonly root: Extract<LayoutNode, { kind: 'dir' }>;

  constructor(readonly rootMeta: NodeMeta) {
    this.root = { kind: 'dir', meta: rootMeta, children: new Map() };
  }

  /** Adds a node at a slash-separated path, creating directories on the way. */
  add(path: string, node: LayoutNode): void {
    const parts = path.split('/').filter(Boolean);
    let dir = this.root;
    for (const part of parts.slice(0, -1)) {
      let next = dir.children.get(part);
      if (!next) {
        next = { kind: 'dir', meta: this.rootMeta, children: new Map() };
        dir.children.set(part, next);
      }
      if (next.kind !== 'dir') throw new Error(`internal: ${part} is not a directory`);
      dir = next;
    }
    const name = parts[parts.length - 1];
    if (!name) throw new Error('internal: empty layout path');
    dir.children.set(name, node);
  }

  lookup(path: string): LayoutNode | undefined {
    if (path === '/') return this.root;
    let node: LayoutNode | undefined = this.root;
    for (const part of path.split('/')) {
      if (!part) continue;
      if (node?.kind !== 'dir') return undefined;
      node = node.children.get(part);
    }
    return node;
  }

  /** Every device node with its path ("/disk.raw"), as FUSE names it. */
  devicePaths(): [string, BlockDevice][] {
    const out: [string, BlockDevice][] = [];
    const walk = (n: LayoutNode, path: string): void => {
      if (n.kind === 'device') out.push([path, n.device]);
      else if (n.kind === 'dir') for (const [name, c] of n.children) walk(c, `${path === '/' ? '' : path}/${name}`);
    };
    walk(this.root, '/');
    return out;
  }

  devices(): BlockDevice[] {
    const out: BlockDevice[] = [];
    const walk = (n: LayoutNode): void => {
      if (n.kind === 'device') out.push(n.device);
      else if (n.kind === 'dir') for (const c of n.children.values()) walk(c);
    };
    walk(this.root);
    return out;
  }
}

/** `disk.qcow2` -> `disk.raw`; `disk` -> `disk.raw`. */
export function rawFileName(imagePath: string): string {
  const base = imagePath.split('/').pop() ?? 'disk';
  const dot = base.lastIndexOf('.');
  const stem = dot > 0 ? base.slice(0, dot) : base;
  return `${stem}.raw`;
}

/** A snapshot name made safe as a file name ("/" and NUL cannot appear in one). */
export function safeFileName(name: string): string {
  const cleaned = name.replace(/[/\0]/g, '_');
  return cleaned === '' || cleaned === '.' || cleaned === '..' ? `_${cleaned}` : cleaned;
}
