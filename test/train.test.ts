// lib/train.ts: schedules by hand, parameter groups (no decay on 1-D, LoRA+), clipping,
// accumulation equivalence, evaluation, stopping (AbortSignal, onStep, non-finite), progress lines,
// and checkpoint + resume reproducing an uninterrupted run's loss curve exactly.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  AdamW, applyLora, clipGradNorm, CHECKPOINT_FILE, crossEntropy, lrMultiplier, memory, MLP, mse, parameterGroups, reshape, tensor,
  Tensor, train, TransformerLM, loadPeftAdapter,
} from '../lib/index';

const before = memory().numTensors;

/** y = 2x - 1 samples as [x, y] pairs. */
const pairs = Array.from({ length: 24 }, (_, i) => [i / 12 - 1, 2 * (i / 12 - 1) - 1] as [number, number]);
function regressionLoss(m: { forward(x: Tensor): Tensor }, batch: [number, number][]): Tensor {
  const x = tensor(batch.map((p) => p[0]), [batch.length, 1]);
  const y = tensor(batch.map((p) => p[1]), [batch.length, 1]);
  return mse(m.forward(x), y);
}

t.test('schedules', (tt) => {
  tt.equal(lrMultiplier('constant', 5, 10), 1);
  const s = { type: 'cosine' as const, warmupSteps: 4, minLrRatio: 0.1 };
  tt.same([0, 1, 2, 3].map((k) => lrMultiplier(s, k, 14)), [0.25, 0.5, 0.75, 1], 'linear warm-up (step+1)/warmup');
  tt.equal(lrMultiplier(s, 4, 14), 1, 'cosine starts at 1 after warm-up');
  tt.ok(Math.abs(lrMultiplier(s, 9, 14) - (0.1 + 0.9 * 0.5 * (1 + Math.cos(Math.PI * 0.5)))) < 1e-12, 'halfway: 0.55');
  tt.ok(Math.abs(lrMultiplier(s, 14, 14) - 0.1) < 1e-12, 'ends at minLrRatio');
  tt.ok(Math.abs(lrMultiplier({ type: 'linear' }, 5, 10) - 0.5) < 1e-12, 'linear decay');
  tt.equal(lrMultiplier((k, n) => k / n, 3, 6), 0.5, 'a custom function');
  tt.end();
});

t.test('parameter groups: no decay on 1-D parameters, LoRA+ on lora_B', (tt) => {
  const m = new MLP([2, 3, 1], { seed: 1 });
  const groups = parameterGroups(m, { lr: 0.1, weightDecay: 0.05 });
  tt.same(groups.map((g) => [g.params.map((p) => p.ndim), g.lr, g.weightDecay]), [[[2, 2], 0.1, 0.05], [[1, 1], 0.1, 0]]);
  const lm = new TransformerLM({ vocabSize: 5, dModel: 8, nHeads: 2, nLayers: 1, maxSeqLen: 4, seed: 1 });
  applyLora(lm, { targetModules: ['q_proj'], rank: 2 });
  const lg = parameterGroups(lm, { lr: 0.01 }, 16);
  tt.same(lg.map((g) => [g.params.length, g.lr, g.weightDecay]), [[1, 0.01, 0.01], [1, 0.16, 0.01]], 'lora_A at lr, lora_B at 16·lr');
  const dm = new TransformerLM({ vocabSize: 5, dModel: 8, nHeads: 2, nLayers: 1, maxSeqLen: 4, seed: 1 });
  applyLora(dm, { targetModules: ['q_proj'], rank: 2, useDora: true });
  const dg = parameterGroups(dm, { lr: 0.01 }, 16);
  tt.same(dg.map((g) => [g.params.map((p) => p.ndim), g.lr, g.weightDecay]), [[[2], 0.01, 0.01], [[2], 0.16, 0.01], [[1], 0.16, 0]],
    "DoRA's magnitude (1-D) joins lora_B's rate, without decay, as PEFT's LoRA+ groups it");
  m.dispose();
  lm.dispose();
  dm.dispose();
  tt.end();
});

t.test('clipGradNorm', (tt) => {
  const p = tensor([3, 4], [2], { requiresGrad: true });
  const q = tensor([12], [1], { requiresGrad: true });
  const l1 = p.mul(p).sum().mul(0.5);
  const l2 = q.mul(q).sum().mul(0.5);
  l1.backward();
  l2.backward();
  const norm = clipGradNorm([p, q], 6.5);
  tt.equal(norm, 13, 'returns the norm before clipping: sqrt(9 + 16 + 144)');
  const g = [...p.grad!.toFloat32Array(), ...q.grad!.toFloat32Array()];
  tt.ok(Math.abs(Math.hypot(...g) - 6.5) < 1e-4, 'scaled to maxNorm');
  for (const x of [l1, l2, p, q]) x.dispose();
  tt.end();
});

