// The only file that loads the compiled addon (node-gyp-build picks build/Release, build/Debug or
// prebuilds/<platform>-<arch>/; LORA_NATIVE_ADDON names a .node file instead), typed by
// lib/binding_types.ts (generated from the addon's own description). It validates nothing: callers
// in lib/ check arguments first. It never downloads: when nothing loads it throws one
// ERR_LORA_LOAD saying what to do.
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Binding } from './binding_types';
import { LoraError } from './errors';

export type { Binding } from './binding_types';

/** A block of native memory on one device. Opaque to JavaScript. */
export interface NativeStorage {
  readonly numel: number;
  readonly dtype: number;
  readonly device: number;
  readonly disposed: boolean;
}

/**
 * Ids shared with native/backend/backend.h (the addon's enums() lists the same names in the same
 * order; test/binding.test.ts checks them).
 */
export const DTYPE_ID = { float32: 0, bfloat16: 1, float16: 2, int32: 3 } as const;
export const DEVICE_ID = { cpu: 0, cuda: 1 } as const;
export const BINARY_OP = { add: 0, sub: 1, mul: 2, div: 3, max: 4, min: 5 } as const;
export const UNARY_OP = {
  neg: 0, exp: 1, log: 2, sqrt: 3, rsqrt: 4, abs: 5, square: 6, recip: 7,
  relu: 8, geluTanh: 9, geluErf: 10, silu: 11, tanh: 12, sigmoid: 13,
} as const;
export const REDUCE_OP = { sum: 0, max: 1, min: 2 } as const;
/**
 * Ids of kernel entries of the backend table, for native.supports(device, op, dtype): the ones
 * lib/ asks about (enums().op lists every one, newer ones too).
 */
export const OP = {
  convert: 0, loraForward: 1, loraBackward: 2, loraMerge: 3, adamwStep: 4, sgdStep: 5, gemm: 6, binary: 7,
  binaryScalar: 8, unary: 9, unaryBackward: 10, axpy: 11, reduce: 12, copyStrided: 13, softmax: 14,
  softmaxBackward: 15, dropout: 16, layerNorm: 17, layerNormBackward: 18, rmsNorm: 19, rmsNormBackward: 20,
  embedding: 21, embeddingBackward: 22, crossEntropy: 23, crossEntropyBackward: 24, attention: 25,
  attentionBackward: 26, gemmSharedA: 31,
} as const;

export interface NativeFeatures {
  cuda: boolean;
  reason?: string;
  cudaLibrary: string;
  cudaEmulated?: boolean;
  devices: { name: string; computeCapability: string; memory: number }[];
  isa: string;
  bf16Dot: boolean;
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
  /** The most bytes of live CPU tensors at once since loading or resetPeakMemory(). */
  cpuPeakBytes: number;
  /** The same for CUDA tensors. */
  cudaPeakBytes: number;
}

/** One exported function of the addon, as describe() lists it. */
export interface BindingFunction {
  name: string;
  /** Its TypeScript signature, e.g. "(s: S): ArrayBuffer". */
  signature: string;
  /** For a kernel: the name of the op id it serves. */
  op?: string;
}

/** The addon's enums by name, index = id (see the constants above). */
export interface BindingEnums {
  abiVersion: number;
  dtype: string[];
  device: string[];
  unary: string[];
  binary: string[];
  reduce: string[];
  op: string[];
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

/**
 * Environment knobs renamed to the LORA_NATIVE_* prefix. The native code still reads the old name
 * when the new one is unset; README.md lists every knob.
 */
export const RENAMED_KNOBS: Readonly<Record<string, string>> = {
  LORA_CUDA_TC: 'LORA_NATIVE_CUDA_TC',
  LORA_CUDA_SKINNY: 'LORA_NATIVE_CUDA_SKINNY',
  LORA_CUDA_EMU_SMS: 'LORA_NATIVE_CUDA_EMU_SMS',
  LORA_CUDA_EMU_MEMORY_MB: 'LORA_NATIVE_CUDA_EMU_MEMORY_MB',
  LORA_CUDA_EMU_THREADS: 'LORA_NATIVE_CUDA_EMU_THREADS',
  LORA_CUDA_EMU_FAULT_AT: 'LORA_NATIVE_CUDA_EMU_FAULT_AT',
};

for (const [old, name] of Object.entries(RENAMED_KNOBS))
  if (process.env[old] && !process.env[name]) process.emitWarning(`${old} is deprecated; set ${name} instead`, 'DeprecationWarning');

export const native: Binding = load();
native.setErrorClass(LoraError);
