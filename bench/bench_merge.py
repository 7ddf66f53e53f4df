"""Merge benchmarks.

1. merge_ (W += s B A, fp32 sum rounded once) vs torch's W.addmm_(B, A, alpha=s) and vs the
   bytes-moved roofline: W read and written once at the faster of two measured ways to stream
   W's bytes, W.copy_ (copy_ms) and an in-place pass over W (pass_ms; on a CPU the copy's stores
   first read their destination, so copy_ alone moves 3 bytes for the 2 it is credited with).
   On CUDA all three as CUDA-graph replays over 4 rotating weights (device time, beyond L2),
   merge_ also eagerly (eager_ms: one call, host overhead included).
2. Exact merge + unmerge through a MergeState (side information included) vs plain ones.
3. Side information of the exact unmerge as a fraction of W, for several delta sizes.
4. Inference time of a merged model vs the base model (no LoRA) and vs the unmerged LoRA model
   (interleaved runs, ratios per run).
5. PEFT's own merge/unmerge of its LoRA Linear (layer.merge(); layer.unmerge()) vs lora_ext's
   plain and exact cycles on the same weights, interleaved; and the bits PEFT's cycles change
   (its unmerge subtracts a rounded delta) vs lora_ext's exact cycles (none, asserted).

Run: python bench/bench_merge.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_ext  # noqa: E402
from bench.common import (Timing, arg_parser, interleaved, ratios, save, table, time_fn,  # noqa: E402
                          time_graph)
from lora_ext.ops import MergeState, merge_, unmerge_  # noqa: E402


def _dt(dt) -> str:
    return str(dt).removeprefix("torch.")


def make(n_out, n_in, r, dt, device, ratio=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(n_out, n_in, generator=g) * 0.02).to(device, dt)
    A = (torch.randn(r, n_in, generator=g) / r**0.25).to(device, dt)
    B = (torch.randn(n_out, r, generator=g) * (0.02 * ratio / r**0.25)).to(device, dt)
    return W, A, B


def roofline(W, A, B, t_copy: float, t_pass: float) -> tuple[int, float]:
    """(bytes merge_ moves at least, their time in ms): W read and written once plus A and B read
    once, at the bandwidth (2 |W| bytes per run) of the faster of W.copy_ and the in-place pass."""
    w = W.numel() * W.element_size()
    nbytes = 2 * w + (A.numel() + B.numel()) * A.element_size()
    gbps = 2 * w / min(t_copy, t_pass) / 1e6
    return nbytes, nbytes / gbps / 1e6


def bench_kernel(device, quick):
    """On CUDA every variant is timed as replays of a CUDA graph of 8 calls that rotate over
    4 weights (and 4 copy pairs), so that the working set exceeds the L2 cache and the numbers
    are device bandwidth, not launch overhead; "eager_ms" is one merge_ call timed eagerly."""
    sizes = [(4096, 4096)] if device == "cpu" or quick else [(4096, 4096), (8192, 8192)]
    ranks = [16] if quick else [8, 16, 64]
    cuda = torch.device(device).type == "cuda"
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        for (o, i) in sizes:
            for r in ranks:
                W, A, B = make(o, i, r, dt, device)
                # touched memory: an untouched torch.empty reads zero pages
                Ws = [W.clone() for _ in range(4 if cuda else 1)]
                srcs = [W.clone() for _ in Ws]
                k = iter(range(1 << 30))

                def rotate(fn):
                    return lambda: fn(next(k) % len(Ws))
                kw = {"calls": 8} if cuda else {"min_time_s": 0.3}
                t_copy = time_graph(rotate(lambda j: Ws[j].copy_(srcs[j])), device, **kw)
                ints = {4: torch.int32, 2: torch.int16}[W.element_size()]  # W read and written in place
                t_pass = time_graph(rotate(lambda j: Ws[j].view(ints).bitwise_xor_(0)), device, **kw)
                t_ours = time_graph(rotate(lambda j: merge_(Ws[j], A, B, 1e-9)), device, **kw)
                t_torch = time_graph(rotate(lambda j: Ws[j].addmm_(B, A, alpha=1e-9)), device, **kw)
                extra = {"eager_ms": time_fn(lambda: merge_(W, A, B, 1e-9), device)} if cuda else {}
                nbytes, roof = roofline(W, A, B, t_copy, t_pass)
                rows.append({"out": o, "in": i, "r": r, "dtype": _dt(dt), "merge_ms": t_ours,
                             "addmm_ms": t_torch, "speedup": t_torch / t_ours, "copy_ms": t_copy,
                             "pass_ms": t_pass, "roofline_ms": roof, "%roofline": 100 * roof / t_ours,
                             "GB/s": nbytes / t_ours / 1e6, **extra})
    return rows


def bench_exact(device, quick):
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        W, A, B = make(4096, 4096, 16, dt, device)
        W0 = W.clone()

        def plain_cycle():
            merge_(W, A, B, 2.0)
            unmerge_(W, A, B, 2.0)

        state = MergeState()

        def exact_cycle():
            merge_(W, A, B, 2.0, state=state)
            unmerge_(W, state=state)

        t_plain = time_fn(plain_cycle, device, reps=5)
        W.copy_(W0)
        t_exact = time_fn(exact_cycle, device, reps=5)
        assert torch.equal(W, W0)
        rows.append({"out": 4096, "in": 4096, "r": 16, "dtype": _dt(dt), "plain_cycle_ms": t_plain,
                     "exact_cycle_ms": t_exact, "exact/plain": t_exact / t_plain})
    return rows


def bench_overhead(device, quick):
    rows = []
    n = 1024 if quick else 4096
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for ratio in (0.001, 0.01, 0.03, 0.1, 0.3, 1.0):
            W, A, B = make(n, n, 16, dt, device, ratio=ratio, seed=1)
            state = MergeState()
            merge_(W, A, B, 1.0, state=state)
            rows.append({"dtype": _dt(dt), "|dW|/|W0|": ratio, "bits": state.bits,
                         "exceptions_%": 100 * state.num_exceptions / W.numel(),
                         "side_info_%W": 100 * state.overhead(),
                         "adapter_copy_%W": 100 * state.adapter_bytes() / (W.numel() * W.element_size())})
            unmerge_(W, state=state)
    return rows


class MLP(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def bench_inference(device, quick):
    rows = []
    width, depth = (1024, 4) if quick or device == "cpu" else (4096, 8)
    for dt in (torch.float32, torch.bfloat16):
        for T in (1, 64) if device == "cpu" else (1, 512):
            torch.manual_seed(0)
            base = MLP(width, depth).to(device, dt).eval()
            model = MLP(width, depth).to(device, dt).eval()
            model.load_state_dict(base.state_dict())
            lora_ext.inject(model, target_modules=r"layers\.\d+", r=16, alpha=32)
            with torch.no_grad():
                for m in lora_ext.lora_layers(model).values():
                    m.lora_B.normal_(0, 0.01)
            merged = copy.deepcopy(model)
            lora_ext.merge(merged)
            x = torch.randn(T, width, device=device, dtype=dt)
            with torch.no_grad():  # interleaved, ratios per run: the three models see the same load
                t = interleaved({"base": lambda: base(x), "lora": lambda: model(x), "merged": lambda: merged(x)},
                                device, runs=30 if quick else 60)
            rows.append({"width": width, "depth": depth, "T": T, "dtype": _dt(dt), "base_ms": Timing.of(t["base"]),
                         "lora_ms": Timing.of(t["lora"]), "merged_ms": Timing.of(t["merged"]),
                         "merged/base": ratios(t, "merged", "base"), "lora/base": ratios(t, "lora", "base")})
    return rows


def bench_peft(device, quick):
    try:
        import peft
    except ImportError:
        print("merge: peft is not installed; skipping the comparison with PEFT's merge")
        return []
    rows = []
    n, cycles = (1024, 10) if quick else (4096, 100)
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, n, bias=False)).to(device, dt)
        layer = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"])) \
            .base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.01)  # as after training: |dW|/|W0| = 0.08
        W = layer.base_layer.weight.data.clone()  # lora_ext's cycles run on a copy of the same weight
        A, B, s = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data, layer.scaling["default"]
        state = MergeState()

        def peft_cycle():
            layer.merge()
            layer.unmerge()

        def plain():
            merge_(W, A, B, s)
            unmerge_(W, A, B, s)

        def exact():
            merge_(W, A, B, s, state=state)
            unmerge_(W, state=state)

        fns = {"peft": peft_cycle, "plain": plain, "exact": exact}
        times = interleaved(fns, device, runs=5 if quick else 15)
        # drift: `cycles` more merge/unmerge cycles from one starting weight, each way
        W0 = layer.base_layer.weight.data.clone()
        W.copy_(W0)
        for _ in range(cycles):
            peft_cycle()
            exact()
        assert torch.equal(W, W0), "lora_ext's exact cycles changed the weight"
        changed = (layer.base_layer.weight.data != W0).float().mean().item()
        drift = (layer.base_layer.weight.data.double() - W0.double()).norm() / W0.double().norm()
        rows.append({"n": n, "r": 16, "dtype": _dt(dt), "peft_cycle_ms": Timing.of(times["peft"]),
                     "exact_cycle_ms": Timing.of(times["exact"]), "plain_cycle_ms": Timing.of(times["plain"]),
                     "exact: x faster": ratios(times, "peft", "exact"), "plain: x faster": ratios(times, "peft", "plain"),
                     "cycles": cycles, "PEFT: % of W changed": 100 * changed,
                     "PEFT: |W - W0| / |W0|": drift.item(), "lora_ext: % changed": 0.0})
    return rows


def main(argv=None):
    a = arg_parser("merge", __doc__).parse_args(argv)
    parts = {"kernel": bench_kernel, "exact": bench_exact, "overhead": bench_overhead,
             "inference": bench_inference, "peft": bench_peft}
    out = {}
    for name, fn in parts.items():
        rows = fn(a.device, a.quick)
        table(f"merge: {name} on {a.device}", rows)
        out[name] = rows
    if not a.quick:
        flat = [{"part": k, **r} for k, rows in out.items() for r in rows]
        print("wrote", save("merge", flat, device=a.device))
    return out


if __name__ == "__main__":
    main()
