// Hugging Face causal LMs: every supported architecture's logits against the float64 references
// of test/ref/causal_lm_ref.ts (fp32 and bf16 checkpoints, one file and sharded, RoPE scaling
// variants, GQA/MQA, sliding windows), padding on either side, the KV cache, generate() (greedy
// equals argmax of a full recompute, batched equals one at a time, seeded sampling), the sampler's
// processors on hand-worked logits, causalLmLoss, and LoRA on the loaded modules.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  applyLora, CausalLM, causalLmLoss, loadCausalLM, loadLoraAdapter, loraLayers, memory, noGrad, saveLoraAdapter, tensor, Tensor,
} from '../lib/index';
import { pickToken } from '../lib/models/generate';
import { Rng } from '../lib/random';
import { assertClose } from './helpers';
import { Arch, Checkpoint, writeCheckpoint } from './hf_checkpoint';
import { causalLmRef } from './ref/causal_lm_ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-causal-lm-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Case {
  name: string;
  arch: Arch;
  dtype: 'float32' | 'bfloat16';
  shards?: number;
  config?: Record<string, unknown>;
}

const CASES: Case[] = [
  { name: 'llama MQA', arch: 'llama', dtype: 'float32' },
  {
    name: 'llama3 rope, biases, head_dim != hidden/heads', arch: 'llama', dtype: 'bfloat16', shards: 3,
    config: { head_dim: 12, num_key_value_heads: 5, attention_bias: true, mlp_bias: true, rope_theta: 500000.0, rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8, rope_type: 'llama3' } },
  },
  { name: 'llama linear rope', arch: 'llama', dtype: 'float32', config: { rope_scaling: { type: 'linear', factor: 2.0 } } },
  { name: 'llama dynamic rope past max positions', arch: 'llama', dtype: 'float32', config: { max_position_embeddings: 5, rope_scaling: { type: 'dynamic', factor: 2.0 } } },
  { name: 'mistral sliding window', arch: 'mistral', dtype: 'float32' },
  { name: 'qwen2 biases + sliding layers', arch: 'qwen2', dtype: 'bfloat16', shards: 2 },
  { name: 'qwen3 q/k norms, tied', arch: 'qwen3', dtype: 'float32' },
  { name: 'gemma (1+w) norms, scaled embeddings', arch: 'gemma', dtype: 'bfloat16' },
  { name: 'gemma fp32', arch: 'gemma', dtype: 'float32', shards: 2 },
  { name: 'phi3 fused, partial rotary, longrope', arch: 'phi3', dtype: 'float32' },
  { name: 'phi3 su alias, short factors', arch: 'phi3', dtype: 'bfloat16', config: { max_position_embeddings: 64, original_max_position_embeddings: 32, rope_scaling: { type: 'su', short_factor: [1.0, 1.25], long_factor: [3.0, 4.0] } } },
  { name: 'gpt2 hub layout', arch: 'gpt2', dtype: 'float32' },
  { name: 'gpt2 bf16 sharded', arch: 'gpt2', dtype: 'bfloat16', shards: 2 },
];

const TOL = { atol: 2e-4, rtol: 2e-4 };
let counter = 0;

async function load(c: Case, seed = 1): Promise<{ ck: Checkpoint; model: CausalLM }> {
  const ck = writeCheckpoint(path.join(tmp, `m${counter++}`), c.arch, { dtype: c.dtype, shards: c.shards, config: c.config, seed });
  return { ck, model: await loadCausalLM(ck.dir) };
}

function ids2(rows: number[][]): Tensor {
  return tensor(rows.flat(), [rows.length, rows[0]!.length], { dtype: 'int32' });
}

function logitsOf(model: CausalLM, rows: number[][], opts: { mask?: number[][]; positions?: number[][] } = {}): Float32Array {
  return noGrad(() => {
    const ids = ids2(rows);
    const mask = opts.mask ? ids2(opts.mask) : undefined;
    const pos = opts.positions ? ids2(opts.positions) : undefined;
    const out = model.forward(ids, { attentionMask: mask, positionIds: pos });
    const data = out.toFloat32Array();
    for (const x of [ids, mask, pos, out]) x?.dispose();
    return data;
  });
}

