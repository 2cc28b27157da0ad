// safetensors writer: tensors (or raw bytes, or bytes streamed from another file) to a file that
// appears whole or not at all: a temp file beside it, written in chunks (so a tensor may be larger
// than any one buffer), fsync, rename, fsync of the folder. Stretches of zeros a whole chunk long
// are left as holes in a sparse file. Not a general file writer; the reader is safetensors.ts.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, expectBoolean, LoraError, typeError } from './errors';
import {
  checkWritableFolder, forgetTemp, ioChunkBytes, ioError, isAllZero, tempName, trackTemp, writeAll, writeAllAsync,
} from './file_io';
import { native } from './native';
import { ByteSource, DTYPE_BYTES, SAFETENSORS_DTYPE, safetensorsDtypeSize, SafetensorsDtype } from './safetensors_dtypes';
import { expectTensor, numelOf, Tensor } from './tensor';

/** Bytes to write as they are (a dtype our tensors lack, or data streamed from another file). */
export interface RawTensor {
  dtype: SafetensorsDtype;
  shape: readonly number[];
  /**
   * The bytes; a ByteSource that the writer reads in chunks (data larger than one buffer, or
   * streamed from another file); or a function that produces either, or a Tensor (then written
   * in chunks and disposed), when the writer reaches this tensor.
   */
  data: Uint8Array | ByteSource | (() => Uint8Array | ByteSource | Tensor);
}

export type TensorSource = Tensor | RawTensor;

export interface SaveOptions {
  /** String key/values stored as __metadata__. */
  metadata?: Record<string, string>;
  /** Sort tensors by name in the file (default false: insertion order). */
  sort?: boolean;
  /**
   * Stops the write: saveSafetensorsAsync checks it between chunks and then throws
   * ERR_LORA_ABORTED, leaving any existing file as it was and no temp file.
   */
  signal?: AbortSignal;
}

/** Options for the writer's progress callback (used by the CLI). */
export interface WriteProgress {
  /** Called after each tensor is written (or gathered with the small ones that follow) with (index, count, name). */
  onTensor?: (index: number, count: number, name: string) => void;
}

interface Planned {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  bytes: number;
  src: TensorSource;
}

interface Plan {
  items: Planned[];
  header: Buffer;
  total: number;
  /** The largest tensor's byte size (sizes the staging buffer). */
  largest: number;
  signal?: AbortSignal;
  onTensor?: WriteProgress['onTensor'];
}

