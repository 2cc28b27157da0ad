// The CPU GEMM engine (native/cpu/gemm*.cc) against a float64 reference: hundreds of random shapes,
// row strides, transposes, alpha/beta and thread counts, including 0- and 1-sized dims, at every ISA
// level (LORA_NATIVE_ISA, one child process per level since the level is chosen once per process),
// the same with a bf16 B (the gemm_bf16 op: W read as stored, fp32 products) and linear() with a
// bf16 weight at every level; plus the bf16 frozen base (forward, backward, merge) with its stated
// tolerance, and linear()'s fallback where a backend has no bf16 GEMM. Not a test of the LoRA math
// itself (test/lora_forward.test.ts), only of the engine under it.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import t from 'tap';

import { features, getNumThreads, linear, LoraError, LoraLinear, setNumThreads, tensor, tidy } from '../lib/index';
import { DTYPE_ID, native, OP } from '../lib/native';
import { Rng } from '../lib/random';
import { assertClose, assertLoraError, leakChecked } from './helpers';
import { bf16Value } from './ref/dtype_ref';
import { dropoutRef } from './ref/lora_ref';

const LEVELS = ['avx512', 'avx2', 'generic'];
const CHILD = process.env.LORA_NATIVE_GEMM_TEST_CHILD === '1';

const f32 = (n: number, rng: Rng, scale = 1) => Float32Array.from({ length: n }, () => (2 * rng.uniform() - 1) * scale);
const toF32 = (s: ReturnType<typeof native.alloc>) => new Float32Array(native.toHost(s));
function bf16Tensor(vals: Float32Array) {
  const w32 = native.fromHost(0, DTYPE_ID.float32, vals);
  const w = native.alloc(0, DTYPE_ID.bfloat16, vals.length);
  native.convert(w, w32);
  native.dispose(w32);
  return w;
}
function bf16ToF32(s: ReturnType<typeof native.alloc>): Float32Array {
  const u16 = new Uint16Array(native.toHost(s));
  const out = new Uint32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = u16[i]! << 16;
  return new Float32Array(out.buffer);
}

// One random GEMM against float64: C = alpha·op(A)·op(B) + beta·C, checked elementwise with
// |c - r| <= 1e-5·Σ|terms| + 1e-30 (fp32 accumulation error bound with headroom), padding
// columns of C (between N and ldc) untouched, and beta = 0 never reading C (it holds NaN).
// With bf16, B is stored as bf16 (gemm_bf16) and the reference reads the same bf16 values: widened
// exactly and never rounding A, the bound is fp32's.
function randomGemm(rng: Rng, i: number, threads: number, bf16 = false, dims?: [number, number, number], trans?: [boolean, boolean], nonzeroAlpha = false): string | null {
  const dim = () => {
    const r = rng.uniform();
    return r < 0.12 ? Math.floor(rng.uniform() * 2) : r < 0.5 ? 2 + Math.floor(rng.uniform() * 18) : r < 0.9 ? 20 + Math.floor(rng.uniform() * 80) : 100 + Math.floor(rng.uniform() * 200);
  };
  let [M, N, K] = dims ?? [dim(), dim(), dim()];
  while (!dims && M * N * K > 2_000_000) { M = Math.ceil(M / 2); K = Math.ceil(K / 2); }
  const [ta, tb] = trans ?? [rng.uniform() < 0.5, rng.uniform() < 0.5];
  const lda = (ta ? M : K) + Math.floor(rng.uniform() * 4), ldb = (tb ? K : N) + Math.floor(rng.uniform() * 4);
  const ldc = N + Math.floor(rng.uniform() * 4);
  const alpha = [1, 0.5, -2, 0][Math.floor(rng.uniform() * (nonzeroAlpha ? 3 : 4))]!;
  const beta = [0, 1, 0.5][Math.floor(rng.uniform() * 3)]!;
  const Ah = f32(Math.max(1, (ta ? K : M) * lda), rng), Bh = f32(Math.max(1, (tb ? N : K) * ldb), rng);
  if (bf16) Bh.forEach((v, q) => { Bh[q] = bf16Value(v); });
  const Ch = f32(Math.max(1, M * ldc), rng);
  if (beta === 0) for (let q = 0; q < Ch.length; q++) if ((q % ldc) < N) Ch[q] = NaN;
  const A = native.fromHost(0, DTYPE_ID.float32, Ah), B = bf16 ? bf16Tensor(Bh) : native.fromHost(0, DTYPE_ID.float32, Bh);
  const C = native.fromHost(0, DTYPE_ID.float32, Ch);
  setNumThreads(threads);
  if (process.env.LORA_NATIVE_GEMM_TEST_TRACE) fs.writeSync(2, `#${i} M=${M} N=${N} K=${K} ta=${ta} tb=${tb} lda=${lda} ldb=${ldb} ldc=${ldc} alpha=${alpha} beta=${beta} threads=${threads}\n`);
  native.gemm(C, A, B, M, N, K, ta, tb, lda, ldb, ldc, alpha, beta, 1, 0, 0, 0);
  const got = toF32(C);
  [A, B, C].forEach((s) => native.dispose(s));
  const what = `#${i}${bf16 ? ' bf16 B' : ''} M=${M} N=${N} K=${K} ta=${ta} tb=${tb} lda=${lda} ldb=${ldb} ldc=${ldc} alpha=${alpha} beta=${beta} threads=${threads}`;
  for (let r = 0; r < M; r++) {
    for (let c = 0; c < ldc; c++) {
      const g = got[r * ldc + c]!;
      if (c >= N) {
        if (!Object.is(g, Ch[r * ldc + c]!)) return `${what}: padding (${r},${c}) changed`;
        continue;
      }
      let s = 0, mag = 0;
      if (alpha !== 0) {
        for (let k = 0; k < K; k++) {
          const p = (ta ? Ah[k * lda + r]! : Ah[r * lda + k]!) * (tb ? Bh[c * ldb + k]! : Bh[k * ldb + c]!);
          s += p;
          mag += Math.abs(p);
        }
      }
      s *= alpha;
      mag *= Math.abs(alpha);
      if (beta !== 0) { s += beta * Ch[r * ldc + c]!; mag += Math.abs(beta * Ch[r * ldc + c]!); }
      if (!(Math.abs(g - s) <= 1e-5 * mag + 1e-30)) return `${what}: C(${r},${c}) = ${g}, float64 ${s} (|terms| ${mag})`;
    }
  }
  return null;
}

