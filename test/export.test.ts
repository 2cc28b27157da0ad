// Adapter exports read back by independent readers: GGUF files through @huggingface/gguf (header,
// metadata with types, tensor infos) with the tensor bytes read from the offsets it reports; MLX
// folders through a safetensors header parsed by hand here. Expected values come from float64
// references written in this file: llama.cpp's q/k permute as NumPy's reshape/swapaxes, and the
// effective update scaling·B·A each runtime applies (llama.cpp: alpha/rank; mlx-lm: scale).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { gguf, GGUFValueType } from '@huggingface/gguf';
import t from 'tap';

import { exportGgufAdapter, exportMlxAdapter, LoraError, LoraTypeError, PeftAdapter, savePeftAdapter, tensor, writeGguf } from '../lib/index';
import { adapterFromTensors, PeftConfig } from '../lib/peft';
import { assertClose, assertLoraError, randomData } from './helpers';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-export-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
let seed = 100;

function modelDir(name: string, config: object): string {
  const dir = path.join(tmp, `model-${name}`);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  return dir;
}

interface ModSpec { mod: string; out: number; inp: number; rank: number; embedding?: boolean; dora?: boolean }
interface Made { dir: string; A: Map<string, Float64Array>; B: Map<string, Float64Array>; M: Map<string, Float64Array> }

/** A PEFT adapter folder with seeded f32 tensors; returns the values as float64 too. */
function adapterDir(name: string, config: PeftConfig, mods: ModSpec[], extra: Record<string, number[]> = {}): Made {
  const dir = path.join(tmp, name);
  const tensors = new Map();
  const made: Made = { dir, A: new Map(), B: new Map(), M: new Map() };
  for (const s of mods) {
    const a = Float64Array.from(Float32Array.from(randomData(s.rank * s.inp, seed++)));
    const b = Float64Array.from(Float32Array.from(randomData(s.out * s.rank, seed++)));
    made.A.set(s.mod, a);
    made.B.set(s.mod, b);
    const key = `base_model.model.${s.mod}`;
    tensors.set(s.embedding ? `${key}.lora_embedding_A` : `${key}.lora_A.weight`, tensor(Array.from(a), [s.rank, s.inp]));
    tensors.set(s.embedding ? `${key}.lora_embedding_B` : `${key}.lora_B.weight`, tensor(Array.from(b), [s.out, s.rank]));
    if (s.dora) {
      const m = Float64Array.from(Float32Array.from(randomData(s.out, seed++).map((v) => 1 + Math.abs(v))));
      made.M.set(s.mod, m);
      tensors.set(`${key}.lora_magnitude_vector`, tensor(Array.from(m), [s.out]));
    }
  }
  for (const [k, v] of Object.entries(extra)) tensors.set(k, tensor(v, [v.length]));
  const adapter = adapterFromTensors({ peft_type: 'LORA', ...config }, tensors);
  savePeftAdapter(dir, adapter);
  adapter.dispose();
  return made;
}

// ---- independent references --------------------------------------------------------------------

/** NumPy's w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols), on nested arrays. */
function numpyPermute(w: Float64Array, rows: number, cols: number, nHead: number): Float64Array {
  const d = rows / nHead / 2;
  // reshape to [nHead][2][d][cols]
  const x: number[][][][] = [];
  for (let h = 0; h < nHead; h++) {
    x.push([]);
    for (let i = 0; i < 2; i++) {
      x[h]!.push([]);
      for (let j = 0; j < d; j++) x[h]![i]!.push(Array.from(w.subarray(((h * 2 + i) * d + j) * cols, ((h * 2 + i) * d + j + 1) * cols)));
    }
  }
  // swapaxes(1, 2): y[h][j][i] = x[h][i][j]
  const y = x.map((xh) => Array.from({ length: d }, (_, j) => [xh[0]![j]!, xh[1]![j]!]));
  return Float64Array.from(y.flat(3));
}

/** (rows, k) @ (k, cols) in float64. */
function matmul(a: ArrayLike<number>, b: ArrayLike<number>, rows: number, k: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let p = 0; p < k; p++) {
    const av = a[i * k + p]!;
    for (let j = 0; j < cols; j++) out[i * cols + j] += av * b[p * cols + j]!;
  }
  return out;
}

