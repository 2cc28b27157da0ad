// One decoder layer of a cached decode step (T = 1, inference) without the ops' per-call work:
// the same kernels with the same arguments as the generic path (rmsNorm, linear, rope, the cache
// write, attention, o_proj added into the residual, rmsNorm, gate/up, the gated activation,
// down_proj added into the residual; q/k/v and gate/up each as one gemmSharedA call where the
// backend has it, which on decode rows makes each product's outputs as its own gemm call does
// and wakes the threads once for all of them), written into scratch tensors the KV cache keeps between
// steps. A step of a small model runs ~15 kernels per layer; the tensor each op allocated, its
// argument checks and the module lookups cost as much as the small kernels themselves. Any layer
// that is not the plain shape (LoRA or other adapted projections, a bias on o_proj or down_proj,
// Qwen3's q/k norms, Phi-3's fused projections, a composed activation, float16 weights) takes the
// generic path, as does everything but a one-token pass with a cache.
import { Module } from '../module';
import { Linear } from '../nn';
import { DEVICE_ID, DTYPE_ID, native, OP, UNARY_OP } from '../native';
import { expectMatmulPrecision, gemmReadsAsStored } from '../ops/util';
import { Device, DType, keep, Tensor, zeros } from '../tensor';
import { ForwardContext, gemmSharedA, HfRMSNorm, isPlainLinear, KVCache, RopeInputs, sharesA, writeCache } from './common';
import type { DecoderConfig } from './llama';

/** @internal Switches the fast path off (tests compare it with the generic path). */
export const decodeFastPath = { enabled: true };

/** The scratch tensors of one layer shape; the KV cache keeps them (its batch size is fixed). */
type Scratch = {
  xn: Tensor; rstd: Tensor; q: Tensor; k: Tensor; v: Tensor; qr: Tensor; kr: Tensor; att: Tensor; lse: Tensor;
  gate: Tensor; up: Tensor; act: Tensor;
};

function scratchOf(cache: KVCache, cfg: DecoderConfig, device: Device): Scratch {
  const B = cache.batchSize, { hidden, heads: H, kvHeads: KVH, headDim: D, intermediate: I } = cfg;
  const key = `decode ${device} ${hidden} ${H} ${KVH} ${D} ${I}`;
  let s = cache.scratch.get(key) as Scratch | undefined;
  if (!s) {
    const make = (shape: number[]) => keep(zeros(shape, { device })); // freed by cache.dispose()
    s = {
      xn: make([B, 1, hidden]), rstd: make([B]), q: make([B, 1, H, D]), k: make([B, 1, KVH, D]), v: make([B, 1, KVH, D]),
      qr: make([B, 1, H, D]), kr: make([B, 1, KVH, D]), att: make([B, 1, H, D]), lse: make([B, H, 1]),
      gate: make([B, 1, I]), up: make([B, 1, I]), act: make([B, 1, I]),
    };
    cache.scratch.set(key, s);
  }
  return s;
}

// Whether the GEMM reads a weight as stored (a binding query; a weight's dtype and device do not change)
const readsAsStored = new WeakMap<Tensor, boolean>();
function asStored(w: Tensor): boolean {
  let r = readsAsStored.get(w);
  if (r === undefined) readsAsStored.set(w, (r = gemmReadsAsStored(w)));
  return r;
}

// A projection the fast path can run: a plain Linear whose weight the GEMM reads as stored, on the pass's device.
function plain(m: Module | undefined, device: Device, bias: boolean): m is Linear {
  return isPlainLinear(m) && (bias || m.bias === null) && m.weight.device === device && asStored(m.weight) &&
    (m.bias === null || (m.bias.dtype === 'float32' && m.bias.device === device));
}

function norm(m: Module | undefined, device: Device): m is HfRMSNorm {
  return m instanceof HfRMSNorm && Object.getPrototypeOf(m) === HfRMSNorm.prototype && m.weight.dtype === 'float32' && m.weight.device === device;
}

/**
 * y (M, OC) = x·Wᵀ (+ bias) as linear() computes it, or with `accumulate` y += x·Wᵀ as addProjected()
 * does (bias-free), with the layer's matmulPrecision (bf16 dots on 4..16 rows and from 64).
 */
function project(y: Tensor, x: Tensor, p: Linear, M: number, accumulate = false): void {
  const [OC, C] = p.weight.shape as [number, number];
  // (checked as linear() checks it: the field is plain, and a bad value must throw here too)
  const bf16Dot = expectMatmulPrecision('matmulPrecision', p.matmulPrecision) === 'bf16';
  if (p.bias) native.copyStrided(y._storage, 0, [OC, 1], p.bias._storage, 0, [0, 1], [M, OC]);
  native.gemm(y._storage, x._storage, p.weight._storage, M, OC, C, false, true, C, C, OC, 1, accumulate || p.bias ? 1 : 0, 1, 0, 0, 0, bf16Dot);
}

