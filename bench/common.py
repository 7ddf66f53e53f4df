"""Timing, result files and tables shared by the benchmarks.

time_fn(fn) -> Timing: the median in milliseconds (a float, so arithmetic on it is unchanged) that
    also carries .min, .max and .n of the runs (CUDA events on GPU, perf_counter on CPU);
time_graph(fn) -> Timing per call; on CUDA from replays of a captured graph of several calls
    (kernel time without launch gaps), elsewhere time_fn;
best_of(timings) -> the best of several rounds (lowest median; min/max over all rounds);
interleaved(fns, device, runs) -> {name: [ms, ...]}: run i of every variant back to back, so
    ratios taken per run (ratios(...)) see the same machine state: median (min–max) of them;
table(title, rows) prints with rich; a Timing cell reads "median (min–max)", and a warning follows
    the table for every timing whose max/min exceeds SPREAD_WARN (1.5; $LORA_EXT_BENCH_SPREAD_WARN);
save(name, rows, meta) writes bench/results/<name>-<device>.json: a Timing value is written as its
    median, as before, plus "<key>_min" and "<key>_max" fields;
arg_parser(name, doc) / cli(name, title, run): the command line every benchmark shares;
bench_device(s): its --device type (cuda:N is made the current device and becomes "cuda").
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch

RESULTS = os.environ.get("LORA_EXT_BENCH_OUT") or os.path.join(os.path.dirname(__file__), "results")
# a timing whose slowest run is this many times its fastest gets a warning (noisy machine)
SPREAD_WARN = float(os.environ.get("LORA_EXT_BENCH_SPREAD_WARN", "1.5"))


class Timing(float):
    """Milliseconds: the median of n runs (the float value) with the fastest and slowest run."""

    def __new__(cls, median: float, min: float | None = None, max: float | None = None, n: int = 1):
        self = super().__new__(cls, median)
        self.min = float(median if min is None else min)
        self.max = float(median if max is None else max)
        self.n = n
        return self

    @classmethod
    def of(cls, times_ms) -> "Timing":
        ts = sorted(times_ms)
        return cls(statistics.median(ts), ts[0], ts[-1], len(ts))

    @property
    def median(self) -> float:
        return float(self)

    @property
    def spread(self) -> float:
        """max / min of the runs (1.0: no spread)."""
        return self.max / self.min if self.min > 0 else float("inf")

    def __repr__(self) -> str:
        return f"Timing(median={float(self):.4g}, min={self.min:.4g}, max={self.max:.4g}, n={self.n})"


def best_of(timings) -> Timing:
    """The round with the lowest median, with min/max/n over every round (the real spread)."""
    ts = [t for t in timings if isinstance(t, Timing)]
    best = min(ts, key=float)
    return Timing(float(best), min(t.min for t in ts), max(t.max for t in ts), sum(t.n for t in ts))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 3, reps: int = 11, min_time_s: float = 0.0) -> Timing:
    """Median wall time of fn() in milliseconds over `reps` runs (>= 5), after `warmup` runs; the
    result is a float (the median) with .min/.max/.n of the runs."""
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
    return Timing.of(times)


def time_graph(fn, device="cpu", calls: int = 10, reps: int = 11, **kw) -> Timing:
    """Milliseconds per call of fn. On CUDA, timed as replays of one CUDA graph that holds `calls`
    calls: no launch gaps between the kernels, as in a server that captures its decode step (and
    what the GPU machines' measuring notes ask for many small launches); fn runs 3 times on a side stream first. Falls
    back to time_fn (eager, with a note) if fn cannot be captured. Elsewhere: time_fn(fn, **kw)."""
    if torch.device(device).type != "cuda":
        return time_fn(fn, device, reps=reps, **kw)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        print(f"time_graph: capture failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "timed eagerly", flush=True)
        return time_fn(fn, device, reps=reps, **kw)
    t = time_fn(graph.replay, device, warmup=1, reps=reps)
    return Timing(float(t) / calls, t.min / calls, t.max / calls, t.n)


def _time_once(fn, device) -> float:
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict, device="cpu", runs: int = 30, warmup: int = 2) -> dict:
    """{name: [ms per run]}: each run times every variant once, back to back (after `warmup`
    untimed runs of each), so that the machine's load hits all variants of a run alike. Run i
    starts at variant i mod len(fns), so that no variant always follows the same one (or always
    comes first after the previous run's last)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(runs):
        for k in names[i % len(names):] + names[:i % len(names)]:
            times[k].append(_time_once(fns[k], device))
    return times


def ratios(times: dict, num: str, den: str) -> Timing:
    """median (min–max) of the per-run ratios times[num][i] / times[den][i]."""
    return Timing.of([a / b for a, b in zip(times[num], times[den])])


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages one forward (fn) saves for backward, those of ``exclude`` left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(seen.values())


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def save(name: str, rows: list[dict], meta: dict | None = None, device="cpu") -> str:
    os.makedirs(RESULTS, exist_ok=True)
    kind = torch.device(device).type
    path = os.path.join(RESULTS, f"{name}-{kind}.json")
    doc = {"benchmark": name, "date": date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__, "meta": meta or {}, "rows": [_with_spread(r) for r in rows],
           "timing": "times in ms are medians of n runs; <key>_min / <key>_max: fastest / slowest run"}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def _with_spread(row: dict) -> dict:
    """The row as written to JSON: every Timing `k` stays a number (its median) and gains
    `k_min` and `k_max` right after it."""
    out = {}
    for k, v in row.items():
        out[k] = float(v) if isinstance(v, float) else v
        if isinstance(v, Timing):
            out[f"{k}_min"], out[f"{k}_max"] = v.min, v.max
    return out


def _cell(v) -> str:
    if isinstance(v, Timing):
        flag = " !" if v.spread > SPREAD_WARN else ""
        return f"{float(v):.4g} ({v.min:.4g}–{v.max:.4g}){flag}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def spread_warnings(rows: list[dict], limit: float | None = None) -> list[str]:
    """One line per Timing in rows whose max/min exceeds `limit` (default SPREAD_WARN)."""
    limit = SPREAD_WARN if limit is None else limit
    out = []
    for r in rows:
        label = ", ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, float))
        for k, v in r.items():
            if isinstance(v, Timing) and v.spread > limit:
                out.append(f"{k} [{label}]: min {v.min:.4g} / median {float(v):.4g} / max {v.max:.4g} ms "
                           f"(max/min {v.spread:.2f} over {v.n} runs)")
    return out


def table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    has_times = any(isinstance(v, Timing) for r in rows for v in r.values())
    t = Table(title=title)
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[_cell(v) for v in r.values()])
    console = Console(width=max(160, 22 * len(cols)))  # "median (min–max) !" cells uncut
    console.print(t)
    if has_times:
        console.print(f"times in ms: median (min–max) of the runs; ! = max/min > {SPREAD_WARN:g}",
                      style="dim", markup=False, highlight=False)
    warn = spread_warnings(rows)
    if warn:
        console.print(f"warning: {len(warn)} timing(s) in '{title}' vary by more than {SPREAD_WARN:g}x "
                      "between runs (busy or throttling machine?): their medians are unreliable; rerun "
                      "on an idle machine", style="yellow", markup=False, highlight=False)
        for w in warn:
            console.print(f"  {w}", style="yellow", markup=False, highlight=False)
        sys.stdout.flush()


def bench_device(s: str) -> str:
    """The --device type: cpu, cuda or cuda:N (a usage error without that GPU). cuda:N becomes the
    current CUDA device and is returned as "cuda": the benchmarks choose their CUDA cases, dtypes
    and graph timing by device == "cuda", and CUDA events and syncs act on the current device."""
    from lora_ext.__main__ import device_arg

    s = device_arg(s)
    if s.startswith("cuda:"):
        torch.cuda.set_device(torch.device(s))
        return "cuda"
    return s


def arg_parser(name: str, doc: str | None = None):
    """--device, --quick; prog is the benchmark's file (not sys.argv[0]: bench/run.py and
    `python -m lora_ext bench` call every benchmark in one process)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"bench_{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=bench_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a few sizes only, no result file")
    return p


def cli(name: str, title: str, run, doc: str | None = None, argv=None) -> list[dict]:
    """The command line every benchmark shares: --device, --quick; prints a table, saves JSON."""
    a = arg_parser(name, doc).parse_args(argv)
    rows = run(a.device, a.quick)
    table(title.format(device=a.device), rows)
    if not a.quick:
        print("wrote", save(name, rows, device=a.device))
    return rows
