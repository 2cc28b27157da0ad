// PEFT's init_lora_weights on LoraLinear / applyLora: PiSSA and OLoRA against PyTorch's LAPACK
// SVD/QR following PEFT's pissa_init/olora_init (test/fixtures/lora_init/golden.json, made by
// make_golden.py there), at awkward shapes (wide, tall, square full rank, rank 1); the residual
// written back (W_res + s·B·A == W), orthogonality, the randomized pissa_niter_N, gaussian/false
// statistics, option errors, and saveLoraAdapter's convertToLora checked on the original base.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import {
  applyLora, features, loadCausalLM, LoraError, LoraLinear, LoraModel, LoraRangeError, LoraTypeError, loadPeftAdapter, loraLayers, noGrad, saveLoraAdapter,
  tensor, Tensor, tidy, TransformerLM,
} from '../lib/index';
import { mat, svd, topSvd } from '../lib/linalg';
import { loraInitFactors } from '../lib/lora_init';
import { Rng } from '../lib/random';
import { assertClose, assertLoraError, leakChecked, randomData } from './helpers';
import { writeCheckpoint } from './hf_checkpoint';
import { addRef, deltaRef, matmulRef, transposeRef } from './ref/merge_ref';

interface GoldenCase {
  out: number; in: number; r: number; s: number; W: number[]; S: number[];
  pissa: { A: number[]; B: number[]; residual: number[] };
  olora: { A: number[]; B: number[]; residual: number[] };
}
const golden = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'lora_init', 'golden.json'), 'utf8')) as { cases: GoldenCase[] };
const vals = (x: Tensor) => Float64Array.from(x.toFloat32Array());
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-init-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A (R, C) and B (OC, R) with each PiSSA triplet's sign matched to the reference's (SVD signs are free). */
function alignSigns(A: Float64Array, B: Float64Array, refA: ArrayLike<number>, R: number, C: number, OC: number): void {
  for (let j = 0; j < R; j++) {
    let dot = 0;
    for (let c = 0; c < C; c++) dot += A[j * C + c]! * refA[j * C + c]!;
    if (dot >= 0) continue;
    for (let c = 0; c < C; c++) A[j * C + c] = -A[j * C + c]!;
    for (let o = 0; o < OC; o++) B[o * R + j] = -B[o * R + j]!;
  }
}

function gram(M: Float64Array, rows: number, cols: number, byRows: boolean): Float64Array {
  return byRows ? matmulRef(M, transposeRef(M, rows, cols), rows, cols, rows) : matmulRef(transposeRef(M, rows, cols), M, cols, rows, cols);
}

void leakChecked(t, 'PiSSA and OLoRA factors match PyTorch (PEFT pissa_init / olora_init) at awkward shapes', (t) => {
  for (const g of golden.cases) {
    const { out: OC, in: C, r: R, s } = g;
    const W = Float64Array.from(g.W);
    for (const kind of ['pissa', 'olora'] as const) {
      const f = loraInitFactors(kind, W, OC, C, R, s, new Rng(1));
      const A = Float64Array.from(f.A);
      const B = Float64Array.from(f.B);
      const what = `${kind} [${OC}, ${C}] r ${R} s ${s}`;
      if (kind === 'pissa') alignSigns(A, B, g.pissa.A, R, C, OC);
      // OLoRA's signs are fixed by Householder's convention, LAPACK's and ours alike: no alignment
      assertClose(t, A, g[kind].A, { atol: 1e-6, rtol: 1e-5 }, `${what}: A`);
      assertClose(t, B, g[kind].B, { atol: 1e-6, rtol: 1e-5 }, `${what}: B`);
      assertClose(t, f.residual!, g[kind].residual, { atol: 1e-6, rtol: 1e-5 }, `${what}: residual W - s·B·A`);
      // the residual plus the float32 factors gives W back to float32 rounding
      assertClose(t, addRef(Float64Array.from(f.residual!), deltaRef(Float64Array.from(f.A), Float64Array.from(f.B), OC, R, C, s)), W, { atol: 1e-6, rtol: 1e-6 }, `${what}: W_res + s·B·A == W`);
      if (kind === 'olora') {
        const QtQ = gram(B, OC, R, false);
        assertClose(t, QtQ, QtQ.map((_, i) => (i % (R + 1) === 0 ? 1 : 0)), { atol: 1e-6, rtol: 0 }, `${what}: B (= Q_r) has orthonormal columns`);
      } else {
        // A = diag(sqrt(S_r/s))·V_rᵀ: A·Aᵀ = diag(S_r/s); Bᵀ·B the same
        const want = (M: Float64Array) => M.map((_, i) => (i % (R + 1) === 0 ? g.S[i / (R + 1)]! / s : 0));
        const AAt = gram(A, R, C, true);
        const BtB = gram(B, OC, R, false);
        assertClose(t, AAt, want(AAt), { atol: 1e-5, rtol: 1e-5 }, `${what}: A·Aᵀ = diag(S_r / s)`);
        assertClose(t, BtB, want(BtB), { atol: 1e-5, rtol: 1e-5 }, `${what}: Bᵀ·B = diag(S_r / s)`);
      }
    }
  }
});

