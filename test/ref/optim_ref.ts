// Float64 references for the optimizers, from PyTorch's documented update rules.
import type { Call, ParityCase, Tol } from '../parity/suite';
import { seeded } from './dtype_ref';

/** torch.optim.AdamW, one parameter tensor, `steps` steps with the given gradient function. */
export function adamwRef(p0: Float64Array, grad: (p: Float64Array, step: number) => Float64Array, steps: number,
  o: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number }): Float64Array {
  const p = Float64Array.from(p0);
  const m = new Float64Array(p.length);
  const v = new Float64Array(p.length);
  for (let t = 1; t <= steps; t++) {
    const g = grad(p, t);
    const bc1 = 1 - o.beta1 ** t;
    const bc2 = 1 - o.beta2 ** t;
    for (let i = 0; i < p.length; i++) {
      p[i] *= 1 - o.lr * o.weightDecay;
      m[i] = o.beta1 * m[i]! + (1 - o.beta1) * g[i]!;
      v[i] = o.beta2 * v[i]! + (1 - o.beta2) * g[i]! * g[i]!;
      p[i] -= (o.lr * (m[i]! / bc1)) / (Math.sqrt(v[i]! / bc2) + o.eps);
    }
  }
  return p;
}

/** torch.optim.SGD with momentum, dampening, weight decay and Nesterov. */
export function sgdRef(p0: Float64Array, grad: (p: Float64Array, step: number) => Float64Array, steps: number,
  o: { lr: number; momentum: number; dampening: number; weightDecay: number; nesterov: boolean }): Float64Array {
  const p = Float64Array.from(p0);
  const buf = new Float64Array(p.length);
  for (let t = 1; t <= steps; t++) {
    const g = grad(p, t);
    for (let i = 0; i < p.length; i++) {
      let d = g[i]! + o.weightDecay * p[i]!;
      if (o.momentum !== 0) {
        buf[i] = t === 1 ? d : o.momentum * buf[i]! + (1 - o.dampening) * d;
        d = o.nesterov ? d + o.momentum * buf[i]! : buf[i]!;
      }
      p[i] -= o.lr * d;
    }
  }
  return p;
}

// ---- parity cases (test/parity/suite.ts runs them on every backend) ------------------------------

function optimCases(): ParityCase[] {
  const sizes = [1, 1000, 16385, 70001];  // one launch each over 4 tensors, chunk edges included
  const p0 = sizes.map((n, i) => seeded(n, 201 + i)), g = sizes.map((n, i) => seeded(n, 211 + i));
  const names = sizes.map((_, i) => `p${i}`);
  const grads = Object.fromEntries(sizes.map((_, i) => [`g${i}`, { data: g[i]! }]));
  const tol: Tol = { atol: 1e-6, rtol: 1e-5 };
  const adam = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 };
  const cases: ParityCase[] = [{
    name: 'adamwStep x3 over 4 tensors',
    build: () => ({
      inputs: grads,
      outputs: Object.fromEntries(sizes.flatMap((n, i) => [[`p${i}`, p0[i]!], [`m${i}`, new Float64Array(n)], [`v${i}`, new Float64Array(n)]])),
      calls: [1, 2, 3].map((step) => ['adamwStep', names.map((n) => `$${n}`), sizes.map((_, i) => `$g${i}`), sizes.map((_, i) => `$m${i}`),
        sizes.map((_, i) => `$v${i}`), adam.lr, adam.beta1, adam.beta2, adam.eps, adam.weightDecay, step] as Call),
      expect: Object.fromEntries(sizes.map((_, i) => [`p${i}`, adamwRef(p0[i]!, () => g[i]!, 3, adam)])),
      tol,
    }),
  }];
  for (const [momentum, nesterov] of [[0, false], [0.9, false], [0.9, true]] as const) {
    const o = { lr: 0.1, momentum, dampening: 0.1, weightDecay: 0.01, nesterov };
    cases.push({
      name: `sgdStep x3 momentum ${momentum}${nesterov ? ' nesterov' : ''}`,
      build: () => ({
        inputs: grads,
        outputs: Object.fromEntries(sizes.flatMap((n, i) => [[`p${i}`, p0[i]!], [`b${i}`, n]])),
        calls: [1, 2, 3].map((step) => ['sgdStep', names.map((n) => `$${n}`), sizes.map((_, i) => `$g${i}`),
          momentum ? sizes.map((_, i) => `$b${i}`) : null, o.lr, o.momentum, o.dampening, o.weightDecay, o.nesterov, step] as Call),
        expect: Object.fromEntries(sizes.map((_, i) => [`p${i}`, sgdRef(p0[i]!, () => g[i]!, 3, o)])),
        tol,
      }),
    });
  }
  return cases;
}

/** The parity cases of the optimizer kernels. */
export const parityCases: ParityCase[] = optimCases();
