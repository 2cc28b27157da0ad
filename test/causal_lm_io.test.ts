// Loading and saving Hugging Face folders: every malformed checkpoint gets an ERR_LORA_FORMAT (or
// ERR_LORA_UNSUPPORTED) naming the file, the key and expected vs found, and leaves no tensor alive;
// saveCausalLM writes what loadCausalLM (and transformers) read back, sharded or not, GPT-2's Conv1D
// weights transposed back, tied heads once, tokenizer files copied; dtype overrides; argument errors.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t, { Test } from 'tap';

import {
  applyLora, CausalLM, linear, loadCausalLM, loadSafetensors, LoraError, LoraLinear, LoraRangeError, loraLayers, memory, mergeAndUnload, noGrad,
  readSafetensorsHeader, saveCausalLM, saveSafetensors, tensor, Tensor,
} from '../lib/index';
import { assertClose, assertLoraError } from './helpers';
import { Arch, CheckpointOptions, writeCheckpoint } from './hf_checkpoint';
import { causalLmRef } from './ref/causal_lm_ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-causal-io-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
let counter = 0;
const fresh = (arch: Arch, o: CheckpointOptions = {}) => writeCheckpoint(path.join(tmp, `c${counter++}`), arch, o);

/** Asserts that a promise rejects with a LoraError of this code and message, leaving no tensor alive. */
async function rejects(t: Test, make: () => Promise<unknown>, code: string, message: RegExp, what: string): Promise<void> {
  const before = memory().numTensors;
  try {
    await make();
    t.fail(`${what}: expected a rejection`);
  } catch (err) {
    t.ok(err instanceof LoraError, `${what}: a LoraError`);
    t.equal((err as LoraError).code, code, `${what}: ${code}`);
    t.match((err as Error).message, message, `${what}: message`);
  }
  t.equal(memory().numTensors, before, `${what}: no tensor left alive`);
}

const ROWS = [[3, 17, 42, 5, 8, 90, 1], [7, 7, 2, 60, 33, 11, 4]];

function logitsOf(model: CausalLM, rows = ROWS): Float32Array {
  return noGrad(() => {
    const ids = tensor(rows.flat(), [rows.length, rows[0]!.length], { dtype: 'int32' });
    const y = model.forward(ids);
    const d = y.toFloat32Array();
    ids.dispose();
    y.dispose();
    return d;
  });
}

