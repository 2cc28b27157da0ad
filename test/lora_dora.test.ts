// DoRA on modules (LoraLinear useDora, applyLora useDora) against the float64 reference of PEFT's
// DoRA variant (test/ref/dora_ref.ts): the reference backward against finite differences, then
// doraLinear (with and without dropout), LoraLinear forward/backward/merge/unmerge, bf16 weights,
// and the PEFT files: lora_magnitude_vector keys, use_dora, loading back, LoraModel on a GPT-2
// Conv1D checkpoint reading what applyLora saved.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  applyLora, doraLinear, features, LoraLinear, LoraModel, loadCausalLM, loadLoraAdapter, loadPeftAdapter, loadSafetensors, loraLayers,
  mergeAndUnload, noGrad, saveLoraAdapter, tensor, Tensor, tidy, TransformerLM,
} from '../lib/index';
import { assertClose, f32, leakChecked, randomData } from './helpers';
import { writeCheckpoint } from './hf_checkpoint';
import { doraLayerBackwardRef, doraLayerForwardRef, DoraLayerInputs } from './ref/dora_ref';
import { addRef, deltaRef, doraMergeRef, rowNormsRef } from './ref/merge_ref';

let seed = 1400;
const data = (n: number, scale = 1) => f32(randomData(n, seed++, scale));
const t32 = (d: Float64Array, shape: number[], requiresGrad = false) => tensor(Float32Array.from(d), shape, { requiresGrad });
const vals = (x: Tensor) => Float64Array.from(x.toFloat32Array());
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-dora-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const TOL = { atol: 2e-5, rtol: 2e-4 };

function inputs(N: number, C: number, OC: number, R: number, s: number, p: number): DoraLayerInputs {
  const W = data(OC * C);
  const A = data(R * C);
  const B = data(OC * R, 0.5);
  const m = rowNormsRef(addRef(W, deltaRef(A, B, OC, R, C, s)), OC, C).map((v, i) => f32([v * (0.8 + 0.05 * (i % 7))])[0]!);
  return { x: data(N * C), W, b: data(OC), A, B, m, N, C, OC, R, s, p, seed: 77 };
}

void leakChecked(t, 'reference DoRA backward (dropout 0 and 0.3) against finite differences', (t) => {
  for (const p of [0, 0.3]) {
    const a = inputs(3, 7, 5, 2, 1.5, p);
    const norm = rowNormsRef(addRef(a.W, deltaRef(a.A, a.B, a.OC, a.R, a.C, a.s)), a.OC, a.C);
    const G = data(a.N * a.OC);
    const g = doraLayerBackwardRef(a, G);
    const loss = (over: Partial<DoraLayerInputs>) => doraLayerForwardRef({ ...a, norm, ...over }).reduce((acc, v, i) => acc + v * G[i]!, 0);
    const fd = (key: 'x' | 'A' | 'B' | 'm') => a[key].map((_, i) => {
      const h = 1e-6;
      const up = a[key].slice(); up[i]! += h;
      const dn = a[key].slice(); dn[i]! -= h;
      return (loss({ [key]: up }) - loss({ [key]: dn })) / (2 * h);
    });
    for (const [k, v] of [['x', g.dx], ['A', g.dA], ['B', g.dB], ['m', g.dm]] as const)
      assertClose(t, v, fd(k), { atol: 1e-7, rtol: 1e-6 }, `p=${p}: reference d${k} vs finite differences`);
    if (p === 0) {
      // without dropout PEFT's form is c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b
      const y = doraLayerForwardRef(a);
      const y2 = doraLayerForwardRef({ ...a, p: 0.3, seed: 1 });
      t.ok(y.some((v, i) => Math.abs(v - y2[i]!) > 1e-3), 'dropout changes the reference output');
    }
  }
});

// CUDA when present (a GPU, or the emulator with LORA_NATIVE_CUDA_LIB=build-cuda-emu/liblora_cuda_emu.so)
const devices = features().cuda ? ['cpu', 'cuda'] as const : ['cpu'] as const;
if (!features().cuda) t.comment(`doraLinear runs on the CPU only here: CUDA unavailable (${features().reason})`);

