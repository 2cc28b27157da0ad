// Careful file handling under the model-file readers and writers: a file read through one open
// handle for its whole use and checked for change underneath, reads and writes in bounded chunks,
// temp files that every failure removes (and the CLI on SIGINT/SIGTERM), JSON of bounded nesting,
// and error messages that name the user's path rather than a temp file. It knows no file format.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { LoraError } from './errors';

// Bytes per read/write call and per staging buffer. Node's positioned I/O takes at most 2^31 - 1
// bytes a call and a typed array holds at most 2^32 elements; 64 MiB keeps the staging memory
// small while the per-call cost stays negligible.
let chunkBytes = 64 * 1024 * 1024;

/** The chunk size of file reads and writes, in bytes. */
export function ioChunkBytes(): number {
  return chunkBytes;
}

/**
 * @internal Sets the chunk size (a multiple of 8) and returns the previous one; tests shrink it so
 * small tensors take the chunked paths.
 */
export function _setIoChunkBytes(n: number): number {
  if (!Number.isInteger(n) || n < 8 || n % 8 !== 0 || n > 2 ** 30) throw new LoraError('ERR_LORA_RANGE', `Expected a multiple of 8 between 8 and 2^30 for the I/O chunk size but received ${n}`);
  const old = chunkBytes;
  chunkBytes = n;
  return old;
}

// ---- errors --------------------------------------------------------------------------------------

const REASONS: Record<string, string> = {
  EROFS: 'the file system is read-only',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOSPC: 'no space left on the device',
  EDQUOT: 'the disk quota is exceeded',
  ENOENT: 'no such file or folder',
  ENOTDIR: 'a part of the path is not a folder',
  EISDIR: 'it is a folder',
  EFBIG: 'the file is too large for the file system',
  EMFILE: 'too many open files',
  EIO: 'an input/output error',
};

/**
 * An ERR_LORA_IO naming `file` (the user's path) and the system's reason in words, with its code.
 * The system message is not quoted whole: it names the path of the call, often a temp file.
 */
export function ioError(file: string, err: unknown, what: string): LoraError {
  const code = (err as { code?: string })?.code;
  if (typeof code === 'string' && code.startsWith('ERR_LORA')) return err as LoraError;
  return new LoraError('ERR_LORA_IO', `Could not ${what} ${file}: ${reasonOf(err)}`);
}

/** A system error's reason in words with its code, without the path of the call. */
function reasonOf(err: unknown): string {
  const code = (err as { code?: string })?.code;
  if (code && REASONS[code]) return `${REASONS[code]} (${code})`;
  const msg = err instanceof Error ? err.message : String(err);
  return msg.replace(/, \w+ '[^']*'( -> '[^']*')?$/, '');
}

// ---- reading -----------------------------------------------------------------------------------------

interface Identity {
  dev: bigint;
  ino: bigint;
  size: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

function identity(st: fs.BigIntStats): Identity {
  return { dev: st.dev, ino: st.ino, size: st.size, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs };
}

/**
 * One file open for reading for as long as it is used. Every read goes through the same handle,
 * and verify() (run after each tensor) refuses a file that another process modified (size, mtime
 * or ctime of the open file changed) or replaced (its path now names another file): data read
 * before and after such a change may not be mixed.
 */
export class FileReader {
  readonly file: string;
  readonly size: number;
  private fd: number;
  private readonly id: Identity;

  private constructor(file: string, fd: number, id: Identity) {
    this.file = file;
    this.fd = fd;
    this.id = id;
    this.size = Number(id.size);
  }

  /** Opens a regular file. @throws ERR_LORA_IO naming the file. */
  static open(file: string): FileReader {
    let fd: number;
    try {
      // non-blocking, so that a FIFO is refused below instead of waiting for a writer
      fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    } catch (err) {
      throw ioError(file, err, 'read');
    }
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      if (!st.isFile()) throw new LoraError('ERR_LORA_IO', `Could not read ${file}: not a regular file`);
      return new FileReader(file, fd, identity(st));
    } catch (err) {
      fs.closeSync(fd);
      throw ioError(file, err, 'stat');
    }
  }

