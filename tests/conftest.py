import os
import random
import zlib

import pytest
import torch

import lora_ext  # noqa: F401  (registers the ops)

# Python processes the tests start (examples, torchrun, CLI runs, other cwds) import the lora_ext
# under test, not whatever `pip install -e` last pointed at (a removed clone's path: ModuleNotFoundError).
_UNDER_TEST = os.path.dirname(os.path.dirname(os.path.abspath(lora_ext.__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_UNDER_TEST] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative Frobenius error allowed against an fp64 reference, per output dtype
# (the result is rounded once into the dtype; fp32 accumulation inside).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()

# tests/emu runs in its own AddressSanitizer process (tests/test_emulation.py starts it).
collect_ignore = [] if os.environ.get("LORA_EXT_EMU_INNER") == "1" else ["emu"]


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws the same random data on every run (its seed: a hash of its id), so a test
    either passes or fails, never now and then. Tests that need their own streams still seed."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not the keyword: a CPU test whose name or id says "cuda" must still run
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a marked param (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)
