// attention() (lib/ops/attention.ts over native/cpu/attention*.cc and cuda/attention.cu) against the
// float64 reference in test/ref/attention_ref.ts, in two hops: the reference's gradients against
// central finite differences (and its GQA layout against repeat_kv), then the kernels against the
// reference on awkward shapes (T, S not multiples of any block, D = 7..128, GQA groups 1/3/8, padding
// with fully masked rows, segments, a sliding window, decode against a longer cache) at every CPU
// ISA level (one child process per level: the level is chosen once per process) and on CUDA (a
// GPU, else the CUDA emulator when it is built). Plus the public API's options and error paths.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import t, { Test } from 'tap';

import { attention, features, LoraError, memory, setNumThreads, tensor, Tensor } from '../lib/index';
import { native } from '../lib/native';
import * as A from './ref/attention_ref';
import { compare, f32, finiteDiff, randArray } from './ref/nn_ops_ref';

type F64 = Float64Array;
const LEVELS = ['avx512', 'avx2', 'generic'];
const CHILD = process.env.LORA_ATTN_TEST_CHILD;  // 'cpu' | 'cuda': run the cases, print JSON

interface Case extends A.AttnRefArgs { threads: number; pad?: boolean; segments?: boolean }
// B, T, S, Smax, H, KVH, D, causal, window, pad, segments, threads
const CASES: Case[] = [
  { B: 2, T: 50, S: 50, H: 6, KVH: 2, D: 64, scale: 0, causal: true, threads: 2 },
  { B: 1, T: 77, S: 77, H: 8, KVH: 1, D: 80, scale: 0, causal: true, threads: 1 },
  { B: 2, T: 33, S: 33, H: 2, KVH: 2, D: 128, scale: 0, causal: false, threads: 2 },
  { B: 2, T: 45, S: 45, H: 3, KVH: 1, D: 40, scale: 0, causal: true, pad: true, threads: 2 },
  { B: 1, T: 60, S: 60, H: 4, KVH: 2, D: 96, scale: 0, causal: true, window: 13, segments: true, threads: 1 },
  { B: 2, T: 1, S: 300, Smax: 320, H: 9, KVH: 3, D: 64, scale: 0, causal: true, pad: true, threads: 2 },
  { B: 1, T: 7, S: 70, Smax: 80, H: 8, KVH: 1, D: 64, scale: 0, causal: true, threads: 2 },
  { B: 1, T: 129, S: 129, H: 2, KVH: 1, D: 16, scale: 0, causal: true, window: 40, threads: 2 },
  { B: 1, T: 1, S: 1, H: 1, KVH: 1, D: 1, scale: 0, causal: true, threads: 1 },
  // decode with fewer kv heads than twice the threads: each head's keys split between tasks and
  // the parts combined (2 chunks of a padded cache; 6 chunks under a window that leaves the first
  // two without a visible key)
  { B: 1, T: 1, S: 700, Smax: 720, H: 8, KVH: 2, D: 64, scale: 0, causal: true, pad: true, threads: 2 },
  { B: 1, T: 3, S: 610, H: 4, KVH: 1, D: 40, scale: 0, causal: true, window: 400, threads: 3 },
  { B: 2, T: 20, S: 20, H: 3, KVH: 3, D: 7, scale: 0.3, causal: false, pad: true, segments: true, threads: 2 },
  // few query rows per (batch, kv head) take the dot-product scores (scores_dot): a head dim with a
  // tail past whole vectors under a window, and two query positions with padding and segments
  { B: 2, T: 1, S: 150, H: 6, KVH: 3, D: 40, scale: 0, causal: true, window: 100, threads: 2 },
  { B: 1, T: 2, S: 90, Smax: 100, H: 4, KVH: 2, D: 128, scale: 0, causal: true, pad: true, segments: true, threads: 1 },
  // two positions under a window on the dot-product path at every level (2 rows): the first key of
  // the earlier position's window is outside the later one's
  { B: 1, T: 2, S: 200, H: 1, KVH: 1, D: 64, scale: 0, causal: true, window: 50, threads: 1 },
];
const caseName = (c: Case) => `B${c.B} T${c.T} S${c.S}${c.Smax ? `/${c.Smax}` : ''} H${c.H}/${c.KVH} D${c.D}` +
  `${c.causal ? ' causal' : ''}${c.window ? ` window ${c.window}` : ''}${c.pad ? ' padded' : ''}${c.segments ? ' segments' : ''} ${c.threads} thr`;

