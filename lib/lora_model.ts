// LoraModel: named base tensors (a model.safetensors) with PEFT-style LoRA adapters attached by
// module name: several adapters, an active set, per-adapter scales, forward through an adapted
// linear module (lib/adapted.ts: the fused LoRA op, DoRA), merging with an error report
// (lib/merge.ts), and weighted combinations of adapters (lib/combine.ts). It is not a
// transformer: it runs single modules, not whole models.
import { checkOptions, expectBoolean, expectInteger, expectNumber, LoraError, typeError } from './errors';
import { adaptedEmbedding, adaptedForward, ModuleContribution } from './adapted';
import { combineAdapters, Combination } from './combine';
import { doraWeightNorm } from './dora';
import { checkLoraInit, initChangesBase, loraInitFactors } from './lora_init';
import { mergeError, MergeOptions, MergeReportEntry, MergeResult, mergeWeight } from './merge';
import { Module } from './module';
import { moduleScaling, PEFT_CAMEL_ALIASES, PEFT_CONFIG_FIELDS, PeftAdapter, PeftConfig, PeftModule, targetsModule } from './peft';
import { Rng } from './random';
import { keep, shapeString, Tensor, tensor } from './tensor';

/**
 * A new adapter's config: PEFT's LoraConfig field names (`target_modules`, `r`, `lora_alpha`, ...)
 * or their camelCase forms (`targetModules`, and `rank`, `alpha`, `dropout` for `r`, `lora_alpha`,
 * `lora_dropout`), plus a seed for the initialisation. Other names are refused with a did-you-mean.
 */
export interface NewAdapterConfig extends PeftConfig {
  seed?: number;
  targetModules?: string[] | string;
  rank?: number;
  alpha?: number;
  useRslora?: boolean;
  useDora?: boolean;
}

/** One adapted linear module of a LoraModel, as a Module (forward(x), parameters()). */
export class AdaptedLinear extends Module {
  constructor(private readonly model: LoraModel, readonly moduleName: string) {
    super();
  }

  forward(x: Tensor): Tensor {
    return this.model.forward(this.moduleName, x);
  }

  override namedParameters(prefix = ''): [string, Tensor][] {
    return this.model.moduleParameters(this.moduleName).map(([n, t]) => [prefix + n, t] as [string, Tensor]);
  }

  override dispose(): void {
    /* the model owns the tensors */
  }
}

/**
 * Base tensors by name (e.g. from loadModel) with named LoRA adapters attached by module name, as
 * PEFT's LoraModel: a module `model.layers.0.q_proj` is the base tensor `model.layers.0.q_proj.weight`
 * (and `.bias`). The model does not own the base tensors; it owns its adapters.
 *
 * @example
 * const { tensors } = loadModel('base/');
 * const model = new LoraModel(tensors);
 * model.addAdapter('sql', loadPeftAdapter('adapters/sql'));
 * const y = model.forward('model.layers.0.self_attn.q_proj', x);
 * const { tensors: merged, report } = model.mergeAndUnload();
 */
export class LoraModel {
  private baseTensors: Map<string, Tensor>;
  private readonly adapters = new Map<string, PeftAdapter>();
  private readonly scales = new Map<string, number>();
  private active: string[] = [];

  constructor(base: Map<string, Tensor> | Record<string, Tensor>) {
    const entries = base instanceof Map ? [...base] : base && typeof base === 'object' ? Object.entries(base) : null;
    if (!entries) throw typeError('base', 'a Map or an object of named tensors', base);
    for (const [n, t] of entries) if (!(t instanceof Tensor)) throw typeError(`base['${n}']`, 'a Tensor', t);
    this.baseTensors = new Map(entries);
  }

  /** The base tensors (after mergeAndUnload, the merged ones). */
  get base(): ReadonlyMap<string, Tensor> {
    return this.baseTensors;
  }

  get adapterNames(): string[] {
    return [...this.adapters.keys()];
  }

  get activeAdapters(): string[] {
    return this.active.slice();
  }

  /** The adapter's modules, tensors and config (owned by the model). */
  getAdapter(name: string): PeftAdapter {
    const a = this.adapters.get(name);
    if (!a) throw this.noAdapter(name);
    return a;
  }

  private noAdapter(name: unknown): LoraError {
    return new LoraError('ERR_LORA_STATE', `Expected the name of an attached adapter (${this.adapterNames.map((n) => `'${n}'`).join(', ') || 'none attached'}) but received ${JSON.stringify(name)}`);
  }

