// lora_step: forward + backward with W frozen and dx needed (training a stacked layer), fused (ours)
// against the frozen linear layer alone (y = x·Wᵀ, dx = dy·W: the floor the adapter should add
// almost nothing to) and the unfused composition of GEMMs.
import { Case, f32, native, randomF32, weight, zeros } from '../common';

const loraStep: Case = {
  name: 'lora_step',
  dtypes: ['fp32', 'bf16'],
  setup({ N, C, OC, R }, dtype) {
    const x = f32(randomF32(N * C, 1)), Wd = randomF32(OC * C, 2, 0.1), W = weight(Wd, dtype);
    const W32 = dtype === 'fp32' ? W : f32(Wd);
    const b = f32(randomF32(OC, 3)), A = f32(randomF32(R * C, 4, 0.1)), B = f32(randomF32(OC * R, 5));
    const y = zeros(N * OC), h = zeros(N * R), dy = f32(randomF32(N * OC, 6));
    const dx = zeros(N * C), dA = zeros(R * C), dB = zeros(OC * R), dh = zeros(N * R), t = zeros(N * C);
    const s = 2;
    const variants: Record<string, () => void> = {
      ours: () => {
        native.loraForward(y, h, x, W, b, A, B, N, C, OC, R, s, 0, 0);
        native.loraBackward(dx, dA, dB, dy, x, h, W, A, B, N, C, OC, R, s, 0, 0);
      },
      ours_dropout: () => {
        native.loraForward(y, h, x, W, b, A, B, N, C, OC, R, s, 0.1, 7);
        native.loraBackward(dx, dA, dB, dy, x, h, W, A, B, N, C, OC, R, s, 0.1, 7);
      },
      // rank 0 through the same kernels: x·Wᵀ + b, then dx = dy·W with W as stored (bf16 read as
      // bf16: an fp32 copy of W would double the bytes the floor reads)
      frozen_linear: () => {
        native.loraForward(y, h, x, W, b, A, B, N, C, OC, 0, s, 0, 0);
        native.loraBackward(dx, null, null, dy, x, h, W, A, B, N, C, OC, 0, s, 0, 0);
      },
      unfused: () => {
        native.gemm(h, x, A, N, R, C, false, true, C, C, R, 1, 0, 1, 0, 0, 0);
        native.gemm(y, x, W32, N, OC, C, false, true, C, C, OC, 1, 0, 1, 0, 0, 0);
        native.gemm(y, h, B, N, OC, R, false, true, R, R, OC, s, 1, 1, 0, 0, 0);
        native.gemm(dB, dy, h, OC, R, N, true, false, OC, R, R, s, 1, 1, 0, 0, 0);
        native.gemm(dh, dy, B, N, R, OC, false, false, OC, R, R, s, 0, 1, 0, 0, 0);
        native.gemm(dA, dh, x, R, C, N, true, false, R, C, C, 1, 1, 1, 0, 0, 0);
        native.gemm(dx, dy, W32, N, C, OC, false, false, OC, C, C, 1, 0, 1, 0, 0, 0);
        native.gemm(dx, dh, A, N, C, R, false, false, R, C, C, 1, 1, 1, 0, 0, 0);
      },
    };
    const fwd = 2 * N * C * OC + 2 * N * R * (C + OC);
    const bwd = 2 * N * C * OC + 2 * N * R * (OC + OC + C + C);
    return {
      variants,
      work: { flops: fwd + bwd },
      dispose: () => [x, W, b, A, B, y, h, dy, dx, dA, dB, dh, t].concat(W32 !== W ? [W32] : []).forEach((q) => native.dispose(q)),
    };
  },
};
export default loraStep;
