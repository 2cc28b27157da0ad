// lib/ops/ (nn.ts, loss.ts) against the float64 references in test/ref/nn_ops_ref.ts, in two hops: each
// reference backward against central finite differences, then each op (forward and backward)
// against the reference on seeded, deliberately awkward shapes. Plus the error paths.
import t from 'tap';
import {
  concat, crossEntropy, dropout, embedding, gelu, layerNorm, logSoftmax, memory, mse, rmsNorm, slice,
  noGrad, softmax, tensor, Tensor, LoraError, features,
} from '../lib/index';
import { bf16, f16 } from './ref/dtype_ref';
import * as R from './ref/nn_ops_ref';

type F64 = Float64Array;

/** Runs op on float32 copies of inputs, back-propagates G, returns y and every input's gradient. */
function run(op: (...xs: Tensor[]) => Tensor, inputs: [F64, number[]][], G: F64 | null, device: 'cpu' | 'cuda' = 'cpu'): { y: F64; grads: F64[] } {
  const xs = inputs.map(([d, s]) => tensor(Float32Array.from(d), s, { requiresGrad: true, device }));
  const y = op(...xs);
  const out = { y: Float64Array.from(y.toFloat32Array()), grads: [] as F64[] };
  if (G) {
    const g = tensor(Float32Array.from(G), y.shape, { device });
    y.backward(g);
    g.dispose();
    out.grads = xs.map((x) => (x.grad ? Float64Array.from(x.grad.toFloat32Array()) : new Float64Array(x.size)));
  }
  y.dispose();
  for (const x of xs) x.dispose();
  return out;
}

function close(tt: { ok(c: boolean, m: string): unknown }, a: ArrayLike<number>, r: ArrayLike<number>, what: string, atol = 1e-5, rtol = 1e-4): void {
  const m = R.compare(a, r, atol, rtol);
  tt.ok(m.ok, `${what}: ${m.message}`);
}

const before = memory().numTensors;

t.test('softmax and logSoftmax', (tt) => {
  const rows = 7, cols = 13;
  const x = R.f32(R.randArray(rows * cols, 1, 3));
  const G = R.randArray(rows * cols, 2);
  for (const log of [false, true]) {
    const fd = R.finiteDiff(([a]) => R.softmaxRef(a!, rows, cols, log), [x.slice()], G, 0);
    close(tt, R.softmaxBackwardRef(x, G, rows, cols, log), fd, `ref backward vs finite differences (log=${log})`, 1e-7, 1e-6);
    const r = run((a) => (log ? logSoftmax(a) : softmax(a)), [[x, [rows, cols]]], G);
    close(tt, r.y, R.softmaxRef(x, rows, cols, log), `forward (log=${log})`);
    close(tt, r.grads[0]!, R.softmaxBackwardRef(x, G, rows, cols, log), `backward (log=${log})`);
  }
  // a non-last axis: softmax over axis 0 of [5, 3] equals the last-axis softmax of the transpose
  const x2 = R.f32(R.randArray(15, 3));
  const xt = new Float64Array(15);
  for (let i = 0; i < 5; i++) for (let j = 0; j < 3; j++) xt[j * 5 + i] = x2[i * 3 + j]!;
  const yt = R.softmaxRef(xt, 3, 5, false);
  const want = new Float64Array(15);
  for (let i = 0; i < 5; i++) for (let j = 0; j < 3; j++) want[i * 3 + j] = yt[j * 5 + i]!;
  close(tt, run((a) => softmax(a, 0), [[x2, [5, 3]]], null).y, want, 'softmax over axis 0');
  tt.end();
});

