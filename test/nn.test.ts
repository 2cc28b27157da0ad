// lib/nn.ts and the Module additions: layers against the ops they wrap, state dicts, freezing,
// the transformer's names and causality, applyLora (PEFT semantics, freezing, no change at
// init), trainableParameters, and the PEFT adapter written and read back.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  Activation, applyLora, Embedding, LayerNorm, Linear, linear, loadLoraAdapter, loadPeftAdapter, LoraLinear, memory, MLP,
  RMSNorm, saveLoraAdapter, Sequential, tensor, Tensor, tidy, trainableParameters, TransformerLM, loadSafetensors,
  mergeAndUnload, unloadLora, saveSafetensors,
} from '../lib/index';

const before = memory().numTensors;
const small = { vocabSize: 11, dModel: 16, nHeads: 4, nLayers: 2, maxSeqLen: 9 };

/** The values of fn's result; every tensor fn creates (intermediates too) is freed. */
function values(fn: () => Tensor): number[] {
  return tidy(() => Array.from(fn().toFloat32Array()));
}

function maxDiff(a: number[], b: number[]): number {
  return a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]!)), 0);
}

t.test('Linear, Sequential, MLP, norms, Embedding', (tt) => {
  const fc = new Linear(5, 3, { seed: 1 });
  const x = tensor(Float32Array.from({ length: 10 }, (_, i) => i / 10 - 0.5), [2, 5]);
  tt.same(values(() => fc.forward(x)), values(() => linear(x, fc.weight, fc.bias)), 'Linear.forward is linear()');
  tt.same(fc.namedParameters().map(([n]) => n), ['weight', 'bias']);
  const seq = new Sequential(fc, new Activation('relu'), new Linear(3, 2, { seed: 2, bias: false }));
  tt.same(seq.namedParameters().map(([n]) => n), ['0.weight', '0.bias', '2.weight']);
  tt.same(tidy(() => seq.forward(x).shape), [2, 2]);
  const mlp = new MLP([5, 8, 8, 1], { activation: 'gelu', seed: 3 });
  tt.equal(mlp.namedParameters().length, 6);
  tt.same(tidy(() => mlp.forward(x).shape), [2, 1]);
  const ln = new LayerNorm(5);
  const rms = new RMSNorm(5);
  const a = values(() => ln.forward(x));
  tt.ok(Math.abs(a.slice(0, 5).reduce((p, q) => p + q, 0)) < 1e-5, 'LayerNorm rows have zero mean');
  const r = values(() => rms.forward(x));
  tt.ok(Math.abs(r.slice(0, 5).reduce((p, q) => p + q * q, 0) / 5 - 1) < 1e-3, 'RMSNorm rows have unit mean square');
  const emb = new Embedding(4, 3, { seed: 4 });
  const ids = tensor([3, 0], [2], { dtype: 'int32' });
  const e = values(() => emb.forward(ids));
  const w = Array.from(emb.weight.toFloat32Array());
  tt.same(e, [...w.slice(9, 12), ...w.slice(0, 3)], 'Embedding picks rows');
  tt.throws(() => new Activation('swish' as never), { code: 'ERR_LORA_RANGE', message: "Expected one of 'relu', 'gelu', 'geluTanh', 'silu', 'tanh', 'sigmoid' for activation but received \"swish\" (string)" });
  tt.throws(() => new Linear(0, 3), { code: 'ERR_LORA_RANGE', message: 'Expected an integer between 1 and 2147483647 for inFeatures but received 0 (number)' });
  for (const m of [seq, mlp, ln, rms, emb]) m.dispose();
  ids.dispose();
  x.dispose();
  tt.end();
});

