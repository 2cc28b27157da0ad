// lora-native's public API: tensors, ops with autograd, LoRA layers, optimizers.
// Everything a user imports comes from here; see README.md for an overview.
import { native } from './native';

export { LoraError, LoraTypeError, LoraRangeError } from './errors';
export type { LoraErrorCode } from './errors';
export {
  Tensor, tensor, zeros, ones, full, randn, rand, tidy, keep, noGrad, isGradEnabled, memory,
  releaseCachedMemory, resetPeakMemory, setNumThreads, getNumThreads, checkpoint,
} from './tensor';
export type { Device, DType, TensorOptions, RandomOptions, MemoryInfo, GradNode } from './tensor';
// Every op (lib/ops/: add ... loraLinear), with its option types.
export * from './ops';
export { Module } from './module';
export { LoraLinear } from './lora';
export type { LoraLinearOptions } from './lora';
export { AdamW, SGD, Optimizer } from './optim';
export type { AdamWOptions, SGDOptions, ParamGroup } from './optim';
export { Rng, manualSeed } from './random';

export interface Features {
  /** Whether the CUDA backend is loaded and a GPU can be used. */
  cuda: boolean;
  /** Why CUDA is unavailable (when it is). */
  reason?: string;
  devices: { name: string; computeCapability: string; memory: number }[];
  /** The CPU kernels' instruction-set level: 'avx512', 'avx2' or 'generic'. */
  isa: string;
  /**
   * True when the CPU kernels use the avx512_bf16 dot product (avx512 level, CPU with
   * avx512_bf16, `LORA_NATIVE_BF16_DOT` not `0`): the bf16 frozen base of LoRA layers and, with
   * `matmulPrecision: 'bf16'`, linear() over a bf16 weight round their input to bf16 for that product.
   */
  bf16Dot: boolean;
  /** CPU threads the kernels use. */
  threads: number;
  /** Folder of the loaded native addon. */
  addonDir: string;
  /** Path of the CUDA library tried. */
  cudaLibrary: string;
  /**
   * True when that library is the CPU emulator of the CUDA kernels (a test tool, see
   * cuda/emu/): `cuda` works, slowly, with no GPU.
   */
  cudaEmulated?: boolean;
  /** Path of the loaded native addon (.node file). */
  addonPath: string;
  /** 'prebuild' when the addon came from prebuilds/<platform>-<arch>/, 'build' when compiled locally. */
  binary: 'prebuild' | 'build';
}

/**
 * What this installation can do: CUDA availability (and why not), GPUs, the CPU ISA level the
 * kernels dispatch to, the thread count and which binary was loaded.
 */
export function features(): Features {
  return native.features();
}
export {
  readSafetensorsHeader, loadSafetensors, saveSafetensors, saveSafetensorsAsync, openModel, openModelReader, ModelReader, loadModel,
} from './safetensors';
export type {
  SafetensorsDtype, SafetensorsEntry, SafetensorsHeader, SafetensorsData, ModelIndex, ByteSource, RawTensor, TensorSource, LoadOptions, SaveOptions,
} from './safetensors';
export { PeftAdapter, loadPeftAdapter, savePeftAdapter, matchPatternKey, moduleScaling, targetsModule } from './peft';
export type { PeftConfig, PeftModule } from './peft';
export { LoraModel, AdaptedLinear } from './lora_model';
export type { NewAdapterConfig } from './lora_model';
export { combineAdapters } from './combine';
export type { Combination, CombineOptions } from './combine';
export { doraWeightNorm, doraLinear } from './dora';
export type { LoraInit } from './lora_init';
export type { MergeOptions, MergeResult, MergeReportEntry } from './merge';
export {
  Linear, Embedding, LayerNorm, RMSNorm, Dropout, Activation, Sequential, MLP, TransformerLM, TransformerBlock,
  CausalSelfAttention, TransformerMLP, applyLora, loraLayers, peftAdapterOf, saveLoraAdapter, loadLoraAdapter, trainableParameters,
  mergeAndUnload, unloadLora,
} from './nn';
export type {
  LinearOptions, EmbeddingOptions, MLPOptions, ActivationName, TransformerOptions, ApplyLoraOptions, LoraInfo, ParameterCount,
  SaveLoraAdapterOptions,
} from './nn';
export { train, lrMultiplier, parameterGroups, clipGradNorm, CHECKPOINT_FILE } from './train';
export type { TrainOptions, TrainResult, StepInfo, Schedule, OptimizerSpec, ResumeInfo } from './train';
export { datasetLoss } from './train_dataset';
export type { DatasetTrainOptions } from './train_dataset';
export { allFinite, assertAllFinite } from './numerics';
export { Tokenizer, loadTokenizer } from './tokenizer';
export type { ChatMessage, EncodeOptions, DecodeOptions, ChatTemplateOptions } from './tokenizer';
export { loadDataset, Dataset, IGNORE_INDEX } from './data';
export type { LoadDatasetOptions, Batch, BatchOptions, DatasetSplits, DatasetFormat, DatasetTokenizer, SkippedLine } from './data';
export { exportGgufAdapter } from './export/gguf';
export type { GgufExportOptions, GgufExportResult } from './export/gguf';
export { exportMlxAdapter } from './export/mlx';
export type { MlxExportOptions, MlxExportResult } from './export/mlx';
export { writeGguf } from './export/gguf_writer';
export type { GgufValue, GgufTensor, GgufScalarType, GgufTensorType } from './export/gguf_writer';
export { CausalLM, causalLmLoss } from './models/causal_lm';
export type { ForwardOptions, LossOptions, WeightDtype } from './models/causal_lm';
export { KVCache } from './models/common';
export type { GenerateOptions } from './models/generate';
export { loadCausalLM, saveCausalLM, SUPPORTED_ARCHITECTURES } from './models/loader';
export type { LoadCausalLMOptions, SaveCausalLMOptions } from './models/loader';
