"""lora_apply_ vs the plain torch composition y.addmm_(x @ A.T, B.T, alpha=s).

Also reports the bytes-moved floor: x read once, y read and written once, A and B read once.
On CUDA both are timed as CUDA-graph replays (bench.common.time_graph: no launch gaps).
Run: python bench/bench_lora_apply.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cli, time_graph  # noqa: E402
from lora_ext.ops import lora_apply_  # noqa: E402


def cases(device: str, quick: bool):
    if device == "cuda":
        Ts, widths, dtypes = [1, 16, 256, 8192], [4096], [torch.bfloat16, torch.float32]
    else:
        Ts, widths, dtypes = [1, 16, 256, 2048], [1024, 4096], [torch.float32, torch.bfloat16]
    if quick:
        Ts, widths, dtypes = Ts[::2], widths[:1], dtypes[:1]
    for dt in dtypes:
        for w in widths:
            for T in Ts:
                yield T, w, w, 16, dt


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    rows = []
    for T, i, o, r, dt in cases(device, quick):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(T, i, generator=g).to(device, dt)
        A = (torch.randn(r, i, generator=g) / i**0.5).to(device, dt)
        B = (torch.randn(o, r, generator=g) / r**0.5).to(device, dt)
        y = torch.randn(T, o, generator=g).to(device, dt)
        s = 0.5
        t_ours = time_graph(lambda: lora_apply_(y, x, A, B, s), device)
        t_torch = time_graph(lambda: y.addmm_(x @ A.T, B.T, alpha=s), device)
        elt = x.element_size()
        nbytes = elt * (T * i + 2 * T * o + r * (i + o))
        rows.append({"T": T, "in": i, "out": o, "r": r, "dtype": str(dt).removeprefix("torch."),
                     "lora_ext_ms": t_ours, "torch_ms": t_torch, "speedup": t_torch / t_ours,
                     "GB/s": nbytes / t_ours / 1e6})
    return rows


def main(argv=None):
    return cli("lora_apply", "lora_apply_ vs y.addmm_(x @ A.T, B.T) on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
