// The decode fast path (lib/models/decode.ts): a cached one-token inference pass runs each plain
// decoder layer as the same kernels with the same arguments as the generic path, into scratch
// tensors the cache keeps. Its logits must equal the generic path's bit for bit, for every RoPE
// family (biases on q/k/v, sliding windows, Gemma's norm offset and GeGLU, Qwen3's q/k norms and
// Phi-3's fused projections falling back), fp32 and bf16 weights, batches with left padding, and
// with LoRA on some projections (those layers take the generic path, their adapters applied).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { applyLora, CausalLM, features, loadCausalLM, loraLayers, memory, noGrad, tensor, tidy } from '../lib/index';
import { native } from '../lib/native';
import { decodeFastPath } from '../lib/models/decode';
import { Arch, writeCheckpoint } from './hf_checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-decode-fast-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/**
 * Two prompts (the second left-padded by 2), then `steps` one-token steps with a cache, the mask
 * and positions as generate() makes them; returns every step's logits and the allocations of
 * each one-token step.
 */
function decode(model: CausalLM, fast: boolean, steps = 4, batch = 2): { logits: Float32Array[]; allocs: number[] } {
  decodeFastPath.enabled = fast;
  const V = model.vocabSize;
  const logits: Float32Array[] = [];
  const allocs: number[] = [];
  const b = native as unknown as Record<string, (...a: unknown[]) => unknown>;
  const alloc = b.alloc!;
  let count = 0;
  b.alloc = (...a: unknown[]) => {
    count++;
    return alloc(...a);
  };
  try {
    return noGrad(() => {
      using cache = model.createCache(batch, 5 + steps);
      const mask = [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]];
      const pos = [[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]];
      const ids = [[5, 17, 3, 40, 8], [0, 0, 22, 9, 61]];
      // more prompts: row r left-padded by r % 3
      for (let r = 2; r < batch; r++) {
        const pad = r % 3;
        mask.push([0, 1, 2, 3, 4].map((i) => (i < pad ? 0 : 1)));
        pos.push([0, 1, 2, 3, 4].map((i) => (i < pad ? 1 : i - pad)));
        ids.push([0, 1, 2, 3, 4].map((i) => (i < pad ? 0 : (r * 31 + i * 7) % 64)));
      }
      const rows = [...Array(batch).keys()];
      let next = tidy(() => {
        const out = model.forward(tensor(ids.flat(), [batch, 5], { dtype: 'int32' }), {
          cache, attentionMask: tensor(mask.flat(), [batch, 5], { dtype: 'int32' }), positionIds: tensor(pos.flat(), [batch, 5], { dtype: 'int32' }),
        });
        const d = out.toFloat32Array();
        logits.push(d);
        return rows.map((r) => argmax(d.subarray((r * 5 + 4) * V, (r * 5 + 5) * V)));
      });
      for (let s = 0; s < steps; s++) {
        for (const m of mask) m.push(1);
        for (const p of pos) p.push(p[p.length - 1]! + 1);
        count = 0;
        next = tidy(() => {
          const out = model.forward(tensor(next, [batch, 1], { dtype: 'int32' }), {
            cache, attentionMask: tensor(mask.flat(), [batch, mask[0]!.length], { dtype: 'int32' }),
            positionIds: tensor(pos.map((p) => p[p.length - 1]!), [batch, 1], { dtype: 'int32' }),
          });
          const d = out.toFloat32Array();
          logits.push(d);
          return rows.map((r) => argmax(d.subarray(r * V, (r + 1) * V)));
        });
        allocs.push(count);
      }
      return { logits, allocs };
    });
  } finally {
    b.alloc = alloc;
    decodeFastPath.enabled = true;
  }
}

function argmax(d: Float32Array): number {
  let best = 0;
  for (let i = 1; i < d.length; i++) if (d[i]! > d[best]!) best = i;
  return best;
}

// the families whose every layer the fast path runs, and those it leaves to the generic path
const cases: [Arch, 'float32' | 'bfloat16', boolean][] = [
  ['llama', 'float32', true], ['llama', 'bfloat16', true], ['mistral', 'float32', true], ['qwen2', 'float32', true],
  ['gemma', 'bfloat16', true], ['qwen3', 'float32', false], ['phi3', 'float32', false],
];
for (const [arch, dtype, fast] of cases) {
  t.test(`${arch} ${dtype}: the fast path's logits equal the generic path's bit for bit`, async (t) => {
    const dir = path.join(tmp, `${arch}-${dtype}`);
    writeCheckpoint(dir, arch, { dtype, seed: 9 });
    const model = await loadCausalLM(dir, { dtype });
    // bf16 weights also with bf16 products allowed: the fast path passes the layer's choice on as the generic path does
    if (dtype === 'bfloat16' && arch === 'llama') model.matmulPrecision = 'bf16';
    try {
      const generic = decode(model, false);
      const before = memory().numTensors;
      const quick = decode(model, true);
      t.equal(memory().numTensors, before, 'the scratch tensors are freed with the cache');
      t.equal(quick.logits.length, generic.logits.length);
      quick.logits.forEach((l, i) => t.same(l, generic.logits[i], `pass ${i}: the same logits`));
      const layers = model.config.num_hidden_layers as number;
      if (fast) {
        // the first step makes the scratch; later ones only the pass's own few tensors
        // (the pass's own: ids, mask, positions, RoPE positions and inv_freq, embedding, norm, head)
        t.ok(quick.allocs.slice(1).every((n) => n <= 8), `one-token steps allocate ${quick.allocs} tensors, none per layer`);
        t.ok(generic.allocs.every((n, i) => n >= quick.allocs[i]! + 5 * layers), `the generic path allocates per op (${generic.allocs})`);
      } else {
        t.same(quick.allocs, generic.allocs, 'this family takes the generic path');
      }
    } finally {
      model.dispose();
    }
  });
}