/** The rows of [B·T·V] logits at the positions where keep[b][t] is 1. */
function pick(logits: ArrayLike<number>, keep: number[][], V: number): number[] {
  const out: number[] = [];
  const T = keep[0]!.length;
  keep.forEach((row, b) => row.forEach((k, t) => { if (k) for (let v = 0; v < V; v++) out.push(logits[(b * T + t) * V + v]!); }));
  return out;
}

const ROWS = [[3, 17, 42, 5, 8, 90, 1, 64, 12], [7, 7, 2, 60, 33, 11, 4, 95, 50]];

t.test('logits match the float64 references of transformers\' modeling code', async (t) => {
  for (const c of CASES) {
    const before = memory().numTensors;
    const { ck, model } = await load(c);
    const V = model.vocabSize;
    const opts = { dtype: c.dtype };
    t.equal(model.dtype, c.dtype, `${c.name}: weights kept as ${c.dtype}`);
    const head = (model.getModule('lm_head') as unknown as { weight: Tensor }).weight;
    t.equal(head === model.backbone.inputEmbedding, model.tied, `${c.name}: ${model.tied ? 'the tied head shares the embedding tensor' : 'an untied head of its own'}`);
    t.equal(model.backbone.inputEmbedding.dtype, c.dtype, `${c.name}: the embedding table kept as ${c.dtype}`);
    assertClose(t, logitsOf(model, ROWS), causalLmRef(c.arch, ck.config, ck.weights, ROWS, opts), TOL, `${c.name}: logits`);
    // right padding: the last 3 tokens of row 1 are padding
    const right = [[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0]];
    assertClose(t, pick(logitsOf(model, ROWS, { mask: right }), right, V),
      pick(causalLmRef(c.arch, ck.config, ck.weights, ROWS, { ...opts, attentionMask: right }), right, V), TOL, `${c.name}: right padding`);
    // left padding with positions from the mask, as generate() gives them
    const left = [[0, 0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]];
    const pos = left.map((r) => { let s = 0; return r.map((m) => (m ? s++ : 1)); });
    const padded = logitsOf(model, ROWS, { mask: left, positions: pos });
    assertClose(t, pick(padded, left, V), pick(causalLmRef(c.arch, ck.config, ck.weights, ROWS, { ...opts, attentionMask: left, positionIds: pos }), left, V),
      TOL, `${c.name}: left padding`);
    // padding independence: row 0's real tokens alone give the same logits (not for dynamic NTK: its
    // frequencies follow the largest position in the batch, in transformers too)
    if (c.config?.rope_scaling === undefined || (c.config.rope_scaling as { type?: string }).type !== 'dynamic') assertClose(t, pick(padded, [left[0]!, [0, 0, 0, 0, 0, 0, 0, 0, 0]], V), logitsOf(model, [ROWS[0]!.slice(4)]), { atol: 2e-5, rtol: 2e-5 },
      `${c.name}: padding does not change real positions`);
    model.dispose();
    t.equal(memory().numTensors, before, `${c.name}: no tensor left alive`);
  }
});

t.test('the GPT-2 layout saved by save_pretrained (prefixed, no buffers) loads the same', async (t) => {
  const a = writeCheckpoint(path.join(tmp, 'gpt2-hub'), 'gpt2', { seed: 3, edit: (w) => w.set('h.0.attn.bias', { shape: [1, 1, 24, 24], data: new Float64Array(576).fill(1) }) });
  const b = writeCheckpoint(path.join(tmp, 'gpt2-prefixed'), 'gpt2', {
    seed: 3, edit: (w) => { for (const [k, v] of [...w]) { w.delete(k); w.set(`transformer.${k}`, v); } },
  });
  const ma = await loadCausalLM(a.dir);
  const mb = await loadCausalLM(b.dir);
  t.same(logitsOf(ma, ROWS), logitsOf(mb, ROWS), 'same logits');
  t.ok(mb.getModule('transformer.h.1.attn.c_attn'), 'module paths are the Hugging Face names');
  ma.dispose();
  mb.dispose();
});

