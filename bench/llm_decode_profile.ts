// Where a decode step's time goes: wraps every function of the binding with a timer (the kernels
// run synchronously inside them), runs bench/llm_child.ts's decode case (prompt 128, then one token
// per step with a KV cache) and prints the time per binding function and what is left for
// TypeScript (the step's wall time minus the time inside the binding).
//   node dist/bench/llm_decode_profile.js DIR [fp32|bf16] [B=1] [steps=32] [reps=5] [wrap=1|0] [mp=bf16]
// (wrap=0: no timers, the plain step time, to see what the wrappers themselves cost; mp=bf16: loaded
// with matmulPrecision 'bf16', as llm_child.ts's mp=bf16)
import { loadCausalLM, manualSeed, noGrad, setNumThreads, tensor, tidy } from '../lib/index';
import { argmaxLast, runMain, timeBinding } from './common';

async function main(): Promise<void> {
  const [dir, dtype = 'bf16', ...rest] = process.argv.slice(2);
  const kv = Object.fromEntries(rest.map((a) => a.split('=') as [string, string]));
  setNumThreads(Number(kv.threads ?? 2));
  manualSeed(0);
  const model = await loadCausalLM(dir!, { dtype: dtype === 'bf16' ? 'bfloat16' : 'float32', matmulPrecision: kv.mp === 'bf16' ? 'bf16' : 'fp32' });
  const B = Number(kv.B ?? 1), P = 128, S = Number(kv.steps ?? 32), reps = Number(kv.reps ?? 5);
  const V = model.vocabSize;
  const prompt = tensor(Array.from({ length: B * P }, (_, i) => (i * 7919) % V), [B, P], { dtype: 'int32' });
  // gemm by shape: M (rows) x N (out) x K (in)
  const timer = kv.wrap !== '0' ? timeBinding((name, args) => (name === 'gemm' ? `gemm ${args[3]}x${args[4]}x${args[5]}` : name)) : undefined;
  if (timer) timer.enabled = false;
  const inside = timer?.byKey ?? new Map<string, { ms: number; calls: number }>();
  const cpuMs: number[] = []; // CPU time of the process (every thread) per run of S steps
  const run = () => noGrad(() => {
    using cache = model.createCache(B, P + S);
    let next = tidy(() => argmaxLast(model.forward(prompt, { cache })));
    if (timer) timer.enabled = true;
    const t0 = performance.now(), c0 = process.cpuUsage();
    for (let s = 0; s < S; s++) {
      const step = tensor(next, [B, 1], { dtype: 'int32' });
      next = tidy(() => argmaxLast(model.forward(step, { cache })));
      step.dispose();
    }
    if (timer) timer.enabled = false;
    const c = process.cpuUsage(c0);
    cpuMs.push((c.user + c.system) / 1e3);
    return performance.now() - t0;
  });
  run();
  inside.clear();
  cpuMs.length = 0;
  const times: number[] = [];
  for (let i = 0; i < reps; i++) times.push(run());
  times.sort((a, b) => a - b);
  const med = times[times.length >> 1]!, min = times[0]!;
  const steps = reps * S;
  const total = times.reduce((a, b) => a + b, 0) / steps;
  let nativeMs = 0;
  for (const e of inside.values()) nativeMs += e.ms;
  const lines = [`decode ${dtype} B=${B}: median ${med.toFixed(0)} ms for ${S} steps = ${(med / S).toFixed(2)} ms/step, ${(B * S / med * 1e3).toFixed(1)} tok/s (best run ${(B * S / min * 1e3).toFixed(1)}); mean ${total.toFixed(2)} ms/step; CPU time ${(cpuMs.sort((a, b) => a - b)[cpuMs.length >> 1]! / S).toFixed(2)} ms/step (median)`];
  if (inside.size) {
    lines.push(`  in the binding ${(nativeMs / steps).toFixed(2)} ms/step, TypeScript ${(total - nativeMs / steps).toFixed(2)} ms/step`);
    for (const [name, e] of [...inside].sort((a, b) => b[1].ms - a[1].ms).slice(0, 30))
      lines.push(`    ${name.padEnd(26)} ${(e.ms / steps).toFixed(3).padStart(8)} ms ${(100 * e.ms / steps / total).toFixed(1).padStart(5)}%  ${(e.calls / steps).toFixed(1).padStart(7)} calls  ${(1e3 * e.ms / e.calls).toFixed(1).padStart(7)} us/call`);
  }
  process.stdout.write(lines.join('\n') + '\n');
  prompt.dispose();
  model.dispose();
}

runMain(main);
