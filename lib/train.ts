// train(): a training loop for Modules: learning-rate schedules, gradient accumulation and
// clipping, periodic evaluation, an AbortSignal, a progress bar (or plain lines off a TTY),
// atomic checkpoints that resume onto the same loss curve, LoRA+ and no weight decay on biases and
// norms; train(model, dataset) drives a CausalLM with a Dataset (train_dataset.ts). It is
// deliberately one loop, not a framework: no event callbacks beyond onStep (batchWeight and
// batchTokens only describe batches), no distributed training, no mixed precision.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, expectBoolean, expectInteger, expectNumber, expectOneOf, LoraError, typeError } from './errors';
import { makeFolder, parseJsonBounded } from './file_io';
import { LoraLinear } from './lora';
import { expectModule, Module } from './module';
import { Dropout, loraLayers, saveLoraAdapter } from './nn';
import { allFinite, scaleInPlace, sumOfSquares } from './numerics';
import { max, mul, neg } from './ops';
import { AdamW, Optimizer, ParamGroup, SGD } from './optim';
import { loadSafetensors, saveSafetensors } from './safetensors';
import { defaultRng, Rng } from './random';
import { expectTensor, noGrad, Tensor, tidy } from './tensor';
import type { Dataset, DatasetSplits } from './data';
import type { CausalLM } from './models/causal_lm';
import { DatasetTrainOptions, datasetTrainOptions } from './train_dataset';

/** lr multiplier per optimizer step: a name, a shape with warm-up, or your own function. */
export type Schedule =
  | 'constant' | 'cosine' | 'linear'
  | { type: 'constant' | 'cosine' | 'linear'; warmupSteps?: number; minLrRatio?: number }
  | ((step: number, totalSteps: number) => number);

/** What onStep receives after each optimizer step. */
export interface StepInfo {
  /** 1-based optimizer step just taken. */
  step: number;
  totalSteps: number;
  /** Mean training loss over the step's micro-batches. */
  loss: number;
  /** Learning rate used for the step (the base group's). */
  lr: number;
  /** Global gradient norm before clipping (NaN when not computed). */
  gradNorm: number;
  /** Evaluation loss when this step ran an evaluation. */
  evalLoss?: number;
  /** exp(evalLoss): the evaluation perplexity, when this step ran an evaluation of a run that counts tokens (a Dataset, or batchTokens). */
  evalPerplexity?: number;
  /** Tokens this step processed (with batchTokens, or a Dataset: tokens that are not padding). */
  tokens?: number;
  /** Tokens per second over this call so far (with batchTokens, or a Dataset). */
  tokensPerSecond?: number;
  /** Seconds since train() started. */
  elapsed: number;
  /** True when the step was skipped for a non-finite loss or gradient (nothing was updated). */
  skipped: boolean;
}

export interface OptimizerSpec {
  /** Base learning rate. */
  lr: number;
  /** Decoupled weight decay for matrices (default 0.01; biases and norms get 0). */
  weightDecay?: number;
  betas?: [number, number];
  eps?: number;
}

export interface TrainOptions<B> {
  model: Module;
  /**
   * An array of examples (batched by batchSize, reshuffled each epoch; the loss gets an array)
   * or a function returning the batch for a micro-step index (deterministic in its argument, so
   * resuming reproduces the run).
   */
  data: readonly unknown[] | ((index: number) => B);
  /** Returns a scalar loss tensor for a batch. Runs inside tidy(). */
  loss: (model: Module, batch: B) => Tensor;
  /** An Optimizer, or AdamW settings (then LoRA+ and the no-decay rule apply). */
  optimizer: Optimizer | OptimizerSpec;
  /** Optimizer steps to take (or give epochs with array data). */
  steps?: number;
  epochs?: number;
  /** Examples per micro-batch with array data (default 32). */
  batchSize?: number;
  /** Default 'constant'. */
  schedule?: Schedule;
  /** Clip the global gradient norm to this value. */
  clipGradNorm?: number;
  /** Micro-batches per optimizer step (default 1); the loss is averaged over them. */
  gradientAccumulation?: number;
  /** Evaluate every N steps (and after the last) on evalData. */
  evalEvery?: number;
  /** Examples (batched by batchSize) or a function returning the evaluation batches. */
  evalData?: readonly unknown[] | (() => B[]);
  /** Evaluate on the first N batches of evalData only (default: all of them; mlx-lm's --val-batches). */
  evalBatches?: number;
  /** Write a checkpoint every N steps (and after the last step) into checkpointDir. */
  checkpointEvery?: number;
  checkpointDir?: string;
  /** Continue from checkpointDir's checkpoint when there is one (default true when checkpointDir is set). */
  resume?: boolean;
  /** Called after each step; returning false stops training. */
  onStep?: (info: StepInfo) => void | boolean;
  /** Stops training cleanly (after the current step) when aborted. */
  signal?: AbortSignal;
  /** LoRA+: lora_B gets lr × this ratio (needs optimizer settings, not an Optimizer). */
  loraPlusRatio?: number;
  /** A non-finite loss or gradient norm: 'skip' the step (default), 'stop', or 'throw'. */
  onNonFinite?: 'skip' | 'stop' | 'throw';
  /**
   * With onNonFinite 'skip': stop with `stopped: 'diverged'` after this many skipped steps in a
   * row (default 10; 0 never stops).
   */
  maxConsecutiveSkips?: number;
  /** 'auto' (default: a bar on a TTY, lines otherwise), 'bar', 'lines', 'none', or a line sink. */
  progress?: 'auto' | 'bar' | 'lines' | 'none' | ((line: string) => void);
  /** Plain-line progress every N steps (default: about 20 lines per run). */
  logEvery?: number;
  /** Seed of the data shuffling (default: drawn from the global generator). */
  seed?: number;
  /**
   * The weight of a batch in its step and in evaluation (default 1 for every batch). Give the
   * number of tokens the loss counts when the loss is a mean over tokens: a step's loss is then
   * the mean over all counted tokens of its micro-batches (Hugging Face's rule), not the mean of
   * per-batch means. A batch of weight 0 is not run.
   */
  batchWeight?: (batch: B) => number;
  /** Tokens a batch holds, for tokens/s on the progress line and in onStep (a run that counts tokens also reports the evaluation perplexity). */
  batchTokens?: (batch: B) => number;
  /**
   * Sets `model.gradientCheckpointing` for the run (each block recomputed in the backward pass:
   * less memory, more time); restored afterwards.
   */
  gradientCheckpointing?: boolean;
}