t.test('training lowers the loss; accumulation matches a larger batch', async (tt) => {
  const m = new MLP([1, 8, 1], { seed: 1, activation: 'tanh' });
  const r = await train({ model: m, data: pairs, batchSize: 8, steps: 60, seed: 3, progress: 'none', optimizer: { lr: 0.05 }, loss: regressionLoss });
  tt.equal(r.steps, 60);
  tt.equal(r.stopped, 'completed');
  tt.ok(r.losses[59]! < r.losses[0]! / 5, `loss falls (${r.losses[0]} -> ${r.losses[59]})`);
  m.dispose();

  // the same 16 examples per step: once as one batch, once as two accumulated halves
  const full = new MLP([1, 8, 1], { seed: 2 });
  const acc = new MLP([1, 8, 1], { seed: 2 });
  const batchAt = (k: number) => pairs.slice((k * 4) % 24, ((k * 4) % 24) + 4);
  await train({ model: full, data: (i: number) => [...batchAt(2 * i), ...batchAt(2 * i + 1)], steps: 5, progress: 'none', optimizer: { lr: 0.01 }, loss: regressionLoss });
  await train({ model: acc, data: (i: number) => batchAt(i), gradientAccumulation: 2, steps: 5, progress: 'none', optimizer: { lr: 0.01 }, loss: regressionLoss });
  const a = full.namedParameters().flatMap(([, p]) => [...p.toFloat32Array()]);
  const b = acc.namedParameters().flatMap(([, p]) => [...p.toFloat32Array()]);
  tt.ok(a.every((v, i) => Math.abs(v - b[i]!) < 1e-5), 'accumulating two halves equals one full batch');
  full.dispose();
  acc.dispose();
});

t.test('evaluation, progress lines, onStep, AbortSignal, non-finite steps', async (tt) => {
  const m = new MLP([1, 4, 1], { seed: 4 });
  const lines: string[] = [];
  const r = await train({
    model: m, data: pairs, batchSize: 6, steps: 10, evalEvery: 5, evalData: pairs, progress: (l) => lines.push(l), logEvery: 5,
    optimizer: { lr: 0.01 }, loss: regressionLoss, seed: 1,
  });
  tt.same(r.evalLosses.map((e) => e.step), [5, 10]);
  tt.equal(lines.length, 2);
  tt.match(lines[1]!, /^step 10\/10  loss \d+\.\d{4}  lr 1\.00e-2  [\d.]+ steps\/s  ETA 0:00  eval \d+\.\d{4}$/);

  const ac = new AbortController();
  const aborted = await train({
    model: m, data: pairs, steps: 10, progress: 'none', optimizer: { lr: 0.01 }, loss: regressionLoss, signal: ac.signal,
    onStep: (s) => { if (s.step === 3) ac.abort(); },
  });
  tt.same([aborted.stopped, aborted.steps], ['aborted', 3]);
  const called = await train({ model: m, data: pairs, steps: 10, progress: 'none', optimizer: { lr: 0.01 }, loss: regressionLoss, onStep: (s) => s.step < 2 });
  tt.same([called.stopped, called.steps], ['callback', 2]);

  const nanAt2 = (mm: { forward(x: Tensor): Tensor }, b: [number, number][]) => {
    const l = regressionLoss(mm, b);
    return nanStep++ === 1 ? l.mul(NaN) : l;
  };
  let nanStep = 0;
  const skipped = await train({ model: m, data: pairs, steps: 4, progress: 'none', optimizer: { lr: 0.01 }, loss: nanAt2 });
  tt.same([skipped.stopped, skipped.skippedSteps, skipped.steps], ['completed', 1, 4]);
  tt.ok(m.namedParameters().every(([, p]) => p.toFloat32Array().every(Number.isFinite)), 'a skipped step leaves parameters finite');
  nanStep = 0;
  await tt.rejects(train({ model: m, data: pairs, steps: 4, progress: 'none', optimizer: { lr: 0.01 }, loss: nanAt2, onNonFinite: 'throw' }),
    { code: 'ERR_LORA_NON_FINITE', message: 'Non-finite loss at step 2 (loss NaN, gradient norm NaN)' });
  await tt.rejects(train({ model: m, data: pairs, steps: 4, epochs: 1, optimizer: { lr: 0.01 }, loss: regressionLoss }),
    { code: 'ERR_LORA_OPTION', message: 'Expected steps or epochs for train(), not both' });
  await tt.rejects(train({ model: m, data: pairs, step: 4, optimizer: { lr: 0.01 }, loss: regressionLoss } as never),
    { code: 'ERR_LORA_OPTION', message: "Unknown option 'step' for train(); did you mean 'steps'?" });
  const opt = new AdamW(m.parameters(), { lr: 0.01 });
  await tt.rejects(train({ model: m, data: pairs, steps: 1, optimizer: opt, loraPlusRatio: 4, loss: regressionLoss }), { code: 'ERR_LORA_OPTION' });
  opt.dispose();
  m.dispose();
});