void leakChecked(t, 'topSvd (PiSSA\'s SVD) against the Jacobi SVD: awkward shapes, zero columns, rank 1, tied singular values', (t) => {
  const rng = new Rng(5);
  const cases: [number, number, number, (i: number) => number][] = [
    [7, 5, 3, () => rng.normal()], [5, 9, 5, () => rng.normal()], [33, 17, 6, () => rng.normal()],
    [12, 30, 12, (i) => (i % 7 === 0 ? 0 : rng.normal())], [30, 8, 4, (i) => (i < 8 ? rng.normal() : 0)],
    [1, 6, 1, () => rng.normal()], [20, 20, 5, (i) => (Math.floor(i / 20) === i % 20 ? 2 : 0)],
  ];
  for (const [m, n, k, gen] of cases) {
    const a = mat(m, n, Array.from({ length: m * n }, (_, i) => gen(i)));
    const top = topSvd(a, k, () => rng.normal());
    const ref = svd(a);
    const what = `[${m}, ${n}] k ${k}`;
    assertClose(t, top.s, ref.s.subarray(0, k), { atol: 1e-12 * ref.s[0]!, rtol: 1e-12 }, `${what}: singular values`);
    const eye = (M: Float64Array) => M.map((_, i) => (i % (k + 1) === 0 ? 1 : 0));
    const VtV = gram(top.v.data, n, k, false);
    assertClose(t, VtV, eye(VtV), { atol: 1e-12, rtol: 0 }, `${what}: V orthonormal`);
    const rank = ref.s.filter((v) => v > 1e-12 * ref.s[0]!).length;
    if (rank >= k) {
      const UtU = gram(top.u.data, m, k, false);
      assertClose(t, UtU, eye(UtU), { atol: 1e-10, rtol: 0 }, `${what}: U orthonormal`);
    }
    const tied = k < ref.s.length && Math.abs(ref.s[k - 1]! - ref.s[k]!) < 1e-9 * ref.s[0]!;
    if (!tied) {
      // the rank-k part U·S·Vᵀ is unique when S[k-1] > S[k]: it must be the Jacobi SVD's
      const part = (u: Float64Array, sv: Float64Array, v: Float64Array, uc: number, vc: number) => {
        const out = new Float64Array(m * n);
        for (let j = 0; j < k; j++) for (let i = 0; i < m; i++) for (let c = 0; c < n; c++) out[i * n + c] += u[i * uc + j]! * sv[j]! * v[c * vc + j]!;
        return out;
      };
      assertClose(t, part(top.u.data, top.s, top.v.data, k, k), part(ref.u.data, ref.s, ref.v.data, ref.u.cols, ref.v.cols), { atol: 1e-11 * ref.s[0]!, rtol: 0 }, `${what}: U_k·S_k·V_kᵀ`);
    } else {
      t.pass(`${what}: tied singular values at k: any orthonormal basis of their space is right`);
    }
  }
});