export interface TrainResult {
  /** Optimizer steps completed (including those before a resume). */
  steps: number;
  /** Training loss per step (from the start of the run, across resumes). */
  losses: number[];
  evalLosses: { step: number; loss: number }[];
  /**
   * Why it ended: all steps done, the signal aborted, onStep returned false, a non-finite step
   * with onNonFinite 'stop', or maxConsecutiveSkips skipped steps in a row ('diverged').
   */
  stopped: 'completed' | 'aborted' | 'callback' | 'non-finite' | 'diverged';
  /** Steps skipped for a non-finite loss or gradient. */
  skippedSteps: number;
  /** Wall-clock seconds of this call. */
  seconds: number;
  /** The step training resumed from (0 for a fresh run). */
  resumedFrom: number;
  /** What was resumed (null for a fresh run); also printed through `progress` unless 'none'. */
  resumed: ResumeInfo | null;
}

/** A resumed run: the checkpoint file, its step, and the options that differ from the checkpoint's. */
export interface ResumeInfo {
  file: string;
  step: number;
  /** Options whose value differs from the run that wrote the checkpoint; the new values apply. */
  changed: { option: string; checkpoint: unknown; now: unknown }[];
}

const OPTIONS = ['model', 'data', 'loss', 'optimizer', 'steps', 'epochs', 'batchSize', 'schedule', 'clipGradNorm',
  'gradientAccumulation', 'evalEvery', 'evalData', 'evalBatches', 'checkpointEvery', 'checkpointDir', 'resume', 'onStep', 'signal',
  'loraPlusRatio', 'onNonFinite', 'maxConsecutiveSkips', 'progress', 'logEvery', 'seed', 'batchWeight', 'batchTokens',
  'gradientCheckpointing'] as const;

// Long work yields to the event loop this often (ms), so timers, I/O and an AbortSignal run
// between steps; a step longer than this yields after every step, which costs it nothing.
const YIELD_MS = 15;

/** The checkpoint file inside checkpointDir. */
export const CHECKPOINT_FILE = 'checkpoint.safetensors';

// ---- schedules ---------------------------------------------------------------------------------

/**
 * The lr multiplier of a schedule at 0-based optimizer step `step` of `total`: linear warm-up
 * (step+1)/warmup, then constant, cosine (to minLrRatio) or linear decay (to minLrRatio).
 * @example lrMultiplier({ type: 'cosine', warmupSteps: 10 }, 50, 100)
 */
export function lrMultiplier(schedule: Schedule, step: number, total: number): number {
  expectInteger('step', step, 0, Number.MAX_SAFE_INTEGER);
  expectInteger('total', total, 0, Number.MAX_SAFE_INTEGER);
  if (typeof schedule !== 'function') schedule = checkSchedule(schedule);
  if (typeof schedule === 'function') {
    const v = schedule(step, total);
    return expectNumber('schedule(step)', v, 0);
  }
  const s = typeof schedule === 'string' ? { type: schedule } : schedule;
  const warm = s.warmupSteps ?? 0;
  const floor = s.minLrRatio ?? 0;
  if (step < warm) return (step + 1) / warm;
  if (s.type === 'constant') return 1;
  const span = Math.max(1, total - warm);
  const progress = Math.min(1, (step - warm) / span);
  if (s.type === 'linear') return floor + (1 - floor) * (1 - progress);
  return floor + (1 - floor) * 0.5 * (1 + Math.cos(Math.PI * progress));
}

function checkSchedule(v: unknown): Schedule {
  if (v === undefined) return 'constant';
  if (typeof v === 'function') return v as Schedule;
  if (typeof v === 'string') return expectOneOf('schedule', v, ['constant', 'cosine', 'linear'] as const);
  const o = checkOptions<{ type: string; warmupSteps?: number; minLrRatio?: number }>('schedule', v, ['type', 'warmupSteps', 'minLrRatio']);
  const type = expectOneOf('schedule.type', o.type, ['constant', 'cosine', 'linear'] as const);
  const warmupSteps = o.warmupSteps === undefined ? 0 : expectInteger('schedule.warmupSteps', o.warmupSteps, 0, Number.MAX_SAFE_INTEGER);
  const minLrRatio = o.minLrRatio === undefined ? 0 : expectNumber('schedule.minLrRatio', o.minLrRatio, 0, 1);
  return { type, warmupSteps, minLrRatio };
}

// ---- optimizer groups ----------------------------------------------------------------------------

/**
 * AdamW parameter groups for a model: no weight decay on 1-D parameters (biases, norm scales),
 * and lora_B and every 1-D parameter (DoRA magnitudes, trainable biases) at lr × loraPlusRatio (LoRA+, as PEFT groups them). Only parameters with requiresGrad are included.
 */
