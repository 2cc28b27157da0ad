// The only file that touches the compiled addon: loads it (node-gyp-build picks build/Release,
// build/Debug or prebuilds/<platform>-<arch>/) and describes its functions for TypeScript. It
// validates nothing: callers in lib/ check arguments first.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { LoraError } from './errors';

/** A block of native memory on one device. Opaque to JavaScript. */
export interface NativeStorage {
  readonly numel: number;
  readonly dtype: number;
  readonly device: number;
  readonly disposed: boolean;
}

/** Ids shared with native/backend.h. */
export const DTYPE_ID = { float32: 0, bfloat16: 1, float16: 2, int32: 3 } as const;
export const DEVICE_ID = { cpu: 0, cuda: 1 } as const;
export const BINARY_OP = { add: 0, sub: 1, mul: 2, div: 3, max: 4, min: 5 } as const;
export const UNARY_OP = {
  neg: 0, exp: 1, log: 2, sqrt: 3, rsqrt: 4, abs: 5, square: 6, recip: 7,
  relu: 8, geluTanh: 9, geluErf: 10, silu: 11, tanh: 12, sigmoid: 13,
} as const;
export const REDUCE_OP = { sum: 0, max: 1, min: 2 } as const;

export interface NativeFeatures {
  cuda: boolean;
  reason?: string;
  cudaLibrary: string;
  devices: { name: string; computeCapability: string; memory: number }[];
  isa: string;
  threads: number;
  addonDir: string;
}

export interface NativeMemory {
  numTensors: number;
  numBytes: number;
  cpuTensors: number;
  cpuBytes: number;
  cpuCachedBytes: number;
  cudaTensors: number;
  cudaBytes: number;
  cudaCachedBytes: number;
}

type S = NativeStorage;
type OptS = NativeStorage | null;

export interface Binding {
  setErrorClass(ctor: unknown): void;
  alloc(device: number, dtype: number, numel: number): S;
  fromHost(device: number, dtype: number, data: ArrayBufferView): S;
  toHost(s: S): ArrayBuffer;
  copyInto(dst: S, src: S): void;
  toDevice(s: S, device: number): S;
  convert(dst: S, src: S): void;
  dispose(s: S): void;
  fill(s: S, value: number): void;
  memory(): NativeMemory;
  releaseCached(): void;
  setNumThreads(n: number): void;
  getNumThreads(): number;
  features(): NativeFeatures;
  loraForward(y: S, h: S, x: S, W: S, b: OptS, A: S, B: S, N: number, C: number, OC: number, R: number,
    s: number, dropout: number, seed: number): void;
  loraBackward(dx: OptS, dA: OptS, dB: OptS, dy: S, x: S, h: S, W: S, A: S, B: S, N: number, C: number,
    OC: number, R: number, s: number, dropout: number, seed: number): void;
  loraMerge(W: S, A: S, B: S, OC: number, C: number, R: number, s: number): void;
  adamwStep(p: S[], g: S[], m: S[], v: S[], lr: number, beta1: number, beta2: number, eps: number,
    weightDecay: number, step: number): void;
  sgdStep(p: S[], g: S[], buf: S[] | null, lr: number, momentum: number, dampening: number,
    weightDecay: number, nesterov: boolean, step: number): void;
  gemm(c: S, a: S, b: S, M: number, N: number, K: number, transA: boolean, transB: boolean, lda: number,
    ldb: number, ldc: number, alpha: number, beta: number, batch: number, strideA: number, strideB: number,
    strideC: number): void;
  binary(op: number, out: S, a: S, b: S, shape: number[], aStrides: number[], bStrides: number[]): void;
  binaryScalar(op: number, out: S, a: S, scalar: number, scalarFirst: boolean): void;
  unary(op: number, out: S, input: S): void;
  unaryBackward(op: number, dx: S, dy: S, x: OptS, y: OptS): void;
  axpy(y: S, x: S, a: number): void;
  reduce(op: number, out: S, input: S, outer: number, dim: number, inner: number): void;
  copyStrided(dst: S, dstOffset: number, dstStrides: number[], src: S, srcOffset: number, srcStrides: number[],
    shape: number[]): void;
  softmax(out: S, input: S, rows: number, cols: number, log: boolean): void;
  softmaxBackward(dx: S, dy: S, y: S, rows: number, cols: number, log: boolean): void;
  dropout(out: S, input: S, p: number, seed: number): void;
  [more: string]: unknown;
}

// The package root: the nearest folder above this file with a package.json (lib/ when run from
// source by the tests, dist/lib/ when compiled).
function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'binding.gyp'))) return dir;
    dir = path.dirname(dir);
  }
  return path.join(__dirname, '..');
}

function load(): Binding {
  const root = packageRoot();
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
    return nodeGypBuild(root) as Binding;
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new LoraError('ERR_LORA_LOAD',
      `lora-native could not load its native addon from ${root}: ${reason}. ` +
      'Reinstall the package (npm rebuild lora-native) to compile it from source; that needs python3, make and a C++17 compiler.');
  }
}

export const native: Binding = load();
native.setErrorClass(LoraError);