t.test('malformed checkpoints', async (t) => {
  const c = fresh('llama', { edit: (w) => w.delete('model.layers.1.mlp.up_proj.weight') });
  await rejects(t, () => loadCausalLM(c.dir), 'ERR_LORA_FORMAT',
    /^Missing weight 'model\.layers\.1\.mlp\.up_proj\.weight' in .*model\.safetensors: LlamaForCausalLM with this config\.json expects a tensor of shape \[72, 40\]$/, 'missing weight');
  const u = fresh('llama', { edit: (w) => w.set('model.layers.0.self_attn.extra.weight', { shape: [2], data: new Float64Array(2) }) });
  await rejects(t, () => loadCausalLM(u.dir), 'ERR_LORA_FORMAT',
    /^Unexpected weight 'model\.layers\.0\.self_attn\.extra\.weight' \(in .*model\.safetensors\): LlamaForCausalLM with this config\.json has no such parameter$/, 'unexpected weight');
  const s = fresh('qwen2', { shards: 2, edit: (w) => w.set('model.layers.1.self_attn.k_proj.bias', { shape: [9], data: new Float64Array(9) }) });
  await rejects(t, () => loadCausalLM(s.dir), 'ERR_LORA_FORMAT',
    /^Weight 'model\.layers\.1\.self_attn\.k_proj\.bias' in .*model-0000[12]-of-00002\.safetensors has shape \[9\] but Qwen2ForCausalLM with this config\.json expects \[16\]$/, 'mis-shaped weight');
  const tr = fresh('gpt2', { shards: 3 });
  const shard = path.join(tr.dir, 'model-00002-of-00003.safetensors');
  fs.truncateSync(shard, fs.statSync(shard).size - 10);
  await rejects(t, () => loadCausalLM(tr.dir), 'ERR_LORA_FORMAT', /^Invalid safetensors file .*model-00002-of-00003\.safetensors: tensor '.*' data_offsets .* run past the end/, 'truncated shard');
  const nj = fresh('llama');
  fs.writeFileSync(path.join(nj.dir, 'config.json'), '{"architectures": ["LlamaForCausalLM"], ');
  await rejects(t, () => loadCausalLM(nj.dir), 'ERR_LORA_FORMAT', /^Invalid config .*config\.json: not valid JSON/, 'config not JSON');
  fs.writeFileSync(path.join(nj.dir, 'config.json'), '[1, 2]');
  await rejects(t, () => loadCausalLM(nj.dir), 'ERR_LORA_FORMAT', /^Invalid config .*config\.json: expected a JSON object but found \[1,2\] \(array of 2\)$/, 'config not an object');
  fs.rmSync(path.join(nj.dir, 'config.json'));
  await rejects(t, () => loadCausalLM(nj.dir), 'ERR_LORA_FORMAT', /^Expected a Hugging Face model folder with config\.json but .*config\.json does not exist$/, 'no config.json');
  const mf = fresh('llama');
  fs.writeFileSync(path.join(mf.dir, 'config.json'), JSON.stringify({ ...mf.config, hidden_size: undefined }));
  await rejects(t, () => loadCausalLM(mf.dir), 'ERR_LORA_FORMAT', /^Invalid config .*config\.json: 'hidden_size' is missing \(expected an integer >= 1\)$/, 'config lacks a field');
  const wt = fresh('mistral', { config: { num_attention_heads: '4' } });
  await rejects(t, () => loadCausalLM(wt.dir), 'ERR_LORA_FORMAT', /^Invalid config .*config\.json: expected an integer >= 1 for 'num_attention_heads' but found "4" \(string\)$/, 'a field of the wrong type');
  const kv = fresh('llama', { config: { num_key_value_heads: 2 } });
  await rejects(t, () => loadCausalLM(kv.dir), 'ERR_LORA_FORMAT', /expected a divisor of num_attention_heads \(5\) for 'num_key_value_heads' but found 2 \(number\)$/, 'kv heads that do not divide heads');
  const ar = fresh('llama', { config: { architectures: ['MambaForCausalLM'], model_type: 'mamba' } });
  await rejects(t, () => loadCausalLM(ar.dir), 'ERR_LORA_UNSUPPORTED',
    /^Unsupported architecture MambaForCausalLM in .*config\.json; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel$/, 'unknown architecture');
  const ry = fresh('llama', { config: { rope_scaling: { rope_type: 'yarn', factor: 4.0 } } });
  await rejects(t, () => loadCausalLM(ry.dir), 'ERR_LORA_UNSUPPORTED', /^Unsupported rope_scaling type "yarn" in .*config\.json; supported: default, linear, dynamic, llama3, longrope$/, 'unsupported RoPE scaling');
  const l3 = fresh('llama', { config: { rope_scaling: { rope_type: 'llama3', factor: 8.0 } } });
  await rejects(t, () => loadCausalLM(l3.dir), 'ERR_LORA_FORMAT', /^Invalid config .*config\.json \(rope_scaling\): 'low_freq_factor' is missing \(expected a number\)$/, 'llama3 scaling without its fields');
  const ac = fresh('gpt2', { config: { activation_function: 'gelu_10' } });
  await rejects(t, () => loadCausalLM(ac.dir), 'ERR_LORA_UNSUPPORTED', /^Unsupported activation "gelu_10" for 'activation_function' in .*; supported: silu, swish, gelu,/, 'unknown activation');
  // an integer tensor where a weight belongs
  const it = fresh('llama');
  const file = path.join(it.dir, 'model.safetensors');
  const { tensors } = loadSafetensors(file);
  const name = 'model.layers.0.input_layernorm.weight';
  tensors.get(name)!.dispose();
  tensors.set(name, tensor(new Float32Array(40).fill(1), [40], { dtype: 'int32' }));
  saveSafetensors(file, tensors);
  for (const x of tensors.values()) x.dispose();
  await rejects(t, () => loadCausalLM(it.dir), 'ERR_LORA_FORMAT', /^Weight 'model\.layers\.0\.input_layernorm\.weight' in .* holds I32 values but a floating-point tensor was expected$/, 'integer weight');
  const pt = path.join(tmp, 'pt-only');
  fs.mkdirSync(pt);
  fs.writeFileSync(path.join(pt, 'config.json'), JSON.stringify({ architectures: ['LlamaForCausalLM'] }));
  fs.writeFileSync(path.join(pt, 'pytorch_model.bin'), 'x');
  await rejects(t, () => loadCausalLM(pt), 'ERR_LORA_UNSUPPORTED', /^Found only pytorch_model\.bin in .*: lora-native reads safetensors/, 'pickle checkpoints');
  fs.rmSync(path.join(pt, 'pytorch_model.bin'));
  await rejects(t, () => loadCausalLM(pt), 'ERR_LORA_IO', /Found no model\.safetensors\.index\.json or model\.safetensors in/, 'no weights at all');
});

