// Gradient checkpointing and the memory of a training step: checkpoint() gives the same outputs,
// gradients and dropout masks as the plain tape (bit for bit) and frees its function's
// intermediates; CausalLM.gradientCheckpointing on random Llama and GPT-2 checkpoints with LoRA on
// every linear layer (dropout on) gives the same loss and LoRA gradients with less peak memory
// (Phi-3 too), and the recomputation skips the product of each layer's last projection;
// causalLmLoss at vocab 49152 holds one logits-sized tensor (the gradient) beyond the logits.
// Peaks are the live native bytes the binding counts (memory().cpuPeakBytes).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  add, applyLora, ApplyLoraOptions, causalLmLoss, checkpoint, dropout, LoraTypeError, LoraLinear, loadCausalLM, manualSeed, memory,
  mul, noGrad, resetPeakMemory, silu, tensor, Tensor, tidy,
} from '../lib/index';
import { native } from '../lib/native';
import { defaultRng } from '../lib/random';
import { assertLoraError, leakChecked } from './helpers';
import { Arch, writeCheckpoint } from './hf_checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-checkpoint-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const values = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(seed * 7.3 + i * 1.7) * 0.9);

leakChecked(t, 'checkpoint(): same output, gradients and dropout masks as the plain tape', (t) => {
  const run = (useCheckpoint: boolean) => {
    manualSeed(42);
    const layer = new LoraLinear({ inFeatures: 12, outFeatures: 12, rank: 3, dropout: 0.3, seed: 5 });
    layer.loraB.assign(values(layer.loraB.size, 3));
    layer.train();
    const x = tensor(values(5 * 12, 1), [5, 12], { requiresGrad: true });
    const block = (h: Tensor) => add(h, dropout(silu(layer.forward(h)), 0.2));
    const out = tidy(() => {
      const y = useCheckpoint ? checkpoint((h) => block(block(h)), [x]) : block(block(x));
      const loss = mul(y, y).sum();
      loss.backward();
      return { y: y.toFloat32Array(), loss: loss.item() };
    });
    const grads = [x, layer.loraA, layer.loraB].map((p) => p.grad!.toFloat32Array());
    const rngAfter = defaultRng().getState();
    x.dispose();
    layer.dispose();
    return { ...out, grads, rngAfter };
  };
  const plain = run(false);
  const ck = run(true);
  t.same(ck.y, plain.y, 'output bit-identical (dropout masks drawn once, replayed)');
  t.equal(ck.loss, plain.loss, 'loss bit-identical');
  t.same(ck.grads, plain.grads, 'gradients of the input, lora_A and lora_B bit-identical');
  t.same(ck.rngAfter, plain.rngAfter, 'the global generator advanced as much as without checkpointing');
});

leakChecked(t, 'checkpoint(): intermediates freed in the forward, only the inputs kept', (t) => {
  const w = tensor(values(64 * 64, 2), [64, 64], { requiresGrad: true });
  const x = tensor(values(256 * 64, 4), [256, 64]);
  const chain = (h: Tensor) => {
    for (let i = 0; i < 6; i++) h = silu(h.matmul(w));
    return h;
  };
  const liveAfterForward = (useCheckpoint: boolean) => tidy(() => {
    const before = memory().cpuBytes;
    const y = useCheckpoint ? checkpoint(chain, [x]) : chain(x);
    const held = memory().cpuBytes - before;
    y.sum().backward();
    return held;
  });
  const plain = liveAfterForward(false);
  const gw = w.grad!.toFloat32Array();
  w.zeroGrad();
  const ck = liveAfterForward(true);
  t.equal(ck, 256 * 64 * 4, `checkpointed: only the output is live after the forward (${ck} bytes; plain tape ${plain})`);
  t.ok(plain >= 12 * 256 * 64 * 4, 'the plain tape holds every intermediate');
  t.same(w.grad!.toFloat32Array(), gw, 'the weight gradient is the same');
  // an input that needs no gradient and a function that reads no parameter: nothing recorded
  const y = checkpoint((h) => silu(h), [x]);
  t.equal(y.requiresGrad, false, 'no gradient needed: the output records none');
  for (const z of [w, x, y]) z.dispose();
});

