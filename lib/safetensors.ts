// safetensors reader and writer, written from the format's description: an 8-byte little-endian
// header length, a JSON header ({name: {dtype, shape, data_offsets}}, optional __metadata__), then
// the tensors' bytes, contiguous and fully covered. Also the sharded layout
// (model.safetensors.index.json). This is not a memory-mapping loader: each tensor is read with
// one positioned read into a buffer of its own size, so a large file is never held twice.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, expectBoolean, LoraError, typeError } from './errors';
import { DTYPE_ID, native } from './native';
import { DType, empty, expectTensor, numelOf, Tensor } from './tensor';

/** dtypes of the safetensors format this reader knows. */
export type SafetensorsDtype =
  | 'F64' | 'F32' | 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2'
  | 'I64' | 'I32' | 'I16' | 'I8' | 'U64' | 'U32' | 'U16' | 'U8' | 'BOOL';

const DTYPE_BYTES: Record<SafetensorsDtype, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, F8_E4M3: 1, F8_E5M2: 1,
  I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1,
};

/** Our tensor dtype <-> the format's name. */
export const SAFETENSORS_DTYPE: Record<DType, SafetensorsDtype> = {
  float32: 'F32', bfloat16: 'BF16', float16: 'F16', int32: 'I32',
};

/** Bytes per element of a safetensors dtype, or undefined for an unknown one. */
export function safetensorsDtypeSize(dtype: string): number | undefined {
  return Object.prototype.hasOwnProperty.call(DTYPE_BYTES, dtype) ? DTYPE_BYTES[dtype as SafetensorsDtype] : undefined;
}

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

function ioError(file: string, err: unknown, what: string): LoraError {
  const code = (err as { code?: string })?.code;
  const msg = err instanceof Error ? err.message : String(err);
  return new LoraError('ERR_LORA_IO', `Could not ${what} ${file}: ${code && !msg.startsWith(code) ? `${code}: ` : ''}${msg}`);
}

function readExactly(fd: number, buf: Uint8Array, position: number, file: string): void {
  let done = 0;
  while (done < buf.length) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, done, buf.length - done, position + done);
    } catch (err) {
      throw ioError(file, err, 'read');
    }
    if (n === 0) throw formatError(file, `unexpected end of file at byte ${position + done}`);
    done += n;
  }
}

/**
 * Checks a header's JSON text against the file size: every problem is an ERR_LORA_FORMAT naming
 * the file. Exported for tests and for tools that read headers from elsewhere.
 */
