// Times lora-native's CUDA kernels at two LLM-sized shapes through the addon's binding: lora_forward,
// the training step (forward + backward: dx, dA, dB), the base GEMM alone (R = 0), lora_merge,
// AdamW (adapter-only and a weight-sized parameter set), fused attention (forward, forward +
// backward, one decode step) and a device-to-device copy for the bandwidth ceiling. Writes JSON records for table.py. Not a correctness check (check.js is).
// Timing: the addon exposes no CUDA events, so each sample is a wall-clock interval over `iters`
// back-to-back calls that ends with a stream synchronization; launch overhead is amortised.
'use strict';

const fs = require('fs');
const { native, CUDA, F32, BF16, randomF32, put, syncCuda } = require('./common');

const args = process.argv.slice(2);
const outFile = args.includes('--out') ? args[args.indexOf('--out') + 1] : 'ours.json';
const quick = args.includes('--quick');  // smaller shapes: a smoke run of this script
const SHAPES = quick ? [[256, 256, 256, 16]] : [[4096, 4096, 4096, 16], [8192, 4096, 11008, 64]];
const records = [];
// --alt (run with LORA_NATIVE_CUDA_TC=staged LORA_NATIVE_CUDA_SKINNY=simt): the register-staged bf16 GEMM and
// the SIMT adapter GEMMs instead of the cp.async pipeline and 3xTF32; this run times only the
// GEMM-bound ops and tags them '_alt', for the variant comparison in the table.
const staged = args.includes('--alt');
const suffix = staged ? '_alt' : '';

function timeMs(fn, iters, samples = 5) {
  fn();
  fn();
  syncCuda();  // warm-up: allocator buckets filled, kernels loaded
  const times = [];
  for (let s = 0; s < samples; s++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < iters; i++) fn();
    syncCuda();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6 / iters);
  }
  times.sort((a, b) => a - b);
  return { median: times[Math.floor(times.length / 2)], min: times[0] };
}

function record(shape, dtype, op, t, extra = {}) {
  const r = { impl: 'lora-native', shape: shape.join('x'), dtype, op: op + suffix, ms: t.median, min_ms: t.min, ...extra };
  records.push(r);
  console.log(JSON.stringify(r));
}

// Random device data without a host round trip per call: upload once, reuse.
function dev(n, scale = 1, dtype = F32, seed = 1) {
  return put(CUDA, randomF32(n, seed, scale), dtype);
}

const features = native.features();
console.log(JSON.stringify({ features }));
if (!features.cuda) {
  console.error(`CUDA unavailable: ${features.reason}`);
  process.exit(1);
}

// Copy bandwidth: 1 GiB device-to-device, counted as read + write.
if (!staged) {
  const n = 256 * 1024 * 1024;
  const a = native.alloc(CUDA, F32, n), b = native.alloc(CUDA, F32, n);
  native.fill(a, 1);
  const t = timeMs(() => native.copyInto(b, a), 10);
  record(['1GiB'], 'f32', 'copy', t, { gbps: (2 * n * 4) / (t.median * 1e6) });
  native.dispose(a);
  native.dispose(b);
}

