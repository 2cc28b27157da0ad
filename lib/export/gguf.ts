// A PEFT LoRA adapter as a GGUF LoRA adapter for llama.cpp (llama-cli --lora, node-llama-cpp), laid
// out as llama.cpp's convert_lora_to_gguf.py writes it: tensors blk.N.<name>.weight.lora_a (PEFT's
// A, ggml ne [in, rank]) and .lora_b (PEFT's B, ne [rank, out]) in F32, general.type = adapter,
// adapter.type = lora, adapter.lora.alpha, and Llama's q/k rows permuted as LlamaModel.permute
// does. Scalings llama.cpp cannot express (rsLoRA, rank/alpha patterns) are folded into lora_b.
import * as path from 'node:path';

import { LoraError, typeError } from '../errors';
import { PeftAdapter } from '../peft';
import { BaseModelInfo, exportableModules, ggufTensorName, splitLayer, withExportInputs } from './arch';
import { GgufTensor, GgufValue, writeGguf } from './gguf_writer';

/** gguf-py's GGML_QUANT_VERSION, written by every converter as general.quantization_version. */
const GGML_QUANT_VERSION = 2;

export interface GgufExportOptions {
  /** The base model folder (its config.json gives the architecture and head counts). */
  modelDir: string;
  /** The .gguf file to write. */
  out: string;
  /** general.name (default: the adapter folder's name). */
  name?: string;
}

export interface GgufExportResult {
  file: string;
  /** general.architecture. */
  architecture: string;
  /** adapter.lora.alpha. */
  alpha: number;
  /** Number of tensors written (two per module). */
  tensors: number;
  /** Modules whose lora_b was rescaled so that llama.cpp's alpha/rank gives PEFT's scaling. */
  rescaled: string[];
  /** Modules whose lora_b rows were permuted (Llama q/k). */
  permuted: string[];
}

/**
 * convert_hf_to_gguf.py's LlamaModel.permute on the rows of a row-major (rows, cols) matrix:
 * rows viewed as (heads, 2, rows/heads/2) with the last two axes swapped, so the two rotary halves
 * of each head are interleaved as llama.cpp's RoPE expects.
 */
export function permuteRows(data: Float32Array | Float64Array, rows: number, cols: number, heads: number): Float64Array {
  const half = rows / heads / 2;
  if (!Number.isInteger(half)) throw new LoraError('ERR_LORA_SHAPE', `Cannot split ${rows} rows into ${heads} heads of two rotary halves`);
  const out = new Float64Array(rows * cols);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < 2; i++)
      for (let j = 0; j < half; j++) {
        const src = (h * 2 * half + i * half + j) * cols;
        const dst = (h * 2 * half + j * 2 + i) * cols;
        for (let c = 0; c < cols; c++) out[dst + c] = data[src + c]!;
      }
  return out;
}

function f32Bytes(a: Float64Array | Float32Array): Uint8Array {
  const f = a instanceof Float32Array ? a : Float32Array.from(a);
  return new Uint8Array(f.buffer, f.byteOffset, f.byteLength);
}

function transpose(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(a.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c]!;
  return out;
}

/** The q/k head count llama.cpp permutes a module's rows by, or 0 for no permutation. */
function permuteHeads(base: BaseModelInfo, mod: string): number {
  if (!base.arch.permuteQK) return 0;
  const l = splitLayer(base, mod);
  if (l?.inner === 'self_attn.q_proj') return base.numHeads;
  if (l?.inner === 'self_attn.k_proj') return base.numKvHeads;
  return 0;
}