  /** Fills `buf` from byte `position`, in chunks. @throws ERR_LORA_FORMAT at an early end of file. */
  read(buf: Uint8Array, position: number): void {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = fs.readSync(this.live(), buf, done, Math.min(chunkBytes, buf.length - done), position + done);
      } catch (err) {
        throw ioError(this.file, err, 'read');
      }
      if (n === 0) {
        this.verify();
        throw new LoraError('ERR_LORA_FORMAT', `Invalid safetensors file ${this.file}: unexpected end of file at byte ${position + done}`);
      }
      done += n;
    }
  }

  /** @throws ERR_LORA_IO when the file changed or was replaced since it was opened. */
  verify(): void {
    let now: Identity;
    try {
      now = identity(fs.fstatSync(this.live(), { bigint: true }));
    } catch (err) {
      throw ioError(this.file, err, 'stat');
    }
    const was = this.id;
    if (now.size === was.size && now.mtimeNs === was.mtimeNs && now.ctimeNs === was.ctimeNs && this.samePath()) return;
    // what changed, for the message: a rename or unlink changes the old file's ctime too
    let p: fs.BigIntStats | undefined;
    try {
      p = fs.statSync(this.file, { bigint: true, throwIfNoEntry: false });
    } catch { /* unreadable now: reported as moved */ }
    let change: string;
    if (!p) change = 'it was deleted or moved';
    else if (p.dev !== was.dev || p.ino !== was.ino) change = 'another file was moved to its path';
    else if (now.size !== was.size) change = `its size went from ${was.size} to ${now.size} bytes`;
    else change = 'it was modified';
    throw new LoraError('ERR_LORA_IO', `${this.file} changed while it was being read (${change}); tensors read before and after the change would not match, so the read was stopped. Run again once nothing writes to it`);
  }

  private samePath(): boolean {
    try {
      const p = fs.statSync(this.file, { bigint: true, throwIfNoEntry: false });
      return !!p && p.dev === this.id.dev && p.ino === this.id.ino;
    } catch {
      return false;
    }
  }

  private live(): number {
    if (this.fd < 0) throw new LoraError('ERR_LORA_STATE', `${this.file} was already closed`);
    return this.fd;
  }

  /** Idempotent. */
  close(): void {
    if (this.fd >= 0) {
      try { fs.closeSync(this.fd); } catch { /* nothing left to release */ }
      this.fd = -1;
    }
  }
}

/**
 * A small text file (a config, an index) read whole through a FileReader, refused past `limit`
 * bytes. @throws ERR_LORA_IO naming the file; ERR_LORA_FORMAT when it is too large.
 */
export function readTextFile(file: string, limit: number): string {
  const r = FileReader.open(file);
  try {
    if (r.size > limit) throw new LoraError('ERR_LORA_FORMAT', `${file} is ${r.size} bytes; expected at most ${limit} for a JSON file`);
    const buf = Buffer.alloc(r.size);
    r.read(buf, 0);
    r.verify();
    return buf.toString('utf8');
  } finally {
    r.close();
  }
}

// ---- writing -----------------------------------------------------------------------------------------

/** Writes all of `data` at `position`, in chunks. */
export function writeAll(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.byteLength) done += fs.writeSync(fd, data, done, Math.min(chunkBytes, data.byteLength - done), position + done);
}

/** writeAll through a promise handle (the event loop turns between chunks). */
export async function writeAllAsync(fh: fs.promises.FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.byteLength) done += (await fh.write(data, done, Math.min(chunkBytes, data.byteLength - done), position + done)).bytesWritten;
}

/** Whether every byte is 0 (one memcmp of the buffer against itself shifted by a byte). */
export function isAllZero(b: Uint8Array): boolean {
  if (b.length === 0) return true;
  if (b[0] !== 0) return false;
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  return buf.compare(buf, 1, buf.length, 0, buf.length - 1) === 0;
}

