// The safetensors format's dtypes (names, sizes, our tensors' counterparts) and the byte source the
// writer streams from, shared by the reader (safetensors.ts) and the writer (safetensors_write.ts)
// so that neither imports the other.
import type { DType } from './tensor';

/** dtypes of the safetensors format. */
export type SafetensorsDtype =
  | 'F64' | 'F32' | 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2'
  | 'I64' | 'I32' | 'I16' | 'I8' | 'U64' | 'U32' | 'U16' | 'U8' | 'BOOL';

export const DTYPE_BYTES: Record<SafetensorsDtype, number> = {
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

/** Bytes a writer pulls in pieces: a tensor larger than one buffer, or one streamed from a file. */
export interface ByteSource {
  readonly byteLength: number;
  /** Fills `into` with the bytes at [offset, offset + into.length). */
  read(into: Uint8Array, offset: number): void;
}

