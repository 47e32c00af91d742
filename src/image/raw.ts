/** A raw image file as a BlockDevice: guest offset = file offset. */
import type { BlockDevice, Extent, MappingObserver, PlainRun } from './blockdev';
import { checkRange } from './blockdev';
import { ReadOnlyError } from '../errors';
import { FdFile, punchHole, type HostFile } from '../io/file';

export class RawImage implements BlockDevice {
  readonly description: string;
  private constructor(
    readonly file: HostFile,
    public size: number,
  ) {
    this.description = file.path;
  }

  /**
   * The disk is the file rounded up to whole 512-byte sectors, as QEMU sees a raw file (the tail
   * of the last sector reads as zeros), so info, map and convert agree with qemu-img's.
   */
  static async open(file: HostFile): Promise<RawImage> {
    return new RawImage(file, Math.ceil((await file.size()) / 512) * 512);
  }

  get readOnly(): boolean {
    return this.file.readOnly;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    checkRange(this, offset, buf.length);
    await this.file.pread(buf, offset);
  }

  readCached(buf: Uint8Array, offset: number): boolean {
    checkRange(this, offset, buf.length);
    return this.file.preadCached?.(buf, offset) ?? false;
  }

  get mapGranuleBytes(): number {
    return 65536;
  }

  /** Guest offset = file offset, always: the mapping never changes. */
  plainRunCached(offset: number, maxLength: number): PlainRun {
    checkRange(this, offset, maxLength);
    return this.file instanceof FdFile ? { kind: 'data', length: maxLength, fd: this.file.fd, hostOffset: offset, writable: !this.readOnly } : { kind: 'other', length: maxLength };
  }

  observeMappings(_obs: MappingObserver | null): void {
    // Nothing to tell: writes never move data.
  }

  noteExternalWrites(): void {
    // flush() always syncs the file.
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.description} is read-only`);
    checkRange(this, offset, buf.length);
    await this.file.pwrite(buf, offset);
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.description} is read-only`);
    checkRange(this, offset, length);
    if (length === 0) return;
    // A hole where the file system has them; else zeros written.
    if (this.file instanceof FdFile && punchHole(this.file.fd, offset, length)) return;
    const chunk = Buffer.alloc(Math.min(length, 16 * 1024 * 1024));
    for (let pos = offset; pos < offset + length; pos += chunk.length) {
      await this.file.pwrite(chunk.subarray(0, Math.min(chunk.length, offset + length - pos)), pos);
    }
  }


  flush(): Promise<void> {
    return this.file.flush();
  }

  async status(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, offset, length);
    return [{ offset, length, kind: 'data', depth: 0, hostOffset: offset }];
  }

  async allocatedBytes(): Promise<number> {
    return (await this.file.stat()).blocks * 512;
  }

  close(): Promise<void> {
    return this.file.close();
  }
}
