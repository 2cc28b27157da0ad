// Environment knobs of the native code. Every knob is named LORA_NATIVE_*; a knob that had another
// name before is still read under that name when the new one is unset (lib/native.ts warns about
// the old name once). README.md lists every knob in one table.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lora {

// The value of `name`, else of `old_name` (may be nullptr), else nullptr. Empty counts as unset.
inline const char* env_get(const char* name, const char* old_name = nullptr) {
  const char* v = std::getenv(name);
  if (v && *v) return v;
  v = old_name ? std::getenv(old_name) : nullptr;
  return v && *v ? v : nullptr;
}

// Whether the knob is set to exactly `value`.
inline bool env_is(const char* name, const char* old_name, const char* value) {
  const char* v = env_get(name, old_name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace lora