for (const shape of SHAPES) {
  const [N, C, OC, R] = shape;
  const s = 2.0;
  for (const [wdt, name] of staged ? [[BF16, 'bf16']] : [[BF16, 'bf16'], [F32, 'f32']]) {
    const x = dev(N * C, 1, F32, 11), W = dev(OC * C, 1 / Math.sqrt(C), wdt, 12), A = dev(R * C, 0.01, F32, 13),
      B = dev(OC * R, 0.01, F32, 14), dy = dev(N * OC, 1, F32, 15);
    const y = native.alloc(CUDA, F32, N * OC), h = native.alloc(CUDA, F32, N * R), h0 = native.alloc(CUDA, F32, 0);
    const dx = native.alloc(CUDA, F32, N * C), dA = native.alloc(CUDA, F32, R * C), dB = native.alloc(CUDA, F32, OC * R);
    const A0 = native.alloc(CUDA, F32, 0), B0 = native.alloc(CUDA, F32, 0);
    const flops = 2 * N * C * OC;
    const iters = N * C * OC > 1e11 ? 5 : 10;

    const base = timeMs(() => native.loraForward(y, h0, x, W, null, A0, B0, N, C, OC, 0, s, 0, 1), iters);
    record(shape, name, 'base_gemm', base, { tflops: flops / (base.median * 1e9) });
    const fwd = timeMs(() => native.loraForward(y, h, x, W, null, A, B, N, C, OC, R, s, 0, 1), iters);
    record(shape, name, 'forward', fwd, { tflops: flops / (fwd.median * 1e9) });
    const baseStep = timeMs(() => {
      native.loraForward(y, h0, x, W, null, A0, B0, N, C, OC, 0, s, 0, 1);
      native.loraBackward(dx, null, null, dy, x, h0, W, A0, B0, N, C, OC, 0, s, 0, 1);
    }, iters);
    record(shape, name, 'base_step', baseStep);
    const step = timeMs(() => {
      native.loraForward(y, h, x, W, null, A, B, N, C, OC, R, s, 0, 1);
      native.loraBackward(dx, dA, dB, dy, x, h, W, A, B, N, C, OC, R, s, 0, 1);
    }, iters);
    record(shape, name, 'train_step', step, { adapter_share: (step.median - baseStep.median) / step.median });
    if (staged) {
      for (const t of [x, W, A, B, dy, y, h, h0, dx, dA, dB, A0, B0]) native.dispose(t);
      continue;
    }
    const stepDrop = timeMs(() => {
      native.loraForward(y, h, x, W, null, A, B, N, C, OC, R, s, 0.1, 1);
      native.loraBackward(dx, dA, dB, dy, x, h, W, A, B, N, C, OC, R, s, 0.1, 1);
    }, iters);
    record(shape, name, 'train_step_dropout0.1', stepDrop);
    const merge = timeMs(() => native.loraMerge(W, A, B, OC, C, R, s), 10);
    const wbytes = OC * C * (wdt === BF16 ? 2 : 4) * 2;  // read + write W
    record(shape, name, 'merge', merge, { gbps: wbytes / (merge.median * 1e6) });

    if (wdt === F32) {  // AdamW does not depend on W's dtype: time it once per shape
      const gA = dev(R * C, 1, F32, 21), gB = dev(OC * R, 1, F32, 22);
      const mA = native.alloc(CUDA, F32, R * C), vA = native.alloc(CUDA, F32, R * C);
      const mB = native.alloc(CUDA, F32, OC * R), vB = native.alloc(CUDA, F32, OC * R);
      for (const t of [mA, vA, mB, vB]) native.fill(t, 0);
      let k = 1;
      const adapter = timeMs(() => native.adamwStep([A, B], [gA, gB], [mA, mB], [vA, vB], 1e-4, 0.9, 0.999, 1e-8, 0.01, k++), 20);
      const n = R * C + OC * R;
      record(shape, 'f32', 'adamw_adapter', adapter, { gbps: (n * 28) / (adapter.median * 1e6) });
      const P = dev(OC * C, 0.01, F32, 31), G = dev(OC * C, 1, F32, 32);
      const M = native.alloc(CUDA, F32, OC * C), V = native.alloc(CUDA, F32, OC * C);
      native.fill(M, 0);
      native.fill(V, 0);
      const full = timeMs(() => native.adamwStep([A, B, P], [gA, gB, G], [mA, mB, M], [vA, vB, V], 1e-4, 0.9, 0.999, 1e-8, 0.01, k++), 10);
      const nf = n + OC * C;
      record(shape, 'f32', 'adamw_weight_sized', full, { gbps: (nf * 28) / (full.median * 1e6), params: nf });
      for (const t of [gA, gB, mA, vA, mB, vB, P, G, M, V]) native.dispose(t);
    }
    for (const t of [x, W, A, B, dy, y, h, h0, dx, dA, dB, A0, B0]) native.dispose(t);
    native.releaseCached();
  }
}

// Fused attention (issue 13), fp32, causal, one sequence: SmolLM2-135M's heads (9/3, D 64) and a
// 1B-shaped layer's (32/8, D 64). Shape "TxHxKVHxD"; decode = one query against T cached positions.
const ATTN = quick ? [[256, 9, 3, 64]] : [[1024, 9, 3, 64], [4096, 9, 3, 64], [4096, 32, 8, 64]];
if (!staged) {
  for (const shape of ATTN) {
    const [T, H, KVH, D] = shape;
    const q = dev(T * H * D, 1, F32, 41), k = dev(T * KVH * D, 1, F32, 42), v = dev(T * KVH * D, 1, F32, 43), g = dev(T * H * D, 1, F32, 44);
    const o = native.alloc(CUDA, F32, T * H * D), lse = native.alloc(CUDA, F32, H * T);
    const dq = native.alloc(CUDA, F32, T * H * D), dk = native.alloc(CUDA, F32, T * KVH * D), dv = native.alloc(CUDA, F32, T * KVH * D);
    const o1 = native.alloc(CUDA, F32, H * D), lse1 = native.alloc(CUDA, F32, H);
    const rest = (Tq) => [null, 0, null, 0, 1, Tq, T, T, H, KVH, D, 1 / Math.sqrt(D), true, 0];
    const fwdFlops = (4 * T * T * D * H) / 2;  // FlashAttention's count, halved for the causal mask
    const iters = T >= 4096 ? 3 : 10;
    const f = timeMs(() => native.attention(o, lse, q, k, v, ...rest(T)), iters);
    record(shape, 'f32', 'attention_fwd', f, { tflops: fwdFlops / (f.median * 1e9) });
    const fb = timeMs(() => {
      native.attention(o, lse, q, k, v, ...rest(T));
      native.attentionBackward(dq, dk, dv, g, q, k, v, o, lse, ...rest(T));
    }, iters);
    record(shape, 'f32', 'attention_fwd_bwd', fb, { tflops: (3.5 * fwdFlops) / (fb.median * 1e9) });
    const dec = timeMs(() => native.attention(o1, lse1, q, k, v, ...rest(1)), 20);  // q's first row as the new query
    record(shape, 'f32', 'attention_decode', dec, { gbps: (2 * T * KVH * D * 4) / (dec.median * 1e6) });
    for (const t of [q, k, v, g, o, lse, dq, dk, dv, o1, lse1]) native.dispose(t);
    native.releaseCached();
  }
}

fs.writeFileSync(outFile, JSON.stringify(records, null, 1));
console.log(`wrote ${records.length} records to ${outFile}`);
