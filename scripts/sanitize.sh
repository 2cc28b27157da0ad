#!/usr/bin/env bash
# Builds the CPU addon with AddressSanitizer and UndefinedBehaviorSanitizer in build-asan/ (a copy of
# the sources, so build/ is untouched) and runs the native-heavy tests against it through
# LORA_NATIVE_ADDON. Any sanitizer report fails the run (UBSan is made fatal; ASan aborts by
# itself). Leak detection is off: V8 and Node leak at exit by design.
# Usage: bash scripts/sanitize.sh [test files...]   (npm run sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/build-asan"
src="$out/src"

echo "== building the addon with -fsanitize=address,undefined in build-asan/"
# Sources are copied over the previous copy (cp -p keeps times), so make rebuilds only what changed.
mkdir -p "$src"
rm -rf "$src/native"
cp -rp native binding.gyp package.json "$src/"
[ -e "$src/node_modules" ] || ln -s "$root/node_modules" "$src/node_modules"
nodedir=$(npm config get nodedir 2>/dev/null || true)
gyp_args=(rebuild --jobs=2)
[ -f "$src/build/Makefile" ] && gyp_args=(build --jobs=2)
if [ -n "$nodedir" ] && [ "$nodedir" != "undefined" ] && [ "$nodedir" != "null" ]; then gyp_args+=("--nodedir=$nodedir"); fi
# -O1 (after binding.gyp's -O3 on the command line, so it wins) and line tables only (-g1, enough
# for the file:line of every frame in a report): the instrumented -O3 -g build took 221 s on two
# cores in CI, this one 54-62 s (CI, and a local run), and the tests ran no slower (141-171 s
# against 168 s).
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g1"
started=$(date +%s)
(cd "$src" && CXXFLAGS="$flags" CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
  node "$root/node_modules/node-gyp/bin/node-gyp.js" "${gyp_args[@]}" >"$out/build.log" 2>&1) || {
  tail -40 "$out/build.log"
  echo "sanitize: build failed (log: $out/build.log)"
  exit 1
}
addon="$src/build/Release/lora_native.node"
instrumented=$(nm -D "$addon" | grep -c " U __asan_" || true)
[ "$instrumented" -gt 0 ] || { echo "sanitize: $addon is not instrumented"; exit 1; }
echo "   built in $(( $(date +%s) - started )) s: $addon"

asan=$(g++ -print-file-name=libasan.so)
ubsan=$(g++ -print-file-name=libubsan.so)
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(test/tensor.test.ts test/lora_forward.test.ts test/optim.test.ts test/nn_ops.test.ts test/errors.test.ts
         test/safetensors.test.ts test/fuzz.test.ts test/hostile.test.ts test/memory_soak.test.ts
         test/attention.test.ts test/causal_lm.test.ts)
fi

echo "== ${#tests[@]} test files against the sanitized addon"
log="$out/test.log"
set +e
LORA_NATIVE_SANITIZE=1 LORA_NATIVE_ADDON="$addon" LD_PRELOAD="$asan $ubsan" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:handle_segv=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  npx tap --disable-coverage --jobs=2 --timeout=900 "${tests[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
reports=$(grep -cE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|UndefinedBehaviorSanitizer" "$log" || true)
echo "sanitize: tests exit $status, $reports sanitizer report(s), $(( $(date +%s) - started )) s in all (log: $log)"
if [ "$status" -ne 0 ] || [ "$reports" -ne 0 ]; then exit 1; fi
