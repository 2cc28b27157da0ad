// The PEFT adapter format: hand-built fixtures with PEFT's key names and every config option,
// rank/alpha patterns by PEFT's rule, target matching, byte-identical round-trips and the
// malformed-adapter errors.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { LoraError, loadPeftAdapter, matchPatternKey, moduleScaling, saveSafetensors, savePeftAdapter, targetsModule, tensor, Tensor } from '../lib/index';
import { assertLoraError, leakChecked, randomData } from './helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-peft-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const rnd = (shape: number[], seed: number, dtype: 'float32' | 'bfloat16' | 'float16' = 'float32') =>
  tensor(Float32Array.from(randomData(shape.reduce((a, b) => a * b, 1), seed)), shape, { dtype });

/** Writes a PEFT folder; returns the tensors written (caller disposes). */
function writeFixture(d: string, config: Record<string, unknown>, tensors: Record<string, Tensor>): void {
  fs.mkdirSync(d, { recursive: true });
  fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify(config, null, 2));
  saveSafetensors(path.join(d, 'adapter_model.safetensors'), tensors, { metadata: { format: 'pt' } });
}

t.test('rank_pattern / alpha_pattern keys match by PEFT\'s rule', (t) => {
  t.equal(matchPatternKey(['q_proj'], 'model.layers.0.self_attn.q_proj'), 'q_proj', 'suffix at a dot');
  t.equal(matchPatternKey(['proj'], 'model.layers.0.self_attn.q_proj'), undefined, 'not a partial component');
  t.equal(matchPatternKey(['layers.1.self_attn.q_proj', 'q_proj'], 'model.layers.1.self_attn.q_proj'), 'layers.1.self_attn.q_proj', 'first key in order wins');
  t.equal(matchPatternKey(['q_proj', 'layers.1.self_attn.q_proj'], 'model.layers.1.self_attn.q_proj'), 'q_proj', 'order decides');
  t.equal(matchPatternKey(['layers\\.[0-2]\\..*v_proj'], 'model.layers.2.attn.v_proj'), 'layers\\.[0-2]\\..*v_proj', 'regex keys');
  t.equal(matchPatternKey(['model.layers.0.q'], 'model.layers.0.q'), 'model.layers.0.q', 'whole path');
  const cfg = { r: 8, lora_alpha: 16, rank_pattern: { v_proj: 4 }, alpha_pattern: { 'layers.1.self_attn.q_proj': 3 } };
  t.same(moduleScaling(cfg, 'model.layers.0.self_attn.q_proj'), { rank: 8, alpha: 16, scaling: 2 });
  t.same(moduleScaling(cfg, 'model.layers.0.self_attn.v_proj'), { rank: 4, alpha: 16, scaling: 4 });
  t.same(moduleScaling({ ...cfg, use_rslora: true }, 'model.layers.1.self_attn.q_proj'), { rank: 8, alpha: 3, scaling: 3 / Math.sqrt(8) });
  t.same(moduleScaling({}, 'x'), { rank: 8, alpha: 8, scaling: 1 }, 'PEFT defaults r=8, alpha=8');
  t.end();
});

t.test('target_modules: list, regex, exclude_modules, layers_to_transform', (t) => {
  t.ok(targetsModule({ target_modules: ['q_proj', 'v_proj'] }, 'model.layers.3.self_attn.q_proj'));
  t.notOk(targetsModule({ target_modules: ['q_proj'] }, 'model.layers.3.self_attn.qq_proj'));
  t.ok(targetsModule({ target_modules: '.*\\.(q|v)_proj' }, 'model.layers.3.self_attn.v_proj'));
  t.notOk(targetsModule({ target_modules: '(q|v)_proj' }, 'model.layers.3.self_attn.v_proj'), 'a regex string must match the whole name');
  t.notOk(targetsModule({ target_modules: ['q_proj'], exclude_modules: ['layers.3.self_attn.q_proj'] }, 'model.layers.3.self_attn.q_proj'));
  t.ok(targetsModule({ target_modules: ['q_proj'], layers_to_transform: [0, 2] }, 'model.layers.2.self_attn.q_proj'));
  t.notOk(targetsModule({ target_modules: ['q_proj'], layers_to_transform: [0, 2] }, 'model.layers.1.self_attn.q_proj'));
  t.ok(targetsModule({ target_modules: ['c_attn'], layers_to_transform: 1, layers_pattern: 'h' }, 'transformer.h.1.attn.c_attn'));
  t.end();
});

