"""Measures the two ceilings every other figure is compared with, on the current device:
copy bandwidth (device-to-device, bytes read + written) and dense matmul rate.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cli, time_fn  # noqa: E402


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    n = (1 << 28 if device == "cuda" else 1 << 25) >> (2 if quick else 0)  # elements of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device)
    m = 8192 if device == "cuda" else 1024
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    t_mm = time_fn(lambda: a @ b, device)
    return [{"what": "copy", "size": f"{n * 4 / 2**20:.0f} MiB", "ms": t_copy,
             "rate": 2 * n * 4 / t_copy / 1e6, "unit": "GB/s"},
            {"what": f"matmul {str(dt).removeprefix('torch.')}", "size": f"{m}^3", "ms": t_mm,
             "rate": 2 * m**3 / t_mm / 1e9, "unit": "TFLOP/s"}]


def copy_bandwidth_gbs(device: str) -> float:
    """Measured copy bandwidth in GB/s (read + write), for roofline fractions."""
    return run(device, quick=False)[0]["rate"]


def main(argv=None):
    return cli("roofline", "ceilings on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