t.test('stateDict, loadStateDict, freeze', (tt) => {
  const a = new MLP([3, 4, 2], { seed: 1 });
  const b = new MLP([3, 4, 2], { seed: 2 });
  const x = tensor([1, 2, 3], [1, 3]);
  tt.notSame(values(() => a.forward(x)), values(() => b.forward(x)));
  const res = b.loadStateDict(a.stateDict());
  tt.same(res, { missing: [], unexpected: [] });
  tt.same(values(() => a.forward(x)), values(() => b.forward(x)), 'same outputs after loading the state dict');
  tt.throws(() => b.loadStateDict({ '0.weight': a.stateDict()['0.weight']! }), { code: 'ERR_LORA_STATE', message: /3 are missing \(0.bias, 2.weight, 2.bias\)/ });
  tt.same(b.loadStateDict({ '0.bias': a.stateDict()['0.bias']!, extra: x }, { strict: false }).unexpected, ['extra']);
  tt.throws(() => b.loadStateDict({ '0.bias': x }, { strict: false }), { code: 'ERR_LORA_SHAPE', message: 'Expected 0.bias of shape [4] but received [1, 3]' });
  b.freeze();
  tt.equal(b.parameters().length, 0, 'freeze stops every gradient');
  b.unfreeze();
  tt.equal(b.parameters().length, 4);
  tt.ok(b.getModule('2') instanceof Linear);
  tt.equal(b.getModule('9'), undefined);
  tt.throws(() => b.setModule('9', new Activation('relu')), { code: 'ERR_LORA_OPTION' });
  for (const m of [a, b]) m.dispose();
  x.dispose();
  tt.end();
});

t.test('assigning a parameter field replaces the registered parameter', (tt) => {
  const layer = new LoraLinear({ inFeatures: 5, outFeatures: 3, rank: 2, alpha: 4, seed: 3 });
  const old = layer.weight;
  const w16 = old.toDtype('bfloat16');
  layer.weight = w16;
  old.dispose();
  tt.equal(layer.weight, w16, 'the field reads the new tensor');
  tt.equal(layer.stateDict()['weight'], w16, 'stateDict() sees it');
  tt.ok(layer.namedParameters().some(([n, p]) => n === 'weight' && p === w16), 'namedParameters() sees it');
  const x = tensor([0.5, -1, 2, 0.25, 3, 1, 1, -2, 0, 0.75], [2, 5]);
  tt.equal(values(() => layer.forward(x)).length, 6, 'forward runs on the new weight');
  tt.throws(() => { (layer as unknown as { weight: unknown }).weight = 'w'; }, { code: 'ERR_LORA_TYPE', message: 'Expected a Tensor or null for weight but received "w" (string)' });
  tt.equal(layer.weight, w16, 'a rejected assignment changes nothing');
  const lin = new Linear(5, 3, { seed: 1 });
  const oldBias = lin.bias!;
  lin.bias = null;
  oldBias.dispose();
  tt.same(lin.namedParameters().map(([n]) => n), ['weight'], 'a bias set to null is gone');
  tt.same(values(() => lin.forward(x)), values(() => linear(x, lin.weight)), 'and forward has no bias');
  for (const m of [layer, lin]) m.dispose();
  x.dispose();
  tt.end();
});

t.test('TransformerLM: names, shapes, causality', (tt) => {
  const lm = new TransformerLM({ ...small, seed: 1 });
  const names = lm.namedParameters().map(([n]) => n);
  for (const n of ['tok_emb.weight', 'pos_emb.weight', 'layers.0.ln_1.weight', 'layers.0.attn.q_proj.weight', 'layers.1.attn.o_proj.weight',
    'layers.1.mlp.up_proj.weight', 'layers.1.mlp.down_proj.bias', 'ln_f.bias', 'lm_head.weight'])
    tt.ok(names.includes(n), `has ${n}`);
  const ids = tensor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 10, 10], [2, 8], { dtype: 'int32' });
  tt.same(tidy(() => lm.forward(ids).shape), [2, 8, 11]);
  const v = values(() => lm.forward(ids));
  // the second row differs from the first only at positions 6-7: earlier logits must not change
  tt.ok(maxDiff(v.slice(0, 6 * 11), v.slice(8 * 11, 14 * 11)) < 1e-6, 'causal: later tokens do not change earlier logits');
  tt.ok(maxDiff(v.slice(6 * 11, 8 * 11), v.slice(14 * 11, 16 * 11)) > 1e-4, 'later positions do see their tokens');
  tt.throws(() => new TransformerLM({ ...small, nHeads: 3 }), { code: 'ERR_LORA_OPTION', message: 'Expected dModel to be a multiple of nHeads but received dModel 16 and nHeads 3' });
  tt.throws(() => new TransformerLM({ ...small, dModle: 3 } as never), { code: 'ERR_LORA_OPTION', message: /did you mean 'dModel'/ });
  const long = tensor(new Float32Array(10), [1, 10], { dtype: 'int32' });
  tt.throws(() => lm.forward(long), { code: 'ERR_LORA_SHAPE', message: 'Expected at most maxSeqLen (9) positions but received 10' });
  long.dispose();
  ids.dispose();
  lm.dispose();
  tt.end();
});