export function parameterGroups(model: Module, spec: OptimizerSpec, loraPlusRatio = 1): ParamGroup[] {
  expectModule('model', model);
  if (spec === null || typeof spec !== 'object') throw typeError('optimizer', 'an object with lr', spec);
  checkOptions<OptimizerSpec>('parameterGroups() optimizer', spec, ['lr', 'weightDecay', 'betas', 'eps']);
  expectNumber('optimizer.lr', spec.lr, 0);
  if (spec.weightDecay !== undefined) expectNumber('optimizer.weightDecay', spec.weightDecay, 0);
  expectNumber('loraPlusRatio', loraPlusRatio, 0);
  const wd = spec.weightDecay ?? 0.01;
  const groups = new Map<string, ParamGroup>();
  for (const [name, t] of model.namedParameters()) {
    if (!t.requiresGrad) continue;
    const decay = t.ndim >= 2 ? wd : 0;
    // PEFT's LoRA+ groups: lora_B and every 1-D parameter (DoRA's magnitude, trainable biases) at lr × ratio
    const lr = name.endsWith('loraB') || t.ndim === 1 ? spec.lr * loraPlusRatio : spec.lr;
    const key = `${decay}/${lr}`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { params: [], lr, weightDecay: decay }));
    if (!g.params.includes(t)) g.params.push(t);
  }
  return [...groups.values()];
}

// ---- gradient clipping ---------------------------------------------------------------------------

/**
 * Scales gradients so their global L2 norm is at most maxNorm (like torch's clip_grad_norm_).
 * Returns the norm before clipping (NaN/Infinity when a gradient is non-finite; nothing is scaled then).
 */
export function clipGradNorm(params: readonly Tensor[], maxNorm: number): number {
  expectNumber('maxNorm', maxNorm, 0);
  if (!Array.isArray(params)) throw typeError('params', 'an array of Tensors', params);
  params.forEach((p, i) => expectTensor(`params[${i}]`, p));
  const grads = params.map((p) => p.grad).filter((g): g is Tensor => g !== null);
  const norm = Math.sqrt(sumOfSquares(grads));
  if (Number.isFinite(norm) && norm > maxNorm) {
    const f = maxNorm / (norm + 1e-6);
    for (const g of grads) scaleInPlace(g, f);
  }
  return norm;
}

// ---- progress --------------------------------------------------------------------------------

function clock(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? `${h}:${String(m).padStart(2, '0')}` : String(m)) + ':' + String(r).padStart(2, '0');
}

class Progress {
  private lastDraw = 0;
  constructor(private readonly mode: 'bar' | 'lines' | 'none' | ((line: string) => void), private readonly every: number) {}

