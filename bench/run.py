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
from bench import common  # noqa: E402
from bench.common import bench_device  # noqa: E402  (cpu / cuda / cuda:N, checked; cuda:N -> "cuda")
from lora_ext.__main__ import _out_dir  # noqa: E402

# name -> module in bench/ exposing main(argv)
BENCHMARKS = ["roofline", "lora_apply", "lora_linear", "dora_layer", "moe_lora", "peft_train", "merge", "dora",
              "multi_lora", "pool", "pool_moe", "distributed"]


def main(argv=None, prog: str | None = None) -> int:
    """prog: the name in usage/help lines (python -m lora_ext passes its own; default: run.py)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=bench_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a few sizes only, no result files")
    # "+": a bare --only is a usage error, not every benchmark at full size (result files overwritten)
    p.add_argument("--only", nargs="+", default=None, choices=BENCHMARKS, metavar="NAME",
                   help="run these only: " + ", ".join(BENCHMARKS))
    a = p.parse_args(argv)
    if not a.quick:  # where every benchmark saves: checked before the first one runs
        try:
            _out_dir(common.RESULTS)
        except argparse.ArgumentTypeError as e:
            p.error(f"results folder ($LORA_EXT_BENCH_OUT): {e}")
    for name in a.only or BENCHMARKS:
        mod = importlib.import_module(f"bench.bench_{name}")
        mod.main(["--device", a.device] + (["--quick"] if a.quick else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
