#!/usr/bin/env bash
# The GPU check in one command, for the device machine (H200, no registries, maybe no node):
# correctness of every CUDA op against the float64 references (check.js: the parity suite of
# test/parity/), PEFT interop (peft_interop.py:
# adapters PEFT makes, merged and re-saved by lora-native, read back by PEFT), then lora-native timings
# (bench.js) beside PyTorch + PEFT (bench_torch.py), then one markdown table (table.py).
# Full logs go under $OUT; the table is printed last. Budget: < 8 minutes (each phase has a timeout).
# Needs, carried from the build machine: build/Release/{lora_native.node,liblora_cuda.so}, dist/,
# node_modules/node-gyp-build, and .device/node.xz when the machine has no node (bench/gpu/README.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/bench/results/gpu}"
mkdir -p "$OUT"
QUICK="${LORA_NATIVE_BENCH_QUICK:+--quick}"
START=$(date +%s)
log() { echo "[run.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/run.log"; }

# ---- node -----------------------------------------------------------------------------------
NODE="$(command -v node || true)"
if [ -z "$NODE" ] && [ -f .device/node.xz ]; then
  xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && NODE=/tmp/node
fi
if [ -z "$NODE" ]; then log "FAIL: no node on PATH and no .device/node.xz carried"; exit 1; fi
log "node $("$NODE" --version) at $NODE"
{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER 2>/dev/null | head -60; } > "$OUT/nvidia-smi.txt" 2>&1
head -15 "$OUT/nvidia-smi.txt" | tee -a "$OUT/run.log"

# ---- the addon and the CUDA library ---------------------------------------------------------
if [ ! -f build/Release/lora_native.node ]; then
  log "FAIL: build/Release/lora_native.node missing: build it here first and carry build/"; exit 1
fi
if [ ! -f dist/lib/native.js ] && [ ! -f dist/native.js ]; then
  log "FAIL: dist/ missing: run npm run build:ts here first and carry dist/"; exit 1
fi
if [ ! -f build/Release/liblora_cuda.so ] || [ -n "${LORA_NATIVE_REBUILD_CUDA:-}" ]; then
  NVCC="$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)"
  if [ -n "$NVCC" ] && command -v cmake >/dev/null; then
    log "building liblora_cuda.so here with $NVCC (sm_90 only)"
    GEN=$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles")
    if timeout 300 cmake -S cuda -B build/cuda-device -G "$GEN" -DCMAKE_CUDA_COMPILER="$NVCC" \
         -DLORA_NATIVE_CUDA_ARCHS=90-real > "$OUT/cuda-build.log" 2>&1 &&
       timeout 300 cmake --build build/cuda-device -j "$(nproc)" >> "$OUT/cuda-build.log" 2>&1; then
      cp build/cuda-device/liblora_cuda.so build/Release/liblora_cuda.so
    else
      tail -30 "$OUT/cuda-build.log"; log "FAIL: CUDA build failed (log: cuda-build.log)"; exit 1
    fi
  else
    log "FAIL: no build/Release/liblora_cuda.so carried and no nvcc+cmake here"; exit 1
  fi
fi
"$NODE" -e "const f=require('./bench/gpu/common').native.features(); console.log(JSON.stringify(f)); if(!f.cuda) process.exit(2)" \
  > "$OUT/features.json" 2>&1
FEAT_RC=$?
cat "$OUT/features.json" | tee -a "$OUT/run.log"
if [ $FEAT_RC -ne 0 ]; then log "FAIL: CUDA backend did not load (reason above)"; exit 1; fi

# ---- correctness ----------------------------------------------------------------------------
log "check.js: the parity suite on cuda (every op vs the float64 references)"
timeout 140 "$NODE" bench/gpu/check.js > "$OUT/check.log" 2>&1
CHECK_RC=$?
grep -E '^FAIL|^parity' "$OUT/check.log" | tail -40 | tee -a "$OUT/run.log"
[ $CHECK_RC -eq 124 ] && log "check.js TIMED OUT (partial log in check.log)"
log "check.js lora cases again with the alternates (LORA_NATIVE_CUDA_TC=staged LORA_NATIVE_CUDA_SKINNY=simt)"
LORA_NATIVE_CUDA_TC=staged LORA_NATIVE_CUDA_SKINNY=simt LORA_NATIVE_PARITY_ONLY=lora timeout 40 "$NODE" bench/gpu/check.js \
  > "$OUT/check_alt.log" 2>&1
STAGED_RC=$?
grep -E '^FAIL|^parity' "$OUT/check_alt.log" | tail -20 | tee -a "$OUT/run.log"
[ $STAGED_RC -ne 0 ] && CHECK_RC=$STAGED_RC

# ---- PEFT interop (CPU work; torch + peft exist only on the device machine) -------------------
log "peft_interop: adapters made by PEFT, merged and re-saved by lora-native, read back by PEFT"
PI="${TMPDIR:-/tmp}/lora-native-peft-interop"  # many small files: kept out of $OUT
rm -rf "$PI"
{ timeout 60 python3 bench/gpu/peft_interop.py make "$PI" &&
  timeout 60 "$NODE" bench/gpu/peft_interop.js "$PI" &&
  timeout 60 python3 bench/gpu/peft_interop.py reload "$PI"; } > "$OUT/peft_interop.log" 2>&1
timeout 30 python3 bench/gpu/peft_interop.py compare "$PI" > "$OUT/peft_interop.md" 2>&1
PEFT_RC=$?
tail -3 "$OUT/peft_interop.log" | tee -a "$OUT/run.log"
cat "$OUT/peft_interop.md" | tee -a "$OUT/run.log"

# ---- timings --------------------------------------------------------------------------------
log "bench.js: lora-native timings"
timeout 110 "$NODE" bench/gpu/bench.js --out "$OUT/ours.json" $QUICK > "$OUT/bench_ours.log" 2>&1
BENCH_RC=$?
[ $BENCH_RC -ne 0 ] && { tail -20 "$OUT/bench_ours.log"; log "bench.js exited $BENCH_RC"; }
log "bench.js --alt: register-staged bf16 GEMM and SIMT adapter GEMMs, for comparison"
LORA_NATIVE_CUDA_TC=staged LORA_NATIVE_CUDA_SKINNY=simt timeout 50 "$NODE" bench/gpu/bench.js --alt --out "$OUT/ours_alt.json" $QUICK \
  > "$OUT/bench_ours_alt.log" 2>&1 || log "alt-variant bench exited $? (see bench_ours_alt.log)"
log "bench_torch.py: PyTorch + PEFT timings"
timeout 110 python3 bench/gpu/bench_torch.py --out "$OUT/torch.json" $QUICK > "$OUT/bench_torch.log" 2>&1
TORCH_RC=$?
[ $TORCH_RC -ne 0 ] && { tail -20 "$OUT/bench_torch.log"; log "bench_torch.py exited $TORCH_RC"; }

python3 bench/gpu/table.py "$OUT/ours.json" "$OUT/torch.json" "$OUT/check.log" "$OUT/ours_alt.json" > "$OUT/table.md" 2>&1
log "done (check rc $CHECK_RC, peft interop rc $PEFT_RC, bench rc $BENCH_RC, torch rc $TORCH_RC); logs in $OUT"
echo
cat "$OUT/table.md"
echo
cat "$OUT/peft_interop.md"
[ $CHECK_RC -eq 0 ] && [ $PEFT_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
