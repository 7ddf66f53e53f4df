#!/usr/bin/env bash
# GPU validation on a lent H200 (torch 2.11+cu130, Python 3.12, nvcc 13, 16 cores, no internet):
# build from source for sm_90a, run the whole test suite (CUDA tests included), compute-sanitizer
# (memcheck) over the CUDA tests of the multi-adapter, merge and lora_apply kernels, then every
# GPU benchmark (ceilings measured in the same run).
# Writes under $OUT (at most 8 files): build.log, pytest.log, sanitizer.log, bench.log,
# bench-h200.json, multi_lora-cuda.png. Fits in 8 minutes: every stage is capped by what is left of a 470 s budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# CUDA_HOME: as given, else /usr/local/cuda when it has nvcc, else setup.py finds nvcc on PATH
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${BUDGET:-470}
status=0
start=$SECONDS
stage() { echo "== $1 ($(date +%T), $((SECONDS - start)) s)"; }
left() {  # seconds for the next stage: min(cap, what the budget leaves), at least 10
  local l=$((BUDGET - (SECONDS - start)))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 10 ] && l=10
  echo "$l"
}

stage build
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/build.log" 2>&1
if ! timeout "$(left 200)" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "^ptxas|spill" "$OUT/build.log" | tail -6
"$PY" -m lora_ext info 2>&1 | tee -a "$OUT/build.log"

stage tests
# (the CPU emulation of the CUDA kernels is for machines without a GPU: skipped here)
timeout "$(left 150)" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider --maxfail=20 \
  --deselect tests/test_emulation.py \
  >"$OUT/pytest.log" 2>&1 || status=1
tail -15 "$OUT/pytest.log"

stage sanitizer
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
SAN_TESTS=$(ls tests/test_multi_lora.py tests/test_merge.py tests/test_lora_apply.py 2>/dev/null)
if [ -x "$SAN" ]; then
  timeout "$(left 70)" "$SAN" --tool memcheck --error-exitcode 9 "$PY" -m pytest $SAN_TESTS -q -m cuda \
    -k "not compile and not graph and not cycles" -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1 || status=1
  tail -5 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi

stage bench
: >"$OUT/bench.log"
for b in roofline lora_apply lora_linear peft_train merge multi_lora pool; do
  LORA_EXT_BENCH_OUT="$OUT" timeout "$(left 90)" "$PY" bench/run.py --device cuda --only "$b" \
    >>"$OUT/bench.log" 2>&1 || { status=1; echo "bench $b failed or timed out" | tee -a "$OUT/bench.log"; }
done
tail -80 "$OUT/bench.log"
"$PY" - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
docs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*-cuda.json")))]
with open(os.path.join(out, "bench-h200.json"), "w") as f:
    json.dump(docs, f, indent=1)
for p in glob.glob(os.path.join(out, "*-cuda.json")):
    os.remove(p)
PY
stage done
exit $status
