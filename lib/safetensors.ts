// safetensors reader, written from the format's description: an 8-byte little-endian header
// length, a JSON header ({name: {dtype, shape, data_offsets}}, optional __metadata__), then the
// tensors' bytes, contiguous and fully covered. Also the sharded layout
// (model.safetensors.index.json). This is not a memory-mapping loader: each file is read through
// one open handle, checked for change after every tensor, and each tensor goes to native memory
// in chunks through a small staging buffer, so a large file is never held twice and a tensor may
// be larger than any one JS buffer. The writer is safetensors_write.ts.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, LoraError, typeError } from './errors';
import { FileReader, ioChunkBytes, ioError, parseJsonBounded, readTextFile } from './file_io';
import { DTYPE_ID, native } from './native';
import { ByteSource, DTYPE_BYTES, SafetensorsDtype, safetensorsDtypeSize } from './safetensors_dtypes';
import { DType, empty, numelOf, Tensor } from './tensor';

export { DTYPE_BYTES, SAFETENSORS_DTYPE, safetensorsDtypeSize } from './safetensors_dtypes';
export type { ByteSource, SafetensorsDtype } from './safetensors_dtypes';
// the writer lives in safetensors_write.ts; its API is here too, so one module has the format
export { saveSafetensors, saveSafetensorsAsync, writeFileAtomic } from './safetensors_write';
export type { RawTensor, SaveOptions, TensorSource, WriteProgress } from './safetensors_write';

/** One tensor's header entry. Offsets are absolute positions in the file. */
export interface SafetensorsEntry {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  start: number;
  /** Byte length of the data. */
  byteLength: number;
  /** The file that holds it (for sharded models, one of the shards). */
  file: string;
}

/** A parsed, validated header. */
export interface SafetensorsHeader {
  file: string;
  fileSize: number;
  /** Where the data section starts (8 + header length). */
  dataStart: number;
  metadata: Record<string, string>;
  /** Entries in header order. */
  entries: SafetensorsEntry[];
}

// A header is JSON text of a few KB to a few MB for the largest models; 100 MB is the format's own
// ceiling, and refusing larger ones before allocating is the point.
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
const MAX_DIMS = 8;

