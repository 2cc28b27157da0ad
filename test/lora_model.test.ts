// LoraModel against float64 references: merges for fp32/bf16/fp16 bases (Linear, Conv1D, embedding,
// lora_bias, rsLoRA, user scale) with their error report, safe merge, forward with several
// adapters, DoRA (norms, forward, backward, merge), and weighted combinations against dense sums.
import t from 'tap';

import { combineAdapters, LoraError, LoraModel, PeftAdapter, tensor, Tensor, tidy, doraWeightNorm } from '../lib/index';
import { svd, mat } from '../lib/linalg';
import { adapterFromTensors } from '../lib/peft';
import { assertClose, assertLoraError, f32, leakChecked, randomData } from './helpers';
import { addRef, deltaRef, doraBackwardRef, doraForwardRef, doraMergeRef, matmulRef, rowNormsRef, transposeRef } from './ref/merge_ref';

const P = 'base_model.model.';
let seed = 100;
const data = (n: number) => f32(randomData(n, seed++));
const t32 = (d: Float64Array, shape: number[], dtype: 'float32' | 'bfloat16' | 'float16' = 'float32') => tensor(Float32Array.from(d), shape, { dtype });
const vals = (x: Tensor) => Float64Array.from(x.toFloat32Array());

/** One adapter over modules { name: [OC, C, R] } with float64 copies of its factors. */
function makeAdapter(config: Record<string, unknown>, mods: Record<string, [number, number, number]>, opts: { bias?: boolean; dora?: boolean; embedding?: string[] } = {}) {
  const ts = new Map<string, Tensor>();
  const ref: Record<string, { A: Float64Array; B: Float64Array; bias?: Float64Array; m?: Float64Array }> = {};
  for (const [name, [OC, C, R]] of Object.entries(mods)) {
    const A = data(R * C);
    const B = data(OC * R);
    ref[name] = { A, B };
    if (opts.embedding?.includes(name)) {
      ts.set(`${P}${name}.lora_embedding_A`, t32(A, [R, C]));
      ts.set(`${P}${name}.lora_embedding_B`, t32(B, [OC, R]));
      continue;
    }
    ts.set(`${P}${name}.lora_A.weight`, t32(A, [R, C]));
    ts.set(`${P}${name}.lora_B.weight`, t32(B, [OC, R]));
    if (opts.bias) ts.set(`${P}${name}.lora_B.bias`, t32((ref[name]!.bias = data(OC)), [OC]));
    if (opts.dora) ts.set(`${P}${name}.lora_magnitude_vector`, t32((ref[name]!.m = data(OC).map((v) => 1 + Math.abs(v))), [OC]));
  }
  return { adapter: adapterFromTensors(config, ts), ref };
}

