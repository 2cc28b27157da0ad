// matmulPrecision: bf16 products for bfloat16 weights, opt-in. linear() (forward and the gradient
// of x), linearCrossEntropy, the Linear module, LoRA layers when merged, and a loaded CausalLM
// (addProjected's in-place products, the head and its fused loss) against float64 with the stated
// bound 2^-8·Σ|x·w| per output (each product's input rounded to bf16, fp32 sums); 'fp32' keeps
// fp32's bound; bad values and names get LoraErrors with a did-you-mean. Where the CPU has no
// bf16 dot product (features().bf16Dot false) 'bf16' must change nothing, and that is asserted.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import t from 'tap';

import {
  applyLora, crossEntropy, features, getNumThreads, Linear, linear, linearCrossEntropy, loadCausalLM, LoraError, LoraLinear, LoraRangeError,
  LoraTypeError, reshape, setNumThreads, tensor, tidy, unloadLora,
} from '../lib/index';
import { Rng } from '../lib/random';
import { assertLoraError, leakChecked } from './helpers';
import { bf16Value } from './ref/dtype_ref';
import { writeCheckpoint } from './hf_checkpoint';

const DOT = features().bf16Dot;
const rand = (n: number, rng: Rng, scale = 1) => Float32Array.from({ length: n }, () => (2 * rng.uniform() - 1) * scale);

// Worst |got - Σ a·b| / (rel·Σ|a·b| + 1e-6) over the (rows, cols) outputs of a(rows, K)·op(b),
// b read as b[j*K + k] (transB) or b[k*cols + j].
function worstOf(got: Float32Array, a: Float32Array, b: Float32Array, rows: number, cols: number, K: number, transB: boolean, rel: number, add?: Float32Array): number {
  let worst = 0;
  for (let i = 0; i < rows; i++)
    for (let j = 0; j < cols; j++) {
      let ref = add ? add[j]! : 0, mag = 0;
      for (let k = 0; k < K; k++) {
        const p = a[i * K + k]! * b[transB ? j * K + k : k * cols + j]!;
        ref += p;
        mag += Math.abs(p);
      }
      const err = Math.abs(got[i * cols + j]! - ref) / (rel * mag + 1e-6);
      if (!(err <= worst)) worst = Number.isNaN(err) ? Infinity : err;
    }
  return worst;
}

t.test('linear() with matmulPrecision bf16: y and dx within 2^-8·Σ|x·w| of float64, fp32 within 1e-5', async (t) => {
  const before = getNumThreads();
  // 64 rows and more take the bf16 dot product, and 4..16 (decode) its streaming form; 1..3 and 17..63
  // rows stay on the fp32 paths
  for (const [N, C, OC, threads] of [[96, 130, 70, 1], [200, 64, 300, 2], [7, 40, 33, 1], [16, 200, 90, 2], [1, 64, 40, 1], [40, 70, 50, 1]] as const) {
    setNumThreads(threads);
    await leakChecked(t, `N=${N} C=${C} OC=${OC}`, (tt) => {
      const rng = new Rng(N + C);
      const xh = rand(N * C, rng), Wh = rand(OC * C, rng, 0.5).map(bf16Value), bh = rand(OC, rng), gh = rand(N * OC, rng);
      tidy(() => {
        const W = tensor(Wh, [OC, C]).toDtype('bfloat16'), b = tensor(bh, [OC]);
        const out: Record<string, { y: Float32Array; dx: Float32Array }> = {};
        for (const p of ['fp32', 'bf16'] as const) {
          const x = tensor(xh, [N, C], { requiresGrad: true });
          const y = linear(x, W, b, { matmulPrecision: p });
          y.mul(tensor(gh, [N, OC])).sum().backward();
          out[p] = { y: y.toFloat32Array(), dx: x.grad!.toFloat32Array() };
        }
        const what = `N=${N} C=${C} OC=${OC} threads=${threads} (bf16 dot ${DOT ? 'on' : 'off'})`;
        tt.ok(worstOf(out.bf16!.y, xh, Wh, N, OC, C, true, 2 ** -8, bh) <= 1, `bf16 y ${what}`);
        tt.ok(worstOf(out.bf16!.dx, gh, Wh, N, C, OC, false, 2 ** -8) <= 1, `bf16 dx ${what}`);
        tt.ok(worstOf(out.fp32!.y, xh, Wh, N, OC, C, true, 1e-5, bh) <= 1, `fp32 y keeps fp32's bound ${what}`);
        tt.ok(worstOf(out.fp32!.dx, gh, Wh, N, C, OC, false, 1e-5) <= 1, `fp32 dx keeps fp32's bound ${what}`);
        // the option reaches the kernel: rounding x moves y at 4..16 and 64+ rows on a bf16-dot CPU, nowhere else
        const same = out.bf16!.y.every((v, i) => v === out.fp32!.y[i]);
        if (DOT && (N >= 64 || (N >= 4 && N <= 16))) tt.notOk(same, `bf16 differs from fp32 where the CPU dots bf16 ${what}`);
        else tt.ok(same, `bf16 is fp32 where no bf16 dot runs ${what}`);
      });
    });
  }
  setNumThreads(before);
  // a float32 weight keeps fp32 products whatever the option says
  tidy(() => {
    const rng = new Rng(3);
    const x = tensor(rand(100 * 48, rng), [100, 48]), W = tensor(rand(20 * 48, rng), [20, 48]);
    t.same(linear(x, W, null, { matmulPrecision: 'bf16' }).toFloat32Array(), linear(x, W).toFloat32Array(), 'float32 weight: bf16 changes nothing');
  });
});

