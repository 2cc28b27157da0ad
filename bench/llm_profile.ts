// Where a LoRA training step's time goes: wraps every function of the binding with a timer (the
// kernels run synchronously inside them), runs steps of bench/llm_child.ts's train case, and prints
// the time per binding function, per autograd phase (forward, backward, optimizer) and what is left
// for TypeScript (the step's wall time minus the time inside the binding).
//   node dist/bench/llm_profile.js DIR [fp32|bf16] [gc=0|1] [steps=2] [B=4] [T=256] [fused=1|0] [mp=bf16]
// (fused=0: causalLmLoss on the logits instead of model.loss; mp=bf16: loadCausalLM's matmulPrecision 'bf16')
import { AdamW, applyLora, causalLmLoss, loadCausalLM, loraLayers, setNumThreads, tensor, tidy } from '../lib/index';
import { randomF32, runMain, timeBinding } from './common';

async function main(): Promise<void> {
  const [dir, dtype = 'fp32', ...rest] = process.argv.slice(2);
  const kv = Object.fromEntries(rest.map((a) => a.split('=') as [string, string]));
  setNumThreads(2);
  const model = await loadCausalLM(dir!, { dtype: dtype === 'bf16' ? 'bfloat16' : 'float32', matmulPrecision: kv.mp === 'bf16' ? 'bf16' : 'fp32' });
  applyLora(model, { targetModules: 'all-linear', rank: 16, alpha: 32, seed: 1 });
  let seed = 11;
  for (const l of loraLayers(model).values()) l.loraB.assign(randomF32(l.loraB.size, seed++, 0.07));
  model.train();
  model.gradientCheckpointing = kv.gc === '1';
  const opt = new AdamW(model.parameters(), { lr: 1e-4 });
  const B = Number(kv.B ?? 4), T = Number(kv.T ?? 256);
  const x = tensor(Array.from({ length: B * T }, (_, i) => (i * 7919) % model.vocabSize), [B, T], { dtype: 'int32' });
  const step = (phase: (p: string) => void) => {
    tidy(() => {
      phase('forward');
      const loss = kv.fused === '0' ? causalLmLoss(model.forward(x), x) : model.loss(x, x);
      phase('backward');
      loss.backward();
      phase('tidy');
    });
    phase('optimizer');
    opt.step();
    opt.zeroGrad();
    phase('');
  };
  step(() => {}); // warm-up
  const byPhase = new Map<string, { wall: number; native: number }>();
  let current = '', phaseStart = 0, nativeAtStart = 0;
  const timer = timeBinding(), inside = timer.byKey;
  const phase = (p: string) => {
    const now = performance.now();
    if (current) {
      const e = byPhase.get(current) ?? { wall: 0, native: 0 };
      e.wall += now - phaseStart;
      e.native += timer.totalMs - nativeAtStart;
      byPhase.set(current, e);
    }
    current = p;
    phaseStart = now;
    nativeAtStart = timer.totalMs;
  };
  const steps = Number(kv.steps ?? 2);
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) step(phase);
  const total = (performance.now() - t0) / steps;
  const lines = [`step ${total.toFixed(0)} ms (${(B * T / total * 1e3).toFixed(1)} tokens/s), ${dtype}, gc ${model.gradientCheckpointing}`];
  for (const [p, e] of byPhase) lines.push(`  ${p.padEnd(10)} ${(e.wall / steps).toFixed(0).padStart(7)} ms wall, ${(e.native / steps).toFixed(0).padStart(7)} ms in the binding, ${((e.wall - e.native) / steps).toFixed(0).padStart(6)} ms TypeScript`);
  lines.push('  binding functions (ms per step, calls per step):');
  for (const [name, e] of [...inside].sort((a, b) => b[1].ms - a[1].ms).slice(0, 25))
    lines.push(`    ${name.padEnd(24)} ${(e.ms / steps).toFixed(1).padStart(8)} ms ${(100 * e.ms / steps / total).toFixed(1).padStart(5)}%  ${(e.calls / steps).toFixed(0).padStart(6)} calls`);
  process.stdout.write(lines.join('\n') + '\n');
  x.dispose();
  model.dispose();
}

runMain(main);