void leakChecked(t, 'pissa_niter_N: exact on a rank-r weight, close to PiSSA with iterations, seeded', (t) => {
  const [OC, C, R] = [14, 10, 3];
  const U = randomData(OC * R, 5);
  const V = randomData(R * C, 6);
  const W = matmulRef(U, V, OC, R, C); // rank 3
  const full = loraInitFactors('pissa', W, OC, C, R, 2, new Rng(1));
  const fast = loraInitFactors('pissa_niter_0', W, OC, C, R, 2, new Rng(7));
  const prod = (f: { A: Float32Array; B: Float32Array }) => deltaRef(Float64Array.from(f.A), Float64Array.from(f.B), OC, R, C, 2);
  assertClose(t, prod(fast), prod(full), { atol: 1e-5, rtol: 1e-5 }, 'rank-r W: one randomized pass gives the SVD triplets');
  assertClose(t, fast.residual!, new Float64Array(OC * C), { atol: 1e-5, rtol: 0 }, 'and a zero residual');
  // a decaying spectrum, as trained weights have: a strong rank-2 part plus noise
  const Wg = addRef(randomData(20 * 12, 8, 0.1), matmulRef(randomData(20 * 2, 9), randomData(2 * 12, 10), 20, 2, 12));
  const exact = prod2(loraInitFactors('pissa', Wg, 20, 12, 2, 1, new Rng(1)));
  const approx = prod2(loraInitFactors('pissa_niter_30', Wg, 20, 12, 2, 1, new Rng(3)));
  assertClose(t, approx, exact, { atol: 1e-4, rtol: 1e-3 }, 'general W: 30 iterations reach the top-2 subspace');
  const again = loraInitFactors('pissa_niter_2', Wg, 20, 12, 2, 1, new Rng(3));
  t.same(again.A, loraInitFactors('pissa_niter_2', Wg, 20, 12, 2, 1, new Rng(3)).A, 'the same seed gives the same factors');
  function prod2(f: { A: Float32Array; B: Float32Array }) {
    return deltaRef(Float64Array.from(f.A), Float64Array.from(f.B), 20, 2, 12, 1);
  }
});

