// The argument helpers and the kernel specs of args.h, and the async worker of async.h.
#include "args.h"

#include <cctype>
#include <cstdio>
#include <cstring>

namespace lora {
namespace binding {

// ---- plain helpers ------------------------------------------------------------------------------

Storage* storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  Napi::Value v = info[i];
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
    throw_lora(env, "ERR_LORA_TYPE", std::string("Expected a tensor storage for ") + name);
  Storage* s = Storage::Unwrap(v.As<Napi::Object>());
  if (s->disposed_) throw_lora(env, "ERR_LORA_DISPOSED", std::string(name) + " has been disposed");
  return s;
}

Storage* optional_storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info[i].IsNull() || info[i].IsUndefined()) return nullptr;
  return storage_arg(info, i, name);
}

double number_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) throw_lora(info.Env(), "ERR_LORA_TYPE", std::string("Expected a number for ") + name);
  return info[i].As<Napi::Number>().DoubleValue();
}

constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1: the largest integer a double holds exactly

int64_t size_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  const double d = number_arg(info, i, name);
  if (!(d >= 0) || d != std::floor(d) || d > kMaxSafe)
    throw_lora(info.Env(), "ERR_LORA_RANGE",
               std::string("Expected a non-negative integer for ") + name + " but received " + std::to_string(d));
  return static_cast<int64_t>(d);
}

int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  const double d = number_arg(info, i, name);
  if (d != std::floor(d) || std::fabs(d) > kMaxSafe)
    throw_lora(info.Env(), "ERR_LORA_RANGE", std::string("Expected an integer for ") + name);
  return static_cast<int64_t>(d);
}

float float_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  return static_cast<float>(number_arg(info, i, name));
}

bool bool_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsBoolean()) throw_lora(info.Env(), "ERR_LORA_TYPE", std::string("Expected a boolean for ") + name);
  return info[i].As<Napi::Boolean>().Value();
}

lora_dtype dtype_arg(const Napi::CallbackInfo& info, size_t i) {
  const int64_t t = int_arg(info, i, "dtype");
  if (t < 0 || t >= LORA_DTYPE_COUNT) throw_lora(info.Env(), "ERR_LORA_DTYPE", "unknown dtype id " + std::to_string(t));
  return static_cast<lora_dtype>(t);
}

int32_t device_arg(const Napi::CallbackInfo& info, size_t i) {
  const int64_t d = int_arg(info, i, "device");
  if (d < 0 || d >= kDeviceCount) throw_lora(info.Env(), "ERR_LORA_DEVICE", "unknown device id " + std::to_string(d));
  return static_cast<int32_t>(d);
}

