// Argument helpers of the binding and its declarative kernel wrappers. A kernel's wrapper is a
// spec: one Arg per C parameter of its lora_backend entry (after the backend), saying which JS
// argument feeds it and what it must be (a tensor of some dtypes holding at least so many
// elements, a size, a number in a range, ...). The Registry turns a spec into the JS function (and
// its async twin, and its TypeScript signature for lib/binding_types.ts): read and check every
// argument, find the one backend, call the entry, throw on a failed status. Hand-written wrappers
// (storage, layouts, tensor lists) use the same helpers.
#pragma once

#include <napi.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "addon.h"
#include "async.h"

namespace lora {
namespace binding {

// ---- plain helpers ------------------------------------------------------------------------------

Storage* storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name);
Storage* optional_storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name);
double number_arg(const Napi::CallbackInfo& info, size_t i, const char* name);
int64_t size_arg(const Napi::CallbackInfo& info, size_t i, const char* name);   // integer >= 0
int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* name);    // any integer
float float_arg(const Napi::CallbackInfo& info, size_t i, const char* name);
bool bool_arg(const Napi::CallbackInfo& info, size_t i, const char* name);
lora_dtype dtype_arg(const Napi::CallbackInfo& info, size_t i);
int32_t device_arg(const Napi::CallbackInfo& info, size_t i);

// s (when not null) has `dtype` (one of the `dtypes` bits, 1 << lora_dtype) and at least `elements`
// elements, else ERR_LORA_DTYPE/SHAPE.
void need(const Napi::CallbackInfo& info, Storage* s, lora_dtype dtype, int64_t elements, const char* name);
void need_any(const Napi::CallbackInfo& info, Storage* s, uint32_t dtypes, int64_t elements, const char* name);
// Every storage of one call lives on one device; returns that device's backend.
lora_backend* same_backend(const Napi::CallbackInfo& info, std::initializer_list<Storage*> list);

// An entry a backend may leave out (NULL): ERR_LORA_UNSUPPORTED naming the op.
inline void require_entry(Napi::Env env, bool present, lora_backend* be, const char* op) {
  if (!present) check_status(env, LORA_UNSUPPORTED, be, op);
}

template <typename T>
T* ptr(Storage* s) {
  return s ? static_cast<T*>(s->ptr_) : nullptr;
}

// Sizes come from JS as integers up to 2^53; their products and extents saturate at INT64_MAX
// (which no allocation holds, so need() rejects it) instead of wrapping past a size check.
inline int64_t mul_sat(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}
inline int64_t add_sat(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}

// Reads JS arrays of non-negative integers (dims, strides) into a layout.
lora_layout layout_arg(const Napi::CallbackInfo& info, size_t shape_i, size_t stride_i, const char* name);
int64_t layout_numel(const lora_layout& l);
// One past the furthest element a layout touches from `offset` (0 when it touches none).
int64_t layout_extent(const lora_layout& l, int64_t offset);

// ---- kernel specs -------------------------------------------------------------------------------

constexpr uint32_t kF32 = 1u << LORA_F32, kBF16 = 1u << LORA_BF16, kF16 = 1u << LORA_F16, kI32 = 1u << LORA_I32;

struct Arg {
  enum Kind : uint8_t {
    kTensor,   // a Storage; size: the elements it must hold, a product of size names and
               // integers ("N*C", "R/2" divides), "#x" being tensor x's element count
    kSize,     // an integer >= 0 (int64_t)
    kInt32,    // an integer that fits int32_t
    kNumber,   // a number (float), optionally in [lo, hi] or [lo, hi)
    kFlag,     // a boolean
    kSeed,     // an integer in [0, 2^53] (uint64_t)
    kEnum,     // an integer in [0, count) (an op id)
    kDtypeOf,  // no JS argument: the dtype of tensor `of`
    kNumelOf,  // no JS argument: the element count of tensor `of`
  } kind;
  const char* name;
  uint32_t dtypes = 0;
  const char* size = "";
  bool optional = false;
  double lo = -INFINITY, hi = INFINITY;
  bool hi_open = false;
  const char* of = "";
};

