// The backend-parity suite (after ggml's test-backend-ops): a table of cases per op, each a call
// of the binding (or of the public op, for its autograd and its argument errors) on seeded inputs
// at awkward shapes and dtypes, run on one device and compared with the float64 references of
// test/ref/. The tables live beside their references (each
// test/ref/*_ref.ts exports `parityCases`); this file only runs them. Plain Node (no tap): the
// tap test (test/parity.test.ts) runs it once per device this machine has — CPU at each ISA level,
// the CUDA emulator, a GPU — and bench/gpu/check.js runs it on the GPU machine.
import type { Binding } from '../../lib/binding_types';
import { DEVICE_ID, DTYPE_ID, native, NativeStorage } from '../../lib/native';
import { compare } from '../ref/nn_ops_ref';

export type Device = keyof typeof DEVICE_ID;

/** |got - ref| <= atol + rms·rms(ref) + rtol·|ref| elementwise. */
export interface Tol {
  atol: number;
  rtol: number;
  rms?: number;
}

export interface Input {
  data: ArrayLike<number>;
  /** Stored as (default float32); bfloat16 data is rounded on the device, as a weight would be. */
  dtype?: 'float32' | 'bfloat16' | 'float16' | 'int32';
}

/**
 * One call of the binding: its function name, then its arguments, where '$name' is the storage of
 * an input or output, ['$a', '$b'] a list of them, and anything else is passed as is.
 */
export type Call = [keyof Binding, ...unknown[]];

export interface Built {
  /** Binding-level cases: the inputs uploaded to the device, as named storages. */
  inputs: Record<string, Input>;
  /** Outputs to allocate: an element count (filled with NaN first, so an element no kernel wrote shows) or initial values (accumulating outputs). */
  outputs: Record<string, number | ArrayLike<number>>;
  calls: Call[];
  /** The reference values of some outputs. */
  expect: Record<string, ArrayLike<number>>;
  tol: Tol | ((device: Device) => Tol);
  /**
   * Op-level cases: public-API code run on the device instead of `calls`, returning the outputs
   * named in `expect` as arrays. It must free every tensor it makes (the runner counts them).
   */
  api?: (device: Device) => Record<string, ArrayLike<number>>;
  /** Instead of values: the calls (or api) must throw a LoraError with this code (and message). */
  throws?: string | { code: string; message: RegExp };
}

export interface ParityCase {
  /** The kernel first ('gemm M7 N13 K5 NT batch3'), so a prefix selects an op. */
  name: string;
  /** Builds inputs, calls and the reference (lazily: only for cases that run). */
  build(): Built;
}

export interface Result {
  name: string;
  ok: boolean;
  ms: number;
  line: string;
}

// A storage on `device` holding `data` in `dtype` (16-bit types converted on the device).
function upload(device: Device, input: Input): NativeStorage {
  const dev = DEVICE_ID[device];
  if (input.dtype === 'int32') return native.fromHost(dev, DTYPE_ID.int32, Int32Array.from(input.data));
  const f = native.fromHost(dev, DTYPE_ID.float32, Float32Array.from(input.data));
  if (!input.dtype || input.dtype === 'float32') return f;
  const s = native.alloc(dev, DTYPE_ID[input.dtype], f.numel);
  native.convert(s, f);
  native.dispose(f);
  return s;
}

// The storage's values as float32.
function download(s: NativeStorage): Float32Array {
  if (s.dtype === DTYPE_ID.float32) return new Float32Array(native.toHost(s));
  const f = native.alloc(s.device, DTYPE_ID.float32, s.numel);
  native.convert(f, s);
  const out = new Float32Array(native.toHost(f));
  native.dispose(f);
  return out;
}

function rms(a: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * a[i]!;
  return a.length ? Math.sqrt(s / a.length) : 0;
}

/** Runs one case on one device. */
export function runCase(c: ParityCase, device: Device): Result {
  const t0 = Date.now();
  const owned: NativeStorage[] = [];
  let line: string;
  let ok = true;
  try {
    const b = c.build();
    const storages = new Map<string, NativeStorage>();
    for (const [name, input] of Object.entries(b.inputs)) {
      const s = upload(device, input);
      owned.push(s);
      storages.set(name, s);
    }
    for (const [name, init] of Object.entries(b.outputs)) {
      const s = typeof init === 'number' ? native.alloc(DEVICE_ID[device], DTYPE_ID.float32, init) : upload(device, { data: init });
      if (typeof init === 'number' && init > 0) native.fill(s, NaN);
      owned.push(s);
      storages.set(name, s);
    }
    const resolve = (a: unknown): unknown => {
      if (typeof a === 'string' && a.startsWith('$')) {
        const s = storages.get(a.slice(1));
        if (!s) throw new Error(`case ${c.name} names no tensor ${a}`);
        return s;
      }
      return Array.isArray(a) ? a.map(resolve) : a;
    };
    let threw: unknown = null;
    let results: Record<string, ArrayLike<number>> = {};
    const live = native.memory().numTensors;
    try {
      if (b.api) results = b.api(device);
      else for (const [fn, ...args] of b.calls) (native[fn] as (...a: unknown[]) => unknown)(...args.map(resolve));
    } catch (err) {
      if (b.throws === undefined) throw err;
      threw = err;
    }
    const leaked = native.memory().numTensors - live;
    if (b.api && leaked !== 0) {
      ok = false;
      line = `the op left ${leaked} tensors alive`;
    } else if (b.throws !== undefined) {
      const want = typeof b.throws === 'string' ? { code: b.throws, message: /./ } : b.throws;
      const code = (threw as { code?: string } | null)?.code;
      const message = threw instanceof Error ? threw.message : '';
      ok = code === want.code && want.message.test(message);
      line = ok ? `threw ${code} as it should` : `expected ${want.code} ${want.message}, got ${threw ? `${code}: ${message}` : 'no error'}`;
    } else {
      const tol = typeof b.tol === 'function' ? b.tol(device) : b.tol;
      const parts: string[] = [];
      for (const [name, ref] of Object.entries(b.expect)) {
        const got = b.api ? results[name]! : download(storages.get(name)!);
        const m = compare(got, ref, tol.atol + (tol.rms ?? 0) * rms(ref), tol.rtol);
        ok = ok && m.ok;
        parts.push(`${name}: ${m.ok ? `max ratio ${m.message.split(' at ')[0]!.replace('worst ratio ', '')}` : m.message}`);
      }
      line = parts.join('; ');
    }
  } catch (err) {
    ok = false;
    line = `threw ${(err as { code?: string }).code ? `${(err as { code?: string }).code}: ` : ''}${err instanceof Error ? err.message : String(err)}`;
  } finally {
    for (const s of owned) if (!s.disposed) native.dispose(s);
  }
  return { name: c.name, ok, ms: Date.now() - t0, line };
}

/**
 * Every case of the tables whose name starts with one of the comma-separated prefixes `only` (all
 * when empty), on `device`; one line per case to `log`.
 */
export function runParity(cases: readonly ParityCase[], device: Device, only = '', log: (s: string) => void = () => {}): Result[] {
  const prefixes = only.split(',').filter(Boolean);
  const results: Result[] = [];
  for (const c of cases) {
    if (prefixes.length && !prefixes.some((p) => c.name.startsWith(p))) continue;
    const r = runCase(c, device);
    results.push(r);
    log(`${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${r.ms} ms): ${r.line}`);
  }
  return results;
}