function transposeOf(a: ArrayLike<number>, rows: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = a[i * cols + j]!;
  return out;
}

function scaled(a: ArrayLike<number>, s: number): Float64Array {
  return Float64Array.from(a, (v) => v * s);
}

// ---- independent readers -------------------------------------------------------------------------

async function readGguf(file: string) {
  const parsed = await gguf(file, { allowLocalFile: true, typedMetadata: true });
  const bytes = fs.readFileSync(file);
  const tensors = new Map<string, { ne: number[]; dtype: number; offset: number; data: Float32Array }>();
  for (const ti of parsed.tensorInfos) {
    const ne = ti.shape.map(Number);
    const offset = Number(parsed.tensorDataOffset + ti.offset);
    const n = ne.reduce((a, b) => a * b, 1);
    const data = new Float32Array(bytes.buffer.slice(bytes.byteOffset + offset, bytes.byteOffset + offset + 4 * n));
    tensors.set(ti.name, { ne, dtype: ti.dtype, offset: Number(ti.offset), data });
  }
  return { parsed, tensors, size: bytes.length };
}

/** A safetensors file parsed by hand: 8-byte little-endian header length, JSON header, data. */
function readSafetensorsByHand(file: string) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> & { __metadata__?: Record<string, string> };
  const tensors = new Map<string, { dtype: string; shape: number[]; data: Float32Array }>();
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') continue;
    const e = v as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const start = 8 + n + e.data_offsets[0];
    tensors.set(k, { dtype: e.dtype, shape: e.shape, data: new Float32Array(buf.buffer.slice(buf.byteOffset + start, buf.byteOffset + 8 + n + e.data_offsets[1])) });
  }
  return { metadata: header.__metadata__, tensors };
}

const TOL = { atol: 1e-7, rtol: 1e-6 };
// a product of factors one of which was rescaled and rounded to f32 (|values| ~ 1, rank <= 4)
const FOLDED = { atol: 1e-6, rtol: 1e-6 };

// ---- GGUF ----------------------------------------------------------------------------------------

const LLAMA = { architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 16, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 3 };
const llamaMods: ModSpec[] = [
  { mod: 'model.layers.1.self_attn.q_proj', out: 16, inp: 16, rank: 4 },
  { mod: 'model.layers.1.self_attn.k_proj', out: 8, inp: 16, rank: 4 },
  { mod: 'model.layers.1.self_attn.v_proj', out: 8, inp: 16, rank: 4 },
  { mod: 'model.layers.2.self_attn.o_proj', out: 16, inp: 16, rank: 4 },
  { mod: 'model.layers.2.mlp.gate_proj', out: 24, inp: 16, rank: 2 },
  { mod: 'model.layers.2.mlp.up_proj', out: 24, inp: 16, rank: 4 },
  { mod: 'model.layers.2.mlp.down_proj', out: 16, inp: 24, rank: 4 },
  { mod: 'lm_head', out: 40, inp: 16, rank: 4 },
];

