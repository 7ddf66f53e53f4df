"""dora_norm benchmark: DoRA's weight norm ||W + s B A|| per output, three ways, interleaved.

  lora_ext   lora_ext.ops.dora_norm(W, A, B, s): merge_'s delta tiles folded into fp32 sums of
             squares, W read once, nothing of W's size allocated
  torch      torch.linalg.norm(W.float() + s * (B.float() @ A.float()), dim=1): the plain expression
  PEFT       what PEFT's DoRA layer runs in every forward (peft.tuners.lora.dora.DoraLinearLayer):
             lora_weight = lora_B(lora_A(eye(in))).T in the model's dtype, then
             get_weight_norm(W, lora_weight, s) = norm(W + s * lora_weight) (in W's dtype)

Each run times every variant once, back to back (bench.common.interleaved); times are medians
(min–max) of the runs, "x faster" the median (min–max) of the per-run ratios. "err" is the largest
relative error of the norms against fp64 (PEFT's bf16 sum and result are rounded to bf16).
All under torch.no_grad() (DoRA detaches this norm). Sizes: 4096 x 4096, r = 16 ([out, in] and the
Conv1D layout [in, out]); --quick: 1024 x 1024.

Run: python bench/bench_dora.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, arg_parser, interleaved, ratios, save, table  # noqa: E402
from lora_ext.ops import dora_norm  # noqa: E402


def _dt(dt) -> str:
    return str(dt).removeprefix("torch.")


def make(n_out, n_in, r, dt, device, fifo=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g) * 0.02
    A = torch.randn(r, n_in, generator=g) / r**0.5
    B = torch.randn(n_out, r, generator=g) * 0.01
    W = W.T.contiguous() if fifo else W
    return W.to(device, dt), A.to(device, dt), B.to(device, dt)


def peft_variant(W, A, B, s, fifo):
    """PEFT's DoRA norm as its forward computes it, or None without peft."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError:
        return None
    layer = DoraLinearLayer(fan_in_fan_out=fifo)
    lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, device=A.device, dtype=A.dtype)
    lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, device=B.device, dtype=B.dtype)
    lora_A.weight.data.copy_(A)
    lora_B.weight.data.copy_(B)

    def run():
        lw = layer.get_lora_weight(lora_A, lora_B).to(W.dtype)
        return layer.get_weight_norm(W, lw.detach(), s)
    return run


def max_rel_err(n, ref) -> float:
    return ((n.double().cpu() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


def bench(device, quick):
    n, r, s = (1024, 16, 2.0) if quick else (4096, 16, 2.0)
    runs = 5 if quick else 15
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        for fifo in (False, True):
            W, A, B = make(n, n, r, dt, device, fifo)
            Wl = W.T if fifo else W  # [out, in]
            fns = {"lora_ext": lambda: dora_norm(W, A, B, s, fan_in_fan_out=fifo),
                   "torch": lambda: torch.linalg.norm(Wl.float() + s * (B.float() @ A.float()), dim=1)}
            peft = peft_variant(W, A, B, s, fifo)
            if peft is not None:
                fns["PEFT"] = peft
            ref = (Wl.double() + s * (B.double() @ A.double())).norm(dim=1).cpu()
            with torch.no_grad():
                errs = {k: max_rel_err(f(), ref) for k, f in fns.items()}
                times = interleaved(fns, device, runs=runs)
            row = {"out": n, "in": n, "r": r, "dtype": _dt(dt), "layout": "in x out (fifo)" if fifo else "out x in",
                   "lora_ext_ms": Timing.of(times["lora_ext"]), "torch_ms": Timing.of(times["torch"])}
            if "PEFT" in fns:
                row["peft_ms"] = Timing.of(times["PEFT"])
            row["x faster than torch"] = ratios(times, "torch", "lora_ext")
            if "PEFT" in fns:
                row["x faster than PEFT"] = ratios(times, "PEFT", "lora_ext")
            row.update({f"err {k}": v for k, v in errs.items()})
            nbytes = W.numel() * W.element_size()
            row["GB/s"] = nbytes / float(row["lora_ext_ms"]) / 1e6
            rows.append(row)
    return rows


def main(argv=None):
    a = arg_parser("dora", __doc__).parse_args(argv)
    rows = bench(a.device, a.quick)
    table(f"dora_norm on {a.device}", rows)
    if not a.quick:
        print("wrote", save("dora", rows, device=a.device))
    return rows


if __name__ == "__main__":
    main()
