// lora_merge: W += s·B·A in place (fp32, or bf16 with fp32 math rounded once); memory bound on W
// (read + write). Merge then unmerge per timed run keeps W from drifting. For a bf16 W, unfused is
// the plain composition with the same rounding: widen W into a reused fp32 buffer, the fp32 merge,
// narrow back (three passes over W).
import { Case, f32, native, randomF32, weight, zeros } from '../common';

const loraMerge: Case = {
  name: 'lora_merge',
  dtypes: ['fp32', 'bf16'],
  setup({ C, OC, R }, dtype) {
    const W = weight(randomF32(OC * C, 2, 0.1), dtype);
    const A = f32(randomF32(R * C, 4, 0.1)), B = f32(randomF32(OC * R, 5));
    let sign = 1;
    const variants: Record<string, () => void> = {
      ours: () => {
        native.loraMerge(W, A, B, OC, C, R, sign);
        sign = -sign;
      },
    };
    const W32 = dtype === 'bf16' ? zeros(OC * C) : null;
    if (W32)
      variants.unfused = () => {
        native.convert(W32, W);
        native.loraMerge(W32, A, B, OC, C, R, sign);
        native.convert(W, W32);
        sign = -sign;
      };
    const el = dtype === 'fp32' ? 4 : 2;
    return {
      variants,
      work: { bytes: 2 * OC * C * el, flops: 2 * OC * C * R },
      dispose: () => [W, A, B, ...(W32 ? [W32] : [])].forEach((t) => native.dispose(t)),
    };
  },
};
export default loraMerge;
