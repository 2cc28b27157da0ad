// float64 reference forward passes of the supported Hugging Face causal LMs, written from
// transformers' modeling code and read independently of lib/models/:
//   src/transformers/models/llama/modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding,
//     rotate_half, apply_rotary_pos_emb, LlamaMLP, repeat_kv, eager_attention_forward,
//     LlamaDecoderLayer), src/transformers/modeling_rope_utils.py (default, linear, dynamic,
//     llama3, longrope inv_freq), src/transformers/masking_utils.py (causal, padding and
//     sliding-window masks: kv <= q, kv > q - window),
//   models/mistral/modeling_mistral.py (sliding window), models/qwen2/modeling_qwen2.py (q/k/v
//     biases, layer_types), models/qwen3/modeling_qwen3.py (q_norm/k_norm before RoPE),
//   models/gemma/modeling_gemma.py (GemmaRMSNorm (1 + w), normalizer sqrt(hidden) in the
//     weights' dtype, gelu_pytorch_tanh), models/phi3/modular_phi3.py (qkv_proj, gate_up_proj
//     chunk(2) gate first, partial rotary), models/gpt2/modeling_gpt2.py (Conv1D x·W + b,
//     learned positions, LayerNorm, gelu_new, scale 1/sqrt(head_dim)).
// Plain loops, no batching tricks: slow and obvious.
import { bf16Value } from './dtype_ref';
import { erf } from './nn_ops_ref';

type W = Map<string, { shape: number[]; data: Float64Array }>;
type Cfg = Record<string, any>;

export interface RefOptions {
  attentionMask?: number[][];
  positionIds?: number[][];
  /** Gemma's normalizer is rounded to the weights' dtype. */
  dtype?: 'float32' | 'bfloat16';
}

function w(ws: W, name: string): Float64Array {
  const t = ws.get(name);
  if (!t) throw new Error(`reference: no weight ${name}`);
  return t.data;
}

/** y[n, o] = Σ_i x[n, i]·W[o, i] (+ b[o]) for nn.Linear weights [out, in]. */
export function linear(x: Float64Array, N: number, inF: number, Wt: Float64Array, outF: number, b?: Float64Array): Float64Array {
  const y = new Float64Array(N * outF);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o]! : 0;
      for (let i = 0; i < inF; i++) s += x[n * inF + i]! * Wt[o * inF + i]!;
      y[n * outF + o] = s;
    }
  return y;
}

/** GPT-2's Conv1D: y = x·W + b with W stored [in, out]. */
function conv1d(x: Float64Array, N: number, inF: number, Wt: Float64Array, outF: number, b: Float64Array): Float64Array {
  const y = new Float64Array(N * outF);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < outF; o++) {
      let s = b[o]!;
      for (let i = 0; i < inF; i++) s += x[n * inF + i]! * Wt[i * outF + o]!;
      y[n * outF + o] = s;
    }
  return y;
}

function rmsNorm(x: Float64Array, N: number, C: number, g: Float64Array, eps: number, offset: number): Float64Array {
  const y = new Float64Array(N * C);
  for (let n = 0; n < N; n++) {
    let ms = 0;
    for (let c = 0; c < C; c++) ms += x[n * C + c]! ** 2;
    const r = 1 / Math.sqrt(ms / C + eps);
    for (let c = 0; c < C; c++) y[n * C + c] = x[n * C + c]! * r * (offset + g[c]!);
  }
  return y;
}

function layerNorm(x: Float64Array, N: number, C: number, g: Float64Array, b: Float64Array, eps: number): Float64Array {
  const y = new Float64Array(N * C);
  for (let n = 0; n < N; n++) {
    let mu = 0;
    for (let c = 0; c < C; c++) mu += x[n * C + c]!;
    mu /= C;
    let v = 0;
    for (let c = 0; c < C; c++) v += (x[n * C + c]! - mu) ** 2;
    const r = 1 / Math.sqrt(v / C + eps);
    for (let c = 0; c < C; c++) y[n * C + c] = (x[n * C + c]! - mu) * r * g[c]! + b[c]!;
  }
  return y;
}

function act(name: string, x: number): number {
  switch (name) {
    case 'silu': return x / (1 + Math.exp(-x));
    case 'gelu': return 0.5 * x * (1 + erf(x / Math.SQRT2));
    case 'gelu_new': case 'gelu_pytorch_tanh': return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
    default: throw new Error(`reference: activation ${name}`);
  }
}

