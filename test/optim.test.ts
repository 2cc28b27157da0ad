// adamw_step and sgd_step: one step worked out by hand, then 20 steps at a high learning rate
// against the float64 references, with and without weight decay, momentum and Nesterov.
import t from 'tap';

import { AdamW, SGD, sum, mul, tensor, tidy, Tensor } from '../lib/index';
import { assertClose, f32, leakChecked, randomData } from './helpers';
import { adamwRef, sgdRef } from './ref/optim_ref';

t.test('AdamW: one step by hand', async (t) => {
  await leakChecked(t, 'one step', (tt) => {
    // p = 1, g = 0.5, lr = 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01:
    //   decay:  p = 1·(1 − 0.1·0.01) = 0.999
    //   m = 0.1·0.5 = 0.05;  v = 0.001·0.25 = 0.00025
    //   m̂ = 0.05 / (1 − 0.9) = 0.5;  v̂ = 0.00025 / (1 − 0.999) = 0.25;  sqrt(v̂) = 0.5
    //   p = 0.999 − 0.1·0.5 / (0.5 + 1e-8) = 0.999 − 0.1 = 0.899 (to 1e-8)
    const p = tensor([1], [1], { requiresGrad: true });
    p.grad = tensor([0.5], [1]);
    const opt = new AdamW([p], { lr: 0.1 });
    opt.step();
    tt.ok(Math.abs(p.item() - 0.899) < 1e-6, `p = ${p.item()} (hand: 0.899)`);
    opt.dispose();
    p.dispose();
  });
});

t.test('SGD: one step by hand', async (t) => {
  await leakChecked(t, 'one step', (tt) => {
    // p = 2, g = 3, lr = 0.1, momentum 0.9, weight decay 0.5:
    //   d = 3 + 0.5·2 = 4; first step: buf = d = 4; p = 2 − 0.1·4 = 1.6
    //   second step with g = 3 again: d = 3 + 0.5·1.6 = 3.8; buf = 0.9·4 + 3.8 = 7.4; p = 1.6 − 0.74 = 0.86
    const p = tensor([2], [1], { requiresGrad: true });
    p.grad = tensor([3], [1]);
    const opt = new SGD([p], { lr: 0.1, momentum: 0.9, weightDecay: 0.5 });
    opt.step();
    tt.ok(Math.abs(p.item() - 1.6) < 1e-6, `after one step p = ${p.item()} (hand: 1.6)`);
    opt.step();
    tt.ok(Math.abs(p.item() - 0.86) < 1e-6, `after two steps p = ${p.item()} (hand: 0.86)`);
    opt.dispose();
    p.dispose();
  });
});

// The gradient of L(p) = sum(p ⊙ p ⊙ c) / 2 + sum(p ⊙ d) is p ⊙ c + d: a nonlinear-in-time trajectory.
function quadraticGrad(c: Float64Array, d: Float64Array) {
  return (p: Float64Array) => p.map((v, i) => v * c[i]! + d[i]!);
}

function runSteps(p: Tensor, c: Float64Array, d: Float64Array, opt: { step(): void; zeroGrad(): void }, steps: number): void {
  const ct = tensor(Float32Array.from(c), p.shape.slice());
  const dt = tensor(Float32Array.from(d), p.shape.slice());
  for (let s = 0; s < steps; s++) {
    tidy(() => {
      const loss = sum(mul(mul(mul(p, p), ct), 0.5)).add(sum(mul(p, dt)));
      loss.backward();
    });
    opt.step();
    opt.zeroGrad();
  }
  ct.dispose();
  dt.dispose();
}

t.test('AdamW: 20 steps at lr 0.1 against the float64 reference', async (t) => {
  for (const weightDecay of [0, 0.1]) {
    for (const n of [1, 17, 1000]) {
      await leakChecked(t, `n=${n} weightDecay=${weightDecay}`, (tt) => {
        const p0 = f32(randomData(n, n + 1));
        const c = f32(randomData(n, n + 2).map(Math.abs));
        const d = f32(randomData(n, n + 3));
        const p = tensor(Float32Array.from(p0), [n], { requiresGrad: true });
        const opt = new AdamW([p], { lr: 0.1, betas: [0.8, 0.95], eps: 1e-6, weightDecay });
        runSteps(p, c, d, opt, 20);
        const ref = adamwRef(p0, quadraticGrad(c, d), 20, { lr: 0.1, beta1: 0.8, beta2: 0.95, eps: 1e-6, weightDecay });
        assertClose(tt, p.toFloat32Array(), ref, { atol: 2e-5, rtol: 1e-4 }, 'parameters after 20 steps');
        opt.dispose();
        p.dispose();
      });
    }
  }
});

t.test('SGD: 20 steps against the float64 reference', async (t) => {
  const configs = [
    { lr: 0.2, momentum: 0, dampening: 0, weightDecay: 0, nesterov: false },
    { lr: 0.1, momentum: 0.9, dampening: 0, weightDecay: 0.05, nesterov: false },
    { lr: 0.1, momentum: 0.8, dampening: 0.3, weightDecay: 0, nesterov: false },
    { lr: 0.1, momentum: 0.9, dampening: 0, weightDecay: 0.01, nesterov: true },
  ];
  for (const cfg of configs) {
    await leakChecked(t, JSON.stringify(cfg), (tt) => {
      const n = 129;
      const p0 = f32(randomData(n, 5));
      const c = f32(randomData(n, 6).map(Math.abs));
      const d = f32(randomData(n, 7));
      const p = tensor(Float32Array.from(p0), [n], { requiresGrad: true });
      const opt = new SGD([p], cfg);
      runSteps(p, c, d, opt, 20);
      const ref = sgdRef(p0, quadraticGrad(c, d), 20, cfg);
      assertClose(tt, p.toFloat32Array(), ref, { atol: 1e-5, rtol: 1e-4 }, 'parameters after 20 steps');
      opt.dispose();
      p.dispose();
    });
  }
});

t.test('parameter groups and the lr setter', async (t) => {
  await leakChecked(t, 'groups', (tt) => {
    const a = tensor([1], [1], { requiresGrad: true });
    const b = tensor([1], [1], { requiresGrad: true });
    const opt = new SGD([{ params: [a] }, { params: [b], lr: 0.4 }], { lr: 0.1 });
    a.grad = tensor([1], [1]);
    b.grad = tensor([1], [1]);
    opt.step();
    tt.ok(Math.abs(a.item() - 0.9) < 1e-6 && Math.abs(b.item() - 0.6) < 1e-6, 'each group uses its own lr');
    opt.lr = 0.2; // keeps the 1:4 ratio
    opt.step();
    tt.ok(Math.abs(a.item() - 0.7) < 1e-6 && Math.abs(b.item() + 0.2) < 1e-6, `ratios kept after lr change (a=${a.item()}, b=${b.item()})`);
    tt.equal(opt.lr, 0.2);
    const c = tensor([1], [1], { requiresGrad: true });
    const opt2 = new AdamW([c], { lr: 0.1 });
    opt2.step(); // no gradient: nothing happens
    tt.equal(c.item(), 1, 'a parameter without a gradient is skipped');
    for (const x of [a, b, c]) x.dispose();
    opt.dispose();
    opt2.dispose();
  });
});