// Whether the backend has gemmSharedA for a device and weight dtype (a binding query, per pair)
const sharedSupport = new Map<string, boolean>();
function hasShared(device: Device, dtype: DType): boolean {
  const key = `${device} ${dtype}`;
  let r = sharedSupport.get(key);
  if (r === undefined) sharedSupport.set(key, (r = native.supports(DEVICE_ID[device], OP.gemmSharedA, DTYPE_ID[dtype])));
  return r;
}

/**
 * ys[i] (M, OC_i) = x·W_iᵀ for the projections of one input (q/k/v, gate/up): one gemmSharedA call
 * where sharesA() allows it (on decode rows it streams each weight as gemm does alone, with the
 * same outputs, and wakes the threads once for all of them); else project() each.
 */
function projectAll(ys: Tensor[], x: Tensor, ps: Linear[], M: number): void {
  const K = x.shape[x.ndim - 1]!;
  if (sharesA(ps, x.device, K, (dtype) => hasShared(x.device, dtype))) {
    gemmSharedA(x._storage, M, K, ys.map((y) => y._storage), ps);
    return;
  }
  ps.forEach((p, i) => project(ys[i]!, x, p, M));
}

/**
 * @internal The decoder layer `layer` (a DecoderLayer of LlamaAttention and LlamaMLP) on x
 * [B, 1, hidden] for a cached one-token inference pass, x updated in place and returned; null
 * when this pass or layer is not one the fast path runs (the caller takes the generic path).
 */
export function decodeLayer(layer: Module, attn: Module & { cfg: DecoderConfig; layer: number }, mlp: Module, x: Tensor,
  ctx: ForwardContext, rope: RopeInputs): Tensor | null {
  const cache = ctx.cache;
  const cfg = attn.cfg, device = ctx.device;
  if (!decodeFastPath.enabled || !cache || !ctx.inference || ctx.T !== 1 || cfg.qkNorm || !cfg.act.unary) return null;
  if (x.dtype !== 'float32' || x.device !== device || x.size !== ctx.B * cfg.hidden || cache.batchSize !== ctx.B || attn.layer >= cache.keys.length) return null;
  const inNorm = layer.getModule('input_layernorm'), postNorm = layer.getModule('post_attention_layernorm');
  const qp = attn.getModule('q_proj'), kp = attn.getModule('k_proj'), vp = attn.getModule('v_proj'), op = attn.getModule('o_proj');
  const gp = mlp.getModule('gate_proj'), upp = mlp.getModule('up_proj'), dp = mlp.getModule('down_proj');
  if (!norm(inNorm, device) || !norm(postNorm, device) || !plain(qp, device, true) || !plain(kp, device, true) || !plain(vp, device, true) ||
    !plain(op, device, false) || !plain(gp, device, true) || !plain(upp, device, true) || !plain(dp, device, false)) return null;
  const B = ctx.B, { hidden, heads: H, kvHeads: KVH, headDim: D, intermediate: I } = cfg;
  const s = scratchOf(cache, cfg, device);
  const keys = cache.keys[attn.layer]!, values = cache.values[attn.layer]!;
  const mask = ctx.keyMaskTensor();
  const window = cfg.windows[attn.layer] ?? 0;
  const R = 2 * rope.invFreq.size;
  const xs = x._live('x');

  native.rmsNorm(s.xn._storage, s.rstd._storage, xs, inNorm.weight._storage, B, hidden, inNorm.eps, inNorm.offset);
  projectAll([s.q, s.k, s.v], s.xn, [qp, kp, vp], B);
  native.rope(s.qr._storage, s.q._storage, rope.positions._storage, rope.invFreq._storage, B, 1, H, D, R, rope.scaling);
  native.rope(s.kr._storage, s.k._storage, rope.positions._storage, rope.invFreq._storage, B, 1, KVH, D, R, rope.scaling);
  writeCache(keys, s.kr, ctx.past);
  writeCache(values, s.v, ctx.past);
  native.attention(s.att._storage, s.lse._storage, s.qr._storage, keys._storage, values._storage,
    mask ? mask._live('attentionMask') : null, mask ? mask.shape[1]! : 0, null, 0,
    B, 1, ctx.keyLength, cache.maxLength, H, KVH, D, D ** -0.5, true, window);
  project(x, s.att, op, B, true);
  native.rmsNorm(s.xn._storage, s.rstd._storage, xs, postNorm.weight._storage, B, hidden, postNorm.eps, postNorm.offset);
  projectAll([s.gate, s.up], s.xn, [gp, upp], B);
  native.gatedAct(s.act._storage, s.gate._storage, s.up._storage, B, I, I, UNARY_OP[cfg.act.unary]);
  project(x, s.act, dp, B, true);
  return x;
}
