// Module: the base class of layers. It owns named parameters and child modules, and gives
// parameters(), namedParameters(), train()/eval(), to(device) and dispose() to every layer.
// Parameters a module creates are kept out of tidy() scopes: they live until dispose().
import { checkOptions, expectBoolean, LoraError, rangeError, typeError } from './errors';
import type { Rng } from './random';
import { checkDevice, Device, keep, noGrad, Tensor, tensor } from './tensor';

export abstract class Module {
  /** Training mode (dropout active). New modules start in training mode, like PyTorch. */
  training = true;
  protected readonly _parameters = new Map<string, Tensor | null>();
  protected readonly _modules = new Map<string, Module>();

  /**
   * Registers a parameter under a name (null for an absent optional one, like a bias). The
   * field of that name becomes a view of the registry, so `layer.weight = other` replaces the
   * parameter everywhere (parameters(), to(), stateDict()); the old tensor is not disposed.
   */
  protected registerParameter(name: string, t: Tensor | null): Tensor | null {
    if (t !== null && !(t instanceof Tensor)) throw typeError(name, 'a Tensor or null', t);
    if (t) keep(t);
    this._parameters.set(name, t);
    const params = this._parameters;
    Object.defineProperty(this, name, {
      configurable: true,
      enumerable: true,
      get: () => params.get(name),
      set: (v: unknown) => {
        if (v !== null && !(v instanceof Tensor)) throw typeError(name, 'a Tensor or null', v);
        if (v) keep(v);
        params.set(name, v);
      },
    });
    return t;
  }

  protected registerModule<M extends Module>(name: string, m: M): M {
    if (!(m instanceof Module)) throw typeError(name, 'a Module', m);
    this._modules.set(name, m);
    return m;
  }