void leakChecked(t, 'LoraLinear initLoraWeights: residual written to the weight, outputs unchanged, gaussian/false draws', (t) => {
  const [OC, C, R] = [9, 13, 4];
  const W = Float32Array.from(randomData(OC * C, 11));
  const x = tensor(Float32Array.from(randomData(5 * C, 12)), [5, C]);
  for (const init of ['pissa', 'olora', 'pissa_niter_3'] as const) {
    for (const dtype of ['float32', 'bfloat16'] as const) {
      const w = tensor(W, [OC, C], { dtype });
      const before = vals(w);
      const l = new LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, alpha: 8, weight: w, bias: false, biasTensor: null, initLoraWeights: init, seed: 1 });
      t.equal(l.weight, w, `${init} ${dtype}: the layer keeps the given tensor`);
      const recon = addRef(vals(w), deltaRef(vals(l.loraA), vals(l.loraB), OC, R, C, 2));
      const tol = dtype === 'float32' ? { atol: 1e-6, rtol: 1e-5 } : { atol: 2e-2, rtol: 1e-2 };
      assertClose(t, recon, before, tol, `${init} ${dtype}: the weight now holds W - s·B·A (W_res + s·B·A == W)`);
      t.ok(l._initialFactors !== null, 'the initial factors are kept for convertToLora');
      const base = noGrad(() => tidy(() => vals(x.matmul(tensor(Float32Array.from(before), [OC, C]).transpose()))));
      assertClose(t, noGrad(() => tidy(() => vals(l.forward(x)))), base, dtype === 'float32' ? { atol: 1e-5, rtol: 1e-4 } : { atol: 5e-2, rtol: 5e-2 }, `${init} ${dtype}: the layer's output is the base output`);
      l.dispose();
    }
  }
  const big = new LoraLinear({ inFeatures: 200, outFeatures: 150, rank: 8, initLoraWeights: 'gaussian', seed: 2 });
  const A = vals(big.loraA);
  const std = Math.sqrt(A.reduce((a, v) => a + v * v, 0) / A.length);
  t.ok(Math.abs(std - 1 / 8) < 0.01, `gaussian: std(A) ${std.toFixed(4)} ~ 1/r (PEFT's normal_(std=1/r))`);
  t.ok(vals(big.loraB).every((v) => v === 0), 'gaussian: B = 0');
  const noInit = new LoraLinear({ inFeatures: 200, outFeatures: 150, rank: 8, initLoraWeights: false, seed: 2 });
  const Bv = vals(noInit.loraB);
  const bmax = Math.max(...Bv.map(Math.abs));
  t.ok(bmax < 1 / Math.sqrt(8) && bmax > 0.9 / Math.sqrt(8), `false: B ~ U(-1/sqrt(r), 1/sqrt(r)) like nn.Linear(r, out) (max |B| ${bmax.toFixed(3)})`);
  const both = new LoraLinear({ inFeatures: 13, outFeatures: 9, rank: 4, initLoraWeights: 'pissa', useDora: true, seed: 1 });
  t.ok(both.useDora && both.initLoraWeights === 'pissa', 'PiSSA and DoRA together');
  if (features().cuda) {
    // the init reads W to the host and writes the residual back to the device; DoRA's m on the device
    const w = tensor(W, [OC, C], { device: 'cuda' });
    const l = new LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, weight: w, bias: false, initLoraWeights: 'olora', useDora: true, seed: 1 });
    t.same([l.loraA.device, l.loraB.device, l.loraMagnitude!.device], ['cuda', 'cuda', 'cuda'], 'cuda: factors and magnitude on the device');
    assertClose(t, addRef(vals(w), deltaRef(vals(l.loraA), vals(l.loraB), OC, R, C, 1)), Float64Array.from(W), { atol: 1e-5, rtol: 1e-5 }, 'cuda: W_res + s·B·A == W');
    const xc = tensor(x.toFloat32Array(), [5, C], { device: 'cuda' });
    assertClose(t, noGrad(() => tidy(() => vals(l.forward(xc)))), noGrad(() => tidy(() => vals(x.matmul(tensor(W, [OC, C]).transpose())))), { atol: 1e-4, rtol: 1e-4 }, 'cuda: a new OLoRA + DoRA layer gives the base output');
    xc.dispose();
    l.dispose();
  } else {
    t.comment(`the CUDA case is skipped: CUDA unavailable (${features().reason})`);
  }
  for (const l of [big, noInit, both]) l.dispose();
  x.dispose();
});

