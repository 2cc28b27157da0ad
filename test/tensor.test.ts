// Tensors and the general ops: factories, data movement, dispose/tidy/using, the native live
// count (including finalizers after GC), and every op with autograd against float64 references
// and finite differences.
import t from 'tap';

import {
  add, div, features, full, matmul, mean, memory, mul, ones, permute, rand, randn, reshape, setNumThreads,
  getNumThreads, sub, sum, tensor, Tensor, tidy, keep, noGrad, transpose, zeros, linear, max, relu, exp, unary, resetPeakMemory,
  checkpoint,
} from '../lib/index';
import { reshapeFresh } from '../lib/models/common';
import { isShared, shareStorage, takeStorage } from '../lib/tensor';
import { assertClose, f32, leakChecked, randomData } from './helpers';
import { finiteDifference } from './ref/lora_ref';
import { Arr, elementwise, matmulRef, numel, permuteRef, sumRef } from './ref/ops_ref';

function arr(shape: number[], seed: number): Arr {
  return { data: f32(randomData(numel(shape), seed)), shape };
}

function toTensor(a: Arr, requiresGrad = true): Tensor {
  return tensor(Float32Array.from(a.data), a.shape, { requiresGrad });
}

/**
 * Checks op against ref: forward values, then the gradient of sum(op(...) ⊙ G) for every input
 * against central finite differences of the float64 reference.
 */
function checkOp(t: Tap.Test, name: string, inputs: Arr[], op: (...xs: Tensor[]) => Tensor, ref: (...xs: Arr[]) => Arr, tol = { atol: 1e-4, rtol: 1e-4 }, fdTol = { atol: 1e-4, rtol: 1e-3 }): void {
  tidy(() => {
    const ts = inputs.map((a) => toTensor(a));
    const y = op(...ts);
    const r = ref(...inputs);
    t.same(y.shape, r.shape, `${name}: shape ${JSON.stringify(r.shape)}`);
    assertClose(t, y.toFloat32Array(), r.data, tol, `${name}: forward`);
    const G = f32(randomData(numel(r.shape), 555));
    y.backward(tensor(Float32Array.from(G), r.shape));
    inputs.forEach((a, k) => {
      const f = (v: Float64Array) => ref(...inputs.map((b, j) => (j === k ? { data: v, shape: b.shape } : b))).data;
      const fd = Array.from(a.data, (_, i) => finiteDifference(f, a.data, G, i, 1e-4));
      assertClose(t, ts[k]!.grad!.toFloat32Array(), fd, fdTol, `${name}: gradient of input ${k}`);
    });
  });
}

declare namespace Tap { type Test = Parameters<Parameters<typeof t.test>[1]>[0]; }

