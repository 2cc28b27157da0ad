// train(model, dataset, options): what train() needs to drive a CausalLM with a Dataset from
// loadDataset — batches read by index (so a resumed run reads what the first run would have),
// the causal-LM loss with packing honoured, steps weighted by counted tokens, tokens/s. It only
// translates into train()'s options; the loop, checkpoints and progress stay in train.ts.
import { Batch, Dataset, DatasetSplits } from './data';
import { checkOptions, expectBoolean, expectInteger, expectNumber, LoraError, typeError } from './errors';
import { CausalLM } from './models/causal_lm';
import { saveFor, Tensor, tensor } from './tensor';
import type { TrainOptions } from './train';

/** Options of `train(model, dataset, options)`: train()'s options, with Datasets for the data. */
export interface DatasetTrainOptions extends Omit<TrainOptions<Batch>, 'model' | 'data' | 'loss' | 'evalData' | 'batchSize' | 'batchWeight' | 'batchTokens'> {
  /** Sequences per micro-batch (default 4). */
  batchSize?: number;
  /** Validation data for evalEvery (default: the `valid` split when splits are given). */
  evalData?: Dataset | null;
  /** Round each batch's length up to a multiple of this (default 1). */
  padToMultipleOf?: number;
  /**
   * Your own loss for a batch (default: {@link datasetLoss}, the mean cross-entropy over the
   * batch's counted tokens). Steps stay weighted by counted tokens, so give a mean over them.
   */
  loss?: (model: CausalLM, batch: Batch) => Tensor;
}

const OWN = ['batchSize', 'evalData', 'padToMultipleOf', 'loss', 'epochs', 'steps', 'seed'] as const;
const PASSED = ['optimizer', 'schedule', 'clipGradNorm', 'gradientAccumulation', 'evalEvery', 'evalBatches', 'checkpointEvery', 'checkpointDir', 'resume',
  'onStep', 'signal', 'loraPlusRatio', 'onNonFinite', 'maxConsecutiveSkips', 'progress', 'logEvery', 'gradientCheckpointing'] as const;

/**
 * The loss of a Dataset batch for a causal LM: the batch's ids, attention mask, positions (and
 * segment ids when packed) through {@link CausalLM.loss} against its labels (the head and the
 * cross-entropy in row chunks; the value of causalLmLoss on model.forward()'s logits) — the mean
 * over the tokens the batch counts (`batch.numLabels`).
 * @example const loss = datasetLoss(model, batch); loss.backward();
 */
export function datasetLoss(model: CausalLM, batch: Batch): Tensor {
  if (!(model instanceof CausalLM)) throw typeError('model', 'a CausalLM (from loadCausalLM)', model);
  if (!batch || typeof batch !== 'object' || !(batch.inputIds instanceof Int32Array) || !Array.isArray(batch.shape))
    throw typeError('batch', 'a Batch from Dataset.batches()', batch);
  const device = model.device;
  const t = (a: Int32Array) => tensor(Float32Array.from(a), batch.shape, { dtype: 'int32', device });
  const ids = t(batch.inputIds);
  const labels = t(batch.labels);
  const attentionMask = t(batch.attentionMask);
  const positionIds = t(batch.positionIds);
  const segmentIds = batch.segmentIds ? t(batch.segmentIds) : undefined;
  let loss: Tensor | null = null;
  try {
    loss = model.loss(ids, labels, segmentIds ? { attentionMask, positionIds, segmentIds } : { attentionMask, positionIds });
    return saveFor(loss, ids); // the ids go with the loss (the embedding's backward may read them)
  } finally {
    // the rest was read on the host
    for (const x of [attentionMask, positionIds, segmentIds, labels]) x?.dispose();
    if (!loss) ids.dispose();
  }
}

/** The longest sequence the model takes: config.max_position_embeddings (n_positions for GPT-2). */
export function maxPositionsOf(model: CausalLM): number | null {
  const learned = model.backbone.maxPositions;
  if (learned !== null) return learned;
  const v = model.config.max_position_embeddings;
  return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : null;
}

/**
 * @internal train()'s options for `train(model, dataset, options)`: micro-batch i is batch
 * i mod n of epoch floor(i / n) (n batches an epoch), so the data order is a function of the step
 * and a checkpoint resumes onto the same batches.
 */
