// `lora-native train`: fine-tunes a LoRA adapter on a Hugging Face model folder from JSONL data
// with the code behind train(model, dataset): flags or a YAML/JSON config (its keys are the long
// flag names; flags win), then loadCausalLM, loadTokenizer, loadDataset, applyLora, train. Writes
// the PEFT adapter, a checkpoint to resume from, a JSON-lines log and a loss-curve SVG into --out.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ParseArgsConfig } from 'node:util';

import { DTYPE_ARG, matmulPrecisionArg, need, numberArg, parse, UsageError } from './cli_common';
import { loadDataset } from './data';
import { checkOptions, LoraError } from './errors';
import { makeFolder, readTextFile } from './file_io';
import { loadCausalLM } from './models/loader';
import { applyLora, peftAdapterOf } from './nn';
import { savePeftAdapter } from './peft';
import { writeFileAtomic } from './safetensors_write';
import type { WeightDtype } from './models/causal_lm';
import { CHECKPOINT_FILE, StepInfo, train } from './train';
import { maxPositionsOf } from './train_dataset';
import { loadTokenizer } from './tokenizer';

/** The flags of `lora-native train` (also the keys of its --config file). */
export const TRAIN_FLAGS = {
  model: { type: 'string' }, data: { type: 'string' }, out: { type: 'string' }, rank: { type: 'string' }, alpha: { type: 'string' },
  dropout: { type: 'string' }, target: { type: 'string' }, lr: { type: 'string' }, epochs: { type: 'string' }, iters: { type: 'string' },
  'batch-size': { type: 'string' }, 'grad-accum': { type: 'string' }, 'max-seq-len': { type: 'string' }, 'mask-prompt': { type: 'boolean' },
  packing: { type: 'boolean' }, 'grad-checkpoint': { type: 'boolean' }, dtype: { type: 'string' }, device: { type: 'string' },
  'val-every': { type: 'string' }, 'val-batches': { type: 'string' }, 'save-every': { type: 'string' }, resume: { type: 'string' }, seed: { type: 'string' },
  'use-dora': { type: 'boolean' }, 'use-rslora': { type: 'boolean' }, 'lora-plus-ratio': { type: 'string' }, config: { type: 'string' },
  'matmul-precision': { type: 'string' },
} as const satisfies NonNullable<ParseArgsConfig['options']>;

export const TRAIN_USAGE = `  lora-native train --model <dir> --data <file.jsonl | dir> --out <dir> [--rank 8] [--alpha 16]
                    [--dropout 0] [--target all-linear|q_proj,v_proj,...] [--lr 1e-4]
                    [--epochs n | --iters n] [--batch-size 4] [--grad-accum 1] [--max-seq-len t]
                    [--mask-prompt | --no-mask-prompt] [--packing] [--grad-checkpoint]
                    [--dtype f32|bf16|f16] [--device cpu|cuda] [--val-every 200] [--val-batches n]
                    [--save-every 100] [--resume <dir>] [--seed 0] [--use-dora] [--use-rslora] [--lora-plus-ratio r]
                    [--matmul-precision fp32|bf16] [--config file.yaml|json]`;

export const TRAIN_HELP = `train    fine-tunes a LoRA adapter: --model is a Hugging Face folder (config.json, safetensors,
         tokenizer.json), --data a JSONL file or a folder with train.jsonl (and valid.jsonl) of
         {"text"}, {"prompt", "completion"} or {"messages"} rows. --out (a new or empty folder) gets
         the PEFT adapter (adapter_config.json, adapter_model.safetensors), checkpoint/, log.jsonl
         (one record per step and per evaluation) and loss.svg
  --target         all-linear (every Linear but the output head; default) or module names
  --epochs/--iters passes over the data (default 1) or optimizer steps
  --batch-size     sequences per micro-batch; --grad-accum micro-batches per step
  --max-seq-len    longer rows are truncated (default: 2048, at most max_position_embeddings)
  --mask-prompt    loss on completions / assistant turns only (default); --no-mask-prompt: every token
  --packing        several rows per sequence, attention kept inside each row
  --grad-checkpoint recompute each block in the backward pass (less memory)
  --val-every      evaluate on valid.jsonl every n steps and at the end
  --val-batches    evaluate on its first n batches only (default -1: all of them, as mlx-lm's -1)
  --save-every     write checkpoint/ every n steps and at the end
  --resume         continue the run whose --out (or checkpoint/) this is, onto the same losses
  --matmul-precision fp32 (default) or bf16: with bf16 weights, the layers LoRA leaves alone and
                   the output head (and its loss) round activations to bf16 for bf16 dot products
                   too, as the LoRA layers' frozen base already does on avx512_bf16 CPUs
  --config         a YAML or JSON file whose keys are these flags' long names; flags override it`;