t.test('gelu (exact and tanh)', (tt) => {
  const x = R.f32(R.randArray(37, 4, 2));
  const G = R.randArray(37, 5);
  for (const approx of [false, true]) {
    const fd = R.finiteDiff(([a]) => R.geluRef(a!, approx), [x.slice()], G, 0);
    close(tt, R.geluBackwardRef(x, G, approx), fd, `ref backward vs finite differences (tanh=${approx})`, 1e-7, 1e-6);
    const r = run((a) => gelu(a, { approximate: approx ? 'tanh' : 'none' }), [[x, [37]]], G);
    close(tt, r.y, R.geluRef(x, approx), `forward (tanh=${approx})`);
    close(tt, r.grads[0]!, R.geluBackwardRef(x, G, approx), `backward (tanh=${approx})`);
  }
  tt.end();
});

t.test('crossEntropy: ignoreIndex, labelSmoothing, reductions', (tt) => {
  const N = 9, V = 11;
  const z = R.f32(R.randArray(N * V, 6, 2));
  const targets = Int32Array.from([3, -100, 0, 10, 7, 7, -100, 1, 5]);
  for (const [eps, reduction] of [[0, 'mean'], [0.1, 'mean'], [0.25, 'sum'], [0.1, 'none']] as const) {
    const G = reduction === 'none' ? R.randArray(N, 7) : Float64Array.of(1.7);
    const fd = R.finiteDiff(([a]) => R.crossEntropyRef(a!, targets, V, -100, eps, reduction), [z.slice()], G, 0);
    const rb = R.crossEntropyBackwardRef(z, targets, V, -100, eps, reduction, G);
    close(tt, rb, fd, `ref backward vs finite differences (ε=${eps}, ${reduction})`, 1e-7, 1e-6);
    const tg = tensor(Float32Array.from(targets), [N], { dtype: 'int32' });
    const r = run((a) => crossEntropy(a, tg, { labelSmoothing: eps, reduction }), [[z, [N, V]]], G);
    tg.dispose();
    close(tt, r.y, R.crossEntropyRef(z, targets, V, -100, eps, reduction), `forward (ε=${eps}, ${reduction})`);
    close(tt, r.grads[0]!, rb, `backward (ε=${eps}, ${reduction})`);
  }
  // 3-D logits with a custom ignore index
  const z3 = R.f32(R.randArray(2 * 3 * 4, 8));
  const t3 = Int32Array.from([1, 2, 0, 3, 9, 1]);
  const tg3 = tensor(Float32Array.from(t3), [2, 3], { dtype: 'int32' });
  const r3 = run((a) => crossEntropy(a, tg3, { ignoreIndex: 9 }), [[z3, [2, 3, 4]]], null);
  close(tt, r3.y, R.crossEntropyRef(z3, t3, 4, 9, 0, 'mean'), 'forward, 3-D logits, ignoreIndex 9');
  // errors
  const logits = tensor(new Float32Array(6), [2, 3]);
  const badT = [tensor([0, 3], [2], { dtype: 'int32' }), tensor([0, 1], [2]), tensor([0, 1, 2], [3], { dtype: 'int32' })];
  tt.throws(() => crossEntropy(logits, badT[0]!), { code: 'ERR_LORA_RANGE', message: 'Expected every target (or ignoreIndex) between 0 and 2 for cross_entropy' });
  tt.throws(() => crossEntropy(logits, badT[1]!), { code: 'ERR_LORA_DTYPE', message: /Expected int32 targets for crossEntropy\(\) but received float32/ });
  tt.throws(() => crossEntropy(logits, badT[2]!), { code: 'ERR_LORA_SHAPE', message: 'Expected targets of shape [2] for logits of shape [2, 3] but received [3]' });
  for (const b of badT) b.dispose();
  const tg2 = tensor([0, 1], [2], { dtype: 'int32' });
  tt.throws(() => crossEntropy(logits, tg2, { labelSmoothing: 2 }), { code: 'ERR_LORA_RANGE', message: 'Expected a number between 0 and 1 for labelSmoothing but received 2 (number)' });
  tt.throws(() => crossEntropy(logits, tg2, { ignoreIdx: 1 } as never), { code: 'ERR_LORA_OPTION', message: /did you mean 'ignoreIndex'/ });
  tg2.dispose();
  tg3.dispose();
  logits.dispose();
  tt.end();
});

