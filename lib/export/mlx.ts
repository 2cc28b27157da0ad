// A PEFT LoRA adapter as an mlx-lm adapter folder (mlx_lm.generate/fuse --adapter-path):
// adapters.safetensors with mlx-lm's parameter names (<module>.lora_a (in, rank), .lora_b
// (rank, out): PEFT's A and B transposed; .m for DoRA) and adapter_config.json with
// fine_tune_type, num_layers (mlx-lm adapts the last num_layers layers) and lora_parameters
// {rank, scale, dropout, keys}. One rank and one scale serve every module in mlx-lm, so smaller
// ranks are padded with zeros and per-module scalings are folded into lora_b: exact.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { LoraError } from '../errors';
import { PeftAdapter } from '../peft';
import { RawTensor, saveSafetensors, writeFileAtomic } from '../safetensors';
import { exportableModules, mlxModulePath, splitLayer, withExportInputs } from './arch';

export interface MlxExportOptions {
  /** The base model folder (config.json). */
  modelDir: string;
  /** The adapter folder to write (created if missing). */
  out: string;
}

export interface MlxExportResult {
  dir: string;
  /** mlx-lm's model_type. */
  modelType: string;
  fineTuneType: 'lora' | 'dora';
  rank: number;
  scale: number;
  numLayers: number;
  keys: string[];
}

export const MLX_ADAPTER_WEIGHTS = 'adapters.safetensors';
export const MLX_ADAPTER_CONFIG = 'adapter_config.json';

function f32Raw(shape: number[], values: Float32Array): RawTensor {
  return { dtype: 'F32', shape, data: () => new Uint8Array(values.buffer, values.byteOffset, values.byteLength) };
}

/**
 * Writes a PEFT LoRA (or DoRA) adapter as an mlx-lm adapter folder that `mlx_lm.generate --model
 * BASE --adapter-path DIR` and `mlx_lm.fuse` load onto the MLX conversion of the same base model.
 * Layers between the first adapted layer and the last get LoRA layers in mlx-lm; those this
 * adapter does not adapt keep mlx-lm's zero lora_b, so they change nothing.
 *
 * @example
 * exportMlxAdapter('out/my-lora', { modelDir: './SmolLM2-135M', out: 'out/my-lora-mlx' });
 * @throws ERR_LORA_UNSUPPORTED for another architecture, lora_bias, modules_to_save, lm_head on a
 *   model with tied embeddings, or an adapter mixing DoRA and plain LoRA modules;
 *   ERR_LORA_FORMAT / ERR_LORA_IO for unreadable inputs or an unwritable folder.
 */
export function exportMlxAdapter(adapter: string | PeftAdapter, options: MlxExportOptions): MlxExportResult {
  return withExportInputs('exportMlxAdapter', adapter, options, [], 'a folder path', (o, base, a) => {
    const target = 'MLX (mlx-lm)';
    const modules = exportableModules(a, base, target, true);
    const dora = modules.filter(([, m]) => m.magnitude).length;
    if (dora && dora !== modules.length)
      throw new LoraError('ERR_LORA_UNSUPPORTED', `Cannot export this adapter to ${target}: it mixes DoRA and plain LoRA modules, and mlx-lm applies one fine_tune_type to all`);
    const rank = Math.max(...modules.map(([, m]) => m.rank));
    const counts = new Map<number, number>();
    for (const [, m] of modules) counts.set(m.scaling, (counts.get(m.scaling) ?? 0) + 1);
    const scale = [...counts].sort((x, y) => y[1] - x[1])[0]![0];
    const keys = new Set<string>();
    let firstLayer = Infinity;
    const tensors = new Map<string, RawTensor>();
    for (const [mod, m] of modules) {
      const mlxPath = mlxModulePath(base, mod);
      const l = splitLayer(base, mod);
      if (l) {
        if (l.layer >= base.numLayers) throw new LoraError('ERR_LORA_FORMAT', `The adapter adapts '${mod}' but ${base.configFile} gives the model ${base.numLayers} layers`);
        keys.add(l.inner);
        firstLayer = Math.min(firstLayer, l.layer);
      } else keys.add(mlxPath);
      const r = m.rank;
      const [outDim, inDim] = [m.loraB.shape[0]!, m.loraA.shape[1]!];
      const A = m.loraA.toFloat32Array();
      const B = m.loraB.toFloat32Array();
      const factor = m.scaling / scale;
      const la = new Float32Array(inDim * rank);
      for (let k = 0; k < r; k++) for (let i = 0; i < inDim; i++) la[i * rank + k] = A[k * inDim + i]!;
      const lb = new Float32Array(rank * outDim);
      for (let j = 0; j < outDim; j++) for (let k = 0; k < r; k++) lb[k * outDim + j] = factor === 1 ? B[j * r + k]! : B[j * r + k]! * factor;
      tensors.set(`${mlxPath}.lora_a`, f32Raw([inDim, rank], la));
      tensors.set(`${mlxPath}.lora_b`, f32Raw([rank, outDim], lb));
      if (m.magnitude) tensors.set(`${mlxPath}.m`, f32Raw([outDim], m.magnitude.toFloat32Array()));
    }
    const numLayers = firstLayer === Infinity ? 0 : base.numLayers - firstLayer;
    const config = {
      fine_tune_type: dora ? 'dora' : 'lora',
      num_layers: numLayers,
      lora_parameters: { rank, scale, dropout: a.config.lora_dropout ?? 0, keys: [...keys].sort() },
    };
    try {
      fs.mkdirSync(o.out, { recursive: true });
    } catch (err) {
      throw new LoraError('ERR_LORA_IO', `Could not create ${o.out}: ${(err as Error).message}`);
    }
    saveSafetensors(path.join(o.out, MLX_ADAPTER_WEIGHTS), tensors, { metadata: { format: 'mlx' }, sort: true });
    writeFileAtomic(path.join(o.out, MLX_ADAPTER_CONFIG), JSON.stringify(config, null, 4) + '\n');
    return { dir: o.out, modelType: base.arch.mlx, fineTuneType: dora ? 'dora' : 'lora', rank, scale, numLayers, keys: config.lora_parameters.keys };
  });
}
