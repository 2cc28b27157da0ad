// The elementwise ops: arithmetic with NumPy broadcasting (either side may be a number), the unary
// functions with native kernels, GELU, and the fused gated activation of GLU MLPs. Each op's backward sits beside its forward: the gradient
// of a broadcast input is summed back to its shape.
import { checkOptions, expectOneOf, LoraError, typeError } from '../errors';
import { BINARY_OP, native, UNARY_OP } from '../native';
import { empty, expectTensor, record, sameShape, shapeString, shareStorage, Tensor } from '../tensor';
import { floatOnly, rawBinary, rawScalar, sameDevice, sumTo, sumToTaking } from './util';

export { broadcastShapes } from './util';

type Operand = Tensor | number;

function operands(op: string, a: unknown, b: unknown): [Tensor | number, Tensor | number] {
  const check = (name: string, v: unknown) => {
    if (typeof v === 'number') return v;
    return expectTensor(name, v);
  };
  const x = check('a', a);
  const y = check('b', b);
  if (typeof x === 'number' && typeof y === 'number') throw typeError('a', `a Tensor (at least one operand of ${op}() must be a tensor)`, a);
  const ts = [x, y].filter((v): v is Tensor => v instanceof Tensor);
  sameDevice(op, ...ts);
  floatOnly(op, ...ts);
  return [x, y];
}

/**
 * a + b, elementwise with broadcasting; either side may be a number.
 * @example add(x, 1); add(x, bias)
 * @throws ERR_LORA_SHAPE when the shapes do not broadcast.
 */