/**
 * Writes a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads onto the GGUF of the same
 * base model (`llama-cli -m base.gguf --lora adapter.gguf`, node-llama-cpp's `lora` option).
 * Supported bases: Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, GPT-2. For GPT-2, whose Conv1D
 * layers PEFT adapts with A (rank, in) and B (out, rank) like any linear layer, the tensors keep
 * that orientation, which is the one llama.cpp's loader checks.
 *
 * @example
 * exportGgufAdapter('out/my-lora', { modelDir: './SmolLM2-135M', out: 'my-lora.gguf' });
 * @throws ERR_LORA_UNSUPPORTED for another architecture, DoRA, lora_bias, modules_to_save, a
 *   module llama.cpp has no weight for, or lm_head on a model with tied embeddings;
 *   ERR_LORA_FORMAT / ERR_LORA_IO for unreadable adapter or config files. Nothing is written then.
 */
export function exportGgufAdapter(adapter: string | PeftAdapter, options: GgufExportOptions): GgufExportResult {
  return withExportInputs('exportGgufAdapter', adapter, options, ['name'], 'a .gguf file path', (o, base, a) => {
    if (o.name !== undefined && typeof o.name !== 'string') throw typeError('name', 'a string', o.name);
    const target = 'GGUF (llama.cpp)';
    const modules = exportableModules(a, base, target, false);
    const alpha = a.config.lora_alpha ?? 8;
    const alphaF32 = Math.fround(alpha);
    const tensors: GgufTensor[] = [];
    const rescaled: string[] = [];
    const permuted: string[] = [];
    for (const [mod, m] of modules) {
      const name = ggufTensorName(base, mod);
      if (!name) throw new LoraError('ERR_LORA_UNSUPPORTED', `Cannot export this adapter to ${target}: llama.cpp's ${base.arch.gguf} model has no weight for '${mod}'`);
      const rank = m.rank;
      // llama.cpp applies alpha/rank (1 when alpha is 0); whatever else PEFT applies goes into B
      const llamaScale = alphaF32 !== 0 ? alphaF32 / rank : 1;
      const factor = m.scaling / llamaScale;
      const [outDim, inDim] = [m.loraB.shape[0]!, m.loraA.shape[1]!];
      const A = m.loraA.toFloat32Array();
      let B: Float32Array | Float64Array = m.loraB.toFloat32Array();
      const heads = permuteHeads(base, mod);
      if (heads) {
        B = permuteRows(B, outDim, rank, heads);
        permuted.push(mod);
      }
      if (factor !== 1) {
        const scaled = new Float64Array(B.length);
        for (let i = 0; i < B.length; i++) scaled[i] = B[i]! * factor;
        B = scaled;
        rescaled.push(mod);
      }
      if (m.kind === 'embedding') {
        if (name !== 'token_embd.weight') throw new LoraError('ERR_LORA_UNSUPPORTED', `Cannot export this adapter to ${target}: '${mod}' is an embedding LoRA on a module llama.cpp does not treat as the token embedding`);
        // llama.cpp's token_embd LoRA takes A transposed (convert_lora_to_gguf.py: lora_a.T)
        tensors.push({ name: `${name}.lora_a`, type: 'F32', shape: [inDim, rank], data: () => f32Bytes(transpose(A, rank, inDim)) });
      } else tensors.push({ name: `${name}.lora_a`, type: 'F32', shape: [rank, inDim], data: () => f32Bytes(A) });
      const Bfinal = B;
      tensors.push({ name: `${name}.lora_b`, type: 'F32', shape: [outDim, rank], data: () => f32Bytes(Bfinal) });
    }
    const meta = new Map<string, GgufValue>();
    meta.set('general.architecture', { type: 'string', value: base.arch.gguf });
    meta.set('general.type', { type: 'string', value: 'adapter' });
    meta.set('adapter.type', { type: 'string', value: 'lora' });
    const name = o.name ?? (typeof adapter === 'string' ? path.basename(path.resolve(adapter)) : '');
    if (name) meta.set('general.name', { type: 'string', value: name });
    meta.set('adapter.lora.alpha', { type: 'float32', value: alpha });
    meta.set('general.quantization_version', { type: 'uint32', value: GGML_QUANT_VERSION });
    writeGguf(o.out, meta, tensors);
    return { file: o.out, architecture: base.arch.gguf, alpha, tensors: tensors.length, rescaled, permuted };
  });
}
