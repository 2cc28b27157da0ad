// gemm: the base product y = x·Wᵀ (N, C) x (OC, C)ᵀ that a LoRA layer wraps, through the binding's
// gemm: fp32 (sgemm); bf16 W with bf16Dot (matmulPrecision 'bf16': the bf16 dot product on 4..16 and
// 64+ rows where the CPU has avx512_bf16, bench/targets.ts usesBf16Dot; fp32 products elsewhere).
// Decode rows take turns over copies of W (weightCopies), as a model's decode step streams each
// weight from memory: one 4096 x 4096 bf16 W (32 MB) stayed in a 32 MB L3 between calls and read at
// 115-119% of the measured read bandwidth. The baselines get the same count from run.ts.
import { Case, f32, native, randomF32, weight, weightCopies, zeros } from '../common';

const gemm: Case = {
  name: 'gemm',
  dtypes: ['fp32', 'bf16'],
  setup(shape, dtype) {
    const { N, C, OC } = shape;
    const bytes = OC * C * (dtype === 'bf16' ? 2 : 4);
    const copies = weightCopies('gemm', shape, dtype);
    const x = f32(randomF32(N * C, 1)), Ws = Array.from({ length: copies }, (_, i) => weight(randomF32(OC * C, 2 + i, 0.1), dtype));
    const y = zeros(N * OC);
    let next = 0;
    const variants: Record<string, () => void> = {
      ours: () => native.gemm(y, x, Ws[next++ % copies]!, N, OC, C, false, true, C, C, OC, 1, 0, 1, 0, 0, 0, dtype === 'bf16'),
    };
    return {
      variants,
      work: { flops: 2 * N * C * OC, bytes },
      dispose: () => [x, ...Ws, y].forEach((t) => native.dispose(t)),
    };
  },
};
export default gemm;