void leakChecked(t, 'merge matches a dense float64 merge for fp32/bf16/fp16 bases, Conv1D, embeddings, lora_bias', (t) => {
  for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
    const W1 = data(13 * 17);
    const b1 = data(13);
    const W2 = data(17 * 11); // Conv1D layout (in, out) for the fan_in_fan_out adapter
    const E = data(19 * 6); // embedding (num, dim)
    const base = new Map<string, Tensor>([
      ['l.q.weight', t32(W1, [13, 17], dtype)], ['l.q.bias', t32(b1, [13])],
      ['emb.weight', t32(E, [19, 6], dtype)], ['l.keep.weight', t32(data(12), [3, 4])],
    ]);
    const cfg = { r: 3, lora_alpha: 7, use_rslora: true, rank_pattern: { 'emb': 2 }, lora_bias: true };
    const { adapter, ref } = makeAdapter(cfg, { 'l.q': [13, 17, 3], emb: [6, 19, 2] }, { bias: true, embedding: ['emb'] });
    // the bias belongs to l.q only: drop the embedding's (PEFT has none there)
    const model = new LoraModel(base);
    model.addAdapter('a', adapter);
    model.setScale('a', 0.75);
    const s1 = (7 / Math.sqrt(3)) * 0.75;
    const s2 = (7 / Math.sqrt(2)) * 0.75;
    const { tensors, report } = model.merge();
    const rounded = (x: Tensor) => vals(x); // base as stored (rounded to dtype)
    const Wq = addRef(rounded(base.get('l.q.weight')!), deltaRef(ref['l.q']!.A, ref['l.q']!.B, 13, 3, 17, s1));
    const tol = dtype === 'float32' ? { atol: 1e-5, rtol: 1e-5 } : dtype === 'bfloat16' ? { atol: 1e-2, rtol: 8e-3 } : { atol: 2e-3, rtol: 1e-3 };
    assertClose(t, vals(tensors.get('l.q.weight')!), Wq, tol, `${dtype} linear merge`);
    t.equal(tensors.get('l.q.weight')!.dtype, dtype, 'dtype kept');
    assertClose(t, vals(tensors.get('l.q.bias')!), b1.map((v, i) => v + s1 * ref['l.q']!.bias![i]!), { atol: 1e-5, rtol: 1e-5 }, 'lora_bias merged with scaling');
    const Em = addRef(rounded(base.get('emb.weight')!), transposeRef(deltaRef(ref.emb!.A, ref.emb!.B, 6, 2, 19, s2), 6, 19));
    assertClose(t, vals(tensors.get('emb.weight')!), Em, tol, `${dtype} embedding merge (B·A)ᵀ·s`);
    t.equal(tensors.get('l.keep.weight'), base.get('l.keep.weight'), 'untouched tensors are the base tensors');
    t.equal(report.length, 2);
    for (const r of report) {
      t.ok(r.maxAbsOutput > 0.1, `${r.name}: probe outputs are not trivial`);
      const limit = dtype === 'float32' ? 1e-4 : dtype === 'bfloat16' ? 5e-2 : 5e-3;
      t.ok(r.relError < limit && r.relError > 0, `${dtype} ${r.name}: relative error ${r.relError.toExponential(2)} in (0, ${limit})`);
    }
    for (const [k, x] of tensors) if (x !== base.get(k)) x.dispose();
    // Conv1D: a fan_in_fan_out adapter on a (in, out) weight
    const conv = new Map([['h.0.c_attn.weight', t32(W2, [17, 11], dtype)]]);
    const { adapter: ca, ref: cr } = makeAdapter({ r: 4, lora_alpha: 8, fan_in_fan_out: true }, { 'h.0.c_attn': [11, 17, 4] });
    const cm = new LoraModel(conv).addAdapter('c', ca);
    const cres = cm.mergeAndUnload();
    assertClose(t, vals(cres.tensors.get('h.0.c_attn.weight')!), addRef(vals(conv.get('h.0.c_attn.weight')!), transposeRef(deltaRef(cr['h.0.c_attn']!.A, cr['h.0.c_attn']!.B, 11, 4, 17, 2), 11, 17)), tol, `${dtype} Conv1D merge`);
    t.same(cm.adapterNames, [], 'mergeAndUnload detaches the adapters');
    t.ok(cres.report[0]!.relError < (dtype === 'float32' ? 1e-4 : 5e-2), 'Conv1D report');
    cres.tensors.get('h.0.c_attn.weight')!.dispose();
    model.dispose();
    for (const x of [...base.values(), ...conv.values()]) x.dispose();
  }
});

void leakChecked(t, 'safeMerge refuses NaN and fp16 overflow; merge(safeMerge: false) goes through', (t) => {
  const base = new Map([['m.weight', t32(data(6 * 5), [6, 5], 'float16')]]);
  const A = data(2 * 5);
  const B = data(6 * 2);
  B[3] = NaN;
  const a = adapterFromTensors({ r: 2, lora_alpha: 2 }, new Map([[`${P}m.lora_A.weight`, t32(A, [2, 5])], [`${P}m.lora_B.weight`, t32(B, [6, 2])]]));
  const model = new LoraModel(base).addAdapter('nan', a);
  assertLoraError(t, () => model.merge(), LoraError, 'ERR_LORA_NON_FINITE', /Refusing to merge 'm\.weight': element \d+ is NaN in float32/, 'NaN');
  const big = adapterFromTensors({ r: 2, lora_alpha: 2 }, new Map([[`${P}m.lora_A.weight`, t32(A.map(() => 300), [2, 5])], [`${P}m.lora_B.weight`, t32(new Float64Array(12).fill(300), [6, 2])]]));
  model.addAdapter('big', big).setAdapter('big');
  assertLoraError(t, () => model.merge(), LoraError, 'ERR_LORA_NON_FINITE', /is Infinity after rounding to float16/, 'fp16 overflow');
  const { tensors } = model.merge({ safeMerge: false, probeRows: 0 });
  t.equal(tensors.get('m.weight')!.toFloat32Array()[0], Infinity, 'unsafe merge rounds to Inf');
  tensors.get('m.weight')!.dispose();
  model.dispose();
  base.get('m.weight')!.dispose();
});

