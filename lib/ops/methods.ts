// The method forms of the ops on Tensor (x.add(y), x.sum(1), ...), declared on the class and
// attached here; lib/ops/index.ts loads this file once.
import { Tensor } from '../tensor';
import { add, div, mul, neg, sub } from './elementwise';
import { matmul } from './linalg';
import { mean, sum } from './reduce';
import { reshape, transpose } from './shape';

declare module '../tensor' {
  interface Tensor {
    add(other: Tensor | number): Tensor;
    sub(other: Tensor | number): Tensor;
    mul(other: Tensor | number): Tensor;
    div(other: Tensor | number): Tensor;
    neg(): Tensor;
    matmul(other: Tensor): Tensor;
    sum(axis?: number | readonly number[], keepDims?: boolean): Tensor;
    mean(axis?: number | readonly number[], keepDims?: boolean): Tensor;
    reshape(shape: readonly number[]): Tensor;
    transpose(dim0?: number, dim1?: number): Tensor;
  }
}

Tensor.prototype.add = function (this: Tensor, o: Tensor | number) { return add(this, o); };
Tensor.prototype.sub = function (this: Tensor, o: Tensor | number) { return sub(this, o); };
Tensor.prototype.mul = function (this: Tensor, o: Tensor | number) { return mul(this, o); };
Tensor.prototype.div = function (this: Tensor, o: Tensor | number) { return div(this, o); };
Tensor.prototype.neg = function (this: Tensor) { return neg(this); };
Tensor.prototype.matmul = function (this: Tensor, o: Tensor) { return matmul(this, o); };
Tensor.prototype.sum = function (this: Tensor, axis?: number | readonly number[], keepDims?: boolean) { return sum(this, axis, keepDims); };
Tensor.prototype.mean = function (this: Tensor, axis?: number | readonly number[], keepDims?: boolean) { return mean(this, axis, keepDims); };
Tensor.prototype.reshape = function (this: Tensor, shape: readonly number[]) { return reshape(this, shape); };
Tensor.prototype.transpose = function (this: Tensor, d0?: number, d1?: number) { return transpose(this, d0, d1); };
