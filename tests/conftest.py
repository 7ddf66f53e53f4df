import os

import pytest
import torch

import lora_ext  # noqa: F401  (registers the ops)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative Frobenius error allowed against an fp64 reference, per output dtype
# (the result is rounded once into the dtype; fp32 accumulation inside).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()

# tests/emu runs in its own AddressSanitizer process (tests/test_emulation.py starts it).
collect_ignore = [] if os.environ.get("LORA_EXT_EMU_INNER") == "1" else ["emu"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a marked param (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)