// Five prompts of bf16 weights with bf16 products: 4..16 rows take the bf16 dot (x rounded to bf16),
// in the fast path's shared q/k/v and gate/up calls as in the generic path's separate products; with
// fp32 products too (the shared call's fp32 streaming path at 5 rows).
for (const precision of ['bf16', 'fp32'] as const) {
  t.test(`llama bfloat16, 5 prompts, matmulPrecision ${precision}: the fast path's logits equal the generic path's bit for bit`, async (t) => {
    const dir = path.join(tmp, `llama-b5-${precision}`);
    writeCheckpoint(dir, 'llama', { dtype: 'bfloat16', seed: 5 });
    const model = await loadCausalLM(dir, { dtype: 'bfloat16', matmulPrecision: precision });
    try {
      const generic = decode(model, false, 3, 5);
      const quick = decode(model, true, 3, 5);
      quick.logits.forEach((l, i) => t.same(l, generic.logits[i], `pass ${i}: the same logits`));
      if (precision === 'bf16' && features().bf16Dot) {
        model.matmulPrecision = 'fp32';
        const fp = decode(model, true, 3, 5);
        t.notSame(fp.logits[1], quick.logits[1], 'bf16 products change the one-token logits (the dot ran)');
      }
    } finally {
      model.dispose();
    }
  });
}

// Linear.matmulPrecision is a plain field: a bad value set on a layer throws in the fast path as
// linear() throws it in the generic path, instead of quietly giving fp32 products. The value goes
// bad after the prompt's pass, so only the one-token step (fast or generic) meets it.
t.test('a bad matmulPrecision set on one layer: the one-token step throws what the generic path throws', async (t) => {
  const dir = path.join(tmp, 'llama-bad-precision');
  writeCheckpoint(dir, 'llama', { dtype: 'bfloat16', seed: 6 });
  const model = await loadCausalLM(dir, { dtype: 'bfloat16' });
  const step = (layer: { matmulPrecision: string }, fast: boolean): (Error & { code?: string }) | null => {
    decodeFastPath.enabled = fast;
    try {
      return noGrad(() => {
        using cache = model.createCache(1, 8);
        tidy(() => model.forward(tensor([5, 17, 3], [1, 3], { dtype: 'int32' }), { cache }));
        layer.matmulPrecision = 'bf61';
        try {
          tidy(() => model.forward(tensor([8], [1, 1], { dtype: 'int32' }), { cache }));
          return null;
        } catch (e) {
          return e as Error & { code?: string };
        } finally {
          layer.matmulPrecision = 'fp32';
        }
      });
    } finally {
      decodeFastPath.enabled = true;
    }
  };
  try {
    for (const name of ['self_attn.k_proj', 'mlp.up_proj', 'self_attn.o_proj']) {
      const layer = model.getModule(`model.layers.0.${name}`) as unknown as { matmulPrecision: string };
      const [generic, fast] = [step(layer, false), step(layer, true)];
      t.ok(generic, `${name}: the generic path throws`);
      t.ok(fast, `${name}: the fast path throws`);
      t.equal(fast?.code, generic?.code, `${name}: the same code (${generic?.code})`);
      t.equal(fast?.message, generic?.message, `${name}: the same message`);
    }
  } finally {
    model.dispose();
  }
});

t.test('LoRA on layer 1\'s q_proj and down_proj: that layer takes the generic path with its adapters, layer 0 the fast one, the logits equal the generic path\'s', async (t) => {
  const dir = path.join(tmp, 'llama-lora');
  writeCheckpoint(dir, 'llama', { dtype: 'bfloat16', seed: 4 });
  const model = await loadCausalLM(dir);
  const plain = await loadCausalLM(dir);
  try {
    applyLora(model, { targetModules: /.*layers\.1\..*(q_proj|down_proj)/, rank: 2, seed: 1 });
    t.equal(loraLayers(model).size, 2);
    let seed = 3;
    for (const l of loraLayers(model).values()) l.loraB.assign(Float32Array.from({ length: l.loraB.size }, () => ((seed = (seed * 48271) % 2147483647) / 2147483647 - 0.5) * 0.4));
    const generic = decode(model, false);
    const quick = decode(model, true);
    quick.logits.forEach((l, i) => t.same(l, generic.logits[i], `pass ${i}: the same logits`));
    const base = decode(plain, true);
    t.notSame(base.logits[2], quick.logits[2], 'the adapters change the logits (they were applied)');
    const onlyLayer1 = quick.allocs.slice(1), both = generic.allocs.slice(1);
    t.ok(onlyLayer1.every((n, i) => n < both[i]! && n > base.allocs[i + 1]!), `layer 0 allocates nothing, layer 1 per op (${quick.allocs}; generic ${generic.allocs}; no LoRA ${base.allocs})`);
  } finally {
    model.dispose();
    plain.dispose();
  }
});
