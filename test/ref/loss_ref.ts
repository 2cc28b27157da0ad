// Float64 reference of linearCrossEntropy (a linear head then the cross-entropy, in one op) built
// from the cross-entropy reference of nn_ops_ref.ts and plain products, and its parity cases: the
// op through autograd on each device at awkward shapes, chunk sizes around the row count, every
// row ignored, a bias, trainable weights, bfloat16 and float16 weights, an incoming gradient
// other than 1, and its argument errors. Not a test file itself.
import { linearCrossEntropy, tensor, tidy, zeros } from '../../lib/index';
import type { Device, ParityCase, Tol } from '../parity/suite';
import { linear } from './causal_lm_ref';
import { bf16, f16, seeded } from './dtype_ref';
import { crossEntropyBackwardRef, crossEntropyRef, F64, finiteDiff } from './nn_ops_ref';

export interface HeadLossRef {
  loss: number;
  /** Gradients of g·loss. */
  dx: F64;
  dw: F64;
  db: F64;
}

/**
 * loss = crossEntropy(x·wᵀ + b, t) with its reduction; the gradients of g·loss:
 * dz from the cross-entropy reference, dx = dz·w, dw = dzᵀ·x, db = Σ_n dz.
 */
export function linearCrossEntropyRef(x: F64, w: F64, b: F64 | null, t: Int32Array, V: number, C: number, ignore: number, eps: number,
  reduction: 'mean' | 'sum', g = 1): HeadLossRef {
  const N = t.length;
  const z = linear(x, N, C, w, V, b ?? undefined); // x·wᵀ + b
  const loss = crossEntropyRef(z, t, V, ignore, eps, reduction)[0]!;
  const dz = crossEntropyBackwardRef(z, t, V, ignore, eps, reduction, Float64Array.of(g));
  const dx = new Float64Array(N * C), dw = new Float64Array(V * C), db = new Float64Array(V);
  for (let n = 0; n < N; n++)
    for (let v = 0; v < V; v++) {
      const d = dz[n * V + v]!;
      if (d === 0) continue;
      db[v] += d;
      for (let c = 0; c < C; c++) {
        dx[n * C + c] += d * w[v * C + c]!;
        dw[v * C + c] += d * x[n * C + c]!;
      }
    }
  return { loss, dx, dw, db };
}

/** The reference's gradients against central finite differences of its loss (x, w, b in turn). */
export function headLossFiniteDiff(x: F64, w: F64, b: F64, t: Int32Array, V: number, C: number, eps: number, g: number): { dx: F64; dw: F64; db: F64 } {
  const f = ([xi, wi, bi]: F64[]) => Float64Array.of(linearCrossEntropyRef(xi!, wi!, bi!, t, V, C, -100, eps, 'mean').loss);
  const G = Float64Array.of(g);
  return { dx: finiteDiff(f, [x, w, b], G, 0), dw: finiteDiff(f, [x, w, b], G, 1), db: finiteDiff(f, [x, w, b], G, 2) };
}

const TOL: Tol = { atol: 1e-6, rms: 1e-5, rtol: 1e-4 }; // fp32 products and sums in another order

interface Shape {
  B: number; T: number; C: number; V: number; chunkSize?: number; bias?: boolean; trainW?: boolean;
  dtype?: 'float32' | 'bfloat16' | 'float16'; eps?: number; reduction?: 'mean' | 'sum'; g?: number; ignoreAll?: boolean;
}