t.test('GGUF, Llama with GQA: names, metadata, shapes, q/k rows permuted, patterns folded', async (t) => {
  const base = modelDir('llama', LLAMA);
  const made = adapterDir('llama-lora', {
    r: 4, lora_alpha: 8, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'],
    rank_pattern: { gate_proj: 2 }, alpha_pattern: { up_proj: 12 },
  }, llamaMods);
  const out = path.join(tmp, 'llama.gguf');
  const res = exportGgufAdapter(made.dir, { modelDir: base, out });
  t.same(res.permuted, ['model.layers.1.self_attn.k_proj', 'model.layers.1.self_attn.q_proj']);
  t.same(res.rescaled, ['model.layers.2.mlp.up_proj'], 'only the alpha_pattern module needs folding (rank_pattern is alpha/rank already)');
  const g = await readGguf(out);
  const md = g.parsed.typedMetadata;
  t.equal(md.version.value, 3, 'GGUF version 3');
  t.same(Object.keys(md).slice(3), ['general.architecture', 'general.type', 'adapter.type', 'general.name', 'adapter.lora.alpha', 'general.quantization_version'], 'keys in convert_lora_to_gguf.py order');
  t.same(md['general.architecture'], { value: 'llama', type: GGUFValueType.STRING });
  t.same(md['general.type'], { value: 'adapter', type: GGUFValueType.STRING });
  t.same(md['adapter.type'], { value: 'lora', type: GGUFValueType.STRING });
  t.same(md['general.name'], { value: 'llama-lora', type: GGUFValueType.STRING });
  t.same(md['adapter.lora.alpha'], { value: 8, type: GGUFValueType.FLOAT32 });
  t.same(md['general.quantization_version'], { value: 2, type: GGUFValueType.UINT32 });
  t.equal(g.tensors.size, 16);
  t.equal(Number(g.parsed.tensorDataOffset) % 32, 0, 'data starts aligned to 32');
  const names: Record<string, string> = {
    'model.layers.1.self_attn.q_proj': 'blk.1.attn_q.weight', 'model.layers.1.self_attn.k_proj': 'blk.1.attn_k.weight',
    'model.layers.1.self_attn.v_proj': 'blk.1.attn_v.weight', 'model.layers.2.self_attn.o_proj': 'blk.2.attn_output.weight',
    'model.layers.2.mlp.gate_proj': 'blk.2.ffn_gate.weight', 'model.layers.2.mlp.up_proj': 'blk.2.ffn_up.weight',
    'model.layers.2.mlp.down_proj': 'blk.2.ffn_down.weight', lm_head: 'output.weight',
  };
  const scalingOf = (s: ModSpec) => (s.mod.endsWith('up_proj') ? 12 : 8) / s.rank;
  for (const s of llamaMods) {
    const a = g.tensors.get(`${names[s.mod]}.lora_a`)!;
    const b = g.tensors.get(`${names[s.mod]}.lora_b`)!;
    t.same([a.ne, a.dtype, b.ne, b.dtype], [[s.inp, s.rank], 0, [s.rank, s.out], 0], `${s.mod}: lora_a ne [in, r], lora_b ne [r, out], F32`);
    t.equal(a.offset % 32, 0);
    t.same(Array.from(a.data), Array.from(made.A.get(s.mod)!), `${s.mod}: lora_a is PEFT's A, bit for bit`);
    const heads = s.mod.endsWith('q_proj') ? 4 : s.mod.endsWith('k_proj') ? 2 : 0;
    const Bref = heads ? numpyPermute(made.B.get(s.mod)!, s.out, s.rank, heads) : made.B.get(s.mod)!;
    if (s.mod.endsWith('up_proj')) assertClose(t, b.data, scaled(Bref, 12 / 8), TOL, `${s.mod}: lora_b carries alpha 12 vs 8 (rounded to f32 once)`);
    else t.same(Array.from(b.data), Array.from(Bref), `${s.mod}: lora_b ${heads ? 'rows permuted' : 'unchanged'}`);
    // what llama.cpp applies: (alpha / rank) · B_gguf · A_gguf, against PEFT's scaling · P(B · A)
    const got = scaled(matmul(b.data, a.data, s.out, s.rank, s.inp), 8 / s.rank);
    const delta = scaled(matmul(made.B.get(s.mod)!, made.A.get(s.mod)!, s.out, s.rank, s.inp), scalingOf(s));
    assertClose(t, got, heads ? numpyPermute(delta, s.out, s.inp, heads) : delta, FOLDED, `${s.mod}: the update llama.cpp applies`);
  }
});

