// The one import point of every op (the library's own modules import ops from here too). Ops are
// split by kind, each op's forward and backward side by side: elementwise (arithmetic with
// broadcasting, unary functions, GELU), reduce (sum, mean, max, softmax), shape (reshape,
// permute, slice, concat), linalg (matmul, linear), nn (norms, embedding, dropout, RoPE), attention
// (fused, FlashAttention-2 style), loss (cross-entropy, MSE) and lora (the fused LoRA layer). Every
// name exported here is public (lib/index.ts re-exports them all); helpers live in ./util and are
// not exported.
import './methods';

export * from './elementwise';
export * from './reduce';
export * from './shape';
export * from './linalg';
export * from './nn';
export * from './attention';
export * from './loss';
export * from './lora';