  /** Every parameter with its dotted name (frozen ones too), depth first. */
  namedParameters(prefix = ''): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [name, t] of this._parameters) if (t) out.push([prefix + name, t]);
    for (const [name, m] of this._modules) out.push(...m.namedParameters(`${prefix}${name}.`));
    return out;
  }

  /** The trainable parameters (those with requiresGrad), for an optimizer. */
  parameters(): Tensor[] {
    return this.namedParameters().map(([, t]) => t).filter((t) => t.requiresGrad);
  }

  /** Direct children with their names. */
  namedChildren(): [string, Module][] {
    return [...this._modules];
  }

  /** Sets training mode on this module and every child. */
  train(mode = true): this {
    if (typeof mode !== 'boolean') throw typeError('mode', 'a boolean', mode);
    this.training = mode;
    for (const m of this._modules.values()) m.train(mode);
    return this;
  }

  /** Evaluation mode (no dropout). */
  eval(): this {
    return this.train(false);
  }

  /** Clears the gradients of every parameter. */
  zeroGrad(): void {
    for (const [, t] of this.namedParameters()) t.zeroGrad();
  }

  /** Moves every parameter to a device in place (new storage, same requiresGrad). */
  to(device: Device): this {
    const d = checkDevice('device', device);
    for (const [name, t] of this._parameters) {
      if (!t || t.device === d) continue;
      const moved = keep(noGrad(() => t.to(d)));  // a new leaf on the device, no history
      moved.requiresGrad = t.requiresGrad;
      t.dispose();
      this._parameters.set(name, moved);
    }
    for (const m of this._modules.values()) m.to(d);
    return this;
  }

  /** Frees every parameter (and gradient) of this module and its children. */
  dispose(): void {
    for (const [, t] of this._parameters) t?.dispose();
    for (const m of this._modules.values()) m.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Every module below this one (and this one, as '') with its dotted path, depth first. */
  namedModules(prefix = ''): [string, Module][] {
    const out: [string, Module][] = [[prefix.replace(/\.$/, ''), this]];
    for (const [name, m] of this._modules) out.push(...m.namedModules(`${prefix}${name}.`));
    return out;
  }

  /** The child module at a dotted path ('layers.0.attn.q_proj'), or undefined. */
  getModule(path: string): Module | undefined {
    if (typeof path !== 'string') throw typeError('path', 'a dotted module path', path);
    if (path === '') return this;
    let cur: Module | undefined = this;
    for (const part of path.split('.')) {
      cur = cur._modules.get(part);
      if (!cur) return undefined;
    }
    return cur;
  }

  /**
   * Replaces the child at a dotted path with another module (applyLora swaps Linear for
   * LoraLinear this way). The old module is returned, not disposed.
   * @throws ERR_LORA_OPTION when no module lives at that path.
   */
  setModule(path: string, m: Module): Module {
    if (!(m instanceof Module)) throw typeError('m', 'a Module', m);
    const parts = typeof path === 'string' ? path.split('.') : [];
    const last = parts.pop();
    const parent = this.getModule(parts.join('.'));
    const old = last === undefined || !parent ? undefined : parent._modules.get(last);
    if (!parent || !old || last === undefined) throw new LoraError('ERR_LORA_OPTION', `Expected the path of a child module for setModule() but received ${JSON.stringify(path)}`);
    parent._modules.set(last, m);
    parent.onModuleReplaced(last, m);
    return old;
  }

  /** Subclasses that mirror children in fields update them here. */
  protected onModuleReplaced(name: string, m: Module): void {
    const self = this as unknown as Record<string, unknown>;
    if (name in self) self[name] = m;
  }

  /**
   * Every parameter by dotted name (frozen ones too): the tensors themselves, not copies, like
   * PyTorch's state_dict(). Save them with saveSafetensors().
   */
  stateDict(): Record<string, Tensor> {
    return Object.fromEntries(this.namedParameters());
  }

  /**
   * Copies values into this module's parameters by name (shapes must match; dtypes convert).
   * With strict (the default) every parameter must be given and no unknown name may appear.
   * Returns the names that were missing and unexpected.
   * @throws ERR_LORA_STATE for missing/unexpected names in strict mode; ERR_LORA_SHAPE on a shape mismatch.
   */
  loadStateDict(state: Record<string, Tensor> | Map<string, Tensor>, options?: { strict?: boolean }): { missing: string[]; unexpected: string[] } {
    const entries = state instanceof Map ? state : new Map(Object.entries(state ?? {}));
    if (state === null || typeof state !== 'object') throw typeError('state', 'an object or Map of Tensors', state);
    const o = checkOptions<{ strict?: boolean }>('loadStateDict()', options, ['strict']);
    const strict = o.strict === undefined ? true : expectBoolean('strict', o.strict);
    const own = new Map(this.namedParameters());
    const missing = [...own.keys()].filter((k) => !entries.has(k));
    const unexpected = [...entries.keys()].filter((k) => !own.has(k));
    if (strict && (missing.length || unexpected.length))
      throw new LoraError('ERR_LORA_STATE', `Expected a state dict with exactly this module's parameters but ${missing.length} are missing (${missing.slice(0, 5).join(', ')}) and ${unexpected.length} unexpected (${unexpected.slice(0, 5).join(', ')})`);
    for (const [name, src] of entries) {
      const dst = own.get(name);
      if (!dst) continue;
      if (!(src instanceof Tensor)) throw typeError(`state['${name}']`, 'a Tensor', src);
      if (src.shape.length !== dst.shape.length || src.shape.some((d, i) => d !== dst.shape[i]))
        throw new LoraError('ERR_LORA_SHAPE', `Expected ${name} of shape [${dst.shape.join(', ')}] but received [${src.shape.join(', ')}]`);
      if (src.device === dst.device) dst.assign(src);
      else {
        const moved = src.to(dst.device);
        dst.assign(moved);
        moved.dispose();
      }
    }
    return { missing, unexpected };
  }

  /** Stops gradients for every parameter (requiresGrad = false). Returns this. */
  freeze(): this {
    for (const [, t] of this.namedParameters()) t.requiresGrad = false;
    return this;
  }

  /** Re-enables gradients for every float32 parameter. Returns this. */
  unfreeze(): this {
    for (const [, t] of this.namedParameters()) if (t.dtype === 'float32') t.requiresGrad = true;
    return this;
  }

  /** @internal */
  protected checkInput(x: unknown, inFeatures: number, where: string): Tensor {
    if (!(x instanceof Tensor)) throw typeError('x', 'a Tensor', x);
    x._live('x');
    if (x.ndim < 1 || x.shape[x.ndim - 1] !== inFeatures)
      throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [..., ${inFeatures}] for ${where} but received [${x.shape.join(', ')}]`);
    if (x.dtype !== 'float32') throw new LoraError('ERR_LORA_DTYPE', `Expected a float32 x for ${where} but received ${x.dtype}`);
    return x;
  }

  /** The layer's computation: tensors in (a model may take an options object after them), a tensor out. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  abstract forward(...args: any[]): Tensor;
}

/** @internal checks that v is a Module (for functions that take a model). */
export function expectModule(name: string, v: unknown): Module {
  if (!(v instanceof Module)) throw typeError(name, 'a Module', v);
  return v;
}

/**
 * @internal A new parameter of U(-bound, bound) values drawn from rng (PyTorch's Kaiming-uniform
 * initialisation with a = sqrt(5) is bound = 1/sqrt(fan_in)).
 */
export function uniformParameter(shape: number[], bound: number, rng: Rng, device: Device, requiresGrad = true): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  // the values are drawn in a JavaScript array first: its length limit (and the memory) bounds a new parameter
  if (n > 2 ** 32) throw rangeError('shape', 'a parameter of at most 2^32 elements', shape);
  const data = new Float32Array(n);
  for (let i = 0; i < data.length; i++) data[i] = (2 * rng.uniform() - 1) * bound;
  return tensor(data, shape, { device, requiresGrad });
}