t.test('linearCrossEntropy with matmulPrecision bf16: loss within the logits bound, dx as the unfused bf16 path', async (t) => {
  await leakChecked(t, 'head', (tt) => {
    const N = 80, C = 48, V = 300;
    const rng = new Rng(17);
    const xh = rand(N * C, rng), Wh = rand(V * C, rng, 0.5).map(bf16Value);
    const targets = Array.from({ length: N }, (_, i) => (i % 9 === 0 ? -100 : Math.floor(rng.uniform() * V)));
    tidy(() => {
      const W = tensor(Wh, [V, C]).toDtype('bfloat16'), tg = tensor(targets, [N], { dtype: 'int32' });
      const x = tensor(xh, [N, C], { requiresGrad: true });
      // one chunk of the 71 counted rows (the bf16 dot runs from 64 rows), then chunks of 23 (fp32 products)
      const loss = linearCrossEntropy(x, W, tg, { matmulPrecision: 'bf16' });
      loss.backward();
      const small = linearCrossEntropy(tensor(xh, [N, C]), W, tg, { matmulPrecision: 'bf16', chunkSize: 23 }).toFloat32Array()[0]!;
      // float64: a row's loss moves by at most twice its largest logit error (lse and the target's logit)
      let ref = 0, bound = 0, count = 0;
      for (let i = 0; i < N; i++) {
        if (targets[i] === -100) continue;
        count++;
        const z = new Float64Array(V);
        let zmax = -Infinity, emax = 0;
        for (let v = 0; v < V; v++) {
          let mag = 0;
          for (let k = 0; k < C; k++) { const p = xh[i * C + k]! * Wh[v * C + k]!; z[v] += p; mag += Math.abs(p); }
          zmax = Math.max(zmax, z[v]!);
          emax = Math.max(emax, 2 ** -8 * mag);
        }
        let s = 0;
        for (let v = 0; v < V; v++) s += Math.exp(z[v]! - zmax);
        ref += zmax + Math.log(s) - z[targets[i]!]!;
        bound += 2 * emax + 1e-6;
      }
      const got = loss.toFloat32Array()[0]!;
      tt.ok(Math.abs(got - ref / count) <= bound / count, `loss ${got} vs float64 ${ref / count} within ${(bound / count).toExponential(2)}`);
      tt.ok(Math.abs(small - ref / count) <= bound / count, `loss in chunks of 23 rows ${small} within it too`);
      // the unfused composition with the same precision: logits, then crossEntropy (same roundings)
      const x2 = tensor(xh, [N, C], { requiresGrad: true });
      const loss2 = crossEntropy(linear(x2, W, null, { matmulPrecision: 'bf16' }), tg);
      loss2.backward();
      tt.ok(Math.abs(loss2.toFloat32Array()[0]! - got) <= 1e-5 * Math.abs(got), 'the same loss as crossEntropy(linear(..., bf16))');
      const d1 = x.grad!.toFloat32Array(), d2 = x2.grad!.toFloat32Array();
      let worst = 0;
      for (let i = 0; i < d1.length; i++) worst = Math.max(worst, Math.abs(d1[i]! - d2[i]!) / (1e-4 * Math.abs(d2[i]!) + 1e-7));
      tt.ok(worst <= 1, `dx as the unfused bf16 path's (worst ${worst.toFixed(3)} of 1e-4 relative)`);
      const fp = linearCrossEntropy(tensor(xh, [N, C]), W, tg).toFloat32Array()[0]!;
      if (DOT) tt.not(fp, got, 'fp32 products give another (fp32) loss on a bf16-dot CPU');
      else tt.equal(fp, got, 'no bf16 dot here: the same loss');
    });
  });
});

