// gemm: the base product y = x·Wᵀ (N, C) x (OC, C)ᵀ that a LoRA layer wraps, through the binding's
// gemm: fp32 (sgemm); bf16 W with bf16Dot (matmulPrecision 'bf16': the bf16 dot product on 4..16 and
// 64+ rows where the CPU has avx512_bf16, bench/targets.ts usesBf16Dot; fp32 products elsewhere).
import { Case, f32, native, randomF32, weight, zeros } from '../common';

const gemm: Case = {
  name: 'gemm',
  dtypes: ['fp32', 'bf16'],
  setup({ N, C, OC }, dtype) {
    const x = f32(randomF32(N * C, 1)), W = weight(randomF32(OC * C, 2, 0.1), dtype);
    const y = zeros(N * OC);
    const variants: Record<string, () => void> = {
      ours: () => native.gemm(y, x, W, N, OC, C, false, true, C, C, OC, 1, 0, 1, 0, 0, 0, dtype === 'bf16'),
    };
    return {
      variants,
      work: { flops: 2 * N * C * OC, bytes: OC * C * (dtype === 'bf16' ? 2 : 4) },
      dispose: () => [x, W, y].forEach((t) => native.dispose(t)),
    };
  },
};
export default gemm;
