// One model benchmark in its own process (so peak RSS is this case's), with the command line and
// output of bench/torch_llm.py: loads the Hugging Face folder with loadCausalLM, then
//   prefill: T=512 B=1, the last position's logits (as generate() asks for)
//   decode: B=1|8 prompt=128 steps=32 with a KV cache; only the steps are timed
//   train: B=4 T=256, LoRA r=16 alpha=32 on every projection, AdamW, gc=0|1 (gradient checkpointing),
//          fused=1|0 (model.loss: head + cross-entropy in row chunks, default; 0: causalLmLoss on the logits)
//   mp=bf16 (any case): loadCausalLM's matmulPrecision 'bf16' (bf16 dot products for the bf16
//          projections and head outside the LoRA layers, whose frozen base dots bf16 already)
//   node dist/bench/llm_child.js CASE CONFIG DTYPE THREADS REPS WARMUP DIR [key=value ...]
// Prints one JSON line: medianMs, minMs, reps, rssAfterLoadMB, peakRssMB, tokens, tokensPerS.
import * as fs from 'fs';
import { AdamW, applyLora, causalLmLoss, loadCausalLM, loraLayers, manualSeed, noGrad, setNumThreads, tensor, Tensor, tidy } from '../lib/index';
import { CausalLM } from '../lib/models/causal_lm';
import { argmaxLast, randomF32, runMain } from './common';

const statusMB = (field: string) => {
  const line = fs.readFileSync('/proc/self/status', 'utf8').split('\n').find((l) => l.startsWith(`${field}:`));
  return line ? Number(line.split(/\s+/)[1]) / 1024 : NaN;
};

function ids(B: number, T: number, V: number, seed: number): Tensor {
  let x = seed;
  return tensor(Array.from({ length: B * T }, () => ((x = (x * 1103515245 + 12345) >>> 0) >>> 8) % V), [B, T], { dtype: 'int32' });
}

async function main(): Promise<void> {
  const [name, config, dtype, threads, reps, warmup, dir, ...rest] = process.argv.slice(2);
  const kv = Object.fromEntries(rest.map((a) => a.split('=') as [string, string]));
  setNumThreads(Number(threads));
  manualSeed(0);
  const model: CausalLM = await loadCausalLM(dir!, { dtype: dtype === 'bf16' ? 'bfloat16' : 'float32', matmulPrecision: kv.mp === 'bf16' ? 'bf16' : 'fp32' });
  const V = model.vocabSize;
  const out: Record<string, unknown> = { case: name, config, dtype, threads: Number(threads), matmulPrecision: model.matmulPrecision };
  let fn: () => number | void;
  if (name === 'prefill') {
    const T = Number(kv.T ?? 512);
    const x = ids(1, T, V, 3);
    const positions = Int32Array.from({ length: T }, (_, i) => i);
    fn = () => noGrad(() => tidy(() => { model.run(x, positions, null, null, true).toFloat32Array(); }));
    Object.assign(out, { T, tokens: T });
  } else if (name === 'decode') {
    const B = Number(kv.B ?? 1), P = Number(kv.prompt ?? 128), S = Number(kv.steps ?? 32);
    const prompt = ids(B, P, V, 5);
    fn = () => noGrad(() => {
      using cache = model.createCache(B, P + S);
      let next = tidy(() => argmaxLast(model.forward(prompt, { cache })));
      const t0 = performance.now();
      for (let s = 0; s < S; s++) {
        const step = tensor(next, [B, 1], { dtype: 'int32' });
        next = tidy(() => argmaxLast(model.forward(step, { cache })));
        step.dispose();
      }
      return performance.now() - t0;
    });
    Object.assign(out, { B, prompt: P, steps: S, tokens: B * S });
  } else if (name === 'train') {
    const B = Number(kv.B ?? 4), T = Number(kv.T ?? 256), r = Number(kv.rank ?? 16), alpha = Number(kv.alpha ?? 32);
    applyLora(model, { targetModules: 'all-linear', rank: r, alpha, seed: 1 });
    // lora_B non-zero (as torch_llm.py does) so the backward does real work
    let seed = 11;
    for (const l of loraLayers(model).values()) l.loraB.assign(randomF32(l.loraB.size, seed++, 0.02 * Math.sqrt(12)));
    model.train();
    model.gradientCheckpointing = kv.gc === '1';
    const opt = new AdamW(model.parameters(), { lr: 1e-4 });
    const x = ids(B, T, V, 7);
    fn = () => {
      tidy(() => (kv.fused === '0' ? causalLmLoss(model.forward(x), x) : model.loss(x, x)).backward());
      opt.step();
      opt.zeroGrad();
    };
    Object.assign(out, { B, T, rank: r, gc: model.gradientCheckpointing, fused: kv.fused !== '0', trainable: model.parameters().reduce((s, p) => s + p.size, 0), tokens: B * T });
  } else {
    throw new Error(`unknown case ${name}`);
  }
  out.rssAfterLoadMB = process.memoryUsage().rss / 2 ** 20;
  for (let i = 0; i < Number(warmup); i++) fn();
  const times: number[] = [];
  for (let i = 0; i < Number(reps); i++) {
    const t0 = performance.now();
    const inner = fn();
    times.push(typeof inner === 'number' ? inner : performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const medianMs = times.length % 2 ? times[times.length >> 1]! : (times[times.length / 2 - 1]! + times[times.length / 2]!) / 2;
  Object.assign(out, { medianMs, minMs: times[0], reps: times.length, timesMs: times, peakRssMB: statusMB('VmHWM') });
  out.tokensPerS = (out.tokens as number) / (medianMs / 1e3);
  process.stdout.write(JSON.stringify(out) + '\n');
  model.dispose();
}

runMain(main);