t.test('Linear, LoraLinear and CausalLM carry matmulPrecision', async (t) => {
  const lin = new Linear(8, 4, { matmulPrecision: 'bf16' });
  t.equal(lin.matmulPrecision, 'bf16', 'Linear option');
  t.equal(new Linear(8, 4).matmulPrecision, 'fp32', 'Linear default fp32');
  lin.dispose();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-mp-'));
  t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const dir = path.join(tmp, 'llama');
  writeCheckpoint(dir, 'llama', { dtype: 'bfloat16', seed: 3, config: { vocab_size: 300, hidden_size: 64, intermediate_size: 96, num_attention_heads: 4, num_key_value_heads: 2 } });
  const fp = await loadCausalLM(dir, { dtype: 'bfloat16' });
  const bf = await loadCausalLM(dir, { dtype: 'bfloat16', matmulPrecision: 'bf16' });
  t.equal(fp.matmulPrecision, 'fp32', 'default fp32');
  t.equal(bf.matmulPrecision, 'bf16', 'loaded with bf16');
  const linears = bf.namedModules().filter(([, m]) => m instanceof Linear);
  t.ok(linears.length > 3 && linears.every(([, m]) => (m as Linear).matmulPrecision === 'bf16'), `every Linear (${linears.length}, the head too) has bf16`);
  const T = 90; // past the bf16 dot's 64 rows, also for the 71 rows the loss counts
  const ids = Array.from({ length: T }, (_, i) => (i * 37) % 300), labels = ids.map((v, i) => (i % 5 === 0 ? -100 : v));
  tidy(() => {
    const idt = tensor(ids, [1, T], { dtype: 'int32' }), lt = tensor(labels, [1, T], { dtype: 'int32' });
    const a = fp.forward(idt).toFloat32Array(), b = bf.forward(idt).toFloat32Array();
    let worst = 0, scale = 0;
    for (let i = 0; i < a.length; i++) { worst = Math.max(worst, Math.abs(a[i]! - b[i]!)); scale = Math.max(scale, Math.abs(a[i]!)); }
    t.ok(worst <= 0.05 * scale, `bf16 logits near fp32's (worst ${worst.toExponential(2)} of max ${scale.toExponential(2)})`);
    if (DOT) t.ok(worst > 0, 'and not equal where the CPU dots bf16');
    else t.equal(worst, 0, 'and equal where no bf16 dot runs');
    // the fused head + loss follows the head's precision: the same as the loss of bf16's logits
    const lossB = bf.loss(idt, lt).toFloat32Array()[0]!;
    const shifted = labels.slice(1).concat([-100]);
    const ref = crossEntropy(reshape(bf.forward(idt), [T, 300]), tensor(shifted, [T], { dtype: 'int32' })).toFloat32Array()[0]!;
    t.ok(Math.abs(lossB - ref) <= 1e-5 * Math.abs(ref), `bf16 model.loss ${lossB} is the loss of its logits ${ref}`);
  });
  // applyLora carries it to the LoRA layers (their merged forward) and unloading carries it back
  applyLora(bf, { targetModules: ['q_proj'], rank: 2 });
  const loras = bf.namedModules().filter(([, m]) => m instanceof LoraLinear);
  t.ok(loras.length > 0 && loras.every(([, m]) => (m as LoraLinear).matmulPrecision === 'bf16'), 'LoRA layers took bf16');
  unloadLora(bf);
  t.ok(bf.namedModules().filter(([, m]) => m instanceof Linear).every(([, m]) => (m as Linear).matmulPrecision === 'bf16'), 'unloaded Linears keep bf16');
  bf.matmulPrecision = 'fp32';
  t.ok(bf.namedModules().filter(([, m]) => m instanceof Linear).every(([, m]) => (m as Linear).matmulPrecision === 'fp32'), 'setting the model sets every Linear');
  // bad values: class, code, message with a did-you-mean
  assertLoraError(t, () => { bf.matmulPrecision = 'bfloat16' as never; }, LoraRangeError, 'ERR_LORA_RANGE',
    /^Expected one of 'fp32', 'bf16' for matmulPrecision but received "bfloat16" \(string\); did you mean 'bf16'\?$/, 'model.matmulPrecision = bfloat16');
  await t.rejects(loadCausalLM(dir, { matmulPrecision: 'float32' as never }), { code: 'ERR_LORA_RANGE', message: /received "float32" \(string\); did you mean 'fp32'\?/ }, 'loadCausalLM bad value');
  await t.rejects(loadCausalLM(dir, { matmulPrecison: 'bf16' } as never), { code: 'ERR_LORA_OPTION', message: /Unknown option 'matmulPrecison' for loadCausalLM\(\); did you mean 'matmulPrecision'\?/ }, 'loadCausalLM misspelt option');
  for (const m of [fp, bf]) m.dispose();
});

