#!/usr/bin/env bash
# CPU-only CMake build of lora_ext + its ctest suite (what CI runs: `bash tools/cmake_check.sh`).
#
# Configures ./cmake-build with LORA_EXT_CUDA=OFF, builds with -j2 and runs ctest; exits
# non-zero on any failure. Needs `pip install torch cmake ninja` (CMake >= 3.26): the cmake of
# the pip `cmake` package is used even when an older /usr/bin/cmake comes first on PATH.
#
# Environment: PYTHON (default: python, else python3), BUILD_DIR (default: cmake-build),
#              JOBS (default: 2), CMAKE (a cmake >= 3.26 to use instead of pip's).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
BUILD_DIR=${BUILD_DIR:-cmake-build}
JOBS=${JOBS:-2}

# cmake/ctest binaries of the pip package (its `cmake` entry point in the scripts dir may be
# shadowed on PATH); ninja from the pip package when installed, else Makefiles.
if [[ -z "${CMAKE:-}" ]]; then
  bin=$("$PYTHON" -c "import cmake; print(cmake.CMAKE_BIN_DIR)" 2>/dev/null) ||
    { echo "cmake_check: no pip cmake for $PYTHON (pip install cmake), and CMAKE is unset" >&2; exit 1; }
  CMAKE=$bin/cmake
fi
CTEST=$(dirname "$CMAKE")/ctest
generator=()
if ninja_bin=$("$PYTHON" -c "import ninja, os; print(os.path.join(ninja.BIN_DIR, 'ninja'))" 2>/dev/null) &&
  [[ -x "$ninja_bin" ]]; then
  generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja_bin")
fi
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}$" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"  # generator changed since the last configure
fi
"$CMAKE" --version | head -1

t0=$SECONDS
"$CMAKE" -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DLORA_EXT_CUDA=OFF -DPython3_EXECUTABLE="$PYTHON"
t1=$SECONDS
"$CMAKE" --build "$BUILD_DIR" -j "$JOBS"
t2=$SECONDS
"$CTEST" --test-dir "$BUILD_DIR" --output-on-failure
t3=$SECONDS
echo "cmake_check: ok (configure $((t1 - t0)) s, build $((t2 - t1)) s, ctest $((t3 - t2)) s)"
