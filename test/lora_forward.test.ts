// lora_forward / lora_backward / lora_merge: the float64 reference against finite differences,
// then the native kernels (through the binding and through LoraLinear) against the reference, at
// awkward shapes, with and without bias, dropout and rsLoRA.
import t from 'tap';

import { LoraLinear, tensor, Tensor, tidy } from '../lib/index';
import { native } from '../lib/native';
import { assertClose, f32, leakChecked, randomData } from './helpers';
import { finiteDifference, LoraInputs, loraBackwardRef, loraForwardRef, loraMergeRef } from './ref/lora_ref';

const TOL = { atol: 1e-4, rtol: 1e-4 };

function inputs(N: number, C: number, OC: number, R: number, opts: { bias?: boolean; p?: number; s?: number; seed?: number } = {}): LoraInputs {
  const seed = opts.seed ?? N * 1000003 + C * 1009 + OC * 31 + R;
  return {
    x: f32(randomData(N * C, seed + 1)),
    W: f32(randomData(OC * C, seed + 2, 0.5)),
    b: opts.bias === false ? null : f32(randomData(OC, seed + 3)),
    A: f32(randomData(R * C, seed + 4, 0.5)),
    B: f32(randomData(OC * R, seed + 5, 0.5)),
    N, C, OC, R,
    s: Math.fround(opts.s ?? 2 / R),
    p: opts.p ?? 0,
    seed: seed + 6,
  };
}

function t32(a: Float64Array, shape: number[]): Tensor {
  return tensor(Float32Array.from(a), shape);
}

// Awkward shapes: N in {1, 7, 33, 129}, C and OC in {1, 3, 17, 64, 257},
// R in {1, 2, 8, min(C, OC)}; every value appears, with R clipped to min(C, OC).
const SHAPES: [number, number, number, number][] = [
  [1, 1, 1, 1], [7, 3, 17, 2], [33, 17, 3, 3], [129, 64, 17, 8], [1, 257, 64, 8],
  [7, 64, 257, 64], [33, 257, 1, 1], [129, 3, 257, 3], [7, 17, 17, 17], [33, 64, 64, 2],
  [1, 3, 64, 1], [129, 257, 3, 2],
];

t.test('reference backward matches central finite differences', async (t) => {
  for (const [N, C, OC, R, p] of [[3, 5, 4, 2, 0], [2, 7, 3, 3, 0.3], [1, 1, 1, 1, 0]] as const) {
    const a = inputs(N, C, OC, R, { p, s: 1.5 });
    const G = randomData(N * OC, 77);
    const grads = loraBackwardRef(a, G);
    const fx = (v: Float64Array) => loraForwardRef({ ...a, x: v }).y;
    const fA = (v: Float64Array) => loraForwardRef({ ...a, A: v }).y;
    const fB = (v: Float64Array) => loraForwardRef({ ...a, B: v }).y;
    // with the loss sum(y ⊙ G) the layer is linear in each input: the check can be tight
    assertClose(t, grads.dx, Array.from(a.x, (_, i) => finiteDifference(fx, a.x, G, i)), { atol: 1e-7, rtol: 1e-6 }, `dx fd ${N}x${C}x${OC}x${R} p=${p}`);
    assertClose(t, grads.dA, Array.from(a.A, (_, i) => finiteDifference(fA, a.A, G, i)), { atol: 1e-7, rtol: 1e-6 }, `dA fd ${N}x${C}x${OC}x${R} p=${p}`);
    assertClose(t, grads.dB, Array.from(a.B, (_, i) => finiteDifference(fB, a.B, G, i)), { atol: 1e-7, rtol: 1e-6 }, `dB fd ${N}x${C}x${OC}x${R} p=${p}`);
  }
});

