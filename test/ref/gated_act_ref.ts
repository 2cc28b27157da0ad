// Float64 reference of the fused gated activation of GLU MLPs (act(g)·u: SwiGLU, GeGLU with the
// tanh and the exact GELU) and its backward, written from the math; a finite-difference check of
// that backward; and the parity cases of the gatedAct kernels (separate gate/up tensors and the
// two halves of one [gate | up] row) and of gatedActivation() through autograd with its argument
// errors. Not a test file itself.
import { gatedActivation, tensor, tidy, zeros } from '../../lib/index';
import type { Device, ParityCase, Tol } from '../parity/suite';
import { seeded } from './dtype_ref';
import { erf, F64, finiteDiff } from './nn_ops_ref';

/** The activations the models gate with, by their unary op names. */
export type GateAct = 'silu' | 'geluTanh' | 'geluErf';
const ACT_ID: Record<GateAct, number> = { geluTanh: 9, geluErf: 10, silu: 11 };  // lib/native.ts UNARY_OP

const C_TANH = Math.sqrt(2 / Math.PI);

/** act(v) and act'(v) in float64. */
export function actRef(act: GateAct, v: number): { a: number; da: number } {
  if (act === 'silu') {
    const s = 1 / (1 + Math.exp(-v));
    return { a: v * s, da: s * (1 + v * (1 - s)) };
  }
  if (act === 'geluTanh') {
    const t = Math.tanh(C_TANH * (v + 0.044715 * v ** 3));
    return { a: 0.5 * v * (1 + t), da: 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * C_TANH * (1 + 3 * 0.044715 * v * v) };
  }
  return { a: 0.5 * v * (1 + erf(v / Math.SQRT2)), da: 0.5 * (1 + erf(v / Math.SQRT2)) + v * Math.exp(-0.5 * v * v) / Math.sqrt(2 * Math.PI) };
}

/** y (N, I) = act(g)⊙u for g and u (N, I). */
export function gatedActRef(g: F64, u: F64, act: GateAct): F64 {
  return g.map((v, i) => actRef(act, v).a * u[i]!);
}

/** Gradients of Σ y⊙G: dg = G⊙u⊙act'(g), du = G⊙act(g). */
export function gatedActBackwardRef(g: F64, u: F64, act: GateAct, G: F64): { dg: F64; du: F64 } {
  return { dg: g.map((v, i) => G[i]! * u[i]! * actRef(act, v).da), du: g.map((v, i) => G[i]! * actRef(act, v).a) };
}

/** Rows [g | u] (N, 2I) from g and u (N, I), and back. */
export function joinHalves(g: F64, u: F64, N: number, I: number): F64 {
  const out = new Float64Array(2 * N * I);
  for (let r = 0; r < N; r++) {
    out.set(g.subarray(r * I, (r + 1) * I), r * 2 * I);
    out.set(u.subarray(r * I, (r + 1) * I), r * 2 * I + I);
  }
  return out;
}

const TOL: Tol = { atol: 1e-6, rtol: 1e-5 };  // fp32 expf/erff/tanhf against float64

function gatedCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  let seed = 1301;
  const data = (n: number, scale = 1) => seeded(n, seed++, scale);
  for (const [N, I] of [[1, 1], [37, 129], [300, 1000]] as const) {
    const g = data(N * I, 4), u = data(N * I, 2), dy = data(N * I);
    const gu = joinHalves(g, u, N, I);
    for (const act of ['silu', 'geluTanh', 'geluErf'] as const) {
      const tag = `${act} (${N}, ${I})`;
      const y = gatedActRef(g, u, act);
      const b = gatedActBackwardRef(g, u, act, dy);
      cases.push({
        name: `gatedAct ${tag}`, build: () => ({
          inputs: { g: { data: g }, u: { data: u } }, outputs: { y: N * I },
          calls: [['gatedAct', '$y', '$g', '$u', N, I, I, ACT_ID[act]]], expect: { y }, tol: TOL,
        }),
      });
      cases.push({
        name: `gatedAct halves of one row ${tag}`, build: () => ({
          inputs: { gu: { data: gu } }, outputs: { y: N * I },
          calls: [['gatedAct', '$y', '$gu', null, N, I, 2 * I, ACT_ID[act]]], expect: { y }, tol: TOL,
        }),
      });
      cases.push({
        name: `gatedActBackward ${tag}`, build: () => ({
          inputs: { g: { data: g }, u: { data: u }, dy: { data: dy } }, outputs: { dg: N * I, du: N * I },
          calls: [['gatedActBackward', '$dg', '$du', '$dy', '$g', '$u', N, I, I, ACT_ID[act]]], expect: b, tol: TOL,
        }),
      });
      cases.push({
        name: `gatedActBackward halves of one row ${tag}`, build: () => ({
          inputs: { gu: { data: gu }, dy: { data: dy } }, outputs: { dgu: 2 * N * I },
          calls: [['gatedActBackward', '$dgu', null, '$dy', '$gu', null, N, I, 2 * I, ACT_ID[act]]],
          expect: { dgu: joinHalves(b.dg, b.du, N, I) }, tol: TOL,
        }),
      });
    }
  }
  cases.push({
    name: 'gatedAct refuses halves of a row narrower than 2I', build: () => ({
      inputs: { gu: { data: data(6) } }, outputs: { y: 6 },
      calls: [['gatedAct', '$y', '$gu', null, 2, 3, 3, ACT_ID.silu]], expect: {}, tol: TOL, throws: 'ERR_LORA_INTERNAL',
    }),
  });
  for (const act of ['silu', 'geluTanh', 'geluErf'] as const) {
    cases.push({
      name: `gatedAct reference ${act}: its backward against central finite differences`, build: () => {
        const g = data(24, 3), u = data(24), G = data(24);
        const f = (xs: F64[]) => gatedActRef(xs[0]!, xs[1]!, act);
        const r = gatedActBackwardRef(g, u, act, G);
        return {
          inputs: {}, outputs: {}, calls: [], tol: { atol: 1e-8, rtol: 1e-7 }, expect: { dg: r.dg, du: r.du },
          api: () => ({ dg: finiteDiff(f, [g.slice(), u.slice()], G, 0), du: finiteDiff(f, [g.slice(), u.slice()], G, 1) }),
        };
      },
    });
  }
  // the op through autograd: both layouts, every gradient
  {
    const [B, T, I] = [2, 3, 17];
    const n = B * T * I;
    const g = data(n, 3), u = data(n), dy = data(n);
    for (const act of ['silu', 'geluTanh'] as const) {
      const b = gatedActBackwardRef(g, u, act, dy);
      cases.push({
        name: `gatedActivation() ${act} forward and backward through autograd`, build: () => ({
          inputs: {}, outputs: {}, calls: [], tol: TOL, expect: { y: gatedActRef(g, u, act), dg: b.dg, du: b.du },
          api: (device) => tidy(() => {
            const gt = tensor(Float32Array.from(g), [B, T, I], { device, requiresGrad: true });
            const ut = tensor(Float32Array.from(u), [B, T, I], { device, requiresGrad: true });
            const y = gatedActivation(gt, ut, act);
            y.backward(tensor(Float32Array.from(dy), [B, T, I], { device }));
            const out = { y: y.toFloat32Array(), dg: gt.grad!.toFloat32Array(), du: ut.grad!.toFloat32Array() };
            gt.grad!.dispose();
            ut.grad!.dispose();
            return out;
          }),
        }),
      });
      cases.push({
        name: `gatedActivation() ${act} on one [gate | up] tensor through autograd`, build: () => ({
          inputs: {}, outputs: {}, calls: [], tol: TOL,
          expect: { y: gatedActRef(g, u, act), dgu: joinHalves(b.dg, b.du, B * T, I) },
          api: (device) => tidy(() => {
            const gu = tensor(Float32Array.from(joinHalves(g, u, B * T, I)), [B, T, 2 * I], { device, requiresGrad: true });
            const y = gatedActivation(gu, null, act);
            y.backward(tensor(Float32Array.from(dy), [B, T, I], { device }));
            const out = { y: y.toFloat32Array(), dgu: gu.grad!.toFloat32Array() };
            gu.grad!.dispose();
            return out;
          }),
        }),
      });
    }
  }
  const refuses = (what: string, code: string, message: RegExp, call: (device: Device) => void): ParityCase => ({
    name: `gatedActivation() refuses ${what}`,
    build: () => ({ inputs: {}, outputs: {}, calls: [], expect: {}, tol: TOL, throws: { code, message }, api: (device) => { tidy(() => call(device)); return {}; } }),
  });
  cases.push(
    refuses('gate and up of different shapes', 'ERR_LORA_SHAPE', /^Expected gate and up of one shape for gatedActivation\(\) but received \[2, 4\] and \[2, 5\]$/,
      (d) => gatedActivation(zeros([2, 4], { device: d }), zeros([2, 5], { device: d }))),
    refuses('an odd last dim without up', 'ERR_LORA_SHAPE', /^Expected gate of shape \[\.\.\., 2·I\] \(gate half then up half\) for gatedActivation\(\) with up null but received \[2, 5\]$/,
      (d) => gatedActivation(zeros([2, 5], { device: d }), null)),
    refuses('an unknown activation', 'ERR_LORA_TYPE', /^Expected one of neg, exp, .*silu.* for activation but received "swish" \(string\)$/,
      (d) => gatedActivation(zeros([2, 4], { device: d }), null, 'swish' as never)),
    refuses('a bfloat16 gate', 'ERR_LORA_DTYPE', /^Expected float32 tensors for gatedActivation\(\) but received bfloat16/,
      (d) => gatedActivation(zeros([2, 4], { device: d }).toDtype('bfloat16'), zeros([2, 4], { device: d }))),
    refuses('a scalar', 'ERR_LORA_SHAPE', /^Expected a tensor with at least 1 dim for gatedActivation\(\) but received a scalar$/,
      (d) => gatedActivation(zeros([], { device: d }), null)),
  );
  return cases;
}

/** The parity cases of the gated activation kernels and op. */
export const parityCases: ParityCase[] = gatedCases();
