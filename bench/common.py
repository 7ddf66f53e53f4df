"""Timing, result files and tables shared by the benchmarks.

time_fn(fn) -> median milliseconds (CUDA events on GPU, perf_counter on CPU);
save(name, rows, meta) writes bench/results/<name>-<device>.json; table(rows) prints with rich.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date

import torch

RESULTS = os.environ.get("LORA_EXT_BENCH_OUT") or os.path.join(os.path.dirname(__file__), "results")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 3, reps: int = 11, min_time_s: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds over `reps` runs (>= 5), after `warmup` runs."""
    reps = max(reps, 5)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        t_end = time.perf_counter() + min_time_s
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def save(name: str, rows: list[dict], meta: dict | None = None, device="cpu") -> str:
    os.makedirs(RESULTS, exist_ok=True)
    kind = torch.device(device).type
    path = os.path.join(RESULTS, f"{name}-{kind}.json")
    doc = {"benchmark": name, "date": date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__, "meta": meta or {}, "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=160).print(t)


def cli(name: str, title: str, run, doc: str | None = None, argv=None) -> list[dict]:
    """The command line every benchmark shares: --device, --quick; prints a table, saves JSON."""
    import argparse

    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few sizes only, no result file")
    a = p.parse_args(argv)
    rows = run(a.device, a.quick)
    table(title.format(device=a.device), rows)
    if not a.quick:
        print("wrote", save(name, rows, device=a.device))
    return rows