t.test('factories, dtype, shape, data copies', async (t) => {
  await leakChecked(t, 'factories', (tt) => {
    tidy(() => {
      const x = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
      tt.same(x.shape, [2, 3]);
      tt.equal(x.dtype, 'float32');
      tt.equal(x.device, 'cpu');
      tt.equal(x.size, 6);
      tt.equal(x.requiresGrad, false);
      tt.equal(x.grad, null);
      tt.same(x.toArray(), [[1, 2, 3], [4, 5, 6]]);
      const copy = x.toFloat32Array();
      copy[0] = 100;
      tt.equal(x.toFloat32Array()[0], 1, 'toFloat32Array returns a copy');
      tt.same(zeros([2, 2]).toFloat32Array(), new Float32Array(4));
      tt.same(ones([3]).toFloat32Array(), new Float32Array([1, 1, 1]));
      tt.same(full([2], 7).toFloat32Array(), new Float32Array([7, 7]));
      tt.same(randn([5], { seed: 3 }).toFloat32Array(), randn([5], { seed: 3 }).toFloat32Array(), 'seeded randn repeats');
      tt.notSame(randn([5], { seed: 3 }).toFloat32Array(), randn([5], { seed: 4 }).toFloat32Array(), 'other seeds differ');
      const big = randn([20000], { seed: 1 }).toFloat32Array();
      const m = big.reduce((a, b) => a + b, 0) / big.length;
      const v = big.reduce((a, b) => a + (b - m) ** 2, 0) / big.length;
      tt.ok(Math.abs(m) < 0.03 && Math.abs(v - 1) < 0.05, `randn mean ${m.toFixed(3)} variance ${v.toFixed(3)}`);
      const u = rand([1000], { seed: 2, low: -2, high: 3 }).toFloat32Array();
      tt.ok(u.every((z) => z >= -2 && z < 3), 'rand within [low, high)');
      const s = tensor([2.5], []);
      tt.same(s.shape, []);
      tt.equal(s.item(), 2.5, 'a 0-d tensor');
      const e = zeros([0, 3]);
      tt.equal(e.size, 0, 'an empty tensor');
      const bf = tensor([1.5, -2.25, 3.015625], [3], { dtype: 'bfloat16' });
      tt.equal(bf.dtype, 'bfloat16');
      tt.same(bf.toFloat32Array(), new Float32Array([1.5, -2.25, 3.015625]), 'bf16 keeps exactly representable values');
      tt.same(bf.toBytes().length, 6, 'bf16 stores 2 bytes a value');
      const h = tensor([0.5, -65504, 1e-7], [3], { dtype: 'float16' });
      assertClose(tt, h.toFloat32Array(), [0.5, -65504, 1.1920928955078125e-7], { atol: 0, rtol: 0 }, 'f16 rounding');
      tt.same(tensor([1.7], [1], { dtype: 'bfloat16' }).toDtype('float32').toFloat32Array(), new Float32Array([1.703125]), 'bf16 rounds to nearest');
    });
  });
});

t.test('toFloat32Array(out) reads into an array the caller keeps', async (t) => {
  await leakChecked(t, 'toFloat32Array(out)', (tt) => {
    tidy(() => {
      const x = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
      const out = new Float32Array(6).fill(-1);
      const r = x.toFloat32Array(out);
      tt.equal(r, out, 'an array of exactly size elements comes back itself');
      tt.same(out, new Float32Array([1, 2, 3, 4, 5, 6]));
      const longer = new Float32Array(8).fill(-1);
      const v = x.toFloat32Array(longer);
      tt.equal(v.length, 6, 'a longer array: the view of its first size elements');
      tt.equal(v.buffer, longer.buffer, 'the view shares its memory');
      tt.same(longer, new Float32Array([1, 2, 3, 4, 5, 6, -1, -1]), 'elements past size are left alone');
      x.assign(new Float32Array([6, 5, 4, 3, 2, 1]));
      tt.same(x.toFloat32Array(out), new Float32Array([6, 5, 4, 3, 2, 1]), 'reused: the array holds the new values');
      const bf = tensor([1.5, -2.25, 3.015625], [3], { dtype: 'bfloat16' });
      tt.same(bf.toFloat32Array(new Float32Array(3)), new Float32Array([1.5, -2.25, 3.015625]), 'bf16 widened into it');
      const h = tensor([0.5, -65504], [2], { dtype: 'float16' });
      tt.same(h.toFloat32Array(new Float32Array(2)), new Float32Array([0.5, -65504]), 'f16 widened into it');
      const ints = tensor([7, -3], [2], { dtype: 'int32' });
      tt.same(ints.toFloat32Array(new Float32Array(2)), new Float32Array([7, -3]), 'int32 converted into it');
      tt.same(zeros([0, 3]).toFloat32Array(new Float32Array(0)), new Float32Array(0), 'an empty tensor');
      const shared = new Float32Array(new SharedArrayBuffer(24));
      tt.same(x.toFloat32Array(shared), new Float32Array([6, 5, 4, 3, 2, 1]), 'a SharedArrayBuffer-backed array');
      tt.throws(() => x.toFloat32Array(new Float32Array(5)), { code: 'ERR_LORA_SHAPE', message: /at least 6 elements.*\[2, 3\].*of 5/ }, 'too short');
      tt.throws(() => x.toFloat32Array(new Float64Array(6) as unknown as Float32Array), { code: 'ERR_LORA_TYPE', message: /out/ }, 'not a Float32Array');
      tt.throws(() => x.toFloat32Array([0, 0, 0, 0, 0, 0] as unknown as Float32Array), { code: 'ERR_LORA_TYPE' }, 'a plain array');
      const gone = tensor([1], [1]);
      gone.dispose();
      tt.throws(() => gone.toFloat32Array(new Float32Array(1)), { code: 'ERR_LORA_DISPOSED' }, 'a disposed tensor');
    });
  });
});