void leakChecked(t, 'doraLinear against the reference, with and without dropout, at awkward shapes', (t) => {
  for (const device of devices)
  for (const [N, C, OC, R, s, p] of [[5, 13, 7, 3, 2, 0], [4, 9, 17, 5, 0.75, 0.25], [1, 3, 2, 1, 1, 0.5]] as const) {
    const a = inputs(N, C, OC, R, s, p);
    const G = data(N * OC);
    const g = doraLayerBackwardRef(a, G);
    tidy(() => {
      const on = (d: Float64Array, shape: number[], rg = false) => tensor(Float32Array.from(d), shape, { device, requiresGrad: rg });
      const x = on(a.x, [N, C], true);
      const A = on(a.A, [R, C], true);
      const B = on(a.B, [OC, R], true);
      const m = on(a.m, [OC], true);
      const y = doraLinear(x, on(a.W, [OC, C]), on(a.b!, [OC]), A, B, m, s, p, a.seed);
      t.equal(y.device, device, 'the output stays on the device');
      const what = `${device} [${N}, ${C}] -> ${OC}, R ${R}, p ${p}`;
      assertClose(t, vals(y), doraLayerForwardRef(a), TOL, `${what}: forward`);
      y.backward(on(G, [N, OC]));
      assertClose(t, vals(x.grad!), g.dx, TOL, `${what}: dx`);
      assertClose(t, vals(A.grad!), g.dA, TOL, `${what}: dA`);
      assertClose(t, vals(B.grad!), g.dB, TOL, `${what}: dB`);
      assertClose(t, vals(m.grad!), g.dm, TOL, `${what}: dm`);
    });
  }
});

void leakChecked(t, 'LoraLinear useDora: init, forward, backward, merge/unmerge, bf16 weight', (t) => {
  const [N, C, OC, R] = [6, 11, 9, 3];
  const W = data(OC * C);
  const b = data(OC);
  for (const dtype of ['float32', 'bfloat16'] as const) {
    const w = tensor(Float32Array.from(W), [OC, C], { dtype });
    const Wseen = Float64Array.from(w.toFloat32Array()); // what the layer holds (bf16-rounded)
    const layer = new LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, alpha: 5, weight: w, biasTensor: t32(b, [OC]), useDora: true, seed: 3 });
    t.ok(layer.useDora, 'useDora');
    t.same(layer.namedParameters().map(([n]) => n), ['weight', 'bias', 'loraA', 'loraB', 'loraMagnitude'], 'the magnitude is a parameter');
    t.same(layer.parameters().filter((p) => p.requiresGrad).length, 3, 'A, B and m train');
    // PEFT's init: m = ||W + s·B·A||_row with B = 0, so a new DoRA layer is the base layer
    assertClose(t, vals(layer.loraMagnitude!), rowNormsRef(Wseen, OC, C), { atol: 1e-5, rtol: 1e-5 }, `${dtype}: m starts at ||W||_row`);
    const x64 = data(N * C);
    const x = t32(x64, [N, C]);
    const a: DoraLayerInputs = { x: x64, W: Wseen, b, A: vals(layer.loraA), B: new Float64Array(OC * R), m: vals(layer.loraMagnitude!), N, C, OC, R, s: 5 / 3, p: 0, seed: 0 };
    tidy(() => assertClose(t, vals(layer.forward(x)), doraLayerForwardRef(a), TOL, `${dtype}: a new DoRA layer gives the base output`));
    const B = data(OC * R, 0.5);
    const m = vals(layer.loraMagnitude!).map((v, i) => f32([v * (1 + 0.1 * Math.sin(i))])[0]!);
    layer.loraB.assign(Float32Array.from(B));
    layer.loraMagnitude!.assign(Float32Array.from(m));
    const inp = { ...a, B, m };
    const G = data(N * OC);
    const g = doraLayerBackwardRef(inp, G);
    const tol = dtype === 'float32' ? TOL : { atol: 2e-3, rtol: 1e-2 }; // bf16 GEMMs may round activations to bf16
    tidy(() => {
      const y = layer.forward(x);
      assertClose(t, vals(y), doraLayerForwardRef(inp), tol, `${dtype}: forward`);
      y.backward(t32(G, [N, OC]));
      assertClose(t, vals(layer.loraA.grad!), g.dA, tol, `${dtype}: dA`);
      assertClose(t, vals(layer.loraB.grad!), g.dB, tol, `${dtype}: dB`);
      assertClose(t, vals(layer.loraMagnitude!.grad!), g.dm, tol, `${dtype}: dm`);
    });
    layer.zeroGrad();
    const yBefore = noGrad(() => tidy(() => vals(layer.forward(x))));
    layer.merge();
    t.ok(layer.merged, `${dtype}: merged`);
    const mergedRef = doraMergeRef(Wseen, inp.A, B, m, OC, R, C, inp.s);
    assertClose(t, vals(layer.weight), mergedRef, dtype === 'float32' ? { atol: 1e-5, rtol: 1e-5 } : { atol: 1e-2, rtol: 8e-3 }, `${dtype}: merge() = m/||W + sBA|| ⊙ (W + sBA)`);
    assertClose(t, noGrad(() => tidy(() => vals(layer.forward(x)))), yBefore, dtype === 'float32' ? { atol: 1e-4, rtol: 1e-4 } : { atol: 3e-2, rtol: 3e-2 }, `${dtype}: merged forward = DoRA forward`);
    layer.unmerge();
    t.notOk(layer.merged, `${dtype}: unmerged`);
    assertClose(t, vals(layer.weight), Wseen, dtype === 'float32' ? { atol: 1e-5, rtol: 1e-5 } : { atol: 2e-2, rtol: 1e-2 }, `${dtype}: unmerge() restores W`);
    x.dispose();
    layer.merge(); // disposing a merged DoRA layer frees its merge scale too (the leak check sees it)
    layer.dispose();
  }
});

