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


def asan_runtime() -> str | None:
    try:
        path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.emu
def test_emulated_cuda_kernels():
    env = dict(os.environ, LORA_EXT_EMU_INNER="1", LORA_EXT_EMU_COVERAGE="1")
    asan = asan_runtime()
    if asan is None:
        env["LORA_EXT_EMU_ASAN"] = "0"  # no libasan: everything but the out-of-bounds checks
    else:
        env["LD_PRELOAD"] = asan
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