t.test('assign copies in place with shape checks', async (t) => {
  await leakChecked(t, 'assign', (tt) => {
    tidy(() => {
      const a = zeros([2, 2]);
      a.assign(tensor([1, 2, 3, 4], [2, 2]));
      tt.same(a.toFloat32Array(), new Float32Array([1, 2, 3, 4]));
      a.assign(new Float32Array([5, 6, 7, 8]));
      tt.same(a.toFloat32Array(), new Float32Array([5, 6, 7, 8]));
      const w = zeros([2], { dtype: 'bfloat16' });
      w.assign(tensor([1.5, 2.5], [2]));
      tt.same(w.toFloat32Array(), new Float32Array([1.5, 2.5]), 'assign converts to the destination dtype');
    });
  });
});

t.test('dispose, using, tidy, keep', async (t) => {
  const start = memory().numTensors;
  const a = tensor([1, 2], [2]);
  t.equal(memory().numTensors, start + 1, 'a tensor is counted');
  a.dispose();
  a.dispose();
  t.equal(memory().numTensors, start, 'dispose frees it; a second dispose is harmless');
  t.equal(a.isDisposed, true);
  {
    using b = ones([3]);
    t.equal(memory().numTensors, start + 1, 'using keeps it alive in its block');
    t.equal(b.size, 3);
  }
  t.equal(memory().numTensors, start, 'using disposes at the end of the block');
  let kept: Tensor | undefined;
  const out = tidy(() => {
    const x = ones([4]);
    const y = add(x, 1);
    kept = keep(mul(y, 2));
    return { result: sub(y, 1), list: [zeros([1])] };
  });
  t.equal(memory().numTensors, start + 3, 'tidy frees intermediates, keeps returned and kept tensors');
  t.same(out.result.toFloat32Array(), new Float32Array([1, 1, 1, 1]));
  out.result.dispose();
  out.list[0]!.dispose();
  kept!.dispose();
  t.equal(memory().numTensors, start);
  t.throws(() => tidy(() => {
    ones([2]);
    throw new Error('boom');
  }), /boom/);
  t.equal(memory().numTensors, start, 'tidy frees everything when fn throws');
  const nested = tidy(() => {
    const inner = tidy(() => ones([2]));
    return add(inner, 1);
  });
  t.equal(memory().numTensors, start + 1, 'nested tidy');
  nested.dispose();
});

t.test('finalizers free dropped tensors after GC', async (t) => {
  // in a child with --expose-gc (over the compiled package) so that the check cannot pass vacuously
  const { execFileSync } = await import('node:child_process');
  const out = execFileSync(process.execPath, ['--expose-gc', '-e', `
    const L = require(${JSON.stringify(require.resolve('../dist/lib/index.js'))});
    const before = L.memory().numTensors;
    (function () { for (let i = 0; i < 200; i++) L.ones([64]); })();
    const mid = L.memory().numTensors;
    (async () => {
      for (let i = 0; i < 50 && L.memory().numTensors > before; i++) { global.gc(); await new Promise((r) => setTimeout(r, 10)); }
      console.log(JSON.stringify({ before, mid, after: L.memory().numTensors }));
    })();
  `], { encoding: 'utf8' });
  const r = JSON.parse(out) as { before: number; mid: number; after: number };
  t.equal(r.mid, r.before + 200, 'dropped tensors are still counted before GC');
  t.equal(r.after, r.before, 'GC finalizers release every dropped tensor');
});

