// The binding of the optimizer steps: parallel arrays of storages (parameters, gradients, state),
// one call over every parameter of an optimizer.
#include "args.h"

namespace lora {
namespace binding {
namespace {

// Reads a JS array of float32 storages (null/undefined is an empty list when allow_empty).
std::vector<Storage*> storage_list(const Napi::CallbackInfo& info, size_t i, const char* name, bool allow_empty) {
  Napi::Env env = info.Env();
  std::vector<Storage*> out;
  if (allow_empty && (info[i].IsNull() || info[i].IsUndefined())) return out;
  if (!info[i].IsArray()) throw_lora(env, "ERR_LORA_TYPE", std::string("Expected an array of tensors for ") + name);
  Napi::Array arr = info[i].As<Napi::Array>();
  for (uint32_t k = 0; k < arr.Length(); ++k) {
    Napi::Value v = arr[k];
    if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
      throw_lora(env, "ERR_LORA_TYPE", std::string("Expected tensor storages in ") + name);
    Storage* s = Storage::Unwrap(v.As<Napi::Object>());
    if (s->disposed_) throw_lora(env, "ERR_LORA_DISPOSED", std::string("a tensor in ") + name + " has been disposed");
    if (s->dtype_ != LORA_F32) throw_lora(env, "ERR_LORA_DTYPE", std::string("optimizer tensors must be float32 in ") + name);
    out.push_back(s);
  }
  return out;
}

// The pointer tables of one optimizer call, checked: one device, equal sizes per parameter.
struct ParamGroup {
  lora_backend* backend = nullptr;
  std::vector<float*> p, m, v;
  std::vector<const float*> g;
  std::vector<int64_t> n;
};

ParamGroup param_group(const Napi::CallbackInfo& info, const std::vector<Storage*>& p, const std::vector<Storage*>& g,
                       const std::vector<Storage*>& m, const std::vector<Storage*>& v) {
  Napi::Env env = info.Env();
  ParamGroup pg;
  if (g.size() != p.size() || (!m.empty() && m.size() != p.size()) || (!v.empty() && v.size() != p.size()))
    throw_lora(env, "ERR_LORA_SHAPE", "optimizer state lists differ in length");
  for (size_t k = 0; k < p.size(); ++k) {
    lora_backend* b = same_backend(info, {p[k], g[k], m.empty() ? nullptr : m[k], v.empty() ? nullptr : v[k]});
    if (pg.backend && b != pg.backend) throw_lora(env, "ERR_LORA_DEVICE", "optimizer parameters on different devices");
    pg.backend = b;
    const int64_t n = p[k]->numel_;
    if (g[k]->numel_ != n || (!m.empty() && m[k]->numel_ != n) || (!v.empty() && v[k]->numel_ != n))
      throw_lora(env, "ERR_LORA_SHAPE", "optimizer state does not match its parameter's size");
    pg.p.push_back(ptr<float>(p[k]));
    pg.g.push_back(ptr<float>(g[k]));
    if (!m.empty()) pg.m.push_back(ptr<float>(m[k]));
    if (!v.empty()) pg.v.push_back(ptr<float>(v[k]));
    pg.n.push_back(n);
  }
  return pg;
}

// adamwStep(params[], grads[], m[], v[], lr, beta1, beta2, eps, weightDecay, step)
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  auto p = storage_list(info, 0, "params", false), g = storage_list(info, 1, "grads", false),
       m = storage_list(info, 2, "expAvg", false), v = storage_list(info, 3, "expAvgSq", false);
  if (m.size() != p.size() || v.size() != p.size()) throw_lora(info.Env(), "ERR_LORA_SHAPE", "optimizer state lists differ in length");
  if (p.empty()) return info.Env().Undefined();
  ParamGroup pg = param_group(info, p, g, m, v);
  lora_backend* be = pg.backend;
  require_entry(info.Env(), be->adamw_step != nullptr, be, "adamw_step");
  check_status(info.Env(),
               be->adamw_step(be, static_cast<int32_t>(p.size()), pg.p.data(), pg.g.data(), pg.m.data(), pg.v.data(),
                              pg.n.data(), float_arg(info, 4, "lr"), float_arg(info, 5, "beta1"), float_arg(info, 6, "beta2"),
                              float_arg(info, 7, "eps"), float_arg(info, 8, "weightDecay"), int_arg(info, 9, "step")),
               be, "adamw_step");
  return info.Env().Undefined();
}

// sgdStep(params[], grads[], buffers[]|null, lr, momentum, dampening, weightDecay, nesterov, step)
Napi::Value SgdStep(const Napi::CallbackInfo& info) {
  auto p = storage_list(info, 0, "params", false), g = storage_list(info, 1, "grads", false),
       buf = storage_list(info, 2, "momentumBuffers", true);
  if (p.empty()) return info.Env().Undefined();
  ParamGroup pg = param_group(info, p, g, buf, {});
  const float momentum = float_arg(info, 4, "momentum");
  if (momentum != 0.0f && buf.size() != p.size())
    throw_lora(info.Env(), "ERR_LORA_SHAPE", "momentum needs one buffer per parameter");
  lora_backend* be = pg.backend;
  require_entry(info.Env(), be->sgd_step != nullptr, be, "sgd_step");
  check_status(info.Env(),
               be->sgd_step(be, static_cast<int32_t>(p.size()), pg.p.data(), pg.g.data(), buf.empty() ? nullptr : pg.m.data(),
                            pg.n.data(), float_arg(info, 3, "lr"), momentum, float_arg(info, 5, "dampening"),
                            float_arg(info, 6, "weightDecay"), bool_arg(info, 7, "nesterov"), int_arg(info, 8, "step")),
               be, "sgd_step");
  return info.Env().Undefined();
}

}  // namespace

void register_optim(Registry& r) {
  r.fn("adamwStep", AdamwStep,
       "(params: S[], grads: S[], expAvg: S[], expAvgSq: S[], lr: number, beta1: number, beta2: number, eps: number, "
       "weightDecay: number, step: number): void",
       LORA_OP_ADAMW_STEP, &lora_backend::adamw_step);
  r.fn("sgdStep", SgdStep,
       "(params: S[], grads: S[], momentumBuffers: S[] | null, lr: number, momentum: number, dampening: number, "
       "weightDecay: number, nesterov: boolean, step: number): void",
       LORA_OP_SGD_STEP, &lora_backend::sgd_step);
}

}  // namespace binding
}  // namespace lora
