// A GGUF (version 3) writer, byte for byte as gguf-py's GGUFWriter lays a file out: header, key/
// value pairs in insertion order, tensor infos with their dimensions reversed into ggml's order,
// padding to the alignment (32), then each tensor's data padded to the alignment. Little-endian,
// float tensors only (F32, F16, BF16). The file appears whole or not at all (temp file, rename).
// It does not read GGUF files and does not quantize.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { LoraError, typeError } from '../errors';

/** GGUF metadata value types (gguf-py's GGUFValueType). */
export const GGUF_VALUE_TYPE = {
  uint8: 0, int8: 1, uint16: 2, int16: 3, uint32: 4, int32: 5, float32: 6, bool: 7, string: 8, array: 9, uint64: 10, int64: 11, float64: 12,
} as const;
export type GgufScalarType = Exclude<keyof typeof GGUF_VALUE_TYPE, 'array'>;

/** One metadata value: a scalar of a type, or an array of one scalar type. */
export type GgufValue =
  | { type: GgufScalarType; value: number | bigint | boolean | string }
  | { type: 'array'; itemType: GgufScalarType; value: (number | bigint | boolean | string)[] };

/** ggml tensor types this writer stores (ggml's GGML_TYPE_* numbers). */
export const GGML_TYPE = { F32: 0, F16: 1, BF16: 30 } as const;
export type GgufTensorType = keyof typeof GGML_TYPE;
const TYPE_BYTES: Record<GgufTensorType, number> = { F32: 4, F16: 2, BF16: 2 };

export interface GgufTensor {
  name: string;
  type: GgufTensorType;
  /** Row-major shape as PyTorch/NumPy give it; stored reversed (ggml's ne[0] is the innermost). */
  shape: number[];
  /** The tensor's bytes (little-endian), produced when it is written. */
  data: () => Uint8Array;
}

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian uint32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