t.test('threads', async (t) => {
  const n = getNumThreads();
  setNumThreads(1);
  t.equal(getNumThreads(), 1);
  t.equal(features().threads, 1);
  setNumThreads(n);
  t.equal(getNumThreads(), n);
  t.ok(['avx512', 'avx2', 'generic'].includes(features().isa), `isa ${features().isa}`);
});

t.test('elementwise ops with broadcasting and scalars', async (t) => {
  const cases: [number[], number[]][] = [[[3, 17], [3, 17]], [[7, 1, 3], [5, 1]], [[1], [2, 3]], [[4, 3], [3]], [[2, 1, 4], [2, 3, 1]]];
  for (const [sa, sb] of cases) {
    await leakChecked(t, `${JSON.stringify(sa)} with ${JSON.stringify(sb)}`, (tt) => {
      const a = arr(sa, 1);
      const b = arr(sb, 2);
      const bPos = { data: b.data.map((v) => Math.abs(v) + 0.5), shape: b.shape };
      checkOp(tt, 'add', [a, b], add, (x, y) => elementwise(x, y, (p, q) => p + q));
      checkOp(tt, 'sub', [a, b], sub, (x, y) => elementwise(x, y, (p, q) => p - q));
      checkOp(tt, 'mul', [a, b], mul, (x, y) => elementwise(x, y, (p, q) => p * q));
      checkOp(tt, 'div', [a, bPos], div, (x, y) => elementwise(x, y, (p, q) => p / q), { atol: 1e-5, rtol: 1e-5 }, { atol: 1e-3, rtol: 1e-3 });
    });
  }
  await leakChecked(t, 'scalar operands', (tt) => {
    const a = arr([3, 5], 3);
    const s = { data: new Float64Array([1.5]), shape: [] as number[] };
    checkOp(tt, 'x + 2', [a], (x) => add(x, 2), (x) => elementwise(x, s, (p) => p + 2));
    checkOp(tt, '2 - x', [a], (x) => sub(2, x), (x) => elementwise(x, s, (p) => 2 - p));
    checkOp(tt, 'x * -3', [a], (x) => mul(x, -3), (x) => elementwise(x, s, (p) => p * -3));
    checkOp(tt, 'x / 4', [a], (x) => div(x, 4), (x) => elementwise(x, s, (p) => p / 4));
    const pos = { data: a.data.map((v) => Math.abs(v) + 0.5), shape: a.shape };
    checkOp(tt, '1 / x', [pos], (x) => div(1, x), (x) => elementwise(x, s, (p) => 1 / p), { atol: 1e-5, rtol: 1e-5 }, { atol: 1e-3, rtol: 1e-3 });
    checkOp(tt, 'x ⊙ x', [a], (x) => mul(x, x), (x) => elementwise(x, x, (p, q) => p * q));
  });
});

t.test('matmul, linear', async (t) => {
  const cases: [number[], number[]][] = [[[1, 1], [1, 1]], [[7, 3], [3, 17]], [[2, 33, 17], [17, 5]], [[3, 4, 5], [3, 5, 2]], [[6, 8], [2, 8, 3]], [[129, 3], [3, 1]]];
  for (const [sa, sb] of cases) {
    await leakChecked(t, `${JSON.stringify(sa)} @ ${JSON.stringify(sb)}`, (tt) => {
      checkOp(tt, 'matmul', [arr(sa, 3), arr(sb, 4)], matmul, matmulRef);
    });
  }
  await leakChecked(t, '1-D operands', (tt) => {
    tidy(() => {
      const v = tensor([1, 2, 3], [3], { requiresGrad: true });
      const m = tensor([1, 0, 0, 1, 1, 1], [3, 2]);
      const r = matmul(v, m);
      tt.same(r.shape, [2]);
      tt.same(r.toFloat32Array(), new Float32Array([1 + 3, 2 + 3]));
      r.backward(tensor([1, 1], [2]));
      tt.same(v.grad!.toFloat32Array(), new Float32Array([1, 1, 2]), 'vector @ matrix gradient');
      const r2 = matmul(tensor([1, 2, 3, 4], [2, 2]), tensor([1, 1], [2]));
      tt.same(r2.toFloat32Array(), new Float32Array([3, 7]), 'matrix @ vector');
    });
  });
  await leakChecked(t, 'linear', (tt) => {
    const x = arr([2, 5, 17], 7);
    const w = arr([3, 17], 8);
    const b = arr([3], 9);
    const ref = (xx: Arr, ww: Arr, bb: Arr) => {
      const wt = permuteRef(ww, [1, 0]);
      const y = matmulRef({ data: xx.data, shape: [10, 17] }, wt);
      return elementwise({ data: y.data, shape: [2, 5, 3] }, bb, (p, q) => p + q);
    };
    checkOp(tt, 'linear', [x, w, b], (xx, ww, bb) => linear(xx, ww, bb), ref);
  });
});