inline Arg tensor(const char* name, uint32_t dtypes, const char* size) {
  Arg a{Arg::kTensor, name};
  a.dtypes = dtypes;
  a.size = size;
  return a;
}
inline Arg optional_tensor(const char* name, uint32_t dtypes, const char* size) {
  Arg a = tensor(name, dtypes, size);
  a.optional = true;
  return a;
}
inline Arg size(const char* name) { return Arg{Arg::kSize, name}; }
inline Arg int32(const char* name) { return Arg{Arg::kInt32, name}; }
inline Arg number(const char* name) { return Arg{Arg::kNumber, name}; }
inline Arg number_in(const char* name, double lo, double hi, bool hi_open) {
  Arg a{Arg::kNumber, name};
  a.lo = lo;
  a.hi = hi;
  a.hi_open = hi_open;
  return a;
}
inline Arg flag(const char* name) { return Arg{Arg::kFlag, name}; }
inline Arg seed() { return Arg{Arg::kSeed, "seed"}; }
inline Arg enumeration(const char* name, int32_t count) {
  Arg a{Arg::kEnum, name};
  a.hi = count;
  return a;
}
inline Arg dtype_of(const char* tensor_name) {
  Arg a{Arg::kDtypeOf, tensor_name};
  a.of = tensor_name;
  return a;
}
inline Arg numel_of(const char* tensor_name) {
  Arg a{Arg::kNumelOf, tensor_name};
  a.of = tensor_name;
  return a;
}

// One checked argument: the storage of a tensor, or the value of anything else.
struct Slot {
  Storage* s = nullptr;
  int64_t i = 0;
  double f = 0.0;
};

// A spec with its size expressions resolved to argument indices (done once, at registration).
class Spec {
 public:
  // name: the JS function's; errors name the kernel (its snake_case C name).
  Spec(const std::string& name, std::vector<Arg> args);
  // Reads info's arguments into slots, checks them all, returns the backend they live on.
  lora_backend* read(const Napi::CallbackInfo& info, std::vector<Slot>& slots) const;
  // The TypeScript parameter list, e.g. "y: S, x: S, N: number".
  std::string ts_params() const;
  const std::vector<Arg>& args() const { return args_; }
  const char* op_name() const { return op_name_.c_str(); }

 private:
  struct Term {
    bool divide;
    int arg;          // index of a size argument, or -1 for the literal
    bool numel;       // arg is a tensor: its element count
    int64_t literal;
  };
  int index_of(const std::string& name) const;
  int64_t eval(const std::vector<Term>& expr, const std::vector<Slot>& slots) const;
  std::string op_name_;
  std::vector<Arg> args_;
  std::vector<std::vector<Term>> sizes_;  // per tensor argument
  std::vector<int> js_index_;             // JS argument index per spec argument (-1: derived)
};

// Whether a C parameter type can take an argument kind (checked at registration, so a spec that
// does not match its entry stops the addon from loading instead of passing the wrong bits).
template <typename T>
bool fits(const Arg& a) {
  if constexpr (std::is_pointer_v<T>) {
    using E = std::remove_cv_t<std::remove_pointer_t<T>>;
    if (a.kind != Arg::kTensor) return false;
    if constexpr (std::is_same_v<E, float>) return a.dtypes == kF32;
    else if constexpr (std::is_same_v<E, int32_t>) return a.dtypes == kI32;
    else if constexpr (std::is_same_v<E, uint16_t>) return (a.dtypes & ~(kBF16 | kF16)) == 0;
    else return std::is_void_v<E>;
  } else if constexpr (std::is_same_v<T, bool>) {
    return a.kind == Arg::kFlag;
  } else if constexpr (std::is_same_v<T, float>) {
    return a.kind == Arg::kNumber;
  } else if constexpr (std::is_same_v<T, uint64_t>) {
    return a.kind == Arg::kSeed;
  } else if constexpr (std::is_same_v<T, lora_dtype>) {
    return a.kind == Arg::kDtypeOf;
  } else if constexpr (std::is_enum_v<T>) {
    return a.kind == Arg::kEnum;
  } else if constexpr (std::is_same_v<T, int32_t>) {
    return a.kind == Arg::kInt32;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return a.kind == Arg::kSize || a.kind == Arg::kNumelOf;
  } else {
    return false;
  }
}

// The C value of a checked slot.
template <typename T>
T as(const Slot& s) {
  if constexpr (std::is_pointer_v<T>) return static_cast<T>(s.s ? s.s->ptr_ : nullptr);
  else if constexpr (std::is_same_v<T, bool>) return s.i != 0;
  else if constexpr (std::is_same_v<T, float>) return static_cast<float>(s.f);
  else return static_cast<T>(s.i);  // sizes, int32, seeds, enums, dtypes
}

// Turns InvalidArgument from a kernel that checks int32 ids into a range error naming them.
struct IdsCheck {
  const char* what = nullptr;  // "id", "target (or ignoreIndex)"; nullptr: no ids
  const char* bound = "";      // the size argument ids must stay below
};

using Callback = Napi::Value (*)(const Napi::CallbackInfo&);

// Every function the addon exports: its JS name, its wrapper, its TypeScript signature and, for a
// kernel, the op it serves and whether a backend has that entry.
struct Export {
  std::string name;
  std::function<Napi::Value(const Napi::CallbackInfo&)> fn;
  std::string ts_signature;  // "(a: S, n: number): void"
  int32_t op = -1;           // lora_op, or -1
  std::function<bool(const lora_backend*, int32_t dtype)> has_entry;
};

