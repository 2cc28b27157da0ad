// The binding of the general tensor kernels autograd is built from (native/backend/backend.h):
// matrix products, elementwise ops with broadcasting, reductions, strided copies, softmax,
// dropout. gemm, binary and copyStrided are written out (their operands are strided views);
// the rest are specs.
#include "args.h"

namespace lora {
namespace binding {
namespace {

// The furthest element (exclusive) a batched row-major matrix op touches.
int64_t matrix_extent(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  if (rows == 0 || cols == 0 || batch == 0) return 0;
  return add_sat(add_sat(mul_sat(batch - 1, stride), mul_sat(rows - 1, ld)), cols);
}

// gemm(C, A, B, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta, batch, strideA, strideB,
// strideC[, bf16Dot]). B may be bfloat16 (a frozen weight): the gemm_bf16 entry (supports(gemm,
// bfloat16)); with bf16Dot true, gemm_bf16_dot where the backend has it (A may be rounded to bf16
// for the product), else gemm_bf16. bf16Dot is ignored for a float32 B.
Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Storage *Cs = storage_arg(info, 0, "out"), *As = storage_arg(info, 1, "a"), *Bs = storage_arg(info, 2, "b");
  const int64_t M = size_arg(info, 3, "M"), N = size_arg(info, 4, "N"), K = size_arg(info, 5, "K");
  const bool ta = bool_arg(info, 6, "transA"), tb = bool_arg(info, 7, "transB");
  const int64_t lda = size_arg(info, 8, "lda"), ldb = size_arg(info, 9, "ldb"), ldc = size_arg(info, 10, "ldc");
  const float alpha = float_arg(info, 11, "alpha"), beta = float_arg(info, 12, "beta");
  const int64_t batch = size_arg(info, 13, "batch"), sa = size_arg(info, 14, "strideA"),
                sb = size_arg(info, 15, "strideB"), sc = size_arg(info, 16, "strideC");
  lora_backend* be = same_backend(info, {Cs, As, Bs});
  // Stored shapes: A is (M, K) or (K, M) when transposed; B is (K, N) or (N, K).
  const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  if (lda < ac || ldb < bc || ldc < N) throw_lora(info.Env(), "ERR_LORA_SHAPE", "gemm leading dimension too small");
  need(info, As, LORA_F32, matrix_extent(ar, ac, lda, batch, sa), "a");
  const bool b_bf16 = Bs->dtype_ == LORA_BF16;
  need_any(info, Bs, kF32 | kBF16, matrix_extent(br, bc, ldb, batch, sb), "b");
  need(info, Cs, LORA_F32, matrix_extent(M, N, ldc, batch, sc), "out");
  const bool bf16_dot = info.Length() > 17 && !info[17].IsUndefined() && bool_arg(info, 17, "bf16Dot");
  if (b_bf16) {
    auto entry = bf16_dot && be->gemm_bf16_dot ? be->gemm_bf16_dot : be->gemm_bf16;
    const lora_status s = entry ? entry(be, ptr<float>(Cs), ptr<float>(As), ptr<uint16_t>(Bs), M, N, K, ta, tb, lda,
                                        ldb, ldc, alpha, beta, batch, sa, sb, sc)
                                : LORA_UNSUPPORTED;
    check_status(info.Env(), s, be, "gemm_bf16");
  } else {
    require_entry(info.Env(), be->gemm != nullptr, be, "gemm");
    check_status(info.Env(), be->gemm(be, ptr<float>(Cs), ptr<float>(As), ptr<float>(Bs), M, N, K, ta, tb, lda, ldb, ldc,
                                      alpha, beta, batch, sa, sb, sc),
                 be, "gemm");
  }
  return info.Env().Undefined();
}

// gemmSharedA(a, M, K, out0, w0, N0, out1, w1, N1, out2, w2, N2[, bf16Dot]): out_i (M, N_i) = a·w_iᵀ
// for a (M, K) and weights w_i (N_i, K), all fp32 or all bf16; the third product may be null. With
// bf16Dot true and bf16 weights, gemm_shared_a_bf16_dot where the backend has it (each product that
// of gemm with bf16Dot), else gemm_shared_a. bf16Dot is ignored for float32 weights.
Napi::Value GemmSharedA(const Napi::CallbackInfo& info) {
  Storage* As = storage_arg(info, 0, "a");
  const int64_t M = size_arg(info, 1, "M"), K = size_arg(info, 2, "K");
  Storage *Cs[3], *Bs[3];
  int64_t N[3];
  static const char* const names[3][3] = {{"out0", "w0", "N0"}, {"out1", "w1", "N1"}, {"out2", "w2", "N2"}};
  int n = 0;
  for (int i = 0; i < 3; ++i) {
    const size_t at = 3 + 3 * i;
    if (i == 2 && info[at].IsNull() && info[at + 1].IsNull()) break;
    Cs[i] = storage_arg(info, at, names[i][0]);
    Bs[i] = storage_arg(info, at + 1, names[i][1]);
    N[i] = size_arg(info, at + 2, names[i][2]);
    n = i + 1;
  }
  lora_backend* be = same_backend(info, {As, Cs[0], Bs[0], Cs[1], Bs[1]});
  if (n == 3) same_backend(info, {As, Cs[2], Bs[2]});
  need(info, As, LORA_F32, matrix_extent(M, K, K, 1, 0), "a");
  const bool b_bf16 = Bs[0]->dtype_ == LORA_BF16;
  float* C[3];
  const void* B[3];
  for (int i = 0; i < n; ++i) {
    if ((Bs[i]->dtype_ == LORA_BF16) != b_bf16)
      throw_lora(info.Env(), "ERR_LORA_DTYPE",
                 std::string("Expected the weights of gemmSharedA of one dtype but w0 is ") + lora_dtype_name(Bs[0]->dtype_) +
                     " and " + names[i][1] + " " + lora_dtype_name(Bs[i]->dtype_));
    need_any(info, Bs[i], kF32 | kBF16, matrix_extent(N[i], K, K, 1, 0), names[i][1]);
    need(info, Cs[i], LORA_F32, matrix_extent(M, N[i], N[i], 1, 0), names[i][0]);
    C[i] = ptr<float>(Cs[i]);
    B[i] = Bs[i]->ptr_;
  }
  const bool bf16_dot = info.Length() > 12 && !info[12].IsUndefined() && bool_arg(info, 12, "bf16Dot");
  if (b_bf16 && bf16_dot && be->gemm_shared_a_bf16_dot) {
    const uint16_t* Bh[3];
    for (int i = 0; i < n; ++i) Bh[i] = static_cast<const uint16_t*>(B[i]);
    check_status(info.Env(), be->gemm_shared_a_bf16_dot(be, n, C, ptr<float>(As), K, Bh, N, M, K), be, "gemmSharedA");
    return info.Env().Undefined();
  }
  require_entry(info.Env(), be->gemm_shared_a != nullptr, be, "gemmSharedA");
  check_status(info.Env(), be->gemm_shared_a(be, n, C, ptr<float>(As), K, B, b_bf16, N, M, K), be, "gemmSharedA");
  return info.Env().Undefined();
}

// binary(op, out, a, b, shape, aStrides, bStrides)
Napi::Value Binary(const Napi::CallbackInfo& info) {
  const int64_t op = int_arg(info, 0, "op");
  if (op < 0 || op >= LORA_BINARY_COUNT) throw_lora(info.Env(), "ERR_LORA_RANGE", "unknown binary op");
  Storage *out = storage_arg(info, 1, "out"), *a = storage_arg(info, 2, "a"), *b = storage_arg(info, 3, "b");
  const lora_layout al = layout_arg(info, 4, 5, "a"), bl = layout_arg(info, 4, 6, "b");
  lora_backend* be = same_backend(info, {out, a, b});
  need(info, out, LORA_F32, layout_numel(al), "out");
  need(info, a, LORA_F32, layout_extent(al, 0), "a");
  need(info, b, LORA_F32, layout_extent(bl, 0), "b");
  require_entry(info.Env(), be->binary != nullptr, be, "binary");
  check_status(info.Env(),
               be->binary(be, static_cast<lora_binary_op>(op), ptr<float>(out), ptr<float>(a), ptr<float>(b), &al, &bl), be,
               "binary");
  return info.Env().Undefined();
}

// copyStrided(dst, dstOffset, dstStrides, src, srcOffset, srcStrides, shape)
Napi::Value CopyStrided(const Napi::CallbackInfo& info) {
  Storage *dst = storage_arg(info, 0, "dst"), *src = storage_arg(info, 3, "src");
  const int64_t doff = size_arg(info, 1, "dstOffset"), soff = size_arg(info, 4, "srcOffset");
  const lora_layout dl = layout_arg(info, 6, 2, "dst"), sl = layout_arg(info, 6, 5, "src");
  lora_backend* be = same_backend(info, {dst, src});
  need(info, dst, LORA_F32, layout_extent(dl, doff), "dst");
  need(info, src, LORA_F32, layout_extent(sl, soff), "src");
  require_entry(info.Env(), be->copy_strided != nullptr, be, "copy_strided");
  check_status(info.Env(), be->copy_strided(be, ptr<float>(dst) + doff, &dl, ptr<float>(src) + soff, &sl), be,
               "copy_strided");
  return info.Env().Undefined();
}

}  // namespace

void register_tensor_ops(Registry& r) {
  r.fn("gemm", Gemm,
       "(out: S, a: S, b: S, M: number, N: number, K: number, transA: boolean, transB: boolean, lda: number, "
       "ldb: number, ldc: number, alpha: number, beta: number, batch: number, strideA: number, strideB: number, "
       "strideC: number, bf16Dot?: boolean): void",
       LORA_OP_GEMM, [](const lora_backend* be, int32_t dtype) {
         return dtype == LORA_BF16 ? be->gemm_bf16 != nullptr : be->gemm != nullptr;
       });
  r.fn("gemmSharedA", GemmSharedA,
       "(a: S, M: number, K: number, out0: S, w0: S, N0: number, out1: S, w1: S, N1: number, out2: S | null, "
       "w2: S | null, N2: number, bf16Dot?: boolean): void",
       LORA_OP_GEMM_SHARED_A, &lora_backend::gemm_shared_a);
  r.fn("binary", Binary,
       "(op: number, out: S, a: S, b: S, shape: number[], aStrides: number[], bStrides: number[]): void",
       LORA_OP_BINARY, &lora_backend::binary);
  r.fn("copyStrided", CopyStrided,
       "(dst: S, dstOffset: number, dstStrides: number[], src: S, srcOffset: number, srcStrides: number[], "
       "shape: number[]): void",
       LORA_OP_COPY_STRIDED, &lora_backend::copy_strided);

  r.kernel("fill", -1, &lora_backend::fill, {tensor("tensor", kF32, ""), number("value"), numel_of("tensor")});
  r.kernel("binaryScalar", LORA_OP_BINARY_SCALAR, &lora_backend::binary_scalar,
           {enumeration("op", LORA_BINARY_COUNT), tensor("out", kF32, "#a"), tensor("a", kF32, ""), number("scalar"),
            flag("scalarFirst"), numel_of("a")});
  r.kernel("unary", LORA_OP_UNARY, &lora_backend::unary,
           {enumeration("op", LORA_UNARY_COUNT), tensor("out", kF32, "#input"), tensor("input", kF32, ""),
            numel_of("input")});
  r.kernel("unaryBackward", LORA_OP_UNARY_BACKWARD, &lora_backend::unary_backward,
           {enumeration("op", LORA_UNARY_COUNT), tensor("dx", kF32, "#dy"), tensor("dy", kF32, ""),
            optional_tensor("x", kF32, "#dy"), optional_tensor("y", kF32, "#dy"), numel_of("dy")});
  // g and u hold N rows ld apart; u null: the up half is columns I..2I-1 of g's rows (the kernel
  // refuses ld < 2I then, so every read stays inside the N·ld elements checked here)
  r.kernel("gatedAct", LORA_OP_GATED_ACT, &lora_backend::gated_act,
           {tensor("y", kF32, "N*I"), tensor("g", kF32, "N*ld"), optional_tensor("u", kF32, "N*ld"), size("N"),
            size("I"), size("ld"), enumeration("act", LORA_UNARY_COUNT)});
  r.kernel("gatedActBackward", LORA_OP_GATED_ACT_BACKWARD, &lora_backend::gated_act_backward,
           {tensor("dg", kF32, "N*ld"), optional_tensor("du", kF32, "N*ld"), tensor("dy", kF32, "N*I"),
            tensor("g", kF32, "N*ld"), optional_tensor("u", kF32, "N*ld"), size("N"), size("I"), size("ld"),
            enumeration("act", LORA_UNARY_COUNT)});
  r.kernel("axpy", LORA_OP_AXPY, &lora_backend::axpy,
           {tensor("y", kF32, "#x"), tensor("x", kF32, ""), number("a"), numel_of("x")});
  r.kernel("reduce", LORA_OP_REDUCE, &lora_backend::reduce,
           {enumeration("op", LORA_REDUCE_COUNT), tensor("out", kF32, "outer*inner"),
            tensor("input", kF32, "outer*dim*inner"), size("outer"), size("dim"), size("inner")});
  r.kernel("softmax", LORA_OP_SOFTMAX, &lora_backend::softmax,
           {tensor("out", kF32, "rows*cols"), tensor("input", kF32, "rows*cols"), size("rows"), size("cols"),
            flag("log")});
  r.kernel("softmaxBackward", LORA_OP_SOFTMAX_BACKWARD, &lora_backend::softmax_backward,
           {tensor("dx", kF32, "rows*cols"), tensor("dy", kF32, "rows*cols"), tensor("y", kF32, "rows*cols"),
            size("rows"), size("cols"), flag("log")});
  r.kernel("dropout", LORA_OP_DROPOUT, &lora_backend::dropout,
           {tensor("out", kF32, "#input"), tensor("input", kF32, ""), numel_of("input"),
            number_in("p", 0, 1, true), seed()});
}

}  // namespace binding
}  // namespace lora
