// Optimizers: AdamW and SGD with PyTorch's exact update rules (decoupled weight decay, bias
// correction, dampening, Nesterov). Each step() is one native call over every parameter that has a
// gradient. Parameter groups carry their own lr and weight decay (LoRA+, no decay on biases).
import { checkOptions, expectBoolean, expectNumber, LoraError, typeError } from './errors';
import { native } from './native';
import { keep, Tensor, zeros } from './tensor';

/** A set of parameters with its own hyper-parameters. */
export interface ParamGroup {
  params: Tensor[];
  lr?: number;
  weightDecay?: number;
}

interface Group {
  params: Tensor[];
  lr: number;
  weightDecay: number;
  /** lr relative to the optimizer's base lr, so that `optimizer.lr = x` keeps group ratios. */
  lrRatio: number;
}

function checkLr(v: unknown, name = 'lr'): number {
  return expectNumber(name, v, 0, Infinity, 'a finite number >= 0');
}

function collectGroups(where: string, params: unknown, lr: number, weightDecay: number): Group[] {
  if (params === null || typeof params !== 'object' || !(Symbol.iterator in (params as object)))
    throw typeError('params', 'an array of Tensors or of parameter groups', params);
  const list = [...(params as Iterable<unknown>)];
  const isGroups = list.length > 0 && !(list[0] instanceof Tensor) && typeof list[0] === 'object' && list[0] !== null && 'params' in list[0];
  const raw: ParamGroup[] = isGroups ? (list as ParamGroup[]) : [{ params: list as Tensor[] }];
  const seen = new Set<Tensor>();
  return raw.map((g, gi) => {
    const o = checkOptions<ParamGroup>(`${where} parameter group ${gi}`, g, ['params', 'lr', 'weightDecay']);
    if (!Array.isArray(o.params)) throw typeError(`params[${gi}].params`, 'an array of Tensors', o.params);
    o.params.forEach((p, i) => {
      const name = isGroups ? `params[${gi}].params[${i}]` : `params[${i}]`;
      if (!(p instanceof Tensor)) throw typeError(name, 'a Tensor', p);
      p._live(name);
      if (p.dtype !== 'float32') throw new LoraError('ERR_LORA_DTYPE', `Expected float32 parameters for ${where} but ${name} is ${p.dtype}`);
      if (!p.isLeaf) throw new LoraError('ERR_LORA_GRAD', `Expected leaf tensors (parameters) for ${where} but ${name} is the output of an op`);
      if (seen.has(p)) throw new LoraError('ERR_LORA_OPTION', `${name} appears twice in the parameters of ${where}`);
      seen.add(p);
    });
    const glr = o.lr === undefined ? lr : checkLr(o.lr, `params[${gi}].lr`);
    const wd = o.weightDecay === undefined ? weightDecay : expectNumber(`params[${gi}].weightDecay`, o.weightDecay, 0, Infinity, 'a finite number >= 0');
    return { params: o.params.slice(), lr: glr, weightDecay: wd, lrRatio: lr === 0 ? 1 : glr / lr };
  });
}

/** What optimizers share: groups, the base learning rate, zeroGrad(). */
export abstract class Optimizer {
  protected readonly groups: Group[];
  private baseLr: number;

  protected constructor(groups: Group[], lr: number) {
    this.groups = groups;
    this.baseLr = lr;
  }

  /** The base learning rate; setting it rescales every group (schedules use this). */
  get lr(): number {
    return this.baseLr;
  }

  set lr(value: number) {
    this.baseLr = checkLr(value);
    for (const g of this.groups) g.lr = value * g.lrRatio;
  }

  /** Every parameter this optimizer updates. */
  get params(): Tensor[] {
    return this.groups.flatMap((g) => g.params);
  }

  /** Clears every parameter's gradient. */
  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /** Applies one update to every parameter that has a gradient. */
  abstract step(): void;

  /** Frees the optimizer state. */
  abstract dispose(): void;

  /**
   * Advances the step count of every parameter of a group that has a gradient (creating its state
   * on first use) and groups them by count: one native call per distinct count, usually one.
   */
  protected advance<S extends { step: number }>(g: Group, state: Map<Tensor, S>, init: (p: Tensor) => S): Map<number, Tensor[]> {
    const byStep = new Map<number, Tensor[]>();
    for (const p of g.params) {
      if (!this.liveGrad(p)) continue;
      let st = state.get(p);
      if (!st) {
        st = init(p);
        state.set(p, st);
      }
      st.step += 1;
      const list = byStep.get(st.step) ?? [];
      list.push(p);
      byStep.set(st.step, list);
    }
    return byStep;
  }

  protected liveGrad(p: Tensor): Tensor | null {
    if (!p.grad) return null;
    p._live('a parameter');
    p.grad._live('a gradient');
    if (p.grad.device !== p.device) throw new LoraError('ERR_LORA_DEVICE', 'Expected gradients on the same device as their parameters');
    return p.grad;
  }
}

export interface AdamWOptions {
  lr: number;
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
}

/**
 * AdamW as torch.optim.AdamW: p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
 * p ← p − lr·m̂ / (sqrt(v̂) + eps) with bias-corrected m̂, v̂.
 *
 * @example
 * const opt = new AdamW(layer.parameters(), { lr: 1e-3 });
 * loss.backward(); opt.step(); opt.zeroGrad();
 * @throws LoraRangeError for a negative or non-finite lr, betas outside [0, 1), negative eps or weightDecay.
 */
export class AdamW extends Optimizer {
  readonly betas: [number, number];
  readonly eps: number;
  private readonly state = new Map<Tensor, { m: Tensor; v: Tensor; step: number }>();

