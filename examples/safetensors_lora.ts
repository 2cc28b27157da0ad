// Load a model from a .safetensors file and add LoRA: the same steps as with a downloaded
// checkpoint. A small TransformerLM is saved first (so the example needs no download), then a
// fresh model loads it, applyLora() adds adapters to the attention projections, a few steps
// train them, and the adapter is written as a PEFT folder. (Imports '../lib/index'.)
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  applyLora, crossEntropy, loadPeftAdapter, loadSafetensors, memory, reshape, saveLoraAdapter, saveSafetensors, tensor,
  train, trainableParameters, TransformerLM,
} from '../lib/index';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-example-'));
const cfg = { vocabSize: 16, dModel: 32, nHeads: 4, nLayers: 2, maxSeqLen: 8 };

async function main(): Promise<void> {
  // a "pretrained" model on disk
  const original = new TransformerLM({ ...cfg, seed: 1 });
  const modelFile = path.join(dir, 'model.safetensors');
  saveSafetensors(modelFile, original.stateDict());
  original.dispose();

  // load it into the same architecture
  const model = new TransformerLM({ ...cfg, seed: 2 });
  const { tensors } = loadSafetensors(modelFile);
  model.loadStateDict(tensors);
  for (const t of tensors.values()) t.dispose();

  // add LoRA to the attention projections; everything else is frozen
  const info = applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 4, alpha: 8, seed: 3 });
  const count = trainableParameters(model);
  console.log(`adapted ${info.modules.length} modules (${info.modules[0]}, ...): ${count.trainable} of ${count.total} parameters trainable (${(100 * count.share).toFixed(2)}%)`);

  // a few steps on "next token = token + 1"
  const ids = tensor(Float32Array.from({ length: 4 * 8 }, (_, i) => (i * 3) % 15), [4, 8], { dtype: 'int32' });
  const tg = tensor(Float32Array.from({ length: 4 * 8 }, (_, i) => ((i * 3) % 15) + 1), [32], { dtype: 'int32' });
  const r = await train({
    model, data: () => null, steps: 30, progress: 'none', optimizer: { lr: 1e-2 },
    loss: (m) => crossEntropy(reshape(m.forward(ids), [32, cfg.vocabSize]), tg),
  });
  console.log(`loss ${r.losses[0]!.toFixed(3)} -> ${r.losses[r.losses.length - 1]!.toFixed(3)}`);

  const adapterDir = path.join(dir, 'adapter');
  saveLoraAdapter(model, adapterDir);
  const adapter = loadPeftAdapter(adapterDir);
  console.log(`PEFT adapter: ${fs.readdirSync(adapterDir).sort().join(', ')}; r=${adapter.config.r}, modules: ${[...adapter.modules.keys()].join(', ')}`);
  adapter.dispose();
  for (const t of [ids, tg]) t.dispose();
  model.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  console.log(`live tensors at exit: ${memory().numTensors}`);
  if (!(r.losses[r.losses.length - 1]! < r.losses[0]!)) process.exitCode = 1;
}

main().catch((err) => { console.error(err); process.exitCode = 1; });