t.test('reductions and shape ops', async (t) => {
  await leakChecked(t, 'sum, mean, max', (tt) => {
    const a = arr([3, 4, 5], 11);
    checkOp(tt, 'sum all', [a], (x) => sum(x), (x) => sumRef(x, [0, 1, 2], false));
    checkOp(tt, 'sum axis 1', [a], (x) => sum(x, 1), (x) => sumRef(x, [1], false));
    checkOp(tt, 'sum axes [0, 2] keepDims', [a], (x) => sum(x, [0, 2], true), (x) => sumRef(x, [0, 2], true));
    checkOp(tt, 'sum axis -1', [a], (x) => sum(x, -1), (x) => sumRef(x, [2], false));
    checkOp(tt, 'mean all', [a], (x) => mean(x), (x) => { const s = sumRef(x, [0, 1, 2], false); return { data: s.data.map((v) => v / 60), shape: s.shape }; });
    checkOp(tt, 'mean axis 0', [a], (x) => mean(x, 0), (x) => { const s = sumRef(x, [0], false); return { data: s.data.map((v) => v / 3), shape: s.shape }; });
    const maxRef = (x: Arr) => {
      const out = new Float64Array(3 * 5).fill(-Infinity);
      for (let i = 0; i < 3; i++) for (let j = 0; j < 4; j++) for (let k = 0; k < 5; k++) out[i * 5 + k] = Math.max(out[i * 5 + k]!, x.data[i * 20 + j * 5 + k]!);
      return { data: out, shape: [3, 5] };
    };
    checkOp(tt, 'max axis 1', [a], (x) => max(x, 1), maxRef);
    tidy(() => {
      // ties share the gradient; a subnormal gap (1e-44 vs 0) is still not a tie
      const x = tensor([2, 5, 5, 1e-44, 0, -3], [2, 3], { requiresGrad: true });
      sum(max(x, 1)).backward();
      tt.same(x.grad!.toFloat32Array(), new Float32Array([0, 0.5, 0.5, 1, 0, 0]), 'max gradient: ties split, subnormal gaps exact');
    });
  });
  await leakChecked(t, 'reshape, permute, transpose', (tt) => {
    const a = arr([2, 3, 4], 12);
    checkOp(tt, 'reshape', [a], (x) => reshape(x, [4, -1]), (x) => ({ data: x.data, shape: [4, 6] }));
    checkOp(tt, 'permute', [a], (x) => permute(x, [2, 0, 1]), (x) => permuteRef(x, [2, 0, 1]));
    checkOp(tt, 'transpose', [a], (x) => transpose(x), (x) => permuteRef(x, [0, 2, 1]));
  });
  await leakChecked(t, 'unary', (tt) => {
    const a = arr([3, 17], 13);
    checkOp(tt, 'relu', [a], relu, (x) => ({ data: x.data.map((v) => Math.max(v, 0)), shape: x.shape }));
    checkOp(tt, 'exp', [a], exp, (x) => ({ data: x.data.map(Math.exp), shape: x.shape }));
    checkOp(tt, 'tanh', [a], (x) => unary('tanh', x), (x) => ({ data: x.data.map(Math.tanh), shape: x.shape }));
  });
});