t.test('train() yields to the event loop: an AbortSignal and timers fire, also while every step is skipped', async (tt) => {
  const m = new MLP([1, 4, 1], { seed: 4 });
  const x = tensor([0.5, -0.5], [2, 1]);
  const tiny = (mm: { forward(x: Tensor): Tensor }) => mse(mm.forward(x), tensor([1, 0], [2, 1]));
  for (const [what, loss] of [['finite steps', tiny], ['every step skipped', (mm: { forward(x: Tensor): Tensor }) => tiny(mm).mul(NaN)]] as const) {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    const started = Date.now();
    const r = await train({
      model: m, data: () => null, steps: 200_000, progress: 'none', optimizer: { lr: 1e-3 }, loss, maxConsecutiveSkips: 0,
      signal: AbortSignal.timeout(100),
    });
    clearInterval(timer);
    tt.equal(r.stopped, 'aborted', `${what}: AbortSignal.timeout(100) stops the run (after ${r.steps} steps, ${Date.now() - started} ms)`);
    tt.ok(r.steps < 200_000, `${what}: it did not run every step`);
    tt.ok(ticks > 0, `${what}: a 5 ms interval fired ${ticks} times during training`);
  }
  x.dispose();
  m.dispose();
});

t.test('skipped steps: onStep and progress see them; consecutive skips stop a diverged run', async (tt) => {
  const m = new MLP([1, 4, 1], { seed: 4 });
  const infos: { step: number; skipped: boolean }[] = [];
  const lines: string[] = [];
  const r = await train({
    model: m, data: pairs, batchSize: 6, steps: 1000, optimizer: { lr: 0.01 }, progress: (l) => lines.push(l), logEvery: 1000,
    loss: (mm, b: [number, number][]) => regressionLoss(mm, b).mul(NaN), onStep: (s) => { infos.push({ step: s.step, skipped: s.skipped }); },
  });
  tt.same([r.stopped, r.steps, r.skippedSteps], ['diverged', 10, 10], 'stopped after 10 skipped steps in a row (the default)');
  tt.same(infos, Array.from({ length: 10 }, (_, i) => ({ step: i + 1, skipped: true })), 'onStep ran for every skipped step');
  tt.equal(lines.filter((l) => /skipped \(non-finite loss\)$/.test(l)).length, 10, 'a progress line per skipped step');
  tt.match(lines[0]!, /^step 1\/1000  loss NaN  lr 1\.00e-2  [\d.]+ (steps\/s|s\/step)  ETA [\d:-]+  skipped \(non-finite loss\)$/);
  tt.equal(lines.at(-1), 'stopped at step 10: the last 10 steps had a non-finite loss or gradient and were skipped; the run diverged (lower the lr, set clipGradNorm, or raise maxConsecutiveSkips)');

  let n = 0; // NaN on steps 2-4 only: three in a row, then finite again
  const some = await train({
    model: m, data: pairs, batchSize: 6, steps: 8, optimizer: { lr: 0.01 }, progress: 'none', maxConsecutiveSkips: 4,
    loss: (mm, b: [number, number][]) => { n++; return n >= 2 && n <= 4 ? regressionLoss(mm, b).mul(NaN) : regressionLoss(mm, b); },
  });
  tt.same([some.stopped, some.steps, some.skippedSteps], ['completed', 8, 3], 'fewer skips in a row than the limit: the run goes on');
  await tt.rejects(train({ model: m, data: pairs, steps: 1, optimizer: { lr: 0.01 }, loss: regressionLoss, maxConsecutiveSkips: -1 }),
    { code: 'ERR_LORA_RANGE', message: 'Expected an integer between 0 and 9007199254740991 for maxConsecutiveSkips but received -1 (number)' });
  m.dispose();
});

t.test('progress shows s/step for steps slower than one a second', async (tt) => {
  const m = new MLP([1, 4, 1], { seed: 4 });
  const lines: string[] = [];
  const wait = new Int32Array(new SharedArrayBuffer(4));
  await train({
    model: m, data: pairs, batchSize: 6, steps: 1, optimizer: { lr: 0.01 }, progress: (l) => lines.push(l),
    loss: (mm, b: [number, number][]) => { Atomics.wait(wait, 0, 0, 1100); return regressionLoss(mm, b); },
  });
  tt.match(lines[0]!, /^step 1\/1 .* 1\.\d s\/step  ETA 0:00$/, lines[0]);
  m.dispose();
});