t.test('what transformers accepts loads', async (t) => {
  // model_type instead of architectures, a saved rotary buffer, a tied head saved anyway
  const c = fresh('qwen3', {
    config: { architectures: undefined },
    edit: (w) => {
      w.set('model.layers.0.self_attn.rotary_emb.inv_freq', { shape: [8], data: new Float64Array(8) });
      w.set('lm_head.weight', w.get('model.embed_tokens.weight')!);
    },
  });
  const q = await loadCausalLM(c.dir);
  t.equal(q.architecture, 'Qwen3ForCausalLM', 'model_type qwen3 -> Qwen3ForCausalLM');
  c.weights.delete('lm_head.weight');
  assertClose(t, logitsOf(q), causalLmRef('qwen3', c.config, c.weights, ROWS), { atol: 2e-4, rtol: 2e-4 }, 'the rotary buffer and the saved tied head are ignored');
  q.dispose();
  const l = fresh('llama', { config: { architectures: undefined }, edit: (w) => w.set('model.layers.0.self_attn.rotary_emb.inv_freq', { shape: [4], data: new Float64Array(4) }) });
  const m = await loadCausalLM(l.dir);
  t.equal(m.architecture, 'LlamaForCausalLM', 'model_type llama -> LlamaForCausalLM');
  assertClose(t, logitsOf(m), causalLmRef('llama', l.config, l.weights, ROWS), { atol: 2e-4, rtol: 2e-4 }, 'the ignored buffer changes nothing');
  m.dispose();
});

