"""multi_lora_ (every token its own adapter) vs the obvious compositions and the roofline.

Baselines:
  loop       PEFT's mixed-batch method: for each adapter in the batch, gather its tokens,
             two matmuls, scatter-add into y (token lists prepared outside the timing).
  gather_bmm gather A/B per token (A_pool[idx], B_pool[idx]) and two batched matmuls.
  single     what one adapter for all T tokens costs: the cuBLAS/BLAS pair u = x A0^T,
             y.addmm_(u, B0^T) ("x_single" = multi_lora_ / single; goal <= 1.3 in prefill).
  roofline   bytes moved (x read, y read + written, the used adapters' A and B read once)
             over the measured bandwidth of this device (copy_bandwidth). Every call re-reads
             the same x, y and adapters, so cases whose bytes fit in the last-level cache (L2 on a
             GPU) can run above "100%" of it.
On CUDA every method is timed as replays of a captured CUDA graph of several calls (kernel time
without launch gaps, as in a server's captured decode step); "eager_ms" is multi_lora_ called
eagerly, launch gaps included.
Cases: in = out = 4096, r in {8, 16, 64}, T tokens spread over min(T, D_MAX) distinct
adapters ("distinct") or over 4 adapters, plus the prefill case T = 8192 with 8 adapters (on the
CPU in fp32 and bf16; on CUDA everything is bf16).
Run: python bench/bench_multi_lora.py [--device cpu|cuda] [--quick] [--out DIR]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.common as common  # noqa: E402
from bench.common import arg_parser, best_of, save, table, time_fn, time_graph  # noqa: E402
from lora_ext.__main__ import _out_dir  # noqa: E402  (is, or can be made, a folder: checked before the run)
from lora_ext.ops import multi_lora_  # noqa: E402


def cases(device: str, quick: bool):
    if device == "cuda":
        Ts, ranks, dmax, dt = [1, 16, 64, 256, 1024, 8192], [8, 16, 64], 1024, torch.bfloat16
    else:
        Ts, ranks, dmax, dt = [1, 16, 64, 256], [16], 32, torch.float32
    if quick:
        Ts, ranks = Ts[1:3], ranks[:1]
    for r in ranks:
        for T in Ts:
            yield T, r, min(T, dmax), dt, "distinct"
            if T >= 4:
                yield T, r, 4, dt, "4 adapters"
    if not quick:
        yield 8192, 16, 8, dt, "prefill 8 adapters"
        if device == "cpu":  # bf16 too: torch's bf16 addmm pair runs on oneDNN (AVX512-BF16 where present)
            yield 8192, 16, 8, torch.bfloat16, "prefill 8 adapters"


def copy_bandwidth(device: str) -> float:
    """Measured device bandwidth in GB/s (bytes read + written) for the roofline: the faster of a
    copy and an in-place pass over n bytes (multi_lora_ updates y in place; a CPU's copy also
    reads its destination, 3 bytes moved for the 2 counted). The source is written first: an
    untouched torch.empty reads zero pages."""
    n = (1 << 28) if device == "cuda" else (1 << 25)
    a = torch.ones(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = min(min(time_fn(lambda: b.copy_(a), device, reps=20) for _ in range(3)),
             min(time_fn(lambda: a.bitwise_xor_(0), device, reps=20) for _ in range(3)))
    return 2 * n / ms / 1e6


def run(device: str = "cpu", quick: bool = False) -> tuple[list[dict], float]:
    bw = copy_bandwidth(device)
    rows = []
    i = o = 4096
    for T, r, D, dt, kind in cases(device, quick):
        g = torch.Generator(device=device).manual_seed(0)
        S = D
        x = torch.randn(T, i, generator=g, device=device).to(dt)
        y = torch.zeros(T, o, device=device, dtype=dt)
        A = (torch.randn(S, r, i, generator=g, device=device) / i**0.5).to(dt)
        B = (torch.randn(S, o, r, generator=g, device=device) / r**0.5).to(dt)
        idx = (torch.randperm(T, generator=g, device=device) % D).to(torch.int32)
        sc = torch.rand(S, generator=g, device=device)
        rk = torch.full((S,), r, dtype=torch.int32, device=device)
        groups = [(a, torch.nonzero(idx == a).flatten()) for a in range(S)]
        groups = [(a, t) for a, t in groups if t.numel()]
        sc_host = sc.tolist()

        def loop():
            for a, t in groups:
                y.index_add_(0, t, ((x[t] @ A[a].T) @ B[a].T) * sc_host[a])

        def single():
            y.addmm_(x @ A[0].T, B[0].T, alpha=sc_host[0])

        def gather_bmm():
            il = idx.long()
            u = torch.bmm(A[il], x[:, :, None])
            y.add_(torch.bmm(B[il], u)[:, :, 0] * sc[il, None].to(dt))

        # CPU: best of 3 rounds of medians (the machine may be shared), interleaved per method;
        # min/max span all rounds. CUDA: every method timed as CUDA-graph replays (time_graph:
        # kernel time without launch gaps), multi_lora_ also eagerly ("eager ms").
        kw, rounds = ({"warmup": 3, "min_time_s": 0.1}, 3) if device == "cpu" else ({}, 1)
        calls = 10 if T * D <= 4096 else 2
        ours_fn = lambda: multi_lora_(y, x, A, B, idx, sc, rk)  # noqa: E731
        ours, loops, bmms, singles = [], [], [], []
        for _ in range(rounds):
            ours.append(time_graph(ours_fn, device, calls=calls, **kw))
            loops.append(time_graph(loop, device, calls=calls, reps=5 if T * D > 20000 else 11, **kw))
            singles.append(time_graph(single, device, calls=calls, **kw))
            if T <= 1024:
                bmms.append(time_graph(gather_bmm, device, calls=calls, reps=5, **kw))
        t_ours, t_loop, t_single = best_of(ours), best_of(loops), best_of(singles)
        t_bmm = best_of(bmms) if bmms else float("nan")
        extra = {"eager_ms": time_fn(ours_fn, device)} if device == "cuda" else {}
        elt = x.element_size()
        nbytes = elt * (T * i + 2 * T * o + D * r * (i + o))
        roof = nbytes / bw / 1e6
        rows.append({"T": T, "r": r, "adapters": D, "case": kind, "dtype": str(dt).removeprefix("torch."),
                     "multi_lora_ms": t_ours, "loop_ms": t_loop, "gather_bmm_ms": t_bmm,
                     "single_ms": t_single, "roofline_ms": roof, "vs_loop": t_loop / t_ours,
                     "vs_bmm": t_bmm / t_ours, "x_single": t_ours / t_single,
                     "%roofline": 100 * roof / t_ours, **extra})
    return rows, bw


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = 16 if any(rw["r"] == 16 for rw in rows) else rows[0]["r"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ["distinct", "4 adapters"]):
        sel = [rw for rw in rows if rw["r"] == r0 and rw["case"] == kind]
        Ts = [rw["T"] for rw in sel]
        for key, label in [("multi_lora_ms", "multi_lora_"), ("loop_ms", "loop over adapters"),
                           ("gather_bmm_ms", "gather + bmm"), ("roofline_ms", "bytes-moved roofline")]:
            ax.plot(Ts, [rw[key] for rw in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_title(f"{kind}, r={r0}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = arg_parser("multi_lora", __doc__)
    p.add_argument("--out", default=None, type=_out_dir, help="result folder (default bench/results)")
    a = p.parse_args(argv)
    if a.out:
        common.RESULTS = a.out
    rows, bw = run(a.device, a.quick)
    title = f"multi_lora_ on {common.device_name(a.device)} (in=out=4096, bandwidth {bw:.0f} GB/s)"
    table(title, rows)
    if not a.quick:
        print("wrote", save("multi_lora", rows, {"copy_GBps": bw, "in": 4096, "out": 4096}, a.device))
        png = os.path.join(common.RESULTS, f"multi_lora-{torch.device(a.device).type}.png")
        try:
            plot(rows, png, title)
            print("wrote", png)
        except ImportError as e:  # matplotlib is optional (the lent GPU machine may lack it)
            print(f"no plot: {e}")
    return rows


if __name__ == "__main__":
    main()
