// `npm run demo`: the point of LoRA on a real (small) training run, on the CPU, with no downloads.
// 1. pretrain a character-level transformer on task A, generated here: "abc=cba." (reverse);
// 2. task B, which it does badly: "abc>fed." (reverse, then shift each letter by 3, a..h wrapping);
// 3. adapt to B with LoRA (rank 4 on attention and MLP projections) and, from the same starting
//    point, with full fine-tuning, for the same number of steps;
// 4. print trainable parameters, task-B accuracy/loss before and after, task-A accuracy after
//    (forgetting), time and adapter size vs model size; write the base and fully fine-tuned
//    models, the PEFT adapter, SVG loss curves, the table and every number to demo-output/ (the
//    summary lists each file). Every number comes from this run. `--quick` runs a short version;
//    `--device cuda` runs it on the GPU.
import * as fs from 'node:fs';
import * as path from 'node:path';

import {
  applyLora, crossEntropy, memory, Module, noGrad, reshape, saveLoraAdapter, saveSafetensors, tensor, Tensor, tidy,
  train, trainableParameters, TransformerLM,
} from '../lib/index';
import type { Device } from '../lib/index';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const devIdx = args.indexOf('--device');
const DEVICE = (devIdx >= 0 ? args[devIdx + 1] : 'cpu') as Device;
const outIdx = args.indexOf('--out');
const OUT = outIdx >= 0 ? args[outIdx + 1]! : 'demo-output';
const STEPS = quick ? { pretrain: 60, adapt: 30 } : { pretrain: 800, adapt: 300 };
const RANK = 4;

// ---- the tasks -------------------------------------------------------------------------------

const LETTERS = 'abcdefgh';
const VOCAB = [...LETTERS, '=', '>', '.', '_']; // '_' pads
const PAD = VOCAB.indexOf('_');
const T = 16; // longest example: 7 letters + sep + 7 letters + '.' = 16 characters
const id = (c: string) => VOCAB.indexOf(c);
const shift = (c: string) => LETTERS[(LETTERS.indexOf(c) + 3) % LETTERS.length]!;

type Task = 'A' | 'B';
function answer(task: Task, word: string): string {
  const rev = [...word].reverse();
  return (task === 'A' ? rev : rev.map(shift)).join('');
}
function example(task: Task, word: string): string {
  return `${word}${task === 'A' ? '=' : '>'}${answer(task, word)}.`;
}

/** A deterministic stream of words (lengths 3-7) from a small LCG. */
function words(count: number, seed: number): string[] {
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296;
  return Array.from({ length: count }, () => {
    const n = 3 + Math.floor(next() * 5);
    return Array.from({ length: n }, () => LETTERS[Math.floor(next() * LETTERS.length)]).join('');
  });
}

/**
 * Inputs [B, T-1] and targets [B·(T-1)]: next-character prediction, with the loss only on the
 * answer and the final '.', everything else ignored (ignoreIndex -100).
 */
function batchTensors(lines: readonly string[]): { ids: Tensor; targets: Tensor } {
  const L = T - 1;
  const ids = new Float32Array(lines.length * L).fill(PAD);
  const tg = new Float32Array(lines.length * L).fill(-100);
  lines.forEach((line, b) => {
    const sep = Math.max(line.indexOf('='), line.indexOf('>'));
    for (let i = 0; i < line.length - 1; i++) {
      ids[b * L + i] = id(line[i]!);
      if (i >= sep) tg[b * L + i] = id(line[i + 1]!);
    }
  });
  return {
    ids: tensor(ids, [lines.length, L], { dtype: 'int32', device: DEVICE }),
    targets: tensor(tg, [lines.length * L], { dtype: 'int32', device: DEVICE }),
  };
}

function lossOf(model: Module, lines: readonly string[]): Tensor {
  const { ids, targets } = batchTensors(lines);
  const logits = model.forward(ids);
  return crossEntropy(reshape(logits, [lines.length * (T - 1), VOCAB.length]), targets);
}

/**
 * Exact-match accuracy and loss on a set. Under teacher forcing, every answer position's argmax
 * being right is the same as greedy generation producing the whole answer, so one forward pass
 * gives the generation accuracy.
 */
function evaluate(model: Module, lines: readonly string[]): { acc: number; loss: number } {
  const wasTraining = model.training;
  model.eval();
  const r = noGrad(() => tidy(() => {
    const { ids, targets } = batchTensors(lines);
    const logits = model.forward(ids);
    const flat = reshape(logits, [lines.length * (T - 1), VOCAB.length]);
    const loss = crossEntropy(flat, targets).item();
    const z = flat.toFloat32Array();
    const tg = targets.toFloat32Array();
    let correct = 0;
    for (let b = 0; b < lines.length; b++) {
      let ok = true;
      for (let i = 0; i < T - 1 && ok; i++) {
        const t = tg[b * (T - 1) + i]!;
        if (t === -100) continue;
        const row = z.subarray((b * (T - 1) + i) * VOCAB.length, (b * (T - 1) + i + 1) * VOCAB.length);
        let best = 0;
        for (let v = 1; v < VOCAB.length; v++) if (row[v]! > row[best]!) best = v;
        ok = best === t;
      }
      if (ok) correct++;
    }
    return { acc: correct / lines.length, loss };
  }));
  model.train(wasTraining);
  return r;
}