t.test('the KV cache, greedy generation and batching', async (t) => {
  // CASES[9] switches to long RoPE factors at position 4, for all rows of a batch at once (the
  // largest position decides, as in transformers): batched and alone differ there by design
  for (const c of [CASES[0]!, CASES[4]!, CASES[5]!, CASES[9]!, CASES[10]!, CASES[11]!]) {
    const { model } = await load(c, 5);
    const V = model.vocabSize;
    // cache vs cache-free: 5 tokens, then 2, then 2, through one cache
    const full = logitsOf(model, ROWS);
    const cache = model.createCache(2, 12);
    const parts: Float32Array[] = [];
    for (const [a, b] of [[0, 5], [5, 7], [7, 9]] as const) {
      const out = noGrad(() => {
        const ids = ids2(ROWS.map((r) => r.slice(a, b)));
        const y = model.forward(ids, { cache });
        const d = y.toFloat32Array();
        ids.dispose();
        y.dispose();
        return d;
      });
      parts.push(out);
    }
    cache.dispose();
    const stitched: number[] = [];
    for (let bRow = 0; bRow < 2; bRow++)
      for (const [i, [a, b]] of ([[0, 5], [5, 7], [7, 9]] as const).entries())
        stitched.push(...parts[i]!.subarray(bRow * (b - a) * V, (bRow + 1) * (b - a) * V));
    assertClose(t, stitched, full, { atol: 2e-5, rtol: 2e-5 }, `${c.name}: cached passes equal one full pass`);

    // greedy: each new token is the argmax of a full recompute
    const prompt = [5, 9, 13, 2];
    const gen = await model.generate(prompt, { maxNewTokens: 6, eosTokenId: null });
    t.equal(gen.length, 6, `${c.name}: 6 new tokens`);
    let seq = prompt.slice();
    let ok = true;
    for (const id of gen) {
      const l = logitsOf(model, [seq]);
      const last = l.subarray((seq.length - 1) * V);
      let best = 0;
      for (let v = 1; v < V; v++) if (last[v]! > last[best]!) best = v;
      if (best !== id) ok = false;
      seq = [...seq, id];
    }
    t.ok(ok, `${c.name}: greedy tokens are the argmax of a full recompute at every step (${gen.join(' ')})`);

    // batched prompts of different lengths (left padding) give the same tokens as one at a time
    const prompts = [[5, 9, 13, 2], [40, 1], [8, 8, 8, 30, 31, 3, 7]];
    if (c !== CASES[9]) {
      const batched = await model.generate(prompts, { maxNewTokens: 5, eosTokenId: null });
      const alone = [];
      for (const p of prompts) alone.push(await model.generate(p, { maxNewTokens: 5, eosTokenId: null }));
      t.same(batched, alone, `${c.name}: batched with left padding == one at a time`);
    }
    model.dispose();
  }
});

t.test('generate(): sampling, streaming, eos and stop sequences', async (t) => {
  const { model } = await load(CASES[0]!, 7);
  const prompt = [4, 8, 15, 16, 23, 42];
  const a = await model.generate(prompt, { maxNewTokens: 12, temperature: 1.5, seed: 11, eosTokenId: null });
  const b = await model.generate(prompt, { maxNewTokens: 12, temperature: 1.5, seed: 11, eosTokenId: null });
  const c = await model.generate(prompt, { maxNewTokens: 12, temperature: 1.5, seed: 12, eosTokenId: null });
  t.same(a, b, 'the same seed gives the same tokens');
  t.not(a.join(), c.join(), 'another seed gives other tokens');
  const greedy = await model.generate(prompt, { maxNewTokens: 12, eosTokenId: null });
  t.same(await model.generate(prompt, { maxNewTokens: 12, temperature: 0.8, topK: 1, seed: 3, eosTokenId: null }), greedy, 'topK 1 is greedy');
  const streamed: [number, number][] = [];
  const both = await model.generate([prompt, [9, 9]], { maxNewTokens: 4, eosTokenId: null, onToken: (id, i) => streamed.push([id, i]) });
  t.same(streamed.filter(([, i]) => i === 0).map(([id]) => id), both[0], 'onToken streams prompt 0\'s tokens in order');
  t.same(streamed.filter(([, i]) => i === 1).map(([id]) => id), both[1], 'and prompt 1\'s');
  const eos = greedy[3]!;
  const cut = await model.generate(prompt, { maxNewTokens: 12, eosTokenId: eos });
  t.same(cut, greedy.slice(0, greedy.indexOf(eos) + 1), 'stops after the eos id, which it returns');
  t.same(await model.generate(prompt, { maxNewTokens: 12, eosTokenId: null, stop: [greedy.slice(2, 4)] }), greedy.slice(0, 4), 'stops after a stop sequence');
  t.same(await model.generate(prompt, { maxNewTokens: 0 }), [], 'maxNewTokens 0 gives nothing');
  const ctl = new AbortController();
  const partial = await model.generate(prompt, { maxNewTokens: 12, eosTokenId: null, signal: ctl.signal, onToken: () => ctl.abort() });
  t.equal(partial.length, 1, 'an aborted signal stops after the current step');
  let ticks = 0;
  const timer = setInterval(() => ticks++, 0);
  await model.generate(prompt, { maxNewTokens: 12, eosTokenId: null });
  clearInterval(timer);
  t.ok(ticks > 0, `the event loop turns while generating (${ticks} timer ticks)`);
  model.dispose();
});

