// Every validation path of the foundation API: the error class, its code and its message.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  AdamW, add, LoraError, LoraLinear, LoraRangeError, LoraTypeError, matmul, ones, reshape, SGD, sum, tensor,
  tidy, zeros, setNumThreads, randn, features, Linear, Embedding, LayerNorm, RMSNorm, Dropout, MLP, gelu, mse, dropout,
  applyLora, parameterGroups, mergeAndUnload, LoraModel, combineAdapters, loadSafetensors, saveSafetensors, TransformerLM, train,
} from '../lib/index';
import { native } from '../lib/native';
import { assertLoraError, leakChecked } from './helpers';

t.test('tensor factories', async (t) => {
  await leakChecked(t, 'factories', (tt) => {
    assertLoraError(tt, () => tensor([1, 2, 3], [2, 2]), LoraError, 'ERR_LORA_SHAPE', /^Expected 4 values for shape \[2, 2\] but received 3$/, 'length mismatch');
    assertLoraError(tt, () => tensor('abc' as never, [3]), LoraTypeError, 'ERR_LORA_TYPE', /Expected a Float32Array or an array of numbers for data but received "abc" \(string\)/, 'data type');
    assertLoraError(tt, () => tensor([1, 'x' as never], [2]), LoraTypeError, 'ERR_LORA_TYPE', /data\[1\]/, 'element type');
    assertLoraError(tt, () => tensor([1], [1.5]), LoraRangeError, 'ERR_LORA_RANGE', /Expected an array of non-negative integers for shape but received \[1\.5\]/, 'non-integer dim');
    assertLoraError(tt, () => zeros([-1]), LoraRangeError, 'ERR_LORA_RANGE', /non-negative integers for shape/, 'negative dim');
    assertLoraError(tt, () => zeros('3' as never), LoraTypeError, 'ERR_LORA_TYPE', /for shape but received "3" \(string\)/, 'shape type');
    assertLoraError(tt, () => zeros([2 ** 30, 2 ** 30]), LoraRangeError, 'ERR_LORA_RANGE', /at most 2\^40 elements/, 'huge shape');
    assertLoraError(tt, () => ones([2], { devise: 'cpu' } as never), LoraError, 'ERR_LORA_OPTION', /Unknown option 'devise' for ones\(\)|Unknown option 'devise' for full\(\); did you mean 'device'\?/, 'unknown option');
    assertLoraError(tt, () => ones([2], { device: 'tpu' as never }), LoraRangeError, 'ERR_LORA_RANGE', /Expected 'cpu' or 'cuda' for device but received "tpu" \(string\)/, 'bad device');
    assertLoraError(tt, () => ones([2], { dtype: 'int8' as never }), LoraRangeError, 'ERR_LORA_RANGE', /for dtype but received "int8"/, 'bad dtype');
    assertLoraError(tt, () => ones([2], { dtype: 'bfloat16', requiresGrad: true }), LoraError, 'ERR_LORA_DTYPE', /float32/, 'grad on bf16');
    assertLoraError(tt, () => randn([2], { seed: -1 }), LoraRangeError, 'ERR_LORA_RANGE', /for seed but received -1 \(number\)/, 'negative seed');
    assertLoraError(tt, () => setNumThreads(0), LoraRangeError, 'ERR_LORA_RANGE', /^Expected an integer between 1 and 1024 for threads but received 0 \(number\)$/, 'threads');
    if (!features().cuda)
      assertLoraError(tt, () => ones([2], { device: 'cuda' }), LoraError, 'ERR_LORA_NO_CUDA', /CUDA is not available: .+/, 'cuda without a GPU');
    else tt.skip('a GPU is present: ERR_LORA_NO_CUDA can only be checked on a machine without one');
  });
});