function opCase(s: Shape, seed: number): ParityCase {
  const { B, T, C, V } = s;
  const N = B * T;
  const dtype = s.dtype ?? 'float32';
  const tag = `[${B}, ${T}, ${C}] vocab ${V}${s.chunkSize ? ` chunk ${s.chunkSize}` : ''}${s.bias ? ' bias' : ''}${s.trainW ? ' trainable weight' : ''}` +
    `${dtype !== 'float32' ? ` ${dtype} weight` : ''}${s.eps ? ` smoothing ${s.eps}` : ''}${s.reduction === 'sum' ? ' sum' : ''}${s.g ? ` g ${s.g}` : ''}${s.ignoreAll ? ' every row ignored' : ''}`;
  return {
    name: `linearCrossEntropy ${tag}`,
    build: () => {
      const x = seeded(N * C, seed, 1.5);
      const raw = seeded(V * C, seed + 1, 2 / Math.sqrt(C));
      const w = dtype === 'bfloat16' ? bf16(raw) : dtype === 'float16' ? f16(raw) : raw;
      const b = s.bias ? seeded(V, seed + 2, 0.5) : null;
      // every 4th row ignored, like padding and prompts; all of them with ignoreAll
      const t = Int32Array.from({ length: N }, (_, i) => (s.ignoreAll || i % 4 === 1 ? -100 : (i * 7919 + 3) % V));
      const eps = s.eps ?? 0, reduction = s.reduction ?? 'mean', g = s.g ?? 1;
      const ref = linearCrossEntropyRef(x, w, b, t, V, C, -100, eps, reduction, g);
      const expect: Record<string, ArrayLike<number>> = { loss: [ref.loss], dx: ref.dx };
      if (s.trainW) expect.dw = ref.dw;
      if (b) expect.db = ref.db;
      return {
        inputs: {}, outputs: {}, calls: [], expect, tol: TOL,
        api: (device: Device) => tidy(() => {
          const xt = tensor(Float32Array.from(x), [B, T, C], { device, requiresGrad: true });
          const wt = tensor(Float32Array.from(raw), [V, C], { device, dtype, requiresGrad: !!s.trainW });
          const bt = b ? tensor(Float32Array.from(b), [V], { device, requiresGrad: true }) : null;
          const tt = tensor(Array.from(t), [B, T], { device, dtype: 'int32' });
          const opts: Record<string, unknown> = { bias: bt };
          if (s.chunkSize) opts.chunkSize = s.chunkSize;
          if (s.eps) opts.labelSmoothing = s.eps;
          if (s.reduction) opts.reduction = s.reduction;
          const loss = linearCrossEntropy(xt, wt, tt, opts);
          (s.g ? loss.mul(s.g) : loss).backward();
          const out: Record<string, ArrayLike<number>> = { loss: loss.toFloat32Array(), dx: xt.grad!.toFloat32Array() };
          if (s.trainW) out.dw = wt.grad!.toFloat32Array();
          if (bt) out.db = bt.grad!.toFloat32Array();
          for (const p of [xt, wt, bt]) p?.grad?.dispose();
          return out;
        }),
      };
    },
  };
}

function lossCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  let seed = 900;
  const shapes: Shape[] = [
    { B: 1, T: 1, C: 1, V: 2 },
    // 14 rows, 10 counted: chunks of 1, 3 (not a divisor), 10 (exactly one), 11 (more than there are)
    ...[1, 3, 10, 11].map((chunkSize) => ({ B: 2, T: 7, C: 5, V: 11, chunkSize })),
    { B: 2, T: 7, C: 5, V: 11, chunkSize: 4, bias: true, trainW: true },
    { B: 3, T: 13, C: 24, V: 1000, eps: 0.1, g: 2.5 },
    { B: 2, T: 9, C: 16, V: 517, chunkSize: 5, reduction: 'sum', bias: true },
    { B: 2, T: 9, C: 16, V: 517, chunkSize: 5, dtype: 'bfloat16' },
    { B: 2, T: 9, C: 16, V: 517, chunkSize: 7, dtype: 'float16' },
    { B: 1, T: 5, C: 8, V: 3001 },
    { B: 2, T: 3, C: 5, V: 11, chunkSize: 2, ignoreAll: true, reduction: 'sum', trainW: true },
  ];
  for (const s of shapes) cases.push(opCase(s, seed++ * 3));
  cases.push({
    name: 'linearCrossEntropy every row ignored: NaN mean, zero gradients', build: () => ({
      inputs: {}, outputs: {}, calls: [], expect: { lossIsNaN: [1], dx: new Float64Array(12) }, tol: TOL,
      api: (device) => tidy(() => {
        const x = tensor(Float32Array.from(seeded(12, 5)), [2, 2, 3], { device, requiresGrad: true });
        const loss = linearCrossEntropy(x, tensor(Float32Array.from(seeded(15, 6)), [5, 3], { device }), tensor([-100, -100, -100, -100], [2, 2], { device, dtype: 'int32' }));
        loss.backward();
        const out = { lossIsNaN: [Number.isNaN(loss.item()) ? 1 : 0], dx: x.grad!.toFloat32Array() };
        x.grad!.dispose();
        return out;
      }),
    }),
  });
  cases.push({
    name: 'linearCrossEntropy reference: its gradients against central finite differences', build: () => {
      const [N, C, V] = [5, 4, 7];
      const x = seeded(N * C, 31), w = seeded(V * C, 32), b = seeded(V, 33);
      const t = Int32Array.from([3, -100, 0, 6, 2]);
      const fd = headLossFiniteDiff(x, w, b, t, V, C, 0.1, 1.7);
      const ref = linearCrossEntropyRef(x, w, b, t, V, C, -100, 0.1, 'mean', 1.7);
      return { inputs: {}, outputs: {}, calls: [], api: () => fd, expect: { dx: ref.dx, dw: ref.dw, db: ref.db }, tol: { atol: 1e-8, rtol: 1e-6 } };
    },
  });
  const refuses = (what: string, code: string, message: RegExp, call: (device: Device) => void): ParityCase => ({
    name: `linearCrossEntropy() refuses ${what}`,
    build: () => ({ inputs: {}, outputs: {}, calls: [], expect: {}, tol: TOL, throws: { code, message }, api: (device) => { tidy(() => call(device)); return {}; } }),
  });
  const args = (d: Device) => ({ x: zeros([2, 3, 4], { device: d }), w: zeros([6, 4], { device: d }), t: zeros([2, 3], { device: d, dtype: 'int32' }) });
  cases.push(
    refuses('float32 targets', 'ERR_LORA_DTYPE', /^Expected int32 targets for linearCrossEntropy\(\) but received float32/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, zeros([2, 3], { device: d })); }),
    refuses('targets of another shape', 'ERR_LORA_SHAPE', /^Expected targets of shape \[2, 3\] for x of shape \[2, 3, 4\] but received \[6\]$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, zeros([6], { device: d, dtype: 'int32' })); }),
    refuses('x of another width', 'ERR_LORA_SHAPE', /^Expected x of shape \[\.\.\., 4\] for linearCrossEntropy\(\) but received \[2, 3, 5\]$/,
      (d) => { const a = args(d); linearCrossEntropy(zeros([2, 3, 5], { device: d }), a.w, a.t); }),
    refuses('a 1-D weight', 'ERR_LORA_SHAPE', /^Expected a 2-D weight \(vocab, inFeatures\) for linearCrossEntropy\(\) but received \[24\]$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, zeros([24], { device: d }), a.t); }),
    refuses('a bias of another size', 'ERR_LORA_SHAPE', /^Expected bias of shape \[6\] for linearCrossEntropy\(\) but received \[4\]$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, a.t, { bias: zeros([4], { device: d }) }); }),
    refuses('an int32 weight', 'ERR_LORA_DTYPE', /^Expected a float32, bfloat16 or float16 weight for linearCrossEntropy\(\) but received int32$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, zeros([6, 4], { device: d, dtype: 'int32' }), a.t); }),
    refuses('bfloat16 x', 'ERR_LORA_DTYPE', /^Expected float32 tensors for linearCrossEntropy\(\) but received bfloat16/,
      (d) => { const a = args(d); linearCrossEntropy(a.x.toDtype('bfloat16'), a.w, a.t); }),
    refuses('a target out of range', 'ERR_LORA_RANGE', /^Expected class indices between 0 and 5 \(or ignoreIndex -100\) for targets but received 6 \(number\)$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, tensor([0, 1, -100, 6, 2, 3], [2, 3], { device: d, dtype: 'int32' })); }),
    refuses("reduction 'none'", 'ERR_LORA_RANGE', /^Expected one of .*'mean'.*'sum'.* for reduction but received "none"/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, a.t, { reduction: 'none' as never }); }),
    refuses('a chunkSize of 0', 'ERR_LORA_RANGE', /^Expected an integer between 1 and 2147483647 for chunkSize but received 0 \(number\)$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, a.t, { chunkSize: 0 }); }),
    refuses('a misspelt option', 'ERR_LORA_OPTION', /^Unknown option 'chunksize' for linearCrossEntropy\(\); did you mean 'chunkSize'\?$/,
      (d) => { const a = args(d); linearCrossEntropy(a.x, a.w, a.t, { chunksize: 4 } as never); }),
  );
  return cases;
}

/** The parity cases of linearCrossEntropy (the op on each device against the float64 reference). */
export const parityCases: ParityCase[] = lossCases();