/** inv_freq (float64) for the rotary dims, given the largest position of the pass. */
export function invFreqRef(c: Cfg, dim: number, maxPos: number, dflt: { theta: number; maxPos: number; origMax?: number }): { inv: number[]; scale: number } {
  const base0 = c.rope_theta ?? dflt.theta;
  const maxPositions = c.max_position_embeddings ?? dflt.maxPos;
  const rs = c.rope_scaling;
  let type = rs ? (rs.rope_type ?? rs.type) : 'default';
  if (type === 'su' || (type === 'yarn' && c.model_type === 'phi3')) type = 'longrope';
  const seqLen = maxPos + 1;
  let base = base0;
  if (type === 'dynamic' && seqLen > maxPositions) base = base0 * ((rs.factor * seqLen / maxPositions) - (rs.factor - 1)) ** (dim / (dim - 2));
  const inv: number[] = [];
  let scale = 1;
  for (let i = 0; i < dim / 2; i++) inv.push(1 / base ** (2 * i / dim));
  if (type === 'linear') for (let i = 0; i < inv.length; i++) inv[i]! /= rs.factor;
  if (type === 'llama3') {
    const low = rs.original_max_position_embeddings / rs.low_freq_factor;
    const high = rs.original_max_position_embeddings / rs.high_freq_factor;
    for (let i = 0; i < inv.length; i++) {
      const wl = 2 * Math.PI / inv[i]!;
      if (wl > low) inv[i] = inv[i]! / rs.factor;
      else if (wl >= high) {
        const s = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        inv[i] = (1 - s) * inv[i]! / rs.factor + s * inv[i]!;
      }
    }
  }
  if (type === 'longrope') {
    const orig = c.original_max_position_embeddings ?? dflt.origMax;
    const ext = seqLen > orig ? rs.long_factor : rs.short_factor;
    for (let i = 0; i < inv.length; i++) inv[i] = 1 / (ext[i] * base0 ** (2 * i / dim));
    const factor = maxPositions / orig;
    scale = factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(orig));
  }
  return { inv, scale };
}

