#!/usr/bin/env bash
# GPU validation on a lent H200 (torch 2.11+cu130, Python 3.12, nvcc 13, 16 cores, no internet).
# Here first: `python3 bench/gpu_deps.py download` (wheels the image may lack, into .whl/), then
#   device run, carry [".whl"], timeout_s 540:  bash bench/gpu_check.sh
# Stages, most important first, each capped by what is left of a $BUDGET (450 s) budget:
#   deps      unpack the carried wheels whose module is missing (bench/gpu_deps.py)
#   build     from source for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a)
#   cuda      every CUDA test but the torch.compile ones (pytest -m cuda)
#   bench     every GPU benchmark (ceilings measured in the same run; the kernels' first, the
#             model-level ones last: pool_moe alone took 76 s), then bench/goals.py: the table of
#             measured vs goal (goals-h200.md / .json)
#   ncu       Speed Of Light + occupancy of every kernel in bench/ncu_cases.py (if time)
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck over bench/sanitize_cases.py
#             --quick (every kernel path on small awkward shapes vs the CPU), then memcheck over
#             all its cases if time allows (all clean on the 2026-11-30 H200 runs)
#   compile   the CUDA torch.compile tests (inductor + triton compile slowly)
#   rest      the CPU tests (pytest -m "not cuda"), with what time is left
# Writes under $OUT: bench-h200.json, goals-h200.md, goals-h200.json, multi_lora-cuda.png and logs.tar.gz
# (build, pytest-cuda, pytest-cuda-compile, sanitizer, bench, ncu and pytest-rest .log). Exit status 1 if any
# stage failed; "SUMMARY" lines at the end say which. A short rerun of what failed:
#   STAGES="cuda bench" CUDA_K="merge or multi" BENCHES="merge" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# the in-place build is imported from here, also by the subprocesses tests start (examples, torchrun)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# CUDA_HOME: as given, else /usr/local/cuda when it has nvcc, else setup.py finds nvcc on PATH
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${BUDGET:-450}
start=$SECONDS
summary=()
stage() { echo "== $1 ($(date +%T), $((SECONDS - start)) s)"; }
left() {  # seconds for the next step: min(cap, what the budget leaves), at least 10
  local l=$((BUDGET - (SECONDS - start)))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 10 ] && l=10
  echo "$l"
}
note() { summary+=("$1"); echo "SUMMARY $1"; }
# STAGES: the stages after the build to run (a rerun of what failed: STAGES="cuda sanitize");
# CUDA_K: a pytest -k expression narrowing the CUDA tests of the cuda stage; GDB_K: CUDA tests
# to run under cuda-gdb first, for the C++ backtrace of a crash (gdb.log); BENCHES: which
# benchmarks the bench stage runs
STAGES=" ${STAGES:-cuda sanitize bench ncu compile rest} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
finish() {
  stage done
  for s in "${summary[@]}"; do echo "SUMMARY $s"; done
  # the device tool brings back at most 8 files: the logs travel as one tarball
  (cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
  printf '%s\n' "${summary[@]}" | grep -q "FAIL" && exit 1
  exit 0
}

stage deps
if [ -d .whl ]; then
  "$PY" bench/gpu_deps.py install /tmp/lora_ext_site
  export PYTHONPATH=/tmp/lora_ext_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/lora_ext_site/bin:$PATH
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU VISIBLE')"
counts() { grep -E "passed|failed|skipped|error" "$1" | tail -1; }

stage build
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/build.log" 2>&1
if ! timeout "$(left 240)" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; note "build: FAIL"; finish
fi
grep -E "^ *lora_ext:|spill" "$OUT/build.log" | tail -8
# C++ errors whose message formats an integer (run 1 on the H200: a segfault inside _C's own
# static copy of libstdc++ with CXX=/opt/gcc/bin/g++); if they crash, rebuild with the system g++
errors_ok() { "$PY" -c "
import torch, lora_ext
try:
    lora_ext.ops.lora_apply_(torch.zeros(2, 3), torch.zeros(2, 5), torch.zeros(4, 5), torch.zeros(3, 7), 1.0)
except RuntimeError as e:
    print('C++ error messages: ok:', str(e)[:100])" >>"$OUT/build.log" 2>&1; }
if ! errors_ok; then
  { echo "---- C++ error messages crash: CXX=${CXX:-} CC=${CC:-}"; "${CXX:-c++}" --version | head -1
    "${CXX:-c++}" -print-file-name=libstdc++.so; "${CXX:-c++}" -print-file-name=libstdc++.a
    nm -C --defined-only lora_ext/_C*.so | grep -c " std::" ; ldd lora_ext/_C*.so | grep -E "stdc|gcc_s"
  } >>"$OUT/build.log" 2>&1
  tail -8 "$OUT/build.log"
  note "build: FAIL: C++ error messages crash with CXX=${CXX:-c++}; rebuilt with /usr/bin/g++"
  rm -rf build lora_ext/_C*.so
  CXX=/usr/bin/g++ CC=/usr/bin/gcc timeout "$(left 240)" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  errors_ok || { note "build: FAIL: C++ error messages still crash"; finish; }
else
  note "build: C++ error messages ok (no crash formatting an integer)"
fi
"$PY" -m lora_ext info 2>&1 | tee -a "$OUT/build.log"
note "build: ok in $((SECONDS - start)) s"

if want cuda; then
  stage cuda-tests
  t0=$SECONDS
  if [ -n "${GDB_K:-}" ]; then
    # a C++ backtrace of a test that crashed the interpreter (cuda-gdb debugs host code too)
    GDB=$(command -v cuda-gdb || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb")
    timeout "$(left 45)" "$GDB" -batch -ex run -ex bt -ex "info sharedlibrary lora_ext" --args \
      "$PY" -m pytest tests -m cuda -k "$GDB_K" -q -p no:cacheprovider >"$OUT/gdb.log" 2>&1
    grep -E "^#[0-9]+ |signal|passed|failed" "$OUT/gdb.log" | head -40
  fi
  # a test that crashes the interpreter is noted and skipped: pytest starts again after it
  # (bench/pytest_resume.py), at most 4 times
  resume=$(mktemp); : >"$OUT/pytest-cuda.log"; crashed=()
  for attempt in 1 2 3 4 5; do
    LORA_EXT_RESUME=$resume timeout "$(left 180)" "$PY" -m pytest tests -m cuda -p bench.pytest_resume \
      -k "not compile${CUDA_K:+ and ($CUDA_K)}" -q -rfE -p no:cacheprovider --maxfail=30 \
      --durations=10 >>"$OUT/pytest-cuda.log" 2>&1
    rc=$?
    [ $rc -ge 128 ] && [ $rc != 137 ] || break
    crashed+=("$(tail -1 "$resume") (signal $((rc - 128)))")
    echo "---- crashed in ${crashed[-1]}: resuming after it" | tee -a "$OUT/pytest-cuda.log"
  done
  tail -25 "$OUT/pytest-cuda.log"
  for c in "${crashed[@]}"; do note "cuda tests: CRASH FAIL in $c"; done
  note "cuda tests: $([ $rc = 0 ] && [ ${#crashed[@]} = 0 ] && echo ok || echo "FAIL (rc $rc)") in $((SECONDS - t0)) s: $(counts "$OUT/pytest-cuda.log")"
fi

if want bench; then
  stage bench
  : >"$OUT/bench.log"
  for b in ${BENCHES:-multi_lora lora_linear merge lora_apply roofline pool dora peft_train dora_layer moe_lora pool_moe}; do
    t0=$SECONDS
    if LORA_EXT_BENCH_OUT="$OUT" timeout "$(left 90)" "$PY" bench/run.py --device cuda --only "$b" >>"$OUT/bench.log" 2>&1; then
      note "bench $b: ok in $((SECONDS - t0)) s"
    else
      note "bench $b: FAIL or timed out after $((SECONDS - t0)) s"
    fi
  done
  tail -120 "$OUT/bench.log"
  "$PY" - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
paths = sorted(glob.glob(os.path.join(out, "*-cuda.json")))
with open(os.path.join(out, "bench-h200.json"), "w") as f:
    json.dump([json.load(open(p)) for p in paths], f, indent=1)
for p in paths:
    os.remove(p)
PY
  "$PY" bench/goals.py "$OUT/bench-h200.json" --md "$OUT/goals-h200.md" --json "$OUT/goals-h200.json"
fi

if want ncu; then
  stage ncu
  NCU=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
  if [ -x "$NCU" ] && [ $((BUDGET - (SECONDS - start))) -gt 60 ]; then
    # the kernels behind the bandwidth / overhead goals (bench/ncu_cases.py): every kernel of one
    # multi_lora_ decode, one merge_ and one lora_linear fwd+bwd, cuBLAS's beside ours
    timeout "$(left 90)" "$NCU" --clock-control none --section SpeedOfLight --section Occupancy \
      --profile-from-start off "$PY" bench/ncu_cases.py >"$OUT/ncu.log" 2>&1
    rc=$?
    grep -E "^  [A-Za-z_].*\(|Memory Throughput|DRAM Throughput|Duration|Compute \(SM\) Throughput|Achieved Occupancy" "$OUT/ncu.log" | head -80
    note "ncu: rc $rc (informational; gVisor machines cannot read the counters)"
  else
    note "ncu: skipped (not found or no time left)"
  fi
fi

if want sanitize; then
  stage sanitize
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  : >"$OUT/sanitizer.log"
  if [ ! -x "$SAN" ]; then
    note "sanitizer: not found (skipped)"
  elif ! timeout 60 "$SAN" --tool memcheck --error-exitcode 9 "$PY" -c \
      "import torch; torch.ones(4, device='cuda').add_(1); torch.cuda.synchronize()" >>"$OUT/sanitizer.log" 2>&1; then
    tail -5 "$OUT/sanitizer.log"
    note "sanitizer: does not run on this machine (gVisor refuses it?): skipped"
  else
    # tool, cases (quick or full), cap (s), fatal?; the full memcheck only while 240 s remain for
    # the benchmarks and the rest
    for spec in "memcheck quick 60 1" "racecheck quick 60 1" "synccheck quick 40 1" "initcheck quick 40 0" \
                "memcheck full 90 1"; do
      set -- $spec
      if [ "$2" = full ] && [ $((BUDGET - (SECONDS - start))) -lt 240 ]; then
        note "sanitizer $1 ($2): skipped (time)"; continue
      fi
      t0=$SECONDS
      args=(); [ "$2" = quick ] && args=(--quick)
      echo "---- $1 ($2)" >>"$OUT/sanitizer.log"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left "$3")" "$SAN" --tool "$1" --error-exitcode 9 \
        --print-limit 20 "$PY" bench/sanitize_cases.py "${args[@]}" >>"$OUT/sanitizer.log" 2>&1
      rc=$?
      res=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_cases:" "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')
      if [ $rc = 0 ]; then
        note "sanitizer $1 ($2): ok in $((SECONDS - t0)) s: $res"
      elif [ "$4" = 1 ]; then
        note "sanitizer $1 ($2): FAIL (rc $rc) in $((SECONDS - t0)) s: $res"
      else
        note "sanitizer $1 ($2): reports (rc $rc, informational) in $((SECONDS - t0)) s: $res"
      fi
    done
    grep -E "=========|MISMATCH" "$OUT/sanitizer.log" | grep -v "^========= COMPUTE-SANITIZER" | head -40
  fi
fi

if want compile; then
  stage cuda-compile
  # torch.compile(fullgraph=True) of every op on CUDA (inductor + triton: slow to compile, so last)
  t0=$SECONDS
  timeout "$(left 90)" "$PY" -m pytest tests -m cuda -k "compile" -q -rfE -p no:cacheprovider \
    >"$OUT/pytest-cuda-compile.log" 2>&1
  rc=$?
  tail -8 "$OUT/pytest-cuda-compile.log"
  note "cuda compile tests: $([ $rc = 0 ] && echo ok || echo "FAIL (rc $rc)") in $((SECONDS - t0)) s: $(counts "$OUT/pytest-cuda-compile.log")"
fi

if want rest; then
  stage rest
  if [ $((BUDGET - (SECONDS - start))) -gt 30 ]; then
    t0=$SECONDS
    # (tests/test_emulation.py runs the CUDA kernels on the CPU: for machines without a GPU)
    timeout "$(left 600)" "$PY" -m pytest tests -m "not cuda" -q -rfE -p no:cacheprovider --maxfail=20 \
      --deselect tests/test_emulation.py >"$OUT/pytest-rest.log" 2>&1
    rc=$?
    tail -15 "$OUT/pytest-rest.log"
    note "CPU tests: $([ $rc = 0 ] && echo ok || echo "FAIL or cut (rc $rc)") in $((SECONDS - t0)) s: $(counts "$OUT/pytest-rest.log")"
  else
    note "CPU tests: no time left (CI runs them)"
  fi
fi

finish