// Seeded inputs of a case; batch 0 padded on the left, batch 1 on the right (so some query rows
// see no key at all under the causal rule); segments of 11 positions.
function inputs(c: Case, seed: number) {
  const Smax = c.Smax ?? c.S;
  const a: A.AttnRefArgs = { ...c, Smax, scale: c.scale || 1 / Math.sqrt(c.D) };
  const q = f32(randArray(c.B * c.T * c.H * c.D, seed, 2)), k = f32(randArray(c.B * Smax * c.KVH * c.D, seed + 1, 2));
  const v = f32(randArray(c.B * Smax * c.KVH * c.D, seed + 2)), G = f32(randArray(c.B * c.T * c.H * c.D, seed + 3));
  if (c.pad) a.mask = Int32Array.from({ length: c.B * c.S }, (_, i) => ((i / c.S | 0) === 0 ? i % c.S >= 9 : i % c.S < c.S - 4) ? 1 : 0);
  if (c.segments) a.seg = Int32Array.from({ length: c.B * c.S }, (_, i) => Math.floor((i % c.S) / 11));
  return { a, q, k, v, G };
}

// Runs one case through the public API on `device`: y, dq, dk, dv against the reference.
function runCase(c: Case, seed: number, device: 'cpu' | 'cuda'): string[] {
  const { a, q, k, v, G } = inputs(c, seed);
  const Smax = a.Smax!;
  const make = (x: F64, shape: number[]) => tensor(Float32Array.from(x), shape, { requiresGrad: true, device });
  const qt = make(q, [c.B, c.T, c.H, c.D]), kt = make(k, [c.B, Smax, c.KVH, c.D]), vt = make(v, [c.B, Smax, c.KVH, c.D]);
  const ints = (x: Int32Array) => tensor(Float32Array.from(x), [c.B, c.S], { dtype: 'int32', device });
  const mask = a.mask ? ints(a.mask) : undefined, segs = a.seg ? ints(a.seg) : undefined;
  setNumThreads(c.threads);
  const y = attention(qt, kt, vt, {
    causal: c.causal, scale: a.scale, window: c.window, attentionMask: mask, segmentIds: segs, kvLength: c.Smax ? c.S : undefined,
  });
  const g = tensor(Float32Array.from(G), y.shape, { device });
  y.backward(g);
  const got = [y, qt.grad!, kt.grad!, vt.grad!].map((x) => Float64Array.from(x.toFloat32Array()));
  for (const x of [y, g, qt, kt, vt, mask, segs]) x?.dispose();
  const ref = A.attentionRef(q, k, v, a);
  const rb = A.attentionBackwardRef(q, k, v, a, G);
  const fails: string[] = [];
  const tol = [[2e-5, 2e-4], [1e-4, 1e-3], [1e-4, 1e-3], [1e-4, 1e-3]];
  [ref.out, rb.dq, rb.dk, rb.dv].forEach((r, i) => {
    const m = compare(got[i]!, r, tol[i]![0]!, tol[i]![1]!);
    if (!m.ok) fails.push(`${caseName(c)} ${['out', 'dq', 'dk', 'dv'][i]}: ${m.message}`);
  });
  return fails;
}

if (CHILD) {
  const fails: string[] = [];
  CASES.forEach((c, i) => fails.push(...runCase(c, 100 + 10 * i, CHILD as 'cpu' | 'cuda')));
  let wide = 'no error';  // headDim 264: past the CUDA kernel's limit
  const q = tensor(new Float32Array(264), [1, 1, 1, 264], { device: CHILD as 'cpu' | 'cuda' });
  try {
    attention(q, q, q).dispose();
  } catch (e) {
    wide = `${(e as LoraError).code}: ${(e as Error).message}`;
  }
  q.dispose();
  // straight to fd 1: tap owns process.stdout in this file
  fs.writeSync(1, JSON.stringify({ isa: features().isa, cases: CASES.length, fails, wide, live: memory().numTensors }) + '\n');
  process.exit(0);
}

const close = (tt: Test, a: ArrayLike<number>, r: ArrayLike<number>, what: string, atol = 1e-5, rtol = 1e-4) => {
  const m = compare(a, r, atol, rtol);
  tt.ok(m.ok, `${what}: ${m.message}`);
};
const before = memory().numTensors;