void leakChecked(t, 'load every key kind and config field; save is byte-identical', (t) => {
  const d = path.join(dir, 'full');
  const P = 'base_model.model.';
  const tensors: Record<string, Tensor> = {
    [`${P}model.layers.0.self_attn.q_proj.lora_A.weight`]: rnd([8, 12], 1),
    [`${P}model.layers.0.self_attn.q_proj.lora_B.weight`]: rnd([10, 8], 2),
    [`${P}model.layers.0.self_attn.q_proj.lora_B.bias`]: rnd([10], 3),
    [`${P}model.layers.0.self_attn.q_proj.lora_magnitude_vector`]: rnd([10], 4),
    [`${P}model.layers.0.self_attn.v_proj.lora_A.weight`]: rnd([4, 12], 5, 'bfloat16'),
    [`${P}model.layers.0.self_attn.v_proj.lora_B.weight`]: rnd([6, 4], 6, 'bfloat16'),
    [`${P}model.embed_tokens.lora_embedding_A`]: rnd([8, 20], 7, 'float16'),
    [`${P}model.embed_tokens.lora_embedding_B`]: rnd([12, 8], 8, 'float16'),
    [`${P}score.weight`]: rnd([3, 12], 9),
  };
  const config = {
    peft_type: 'LORA', r: 8, lora_alpha: 16, target_modules: ['q_proj', 'v_proj', 'embed_tokens'], use_rslora: true, use_dora: true,
    fan_in_fan_out: false, bias: 'none', lora_bias: true, rank_pattern: { v_proj: 4 }, alpha_pattern: { v_proj: 2 },
    layers_to_transform: null, modules_to_save: ['score'], lora_dropout: 0.05, init_lora_weights: 'gaussian',
    base_model_name_or_path: 'tiny/base', task_type: 'CAUSAL_LM', some_future_field: { nested: [1, 'x'] }, revision: null,
  };
  writeFixture(d, config, tensors);
  const a = loadPeftAdapter(d);
  t.same(a.config, config, 'config kept, unknown fields too');
  t.same([...a.modules.keys()].sort(), ['model.embed_tokens', 'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']);
  const q = a.modules.get('model.layers.0.self_attn.q_proj')!;
  t.equal(q.kind, 'linear');
  t.equal(q.rank, 8);
  t.equal(q.scaling, 16 / Math.sqrt(8), 'rsLoRA scaling');
  t.ok(q.loraBBias && q.magnitude, 'lora_bias and DoRA magnitude');
  const v = a.modules.get('model.layers.0.self_attn.v_proj')!;
  t.same([v.rank, v.alpha, v.scaling, v.loraA.dtype], [4, 2, 2 / Math.sqrt(4), 'bfloat16'], 'patterns apply; bf16 kept');
  const e = a.modules.get('model.embed_tokens')!;
  t.same([e.kind, e.loraA.dtype, e.loraA.shape], ['embedding', 'float16', [8, 20]]);
  t.same([...a.extraTensors.keys()], [`${P}score.weight`], 'modules_to_save tensor kept verbatim');
  t.equal(a.numParameters, 8 * 12 + 10 * 8 + 10 + 10 + 4 * 12 + 6 * 4 + 8 * 20 + 12 * 8);

  const d2 = path.join(dir, 'full-copy');
  savePeftAdapter(d2, a);
  const b = loadPeftAdapter(d2);
  t.same(b.config, config, 'config equivalent after save');
  const raw = (f: string) => {
    const buf = fs.readFileSync(f);
    const n = Number(buf.readBigUInt64LE(0));
    const h = JSON.parse(buf.subarray(8, 8 + n).toString()) as Record<string, { dtype: string; data_offsets: [number, number] }>;
    const out: Record<string, string> = {};
    for (const [k, val] of Object.entries(h)) if (k !== '__metadata__') out[k] = val.dtype + ':' + buf.subarray(8 + n + val.data_offsets[0], 8 + n + val.data_offsets[1]).toString('hex');
    return out;
  };
  t.same(raw(path.join(d2, 'adapter_model.safetensors')), raw(path.join(d, 'adapter_model.safetensors')), 'same keys, dtypes and bytes');
  a.dispose();
  b.dispose();
  for (const x of Object.values(tensors)) x.dispose();
});

