// Checks every CUDA op against the CPU backend on random awkward shapes, through the addon's
// binding (dist/lib/native.js) so each backend method is hit directly. Plain node, no tap: it
// runs on the GPU machine. Prints one line per case and exits 1 if any case fails.
// fp32 cases use tight tolerances; bf16 weights (activations rounded to bf16 on tensor cores) wider.
'use strict';

const common = require('./common');

const { native, CPU, F32, BF16, F16, randomF32, put, get, rms, compare } = common;
// LORA_CHECK_SELF=1 runs the "GPU" half on the CPU too: it checks this script (argument orders,
// shapes) on a machine without a GPU. Every case must then pass exactly.
const CUDA = process.env.LORA_CHECK_SELF === '1' ? CPU : common.CUDA;

const results = [];
const FP32_TOL = { abs: 1e-6, rel_rms: 2e-6, rtol: 1e-4 };
const BF16_TOL = { abs: 1e-6, rel_rms: 2e-2, rtol: 2e-2 };  // x is rounded to bf16 (8 bits)
const EXACT = { abs: 0, rel_rms: 0, rtol: 0 };
const NN_TOL = { abs: 1e-6, rel_rms: 1e-5, rtol: 1e-4 };  // long fp32 sums in another order
// fp32 results of K-term sums taken in another order (tiles, split-K atomics): the rounding error
// grows like sqrt(K) units of 2^-24 of the result's rms; 4 of them bound the worst of ~10^5
// elements. (A run on the emulator failed one element in 65536 at K = 2752 with the fixed 2e-6.)
const fp32Tol = (K) => ({ ...FP32_TOL, rel_rms: Math.max(FP32_TOL.rel_rms, 4 * 2 ** -24 * Math.sqrt(K)) });

// LORA_CHECK_ONLY=prefix runs only the cases whose name starts with it (e.g. lora_).
const only = process.env.LORA_CHECK_ONLY || '';