void leakChecked(t, 'forward: several adapters, setAdapter, deleteAdapter, scales, new adapters from a config', (t) => {
  const [OC, C, N] = [9, 14, 5];
  const W = data(OC * C);
  const b = data(OC);
  const base = new Map([['blk.0.proj.weight', t32(W, [OC, C], 'bfloat16')], ['blk.0.proj.bias', t32(b, [OC])]]);
  const Wr = vals(base.get('blk.0.proj.weight')!);
  const { adapter: a1, ref: r1 } = makeAdapter({ r: 3, lora_alpha: 5 }, { 'blk.0.proj': [OC, C, 3] });
  const { adapter: a2, ref: r2 } = makeAdapter({ r: 2, lora_alpha: 4, use_rslora: true }, { 'blk.0.proj': [OC, C, 2] });
  const model = new LoraModel(base).addAdapter('one', a1).addAdapter('two', a2);
  const x64 = data(N * C);
  const x = t32(x64, [N, C]);
  const yRef = (parts: [typeof r1, number, number][]) => {
    let Wd = Wr;
    for (const [r, R, s] of parts) Wd = addRef(Wd, deltaRef(r['blk.0.proj']!.A, r['blk.0.proj']!.B, OC, R, C, s));
    const y = matmulRef(x64, transposeRef(Wd, OC, C), N, C, OC);
    return y.map((v, i) => v + b[i % OC]!);
  };
  const tol = { atol: 1e-5, rtol: 1e-4 };
  tidy(() => {
    t.same(model.activeAdapters, ['one']);
    assertClose(t, vals(model.forward('blk.0.proj', x)), yRef([[r1, 3, 5 / 3]]), tol, 'first adapter active by default');
    model.setAdapter(['one', 'two']).setScale('two', -0.5);
    assertClose(t, vals(model.module('blk.0.proj').forward(x)), yRef([[r1, 3, 5 / 3], [r2, 2, (4 / Math.sqrt(2)) * -0.5]]), tol, 'two active adapters, scaled');
    model.deleteAdapter('one');
    t.same(model.activeAdapters, ['two']);
    assertClose(t, vals(model.forward('blk.0.proj', x)), yRef([[r2, 2, (4 / Math.sqrt(2)) * -0.5]]), tol, 'after deleteAdapter');
  });
  assertLoraError(t, () => model.setAdapter('one'), LoraError, 'ERR_LORA_STATE', /Expected the name of an attached adapter \('two'\) but received "one"/, 'deleted adapter');
  assertLoraError(t, () => model.forward('blk.1.proj', x), LoraError, 'ERR_LORA_STATE', /'blk\.1\.proj\.weight' is not a base tensor/, 'unknown module');
  // a new adapter by target modules: B = 0, so the output is the base's; gradients reach A and B
  model.addAdapter('fresh', { target_modules: ['proj'], r: 4, lora_alpha: 8, seed: 3 }).setAdapter('fresh');
  t.same([...model.getAdapter('fresh').modules.keys()], ['blk.0.proj']);
  tidy(() => {
    assertClose(t, vals(model.forward('blk.0.proj', x)), yRef([]), tol, 'fresh adapter changes nothing');
    const y = model.forward('blk.0.proj', x);
    y.sum().backward();
    const [A, B] = model.parameters();
    t.ok(A!.grad === null || A!.grad.toFloat32Array().every((v) => v === 0), 'dA is zero while B is zero');
    t.ok(B!.grad!.toFloat32Array().some((v) => v !== 0), 'dB is not');
    for (const p of model.parameters()) p.zeroGrad();
  });
  assertLoraError(t, () => model.addAdapter('fresh', a1), LoraError, 'ERR_LORA_STATE', /'fresh' is already attached/, 'duplicate name');
  model.dispose();
  x.dispose();
  for (const v of base.values()) v.dispose();
});