t.test('mse', (tt) => {
  const a = R.f32(R.randArray(23, 9)), b = R.f32(R.randArray(23, 10));
  const G = Float64Array.of(0.7);
  const fd = R.finiteDiff(([x, y]) => R.mseRef(x!, y!), [a.slice(), b.slice()], G, 0);
  const want = a.map((v, i) => (2 * (v - b[i]!) * 0.7) / 23);
  close(tt, want, fd, 'analytic backward vs finite differences', 1e-7, 1e-6);
  const r = run((x, y) => mse(x!, y!), [[a, [23]], [b, [23]]], G);
  close(tt, r.y, R.mseRef(a, b), 'forward');
  close(tt, r.grads[0]!, want, 'backward (input)');
  close(tt, r.grads[1]!, want.map((v) => -v), 'backward (target)');
  tt.end();
});

t.test('layerNorm and rmsNorm', (tt) => {
  const N = 6, C = 19, eps = 1e-5;
  const x = R.f32(R.randArray(N * C, 11, 2).map((v, i) => v + (i % 3)));
  const w = R.f32(R.randArray(C, 12)), b = R.f32(R.randArray(C, 13));
  const G = R.randArray(N * C, 14);
  const lnRef = (xs: F64[]) => R.layerNormRef(xs[0]!, xs[1]!, xs[2]!, N, C, eps);
  const lb = R.layerNormBackwardRef(x, w, N, C, eps, G);
  close(tt, lb.dx, R.finiteDiff(lnRef, [x.slice(), w.slice(), b.slice()], G, 0), 'layerNorm ref dx vs finite differences', 1e-7, 1e-5);
  close(tt, lb.dw, R.finiteDiff(lnRef, [x.slice(), w.slice(), b.slice()], G, 1), 'layerNorm ref dw vs finite differences', 1e-7, 1e-5);
  close(tt, lb.db, R.finiteDiff(lnRef, [x.slice(), w.slice(), b.slice()], G, 2), 'layerNorm ref db vs finite differences', 1e-7, 1e-5);
  const r = run((a, ww, bb) => layerNorm(a!, ww!, bb!, eps), [[x, [2, 3, C]], [w, [C]], [b, [C]]], G);
  close(tt, r.y, R.layerNormRef(x, w, b, N, C, eps), 'layerNorm forward');
  close(tt, r.grads[0]!, lb.dx, 'layerNorm dx');
  close(tt, r.grads[1]!, lb.dw, 'layerNorm dw');
  close(tt, r.grads[2]!, lb.db, 'layerNorm db');
  const r0 = run((a) => layerNorm(a!, null, null, eps), [[x, [N, C]]], G);
  close(tt, r0.grads[0]!, R.layerNormBackwardRef(x, null, N, C, eps, G).dx, 'layerNorm without affine, dx');

  const rmRef = (xs: F64[]) => R.rmsNormRef(xs[0]!, xs[1]!, N, C, 1e-6);
  const rb = R.rmsNormBackwardRef(x, w, N, C, 1e-6, G);
  close(tt, rb.dx, R.finiteDiff(rmRef, [x.slice(), w.slice()], G, 0), 'rmsNorm ref dx vs finite differences', 1e-7, 1e-5);
  close(tt, rb.dw, R.finiteDiff(rmRef, [x.slice(), w.slice()], G, 1), 'rmsNorm ref dw vs finite differences', 1e-7, 1e-5);
  const r2 = run((a, ww) => rmsNorm(a!, ww!, 1e-6), [[x, [N, C]], [w, [C]]], G);
  close(tt, r2.y, R.rmsNormRef(x, w, N, C, 1e-6), 'rmsNorm forward');
  close(tt, r2.grads[0]!, rb.dx, 'rmsNorm dx');
  close(tt, r2.grads[1]!, rb.dw, 'rmsNorm dw');
  const xt = tensor(new Float32Array(6), [2, 3]);
  const bad = tensor(new Float32Array(2), [2]);
  tt.throws(() => layerNorm(xt, bad), { code: 'ERR_LORA_SHAPE', message: 'Expected weight of shape [3] for layerNorm() but received [2]' });
  xt.dispose();
  bad.dispose();
  tt.end();
});

