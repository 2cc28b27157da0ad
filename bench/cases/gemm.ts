// gemm: the base product y = x·Wᵀ (N, C) x (OC, C)ᵀ that a LoRA layer wraps; fp32 through the
// public gemm op (sgemm), bf16 W through loraForward with rank 0 (the same bf16 GEMM path).
import { Case, f32, native, randomF32, weight, zeros } from '../common';

const gemm: Case = {
  name: 'gemm',
  dtypes: ['fp32', 'bf16'],
  setup({ N, C, OC }, dtype) {
    const x = f32(randomF32(N * C, 1)), W = weight(randomF32(OC * C, 2, 0.1), dtype);
    const y = zeros(N * OC), h = zeros(1), A = zeros(1), B = zeros(1);
    const variants: Record<string, () => void> =
      dtype === 'fp32'
        ? { ours: () => native.gemm(y, x, W, N, OC, C, false, true, C, C, OC, 1, 0, 1, 0, 0, 0) }
        : { ours: () => native.loraForward(y, h, x, W, null, A, B, N, C, OC, 0, 1, 0, 0) };
    return {
      variants,
      work: { flops: 2 * N * C * OC, bytes: OC * C * (dtype === 'bf16' ? 2 : 4) },
      dispose: () => [x, W, y, h, A, B].forEach((t) => native.dispose(t)),
    };
  },
};
export default gemm;
