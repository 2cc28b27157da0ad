// The elementwise ops: arithmetic with NumPy broadcasting (either side may be a number), the unary
// functions with native kernels and GELU. Each op's backward sits beside its forward: the gradient
// of a broadcast input is summed back to its shape.
import { checkOptions, expectOneOf, typeError } from '../errors';
import { BINARY_OP, native, UNARY_OP } from '../native';
import { empty, expectTensor, record, Tensor } from '../tensor';
import { floatOnly, rawBinary, rawScalar, sameDevice, sumTo } from './util';

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
    backward: (g) => [x.requiresGrad ? sumTo(g, x.shape) : null, y.requiresGrad ? sumTo(g, y.shape) : null],
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