  update(step: number, total: number, loss: number, lr: number, rate: number, evalLoss?: number, skipped?: string, tokensPerSecond?: number): void {
    if (this.mode === 'none') return;
    const eta = rate > 0 ? (total - step) / rate : Infinity;
    // slow steps read better as seconds per step than as 0.0 steps/s
    const speed = rate >= 1 || rate <= 0 ? `${rate.toFixed(1)} steps/s` : `${(1 / rate).toFixed(1)} s/step`;
    const tokens = tokensPerSecond === undefined ? '' : `  ${tokensPerSecond >= 100 ? Math.round(tokensPerSecond) : tokensPerSecond.toFixed(1)} tok/s`;
    const text = `step ${step}/${total}  loss ${Number.isFinite(loss) ? loss.toFixed(4) : String(loss)}  lr ${lr.toExponential(2)}  ${speed}${tokens}  ETA ${clock(eta)}` +
      (evalLoss !== undefined ? `  eval ${evalLoss.toFixed(4)}${tokensPerSecond !== undefined ? ` (ppl ${Math.exp(evalLoss).toPrecision(4)})` : ''}` : '') + (skipped ? `  skipped (${skipped})` : '');
    if (this.mode === 'bar') {
      const now = Date.now();
      if (now - this.lastDraw < 100 && step !== total && evalLoss === undefined && !skipped) return; // at most 10 redraws a second
      this.lastDraw = now;
      const width = 24;
      const filled = Math.round((width * step) / Math.max(total, 1));
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${text}\x1b[K`);
      if (step === total) process.stderr.write('\n');
      return;
    }
    if (step % this.every !== 0 && step !== total && evalLoss === undefined && !skipped) return;
    this.say(text);
  }

  /** A message of its own line (resume, divergence), unless progress is 'none'. */
  say(text: string): void {
    if (this.mode === 'none') return;
    if (typeof this.mode === 'function') this.mode(text);
    else if (this.mode === 'bar') process.stderr.write(`\r${text}\x1b[K\n`);
    else process.stderr.write(text + '\n');
  }

  end(): void {
    if (this.mode === 'bar') process.stderr.write('\n');
  }
}

// ---- checkpoints -------------------------------------------------------------------------------

interface TrainerState {
  version: 1;
  step: number;
  totalSteps: number;
  losses: number[];
  evalLosses: { step: number; loss: number }[];
  skippedSteps: number;
  dataRng: [number, number, number | null];
  order: number[];
  cursor: number;
  globalRng: [number, number, number | null];
  moduleRngs: Record<string, [number, number, number | null]>;
  optimizer: { kind: 'adamw' | 'sgd'; steps: Record<string, number> };
  /** The run's options, to say on resume which ones changed (absent in older checkpoints). */
  options?: Record<string, unknown>;
}

/** The generators inside a model whose draws affect training (LoRA and Dropout mask seeds). */
function moduleRngs(model: Module): Map<string, Rng> {
  const out = new Map<string, Rng>();
  for (const [p, m] of model.namedModules()) {
    // LoraLinear keeps its dropout generator private; checkpoints must restore it to resume exactly
    const r = m instanceof LoraLinear ? (m as unknown as { rng: Rng }).rng : m instanceof Dropout ? m.rng : undefined;
    if (r) out.set(p, r);
  }
  return out;
}

function writeCheckpoint(dir: string, model: Module, opt: Optimizer, names: Map<Tensor, string>, state: TrainerState): void {
  makeFolder(dir);
  const tensors = new Map<string, Tensor>();
  const steps: Record<string, number> = {};
  for (const p of opt.params) {
    const name = names.get(p)!;
    tensors.set(`param.${name}`, p);
    if (opt instanceof AdamW) {
      const s = opt.getState(p);
      if (s) { tensors.set(`optim.${name}.exp_avg`, s.m); tensors.set(`optim.${name}.exp_avg_sq`, s.v); steps[name] = s.step; }
    } else if (opt instanceof SGD) {
      const s = opt.getState(p);
      if (s) { if (s.buf) tensors.set(`optim.${name}.momentum_buffer`, s.buf); steps[name] = s.step; }
    }
  }
  state.optimizer = { kind: opt instanceof SGD ? 'sgd' : 'adamw', steps };
  saveSafetensors(path.join(dir, CHECKPOINT_FILE), tensors, { metadata: { format: 'lora-native-checkpoint', trainer: JSON.stringify(state) } });
  // the adapter as a PEFT folder beside it, for use without lora-native's trainer
  if (loraLayers(model).size > 0) saveLoraAdapter(model, path.join(dir, 'adapter'));
}

function readCheckpoint(dir: string, opt: Optimizer, names: Map<Tensor, string>): TrainerState | null {
  const file = path.join(dir, CHECKPOINT_FILE);
  if (!fs.existsSync(file)) return null;
  const { tensors, metadata } = loadSafetensors(file);
  try {
    const state = parseJsonBounded(metadata.trainer ?? '', (problem) =>
      new LoraError('ERR_LORA_FORMAT', `Checkpoint ${file} has no trainer state in its metadata (${problem})`)) as TrainerState;
    if (!state || typeof state !== 'object' || state.version !== 1) throw new LoraError('ERR_LORA_FORMAT', `Checkpoint ${file} has trainer state version ${String(state?.version)}; expected 1`);
    checkTrainerState(file, state, opt instanceof SGD ? 'sgd' : 'adamw');
    // everything is checked before anything is restored: a refused checkpoint leaves the model as it was
    const restore: (() => void)[] = [];
    for (const p of opt.params) {
      const name = names.get(p)!;
      const src = tensors.get(`param.${name}`);
      if (!src) throw new LoraError('ERR_LORA_STATE', `Checkpoint ${file} has no value for trainable parameter '${name}' (was it written for another model or LoRA setup?)`);
      checkRestored(file, `param.${name}`, src, p.shape, false);
      restore.push(() => p.assign(src));
      const step = state.optimizer.steps[name];
      if (step === undefined) continue;
      if (opt instanceof AdamW) {
        const m = tensors.get(`optim.${name}.exp_avg`), v = tensors.get(`optim.${name}.exp_avg_sq`);
        if (!m || !v) throw new LoraError('ERR_LORA_STATE', `Checkpoint ${file} lacks AdamW state for '${name}'`);
        checkRestored(file, `optim.${name}.exp_avg`, m, p.shape, false);
        checkRestored(file, `optim.${name}.exp_avg_sq`, v, p.shape, true);
        restore.push(() => {
          tensors.delete(`optim.${name}.exp_avg`);
          tensors.delete(`optim.${name}.exp_avg_sq`);
          opt.setState(p, { m, v, step });
        });
      } else if (opt instanceof SGD) {
        const buf = tensors.get(`optim.${name}.momentum_buffer`) ?? null;
        if (buf) checkRestored(file, `optim.${name}.momentum_buffer`, buf, p.shape, false);
        restore.push(() => {
          tensors.delete(`optim.${name}.momentum_buffer`);
          opt.setState(p, { buf, step });
        });
      }
    }
    for (const r of restore) r();
    return state;
  } finally {
    for (const t of tensors.values()) t.dispose();
  }
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

function stateError(file: string, field: string, expected: string, got: unknown): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Checkpoint ${file} is damaged or was edited: expected ${expected} for ${field} but it holds ${describe(got)}`);
}

// The trainer state a checkpoint resumes from: counts are non-negative integers and the optimizer
// is the one in use, so a tampered file is refused instead of resuming into skipped steps.
function checkTrainerState(file: string, s: TrainerState, kind: 'adamw' | 'sgd'): void {
  for (const k of ['step', 'totalSteps', 'skippedSteps', 'cursor'] as const) if (!isCount(s[k])) throw stateError(file, `trainer.${k}`, 'a non-negative integer', s[k]);
  if (s.skippedSteps > s.step) throw stateError(file, 'trainer.skippedSteps', `at most the step count ${s.step}`, s.skippedSteps);
  // a skipped step's NaN loss was written as null (JSON has no NaN)
  if (!Array.isArray(s.losses) || !s.losses.every((x) => x === null || typeof x === 'number')) throw stateError(file, 'trainer.losses', 'an array of numbers', s.losses);
  if (!Array.isArray(s.order) || !s.order.every(isCount)) throw stateError(file, 'trainer.order', 'an array of example indices', s.order);
  if (!Array.isArray(s.evalLosses)) throw stateError(file, 'trainer.evalLosses', 'an array', s.evalLosses);
  // generator states: two 32-bit words (the low one may be stored signed) and a cached normal or null
  const rngOk = (r: unknown) => Array.isArray(r) && r.length === 3 && r.slice(0, 2).every((w) => Number.isInteger(w) && Math.abs(w) < 2 ** 32) &&
    (r[2] === null || (typeof r[2] === 'number' && Number.isFinite(r[2])));
  for (const k of ['dataRng', 'globalRng'] as const) if (!rngOk(s[k])) throw stateError(file, `trainer.${k}`, 'a generator state', s[k]);
  if (!s.moduleRngs || typeof s.moduleRngs !== 'object') throw stateError(file, 'trainer.moduleRngs', 'an object of generator states', s.moduleRngs);
  for (const [name, r] of Object.entries(s.moduleRngs)) if (!rngOk(r)) throw stateError(file, `trainer.moduleRngs['${name}']`, 'a generator state', r);
  const o = s.optimizer;
  if (!o || typeof o !== 'object' || (o.kind !== 'adamw' && o.kind !== 'sgd')) throw stateError(file, 'trainer.optimizer.kind', "'adamw' or 'sgd'", o?.kind);
  if (o.kind !== kind) throw new LoraError('ERR_LORA_STATE', `Checkpoint ${file} holds ${o.kind} state but training uses ${kind}`);
  if (!o.steps || typeof o.steps !== 'object' || Array.isArray(o.steps)) throw stateError(file, 'trainer.optimizer.steps', 'an object of step counts', o.steps);
  for (const [name, n] of Object.entries(o.steps)) if (!isCount(n)) throw stateError(file, `trainer.optimizer.steps['${name}']`, 'a non-negative integer', n);
}

// One restored tensor: the parameter's shape, every value finite, and (exp_avg_sq) none negative.
function checkRestored(file: string, field: string, t: Tensor, shape: readonly number[], nonNegative: boolean): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
    throw new LoraError('ERR_LORA_SHAPE', `Checkpoint ${file} has ${field} of shape [${t.shape.join(', ')}] but the model's is [${shape.join(', ')}]`);
  if (t.dtype === 'int32') throw stateError(file, field, 'floating-point values', 'int32 values');
  const finite = allFinite(t);
  const negative = finite && nonNegative && t.size > 0 && noGrad(() => tidy(() => max(neg(t)).item())) > 0;
  if (finite && !negative) return;
  const d = t.toFloat32Array();
  const i = d.findIndex((x) => !Number.isFinite(x) || (nonNegative && x < 0));
  throw new LoraError('ERR_LORA_FORMAT', `Checkpoint ${file} is damaged or was edited: ${field} holds ${d[i]} at element ${i} (expected ${nonNegative ? 'finite values >= 0' : 'finite values'}); resuming from it would make every later step non-finite`);
}

// ---- the loop ----------------------------------------------------------------------------------

function shuffled(n: number, rng: Rng): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng.uniform() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * Trains a model. Each optimizer step runs `gradientAccumulation` micro-batches (each inside
 * tidy(), so intermediates are freed), averages their gradients, optionally clips the global norm,
 * sets the scheduled lr and steps the optimizer. Yields to the event loop every 15 ms or so
 * (between steps, skipped ones included), so an AbortSignal, timers and I/O run meanwhile. A
 * resumed run reports where it resumed and which options changed (result.resumed).
 *
 * @example
 * applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 8 });
 * const result = await train({
 *   model, data: examples, batchSize: 16, steps: 200,
 *   loss: (m, batch) => crossEntropy(m.forward(inputsOf(batch)), targetsOf(batch)),
 *   optimizer: { lr: 2e-3 }, schedule: { type: 'cosine', warmupSteps: 20 },
 *   clipGradNorm: 1, checkpointEvery: 50, checkpointDir: 'ckpt',
 * });
 * @throws LoraTypeError / LoraRangeError / ERR_LORA_OPTION for bad options; ERR_LORA_NON_FINITE
 *   with onNonFinite: 'throw'; ERR_LORA_STATE / ERR_LORA_FORMAT for a checkpoint of another setup.
 */