t.test('GGUF: rsLoRA folded, Mistral is llama, embeddings, other architectures', async (t) => {
  const base = modelDir('mistral', { ...LLAMA, architectures: ['MistralForCausalLM'], num_key_value_heads: 4 });
  const mods: ModSpec[] = [{ mod: 'model.layers.0.self_attn.q_proj', out: 16, inp: 16, rank: 4 }, { mod: 'model.embed_tokens', out: 16, inp: 40, rank: 4, embedding: true }];
  const made = adapterDir('rslora', { r: 4, lora_alpha: 16, use_rslora: true, target_modules: ['q_proj', 'embed_tokens'] }, mods);
  const out = path.join(tmp, 'rs.gguf');
  const res = exportGgufAdapter(made.dir, { modelDir: base, out, name: 'custom' });
  t.equal(res.architecture, 'llama');
  t.same(res.rescaled.sort(), ['model.embed_tokens', 'model.layers.0.self_attn.q_proj'], 'rsLoRA: every module');
  const g = await readGguf(out);
  t.equal(g.parsed.typedMetadata['general.name']!.value, 'custom');
  const q = mods[0]!;
  const a = g.tensors.get('blk.0.attn_q.weight.lora_a')!;
  const b = g.tensors.get('blk.0.attn_q.weight.lora_b')!;
  const got = scaled(matmul(b.data, a.data, 16, 4, 16), 16 / 4);
  const delta = scaled(matmul(made.B.get(q.mod)!, made.A.get(q.mod)!, 16, 4, 16), 16 / Math.sqrt(4));
  assertClose(t, got, numpyPermute(delta, 16, 16, 4), FOLDED, 'alpha/sqrt(r) exactly, through alpha/r');
  const ea = g.tensors.get('token_embd.weight.lora_a')!;
  const eb = g.tensors.get('token_embd.weight.lora_b')!;
  t.same([ea.ne, eb.ne], [[4, 40], [4, 16]], 'token_embd: lora_a is A transposed (ne [r, vocab]), lora_b ne [r, dim]');
  t.same(Array.from(ea.data), Array.from(transposeOf(made.A.get('model.embed_tokens')!, 4, 40)));

  const archs: [string, object, ModSpec[], Record<string, string>][] = [
    ['qwen2', { architectures: ['Qwen2ForCausalLM'], num_attention_heads: 4, num_hidden_layers: 2 },
      [{ mod: 'model.layers.0.self_attn.q_proj', out: 16, inp: 16, rank: 2 }, { mod: 'model.layers.1.self_attn.k_proj', out: 8, inp: 16, rank: 2 }],
      { 'model.layers.0.self_attn.q_proj': 'blk.0.attn_q.weight', 'model.layers.1.self_attn.k_proj': 'blk.1.attn_k.weight' }],
    ['qwen3', { architectures: ['Qwen3ForCausalLM'], num_attention_heads: 4, num_hidden_layers: 2 },
      [{ mod: 'model.layers.1.mlp.down_proj', out: 16, inp: 32, rank: 2 }], { 'model.layers.1.mlp.down_proj': 'blk.1.ffn_down.weight' }],
    ['gemma', { architectures: ['GemmaForCausalLM'], num_attention_heads: 4, num_hidden_layers: 2 },
      [{ mod: 'model.layers.0.self_attn.q_proj', out: 16, inp: 16, rank: 2 }], { 'model.layers.0.self_attn.q_proj': 'blk.0.attn_q.weight' }],
    ['phi3', { architectures: ['Phi3ForCausalLM'], num_attention_heads: 4, num_hidden_layers: 2 },
      [{ mod: 'model.layers.0.self_attn.qkv_proj', out: 48, inp: 16, rank: 2 }, { mod: 'model.layers.0.mlp.gate_up_proj', out: 64, inp: 16, rank: 2 }],
      { 'model.layers.0.self_attn.qkv_proj': 'blk.0.attn_qkv.weight', 'model.layers.0.mlp.gate_up_proj': 'blk.0.ffn_up.weight' }],
    ['gpt2', { architectures: ['GPT2LMHeadModel'], n_head: 4, n_layer: 2 },
      [{ mod: 'transformer.h.1.attn.c_attn', out: 48, inp: 16, rank: 2 }, { mod: 'transformer.h.0.mlp.c_fc', out: 64, inp: 16, rank: 2 }],
      { 'transformer.h.1.attn.c_attn': 'blk.1.attn_qkv.weight', 'transformer.h.0.mlp.c_fc': 'blk.0.ffn_up.weight' }],
  ];
  for (const [arch, cfg, ms, names] of archs) {
    const m = adapterDir(`${arch}-lora`, { r: 2, lora_alpha: 4, target_modules: ms.map((x) => x.mod.split('.').pop()!), fan_in_fan_out: arch === 'gpt2' }, ms);
    const file = path.join(tmp, `${arch}.gguf`);
    const r = exportGgufAdapter(m.dir, { modelDir: modelDir(arch, cfg), out: file });
    t.equal(r.architecture, arch, `${arch}: general.architecture`);
    t.same(r.permuted, [], `${arch}: no q/k permutation outside the Llama family`);
    const gg = await readGguf(file);
    t.equal(gg.parsed.typedMetadata['general.architecture']!.value, arch);
    for (const s of ms) {
      const a = gg.tensors.get(`${names[s.mod]}.lora_a`);
      const b = gg.tensors.get(`${names[s.mod]}.lora_b`);
      t.ok(a && b, `${arch}: ${names[s.mod]}`);
      t.same([a!.ne, b!.ne], [[s.inp, s.rank], [s.rank, s.out]], `${arch}: ${s.mod} shapes (llama.cpp checks W.ne[0] = a.ne[0], W.ne[1] = b.ne[1])`);
      t.same([Array.from(a!.data), Array.from(b!.data)], [Array.from(m.A.get(s.mod)!), Array.from(m.B.get(s.mod)!)], `${arch}: ${s.mod} values`);
    }
  }
});

