#!/usr/bin/env bash
# GPU validation on a lent H200 (torch 2.11+cu130, Python 3.12, nvcc 13, 16 cores, no internet):
# build from source for sm_90a, run the whole test suite (CUDA tests included), compute-sanitizer
# over the CUDA tests of the memory-sensitive kernels, and every GPU benchmark.
# Writes under $OUT (at most 8 files): build.log, pytest.log, sanitizer.log, bench.log, bench-*.json.
# Budget: under 8 minutes in all; each stage has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
stage() { echo "== $1 ($(date +%T))"; }

stage build
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/build.log" 2>&1
if ! timeout 240 python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "^ptxas|spill" "$OUT/build.log" | tail -6
python -m lora_ext info 2>&1 | tee -a "$OUT/build.log"

stage tests
timeout 300 python -m pytest tests -q -rfEs -p no:cacheprovider >"$OUT/pytest.log" 2>&1 || status=1
tail -15 "$OUT/pytest.log"

stage sanitizer
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
SAN_TESTS=$(ls tests/test_multi_lora.py tests/test_merge.py tests/test_lora_apply.py 2>/dev/null)
if [ -x "$SAN" ]; then
  timeout 120 "$SAN" --tool memcheck --error-exitcode 9 python -m pytest $SAN_TESTS -q -m cuda \
    -k "not compile and not graph" -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1 || status=1
  tail -5 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi

stage bench
LORA_EXT_BENCH_OUT="$OUT" timeout 200 python bench/run.py --device cuda >"$OUT/bench.log" 2>&1 || status=1
tail -60 "$OUT/bench.log"
python - "$OUT" <<'PY'
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
