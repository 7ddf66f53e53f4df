"""Fixtures of the emulated-CUDA suite (run by tests/test_emulation.py in an AddressSanitizer
subprocess; directly: LORA_EXT_EMU_INNER=1 LD_PRELOAD="$(gcc -print-file-name=libasan.so)
$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0:halt_on_error=0 python -m pytest
tests/emu, or LORA_EXT_EMU_ASAN=0 without the preload; without libstdc++ in the preload, the first
C++ exception aborts the process: see tests/test_emulation.py)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

# Schedules every schedule-sensitive case runs under: threads/blocks in order, reversed, random.
SCHEDULES = (0, 1, 20261128)
_EMU = None


@pytest.fixture(scope="session")
def emu():
    global _EMU
    if _EMU is None:
        _EMU = harness.Emu()
    return _EMU


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def under_schedules(emu, fn, schedules=SCHEDULES, **device):
    """fn() under each schedule; asserts every run gives the same bits (a result that depends on
    the thread/block order or on the order of atomics is a race or nondeterminism); returns the
    first run's result (a tensor or a tuple of tensors)."""
    runs = []
    for s in schedules:
        with emu.device(schedule=s, **device):
            out = fn()
        runs.append(out if isinstance(out, (tuple, list)) else (out,))
    for s, run in zip(schedules[1:], runs[1:]):
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert same_bits(a, b), f"output {i} changes with the schedule ({schedules[0]} vs {s})"
    return runs[0] if len(runs[0]) > 1 else runs[0][0]


# rel_err bounds of fp32 accumulation against the CPU kernels, per output dtype
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def lora_apply_case(emu, y0, x, A, B, scale):
    """(the CPU kernels' lora_apply_ on a copy of y0, run: the emulated one on a fresh copy)."""
    ref = y0.clone()
    torch.ops.lora_ext.lora_apply_(ref, x, A, B, scale)

    def run():
        y = y0.clone()
        emu.ops.lora_apply_(y, x, A, B, scale)
        return y
    return ref, run


def pytest_sessionfinish(session, exitstatus):
    if _EMU is None:
        return
    want = harness.launch_sites()
    ran = _EMU.sites()
    missing = [s for s in want if s not in ran]
    line = f"emulated launch sites: {len(want) - len(missing)}/{len(want)}"
    print("\n" + line + ("" if not missing else "; not run: " + ", ".join(missing)))
    if missing and os.environ.get("LORA_EXT_EMU_COVERAGE") == "1":
        session.exitstatus = 1