function runKernels(a: LoraInputs) {
  const { N, C, OC, R } = a;
  return tidy(() => {
    const x = t32(a.x, [N, C]);
    const W = t32(a.W, [OC, C]);
    const b = a.b ? t32(a.b, [OC]) : null;
    const A = t32(a.A, [R, C]);
    const B = t32(a.B, [OC, R]);
    const y = tensor(new Float32Array(N * OC).fill(NaN), [N, OC]);
    const h = tensor(new Float32Array(N * R).fill(NaN), [N, R]);
    native.loraForward(y._storage, h._storage, x._storage, W._storage, b ? b._storage : null, A._storage, B._storage, N, C, OC, R, a.s, a.p, a.seed);
    const dy = t32(f32(randomData(N * OC, 4242)), [N, OC]);
    const dx = tensor(new Float32Array(N * C).fill(NaN), [N, C]);
    // dA and dB accumulate: start them from known values and subtract afterwards
    const dA0 = f32(randomData(R * C, 11));
    const dB0 = f32(randomData(OC * R, 12));
    const dA = t32(dA0, [R, C]);
    const dB = t32(dB0, [OC, R]);
    native.loraBackward(dx._storage, dA._storage, dB._storage, dy._storage, x._storage, h._storage, W._storage, A._storage, B._storage, N, C, OC, R, a.s, a.p, a.seed);
    return {
      y: y.toFloat32Array(), h: h.toFloat32Array(), dx: dx.toFloat32Array(),
      dA: dA.toFloat32Array().map((v, i) => v - dA0[i]!), dB: dB.toFloat32Array().map((v, i) => v - dB0[i]!),
      dy: Float64Array.from(dy.toFloat32Array()),
    };
  });
}

t.test('native lora_forward and lora_backward match the reference', async (t) => {
  for (const [N, C, OC, R] of SHAPES) {
    for (const variant of [{ bias: true, p: 0 }, { bias: false, p: 0.25 }] as const) {
      await leakChecked(t, `N=${N} C=${C} OC=${OC} R=${R} bias=${variant.bias} p=${variant.p}`, (tt) => {
        const a = inputs(N, C, OC, R, variant);
        const got = runKernels(a);
        const ref = loraForwardRef(a);
        const grads = loraBackwardRef(a, got.dy);
        const tol = { atol: TOL.atol * Math.sqrt(C + OC), rtol: TOL.rtol };
        assertClose(tt, got.y, ref.y, tol, 'y');
        assertClose(tt, got.h, ref.h, tol, 'h');
        assertClose(tt, got.dx, grads.dx, tol, 'dx');
        assertClose(tt, got.dA, grads.dA, { atol: tol.atol * Math.sqrt(N), rtol: 1e-3 }, 'dA');
        assertClose(tt, got.dB, grads.dB, { atol: tol.atol * Math.sqrt(N), rtol: 1e-3 }, 'dB');
      });
    }
  }
});

t.test('native lora_merge matches the reference, and unmerge restores W', async (t) => {
  for (const [, C, OC, R] of SHAPES) {
    await leakChecked(t, `merge C=${C} OC=${OC} R=${R}`, (tt) => {
      const a = inputs(1, C, OC, R, { s: 1.75 });
      tidy(() => {
        const W = t32(a.W, [OC, C]);
        const A = t32(a.A, [R, C]);
        const B = t32(a.B, [OC, R]);
        native.loraMerge(W._storage, A._storage, B._storage, OC, C, R, a.s);
        assertClose(tt, W.toFloat32Array(), loraMergeRef(a.W, a.A, a.B, OC, C, R, a.s), TOL, 'merged W');
        native.loraMerge(W._storage, A._storage, B._storage, OC, C, R, -a.s);
        assertClose(tt, W.toFloat32Array(), a.W, { atol: 1e-5, rtol: 1e-5 }, 'unmerged W');
      });
    });
  }
});

t.test('LoraLinear: batched 3-D input, bias and rsLoRA, gradients, merge', async (t) => {
  for (const [N0, N1, C, OC, R, rs, bias] of [[3, 5, 17, 3, 2, false, true], [2, 7, 64, 17, 8, true, false], [1, 1, 3, 3, 3, true, true]] as const) {
    await leakChecked(t, `[${N0}, ${N1}, ${C}] -> ${OC}, r=${R}, rsLoRA=${rs}, bias=${bias}`, (tt) => {
      const N = N0 * N1;
      const a = inputs(N, C, OC, R, { bias });
      const alpha = 3;
      const layer = new LoraLinear({
        inFeatures: C, outFeatures: OC, rank: R, alpha, useRslora: rs, bias,
        weight: t32(a.W, [OC, C]), biasTensor: a.b ? t32(a.b, [OC]) : null,
      });
      tt.equal(layer.scaling, rs ? alpha / Math.sqrt(R) : alpha / R, 'scaling');
      a.s = Math.fround(layer.scaling);
      a.A = Float64Array.from(layer.loraA.toFloat32Array());
      layer.loraB.assign(Float32Array.from(a.B));
      tidy(() => {
        const x = tensor(Float32Array.from(a.x), [N0, N1, C], { requiresGrad: true });
        const y = layer.forward(x);
        tt.same(y.shape, [N0, N1, OC], 'output shape');
        const ref = loraForwardRef(a);
        assertClose(tt, y.toFloat32Array(), ref.y, { atol: 1e-4 * Math.sqrt(C), rtol: 1e-4 }, 'forward');
        const G = f32(randomData(N * OC, 99));
        y.backward(tensor(Float32Array.from(G), [N0, N1, OC]));
        const grads = loraBackwardRef(a, G);
        assertClose(tt, x.grad!.toFloat32Array(), grads.dx, { atol: 1e-4 * Math.sqrt(OC), rtol: 1e-4 }, 'x.grad');
        assertClose(tt, layer.loraA.grad!.toFloat32Array(), grads.dA, { atol: 1e-4 * Math.sqrt(N), rtol: 1e-3 }, 'loraA.grad');
        assertClose(tt, layer.loraB.grad!.toFloat32Array(), grads.dB, { atol: 1e-4 * Math.sqrt(N), rtol: 1e-3 }, 'loraB.grad');
        tt.notOk(layer.weight.grad, 'the frozen weight gets no gradient');

        layer.merge();
        tt.ok(layer.merged, 'merged');
        const ym = layer.forward(x);
        assertClose(tt, ym.toFloat32Array(), y.toFloat32Array(), { atol: 1e-4 * Math.sqrt(C), rtol: 1e-4 }, 'forward after merge == forward with the adapter');
        layer.unmerge();
        tt.notOk(layer.merged, 'unmerged');
        assertClose(tt, layer.weight.toFloat32Array(), a.W, { atol: 1e-5, rtol: 1e-5 }, 'unmerge restores W');
      });
      layer.dispose();
    });
  }
});

