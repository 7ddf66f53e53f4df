"""The one description of lora_ext's build: sources, flags, CUDA toolkit search and arch default.

setup.py imports it; CMakeLists.txt runs `python tools/build_config.py --cmake <file>` and includes
the CMake variables it writes. Change a build fact here, nowhere else.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CXX_STANDARD = 20                       # torch 2.14 headers need C++20
OPT = "-O3"
CXX_FLAGS = ["-fopenmp", "-Wno-unused-function", "-Wno-psabi"]  # besides OPT and the standard
LINK_FLAGS = ["-fopenmp"]               # at::parallel_for's OpenMP backend
if sys.platform.startswith("linux"):
    # a toolchain that links libstdc++ (or part of it) statically must not let that copy's code
    # bind to the data of the libstdc++.so torch loaded: with Python's -Bsymbolic-functions only
    # the functions bind locally, and formatting an int64 into an error message crashed (GPU
    # image, /opt/gcc/bin/g++). Archive symbols stay private to _C.
    LINK_FLAGS.append("-Wl,--exclude-libs,ALL")
NVCC_FLAGS = ["-Xptxas=-v", "-lineinfo", "--expt-relaxed-constexpr"]  # besides OPT, standard
# torch.utils.cpp_extension passes these to nvcc itself; CMake needs them spelled out.
NVCC_DEFINES = ["__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__",
                "__CUDA_NO_BFLOAT16_CONVERSIONS__", "__CUDA_NO_HALF2_OPERATORS__"]
CUDA_DEFINE = "LORA_EXT_WITH_CUDA"      # set in every object of a build with CUDA kernels
ARCH_DEFAULT = "8.0;9.0a"               # TORCH_CUDA_ARCH_LIST when none is set and no GPU is seen
# Archs the kernels are tuned for: a register spill there fails the build. Other archs (a user's
# TORCH_CUDA_ARCH_LIST or visible GPU, e.g. Blackwell sm_100/sm_120, where nvcc 13 spills a few
# bytes in 3 kernels) build with a warning instead. LORA_EXT_STRICT_SPILLS=1: every arch fails.
SPILL_CHECKED_ARCHS = ["sm_80", "sm_90", "sm_90a"]
CUDA_HOME_CANDIDATES = ["/usr/local/cuda"]  # searched after $CUDA_HOME / $CUDA_PATH
CPU_SOURCES = ["csrc/*.cpp", "csrc/cpu/*.cpp"]  # csrc/ops.cpp: the Python-facing module
CUDA_SOURCES = ["csrc/cuda/*.cpp", "csrc/cuda/*.cu"]
MODULE_SOURCE = "csrc/ops.cpp"


def sources(patterns: list[str]) -> list[str]:
    """Repository-relative paths matching the globs, sorted."""
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def cuda_home() -> str | None:
    """$CUDA_HOME / $CUDA_PATH, else the first candidate with bin/nvcc, else the toolkit of a
    real nvcc on PATH (/usr/local/bin/nvcc may be a wrapper script)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    for cand in CUDA_HOME_CANDIDATES:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvidia_wheel_dirs(sub: str) -> list[str]:
    """`include` or `lib` dirs of the nvidia-* wheels torch depends on (cusparse.h, cublas_v2.h,
    libnvrtc), for the running Python."""
    dirs: list[str] = []
    for base in sys.path:
        for d in sorted(glob.glob(os.path.join(base, "nvidia", "cu*"))) + sorted(
                glob.glob(os.path.join(base, "nvidia", "*"))):
            path = os.path.join(d, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _cmake_list(values: list[str]) -> str:
    return '"' + ";".join(values) + '"'


def write_cmake(path: str) -> None:
    home = cuda_home() or ""
    lines = [
        f"set(LORA_EXT_CXX_STANDARD {CXX_STANDARD})",
        f"set(LORA_EXT_OPT {OPT})",
        f"set(LORA_EXT_CXX_FLAGS {_cmake_list(CXX_FLAGS)})",
        f"set(LORA_EXT_LINK_FLAGS {_cmake_list(LINK_FLAGS)})",
        f"set(LORA_EXT_NVCC_FLAGS {_cmake_list(NVCC_FLAGS)})",
        f"set(LORA_EXT_NVCC_DEFINES {_cmake_list(NVCC_DEFINES)})",
        f"set(LORA_EXT_CUDA_DEFINE {CUDA_DEFINE})",
        f'set(LORA_EXT_ARCH_DEFAULT "{ARCH_DEFAULT}")',
        f'set(LORA_EXT_CUDA_HOME "{home}")',
        f"set(LORA_EXT_NVIDIA_INCLUDE_DIRS {_cmake_list(nvidia_wheel_dirs('include'))})",
        f"set(LORA_EXT_NVIDIA_LIB_DIRS {_cmake_list(nvidia_wheel_dirs('lib'))})",
        f"set(LORA_EXT_CPU_SOURCE_GLOBS {_cmake_list(CPU_SOURCES)})",
        f"set(LORA_EXT_CUDA_SOURCE_GLOBS {_cmake_list(CUDA_SOURCES)})",
        f'set(LORA_EXT_MODULE_SOURCE "{MODULE_SOURCE}")',
    ]
    with open(path, "w") as f:
        f.write("# Written by tools/build_config.py: do not edit.\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--cmake":
        sys.exit("usage: python tools/build_config.py --cmake <output.cmake>")
    write_cmake(sys.argv[2])