type Flags = { [K in keyof typeof TRAIN_FLAGS]?: (typeof TRAIN_FLAGS)[K]['type'] extends 'boolean' ? boolean : string };

const LOG_FILE = 'log.jsonl';
const SVG_FILE = 'loss.svg';
const CHECKPOINT_DIR = 'checkpoint';

/** The --config file's settings as flag values (numbers as their text, lists joined by commas). */
function readConfig(file: string): Flags {
  const yaml = /\.ya?ml$/i.test(file);
  if (!yaml && !/\.json$/i.test(file)) throw new UsageError(`--config must name a .yaml, .yml or .json file but is '${file}'`);
  const text = readTextFile(file, 1 << 20);
  let raw: unknown;
  try {
    if (yaml) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const YAML = require('yaml') as typeof import('yaml');
      raw = YAML.parse(text);
    } else raw = JSON.parse(text);
  } catch (e) {
    throw new LoraError('ERR_LORA_FORMAT', `Could not parse the config file ${file}: ${(e as Error).message.split('\n')[0]}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new LoraError('ERR_LORA_FORMAT', `Expected the config file ${file} to hold a mapping of flag names to values`);
  const known = Object.keys(TRAIN_FLAGS).filter((k) => k !== 'config');
  checkOptions(`the config file ${file} (its keys are train's long flag names)`, raw, known);
  const out: Record<string, string | boolean> = {};
  for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
    const type = TRAIN_FLAGS[k as keyof typeof TRAIN_FLAGS].type;
    const bad = (what: string) => new LoraError('ERR_LORA_FORMAT', `Expected ${what} for '${k}' in the config file ${file} but found ${JSON.stringify(v)}`);
    if (type === 'boolean') {
      if (typeof v !== 'boolean') throw bad('true or false');
      out[k] = v;
    } else if (typeof v === 'string' || (typeof v === 'number' && Number.isFinite(v))) out[k] = String(v);
    else if (k === 'target' && Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'string')) out[k] = v.join(',');
    else throw bad(k === 'target' ? 'a string or a list of module names' : 'a string or a number');
  }
  return out as Flags;
}