export function datasetTrainOptions(model: unknown, data: unknown, options: DatasetTrainOptions | undefined): TrainOptions<Batch> {
  if (!(model instanceof CausalLM)) throw typeError('model', 'a CausalLM (from loadCausalLM) for train(model, dataset, options)', model);
  const splits = data !== null && typeof data === 'object' && 'train' in data && !(data instanceof Dataset) ? (data as DatasetSplits) : null;
  const ds = splits ? splits.train : data;
  if (!(ds instanceof Dataset)) throw typeError('dataset', 'a Dataset or the splits loadDataset() returns', data);
  const o = checkOptions<DatasetTrainOptions>('train() options', options ?? {}, [...OWN, ...PASSED]);
  const batchSize = o.batchSize === undefined ? 4 : expectInteger('batchSize', o.batchSize, 1, 1 << 20);
  const padToMultipleOf = o.padToMultipleOf === undefined ? 1 : expectInteger('padToMultipleOf', o.padToMultipleOf, 1, 4096);
  const evalData = o.evalData === undefined ? splits?.valid ?? null : o.evalData;
  if (evalData !== null && !(evalData instanceof Dataset)) throw typeError('evalData', 'a Dataset (the valid split of loadDataset) or null', evalData);
  if (o.loss !== undefined && typeof o.loss !== 'function') throw typeError('loss', 'a function (model, batch) => scalar Tensor', o.loss);
  if (o.gradientCheckpointing !== undefined) expectBoolean('gradientCheckpointing', o.gradientCheckpointing);

  const limit = maxPositionsOf(model);
  for (const [what, d] of [['dataset', ds], ['evalData', evalData]] as const)
    if (d && limit !== null && d.maxSeqLength > limit)
      throw new LoraError('ERR_LORA_OPTION', `Expected a ${what} loaded with maxSeqLength at most ${limit} (the model's max_position_embeddings) but ${d.file} was loaded with maxSeqLength ${d.maxSeqLength}; load it with maxSeqLength: ${limit} (longer rows are then truncated and counted in \`truncated\`)`);

  const perEpoch = ds.numBatches({ batchSize, padToMultipleOf });
  const accum = o.gradientAccumulation === undefined ? 1 : expectInteger('gradientAccumulation', o.gradientAccumulation, 1, 65536);
  let steps: number;
  if (o.steps !== undefined && o.epochs !== undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected steps or epochs for train(), not both');
  if (o.steps !== undefined) steps = expectInteger('steps', o.steps, 0, Number.MAX_SAFE_INTEGER);
  else steps = Math.ceil((expectNumber('epochs', o.epochs ?? 1, 0) * perEpoch) / accum);

  const lossFn = o.loss ?? datasetLoss;
  const out: TrainOptions<Batch> = {
    model,
    data: (i: number) => ds.batch(i % perEpoch, { batchSize, padToMultipleOf, epoch: Math.floor(i / perEpoch) }),
    loss: (m, b) => lossFn(m as CausalLM, b),
    steps,
    batchSize, // only recorded (a resume reports a change); the batches come from data
    batchWeight: (b) => b.numLabels,
    batchTokens: (b) => b.numTokens,
    optimizer: o.optimizer as TrainOptions<Batch>['optimizer'],
  };
  if (o.seed !== undefined) out.seed = o.seed;
  for (const k of PASSED) if (o[k] !== undefined) (out as unknown as Record<string, unknown>)[k] = o[k];
  if (evalData) {
    // only the batches evaluated are built (evalBatches: the first N of the split, in file order)
    const limit = o.evalBatches === undefined ? Infinity : expectInteger('evalBatches', o.evalBatches, 1, Number.MAX_SAFE_INTEGER);
    out.evalData = () => {
      const list: Batch[] = [];
      for (const b of evalData.batches({ batchSize, padToMultipleOf, shuffle: false })) {
        if (list.length >= limit) break;
        list.push(b);
      }
      return list;
    };
  } else if (o.evalEvery !== undefined) throw new LoraError('ERR_LORA_OPTION', 'Expected evalData (or splits with a valid split) with evalEvery for train()');
  return out;
}