t.test('embedding', (tt) => {
  const V = 7, C = 5;
  const table = R.f32(R.randArray(V * C, 15));
  const ids = Int32Array.from([6, 0, 3, 3, 1, 6, 6, 2]);
  const G = R.randArray(ids.length * C, 16);
  const fd = R.finiteDiff(([tb]) => R.embeddingRef(tb!, ids, C), [table.slice()], G, 0);
  close(tt, R.embeddingBackwardRef(ids, V, C, G), fd, 'ref backward vs finite differences', 1e-7, 1e-6);
  const idt = tensor(Float32Array.from(ids), [2, 4], { dtype: 'int32' });
  const r = run((tb) => embedding(idt, tb!), [[table, [V, C]]], G);
  close(tt, r.y, R.embeddingRef(table, ids, C), 'forward');
  close(tt, r.grads[0]!, R.embeddingBackwardRef(ids, V, C, G), 'backward (repeated ids add up)');
  idt.dispose();
  const tb = tensor(Float32Array.from(table), [V, C]);
  const badIds = tensor([0, 7], [2], { dtype: 'int32' });
  tt.throws(() => embedding(badIds, tb), { code: 'ERR_LORA_RANGE', message: 'Expected every id between 0 and 6 for embedding' });
  tt.throws(() => embedding(tb, tb), { code: 'ERR_LORA_DTYPE', message: /Expected int32 ids for embedding\(\) but received float32/ });
  badIds.dispose();
  tb.dispose();
  tt.end();
});

t.test('embedding reads a bfloat16 or float16 table as stored', (tt) => {
  const V = 37, C = 19; // awkward: neither a multiple of a vector
  const table = R.randArray(V * C, 17, 3);
  const ids = Int32Array.from({ length: 23 }, (_, i) => (i * 11) % V);
  const idt = tensor(Float32Array.from(ids), [23], { dtype: 'int32' });
  for (const [dtype, round] of [['bfloat16', bf16], ['float16', f16]] as const) {
    const tb = tensor(Float32Array.from(table), [V, C], { dtype });
    const y = embedding(idt, tb);
    tt.equal(y.dtype, 'float32', `${dtype}: float32 out`);
    tt.same(y.shape, [23, C]);
    close(tt, y.toFloat32Array(), R.embeddingRef(round(table), ids, C), `${dtype}: the rows of the rounded table`, 0, 0);
    // frozen: usable while gradients are recorded, and no gradient flows to it
    tt.equal(y.requiresGrad, false, `${dtype}: a frozen table gives an output without a gradient`);
    y.dispose();
    // a 16-bit table that asks for a gradient: no kernel accumulates into one
    tb.requiresGrad = true;
    tt.throws(() => embedding(idt, tb), {
      code: 'ERR_LORA_DTYPE', message: `Expected a float32 table for embedding() with a gradient but received a ${dtype} table that requires one (train a float32 copy: table.toDtype('float32'))`,
    });
    noGrad(() => embedding(idt, tb).dispose()); // nothing recorded: fine
    tb.dispose();
  }
  const ti = tensor([1, 2, 3, 4], [2, 2], { dtype: 'int32' });
  tt.throws(() => embedding(idt, ti), { code: 'ERR_LORA_DTYPE', message: 'Expected a float32, bfloat16 or float16 table for embedding() but received int32' });
  ti.dispose();
  idt.dispose();
  tt.end();
});

