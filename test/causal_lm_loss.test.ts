// CausalLM.loss(): the fused head + cross-entropy (linearCrossEntropy in row chunks) gives the loss
// and every gradient that causalLmLoss gives on the materialised logits — tied and untied heads,
// float32 and bfloat16 weights, padding masks on either side, packed rows, labels of -100 (whole
// rows of them), gradient checkpointing, evaluation under noGrad — and a head with a LoRA adapter
// takes the unfused path. The op's peak memory at vocab 49152 stays near two chunks of logits
// (memory().cpuPeakBytes). The op against its float64 reference on every device is
// test/ref/loss_ref.ts's parity cases.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  applyLora, causalLmLoss, linearCrossEntropy, LoraError, LoraRangeError, loadCausalLM, manualSeed, memory, noGrad,
  resetPeakMemory, tensor, Tensor, tidy,
} from '../lib/index';
import type { CausalLM } from '../lib/models/causal_lm';
import type { LossOptions } from '../lib/index';
import { assertClose, assertLoraError, leakChecked } from './helpers';
import { Arch, writeCheckpoint } from './hf_checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cm-loss-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const values = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(seed * 7.3 + i * 1.7) * 0.9);
const ints = (a: number[], shape: number[]) => tensor(a, shape, { dtype: 'int32' });

interface Setup {
  arch: Arch;
  config: Record<string, unknown>;
  dtype?: 'float32' | 'bfloat16';
  gc?: boolean;
  headLora?: boolean;
}

async function lora(dir: string, s: Setup): Promise<CausalLM> {
  manualSeed(7);
  const model = await loadCausalLM(dir, { dtype: s.dtype ?? 'float32' });
  applyLora(model, { targetModules: s.headLora ? /(q_proj|v_proj|c_attn|lm_head)$/ : 'all-linear', rank: 4, alpha: 8, seed: 1 });
  for (const p of model.parameters()) if (p.shape[1] === 4) p.assign(values(p.size, p.size)); // lora_B non-zero
  model.train();
  model.gradientCheckpointing = s.gc ?? false;
  return model;
}

// [B, T] = [3, 11]: row 0 right-padded by 3 (labels -100 there), row 1 left-padded by 2 with its
// prompt masked (-100), row 2 with every label -100 (no token counts).
function batch(V: number) {
  const B = 3, T = 11;
  const ids: number[] = [], labels: number[] = [], mask: number[] = [], pos: number[] = [];
  for (let b = 0; b < B; b++)
    for (let i = 0; i < T; i++) {
      const pad = (b === 0 && i >= T - 3) || (b === 1 && i < 2);
      const id = (b * 131 + i * 37 + 5) % V;
      ids.push(pad ? 0 : id);
      mask.push(pad ? 0 : 1);
      labels.push(pad || (b === 1 && i < 5) || b === 2 ? -100 : id);
      pos.push(b === 1 ? Math.max(0, i - 2) : i);
    }
  return { B, T, ids, labels, mask, pos };
}

