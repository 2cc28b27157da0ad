// The CPU GEMM engine (native/cpu/gemm*.cc) against a float64 reference: hundreds of random shapes,
// row strides, transposes, alpha/beta and thread counts, including 0- and 1-sized dims, at every ISA
// level (LORA_NATIVE_ISA, one child process per level since the level is chosen once per process);
// plus the bf16 frozen base (forward, backward, merge) with its stated tolerance. Not a test of
// the LoRA math itself (test/lora_forward.test.ts), only of the engine under it.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import t from 'tap';

import { features, getNumThreads, setNumThreads } from '../lib/index';
import { DTYPE_ID, native } from '../lib/native';
import { Rng } from '../lib/random';

const LEVELS = ['avx512', 'avx2', 'generic'];
const CHILD = process.env.LORA_GEMM_TEST_CHILD === '1';

function bf16Round(v: number): number {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  u[0] = (u[0]! + 0x7fff + ((u[0]! >>> 16) & 1)) & 0xffff0000;
  return f[0]!;
}
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
function randomGemm(rng: Rng, i: number, threads: number): string | null {
  const dim = () => {
    const r = rng.uniform();
    return r < 0.12 ? Math.floor(rng.uniform() * 2) : r < 0.5 ? 2 + Math.floor(rng.uniform() * 18) : r < 0.9 ? 20 + Math.floor(rng.uniform() * 80) : 100 + Math.floor(rng.uniform() * 200);
  };
  let M = dim(), N = dim(), K = dim();
  while (M * N * K > 2_000_000) { M = Math.ceil(M / 2); K = Math.ceil(K / 2); }
  const ta = rng.uniform() < 0.5, tb = rng.uniform() < 0.5;
  const lda = (ta ? M : K) + Math.floor(rng.uniform() * 4), ldb = (tb ? K : N) + Math.floor(rng.uniform() * 4);
  const ldc = N + Math.floor(rng.uniform() * 4);
  const alpha = [1, 0.5, -2, 0][Math.floor(rng.uniform() * 4)]!;
  const beta = [0, 1, 0.5][Math.floor(rng.uniform() * 3)]!;
  const Ah = f32(Math.max(1, (ta ? K : M) * lda), rng), Bh = f32(Math.max(1, (tb ? N : K) * ldb), rng);
  const Ch = f32(Math.max(1, M * ldc), rng);
  if (beta === 0) for (let q = 0; q < Ch.length; q++) if ((q % ldc) < N) Ch[q] = NaN;
  const A = native.fromHost(0, DTYPE_ID.float32, Ah), B = native.fromHost(0, DTYPE_ID.float32, Bh);
  const C = native.fromHost(0, DTYPE_ID.float32, Ch);
  setNumThreads(threads);
  if (process.env.LORA_GEMM_TEST_TRACE) fs.writeSync(2, `#${i} M=${M} N=${N} K=${K} ta=${ta} tb=${tb} lda=${lda} ldb=${ldb} ldc=${ldc} alpha=${alpha} beta=${beta} threads=${threads}\n`);
  native.gemm(C, A, B, M, N, K, ta, tb, lda, ldb, ldc, alpha, beta, 1, 0, 0, 0);
  const got = toF32(C);
  [A, B, C].forEach((s) => native.dispose(s));
  const what = `#${i} M=${M} N=${N} K=${K} ta=${ta} tb=${tb} lda=${lda} ldb=${ldb} ldc=${ldc} alpha=${alpha} beta=${beta} threads=${threads}`;
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

if (CHILD) {
  // One ISA level: the random sweep, then exit status says whether every case passed.
  const rng = new Rng(Number(process.env.LORA_GEMM_TEST_SEED ?? 1));
  const n = Number(process.env.LORA_GEMM_TEST_CASES ?? 300);
  const before = getNumThreads();
  const failures: string[] = [];
  // A random thread count per case: the pool is resized up and down between jobs as well.
  for (let i = 0; i < n; i++) {
    const f = randomGemm(rng, i, 1 + (rng.nextU32() % 3));
    if (f) failures.push(f);
  }
  setNumThreads(before);
  // straight to fd 1: tap owns process.stdout in this file
  fs.writeSync(1, JSON.stringify({ isa: features().isa, cases: n, failures: failures.slice(0, 10), failed: failures.length }) + '\n');
  process.exit(failures.length ? 1 : 0);
} else {
  t.test('random GEMMs against float64 at every ISA level', (t) => {
    for (const level of LEVELS) {
      const r = spawnSync(process.execPath, [...process.execArgv, __filename], {
        env: { ...process.env, LORA_NATIVE_ISA: level, LORA_GEMM_TEST_CHILD: '1', LORA_GEMM_TEST_SEED: String(LEVELS.indexOf(level) + 1) },
        encoding: 'utf8',
        timeout: 120_000,
      });
      const line = (r.stdout ?? '').trim().split('\n').filter((l) => l.startsWith('{')).pop();
      const res = line ? JSON.parse(line) : null;
      t.ok(res, `${level}: child reported (${(r.stderr ?? '').slice(-300)})`);
      if (!res) continue;
      // the level actually used is never above the one asked for, and a supported level is honoured
      t.ok(LEVELS.indexOf(res.isa) >= LEVELS.indexOf(level), `${level}: ran at ${res.isa}`);
      t.equal(res.failed, 0, `${level} (${res.isa}): ${res.cases} random GEMMs within 1e-5·Σ|a·b|${res.failed ? ': ' + res.failures.join(' | ') : ''}`);
      t.equal(r.status, 0, `${level}: child exit status`);
    }
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
      const Wb = W.map(bf16Round);
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

  // Merge into bf16: fp32 math, rounded once to nearest-even. The float64 result rounded to bf16
  // may differ from the kernel's by one bf16 step where fp32 rounding crosses a tie, never more.
  t.test('bf16 base: merge rounds once (within one bf16 step of round(W + s·B·A))', (t) => {
    const rng = new Rng(5);
    const OC = 70, C = 45, R = 6, s = 1.5;
    const W = f32(OC * C, rng), A = f32(R * C, rng), B = f32(OC * R, rng);
    const tW = bf16Tensor(W), tA = native.fromHost(0, DTYPE_ID.float32, A), tB = native.fromHost(0, DTYPE_ID.float32, B);
    native.loraMerge(tW, tA, tB, OC, C, R, s);
    const got = bf16ToF32(tW);
    let bad = 0, exact = 0;
    for (let o = 0; o < OC; o++) {
      for (let c = 0; c < C; c++) {
        let v = bf16Round(W[o * C + c]!);
        for (let r = 0; r < R; r++) v += s * B[o * R + r]! * A[r * C + c]!;
        const ref = bf16Round(v), g = got[o * C + c]!;
        if (g === ref) exact++;
        else if (Math.abs(g - ref) > Math.abs(ref) * 2 ** -7 + 1e-30) bad++;
      }
    }
    t.equal(bad, 0, `every element within one bf16 step (${exact} of ${OC * C} bit-identical)`);
    [tW, tA, tB].forEach((q) => native.dispose(q));
    t.end();
  });
}
