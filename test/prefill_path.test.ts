// What an inference pass over many rows (a prompt's prefill, T > 1) asks of the kernels: the
// projections of one input (q/k/v, gate/up) as one gemmSharedA call where every one of them is a
// plain bias-free float32 or bfloat16 Linear, RoPE in place — and still the logits of
// transformers' modeling code (float64 references), with GQA, padding masks, sliding windows, q/k
// norms and GeGLU; with bf16 weights (fp32 or bf16 products) the logits of the products apart;
// with LoRA on some projections (those fall back to one product each) the logits of the same
// model's recording pass, which takes none of these paths.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { applyLora, features, loadCausalLM, loraLayers, memory, noGrad, tensor, Tensor } from '../lib/index';
import { native, OP } from '../lib/native';
import { Rng } from '../lib/random';
import { assertClose } from './helpers';
import { Arch, writeCheckpoint } from './hf_checkpoint';
import { causalLmRef } from './ref/causal_lm_ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-prefill-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const TOL = { atol: 2e-4, rtol: 2e-4 };

/** Runs fn with the number of products each gemmSharedA call made recorded (and its bf16Dot flag). */
function spyShared<T>(fn: () => T): { out: T; shared: number[]; dot: unknown[] } {
  const b = native as unknown as Record<string, (...a: unknown[]) => unknown>;
  const orig = b.gemmSharedA!;
  const shared: number[] = [], dot: unknown[] = [];
  b.gemmSharedA = (...a: unknown[]) => {
    shared.push(a[9] === null ? 2 : 3);
    dot.push(a[12]);
    return orig(...a);
  };
  try {
    return { out: fn(), shared, dot };
  } finally {
    b.gemmSharedA = orig;
  }
}

/** Runs fn as on a backend without gemmSharedA (supports() says no): every projection its own product. */
function withoutShared<T>(fn: () => T): T {
  const b = native as unknown as Record<string, (...a: unknown[]) => unknown>;
  const orig = b.supports!;
  b.supports = (dev: unknown, op: unknown, dtype: unknown) => (op === OP.gemmSharedA ? false : orig(dev, op, dtype));
  try {
    return fn();
  } finally {
    b.supports = orig;
  }
}

const ids2 = (rows: number[][]): Tensor => tensor(rows.flat(), [rows.length, rows[0]!.length], { dtype: 'int32' });

function logitsOf(model: Awaited<ReturnType<typeof loadCausalLM>>, rows: number[][], mask?: number[][]): Float32Array {
  const ids = ids2(rows);
  const m = mask ? ids2(mask) : undefined;
  const out = model.forward(ids, { attentionMask: m });
  const data = out.toFloat32Array();
  for (const x of [ids, m, out]) x?.dispose();
  return data;
}

// Two rows of 21 tokens (42 rows of activations: above projectShared's 32), the second right-padded.
const rng = new Rng(5);
const ROWS = [0, 1].map(() => Array.from({ length: 21 }, () => rng.nextU32() % 97));
const MASK = [new Array<number>(21).fill(1), Array.from({ length: 21 }, (_, i) => (i < 15 ? 1 : 0))];

const CASES: { name: string; arch: Arch; qkvShared: boolean; config?: Record<string, unknown> }[] = [
  { name: 'llama, 5 heads on 1 kv head', arch: 'llama', qkvShared: true },
  { name: 'llama, 4 heads on 2 kv heads', arch: 'llama', qkvShared: true, config: { num_attention_heads: 4, num_key_value_heads: 2, head_dim: 10 } },
  { name: 'mistral sliding window', arch: 'mistral', qkvShared: true },
  { name: 'qwen3 q/k norms', arch: 'qwen3', qkvShared: true },
  { name: 'gemma GeGLU, (1+w) norms', arch: 'gemma', qkvShared: true },
  { name: 'qwen2 q/k/v biases (one product each)', arch: 'qwen2', qkvShared: false },
];

t.test('prefill: projections in one call, logits of the float64 references', async (t) => {
  let n = 0;
  for (const c of CASES) {
    const before = memory().numTensors;
    const ck = writeCheckpoint(path.join(tmp, `m${n++}`), c.arch, { dtype: 'float32', seed: 7, config: c.config });
    const model = await loadCausalLM(ck.dir);
    const ref = causalLmRef(c.arch, ck.config, ck.weights, ROWS, { dtype: 'float32' });
    const { out, shared } = spyShared(() => noGrad(() => logitsOf(model, ROWS)));
    assertClose(t, out, ref, TOL, `${c.name}: logits`);
    // q/k/v (3) and gate/up (2) in each of the 2 layers, unless biases keep q/k/v apart (Qwen2)
    const want = c.qkvShared ? [3, 2, 3, 2] : [2, 2];
    t.same(shared, want, `${c.name}: gemmSharedA calls (products each) ${JSON.stringify(shared)}`);
    const V = model.vocabSize;
    const pick = (l: ArrayLike<number>) => MASK.flatMap((row, b) => row.flatMap((k, i) => (k ? Array.from({ length: V }, (_, v) => l[(b * 21 + i) * V + v]!) : [])));
    const padded = noGrad(() => logitsOf(model, ROWS, MASK));
    assertClose(t, pick(padded), pick(causalLmRef(c.arch, ck.config, ck.weights, ROWS, { dtype: 'float32', attentionMask: MASK })), TOL, `${c.name}: right padding`);
    model.dispose();
    t.equal(memory().numTensors, before, `${c.name}: no tensor left alive`);
  }
});