function formatError(file: string, problem: string): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Invalid safetensors file ${file}: ${problem}`);
}

/**
 * Checks a header's JSON text against the file size: every problem is an ERR_LORA_FORMAT naming
 * the file. Exported for tests and for tools that read headers from elsewhere.
 */
export function parseSafetensorsHeader(file: string, json: string, fileSize: number, dataStart: number): SafetensorsHeader {
  const parsed = parseJsonBounded(json, (problem) => formatError(file, `header is ${problem}`));
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw formatError(file, `header is not a JSON object but ${describe(parsed)}`);
  const dataSize = fileSize - dataStart;
  const metadata: Record<string, string> = {};
  const entries: SafetensorsEntry[] = [];
  for (const [name, v] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) throw formatError(file, `__metadata__ is not an object of strings`);
      for (const [k, s] of Object.entries(v as Record<string, unknown>)) {
        if (typeof s !== 'string') throw formatError(file, `__metadata__.${k} is not a string but ${describe(s)}`);
        metadata[k] = s;
      }
      continue;
    }
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw formatError(file, `entry '${name}' is not an object`);
    const e = v as Record<string, unknown>;
    const dtype = e.dtype;
    if (typeof dtype !== 'string') throw formatError(file, `tensor '${name}' has no dtype`);
    const size = safetensorsDtypeSize(dtype);
    if (size === undefined) throw formatError(file, `tensor '${name}' has unknown dtype ${JSON.stringify(dtype.slice(0, 20))}`);
    const shape = e.shape;
    if (!Array.isArray(shape)) throw formatError(file, `tensor '${name}' has no shape array`);
    if (shape.length > MAX_DIMS) throw formatError(file, `tensor '${name}' has ${shape.length} dims (at most ${MAX_DIMS})`);
    let count = 1;
    for (const d of shape) {
      if (typeof d !== 'number' || !Number.isInteger(d)) throw formatError(file, `tensor '${name}' has a non-integer dim ${describe(d)}`);
      if (d < 0) throw formatError(file, `tensor '${name}' has a negative dim ${d}`);
      count *= d;
      // safe integers only: a product past 2^53 cannot be a real tensor in a real file
      if (!Number.isSafeInteger(count * size)) throw formatError(file, `tensor '${name}' shape [${shape.join(', ')}] overflows`);
    }
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0))
      throw formatError(file, `tensor '${name}' has missing or invalid data_offsets ${describe(off)}`);
    const [begin, end] = off as [number, number];
    if (end < begin) throw formatError(file, `tensor '${name}' has reversed data_offsets [${begin}, ${end}]`);
    if (end > dataSize) throw formatError(file, `tensor '${name}' data_offsets [${begin}, ${end}] run past the end of the data (${dataSize} bytes)`);
    if (end - begin !== count * size)
      throw formatError(file, `tensor '${name}' has ${end - begin} bytes but shape [${shape.join(', ')}] of ${dtype} needs ${count * size}`);
    for (const k of Object.keys(e)) if (k !== 'dtype' && k !== 'shape' && k !== 'data_offsets') throw formatError(file, `tensor '${name}' has unknown field '${k}'`);
    entries.push({ name, dtype: dtype as SafetensorsDtype, shape: shape as number[], start: dataStart + begin, byteLength: end - begin, file });
  }
  // the data must be covered exactly once: sort by offset, no overlap, no gap, nothing after
  const sorted = entries.slice().sort((a, b) => a.start - b.start || a.byteLength - b.byteLength);
  let pos = dataStart;
  for (const e of sorted) {
    if (e.start < pos) throw formatError(file, `tensor '${e.name}' overlaps the previous tensor`);
    if (e.start > pos) throw formatError(file, `gap of ${e.start - pos} bytes before tensor '${e.name}'`);
    pos = e.start + e.byteLength;
  }
  if (pos !== fileSize) throw formatError(file, `${fileSize - pos} bytes after the last tensor are not covered by the header`);
  return { file, fileSize, dataStart, metadata, entries };
}

function readHeader(r: FileReader): SafetensorsHeader {
  const file = r.file;
  const fileSize = r.size;
  if (fileSize < 8) throw formatError(file, fileSize === 0 ? 'the file is empty' : `the file is ${fileSize} bytes, shorter than the 8-byte header length`);
  const lenBuf = Buffer.alloc(8);
  r.read(lenBuf, 0);
  const len = lenBuf.readBigUInt64LE(0);
  if (len > BigInt(MAX_HEADER_BYTES)) throw formatError(file, `header length ${len} is absurd (limit ${MAX_HEADER_BYTES})`);
  const headerLength = Number(len);
  if (headerLength < 2) throw formatError(file, `header length ${headerLength} is too short for a JSON object`);
  if (8 + headerLength > fileSize) throw formatError(file, `header length ${headerLength} runs past the end of the ${fileSize}-byte file`);
  const hbuf = Buffer.alloc(headerLength);
  r.read(hbuf, 8);
  let json: string;
  try {
    json = new TextDecoder('utf-8', { fatal: true }).decode(hbuf);
  } catch {
    throw formatError(file, 'header is not valid UTF-8');
  }
  const h = parseSafetensorsHeader(file, json, fileSize, 8 + headerLength);
  r.verify();
  return h;
}

/**
 * Reads and validates a safetensors header without reading any tensor data.
 * @throws ERR_LORA_FORMAT for a malformed file, ERR_LORA_IO when it cannot be read.
 */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  if (typeof file !== 'string') throw typeError('file', 'a path string', file);
  const r = FileReader.open(file);
  try {
    return readHeader(r);
  } finally {
    r.close();
  }
}

// ---- decoding to our tensors ------------------------------------------------------------------

export interface LoadOptions {
  /**
   * 'keep' (default): F32, BF16, F16 and I32 stay as they are; F64 and F8 become float32, other
   * integers int32. 'float32': every floating tensor becomes float32.
   */
  dtype?: 'keep' | 'float32';
  /** Load only these names (default all). Unknown names are ERR_LORA_FORMAT. */
  names?: readonly string[];
}

function fp8ToFloat(b: number, e4m3: boolean): number {
  const s = b & 0x80 ? -1 : 1;
  if (e4m3) {
    const e = (b >> 3) & 0xf;
    const m = b & 7;
    if (e === 15 && m === 7) return NaN;
    return e === 0 ? s * m * 2 ** -9 : s * (1 + m / 8) * 2 ** (e - 7);
  }
  const e = (b >> 2) & 0x1f;
  const m = b & 3;
  if (e === 31) return m ? NaN : s * Infinity;
  return e === 0 ? s * m * 2 ** -16 : s * (1 + m / 4) * 2 ** (e - 15);
}

/** Our tensor dtype for a safetensors dtype under a load mode. */
export function tensorDtypeFor(dtype: SafetensorsDtype, mode: 'keep' | 'float32' = 'keep'): DType {
  switch (dtype) {
    case 'F32': case 'F64': case 'F8_E4M3': case 'F8_E5M2': return 'float32';
    case 'BF16': return mode === 'keep' ? 'bfloat16' : 'float32';
    case 'F16': return mode === 'keep' ? 'float16' : 'float32';
    default: return 'int32';
  }
}

/** Whether a safetensors dtype holds floating-point values. */
export function isFloatDtype(dtype: SafetensorsDtype): boolean {
  return dtype[0] === 'F' || dtype === 'BF16';
}

// The dtype a tensor is stored in while its bytes arrive: the file's own for the four we hold,
// float32 or int32 (converted chunk by chunk) for the others.
function arrivalDtype(dtype: SafetensorsDtype): DType | null {
  switch (dtype) {
    case 'F32': return 'float32';
    case 'I32': return 'int32';
    case 'BF16': return 'bfloat16';
    case 'F16': return 'float16';
    default: return null;
  }
}

/**
 * Converts n elements of a dtype we do not hold (F64, F8, other integers) from raw little-endian
 * bytes (byteOffset a multiple of 8) to float32 or int32.
 */
function convertElements(entry: Pick<SafetensorsEntry, 'name' | 'dtype' | 'file'>, bytes: Uint8Array, n: number): Float32Array | Int32Array {
  const buf = bytes.buffer;
  const off = bytes.byteOffset;
  switch (entry.dtype) {
    case 'F64': return Float32Array.from(new Float64Array(buf, off, n));
    case 'F8_E4M3': case 'F8_E5M2': {
      const out = new Float32Array(n);
      const e4 = entry.dtype === 'F8_E4M3';
      for (let i = 0; i < n; i++) out[i] = fp8ToFloat(bytes[i]!, e4);
      return out;
    }
    default: {
      const ints = new Int32Array(n);
      const dv = new DataView(buf, off, bytes.byteLength);
      for (let i = 0; i < n; i++) {
        let v: number;
        switch (entry.dtype) {
          case 'I64': case 'U64': {
            const big = entry.dtype === 'I64' ? dv.getBigInt64(i * 8, true) : dv.getBigUint64(i * 8, true);
            if (big > 2147483647n || big < -2147483648n)
              throw new LoraError('ERR_LORA_DTYPE', `Tensor '${entry.name}' in ${entry.file} holds ${entry.dtype} value ${big} that does not fit int32`);
            v = Number(big);
            break;
          }
          case 'U32': v = dv.getUint32(i * 4, true);
            if (v > 2147483647) throw new LoraError('ERR_LORA_DTYPE', `Tensor '${entry.name}' in ${entry.file} holds U32 value ${v} that does not fit int32`);
            break;
          case 'I16': v = dv.getInt16(i * 2, true); break;
          case 'U16': v = dv.getUint16(i * 2, true); break;
          case 'I8': v = dv.getInt8(i); break;
          default: v = dv.getUint8(i); break; // U8, BOOL
        }
        ints[i] = v;
      }
      return ints;
    }
  }
}

/**
 * Builds one tensor from its bytes delivered in pieces: `fill(into, byteOffset)` fills `into` with
 * the stored bytes at [byteOffset, byteOffset + into.length). Each piece goes to native memory
 * (converted first for dtypes we do not hold) through one staging buffer of at most the I/O chunk
 * size, so no JS buffer ever holds the whole tensor.
 */
function assemble(entry: Pick<SafetensorsEntry, 'name' | 'dtype' | 'shape' | 'file'>, mode: 'keep' | 'float32', fill: (into: Uint8Array, byteOffset: number) => void,
  staging?: Uint8Array): Tensor {
  const n = numelOf(entry.shape);
  const src = DTYPE_BYTES[entry.dtype];
  const kept = arrivalDtype(entry.dtype);
  const stored: DType = kept ?? tensorDtypeFor(entry.dtype, mode);
  const dst = stored === 'float32' || stored === 'int32' ? 4 : 2;
  const out = empty(entry.shape, 'cpu', stored);
  try {
    readChunks(out, n, src, dst, fill, staging, kept ? null : (piece, k) => convertElements(entry, piece, k));
  } catch (err) {
    out.dispose();
    throw err;
  }
  const target = tensorDtypeFor(entry.dtype, mode);
  if (target === stored) return out;
  const wide = out.toDtype(target);
  out.dispose();
  return wide;
}

// n elements of `src` bytes each from fill() into out (elements of `dst` bytes), in chunks of at
// most ioChunkBytes() through staging (a reused buffer when given: chunks of its size; else a new
// one), converted when `convert` is given.
function readChunks(out: Tensor, n: number, src: number, dst: number, fill: (into: Uint8Array, byteOffset: number) => void,
  staging: Uint8Array | undefined, convert: ((piece: Uint8Array, k: number) => Float32Array | Int32Array) | null): void {
  // a fresh ArrayBuffer is aligned; a given one must be too (offset 0), and hold an element
  const given = staging && staging.byteOffset === 0 && staging.length >= 8 ? staging : undefined;
  const perChunk = Math.max(1, Math.floor(Math.min(ioChunkBytes(), given?.length ?? Infinity) / Math.max(src, dst)));
  const buf = given ?? new Uint8Array(Math.min(perChunk, n) * src);
  for (let i = 0; i < n; i += perChunk) {
    const k = Math.min(perChunk, n - i);
    const piece = buf.subarray(0, k * src);
    fill(piece, i * src);
    native.writeBytes(out._storage, i * dst, convert ? convert(piece, k) : piece);
  }
}

/**
 * Reads one tensor of an open file straight into `target` (a CPU tensor of the entry's shape in the
 * dtype the file stores: float32, bfloat16, float16 or int32), through `staging` when it is given,
 * so a loader reuses one buffer for every tensor and writes each weight once. Checks afterwards
 * that the file did not change while it was read.
 */
export function readTensorInto(entry: SafetensorsEntry, reader: FileReader, target: Tensor, staging?: Uint8Array): void {
  const n = numelOf(entry.shape);
  if (!readsInto(entry, target.dtype) || target.device !== 'cpu' || target.size !== n)
    throw new LoraError('ERR_LORA_STATE', `Expected a ${arrivalDtype(entry.dtype) ?? entry.dtype} CPU tensor of ${n} elements to read '${entry.name}' into but received a ${target.dtype} ${target.device} tensor of ${target.size}`);
  const size = DTYPE_BYTES[entry.dtype];
  readChunks(target, n, size, size, readsFrom(entry, reader), staging, null);
  reader.verify();
}

// fill() for an entry's bytes through an open file: its bytes from byteOffset into `into`
function readsFrom(entry: SafetensorsEntry, reader: FileReader): (into: Uint8Array, byteOffset: number) => void {
  return (into, byteOffset) => reader.read(into, entry.start + byteOffset);
}

/** Whether readTensorInto() takes an entry into a CPU tensor of `dtype` (the file stores that dtype). */
export function readsInto(entry: Pick<SafetensorsEntry, 'dtype'>, dtype: DType): boolean {
  return arrivalDtype(entry.dtype) === dtype;
}

/** Turns one tensor's raw little-endian bytes (all of them, in memory) into our tensor. */
export function decodeTensor(entry: Pick<SafetensorsEntry, 'name' | 'dtype' | 'shape' | 'file'>, bytes: Uint8Array, mode: 'keep' | 'float32' = 'keep'): Tensor {
  const need = numelOf(entry.shape) * DTYPE_BYTES[entry.dtype];
  if (bytes.byteLength !== need) throw new LoraError('ERR_LORA_SHAPE', `Expected ${need} bytes for tensor '${entry.name}' but received ${bytes.byteLength}`);
  return assemble(entry, mode, (into, at) => into.set(bytes.subarray(at, at + into.length)));
}

/**
 * Reads one tensor of an open file into a new CPU tensor, in chunks, and checks afterwards that
 * the file did not change while it was read.
 */
export function readTensor(entry: SafetensorsEntry, reader: FileReader, mode: 'keep' | 'float32' = 'keep', staging?: Uint8Array): Tensor {
  const t = assemble(entry, mode, readsFrom(entry, reader), staging);
  try {
    reader.verify();
  } catch (err) {
    t.dispose();
    throw err;
  }
  return t;
}

// A typed array holds at most 2^32 elements.
const MAX_BUFFER_BYTES = 2 ** 32;

/**
 * One entry's bytes in a new buffer (8-byte aligned), read through `reader` (or a handle opened
 * for the call). For tensors too large for one buffer, use readTensor or ModelReader.bytes().
 * @throws ERR_LORA_UNSUPPORTED for a tensor of more than 4 GiB.
 */
export function readTensorBytes(entry: SafetensorsEntry, reader?: FileReader): Uint8Array {
  if (entry.byteLength > MAX_BUFFER_BYTES)
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Tensor '${entry.name}' in ${entry.file} is ${entry.byteLength} bytes, more than one buffer holds; read it with loadSafetensors() or a ModelReader`);
  const r = reader ?? FileReader.open(entry.file);
  try {
    const out = new Uint8Array(entry.byteLength); // a fresh ArrayBuffer: offset 0, aligned
    r.read(out, entry.start);
    r.verify();
    return out;
  } finally {
    if (!reader) r.close();
  }
}