function plan(tensors: unknown, opts: unknown): Plan {
  const { onTensor, ...rest } = (opts ?? {}) as SaveOptions & WriteProgress;
  if (onTensor !== undefined && typeof onTensor !== 'function') throw typeError('onTensor', 'a function', onTensor);
  const o = checkOptions<SaveOptions>('saveSafetensors()', opts === undefined ? undefined : rest, ['metadata', 'sort', 'signal']);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw typeError('signal', 'an AbortSignal', o.signal);
  let pairs: [string, unknown][];
  if (tensors instanceof Map) pairs = [...tensors.entries()];
  else if (tensors && typeof tensors === 'object' && !Array.isArray(tensors)) pairs = Object.entries(tensors);
  else throw typeError('tensors', 'a Map or an object of named tensors', tensors);
  if (o.sort !== undefined) expectBoolean('sort', o.sort);
  if (o.sort) pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const items: Planned[] = [];
  const header: Record<string, unknown> = {};
  if (o.metadata !== undefined) {
    if (!o.metadata || typeof o.metadata !== 'object' || Array.isArray(o.metadata)) throw typeError('metadata', 'an object of strings', o.metadata);
    for (const [k, v] of Object.entries(o.metadata)) if (typeof v !== 'string') throw typeError(`metadata.${k}`, 'a string', v);
    header.__metadata__ = o.metadata;
  }
  let offset = 0;
  for (const [name, src] of pairs) {
    if (typeof name !== 'string' || name === '' || name === '__metadata__') throw typeError('tensor name', 'a non-empty string other than __metadata__', name);
    let dtype: SafetensorsDtype;
    let shape: number[];
    if (src instanceof Tensor) {
      expectTensor(`tensor '${name}'`, src);
      dtype = SAFETENSORS_DTYPE[src.dtype];
      shape = src.shape.slice();
    } else if (src && typeof src === 'object' && 'dtype' in src && 'shape' in src && 'data' in src) {
      const r = src as RawTensor;
      if (safetensorsDtypeSize(r.dtype) === undefined) throw typeError(`${name}.dtype`, 'a safetensors dtype (F32, BF16, ...)', r.dtype);
      if (!Array.isArray(r.shape) || !r.shape.every((d) => Number.isInteger(d) && d >= 0)) throw typeError(`${name}.shape`, 'an array of non-negative integers', r.shape);
      dtype = r.dtype;
      shape = r.shape.slice();
    } else throw typeError(name, 'a Tensor or a { dtype, shape, data } object', src);
    const bytes = numelOf(shape) * DTYPE_BYTES[dtype];
    if (!Number.isSafeInteger(offset + bytes)) throw typeError(`${name}.shape`, 'a shape whose byte size is a safe integer', shape);
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    items.push({ name, dtype, shape, bytes, src: src as TensorSource });
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // pad with spaces so the data starts 8-byte aligned (readers may map it as typed arrays)
  const len = Buffer.byteLength(json);
  json += ' '.repeat((8 - ((8 + len) % 8)) % 8);
  const hb = Buffer.from(json, 'utf8');
  const out = Buffer.alloc(8 + hb.length);
  out.writeBigUInt64LE(BigInt(hb.length), 0);
  hb.copy(out, 8);
  const largest = items.reduce((m, it) => Math.max(m, it.bytes), 0);
  return { items, header: out, total: out.length + offset, largest, signal: o.signal, onTensor };
}

function isByteSource(v: unknown): v is ByteSource {
  return !!v && typeof v === 'object' && !ArrayBuffer.isView(v) && typeof (v as ByteSource).read === 'function' && typeof (v as ByteSource).byteLength === 'number';
}

// One tensor's data as the writer reaches it; `owned` tensors came from a producer and are freed.
function dataOf(item: Planned): { data: Uint8Array | ByteSource | Tensor; owned: boolean } {
  if (item.src instanceof Tensor) {
    item.src._live(`tensor '${item.name}'`);
    return { data: item.src, owned: false };
  }
  const raw = item.src.data;
  const d = typeof raw === 'function' ? raw() : raw;
  if (d instanceof Tensor) {
    const live = d._live(`tensor '${item.name}'`);
    if (SAFETENSORS_DTYPE[d.dtype] !== item.dtype || live.numel !== numelOf(item.shape)) {
      if (typeof raw === 'function') d.dispose();
      throw new LoraError(SAFETENSORS_DTYPE[d.dtype] !== item.dtype ? 'ERR_LORA_DTYPE' : 'ERR_LORA_SHAPE',
        `Expected ${item.dtype} data of shape [${item.shape.join(', ')}] for tensor '${item.name}' but its producer returned ${d.dtype} of shape [${d.shape.join(', ')}]`);
    }
    return { data: d, owned: typeof raw === 'function' };
  }
  if (!(d instanceof Uint8Array) && !isByteSource(d)) throw typeError(`${item.name}.data`, 'a Uint8Array, a ByteSource or a Tensor', d);
  if (d.byteLength !== item.bytes) throw new LoraError('ERR_LORA_SHAPE', `Expected ${item.bytes} bytes for tensor '${item.name}' but received ${d.byteLength}`);
  return { data: d, owned: false };
}

interface Piece {
  position: number;
  bytes: Uint8Array;
}

// Marks the end of a tensor (nothing to write): the async writer lets the event loop turn there.
const TENSOR_END: Piece = { position: -1, bytes: new Uint8Array(0) };

// A run of zeros at least this long is left as a hole; shorter ones are written (a hole smaller
// than a file system block saves nothing).
const MIN_HOLE = 64 * 1024;

/**
 * The file's contents as pieces of at most one chunk, in order. Small pieces (many small tensors)
 * are gathered into one buffer and written together; chunks of zeros at least MIN_HOLE long are
 * left out (the file is extended to its full size at the end, so they read back as zeros). A
 * piece's buffer is reused for the next one: write it before asking for the next. `at.name` is
 * the tensor being written, for error messages.
 */
function* pieces(p: Plan, at: { name: string }): Generator<Piece> {
  const chunk = ioChunkBytes();
  const gather = new Uint8Array(Math.min(chunk, p.total));
  let gatherAt = 0;
  let gathered = 0;
  let staging: Uint8Array | null = null;
  // bytes at `position`: gathered when small, else yielded as they are (after what was gathered)
  function* put(position: number, bytes: Uint8Array): Generator<Piece> {
    const hole = bytes.length >= MIN_HOLE && isAllZero(bytes);
    if (gathered && (hole || gatherAt + gathered !== position || gathered + bytes.length > gather.length)) {
      yield { position: gatherAt, bytes: gather.subarray(0, gathered) };
      gathered = 0;
    }
    if (hole) return;
    if (bytes.length * 2 > gather.length) {
      yield { position, bytes };
      return;
    }
    if (!gathered) gatherAt = position;
    gather.set(bytes, gathered);
    gathered += bytes.length;
  }
  yield* put(0, p.header);
  let position = p.header.length;
  for (let i = 0; i < p.items.length; i++) {
    const item = p.items[i]!;
    at.name = item.name;
    const { data, owned } = dataOf(item);
    try {
      for (let off = 0; off < item.bytes; off += chunk) {
        const n = Math.min(chunk, item.bytes - off);
        let bytes: Uint8Array;
        if (data instanceof Uint8Array) bytes = data.subarray(off, off + n);
        else {
          staging ??= new Uint8Array(Math.min(chunk, p.largest));
          bytes = staging.subarray(0, n);
          if (data instanceof Tensor) native.readBytes(data._live(`tensor '${item.name}'`), off, bytes);
          else data.read(bytes, off);
        }
        yield* put(position + off, bytes);
      }
    } finally {
      if (owned) (data as Tensor).dispose();
    }
    position += item.bytes;
    p.onTensor?.(i, p.items.length, item.name);
    yield TENSOR_END;
  }
  at.name = '';
  if (gathered) yield { position: gatherAt, bytes: gather.subarray(0, gathered) };
}

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

function aborted(file: string, signal: AbortSignal): LoraError {
  const why = signal.reason instanceof Error ? signal.reason.message : signal.reason === undefined ? 'aborted' : String(signal.reason);
  return new LoraError('ERR_LORA_ABORTED', `Stopped writing ${file} (${why}); it was left as it was`);
}

function failure(file: string, err: unknown, at: { name: string }): LoraError {
  return ioError(file, err, at.name ? `write tensor '${at.name}' to` : 'write');
}

function fsyncDir(dir: string): void {
  try {
    const fd = fs.openSync(dir, 'r');
    try { fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  } catch { /* some filesystems refuse fsync on directories; the rename is still atomic */ }
}

// After the rename: the temp name is gone, and the folder's entry is made durable.
function renamed(tmp: string, file: string): void {
  forgetTemp(tmp);
  fsyncDir(path.dirname(file));
}

function unlinkQuietly(p: string): void {
  try { fs.unlinkSync(p); } catch { /* never created or already gone */ }
  forgetTemp(p);
}

// Both writers' start: arguments checked, the plan made, the folder found writable, a temp name.
function prepare(file: unknown, tensors: unknown, opts: unknown): { p: Plan; tmp: string; at: { name: string } } {
  if (typeof file !== 'string' || file === '') throw typeError('file', 'a path string', file);
  const p = plan(tensors, opts);
  if (p.signal?.aborted) throw aborted(file, p.signal);
  checkWritableFolder(file);
  return { p, tmp: tempName(file), at: { name: '' } };
}

/**
 * Writes tensors to a .safetensors file atomically: a temp file in the same folder, fsync, rename.
 * A failure (or a crash) leaves any existing file untouched and no temp file behind. Tensors of
 * any size are written in chunks.
 *
 * @example saveSafetensors('out.safetensors', { 'w': w, 'b': b }, { metadata: { format: 'pt' } });
 * @throws LoraTypeError for bad arguments; ERR_LORA_IO (naming the file, and the tensor being
 *   written) when the file cannot be written.
 */
export function saveSafetensors(file: string, tensors: Map<string, TensorSource> | Record<string, TensorSource>, opts?: SaveOptions & WriteProgress): void {
  const { p, tmp, at } = prepare(file, tensors, opts);
  let fd: number;
  try {
    fd = fs.openSync(tmp, 'wx', 0o644);
  } catch (err) {
    throw ioError(file, err, 'write');
  }
  trackTemp(tmp);
  let ok = false;
  try {
    for (const piece of pieces(p, at)) if (piece !== TENSOR_END) writeAll(fd, piece.bytes, piece.position);
    fs.ftruncateSync(fd, p.total);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = -1;
    fs.renameSync(tmp, file);
    renamed(tmp, file);
    ok = true;
  } catch (err) {
    throw failure(file, err, at);
  } finally {
    if (fd >= 0) try { fs.closeSync(fd); } catch { /* already failing */ }
    if (!ok) unlinkQuietly(tmp);
  }
}

/**
 * saveSafetensors without blocking the event loop on disk writes: the loop turns between chunks,
 * and `signal` stops the write there (ERR_LORA_ABORTED, no temp file left). Tensor bytes are
 * still copied out synchronously, one chunk at a time. Same atomicity.
 */
export async function saveSafetensorsAsync(file: string, tensors: Map<string, TensorSource> | Record<string, TensorSource>, opts?: SaveOptions & WriteProgress): Promise<void> {
  const { p, tmp, at } = prepare(file, tensors, opts);
  let fh: fs.promises.FileHandle | null = null;
  let ok = false;
  try {
    try {
      fh = await fs.promises.open(tmp, 'wx', 0o644);
    } catch (err) {
      throw ioError(file, err, 'write');
    }
    trackTemp(tmp);
    for (const piece of pieces(p, at)) {
      if (piece === TENSOR_END) await tick(); // signals, timers and I/O run between tensors
      else await writeAllAsync(fh, piece.bytes, piece.position);
      if (p.signal?.aborted) throw aborted(file, p.signal);
    }
    if (p.signal?.aborted) throw aborted(file, p.signal);
    await fh.truncate(p.total);
    await fh.sync();
    await fh.close();
    fh = null;
    await fs.promises.rename(tmp, file);
    renamed(tmp, file);
    ok = true;
  } catch (err) {
    throw failure(file, err, at);
  } finally {
    if (fh) await fh.close().catch(() => undefined);
    if (!ok) unlinkQuietly(tmp);
  }
}

/**
 * Writes a file atomically (temp + fsync + rename); used for JSON configs beside the tensors.
 * @internal
 */
export function writeFileAtomic(file: string, data: string | Uint8Array): void {
  checkWritableFolder(file);
  const tmp = tempName(file);
  let ok = false;
  try {
    const fd = fs.openSync(tmp, 'wx', 0o644);
    trackTemp(tmp);
    try {
      fs.writeFileSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    renamed(tmp, file);
    ok = true;
  } catch (err) {
    throw ioError(file, err, 'write');
  } finally {
    if (!ok) unlinkQuietly(tmp);
  }
}