export function parseSafetensorsHeader(file: string, json: string, fileSize: number, dataStart: number): SafetensorsHeader {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (err) {
    throw formatError(file, `header is not valid JSON (${(err as Error).message})`);
  }
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

function readHeaderFd(fd: number, file: string): SafetensorsHeader {
  let st: fs.Stats;
  try {
    st = fs.fstatSync(fd);
  } catch (err) {
    throw ioError(file, err, 'stat');
  }
  if (!st.isFile()) throw new LoraError('ERR_LORA_IO', `Could not read ${file}: not a regular file`);
  const fileSize = st.size;
  if (fileSize < 8) throw formatError(file, fileSize === 0 ? 'the file is empty' : `the file is ${fileSize} bytes, shorter than the 8-byte header length`);
  const lenBuf = Buffer.alloc(8);
  readExactly(fd, lenBuf, 0, file);
  const len = lenBuf.readBigUInt64LE(0);
  if (len > BigInt(MAX_HEADER_BYTES)) throw formatError(file, `header length ${len} is absurd (limit ${MAX_HEADER_BYTES})`);
  const headerLength = Number(len);
  if (headerLength < 2) throw formatError(file, `header length ${headerLength} is too short for a JSON object`);
  if (8 + headerLength > fileSize) throw formatError(file, `header length ${headerLength} runs past the end of the ${fileSize}-byte file`);
  const hbuf = Buffer.alloc(headerLength);
  readExactly(fd, hbuf, 8, file);
  let json: string;
  try {
    json = new TextDecoder('utf-8', { fatal: true }).decode(hbuf);
  } catch {
    throw formatError(file, 'header is not valid UTF-8');
  }
  return parseSafetensorsHeader(file, json, fileSize, 8 + headerLength);
}

function openRead(file: string): number {
  try {
    return fs.openSync(file, 'r');
  } catch (err) {
    throw ioError(file, err, 'open');
  }
}

/**
 * Reads and validates a safetensors header without reading any tensor data.
 * @throws ERR_LORA_FORMAT for a malformed file, ERR_LORA_IO when it cannot be read.
 */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  if (typeof file !== 'string') throw typeError('file', 'a path string', file);
  const fd = openRead(file);
  try {
    return readHeaderFd(fd, file);
  } finally {
    fs.closeSync(fd);
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

function storageFrom(dtype: DType, shape: number[], data: ArrayBufferView): Tensor {
  const out = empty(shape, 'cpu', dtype);
  if (out.size === 0) return out;
  const tmp = native.fromHost(0, DTYPE_ID[dtype], data);
  try {
    native.copyInto(out._storage, tmp);
  } finally {
    native.dispose(tmp);
  }
  return out;
}

/**
 * Turns one tensor's raw little-endian bytes into our tensor. bytes.byteOffset must be a multiple of
 * 8 (buffers from readTensorBytes are).
 */
export function decodeTensor(entry: Pick<SafetensorsEntry, 'name' | 'dtype' | 'shape' | 'file'>, bytes: Uint8Array, mode: 'keep' | 'float32' = 'keep'): Tensor {
  const n = numelOf(entry.shape);
  const target = tensorDtypeFor(entry.dtype, mode);
  const aligned = bytes.byteOffset % 8 === 0 ? bytes : new Uint8Array(bytes);
  const buf = aligned.buffer;
  const off = aligned.byteOffset;
  switch (entry.dtype) {
    case 'F32': return storageFrom('float32', entry.shape, new Float32Array(buf, off, n));
    case 'I32': return storageFrom('int32', entry.shape, new Int32Array(buf, off, n));
    case 'BF16': case 'F16': {
      const bits = new Uint16Array(buf, off, n);
      const kept = storageFrom(entry.dtype === 'BF16' ? 'bfloat16' : 'float16', entry.shape, bits);
      if (target === kept.dtype) return kept;
      const wide = kept.toDtype('float32');
      kept.dispose();
      return wide;
    }
    case 'F64': return storageFrom('float32', entry.shape, Float32Array.from(new Float64Array(buf, off, n)));
    case 'F8_E4M3': case 'F8_E5M2': {
      const out = new Float32Array(n);
      const e4 = entry.dtype === 'F8_E4M3';
      for (let i = 0; i < n; i++) out[i] = fp8ToFloat(aligned[i]!, e4);
      return storageFrom('float32', entry.shape, out);
    }
    default: {
      const ints = new Int32Array(n);
      const dv = new DataView(buf, off, aligned.byteLength);
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
      return storageFrom('int32', entry.shape, ints);
    }
  }
}

/** Reads one entry's bytes with positioned reads (into an 8-byte aligned buffer of exactly its size). */
export function readTensorBytes(entry: SafetensorsEntry, fd?: number): Uint8Array {
  const own = fd === undefined;
  const f = own ? openRead(entry.file) : fd;
  try {
    const out = new Uint8Array(entry.byteLength); // a fresh ArrayBuffer: offset 0, aligned
    readExactly(f, out, entry.start, entry.file);
    return out;
  } finally {
    if (own) fs.closeSync(f);
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

function loadEntries(entries: SafetensorsEntry[], mode: 'keep' | 'float32'): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const fds = new Map<string, number>();
  try {
    for (const e of entries) {
      let fd = fds.get(e.file);
      if (fd === undefined) {
        fd = openRead(e.file);
        fds.set(e.file, fd);
      }
      out.set(e.name, decodeTensor(e, readTensorBytes(e, fd), mode));
    }
  } catch (err) {
    for (const t of out.values()) t.dispose();
    throw err;
  } finally {
    for (const fd of fds.values()) fs.closeSync(fd);
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
 * Loads a .safetensors file into tensors on the CPU.
 *
 * @example
 * const { tensors, metadata } = loadSafetensors('model.safetensors');
 * @throws ERR_LORA_FORMAT (naming the file and the problem) for a malformed file; ERR_LORA_IO when
 *   it cannot be read; ERR_LORA_DTYPE for 64-bit integers outside the int32 range.
 */
export function loadSafetensors(file: string, opts?: LoadOptions): SafetensorsData {
  const { mode, names } = loadOpts(opts);
  const h = readSafetensorsHeader(file);
  return { tensors: loadEntries(pick(h.entries, names, file), mode), metadata: h.metadata };
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
 * Opens a model: a .safetensors file, a model.safetensors.index.json, or a directory holding one of
 * them (the index wins). Reads and validates every header; reads no tensor data.
 * @throws ERR_LORA_FORMAT for a malformed file or index (a shard outside the folder, a tensor the
 *   index names that its shard lacks, a tensor in two shards); ERR_LORA_IO when nothing is found.
 */
export function openModel(p: string): ModelIndex {
  if (typeof p !== 'string') throw typeError('path', 'a path string', p);
  let st: fs.Stats;
  try {
    st = fs.statSync(p);
  } catch (err) {
    throw ioError(p, err, 'open');
  }
  let file = p;
  if (st.isDirectory()) {
    const idx = path.join(p, INDEX_FILE);
    const single = path.join(p, 'model.safetensors');
    if (fs.existsSync(idx)) file = idx;
    else if (fs.existsSync(single)) file = single;
    else {
      const any = fs.readdirSync(p).filter((f) => f.endsWith('.safetensors')).sort();
      if (any.length !== 1) throw new LoraError('ERR_LORA_IO', `Found no ${INDEX_FILE} or model.safetensors in ${p}${any.length ? ` (and ${any.length} other .safetensors files)` : ''}`);
      file = path.join(p, any[0]!);
    }
  }
  if (!file.endsWith('.json')) {
    const h = readSafetensorsHeader(file);
    return { source: file, entries: h.entries, metadata: h.metadata, files: [file] };
  }
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    if ((err as { code?: string }).code) throw ioError(file, err, 'read');
    throw indexError(file, `not valid JSON (${(err as Error).message})`);
  }
  if (!json || typeof json !== 'object' || Array.isArray(json)) throw indexError(file, 'not a JSON object');
  const wm = (json as Record<string, unknown>).weight_map;
  if (!wm || typeof wm !== 'object' || Array.isArray(wm)) throw indexError(file, 'weight_map is missing or not an object');
  const dir = path.dirname(file);
  const shards = new Map<string, string[]>();
  for (const [name, shard] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof shard !== 'string' || shard === '' || path.isAbsolute(shard) || shard.split(/[\\/]/).includes('..'))
      throw indexError(file, `weight_map['${name}'] is not a file name inside the folder: ${describe(shard)}`);
    if (!shards.has(shard)) shards.set(shard, []);
    shards.get(shard)!.push(name);
  }
  const entries: SafetensorsEntry[] = [];
  const metadata: Record<string, string> = {};
  const meta = (json as Record<string, unknown>).metadata;
  if (meta && typeof meta === 'object') for (const [k, v] of Object.entries(meta)) metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
  const files: string[] = [];
  for (const [shard, names] of shards) {
    const f = path.join(dir, shard);
    const h = readSafetensorsHeader(f);
    files.push(f);
    const want = new Set(names);
    for (const e of h.entries) if (want.has(e.name)) entries.push(e);
    for (const n of names) if (!h.entries.some((e) => e.name === n)) throw indexError(file, `tensor '${n}' is mapped to ${shard}, which does not hold it`);
  }
  return { source: file, entries, metadata, files };
}

/**
 * Loads every tensor of a model (one file, an index, or a folder; see openModel).
 * @example const { tensors } = loadModel('path/to/llama');
 */
export function loadModel(p: string, opts?: LoadOptions): SafetensorsData {
  const { mode, names } = loadOpts(opts);
  const m = openModel(p);
  return { tensors: loadEntries(pick(m.entries, names, m.source), mode), metadata: m.metadata };
}

// ---- writing ------------------------------------------------------------------------------------

/** Bytes to write as they are (a dtype our tensors lack, or data streamed from another file). */
export interface RawTensor {
  dtype: SafetensorsDtype;
  shape: readonly number[];
  /** The bytes, or a function that produces them when the writer reaches this tensor. */
  data: Uint8Array | (() => Uint8Array | Tensor);
}

export type TensorSource = Tensor | RawTensor;

export interface SaveOptions {
  /** String key/values stored as __metadata__. */
  metadata?: Record<string, string>;
  /** Sort tensors by name in the file (default false: insertion order). */
  sort?: boolean;
}

interface Planned {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  bytes: number;
  src: TensorSource;
}

function plan(tensors: unknown, opts: unknown): { items: Planned[]; header: Buffer } {
  const o = checkOptions<SaveOptions>('saveSafetensors()', opts, ['metadata', 'sort']);
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
      expectTensor(name, src);
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
  return { items, header: out };
}

function bytesOf(item: Planned): Uint8Array {
  let d: Uint8Array | Tensor;
  if (item.src instanceof Tensor) d = item.src.toBytes();
  else d = typeof item.src.data === 'function' ? item.src.data() : item.src.data;
  if (d instanceof Tensor) {
    const t = d;
    if (SAFETENSORS_DTYPE[t.dtype] !== item.dtype) throw new LoraError('ERR_LORA_DTYPE', `Expected ${item.dtype} data for tensor '${item.name}' but its producer returned ${t.dtype}`);
    d = t.toBytes();
    t.dispose();
  }
  if (!(d instanceof Uint8Array)) throw typeError(`${item.name}.data`, 'a Uint8Array', d);
  if (d.byteLength !== item.bytes)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${item.bytes} bytes for tensor '${item.name}' but received ${d.byteLength}`);
  return d;
}

function tempName(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`);
}

function fsyncDir(dir: string): void {
  try {
    const fd = fs.openSync(dir, 'r');
    try { fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  } catch { /* some filesystems refuse fsync on directories; the rename is still atomic */ }
}

/** Options for the writer's progress callback (used by the CLI). */
export interface WriteProgress {
  /** Called after each tensor is written with (index, count, name). */
  onTensor?: (index: number, count: number, name: string) => void;
}

/**
 * Writes tensors to a .safetensors file atomically: a temp file in the same folder, fsync, rename.
 * A failure (or a crash) leaves any existing file untouched and no temp file behind.
 *
 * @example saveSafetensors('out.safetensors', { 'w': w, 'b': b }, { metadata: { format: 'pt' } });
 * @throws LoraTypeError for bad arguments; ERR_LORA_IO when the file cannot be written.
 */
export function saveSafetensors(file: string, tensors: Map<string, TensorSource> | Record<string, TensorSource>, opts?: SaveOptions & WriteProgress): void {
  if (typeof file !== 'string' || file === '') throw typeError('file', 'a path string', file);
  const { onTensor, ...rest } = (opts ?? {}) as SaveOptions & WriteProgress;
  const { items, header } = plan(tensors, opts === undefined ? undefined : rest);
  const tmp = tempName(file);
  let fd: number;
  try {
    fd = fs.openSync(tmp, 'wx', 0o644);
  } catch (err) {
    throw ioError(file, err, 'write');
  }
  let ok = false;
  try {
    let pos = 0;
    const write = (b: Uint8Array) => {
      let done = 0;
      while (done < b.byteLength) done += fs.writeSync(fd, b, done, b.byteLength - done, pos + done);
      pos += b.byteLength;
    };
    write(header);
    items.forEach((it, i) => {
      write(bytesOf(it));
      onTensor?.(i, items.length, it.name);
    });
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = -1;
    fs.renameSync(tmp, file);
    fsyncDir(path.dirname(file));
    ok = true;
  } catch (err) {
    if (err instanceof LoraError) throw err;
    throw ioError(file, err, 'write');
  } finally {
    if (fd! >= 0) try { fs.closeSync(fd!); } catch { /* already failing */ }
    if (!ok) try { fs.unlinkSync(tmp); } catch { /* never created or already gone */ }
  }
}

/**
 * saveSafetensors without blocking the event loop on disk writes (tensor bytes are still read out
 * synchronously, one tensor at a time). Same atomicity.
 */
export async function saveSafetensorsAsync(file: string, tensors: Map<string, TensorSource> | Record<string, TensorSource>, opts?: SaveOptions & WriteProgress): Promise<void> {
  if (typeof file !== 'string' || file === '') throw typeError('file', 'a path string', file);
  const { onTensor, ...rest } = (opts ?? {}) as SaveOptions & WriteProgress;
  const { items, header } = plan(tensors, opts === undefined ? undefined : rest);
  const tmp = tempName(file);
  let fh: fs.promises.FileHandle | null = null;
  let ok = false;
  try {
    fh = await fs.promises.open(tmp, 'wx', 0o644);
    let pos = 0;
    const write = async (b: Uint8Array) => {
      let done = 0;
      while (done < b.byteLength) done += (await fh!.write(b, done, b.byteLength - done, pos + done)).bytesWritten;
      pos += b.byteLength;
    };
    await write(header);
    for (let i = 0; i < items.length; i++) {
      await write(bytesOf(items[i]!));
      onTensor?.(i, items.length, items[i]!.name);
    }
    await fh.sync();
    await fh.close();
    fh = null;
    await fs.promises.rename(tmp, file);
    fsyncDir(path.dirname(file));
    ok = true;
  } catch (err) {
    if (err instanceof LoraError) throw err;
    throw ioError(file, err, 'write');
  } finally {
    if (fh) await fh.close().catch(() => undefined);
    if (!ok) await fs.promises.unlink(tmp).catch(() => undefined);
  }
}

/**
 * Writes a file atomically (temp + fsync + rename); used for JSON configs beside the tensors.
 * @internal
 */
export function writeFileAtomic(file: string, data: string | Uint8Array): void {
  const tmp = tempName(file);
  let ok = false;
  try {
    const fd = fs.openSync(tmp, 'wx', 0o644);
    try {
      fs.writeFileSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    fsyncDir(path.dirname(file));
    ok = true;
  } catch (err) {
    throw ioError(file, err, 'write');
  } finally {
    if (!ok) try { fs.unlinkSync(tmp); } catch { /* nothing to clean */ }
  }
}
