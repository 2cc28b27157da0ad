// lora_forward: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ fused (ours) against the unfused composition of
// separate GEMMs and a bias pass through the same engine (what a BLAS call sequence does).
import { Case, f32, native, randomF32, weight, zeros } from '../common';

const loraForward: Case = {
  name: 'lora_forward',
  dtypes: ['fp32', 'bf16'],
  setup({ N, C, OC, R }, dtype) {
    const x = f32(randomF32(N * C, 1)), Wd = randomF32(OC * C, 2, 0.1), W = weight(Wd, dtype);
    const W32 = dtype === 'fp32' ? W : f32(Wd);
    const b = f32(randomF32(OC, 3)), A = f32(randomF32(R * C, 4, 0.1)), B = f32(randomF32(OC * R, 5));
    const y = zeros(N * OC), h = zeros(N * R), ones = f32(new Float32Array(N).fill(1));
    const s = 2;
    const variants: Record<string, () => void> = {
      ours: () => native.loraForward(y, h, x, W, b, A, B, N, C, OC, R, s, 0, 0),
      ours_dropout: () => native.loraForward(y, h, x, W, b, A, B, N, C, OC, R, s, 0.1, 7),
      unfused: () => {
        native.gemm(h, x, A, N, R, C, false, true, C, C, R, 1, 0, 1, 0, 0, 0);
        native.gemm(y, x, W32, N, OC, C, false, true, C, C, OC, 1, 0, 1, 0, 0, 0);
        native.gemm(y, h, B, N, OC, R, false, true, R, R, OC, s, 1, 1, 0, 0, 0);
        native.gemm(y, ones, b, N, OC, 1, false, false, 1, OC, OC, 1, 1, 1, 0, 0, 0);  // + bias
      },
    };
    return {
      variants,
      work: { flops: 2 * N * C * OC + 2 * N * R * (C + OC) },
      dispose: () => [x, W, b, A, B, y, h, ones].concat(W32 !== W ? [W32] : []).forEach((t) => native.dispose(t)),
    };
  },
};
export default loraForward;