void leakChecked(t, 'initLoraWeights option errors: did-you-mean, unsupported PEFT inits, rank > min dims, non-finite W', (t) => {
  const o = { inFeatures: 6, outFeatures: 4, rank: 2 };
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 'pisa' as never }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected one of true, false, 'gaussian', 'pissa', 'olora', 'pissa_niter_\[number of iters\]' for initLoraWeights but received 'pisa' \(string\); did you mean 'pissa'\?$/, 'typo');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 'gausian' as never }), LoraRangeError, 'ERR_LORA_RANGE', /received 'gausian' \(string\); did you mean 'gaussian'\?$/, 'typo gaussian');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 'loftq' as never }), LoraError, 'ERR_LORA_UNSUPPORTED', /received 'loftq' \(string\): PEFT's 'loftq' initialisation is not supported$/, 'loftq');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 'pissa_niter_x' as never }), LoraRangeError, 'ERR_LORA_RANGE', /did you mean 'pissa' or 'pissa_niter_4'\?/, 'bad niter');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 'pissa_niter_5000' as never }), LoraRangeError, 'ERR_LORA_RANGE', /Expected 'pissa_niter_N' with N an integer 0..1000 for initLoraWeights but received "pissa_niter_5000" \(string\)/, 'huge niter');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWeights: 1 as never }), LoraTypeError, 'ERR_LORA_TYPE', /for initLoraWeights but received 1 \(number\)/, 'a number');
  assertLoraError(t, () => new LoraLinear({ ...o, initLoraWiehgts: 'pissa' } as never), LoraError, 'ERR_LORA_OPTION', /Unknown option 'initLoraWiehgts' for LoraLinear; did you mean 'initLoraWeights'\?/, 'option name typo');
  assertLoraError(t, () => new LoraLinear({ ...o, useDorra: true } as never), LoraError, 'ERR_LORA_OPTION', /did you mean 'useDora'\?/, 'useDora typo');
  assertLoraError(t, () => new LoraLinear({ ...o, useDora: 1 as never }), LoraTypeError, 'ERR_LORA_TYPE', /Expected a boolean for useDora but received 1 \(number\)/, 'useDora type');
  assertLoraError(t, () => new LoraLinear({ ...o, rank: 5, initLoraWeights: 'olora' }), LoraRangeError, 'ERR_LORA_RANGE', /Expected an integer between 1 and 4 for rank but received 5/, 'rank > min dims');
  const bad = tensor(new Float32Array(24).fill(NaN), [4, 6]);
  assertLoraError(t, () => new LoraLinear({ ...o, weight: bad, initLoraWeights: 'pissa' }), LoraError, 'ERR_LORA_NON_FINITE', /Expected a finite base weight for init_lora_weights 'pissa' but element 0 is NaN/, 'NaN weight');
  t.ok(vals(bad).every(Number.isNaN), 'the refused weight is left as it was');
  bad.dispose();
  const lm = new TransformerLM({ vocabSize: 11, dModel: 16, nHeads: 4, nLayers: 1, maxSeqLen: 9, seed: 1 });
  assertLoraError(t, () => applyLora(lm, { targetModules: ['q_proj'], init_lora_weights: 'corda' } as never), LoraError, 'ERR_LORA_UNSUPPORTED', /PEFT's 'corda' initialisation is not supported/, 'applyLora corda');
  lm.dispose();
});

const small = { vocabSize: 11, dModel: 16, nHeads: 4, nLayers: 2, maxSeqLen: 9 };
const logits = (lm: TransformerLM) => noGrad(() => tidy(() => { const i = tensor([1, 2, 3, 4, 5, 6, 7, 8], [1, 8], { dtype: 'int32' }); return vals(lm.forward(i)); }));

