// gated_act: the GLU MLP gate act(gate)·up (SwiGLU here) as gatedActivation() runs it, one fused
// kernel forward (ours) and forward + backward (ours_step), against the composition the models ran
// before it, silu() then mul() (unfused, unfused_step: two kernels forward, three backward, and an
// [N, I] intermediate kept for the backward), in the same process. Shape: N rows, I = OC.
import { gatedActivation, mul, silu, tensor, tidy } from '../../lib/index';
import { Case, randomF32 } from '../common';

const gatedActCase: Case = {
  name: 'gated_act',
  dtypes: ['fp32'],
  setup({ N, OC: I }) {
    const g = tensor(randomF32(N * I, 1), [N, I], { requiresGrad: true });
    const u = tensor(randomF32(N * I, 2), [N, I], { requiresGrad: true });
    const g0 = tensor(randomF32(N * I, 1), [N, I]), u0 = tensor(randomF32(N * I, 2), [N, I]);
    const G = tensor(randomF32(N * I, 3), [N, I]);
    // tidy() frees the graph's intermediates (the unfused silu output) with the result
    const step = (forward: () => ReturnType<typeof mul>) => tidy(() => {
      forward().backward(G);
      for (const p of [g, u]) {
        p.grad?.dispose();
        p.grad = null;
      }
    });
    return {
      variants: {
        ours: () => gatedActivation(g0, u0, 'silu').dispose(),
        ours_step: () => step(() => gatedActivation(g, u, 'silu')),
        unfused: () => tidy(() => { mul(silu(g0), u0); }),
        unfused_step: () => step(() => mul(silu(g), u)),
      },
      // forward: read g and u, write y (fp32)
      work: { bytes: 3 * N * I * 4 },
      dispose: () => [g, u, g0, u0, G].forEach((t) => t.dispose()),
    };
  },
};
export default gatedActCase;