namespace {

std::string dtype_list(uint32_t mask) {
  std::string out;
  for (int t = 0; t < LORA_DTYPE_COUNT; ++t)
    if (mask & (1u << t)) out += (out.empty() ? "" : " or ") + std::string(lora_dtype_name(t));
  return out;
}

std::string shortest(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

void need_any(const Napi::CallbackInfo& info, Storage* s, uint32_t dtypes, int64_t elements, const char* name) {
  if (!s) return;
  if (!(dtypes & (1u << s->dtype_)))
    throw_lora(info.Env(), "ERR_LORA_DTYPE",
               std::string("Expected ") + name + " as " + dtype_list(dtypes) + " but received " + lora_dtype_name(s->dtype_));
  if (elements < 0 || s->numel_ < elements)
    throw_lora(info.Env(), "ERR_LORA_SHAPE",
               std::string(name) + " holds " + std::to_string(s->numel_) + " elements but the op needs " +
                   std::to_string(elements));
}

void need(const Napi::CallbackInfo& info, Storage* s, lora_dtype dtype, int64_t elements, const char* name) {
  need_any(info, s, 1u << dtype, elements, name);
}

lora_backend* same_backend(const Napi::CallbackInfo& info, std::initializer_list<Storage*> list) {
  Storage* first = nullptr;
  for (Storage* s : list) {
    if (!s) continue;
    if (!first) first = s;
    else if (s->device_ != first->device_)
      throw_lora(info.Env(), "ERR_LORA_DEVICE", "Expected every tensor of one op on the same device");
  }
  if (!first) throw_lora(info.Env(), "ERR_LORA_INTERNAL", "op called without tensors");
  return first->backend_;
}

lora_layout layout_arg(const Napi::CallbackInfo& info, size_t shape_i, size_t stride_i, const char* name) {
  Napi::Env env = info.Env();
  if (!info[shape_i].IsArray() || !info[stride_i].IsArray())
    throw_lora(env, "ERR_LORA_TYPE", std::string("Expected shape and stride arrays for ") + name);
  Napi::Array shape = info[shape_i].As<Napi::Array>(), stride = info[stride_i].As<Napi::Array>();
  if (shape.Length() != stride.Length() || shape.Length() > LORA_MAX_DIMS)
    throw_lora(env, "ERR_LORA_SHAPE", std::string("Expected at most 8 dims with one stride each for ") + name);
  lora_layout l{};
  l.ndim = static_cast<int32_t>(shape.Length());
  for (uint32_t k = 0; k < shape.Length(); ++k) {
    Napi::Value a = shape[k], b = stride[k];
    if (!a.IsNumber() || !b.IsNumber()) throw_lora(env, "ERR_LORA_TYPE", std::string("bad layout for ") + name);
    const double dv = a.As<Napi::Number>().DoubleValue(), sv = b.As<Napi::Number>().DoubleValue();
    if (!(dv >= 0) || dv != std::floor(dv) || !(sv >= 0) || sv != std::floor(sv) || dv > kMaxSafe || sv > kMaxSafe)
      throw_lora(env, "ERR_LORA_SHAPE", std::string("bad layout for ") + name);
    l.shape[k] = static_cast<int64_t>(dv);
    l.stride[k] = static_cast<int64_t>(sv);
  }
  return l;
}

int64_t layout_numel(const lora_layout& l) {
  int64_t n = 1;
  for (int k = 0; k < l.ndim; ++k) n = mul_sat(n, l.shape[k]);
  return n;
}

int64_t layout_extent(const lora_layout& l, int64_t offset) {
  int64_t last = offset;
  for (int k = 0; k < l.ndim; ++k) {
    if (l.shape[k] == 0) return 0;
    last = add_sat(last, mul_sat(l.shape[k] - 1, l.stride[k]));
  }
  return add_sat(last, 1);
}

// ---- specs --------------------------------------------------------------------------------------

namespace {

// "crossEntropyBackward" -> "cross_entropy_backward"
std::string snake_case(const std::string& name) {
  std::string out;
  for (char c : name) {
    if (std::isupper(static_cast<unsigned char>(c))) {
      out += '_';
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

Spec::Spec(const std::string& name, std::vector<Arg> args) : op_name_(snake_case(name)), args_(std::move(args)) {
  int js = 0;
  for (const Arg& a : args_) js_index_.push_back(a.kind == Arg::kDtypeOf || a.kind == Arg::kNumelOf ? -1 : js++);
  for (const Arg& a : args_) {
    if ((a.kind == Arg::kDtypeOf || a.kind == Arg::kNumelOf) &&
        (index_of(a.of) < 0 || args_[index_of(a.of)].kind != Arg::kTensor))
      throw std::logic_error("the binding spec of " + op_name_ + " names no tensor '" + a.of + "'");
    std::vector<Term> expr;
    if (a.kind == Arg::kTensor) {
      // "N*C", "R/2", "#x": factors joined by * or /
      const std::string text = a.size;
      size_t pos = 0;
      bool divide = false;
      while (pos < text.size()) {
        size_t end = text.find_first_of("*/", pos);
        if (end == std::string::npos) end = text.size();
        const std::string tok = text.substr(pos, end - pos);
        Term t{divide, -1, false, 0};
        if (!tok.empty() && std::isdigit(static_cast<unsigned char>(tok[0]))) {
          t.literal = std::stoll(tok);
        } else {
          const bool numel = !tok.empty() && tok[0] == '#';
          t.arg = index_of(numel ? tok.substr(1) : tok);
          t.numel = numel;
          const bool ok = t.arg >= 0 && (numel ? args_[t.arg].kind == Arg::kTensor : args_[t.arg].kind == Arg::kSize);
          if (!ok)
            throw std::logic_error("the binding spec of " + op_name_ + ": size '" + text + "' of " +
                                   a.name + " names no " + (numel ? "tensor" : "size") + " '" + tok + "'");
        }
        if (divide && t.arg < 0 && t.literal == 0)
          throw std::logic_error("the binding spec of " + op_name_ + " divides by 0");
        expr.push_back(t);
        if (end < text.size()) divide = text[end] == '/';
        pos = end + 1;
      }
    }
    sizes_.push_back(expr);
  }
}

int Spec::index_of(const std::string& name) const {
  for (size_t k = 0; k < args_.size(); ++k)
    if (args_[k].kind != Arg::kDtypeOf && args_[k].kind != Arg::kNumelOf && name == args_[k].name) return static_cast<int>(k);
  return -1;
}

int64_t Spec::eval(const std::vector<Term>& expr, const std::vector<Slot>& slots) const {
  if (expr.empty()) return 0;  // no size given: any size
  int64_t acc = 1;
  for (const Term& t : expr) {
    const int64_t v = t.arg < 0 ? t.literal : t.numel ? slots[t.arg].s->numel_ : slots[t.arg].i;
    if (!t.divide) acc = mul_sat(acc, v);
    else acc = v == 0 ? 0 : acc / v;
  }
  return acc;
}

lora_backend* Spec::read(const Napi::CallbackInfo& info, std::vector<Slot>& slots) const {
  Napi::Env env = info.Env();
  slots.assign(args_.size(), Slot{});
  Storage* first = nullptr;
  for (size_t k = 0; k < args_.size(); ++k) {
    const Arg& a = args_[k];
    const size_t i = static_cast<size_t>(js_index_[k]);
    Slot& s = slots[k];
    switch (a.kind) {
      case Arg::kTensor:
        s.s = a.optional ? optional_storage_arg(info, i, a.name) : storage_arg(info, i, a.name);
        if (s.s && first && s.s->device_ != first->device_)
          throw_lora(env, "ERR_LORA_DEVICE", "Expected every tensor of one op on the same device");
        if (s.s && !first) first = s.s;
        break;
      case Arg::kSize: s.i = size_arg(info, i, a.name); break;
      case Arg::kInt32:
        s.i = int_arg(info, i, a.name);
        if (s.i < INT32_MIN || s.i > INT32_MAX)
          throw_lora(env, "ERR_LORA_RANGE", std::string(a.name) + " must fit in int32");
        break;
      case Arg::kNumber:
        s.f = number_arg(info, i, a.name);
        if (!(s.f >= a.lo && (a.hi_open ? s.f < a.hi : s.f <= a.hi)) && (std::isfinite(a.lo) || std::isfinite(a.hi)))
          throw_lora(env, "ERR_LORA_RANGE",
                     std::string(a.name) + " must be in [" + shortest(a.lo) + ", " + shortest(a.hi) + (a.hi_open ? ")" : "]"));
        break;
      case Arg::kFlag: s.i = bool_arg(info, i, a.name) ? 1 : 0; break;
      case Arg::kSeed: {
        const double d = number_arg(info, i, a.name);
        if (!(d >= 0) || d != std::floor(d) || d > kMaxSafe)
          throw_lora(env, "ERR_LORA_RANGE", "Expected a non-negative integer seed");
        s.i = static_cast<int64_t>(d);
        break;
      }
      case Arg::kEnum:
        s.i = int_arg(info, i, a.name);
        if (s.i < 0 || s.i >= static_cast<int64_t>(a.hi))
          throw_lora(env, "ERR_LORA_RANGE", std::string("unknown ") + a.name + " " + std::to_string(s.i));
        break;
      case Arg::kDtypeOf:
      case Arg::kNumelOf:
        break;  // filled in below, once every tensor is read
    }
  }
  if (!first) throw_lora(env, "ERR_LORA_INTERNAL", op_name_ + " called without tensors");
  for (size_t k = 0; k < args_.size(); ++k) {
    const Arg& a = args_[k];
    if (a.kind == Arg::kTensor) need_any(info, slots[k].s, a.dtypes, eval(sizes_[k], slots), a.name);
    else if (a.kind == Arg::kDtypeOf) slots[k].i = slots[index_of(a.of)].s->dtype_;
    else if (a.kind == Arg::kNumelOf) slots[k].i = slots[index_of(a.of)].s->numel_;
  }
  return first->backend_;
}

std::string Spec::ts_params() const {
  std::string out;
  for (const Arg& a : args_) {
    if (a.kind == Arg::kDtypeOf || a.kind == Arg::kNumelOf) continue;
    const char* type = a.kind == Arg::kTensor ? (a.optional ? "S | null" : "S") : a.kind == Arg::kFlag ? "boolean" : "number";
    out += (out.empty() ? "" : ", ") + std::string(a.name) + ": " + type;
  }
  return out;
}

// ---- the registry -------------------------------------------------------------------------------

void Registry::fn(const char* name, Callback callback, const char* ts_signature, int32_t op,
                  std::function<bool(const lora_backend*, int32_t)> has_entry) {
  exports_.push_back({name, callback, ts_signature, op, std::move(has_entry)});
}

void Registry::check_kernel_status(const Napi::CallbackInfo& info, lora_status s, lora_backend* be, const Spec& spec,
                                   const std::vector<Slot>& slots, const IdsCheck& ids) {
  if (s == LORA_INVALID_ARGUMENT && ids.what) {
    int64_t bound = 0;
    for (size_t k = 0; k < spec.args().size(); ++k)
      if (std::strcmp(spec.args()[k].name, ids.bound) == 0) bound = slots[k].i;
    throw_lora(info.Env(), "ERR_LORA_RANGE",
               std::string("Expected every ") + ids.what + " between 0 and " + std::to_string(bound - 1) + " for " +
                   spec.op_name());
  }
  check_status(info.Env(), s, be, spec.op_name());
}

// ---- async --------------------------------------------------------------------------------------

namespace {

class KernelWorker : public Napi::AsyncWorker {
 public:
  KernelWorker(Napi::Env env, const char* op, lora_backend* be, std::vector<std::shared_ptr<Block>> blocks, Job job,
               Result result)
      : Napi::AsyncWorker(env, op),
        deferred_(Napi::Promise::Deferred::New(env)),
        op_(op),
        backend_(be),
        state_(data_of(env).state),
        blocks_(std::move(blocks)),
        job_(std::move(job)),
        result_(std::move(result)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    std::lock_guard<std::recursive_mutex> lock(state_->mu);
    try {
      status_ = job_();
      if (status_ != LORA_OK && backend_->last_error) {
        const char* d = backend_->last_error(backend_);
        detail_ = d ? d : "";
      }
    } catch (const std::bad_alloc&) {
      status_ = LORA_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
      status_ = LORA_INVALID_ARGUMENT;
      detail_ = e.what();
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (status_ == LORA_OK) {
      deferred_.Resolve(result_ ? result_(env) : env.Undefined());
      return;
    }
    deferred_.Reject(make_lora_error(env, status_code(status_), status_message(backend_, op_, status_, detail_)));
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  const char* op_;
  lora_backend* backend_;
  std::shared_ptr<AddonState> state_;
  std::vector<std::shared_ptr<Block>> blocks_;
  Job job_;
  Result result_;
  lora_status status_ = LORA_OK;
  std::string detail_;
};

}  // namespace

Napi::Promise queue_kernel(Napi::Env env, const char* op, lora_backend* be, std::vector<std::shared_ptr<Block>> blocks,
                           Job job, Result result) {
  auto* w = new KernelWorker(env, op, be, std::move(blocks), std::move(job), std::move(result));
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

}  // namespace binding
}  // namespace lora
