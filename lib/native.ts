// The only file that touches the compiled addon: loads it (node-gyp-build picks build/Release,
// build/Debug or prebuilds/<platform>-<arch>/; LORA_NATIVE_ADDON names a .node file instead) and
// describes its functions for TypeScript. It validates nothing: callers in lib/ check arguments
// first. It never downloads: when nothing loads it throws one ERR_LORA_LOAD saying what to do.
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
  cudaEmulated?: boolean;
  devices: { name: string; computeCapability: string; memory: number }[];
  isa: string;
  threads: number;
  addonDir: string;
  addonPath: string;
  binary: 'prebuild' | 'build';
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
  /** The class of every storage the addon makes (type-tagged on the native side as well). */
  Storage: abstract new (...args: never[]) => NativeStorage;
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
  loraMergeAsync(W: S, A: S, B: S, OC: number, C: number, R: number, s: number): Promise<void>;
  toHostAsync(s: S): Promise<ArrayBuffer>;
  /** Copies data's bytes into s at byteOffset (chunked file reads). */
  writeBytes(s: S, byteOffset: number, data: ArrayBufferView): void;
  /** Copies bytes of s from byteOffset into `into` (chunked file writes). */
  readBytes(s: S, byteOffset: number, into: ArrayBufferView): void;
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

const PLATFORM = `${process.platform}-${process.arch}`;

function exists(p: string): boolean {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

function nodeFiles(dir: string): string[] {
  try {
    return fs.readdirSync(dir).filter((f) => f.endsWith('.node')).sort().map((f) => path.join(dir, f));
  } catch {
    return [];
  }
}

// Every binary node-gyp-build could pick, in its order: local builds, then the prebuild.
function candidates(root: string): string[] {
  return [
    ...nodeFiles(path.join(root, 'build', 'Release')),
    ...nodeFiles(path.join(root, 'build', 'Debug')),
    ...nodeFiles(path.join(root, 'prebuilds', PLATFORM)),
  ];
}

function onPath(names: string[]): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    for (const n of names) if (dir && exists(path.join(dir, n))) return path.join(dir, n);
  }
  return undefined;
}

function glibcVersion(): string | undefined {
  try {
    const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
    return header?.glibcVersionRuntime;
  } catch {
    return undefined;
  }
}

/**
 * The one message for a failed load: each binary tried and why it failed, then what to do.
 * Exported for tests.
 */
export function loadFailureMessage(root: string, failures: { file: string; reason: string }[]): string {
  const lines = [`lora-native could not load its native addon (package folder ${root}, platform ${PLATFORM}, Node ${process.version}).`];
  if (failures.length === 0)
    lines.push(`No compiled addon (build/Release) and no prebuilt binary (prebuilds/${PLATFORM}) was found; ` +
      'the install step that compiles it did not run or failed (npm install --ignore-scripts skips it).');
  for (const f of failures) lines.push(`  ${f.file}: ${f.reason.split('\n')[0]}`);
  const all = failures.map((f) => f.reason).join('\n');
  const todo: string[] = [];
  const glibcNeeded = /GLIBC_([0-9.]+)' not found/.exec(all);
  if (glibcNeeded) {
    todo.push(`The prebuilt binary needs glibc ${glibcNeeded[1]} or newer; this system has ${glibcVersion() ?? 'an older one'}. ` +
      'Compile it from source instead (see below).');
  } else if (/GLIBCXX_[0-9.]+' not found|CXXABI_[0-9.]+' not found/.test(all)) {
    todo.push('The prebuilt binary needs a newer C++ runtime (libstdc++) than this system has. Compile it from source instead (see below).');
  } else if (/invalid ELF header|wrong ELF class|Exec format error/.test(all)) {
    todo.push(`A binary here was built for another platform or architecture than ${PLATFORM}. Compile it from source (see below).`);
  }
  if (PLATFORM !== 'linux-x64')
    todo.push(`lora-native ships prebuilt binaries for linux-x64 only; on ${PLATFORM} it must compile from source at install time.`);
  const missing = [
    onPath(['c++', 'g++', 'clang++']) ? '' : 'a C++17 compiler (g++ or clang++)',
    onPath(['make']) ? '' : 'make',
    onPath(['python3', 'python']) ? '' : 'python3',
  ].filter(Boolean);
  const rebuild = `run \`npm rebuild lora-native\` in your project (it compiles with node-gyp, offline when npm has nodedir set or Node's headers cached)`;
  if (missing.length) todo.push(`To compile from source, install ${missing.join(', ')} (this system lacks ${missing.length === 1 ? 'it' : 'them'}), then ${rebuild}.`);
  else todo.push(`To compile from source, ${rebuild}.`);
  todo.push('LORA_NATIVE_ADDON=/path/to/lora_native.node loads a specific binary. lora-native never downloads binaries.');
  return [...lines, ...todo].join('\n');
}

function load(): Binding {
  const root = packageRoot();
  const failures: { file: string; reason: string }[] = [];
  const attempt = (file: string): Binding | undefined => {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      return require(file) as Binding;
    } catch (err) {
      failures.push({ file, reason: err instanceof Error ? err.message : String(err) });
      return undefined;
    }
  };
  const override = process.env.LORA_NATIVE_ADDON;
  if (override) {
    const b = attempt(path.resolve(override));
    if (b) return b;
    throw new LoraError('ERR_LORA_LOAD', loadFailureMessage(root, failures) + '\n(LORA_NATIVE_ADDON is set, so no other binary was tried.)');
  }
  let first: string | undefined;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const nodeGypBuild = require('node-gyp-build') as { resolve(dir: string): string };
    first = nodeGypBuild.resolve(root);
  } catch {
    // nothing matched; candidates() below finds the same nothing and the message says so
  }
  // node-gyp-build's pick first; when it fails to load (a stale local build, a prebuild for a newer
  // glibc), every other binary in turn.
  for (const file of [...(first ? [first] : []), ...candidates(root).filter((f) => f !== first)]) {
    const b = attempt(file);
    if (b) return b;
  }
  throw new LoraError('ERR_LORA_LOAD', loadFailureMessage(root, failures));
}

export const native: Binding = load();
native.setErrorClass(LoraError);