// bf16 weights: every projection wide enough for the engine's bf16 dot (more than 32 columns) and
// 3 x 24 = 72 rows (the dot runs from 64), so with matmulPrecision 'bf16' on a bf16-dot CPU each
// shared product is bit for bit the one the Linear makes alone; fp32 products stay within fp32's
// bound of them and of the float64 reference.
t.test('prefill with bf16 weights: projections in one call, fp32 or bf16 products as the layers ask', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'bf16'), 'llama', {
    dtype: 'bfloat16', seed: 13, config: { hidden_size: 64, num_attention_heads: 6, head_dim: 12, num_key_value_heads: 3, intermediate_size: 100 },
  });
  const rows = [0, 1, 2].map(() => Array.from({ length: 24 }, () => rng.nextU32() % 97));
  const ref = causalLmRef('llama', ck.config, ck.weights, rows, { dtype: 'bfloat16' });
  for (const precision of ['fp32', 'bf16'] as const) {
    const before = memory().numTensors;
    const model = await loadCausalLM(ck.dir, { matmulPrecision: precision });
    t.equal(model.dtype, 'bfloat16', 'the checkpoint loads as bf16');
    const { out, shared, dot } = spyShared(() => noGrad(() => logitsOf(model, rows)));
    t.same(shared, [3, 2, 3, 2], `${precision}: q/k/v and gate/up in one gemmSharedA call each`);
    t.same(dot, new Array(4).fill(precision === 'bf16'), `${precision}: bf16Dot ${precision === 'bf16'} on every call`);
    const apart = withoutShared(() => spyShared(() => noGrad(() => logitsOf(model, rows))));
    t.same(apart.shared, [], `${precision}: no gemmSharedA call where the backend says it has none`);
    if (precision === 'bf16' && features().bf16Dot) {
      const i = out.findIndex((v, j) => v !== apart.out[j]);
      t.equal(i, -1, `bf16: logits bit for bit those of the products apart${i >= 0 ? ` (logit ${i}: ${out[i]} vs ${apart.out[i]})` : ''}`);
      const fp32 = await loadCausalLM(ck.dir);
      const fp32Out = noGrad(() => logitsOf(fp32, rows));
      fp32.dispose();
      t.ok(out.some((v, j) => v !== fp32Out[j]), 'bf16: the bf16 dot ran (not the fp32 logits)');
      // bf16 x in every product: the logits are near the reference, not within fp32's bound
      assertClose(t, out, ref, { atol: 5e-2, rtol: 5e-2 }, 'bf16: logits near the float64 reference');
    } else {
      assertClose(t, out, apart.out, { atol: 1e-5, rtol: 1e-5 }, `${precision}: logits of the products apart`);
      assertClose(t, out, ref, TOL, `${precision}: logits of the float64 reference`);
    }
    model.dispose();
    t.equal(memory().numTensors, before, `${precision}: no tensor left alive`);
  }
});

t.test('prefill with LoRA on q_proj and up_proj: those products apart, the logits of the recording pass', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'lora'), 'llama', { dtype: 'float32', seed: 9 });
  const model = await loadCausalLM(ck.dir);
  applyLora(model, { targetModules: ['q_proj', 'up_proj'], rank: 4, alpha: 8, seed: 1 });
  let s = 3;
  for (const l of loraLayers(model).values()) l.loraB.assign(Float32Array.from({ length: l.loraB.size }, () => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5) * 0.2));
  const { out: inference, shared } = spyShared(() => noGrad(() => logitsOf(model, ROWS, MASK)));
  t.same(shared, [], 'no gemmSharedA call: every layer has a LoRA projection in each group');
  // the recording pass (LoRA parameters require grad): no inference paths at all
  const recorded = logitsOf(model, ROWS, MASK);
  assertClose(t, inference, recorded, { atol: 1e-5, rtol: 1e-5 }, 'inference logits equal the recording pass');
  // LoRA only on up_proj of one layer: q/k/v stay shared, that layer's gate/up fall back
  model.dispose();
  const model2 = await loadCausalLM(ck.dir);
  applyLora(model2, { targetModules: ['model.layers.1.mlp.up_proj'], rank: 4, alpha: 8, seed: 1 });
  for (const l of loraLayers(model2).values()) l.loraB.assign(new Float32Array(l.loraB.size).fill(0.05));
  const two = spyShared(() => noGrad(() => logitsOf(model2, ROWS, MASK)));
  t.same(two.shared, [3, 2, 3], 'q/k/v shared in both layers, gate/up in layer 0 only');
  assertClose(t, two.out, logitsOf(model2, ROWS, MASK), { atol: 1e-5, rtol: 1e-5 }, 'one LoRA layer: inference logits equal the recording pass');
  model2.dispose();
});
