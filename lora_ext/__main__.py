"""Command line: python -m lora_ext {demo,info,bench}."""
from __future__ import annotations

import argparse
import os
import runpy
import sys

import torch

import lora_ext


def _cubins(so_path: str) -> list[str]:
    """SM targets of the cubins in the extension, via cuobjdump (CUDA's, or the one in triton)."""
    import glob
    import re
    import shutil
    import subprocess

    tool = shutil.which("cuobjdump") or next(iter(glob.glob(os.path.join(
        os.path.dirname(torch.__file__), "..", "triton", "backends", "nvidia", "bin", "cuobjdump"))), None)
    if not tool:
        return []
    try:
        out = subprocess.run([tool, "--list-elf", so_path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(set(re.findall(r"\.(sm_\w+)\.cubin", out)))


def info() -> int:
    from rich.console import Console
    from rich.table import Table

    built = lora_ext.ops.build_info()
    cuda_built = next((b.split(":", 1)[1] for b in built if b.startswith("cuda:")), None)
    t = Table(title="lora_ext", show_header=False)
    t.add_row("version", lora_ext.__version__)
    t.add_row("torch", torch.__version__)
    t.add_row("torch CUDA", str(torch.version.cuda))
    t.add_row("backends", ", ".join(b.split(":")[0] for b in built))
    archs = ", ".join(f"sm_{int(a) // 10}" for a in cuda_built.split(",")) if cuda_built else "-"
    t.add_row("CUDA archs", archs)
    if cuda_built and (cubins := _cubins(lora_ext._C.__file__)):
        t.add_row("CUDA cubins", ", ".join(cubins))
    t.add_row("CPU threads", str(torch.get_num_threads()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            t.add_row(f"GPU {i}", f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        t.add_row("GPU", "none visible")
    t.add_row("extension", lora_ext._C.__file__)
    Console().print(t)
    return 0


def bench(argv: list[str]) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(lora_ext.__file__)))
    script = os.path.join(here, "bench", "run.py")
    if not os.path.exists(script):
        print("bench/ is part of the source tree: run from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_ext")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train 3 adapters, save them (PEFT format), serve one mixed batch")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    d.add_argument("--out", default=None, help="directory for the adapters (default: a temp dir)")
    sub.add_parser("info", help="version, torch/CUDA, compiled backends and archs, GPUs")
    sub.add_parser("bench", help="run the benchmarks (bench/run.py; --help there)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd == "demo":
        from .demo import run

        run(args.device, args.steps, args.out)
        return 0
    return bench(rest)


if __name__ == "__main__":
    sys.exit(main())
