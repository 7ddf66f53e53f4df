"""LoRALinear forward+backward vs the frozen nn.Linear alone vs the PEFT-style composition
``linear(x) + s * (x @ A.T) @ B.T`` (x requires grad, as in a mid-network layer).

Goal: LoRALinear <= 1.05x the frozen base layer. Medians of >= 5 runs.
python bench/bench_lora_linear.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cli, time_fn  # noqa: E402
from lora_ext import LoRALinear  # noqa: E402


def case(device: str, quick: bool):
    if device == "cuda":
        return (2048 if quick else 8192), 4096, 16, torch.bfloat16
    return (512 if quick else 2048), 1024, 16, torch.float32


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    T, n, r, dt = case(device, quick)
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, device=device, dtype=dt).requires_grad_(False)
    layer = LoRALinear.from_linear(base, r=r, alpha=2 * r)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    x = torch.randn(T, n, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, n, device=device, dtype=dt)

    def step(fn):
        def go():
            x.grad = None
            A.grad = B.grad = None
            fn().backward(g)
        return go

    fns = {
        "base nn.Linear": lambda: base(x),
        "PEFT-style": lambda: F.linear(x, base.weight, base.bias) + s * (x @ A.T) @ B.T,
        "lora_ext LoRALinear": lambda: layer(x),
    }
    reps = 7 if device == "cpu" else 25
    times = {k: time_fn(step(f), device, warmup=2, reps=reps) for k, f in fns.items()}
    t0 = times["base nn.Linear"]
    return [{"impl": k, "T": T, "in=out": n, "r": r, "dtype": str(dt).removeprefix("torch."),
             "fwd+bwd ms": t, "x base": t / t0} for k, t in times.items()]


def main(argv=None):
    return cli("lora_linear", "LoRALinear fwd+bwd on {device} (goal: <= 1.05x base)", run, __doc__, argv)


if __name__ == "__main__":
    main()