void leakChecked(t, 'malformed adapters', (t) => {
  const A = rnd([4, 6], 10);
  const B = rnd([5, 4], 11);
  const P = 'base_model.model.m.lin';
  const cases: [string, Record<string, unknown> | string, Record<string, Tensor>, string, RegExp][] = [
    ['rank mismatch', { r: 8, lora_alpha: 8 }, { [`${P}.lora_A.weight`]: A, [`${P}.lora_B.weight`]: B }, 'ERR_LORA_FORMAT', /rank 4 in its tensors but the config gives it rank 8/],
    ['missing lora_B', { r: 4 }, { [`${P}.lora_A.weight`]: A }, 'ERR_LORA_FORMAT', /lacks its lora_B weight/],
    ['not json', '{"r": 4,', { [`${P}.lora_A.weight`]: A }, 'ERR_LORA_FORMAT', /adapter_config\.json: not valid JSON/],
    ['other peft type', { peft_type: 'IA3' }, { [`${P}.lora_A.weight`]: A }, 'ERR_LORA_UNSUPPORTED', /peft_type "IA3"/],
    ['bad r', { r: 0 }, { [`${P}.lora_A.weight`]: A }, 'ERR_LORA_FORMAT', /r must be a positive integer but is 0/],
    ['bad pattern', { r: 4, rank_pattern: { x: 'big' } }, { [`${P}.lora_A.weight`]: A }, 'ERR_LORA_FORMAT', /rank_pattern\['x'\] must be a positive integer/],
    ['bad magnitude', { r: 4 }, { [`${P}.lora_A.weight`]: A, [`${P}.lora_B.weight`]: B, [`${P}.lora_magnitude_vector`]: A }, 'ERR_LORA_FORMAT', /lora_magnitude_vector \[4, 6\] for 5 outputs/],
  ];
  cases.forEach(([what, cfg, ts, code, msg], i) => {
    const d = path.join(dir, `bad${i}`);
    fs.mkdirSync(d);
    fs.writeFileSync(path.join(d, 'adapter_config.json'), typeof cfg === 'string' ? cfg : JSON.stringify(cfg));
    saveSafetensors(path.join(d, 'adapter_model.safetensors'), ts);
    assertLoraError(t, () => loadPeftAdapter(d), LoraError, code, msg, what);
  });
  const binOnly = path.join(dir, 'binonly');
  fs.mkdirSync(binOnly);
  fs.writeFileSync(path.join(binOnly, 'adapter_config.json'), '{"r": 4}');
  fs.writeFileSync(path.join(binOnly, 'adapter_model.bin'), 'pickle');
  assertLoraError(t, () => loadPeftAdapter(binOnly), LoraError, 'ERR_LORA_UNSUPPORTED', /only adapter_model\.bin/, 'pickled weights');
  assertLoraError(t, () => loadPeftAdapter(path.join(dir, 'nowhere')), LoraError, 'ERR_LORA_IO', /Could not read/, 'missing folder');
  A.dispose();
  B.dispose();
});