class Bytes {
  private chunks: Buffer[] = [];
  length = 0;
  private push(b: Buffer): void {
    this.chunks.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.push(b);
  }
  u64(v: number | bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  str(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.push(b);
  }
  scalar(type: GgufScalarType, v: number | bigint | boolean | string, key: string): void {
    const bad = () => new LoraError('ERR_LORA_TYPE', `GGUF metadata ${key}: ${String(v)} is not a valid ${type}`);
    if (type === 'string') {
      if (typeof v !== 'string') throw bad();
      return this.str(v);
    }
    if (type === 'bool') {
      if (typeof v !== 'boolean') throw bad();
      return this.push(Buffer.from([v ? 1 : 0]));
    }
    if (typeof v !== 'number' && typeof v !== 'bigint') throw bad();
    const sizes: Record<string, number> = { uint8: 1, int8: 1, uint16: 2, int16: 2, uint32: 4, int32: 4, float32: 4, uint64: 8, int64: 8, float64: 8 };
    const b = Buffer.alloc(sizes[type]!);
    try {
      switch (type) {
        case 'uint8': b.writeUInt8(Number(v)); break;
        case 'int8': b.writeInt8(Number(v)); break;
        case 'uint16': b.writeUInt16LE(Number(v)); break;
        case 'int16': b.writeInt16LE(Number(v)); break;
        case 'uint32': b.writeUInt32LE(Number(v)); break;
        case 'int32': b.writeInt32LE(Number(v)); break;
        case 'float32': b.writeFloatLE(Number(v)); break;
        case 'float64': b.writeDoubleLE(Number(v)); break;
        case 'uint64': b.writeBigUInt64LE(BigInt(v)); break;
        case 'int64': b.writeBigInt64LE(BigInt(v)); break;
      }
    } catch {
      throw bad();
    }
    this.push(b);
  }
  pad(alignment: number): void {
    const n = (alignment - (this.length % alignment)) % alignment;
    if (n) this.push(Buffer.alloc(n));
  }
  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

function padded(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

/**
 * Writes a GGUF file. Metadata keys keep the order given; tensors are written in the order given.
 * `general.alignment` in the metadata (uint32) sets the alignment, else 32.
 * @example
 * writeGguf('out.gguf', new Map([['general.architecture', { type: 'string', value: 'llama' }]]), [
 *   { name: 'blk.0.attn_q.weight.lora_a', type: 'F32', shape: [8, 576], data: () => bytes },
 * ]);
 * @throws ERR_LORA_SHAPE when a tensor's bytes do not match its shape and type, ERR_LORA_TYPE for
 *   a metadata value that does not fit its type, ERR_LORA_IO when the file cannot be written
 *   (nothing is left behind).
 */
export function writeGguf(file: string, metadata: Map<string, GgufValue>, tensors: GgufTensor[]): void {
  if (typeof file !== 'string' || !file) throw typeError('file', 'a .gguf file path', file);
  if (!(metadata instanceof Map)) throw typeError('metadata', 'a Map of key to { type, value }', metadata);
  for (const [key, v] of metadata) {
    if (typeof key !== 'string') throw typeError('metadata key', 'a string', key);
    if (!v || typeof v !== 'object' || !Object.hasOwn(GGUF_VALUE_TYPE, v.type) || (v.type === 'array' && (!Array.isArray(v.value) || !Object.hasOwn(GGUF_VALUE_TYPE, v.itemType) || (v.itemType as string) === 'array')))
      throw typeError(`metadata '${key}'`, "{ type, value } with a GGUF value type ('uint32', 'string', 'array' with itemType, ...)", v);
  }
  if (!Array.isArray(tensors)) throw typeError('tensors', 'an array of { name, type, shape, data }', tensors);
  tensors.forEach((t, i) => {
    if (!t || typeof t !== 'object' || typeof t.name !== 'string' || !Object.hasOwn(GGML_TYPE, t.type) || typeof t.data !== 'function' ||
      !Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0))
      throw typeError(`tensors[${i}]`, "{ name: string, type: 'F32' | 'F16' | 'BF16', shape: integer[], data: () => Uint8Array }", t);
  });
  const alignment = Number(metadata.get('general.alignment')?.value ?? GGUF_DEFAULT_ALIGNMENT);
  const head = new Bytes();
  head.u32(GGUF_MAGIC);
  head.u32(GGUF_VERSION);
  head.u64(tensors.length);
  head.u64(metadata.size);
  for (const [key, v] of metadata) {
    head.str(key);
    head.u32(GGUF_VALUE_TYPE[v.type]);
    if (v.type === 'array') {
      head.u32(GGUF_VALUE_TYPE[v.itemType]);
      head.u64(v.value.length);
      for (const x of v.value) head.scalar(v.itemType, x, key);
    } else head.scalar(v.type, v.value, key);
  }
  let offset = 0;
  const sizes: number[] = [];
  const names = new Set<string>();
  for (const t of tensors) {
    if (names.has(t.name)) throw new LoraError('ERR_LORA_FORMAT', `Duplicated GGUF tensor name '${t.name}'`);
    names.add(t.name);
    head.str(t.name);
    head.u32(t.shape.length);
    for (let j = t.shape.length - 1; j >= 0; j--) head.u64(t.shape[j]!);
    head.u32(GGML_TYPE[t.type]);
    head.u64(offset);
    const nbytes = t.shape.reduce((a, b) => a * b, 1) * TYPE_BYTES[t.type];
    sizes.push(nbytes);
    offset += padded(nbytes, alignment);
  }
  head.pad(alignment);
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  let fd = -1;
  let ok = false;
  try {
    try {
      fd = fs.openSync(tmp, 'w', 0o644);
      fs.writeSync(fd, head.bytes());
    } catch (err) {
      throw new LoraError('ERR_LORA_IO', `Could not write ${file}: ${(err as Error).message}`);
    }
    tensors.forEach((t, i) => {
      const data = t.data();
      if (data.byteLength !== sizes[i])
        throw new LoraError('ERR_LORA_SHAPE', `GGUF tensor '${t.name}' of shape [${t.shape.join(', ')}] ${t.type} needs ${sizes[i]} bytes but its data has ${data.byteLength}`);
      try {
        fs.writeSync(fd, data);
        const pad = padded(data.byteLength, alignment) - data.byteLength;
        if (pad) fs.writeSync(fd, Buffer.alloc(pad));
      } catch (err) {
        throw new LoraError('ERR_LORA_IO', `Could not write ${file}: ${(err as Error).message}`);
      }
    });
    try {
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fd = -1;
      fs.renameSync(tmp, file);
    } catch (err) {
      throw new LoraError('ERR_LORA_IO', `Could not write ${file}: ${(err as Error).message}`);
    }
    ok = true;
  } finally {
    if (fd >= 0) try { fs.closeSync(fd); } catch { /* already failing */ }
    if (!ok) try { fs.unlinkSync(tmp); } catch { /* nothing to clean */ }
  }
}