void leakChecked(t, 'applyLora PiSSA/OLoRA: config, base changed, convertToLora gives the trained model on the original base', (t) => {
  for (const init of ['pissa', 'olora'] as const) {
    for (const useRslora of [false, true]) {
      const original = new TransformerLM({ ...small, seed: 4 });
      const y0 = logits(original);
      const lm = new TransformerLM({ ...small, seed: 4 });
      const info = applyLora(lm, { targetModules: ['q_proj', 'up_proj'], rank: 3, alpha: 5, initLoraWeights: init, useRslora, seed: 1 });
      t.equal(info.config.init_lora_weights, init, `${init}: config.init_lora_weights as PEFT records it`);
      assertClose(t, logits(lm), y0, { atol: 1e-4, rtol: 1e-4 }, `${init}: a new adapter leaves the outputs unchanged`);
      const q = loraLayers(lm).get('layers.0.attn.q_proj')!;
      t.ok(maxDiff(vals(q.weight), vals(original.getModule('layers.0.attn.q_proj')!.namedParameters()[0]![1])) > 1e-3, `${init}: the base weight now holds the residual`);
      // "train": move A and B
      for (const l of loraLayers(lm).values()) {
        l.loraA.assign(l.loraA.toFloat32Array().map((v, i) => v + 0.05 * Math.sin(i)));
        l.loraB.assign(l.loraB.toFloat32Array().map((v, i) => v + 0.05 * Math.cos(i)));
      }
      const trained = logits(lm);
      const dir = path.join(tmp, `${init}-${useRslora}`);
      saveLoraAdapter(lm, dir, { convertToLora: true });
      const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
      t.match(cfg, { r: 6, init_lora_weights: true, use_rslora: useRslora, lora_alpha: useRslora ? 5 * Math.SQRT2 : 10 }, `${init} rslora ${useRslora}: rank 2r, alpha doubled (rsLoRA: ·sqrt 2), init true`);
      // the converted adapter on the ORIGINAL weights (LoraModel, module by module) = the trained layer
      original.freeze();
      const base = new Map(original.namedParameters().map(([n, p]) => [n, p] as [string, Tensor]));
      const model = new LoraModel(base).addAdapter('c', loadPeftAdapter(dir));
      const x = tensor(Float32Array.from(randomData(4 * 16, 3)), [4, 16]);
      tidy(() => assertClose(t, vals(model.forward('layers.1.attn.q_proj', x)), vals(loraLayers(lm).get('layers.1.attn.q_proj')!.forward(x)), { atol: 1e-5, rtol: 1e-4 },
        `${init} rslora ${useRslora}: converted adapter on the original weight = trained layer on the residual`));
      t.ok(maxDiff(trained, y0) > 1e-3, 'the training moved the outputs');
      x.dispose();
      model.dispose();
      const plainDir = path.join(tmp, `${init}-${useRslora}-plain`);
      saveLoraAdapter(lm, plainDir);
      t.equal(JSON.parse(fs.readFileSync(path.join(plainDir, 'adapter_config.json'), 'utf8')).init_lora_weights, init, 'without conversion the file says how the base was changed');
      for (const m of [original, lm]) m.dispose();
    }
  }
  const plain = new TransformerLM({ ...small, seed: 4 });
  applyLora(plain, { targetModules: ['q_proj'], rank: 2 });
  assertLoraError(t, () => saveLoraAdapter(plain, path.join(tmp, 'x'), { convertToLora: true }), LoraError, 'ERR_LORA_UNSUPPORTED', /Expected layers initialised with initLoraWeights 'pissa', 'pissa_niter_N' or 'olora' for convertToLora but 'layers.0.attn.q_proj' was initialised with true/, 'convert plain LoRA');
  assertLoraError(t, () => saveLoraAdapter(plain, path.join(tmp, 'x'), { convertToLoRA: true } as never), LoraError, 'ERR_LORA_OPTION', /did you mean 'convertToLora'\?/, 'option typo');
  const dora = new TransformerLM({ ...small, seed: 4 });
  applyLora(dora, { targetModules: ['q_proj'], rank: 2, initLoraWeights: 'pissa', useDora: true });
  assertLoraError(t, () => saveLoraAdapter(dora, path.join(tmp, 'x'), { convertToLora: true }), LoraError, 'ERR_LORA_UNSUPPORTED', /Cannot convert DoRA module 'layers.0.attn.q_proj' to plain LoRA/, 'convert DoRA');
  t.notOk(fs.existsSync(path.join(tmp, 'x')), 'nothing written');
  for (const m of [plain, dora]) m.dispose();
});