async function compareWithUnfused(t: Test, dir: string, s: Setup, V: number, packed = false): Promise<void> {
  const { B, T, ids, labels, mask, pos } = batch(V);
  const run = async (fused: boolean) => {
    const model = await lora(dir, s);
    const x = ints(ids, [B, T]), y = ints(labels, [B, T]), m = ints(mask, [B, T]), p = ints(pos, [B, T]);
    const opts: LossOptions = packed
      ? { positionIds: ints(ids.map((_, i) => (i % T) % 6), [B, T]), segmentIds: ints(ids.map((_, i) => Math.floor((i % T) / 6)), [B, T]) }
      : { attentionMask: m, positionIds: p };
    const loss = tidy(() => {
      const l = fused ? model.loss(x, y, opts) : causalLmLoss(model.forward(x, opts), y);
      l.backward();
      return l.item();
    });
    const grads = model.parameters().map((q) => q.grad!.toFloat32Array());
    for (const z of [x, y, m, p, opts.positionIds, opts.segmentIds]) z?.dispose();
    model.dispose();
    return { loss, grads };
  };
  const plain = await run(false);
  const fused = await run(true);
  t.ok(Number.isFinite(plain.loss) && plain.loss > 0, `loss ${plain.loss}`);
  t.ok(Math.abs(fused.loss - plain.loss) <= 1e-6 * Math.abs(plain.loss), `loss ${fused.loss} fused vs ${plain.loss} unfused`);
  t.equal(fused.grads.length, plain.grads.length, `the same ${plain.grads.length} parameters`);
  // fp32 sums in another order (the head's products per chunk, the loss over counted rows): errors
  // relative to each gradient's largest value
  fused.grads.forEach((g, i) => {
    const scale = plain.grads[i]!.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    assertClose(t, g, plain.grads[i]!, { atol: 1e-5 * scale, rtol: 2e-4 }, `gradient ${i} of ${plain.grads.length}`);
  });
}

type Test = Parameters<Parameters<typeof leakChecked>[2]>[0];

const SETUPS: { name: string; s: Setup; packed?: boolean }[] = [
  { name: 'llama, tied head, vocab 61', s: { arch: 'llama', config: { tie_word_embeddings: true, vocab_size: 61 } } },
  { name: 'llama, untied head, vocab 97, gradient checkpointing', s: { arch: 'llama', config: {}, gc: true } },
  { name: 'llama, bfloat16 weights, tied head', s: { arch: 'llama', config: { tie_word_embeddings: true, vocab_size: 61 }, dtype: 'bfloat16' } },
  { name: 'llama, packed rows (segment ids)', s: { arch: 'llama', config: { vocab_size: 61 } }, packed: true },
  { name: 'gpt2 (tied, learned positions)', s: { arch: 'gpt2', config: {} } },
  { name: 'llama, LoRA on lm_head: the unfused path', s: { arch: 'llama', config: { vocab_size: 61 }, headLora: true } },
];

for (const { name, s, packed } of SETUPS) {
  leakChecked(t, `model.loss() equals causalLmLoss(model.forward()): ${name}`, async (t) => {
    const ck = writeCheckpoint(path.join(tmp, name.replace(/\W+/g, '_')), s.arch, { config: s.config, seed: 3, dtype: s.dtype });
    await compareWithUnfused(t, ck.dir, s, (ck.config.vocab_size as number) ?? 97, packed);
  });
}

leakChecked(t, 'model.loss() under noGrad: the same value, nothing recorded, nothing kept', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'nograd'), 'llama', { config: { vocab_size: 61 }, seed: 4 });
  const model = await lora(ck.dir, { arch: 'llama', config: {} });
  const { B, T, ids, labels, mask } = batch(61);
  const x = ints(ids, [B, T]), y = ints(labels, [B, T]), m = ints(mask, [B, T]);
  const want = noGrad(() => tidy(() => causalLmLoss(model.forward(x, { attentionMask: m }), y).item()));
  const before = memory().numTensors;
  const loss = noGrad(() => model.loss(x, y, { attentionMask: m }));
  t.equal(memory().numTensors, before + 1, 'only the loss is live');
  t.equal(loss.requiresGrad, false, 'records no gradient');
  t.ok(Math.abs(loss.item() - want) <= 1e-6 * want, `loss ${loss.item()} vs ${want}`);
  // every label ignored: NaN, as causalLmLoss gives
  const none = ints(labels.map(() => -100), [B, T]);
  t.ok(Number.isNaN(tidy(() => model.loss(x, none).item())), 'NaN when no token counts');
  for (const z of [x, y, m, none, loss]) z.dispose();
  model.dispose();
});