t.test('applyLora: targets, freezing, unchanged output, counts, PEFT adapter', (tt) => {
  const lm = new TransformerLM({ ...small, seed: 2 });
  const ids = tensor([1, 2, 3, 4, 5, 6, 7, 8], [1, 8], { dtype: 'int32' });
  const y0 = values(() => lm.forward(ids));
  const total = trainableParameters(lm).total;
  tt.same(trainableParameters(lm), { trainable: total, total, share: 1 });
  const info = applyLora(lm, { targetModules: ['q_proj', 'v_proj', 'up_proj'], rank: 4, alpha: 8, seed: 3 });
  tt.same(info.modules, ['layers.0.attn.q_proj', 'layers.0.attn.v_proj', 'layers.0.mlp.up_proj', 'layers.1.attn.q_proj', 'layers.1.attn.v_proj', 'layers.1.mlp.up_proj']);
  tt.ok(lm.getModule('layers.0.attn.q_proj') instanceof LoraLinear);
  tt.ok(lm.getModule('layers.0.attn.k_proj') instanceof Linear);
  tt.same(info.config.r, 4);
  tt.same(info.config.lora_alpha, 8);
  tt.same(info.config.target_modules, ['q_proj', 'v_proj', 'up_proj']);
  const y1 = values(() => lm.forward(ids));
  tt.ok(maxDiff(y0, y1) < 1e-5, 'a new adapter (B = 0) leaves the output unchanged');
  const lora = 2 * (2 * (4 * 16 + 16 * 4) + (4 * 16 + 64 * 4));
  const count = trainableParameters(lm);
  tt.equal(count.trainable, lora, 'only lora_A and lora_B train');
  tt.equal(count.total, total + lora);
  tt.ok(lm.parameters().every((p) => lm.namedParameters().find(([, q]) => q === p)![0].match(/lora[AB]$/)));
  tt.throws(() => applyLora(lm, { targetModules: ['q_proj'] }), { code: 'ERR_LORA_OPTION', message: 'Expected a model without adapters for applyLora() but this one already has them' });
  const other = new TransformerLM({ ...small, seed: 2 });
  tt.throws(() => applyLora(other, { targetModules: ['query'] }), { code: 'ERR_LORA_OPTION', message: /Expected targetModules to match at least one Linear layer but received \["query"\]; the model's Linear layers are: layers.0.attn.q_proj/ });
  const viaRegex = applyLora(other, { targetModules: /layers\.1\.attn\.(q|k)_proj/, rank: 2 });
  tt.same(viaRegex.modules, ['layers.1.attn.q_proj', 'layers.1.attn.k_proj']);

  // give B values, save as PEFT, load into a fresh adapted model: same outputs
  for (const l of lm.namedModules()) if (l[1] instanceof LoraLinear) l[1].loraB.assign(Float32Array.from({ length: l[1].loraB.size }, (_, i) => Math.sin(i) * 0.1));
  const y2 = values(() => lm.forward(ids));
  tt.ok(maxDiff(y0, y2) > 1e-4, 'a trained adapter changes the output');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nn-test-'));
  saveLoraAdapter(lm, dir);
  tt.same(fs.readdirSync(dir).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  tt.match(cfg, { peft_type: 'LORA', r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj', 'up_proj'], use_rslora: false, bias: 'none' });
  const { tensors } = loadSafetensors(path.join(dir, 'adapter_model.safetensors'));
  tt.same(tensors.get('base_model.model.layers.0.attn.q_proj.lora_A.weight')?.shape, [4, 16]);
  tt.same(tensors.get('base_model.model.layers.1.mlp.up_proj.lora_B.weight')?.shape, [64, 4]);
  tt.equal(tensors.size, 12);
  for (const x of tensors.values()) x.dispose();
  const adapter = loadPeftAdapter(dir);
  tt.equal(adapter.modules.get('layers.0.mlp.up_proj')?.scaling, 2);
  adapter.dispose();
  const fresh = new TransformerLM({ ...small, seed: 2 });
  applyLora(fresh, { targetModules: ['q_proj', 'v_proj', 'up_proj'], rank: 4, alpha: 8, seed: 99 });
  tt.same(loadLoraAdapter(fresh, dir).length, 6);
  tt.ok(maxDiff(values(() => fresh.forward(ids)), y2) < 1e-5, 'the loaded adapter reproduces the outputs');
  fs.rmSync(dir, { recursive: true, force: true });
  for (const m of [lm, other, fresh]) m.dispose();
  ids.dispose();
  tt.end();
});

/** A model with LoRA on q/v/up whose lora_B values are not zero (so the adapter matters). */
function adaptedLm(opts: { rank?: number; alpha?: number; useRslora?: boolean; seed?: number } = {}): TransformerLM {
  const lm = new TransformerLM({ ...small, seed: 2 });
  applyLora(lm, { targetModules: ['q_proj', 'v_proj', 'up_proj'], rank: opts.rank ?? 4, alpha: opts.alpha ?? 8, useRslora: opts.useRslora ?? false, seed: opts.seed ?? 3 });
  for (const [, l] of lm.namedModules()) if (l instanceof LoraLinear) l.loraB.assign(Float32Array.from({ length: l.loraB.size }, (_, i) => Math.sin(i + 1) * 0.1));
  return lm;
}

t.test('loadLoraAdapter takes the scaling from the file; a rank mismatch names the module', (tt) => {
  const ids = tensor([1, 2, 3, 4, 5, 6, 7, 8], [1, 8], { dtype: 'int32' });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nn-test-'));
  for (const useRslora of [false, true]) {
    const saved = adaptedLm({ alpha: 16, useRslora });
    const want = values(() => saved.forward(ids));
    saveLoraAdapter(saved, dir);
    const into = adaptedLm({ alpha: 32, seed: 7 }); // other alpha, no rsLoRA, other lora_A
    loadLoraAdapter(into, dir);
    const q = into.getModule('layers.0.attn.q_proj') as LoraLinear;
    tt.same([q.alpha, q.useRslora, q.scaling], [16, useRslora, useRslora ? 16 / 2 : 16 / 4], `rsLoRA ${useRslora}: the layer takes the file's alpha and rule`);
    tt.ok(maxDiff(values(() => into.forward(ids)), want) < 1e-5, `rsLoRA ${useRslora}: the loaded model computes what the saved one did`);
    saved.dispose();
    into.dispose();
  }
  // per-module alpha (alpha_pattern) round-trips: one layer with its own alpha after a load
  const mixed = adaptedLm({ alpha: 8 });
  (mixed.getModule('layers.1.mlp.up_proj') as LoraLinear)._setScaling(2, false, 'test');
  const wantMixed = values(() => mixed.forward(ids));
  saveLoraAdapter(mixed, dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  tt.same([cfg.lora_alpha, cfg.alpha_pattern], [8, { 'layers\\.1\\.mlp\\.up_proj': 2 }], 'a layer with another alpha is saved in alpha_pattern');
  const back = adaptedLm({ alpha: 8, seed: 5 });
  loadLoraAdapter(back, dir);
  tt.equal((back.getModule('layers.1.mlp.up_proj') as LoraLinear).alpha, 2);
  tt.ok(maxDiff(values(() => back.forward(ids)), wantMixed) < 1e-5, 'and loads back to the same outputs');

  const rank2 = adaptedLm({ rank: 2 });
  const before2 = values(() => rank2.forward(ids));
  tt.throws(() => loadLoraAdapter(rank2, dir), {
    code: 'ERR_LORA_SHAPE', message: `Expected rank 2 for module 'layers.0.attn.q_proj' (the model's LoraLinear) but the adapter in ${dir} has rank 4; apply LoRA with rank 4 to load it`,
  });
  tt.same(values(() => rank2.forward(ids)), before2, 'a refused load changes nothing');
  (back.getModule('layers.0.attn.v_proj') as LoraLinear).merge();
  tt.throws(() => loadLoraAdapter(back, dir), { code: 'ERR_LORA_STATE', message: "Expected an unmerged LoraLinear at 'layers.0.attn.v_proj' for loadLoraAdapter() but it is merged; call unmerge() first" });
  for (const m of [mixed, back, rank2]) m.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  ids.dispose();
  tt.end();
});

t.test('mergeAndUnload and unloadLora: plain Linear layers whose state dict loads into a model built without LoRA', (tt) => {
  const ids = tensor([1, 2, 3, 4, 5, 6, 7, 8], [1, 8], { dtype: 'int32' });
  const base = new TransformerLM({ ...small, seed: 2 });
  const baseOut = values(() => base.forward(ids));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nn-test-'));

  const lm = adaptedLm();
  (lm.getModule('layers.1.attn.q_proj') as LoraLinear).merge(); // one already merged: kept as is
  const adapted = values(() => lm.forward(ids));
  const tensorsBefore = memory().numTensors;
  const swapped = mergeAndUnload(lm);
  tt.equal(swapped.length, 6, 'six LoraLinear layers swapped');
  tt.ok(lm.namedModules().every(([, m]) => !(m instanceof LoraLinear)), 'no LoraLinear left');
  tt.ok(lm.getModule('layers.0.attn.q_proj') instanceof Linear);
  tt.equal(memory().numTensors, tensorsBefore - 12, 'lora_A and lora_B of the six layers are freed');
  tt.ok(maxDiff(values(() => lm.forward(ids)), adapted) < 1e-5, 'the merged model computes what the adapted one did');
  tt.notOk(Object.keys(lm.stateDict()).some((k) => /lora/i.test(k)), 'the state dict has no lora tensors');
  saveSafetensors(path.join(dir, 'merged.safetensors'), lm.stateDict());
  const plain = new TransformerLM({ ...small, seed: 11 });
  const { tensors } = loadSafetensors(path.join(dir, 'merged.safetensors'));
  plain.loadStateDict(tensors); // strict: exactly the plain model's names and shapes
  for (const x of tensors.values()) x.dispose();
  tt.ok(maxDiff(values(() => plain.forward(ids)), adapted) < 1e-5, 'and loads (strict) into a TransformerLM built without LoRA');
  tt.throws(() => mergeAndUnload(lm), { code: 'ERR_LORA_STATE', message: 'Expected a model with LoRA layers for mergeAndUnload() but it has none' });
  applyLora(lm, { targetModules: ['k_proj'], rank: 2 }); // the model takes new adapters again
  tt.ok(lm.getModule('layers.0.attn.k_proj') instanceof LoraLinear);

  const un = adaptedLm();
  (un.getModule('layers.0.attn.v_proj') as LoraLinear).merge(); // unmerged first
  unloadLora(un);
  tt.ok(maxDiff(values(() => un.forward(ids)), baseOut) < 1e-5, 'unloadLora gives back the base model');
  tt.same(Object.keys(un.stateDict()), Object.keys(base.stateDict()), 'with the base names');

  const bad = adaptedLm();
  const q = bad.getModule('layers.0.attn.q_proj') as LoraLinear;
  q.loraA.assign(Float32Array.from({ length: q.loraA.size }, () => NaN));
  const w0 = Array.from(q.weight.toFloat32Array());
  tt.throws(() => mergeAndUnload(bad), { code: 'ERR_LORA_NON_FINITE', message: "Refusing to merge 'layers.0.attn.q_proj': the merged weight holds NaN or Inf (the adapter or the base does, or the sum overflows); pass { safeMerge: false } to merge anyway" });
  tt.same(Array.from(q.weight.toFloat32Array()), w0, 'a refused merge leaves the weights alone');
  tt.ok(bad.getModule('layers.0.attn.q_proj') instanceof LoraLinear, 'and the layers in place');
  tt.throws(() => mergeAndUnload(bad, { safeMrege: false } as never), { code: 'ERR_LORA_OPTION', message: "Unknown option 'safeMrege' for mergeAndUnload(); did you mean 'safeMerge'?" });
  mergeAndUnload(bad, { safeMerge: false });
  tt.ok(Number.isNaN(q.weight.toFloat32Array()[0]), 'safeMerge: false merges anyway');
  tt.throws(() => unloadLora({} as never), { code: 'ERR_LORA_TYPE', message: 'Expected a Module for model but received an object' });
  for (const m of [base, lm, plain, un, bad]) m.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  ids.dispose();
  tt.end();
});

t.test('no tensor outlives the tests', (tt) => {
  tt.equal(memory().numTensors, before);
  tt.end();
});