t.test('ops', async (t) => {
  await leakChecked(t, 'ops', (tt) => {
    tidy(() => {
      const a = ones([2, 3]);
      const b = ones([4, 5]);
      assertLoraError(tt, () => add(a, b), LoraError, 'ERR_LORA_SHAPE', /^Expected shapes that broadcast for add\(\) but received \[2, 3\] and \[4, 5\]$/, 'broadcast');
      assertLoraError(tt, () => matmul(a, ones([2, 3])), LoraError, 'ERR_LORA_SHAPE', /Expected a\.shape\[-1\] == b\.shape\[-2\] for matmul\(\) but received \[2, 3\] and \[2, 3\]/, 'matmul inner dims');
      assertLoraError(tt, () => matmul(ones([2, 2, 3]), ones([3, 3, 4])), LoraError, 'ERR_LORA_SHAPE', /equal batch dims/, 'matmul batch dims');
      assertLoraError(tt, () => reshape(a, [4, 2]), LoraError, 'ERR_LORA_SHAPE', /Expected a shape with 6 elements for reshape\(\) of \[2, 3\] but received \[4, 2\]/, 'reshape');
      assertLoraError(tt, () => add({ shape: [2, 3] } as never, a), LoraTypeError, 'ERR_LORA_TYPE', /^Expected a Tensor for a but received an object$/, 'a plain object is not a tensor');
      assertLoraError(tt, () => sum(a, 5), LoraRangeError, 'ERR_LORA_RANGE', /Expected an integer between -2 and 1 for axis but received 5 \(number\)/, 'axis');
      const bf = ones([2, 3], { dtype: 'bfloat16' });
      assertLoraError(tt, () => add(bf, a), LoraError, 'ERR_LORA_DTYPE', /float32 tensors for add\(\)/, 'dtype');
      const d = ones([2]);
      d.dispose();
      assertLoraError(tt, () => add(d, 1), LoraError, 'ERR_LORA_DISPOSED', /^Expected a live tensor for a but received a disposed tensor of shape \[2\]$/, 'use after dispose');
      assertLoraError(tt, () => d.toFloat32Array(), LoraError, 'ERR_LORA_DISPOSED', /disposed tensor/, 'read after dispose');
      assertLoraError(tt, () => a.assign(ones([3, 2])), LoraError, 'ERR_LORA_SHAPE', /Expected src of shape \[2, 3\] for assign\(\) but received \[3, 2\]/, 'assign shape');
      assertLoraError(tt, () => a.item(), LoraError, 'ERR_LORA_SHAPE', /one element for item\(\)/, 'item');
    });
  });
});

t.test('autograd', async (t) => {
  await leakChecked(t, 'backward', (tt) => {
    tidy(() => {
      const x = ones([3], { requiresGrad: true });
      const y = add(x, 1);
      assertLoraError(tt, () => y.backward(), LoraError, 'ERR_LORA_GRAD', /^Expected a gradient argument for backward\(\) on a tensor of shape \[3\]/, 'non-scalar without gradient');
      assertLoraError(tt, () => y.backward(ones([2])), LoraError, 'ERR_LORA_SHAPE', /Expected gradient of shape \[3\] but received \[2\]/, 'gradient shape');
      assertLoraError(tt, () => ones([1]).backward(), LoraError, 'ERR_LORA_GRAD', /does not/, 'no grad required');
    });
  });
});