/** Greedy generation after a prompt (no KV cache: one full forward per character). */
function generate(model: Module, prompt: string): string {
  model.eval();
  let text = prompt;
  noGrad(() => {
    while (text.length < T && !text.endsWith('.')) {
      const next = tidy(() => {
        const ids = tensor(Float32Array.from([...text].map(id)), [1, text.length], { dtype: 'int32', device: DEVICE });
        const z = model.forward(ids).toFloat32Array();
        const row = z.subarray((text.length - 1) * VOCAB.length);
        let best = 0;
        for (let v = 1; v < VOCAB.length; v++) if (row[v]! > row[best]!) best = v;
        return best;
      });
      text += VOCAB[next];
    }
  });
  model.train(true);
  return text;
}

// ---- output helpers --------------------------------------------------------------------------

/** Loss curves on one plot; a series may start at an x offset (the adaptation runs start where pretraining ended). */
function svgCurves(series: { name: string; color: string; values: number[]; offset?: number }[], title: string): string {
  const W = 720, H = 360, m = { l: 56, r: 16, t: 32, b: 40 };
  const maxLen = Math.max(...series.map((s) => (s.offset ?? 0) + s.values.length));
  const all = series.flatMap((s) => s.values).filter((v) => Number.isFinite(v) && v > 0);
  const lo = Math.log10(Math.min(...all)), hi = Math.log10(Math.max(...all));
  const x = (i: number) => m.l + ((W - m.l - m.r) * i) / Math.max(1, maxLen - 1);
  const y = (v: number) => m.t + ((H - m.t - m.b) * (hi - Math.log10(Math.max(v, 1e-12)))) / Math.max(1e-9, hi - lo);
  const smooth = (v: number[]) => v.map((_, i) => { const w = v.slice(Math.max(0, i - 9), i + 1); return w.reduce((a, b) => a + b, 0) / w.length; });
  const lines = series.map((s) => `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${smooth(s.values).map((v, i) => `${x(i + (s.offset ?? 0)).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}"/>`);
  const ticks: string[] = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    const yy = y(10 ** e);
    if (yy < m.t - 1 || yy > H - m.b + 1) continue;
    ticks.push(`<line x1="${m.l}" x2="${W - m.r}" y1="${yy.toFixed(1)}" y2="${yy.toFixed(1)}" stroke="#ddd"/><text x="${m.l - 6}" y="${(yy + 4).toFixed(1)}" text-anchor="end" font-size="11">1e${e}</text>`);
  }
  const legend = series.map((s, i) => `<rect x="${W - 190}" y="${m.t + 8 + i * 18}" width="12" height="3" fill="${s.color}"/><text x="${W - 172}" y="${m.t + 13 + i * 18}" font-size="12">${s.name}</text>`);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${title}</text>
${ticks.join('\n')}
<line x1="${m.l}" y1="${H - m.b}" x2="${W - m.r}" y2="${H - m.b}" stroke="#333"/><line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${H - m.b}" stroke="#333"/>
<text x="${W / 2}" y="${H - 8}" text-anchor="middle" font-size="12">optimizer step (10-step moving average, log-scale loss)</text>
${lines.join('\n')}
${legend.join('\n')}
</svg>
`;
}

function dirBytes(p: string): number {
  if (!fs.existsSync(p)) return 0;
  const st = fs.statSync(p);
  if (!st.isDirectory()) return st.size;
  return fs.readdirSync(p).reduce((a, f) => a + dirBytes(path.join(p, f)), 0);
}

const kb = (n: number) => (n >= 1024 * 1024 ? `${(n / 1024 / 1024).toFixed(2)} MB` : `${(n / 1024).toFixed(1)} KB`);
const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

// ---- the run ---------------------------------------------------------------------------------

async function main(): Promise<void> {
  fs.mkdirSync(OUT, { recursive: true });
  const startTensors = memory().numTensors;
  const trainA = words(20000, 1).map((w) => example('A', w));
  const trainB = words(20000, 2).map((w) => example('B', w));
  const testWords = words(500, 3);
  const testA = testWords.map((w) => example('A', w));
  const testB = testWords.map((w) => example('B', w));
  const modelCfg = { vocabSize: VOCAB.length, dModel: 64, nHeads: 4, nLayers: 2, maxSeqLen: T, seed: 7, device: DEVICE };
  const progress = process.stderr.isTTY ? 'bar' as const : 'none' as const;

  console.log(`lora-native demo: char-level transformer (${modelCfg.nLayers} layers, d=${modelCfg.dModel}, ${modelCfg.nHeads} heads) on ${DEVICE}, tasks generated here`);
  console.log(`  task A: ${testA[0]}   task B: ${testB[0]}   (loss and accuracy on the answer part only)\n`);

  // 1. pretrain on A
  const base = new TransformerLM(modelCfg);
  const tPre = Date.now();
  const pre = await train({
    model: base, data: trainA, batchSize: 64, steps: STEPS.pretrain, progress, seed: 11,
    loss: (m, batch) => lossOf(m, batch as string[]),
    optimizer: { lr: 3e-3, weightDecay: 0.01 }, schedule: { type: 'cosine', warmupSteps: 50, minLrRatio: 0.1 }, clipGradNorm: 1,
  });
  const preSeconds = (Date.now() - tPre) / 1000;
  const baseA = evaluate(base, testA);
  const baseB = evaluate(base, testB);
  console.log(`1. pretrained on task A: ${pre.steps} steps in ${preSeconds.toFixed(1)} s; task A accuracy ${pct(baseA.acc)} (loss ${baseA.loss.toFixed(3)}), task B accuracy ${pct(baseB.acc)} (loss ${baseB.loss.toFixed(3)})`);
  const modelFile = path.join(OUT, 'base-model.safetensors');
  saveSafetensors(modelFile, base.stateDict(), { metadata: { format: 'pt', note: 'lora-native demo base model (task A)' } });
  const samplePrompts = testWords.slice(0, 4).map((w) => `${w}>`);
  const before = samplePrompts.map((p) => generate(base, p));

  // a fresh copy of the pretrained model
  const copyOfBase = (): TransformerLM => {
    const m = new TransformerLM(modelCfg);
    m.loadStateDict(base.stateDict());
    return m;
  };

  // 2./3. adapt to B: LoRA and full fine-tuning, same steps, same data order
  const adapt = async (model: TransformerLM, lr: number, lora: boolean) => {
    const t0 = Date.now();
    const r = await train({
      model, data: trainB, batchSize: 64, steps: STEPS.adapt, progress, seed: 12,
      loss: (m, batch) => lossOf(m, batch as string[]),
      optimizer: { lr, weightDecay: lora ? 0 : 0.01 }, schedule: { type: 'cosine', warmupSteps: 20, minLrRatio: 0.1 }, clipGradNorm: 1,
    });
    const seconds = (Date.now() - t0) / 1000;
    return { losses: r.losses, seconds, a: evaluate(model, testA), b: evaluate(model, testB) };
  };

  const loraModel = copyOfBase();
  applyLora(loraModel, { targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'], rank: RANK, alpha: 2 * RANK, seed: 5 });
  const loraCount = trainableParameters(loraModel);
  const loraRes = await adapt(loraModel, 4e-3, true);
  console.log(`2. LoRA (rank ${RANK}, ${loraCount.trainable} trainable parameters): ${STEPS.adapt} steps in ${loraRes.seconds.toFixed(1)} s`);
  const adapterDir = path.join(OUT, 'lora-adapter');
  saveLoraAdapter(loraModel, adapterDir);
  const afterLora = samplePrompts.map((p) => generate(loraModel, p));

  // the frozen base inside the LoRA model: unchanged, so removing the adapter restores task A
  const baseState = base.stateDict();
  const loraState = loraModel.stateDict();
  const maxChange = (state: Record<string, Tensor>) => Math.max(...Object.keys(baseState).map((k) => {
    const a = baseState[k]!.toFloat32Array(), b = state[k]!.toFloat32Array();
    return a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]!)), 0);
  }));
  const loraBaseChange = maxChange(loraState);
  const unadapted = new TransformerLM(modelCfg);
  unadapted.loadStateDict(Object.fromEntries(Object.keys(baseState).map((k) => [k, loraState[k]!])));
  const loraOffA = evaluate(unadapted, testA);
  unadapted.dispose();

  const fullModel = copyOfBase();
  const fullCount = trainableParameters(fullModel);
  const fullRes = await adapt(fullModel, 1e-3, false);
  console.log(`3. full fine-tuning (${fullCount.trainable} trainable parameters): ${STEPS.adapt} steps in ${fullRes.seconds.toFixed(1)} s`);
  const afterFull = samplePrompts.map((p) => generate(fullModel, p));
  const fullBaseChange = maxChange(fullModel.stateDict());
  const fullFile = path.join(OUT, 'full-finetuned.safetensors');
  saveSafetensors(fullFile, fullModel.stateDict(), { metadata: { format: 'pt' } });

  // 4. the table
  const modelBytes = dirBytes(modelFile);
  const rows = [
    ['', `LoRA r=${RANK}`, 'full fine-tune'],
    ['trainable params', `${loraCount.trainable} (${pct(loraCount.share)})`, `${fullCount.trainable} (${pct(fullCount.share)})`],
    ['task B acc before -> after', `${pct(baseB.acc)} -> ${pct(loraRes.b.acc)}`, `${pct(baseB.acc)} -> ${pct(fullRes.b.acc)}`],
    ['task B loss before -> after', `${baseB.loss.toFixed(3)} -> ${loraRes.b.loss.toFixed(3)}`, `${baseB.loss.toFixed(3)} -> ${fullRes.b.loss.toFixed(3)}`],
    ['task A acc after (was ' + pct(baseA.acc) + ')', pct(loraRes.a.acc), pct(fullRes.a.acc)],
    ['base weights: max abs change', loraBaseChange.toExponential(1), fullBaseChange.toExponential(1)],
    ['task A acc, adapter removed', pct(loraOffA.acc), 'n/a (weights overwritten)'],
    ['train time (' + STEPS.adapt + ' steps)', `${loraRes.seconds.toFixed(1)} s`, `${fullRes.seconds.toFixed(1)} s`],
    ['saved size (model ' + kb(modelBytes) + ')', `${kb(dirBytes(adapterDir))} adapter`, `${kb(dirBytes(fullFile))} full copy`],
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const line = (r: string[]) => '| ' + r.map((cell, c) => cell.padEnd(widths[c]!)).join(' | ') + ' |';
  const table = [line(rows[0]!), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...rows.slice(1).map(line)].join('\n');
  console.log('\n' + table + '\n');

  console.log('samples (task B prompts, greedy):');
  samplePrompts.forEach((p, i) => {
    const want = example('B', testWords[i]!);
    console.log(`  want ${want.padEnd(T)}  before ${before[i]!.padEnd(T)}  LoRA ${afterLora[i]!.padEnd(T)}  full ${afterFull[i]!}`);
  });

  fs.writeFileSync(path.join(OUT, 'loss_curves.svg'), svgCurves([
    { name: 'pretraining (task A)', color: '#888', values: pre.losses },
    { name: 'LoRA on task B', color: '#d62728', values: loraRes.losses, offset: pre.losses.length },
    { name: 'full fine-tune on task B', color: '#1f77b4', values: fullRes.losses, offset: pre.losses.length },
  ], 'lora-native demo: training loss'));
  fs.writeFileSync(path.join(OUT, 'results.json'), JSON.stringify({
    quick, steps: STEPS, model: modelCfg, pretrain: { seconds: preSeconds, taskA: baseA, taskB: baseB },
    lora: { params: loraCount, seconds: loraRes.seconds, taskA: loraRes.a, taskB: loraRes.b, adapterBytes: dirBytes(adapterDir), baseChange: loraBaseChange, taskAAdapterRemoved: loraOffA },
    full: { params: fullCount, seconds: fullRes.seconds, taskA: fullRes.a, taskB: fullRes.b, bytes: dirBytes(fullFile), baseChange: fullBaseChange },
    modelBytes, losses: { pretrain: pre.losses, lora: loraRes.losses, full: fullRes.losses },
    samples: samplePrompts.map((p, i) => ({ prompt: p, before: before[i], lora: afterLora[i], full: afterFull[i] })),
  }, null, 2) + '\n');
  fs.writeFileSync(path.join(OUT, 'table.md'), table + '\n');
  const written: [string, string][] = [
    [modelFile, 'the pretrained model (task A), safetensors'],
    [path.join(adapterDir, 'adapter_config.json'), 'the LoRA adapter, PEFT format (config)'],
    [path.join(adapterDir, 'adapter_model.safetensors'), 'the LoRA adapter, PEFT format (weights)'],
    [fullFile, 'the fully fine-tuned model, safetensors'],
    [path.join(OUT, 'loss_curves.svg'), 'training loss curves'],
    [path.join(OUT, 'table.md'), 'the table above'],
    [path.join(OUT, 'results.json'), 'every number of this run, the losses and samples'],
  ];
  console.log(`\nwrote ${written.length} files to ${OUT}/:`);
  const nameWidth = Math.max(...written.map(([f]) => path.relative(OUT, f).length));
  for (const [f, what] of written) console.log(`  ${path.relative(OUT, f).padEnd(nameWidth)}  ${kb(dirBytes(f)).padStart(9)}  ${what}`);

  for (const m of [base, loraModel, fullModel]) m.dispose();
  if (memory().numTensors !== startTensors) console.log(`note: ${memory().numTensors - startTensors} tensors still live`);
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});

