/**
 * Error types shared by every layer. The CLI prints `message` of these as one line and exits
 * non-zero; anything else is a bug and is reported as such (still one line unless --log-level debug).
 */

/** The image (or one file of its chain) is malformed, hostile or uses an unsupported feature. */
export class ImageError extends Error {
  override readonly name = 'ImageError';
  constructor(
    message: string,
    /** Path of the file the problem is in, when known. */
    readonly file?: string,
  ) {
    super(file ? `${file}: ${message}` : message);
  }
}

/** A feature the image uses and we do not (yet) support. */
export class UnsupportedError extends ImageError {}

/** Metadata found to be corrupt while serving I/O: the request fails with EIO. */
export class CorruptionError extends ImageError {}

/** Bad arguments, missing files, busy mountpoints: anything the user can fix. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/** A write was attempted on a read-only device. Maps to EROFS. */
export class ReadOnlyError extends Error {
  override readonly name = 'ReadOnlyError';
  constructor(message = 'device is read-only') {
    super(message);
  }
}

/** Errors whose message is meant for the user as-is. */
export function isUserFacing(err: unknown): err is ImageError | UsageError | ReadOnlyError {
  return err instanceof ImageError || err instanceof UsageError || err instanceof ReadOnlyError;
}

/** Turns a Node system error (ENOENT, EACCES ...) on `path` into a one-line message. */
export function describeSystemError(err: unknown, what: string): string {
  const e = err as NodeJS.ErrnoException;
  switch (e?.code) {
    case 'ENOENT':
      return `${what}: no such file or directory`;
    case 'EACCES':
    case 'EPERM':
      return `${what}: permission denied`;
    case 'EISDIR':
      return `${what}: is a directory`;
    case 'ENOTDIR':
      return `${what}: not a directory`;
    case 'ELOOP':
      return `${what}: too many levels of symbolic links`;
    case 'EAGAIN':
    case 'EWOULDBLOCK':
      return `${what}: locked by another process`;
    default:
      return `${what}: ${e?.message ?? String(err)}`;
  }
}