t.test('checkpoint and resume reproduce the uninterrupted loss curve', async (tt) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'train-test-'));
  const V = 7, B = 4, T = 6;
  const examples = Array.from({ length: 40 }, (_, i) => Array.from({ length: T + 1 }, (_, j) => (i * 3 + j * (1 + (i % 3))) % V));
  const lmLoss = (m: { forward(x: Tensor): Tensor }, batch: number[][]) => {
    const ids = tensor(batch.flatMap((s) => s.slice(0, T)), [batch.length, T], { dtype: 'int32' });
    const tg = tensor(batch.flatMap((s) => s.slice(1)), [batch.length * T], { dtype: 'int32' });
    return crossEntropy(reshape(m.forward(ids), [batch.length * T, V]), tg, { labelSmoothing: 0.05 });
  };
  const model = () => {
    const lm = new TransformerLM({ vocabSize: V, dModel: 16, nHeads: 2, nLayers: 1, maxSeqLen: T, seed: 5, dropout: 0.1 });
    applyLora(lm, { targetModules: ['q_proj', 'v_proj', 'up_proj'], rank: 4, dropout: 0.1, seed: 6 });
    return lm;
  };
  const common = {
    data: examples, batchSize: B, steps: 12, seed: 9, progress: 'none' as const, loss: lmLoss, clipGradNorm: 1, loraPlusRatio: 4,
    optimizer: { lr: 1e-2 }, schedule: { type: 'cosine' as const, warmupSteps: 3 },
  };
  const a = model();
  const whole = await train({ ...common, model: a });
  const b = model();
  const first = await train({ ...common, model: b, checkpointDir: dir, checkpointEvery: 5, onStep: (s) => s.step < 7 });
  tt.same([first.stopped, first.steps], ['callback', 7]);
  tt.ok(fs.existsSync(path.join(dir, CHECKPOINT_FILE)), 'a checkpoint file');
  tt.same(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp')), [], 'no temp files left behind');
  const adapter = loadPeftAdapter(path.join(dir, 'adapter'));
  tt.equal(adapter.modules.size, 3, 'the adapter is written as a PEFT folder too');
  adapter.dispose();
  b.dispose();
  const c = model(); // a fresh process would start like this
  const resumed = await train({ ...common, model: c, checkpointDir: dir, checkpointEvery: 5 });
  tt.equal(resumed.resumedFrom, 7);
  tt.equal(resumed.steps, 12);
  tt.same(resumed.losses, whole.losses, 'the resumed run reproduces the loss curve exactly');
  const pa = a.namedParameters().flatMap(([, p]) => [...p.toFloat32Array()]);
  const pc = c.namedParameters().flatMap(([, p]) => [...p.toFloat32Array()]);
  tt.same(pc, pa, 'and ends at the same parameters');
  tt.same(resumed.resumed, { file: path.join(dir, CHECKPOINT_FILE), step: 7, changed: [] }, 'resumed says from where, nothing changed');

  // a rerun of the finished run: says so and trains nothing
  const lines: string[] = [];
  const again = await train({ ...common, model: c, checkpointDir: dir, checkpointEvery: 5, progress: (l) => lines.push(l) });
  tt.same([again.steps, again.resumedFrom, again.losses.length], [12, 12, 12], 'the final step was checkpointed; nothing left');
  tt.equal(lines[0], `resumed from ${path.join(dir, CHECKPOINT_FILE)} at step 12 of 12: nothing left to train (raise steps above 12 to train further, or pass resume: false to start over)`);
  // changed options are named, with both values, and apply from the next step
  lines.length = 0;
  const more = await train({ ...common, model: c, steps: 14, optimizer: { lr: 2e-2 }, clipGradNorm: undefined, checkpointDir: dir, checkpointEvery: 5, progress: (l) => lines.push(l), logEvery: 100 });
  tt.same(more.resumed!.changed, [
    { option: 'steps', checkpoint: 12, now: 14 }, { option: 'lr', checkpoint: 1e-2, now: 2e-2 }, { option: 'clipGradNorm', checkpoint: 1, now: undefined },
  ]);
  tt.equal(lines[0], `resumed from ${path.join(dir, CHECKPOINT_FILE)} at step 12 of 14 (2 steps left); options that differ from the checkpoint's: steps 14 (checkpoint: 12), lr 0.02 (checkpoint: 0.01), clipGradNorm unset (checkpoint: 1); the new values apply from step 13`);
  tt.equal(more.steps, 14, 'and trains the steps left');
  a.dispose();
  c.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

t.test('no tensor outlives the tests', (tt) => {
  tt.equal(memory().numTensors, before);
  tt.end();
});