t.test('saveCausalLM writes folders loadCausalLM and transformers read back', async (t) => {
  const src = fresh('llama', { dtype: 'float32' });
  fs.writeFileSync(path.join(src.dir, 'tokenizer.json'), '{"model": {}}');
  fs.writeFileSync(path.join(src.dir, 'tokenizer_config.json'), '{"chat_template": "x"}');
  fs.writeFileSync(path.join(src.dir, 'generation_config.json'), '{"eos_token_id": [2, 9]}');
  const model = await loadCausalLM(src.dir);
  t.same(model.generationConfig, { eos_token_id: [2, 9] }, 'generation_config.json is read');
  const out = path.join(tmp, 'saved-llama');
  await saveCausalLM(model, out);
  t.same(fs.readdirSync(out).sort(), ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'], 'one file, config, tokenizer and generation files');
  const again = await loadCausalLM(out);
  t.same(logitsOf(again), logitsOf(model), 'the same logits after a round trip');
  t.same(JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')), { ...src.config, torch_dtype: 'float32' }, 'config.json kept');
  t.same(readSafetensorsHeader(path.join(out, 'model.safetensors')).metadata, { format: 'pt' }, 'metadata format pt, as transformers requires');
  again.dispose();

  // applyLora'd models must be merged first
  applyLora(model, { targetModules: ['q_proj'], rank: 2, seed: 1 });
  await rejects(t, () => saveCausalLM(model, path.join(tmp, 'never')), 'ERR_LORA_STATE', /^Expected a model without LoRA layers for saveCausalLM\(\) but 2 remain \(model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj\); merge them/, 'unmerged LoRA');
  t.notOk(fs.existsSync(path.join(tmp, 'never')), 'nothing written');
  model.dispose();

  // bf16, tied, sharded with an index, then re-saved in one file: the old shards go
  const q = fresh('qwen3', { dtype: 'bfloat16' });
  const qm = await loadCausalLM(q.dir);
  const qout = path.join(tmp, 'saved-qwen3');
  await saveCausalLM(qm, qout, { maxShardSize: 20000 });
  const index = JSON.parse(fs.readFileSync(path.join(qout, 'model.safetensors.index.json'), 'utf8'));
  const shards = fs.readdirSync(qout).filter((f) => f.endsWith('.safetensors'));
  t.ok(shards.length >= 3 && shards.every((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)), `${shards.length} shards named as transformers names them`);
  t.same(Object.keys(index.weight_map).sort(), [...q.weights.keys()].sort(), 'the index maps every weight, the tied head not at all');
  t.equal(index.metadata.total_size, [...q.weights.values()].reduce((a, w) => a + 2 * w.data.length, 0), 'total_size in bytes');
  t.equal(readSafetensorsHeader(path.join(qout, shards[0]!)).entries[0]!.dtype, 'BF16', 'saved in the model dtype');
  const embedFile = path.join(qout, index.weight_map['model.embed_tokens.weight']);
  t.equal(readSafetensorsHeader(embedFile).entries.find((e) => e.name === 'model.embed_tokens.weight')!.dtype, 'BF16', 'the tied table saved in the model dtype');
  t.equal(qm.backbone.inputEmbedding.dtype, 'bfloat16', 'the table kept as bfloat16 (one tensor with the tied head)');
  const qm2 = await loadCausalLM(qout);
  t.same(logitsOf(qm2), logitsOf(qm), 'the same logits after a sharded round trip');
  qm2.dispose();
  await saveCausalLM(qm, qout);
  t.same(fs.readdirSync(qout).sort(), ['config.json', 'model.safetensors'], 'a later single-file save removes the old shards and index');
  qm.dispose();

  // GPT-2's Conv1D weights go back to [in, out], values unchanged
  const g = fresh('gpt2');
  const gm = await loadCausalLM(g.dir);
  const gout = path.join(tmp, 'saved-gpt2');
  await saveCausalLM(gm, gout);
  const saved = loadSafetensors(path.join(gout, 'model.safetensors')).tensors;
  const w = saved.get('transformer.h.1.mlp.c_fc.weight')!;
  t.same(w.shape, [32, 128], 'c_fc weight saved as [in, out]');
  t.same(Array.from(w.toFloat32Array()), Array.from(g.weights.get('h.1.mlp.c_fc.weight')!.data), 'with the checkpoint\'s values');
  t.notOk(saved.has('lm_head.weight'), 'the tied head is not written twice');
  for (const x of saved.values()) x.dispose();

  // LoRA on GPT-2's Conv1D layers, merged and unloaded: the Linears put back still save as [in, out]
  applyLora(gm, { targetModules: ['c_attn', 'c_fc'], rank: 2, seed: 3 });
  for (const l of loraLayers(gm).values()) noGrad(() => l.loraB.assign(tensor(Array.from({ length: l.loraB.size }, (_, i) => Math.sin(i) * 0.1), l.loraB.shape)));
  const adapted = logitsOf(gm);
  mergeAndUnload(gm);
  const mout = path.join(tmp, 'saved-gpt2-merged');
  await saveCausalLM(gm, mout);
  t.same(readSafetensorsHeader(path.join(mout, 'model.safetensors')).entries.find((e) => e.name === 'transformer.h.1.mlp.c_fc.weight')!.shape, [32, 128], 'merged c_fc saved as [in, out]');
  const gm2 = await loadCausalLM(mout);
  assertClose(t, logitsOf(gm2), adapted, { atol: 1e-4, rtol: 1e-4 }, 'the merged GPT-2 reloads with the adapted logits');
  gm2.dispose();
  gm.dispose();
});

t.test('dtype overrides: frozen weights as asked, activations float32', async (t) => {
  const c = fresh('phi3', { dtype: 'float32' });
  const ref = causalLmRef('phi3', c.config, c.weights, ROWS);
  for (const [dtype, tol] of [['float32', 2e-4], ['bfloat16', 0.1], ['float16', 2e-2]] as const) {
    const m = await loadCausalLM(c.dir, { dtype });
    t.equal(m.dtype, dtype, `${dtype}: model.dtype`);
    const q = m.getModule('model.layers.0.self_attn.qkv_proj') as unknown as { weight: Tensor };
    t.equal(q.weight.dtype, dtype, `${dtype}: projections stored as ${dtype}`);
    t.equal((m.getModule('model.norm') as unknown as { weight: Tensor }).weight.dtype, 'float32', `${dtype}: norms float32`);
    t.equal(m.backbone.inputEmbedding.dtype, dtype, `${dtype}: the embedding table stored as ${dtype}`);
    assertClose(t, logitsOf(m), ref, { atol: tol, rtol: tol }, `${dtype}: logits near the reference`);
    applyLora(m, { targetModules: 'all-linear', rank: 2, seed: 3 });
    for (const l of loraLayers(m).values()) l.loraB.assign(new Float32Array(l.loraB.size).fill(0.02));
    const before = logitsOf(m);
    for (const l of loraLayers(m).values()) l.merge();
    assertClose(t, logitsOf(m), before, { atol: tol, rtol: tol }, `${dtype}: LoRA merged into ${dtype} weights gives the unmerged logits`);
    m.dispose();
  }
  const b = fresh('gemma', { dtype: 'bfloat16' });
  const wide = await loadCausalLM(b.dir, { dtype: 'float32' });
  assertClose(t, logitsOf(wide), causalLmRef('gemma', b.config, b.weights, ROWS, { dtype: 'float32' }), { atol: 2e-4, rtol: 2e-4 }, 'a bf16 checkpoint loaded as float32');
  wide.dispose();
});

t.test('argument errors', async (t) => {
  const c = fresh('gpt2');
  await rejects(t, () => loadCausalLM(c.dir, { dtyp: 'float32' } as never), 'ERR_LORA_OPTION', /^Unknown option 'dtyp' for loadCausalLM\(\); did you mean 'dtype'\?$/, 'unknown load option');
  await rejects(t, () => loadCausalLM(c.dir, { dtype: 'int8' as never }), 'ERR_LORA_RANGE', /^Expected one of 'float32', 'bfloat16', 'float16' for dtype but received "int8" \(string\)$/, 'bad dtype');
  await rejects(t, () => loadCausalLM(42 as never), 'ERR_LORA_TYPE', /^Expected a model folder path for dir but received 42 \(number\)$/, 'bad dir');
  const m = await loadCausalLM(c.dir);
  const ids = tensor([1, 2, 3], [1, 3], { dtype: 'int32' });
  assertLoraError(t, () => m.forward(tensor([1, 2, 3], [1, 3])), LoraError, 'ERR_LORA_DTYPE', /^Expected int32 ids but received float32/, 'float ids');
  assertLoraError(t, () => m.forward(tensor([1, 2, 3], [3], { dtype: 'int32' })), LoraError, 'ERR_LORA_SHAPE', /^Expected ids of shape \[batch, seq\] with batch, seq >= 1 but received \[3\]$/, '1-D ids');
  assertLoraError(t, () => m.forward(ids, { attention_mask: ids } as never), LoraError, 'ERR_LORA_OPTION', /did you mean 'attentionMask'\?$/, 'unknown forward option');
  assertLoraError(t, () => m.forward(ids, { attentionMask: tensor([1, 2, 1], [1, 3], { dtype: 'int32' }) }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected values 0 or 1 for attentionMask but received 2 \(number\)$/, 'mask value');
  assertLoraError(t, () => m.forward(ids, { attentionMask: tensor([1, 1], [1, 2], { dtype: 'int32' }) }), LoraError, 'ERR_LORA_SHAPE', /^Expected attentionMask of shape \[1, 3\] but received \[1, 2\]$/, 'mask shape');
  assertLoraError(t, () => m.forward(ids, { positionIds: tensor([0, 30, 2], [1, 3], { dtype: 'int32' }) }), LoraRangeError, 'ERR_LORA_RANGE', /^Expected positions between 0 and 23 \(GPT-2's n_positions learned positions\) for positionIds but received 30 \(number\)$/, 'GPT-2 position past n_positions');
  assertLoraError(t, () => m.forward(tensor([1, 97, 3], [1, 3], { dtype: 'int32' })), LoraError, 'ERR_LORA_RANGE', /^Expected every id between 0 and 96 for embedding/, 'token id past the vocabulary');
  const cache = m.createCache(1, 4);
  noGrad(() => m.forward(ids, { cache }).dispose());
  assertLoraError(t, () => m.forward(ids, { cache }), LoraError, 'ERR_LORA_STATE', /^Expected at most 1 more positions for this cache \(maxLength 4, 3 used\) but received 3$/, 'cache too short');
  assertLoraError(t, () => m.forward(tensor([1, 2, 3, 4, 5, 6], [2, 3], { dtype: 'int32' }), { cache }), LoraError, 'ERR_LORA_SHAPE', /^Expected ids with 1 rows for this cache but received 2$/, 'cache of another batch size');
  cache.dispose();
  assertLoraError(t, () => m.forward(ids, { cache }), LoraError, 'ERR_LORA_STATE', /disposed/, 'a disposed cache');
  await rejects(t, () => m.generate([1, 2], { max_new_tokens: 3 } as never), 'ERR_LORA_OPTION', /did you mean 'maxNewTokens'\?$/, 'unknown generate option');
  await rejects(t, () => m.generate([]), 'ERR_LORA_TYPE', /^Expected a non-empty array of token ids, or an array of such arrays for promptIds but received \[\] \(array of 0\)$/, 'empty prompt');
  await rejects(t, () => m.generate([[1], [2, 120]]), 'ERR_LORA_RANGE', /^Expected an integer between 0 and 96 for promptIds\[1\]\[1\] but received 120 \(number\)$/, 'token id out of range');
  await rejects(t, () => m.generate([1], { topP: 0 }), 'ERR_LORA_RANGE', /^Expected a number in \(0, 1\] for topP but received 0 \(number\)$/, 'topP 0');
  await rejects(t, () => m.generate([1, 2, 3], { maxNewTokens: 30 }), 'ERR_LORA_RANGE', /^Expected prompt \+ maxNewTokens within the model's 24 positions but prompt 0 has 3 tokens and maxNewTokens is 30$/, 'past GPT-2\'s positions');
  assertLoraError(t, () => m.createCache(0, 3), LoraRangeError, 'ERR_LORA_RANGE', /^Expected an integer between 1 and 2147483647 for batchSize but received 0 \(number\)$/, 'createCache(0, ...)');
  assertLoraError(t, () => new (CausalLM as unknown as new (x: unknown) => unknown)({}), LoraError, 'ERR_LORA_TYPE', /^A CausalLM is made by loadCausalLM\(\), not new CausalLM\(\)$/, 'new CausalLM()');
  const w = tensor([1, 2, 3, 4, 5, 6], [2, 3], { dtype: 'int32' });
  assertLoraError(t, () => linear(tensor([1, 2, 3], [1, 3]), w), LoraError, 'ERR_LORA_DTYPE', /^Expected a float32, bfloat16 or float16 weight for linear\(\) but received int32$/, 'an int32 weight for linear()');
  assertLoraError(t, () => new LoraLinear({ inFeatures: 3, outFeatures: 2, rank: 1, weight: w }), LoraError, 'ERR_LORA_DTYPE', /^Expected a float32, bfloat16 or float16 weight but received int32$/, 'an int32 weight for LoraLinear');
  w.dispose();
  ids.dispose();
  m.dispose();
});