function intFlag(v: string | undefined, flag: string, min: number, fallback: number): number {
  if (v === undefined) return fallback;
  const n = numberArg(v, `--${flag}`);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${flag} must be an integer >= ${min} but is '${v}'`);
  return n;
}

function numFlag(v: string | undefined, flag: string, ok: (n: number) => boolean, expected: string, fallback: number): number {
  if (v === undefined) return fallback;
  const n = numberArg(v, `--${flag}`);
  if (!ok(n)) throw new UsageError(`--${flag} must be ${expected} but is '${v}'`);
  return n;
}

/** The checkpoint file of a --resume folder: <dir>/checkpoint/checkpoint.safetensors or <dir>/checkpoint.safetensors. */
function resumeFile(dir: string): string {
  for (const f of [path.join(dir, CHECKPOINT_DIR, CHECKPOINT_FILE), path.join(dir, CHECKPOINT_FILE)]) if (fs.existsSync(f)) return f;
  throw new LoraError('ERR_LORA_IO', `Found no checkpoint to resume in ${dir} (expected ${path.join(dir, CHECKPOINT_DIR, CHECKPOINT_FILE)}, which train writes with --save-every)`);
}

/** Copies a file through a temp name, so the destination appears whole. */
function copyAtomic(from: string, to: string): void {
  const tmp = `${to}.${process.pid}.tmp`;
  try {
    fs.copyFileSync(from, tmp);
    fs.renameSync(tmp, to);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw new LoraError('ERR_LORA_IO', `Could not copy ${from} to ${to}: ${(e as Error).message}`);
  }
}

const fmt = (x: number) => (Number.isFinite(x) ? Number(x.toPrecision(6)) : null);

/**
 * A loss curve as a small SVG: training loss per step (a line) and validation loss (points joined
 * by a dashed line) against the step, with the axes' ranges labelled. Non-finite losses are left out.
 */
export function lossCurveSvg(trainLosses: readonly (number | null)[], evalLosses: readonly { step: number; loss: number }[]): string {
  const W = 640, H = 360, L = 60, R = 20, T = 30, B = 40;
  const pts = trainLosses.map((l, i) => [i + 1, l] as const).filter((p): p is [number, number] => p[1] !== null && Number.isFinite(p[1]));
  const ev = evalLosses.filter((e) => Number.isFinite(e.loss)).map((e) => [e.step, e.loss] as [number, number]);
  const all = [...pts, ...ev];
  const maxStep = Math.max(1, trainLosses.length, ...ev.map((e) => e[0]));
  let lo = all.length ? Math.min(...all.map((p) => p[1])) : 0;
  let hi = all.length ? Math.max(...all.map((p) => p[1])) : 1;
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const x = (s: number) => (L + ((s - (maxStep > 1 ? 1 : 0)) / Math.max(1, maxStep - 1)) * (W - L - R)).toFixed(1);
  const y = (v: number) => (T + ((hi - v) / (hi - lo)) * (H - T - B)).toFixed(1);
  const line = (p: [number, number][]) => p.map(([s, v]) => `${x(s)},${y(v)}`).join(' ');
  const num = (v: number) => String(Number(v.toPrecision(4)));
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="18" text-anchor="middle" font-size="14">loss</text>`,
    `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#333"/>`,
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#333"/>`,
    `<text x="${L - 6}" y="${T + 4}" text-anchor="end">${num(hi)}</text>`,
    `<text x="${L - 6}" y="${H - B}" text-anchor="end">${num(lo)}</text>`,
    `<text x="${L}" y="${H - B + 16}" text-anchor="middle">${maxStep > 1 ? 1 : 0}</text>`,
    `<text x="${W - R}" y="${H - B + 16}" text-anchor="middle">${maxStep}</text>`,
    `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">step</text>`,
  ];
  if (pts.length) parts.push(`<polyline class="train" fill="none" stroke="#1f77b4" stroke-width="1.5" points="${line(pts)}"/>`);
  if (ev.length) {
    parts.push(`<polyline class="valid" fill="none" stroke="#ff7f0e" stroke-width="1.5" stroke-dasharray="4 3" points="${line(ev)}"/>`);
    for (const [s, v] of ev) parts.push(`<circle class="valid" cx="${x(s)}" cy="${y(v)}" r="3" fill="#ff7f0e"/>`);
  }
  parts.push(`<text x="${W - R - 110}" y="${T + 4}" fill="#1f77b4">— train</text>`);
  if (ev.length) parts.push(`<text x="${W - R - 50}" y="${T + 4}" fill="#ff7f0e">● valid</text>`);
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

/**
 * Runs `lora-native train`. When `signal` aborts (cli.ts turns SIGINT/SIGTERM into it), training
 * stops after its step and the adapter and checkpoint of that step are still written.
 */