export function train<E>(options: TrainOptions<E[]> & { data: readonly E[] }): Promise<TrainResult>;
export function train<B = unknown[]>(options: TrainOptions<B>): Promise<TrainResult>;
/**
 * Fine-tunes a causal LM on a Dataset (or the splits) from loadDataset: micro-batches of
 * `batchSize` sequences in the dataset's shuffled order, each step's loss the mean over the tokens
 * its micro-batches count (gradient accumulation weighted as Hugging Face weights it), evaluation
 * on `evalData` (default: the valid split) with its perplexity, tokens/s and ETA on the progress
 * line, checkpoints that resume onto the same batches and losses. Every option of train({...})
 * applies, except data/loss/model (and batchSize means sequences).
 *
 * @example
 * const model = await loadCausalLM('./SmolLM2-135M');
 * const tokenizer = loadTokenizer('./SmolLM2-135M');
 * const data = await loadDataset('./data', { tokenizer, maxSeqLength: 512, packing: true });
 * applyLora(model, { targetModules: 'all-linear', rank: 8, alpha: 16 });
 * const result = await train(model, data, {
 *   optimizer: { lr: 1e-4 }, epochs: 2, batchSize: 4, gradientAccumulation: 4,
 *   evalEvery: 50, checkpointEvery: 100, checkpointDir: 'out/checkpoint',
 * });
 * saveLoraAdapter(model, 'out');
 * @throws everything train({...}) throws; ERR_LORA_OPTION when the dataset's maxSeqLength exceeds
 *   the model's max_position_embeddings, or gradientCheckpointing is asked of a model without it.
 */