t.test('dropout', (tt) => {
  const n = 1000, p = 0.3, seed = 12345;
  const x = R.f32(R.randArray(n, 17));
  const G = R.randArray(n, 18);
  const r = run((a) => dropout(a!, p, { seed }), [[x, [10, 100]]], G);
  close(tt, r.y, R.dropoutRef(x, p, seed), 'forward matches the counter RNG mask');
  close(tt, r.grads[0]!, R.dropoutRef(G, p, seed), 'backward applies the same mask');
  const kept = r.y.filter((v) => v !== 0).length / n;
  tt.ok(Math.abs(kept - (1 - p)) < 0.06, `keeps about 1-p of the elements (${kept})`);
  const ev = run((a) => dropout(a!, p, { training: false }), [[x, [n]]], null);
  close(tt, ev.y, x, 'identity when not training', 1e-12, 0);
  const xt = tensor([1], [1]);
  tt.throws(() => dropout(xt, 1), { code: 'ERR_LORA_RANGE', message: 'Expected a number in [0, 1) for p but received 1 (number)' });
  xt.dispose();
  tt.end();
});

t.test('slice and concat', (tt) => {
  const x = R.f32(R.randArray(3 * 7 * 4, 23));
  const G = R.randArray(3 * 3 * 4, 24);
  const fd = R.finiteDiff(([a]) => R.sliceRef(a!, 3, 7, 4, 2, 5), [x.slice()], G, 0);
  const r = run((a) => slice(a!, 1, 2, -2), [[x, [3, 7, 4]]], G);
  close(tt, r.y, R.sliceRef(x, 3, 7, 4, 2, 5), 'slice forward (negative end)');
  close(tt, r.grads[0]!, fd, 'slice backward vs finite differences of the reference', 1e-7, 1e-6);
  const a = R.f32(R.randArray(2 * 1 * 3, 25)), b = R.f32(R.randArray(2 * 4 * 3, 26));
  const Gc = R.randArray(2 * 5 * 3, 27);
  const fa = R.finiteDiff(([p, q]) => R.concatRef([p!, q!], 2, [1, 4], 3), [a.slice(), b.slice()], Gc, 0);
  const fb = R.finiteDiff(([p, q]) => R.concatRef([p!, q!], 2, [1, 4], 3), [a.slice(), b.slice()], Gc, 1);
  const rc = run((p, q) => concat([p!, q!], 1), [[a, [2, 1, 3]], [b, [2, 4, 3]]], Gc);
  close(tt, rc.y, R.concatRef([a, b], 2, [1, 4], 3), 'concat forward');
  close(tt, rc.grads[0]!, fa, 'concat backward (first)', 1e-7, 1e-6);
  close(tt, rc.grads[1]!, fb, 'concat backward (second)', 1e-7, 1e-6);
  const p = tensor(new Float32Array(6), [2, 3]);
  const q = tensor(new Float32Array(4), [2, 2]);
  tt.throws(() => concat([p, q], 0), { code: 'ERR_LORA_SHAPE', message: 'Expected tensors that differ only in axis 0 for concat() but received [2, 3] and [2, 2]' });
  tt.throws(() => slice(p, 2, 0), { code: 'ERR_LORA_RANGE', message: 'Expected an integer between -2 and 1 for axis but received 2 (number)' });
  const joined = concat([p, q], 1);
  tt.same(joined.shape, [2, 5]);
  tt.ok(joined instanceof Tensor);
  joined.dispose();
  p.dispose();
  q.dispose();
  tt.end();
});

t.test('every error is a LoraError', (tt) => {
  const x = tensor([1, 2], [2]);
  try {
    gelu(x, { approximate: 'fast' as never });
    tt.fail('expected a throw');
  } catch (e) {
    tt.ok(e instanceof LoraError);
    tt.equal((e as LoraError).code, 'ERR_LORA_RANGE');
    tt.equal((e as Error).message, "Expected one of 'none', 'tanh' for approximate but received \"fast\" (string)");
  }
  x.dispose();
  tt.end();
});