leakChecked(t, 'model.loss(): argument errors', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'errors'), 'llama', { config: { vocab_size: 61 }, seed: 5 });
  const model = await loadCausalLM(ck.dir);
  const x = ints([1, 2, 3, 4], [2, 2]);
  const bad = (labels: Tensor, what: string, cls: new (...a: never[]) => Error, code: string, message: RegExp) => {
    assertLoraError(t, () => model.loss(x, labels), cls, code, message, what);
    labels.dispose();
  };
  bad(ints([1, 2, 3], [1, 3]), 'labels of another shape', LoraError, 'ERR_LORA_SHAPE', /^Expected labels of shape \[2, 2\] for ids of shape \[2, 2\] but received \[1, 3\]$/);
  bad(tensor([1, 2, 3, 4], [2, 2]), 'float32 labels', LoraError, 'ERR_LORA_DTYPE', /^Expected an int32 labels but received float32$/);
  bad(ints([0, 61, 0, 5], [2, 2]), 'a label past the vocabulary', LoraRangeError, 'ERR_LORA_RANGE', /^Expected token ids between 0 and 60 \(or -100\) for labels but received 61 \(number\)$/);
  const y = ints([1, 2, 3, 4], [2, 2]);
  const cache = model.createCache(2, 4);
  assertLoraError(t, () => model.loss(x, y, { cache } as never), LoraError, 'ERR_LORA_OPTION', /^Unknown option 'cache' for CausalLM\.loss\(\)/, 'a cache');
  cache.dispose();
  assertLoraError(t, () => model.loss(x, y, { attentionmask: y } as never), LoraError, 'ERR_LORA_OPTION', /did you mean 'attentionMask'\?$/, 'a misspelt option');
  for (const z of [x, y]) z.dispose();
  model.dispose();
});

leakChecked(t, 'linearCrossEntropy at vocab 49152: peak memory about one chunk of logits, not the logits and their gradient', (t) => {
  const B = 4, T = 512, C = 24, V = 49152, chunk = 16;
  const logitsBytes = B * T * V * 4;
  const x = tensor(values(B * T * C, 1), [B, T, C], { requiresGrad: true });
  const w = tensor(values(V * C, 2), [V, C]);
  const labels = ints(Array.from({ length: B * T }, (_, i) => (i % 9 === 0 ? -100 : (i * 7919) % V)), [B, T]);
  const measure = (chunkSize: number | undefined) => {
    const base = memory().cpuBytes;
    resetPeakMemory();
    const loss = linearCrossEntropy(x, w, labels, chunkSize ? { chunkSize } : undefined);
    loss.backward();
    const peak = memory().cpuPeakBytes - base;
    const value = loss.item();
    loss.dispose();
    x.grad!.dispose();
    x.grad = null;
    return { peak, value };
  };
  const small = measure(chunk);
  const byDefault = measure(undefined);
  // one [chunk, V] buffer (the logits, then their gradient in place) and row-sized ones ([N, C]
  // gradients, [chunk, C])
  const rowBytes = 6 * B * T * C * 4 + 64 * 1024;
  t.ok(small.peak <= chunk * V * 4 + rowBytes, `chunk ${chunk}: peak ${small.peak} bytes (one chunk ${chunk * V * 4}; the logits alone ${logitsBytes})`);
  // at most 128 MB of logits (682 rows), in equal chunks: the 1820 counted rows as 3 of 607
  const counted = B * T - Math.ceil(B * T / 9);
  const defaultChunk = Math.ceil(counted / Math.ceil(counted / Math.floor((1 << 25) / V)));
  t.equal(defaultChunk, 607);
  t.ok(byDefault.peak <= defaultChunk * V * 4 + rowBytes, `default chunk (${defaultChunk} rows): peak ${byDefault.peak} bytes = ${(byDefault.peak / logitsBytes).toFixed(3)} of the logits`);
  t.ok(Math.abs(small.value - byDefault.value) <= 1e-6 * byDefault.value, 'the same loss with either chunk size');
  for (const z of [x, w, labels]) z.dispose();
});