// linear() with a bf16 weight against float64 over the same bf16 values: y = x·Wᵀ + b, then with
// the loss sum(y ⊙ G) the exact gradients dx = G·W and db = Σ_rows G. fp32 error bound per element:
// 1e-5·Σ|terms| + 1e-6. Shapes awkward for every kernel's tile (1, 3, 17, 129 ...).
function linearBf16Cases(rng: Rng): string[] {
  const failures: string[] = [];
  const shapes: [number[], number, number][] = [
    [[1, 1], 1, 1], [[1, 17], 17, 3], [[3, 129], 129, 17], [[17, 3], 3, 129], [[2, 5, 33], 33, 65], [[129, 40], 40, 9],
    [[8, 300], 300, 70], [[16, 64], 64, 257], [[65, 130], 130, 48],
  ];
  for (const [xShape, C, OC] of shapes) {
    const N = xShape.slice(0, -1).reduce((a, b) => a * b, 1);
    setNumThreads(1 + (rng.nextU32() % 3));
    const xh = f32(N * C, rng), Wh = f32(OC * C, rng, 0.5).map(bf16Value), bh = f32(OC, rng), Gh = f32(N * OC, rng);
    const what = `linear x ${JSON.stringify(xShape)} W [${OC}, ${C}] bf16 threads=${getNumThreads()}`;
    tidy(() => {
      const x = tensor(xh, xShape, { requiresGrad: true }), b = tensor(bh, [OC], { requiresGrad: true });
      const W = tensor(Wh, [OC, C]).toDtype('bfloat16');
      const y = linear(x, W, b);
      y.backward(tensor(Gh, [...xShape.slice(0, -1), OC]));
      const check = (name: string, got: Float32Array, ref: (i: number) => [number, number]) => {
        for (let i = 0; i < got.length; i++) {
          const [r, mag] = ref(i);
          if (!(Math.abs(got[i]! - r) <= 1e-5 * mag + 1e-6)) {
            failures.push(`${what}: ${name}[${i}] = ${got[i]}, float64 ${r}`);
            return;
          }
        }
      };
      check('y', y.toFloat32Array(), (i) => {
        const n = Math.floor(i / OC), o = i % OC;
        let s = bh[o]!, mag = Math.abs(bh[o]!);
        for (let k = 0; k < C; k++) { const p = xh[n * C + k]! * Wh[o * C + k]!; s += p; mag += Math.abs(p); }
        return [s, mag];
      });
      check('dx', x.grad!.toFloat32Array(), (i) => {
        const n = Math.floor(i / C), k = i % C;
        let s = 0, mag = 0;
        for (let o = 0; o < OC; o++) { const p = Gh[n * OC + o]! * Wh[o * C + k]!; s += p; mag += Math.abs(p); }
        return [s, mag];
      });
      check('db', b.grad!.toFloat32Array(), (o) => {
        let s = 0, mag = 0;
        for (let n = 0; n < N; n++) { s += Gh[n * OC + o]!; mag += Math.abs(Gh[n * OC + o]!); }
        return [s, mag];
      });
      for (const v of [x, b]) v.grad!.dispose();
    });
  }
  return failures;
}

// Merge into a bf16 W: W' = round(W + s·B·A) with the sum in fp32 and one rounding to nearest-even.
// The kernel's fp32 value lies within `bound` of the float64 v = W + s·B·A (R products and sums,
// each rounded once or twice: (2R + 4)·2^-24·Σ|terms|), and rounding is monotone, so W' must lie
// between round(v - bound) and round(v + bound): one step off round(v) only where v is that close
// to a tie. Rounding anything twice (s·B·A to bf16 first, say) lands outside. Returns the worst
// finding and how many elements equal round(v).
function checkMergedBf16(got: Float32Array, W: Float32Array, A: Float32Array, B: Float32Array, OC: number, C: number, R: number, s: number): { bad: string | null; exact: number } {
  let exact = 0;
  for (let o = 0; o < OC; o++) {
    for (let c = 0; c < C; c++) {
      let v = W[o * C + c]!, mag = Math.abs(v);
      for (let r = 0; r < R; r++) {
        const p = s * B[o * R + r]! * A[r * C + c]!;
        v += p;
        mag += Math.abs(p);
      }
      const bound = (2 * R + 4) * 2 ** -24 * mag;
      const lo = bf16Value(Math.fround(v - bound)), hi = bf16Value(Math.fround(v + bound)), g = got[o * C + c]!;
      if (!(g >= lo && g <= hi)) return { bad: `W'(${o},${c}) = ${g}, float64 ${v} rounds to [${lo}, ${hi}]`, exact };
      if (g === bf16Value(Math.fround(v))) exact++;
    }
  }
  return { bad: null, exact };
}

// Random merges and unmerges into bf16 weights at awkward shapes and thread counts; every tile shape
// of the level's kernel (full, row edge, column edge, both), several column blocks at large R.
function mergeBf16Cases(rng: Rng): string[] {
  const failures: string[] = [];
  const pick = <T>(xs: readonly T[]) => xs[rng.nextU32() % xs.length]!;
  const shapes: [number, number, number][] = [[1, 1, 1], [257, 520, 16], [129, 257, 300], [40, 4100, 8]];
  for (let i = 0; i < 24; i++) shapes.push([pick([1, 3, 12, 13, 17, 24, 33, 129]), pick([1, 3, 16, 17, 32, 33, 100, 129, 300]), pick([1, 3, 8, 16, 40])]);
  // Exact ties, full tiles and edges: W + 2^-8 (half a bf16 step at 1) with every sum exact, so
  // nearest-even decides: 1 -> 1, 1+2^-7 -> 1+2^-6, -(1+2^-7) -> -1 (and -1 -> -(1-2^-8), exact).
  {
    const OC = 25, C = 67, W = new Float32Array(OC * C), want = new Float32Array(OC * C);
    const cases = [[1, 1], [1 + 2 ** -7, 1 + 2 ** -6], [-(1 + 2 ** -7), -1], [-1, -(1 - 2 ** -8)]];
    for (let i = 0; i < W.length; i++) [W[i], want[i]] = cases[i % 4]!;
    const tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, new Float32Array(C).fill(1));
    const tB = native.fromHost(0, DTYPE_ID.float32, new Float32Array(OC).fill(2 ** -8));
    native.loraMerge(tW, tA, tB, OC, C, 1, 1);
    const got = bf16ToF32(tW), i = got.findIndex((g, q) => g !== want[q]);
    if (i >= 0) failures.push(`merge ties to even: W'[${i}] = ${got[i]} for W = ${W[i]} + 2^-8, want ${want[i]}`);
    [tW, tA, tB].forEach((q) => native.dispose(q));
  }
  for (const [OC, C, R] of shapes) {
    setNumThreads(1 + (rng.nextU32() % 3));
    const s = pick([1.5, -0.75, 2, 1 / 3]);
    const W = f32(OC * C, rng).map(bf16Value), A = f32(R * C, rng), B = f32(OC * R, rng);
    const tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A), tB = native.fromHost(0, DTYPE_ID.float32, B);
    const what = `merge OC=${OC} C=${C} R=${R} s=${s} threads=${getNumThreads()}`;
    native.loraMerge(tW, tA, tB, OC, C, R, s);
    const merged = bf16ToF32(tW);
    const m = checkMergedBf16(merged, W, A, B, OC, C, R, s);
    if (m.bad) failures.push(`${what}: ${m.bad}`);
    native.loraMerge(tW, tA, tB, OC, C, R, -s);
    const u = checkMergedBf16(bf16ToF32(tW), merged, A, B, OC, C, R, -s);
    if (u.bad) failures.push(`un${what}: ${u.bad}`);
    [tW, tA, tB].forEach((q) => native.dispose(q));
  }
  return failures;
}

// Decode: x·Wᵀ for M = 1..16 rows with W fp32 or bf16 at sizes past the streaming path's
// threshold for splitting W's rows over threads (64 KB) and below it, on 1 and 2 threads: y
// within 1e-5·Σ|x·w| + 1e-6 of float64 over the same weight values.
function decodeCases(rng: Rng): string[] {
  const failures: string[] = [];
  // (M = 3..8 cover each dot-form group of W rows, 4 or 3 at AVX-512, with ragged last groups)
  const shapes: [number, number, number][] = [[1, 577, 193], [2, 97, 1537], [3, 1537, 61], [4, 97, 131], [5, 200, 77], [6, 64, 100],
    [7, 577, 65], [8, 33, 40], [9, 577, 70], [16, 200, 300], [1, 31, 2050]];
  for (const [M, C, OC] of shapes)
    for (const dtype of ['float32', 'bfloat16'] as const)
      for (const threads of [1, 2]) {
        setNumThreads(threads);
        const xh = f32(M * C, rng), Wh = f32(OC * C, rng, 0.5).map((v) => (dtype === 'bfloat16' ? bf16Value(v) : v));
        const what = `decode x [${M}, ${C}] W [${OC}, ${C}] ${dtype} threads=${threads}`;
        tidy(() => {
          const y = linear(tensor(xh, [M, C]), tensor(Wh, [OC, C]).toDtype(dtype)).toFloat32Array();
          for (let i = 0; i < y.length; i++) {
            const n = Math.floor(i / OC), o = i % OC;
            let r = 0, mag = 0;
            for (let k = 0; k < C; k++) { const p = xh[n * C + k]! * Wh[o * C + k]!; r += p; mag += Math.abs(p); }
            if (!(Math.abs(y[i]! - r) <= 1e-5 * mag + 1e-6)) {
              failures.push(`${what}: y[${i}] = ${y[i]}, float64 ${r}`);
              return;
            }
          }
        });
      }
  return failures;
}