class Registry {
 public:
  // A hand-written function (for a kernel: the op it serves and whether a backend has it).
  void fn(const char* name, Callback callback, const char* ts_signature, int32_t op = -1,
          std::function<bool(const lora_backend*, int32_t)> has_entry = nullptr);
  template <typename F>
  void fn(const char* name, Callback callback, const char* ts_signature, lora_op op, F lora_backend::*entry) {
    fn(name, callback, ts_signature, op, [entry](const lora_backend* be, int32_t) { return be->*entry != nullptr; });
  }

  // A kernel from its spec: `name` synchronously and, when async_name is given, `async_name`
  // returning a Promise (the kernel runs on libuv's thread pool, holding its tensors' memory).
  // op: the lora_op it serves (for supports()), or -1 (fill).
  template <typename... P>
  void kernel(const char* name, int32_t op, lora_status (*lora_backend::*entry)(lora_backend*, P...),
              std::vector<Arg> args, const char* async_name = nullptr, IdsCheck ids = {}) {
    auto spec = std::make_shared<const Spec>(name, std::move(args));
    check_fits<P...>(*spec, std::index_sequence_for<P...>{});
    auto call = [spec, entry, ids](const Napi::CallbackInfo& info) -> Napi::Value {
      std::vector<Slot> slots;
      lora_backend* be = spec->read(info, slots);
      const auto fn = be->*entry;
      const lora_status s = fn ? invoke(fn, be, slots, std::index_sequence_for<P...>{}) : LORA_UNSUPPORTED;
      check_kernel_status(info, s, be, *spec, slots, ids);
      return info.Env().Undefined();
    };
    auto has = [entry](const lora_backend* be, int32_t) { return be->*entry != nullptr; };
    exports_.push_back({name, call, "(" + spec->ts_params() + "): void", op, has});
    if (async_name == nullptr) return;
    auto call_async = [spec, entry](const Napi::CallbackInfo& info) -> Napi::Value {
      std::vector<Slot> slots;
      lora_backend* be = spec->read(info, slots);
      const auto fn = be->*entry;
      std::vector<std::shared_ptr<Block>> blocks;
      for (const Slot& s : slots)
        if (s.s) blocks.push_back(s.s->block_);
      // The C arguments are taken now, on the main thread; the blocks keep their memory alive.
      auto args = converted<P...>(slots, std::index_sequence_for<P...>{});
      auto job = [fn, be, args]() -> lora_status {
        if (!fn) return LORA_UNSUPPORTED;
        return std::apply([&](P... a) { return fn(be, a...); }, args);
      };
      return queue_kernel(info.Env(), spec->op_name(), be, std::move(blocks), job);
    };
    exports_.push_back({async_name, call_async, "(" + spec->ts_params() + "): Promise<void>", -1, nullptr});
  }

  const std::vector<Export>& exports() const { return exports_; }

 private:
  template <typename... P, size_t... I>
  static void check_fits(const Spec& spec, std::index_sequence<I...>) {
    if (spec.args().size() != sizeof...(P))
      throw std::logic_error(std::string("the binding spec of ") + spec.op_name() + " has " +
                             std::to_string(spec.args().size()) + " arguments; its entry takes " +
                             std::to_string(sizeof...(P)));
    const bool ok[] = {true, fits<P>(spec.args()[I])...};
    for (size_t k = 1; k < sizeof ok; ++k)
      if (!ok[k])
        throw std::logic_error(std::string("the binding spec of ") + spec.op_name() + ": argument '" +
                               spec.args()[k - 1].name + "' does not fit the entry's parameter " +
                               std::to_string(k - 1));
  }
  template <typename... P, size_t... I>
  static lora_status invoke(lora_status (*fn)(lora_backend*, P...), lora_backend* be,
                            const std::vector<Slot>& slots, std::index_sequence<I...>) {
    return fn(be, as<P>(slots[I])...);
  }
  template <typename... P, size_t... I>
  static std::tuple<P...> converted(const std::vector<Slot>& slots, std::index_sequence<I...>) {
    return std::tuple<P...>(as<P>(slots[I])...);
  }
  static void check_kernel_status(const Napi::CallbackInfo& info, lora_status s, lora_backend* be,
                                  const Spec& spec, const std::vector<Slot>& slots, const IdsCheck& ids);

  std::vector<Export> exports_;
};

// Each binding file registers its functions (called once, when the addon first loads).
void register_storage(Registry& r);   // storage.cc
void register_io(Registry& r);        // io.cc
void register_tensor_ops(Registry& r);  // tensor_ops.cc
void register_lora(Registry& r);      // lora.cc
void register_optim(Registry& r);     // optim.cc
void register_nn(Registry& r);        // nn.cc

}  // namespace binding
}  // namespace lora