t.test('the sampler\'s processors on hand-worked logits', async (t) => {
  const logits = Float32Array.from([Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)]);
  const draw = (s: Partial<{ temperature: number; topK: number; topP: number; minP: number; repetitionPenalty: number }>, history: number[] = []) => {
    const rng = new Rng(1);
    const counts = [0, 0, 0, 0];
    for (let i = 0; i < 4000; i++) counts[pickToken(logits, history, { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, ...s }, rng)]!++;
    return counts.map((n) => n / 4000);
  };
  const near = (got: number[], want: number[], what: string) => t.ok(got.every((g, i) => Math.abs(g - want[i]!) < 0.03), `${what}: ${got.join(', ')} ~ ${want.join(', ')}`);
  near(draw({}), [0.5, 0.3, 0.15, 0.05], 'plain sampling follows softmax');
  near(draw({ topK: 2 }), [0.5 / 0.8, 0.3 / 0.8, 0, 0], 'topK 2 keeps the two most likely');
  // top_p 0.7: ascending cumulative 0.05, 0.20, 0.50 <= 0.3 removes the two least likely
  near(draw({ topP: 0.7 }), [0.5 / 0.8, 0.3 / 0.8, 0, 0], 'topP 0.7 keeps the nucleus');
  // min_p 0.5: below 0.25 is dropped
  near(draw({ minP: 0.5 }), [0.5 / 0.8, 0.3 / 0.8, 0, 0], 'minP 0.5 drops tokens under half the top probability');
  near(draw({ temperature: 0.5 }), [0.25, 0.09, 0.0225, 0.0025].map((p) => p / 0.365), 'temperature 0.5 squares the probabilities');
  // repetition penalty 2 on token 0: its logit log(0.5) < 0 is multiplied by 2 -> weight 0.25
  t.equal(pickToken(logits, [0], { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 2 }, null), 1, 'repetition penalty moves greedy off a seen token');
  t.equal(pickToken(Float32Array.from([1, 3, 3, 0]), [], { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 }, null), 1, 'greedy picks the first maximum');
});

t.test('causalLmLoss: shift by one, -100 ignored, mean over counted tokens', async (t) => {
  const { ck, model } = await load(CASES[6]!, 9);
  const V = model.vocabSize;
  const labels = [[3, 17, -100, 5, 8, 90, 1, 64, 12], [-100, -100, 2, 60, 33, 11, 4, -100, -100]];
  const ref = causalLmRef('qwen3', ck.config, ck.weights, ROWS);
  let sum = 0;
  let count = 0;
  for (let b = 0; b < 2; b++)
    for (let tt = 0; tt + 1 < 9; tt++) {
      const y = labels[b]![tt + 1]!;
      if (y === -100) continue;
      const row = ref.subarray((b * 9 + tt) * V, (b * 9 + tt + 1) * V);
      const m = Math.max(...row);
      const lse = m + Math.log(row.reduce((a, z) => a + Math.exp(z - m), 0));
      sum += lse - row[y]!;
      count++;
    }
  const ids = ids2(ROWS);
  const lab = ids2(labels);
  const logits = model.forward(ids);
  const loss = causalLmLoss(logits, lab);
  t.ok(Math.abs(loss.item() - sum / count) < 1e-4, `loss ${loss.item()} == reference ${sum / count} over ${count} tokens`);
  const none = ids2(labels.map((r) => r.map(() => -100)));
  t.ok(Number.isNaN(causalLmLoss(logits, none).item()), 'NaN when no token counts, as transformers');
  for (const x of [ids, lab, logits, loss, none]) x.dispose();
  model.dispose();
});

