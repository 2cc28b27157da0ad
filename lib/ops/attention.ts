// attention(): fused scaled-dot-product attention over Tensor (FlashAttention-2 style kernels,
// native/cpu/attention*.cc and cuda/attention.cu): GQA/MQA, causal, padding, packed-sequence and
// sliding-window masks, and decode against a preallocated KV cache. Validates, runs the kernel,
// records the backward beside the forward. The (T, S) probabilities are never stored; the
// backward recomputes them.
import { checkOptions, expectBoolean, expectInteger, expectNumber, LoraError } from '../errors';
import { native, NativeStorage } from '../native';
import { empty, expectTensor, record, saveFor, shapeString, Tensor, zeros } from '../tensor';
import { sameDevice } from './util';

// The trailing arguments of native.attention and native.attentionBackward (native/binding/nn.cc).
type Trailing = [keyMask: NativeStorage | null, keyMaskStride: number, segmentIds: NativeStorage | null,
  segmentStride: number, B: number, T: number, S: number, Smax: number, H: number, KVH: number, D: number,
  scale: number, causal: boolean, window: number];

export interface AttentionOptions {
  /** Query i (at position kvLength - T + i) sees keys at its position and before (default true). */
  causal?: boolean;
  /** Score scale; default 1/sqrt(headDim). */
  scale?: number;
  /**
   * int32 [batch, M] with M >= kvLength: 1 for a key to attend to, 0 for padding (left or right).
   * Only keys are masked; a query row that sees no key at all gets output 0 (and gradient 0).
   */
  attentionMask?: Tensor;
  /**
   * int32 [batch, M] with M >= kvLength: packed sequences. A query attends only to keys with
   * its own position's segment id.
   */
  segmentIds?: Tensor;
  /**
   * Sliding window (Mistral's `sliding_window`): the query at position p sees key j only when
   * j > p - window, as transformers' sliding-window mask. Default: no window.
   */
  window?: number;
  /**
   * How many positions of k and v take part (a KV cache [batch, maxLen, kvHeads, headDim] filled
   * up to kvLength); default k's sequence length. The T queries sit at the last T positions.
   */
  kvLength?: number;
}

const OPTIONS = ['causal', 'scale', 'attentionMask', 'segmentIds', 'window', 'kvLength'];
const MAX_CUDA_HEAD_DIM = 256;  // cuda/attention.cu keeps 8 head dims per lane in registers

function maskArg(name: string, m: unknown, B: number, S: number): Tensor {
  const t = expectTensor(name, m);
  if (t.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected an int32 ${name} for attention() but received ${t.dtype} (create it with { dtype: 'int32' })`);
  if (t.ndim !== 2 || t.shape[0] !== B || t.shape[1]! < S)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${name} of shape [${B}, n] with n >= ${S} (batch, key positions) for attention() but received ${shapeString(t.shape)}`);
  return t;
}