/** A loaded file: tensors by name (header order) and the metadata. */
export interface SafetensorsData {
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

function loadOpts(opts: unknown): { mode: 'keep' | 'float32'; names?: readonly string[] } {
  const o = checkOptions<LoadOptions>('loadSafetensors()', opts, ['dtype', 'names']);
  const mode = o.dtype ?? 'keep';
  if (mode !== 'keep' && mode !== 'float32') throw typeError('dtype', "'keep' or 'float32'", mode);
  if (o.names !== undefined && (!Array.isArray(o.names) || !o.names.every((n) => typeof n === 'string')))
    throw typeError('names', 'an array of tensor names', o.names);
  return { mode, names: o.names };
}

function loadEntries(entries: SafetensorsEntry[], read: (e: SafetensorsEntry) => Tensor): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  try {
    for (const e of entries) out.set(e.name, read(e));
  } catch (err) {
    for (const t of out.values()) t.dispose();
    throw err;
  }
  return out;
}

function pick(entries: SafetensorsEntry[], names: readonly string[] | undefined, where: string): SafetensorsEntry[] {
  if (!names) return entries;
  const byName = new Map(entries.map((e) => [e.name, e]));
  return names.map((n) => {
    const e = byName.get(n);
    if (!e) throw new LoraError('ERR_LORA_FORMAT', `${where} has no tensor named '${n}'`);
    return e;
  });
}