t.test('LoraLinear options', async (t) => {
  await leakChecked(t, 'LoraLinear', (tt) => {
    const base = { inFeatures: 8, outFeatures: 4, rank: 2 };
    assertLoraError(tt, () => new LoraLinear({ ...base, rank: 0 }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected an integer between 1 and 4 for rank but received 0 \(number\)$/, 'rank 0');
    assertLoraError(tt, () => new LoraLinear({ ...base, rank: 5 }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected an integer between 1 and 4 for rank but received 5 \(number\)$/, 'rank above min(in, out)');
    assertLoraError(tt, () => new LoraLinear({ ...base, rank: '2' as never }), LoraTypeError, 'ERR_LORA_TYPE', /for rank but received "2" \(string\)/, 'rank type');
    assertLoraError(tt, () => new LoraLinear({ ...base, inFeatures: 0 }), LoraRangeError, 'ERR_LORA_RANGE', /for inFeatures but received 0/, 'inFeatures');
    assertLoraError(tt, () => new LoraLinear({ ...base, dropout: 1 }), LoraError, 'ERR_LORA_RANGE', /Expected a number in \[0, 1\) for dropout but received 1 \(number\)/, 'dropout');
    assertLoraError(tt, () => new LoraLinear({ ...base, alpha: NaN }), LoraRangeError, 'ERR_LORA_RANGE', /for alpha but received NaN/, 'alpha');
    assertLoraError(tt, () => new LoraLinear({ ...base, ranks: 2 } as never), LoraError, 'ERR_LORA_OPTION', /^Unknown option 'ranks' for LoraLinear; did you mean 'rank'\?$/, 'did you mean');
    assertLoraError(tt, () => new LoraLinear(undefined as never), LoraTypeError, 'ERR_LORA_TYPE', /for inFeatures but received undefined|LoraLinear options/, 'no options');
    const w = ones([3, 8]);
    assertLoraError(tt, () => new LoraLinear({ ...base, weight: w }), LoraError, 'ERR_LORA_SHAPE', /Expected weight of shape \[4, 8\] but received \[3, 8\]/, 'weight shape');
    w.dispose();
    const layer = new LoraLinear(base);
    tidy(() => {
      assertLoraError(tt, () => layer.forward(ones([2, 7])), LoraError, 'ERR_LORA_SHAPE', /^Expected x of shape \[\.\.\., 8\] for LoraLinear\.forward\(\) but received \[2, 7\]$/, 'forward shape');
      assertLoraError(tt, () => layer.forward([1, 2] as never), LoraTypeError, 'ERR_LORA_TYPE', /Expected a Tensor for x but received \[1,2\]/, 'forward type');
    });
    layer.dispose();
    tidy(() => assertLoraError(tt, () => layer.forward(zeros([1, 8])), LoraError, 'ERR_LORA_DISPOSED', /weight/, 'forward after dispose'));
  });
});

t.test('optimizers', async (t) => {
  await leakChecked(t, 'optimizers', (tt) => {
    const p = ones([2], { requiresGrad: true });
    assertLoraError(tt, () => new AdamW([p], { lr: -1 }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected a finite number >= 0 for lr but received -1 \(number\)$/, 'negative lr');
    assertLoraError(tt, () => new AdamW([p], { lr: Infinity }), LoraRangeError, 'ERR_LORA_RANGE', /for lr but received Infinity \(number\)/, 'infinite lr');
    assertLoraError(tt, () => new SGD([p], { lr: NaN }), LoraRangeError, 'ERR_LORA_RANGE', /for lr but received NaN \(number\)/, 'NaN lr');
    assertLoraError(tt, () => new AdamW([p], { lr: '0.1' as never }), LoraTypeError, 'ERR_LORA_TYPE', /for lr but received "0\.1" \(string\)/, 'lr type');
    assertLoraError(tt, () => new AdamW([p], { lr: 0.1, betas: [0.9, 1] }), LoraError, 'ERR_LORA_RANGE', /betas/, 'betas');
    assertLoraError(tt, () => new AdamW([{ shape: [2] }] as never, { lr: 0.1 }), LoraTypeError, 'ERR_LORA_TYPE', /params\[0\]|parameter group 0/, 'a plain object as a parameter');
    assertLoraError(tt, () => new AdamW([p], { lr: 0.1, weight_decay: 0.1 } as never), LoraError, 'ERR_LORA_OPTION', /did you mean 'weightDecay'\?/, 'snake_case option');
    assertLoraError(tt, () => new SGD([p], { lr: 0.1, nesterov: true }), LoraError, 'ERR_LORA_OPTION', /Nesterov/, 'nesterov without momentum');
    tidy(() => {
      const y = add(p, 1);
      assertLoraError(tt, () => new SGD([y], { lr: 0.1 }), LoraError, 'ERR_LORA_GRAD', /leaf tensors/, 'non-leaf parameter');
    });
    p.dispose();
    assertLoraError(tt, () => new SGD([p], { lr: 0.1 }), LoraError, 'ERR_LORA_DISPOSED', /disposed/, 'disposed parameter');
  });
});

t.test('the native layer checks again what could corrupt memory', async (t) => {
  await leakChecked(t, 'native', (tt) => {
    tidy(() => {
      const a = ones([4]);
      const small = ones([2]);
      assertLoraError(tt, () => native.axpy({} as never, a._storage, 1), LoraError, 'ERR_LORA_TYPE', /tensor storage/, 'plain object as storage');
      assertLoraError(tt, () => native.loraMerge(small._storage, a._storage, a._storage, 2, 2, 2, 1), LoraError, 'ERR_LORA_SHAPE', /weight holds 2 elements but the op needs 4/, 'sizes against the allocation');
      assertLoraError(tt, () => native.gemm(small._storage, a._storage, a._storage, 2, 2, 2, false, false, 2, 2, 2, 1, 0, 1, 0, 0, 0), LoraError, 'ERR_LORA_SHAPE', /out holds 2 elements/, 'gemm output too small');
      assertLoraError(tt, () => native.copyStrided(small._storage, 0, [1], a._storage, 0, [1], [4]), LoraError, 'ERR_LORA_SHAPE', /dst holds 2/, 'strided copy past the end');
      const gone = ones([4]);
      gone.dispose();
      assertLoraError(tt, () => native.axpy(a._storage, gone._storage, 1), LoraError, 'ERR_LORA_DISPOSED', /x has been disposed/, 'disposed storage');
      assertLoraError(tt, () => new (native.Storage as unknown as new (x: unknown) => unknown)(1), LoraError, 'ERR_LORA_TYPE', /cannot be constructed/, 'Storage constructor');
    });
  });
});

t.test('every options object refuses unknown names with a did-you-mean; PEFT and camelCase names both work', async (t) => {
  await leakChecked(t, 'options', async (tt) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'errors-test-'));
    const file = path.join(dir, 'm.safetensors');
    const x = ones([2, 4]);
    const ids = zeros([1, 2], { dtype: 'int32' });
    const p = ones([2], { requiresGrad: true });
    const lm = new TransformerLM({ vocabSize: 5, dModel: 4, nHeads: 2, nLayers: 1, maxSeqLen: 4, seed: 1 });
    const mlp = new MLP([4, 2], { seed: 1 });
    saveSafetensors(file, { w: x });
    const model = new LoraModel({ 'q.weight': x });
    model.addAdapter('a', { target_modules: ['q'], r: 2 });
    const cases: [string, () => unknown, string][] = [
      ['randn()', () => randn([2], { sed: 1 } as never), "Unknown option 'sed' for randn(); did you mean 'seed'?"],
      ['LoraLinear', () => new LoraLinear({ inFeatures: 4, outFeatures: 2, rank: 1, alpah: 2 } as never), "Unknown option 'alpah' for LoraLinear; did you mean 'alpha'?"],
      ['Linear', () => new Linear(2, 2, { baias: false } as never), "Unknown option 'baias' for Linear; did you mean 'bias'?"],
      ['Embedding', () => new Embedding(2, 2, { sdt: 1 } as never), "Unknown option 'sdt' for Embedding; did you mean 'std'?"],
      ['LayerNorm', () => new LayerNorm(2, { epss: 1e-5 } as never), "Unknown option 'epss' for LayerNorm; did you mean 'eps'?"],
      ['RMSNorm', () => new RMSNorm(2, { eps_: 1e-5 } as never), "Unknown option 'eps_' for RMSNorm; did you mean 'eps'?"],
      ['Dropout', () => new Dropout(0.1, { sead: 1 } as never), "Unknown option 'sead' for Dropout; did you mean 'seed'?"],
      ['MLP', () => new MLP([2, 2], { activaton: 'relu' } as never), "Unknown option 'activaton' for MLP; did you mean 'activation'?"],
      ['gelu()', () => gelu(x, { aproximate: 'tanh' } as never), "Unknown option 'aproximate' for gelu(); did you mean 'approximate'?"],
      ['mse()', () => mse(x, x, { reducton: 'sum' } as never), "Unknown option 'reducton' for mse(); did you mean 'reduction'?"],
      ['dropout()', () => dropout(x, 0.1, { trainig: true } as never), "Unknown option 'trainig' for dropout(); did you mean 'training'?"],
      ['AdamW', () => new AdamW([p], { lr: 0.1, beta: [0.9, 0.99] } as never), "Unknown option 'beta' for AdamW; did you mean 'betas'?"],
      ['SGD', () => new SGD([p], { lr: 0.1, momentun: 0.9 } as never), "Unknown option 'momentun' for SGD; did you mean 'momentum'?"],
      ['applyLora()', () => applyLora(mlp, { targetModules: 'all-linear', rnak: 2 } as never), "Unknown option 'rnak' for applyLora(); did you mean 'rank'?"],
      ['parameterGroups()', () => parameterGroups(mlp, { lr: 1, weight_decay: 0 } as never), "Unknown option 'weight_decay' for parameterGroups() optimizer; did you mean 'weightDecay'?"],
      ['loadStateDict()', () => mlp.loadStateDict(mlp.stateDict(), { strcit: false } as never), "Unknown option 'strcit' for loadStateDict(); did you mean 'strict'?"],
      ['mergeAndUnload()', () => mergeAndUnload(lm, { safe: true } as never), "Unknown option 'safe' for mergeAndUnload(); known options: safeMerge"],
      ['LoraModel.merge()', () => model.merge({ probe_rows: 2 } as never), "Unknown option 'probe_rows' for merge(); did you mean 'probeRows'?"],
      ['LoraModel.addAdapter()', () => model.addAdapter('b', { target_modules: ['q'], lora_alhpa: 4 }), "Unknown option 'lora_alhpa' for addAdapter() config; did you mean 'lora_alpha'?"],
      ['addAdapter() with two names of one field', () => model.addAdapter('b', { target_modules: ['q'], r: 2, rank: 4 }), "Expected one of 'r' and 'rank' for addAdapter() config (two names of one option) but received both"],
      ['LoraModel.addWeightedAdapter()', () => model.addWeightedAdapter(['a'], [1], 'cat', 'c', { svd_rank: 2 } as never), "Unknown option 'svd_rank' for addWeightedAdapter(); did you mean 'svdRank'?"],
      ['combineAdapters()', () => combineAdapters([model.getAdapter('a')], [1], 'svd', { svdrank: 2 } as never), "Unknown option 'svdrank' for combineAdapters(); did you mean 'svdRank'?"],
      ['loadSafetensors()', () => loadSafetensors(file, { dtypes: 'float32' } as never), "Unknown option 'dtypes' for loadSafetensors(); did you mean 'dtype'?"],
      ['saveSafetensors()', () => saveSafetensors(file, { w: x }, { metdata: {} } as never), "Unknown option 'metdata' for saveSafetensors(); did you mean 'metadata'?"],
      ['TransformerLM', () => new TransformerLM({ vocabSize: 5, dModel: 4, nHeads: 2, nLayers: 1, maxSeqLen: 4, nLayer: 1 } as never), "Unknown option 'nLayer' for TransformerLM; did you mean 'nLayers'?"],
    ];
    for (const [what, fn, message] of cases) assertLoraError(tt, fn, LoraError, 'ERR_LORA_OPTION', new RegExp(`^${message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`), what);
    await tt.rejects(train({ model: mlp, data: [1], steps: 1, loss: () => mse(x, x), optimizer: { lr: 1, weightDecy: 0 } as never }),
      { code: 'ERR_LORA_OPTION', message: "Unknown option 'weightDecy' for train() optimizer; did you mean 'weightDecay'?" });
    await tt.rejects(train({ model: mlp, data: [1], steps: 1, loss: () => mse(x, x), optimizer: { lr: 1 }, schedule: { type: 'cosine', warmup_steps: 2 } as never }),
      { code: 'ERR_LORA_OPTION', message: "Unknown option 'warmup_steps' for schedule; did you mean 'warmupSteps'?" });

    // the example: PEFT's target_modules beside lora-native's rank and alpha now mean what they say
    model.addAdapter('issue', { target_modules: ['q'], rank: 4, alpha: 32 });
    const m = model.getAdapter('issue').modules.get('q')!;
    tt.same([m.rank, m.alpha, m.scaling], [4, 32, 8], 'addAdapter: rank and alpha are taken (they were dropped)');
    model.addAdapter('camel', { targetModules: ['q'], r: 2, loraAlpha: 6, useRslora: true });
    const c = model.getAdapter('camel').modules.get('q')!;
    tt.same([c.rank, c.alpha, c.scaling], [2, 6, 6 / Math.sqrt(2)], 'addAdapter: camelCase PEFT names');
    tt.same(model.getAdapter('camel').config.target_modules, ['q'], 'stored under the PEFT name');
    const layer = new LoraLinear({ inFeatures: 4, outFeatures: 2, r: 2, lora_alpha: 8, use_rslora: true } as never);
    tt.same([layer.rank, layer.alpha, layer.useRslora], [2, 8, true], 'LoraLinear takes PEFT names');
    layer.dispose();
    const info = applyLora(mlp, { target_modules: 'all-linear', r: 2, lora_alpha: 4 } as never);
    tt.same([info.config.r, info.config.lora_alpha, info.modules.length], [2, 4, 1], 'applyLora takes PEFT names');
    model.dispose();
    for (const v of [x, ids, p]) v.dispose();
    lm.dispose();
    mlp.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