t.test('autograd: shared inputs, accumulation, noGrad, gradient argument', async (t) => {
  await leakChecked(t, 'graph', (tt) => {
    tidy(() => {
      const x = tensor([1, 2, 3], [3], { requiresGrad: true });
      const y = add(mul(x, x), mul(x, 3)); // dy/dx = 2x + 3
      sum(y).backward();
      tt.same(x.grad!.toFloat32Array(), new Float32Array([5, 7, 9]), 'a tensor used twice gets both contributions');
      sum(mul(x, 2)).backward();
      tt.same(x.grad!.toFloat32Array(), new Float32Array([7, 9, 11]), 'backward accumulates into .grad');
      x.zeroGrad();
      tt.equal(x.grad, null, 'zeroGrad clears');
      const z = noGrad(() => mul(x, 2));
      tt.equal(z.requiresGrad, false, 'noGrad records nothing');
      const w = mul(x, tensor([1, 1, 1], [3]));
      w.backward(tensor([1, 2, 3], [3]));
      tt.same(x.grad!.toFloat32Array(), new Float32Array([1, 2, 3]), 'explicit gradient argument');
      tt.equal(w.grad, null, 'non-leaf tensors keep no gradient');
    });
  });
});

// add's backward gives both inputs one gradient storage (shareStorage), as does a checkpoint its
// recomputed block: such a storage is only read. Each way two gradients can meet in accumulate()
// (either, both or neither shared) and a leaf's .grad (its own storage: later backward passes add
// into it in place) against float64 sums written out by hand.
t.test('shared gradient storages: add, accumulation, leaves, checkpoint', async (t) => {
  await leakChecked(t, 'shared gradients', (tt) => {
    tidy(() => {
      const x = tensor([1, -2, 3], [3], { requiresGrad: true });
      const g = tensor([0.5, 0.25, -1], [3]);
      add(x, x).backward(g);
      tt.same(Array.from(x.grad!.toFloat32Array()), [1, 0.5, -2], 'x + x: both contributions (both shared)');
      add(x, reshape(x, [3])).backward(g);
      tt.same(Array.from(x.grad!.toFloat32Array()), [2, 1, -4], 'x + reshape(x): added into .grad');
      // residual stream: h = x + x⊙w, out = h + h⊙v; d out/dx = (1 + v)(1 + w)
      const w = tensor([2, 3, -1], [3], { requiresGrad: true }), v = tensor([0.5, -1, 4], [3]);
      const x2 = tensor([1, 2, 3], [3], { requiresGrad: true });
      const h = add(x2, mul(x2, w));
      add(h, mul(h, v)).backward(g);
      const gd = [0.5, 0.25, -1], wd = [2, 3, -1], vd = [0.5, -1, 4], xd = [1, 2, 3];
      assertClose(tt, x2.grad!.toFloat32Array(), gd.map((q, i) => q * (1 + vd[i]!) * (1 + wd[i]!)), { atol: 1e-6, rtol: 1e-6 }, 'residual: dx');
      assertClose(tt, w.grad!.toFloat32Array(), gd.map((q, i) => q * (1 + vd[i]!) * xd[i]!), { atol: 1e-6, rtol: 1e-6 }, 'residual: dw');
      // x⊙z + (x + z): add's shared gradient reaches x first and z is still to come when x⊙z's
      // gradients arrive, so the sums must not be made in the shared storage (were they, x and z
      // would each read G + G⊙z + G⊙x)
      const xs = tensor([1, 2, 3], [3], { requiresGrad: true }), zs = tensor([-1, 4, 0.5], [3], { requiresGrad: true });
      add(mul(xs, zs), add(xs, zs)).backward(g);
      assertClose(tt, xs.grad!.toFloat32Array(), gd.map((q, i) => q * (1 + [-1, 4, 0.5][i]!)), { atol: 1e-6, rtol: 1e-6 }, 'x⊙z + (x + z): dx');
      assertClose(tt, zs.grad!.toFloat32Array(), gd.map((q, i) => q * (1 + xd[i]!)), { atol: 1e-6, rtol: 1e-6 }, 'x⊙z + (x + z): dz');
      // two leaves under one add: each .grad a storage of its own (a second backward adds into
      // both in place; were they one storage, each would read 4g, not 2g)
      const a = tensor([1, 2, 3], [3], { requiresGrad: true }), b = tensor([4, 5, 6], [3], { requiresGrad: true });
      add(a, b).backward(g);
      add(a, b).backward(g);
      tt.same(Array.from(a.grad!.toFloat32Array()), [1, 0.5, -2], 'a: 2g');
      tt.same(Array.from(b.grad!.toFloat32Array()), [1, 0.5, -2], 'b: 2g');
      tt.notOk(isShared(a.grad!) || isShared(b.grad!), 'no .grad is shared');
      // through a checkpoint: the block's gradient is handed in shared
      const c = tensor([1, 2, 3], [3], { requiresGrad: true }), u = tensor([3, -2, 0.5], [3], { requiresGrad: true });
      const out = checkpoint((p: Tensor, q: Tensor) => add(p, mul(p, q)), [c, u]);
      add(out, out).backward(g);
      assertClose(tt, c.grad!.toFloat32Array(), gd.map((q, i) => 2 * q * (1 + [3, -2, 0.5][i]!)), { atol: 1e-6, rtol: 1e-6 }, 'checkpoint: dc');
      assertClose(tt, u.grad!.toFloat32Array(), gd.map((q, i) => 2 * q * [1, 2, 3][i]!), { atol: 1e-6, rtol: 1e-6 }, 'checkpoint: du');
    });
    tidy(() => {
      // the storage lives until its last holder lets go, and dispose() is idempotent on a holder
      const a = tensor([1, 2], [2]);
      const b = shareStorage(a), c = shareStorage(b);
      tt.ok(isShared(a) && isShared(c), 'three holders');
      a.dispose();
      a.dispose();
      tt.same(Array.from(b.toFloat32Array()), [1, 2], 'b reads after a let go');
      b.dispose();
      tt.notOk(isShared(c), 'c alone');
      tt.same(Array.from(c.toFloat32Array()), [1, 2], 'c reads after a and b let go');
      const before = memory().cpuBytes;
      c.dispose();
      tt.ok(memory().cpuBytes < before, 'the last holder frees it');
    });
  });
});

