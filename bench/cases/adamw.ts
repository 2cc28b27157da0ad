// adamw: one optimizer step over a W-sized parameter (OC·C floats): reads p, g, m, v and writes p,
// m, v (28 bytes per element), so it is measured against the update bandwidth.
import { Case, f32, native, randomF32, zeros } from '../common';

const adamw: Case = {
  name: 'adamw',
  dtypes: ['fp32'],
  setup({ C, OC }) {
    const n = OC * C;
    const p = f32(randomF32(n, 1)), g = f32(randomF32(n, 2)), m = zeros(n), v = zeros(n);
    let step = 1;
    return {
      variants: { ours: () => native.adamwStep([p], [g], [m], [v], 1e-3, 0.9, 0.999, 1e-8, 0.01, step++) },
      work: { bytes: 28 * n, flops: 0 },
      dispose: () => [p, g, m, v].forEach((t) => native.dispose(t)),
    };
  },
};
export default adamw;
