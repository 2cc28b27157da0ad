// Float64 references for the optimizers, from PyTorch's documented update rules.

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