/** Logits [B·T·V] of the model for ids [B][T] (every row the same length). */
export function causalLmRef(arch: string, c: Cfg, ws: W, ids: number[][], o: RefOptions = {}): Float64Array {
  const B = ids.length;
  const T = ids[0]!.length;
  const N = B * T;
  const mask = o.attentionMask ?? ids.map((r) => r.map(() => 1));
  const pos = o.positionIds ?? ids.map((r) => r.map((_, t) => t));
  const gpt2 = arch === 'gpt2';
  const pre = gpt2 ? '' : 'model.';
  const C = gpt2 ? c.n_embd : c.hidden_size;
  const H = gpt2 ? c.n_head : c.num_attention_heads;
  const KVH = gpt2 ? H : (c.num_key_value_heads ?? H);
  const D = gpt2 ? C / H : (c.head_dim ?? (arch === 'gemma' ? 256 : arch === 'qwen3' ? 128 : C / H));
  const V = c.vocab_size;
  const L = gpt2 ? c.n_layer : c.num_hidden_layers;
  const eps = gpt2 ? (c.layer_norm_epsilon ?? 1e-5) : (c.rms_norm_eps ?? (arch === 'phi3' ? 1e-5 : 1e-6));
  const actName = gpt2 ? (c.activation_function ?? 'gelu_new') : arch === 'gemma' ? (c.hidden_activation ?? 'gelu_pytorch_tanh') : (c.hidden_act ?? 'silu');
  const offset = arch === 'gemma' ? 1 : 0;
  const table = w(ws, gpt2 ? 'wte.weight' : `${pre}embed_tokens.weight`);
  let x = new Float64Array(N * C);
  const normalizer = arch === 'gemma' ? (o.dtype === 'bfloat16' ? bf16Value(Math.sqrt(C)) : Math.fround(Math.sqrt(C))) : 1;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++)
      for (let k = 0; k < C; k++) {
        let v = table[ids[b]![t]! * C + k]! * normalizer;
        if (gpt2) v += w(ws, 'wpe.weight')[pos[b]![t]! * C + k]!;
        x[(b * T + t) * C + k] = v;
      }
  // sliding windows per layer
  const windows: (number | null)[] = [];
  for (let l = 0; l < L; l++) {
    let win: number | null = null;
    if (arch === 'mistral' || arch === 'phi3') win = c.sliding_window ?? null;
    if (arch === 'qwen2' || arch === 'qwen3') win = c.use_sliding_window && l >= (c.max_window_layers ?? 28) ? c.sliding_window : null;
    windows.push(win);
  }
  // rope
  const partial = c.partial_rotary_factor ?? 1;
  const R = gpt2 ? 0 : Math.floor(D * partial);
  let maxPos = 0;
  for (const r of pos) for (const p of r) maxPos = Math.max(maxPos, p);
  const dflt = {
    llama: { theta: 10000, maxPos: 2048 }, mistral: { theta: 10000, maxPos: 131072 }, qwen2: { theta: 10000, maxPos: 32768 },
    qwen3: { theta: 10000, maxPos: 32768 }, gemma: { theta: 10000, maxPos: 8192 }, phi3: { theta: 10000, maxPos: 4096, origMax: 4096 },
  }[arch as 'llama'] ?? { theta: 10000, maxPos: 2048 };
  const rope = gpt2 ? null : invFreqRef(c, R, maxPos, dflt);
  const rotate = (v: Float64Array, n: number, heads: number) => {
    // v: [N, heads, D], rotate_half on the first R dims
    const p = pos[Math.floor(n / T)]![n % T]!;
    for (let h = 0; h < heads; h++) {
      const base = (n * heads + h) * D;
      const orig = v.slice(base, base + R);
      for (let i = 0; i < R; i++) {
        const f = rope!.inv[i % (R / 2)]! * p;
        const rot = i < R / 2 ? -orig[i + R / 2]! : orig[i - R / 2]!;
        v[base + i] = orig[i]! * Math.cos(f) * rope!.scale + rot * Math.sin(f) * rope!.scale;
      }
    }
  };
  for (let l = 0; l < L; l++) {
    const p = gpt2 ? `h.${l}` : `${pre}layers.${l}`;
    const h1 = gpt2 ? layerNorm(x, N, C, w(ws, `${p}.ln_1.weight`), w(ws, `${p}.ln_1.bias`), eps)
      : rmsNorm(x, N, C, w(ws, `${p}.input_layernorm.weight`), eps, offset);
    let q: Float64Array, k: Float64Array, v: Float64Array;
    if (gpt2) {
      const qkv = conv1d(h1, N, C, w(ws, `${p}.attn.c_attn.weight`), 3 * C, w(ws, `${p}.attn.c_attn.bias`));
      q = new Float64Array(N * C); k = new Float64Array(N * C); v = new Float64Array(N * C);
      for (let n = 0; n < N; n++) for (let i = 0; i < C; i++) {
        q[n * C + i] = qkv[n * 3 * C + i]!; k[n * C + i] = qkv[n * 3 * C + C + i]!; v[n * C + i] = qkv[n * 3 * C + 2 * C + i]!;
      }
    } else if (arch === 'phi3') {
      const qkv = linear(h1, N, C, w(ws, `${p}.self_attn.qkv_proj.weight`), (H + 2 * KVH) * D);
      const F = (H + 2 * KVH) * D;
      q = new Float64Array(N * H * D); k = new Float64Array(N * KVH * D); v = new Float64Array(N * KVH * D);
      for (let n = 0; n < N; n++) {
        for (let i = 0; i < H * D; i++) q[n * H * D + i] = qkv[n * F + i]!;
        for (let i = 0; i < KVH * D; i++) {
          k[n * KVH * D + i] = qkv[n * F + H * D + i]!;
          v[n * KVH * D + i] = qkv[n * F + H * D + KVH * D + i]!;
        }
      }
    } else {
      const bias = (n: string) => ws.get(`${p}.self_attn.${n}.bias`)?.data;
      q = linear(h1, N, C, w(ws, `${p}.self_attn.q_proj.weight`), H * D, bias('q_proj'));
      k = linear(h1, N, C, w(ws, `${p}.self_attn.k_proj.weight`), KVH * D, bias('k_proj'));
      v = linear(h1, N, C, w(ws, `${p}.self_attn.v_proj.weight`), KVH * D, bias('v_proj'));
    }
    if (arch === 'qwen3') {
      q = rmsNorm(q, N * H, D, w(ws, `${p}.self_attn.q_norm.weight`), eps, 0);
      k = rmsNorm(k, N * KVH, D, w(ws, `${p}.self_attn.k_norm.weight`), eps, 0);
    }
    if (!gpt2) for (let n = 0; n < N; n++) { rotate(q, n, H); rotate(k, n, KVH); }
    let scale = 1 / Math.sqrt(D);
    if (gpt2 && c.scale_attn_weights === false) scale = 1;
    const att = new Float64Array(N * H * D);
    for (let b = 0; b < B; b++)
      for (let hh = 0; hh < H; hh++) {
        const kv = Math.floor(hh / (H / KVH)); // repeat_kv
        for (let t = 0; t < T; t++) {
          const scores: number[] = [];
          for (let s = 0; s < T; s++) {
            const win = windows[l];
            const visible = s <= t && mask[b]![s] === 1 && (win === null || win === undefined || s > t - win);
            if (!visible) { scores.push(-Infinity); continue; }
            let dot = 0;
            for (let d = 0; d < D; d++) dot += q[((b * T + t) * H + hh) * D + d]! * k[((b * T + s) * KVH + kv) * D + d]!;
            scores.push(dot * scale);
          }
          const m = Math.max(...scores);
          if (m === -Infinity) continue; // a padding query that sees nothing: its output is not compared
          const e = scores.map((z) => Math.exp(z - m));
          const sum = e.reduce((a, z) => a + z, 0);
          for (let d = 0; d < D; d++) {
            let acc = 0;
            for (let s = 0; s < T; s++) acc += (e[s]! / sum) * v[((b * T + s) * KVH + kv) * D + d]!;
            att[((b * T + t) * H + hh) * D + d] = acc;
          }
        }
      }
    const o2 = gpt2 ? conv1d(att, N, C, w(ws, `${p}.attn.c_proj.weight`), C, w(ws, `${p}.attn.c_proj.bias`))
      : linear(att, N, H * D, w(ws, `${p}.self_attn.o_proj.weight`), C, ws.get(`${p}.self_attn.o_proj.bias`)?.data);
    const x2 = x.map((val, i) => val + o2[i]!);
    const h2 = gpt2 ? layerNorm(x2, N, C, w(ws, `${p}.ln_2.weight`), w(ws, `${p}.ln_2.bias`), eps)
      : rmsNorm(x2, N, C, w(ws, `${p}.post_attention_layernorm.weight`), eps, offset);
    let mlp: Float64Array;
    if (gpt2) {
      const I = c.n_inner ?? 4 * C;
      const hid = conv1d(h2, N, C, w(ws, `${p}.mlp.c_fc.weight`), I, w(ws, `${p}.mlp.c_fc.bias`)).map((z) => act(actName, z));
      mlp = conv1d(hid, N, I, w(ws, `${p}.mlp.c_proj.weight`), C, w(ws, `${p}.mlp.c_proj.bias`));
    } else {
      const I = c.intermediate_size;
      const gated = new Float64Array(N * I);
      if (arch === 'phi3') {
        const gu = linear(h2, N, C, w(ws, `${p}.mlp.gate_up_proj.weight`), 2 * I);
        for (let n = 0; n < N; n++) for (let i = 0; i < I; i++) gated[n * I + i] = gu[n * 2 * I + I + i]! * act(actName, gu[n * 2 * I + i]!);
      } else {
        const bias = (n: string) => ws.get(`${p}.mlp.${n}.bias`)?.data;
        const g = linear(h2, N, C, w(ws, `${p}.mlp.gate_proj.weight`), I, bias('gate_proj'));
        const u = linear(h2, N, C, w(ws, `${p}.mlp.up_proj.weight`), I, bias('up_proj'));
        for (let i = 0; i < N * I; i++) gated[i] = act(actName, g[i]!) * u[i]!;
      }
      mlp = linear(gated, N, I, w(ws, `${p}.mlp.down_proj.weight`), C, ws.get(`${p}.mlp.down_proj.bias`)?.data);
    }
    x = x2.map((val, i) => val + mlp[i]!);
  }
  const hf = gpt2 ? layerNorm(x, N, C, w(ws, 'ln_f.weight'), w(ws, 'ln_f.bias'), eps) : rmsNorm(x, N, C, w(ws, `${pre}norm.weight`), eps, offset);
  const head = ws.get('lm_head.weight')?.data ?? table;
  return linear(hf, N, C, head, V);
}