/**
 * Loads a .safetensors file into tensors on the CPU. The header and every tensor are read through
 * one open handle; a file that another process modifies or replaces meanwhile is refused.
 *
 * @example
 * const { tensors, metadata } = loadSafetensors('model.safetensors');
 * @throws ERR_LORA_FORMAT (naming the file and the problem) for a malformed file; ERR_LORA_IO when
 *   it cannot be read or changed while it was read; ERR_LORA_DTYPE for 64-bit integers outside the
 *   int32 range.
 */
export function loadSafetensors(file: string, opts?: LoadOptions): SafetensorsData {
  const { mode, names } = loadOpts(opts);
  if (typeof file !== 'string') throw typeError('file', 'a path string', file);
  const r = FileReader.open(file);
  try {
    const h = readHeader(r);
    return { tensors: loadEntries(pick(h.entries, names, file), (e) => readTensor(e, r, mode)), metadata: h.metadata };
  } finally {
    r.close();
  }
}

// ---- sharded models ----------------------------------------------------------------------------

/** Every tensor of a model, whether one file or shards, with the file that holds it. */
export interface ModelIndex {
  /** The file or index that was opened. */
  source: string;
  entries: SafetensorsEntry[];
  metadata: Record<string, string>;
  files: string[];
}

export const INDEX_FILE = 'model.safetensors.index.json';