t.test('GGUF and MLX refuse what they cannot hold, and write nothing', (t) => {
  const llama = modelDir('llama', LLAMA);
  const q: ModSpec = { mod: 'model.layers.0.self_attn.q_proj', out: 16, inp: 16, rank: 2 };
  const out = path.join(tmp, 'refused.gguf');
  const mlxOut = path.join(tmp, 'refused-mlx');
  const both = (dir: string, re: RegExp, what: string, mlxToo = true) => {
    assertLoraError(t, () => exportGgufAdapter(dir, { modelDir: llama, out }), LoraError, 'ERR_LORA_UNSUPPORTED', re, `gguf: ${what}`);
    if (mlxToo) assertLoraError(t, () => exportMlxAdapter(dir, { modelDir: llama, out: mlxOut }), LoraError, 'ERR_LORA_UNSUPPORTED', re, `mlx: ${what}`);
  };
  both(adapterDir('dora', { r: 2, lora_alpha: 2, use_dora: true }, [{ ...q, dora: true }]).dir, /'model\.layers\.0\.self_attn\.q_proj' is a DoRA module, which GGUF \(llama\.cpp\) cannot apply; merge it instead/, 'DoRA', false);
  adapterDir('mixed', { r: 2, lora_alpha: 2 }, [{ ...q, dora: true }, { ...q, mod: 'model.layers.0.self_attn.k_proj', out: 8 }]);
  assertLoraError(t, () => exportMlxAdapter(path.join(tmp, 'mixed'), { modelDir: llama, out: mlxOut }), LoraError, 'ERR_LORA_UNSUPPORTED', /mixes DoRA and plain LoRA modules, and mlx-lm applies one fine_tune_type to all/, 'mlx: mixed DoRA');
  both(adapterDir('extra', { r: 2, lora_alpha: 2 }, [q], { 'base_model.model.score.weight': [1, 2] }).dir, /holds tensors that are not LoRA weights \(base_model\.model\.score\.weight; modules_to_save\?\)/, 'modules_to_save');
  both(adapterDir('nomap', { r: 2, lora_alpha: 2 }, [{ ...q, mod: 'model.layers.0.self_attn.rotary_proj' }]).dir, /llama\.cpp's llama model has no weight for 'model\.layers\.0\.self_attn\.rotary_proj'/, 'unknown module', false);
  const gemma = modelDir('gemma-tied', { architectures: ['GemmaForCausalLM'], num_attention_heads: 4, num_hidden_layers: 2 });
  const head = adapterDir('head', { r: 2, lora_alpha: 2 }, [{ mod: 'lm_head', out: 40, inp: 16, rank: 2 }]).dir;
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: gemma, out }), LoraError, 'ERR_LORA_UNSUPPORTED', /adapts lm_head, but GemmaForCausalLM ties lm_head to the token embeddings/, 'tied lm_head');
  const falcon = modelDir('falcon', { architectures: ['FalconForCausalLM'] });
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: falcon, out }), LoraError, 'ERR_LORA_UNSUPPORTED',
    /Cannot export adapters for FalconForCausalLM \(from .*config\.json\); supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel/, 'architecture');
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: path.join(tmp, 'none'), out }), LoraError, 'ERR_LORA_IO', /Could not read .*none\/config\.json/, 'no config.json');
  const badcfg = modelDir('badcfg', {});
  fs.writeFileSync(path.join(badcfg, 'config.json'), '{"architectures": ');
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: badcfg, out }), LoraError, 'ERR_LORA_FORMAT', /Invalid model config .*badcfg\/config\.json: not valid JSON/, 'config not JSON');
  const noheads = modelDir('noheads', { architectures: ['LlamaForCausalLM'], num_hidden_layers: 2 });
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: noheads, out }), LoraError, 'ERR_LORA_FORMAT', /it has no "num_attention_heads"/, 'missing field');
  assertLoraError(t, () => exportGgufAdapter(head, { modelDir: llama } as never), LoraTypeError, 'ERR_LORA_TYPE', /Expected a \.gguf file path for out but received undefined/, 'out');
  assertLoraError(t, () => exportMlxAdapter(head, { modelDir: llama, outt: 'x' } as never), LoraError, 'ERR_LORA_OPTION', /Unknown option 'outt' for exportMlxAdapter; did you mean 'out'\?/, 'did you mean');
  t.notOk(fs.existsSync(out), 'no GGUF file was left behind');
  t.same(fs.readdirSync(tmp).filter((f) => f.includes('.tmp')), [], 'no temp files');
  t.notOk(fs.existsSync(mlxOut), 'no MLX folder was created');
  t.end();
});