// ---- temp files --------------------------------------------------------------------------------------

const liveTemps = new Set<string>();
let exitHook = false;

/** The temp name beside `file` that an atomic write renames into place. */
export function tempName(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`);
}

/**
 * Registers a temp file so that removeTempFiles() (the CLI's signal handlers, process exit) can
 * delete it if the write never finishes. forgetTemp() after the rename or the unlink.
 */
export function trackTemp(p: string): void {
  liveTemps.add(p);
  if (!exitHook) {
    exitHook = true;
    process.on('exit', removeTempFiles);
  }
}

export function forgetTemp(p: string): void {
  liveTemps.delete(p);
}

/** Deletes every registered temp file now (synchronously). Returns how many were removed. */
export function removeTempFiles(): number {
  let n = 0;
  for (const p of liveTemps) {
    try {
      fs.unlinkSync(p);
      n++;
    } catch { /* already renamed or removed */ }
    liveTemps.delete(p);
  }
  return n;
}

/**
 * Checks before an atomic write that the folder of `file` can take it: the folder (or, with
 * `mayCreate`, where it is missing, the nearest folder above it that exists) is a writable folder.
 * So the error names the user's path and says why (a read-only file system, a missing folder, a
 * file in the way) instead of naming the temp file, and comes before any work.
 */
export function checkWritableFolder(file: string, mayCreate = false): void {
  let dir = path.dirname(path.resolve(file));
  let st: fs.Stats | undefined;
  for (;;) {
    try {
      st = fs.statSync(dir, { throwIfNoEntry: false });
    } catch (err) {
      throw ioError(file, err, 'write');
    }
    if (st || path.dirname(dir) === dir) break;
    if (!mayCreate) throw new LoraError('ERR_LORA_IO', `Could not write ${file}: its folder ${dir} does not exist`);
    dir = path.dirname(dir);
  }
  if (!st?.isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not write ${file}: ${dir} is not a folder`);
  try {
    fs.accessSync(dir, fs.constants.W_OK);
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not write ${file}: its folder ${dir} is not writable: ${reasonOf(err)}`);
  }
}

// ---- JSON ----------------------------------------------------------------------------------------------

/** Nesting deeper than this is refused: real configs, indexes and headers nest a few levels. */
export const MAX_JSON_DEPTH = 64;

/**
 * JSON.parse after a linear scan that refuses nesting deeper than MAX_JSON_DEPTH (a 200,000-deep
 * array parses, but anything that later walks it recursively, JSON.stringify included, overflows
 * the stack). Returns the value; throws ERR_LORA_FORMAT through `fail(problem)`.
 */
export function parseJsonBounded(text: string, fail: (problem: string) => LoraError): unknown {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > MAX_JSON_DEPTH) throw fail(`nested deeper than ${MAX_JSON_DEPTH} levels`);
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw fail(`not valid JSON (${(err as Error).message})`);
  }
}

/**
 * Creates a folder and its missing parents one level at a time. (Node 20's
 * mkdirSync(p, { recursive: true }) spins forever where mkdir fails with ENOENT under an existing
 * parent, as in /proc.) @throws ERR_LORA_IO naming `dir`.
 */
export function makeFolder(dir: string): void {
  const missing: string[] = [];
  let p = path.resolve(dir);
  for (;;) {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(p, { throwIfNoEntry: false });
    } catch (err) {
      throw ioError(dir, err, 'create the folder');
    }
    if (st) {
      if (!st.isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not create the folder ${dir}: ${p} is not a folder`);
      break;
    }
    missing.push(p);
    const up = path.dirname(p);
    if (up === p) break;
    p = up;
  }
  for (const m of missing.reverse()) {
    try {
      fs.mkdirSync(m);
    } catch (err) {
      if ((err as { code?: string }).code !== 'EEXIST') throw ioError(dir, err, 'create the folder');
    }
  }
}
