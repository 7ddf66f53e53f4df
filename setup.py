"""Builds lora_ext._C: CPU kernels always, CUDA kernels when torch and a toolkit allow.

Environment:
  TORCH_CUDA_ARCH_LIST  CUDA archs (default: tools/build_config.py ARCH_DEFAULT when no GPU is visible)
  MAX_JOBS              parallel compile jobs (default: all cores)
  CUDA_HOME             CUDA toolkit (default: found from /usr/local/cuda or nvcc on PATH)
  LORA_EXT_CPU_ONLY=1   skip the CUDA kernels
  LORA_EXT_STRICT_SPILLS=1  fail on register spills for every arch (default: tools/build_config.py
                        SPILL_CHECKED_ARCHS only; others warn)
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_config as cfg  # noqa: E402  (the one description of the build: tools/build_config.py)


# torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
_cuda_home = cfg.cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

import ptxas_report  # noqa: E402


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_skip_reason() -> str | None:
    if _env_true("LORA_EXT_CPU_ONLY"):
        return "LORA_EXT_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        # fail now, not after minutes of C++ compilation with a FileNotFoundError from nvcc_log.py
        sys.exit(f"lora_ext: CUDA_HOME={_cuda_home} has no bin/nvcc: point CUDA_HOME at a CUDA "
                 "toolkit, or set LORA_EXT_CPU_ONLY=1 to build the CPU kernels only")
    return None




PTXAS_DIR = os.path.join(ROOT, "build", "ptxas")


def _announce(msg: str) -> None:
    """Prints msg. pip shows a build's output only with -v, so it also goes to the terminal, if any."""
    print(msg, flush=True)
    if not sys.stdout.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(msg + "\n")
        except OSError:
            pass


def _build_plan(sources: list[str]) -> str:
    """One line: what is compiled and roughly how long it takes (C++ files including torch
    headers take ~50 s each on one core, each .cu ~15 s per CUDA arch)."""
    n_cu = sum(s.endswith(".cu") for s in sources)
    n_cpp = len(sources) - n_cu
    jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    archs = max(1, len(os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()))
    minutes = max(1, round((50 * n_cpp + 15 * archs * n_cu) / jobs / 60))
    what = (f"{n_cpp} C++ and {n_cu} CUDA files ({archs} arch(s))" if n_cu else f"{n_cpp} C++ files (CPU kernels only)")
    hint = "; LORA_EXT_CPU_ONLY=1 skips the CUDA kernels" if n_cu else ""
    return (f"lora_ext: compiling {what}: roughly {minutes} min with MAX_JOBS={jobs} (parallel jobs), "
            f"no output meanwhile unless `pip install -v`{hint}")


class Build(BuildExtension):
    """BuildExtension + a ptxas register/spill summary; the build fails on spills."""

    def run(self):
        try:
            _announce(_build_plan([s for e in self.extensions for s in e.sources]))
        except Exception:  # a progress message must never fail the build
            pass
        super().run()
        if WITH_CUDA:
            stems = {os.path.basename(p).split(".")[0] for p in cfg.sources(["csrc/cuda/*.cu"])}
            summary, spills = ptxas_report.summarise(PTXAS_DIR, stems)
            print(summary)
            fatal, warn = ptxas_report.gated(spills, cfg.SPILL_CHECKED_ARCHS, _env_true("LORA_EXT_STRICT_SPILLS"))
            if warn:
                _announce("lora_ext: warning: register spills on archs lora_ext is not tuned for "
                          "(correct, possibly slower):\n" + "\n".join(warn))
            if fatal:
                raise RuntimeError("kernels spill registers (0 bytes allowed):\n" + "\n".join(fatal))


def _extension():
    std = f"-std=c++{cfg.CXX_STANDARD}"
    cxx = [cfg.OPT, std] + cfg.CXX_FLAGS
    sources = cfg.sources(cfg.CPU_SOURCES)
    if WITH_CUDA:
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.ARCH_DEFAULT
        os.environ["PYTORCH_NVCC"] = " ".join(
            [sys.executable, os.path.join(ROOT, "tools", "nvcc_log.py"), PTXAS_DIR,
             os.path.join(_cuda_home, "bin", "nvcc")])
        print(f"lora_ext: building CPU and CUDA kernels (CUDA_HOME={_cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}, "
              f"MAX_JOBS={os.environ['MAX_JOBS']})")
        define = f"-D{cfg.CUDA_DEFINE}"
        nvcc = [cfg.OPT, std] + cfg.NVCC_FLAGS + [define]  # (+ cfg.NVCC_DEFINES, from torch)
        return CUDAExtension(
            "lora_ext._C",
            sources + cfg.sources(cfg.CUDA_SOURCES),
            include_dirs=cfg.nvidia_wheel_dirs("include"),
            extra_compile_args={"cxx": cxx + [define], "nvcc": nvcc},
            extra_link_args=cfg.LINK_FLAGS,
        )
    print(f"lora_ext: CUDA kernels skipped: {CUDA_SKIP}; building CPU kernels only")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return CppExtension("lora_ext._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=cfg.LINK_FLAGS)


CUDA_SKIP = _cuda_skip_reason()
WITH_CUDA = CUDA_SKIP is None

setup(
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": Build},
)
