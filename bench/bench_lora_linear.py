"""LoRALinear forward+backward vs the frozen nn.Linear alone vs the PEFT-style composition
``linear(x) + s * (x @ A.T) @ B.T``, PEFT's own LoRA Linear, and that layer after
``lora_ext.patch_peft`` (x requires grad, as in a mid-network layer). On CUDA also LoRALinear with
the other order of its halves (LORA_EXT_CUDA_EXPAND_FIRST=1: LoRA term and bias written first,
cuBLAS accumulating into them), with its 16-bit halves on the CUDA-core tiles instead of the
tensor-core ones (LORA_EXT_CUDA_TENSOR_CORES=0) and with its bf16 halves on cuBLAS
(LORA_EXT_CUDA_BLAS=1), each order, so one GPU run tells which to make the default. Then the
same variants for an fp32 model inside torch.autocast(bf16) (mixed-precision training).

Goal: LoRALinear <= 1.05x the frozen base layer. Interleaved runs: median (min-max) of the per-run
ratios.
python bench/bench_lora_linear.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios  # noqa: E402
import lora_ext  # noqa: E402
from lora_ext import LoRALinear  # noqa: E402


def peft_layers(base, A, B, r):
    """PEFT's LoRA Linear around a copy of `base` with the same factors, and a patched copy."""
    import peft

    holder = torch.nn.Module()
    holder.proj = copy.deepcopy(base)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    layer.lora_A["default"].weight.data.copy_(A.detach())
    layer.lora_B["default"].weight.data.copy_(B.detach())
    patched = copy.deepcopy(pm)
    lora_ext.patch_peft(patched)
    return layer, patched.base_model.model.proj


def with_env(go, **env):
    """go() with the environment variables set: LORA_EXT_CUDA_EXPAND_FIRST=1 (on CUDA lora_linear
    writes bias + LoRA term first and cuBLAS accumulates x W^T into it, forward and dx),
    LORA_EXT_CUDA_TENSOR_CORES=0 (16-bit halves on CUDA cores) or LORA_EXT_CUDA_BLAS=1 (bf16 halves
    on cuBLAS instead of lora_ext's kernels)."""
    def run():
        with mock.patch.dict(os.environ, env):
            go()
    return run


def case(device: str, quick: bool):
    if device == "cuda":
        return (2048 if quick else 8192), 4096, 16, torch.bfloat16
    return (512 if quick else 2048), 1024, 16, torch.float32


def measure(device: str, T: int, n: int, r: int, dt: torch.dtype, amp: torch.dtype | None) -> list[dict]:
    """One interleaved measurement: parameters in dt, every step inside torch.autocast(amp) if
    amp is given (an fp32 model trained in bf16, as HF Trainer's bf16=True runs it)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, device=device, dtype=dt).requires_grad_(False)
    layer = LoRALinear.from_linear(base, r=r, alpha=2 * r)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    x = torch.randn(T, n, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, n, device=device, dtype=amp or dt)

    fns = {
        "base nn.Linear": lambda: base(x),
        "PEFT-style": lambda: F.linear(x, base.weight, base.bias) + s * (x @ A.T) @ B.T,
        "lora_ext LoRALinear": lambda: layer(x),
    }
    params = [x, A, B]
    try:
        peft_layer, patched = peft_layers(base, A, B, r)
        fns["PEFT LoRA Linear"] = lambda: peft_layer(x)
        fns["PEFT + patch_peft"] = lambda: patched(x)
        params += [p for m in (peft_layer, patched) for p in m.parameters() if p.requires_grad]
    except ImportError:  # peft is a test dependency
        pass

    def step(fn):
        def go():
            for p in params:
                p.grad = None
            with torch.autocast(device, dtype=amp or dt, enabled=amp is not None):
                y = fn()
            y.backward(g)
        return go

    steps = {k: step(f) for k, f in fns.items()}
    if device == "cuda":  # the CUDA backend's other order of the two halves, fwd and bwd
        plain = steps["lora_ext LoRALinear"]
        steps["lora_ext LoRALinear (expand first)"] = with_env(plain, LORA_EXT_CUDA_EXPAND_FIRST="1")
        steps["lora_ext LoRALinear (CUDA cores)"] = with_env(plain, LORA_EXT_CUDA_TENSOR_CORES="0")
        steps["lora_ext LoRALinear (cuBLAS halves)"] = with_env(plain, LORA_EXT_CUDA_BLAS="1")
        steps["lora_ext LoRALinear (cuBLAS halves, expand first)"] = with_env(
            plain, LORA_EXT_CUDA_BLAS="1", LORA_EXT_CUDA_EXPAND_FIRST="1")
    # Every variant once per run, back to back, so that machine noise hits all alike; the ratio
    # to the base layer is taken per run.
    t = interleaved(steps, device, runs=60 if device == "cpu" else 50)
    extra = {"autocast": str(amp).removeprefix("torch.")} if amp is not None else {}
    return [{"impl": k, "T": T, "in=out": n, "r": r, "dtype": str(dt).removeprefix("torch."), **extra,
             "fwd+bwd ms": Timing.of(ts), "x base": ratios(t, k, "base nn.Linear")}
            for k, ts in t.items()]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    T, n, r, dt = case(device, quick)
    # then an fp32 model inside torch.autocast(bf16): the ops cast like F.linear (csrc/autocast.cpp)
    return measure(device, T, n, r, dt, None) + measure(device, T, n, r, torch.float32, torch.bfloat16)


def main(argv=None):
    return cli("lora_linear", "LoRALinear fwd+bwd on {device} (goal: <= 1.05x base)", run, __doc__, argv)


if __name__ == "__main__":
    main()
