"""Runs every benchmark on one device and writes JSON under bench/results/ (or $LORA_EXT_BENCH_OUT).

python -m lora_ext bench (or python bench/run.py) [--device cpu|cuda] [--quick] [--only NAME ...]
Every timing is printed as median (min–max) of its runs, with a warning when max/min > 1.5.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_ext.__main__ import device_arg  # noqa: E402  (cpu / cuda / cuda:N, checked)

# name -> module in bench/ exposing main(argv)
BENCHMARKS = ["roofline", "lora_apply", "lora_linear", "dora_layer", "moe_lora", "peft_train", "merge", "dora",
              "multi_lora", "pool", "pool_moe", "distributed"]


def main(argv=None, prog: str | None = None) -> int:
    """prog: the name in usage/help lines (python -m lora_ext passes its own; default: run.py)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few sizes only, no result files")
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    a = p.parse_args(argv)
    for name in a.only or BENCHMARKS:
        mod = importlib.import_module(f"bench.bench_{name}")
        mod.main(["--device", a.device] + (["--quick"] if a.quick else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