// bf16 products asked for at decode rows (linear()'s matmulPrecision 'bf16', the binding's gemm with
// bf16Dot and beta 1 as addProjected calls it): where the CPU dots bf16 (features().bf16Dot), 4..16
// rows round x to bf16 once (nearest-even) and sum in fp32: within 1e-5·Σ|x·w| of float64 over the
// rounded x, and so within the documented 2^-8·Σ|x·w| of the exact sum; 1..3 and 17 rows keep fp32
// products.
// Elsewhere (lower ISA levels, LORA_NATIVE_BF16_DOT=0) 'bf16' gives fp32's result bit for bit. K not
// a multiple of 32 and past the kernel's k blocks (768 k at 9..16 rows, 1536 at 8, 3072 at 4), odd OC,
// 1 and 2 threads (column splits).
function bf16DotDecodeCases(rng: Rng): string[] {
  const failures: string[] = [];
  const dot = features().bf16Dot;
  const shapes: [number, number, number][] = [];
  for (let M = 1; M <= 17; M++) shapes.push([M, [95, 1601, 40][M % 3]!, [33, 7, 131][M % 3]!]);
  shapes.push([4, 6500, 19], [8, 3100, 37], [16, 1601, 45], [12, 31, 70]);
  for (const [M, C, OC] of shapes)
    for (const threads of [1, 2]) {
      setNumThreads(threads);
      const xh = f32(M * C, rng), Wh = f32(OC * C, rng, 0.5).map(bf16Value), y0 = f32(M * OC, rng);
      const what = `bf16 products x [${M}, ${C}] W [${OC}, ${C}] threads=${threads} (bf16 dot ${dot ? 'on' : 'off'})`;
      tidy(() => {
        const x = tensor(xh, [M, C]), W = tensor(Wh, [OC, C]).toDtype('bfloat16');
        const yb = linear(x, W, null, { matmulPrecision: 'bf16' }).toFloat32Array();
        const yf = linear(x, W).toFloat32Array();
        // y0 + x·Wᵀ as the decode path's addInto: beta 1 through the binding
        const acc = tensor(y0, [M, OC]);
        native.gemm(acc._storage, x._storage, W._storage, M, OC, C, false, true, C, C, OC, 1, 1, 1, 0, 0, 0, true);
        const ya = acc.toFloat32Array();
        const rounds = dot && M >= 4 && M <= 16;
        for (let i = 0; i < yb.length; i++) {
          const n = Math.floor(i / OC), o = i % OC;
          let exact = 0, rounded = 0, mag = 0;
          for (let k = 0; k < C; k++) {
            const w = Wh[o * C + k]!, v = xh[n * C + k]!;
            exact += v * w;
            rounded += bf16Value(v) * w;
            mag += Math.abs(v * w);
          }
          const want = rounds ? rounded : exact;
          const bad = !(Math.abs(yb[i]! - want) <= 1e-5 * mag + 1e-6) ? `y[${i}] = ${yb[i]}, float64 ${want}`
            : !(Math.abs(yb[i]! - exact) <= 2 ** -8 * mag + 1e-6) ? `y[${i}] = ${yb[i]} past 2^-8·Σ|x·w| of ${exact}`
            : !(Math.abs(ya[i]! - y0[i]! - want) <= 1e-5 * (mag + Math.abs(y0[i]!)) + 1e-6) ? `beta 1: y[${i}] = ${ya[i]}, float64 ${y0[i]! + want}`
            : undefined;
          if (bad) {
            failures.push(`${what}: ${bad}`);
            return;
          }
        }
        // the option reaches the kernel: rounding x moves y where the dot product runs, nothing elsewhere
        const same = yb.every((v, i) => v === yf[i]);
        if (rounds === same) failures.push(`${what}: bf16 ${same ? 'equals' : 'differs from'} fp32`);
      });
    }
  return failures;
}

// A long sum into few outputs (k at least 16 times M and N and four k blocks, as the LM head's dx =
// dlogits·W) splits k across the threads: each sums its part of k apart and the parts are added
// into C. Every transpose, nonzero alpha (alpha 0 does not split), every beta, fp32 and bf16 B, 2
// and 3 threads (3 split 4500 into 1536-k parts: ragged), within fp32's bound of float64. Rows
// past 16 and columns past 32, so that no shape takes the few-rows paths instead (a 13-row Aᵀ
// went to reduce_k, 17 columns to the streaming path). (Under small cache blocks the random GEMMs
// above split k too. With bf16 products C is split as before: gemmSharedA's outputs are gemm's bit
// for bit.)
function splitKCases(rng: Rng): string[] {
  const failures: string[] = [];
  const shapes: [number, number, number][] = [[40, 36, 5000], [24, 70, 4500], [33, 48, 4097], [20, 40, 9000]];
  shapes.forEach((dims, q) => {
    for (const bf16 of [false, true]) {
      const f = randomGemm(rng, 40_000 + 2 * q + Number(bf16), 2 + (q % 2), bf16, dims, [q % 2 === 1, q >= 2], true);
      if (f) failures.push(`split k: ${f}`);
    }
  });
  return failures;
}