t.test('reference: gradients equal finite differences (GQA, cache, causal, window, padding, segments)', (tt) => {
  const c: Case = { B: 2, T: 4, S: 6, Smax: 7, H: 6, KVH: 2, D: 3, scale: 0, causal: true, window: 4, pad: true, segments: true, threads: 1 };
  const { a, q, k, v, G } = inputs(c, 7);
  a.seg = Int32Array.from([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]);
  const f = (xs: F64[]) => A.attentionRef(xs[0]!, xs[1]!, xs[2]!, a).out;
  const rb = A.attentionBackwardRef(q, k, v, a, G);
  ['dq', 'dk', 'dv'].forEach((name, i) => {
    const fd = finiteDiff(f, [q.slice(), k.slice(), v.slice()], G, i);
    close(tt, [rb.dq, rb.dk, rb.dv][i]!, fd, `${name} vs central differences`, 1e-8, 1e-6);
  });
  tt.ok(rb.dk.slice(6 * 2 * 3, 7 * 2 * 3).every((x) => x === 0), 'cache positions past S get no gradient');
  tt.end();
});

t.test('reference: the GQA layout is repeat_kv\'s, and masks remove exactly their keys', (tt) => {
  const c: Case = { B: 2, T: 5, S: 5, H: 6, KVH: 2, D: 4, scale: 0, causal: true, threads: 1 };
  const { a, q, k, v } = inputs(c, 11);
  const rep = (x: F64) => A.repeatKv(x, c.B, c.S, c.KVH, c.H, c.D);
  close(tt, A.attentionRef(q, k, v, a).out, A.attentionRef(q, rep(k), rep(v), { ...a, KVH: c.H }).out, 'GQA == MHA over repeated k, v', 1e-12, 0);
  // right padding of batch 1 by 2 keys == the same attention over the first 3 keys (queries 0..2)
  const mask = Int32Array.from([1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
  const padded = A.attentionRef(q, k, v, { ...a, causal: false, mask }).out;
  const cut = (x: F64, n: number, H: number) => x.slice((1 * c.S) * H * c.D, (1 * c.S + n) * H * c.D);
  const short = A.attentionRef(cut(q, 3, c.H), cut(k, 3, c.KVH), cut(v, 3, c.KVH), { ...a, B: 1, T: 3, S: 3, causal: false }).out;
  close(tt, cut(padded, 3, c.H), short, 'padding == dropping the padded keys', 1e-12, 0);
  // a window of 2 with the causal rule: query at p sees p-1 and p only
  const w = A.attentionRef(q, k, v, { ...a, window: 2 }).out;
  const row = 3, h = 1, at = ((0 * c.T + row) * c.H + h) * c.D;
  const s = [2, 3].map((j) => { let d = 0; for (let e = 0; e < c.D; e++) d += q[at + e]! * k[((0 * c.S + j) * c.KVH + 0) * c.D + e]!; return d * a.scale; });
  const p2 = 1 / (1 + Math.exp(s[0]! - s[1]!));
  const want = Array.from({ length: c.D }, (_, e) => (1 - p2) * v[(2 * c.KVH) * c.D + e]! + p2 * v[(3 * c.KVH) * c.D + e]!);
  close(tt, w.slice(at, at + c.D), want, 'window 2: two keys, by hand', 1e-12, 0);
  tt.end();
});

function runChild(device: 'cpu' | 'cuda', env: Record<string, string>) {
  const r = spawnSync(process.execPath, [...process.execArgv, __filename], {
    env: { ...process.env, ...env, LORA_ATTN_TEST_CHILD: device }, encoding: 'utf8', timeout: 300_000,
  });
  const line = (r.stdout ?? '').trim().split('\n').filter((l) => l.startsWith('{')).pop();
  return { res: line ? JSON.parse(line) as { isa: string; cases: number; fails: string[]; wide: string; live: number } : null, r };
}

t.test('CPU kernel against the reference at every ISA level', (tt) => {
  for (const level of LEVELS) {
    const { res, r } = runChild('cpu', { LORA_NATIVE_ISA: level });
    tt.ok(res, `${level}: child reported (exit ${r.status}; ${(r.stderr ?? '').slice(-300)})`);
    if (!res) continue;
    tt.ok(LEVELS.indexOf(res.isa) >= LEVELS.indexOf(level), `${level}: ran at ${res.isa}`);
    tt.same(res.fails, [], `${level} (${res.isa}): ${res.cases} cases, forward and backward within tolerance`);
    tt.equal(res.wide, 'no error', `${level}: headDim 264 runs on the CPU`);
    tt.equal(res.live, 0, `${level}: no tensor left alive`);
  }
  tt.end();
});

const emuLib = path.join(__dirname, '..', 'build-cuda-emu', 'liblora_cuda_emu.so');
const cudaSkip = features().cuda ? false : fs.existsSync(emuLib) ? false : `no GPU and no CUDA emulator (npm run build:cuda-emu): ${features().reason ?? ''}`;
t.test(`CUDA kernel against the reference (${features().cuda ? 'GPU' : 'CUDA emulator'})`, { skip: cudaSkip }, (tt) => {
  const { res, r } = runChild('cuda', features().cuda ? {} : { LORA_NATIVE_CUDA_LIB: emuLib });
  tt.ok(res, `child reported (exit ${r.status}; ${(r.stderr ?? '').slice(-300)})`);
  if (res) {
    tt.same(res.fails, [], `${res.cases} cases, forward and backward within tolerance`);
    tt.equal(res.wide, 'ERR_LORA_UNSUPPORTED: Expected a headDim of at most 256 for attention() on cuda but received 264 (the CPU has no limit)', 'headDim 264 is refused on cuda');
    tt.equal(res.live, 0, 'no tensor left alive');
  }
  tt.end();
});

t.test('the old call signature: q, k, v of one shape, causal by default', (tt) => {
  const B = 2, T = 5, H = 3, D = 7, n = B * T * H * D;
  const q = f32(randArray(n, 19)), k = f32(randArray(n, 20)), v = f32(randArray(n, 21));
  const mk = (x: F64) => tensor(Float32Array.from(x), [B, T, H, D]);
  const [qt, kt, vt] = [mk(q), mk(k), mk(v)];
  const y = attention(qt, kt, vt);
  close(tt, y.toFloat32Array(), A.attentionRef(q, k, v, { B, T, S: T, H, KVH: H, D, scale: 1 / Math.sqrt(D), causal: true }).out, 'forward');
  [qt, kt, vt, y].forEach((x) => x.dispose());
  tt.end();
});

t.test('the saved log-sum-exp: +Infinity for a row that sees no key, finite outputs everywhere', (tt) => {
  const c: Case = { B: 1, T: 6, S: 6, H: 1, KVH: 1, D: 4, scale: 0, causal: true, pad: true, threads: 1 };
  const { a, q, k, v } = inputs(c, 3);
  a.mask = Int32Array.from([0, 0, 1, 1, 1, 1]);  // left padding: queries 0 and 1 see nothing
  const S = (x: F64, n: number) => native.fromHost(0, 0, Float32Array.from(x.length ? x : new Float64Array(n)));
  const out = S(new Float64Array(0), 24), lse = S(new Float64Array(0), 6), m = native.fromHost(0, 3, a.mask);
  const Q = S(q, 0), K = S(k, 0), V = S(v, 0);
  native.attention(out, lse, Q, K, V, m, 6, null, 0, 1, 6, 6, 6, 1, 1, 4, a.scale, true, 0);
  const ref = A.attentionRef(q, k, v, a);
  const got = new Float32Array(native.toHost(lse));
  tt.same(Array.from(got.slice(0, 2)), [Infinity, Infinity], 'rows with no visible key: lse = +Infinity');
  close(tt, got.slice(2), ref.lse.slice(2), 'the other rows: log Σ exp');
  const o = new Float32Array(native.toHost(out));
  tt.same(Array.from(o.slice(0, 8)), [0, 0, 0, 0, 0, 0, 0, 0], 'and output 0');
  [out, lse, m, Q, K, V].forEach((x) => native.dispose(x));
  tt.end();
});

t.test('empty and degenerate shapes: no query, no query head, no batch', (tt) => {
  for (const [qs, ks] of [[[1, 0, 2, 4], [1, 3, 2, 4]], [[1, 2, 0, 4], [1, 2, 3, 4]], [[0, 2, 2, 4], [0, 2, 1, 4]]]) {
    const mk = (shape: number[]) => tensor(Float32Array.from({ length: shape.reduce((x, y) => x * y, 1) }, (_, i) => i % 5 - 2), shape, { requiresGrad: true });
    const q = mk(qs!), k = mk(ks!), v = mk(ks!);
    const y = attention(q, k, v);
    tt.same(y.shape, qs, `q ${JSON.stringify(qs)}, k ${JSON.stringify(ks)}: output has q's shape`);
    const g = tensor(new Float32Array(y.size), y.shape);
    y.backward(g);
    tt.ok([k.grad!, v.grad!].every((d) => d.toFloat32Array().every((x) => x === 0)), 'dk, dv are 0 (no query sees a key)');
    [y, g, q, k, v].forEach((x) => x.dispose());
  }
  tt.end();
});

t.test('error paths', (tt) => {
  const z = (shape: number[], dtype: 'float32' | 'int32' | 'bfloat16' = 'float32') => tensor(new Float32Array(shape.reduce((x, y) => x * y, 1)), shape, { dtype });
  const q = z([1, 4, 6, 8]), k = z([1, 4, 2, 8]), owned: Tensor[] = [q, k];
  const own = (x: Tensor) => (owned.push(x), x);
  const expect = (fn: () => unknown, cls: new (...a: never[]) => Error, code: string, message: string) => {
    try {
      fn();
      tt.fail(`expected ${code}: ${message}`);
    } catch (e) {
      tt.ok(e instanceof cls && e instanceof LoraError, `${code}: class ${(e as Error).constructor.name}`);
      tt.equal((e as { code?: string }).code, code, `${code}: code`);
      tt.equal((e as Error).message, message, `${code}: message`);
    }
  };
  expect(() => attention(own(z([4, 6, 8])), k, k), LoraError, 'ERR_LORA_SHAPE', 'Expected q of shape [batch, seq, heads, headDim] for attention() but received [4, 6, 8]');
  expect(() => attention(q, k, own(z([1, 4, 3, 8]))), LoraError, 'ERR_LORA_SHAPE', 'Expected k and v of one shape [batch, kvSeq, kvHeads, headDim] for attention() but received [1, 4, 2, 8] and [1, 4, 3, 8]');
  const k9 = own(z([1, 4, 2, 9]));
  expect(() => attention(q, k9, k9), LoraError, 'ERR_LORA_SHAPE', "Expected k and v with q's batch 1 and headDim 8 for attention() but received q [1, 4, 6, 8] and k, v [1, 4, 2, 9]");
  const k4 = own(z([1, 4, 4, 8]));
  expect(() => attention(q, k4, k4), LoraError, 'ERR_LORA_SHAPE', 'Expected the query heads (6) to be a multiple of the key/value heads (4) for attention() but received q [1, 4, 6, 8] and k, v [1, 4, 4, 8]');
  const k3 = own(z([1, 3, 2, 8]));
  expect(() => attention(q, k3, k3), LoraError, 'ERR_LORA_SHAPE', 'Expected at most as many queries as key positions for attention() (queries are the last T of them) but received q [1, 4, 6, 8] and k, v [1, 3, 2, 8]');
  expect(() => attention(q, k, k, { kvLength: 5 }), RangeError, 'ERR_LORA_RANGE', 'Expected an integer between 4 and 4 for kvLength but received 5 (number)');
  expect(() => attention(q, k, k, { window: 0 }), RangeError, 'ERR_LORA_RANGE', 'Expected an integer between 1 and 9007199254740991 for window but received 0 (number)');
  expect(() => attention(q, k, k, { scale: NaN }), RangeError, 'ERR_LORA_RANGE', 'Expected a finite number for scale but received NaN (number)');
  expect(() => attention(q, k, k, { causal: 1 as unknown as boolean }), TypeError, 'ERR_LORA_TYPE', 'Expected a boolean for causal but received 1 (number)');
  expect(() => attention(q, k, k, { attentionMask: own(z([1, 4])) }), LoraError, 'ERR_LORA_DTYPE', "Expected an int32 attentionMask for attention() but received float32 (create it with { dtype: 'int32' })");
  expect(() => attention(q, k, k, { segmentIds: own(z([1, 3], 'int32')) }), LoraError, 'ERR_LORA_SHAPE', 'Expected segmentIds of shape [1, n] with n >= 4 (batch, key positions) for attention() but received [1, 3]');
  expect(() => attention(own(z([1, 4, 6, 8], 'bfloat16')), k, k), LoraError, 'ERR_LORA_DTYPE', "Expected float32 q for attention() but received bfloat16 (convert with toDtype('float32'))");
  expect(() => attention(q, k, k, { mask: 1 } as never), LoraError, 'ERR_LORA_OPTION', "Unknown option 'mask' for attention(); known options: causal, scale, attentionMask, segmentIds, window, kvLength");
  expect(() => attention(q, k, k, { kvLenght: 4 } as never), LoraError, 'ERR_LORA_OPTION', "Unknown option 'kvLenght' for attention(); did you mean 'kvLength'?");
  owned.forEach((x) => x.dispose());
  tt.end();
});

t.test('no tensor outlives the tests', (tt) => {
  tt.equal(memory().numTensors, before);
  tt.end();
});