export async function trainCommand(argv: string[], out: NodeJS.WriteStream, err: NodeJS.WriteStream, signal: AbortSignal): Promise<void> {
  const { values } = parse(argv, TRAIN_FLAGS);
  const given = values as Flags;
  const v: Flags = { ...(given.config !== undefined ? readConfig(given.config) : {}), ...given };
  const modelDir = need(v.model, '--model');
  const dataPath = need(v.data, '--data');
  const outDir = path.resolve(need(v.out, '--out'));
  const rank = intFlag(v.rank, 'rank', 1, 8);
  const alpha = numFlag(v.alpha, 'alpha', (n) => n > 0, 'a number > 0', 16);
  const dropout = numFlag(v.dropout, 'dropout', (n) => n >= 0 && n < 1, 'a number in [0, 1)', 0);
  const lr = numFlag(v.lr, 'lr', (n) => n > 0, 'a number > 0', 1e-4);
  if (v.epochs !== undefined && v.iters !== undefined) throw new UsageError('give --epochs or --iters, not both');
  const epochs = numFlag(v.epochs, 'epochs', (n) => n > 0, 'a number > 0', 1);
  const iters = v.iters === undefined ? undefined : intFlag(v.iters, 'iters', 1, 1);
  const batchSize = intFlag(v['batch-size'], 'batch-size', 1, 4);
  const accum = intFlag(v['grad-accum'], 'grad-accum', 1, 1);
  const maxSeqArg = v['max-seq-len'] === undefined ? undefined : intFlag(v['max-seq-len'], 'max-seq-len', 2, 2);
  const valEvery = intFlag(v['val-every'], 'val-every', 1, 200);
  const valBatches = v['val-batches'] === undefined || v['val-batches'] === '-1' ? undefined : intFlag(v['val-batches'], 'val-batches', 1, 1);
  const saveEvery = intFlag(v['save-every'], 'save-every', 1, 100);
  const seed = intFlag(v.seed, 'seed', 0, 0);
  const loraPlus = v['lora-plus-ratio'] === undefined ? undefined : numFlag(v['lora-plus-ratio'], 'lora-plus-ratio', (n) => n > 0, 'a number > 0', 1);
  let dtype: WeightDtype | undefined;
  if (v.dtype !== undefined) {
    dtype = DTYPE_ARG[v.dtype] as WeightDtype | undefined;
    if (!dtype) throw new UsageError(`--dtype must be f32, bf16 or f16 but is '${v.dtype}'`);
  }
  const device = v.device ?? 'cpu';
  if (device !== 'cpu' && device !== 'cuda') throw new UsageError(`--device must be cpu or cuda but is '${device}'`);
  const targetArg = v.target ?? 'all-linear';
  const targets = targetArg === 'all-linear' ? 'all-linear' as const : targetArg.split(',').map((s) => s.trim()).filter(Boolean);
  if (targets !== 'all-linear' && targets.length === 0) throw new UsageError(`--target must be all-linear or module names separated by commas but is '${targetArg}'`);

  // the folder: new or empty, or the one being resumed
  const resumeFrom = v.resume === undefined ? null : resumeFile(v.resume);
  const sameRun = resumeFrom !== null && path.resolve(v.resume!) === outDir;
  if (!sameRun && fs.existsSync(outDir) && (!fs.statSync(outDir).isDirectory() || fs.readdirSync(outDir).length > 0))
    throw new UsageError(`--out ${outDir} ${fs.statSync(outDir).isDirectory() ? 'is a folder that is not empty' : 'is an existing file'}; give a new or empty folder, or --resume ${outDir} to continue its run`);
  if (!fs.existsSync(modelDir) || !fs.statSync(modelDir).isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not find the model folder ${modelDir}`);

  const matmulPrecision = matmulPrecisionArg(v['matmul-precision']);
  const model = await loadCausalLM(modelDir, { ...(dtype ? { dtype } : {}), device, ...(matmulPrecision ? { matmulPrecision } : {}) });
  try {
    const limit = maxPositionsOf(model);
    if (maxSeqArg !== undefined && limit !== null && maxSeqArg > limit)
      throw new UsageError(`--max-seq-len ${maxSeqArg} is longer than the model's max_position_embeddings ${limit}; give at most ${limit} (longer rows are truncated and counted)`);
    const maxSeqLength = maxSeqArg ?? Math.min(2048, limit ?? 2048);
    const tokenizer = loadTokenizer(modelDir);
    const data = await loadDataset(dataPath, { tokenizer, maxSeqLength, maskPrompt: v['mask-prompt'] ?? true, packing: v.packing ?? false, seed });
    out.write(`data: ${data.train.summary()}${data.valid ? `; ${data.valid.summary()}` : ''}\n`);
    applyLora(model, { targetModules: targets, rank, alpha, dropout, useRslora: v['use-rslora'] ?? false, seed, ...(v['use-dora'] ? { useDora: true } : {}) });

    makeFolder(outDir);
    const ckptDir = path.join(outDir, CHECKPOINT_DIR);
    const logFile = path.join(outDir, LOG_FILE);
    if (resumeFrom !== null && !sameRun) {
      makeFolder(ckptDir);
      copyAtomic(resumeFrom, path.join(ckptDir, CHECKPOINT_FILE));
      const oldLog = path.join(v.resume!, LOG_FILE);
      if (fs.existsSync(oldLog)) copyAtomic(oldLog, logFile);
    }
    let first = true;
    const record = (r: Record<string, unknown>) => fs.appendFileSync(logFile, JSON.stringify(r) + '\n');
    const onStep = (i: StepInfo) => {
      if (first) {
        first = false;
        // a resumed run replaces the records after its checkpoint's step
        const kept = fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').split('\n').filter((l) => {
          try {
            return l !== '' && (JSON.parse(l) as { step: number }).step < i.step;
          } catch {
            return false;
          }
        }) : [];
        writeFileAtomic(logFile, kept.map((l) => l + '\n').join(''));
      }
      record({ type: 'train', step: i.step, loss: fmt(i.loss), lr: i.lr, tokens: i.tokens, tokensPerSecond: fmt(i.tokensPerSecond ?? NaN), gradNorm: fmt(i.gradNorm), elapsed: fmt(i.elapsed), ...(i.skipped ? { skipped: true } : {}) });
      if (i.evalLoss !== undefined) record({ type: 'eval', step: i.step, loss: fmt(i.evalLoss), perplexity: fmt(i.evalPerplexity ?? NaN) });
    };
    const result = await train(model, data, {
      optimizer: { lr }, ...(iters !== undefined ? { steps: iters } : { epochs }), batchSize, gradientAccumulation: accum,
      ...(data.valid ? { evalEvery: valEvery, ...(valBatches !== undefined ? { evalBatches: valBatches } : {}) } : {}), checkpointEvery: saveEvery, checkpointDir: ckptDir, resume: resumeFrom !== null,
      ...(loraPlus !== undefined ? { loraPlusRatio: loraPlus } : {}), ...(v['grad-checkpoint'] ? { gradientCheckpointing: true } : {}),
      signal, onStep, progress: 'auto', logEvery: 10,
    });
    if (result.steps === result.resumedFrom && result.stopped === 'aborted') {
      err.write(`lora-native: interrupted before the first step; no adapter written${resumeFrom ? ' (the checkpoint is as it was)' : ''}\n`);
      if (!resumeFrom && fs.readdirSync(outDir).length === 0) fs.rmdirSync(outDir);
      return;
    }
    const adapter = peftAdapterOf(model);
    adapter.config = { ...adapter.config, base_model_name_or_path: path.resolve(modelDir) };
    savePeftAdapter(outDir, adapter);
    writeFileAtomic(path.join(outDir, SVG_FILE), lossCurveSvg(result.losses, result.evalLosses));
    const last = result.evalLosses[result.evalLosses.length - 1];
    out.write(`${result.stopped === 'aborted' ? 'stopped' : 'trained'} ${result.steps - result.resumedFrom} steps${result.resumedFrom ? ` (resumed at step ${result.resumedFrom})` : ''} in ${result.seconds.toFixed(1)} s; ` +
      `final loss ${fmt(result.losses[result.losses.length - 1] ?? NaN)}${last ? `, valid loss ${fmt(last.loss)} (perplexity ${fmt(Math.exp(last.loss))})` : ''}\n`);
    out.write(`adapter:    ${outDir} (adapter_config.json, adapter_model.safetensors)\n`);
    out.write(`checkpoint: ${path.join(ckptDir, CHECKPOINT_FILE)} (continue with --resume ${outDir})\n`);
    out.write(`log:        ${logFile}\n`);
    out.write(`loss curve: ${path.join(outDir, SVG_FILE)}\n`);
    if (result.stopped === 'aborted') err.write(`lora-native: interrupted at step ${result.steps}; the adapter and checkpoint of that step are written (continue with --resume ${outDir})\n`);
    else if (result.stopped !== 'completed') err.write(`lora-native: training stopped early (${result.stopped}) at step ${result.steps}\n`);
  } finally {
    model.dispose();
  }
}
