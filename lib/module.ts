// Module: the base class of layers. It owns named parameters and child modules, and gives
// parameters(), namedParameters(), train()/eval(), to(device) and dispose() to every layer.
// Parameters a module creates are kept out of tidy() scopes: they live until dispose().
import { LoraError, typeError } from './errors';
import { checkDevice, Device, keep, Tensor } from './tensor';

export abstract class Module {
  /** Training mode (dropout active). New modules start in training mode, like PyTorch. */
  training = true;
  protected readonly _parameters = new Map<string, Tensor | null>();
  protected readonly _modules = new Map<string, Module>();

  /** Registers a parameter under a name (null for an absent optional one, like a bias). */
  protected registerParameter(name: string, t: Tensor | null): Tensor | null {
    if (t !== null && !(t instanceof Tensor)) throw typeError(name, 'a Tensor or null', t);
    if (t) keep(t);
    this._parameters.set(name, t);
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
      const moved = keep(t.detach().to(d));
      moved.requiresGrad = t.requiresGrad;
      t.dispose();
      this._parameters.set(name, moved);
      this.onParameterReplaced(name, moved);
    }
    for (const m of this._modules.values()) m.to(d);
    return this;
  }

  /** Subclasses that mirror parameters in fields update them here. */
  protected onParameterReplaced(name: string, t: Tensor): void {
    (this as unknown as Record<string, unknown>)[name] = t;
  }

  /** Frees every parameter (and gradient) of this module and its children. */
  dispose(): void {
    for (const [, t] of this._parameters) t?.dispose();
    for (const m of this._modules.values()) m.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
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

  abstract forward(...args: Tensor[]): Tensor;
}