t.test('matmulPrecision errors', async (t) => {
  await leakChecked(t, 'errors', (tt) => {
    tidy(() => {
      const x = tensor([1, 2], [1, 2]), W = tensor([1, 2, 3, 4], [2, 2]).toDtype('bfloat16'), tg = tensor([0], [1], { dtype: 'int32' });
      assertLoraError(tt, () => linear(x, W, null, { matmulPrecision: 'medium' as never }), LoraRangeError, 'ERR_LORA_RANGE',
        /^Expected one of 'fp32', 'bf16' for matmulPrecision but received "medium" \(string\); did you mean 'bf16'\?$/, 'linear() PyTorch name');
      assertLoraError(tt, () => linear(x, W, null, { matmulPrecision: 'bf1' as never }), LoraRangeError, 'ERR_LORA_RANGE',
        /^Expected one of 'fp32', 'bf16' for matmulPrecision but received "bf1" \(string\); did you mean 'bf16'\?$/, 'linear() one letter off');
      assertLoraError(tt, () => linear(x, W, null, { matmulPrecision: 16 as never }), LoraTypeError, 'ERR_LORA_TYPE',
        /^Expected one of 'fp32', 'bf16' for matmulPrecision but received 16 \(number\)$/, 'linear() a number');
      assertLoraError(tt, () => linear(x, W, null, { precision: 'bf16' } as never), LoraError, 'ERR_LORA_OPTION',
        /^Unknown option 'precision' for linear\(\); known options: matmulPrecision$/, 'linear() unknown option');
      assertLoraError(tt, () => linearCrossEntropy(x, W, tg, { matmulPrecision: 'bfloat16' as never }), LoraRangeError, 'ERR_LORA_RANGE',
        /for matmulPrecision but received "bfloat16" \(string\); did you mean 'bf16'\?$/, 'linearCrossEntropy()');
      assertLoraError(tt, () => new Linear(2, 2, { matmulPrecision: 'BF16' as never }), LoraRangeError, 'ERR_LORA_RANGE',
        /received "BF16" \(string\); did you mean 'bf16'\?$/, 'Linear option');
    });
  });
});
