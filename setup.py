"""Builds lora_ext._C: CPU kernels always, CUDA kernels when torch and a toolkit allow.

Environment:
  TORCH_CUDA_ARCH_LIST  CUDA archs (default "8.0;9.0a" when no GPU is visible)
  MAX_JOBS              parallel compile jobs (default: all cores)
  CUDA_HOME             CUDA toolkit (default: found from /usr/local/cuda or nvcc on PATH)
  LORA_EXT_CPU_ONLY=1   skip the CUDA kernels
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    # /usr/local/bin/nvcc may be a wrapper; prefer a real toolkit directory.
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

import ptxas_report  # noqa: E402


def _cuda_skip_reason() -> str | None:
    if os.environ.get("LORA_EXT_CPU_ONLY", "0") == "1":
        return "LORA_EXT_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _pip_cuda_includes() -> list[str]:
    """CUDA headers shipped in the nvidia-* wheels torch depends on (cusparse.h, cublas_v2.h)."""
    dirs = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            dirs += sorted(glob.glob(os.path.join(nv, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


PTXAS_DIR = os.path.join(ROOT, "build", "ptxas")


class Build(BuildExtension):
    """BuildExtension + a ptxas register/spill summary; the build fails on spills."""

    def run(self):
        super().run()
        if WITH_CUDA:
            stems = {os.path.basename(p).split(".")[0] for p in _sources("csrc/cuda/*.cu")}
            summary, spills = ptxas_report.summarise(PTXAS_DIR, stems)
            print(summary)
            if spills:
                raise RuntimeError("kernels spill registers (0 bytes allowed):\n" + "\n".join(spills))


def _extension():
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unused-function", "-Wno-psabi"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if WITH_CUDA:
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        os.environ["PYTORCH_NVCC"] = " ".join(
            [sys.executable, os.path.join(ROOT, "tools", "nvcc_log.py"), PTXAS_DIR,
             os.path.join(_cuda_home, "bin", "nvcc")])
        print(f"lora_ext: building CPU and CUDA kernels (CUDA_HOME={_cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}, "
              f"MAX_JOBS={os.environ['MAX_JOBS']})")
        nvcc = ["-O3", "-std=c++20", "-Xptxas=-v", "-lineinfo", "--expt-relaxed-constexpr",
                "-DLORA_EXT_WITH_CUDA"]
        return CUDAExtension(
            "lora_ext._C",
            sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=_pip_cuda_includes(),
            extra_compile_args={"cxx": cxx + ["-DLORA_EXT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    print(f"lora_ext: CUDA kernels skipped: {CUDA_SKIP}; building CPU kernels only")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return CppExtension("lora_ext._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


CUDA_SKIP = _cuda_skip_reason()
WITH_CUDA = CUDA_SKIP is None

setup(
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": Build},
)