t.test('LoraLinear: dropout only on the LoRA path, only in training mode', async (t) => {
  await leakChecked(t, 'dropout', (tt) => {
    const layer = new LoraLinear({ inFeatures: 33, outFeatures: 7, rank: 4, dropout: 0.5, seed: 5 });
    layer.loraB.assign(Float32Array.from(randomData(7 * 4, 3)));
    tidy(() => {
      const x = tensor(Float32Array.from(randomData(9 * 33, 8)), [9, 33]);
      layer.eval();
      const e1 = layer.forward(x).toFloat32Array();
      const e2 = layer.forward(x).toFloat32Array();
      tt.same(e1, e2, 'eval mode is deterministic');
      layer.train();
      const r1 = layer.forward(x).toFloat32Array();
      const r2 = layer.forward(x).toFloat32Array();
      tt.notSame(r1, e1, 'training mode drops on the LoRA path');
      tt.notSame(r1, r2, 'each training forward draws a new mask');
      // with B = 0 the LoRA path vanishes and dropout must change nothing (base path untouched)
      layer.loraB.assign(new Float32Array(7 * 4));
      layer.eval();
      const base = layer.forward(x).toFloat32Array();
      layer.train();
      tt.same(layer.forward(x).toFloat32Array(), base, 'no dropout on the base path');
    });
    layer.dispose();
  });
});

t.test('a new adapter changes nothing (loraB starts at zero, A is Kaiming-uniform)', async (t) => {
  await leakChecked(t, 'init', (tt) => {
    const layer = new LoraLinear({ inFeatures: 64, outFeatures: 16, rank: 8, seed: 1 });
    const A = layer.loraA.toFloat32Array();
    const bound = 1 / Math.sqrt(64);
    tt.ok(A.every((v) => Math.abs(v) <= bound), 'A within the Kaiming-uniform bound 1/sqrt(in)');
    tt.ok(Math.max(...A.map(Math.abs)) > 0.8 * bound, 'A spans the bound');
    tt.ok(layer.loraB.toFloat32Array().every((v) => v === 0), 'B is zero');
    tt.same(layer.parameters(), [layer.loraA, layer.loraB], 'parameters() are the trainable ones');
    tidy(() => {
      const x = tensor(Float32Array.from(randomData(5 * 64, 2)), [5, 64]);
      const base = tidy(() => {
        const w = layer.weight;
        const b = layer.bias!;
        const xv = x.toFloat32Array();
        const wv = w.toFloat32Array();
        const bv = b.toFloat32Array();
        const out = new Float64Array(5 * 16);
        for (let n = 0; n < 5; n++) for (let o = 0; o < 16; o++) {
          let acc = bv[o]!;
          for (let c = 0; c < 64; c++) acc += xv[n * 64 + c]! * wv[o * 64 + c]!;
          out[n * 16 + o] = acc;
        }
        return out;
      });
      assertClose(tt, layer.forward(x).toFloat32Array(), base, { atol: 1e-5, rtol: 1e-5 }, 'forward equals the base layer');
    });
    layer.dispose();
  });
});
