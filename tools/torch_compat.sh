#!/usr/bin/env bash
# Build lora_ext (CPU + CUDA kernels) against another torch release from the local wheel store and
# run the test suite with it. The lent GPU machine runs torch 2.11.0+cu130 while CI and our machines
# run 2.14.1: this catches C++ or Python API differences before a GPU session spends its minutes on
# them (no GPU needed; the CUDA tests skip).
#
# Usage: bash tools/torch_compat.sh [TORCH_VERSION] [pytest args...]   (default 2.11.0, all tests)
# Environment: VENV (default /tmp/lora_ext_torch<version>: reused when present), SRC (default
# /tmp/lora_ext_src_torch<version>: a fresh clone of this checkout's HEAD), CUDA_HOME, MAX_JOBS.
# Takes ~8 min to build on 2 cores, ~5 min to test.
set -euo pipefail
ver=${1:-2.11.0}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-/tmp/lora_ext_torch$ver}
src=${SRC:-/tmp/lora_ext_src_torch$ver}

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$ver" numpy pytest hypothesis safetensors rich tqdm ninja \
  peft transformers matplotlib
rm -rf "$src"
git clone -q "$root" "$src"
cd "$src"
echo "torch_compat: $("$venv/bin/python" -c 'import torch; print(torch.__version__)') in $venv, building $src"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1 || { tail -40 build.log; exit 1; }
if grep -q "warning:" build.log; then grep -n "warning:" build.log | head -20; fi
PYTHONPATH="$src" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