// rmsNorm's backward as LoRA training runs it (a frozen weight: dx only, no dw reduction), with
// Gemma's (1 + w) and without a weight, at a size whose rows the threads split (N·C past the
// kernel's row grain) and a C that is no multiple of the vector lanes.
t.test('rmsNorm backward: frozen weight, weightOffset, no weight; rows across threads', (tt) => {
  const N = 150, C = 203, eps = 1e-6;
  const x = R.f32(R.randArray(N * C, 41, 2)), w = R.f32(R.randArray(C, 42)), G = R.randArray(N * C, 43);
  for (const offset of [0, 1]) {
    const xt = tensor(Float32Array.from(x), [3, 50, C], { requiresGrad: true });
    const wt = tensor(Float32Array.from(w), [C]);
    const y = rmsNorm(xt, wt, eps, { weightOffset: offset });
    close(tt, y.toFloat32Array(), R.rmsNormRef(x, w, N, C, eps, offset), `forward, offset ${offset}`);
    const g = tensor(Float32Array.from(G), y.shape);
    y.backward(g);
    const ref = R.rmsNormBackwardRef(x, w, N, C, eps, G, offset);
    close(tt, xt.grad!.toFloat32Array(), ref.dx, `dx, frozen weight, offset ${offset}`);
    tt.equal(wt.grad, null, 'a frozen weight gets no gradient');
    const wr = tensor(Float32Array.from(w), [C], { requiresGrad: true });
    const y2 = rmsNorm(xt, wr, eps, { weightOffset: offset });
    y2.backward(g);
    close(tt, wr.grad!.toFloat32Array(), ref.dw, `dw, offset ${offset}`, 1e-4, 1e-4);
    for (const q of [xt, wt, y, g, wr, y2]) q.dispose();
  }
  const r = run((a) => rmsNorm(a!, null, eps), [[x, [N, C]]], G);
  close(tt, r.y, R.rmsNormRef(x, null, N, C, eps), 'forward, no weight');
  close(tt, r.grads[0]!, R.rmsNormBackwardRef(x, null, N, C, eps, G).dx, 'dx, no weight');
  tt.end();
});

// layerNorm's backward the same way (GPT-2's norms, frozen under LoRA: dx only).
t.test('layerNorm backward: frozen affine, no affine; rows across threads', (tt) => {
  const N = 150, C = 203, eps = 1e-5;
  const x = R.f32(R.randArray(N * C, 51, 2).map((v, i) => v + (i % 5))), w = R.f32(R.randArray(C, 52)), b = R.f32(R.randArray(C, 53));
  const G = R.randArray(N * C, 54);
  const ref = R.layerNormBackwardRef(x, w, N, C, eps, G);
  const xt = tensor(Float32Array.from(x), [3, 50, C], { requiresGrad: true });
  const wt = tensor(Float32Array.from(w), [C]), bt = tensor(Float32Array.from(b), [C]);
  const y = layerNorm(xt, wt, bt, eps);
  close(tt, y.toFloat32Array(), R.layerNormRef(x, w, b, N, C, eps), 'forward');
  const g = tensor(Float32Array.from(G), y.shape);
  y.backward(g);
  close(tt, xt.grad!.toFloat32Array(), ref.dx, 'dx, frozen affine');
  tt.ok(wt.grad === null && bt.grad === null, 'a frozen affine gets no gradient');
  const wr = tensor(Float32Array.from(w), [C], { requiresGrad: true }), br = tensor(Float32Array.from(b), [C], { requiresGrad: true });
  const y2 = layerNorm(xt, wr, br, eps);
  y2.backward(g);
  close(tt, wr.grad!.toFloat32Array(), ref.dw, 'dw', 1e-4, 1e-4);
  close(tt, br.grad!.toFloat32Array(), ref.db, 'db', 1e-4, 1e-4);
  for (const q of [xt, wt, bt, y, g, wr, br, y2]) q.dispose();
  const r = run((a) => layerNorm(a!, null, null, eps), [[x, [N, C]]], G);
  close(tt, r.grads[0]!, R.layerNormBackwardRef(x, null, N, C, eps, G).dx, 'dx, no affine');
  tt.end();
});