t.test('errors leave no tensor behind; a 0-d tensor reduces over axis 0 or -1 as PyTorch does', async (t) => {
  // Each of these allocated before the check that failed, and left the tensor to the GC (found by
  // the hostile-argument test's per-call count).
  const live = () => memory().numTensors;
  const x = tensor([1, 2, 3, 4], [2, 2]);
  const v = tensor([1, 2, 3, 4], [4]);
  const ints = tensor([1, 0], [2], { dtype: 'int32' });
  const w = tensor([1, 2, 3], [3]);
  const row = tensor([1, 2, 3, 4], [1, 4]);
  const b2 = live();
  t.throws(() => matmul(w, x), { code: 'ERR_LORA_SHAPE' }, 'a 1-D a of the wrong length');
  t.throws(() => matmul(x, w), { code: 'ERR_LORA_SHAPE' }, 'a 1-D b of the wrong length');
  t.throws(() => matmul(v, row), { code: 'ERR_LORA_SHAPE' }, 'a 1-D a against a [1, 4] b');
  t.equal(live(), b2, 'a failed 1-D matmul frees its reshaped operand');
  t.throws(() => x.toDtype('int32'), { code: 'ERR_LORA_UNSUPPORTED', message: /float32 -> int32/ });
  t.throws(() => ints.toDtype('float32'), { code: 'ERR_LORA_UNSUPPORTED', message: /int32 -> float32/ });
  t.equal(live(), b2, 'a failed toDtype frees its output');
  const s = tensor([5], []);
  for (const axis of [0, -1, [0], [-1]] as const) {
    const r = sum(s, axis as number | number[]);
    t.same([r.shape, r.item()], [[], 5], `sum(scalar, ${JSON.stringify(axis)})`);
    r.dispose();
  }
  const m = max(s, 0, true);
  t.same([m.shape, m.item()], [[], 5], 'max(scalar, 0, keepDims)');
  m.dispose();
  t.throws(() => sum(s, 1), { code: 'ERR_LORA_RANGE' }, 'axis 1 of a 0-d tensor');
  t.equal(live(), b2 + 1, 'only the scalar itself is new');
  for (const u of [x, v, ints, w, row, s]) u.dispose();
});