  /**
   * Attaches an adapter under a name and makes it active if none is. Either a loaded PeftAdapter
   * (the model takes ownership; every module must exist in the base with matching shapes), or a
   * config (PEFT field names: target_modules, r, lora_alpha, use_rslora, use_dora, fan_in_fan_out,
   * init_lora_weights, ...) that creates a new adapter on every 2-D `<module>.weight` it targets:
   * A and B as PEFT's init_lora_weights true (A Kaiming-uniform, B zeros), false (B random too) or
   * 'gaussian' make them (lib/lora_init.ts), DoRA's magnitude the row norms of W + s·B·A.
   * @throws ERR_LORA_STATE for a name in use; ERR_LORA_SHAPE / ERR_LORA_FORMAT when the adapter does not fit the base;
   *   ERR_LORA_UNSUPPORTED for init_lora_weights 'pissa'/'olora' (they rewrite base weights), LoraRangeError for an unknown one.
   */
  addAdapter(name: string, adapter: PeftAdapter | NewAdapterConfig): this {
    if (typeof name !== 'string' || name === '') throw typeError('name', 'a non-empty string', name);
    if (this.adapters.has(name)) throw new LoraError('ERR_LORA_STATE', `Expected a new adapter name but '${name}' is already attached`);
    const a = adapter instanceof PeftAdapter ? adapter : this.createAdapter(adapter);
    for (const [mod, m] of a.modules) {
      const W = this.baseTensors.get(`${mod}.weight`);
      if (!W) throw new LoraError('ERR_LORA_FORMAT', `Adapter '${name}' adapts module '${mod}' but the base has no tensor '${mod}.weight'`);
      const fifo = !!a.config.fan_in_fan_out || m.kind === 'embedding';
      const want = fifo ? [m.loraA.shape[1]!, m.loraB.shape[0]!] : [m.loraB.shape[0]!, m.loraA.shape[1]!];
      if (W.ndim !== 2 || W.shape[0] !== want[0] || W.shape[1] !== want[1])
        throw new LoraError('ERR_LORA_SHAPE', `Adapter '${name}' needs '${mod}.weight' of shape ${shapeString(want)} but the base has ${shapeString(W.shape)}`);
      for (const t of [m.loraA, m.loraB, m.loraBBias, m.magnitude]) if (t && t.dtype === 'float32') t.requiresGrad = true;
    }
    this.adapters.set(name, a);
    this.scales.set(name, 1);
    if (this.active.length === 0) this.active = [name];
    return this;
  }