const small = { vocabSize: 11, dModel: 16, nHeads: 4, nLayers: 2, maxSeqLen: 9 };
const ids = () => tensor([1, 2, 3, 4, 5, 6, 7, 8], [1, 8], { dtype: 'int32' });
const logits = (lm: TransformerLM) => noGrad(() => tidy(() => { const i = ids(); const y = lm.forward(i); return Float64Array.from(y.toFloat32Array()); }));

function trainedDora(seedN: number): TransformerLM {
  const lm = new TransformerLM({ ...small, seed: 2 });
  applyLora(lm, { targetModules: ['q_proj', 'down_proj'], rank: 3, alpha: 6, useDora: true, seed: seedN });
  for (const l of loraLayers(lm).values()) {
    l.loraB.assign(Float32Array.from({ length: l.loraB.size }, (_, i) => 0.1 * Math.sin(i + seedN)));
    l.loraMagnitude!.assign(l.loraMagnitude!.toFloat32Array().map((v, i) => v * (1 + 0.2 * Math.cos(i))));
  }
  return lm;
}

void leakChecked(t, 'applyLora useDora: PEFT files (lora_magnitude_vector, use_dora), load, mergeAndUnload', (t) => {
  const lm = trainedDora(5);
  const y = logits(lm);
  const dir = path.join(tmp, 'dora');
  saveLoraAdapter(lm, dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  t.match(cfg, { peft_type: 'LORA', use_dora: true, r: 3, lora_alpha: 6, init_lora_weights: true }, 'adapter_config: use_dora true');
  const { tensors } = loadSafetensors(path.join(dir, 'adapter_model.safetensors'));
  const key = 'base_model.model.layers.0.attn.q_proj.lora_magnitude_vector';
  t.same(tensors.get(key)?.shape, [16], `${key} as PEFT names it (no .weight)`);
  t.same([...tensors.keys()].filter((k) => k.includes('magnitude')).length, 4, 'one magnitude per module');
  assertClose(t, vals(tensors.get(key)!), vals(loraLayers(lm).get('layers.0.attn.q_proj')!.loraMagnitude!), { atol: 0, rtol: 0 }, 'the magnitude values');
  for (const v of tensors.values()) v.dispose();

  const fresh = new TransformerLM({ ...small, seed: 2 });
  applyLora(fresh, { targetModules: ['q_proj', 'down_proj'], rank: 3, alpha: 6, use_dora: true, seed: 9 } as never);
  t.same(loadLoraAdapter(fresh, dir).length, 4, 'loadLoraAdapter reads DoRA into DoRA layers (PEFT alias use_dora)');
  assertClose(t, logits(fresh), y, { atol: 1e-5, rtol: 1e-5 }, 'and reproduces the outputs');
  const plain = new TransformerLM({ ...small, seed: 2 });
  applyLora(plain, { targetModules: ['q_proj', 'down_proj'], rank: 3, alpha: 6 });
  t.throws(() => loadLoraAdapter(plain, dir), { code: 'ERR_LORA_STATE', message: /Adapter module 'layers.0.attn.q_proj' in .* is a DoRA module but the model's LoraLinear is not; apply LoRA with useDora: true to load it/ });
  const plainDir = path.join(tmp, 'plain');
  saveLoraAdapter(plain, plainDir);
  t.throws(() => loadLoraAdapter(fresh, plainDir), { code: 'ERR_LORA_STATE', message: /has no lora_magnitude_vector but the model's LoraLinear uses DoRA/ });

  // LoraModel (the independent PEFT-file path) on the same base gives the same module outputs
  const baseLm = new TransformerLM({ ...small, seed: 2 });
  baseLm.freeze();
  const base = new Map(baseLm.namedParameters().map(([n, p]) => [n, p] as [string, Tensor]));
  const lmodel = new LoraModel(base).addAdapter('d', loadPeftAdapter(dir));
  const xq = t32(data(5 * 64), [5, 64]);
  tidy(() => assertClose(t, vals(lmodel.forward('layers.1.mlp.down_proj', xq)), vals(loraLayers(lm).get('layers.1.mlp.down_proj')!.forward(xq)),
    { atol: 1e-5, rtol: 1e-4 }, 'LoraModel reads the saved DoRA module'));
  xq.dispose();
  lmodel.dispose();
  for (const p of base.values()) p.dispose();

  loraLayers(lm).get('layers.0.attn.q_proj')!.merge(); // one layer already merged: mergeAndUnload keeps it
  t.same(mergeAndUnload(lm).length, 4, 'mergeAndUnload swaps the four DoRA layers');
  t.equal(loraLayers(lm).size, 0);
  assertClose(t, logits(lm), y, { atol: 1e-4, rtol: 1e-4 }, 'the merged model gives the DoRA outputs');
  for (const m of [lm, fresh, plain]) m.dispose();
});

void leakChecked(t, 'DoRA on GPT-2 Conv1D (fan_in_fan_out) layers: the saved adapter runs in LoraModel on the stored [in, out] weights', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'gpt2'), 'gpt2', { dtype: 'float32', seed: 4 });
  const model = await loadCausalLM(ck.dir);
  applyLora(model, { targetModules: ['c_attn'], rank: 2, useDora: true, seed: 1 });
  const [name, layer] = [...loraLayers(model)][0]!;
  layer.loraB.assign(Float32Array.from({ length: layer.loraB.size }, (_, i) => 0.2 * Math.sin(i)));
  layer.loraMagnitude!.assign(layer.loraMagnitude!.toFloat32Array().map((v, i) => v * (1 + 0.1 * Math.cos(i))));
  const dir = path.join(tmp, 'gpt2-dora');
  saveLoraAdapter(model, dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  t.match(cfg, { fan_in_fan_out: true, use_dora: true }, 'fan_in_fan_out and use_dora');
  // the hub layout names it h.0.attn.c_attn; the model (and the adapter) transformer.h.0.attn.c_attn
  const stored = loadSafetensors(path.join(ck.dir, 'model.safetensors')).tensors;
  const keyOf = (name: string) => [...stored.keys()].find((k) => name.endsWith(k))!;
  const key = keyOf(`${name}.weight`);
  const names = [...loraLayers(model).keys()].flatMap((mod) => [`${mod}.weight`, `${mod}.bias`]);
  const lmodel = new LoraModel(new Map(names.map((n) => [n, stored.get(keyOf(n))!]))).addAdapter('d', loadPeftAdapter(dir));
  t.ok(stored.get(key)!.shape[0] === layer.inFeatures, `the checkpoint stores ${key} as [in, out]`);
  const x = t32(data(3 * layer.inFeatures), [3, layer.inFeatures]);
  tidy(() => assertClose(t, vals(lmodel.forward(name, x)), vals(layer.forward(x)), { atol: 1e-4, rtol: 1e-4 }, 'same DoRA output from the PEFT file on the Conv1D layout'));
  x.dispose();
  lmodel.dispose();
  for (const v of stored.values()) v.dispose();
  model.dispose();
});

if (!features().cuda) t.comment(`skipped 'a merged DoRA layer moved to another device unmerges there': CUDA unavailable (${features().reason})`);
else void leakChecked(t, 'a merged DoRA layer moved to another device unmerges there', (t) => {
  const W = data(5 * 7);
  const layer = new LoraLinear({ inFeatures: 7, outFeatures: 5, rank: 2, bias: false, useDora: true, seed: 2 });
  layer.weight.assign(Float32Array.from(W));
  layer.loraB.assign(Float32Array.from(data(10, 0.5)));
  layer.merge();
  layer.to('cuda');
  layer.unmerge();
  t.equal(layer.weight.device, 'cuda');
  assertClose(t, vals(layer.weight), W, { atol: 1e-5, rtol: 1e-5 }, 'W back after merge, to(cuda), unmerge');
  layer.dispose();
});