leakChecked(t, 'checkpoint(): argument errors', (t) => {
  const x = tensor([1, 2], [2]);
  assertLoraError(t, () => checkpoint('f' as never, [x]), LoraTypeError, 'ERR_LORA_TYPE', /Expected a function for fn but received/, 'fn not a function');
  assertLoraError(t, () => checkpoint((h) => h, x as never), LoraTypeError, 'ERR_LORA_TYPE', /Expected an array of Tensors for inputs/, 'inputs not an array');
  assertLoraError(t, () => checkpoint((h) => h, [1 as never]), LoraTypeError, 'ERR_LORA_TYPE', /inputs\[0\]/, 'inputs[0] not a tensor');
  assertLoraError(t, () => checkpoint(() => 3 as never, [x]), LoraTypeError, 'ERR_LORA_TYPE', /Expected a Tensor for checkpoint\(\) callback result but received 3/, 'fn returns a number');
  x.dispose();
});

/**
 * One training step of a checkpoint folder with LoRA applied (lora_B made non-zero, training mode,
 * manualSeed(seed) first): the loss, every trainable gradient, and the step's peak of live native
 * bytes. `backward` runs the loss's backward (to count or time inside it).
 */
async function loraStep(dir: string, lora: ApplyLoraOptions, rows: number[], [B, T]: [number, number], gc: boolean, seed: number,
  backward: (loss: Tensor) => void = (l) => l.backward()) {
  manualSeed(seed);
  const model = await loadCausalLM(dir);
  applyLora(model, lora);
  for (const p of model.parameters()) if (p.ndim === 2 && p.shape[1] === lora.rank) p.assign(values(p.size, p.size)); // lora_B non-zero
  model.train();
  model.gradientCheckpointing = gc;
  const ids = tensor(rows, [B, T], { dtype: 'int32' });
  const base = memory().cpuBytes;
  resetPeakMemory();
  const loss = tidy(() => {
    const l = causalLmLoss(model.forward(ids), ids);
    backward(l);
    return l.item();
  });
  const peak = memory().cpuPeakBytes - base;
  const grads = model.parameters().map((p) => p.grad!.toFloat32Array());
  ids.dispose();
  model.dispose();
  return { loss, grads, peak };
}

// Three layers with the bench's SmolLM2 proportions at toy size: enough layers that activations dominate.
const CONFIGS: { arch: Arch; config: Record<string, unknown> }[] = [
  { arch: 'llama', config: { num_hidden_layers: 4, tie_word_embeddings: true, vocab_size: 61 } },
  { arch: 'gpt2', config: { n_layer: 4 } },
  { arch: 'phi3', config: { num_hidden_layers: 4 } },
];

for (const { arch, config } of CONFIGS) {
  leakChecked(t, `${arch}: gradientCheckpointing gives the same loss and LoRA gradients with less memory`, async (t) => {
    const ck = writeCheckpoint(path.join(tmp, arch), arch, { config, seed: 3 });
    const B = 2, T = 16;
    const rows = Array.from({ length: B * T }, (_, i) => (i * 37 + 11) % 61);
    const step = (gc: boolean) => loraStep(ck.dir, { targetModules: 'all-linear', rank: 4, alpha: 8, dropout: 0.1, seed: 1 }, rows, [B, T], gc, 7);
    const plain = await step(false);
    const gc = await step(true);
    t.ok(Number.isFinite(plain.loss), `loss ${plain.loss}`);
    t.equal(gc.loss, plain.loss, 'loss bit-identical');
    t.equal(gc.grads.length, plain.grads.length, 'the same parameters');
    t.same(gc.grads, plain.grads, 'every LoRA gradient bit-identical (dropout 0.1 in training mode)');
    t.ok(gc.peak < 0.6 * plain.peak, `peak memory of the step: ${gc.peak} bytes checkpointed, ${plain.peak} without`);
  });
}