  private createAdapter(cfg: NewAdapterConfig): PeftAdapter {
    if (!cfg || typeof cfg !== 'object') throw typeError('adapter', 'a PeftAdapter or a config object', cfg);
    const { seed, ...config } = checkOptions<NewAdapterConfig>('addAdapter() config', cfg, [...PEFT_CONFIG_FIELDS, 'seed'], PEFT_CAMEL_ALIASES);
    if (config.target_modules == null) throw typeError('target_modules', 'a list of module names or a regex string', config.target_modules);
    if (config.r !== undefined) expectInteger('r', config.r, 1, 1 << 16);
    if (config.lora_alpha !== undefined) expectNumber('lora_alpha', config.lora_alpha);
    const rng = new Rng(seed === undefined ? 0 : expectInteger('seed', seed, 0, Number.MAX_SAFE_INTEGER));
    const modules = new Map<string, PeftModule>();
    const fifo = !!config.fan_in_fan_out;
    const init = config.init_lora_weights === undefined ? true : checkLoraInit('init_lora_weights', config.init_lora_weights);
    if (initChangesBase(init))
      throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected init_lora_weights true, false or 'gaussian' for addAdapter() but received '${init}': PiSSA and OLoRA rewrite the base weights, which a LoraModel does not own (use applyLora() on a model)`);
    for (const [tname, W] of this.baseTensors) {
      if (!tname.endsWith('.weight') || W.ndim !== 2 || W.dtype === 'int32') continue;
      const mod = tname.slice(0, -'.weight'.length);
      if (!targetsModule(config, mod)) continue;
      const { rank, alpha } = moduleScaling(config, mod);
      const [OC, C] = fifo ? [W.shape[1]!, W.shape[0]!] : [W.shape[0]!, W.shape[1]!];
      const scaling = config.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank;
      const { A, B } = loraInitFactors(init, null, OC, C, rank, scaling, rng);
      const m: PeftModule = {
        kind: 'linear', rank, alpha, scaling,
        loraA: keep(tensor(A, [rank, C])), loraB: keep(tensor(B, [OC, rank])),
        loraBBias: config.lora_bias ? keep(tensor(new Float32Array(OC), [OC])) : null, magnitude: null,
      };
      if (config.use_dora) m.magnitude = keep(doraWeightNorm(W, m.loraA, m.loraB, m.scaling, fifo));
      modules.set(mod, m);
    }
    if (modules.size === 0) throw new LoraError('ERR_LORA_STATE', `Expected target_modules ${JSON.stringify(config.target_modules)} to match a 2-D weight of the base but none matched`);
    return new PeftAdapter({ peft_type: 'LORA', r: 8, lora_alpha: 8, ...config }, modules);
  }

  /** Makes one adapter, or several (their deltas add), the active set. */
  setAdapter(names: string | string[]): this {
    const list = typeof names === 'string' ? [names] : names;
    if (!Array.isArray(list)) throw typeError('names', 'an adapter name or an array of names', names);
    for (const n of list) if (!this.adapters.has(n)) throw this.noAdapter(n);
    this.active = [...new Set(list)];
    return this;
  }

  /** Detaches an adapter and frees its tensors. */
  deleteAdapter(name: string): this {
    const a = this.getAdapter(name);
    a.dispose();
    this.adapters.delete(name);
    this.scales.delete(name);
    this.active = this.active.filter((n) => n !== name);
    return this;
  }

  /** Multiplies an adapter's scaling by k in forward, merge and combinations (1 by default). */
  setScale(name: string, k: number): this {
    this.getAdapter(name);
    this.scales.set(name, expectNumber('scale', k));
    return this;
  }

  getScale(name: string): number {
    this.getAdapter(name);
    return this.scales.get(name)!;
  }

  /** The modules any attached adapter adapts. */
  get adaptedModules(): string[] {
    const out = new Set<string>();
    for (const a of this.adapters.values()) for (const m of a.modules.keys()) out.add(m);
    return [...out];
  }

  private contributions(moduleName: string, names = this.active): ModuleContribution[] {
    const out: ModuleContribution[] = [];
    for (const n of names) {
      const a = this.adapters.get(n);
      if (!a) throw this.noAdapter(n);
      const m = a.modules.get(moduleName);
      if (m) out.push({ module: m, scaling: m.scaling * this.scales.get(n)!, fanInFanOut: !!a.config.fan_in_fan_out });
    }
    return out;
  }

  /**
   * Runs one module with the active adapters: y = x·Wᵀ + b + Σ adapter deltas (DoRA as PEFT).
   * Differentiable in x and in the adapters' float32 tensors.
   * @throws ERR_LORA_STATE for a module the base lacks; ERR_LORA_SHAPE for a wrong x.
   */
  forward(moduleName: string, x: Tensor): Tensor {
    const W = this.baseTensors.get(`${moduleName}.weight`);
    if (!W) throw new LoraError('ERR_LORA_STATE', `Expected a module of the base but '${moduleName}.weight' is not a base tensor`);
    const contribs = this.contributions(moduleName);
    if (!(x instanceof Tensor)) throw typeError('x', 'a Tensor', x);
    if (contribs.some((c) => c.module.kind === 'embedding')) return adaptedEmbedding(x, W, contribs);
    const fifo = contribs.some((c) => c.fanInFanOut);
    const C = fifo ? W.shape[0]! : W.shape[1]!;
    if (x.shape[x.ndim - 1] !== C) throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [..., ${C}] for module '${moduleName}' but received ${shapeString(x.shape)}`);
    return adaptedForward(x, W, this.baseTensors.get(`${moduleName}.bias`) ?? null, contribs, fifo);
  }

  /** A Module view of one adapted linear module (forward(x); parameters() = the active adapters' tensors there). */
  module(moduleName: string): AdaptedLinear {
    if (!this.baseTensors.has(`${moduleName}.weight`)) throw new LoraError('ERR_LORA_STATE', `Expected a module of the base but '${moduleName}.weight' is not a base tensor`);
    return new AdaptedLinear(this, moduleName);
  }

  /** @internal the active adapters' tensors of one module, named like PEFT's state dict */
  moduleParameters(moduleName: string): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const n of this.active) {
      const m = this.adapters.get(n)!.modules.get(moduleName);
      if (!m) continue;
      out.push([`lora_A.${n}.weight`, m.loraA], [`lora_B.${n}.weight`, m.loraB]);
      if (m.loraBBias) out.push([`lora_B.${n}.bias`, m.loraBBias]);
      if (m.magnitude) out.push([`lora_magnitude_vector.${n}.weight`, m.magnitude]);
    }
    return out;
  }

  /** The active adapters' trainable tensors (for an optimizer). */
  parameters(): Tensor[] {
    const out: Tensor[] = [];
    for (const mod of this.adaptedModules) for (const [, t] of this.moduleParameters(mod)) if (t.requiresGrad) out.push(t);
    return out;
  }

  /**
   * Merged base tensors without changing the model: each adapted weight merged in float32 and
   * rounded once to its dtype (fp32, bf16, fp16), biases updated for lora_bias, plus the error
   * report. Untouched tensors are the base tensors themselves; the new ones belong to the caller.
   * @throws ERR_LORA_NON_FINITE with safeMerge (the default) and a NaN/Inf result; nothing is returned then.
   */
  merge(opts?: MergeOptions): MergeResult {
    const o = checkOptions<MergeOptions>('merge()', opts, ['safeMerge', 'probeRows', 'seed', 'adapters']);
    const safe = o.safeMerge === undefined ? true : expectBoolean('safeMerge', o.safeMerge);
    const probeRows = o.probeRows === undefined ? 8 : expectInteger('probeRows', o.probeRows, 0, 1 << 16);
    const seed = o.seed === undefined ? 0 : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
    const names = o.adapters ?? this.active;
    for (const n of names) if (!this.adapters.has(n)) throw this.noAdapter(n);
    const created: Tensor[] = [];
    const out = new Map(this.baseTensors);
    const report: MergeReportEntry[] = [];
    try {
      for (const mod of this.adaptedModules) {
        const contribs = this.contributions(mod, names);
        if (contribs.length === 0) continue;
        const wName = `${mod}.weight`;
        const bName = `${mod}.bias`;
        const W = this.baseTensors.get(wName)!;
        const bias = this.baseTensors.get(bName) ?? null;
        const { weight, bias: nb } = mergeWeight(wName, W, bias, contribs, safe);
        created.push(weight);
        out.set(wName, weight);
        if (nb) {
          created.push(nb);
          out.set(bName, nb);
        }
        if (probeRows > 0) report.push(mergeError(wName, W, bias, weight, nb, contribs, names.filter((n) => this.adapters.get(n)!.modules.has(mod)), probeRows, seed));
      }
    } catch (err) {
      for (const t of created) t.dispose();
      throw err;
    }
    return { tensors: out, report };
  }

  /**
   * merge(), then detaches every adapter (freeing them) and makes the merged tensors the model's
   * base. The replaced base tensors are not freed (they belong to the caller).
   */
  mergeAndUnload(opts?: MergeOptions): MergeResult {
    const result = this.merge(opts);
    for (const n of this.adapterNames) this.deleteAdapter(n);
    this.baseTensors = new Map(result.tensors);
    return result;
  }

  /**
   * Attaches a new adapter `newName` combining attached adapters (see combineAdapters): their
   * per-adapter scales are folded in, the result has scaling 1.
   * @example model.addWeightedAdapter(['a', 'b'], [0.7, 0.3], 'svd', 'ab', { svdRank: 8 });
   */
  addWeightedAdapter(names: string[], weights: number[], combination: Combination, newName: string, opts?: { svdRank?: number }): this {
    if (!Array.isArray(names)) throw typeError('names', 'an array of adapter names', names);
    const o = checkOptions<{ svdRank?: number }>('addWeightedAdapter()', opts, ['svdRank']);
    const sources = names.map((n) => this.getAdapter(n));
    const combined = combineAdapters(sources, weights, combination, { ...o, scales: names.map((n) => this.scales.get(n)!) });
    try {
      return this.addAdapter(newName, combined);
    } catch (err) {
      combined.dispose();
      throw err;
    }
  }

  /** Frees every adapter (not the base tensors). */
  dispose(): void {
    for (const n of this.adapterNames) this.deleteAdapter(n);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