t.test('writeGguf: every metadata type read back by @huggingface/gguf; a bad tensor leaves no file', async (t) => {
  const file = path.join(tmp, 'types.gguf');
  const f32 = Float32Array.from([1.5, -2, 3.25, 0, 7, -0.5]);
  writeGguf(file, new Map([
    ['general.architecture', { type: 'string', value: 'llama' }],
    ['u8', { type: 'uint8', value: 200 }], ['i8', { type: 'int8', value: -5 }], ['u16', { type: 'uint16', value: 60000 }],
    ['i16', { type: 'int16', value: -300 }], ['u32', { type: 'uint32', value: 4000000000 }], ['i32', { type: 'int32', value: -70000 }],
    ['f32', { type: 'float32', value: 0.25 }], ['b', { type: 'bool', value: true }], ['u64', { type: 'uint64', value: 2n ** 40n }],
    ['i64', { type: 'int64', value: -(2n ** 40n) }], ['f64', { type: 'float64', value: 0.1 }], ['s', { type: 'string', value: 'héllo' }],
    ['arr', { type: 'array', itemType: 'int32', value: [1, -2, 3] }], ['sarr', { type: 'array', itemType: 'string', value: ['a', 'bc'] }],
  ]), [
    { name: 'x', type: 'F32', shape: [2, 3], data: () => new Uint8Array(f32.buffer) },
    { name: 'y', type: 'F16', shape: [3], data: () => new Uint8Array([0, 60, 0, 64, 0, 188]) },
  ]);
  const g = await readGguf(file);
  const md = g.parsed.typedMetadata as Record<string, { value: unknown; type: number; subType?: number }>;
  const expect: [string, unknown, GGUFValueType][] = [
    ['u8', 200, GGUFValueType.UINT8], ['i8', -5, GGUFValueType.INT8], ['u16', 60000, GGUFValueType.UINT16], ['i16', -300, GGUFValueType.INT16],
    ['u32', 4000000000, GGUFValueType.UINT32], ['i32', -70000, GGUFValueType.INT32], ['f32', 0.25, GGUFValueType.FLOAT32], ['b', true, GGUFValueType.BOOL],
    ['u64', 2n ** 40n, GGUFValueType.UINT64], ['i64', -(2n ** 40n), GGUFValueType.INT64], ['f64', 0.1, GGUFValueType.FLOAT64], ['s', 'héllo', GGUFValueType.STRING],
  ];
  for (const [k, v, ty] of expect) t.same([md[k]!.value, md[k]!.type], [v, ty], k);
  t.same([md.arr!.value, md.arr!.type, md.arr!.subType], [[1, -2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32]);
  t.same(md.sarr!.value, ['a', 'bc']);
  const x = g.tensors.get('x')!;
  t.same([x.ne, x.dtype, Array.from(x.data)], [[3, 2], 0, Array.from(f32)], 'ne reversed from the row-major shape');
  t.same([g.tensors.get('y')!.ne, g.tensors.get('y')!.dtype, g.tensors.get('y')!.offset], [[3], 1, 32], 'F16, offset padded to 32');
  t.equal(g.size, Number(g.parsed.tensorDataOffset) + 32 + 32, 'each tensor padded to 32 bytes');
  const bad = path.join(tmp, 'bad.gguf');
  assertLoraError(t, () => writeGguf(bad, new Map(), [{ name: 'x', type: 'F32', shape: [2, 2], data: () => new Uint8Array(12) }]), LoraError, 'ERR_LORA_SHAPE',
    /GGUF tensor 'x' of shape \[2, 2\] F32 needs 16 bytes but its data has 12/, 'short data');
  assertLoraError(t, () => writeGguf(bad, new Map([['k', { type: 'uint8', value: 300 }]]), []), LoraError, 'ERR_LORA_TYPE', /GGUF metadata k: 300 is not a valid uint8/, 'value out of range');
  assertLoraError(t, () => writeGguf(bad, {} as never, []), LoraTypeError, 'ERR_LORA_TYPE', /Expected a Map of key to \{ type, value \} for metadata but received an object/, 'metadata not a Map');
  assertLoraError(t, () => writeGguf(bad, new Map([['k', { type: 'toString', value: 1 }]]) as never, []), LoraTypeError, 'ERR_LORA_TYPE', /for metadata 'k' but received an object/, 'unknown value type');
  assertLoraError(t, () => writeGguf(bad, new Map(), [{ name: 'x', type: 'Q4_0', shape: [2], data: () => new Uint8Array(8) }] as never), LoraTypeError, 'ERR_LORA_TYPE', /for tensors\[0\] but received an object/, 'unknown tensor type');
  t.notOk(fs.existsSync(bad), 'nothing written');
  t.same(fs.readdirSync(tmp).filter((f) => f.includes('.tmp')), [], 'no temp files');
});

// ---- MLX -----------------------------------------------------------------------------------------

t.test('MLX: key names, transposed A/B, ranks padded, scalings folded, num_layers, keys', (t) => {
  const base = modelDir('llama', LLAMA);
  const made = adapterDir('llama-lora-mlx', {
    r: 4, lora_alpha: 8, lora_dropout: 0.05, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'],
    rank_pattern: { gate_proj: 2 }, alpha_pattern: { up_proj: 12 },
  }, llamaMods);
  const out = path.join(tmp, 'mlx-llama');
  const res = exportMlxAdapter(made.dir, { modelDir: base, out });
  const cfg = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8'));
  t.same(cfg, {
    fine_tune_type: 'lora', num_layers: 2,
    lora_parameters: { rank: 4, scale: 2, dropout: 0.05, keys: ['lm_head', 'mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj', 'self_attn.k_proj', 'self_attn.o_proj', 'self_attn.q_proj', 'self_attn.v_proj'] },
  }, 'first adapted layer 1 of 3: num_layers 2; keys relative to a layer, top-level ones in full');
  t.equal(res.modelType, 'llama');
  const st = readSafetensorsByHand(path.join(out, 'adapters.safetensors'));
  t.same(st.metadata, { format: 'mlx' });
  t.equal(st.tensors.size, 16);
  for (const s of llamaMods) {
    const a = st.tensors.get(`${s.mod}.lora_a`)!;
    const b = st.tensors.get(`${s.mod}.lora_b`)!;
    t.same([a.dtype, a.shape, b.dtype, b.shape], ['F32', [s.inp, 4], 'F32', [4, s.out]], `${s.mod}: lora_a (in, rank), lora_b (rank, out)`);
    const A = made.A.get(s.mod)!;
    const B = made.B.get(s.mod)!;
    const expA = new Float64Array(s.inp * 4);
    for (let k = 0; k < s.rank; k++) for (let i = 0; i < s.inp; i++) expA[i * 4 + k] = A[k * s.inp + i]!;
    t.same(Array.from(a.data), Array.from(expA), `${s.mod}: lora_a = Aᵀ${s.rank < 4 ? ', zero-padded to rank 4' : ''}`);
    // what mlx-lm applies: scale · (x @ lora_a) @ lora_b, i.e. scale · (lora_a @ lora_b)ᵀ as a weight update
    const got = transposeOf(scaled(matmul(a.data, b.data, s.inp, 4, s.out), 2), s.inp, s.out);
    const scaling = (s.mod.endsWith('up_proj') ? 12 : 8) / s.rank;
    assertClose(t, got, scaled(matmul(B, A, s.out, s.rank, s.inp), scaling), FOLDED, `${s.mod}: the update mlx-lm applies`);
  }
  t.end();
});

t.test('MLX: GPT-2 paths, DoRA magnitudes, embeddings', (t) => {
  const gpt2 = modelDir('gpt2', { architectures: ['GPT2LMHeadModel'], n_head: 4, n_layer: 2 });
  const mods: ModSpec[] = [{ mod: 'transformer.h.1.attn.c_attn', out: 48, inp: 16, rank: 2 }, { mod: 'transformer.wte', out: 16, inp: 40, rank: 2, embedding: true }];
  const made = adapterDir('gpt2-mlx', { r: 2, lora_alpha: 4, fan_in_fan_out: true }, mods);
  const out = path.join(tmp, 'mlx-gpt2');
  const res = exportMlxAdapter(made.dir, { modelDir: gpt2, out });
  t.same([res.modelType, res.numLayers, res.keys], ['gpt2', 1, ['attn.c_attn', 'model.wte']], "mlx-lm's GPT-2 lives under model.h / model.wte");
  const st = readSafetensorsByHand(path.join(out, 'adapters.safetensors'));
  t.same([...st.tensors.keys()].sort(), ['model.h.1.attn.c_attn.lora_a', 'model.h.1.attn.c_attn.lora_b', 'model.wte.lora_a', 'model.wte.lora_b']);
  const ea = st.tensors.get('model.wte.lora_a')!;
  t.same(ea.shape, [40, 2], 'LoRAEmbedding.lora_a is (num_embeddings, rank)');
  t.same(Array.from(ea.data), Array.from(transposeOf(made.A.get('transformer.wte')!, 2, 40)));

  const llama = modelDir('llama', LLAMA);
  const dmods: ModSpec[] = [{ mod: 'model.layers.2.self_attn.q_proj', out: 16, inp: 16, rank: 2, dora: true }, { mod: 'model.layers.2.self_attn.v_proj', out: 8, inp: 16, rank: 2, dora: true }];
  const dm = adapterDir('dora-mlx', { r: 2, lora_alpha: 4, use_dora: true }, dmods);
  const dout = path.join(tmp, 'mlx-dora');
  const dres = exportMlxAdapter(dm.dir, { modelDir: llama, out: dout });
  t.same([dres.fineTuneType, dres.numLayers], ['dora', 1]);
  const ds = readSafetensorsByHand(path.join(dout, 'adapters.safetensors'));
  for (const s of dmods) t.same(Array.from(ds.tensors.get(`${s.mod}.m`)!.data), Array.from(dm.M.get(s.mod)!), `${s.mod}.m is PEFT's magnitude`);
  t.equal(JSON.parse(fs.readFileSync(path.join(dout, 'adapter_config.json'), 'utf8')).fine_tune_type, 'dora');
  t.end();
});

t.test('exports take a PeftAdapter in memory too', (t) => {
  const llama = modelDir('llama', LLAMA);
  const made = adapterDir('inmem', { r: 2, lora_alpha: 2 }, [{ mod: 'model.layers.0.self_attn.v_proj', out: 8, inp: 16, rank: 2 }]);
  const tensors = new Map([
    ['base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight', tensor(Array.from(made.A.get('model.layers.0.self_attn.v_proj')!), [2, 16])],
    ['base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight', tensor(Array.from(made.B.get('model.layers.0.self_attn.v_proj')!), [8, 2])],
  ]);
  const a: PeftAdapter = adapterFromTensors({ r: 2, lora_alpha: 2 }, tensors);
  const r = exportGgufAdapter(a, { modelDir: llama, out: path.join(tmp, 'inmem.gguf') });
  t.equal(r.tensors, 2);
  const m = exportMlxAdapter(a, { modelDir: llama, out: path.join(tmp, 'inmem-mlx') });
  t.equal(m.numLayers, 3);
  t.equal(a.modules.get('model.layers.0.self_attn.v_proj')!.loraA.shape[0], 2, 'the caller keeps its adapter (not disposed)');
  a.dispose();
  t.end();
});