t.test('LoRA on a loaded model: PEFT names, training gradients, adapter files', async (t) => {
  const { model } = await load(CASES[0]!, 13);
  const info = applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 4, alpha: 8, seed: 1 });
  t.same(info.modules, ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj'], 'targets by Hugging Face path');
  t.equal(model.parameters().length, 8, 'only lora_A/lora_B train');
  for (const l of loraLayers(model).values()) l.loraB.assign(new Float32Array(l.loraB.size).fill(0.01));
  const ids = ids2(ROWS);
  const labels = ids2(ROWS);
  const loss = causalLmLoss(model.forward(ids), labels);
  loss.backward();
  const grads = model.parameters().map((p) => p.grad?.toFloat32Array() ?? new Float32Array());
  t.ok(grads.every((g) => g.length > 0 && g.some((v) => v !== 0) && g.every(Number.isFinite)), 'every LoRA tensor gets a finite, non-zero gradient');
  // one element of lora_A by central differences on the same loss
  const A = [...loraLayers(model).values()][0]!.loraA;
  const base = A.toFloat32Array();
  const at = (delta: number) => {
    const v = base.slice();
    v[5] = v[5]! + delta;
    A.assign(v);
    return noGrad(() => {
      const y = model.forward(ids);
      const l = causalLmLoss(y, labels);
      const r = l.item();
      y.dispose();
      l.dispose();
      return r;
    });
  };
  const fd = (at(1e-2) - at(-1e-2)) / 2e-2;
  A.assign(base);
  t.ok(Math.abs(fd - grads[0]![5]!) < 2e-3 + 2e-2 * Math.abs(fd), `dL/dA[5] ${grads[0]![5]} ~ finite difference ${fd}`);
  // a right-padded batch (how training batches come): the padding's token ids change no gradient
  const gradsFor = (padId: number) => {
    model.zeroGrad();
    const mask = [[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]];
    const rows = ROWS.map((r, b) => r.map((id, i) => (mask[b]![i] ? id : padId)));
    const lab = ids2(rows.map((r, b) => r.map((id, i) => (mask[b]![i] ? id : -100))));
    const x = ids2(rows);
    const m = ids2(mask);
    const l = causalLmLoss(model.forward(x, { attentionMask: m }), lab);
    l.backward();
    for (const z of [lab, x, m, l]) z.dispose();
    return model.parameters().map((p) => Array.from(p.grad!.toFloat32Array()));
  };
  t.same(gradsFor(0), gradsFor(77), 'right padding: gradients do not depend on the padding tokens');
  model.zeroGrad();
  const dir = path.join(tmp, 'adapter');
  saveLoraAdapter(model, dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  t.same(cfg.target_modules, ['q_proj', 'v_proj'], 'adapter_config target_modules');
  t.equal(cfg.fan_in_fan_out, false, 'Linear layers: fan_in_fan_out false');
  const trained = noGrad(() => { const y = model.forward(ids); const d = y.toFloat32Array(); y.dispose(); return d; });
  const other = await loadCausalLM(path.join(tmp, `m${counter - 1}`));
  applyLora(other, { targetModules: ['q_proj', 'v_proj'], rank: 4, alpha: 8, seed: 2 });
  t.same(loadLoraAdapter(other, dir).length, 4, 'loadLoraAdapter fills the same four modules of a fresh load');
  assertClose(t, noGrad(() => { const y = other.forward(ids); const d = y.toFloat32Array(); y.dispose(); return d; }), trained,
    { atol: 1e-6, rtol: 1e-6 }, 'and gives the same logits');
  other.dispose();
  for (const x of [ids, labels, loss]) x.dispose();
  model.dispose();

  const g = await load(CASES[11]!, 13);
  applyLora(g.model, { targetModules: ['c_attn'], rank: 2, seed: 1 });
  saveLoraAdapter(g.model, path.join(tmp, 'adapter-gpt2'));
  t.equal(JSON.parse(fs.readFileSync(path.join(tmp, 'adapter-gpt2', 'adapter_config.json'), 'utf8')).fan_in_fan_out, true, 'GPT-2 Conv1D: fan_in_fan_out true, as PEFT sets it');
  g.model.dispose();
});