/**
 * Scaled dot-product attention, softmax(scale·q·kᵀ + mask)·v, fused (FlashAttention-2 style: the
 * probabilities are recomputed in the backward, never stored). q is [batch, T, heads, headDim]
 * (the layout a [batch, T, heads·headDim] projection reshapes to); k and v are
 * [batch, S, kvHeads, headDim] with heads a multiple of kvHeads: query head h reads kv head
 * h / (heads / kvHeads), as transformers' repeat_kv, without copying k and v. The T queries are
 * the last T of the S positions (T = S for self-attention; T new tokens against a KV cache).
 * Output: q's shape. Gradients flow to q, k and v (dk, dv summed over the query heads sharing
 * them); masks have none.
 *
 * @example
 * const q = reshape(qProj.forward(x), [B, T, H, D]); // likewise k, v with kvHeads
 * const y = attention(q, k, v, { causal: true, attentionMask: mask }); // mask: int32 [B, T]
 * // one decode step against a cache [B, maxLen, kvHeads, D] holding `len` positions
 * const y1 = attention(q1, kCache, vCache, { kvLength: len, attentionMask: mask });
 * @throws ERR_LORA_SHAPE when q, k, v are not 4-D with matching batch and headDim, heads is not a
 *   multiple of kvHeads, T exceeds the key positions, or a mask is not [batch, >= kvLength];
 *   ERR_LORA_DTYPE for q, k, v not float32 or masks not int32; ERR_LORA_DEVICE for tensors on
 *   different devices; ERR_LORA_UNSUPPORTED for headDim > 256 on cuda; LoraRangeError for kvLength, window or scale out of range; ERR_LORA_OPTION
 *   for an unknown option.
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, options?: AttentionOptions): Tensor {
  const o = checkOptions<AttentionOptions>('attention()', options, OPTIONS);
  expectTensor('q', q);
  expectTensor('k', k);
  expectTensor('v', v);
  for (const [name, t] of [['q', q], ['k', k], ['v', v]] as const)
    if (t.dtype !== 'float32')
      throw new LoraError('ERR_LORA_DTYPE', `Expected float32 ${name} for attention() but received ${t.dtype} (convert with toDtype('float32'))`);
  if (q.ndim !== 4)
    throw new LoraError('ERR_LORA_SHAPE', `Expected q of shape [batch, seq, heads, headDim] for attention() but received ${shapeString(q.shape)}`);
  if (k.ndim !== 4 || v.ndim !== 4 || !k.shape.every((d, i) => d === v.shape[i]))
    throw new LoraError('ERR_LORA_SHAPE', `Expected k and v of one shape [batch, kvSeq, kvHeads, headDim] for attention() but received ${shapeString(k.shape)} and ${shapeString(v.shape)}`);
  const [B, T, H, D] = q.shape as [number, number, number, number];
  const [, Smax, KVH] = k.shape as [number, number, number, number];
  if (k.shape[0] !== B || k.shape[3] !== D)
    throw new LoraError('ERR_LORA_SHAPE', `Expected k and v with q's batch ${B} and headDim ${D} for attention() but received q ${shapeString(q.shape)} and k, v ${shapeString(k.shape)}`);
  if (KVH === 0 ? H !== 0 : H % KVH !== 0)
    throw new LoraError('ERR_LORA_SHAPE', `Expected the query heads (${H}) to be a multiple of the key/value heads (${KVH}) for attention() but received q ${shapeString(q.shape)} and k, v ${shapeString(k.shape)}`);
  const S = o.kvLength === undefined ? Smax : expectInteger('kvLength', o.kvLength, T, Smax);
  if (T > S)
    throw new LoraError('ERR_LORA_SHAPE', `Expected at most as many queries as key positions for attention() (queries are the last T of them) but received q ${shapeString(q.shape)} and k, v ${shapeString(k.shape)}`);
  const causal = o.causal === undefined ? true : expectBoolean('causal', o.causal);
  const scale = o.scale === undefined ? 1 / Math.sqrt(Math.max(D, 1)) : expectNumber('scale', o.scale);
  const window = o.window === undefined ? 0 : expectInteger('window', o.window, 1, Number.MAX_SAFE_INTEGER);
  const mask = o.attentionMask === undefined ? null : maskArg('attentionMask', o.attentionMask, B, S);
  const segs = o.segmentIds === undefined ? null : maskArg('segmentIds', o.segmentIds, B, S);
  sameDevice('attention', q, k, v, ...(mask ? [mask] : []), ...(segs ? [segs] : []));
  if (q.device === 'cuda' && D > MAX_CUDA_HEAD_DIM)
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected a headDim of at most ${MAX_CUDA_HEAD_DIM} for attention() on cuda but received ${D} (the CPU has no limit)`);

  const trailing = (): Trailing => [
    mask ? mask._live('attentionMask') : null, mask ? mask.shape[1]! : 0, segs ? segs._live('segmentIds') : null,
    segs ? segs.shape[1]! : 0, B, T, S, Smax, H, KVH, D, scale, causal, window,
  ];
  const out = empty(q.shape, q.device);
  const lse = empty([B, H, T], q.device);
  try {
    if (out.size > 0) native.attention(out._storage, lse._storage, q._storage, k._storage, v._storage, ...trailing());
  } catch (err) {
    out.dispose();
    lse.dispose();
    throw err;
  }
  const res = record(out, {
    name: 'attention', inputs: [q, k, v],
    backward: (g) => {
      const dq = empty(q.shape, q.device);
      // positions past kvLength get no gradient: the kernel writes only the first S
      const dk = S < Smax ? zeros(k.shape, { device: k.device }) : empty(k.shape, k.device);
      const dv = S < Smax ? zeros(v.shape, { device: v.device }) : empty(v.shape, v.device);
      try {
        if (dk.size > 0 && B * H > 0)
          native.attentionBackward(dq._storage, dk._storage, dv._storage, g._storage, q._live('q'), k._live('k'), v._live('v'),
            out._live('output of attention'), lse._live('saved log-sum-exp'), ...trailing());
        else if (dk.size > 0) {  // no query head: no gradient for k, v
          native.fill(dk._storage, 0);
          native.fill(dv._storage, 0);
        }
      } catch (err) {
        dq.dispose();
        dk.dispose();
        dv.dispose();
        throw err;
      }
      return [dq, dk, dv];
    },
  });
  return saveFor(res, lse);
}