  constructor(params: Iterable<Tensor> | ParamGroup[], options: AdamWOptions) {
    const o = checkOptions<AdamWOptions>('AdamW', options, ['lr', 'betas', 'eps', 'weightDecay']);
    const lr = checkLr(o.lr);
    const betas = o.betas ?? [0.9, 0.999];
    if (!Array.isArray(betas) || betas.length !== 2) throw typeError('betas', 'an array of two numbers', betas);
    expectNumber('betas[0]', betas[0], 0, 1, 'a number in [0, 1)');
    expectNumber('betas[1]', betas[1], 0, 1, 'a number in [0, 1)');
    if (betas[0] >= 1 || betas[1] >= 1) throw new LoraError('ERR_LORA_RANGE', `Expected numbers in [0, 1) for betas but received [${betas.join(', ')}] (array)`);
    const eps = o.eps === undefined ? 1e-8 : expectNumber('eps', o.eps, 0, Infinity, 'a finite number >= 0');
    const wd = o.weightDecay === undefined ? 0.01 : expectNumber('weightDecay', o.weightDecay, 0, Infinity, 'a finite number >= 0');
    super(collectGroups('AdamW', params, lr, wd), lr);
    this.betas = [betas[0], betas[1]];
    this.eps = eps;
  }

  step(): void {
    for (const g of this.groups) {
      const byStep = this.advance(g, this.state, (p) => ({ m: keep(zeros(p.shape, { device: p.device })), v: keep(zeros(p.shape, { device: p.device })), step: 0 }));
      for (const [step, ps] of byStep) {
        native.adamwStep(
          ps.map((p) => p._storage), ps.map((p) => p.grad!._storage),
          ps.map((p) => this.state.get(p)!.m._storage), ps.map((p) => this.state.get(p)!.v._storage),
          g.lr, this.betas[0], this.betas[1], this.eps, g.weightDecay, step);
      }
    }
  }

  /** @internal the per-parameter state (m, v, step), for checkpoints */
  getState(p: Tensor): { m: Tensor; v: Tensor; step: number } | undefined {
    return this.state.get(p);
  }

  /** @internal replaces a parameter's state (checkpoint resume) */
  setState(p: Tensor, s: { m: Tensor; v: Tensor; step: number }): void {
    const old = this.state.get(p);
    if (old) { old.m.dispose(); old.v.dispose(); }
    this.state.set(p, { m: keep(s.m), v: keep(s.v), step: s.step });
  }

  dispose(): void {
    for (const s of this.state.values()) { s.m.dispose(); s.v.dispose(); }
    this.state.clear();
  }
}

export interface SGDOptions {
  lr: number;
  momentum?: number;
  dampening?: number;
  weightDecay?: number;
  nesterov?: boolean;
}

/**
 * SGD as torch.optim.SGD: g ← g + wd·p; with momentum, buf ← g on the first step, else
 * momentum·buf + (1 − dampening)·g, and g ← nesterov ? g + momentum·buf : buf; p ← p − lr·g.
 * @throws LoraRangeError for a negative or non-finite lr or momentum; ERR_LORA_OPTION for Nesterov
 *   without momentum or with dampening.
 */
export class SGD extends Optimizer {
  readonly momentum: number;
  readonly dampening: number;
  readonly nesterov: boolean;
  private readonly state = new Map<Tensor, { buf: Tensor | null; step: number }>();

  constructor(params: Iterable<Tensor> | ParamGroup[], options: SGDOptions) {
    const o = checkOptions<SGDOptions>('SGD', options, ['lr', 'momentum', 'dampening', 'weightDecay', 'nesterov']);
    const lr = checkLr(o.lr);
    const momentum = o.momentum === undefined ? 0 : expectNumber('momentum', o.momentum, 0, Infinity, 'a finite number >= 0');
    const dampening = o.dampening === undefined ? 0 : expectNumber('dampening', o.dampening, 0, 1);
    const wd = o.weightDecay === undefined ? 0 : expectNumber('weightDecay', o.weightDecay, 0, Infinity, 'a finite number >= 0');
    const nesterov = o.nesterov === undefined ? false : expectBoolean('nesterov', o.nesterov);
    if (nesterov && (momentum <= 0 || dampening !== 0))
      throw new LoraError('ERR_LORA_OPTION', 'Nesterov momentum requires a momentum > 0 and zero dampening');
    super(collectGroups('SGD', params, lr, wd), lr);
    this.momentum = momentum;
    this.dampening = dampening;
    this.nesterov = nesterov;
  }

  step(): void {
    for (const g of this.groups) {
      const byStep = this.advance(g, this.state, (p) => ({ buf: this.momentum !== 0 ? keep(zeros(p.shape, { device: p.device })) : null, step: 0 }));
      for (const [step, ps] of byStep) {
        native.sgdStep(
          ps.map((p) => p._storage), ps.map((p) => p.grad!._storage),
          this.momentum !== 0 ? ps.map((p) => this.state.get(p)!.buf!._storage) : null,
          g.lr, this.momentum, this.dampening, g.weightDecay, this.nesterov, step);
      }
    }
  }

  /** @internal the momentum buffer and step count of a parameter, for checkpoints */
  getState(p: Tensor): { buf: Tensor | null; step: number } | undefined {
    return this.state.get(p);
  }

  /** @internal replaces a parameter's state (checkpoint resume) */
  setState(p: Tensor, s: { buf: Tensor | null; step: number }): void {
    this.state.get(p)?.buf?.dispose();
    this.state.set(p, { buf: s.buf ? keep(s.buf) : null, step: s.step });
  }

  dispose(): void {
    for (const s of this.state.values()) s.buf?.dispose();
    this.state.clear();
  }
}