// The recomputation of a layer skips the product of its last projection (down_proj: its output is
// the layer's output, which the backward never reads); the LoRA h it needs is kept from the first run.
// Counted at the binding during backward(): each layer's projections but down_proj run again.
const LAYOUTS: { name: string; lora: ApplyLoraOptions; skipped: boolean }[] = [
  { name: 'LoRA on every projection (down_proj a LoraLinear)', lora: { targetModules: 'all-linear', rank: 3, alpha: 6, dropout: 0.2, seed: 2 }, skipped: true },
  { name: 'LoRA on q_proj, v_proj (down_proj a plain Linear)', lora: { targetModules: ['q_proj', 'v_proj'], rank: 3, alpha: 6, seed: 2 }, skipped: true },
  { name: 'DoRA (several ops: recomputed in full)', lora: { targetModules: 'all-linear', rank: 3, alpha: 6, useDora: true, seed: 2 }, skipped: false },
];
LAYOUTS.forEach((layout, n) => {
  leakChecked(t, `llama: the recomputation skips down_proj's product — ${layout.name}`, async (t) => {
    const L = 3;
    const ck = writeCheckpoint(path.join(tmp, `skip-${n}`), 'llama', { config: { num_hidden_layers: L }, seed: 4 });
    const B = 2, T = 7, HID = 40, INTER = 72;
    const rows = Array.from({ length: B * T }, (_, i) => (i * 29 + 5) % 97);
    const step = async (gc: boolean) => {
      const calls = { lora: 0, downGemm: 0, gemm: 0 };
      const { loraForward, gemm } = native;
      const r = await loraStep(ck.dir, layout.lora, rows, [B, T], gc, 3, (l) => {
        native.loraForward = (...a: Parameters<typeof loraForward>) => { calls.lora++; return loraForward(...a); };
        native.gemm = (...a: Parameters<typeof gemm>) => {
          calls.gemm++;
          if (a[3] === B * T && a[4] === HID && a[5] === INTER && a[7]) calls.downGemm++; // x·Wᵀ of down_proj: [BT, 72]·[40, 72]ᵀ
          return gemm(...a);
        };
        try {
          l.backward();
        } finally {
          native.loraForward = loraForward;
          native.gemm = gemm;
        }
      });
      return { ...r, calls };
    };
    const plain = await step(false);
    const gc = await step(true);
    t.equal(gc.loss, plain.loss, 'loss bit-identical');
    t.same(gc.grads, plain.grads, 'every trainable gradient bit-identical');
    t.equal(plain.calls.lora, 0, 'without checkpointing the backward runs no LoRA forward');
    // doraLinear multiplies the product by its magnitude scale, whose gradient reads it: no skipping
    if (!layout.skipped) t.equal(gc.calls.lora, 7 * L, "DoRA: the recomputation runs every layer's 7 products, down_proj's too");
    else if (layout.lora.targetModules === 'all-linear') t.equal(gc.calls.lora, 6 * L, `the recomputation runs 6 of each layer's 7 LoRA products (${gc.calls.lora} for ${L} layers)`);
    else {
      t.equal(gc.calls.lora, 2 * L, 'q_proj and v_proj recomputed in every layer');
      t.equal(gc.calls.downGemm, 0, "no x·Wᵀ of down_proj in the recomputation");
    }
  });
});

leakChecked(t, 'gradientCheckpointing: a boolean', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'flag'), 'llama', { seed: 1 });
  const model = await loadCausalLM(ck.dir);
  t.equal(model.gradientCheckpointing, false, 'off by default');
  assertLoraError(t, () => { model.gradientCheckpointing = 'yes' as never; }, LoraTypeError, 'ERR_LORA_TYPE',
    /Expected a boolean for gradientCheckpointing but received/, 'a string');
  model.gradientCheckpointing = true;
  // without anything trainable nothing records: generation-style passes are unaffected
  const ids = tensor([1, 2, 3], [1, 3], { dtype: 'int32' });
  const a = noGrad(() => tidy(() => model.forward(ids).toFloat32Array()));
  model.gradientCheckpointing = false;
  t.same(tidy(() => model.forward(ids).toFloat32Array()), a, 'the same logits either way');
  ids.dispose();
  model.dispose();
});

leakChecked(t, 'causalLmLoss at vocab 49152: one logits-sized tensor beyond the logits (the gradient)', (t) => {
  const B = 2, T = 24, V = 49152;
  const logitsBytes = B * T * V * 4;
  const logits = tensor(values(B * T * V, 9), [B, T, V], { requiresGrad: true });
  const labels = tensor(Array.from({ length: B * T }, (_, i) => (i * 7919) % V), [B, T], { dtype: 'int32' });
  const base = memory().cpuBytes;
  resetPeakMemory();
  const loss = causalLmLoss(logits, labels);
  const forwardPeak = memory().cpuPeakBytes - base;
  loss.backward();
  const peak = memory().cpuPeakBytes - base;
  t.ok(forwardPeak < 0.01 * logitsBytes, `the forward keeps ${forwardPeak} bytes (one log-sum-exp per row), not a softmax`);
  t.ok(peak >= logitsBytes && peak < 1.01 * logitsBytes, `peak beyond the logits: ${peak} bytes = ${(peak / logitsBytes).toFixed(3)} logits`);
  t.ok(Number.isFinite(loss.item()), 'finite loss');
  for (const x of [logits, labels, loss]) x.dispose();
});