// runBackward disposes the gradient it hands a backward function once that returns, so a reshape
// and an add (the residual stream) pass it on instead of copying it, and a model's q/k/v
// projections split into heads without a copy (reshapeFresh): the values and gradients as
// before, fewer live bytes at the backward's peak, nothing leaked.
t.test('backward passes a gradient on without copying it (reshape, add); takeStorage', async (t) => {
  await leakChecked(t, 'gradient hand-on', (tt) => {
    tidy(() => {
      const n = 1 << 18, bytes = 4 * n;  // 1 MiB a gradient
      const xd = f32(randomData(n, 41)), wd = f32(randomData(n, 42)), gd = f32(randomData(n, 43));
      const x = tensor(Float32Array.from(xd), [n], { requiresGrad: true });
      const w = tensor(Float32Array.from(wd), [512, 512], { requiresGrad: true });
      const y = add(reshape(x, [512, 512]), w);
      const g = tensor(Float32Array.from(gd), [512, 512]);
      const base = memory().cpuBytes;
      resetPeakMemory();
      y.backward(g);
      const peak = memory().cpuPeakBytes - base;
      // the seed's copy, and the copy the first of the two leaves to take add's shared gradient
      // makes for its .grad (the second keeps the storage)
      tt.ok(peak <= 2 * bytes + 4096, `backward's peak ${peak} bytes, at most two gradients (${2 * bytes})`);
      tt.same(Array.from(x.grad!.toFloat32Array()), Array.from(gd), 'x: the gradient through add and reshape');
      tt.same(Array.from(w.grad!.toFloat32Array()), Array.from(gd), 'w: the gradient through add');
      tt.same(x.grad!.shape, [n]);
      // only one side of the add records a gradient: that side takes it
      const v = tensor(Float32Array.from(xd), [512, 512], { requiresGrad: true });
      add(v, w.detach()).backward(g);
      tt.same(Array.from(v.grad!.toFloat32Array()), Array.from(gd), 'v alone');
    });
    tidy(() => {
      const a = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
      const b = takeStorage(a, [3, 2]);
      tt.same(b.toArray(), [[1, 2], [3, 4], [5, 6]], 'takeStorage: the values under the new shape');
      tt.ok(a.isDisposed, 'takeStorage leaves its input disposed');
      tt.same(a.shape, [2, 3], '... with its shape');
      tt.throws(() => takeStorage(b, [4]), { code: 'ERR_LORA_SHAPE' }, 'another element count');
      tt.throws(() => a.toFloat32Array(), { code: 'ERR_LORA_DISPOSED' }, 'the input reads as disposed');
      // reshapeFresh: the gradient of sum(reshape(x·2) ⊙ G) as through reshape()
      const p = tensor([1, 2, 3, 4, 5, 6], [2, 3], { requiresGrad: true });
      const G = tensor([1, -1, 2, -2, 3, -3], [1, 2, 3]);
      const fresh = reshapeFresh(mul(p, 2), [1, 2, 3]);
      tt.same(fresh.toArray(), [[[2, 4, 6], [8, 10, 12]]]);
      fresh.backward(G);
      tt.same(Array.from(p.grad!.toFloat32Array()), [2, -2, 4, -4, 6, -6], 'reshapeFresh: the gradient');
    });
  });
});
