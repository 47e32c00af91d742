/**
 * The one interface the FUSE layer and the toolkit know. A qcow2 image, a raw file, a snapshot
 * view and an overlay are all BlockDevices.
 */

/** How a guest range is backed, as reported by status(). */
export type ExtentKind = 'data' | 'zero' | 'backing' | 'hole';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /** Depth in the chain where the answer came from (0 = this image). */
  depth: number;
  /** Host offset in the file at `depth`, for uncompressed data. */
  hostOffset?: number;
  compressed?: boolean;
}

export interface BlockDevice {
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** A short description for logs and errors ("qcow2 /path/img.qcow2"). */
  readonly description: string;
  /** Fills buf with the guest bytes at [offset, offset + buf.length); the range must lie inside size. */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * read() done synchronously when everything it needs is at hand (metadata cached, host data in
   * the page cache); false when it is not, and then buf may be partly written: call read(). Saves
   * the Promise chain on the hot path of small reads (FUSE requests).
   */
  readCached?(buf: Uint8Array, offset: number): boolean;
  write(buf: Uint8Array, offset: number): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  /** Grows (or, where allowed, shrinks) the virtual size; absent when the device cannot. */
  resize?(newSizeBytes: number): Promise<void>;
  /** Durable on return. */
  flush(): Promise<void>;
  status(offset: number, length: number): Promise<Extent[]>;
  /** Bytes the device's own file(s) occupy on the host disk (for st_blocks). */
  allocatedBytes(): Promise<number>;
  close(): Promise<void>;
}

export function checkRange(dev: { size: number; description: string }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > dev.size) {
    throw new RangeError(`${dev.description}: request [${offset}, +${length}) outside the device (size ${dev.size})`);
  }
}
