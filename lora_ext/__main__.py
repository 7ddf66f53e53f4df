"""Command line: python -m lora_ext {demo,info,bench,merge,inspect} (merge: lora_ext/cli_merge.py,
inspect: lora_ext/cli_inspect.py)."""
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


def _arch_names(arch_list: str, cubins: list[str]) -> list[str]:
    """The SM targets of build_info's "cuda:<archs>" entry, named like cuobjdump names the cubins.

    build_info reports nvcc's __CUDA_ARCH_LIST__ ("800,900"): compute capabilities only. An
    arch-specific target (TORCH_CUDA_ARCH_LIST=9.0a -> compute_90a/sm_90a) or a family target
    (sm_100f) is 900 / 1000 there, without its suffix; the cubins in the binary carry it. So each
    capability takes the name of its cubin(s) when cuobjdump found them, else plain sm_XY.
    """
    import re

    names = []
    for a in (x.strip() for x in arch_list.split(",") if x.strip()):
        if not a.isdigit():
            names.append(a)  # "unknown": built without __CUDA_ARCH_LIST__
            continue
        sm = f"sm_{int(a) // 10}"
        same = [c for c in cubins if re.fullmatch(rf"{sm}[a-z]?", c)]
        names += same or [sm]
    return list(dict.fromkeys(names))


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
    cubins = _cubins(lora_ext._C.__file__) if cuda_built else []
    archs = _arch_names(cuda_built, cubins) if cuda_built else []
    note = "" if cubins or not cuda_built else " (no cuobjdump: sm_90a etc. show as sm_90)"
    t.add_row("CUDA archs", (", ".join(archs) or "-") + note)
    if cubins and sorted(cubins) != sorted(archs):  # e.g. compute_80 code sm_86: cubins differ
        t.add_row("CUDA cubins", ", ".join(cubins))
    t.add_row("CPU kernels", built[0].split(":", 1)[1])
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
    run = runpy.run_path(script)["main"]  # as a module, not __main__: we call main with our prog name
    return run(argv, prog="python -m lora_ext bench") or 0


def _cli_extra_missing(cmd: str, name: str) -> int:
    need = "peft, transformers and matplotlib (the [test] extra)" if cmd == "bench" else "rich, tqdm and transformers"
    extra = "test" if cmd == "bench" else "cli"
    print(f"python -m lora_ext {cmd}: no module {name!r}; it needs {need}: pip install 'lora_ext[{extra}]'",
          file=sys.stderr)
    return 2


# argparse types: a bad value is a one-line "argument --x: ..." error (exit 2), not a traceback
def device_arg(s: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    n = torch.cuda.device_count()
    if s != "cpu" and (torch.device(s).index or 0) >= n:
        raise argparse.ArgumentTypeError(f"{s}: " + (f"only {n} CUDA GPU(s)" if n else "no CUDA GPU is available"))
    return s


def _positive_int(s: str) -> int:
    try:
        if int(s) >= 1:
            return int(s)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")


def _out_dir(s: str) -> str:
    """Checks that ``s`` is, or can be made, a directory; main creates it once every argument is
    checked (an argparse type runs before the arguments after it are)."""
    path = os.path.abspath(s)
    reason = "File exists" if os.path.exists(path) and not os.path.isdir(path) else None
    parent = path
    while reason is None and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if reason is None and parent != path:
        if not os.path.isdir(parent):
            reason = "Not a directory"
        elif not os.access(parent, os.W_OK | os.X_OK):
            reason = "Permission denied"
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot create directory {s}: {reason}")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_ext")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train 3 adapters, save them (PEFT format), serve one mixed batch")
    d.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda when available)")
    d.add_argument("--steps", type=_positive_int, default=150, help="training steps per adapter (>= 1; default: 150)")
    d.add_argument("--out", type=_out_dir, help="directory for the adapters, created if missing (default: a temp dir)")
    sub.add_parser("info", help="version, torch/CUDA, compiled backends and archs, GPUs")
    b = sub.add_parser("bench", help="run the benchmarks (bench/run.py; --help there)", add_help=False)
    b.add_argument("--device", type=device_arg)  # checked here, passed on with the rest to bench/run.py
    from .cli_merge import add_parsers, run as run_merge_cmd

    add_parsers(sub, device_arg)
    args, rest = p.parse_known_args(argv)  # only bench takes options of its own (bench/run.py's)
    if rest and args.cmd != "bench":
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "info":
            return info()
        if args.cmd == "demo":
            from .demo import run

            if args.out is not None:
                os.makedirs(args.out, exist_ok=True)
            run(args.device, args.steps, args.out)
            return 0
        if args.cmd in ("merge", "inspect"):
            return run_merge_cmd(args.cmd, args, sub.choices[args.cmd])
        return bench(rest + (["--device", args.device] if args.device else []))
    except ModuleNotFoundError as e:  # the CLI's own dependencies are an extra
        top = (e.name or "").split(".")[0]
        if top in ("rich", "tqdm", "transformers", "peft", "matplotlib"):
            return _cli_extra_missing(args.cmd, top)
        raise


if __name__ == "__main__":
    sys.exit(main())