// The same references on the CUDA backend (its kernels live in cuda/nn.cu); skipped without a GPU.
const cuda = features().cuda;
t.test('CUDA backend against the same references', { skip: cuda ? false : `no CUDA here (${features().reason ?? 'unavailable'})` }, (tt) => {
  const N = 6, C = 19, V = 11;
  const x = R.f32(R.randArray(N * C, 31, 2));
  const w = R.f32(R.randArray(C, 32)), b = R.f32(R.randArray(C, 33));
  const G = R.randArray(N * C, 34);
  const ln = run((a, ww, bb) => layerNorm(a!, ww!, bb!), [[x, [N, C]], [w, [C]], [b, [C]]], G, 'cuda');
  const lb = R.layerNormBackwardRef(x, w, N, C, 1e-5, G);
  close(tt, ln.y, R.layerNormRef(x, w, b, N, C, 1e-5), 'layerNorm forward');
  close(tt, ln.grads[0]!, lb.dx, 'layerNorm dx');
  close(tt, ln.grads[1]!, lb.dw, 'layerNorm dw');
  const rm = run((a, ww) => rmsNorm(a!, ww!), [[x, [N, C]], [w, [C]]], G, 'cuda');
  close(tt, rm.y, R.rmsNormRef(x, w, N, C, 1e-6), 'rmsNorm forward');
  close(tt, rm.grads[0]!, R.rmsNormBackwardRef(x, w, N, C, 1e-6, G).dx, 'rmsNorm dx');
  const z = R.f32(R.randArray(N * V, 35, 2));
  const targets = Int32Array.from([3, -100, 0, 10, 7, 7]);
  const tg = tensor(Float32Array.from(targets), [N], { dtype: 'int32', device: 'cuda' });
  const ce = run((a) => crossEntropy(a!, tg, { labelSmoothing: 0.1 }), [[z, [N, V]]], Float64Array.of(1.3), 'cuda');
  tg.dispose();
  close(tt, ce.y, R.crossEntropyRef(z, targets, V, -100, 0.1, 'mean'), 'crossEntropy forward');
  close(tt, ce.grads[0]!, R.crossEntropyBackwardRef(z, targets, V, -100, 0.1, 'mean', Float64Array.of(1.3)), 'crossEntropy backward');
  const table = R.f32(R.randArray(7 * 5, 36));
  const ids = Int32Array.from([6, 0, 3, 3, 1, 6]);
  const idt = tensor(Float32Array.from(ids), [6], { dtype: 'int32', device: 'cuda' });
  const Ge = R.randArray(6 * 5, 37);
  const em = run((tb) => embedding(idt, tb!), [[table, [7, 5]]], Ge, 'cuda');
  idt.dispose();
  close(tt, em.y, R.embeddingRef(table, ids, 5), 'embedding forward');
  close(tt, em.grads[0]!, R.embeddingBackwardRef(ids, 7, 5, Ge), 'embedding backward');
  for (const [dtype, round] of [['bfloat16', bf16], ['float16', f16]] as const) {
    const tb = tensor(Float32Array.from(table), [7, 5], { dtype, device: 'cuda' });
    const ic = tensor(Float32Array.from(ids), [6], { dtype: 'int32', device: 'cuda' });
    const y = embedding(ic, tb);
    close(tt, y.toFloat32Array(), R.embeddingRef(round(table), ids, 5), `embedding forward, ${dtype} table`, 0, 0);
    for (const x of [y, ic, tb]) x.dispose();
  }
  const sm = run((a) => logSoftmax(a!), [[z, [N, V]]], null, 'cuda');
  close(tt, sm.y, R.softmaxRef(z, N, V, true), 'logSoftmax forward');
  const dr = run((a) => dropout(a!, 0.3, { seed: 77 }), [[x, [N, C]]], null, 'cuda');
  close(tt, dr.y, R.dropoutRef(x, 0.3, 77), 'dropout: the same counter-RNG mask as the CPU');
  tt.end();
});

t.test('no tensor outlives the tests', (tt) => {
  tt.equal(memory().numTensors, before);
  tt.end();
});
