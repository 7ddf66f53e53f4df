"""A DoRA linear layer (PEFT's use_dora=True), forward + backward, x requiring grad as in a
mid-network layer: lora_ext's LoRALinear(use_dora=True) vs PEFT's DoRA Linear vs that layer after
``lora_ext.patch_peft``, beside the plain (non-DoRA) LoRALinear and the frozen base F.linear.
in = out in {4096, 1024}, r = 16, T in {1, 64, 2048}; parameters in fp32 (bf16 on CUDA), then an
fp32 layer inside torch.autocast(bf16). Same factors and magnitude in every DoRA variant ("rel
err" is each output's relative error vs PEFT's DoRA layer, one forward before timing).

DoRA's extra cost is the per-output-feature norm ||W + s B A||, every forward: PEFT builds B A from
lora_B(lora_A(eye(in))) and W + s B A ([out, in] each), lora_ext calls ops.dora_norm (one read
of W, no [out, in] temporaries). Interleaved runs: median (min-max) of the per-run ratios to the base.

python bench/bench_dora_layer.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios  # noqa: E402
import lora_ext  # noqa: E402
import lora_ext.dora  # noqa: E402
from lora_ext import LoRALinear  # noqa: E402


def peft_dora(base: torch.nn.Linear, layer: LoRALinear, r: int):
    """PEFT's DoRA Linear around a copy of `base` with `layer`'s factors and magnitude, and a
    patched copy of it (or (None, None) without peft)."""
    try:
        import peft
    except ImportError:  # peft is a test dependency
        return None, None
    holder = torch.nn.Module()
    holder.proj = copy.deepcopy(base)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                     use_dora=True))
    p = pm.base_model.model.proj
    with torch.no_grad():
        p.lora_A["default"].weight.copy_(layer.lora_A)
        p.lora_B["default"].weight.copy_(layer.lora_B)
        p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    patched = copy.deepcopy(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would time PEFT's forward twice
        assert lora_ext.patch_peft(patched) == ["base_model.model.proj"]
    return p, patched.base_model.model.proj


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(device: str, T: int, n: int, r: int, dt: torch.dtype, amp: torch.dtype | None, runs: int) -> list[dict]:
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, device=device, dtype=dt).requires_grad_(False)
    plain = LoRALinear.from_linear(base, r=r, alpha=2 * r)
    dora = LoRALinear.from_linear(base, r=r, alpha=2 * r, use_dora=True)
    for m in (plain, dora):
        torch.nn.init.normal_(m.lora_B, std=0.02)
    with torch.no_grad():  # a trained magnitude: not the initial norm (g != 1)
        dora.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(n, device=device))
    x = torch.randn(T, n, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, n, device=device, dtype=amp or dt)

    fns = {"base F.linear": lambda: F.linear(x, base.weight, base.bias),
           "lora_ext LoRALinear (plain)": lambda: plain(x),
           "lora_ext DoRA": lambda: dora(x)}
    peft_layer, patched = peft_dora(base, dora, r)
    if peft_layer is not None:
        fns["PEFT DoRA"] = lambda: peft_layer(x)
        fns["PEFT DoRA + patch_peft"] = lambda: patched(x)
    params = [x] + [p for m in (plain, dora, peft_layer, patched) if m is not None
                    for p in m.parameters() if p.requires_grad]

    def step(fn):
        def go():
            for p in params:
                p.grad = None
            with torch.autocast(torch.device(device).type, dtype=amp or dt, enabled=amp is not None):
                y = fn()
            y.backward(g)
        return go

    err = {}
    if peft_layer is not None:
        with (torch.no_grad(), warnings.catch_warnings(),  # the patched layer must not fall back
              torch.autocast(torch.device(device).type, dtype=amp or dt, enabled=amp is not None)):
            warnings.simplefilter("error")
            ref = peft_layer(x)
            err = {k: _rel(fns[k](), ref) for k in ("lora_ext DoRA", "PEFT DoRA + patch_peft")}
    t = interleaved({k: step(f) for k, f in fns.items()}, device, runs=runs, warmup=1 if T * n >= 2 ** 23 else 2)
    autocast = str(amp).removeprefix("torch.") if amp is not None else "-"  # every row has every column
    return [{"impl": k, "T": T, "in=out": n, "r": r, "dtype": str(dt).removeprefix("torch."), "autocast": autocast,
             "fwd+bwd ms": Timing.of(ts), "x base": ratios(t, k, "base F.linear"),
             "x PEFT DoRA": ratios(t, k, "PEFT DoRA") if "PEFT DoRA" in t and k != "PEFT DoRA" else "",
             "rel err": err.get(k, "")}
            for k, ts in t.items()]


def cases(device: str, quick: bool):
    """(T, n, runs): a few runs for the big CPU cases (4096^2 x 2048 tokens: ~1 s per variant on 2
    cores), more where a run is short."""
    cuda = torch.device(device).type == "cuda"
    if quick:
        return [(1, 1024, 10), (64, 1024, 10)]
    out = []
    for n in (4096, 1024):
        for T in (1, 64, 2048):
            work = T * n * n
            out.append((T, n, 50 if cuda else (5 if work >= 2 ** 33 else 12 if work >= 2 ** 28 else 30)))
    return out


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    rows = []
    for amp in (None, torch.bfloat16):  # then an fp32 layer inside torch.autocast(bf16)
        for T, n, runs in cases(device, quick):
            rows += measure(device, T, n, 16, dt if amp is None else torch.float32, amp, runs)
    return rows


def main(argv=None):
    return cli("dora_layer", "DoRA linear layer fwd+bwd on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