// Runs build(device) on both backends and compares every output the CPU produced.
function check(name, build, tol = FP32_TOL) {
  if (!name.startsWith(only)) return;
  const t0 = Date.now();
  const owned = [];
  const track = (s) => { owned.push(s); return s; };
  let line;
  let ok = true;
  try {
    const ref = build(CPU, track).map(get);
    const out = build(CUDA, track).map(get);
    const parts = [];
    for (let i = 0; i < ref.length; i++) {
      const atol = tol.abs + tol.rel_rms * rms(ref[i]);
      const c = compare(out[i], ref[i], atol, tol.rtol);
      ok = ok && c.ok;
      parts.push(`${ref.length > 1 ? `#${i} ` : ''}${c.text}`);
    }
    line = parts.join('; ');
  } catch (e) {
    ok = false;
    line = `threw ${e && e.code ? `${e.code}: ` : ''}${e && e.message ? e.message : e}`;
  }
  for (const s of owned) if (!s.disposed) native.dispose(s);
  results.push({ name, ok });
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name} (${Date.now() - t0} ms): ${line}`);
}

let seed = 1;
const data = (n, scale = 1, positive = false) => randomF32(n, seed++, scale, positive);

// ---- gemm: transposes, strides (ld > cols), batches, beta, split-K shapes -----------------------
const gemmShapes = [
  [1, 1, 1], [7, 13, 5], [129, 67, 33], [300, 257, 1000], [2000, 16, 3000], [16, 1500, 4000],
  [64, 64, 0], [33, 200, 7], [500, 40, 300], [40, 500, 9000],
];
for (const [M, N, K] of gemmShapes) {
  for (const ta of [false, true]) {
    for (const tb of [false, true]) {
      const batch = M * N * K < 2e6 ? 3 : 1;
      const pad = 3;  // row strides longer than the rows
      const lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
      const sa = (ta ? K : M) * lda + 5, sb = (tb ? N : K) * ldb + 7, sc = M * ldc + 2;
      const a = data(batch * sa), b = data(batch * sb), c0 = data(batch * sc);
      for (const beta of [0, 1.5]) {
        check(`gemm M${M} N${N} K${K} ${ta ? 'T' : 'N'}${tb ? 'T' : 'N'} batch${batch} beta${beta}`, (dev, own) => {
          const A = own(put(dev, a)), B = own(put(dev, b)), C = own(put(dev, c0));
          native.gemm(C, A, B, M, N, K, ta, tb, lda, ldb, ldc, 0.75, beta, batch, sa, sb, sc);
          return [C];
        }, { ...FP32_TOL, abs: 1e-5 * Math.sqrt(K + 1) });
      }
    }
  }
}

// gemm with a bf16 B (linear() on a frozen bf16 weight: y = x·Wᵀ, dx = dy·W), B widened exactly.
for (const [M, N, K] of [[1, 1, 1], [7, 13, 5], [129, 67, 33], [16, 1500, 4000], [300, 257, 1000]]) {
  for (const tb of [true, false]) {
    const ldb = tb ? K : N, ldc = N;
    const a = data(M * K), b = data(N * K, 1 / Math.sqrt(K)), c0 = data(M * N);
    check(`gemm_bf16 M${M} N${N} K${K} N${tb ? 'T' : 'N'}`, (dev, own) => {
      const A = own(put(dev, a)), B = own(put(dev, b, BF16)), C = own(put(dev, c0));
      native.gemm(C, A, B, M, N, K, false, tb, K, ldb, ldc, 1, 0.5, 1, 0, 0, 0);
      return [C];
    }, { ...FP32_TOL, abs: 1e-5 * Math.sqrt(K + 1) });
  }
}
{  // a broadcast output accumulating over the batch (stride_c = 0, beta = 1)
  const M = 37, N = 45, K = 300, batch = 4;
  const a = data(batch * M * K), b = data(K * N), c0 = data(M * N);
  check('gemm broadcast C over batch (stride_c 0, beta 1)', (dev, own) => {
    const A = own(put(dev, a)), B = own(put(dev, b)), C = own(put(dev, c0));
    native.gemm(C, A, B, M, N, K, false, false, K, N, N, 1, 1, batch, M * K, 0, 0);
    return [C];
  });
}

// ---- elementwise ---------------------------------------------------------------------------------
const BINARY = ['add', 'sub', 'mul', 'div', 'max', 'min'];
const contiguous = (shape) => {
  const s = new Array(shape.length);
  let st = 1;
  for (let d = shape.length - 1; d >= 0; d--) { s[d] = st; st *= shape[d]; }
  return s;
};
for (const [shape, aShape, bShape] of [
  [[1000003], [1000003], [1000003]],
  [[3, 4, 5], [3, 1, 5], [1, 4, 5]],
  [[7, 129, 33], [7, 129, 33], [1, 1, 33]],
  [[2, 3, 4, 5, 6], [2, 1, 4, 1, 6], [1, 3, 1, 5, 1]],
]) {
  const stridesFor = (s) => { const c = contiguous(s); return s.map((d, i) => (d === 1 && shape[i] !== 1 ? 0 : c[i])); };
  const na = aShape.reduce((x, y) => x * y, 1), nb = bShape.reduce((x, y) => x * y, 1);
  const n = shape.reduce((x, y) => x * y, 1);
  const a = data(na), b = data(nb, 1, true);
  BINARY.forEach((op, id) => {
    check(`binary ${op} [${shape}] <- [${aShape}] [${bShape}]`, (dev, own) => {
      const A = own(put(dev, a)), B = own(put(dev, b)), O = own(native.alloc(dev, F32, n));
      native.binary(id, O, A, B, shape, stridesFor(aShape), stridesFor(bShape));
      return [O];
    });
  });
}
{
  const n = 77777;
  const a = data(n, 2);
  BINARY.forEach((op, id) => {
    for (const first of [false, true]) {
      check(`binary_scalar ${op} ${first ? 'scalar first' : 'scalar second'}`, (dev, own) => {
        const A = own(put(dev, a)), O = own(native.alloc(dev, F32, n));
        native.binaryScalar(id, O, A, 0.37, first);
        return [O];
      });
    }
  });
}
const UNARY = ['neg', 'exp', 'log', 'sqrt', 'rsqrt', 'abs', 'square', 'recip', 'relu', 'geluTanh',
  'geluErf', 'silu', 'tanh', 'sigmoid'];
{
  const n = 100003;
  const signed = data(n, 3), positive = data(n, 3, true), dy = data(n);
  UNARY.forEach((op, id) => {
    const x = ['log', 'sqrt', 'rsqrt', 'recip'].includes(op) ? positive : signed;
    const tol = { abs: 1e-6, rel_rms: 1e-6, rtol: 2e-6 };  // libm vs CUDA math: a few ulp
    check(`unary ${op}`, (dev, own) => {
      const X = own(put(dev, x)), O = own(native.alloc(dev, F32, n));
      native.unary(id, O, X);
      return [O];
    }, tol);
    check(`unary_backward ${op}`, (dev, own) => {
      const X = own(put(dev, x)), Y = own(native.alloc(CPU, F32, n));
      native.unary(id, Y, own(put(CPU, x)));
      const Yd = own(put(dev, get(Y))), DY = own(put(dev, dy)), DX = own(native.alloc(dev, F32, n));
      native.unaryBackward(id, DX, DY, X, Yd);
      return [DX];
    }, tol);
  });
}
{
  const n = 123457;
  const x = data(n), y0 = data(n);
  check('axpy', (dev, own) => {
    const X = own(put(dev, x)), Y = own(put(dev, y0));
    native.axpy(Y, X, -0.3);
    return [Y];
  });
  check('fill', (dev, own) => {
    const O = own(native.alloc(dev, F32, n));
    native.fill(O, 2.5);
    return [O];
  }, EXACT);
  for (const p of [0.1, 0.5]) {
    check(`dropout p=${p} (identical masks)`, (dev, own) => {
      const X = own(put(dev, x)), O = own(native.alloc(dev, F32, n));
      native.dropout(O, X, p, 12345);
      return [O];
    }, EXACT);
  }
  const big = data(n, 100);
  for (const [to, name] of [[BF16, 'bf16'], [F16, 'f16']]) {
    check(`convert f32 -> ${name} -> f32 (round to nearest even)`, (dev, own) => {
      const X = own(put(dev, big)), H = own(native.alloc(dev, to, n)), O = own(native.alloc(dev, F32, n));
      native.convert(H, X);
      native.convert(O, H);
      return [O];
    }, EXACT);
  }
}
for (const [outer, dim, inner] of [[3, 1000, 1], [5, 7, 13], [1, 300001, 1], [2, 1, 5], [64, 129, 1], [1, 5000, 3], [2, 10000, 300], [3, 70000, 1]]) {
  const x = data(outer * dim * inner);
  ['sum', 'max', 'min'].forEach((op, id) => {
    check(`reduce ${op} (${outer}, ${dim}, ${inner})`, (dev, own) => {
      const X = own(put(dev, x)), O = own(native.alloc(dev, F32, outer * inner));
      native.reduce(id, O, X, outer, dim, inner);
      return [O];
    });
  });
}
{
  const R = 37, Cc = 53;  // transpose (R, Cc) -> (Cc, R), and a slice with offsets
  const x = data(R * Cc);
  check('copy_strided transpose', (dev, own) => {
    const X = own(put(dev, x)), O = own(native.alloc(dev, F32, R * Cc));
    native.copyStrided(O, 0, [1, R], X, 0, [Cc, 1], [R, Cc]);
    return [O];
  }, EXACT);
  check('copy_strided slice into offset', (dev, own) => {
    const X = own(put(dev, x)), O = own(put(dev, new Float32Array(R * Cc)));
    native.copyStrided(O, 7, [Cc, 1], X, 3, [Cc, 2], [10, 20]);
    return [O];
  }, EXACT);
}
for (const [rows, cols] of [[1, 1], [37, 1000], [5, 40000], [300, 33]]) {
  const x = data(rows * cols, 5), dy = data(rows * cols);
  for (const log of [false, true]) {
    check(`softmax${log ? ' (log)' : ''} (${rows}, ${cols})`, (dev, own) => {
      const X = own(put(dev, x)), O = own(native.alloc(dev, F32, rows * cols));
      native.softmax(O, X, rows, cols, log);
      return [O];
    });
    check(`softmax_backward${log ? ' (log)' : ''} (${rows}, ${cols})`, (dev, own) => {
      const Yc = own(native.alloc(CPU, F32, rows * cols));
      native.softmax(Yc, own(put(CPU, x)), rows, cols, log);
      const Y = own(put(dev, get(Yc))), DY = own(put(dev, dy)), DX = own(native.alloc(dev, F32, rows * cols));
      native.softmaxBackward(DX, DY, Y, rows, cols, log);
      return [DX];
    });
  }
}

// ---- LoRA ------------------------------------------------------------------------------------------
const loraShapes = [[1, 1, 1, 1], [37, 61, 45, 3], [130, 257, 129, 16], [513, 1000, 777, 64], [64, 1024, 2752, 8]];
for (const [N, C, OC, R] of loraShapes) {
  const x = data(N * C), w = data(OC * C, 1 / Math.sqrt(C)), bias = data(OC), A = data(R * C, 1 / Math.sqrt(C)),
    B = data(OC * R), dy = data(N * OC), dA0 = data(R * C), dB0 = data(OC * R);
  for (const wdt of [F32, BF16]) {
    const tol = wdt === F32 ? fp32Tol(Math.max(N, C, OC)) : BF16_TOL;
    for (const p of R > 0 ? [0, 0.2] : [0]) {
      const tag = `(${N}, ${C}, ${OC}, ${R}) W ${wdt === F32 ? 'f32' : 'bf16'} dropout ${p}`;
      const s = 2.0;
      check(`lora_forward ${tag}`, (dev, own) => {
        const Y = own(native.alloc(dev, F32, N * OC)), H = own(native.alloc(dev, F32, N * R));
        native.loraForward(Y, H, own(put(dev, x)), own(put(dev, w, wdt)), own(put(dev, bias)), own(put(dev, A)),
          own(put(dev, B)), N, C, OC, R, s, p, 99);
        return R > 0 ? [Y, H] : [Y];
      }, tol);
      check(`lora_backward ${tag}`, (dev, own) => {
        const Y = own(native.alloc(dev, F32, N * OC)), H = own(native.alloc(dev, F32, N * R));
        const X = own(put(dev, x)), W = own(put(dev, w, wdt)), As = own(put(dev, A)), Bs = own(put(dev, B));
        native.loraForward(Y, H, X, W, null, As, Bs, N, C, OC, R, s, p, 99);
        const DX = own(native.alloc(dev, F32, N * C)), DA = own(put(dev, dA0)), DB = own(put(dev, dB0));
        native.loraBackward(DX, DA, DB, own(put(dev, dy)), X, H, W, As, Bs, N, C, OC, R, s, p, 99);
        return [DX, DA, DB];
      }, tol);
    }
    check(`lora_merge (${OC}, ${C}, ${R}) W ${wdt === F32 ? 'f32' : 'bf16'}`, (dev, own) => {
      const W = own(put(dev, w, wdt));
      native.loraMerge(W, own(put(dev, A)), own(put(dev, B)), OC, C, R, 0.5);
      return [W];
    }, wdt === F32 ? FP32_TOL : { abs: 1e-6, rel_rms: 0, rtol: 1 / 128 });  // one bf16 ulp: sum order
  }
}

// ---- normalisation, embedding, cross-entropy, attention -----------------------------------------
const I32 = 3;
const putIds = (dev, ids) => native.fromHost(dev, I32, Int32Array.from(ids));
for (const [N, C] of [[1, 1], [37, 129], [300, 1000], [2, 5000]]) {
  const x = data(N * C, 3), w = data(C), b = data(C), dy = data(N * C), dw0 = data(C), db0 = data(C);
  for (const affine of [true, false]) {
    check(`layer_norm (${N}, ${C})${affine ? '' : ' no affine'} + backward`, (dev, own) => {
      const Y = own(native.alloc(dev, F32, N * C)), M = own(native.alloc(dev, F32, N)), RS = own(native.alloc(dev, F32, N));
      const X = own(put(dev, x)), W = affine ? own(put(dev, w)) : null, B = affine ? own(put(dev, b)) : null;
      native.layerNorm(Y, M, RS, X, W, B, N, C, 1e-5);
      const DX = own(native.alloc(dev, F32, N * C)), DW = own(put(dev, dw0)), DB = own(put(dev, db0));
      native.layerNormBackward(DX, DW, DB, own(put(dev, dy)), X, W, M, RS, N, C);
      return [Y, M, RS, DX, DW, DB];
    }, NN_TOL);
    check(`rms_norm (${N}, ${C})${affine ? '' : ' no affine'} + backward`, (dev, own) => {
      const Y = own(native.alloc(dev, F32, N * C)), RS = own(native.alloc(dev, F32, N));
      const X = own(put(dev, x)), W = affine ? own(put(dev, w)) : null;
      native.rmsNorm(Y, RS, X, W, N, C, 1e-6);
      const DX = own(native.alloc(dev, F32, N * C)), DW = own(put(dev, dw0));
      native.rmsNormBackward(DX, DW, own(put(dev, dy)), X, W, RS, N, C);
      return [Y, RS, DX, DW];
    }, NN_TOL);
  }
}
{
  const V = 1000, C = 77, N = 513;
  const table = data(V * C), dout = data(N * C), dt0 = data(V * C);
  const ids = Array.from({ length: N }, (_, i) => (i * 7919) % 50);  // repeats: atomics in the backward
  check(`embedding (${N} ids of ${V}, ${C}) + backward`, (dev, own) => {
    const O = own(native.alloc(dev, F32, N * C)), T = own(put(dev, table)), I = own(putIds(dev, ids));
    native.embedding(O, T, I, N, V, C);
    const DT = own(put(dev, dt0));
    native.embeddingBackward(DT, own(put(dev, dout)), I, N, V, C);
    return [O, DT];
  }, NN_TOL);
  check('embedding rejects an id out of range (ERR from both backends)', (dev, own) => {
    const O = own(native.alloc(dev, F32, 2 * C)), T = own(put(dev, table)), I = own(putIds(dev, [3, V]));
    try {
      native.embedding(O, T, I, 2, V, C);
    } catch (e) {
      return [own(put(dev, new Float32Array([1])))];
    }
    return [own(put(dev, new Float32Array([0])))];
  }, EXACT);
}
for (const [N, V, smoothing] of [[1, 2, 0], [37, 1000, 0.1], [8, 50257, 0]]) {
  const z = data(N * V, 4), dl = data(N);
  const targets = Array.from({ length: N }, (_, i) => (i % 5 === 3 ? -100 : (i * 31) % V));
  check(`cross_entropy (${N}, ${V}) smoothing ${smoothing} + backward`, (dev, own) => {
    const L = own(native.alloc(dev, F32, N)), LSE = own(native.alloc(dev, F32, N)), Z = own(put(dev, z));
    const Tg = own(putIds(dev, targets));
    native.crossEntropy(L, LSE, Z, Tg, N, V, -100, smoothing);
    const DZ = own(native.alloc(dev, F32, N * V));
    native.crossEntropyBackward(DZ, own(put(dev, dl)), Z, LSE, Tg, N, V, -100, smoothing);
    return [L, LSE, DZ];
  }, NN_TOL);
}
// attention: GQA groups 1/3/8, D not a multiple of the tiles, padding (left and right), segments,
// a sliding window, decode rows against a longer cache (S < Smax). Rows that see no key have
// lse = +inf on both backends; lse is compared only where there are none.
const attentionCases = [
  // B, T, S, Smax, H, KVH, D, causal, window, pad, segments
  [1, 1, 1, 1, 1, 1, 1, true, 0, false, false],
  [2, 37, 37, 37, 6, 2, 16, true, 0, false, false],
  [1, 130, 130, 130, 2, 2, 64, false, 0, false, false],
  [2, 300, 300, 300, 8, 1, 32, true, 0, false, false],
  [2, 61, 61, 61, 4, 4, 80, true, 17, false, false],
  [2, 50, 50, 50, 3, 1, 40, true, 0, true, false],
  [1, 90, 90, 90, 4, 2, 128, true, 0, false, true],
  [2, 1, 300, 320, 9, 3, 64, true, 0, true, false],
  [1, 5, 40, 48, 8, 1, 96, true, 0, false, false],
  [1, 33, 33, 33, 2, 1, 256, true, 0, false, false],
];
for (const [B, T, S, Smax, H, KVH, D, causal, window, pad, segments] of attentionCases) {
  const nq = B * T * H * D, nkv = B * Smax * KVH * D;
  const q = data(nq, 2), k = data(nkv, 2), v = data(nkv), dout = data(nq);
  // batch 0 padded on the left, batch 1 on the right; segments of 23 positions
  const mask = Array.from({ length: B * S }, (_, i) => ((i / S | 0) === 0 ? i % S >= 7 : i % S < S - 5) ? 1 : 0);
  const segs = Array.from({ length: B * S }, (_, i) => Math.floor((i % S) / 23));
  const name = `attention B${B} T${T} S${S}${Smax > S ? `/${Smax}` : ''} H${H}/${KVH} D${D}${causal ? ' causal' : ''}` +
    `${window ? ` window ${window}` : ''}${pad ? ' padded' : ''}${segments ? ' segments' : ''} + backward`;
  check(name, (dev, own) => {
    const O = own(native.alloc(dev, F32, nq)), LSE = own(native.alloc(dev, F32, B * H * T));
    const Q = own(put(dev, q)), K = own(put(dev, k)), Vv = own(put(dev, v));
    const M = pad ? own(putIds(dev, mask)) : null, SG = segments ? own(putIds(dev, segs)) : null;
    const rest = [M, S, SG, S, B, T, S, Smax, H, KVH, D, 1 / Math.sqrt(D), causal, window];
    native.attention(O, LSE, Q, K, Vv, ...rest);
    const DQ = own(native.alloc(dev, F32, nq)), DK = own(put(dev, new Float32Array(nkv))), DV = own(put(dev, new Float32Array(nkv)));
    native.attentionBackward(DQ, DK, DV, own(put(dev, dout)), Q, K, Vv, O, LSE, ...rest);
    return pad ? [O, DQ, DK, DV] : [O, LSE, DQ, DK, DV];
  }, NN_TOL);
}

// ---- optimizers ---------------------------------------------------------------------------------
{
  const sizes = [1, 1000, 16385, 70001];
  const p0 = sizes.map((n) => data(n)), g = sizes.map((n) => data(n)), m0 = sizes.map((n) => data(n, 0.1)),
    v0 = sizes.map((n) => data(n, 0.01, true));
  check('adamw_step x3 over 4 tensors (one launch each)', (dev, own) => {
    const P = p0.map((a) => own(put(dev, a))), G = g.map((a) => own(put(dev, a))), M = m0.map((a) => own(put(dev, a))),
      V = v0.map((a) => own(put(dev, a)));
    for (let step = 1; step <= 3; step++) native.adamwStep(P, G, M, V, 1e-2, 0.9, 0.999, 1e-8, 0.01, step);
    return [...P, ...M, ...V];
  });
  for (const [momentum, nesterov] of [[0, false], [0.9, false], [0.9, true]]) {
    check(`sgd_step x3 momentum ${momentum}${nesterov ? ' nesterov' : ''}`, (dev, own) => {
      const P = p0.map((a) => own(put(dev, a))), G = g.map((a) => own(put(dev, a)));
      const Bf = momentum ? sizes.map((n) => own(native.alloc(dev, F32, n))) : null;
      for (let step = 1; step <= 3; step++) native.sgdStep(P, G, Bf, 0.1, momentum, 0.1, 0.01, nesterov, step);
      return [...P, ...(Bf || [])];
    });
  }
}

// ---- the public API on cuda (lib/ over the binding): modules, autograd, optimizer --------------
// Skipped in the CPU dry run (it needs the 'cuda' device itself).
if (process.env.LORA_CHECK_SELF !== '1' && 'api_'.startsWith(only.slice(0, 4))) {
  const path = require('path');
  const lib = require(path.join(common.root, 'dist', 'lib', 'index.js'));
  for (const [N, C, OC, R, p, bf16] of [[37, 61, 45, 3, 0, false], [130, 256, 200, 16, 0.1, false], [64, 512, 384, 8, 0, true]]) {
    const name = `api_ LoraLinear (${N}, ${C}, ${OC}, ${R}) dropout ${p}${bf16 ? ' bf16 W' : ''}: forward, backward, AdamW step`;
    const t0 = Date.now();
    let ok = true;
    let line = '';
    try {
      const x = data(N * C), gy = data(N * OC), b0 = data(OC * R, 0.1);
      const run = (device) => {
        const layer = new lib.LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, alpha: 2 * R, dropout: p, seed: 5 });
        layer.loraB.assign(b0);
        if (bf16) {
          const w = layer.weight;
          layer.weight = w.toDtype('bfloat16');
          w.dispose();
        }
        if (device === 'cuda') layer.to('cuda');
        const opt = new lib.AdamW(layer.parameters(), { lr: 1e-2 });
        const xt = lib.tensor(x, [N, C], { device }), gt = lib.tensor(gy, [N, OC], { device });
        const y = layer.forward(xt);
        const loss = lib.sum(lib.mul(y, gt));
        loss.backward();
        const out = [y.toFloat32Array(), layer.loraA.grad.toFloat32Array(), layer.loraB.grad.toFloat32Array()];
        opt.step();
        out.push(layer.loraA.toFloat32Array());
        for (const t of [xt, gt, y, loss]) t.dispose();
        opt.dispose();
        layer.dispose();
        return out;
      };
      const ref = run('cpu'), got = run('cuda');
      const parts = [];
      ref.forEach((r, i) => {
        const tol = bf16 && i === 0 ? BF16_TOL : { abs: 1e-6, rel_rms: 1e-5, rtol: 1e-4 };
        const c = compare(got[i], r, tol.abs + tol.rel_rms * rms(r), tol.rtol);
        ok = ok && c.ok;
        parts.push(`${['y', 'dA', 'dB', 'A after step'][i]} ${c.text}`);
      });
      line = parts.join('; ');
    } catch (e) {
      ok = false;
      line = `threw ${e && e.code ? `${e.code}: ` : ''}${e && e.message ? e.message : e}`;
    }
    results.push({ name, ok });
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${name} (${Date.now() - t0} ms): ${line}`);
  }
}

const failed = results.filter((r) => !r.ok);
console.log(`\ncheck: ${results.length - failed.length} passed, ${failed.length} failed`);
if (failed.length) console.log(`failed: ${failed.map((f) => f.name).join(' | ')}`);
process.exitCode = failed.length ? 1 : 0;
