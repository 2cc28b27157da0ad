// linear: the public linear() op (lib/ops.ts) with a frozen weight, as the Linear module and a
// merged LoraLinear run it: y = x·Wᵀ + b (ours) and forward + backward to dx (ours_step). For a
// bf16 W, unfused is the plain composition a bf16-unaware engine runs: widen W to fp32, then the
// fp32 GEMM (again in the backward), timed in the same process as the baseline.
import { linear, Tensor, tensor } from '../../lib/index';
import { Case, native, randomF32 } from '../common';

const linearCase: Case = {
  name: 'linear',
  dtypes: ['fp32', 'bf16'],
  setup({ N, C, OC }, dtype) {
    const wdt = dtype === 'bf16' ? 'bfloat16' : 'float32';
    const x = tensor(randomF32(N * C, 1), [N, C]), W = tensor(randomF32(OC * C, 2, 0.1), [OC, C], { dtype: wdt });
    const b = tensor(randomF32(OC, 3), [OC]), G = tensor(randomF32(N * OC, 6), [N, OC]);
    const xg = tensor(randomF32(N * C, 1), [N, C], { requiresGrad: true });
    const y = tensor(new Float32Array(N * OC), [N, OC]), dx = tensor(new Float32Array(N * C), [N, C]);
    // the bf16-unaware composition: W widened on every call, then fp32 GEMMs
    const widened = (fn: (w32: Tensor) => void) => {
      const w32 = W.toDtype('float32');
      fn(w32);
      w32.dispose();
    };
    const unfusedForward = () => widened((w32) => {
      native.copyStrided(y._storage, 0, [OC, 1], b._storage, 0, [0, 1], [N, OC]);
      native.gemm(y._storage, x._storage, w32._storage, N, OC, C, false, true, C, C, OC, 1, 1, 1, 0, 0, 0);
    });
    const variants: Record<string, () => void> = {
      ours: () => linear(x, W, b).dispose(),
      ours_step: () => {
        const out = linear(xg, W, b);
        out.backward(G);
        out.dispose();
        xg.grad?.dispose();
        xg.grad = null;
      },
    };
    if (dtype === 'bf16') {
      variants.unfused = unfusedForward;
      variants.unfused_step = () => {
        unfusedForward();
        widened((w32) => native.gemm(dx._storage, G._storage, w32._storage, N, C, OC, false, false, OC, C, C, 1, 0, 1, 0, 0, 0));
      };
    }
    return {
      variants,
      work: { flops: 2 * N * C * OC, bytes: OC * C * (dtype === 'bf16' ? 2 : 4) },
      dispose: () => [x, W, b, G, xg, y, dx].forEach((t) => t.dispose()),
    };
  },
};
export default linearCase;