function indexError(file: string, problem: string): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Invalid safetensors index ${file}: ${problem}`);
}

/**
 * A model opened for reading (see openModelReader): its index, with every file held open through
 * one handle until close(). Each read checks afterwards that its file did not change, so tensors
 * read from one model always come from one version of each file.
 */
export class ModelReader implements ModelIndex {
  readonly source: string;
  readonly entries: SafetensorsEntry[];
  readonly metadata: Record<string, string>;
  readonly files: string[];
  private readonly readers: Map<string, FileReader>;

  /** @internal use openModelReader() */
  constructor(index: ModelIndex, readers: Map<string, FileReader>) {
    if (!index || typeof index !== 'object' || !Array.isArray(index.entries) || !(readers instanceof Map) || ![...readers.values()].every((r) => r instanceof FileReader))
      throw typeError('index', 'a model opened by openModelReader()', index);
    this.source = index.source;
    this.entries = index.entries;
    this.metadata = index.metadata;
    this.files = index.files;
    this.readers = readers;
  }

  private reader(e: SafetensorsEntry): FileReader {
    const r = this.readers.get(e?.file);
    if (!r) throw new LoraError('ERR_LORA_STATE', `Expected a tensor entry of ${this.source} but received ${describe(e)}`);
    return r;
  }

  /** One tensor as a new CPU tensor (the caller owns it). @throws ERR_LORA_IO when its file changed. */
  readTensor(entry: SafetensorsEntry, mode: 'keep' | 'float32' = 'keep', staging?: Uint8Array): Tensor {
    const r = this.reader(entry);
    if (mode !== 'keep' && mode !== 'float32') throw typeError('mode', "'keep' or 'float32'", mode);
    return readTensor(entry, r, mode, staging);
  }

  /** One tensor read straight into `target` (see readTensorInto). @throws ERR_LORA_IO when its file changed. */
  readTensorInto(entry: SafetensorsEntry, target: Tensor, staging?: Uint8Array): void {
    readTensorInto(entry, this.reader(entry), target, staging);
  }

  /** One tensor's stored bytes as a source the writer streams in chunks (its file checked after each). */
  bytes(entry: SafetensorsEntry): ByteSource {
    const r = this.reader(entry);
    return {
      byteLength: entry.byteLength,
      read(into: Uint8Array, offset: number): void {
        if (offset < 0 || offset + into.length > entry.byteLength)
          throw new LoraError('ERR_LORA_RANGE', `Expected a byte range inside tensor '${entry.name}' (${entry.byteLength} bytes) but received [${offset}, ${offset + into.length})`);
        r.read(into, entry.start + offset);
        r.verify();
      },
    };
  }

  /** @throws ERR_LORA_IO when any file changed since it was opened. */
  verify(): void {
    for (const r of this.readers.values()) r.verify();
  }

  /** Closes every file (idempotent). */
  close(): void {
    for (const r of this.readers.values()) r.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function resolveModelFile(p: string): string {
  let st: fs.Stats;
  try {
    st = fs.statSync(p);
  } catch (err) {
    throw ioError(p, err, 'open');
  }
  if (!st.isDirectory()) return p;
  const idx = path.join(p, INDEX_FILE);
  const single = path.join(p, 'model.safetensors');
  if (fs.existsSync(idx)) return idx;
  if (fs.existsSync(single)) return single;
  const any = fs.readdirSync(p).filter((f) => f.endsWith('.safetensors')).sort();
  if (any.length !== 1) throw new LoraError('ERR_LORA_IO', `Found no ${INDEX_FILE} or model.safetensors in ${p}${any.length ? ` (and ${any.length} other .safetensors files)` : ''}`);
  return path.join(p, any[0]!);
}

// An index's shards, each resolved to its real path once: one file named several ways in the
// weight_map ('s.safetensors', './s.safetensors', a symlink to it) is opened and read once.
function readIndex(file: string, readers: Map<string, FileReader>): ModelIndex {
  const json = parseJsonBounded(readTextFile(file, MAX_HEADER_BYTES), (problem) => indexError(file, problem));
  if (!json || typeof json !== 'object' || Array.isArray(json)) throw indexError(file, 'not a JSON object');
  const wm = (json as Record<string, unknown>).weight_map;
  if (!wm || typeof wm !== 'object' || Array.isArray(wm)) throw indexError(file, 'weight_map is missing or not an object');
  const dir = path.dirname(file);
  const spellings = new Map<string, string[]>(); // as written -> tensor names
  for (const [name, shard] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof shard !== 'string' || shard === '' || path.isAbsolute(shard) || shard.split(/[\\/]/).includes('..'))
      throw indexError(file, `weight_map['${name}'] is not a file name inside the folder: ${describe(shard)}`);
    let names = spellings.get(shard);
    if (!names) spellings.set(shard, (names = []));
    names.push(name);
  }
  const shards = new Map<string, { file: string; shard: string; names: string[] }>(); // real path -> shard
  for (const [shard, names] of spellings) {
    const f = path.join(dir, shard);
    let real: string;
    try {
      real = fs.realpathSync(f);
    } catch (err) {
      throw ioError(f, err, 'open');
    }
    const known = shards.get(real);
    if (known) known.names.push(...names);
    else shards.set(real, { file: f, shard, names });
  }
  const metadata: Record<string, string> = {};
  const meta = (json as Record<string, unknown>).metadata;
  if (meta && typeof meta === 'object') for (const [k, v] of Object.entries(meta)) metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
  const entries: SafetensorsEntry[] = [];
  const files: string[] = [];
  for (const { file: f, shard, names } of shards.values()) {
    const r = FileReader.open(f);
    readers.set(f, r);
    const h = readHeader(r);
    files.push(f);
    const want = new Set(names);
    const held = new Set<string>();
    for (const e of h.entries) {
      held.add(e.name);
      if (want.has(e.name)) entries.push(e);
    }
    for (const n of names) if (!held.has(n)) throw indexError(file, `tensor '${n}' is mapped to ${shard}, which does not hold it`);
  }
  return { source: file, entries, metadata, files };
}

/**
 * Opens a model for reading: a .safetensors file, a model.safetensors.index.json, or a folder
 * holding one of them (the index wins). Reads and validates every header and keeps each file open
 * through one handle until close(), so tensors read later come from the same files (a file
 * modified or replaced meanwhile is refused, never mixed). Shards are resolved to their real paths
 * and each is opened once.
 *
 * @example
 * const model = openModelReader('path/to/llama');
 * try {
 *   for (const e of model.entries) { const t = model.readTensor(e); ...; t.dispose(); }
 * } finally { model.close(); }
 * @throws ERR_LORA_FORMAT for a malformed file or index (a shard outside the folder, a tensor the
 *   index names that its shard lacks); ERR_LORA_IO when nothing is found or a file cannot be read.
 */
export function openModelReader(p: string): ModelReader {
  if (typeof p !== 'string') throw typeError('path', 'a path string', p);
  const file = resolveModelFile(p);
  const readers = new Map<string, FileReader>();
  try {
    if (file.endsWith('.json')) return new ModelReader(readIndex(file, readers), readers);
    const r = FileReader.open(file);
    readers.set(file, r);
    const h = readHeader(r);
    return new ModelReader({ source: file, entries: h.entries, metadata: h.metadata, files: [file] }, readers);
  } catch (err) {
    for (const r of readers.values()) r.close();
    throw err;
  }
}

/**
 * Opens a model: a .safetensors file, a model.safetensors.index.json, or a directory holding one of
 * them (the index wins). Reads and validates every header; reads no tensor data and keeps no file
 * open (openModelReader() does, for reading tensors later).
 * @throws ERR_LORA_FORMAT for a malformed file or index (a shard outside the folder, a tensor the
 *   index names that its shard lacks); ERR_LORA_IO when nothing is found.
 */
export function openModel(p: string): ModelIndex {
  const m = openModelReader(p);
  m.close();
  return { source: m.source, entries: m.entries, metadata: m.metadata, files: m.files };
}

/**
 * Loads every tensor of a model (one file, an index, or a folder; see openModel), each file read
 * through one handle.
 * @example const { tensors } = loadModel('path/to/llama');
 */
export function loadModel(p: string, opts?: LoadOptions): SafetensorsData {
  const { mode, names } = loadOpts(opts);
  const m = openModelReader(p);
  try {
    return { tensors: loadEntries(pick(m.entries, names, m.source), (e) => m.readTensor(e, mode)), metadata: m.metadata };
  } finally {
    m.close();
  }
}
