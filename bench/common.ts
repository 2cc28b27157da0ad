// Shared pieces of the CPU benchmark suite (npm run bench): the shapes, a timer that warms
// up and reports median/min of variants run in alternation, and tensor helpers over the binding.
// Not a test: numbers only.
import { native, DTYPE_ID } from '../lib/native';
import type { Tensor } from '../lib/tensor';

// (N, C, OC, R): rows, in-features, out-features, rank (issue 3).
export interface Shape { N: number; C: number; OC: number; R: number }
export const SHAPES: Shape[] = [
  { N: 512, C: 1024, OC: 1024, R: 8 },
  { N: 2048, C: 2048, OC: 2048, R: 16 },
  { N: 1024, C: 4096, OC: 4096, R: 64 },
  { N: 1, C: 4096, OC: 4096, R: 16 },
  { N: 16, C: 4096, OC: 4096, R: 16 },
];
// --quick drops the largest shape (about a third of the full run's time).
export const QUICK_SHAPES = SHAPES.filter((s) => s.C * s.OC * s.N < 1024 * 4096 * 4096);
export const shapeKey = (s: Shape) => `${s.N}x${s.C}x${s.OC}r${s.R}`;
/**
 * Copies of W that gemm's decode rows (N <= 16) take turns over, ours and the baselines' (run.ts
 * passes the count to OpenBLAS's and PyTorch's children): 128 MB of weights in all, two at the
 * least, so each call reads W from memory as a model's decode step does, not from L3. 1 elsewhere.
 */
export function weightCopies(name: string, s: Shape, dtype: DType): number {
  if (name !== 'gemm' || s.N > 16) return 1;
  return Math.max(2, Math.ceil(128e6 / (s.OC * s.C * (dtype === 'bf16' ? 2 : 4))));
}
// attention's shapes (issue 13): SmolLM2-135M's heads, one causal sequence of T tokens, carried
// as N = T, C = heads, OC = kvHeads, R = headDim.
export const ATTENTION_SHAPES: Shape[] = [512, 1024, 2048].map((T) => ({ N: T, C: 9, OC: 3, R: 64 }));
export const attentionKey = (s: Shape) => `T${s.N} H${s.C}/${s.OC} D${s.R}`;

export type DType = 'fp32' | 'bf16';
export interface Work { flops?: number; bytes?: number }
// A case: an untimed setup that returns the timed variants (ours first) and the work they do.
export interface Case {
  name: string;
  dtypes: DType[];
  setup(shape: Shape, dtype: DType): { variants: Record<string, () => void>; work: Work; dispose(): void };
}

export interface Timing { medianMs: number; minMs: number; reps: number; /** every timed run, sorted */ timesMs?: number[] }

// Warm up every variant, then time them in rounds, one run of each per round (so a change of load
// during the row weighs on every variant alike and their ratios hold), until both `reps` rounds
// and `minSeconds` have passed (at most 200 rounds). Median and min per variant.
export function timeAll(fns: Record<string, () => void>, reps: number, warmup: number, minSeconds = 0.3): Record<string, Timing> {
  const names = Object.keys(fns);
  for (const n of names) for (let i = 0; i < warmup; i++) fns[n]!();
  const ts: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  const start = performance.now();
  for (let round = 0; round < reps || (performance.now() - start < minSeconds * 1e3 * names.length && round < 200); round++) {
    for (const n of names) {
      const t0 = performance.now();
      fns[n]!();
      ts[n]!.push(performance.now() - t0);
    }
  }
  return Object.fromEntries(names.map((n) => {
    const s = ts[n]!.sort((a, b) => a - b);
    return [n, { medianMs: s[s.length >> 1]!, minMs: s[0]!, reps: s.length, timesMs: s }];
  }));
}

/** One variant's runs from several processes as one Timing: median (as timeAll takes it) and min of them all. */
export function pooledTiming(ts: readonly Timing[]): Timing {
  const s = ts.flatMap((t) => t.timesMs ?? [t.medianMs]).sort((a, b) => a - b);
  return { ...ts[0]!, medianMs: s[s.length >> 1]!, minMs: s[0]!, reps: s.length, timesMs: s };
}

// Deterministic pseudo-random fill (values in [-0.5, 0.5) * scale).
export function randomF32(n: number, seed: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    a[i] = ((x / 4294967296) - 0.5) * scale;
  }
  return a;
}

export type S = ReturnType<typeof native.alloc>;
export function f32(data: Float32Array): S { return native.fromHost(0, DTYPE_ID.float32, data); }
export function zeros(n: number): S {
  const t = native.alloc(0, DTYPE_ID.float32, n);
  native.fill(t, 0);
  return t;
}
// W in the requested storage dtype (bf16 converted by the backend, round-to-nearest-even).
export function weight(data: Float32Array, dtype: DType): S {
  const w32 = f32(data);
  if (dtype === 'fp32') return w32;
  const w = native.alloc(0, DTYPE_ID.bfloat16, data.length);
  native.convert(w, w32);
  native.dispose(w32);
  return w;
}
export { native };

/** The greedy next token of each row: argmax of its last position's logits [B, T, V] (the first maximum). */
let argmaxHost = new Float32Array(0);  // read into one array for every step, as generate() does
export function argmaxLast(logits: Tensor): number[] {
  const [B, T, V] = logits.shape as [number, number, number];
  if (argmaxHost.length < logits.size) argmaxHost = new Float32Array(logits.size);
  const d = logits.toFloat32Array(argmaxHost);
  const out: number[] = [];
  for (let b = 0; b < B; b++) {
    const r = (b * T + T - 1) * V;
    let best = 0;
    for (let v = 1; v < V; v++) if (d[r + v]! > d[r + best]!) best = v;
    out.push(best);
  }
  return out;
}

/** Time spent inside the binding, per key (a function's name, or what `keyOf` makes of a call). */
export interface BindingTimer {
  readonly byKey: Map<string, { ms: number; calls: number }>;
  /** Milliseconds inside the binding since the timer was made (while enabled). */
  totalMs: number;
  /** Calls are timed only while this is true. */
  enabled: boolean;
}

/**
 * Wraps every function of the binding with a timer (the kernels run synchronously inside them),
 * for the profiles in bench/llm_profile.ts and bench/llm_decode_profile.ts. Not undone: a profile
 * is a process of its own.
 */
export function timeBinding(keyOf: (name: string, args: unknown[]) => string = (name) => name): BindingTimer {
  const timer: BindingTimer = { byKey: new Map(), totalMs: 0, enabled: true };
  const n = native as unknown as Record<string, unknown>;
  for (const name of Object.keys(n)) {
    const f = n[name];
    if (typeof f !== 'function' || /^[A-Z]/.test(name)) continue;
    n[name] = (...args: unknown[]) => {
      if (!timer.enabled) return (f as (...a: unknown[]) => unknown)(...args);
      const t0 = performance.now();
      try {
        return (f as (...a: unknown[]) => unknown)(...args);
      } finally {
        const dt = performance.now() - t0, key = keyOf(name, args);
        const e = timer.byKey.get(key) ?? { ms: 0, calls: 0 };
        e.ms += dt;
        e.calls++;
        timer.byKey.set(key, e);
        timer.totalMs += dt;
      }
    };
  }
  return timer;
}

/** Runs a bench script's async main: an error prints its stack and exits 1 (the runner reads the code). */
export function runMain(main: () => Promise<void>): void {
  main().catch((err) => {
    process.stderr.write(String(err?.stack ?? err) + '\n');
    process.exit(1);
  });
}