void leakChecked(t, 'DoRA: norms without B·A, forward and backward against float64, merge as PEFT', (t) => {
  const [OC, C, R, N] = [7, 10, 3, 4];
  const W = data(OC * C);
  const b = data(OC);
  const base = new Map([['att.o.weight', t32(W, [OC, C])], ['att.o.bias', t32(b, [OC])]]);
  const { adapter, ref } = makeAdapter({ r: R, lora_alpha: 6, use_dora: true }, { 'att.o': [OC, C, R] }, { dora: true });
  const s = 2;
  const { A, B, m } = ref['att.o']!;
  const norm = rowNormsRef(addRef(W, deltaRef(A, B, OC, R, C, s)), OC, C);
  tidy(() => assertClose(t, vals(doraWeightNorm(base.get('att.o.weight')!, adapter.modules.get('att.o')!.loraA, adapter.modules.get('att.o')!.loraB, s)), norm, { atol: 1e-5, rtol: 1e-5 }, 'norm from ||W||², ⟨W, BA⟩ and A·Aᵀ'));
  const model = new LoraModel(base).addAdapter('d', adapter);
  const x64 = data(N * C);
  const G = data(N * OC);
  const inputs = { x: x64, W, b, A, B, m: m!, N, C, OC, R, s };
  // the reference backward against central differences of the reference forward (norm held fixed)
  const loss = (over: Partial<typeof inputs>) => doraForwardRef({ ...inputs, norm, ...over }).reduce((acc, v, i) => acc + v * G[i]!, 0);
  const gref = doraBackwardRef(inputs, G);
  const fd = (key: 'A' | 'B' | 'm', arr: Float64Array) => arr.map((_, i) => {
    const h = 1e-6;
    const p = arr.slice(); p[i]! += h;
    const q = arr.slice(); q[i]! -= h;
    return (loss({ [key]: p }) - loss({ [key]: q })) / (2 * h);
  });
  assertClose(t, gref.dA, fd('A', A), { atol: 1e-7, rtol: 1e-6 }, 'reference dA vs finite differences');
  assertClose(t, gref.dB, fd('B', B), { atol: 1e-7, rtol: 1e-6 }, 'reference dB vs finite differences');
  assertClose(t, gref.dm, fd('m', m!), { atol: 1e-7, rtol: 1e-6 }, 'reference dm vs finite differences');
  tidy(() => {
    const x = t32(x64, [N, C]);
    const y = model.forward('att.o', x);
    assertClose(t, vals(y), doraForwardRef(inputs), { atol: 1e-5, rtol: 1e-4 }, 'DoRA forward');
    y.backward(t32(G, [N, OC]));
    const mod = model.getAdapter('d').modules.get('att.o')!;
    assertClose(t, vals(mod.loraA.grad!), gref.dA, { atol: 1e-5, rtol: 1e-4 }, 'DoRA dA');
    assertClose(t, vals(mod.loraB.grad!), gref.dB, { atol: 1e-5, rtol: 1e-4 }, 'DoRA dB');
    assertClose(t, vals(mod.magnitude!.grad!), gref.dm, { atol: 1e-5, rtol: 1e-4 }, 'DoRA dm');
    for (const p of model.parameters()) p.zeroGrad();
  });
  const { tensors, report } = model.merge();
  assertClose(t, vals(tensors.get('att.o.weight')!), doraMergeRef(W, A, B, m!, OC, R, C, s), { atol: 1e-5, rtol: 1e-5 }, 'DoRA merge');
  t.ok(report[0]!.relError < 1e-5, `DoRA merged forward matches the adapter (${report[0]!.relError.toExponential(2)})`);
  tensors.get('att.o.weight')!.dispose();
  model.dispose();
  for (const v of base.values()) v.dispose();
});