void leakChecked(t, 'applyLora PiSSA/OLoRA refuse tied and non-finite weights before changing anything', async (t) => {
  const ck = writeCheckpoint(path.join(tmp, 'qwen3'), 'qwen3', { dtype: 'float32', seed: 2 });
  const model = await loadCausalLM(ck.dir);
  t.ok(model.tied, 'the checkpoint ties lm_head to the embeddings');
  const emb = model.namedParameters().find(([n]) => n.endsWith('embed_tokens.weight'))![1].toFloat32Array();
  assertLoraError(t, () => applyLora(model, { targetModules: ['q_proj', 'lm_head'], initLoraWeights: 'pissa' }), LoraError, 'ERR_LORA_UNSUPPORTED',
    /^Expected untied weights for initLoraWeights 'pissa' \(it writes the residual W - s·B·A into the weight\) but 'lm_head.weight' is also model.embed_tokens.weight; leave it out of targetModules$/, 'tied head');
  t.equal(loraLayers(model).size, 0, 'no layer was swapped');
  t.same(model.namedParameters().find(([n]) => n.endsWith('embed_tokens.weight'))![1].toFloat32Array(), emb, 'the embeddings are unchanged');
  applyLora(model, { targetModules: ['lm_head'], rank: 2 }); // plain LoRA on a tied head is fine: W is not written
  model.dispose();
  const lm = new TransformerLM({ ...small, seed: 4 });
  const v = lm.getModule('layers.1.attn.q_proj')!.namedParameters()[0]![1];
  v.assign(v.toFloat32Array().map((x, i) => (i === 3 ? Infinity : x)));
  const q0 = lm.getModule('layers.0.attn.q_proj')!.namedParameters()[0]![1].toFloat32Array();
  assertLoraError(t, () => applyLora(lm, { targetModules: ['q_proj'], initLoraWeights: 'olora' }), LoraError, 'ERR_LORA_NON_FINITE',
    /^Expected a finite weight for initLoraWeights 'olora' but 'layers.1.attn.q_proj.weight' holds NaN or Inf$/, 'non-finite weight');
  t.equal(loraLayers(lm).size, 0, 'no layer was swapped');
  t.same(lm.getModule('layers.0.attn.q_proj')!.namedParameters()[0]![1].toFloat32Array(), q0, 'layer 0 (before the bad one) is unchanged');
  lm.dispose();
});

void leakChecked(t, 'LoraModel.addAdapter takes the same inits (true, false, gaussian) and refuses PiSSA/OLoRA', (t) => {
  const W = tensor(Float32Array.from(randomData(120 * 200, 21)), [120, 200]);
  const model = new LoraModel(new Map([['lin.weight', W]]));
  model.addAdapter('g', { target_modules: ['lin'], r: 8, init_lora_weights: 'gaussian', seed: 1 });
  model.addAdapter('f', { target_modules: ['lin'], r: 8, initLoraWeights: false, seed: 1 } as never);
  const g = model.getAdapter('g').modules.get('lin')!;
  const A = vals(g.loraA);
  const std = Math.sqrt(A.reduce((a, v) => a + v * v, 0) / A.length);
  t.ok(Math.abs(std - 1 / 8) < 0.01 && vals(g.loraB).every((v) => v === 0), `gaussian: std(A) ${std.toFixed(4)} ~ 1/r, B = 0`);
  const bmax = Math.max(...vals(model.getAdapter('f').modules.get('lin')!.loraB).map(Math.abs));
  t.ok(bmax < 1 / Math.sqrt(8) && bmax > 0.9 / Math.sqrt(8), `false: B ~ U(±1/sqrt(r)) (max ${bmax.toFixed(3)})`);
  assertLoraError(t, () => model.addAdapter('p', { target_modules: ['lin'], init_lora_weights: 'pissa' }), LoraError, 'ERR_LORA_UNSUPPORTED',
    /Expected init_lora_weights true, false or 'gaussian' for addAdapter\(\) but received 'pissa': PiSSA and OLoRA rewrite the base weights, which a LoraModel does not own/, 'LoraModel pissa');
  assertLoraError(t, () => model.addAdapter('p', { target_modules: ['lin'], init_lora_weights: 'olra' }), LoraRangeError, 'ERR_LORA_RANGE', /received 'olra' \(string\); did you mean 'olora'\?/, 'LoraModel typo');
  model.dispose();
  W.dispose();
});

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
