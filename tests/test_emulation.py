"""The CUDA kernels, run on the CPU by the emulation harness (tests/emu, csrc/cuda/emu).

The emulated suite runs in a subprocess with AddressSanitizer preloaded (the emulated kernels are
built with it, so out-of-bounds global and shared accesses are caught); it must pass, and every
CUDA launch site of lora_ext must have run ("emulated launch sites: N/N").
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def gcc_library(name: str) -> str | None:
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def asan_runtime() -> str | None:
    return gcc_library("libasan.so")


def preload(asan: str) -> str:
    """libasan, then libstdc++: python does not link libstdc++, so when libasan starts alone its
    __cxa_throw interceptor finds no real __cxa_throw and the first C++ exception (a failed
    TORCH_CHECK, or an emulated launch's finding raised by LORA_EXT_CUDA_CHECK) aborts the whole
    process ("CHECK failed: ... real___cxa_throw"), its message lost under pytest's capture."""
    cxx = gcc_library("libstdc++.so")
    return asan if cxx is None else f"{asan} {cxx}"


@pytest.mark.emu
def test_emulated_cuda_kernels():
    env = dict(os.environ, LORA_EXT_EMU_INNER="1", LORA_EXT_EMU_COVERAGE="1")
    asan = asan_runtime()
    if asan is None:
        env["LORA_EXT_EMU_ASAN"] = "0"  # no libasan: everything but the out-of-bounds checks
    else:
        env["LD_PRELOAD"] = preload(asan)
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=0"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(HERE, "emu")], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(HERE))
    out = res.stdout + res.stderr[-4000:]
    print(out[-3000:])
    assert res.returncode == 0, out[-8000:]
    line = next((l for l in res.stdout.splitlines() if l.startswith("emulated launch sites:")), "")
    done, total = line.split(":")[1].split(";")[0].strip().split("/")
    assert done == total, line