void leakChecked(t, 'weighted combinations against dense weighted sums (rsLoRA, differing ranks)', (t) => {
  const [OC, C] = [11, 9];
  const { adapter: a, ref: ra } = makeAdapter({ r: 2, lora_alpha: 3, use_rslora: true }, { 'x.lin': [OC, C, 2] });
  const { adapter: b, ref: rb } = makeAdapter({ r: 4, lora_alpha: 5 }, { 'x.lin': [OC, C, 4], 'x.only_b': [5, 6, 4] });
  const w = [0.7, -0.4];
  const sa = 3 / Math.sqrt(2);
  const sb = 5 / 4;
  const dense = addRef(deltaRef(ra['x.lin']!.A, ra['x.lin']!.B, OC, 2, C, w[0]! * sa), deltaRef(rb['x.lin']!.A, rb['x.lin']!.B, OC, 4, C, w[1]! * sb));
  const deltaOf = (ad: PeftAdapter, name: string) => {
    const m = ad.modules.get(name)!;
    return deltaRef(vals(m.loraA), vals(m.loraB), m.loraB.shape[0]!, m.rank, m.loraA.shape[1]!, m.scaling);
  };
  const cat = combineAdapters([a, b], w, 'cat');
  t.same([cat.modules.get('x.lin')!.rank, cat.modules.get('x.lin')!.scaling, cat.config.use_rslora], [6, 1, false], 'cat: rank 2+4, scaling 1, no rsLoRA re-scaling');
  assertClose(t, deltaOf(cat, 'x.lin'), dense, { atol: 1e-6, rtol: 1e-5 }, 'cat equals the dense weighted sum');
  assertClose(t, deltaOf(cat, 'x.only_b'), deltaRef(rb['x.only_b']!.A, rb['x.only_b']!.B, 5, 4, 6, w[1]! * sb), { atol: 1e-6, rtol: 1e-5 }, 'module of one source only');
  const full = combineAdapters([a, b], w, 'svd', { svdRank: 6 });
  assertClose(t, deltaOf(full, 'x.lin'), dense, { atol: 1e-5, rtol: 1e-4 }, 'svd at rank >= Σr is exact');
  const k = 3;
  const trunc = combineAdapters([a, b], w, 'svd', { svdRank: k });
  t.equal(trunc.modules.get('x.lin')!.rank, k);
  const { s: sv } = svd(mat(OC, C, dense));
  const errF = Math.sqrt(deltaOf(trunc, 'x.lin').reduce((acc, v, i) => acc + (v - dense[i]!) ** 2, 0));
  const optimal = Math.sqrt(Array.from(sv).slice(k).reduce((acc, v) => acc + v * v, 0));
  t.ok(Math.abs(errF - optimal) <= 1e-5 * (1 + optimal), `svd rank ${k} reaches the Eckart–Young error (${errF.toExponential(4)} vs ${optimal.toExponential(4)})`);
  assertLoraError(t, () => combineAdapters([a, b], w, 'linear'), LoraError, 'ERR_LORA_SHAPE', /equal ranks for a 'linear' combination but module 'x\.lin' has ranks 2, 4/, 'linear with differing ranks');
  const lin = combineAdapters([a], [0.6], 'linear');
  assertClose(t, deltaOf(lin, 'x.lin'), deltaRef(ra['x.lin']!.A, ra['x.lin']!.B, OC, 2, C, 0.6 * sa), { atol: 1e-6, rtol: 1e-5 }, 'linear of one rsLoRA source scales once');
  // through a model: per-adapter scales fold in, the result attaches and runs
  const base = new Map([['x.lin.weight', t32(data(OC * C), [OC, C])], ['x.only_b.weight', t32(data(30), [5, 6])]]);
  const model = new LoraModel(base).addAdapter('a', a).addAdapter('b', b).setScale('a', 2);
  model.addWeightedAdapter(['a', 'b'], [0.5, 1], 'cat', 'ab');
  const dense2 = addRef(deltaRef(ra['x.lin']!.A, ra['x.lin']!.B, OC, 2, C, sa), deltaRef(rb['x.lin']!.A, rb['x.lin']!.B, OC, 4, C, sb));
  assertClose(t, deltaOf(model.getAdapter('ab'), 'x.lin'), dense2, { atol: 1e-6, rtol: 1e-5 }, 'model scales are folded in');
  for (const x of [cat, full, trunc, lin]) x.dispose();
  model.dispose();
  for (const v of base.values()) v.dispose();
});

void leakChecked(t, 'embedding adapters run forward (and backward into A and B) as PEFT computes them', (t) => {
  const V = 19;
  const D = 6;
  const R = 3;
  const E = data(V * D);
  const base = new Map<string, Tensor>([['emb.weight', t32(E, [V, D])]]);
  const { adapter, ref } = makeAdapter({ r: R, lora_alpha: 5 }, { emb: [D, V, R] }, { embedding: ['emb'] });
  const model = new LoraModel(base).addAdapter('a', adapter);
  const s = 5 / R;
  const idList = [0, 18, 7, 7, 3, 12, 1];
  tidy(() => {
    const ids = tensor(idList, [7], { dtype: 'int32' });
    const y = model.forward('emb', ids);
    t.same(y.shape, [7, D], 'output shape');
    const { A, B } = ref.emb!; // A (R, V), B (D, R)
    const want = new Float64Array(7 * D);
    idList.forEach((id, n) => {
      for (let d = 0; d < D; d++) {
        let acc = 0;
        for (let r = 0; r < R; r++) acc += A[r * V + id]! * B[d * R + r]!;
        want[n * D + d] = E[id * D + d]! + s * acc;
      }
    });
    assertClose(t, vals(y), want, { atol: 1e-5, rtol: 1e-5 }, 'embedding forward = W[id] + s·B·A[:, id]');
    assertLoraError(t, () => model.forward('emb', tensor([1, 2], [2])), LoraError, 'ERR_LORA_DTYPE', /int32 ids/, 'float ids are refused');
  });
  model.dispose();
  for (const x of base.values()) x.dispose();
});