// gemmSharedA (the projections of one input in one call, A packed once per thread): two and three
// products with column counts that are and are not multiples of the tile width, K past the
// 1024-deep k block, K = 1 and 0, fp32 and bf16 weights, 1-3 threads; each out_i within
// 1e-5·Σ|a·w| + 1e-6 of float64 over the same values (K = 0: zeros over the NaN it held).
// bf16 weights with bf16Dot (matmulPrecision 'bf16'): where the CPU runs the pair dot for every
// product (M >= 64, every N_i > 32), each out_i bit for bit what gemm with bf16Dot makes of that
// product alone, not the fp32 products (the dot ran), and within 2^-8·Σ|a·w| + 1e-6 of float64;
// elsewhere (other levels, fewer rows, a narrow product) fp32 products, within fp32's bound.
// Decode rows (M <= 16) stream each weight as gemm does alone: bit for bit gemm's outputs with the
// same bf16Dot (the bf16 dot from 4 rows where the CPU has it), split across threads end to end.
// The LoRA backward's dB += s·dyᵀ·h, computed from the dx GEMM's packed blocks of dy (the side
// product D of gemm_ex) where that GEMM runs the blocked path with rank 9-16, else as its own
// product: dB against float64 (within 1e-5·Σ|terms|, from a nonzero start), and dx bit for bit the
// same as without dB. Rows past 16 (the fused path's), ranks 1-24 (whole, partial and more than the
// 16 columns a panel serves), several k blocks (OC), 1-3 threads (row and column splits), dropout,
// and a bf16 W (the bf16 dot: dB apart).
function loraDbCases(rng: Rng): string[] {
  const failures: string[] = [];
  const pick = <T,>(xs: T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
  // First two fixed: 30 rows on 3 threads split dx's 64 columns, the third thread gets none, and
  // under small blocks (LORA_NATIVE_GEMM_BLOCKS) the rows make three blocks: the two busy threads
  // must cover all three.
  const fixed: [number, number, number, number, number][] = [[30, 64, 70, 16, 3], [30, 64, 300, 13, 3]];
  for (let q = 0; q < 24; q++) {
    const [N, C, OC, R, threads] = fixed[q] ?? [pick([17, 40, 97, 150, 300]), pick([20, 48, 100, 257, 600]), pick([20, 70, 300, 700]),
      pick([1, 3, 8, 13, 16, 24]), 1 + (rng.nextU32() % 3)];
    const p = pick([0, 0, 0.3]), s = pick([0.5, 2]);
    const bf16 = q % 3 === 2;
    setNumThreads(threads);
    const xh = f32(N * C, rng), Wh = f32(OC * C, rng, 0.3), Ah = f32(R * C, rng, 0.3), Bh = f32(OC * R, rng, 0.3);
    const hh = f32(N * R, rng), dyh = f32(N * OC, rng), dB0 = f32(OC * R, rng);
    const up = (a: Float32Array) => native.fromHost(0, DTYPE_ID.float32, a);
    const x = up(xh), W = bf16 ? bf16Tensor(Wh) : up(Wh), A = up(Ah), B = up(Bh), h = up(hh), dy = up(dyh);
    const dx1 = native.alloc(0, DTYPE_ID.float32, N * C), dx2 = native.alloc(0, DTYPE_ID.float32, N * C);
    const dA1 = up(new Float32Array(R * C)), dA2 = up(new Float32Array(R * C)), dB = up(dB0);
    const withDx = q % 4 !== 3;  // (every fourth without dx: dB as a product of its own)
    native.loraBackward(withDx ? dx1 : null, dA1, dB, dy, x, h, W, A, B, N, C, OC, R, s, p, 7 + q);
    native.loraBackward(dx2, dA2, null, dy, x, h, W, A, B, N, C, OC, R, s, p, 7 + q);
    const what = `dB case ${q}: N=${N} C=${C} OC=${OC} R=${R} s=${s} p=${p} threads=${threads}${bf16 ? ' bf16 W' : ''}${withDx ? '' : ' no dx'}`;
    const got = toF32(dB), d1 = toF32(dx1), d2 = toF32(dx2);
    if (withDx && d1.some((v, i) => !Object.is(v, d2[i]))) failures.push(`${what}: dx differs with dB asked for`);
    for (let i = 0; i < OC * R && failures.length < 10; i++) {
      const o = Math.floor(i / R), r = i % R;
      let ref = 0, mag = 0;
      for (let n = 0; n < N; n++) { const t = s * dyh[n * OC + o]! * hh[n * R + r]!; ref += t; mag += Math.abs(t); }
      if (!(Math.abs(got[i]! - dB0[i]! - ref) <= 1e-5 * (mag + Math.abs(dB0[i]!)) + 1e-6)) {
        failures.push(`${what}: dB[${o}][${r}] = ${got[i]! - dB0[i]!} more than it was, float64 ${ref}`);
        break;
      }
    }
    for (const t of [x, W, A, B, h, dy, dx1, dx2, dA1, dA2, dB]) native.dispose(t);
  }
  return failures;
}

function sharedACases(rng: Rng): string[] {
  const failures: string[] = [];
  const shapes: [number, number, number[]][] = [[33, 577, [200, 61, 61]], [130, 40, [17, 300]], [64, 1100, [96, 33, 1]], [45, 1, [5, 70]],
    [200, 150, [576, 192, 192]], [7, 20, [40, 8]], [40, 0, [3, 5, 7]], [77, 2051, [65, 33, 100]], [97, 333, [40, 97]], [131, 57, [35, 129, 64]],
    [1, 576, [576, 192, 192]], [4, 300, [40, 97, 33]], [16, 130, [1536, 1536]], [9, 64, [17, 5]], [2, 1100, [70, 300, 3]]];
  const dotCpu = features().bf16Dot;
  for (const [M, K, Ns] of shapes)
    for (const dtype of ['float32', 'bfloat16', 'bf16dot'] as const)
      for (const threads of [1, 2, 3]) {
        setNumThreads(threads);
        const dot = dtype === 'bf16dot', bf16 = dtype !== 'float32';
        const ah = f32(M * K, rng);
        const whs = Ns.map((N) => f32(N * K, rng, 0.5).map((v) => (bf16 ? bf16Value(v) : v)));
        const a = native.fromHost(0, DTYPE_ID.float32, ah);
        const ws = whs.map((wh) => (bf16 ? bf16Tensor(wh) : native.fromHost(0, DTYPE_ID.float32, wh)));
        const outs = Ns.map((N) => native.fromHost(0, DTYPE_ID.float32, new Float32Array(M * N).fill(NaN)));
        const third = Ns.length === 3;
        native.gemmSharedA(a, M, K, outs[0]!, ws[0]!, Ns[0]!, outs[1]!, ws[1]!, Ns[1]!, third ? outs[2]! : null, third ? ws[2]! : null, third ? Ns[2]! : 0, dot);
        const what = `gemmSharedA a [${M}, ${K}] N ${Ns.join('+')} ${dtype} threads=${threads}`;
        // the products apart: gemm with bf16Dot (dot) and with fp32 products
        const apart = (q: number, withDot: boolean) => {
          const c = native.fromHost(0, DTYPE_ID.float32, new Float32Array(M * Ns[q]!).fill(NaN));
          native.gemm(c, a, ws[q]!, M, Ns[q]!, K, false, true, K, K, Ns[q]!, 1, 0, 1, 0, 0, 0, withDot);
          const y = toF32(c);
          native.dispose(c);
          return y;
        };
        const streaming = M <= 16 && K > 0;
        const dotRuns = dot && dotCpu && (M >= 64 ? Ns.every((N) => N > 32) : M >= 4 && M <= 16);
        let differsFromFp32 = false;
        Ns.forEach((N, q) => {
          const y = toF32(outs[q]!), wh = whs[q]!;
          if (dotRuns || streaming) {
            const sep = apart(q, dot);
            const i = y.findIndex((v, j) => !Object.is(v, sep[j]));
            if (i >= 0) failures.push(`${what}: out${q}[${i}] = ${y[i]} but gemm${dot ? ' with bf16Dot' : ''} gives ${sep[i]}`);
          }
          if (dotRuns) {
            const fp = apart(q, false);
            if (y.some((v, j) => v !== fp[j])) differsFromFp32 = true;
          }
          for (let i = 0; i < M * N; i++) {
            const n = Math.floor(i / N), o = i % N;
            let r = 0, mag = 0;
            for (let k = 0; k < K; k++) { const p = ah[n * K + k]! * wh[o * K + k]!; r += p; mag += Math.abs(p); }
            if (!(Math.abs(y[i]! - r) <= (dotRuns ? 2 ** -8 : 1e-5) * mag + 1e-6)) {
              failures.push(`${what}: out${q}[${i}] = ${y[i]}, float64 ${r}`);
              return;
            }
          }
        });
        if (dotRuns && K > 1 && !differsFromFp32) failures.push(`${what}: the same as fp32 products on a CPU with the bf16 dot`);
        for (const s of [a, ...ws, ...outs]) native.dispose(s);
      }
  return failures;
}

if (CHILD) {
  // One ISA level: the random sweep, then exit status says whether every case passed.
  const rng = new Rng(Number(process.env.LORA_NATIVE_GEMM_TEST_SEED ?? 1));
  const n = Number(process.env.LORA_NATIVE_GEMM_TEST_CASES ?? 300);
  const before = getNumThreads();
  const failures: string[] = [];
  // A random thread count per case: the pool is resized up and down between jobs as well.
  for (let i = 0; i < n; i++) {
    const f = randomGemm(rng, i, 1 + (rng.nextU32() % 3));
    if (f) failures.push(f);
  }
  // then as many with a bf16 B, and linear() over a bf16 weight
  for (let i = 0; i < n; i++) {
    const f = randomGemm(rng, i, 1 + (rng.nextU32() % 3), true);
    if (f) failures.push(f);
  }
  // Row splits of the packed path (enough rows per thread, fewer columns than twice the rows,
  // above the threading threshold) on 2 and 3 threads, fp32 and bf16 B (the pair-dot packing from
  // 64 rows); with small blocks (the second child below), several column and k blocks per thread.
  const shared: [number, number, number][] = [[150, 97, 130], [131, 200, 70], [97, 33, 301], [200, 150, 61], [256, 100, 40]];
  shared.forEach((dims, q) => {
    for (const threads of [2, 3]) {
      for (const bf16 of [false, true]) {
        const f = randomGemm(rng, 10_000 + q, threads, bf16, dims);
        if (f) failures.push(f);
      }
    }
  });
  // op(A) = Aᵀ of at most 16 rows against an fp32 B stored (K, N) (the LoRA backward's dA and dBᵀ:
  // reduce_k, B read in place in blocks of rows): every row count of its register tiles, columns
  // around its strips (48, 24 or 12 wide) and vectors, K across its blocks of rows (16 to 512
  // rows, fewer the wider B is), 1-3 threads splitting the columns.
  for (let q = 0; q < 48; q++) {
    const pick = <T,>(xs: T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
    const dims: [number, number, number] = [1 + (q % 16), pick([1, 5, 16, 47, 48, 49, 97, 200, 1100]), pick([1, 17, 300, 700, 1500])];
    const f = randomGemm(rng, 20_000 + q, 1 + (rng.nextU32() % 3), false, dims, [true, false]);
    if (f) failures.push(f);
  }
  // A bf16 B stored (N, K) against 1-8 rows (the dot form: its first K - K % (2·lanes) columns read
  // as pairs of bf16, x repacked as even then odd elements, then a whole vector, then scalars): K
  // around one and two vectors of every level's lanes, the groups of rows of B and their remainder.
  for (let q = 0; q < 40; q++) {
    const pick = <T,>(xs: T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
    const dims: [number, number, number] = [1 + (q % 8), pick([1, 3, 4, 5, 7, 13, 50]), pick([15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 95, 593])];
    const f = randomGemm(rng, 30_000 + q, 1 + (rng.nextU32() % 2), true, dims, [false, true]);
    if (f) failures.push(f);
  }
  failures.push(...linearBf16Cases(rng), ...mergeBf16Cases(rng), ...decodeCases(rng), ...bf16DotDecodeCases(rng), ...sharedACases(rng),
    ...loraDbCases(rng), ...splitKCases(rng));
  setNumThreads(before);
  // straight to fd 1: tap owns process.stdout in this file
  fs.writeSync(1, JSON.stringify({ isa: features().isa, cases: 2 * n, failures: failures.slice(0, 10), failed: failures.length }) + '\n');
  process.exit(failures.length ? 1 : 0);
} else {
  t.test('random GEMMs against float64 at every ISA level', (t) => {
    for (const level of LEVELS) {
      const r = spawnSync(process.execPath, [...process.execArgv, __filename], {
        env: { ...process.env, LORA_NATIVE_ISA: level, LORA_NATIVE_GEMM_TEST_CHILD: '1', LORA_NATIVE_GEMM_TEST_SEED: String(LEVELS.indexOf(level) + 1) },
        encoding: 'utf8',
        timeout: 120_000,
      });
      const line = (r.stdout ?? '').trim().split('\n').filter((l) => l.startsWith('{')).pop();
      const res = line ? JSON.parse(line) : null;
      t.ok(res, `${level}: child reported (${(r.stderr ?? '').slice(-300)})`);
      if (!res) continue;
      // the level actually used is never above the one asked for, and a supported level is honoured
      t.ok(LEVELS.indexOf(res.isa) >= LEVELS.indexOf(level), `${level}: ran at ${res.isa}`);
      t.equal(res.failed, 0, `${level} (${res.isa}): ${res.cases} random GEMMs (half with a bf16 B) and linear() with a bf16 weight within 1e-5·Σ|a·b|, bf16 merges and unmerges rounded once, gemmSharedA${res.failed ? ': ' + res.failures.join(' | ') : ''}`);
      t.equal(r.status, 0, `${level}: child exit status`);
    }
    t.end();
  });

  // the best level with the bf16 dot product turned off: matmulPrecision 'bf16' then changes nothing
  t.test('random GEMMs against float64 with LORA_NATIVE_BF16_DOT=0', (t) => {
    const r = spawnSync(process.execPath, [...process.execArgv, __filename], {
      env: { ...process.env, LORA_NATIVE_BF16_DOT: '0', LORA_NATIVE_GEMM_TEST_CHILD: '1', LORA_NATIVE_GEMM_TEST_SEED: '7', LORA_NATIVE_GEMM_TEST_CASES: '30' },
      encoding: 'utf8',
      timeout: 120_000,
    });
    const line = (r.stdout ?? '').trim().split('\n').filter((l) => l.startsWith('{')).pop();
    const res = line ? JSON.parse(line) : null;
    t.ok(res, `child reported (${(r.stderr ?? '').slice(-300)})`);
    if (res) t.equal(res.failed, 0, `${res.isa} without the bf16 dot: ${res.cases} random GEMMs, bf16 products as fp32's${res.failed ? ': ' + res.failures.join(' | ') : ''}`);
    t.equal(r.status, 0, 'child exit status');
    t.end();
  });

  // The engine's blocks come from this CPU's caches (kc ~1024, mc ~144 here), so the shapes above
  // stay within one block; blocks of a few dozen (LORA_NATIVE_GEMM_BLOCKS) put every block edge
  // (k blocks accumulating, the epilogue and side product across k blocks, column and row blocks)
  // inside them, on the best level the CPU runs.
  t.test('random GEMMs against float64 with small cache blocks', (t) => {
    for (const blocks of ['24,24,48', '17,5,33']) {
      const r = spawnSync(process.execPath, [...process.execArgv, __filename], {
        env: { ...process.env, LORA_NATIVE_GEMM_BLOCKS: blocks, LORA_NATIVE_GEMM_TEST_CHILD: '1', LORA_NATIVE_GEMM_TEST_SEED: '11', LORA_NATIVE_GEMM_TEST_CASES: '150' },
        encoding: 'utf8',
        timeout: 120_000,
      });
      const line = (r.stdout ?? '').trim().split('\n').filter((l) => l.startsWith('{')).pop();
      const res = line ? JSON.parse(line) : null;
      t.ok(res, `blocks ${blocks}: child reported (${(r.stderr ?? '').slice(-300)})`);
      if (!res) continue;
      t.equal(res.failed, 0, `blocks ${blocks} (${res.isa}): ${res.cases} random GEMMs within 1e-5·Σ|a·b|${res.failed ? ': ' + res.failures.join(' | ') : ''}`);
      t.equal(r.status, 0, `blocks ${blocks}: child exit status`);
    }
    t.end();
  });

  t.test('gemmSharedA: the CPU backend has it; weights of two dtypes or too small an output are refused', (t) => {
    t.ok(native.supports(0, OP.gemmSharedA, DTYPE_ID.float32), 'supports(cpu, gemmSharedA, float32)');
    const a = native.fromHost(0, DTYPE_ID.float32, new Float32Array(6));
    const w32 = native.fromHost(0, DTYPE_ID.float32, new Float32Array(6)), w16 = bf16Tensor(new Float32Array(6));
    const o1 = native.alloc(0, DTYPE_ID.float32, 4), o2 = native.alloc(0, DTYPE_ID.float32, 4), small = native.alloc(0, DTYPE_ID.float32, 3);
    assertLoraError(t, () => native.gemmSharedA(a, 2, 3, o1, w32, 2, o2, w16, 2, null, null, 0), LoraError, 'ERR_LORA_DTYPE', /^Expected the weights of gemmSharedA of one dtype but w0 is float32 and w1 bfloat16$/, 'mixed dtypes');
    assertLoraError(t, () => native.gemmSharedA(a, 2, 3, o1, w32, 2, small, w32, 2, null, null, 0), LoraError, 'ERR_LORA_SHAPE', /^out1 holds 3 elements but the op needs 4$/, 'output too small');
    for (const s of [a, w32, w16, o1, o2, small]) native.dispose(s);
    t.end();
  });

  t.test('edge sizes: empty dims and K = 0 (C = beta·C)', (t) => {
    const C = native.fromHost(0, DTYPE_ID.float32, new Float32Array([1, 2, 3, 4]));
    const A = native.fromHost(0, DTYPE_ID.float32, new Float32Array(6).fill(NaN));
    native.gemm(C, A, A, 2, 2, 0, false, false, 1, 2, 2, 1, 0.5, 1, 0, 0, 0);
    t.same(Array.from(toF32(C)), [0.5, 1, 1.5, 2], 'K = 0 scales C by beta and reads neither A nor B');
    native.gemm(C, A, A, 2, 2, 3, false, false, 3, 2, 2, 0, 1, 1, 0, 0, 0);
    t.same(Array.from(toF32(C)), [0.5, 1, 1.5, 2], 'alpha = 0 reads neither A nor B (they hold NaN)');
    native.gemm(C, A, A, 0, 2, 3, false, false, 3, 2, 2, 1, 0, 1, 0, 0, 0);
    native.gemm(C, A, A, 2, 0, 3, false, false, 3, 1, 2, 1, 0, 1, 0, 0, 0);
    t.same(Array.from(toF32(C)), [0.5, 1, 1.5, 2], 'M = 0 and N = 0 leave C alone');
    [A, C].forEach((s) => native.dispose(s));
    t.end();
  });

  // bf16 frozen base: W is stored as bf16 (exact values), x stays fp32. Where the CPU has
  // avx512_bf16 the dot product also rounds x (and dy) to bf16 (8 significant bits), so each
  // product carries a relative error <= 2^-8; elsewhere W is widened exactly and the error is
  // fp32's. Stated tolerance, against float64 with the bf16 W values: |y - ref| <= 2^-8·Σ|x·w| +
  // 1e-4·Σ|lora terms| + 1e-6.
  t.test('bf16 base: forward and backward within 2^-8·Σ|x·w| of float64', (t) => {
    const before = getNumThreads();
    for (const [N, C, OC, R, threads] of [[1, 64, 48, 4, 1], [7, 33, 70, 3, 2], [40, 96, 130, 8, 1], [64, 257, 96, 16, 2], [9, 300, 5, 2, 2]] as const) {
      setNumThreads(threads);
      const rng = new Rng(N * 7 + C);
      const x = f32(N * C, rng), W = f32(OC * C, rng, 0.5), A = f32(R * C, rng, 0.5), B = f32(OC * R, rng, 0.5), b = f32(OC, rng);
      const Wb = W.map(bf16Value);
      const s = 0.75;
      const tx = native.fromHost(0, DTYPE_ID.float32, x), tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A);
      const tB = native.fromHost(0, DTYPE_ID.float32, B), tb = native.fromHost(0, DTYPE_ID.float32, b);
      const ty = native.alloc(0, DTYPE_ID.float32, N * OC), th = native.alloc(0, DTYPE_ID.float32, N * R);
      native.loraForward(ty, th, tx, tW, tb, tA, tB, N, C, OC, R, s, 0, 0);
      const y = toF32(ty);
      let worst = 0;
      for (let i = 0; i < N; i++) {
        const h = new Float64Array(R);
        for (let r = 0; r < R; r++) for (let k = 0; k < C; k++) h[r] += x[i * C + k]! * A[r * C + k]!;
        for (let o = 0; o < OC; o++) {
          let base = 0, mag = 0, lora = 0, lmag = 0;
          for (let k = 0; k < C; k++) { const p = x[i * C + k]! * Wb[o * C + k]!; base += p; mag += Math.abs(p); }
          for (let r = 0; r < R; r++) { const p = s * h[r]! * B[o * R + r]!; lora += p; lmag += Math.abs(p); }
          const ref = base + lora + b[o]!;
          const err = Math.abs(y[i * OC + o]! - ref) / (2 ** -8 * mag + 1e-4 * lmag + 1e-6);
          if (!(err <= worst)) worst = Number.isNaN(err) ? Infinity : err;
        }
      }
      t.ok(worst <= 1, `forward N=${N} C=${C} OC=${OC} R=${R} threads=${threads} (${features().isa}): worst error ${worst.toFixed(3)} of the bound`);
      // dx = dy·W + s·(dy·B)·A against float64 with the bf16 W
      const dy = f32(N * OC, rng);
      const tdy = native.fromHost(0, DTYPE_ID.float32, dy), tdx = native.alloc(0, DTYPE_ID.float32, N * C);
      native.loraBackward(tdx, null, null, tdy, tx, th, tW, tA, tB, N, C, OC, R, s, 0, 0);
      const dx = toF32(tdx);
      let worstDx = 0;
      for (let i = 0; i < N; i++) {
        const dh = new Float64Array(R);
        for (let r = 0; r < R; r++) for (let o = 0; o < OC; o++) dh[r] += s * dy[i * OC + o]! * B[o * R + r]!;
        for (let k = 0; k < C; k++) {
          let base = 0, mag = 0, lora = 0, lmag = 0;
          for (let o = 0; o < OC; o++) { const p = dy[i * OC + o]! * Wb[o * C + k]!; base += p; mag += Math.abs(p); }
          for (let r = 0; r < R; r++) { const p = dh[r]! * A[r * C + k]!; lora += p; lmag += Math.abs(p); }
          const err = Math.abs(dx[i * C + k]! - base - lora) / (2 ** -8 * mag + 1e-4 * lmag + 1e-6);
          if (!(err <= worstDx)) worstDx = Number.isNaN(err) ? Infinity : err;
        }
      }
      t.ok(worstDx <= 1, `backward dx N=${N} C=${C} OC=${OC} R=${R}: worst error ${worstDx.toFixed(3)} of the bound`);
      [tx, tW, tA, tB, tb, ty, th, tdy, tdx].forEach((q) => native.dispose(q));
    }
    setNumThreads(before);
    t.end();
  });

  // Under the bf16 dot only the frozen product x·Wᵀ (dy·W) rounds its input: the adapter's side
  // products h = x̃·Aᵀ and dh = s·dy·B ride in the same pass over x (dy) from an fp32 packing, so h
  // and dA = dhᵀ·x̃ stay within fp32's bound (x rounded to bf16 would miss it by ~2^-9 / 1e-5).
  // Shapes past 64 rows (the bf16 dot), a column split on 2 threads, several k blocks, dropout.
  t.test('bf16 base: h and dA keep fp32 inputs (within 1e-5·Σ|terms| of float64)', (t) => {
    const before = getNumThreads();
    for (const [N, C, OC, R, threads, p] of [[64, 100, 300, 8, 2, 0], [150, 200, 70, 8, 1, 0.25], [70, 1100, 40, 4, 1, 0], [96, 520, 64, 16, 2, 0.5]] as const) {
      setNumThreads(threads);
      const rng = new Rng(N + C * 3);
      const x = f32(N * C, rng), W = f32(OC * C, rng, 0.5), A = f32(R * C, rng, 0.5), B = f32(OC * R, rng, 0.5), dy = f32(N * OC, rng);
      const s = 0.75, seed = 11;
      const tx = native.fromHost(0, DTYPE_ID.float32, x), tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A);
      const tB = native.fromHost(0, DTYPE_ID.float32, B), tdy = native.fromHost(0, DTYPE_ID.float32, dy);
      const ty = native.alloc(0, DTYPE_ID.float32, N * OC), th = native.alloc(0, DTYPE_ID.float32, N * R);
      const tdx = native.alloc(0, DTYPE_ID.float32, N * C), tdA = native.alloc(0, DTYPE_ID.float32, R * C);
      native.fill(tdA, 0);
      native.loraForward(ty, th, tx, tW, null, tA, tB, N, C, OC, R, s, p, seed);
      native.loraBackward(tdx, tdA, null, tdy, tx, th, tW, tA, tB, N, C, OC, R, s, p, seed);
      const xd = dropoutRef(Float64Array.from(x), p, seed);
      const h = toF32(th), dA = toF32(tdA);
      let worstH = 0, worstA = 0;
      const dh = new Float64Array(N * R), dhMag = new Float64Array(N * R);
      for (let i = 0; i < N; i++)
        for (let r = 0; r < R; r++) {
          let ref = 0, mag = 0;
          for (let k = 0; k < C; k++) { const q = xd[i * C + k]! * A[r * C + k]!; ref += q; mag += Math.abs(q); }
          const err = Math.abs(h[i * R + r]! - ref) / (1e-5 * mag + 1e-30);
          if (!(err <= worstH)) worstH = Number.isNaN(err) ? Infinity : err;
          for (let o = 0; o < OC; o++) { const q = s * dy[i * OC + o]! * B[o * R + r]!; dh[i * R + r] += q; dhMag[i * R + r] += Math.abs(q); }
        }
      for (let r = 0; r < R; r++)
        for (let k = 0; k < C; k++) {
          let ref = 0, mag = 0;
          for (let i = 0; i < N; i++) { ref += dh[i * R + r]! * xd[i * C + k]!; mag += dhMag[i * R + r]! * Math.abs(xd[i * C + k]!); }
          const err = Math.abs(dA[r * C + k]! - ref) / (1e-5 * mag + 1e-30);
          if (!(err <= worstA)) worstA = Number.isNaN(err) ? Infinity : err;
        }
      const what = `N=${N} C=${C} OC=${OC} R=${R} threads=${threads} p=${p} (${features().isa}${features().bf16Dot ? ', bf16 dot' : ''})`;
      t.ok(worstH <= 1, `h ${what}: worst error ${worstH.toFixed(3)} of the bound`);
      t.ok(worstA <= 1, `dA ${what}: worst error ${worstA.toFixed(3)} of the bound`);
      [tx, tW, tA, tB, tdy, ty, th, tdx, tdA].forEach((q) => native.dispose(q));
    }
    setNumThreads(before);
    t.end();
  });

  // Merge into bf16 on the default level, through the binding and through LoraLinear: rounded once
  // (checkMergedBf16), unmerge the same way from the merged values; special values of W.
  t.test('bf16 base: merge and unmerge round once (between round(v ∓ fp32 error) of float64 v)', (t) => {
    const before = getNumThreads();
    for (const [OC, C, R, s, threads] of [[70, 45, 6, 1.5, 1], [129, 300, 16, -0.5, 2], [13, 17, 3, 2, 2], [1, 129, 1, 0.25, 1]] as const) {
      setNumThreads(threads);
      const rng = new Rng(OC + C);
      const W = f32(OC * C, rng).map(bf16Value), A = f32(R * C, rng), B = f32(OC * R, rng);
      const tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A), tB = native.fromHost(0, DTYPE_ID.float32, B);
      native.loraMerge(tW, tA, tB, OC, C, R, s);
      const merged = bf16ToF32(tW);
      const m = checkMergedBf16(merged, W, A, B, OC, C, R, s);
      t.equal(m.bad, null, `merge OC=${OC} C=${C} R=${R} threads=${threads}: rounded once (${m.exact} of ${OC * C} equal to round(v))`);
      native.loraMerge(tW, tA, tB, OC, C, R, -s);
      const u = checkMergedBf16(bf16ToF32(tW), merged, A, B, OC, C, R, -s);
      t.equal(u.bad, null, `unmerge: rounded once (${u.exact} of ${OC * C} equal to round(v))`);
      [tW, tA, tB].forEach((q) => native.dispose(q));
    }
    setNumThreads(before);

    // NaN stays NaN, ±inf stays, the largest bf16 overflows to inf by rounding, and s = 0 touches
    // nothing (not even with NaN in A); the rest of the row is rounded as usual.
    const C = 40, R = 2;
    const W = f32(2 * C, new Rng(9)).map(bf16Value);
    W[0] = NaN; W[1] = Infinity; W[2] = -Infinity; W[3] = 3.3895313892515355e38; W[41] = -3.3895313892515355e38;
    // row 0 gets s·B·A = 1e36 (above half a bf16 step of the largest bf16, 6.6e35), row 1 gets 1e38
    const A = new Float32Array(R * C).fill(0.5), B = new Float32Array([1e36, 1e36, 1e38, 1e38]);
    const tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A), tB = native.fromHost(0, DTYPE_ID.float32, B);
    const tNaN = native.fromHost(0, DTYPE_ID.float32, new Float32Array(R * C).fill(NaN));
    const bits = () => Array.from(new Uint16Array(native.toHost(tW)));
    const start = bits();
    native.loraMerge(tW, tNaN, tB, 2, C, R, 0);
    t.same(bits(), start, 's = 0 leaves every bit of W as it was (A is NaN and not read)');
    native.loraMerge(tW, tA, tB, 2, C, R, 1);
    const got = bf16ToF32(tW);
    t.ok(Number.isNaN(got[0]), 'NaN stays NaN');
    t.same([got[1], got[2], got[3]], [Infinity, -Infinity, Infinity], '+inf and -inf stay; the largest bf16 + 1e36 (finite in fp32) rounds to +inf');
    t.ok(Math.abs(got[41]! - (-3.3895313892515355e38 + 1e38)) < 1.33e36, `the most negative bf16 + 1e38 is ${got[41]}, within a bf16 step of float64`);
    [tW, tA, tB, tNaN].forEach((q) => native.dispose(q));
    t.end();
  });

  void leakChecked(t, 'LoraLinear with a bf16 weight: merge() and unmerge() round once; the merged forward is linear()', (t) => {
    const rng = new Rng(21);
    const C = 33, OC = 17, R = 4, N = 3;
    const Wh = f32(OC * C, rng).map(bf16Value), Bh = f32(OC * R, rng), xh = f32(N * C, rng);
    tidy(() => {
      const layer = new LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, alpha: 6, weight: tensor(Wh, [OC, C]).toDtype('bfloat16'), bias: false, seed: 2 });
      native.copyInto(layer.loraB._storage, tensor(Bh, [OC, R])._storage);  // a trained adapter
      const A = layer.loraA.toFloat32Array(), x = tensor(xh, [N, C]);
      const unmergedY = layer.forward(x).toFloat32Array();
      layer.merge();
      const merged = layer.weight.toFloat32Array();
      const m = checkMergedBf16(merged, Wh, A, Bh, OC, C, R, layer.scaling);
      t.equal(m.bad, null, `merge() rounded once (${m.exact} of ${OC * C} equal to round(v))`);
      t.same(Array.from(layer.forward(x).toFloat32Array()), Array.from(linear(x, layer.weight).toFloat32Array()), 'merged forward is linear() over the merged bf16 weight');
      assertClose(t, layer.forward(x).toFloat32Array(), unmergedY, { atol: 2e-2, rtol: 2e-2 }, 'merged forward within bf16 rounding of the unmerged one');
      layer.unmerge();
      const u = checkMergedBf16(layer.weight.toFloat32Array(), merged, A, Bh, OC, C, R, -layer.scaling);
      t.equal(u.bad, null, `unmerge() rounded once (${u.exact} of ${OC * C} equal to round(v))`);
      layer.dispose();
    });
  });

  // linear() over a bf16 weight on the default level, with the reporting of assertClose: forward,
  // dx and dbias against float64 over the bf16 values, and no fp32 copy of W made on the way. A
  // bf16 weight forced to requiresGrad keeps getting an fp32 gradient Gᵀ·x (as before the bf16 GEMM).
  void leakChecked(t, 'linear() with a bf16 weight: read as stored, forward and gradients against float64', (t) => {
    const rng = new Rng(11);
    const convert = native.convert;
    let converts = 0;
    native.convert = (dst, src) => { converts++; convert(dst, src); };
    try {
      for (const [N, C, OC] of [[1, 129, 17], [3, 17, 129], [17, 3, 1], [129, 65, 33]] as const) {
        tidy(() => {
          const xh = f32(N * C, rng), Wh = f32(OC * C, rng, 0.5).map(bf16Value), bh = f32(OC, rng), Gh = f32(N * OC, rng);
          const W = tensor(Wh, [OC, C]).toDtype('bfloat16');
          W.requiresGrad = true;
          const x = tensor(xh, [N, C], { requiresGrad: true }), b = tensor(bh, [OC], { requiresGrad: true });
          converts = 0;
          const y = linear(x, W, b);
          y.backward(tensor(Gh, [N, OC]));
          t.equal(converts, 0, `[${N}, ${C}] x [${OC}, ${C}]: no dtype conversion in forward or backward`);
          const yRef = new Float64Array(N * OC), dxRef = new Float64Array(N * C), dWRef = new Float64Array(OC * C), dbRef = new Float64Array(OC);
          for (let n = 0; n < N; n++)
            for (let o = 0; o < OC; o++) {
              let acc = bh[o]!;
              for (let k = 0; k < C; k++) {
                acc += xh[n * C + k]! * Wh[o * C + k]!;
                dxRef[n * C + k] += Gh[n * OC + o]! * Wh[o * C + k]!;
                dWRef[o * C + k] += Gh[n * OC + o]! * xh[n * C + k]!;
              }
              yRef[n * OC + o] = acc;
              dbRef[o] += Gh[n * OC + o]!;
            }
          const tol = { atol: 1e-5, rtol: 1e-5 };
          assertClose(t, y.toFloat32Array(), yRef, tol, `[${N}, ${C}] x [${OC}, ${C}] forward`);
          assertClose(t, x.grad!.toFloat32Array(), dxRef, tol, `[${N}, ${C}] x [${OC}, ${C}] dx`);
          assertClose(t, b.grad!.toFloat32Array(), dbRef, tol, `[${N}, ${C}] x [${OC}, ${C}] dbias`);
          t.equal(W.grad!.dtype, 'float32', 'a bf16 weight forced to requiresGrad gets an fp32 gradient');
          assertClose(t, W.grad!.toFloat32Array(), dWRef, tol, `[${N}, ${C}] x [${OC}, ${C}] dW`);
          for (const v of [x, b, W]) v.grad!.dispose();
        });
      }
    } finally {
      native.convert = convert;
    }
  });

  void leakChecked(t, 'gemm with a bf16 b and linear(): bad input', (t) => {
    const a = native.fromHost(0, DTYPE_ID.float32, new Float32Array(6)), c = native.alloc(0, DTYPE_ID.float32, 4);
    const h = native.alloc(0, DTYPE_ID.float16, 6), small = bf16Tensor(new Float32Array(5));
    try {
      assertLoraError(t, () => native.gemm(c, a, h, 2, 2, 3, false, true, 3, 3, 2, 1, 0, 1, 0, 0, 0), LoraError, 'ERR_LORA_DTYPE', /^Expected b as float32 or bfloat16 but received float16$/, 'float16 b');
      assertLoraError(t, () => native.gemm(c, a, small, 2, 2, 3, false, true, 3, 3, 2, 1, 0, 1, 0, 0, 0), LoraError, 'ERR_LORA_SHAPE', /^b holds 5 elements but the op needs 6$/, 'bf16 b too small');
      assertLoraError(t, () => native.gemm(c, a, small, 2, 2, 3, false, true, 3, 2, 2, 1, 0, 1, 0, 0, 0), LoraError, 'ERR_LORA_SHAPE', /^gemm leading dimension too small$/, 'bf16 b ldb too small');
      tidy(() => {
        const x = tensor(new Float32Array(6), [2, 3]);
        const Wi = tensor(new Float32Array(6), [2, 3], { dtype: 'int32' });
        // a float16 weight is widened for each product: the values of a float32 linear()
        const W16 = tensor([0.5, -1, 2, 0.25, 3, -0.75], [2, 3]).toDtype('float16');
        t.same(Array.from(linear(tensor([1, 2, 3, -1, 0, 1], [2, 3]), W16).toFloat32Array()), [4.5, 4, 1.5, -1], 'float16 weight');
        assertLoraError(t, () => linear(x, Wi), LoraError, 'ERR_LORA_DTYPE', /^Expected a float32, bfloat16 or float16 weight for linear\(\) but received int32$/, 'int32 weight');
        const Wb = tensor(new Float32Array(8), [2, 4]).toDtype('bfloat16');
        assertLoraError(t, () => linear(x, Wb), LoraError, 'ERR_LORA_SHAPE', /^Expected x of shape \[\.\.\., 4\] for linear\(\) but received \[2, 3\]$/, 'bf16 weight, wrong in-features');
      });
    } finally {
      [a, c, h, small].forEach((q) => native.dispose(q));
    }
  });

  // A backend without the optional gemm_bf16 entry says so through supports() (simulated here);
  // linear() then widens W and gives the same values.
  void leakChecked(t, 'linear() falls back to widening W where the backend has no bf16 GEMM', (t) => {
    const rng = new Rng(3);
    const N = 5, C = 33, OC = 17;
    const xh = f32(N * C, rng), Wh = f32(OC * C, rng), Gh = f32(N * OC, rng);
    const run = () => tidy(() => {
      const x = tensor(xh, [N, C], { requiresGrad: true });
      const y = linear(x, tensor(Wh, [OC, C]).toDtype('bfloat16'));
      y.backward(tensor(Gh, [N, OC]));
      const out = [y.toFloat32Array(), x.grad!.toFloat32Array()];
      x.grad!.dispose();
      return out;
    });
    const [yDirect, dxDirect] = run();
    const { supports, gemm } = native;
    let asked = 0;
    let bf16Products = 0;
    native.supports = (device, op, dtype) => {
      if (op === OP.gemm && dtype === DTYPE_ID.bfloat16) {
        asked++;
        return false;
      }
      return supports(device, op, dtype);
    };
    native.gemm = (c, a, b, ...rest) => {
      if (b.dtype === DTYPE_ID.bfloat16) bf16Products++;
      gemm(c, a, b, ...rest);
    };
    try {
      const [y1, dx1] = run();
      const [y2, dx2] = run();
      t.ok(asked >= 2, `linear() asked supports() (${asked} times)`);
      t.equal(bf16Products, 0, 'and never handed the backend a bf16 operand');
      const tol = { atol: 1e-6, rtol: 1e-6 };
      assertClose(t, y1!, yDirect!, tol, 'forward: the values of the bf16 GEMM');
      assertClose(t, dx1!, dxDirect!, tol, 'dx: the values of the bf16 GEMM');
      t.same([Array.from(y2!), Array.from(dx2!)], [Array.from(y1!), Array.from(dx1!)], 'the second call widens too');
    } finally {
      native.supports = supports;
      native.gemm = gemm;
    }
  });
}