export function train(model: CausalLM, dataset: Dataset | DatasetSplits, options: DatasetTrainOptions): Promise<TrainResult>;
export async function train<B = unknown[]>(first: TrainOptions<B> | CausalLM, dataset?: Dataset | DatasetSplits, more?: DatasetTrainOptions): Promise<TrainResult> {
  const options = (first instanceof Module ? datasetTrainOptions(first, dataset, more) : first) as TrainOptions<B>;
  const o = checkOptions<TrainOptions<B>>('train()', options, OPTIONS);
  if (!(o.model instanceof Module)) throw typeError('model', 'a Module', o.model);
  const model = o.model;
  if (typeof o.loss !== 'function') throw typeError('loss', 'a function (model, batch) => scalar Tensor', o.loss);
  const lossFn = o.loss;
  const arrayData = Array.isArray(o.data) ? (o.data as readonly unknown[]) : null;
  if (!arrayData && typeof o.data !== 'function') throw typeError('data', 'an array of examples or a function (index) => batch', o.data);
  if (arrayData && arrayData.length === 0) throw new LoraError('ERR_LORA_OPTION', 'Expected at least one training example in data but received an empty array');
  const batchSize = o.batchSize === undefined ? 32 : expectInteger('batchSize', o.batchSize, 1, 2 ** 31 - 1);
  const accum = o.gradientAccumulation === undefined ? 1 : expectInteger('gradientAccumulation', o.gradientAccumulation, 1, 65536);
  let totalSteps: number;
  if (o.steps !== undefined && o.epochs !== undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected steps or epochs for train(), not both');
  if (o.steps !== undefined) totalSteps = expectInteger('steps', o.steps, 0, Number.MAX_SAFE_INTEGER);
  else if (o.epochs !== undefined) {
    if (!arrayData) throw new LoraError('ERR_LORA_OPTION', 'Expected steps (not epochs) for train() with a data function');
    const epochs = expectNumber('epochs', o.epochs, 0);
    totalSteps = Math.ceil((epochs * Math.ceil(arrayData.length / batchSize)) / accum);
  } else throw new LoraError('ERR_LORA_OPTION', 'Expected steps or epochs for train()');
  const schedule = checkSchedule(o.schedule);
  const clip = o.clipGradNorm === undefined ? null : expectNumber('clipGradNorm', o.clipGradNorm, 0);
  const evalEvery = o.evalEvery === undefined ? 0 : expectInteger('evalEvery', o.evalEvery, 1, Number.MAX_SAFE_INTEGER);
  if (evalEvery && o.evalData === undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected evalData with evalEvery for train()');
  const evalBatches = o.evalBatches === undefined ? Infinity : expectInteger('evalBatches', o.evalBatches, 1, Number.MAX_SAFE_INTEGER);
  const ckptEvery = o.checkpointEvery === undefined ? 0 : expectInteger('checkpointEvery', o.checkpointEvery, 1, Number.MAX_SAFE_INTEGER);
  if (ckptEvery && o.checkpointDir === undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected checkpointDir with checkpointEvery for train()');
  const ckptDir = o.checkpointDir === undefined ? null : o.checkpointDir;
  if (ckptDir !== null && (typeof ckptDir !== 'string' || ckptDir === '')) throw typeError('checkpointDir', 'a folder path', ckptDir);
  const resume = o.resume === undefined ? ckptDir !== null : expectBoolean('resume', o.resume);
  const onNonFinite = o.onNonFinite === undefined ? 'skip' : expectOneOf('onNonFinite', o.onNonFinite, ['skip', 'stop', 'throw'] as const);
  const maxSkips = o.maxConsecutiveSkips === undefined ? 10 : expectInteger('maxConsecutiveSkips', o.maxConsecutiveSkips, 0, Number.MAX_SAFE_INTEGER);
  if (o.onStep !== undefined && typeof o.onStep !== 'function') throw typeError('onStep', 'a function', o.onStep);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw typeError('signal', 'an AbortSignal', o.signal);
  const progressOpt = o.progress ?? 'auto';
  if (typeof progressOpt !== 'function') expectOneOf('progress', progressOpt, ['auto', 'bar', 'lines', 'none'] as const);
  if (o.batchWeight !== undefined && typeof o.batchWeight !== 'function') throw typeError('batchWeight', 'a function (batch) => number', o.batchWeight);
  if (o.batchTokens !== undefined && typeof o.batchTokens !== 'function') throw typeError('batchTokens', 'a function (batch) => number', o.batchTokens);
  const checkpointing = o.gradientCheckpointing === undefined ? undefined : expectBoolean('gradientCheckpointing', o.gradientCheckpointing);
  if (checkpointing !== undefined && !('gradientCheckpointing' in model))
    throw new LoraError('ERR_LORA_OPTION', `Expected a model with a gradientCheckpointing property for gradientCheckpointing: ${checkpointing} but ${model.constructor.name} has none`);
  const weightOf = (b: B, what: string): number => (o.batchWeight ? expectNumber(`batchWeight(${what})`, o.batchWeight(b), 0) : 1);
  const logEvery = o.logEvery === undefined ? Math.max(1, Math.round(totalSteps / 20)) : expectInteger('logEvery', o.logEvery, 1, Number.MAX_SAFE_INTEGER);

  let opt: Optimizer;
  if (o.optimizer instanceof Optimizer) {
    if (o.loraPlusRatio !== undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected optimizer settings ({ lr, ... }) rather than an Optimizer when loraPlusRatio is given (train() builds the LoRA+ groups)');
    opt = o.optimizer;
  } else {
    const spec = checkOptions<OptimizerSpec>('train() optimizer', o.optimizer, ['lr', 'weightDecay', 'betas', 'eps']);
    if (o.optimizer === undefined) throw typeError('optimizer', 'an Optimizer or { lr, weightDecay?, betas?, eps? }', o.optimizer);
    const ratio = o.loraPlusRatio === undefined ? 1 : expectNumber('loraPlusRatio', o.loraPlusRatio, 0);
    const groups = parameterGroups(model, spec as OptimizerSpec, ratio);
    if (groups.length === 0) throw new LoraError('ERR_LORA_OPTION', 'Expected a model with trainable parameters for train() but every parameter is frozen');
    opt = new AdamW(groups, { lr: expectNumber('optimizer.lr', spec.lr, 0), betas: spec.betas, eps: spec.eps, weightDecay: spec.weightDecay ?? 0.01 });
  }
  const ownOptimizer = !(o.optimizer instanceof Optimizer);
  const baseLr = opt.lr;
  const names = new Map<Tensor, string>();
  for (const [n, t] of model.namedParameters()) if (!names.has(t)) names.set(t, n);
  for (const p of opt.params) if (!names.has(p)) throw new LoraError('ERR_LORA_OPTION', 'Expected the optimizer to hold only parameters of the model');

  const dataRng = new Rng(o.seed === undefined ? defaultRng().seed() : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER));
  let order: number[] = arrayData ? shuffled(arrayData.length, dataRng) : [];
  let cursor = 0;
  let step = 0;
  let losses: number[] = [];
  let evalLosses: { step: number; loss: number }[] = [];
  let skipped = 0;
  const rngs = moduleRngs(model);

  // what the checkpoint records of this run's options, to report changes on resume
  const runOptions: Record<string, unknown> = {
    steps: totalSteps, lr: baseLr, batchSize: arrayData || o.batchSize !== undefined ? batchSize : undefined, gradientAccumulation: accum,
    schedule: typeof schedule === 'function' ? 'a function' : schedule, clipGradNorm: clip ?? undefined,
    loraPlusRatio: o.loraPlusRatio, weightDecay: ownOptimizer ? (o.optimizer as OptimizerSpec).weightDecay ?? 0.01 : undefined,
    optimizer: opt instanceof SGD ? 'SGD' : 'AdamW', seed: o.seed,
  };
  let resumedFrom = 0;
  let resumed: ResumeInfo | null = null;
  if (ckptDir !== null && resume) {
    const st = readCheckpoint(ckptDir, opt, names);
    if (st) {
      const changed = Object.keys(runOptions)
        .filter((k) => st.options && JSON.stringify(st.options[k]) !== JSON.stringify(runOptions[k]))
        .map((k) => ({ option: k, checkpoint: st.options![k], now: runOptions[k] }));
      resumed = { file: path.join(ckptDir, CHECKPOINT_FILE), step: st.step, changed };
      step = resumedFrom = st.step;
      losses = st.losses;
      evalLosses = st.evalLosses;
      skipped = st.skippedSteps;
      dataRng.setState(st.dataRng);
      order = st.order;
      cursor = st.cursor;
      defaultRng().setState(st.globalRng);
      for (const [p, r] of rngs) if (st.moduleRngs[p]) r.setState(st.moduleRngs[p]!);
    }
  }

  const nextBatch = (micro: number): B => {
    if (!arrayData) return (o.data as (i: number) => B)(micro);
    const batch: unknown[] = [];
    while (batch.length < batchSize) {
      if (cursor >= order.length) {
        order = shuffled(arrayData.length, dataRng);
        cursor = 0;
      }
      batch.push(arrayData[order[cursor++]!]);
      if (batch.length >= arrayData.length) break;
    }
    return batch as unknown as B;
  };

  const evaluate = (): number => {
    const src = o.evalData!;
    const batches: B[] = typeof src === 'function' ? (src as () => B[])().slice(0, evalBatches) : [];
    if (Array.isArray(src))
      for (let i = 0; i < src.length && batches.length < evalBatches; i += batchSize) batches.push(src.slice(i, i + batchSize) as unknown as B);
    const wasTraining = model.training;
    model.eval();
    let total = 0;
    let weights = 0;
    try {
      batches.forEach((b, i) => {
        const w = weightOf(b, `evaluation batch ${i}`);
        if (w === 0) return;
        total += w * noGrad(() => tidy(() => lossFn(model, b).item()));
        weights += w;
      });
    } finally {
      model.train(wasTraining);
    }
    return weights > 0 ? total / weights : NaN;
  };

  const snapshot = (): TrainerState => ({
    version: 1, step, totalSteps, losses, evalLosses, skippedSteps: skipped, dataRng: dataRng.getState(), order, cursor,
    globalRng: defaultRng().getState(),
    moduleRngs: Object.fromEntries([...rngs].map(([p, r]) => [p, r.getState()])),
    optimizer: { kind: 'adamw', steps: {} }, options: runOptions,
  });

  const mode = typeof progressOpt === 'function' ? progressOpt
    : progressOpt === 'auto' ? (process.stderr.isTTY ? 'bar' : 'lines') : progressOpt;
  const progress = new Progress(mode, logEvery);
  if (resumed) progress.say(resumeMessage(resumed, totalSteps));
  const t0 = Date.now();
  const stepStart = step;
  let stopped: TrainResult['stopped'] = 'completed';
  let lastYield = Date.now();
  let skipRun = 0;
  let tokensSeen = 0;
  const hadCheckpointing = checkpointing === undefined ? undefined : (model as unknown as { gradientCheckpointing: unknown }).gradientCheckpointing;
  if (checkpointing !== undefined) (model as unknown as { gradientCheckpointing: boolean }).gradientCheckpointing = checkpointing;
  model.train(true);
  try {
    while (step < totalSteps) {
      if (Date.now() - lastYield >= YIELD_MS) {
        await tick();
        lastYield = Date.now();
      }
      if (o.signal?.aborted) { stopped = 'aborted'; break; }
      const lr = baseLr * lrMultiplier(schedule, step, totalSteps);
      opt.lr = lr;
      let lossSum = 0;
      let finite = true;
      // the step's micro-batches first: their weights (counted tokens) share out the step's loss
      const micro = Array.from({ length: accum }, (_, k) => nextBatch(step * accum + k));
      const weights = micro.map((b, k) => weightOf(b, `micro-batch ${k} of step ${step + 1}`));
      const weightSum = weights.reduce((a, b) => a + b, 0);
      let stepTokens = 0;
      for (let k = 0; k < accum; k++) {
        const batch = micro[k]!;
        if (o.batchTokens) stepTokens += expectNumber('batchTokens(batch)', o.batchTokens(batch), 0);
        if (weights[k] === 0) continue;
        const share = weights[k]! / weightSum;
        const value = tidy(() => {
          const loss = lossFn(model, batch);
          if (!(loss instanceof Tensor) || loss.size !== 1) throw typeError('loss(model, batch) result', 'a one-element Tensor', loss);
          const v = loss.item();
          if (Number.isFinite(v)) (share === 1 ? loss : mul(loss, share)).backward();
          return v;
        });
        if (!Number.isFinite(value)) finite = false;
        lossSum += value * weights[k]!;
      }
      if (weightSum === 0) finite = false;
      tokensSeen += stepTokens;
      let gradNorm = NaN;
      if (finite) {
        // an exact NaN/Inf scan first (a finite but huge norm is not an error); only then the norm
        const grads = opt.params.map((p) => p.grad).filter((g): g is Tensor => g !== null);
        if (!allFinite(grads)) finite = false;
        else gradNorm = clip !== null ? clipGradNorm(opt.params, clip) : Math.sqrt(sumOfSquares(grads));
      }
      const loss = weightSum > 0 ? lossSum / weightSum : NaN;
      step += 1;
      let evalLoss: number | undefined;
      if (!finite) {
        opt.zeroGrad();
        const what = Number.isFinite(loss) ? 'gradient norm' : 'loss';
        if (onNonFinite === 'throw') throw new LoraError('ERR_LORA_NON_FINITE', `Non-finite ${what} at step ${step} (loss ${loss}, gradient norm ${gradNorm})`);
        skipped++;
        skipRun++;
        losses.push(loss);
        if (onNonFinite === 'stop') { stopped = 'non-finite'; break; }
      } else {
        skipRun = 0;
        opt.step();
        opt.zeroGrad();
        losses.push(loss);
        if (evalEvery && (step % evalEvery === 0 || step === totalSteps)) {
          evalLoss = evaluate();
          evalLosses.push({ step, loss: evalLoss });
        }
      }
      const elapsed = (Date.now() - t0) / 1000;
      const tokensPerSecond = o.batchTokens ? tokensSeen / Math.max(elapsed, 1e-9) : undefined;
      progress.update(step, totalSteps, loss, lr, (step - stepStart) / Math.max(elapsed, 1e-9), evalLoss,
        finite ? undefined : `non-finite ${Number.isFinite(loss) ? 'gradient' : 'loss'}`, tokensPerSecond);
      if (ckptDir !== null && ckptEvery && step % ckptEvery === 0) writeCheckpoint(ckptDir, model, opt, names, snapshot());
      const info: StepInfo = { step, totalSteps, loss, lr, gradNorm, evalLoss, elapsed, skipped: !finite };
      if (o.batchTokens) Object.assign(info, { tokens: stepTokens, tokensPerSecond }, evalLoss !== undefined ? { evalPerplexity: Math.exp(evalLoss) } : {});
      if (o.onStep && o.onStep(info) === false) { stopped = 'callback'; break; }
      if (maxSkips > 0 && skipRun >= maxSkips) {
        stopped = 'diverged';
        progress.say(`stopped at step ${step}: the last ${skipRun} steps had a non-finite loss or gradient and were skipped; the run diverged (lower the lr, set clipGradNorm, or raise maxConsecutiveSkips)`);
        break;
      }
    }
    // the last step too (completed or stopped), so a rerun resumes from where this one ended
    if (ckptDir !== null && ckptEvery && step % ckptEvery !== 0 && step > stepStart) writeCheckpoint(ckptDir, model, opt, names, snapshot());
  } finally {
    if (checkpointing !== undefined) (model as unknown as { gradientCheckpointing: unknown }).gradientCheckpointing = hadCheckpointing;
    if (mode === 'bar' && stopped !== 'completed') progress.end();
    opt.lr = baseLr;
    if (ownOptimizer) opt.dispose();
    else opt.zeroGrad();
  }
  return { steps: step, losses, evalLosses, stopped, skippedSteps: skipped, seconds: (Date.now() - t0) / 1000, resumedFrom, resumed };
}

function resumeMessage(r: ResumeInfo, totalSteps: number): string {
  const left = totalSteps - r.step;
  let text = `resumed from ${r.file} at step ${r.step} of ${totalSteps}` +
    (left > 0 ? ` (${left} steps left)` : `: nothing left to train (raise steps above ${r.step} to train further, or pass resume: false to start over)`);
  if (r.changed.length) {
    const show = (v: unknown) => (v === undefined ? 'unset' : typeof v === 'string' ? v : JSON.stringify(v));
    text += `; options that differ from the checkpoint's: ${r.changed.map((c) => `${c.option} ${show(c.now)} (checkpoint: ${show(c.checkpoint)})`).join(', ')}` +
      (left > 0 ? `; the new values apply from step ${r.step + 1}` : '');
    if (r.changed.some((c) => c.option === 'seed')) text += ' (a new seed does not change the data order, which continues from the checkpoint)';
  }
  return text;
}