export function add(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('add', a, b);
  if (typeof y === 'number') return scalarOp('add', BINARY_OP.add, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('add', BINARY_OP.add, y, x, true);
  return record(rawBinary(BINARY_OP.add, x, y), {
    name: 'add', inputs: [x, y],
    // (the last of the two may take g's storage: the other is made first; of g's shape, it shares
    // g's storage rather than copy it: a residual add's two gradients are one)
    backward: (g) => {
      const gx = !x.requiresGrad ? null
        : !y.requiresGrad ? sumToTaking(g, x.shape)
        : sameShape(g.shape, x.shape) ? shareStorage(g) : sumTo(g, x.shape);
      return [gx, y.requiresGrad ? sumToTaking(g, y.shape) : null];
    },
  });
}

/** a - b, elementwise with broadcasting; either side may be a number. */
export function sub(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('sub', a, b);
  if (typeof y === 'number') return scalarOp('sub', BINARY_OP.sub, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('sub', BINARY_OP.sub, y, x, true);
  return record(rawBinary(BINARY_OP.sub, x, y), {
    name: 'sub', inputs: [x, y],
    backward: (g) => {
      let gy: Tensor | null = null;
      if (y.requiresGrad) {
        const s = sumTo(g, y.shape);
        gy = rawScalar(BINARY_OP.mul, s, -1, false);
        s.dispose();
      }
      return [x.requiresGrad ? sumTo(g, x.shape) : null, gy];
    },
  });
}

/** a ⊙ b, elementwise with broadcasting; either side may be a number. */
export function mul(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('mul', a, b);
  if (typeof y === 'number') return scalarOp('mul', BINARY_OP.mul, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('mul', BINARY_OP.mul, y, x, true);
  return record(rawBinary(BINARY_OP.mul, x, y), {
    name: 'mul', inputs: [x, y],
    backward: (g) => [
      x.requiresGrad ? productSumTo(g, y, x.shape) : null,
      y.requiresGrad ? productSumTo(g, x, y.shape) : null,
    ],
  });
}

/** a / b, elementwise with broadcasting; either side may be a number. */
export function div(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('div', a, b);
  if (typeof y === 'number') return scalarOp('div', BINARY_OP.div, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('div', BINARY_OP.div, y, x, true);
  return record(rawBinary(BINARY_OP.div, x, y), {
    name: 'div', inputs: [x, y],
    backward: (g) => {
      let gx: Tensor | null = null;
      let gy: Tensor | null = null;
      if (x.requiresGrad) {
        const t = rawBinary(BINARY_OP.div, g, y);
        gx = sumTo(t, x.shape);
        t.dispose();
      }
      if (y.requiresGrad) {
        // d(x/y)/dy = -x / y²
        const q = rawBinary(BINARY_OP.div, x, y);
        const q2 = rawBinary(BINARY_OP.div, q, y);
        const t = rawBinary(BINARY_OP.mul, g, q2);
        const s = sumTo(t, y.shape);
        gy = rawScalar(BINARY_OP.mul, s, -1, false);
        for (const z of [q, q2, t, s]) z.dispose();
      }
      return [gx, gy];
    },
  });
}

function productSumTo(g: Tensor, other: Tensor, shape: readonly number[]): Tensor {
  const t = rawBinary(BINARY_OP.mul, g, other);
  const s = sumTo(t, shape);
  t.dispose();
  return s;
}

function scalarOp(name: string, op: number, t: Tensor, s: number, scalarFirst: boolean): Tensor {
  const out = rawScalar(op, t, s, scalarFirst);
  return record(out, {
    name, inputs: [t],
    backward: (g) => {
      switch (op) {
        case BINARY_OP.add: return [g.detach()];
        case BINARY_OP.sub: return [scalarFirst ? rawScalar(BINARY_OP.mul, g, -1, false) : g.detach()];
        case BINARY_OP.mul: return [rawScalar(BINARY_OP.mul, g, s, false)];
        default: {
          if (!scalarFirst) return [rawScalar(BINARY_OP.mul, g, 1 / s, false)];
          // d(s/t)/dt = -s / t² = -out / t
          const q = rawBinary(BINARY_OP.div, out, t);
          const r = rawBinary(BINARY_OP.mul, g, q);
          q.dispose();
          const n = rawScalar(BINARY_OP.mul, r, -1, false);
          r.dispose();
          return [n];
        }
      }
    },
  });
}

/** -x */
export function neg(x: Tensor): Tensor {
  return mul(x, -1);
}

// ---- unary functions -------------------------------------------------------------------------

/** The elementwise functions with native kernels. */
export type UnaryName = keyof typeof UNARY_OP;

/** f(x) elementwise for a named function ('relu', 'exp', 'geluTanh', ...). */
export function unary(name: UnaryName, x: Tensor): Tensor {
  const op = typeof name === 'string' && Object.prototype.hasOwnProperty.call(UNARY_OP, name) ? UNARY_OP[name] : undefined;
  if (op === undefined) throw typeError('name', `one of ${Object.keys(UNARY_OP).join(', ')}`, name);
  expectTensor('x', x);
  floatOnly(name, x);
  const out = empty(x.shape, x.device);
  native.unary(op, out._storage, x._storage);
  return record(out, {
    name, inputs: [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      native.unaryBackward(op, dx._storage, g._storage, x._live('input of ' + name), out._live('output of ' + name));
      return [dx];
    },
  });
}

export const exp = (x: Tensor) => unary('exp', x);
export const log = (x: Tensor) => unary('log', x);
export const sqrt = (x: Tensor) => unary('sqrt', x);
export const relu = (x: Tensor) => unary('relu', x);
export const tanh = (x: Tensor) => unary('tanh', x);
export const sigmoid = (x: Tensor) => unary('sigmoid', x);
export const silu = (x: Tensor) => unary('silu', x);
export const square = (x: Tensor) => unary('square', x);
export const abs = (x: Tensor) => unary('abs', x);

export interface GeluOptions {
  /** 'none' (exact, with erf; the default, like PyTorch) or 'tanh' (the GPT-2 approximation). */
  approximate?: 'none' | 'tanh';
}

/**
 * GELU: x·Φ(x) exactly, or 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) with approximate: 'tanh'.
 * @example gelu(x); gelu(x, { approximate: 'tanh' })
 */
export function gelu(x: Tensor, options?: GeluOptions): Tensor {
  const o = checkOptions<GeluOptions>('gelu()', options, ['approximate']);
  const approx = o.approximate === undefined ? 'none' : expectOneOf('approximate', o.approximate, ['none', 'tanh'] as const);
  return unary(approx === 'tanh' ? 'geluTanh' : 'geluErf', x);
}

// ---- gated activation (GLU MLPs) -------------------------------------------------------------

/**
 * The gated activation of GLU MLPs in one native pass: act(gate)·up elementwise (SwiGLU with
 * 'silu', GeGLU with 'geluTanh' or 'geluErf'), and its backward in one pass. With up null, gate
 * is one [..., 2·I] tensor whose last dim holds the gate half then the up half (Phi-3's fused
 * gate_up_proj output), read in place: no slices are copied. The result is [..., I].
 *
 * @example
 * const h = gatedActivation(gateProj.forward(x), upProj.forward(x), 'silu');   // SwiGLU
 * const g = gatedActivation(gateUpProj.forward(x), null, 'geluTanh');          // [.., 2I] -> [.., I]
 * @throws ERR_LORA_SHAPE when gate and up differ in shape, or (up null) gate's last dim is odd;
 *   ERR_LORA_DTYPE for tensors other than float32; ERR_LORA_DEVICE across devices; LoraTypeError
 *   for an activation that is not a unary op name.
 */
export function gatedActivation(gate: Tensor, up: Tensor | null, activation: UnaryName = 'silu'): Tensor {
  const act = typeof activation === 'string' && Object.prototype.hasOwnProperty.call(UNARY_OP, activation) ? UNARY_OP[activation] : undefined;
  if (act === undefined) throw typeError('activation', `one of ${Object.keys(UNARY_OP).join(', ')}`, activation);
  expectTensor('gate', gate);
  if (up !== null) {
    expectTensor('up', up);
    sameDevice('gatedActivation', gate, up);
  }
  floatOnly('gatedActivation', ...(up ? [gate, up] : [gate]));
  if (gate.ndim < 1) throw new LoraError('ERR_LORA_SHAPE', 'Expected a tensor with at least 1 dim for gatedActivation() but received a scalar');
  const last = gate.shape[gate.ndim - 1]!;
  if (up && !sameShape(gate.shape, up.shape))
    throw new LoraError('ERR_LORA_SHAPE', `Expected gate and up of one shape for gatedActivation() but received ${shapeString(gate.shape)} and ${shapeString(up.shape)}`);
  if (!up && last % 2 !== 0)
    throw new LoraError('ERR_LORA_SHAPE', `Expected gate of shape [..., 2·I] (gate half then up half) for gatedActivation() with up null but received ${shapeString(gate.shape)}`);
  const I = up ? last : last / 2;
  const N = last === 0 ? 0 : gate.size / last;
  const out = empty([...gate.shape.slice(0, -1), I], gate.device);
  if (out.size > 0) native.gatedAct(out._storage, gate._storage, up?._storage ?? null, N, I, last, act);
  return record(out, {
    name: 'gatedActivation', inputs: up ? [gate, up] : [gate],
    backward: (g) => {
      const dg = empty(gate.shape, gate.device);
      const du = up ? empty(up.shape, up.device) : null;
      if (out.size > 0)
        native.gatedActBackward(dg._storage, du?._storage ?? null, g._storage, gate._live('gate of gatedActivation'),
          up ? up._live('up of gatedActivation') : null, N, I, last, act);
      if (!up) return [dg];
      return [gate.requiresGrad ? dg : (dg.dispose(), null), up.requiresGrad ? du : (du!.dispose(), null)];
    },
  });
}
