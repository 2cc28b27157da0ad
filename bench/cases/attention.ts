// attention: the fused attention op (lib/ops/attention.ts) on SmolLM2-135M's heads (9 query heads,
// 3 key/value heads, head dim 64), one causal sequence of T tokens: forward + backward through the
// public API (ours, what a training step runs, and what bench/torch_llm.py's eager attention
// times), the forward alone, and one decode step (T = 1) against a cache of T positions.
// Shapes come in as N = T, C = heads, OC = kvHeads, R = headDim (common.ts: ATTENTION_SHAPES).
// Work counted as FlashAttention counts it: forward 4·T·S·D·H, halved when causal; backward 2.5x.
import { attention, noGrad, tensor } from '../../lib/index';
import { Case, randomF32 } from '../common';

const attentionCase: Case = {
  name: 'attention',
  dtypes: ['fp32'],
  setup({ N: T, C: H, OC: KVH, R: D }) {
    const q = tensor(randomF32(T * H * D, 1, 2), [1, T, H, D], { requiresGrad: true });
    const k = tensor(randomF32(T * KVH * D, 2, 2), [1, T, KVH, D], { requiresGrad: true });
    const v = tensor(randomF32(T * KVH * D, 3), [1, T, KVH, D], { requiresGrad: true });
    const G = tensor(randomF32(T * H * D, 4), [1, T, H, D]);
    const q1 = tensor(randomF32(H * D, 5, 2), [1, 1, H, D]);
    const variants: Record<string, () => void> = {
      ours: () => {
        const y = attention(q, k, v, { causal: true });
        y.backward(G);
        y.dispose();
        for (const x of [q, k, v]) {
          x.grad?.dispose();
          x.grad = null;
        }
      },
      ours_fwd: () => noGrad(() => attention(q, k, v, { causal: true }).dispose()),
      ours_decode: () => noGrad(() => attention(q1, k, v, { causal: true }).dispose()),
    };
    const fwd = (4 * T * T * D * H) / 2;
    return {
      variants,
      work: { flops: 3.5 * fwd, bytes: 2 * T * KVH * D * 4 },
      dispose: () => [q, k, v, G, q1].forEach((t) => t.dispose()),
    };
  },
};
export default attentionCase;
