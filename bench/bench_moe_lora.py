"""LoRA on MoE expert stacks (PEFT's target_parameters): a Qwen3-MoE experts module called with
routed tokens, LoRA r = 16 on both stacks (gate_up_proj [E, 2I, H] and down_proj [E, H, I]), top-2:
the frozen module alone vs PEFT's ParamWrapper vs lora_ext's LoRAParameter, training (forward +
backward, x requiring grad as mid-network, gradients of x and the factors) and inference (forward
under no_grad). transformers' own experts forward (its default, grouped_mm) runs in every variant.

lora_ext's forward takes lora_ext.moe's fast path where it applies (path "fast"; the LoRA term per
routed row, no [E, out, in] tensor) and the generic path otherwise (the module's own forward with
P + s B A: one baddbmm per stack, as PEFT's for one adapter); with the fast path, the generic path
is also timed, forced ("lora_ext (generic, forced)"). "PEFT + patch_peft": the same PEFT model after
lora_ext.patch_peft (its ParamWrapper chain runs lora_ext.moe on PEFT's factors). Same factors everywhere ("rel err": each
output vs PEFT's, one forward before timing).

"saved MB": the bytes of the distinct storages one training forward saves for backward
(torch.autograd.graph.saved_tensors_hooks), the module's parameters and x left out: what the
adapter adds to activation memory (an effective-weight stack per step on the generic paths). On
CUDA, "peak MB" is the peak allocated during one training step above what was allocated before.
Interleaved runs: median (min-max) of the per-run ratios.

python bench/bench_moe_lora.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios, saved_bytes, sync  # noqa: E402
import lora_ext  # noqa: E402
import lora_ext.param_lora as param_lora  # noqa: E402

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def fast_path_problem(module: nn.Module, names: list[str]) -> str | None:
    try:
        from lora_ext import moe
    except ImportError as e:
        return f"lora_ext.moe: {e}"
    return moe.fast_path_problem(module, names)


def experts(E: int, H: int, I: int, top_k: int, device: str, dt: torch.dtype) -> nn.Module:
    """A holder whose .experts is a frozen Qwen3MoeExperts (transformers' grouped_mm forward)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=top_k,
                         experts_implementation="grouped_mm")
    holder = nn.Module()
    holder.experts = Qwen3MoeExperts(cfg)
    for p in holder.experts.parameters():
        nn.init.normal_(p, std=0.02)
    return holder.to(device, dt).requires_grad_(False)


def variants(holder: nn.Module, r: int):
    """{name: (module, path)}: base, PEFT (or none without peft), lora_ext, and the forced
    generic path when lora_ext takes the fast one. Same nonzero factors everywhere."""
    ours = copy.deepcopy(holder)
    lora_ext.inject(ours, target_parameters=TARGETS, r=r, alpha=2 * r)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    out = {"base": (holder.experts, "-")}
    try:
        import peft
    except ImportError:  # peft is a test dependency
        peft = None
    if peft is not None:
        pm = peft.get_peft_model(copy.deepcopy(holder), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                                          target_parameters=TARGETS))
        theirs = {k.removeprefix("base_model.model.").replace(".default", "").replace(".weight", ""): p
                  for k, p in pm.named_parameters() if "lora_" in k}
        mine = dict(ours.named_parameters())
        with torch.no_grad():
            for k, p in theirs.items():
                p.copy_(mine[k])
        out["PEFT"] = (pm.base_model.model.experts, "-")
        patched = copy.deepcopy(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora_ext.patch_peft(patched)
        out["PEFT + patch_peft"] = (patched.base_model.model.experts, "-")
    ex = ours.experts
    why = fast_path_problem(ex.target(), ["down_proj", "gate_up_proj"])
    out["lora_ext"] = (ex, "generic" if why else "fast")
    if why is None:
        out["lora_ext (generic, forced)"] = (ex, "generic")
    return out


def call(module: nn.Module, path: str, *args):
    if path == "generic":
        with param_lora.generic_path():
            return module(*args)
    return module(*args)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(device: str, E: int, H: int, I: int, T: int, top_k: int, r: int, dt: torch.dtype, runs: int) -> list[dict]:
    torch.manual_seed(0)
    holder = experts(E, H, I, top_k, device, dt)
    vs = variants(holder, r)
    x = torch.randn(T, H, device=device, dtype=dt, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)]).to(device)
    wts = torch.softmax(torch.randn(T, top_k), -1).to(device, dt)
    g = torch.randn(T, H, device=device, dtype=dt)
    cuda = torch.device(device).type == "cuda"
    frozen = list(holder.parameters())
    rows = []
    with torch.no_grad():
        outs = {k: call(m, p, x, idx, wts) for k, (m, p) in vs.items()}
    ref = outs.get("PEFT")
    for mode in ("train", "no_grad"):
        def fn_of(m, p):
            if mode == "no_grad":
                def go():
                    with torch.no_grad():
                        call(m, p, x, idx, wts)
                return go
            params = [x] + [q for q in m.parameters() if q.requires_grad]

            def step():
                for q in params:
                    q.grad = None
                call(m, p, x, idx, wts).backward(g)
            return step
        fns = {k: fn_of(m, p) for k, (m, p) in vs.items()}
        saved, peak = {}, {}
        if mode == "train":
            for k, (m, p) in vs.items():
                saved[k] = saved_bytes(lambda: call(m, p, x, idx, wts), [x, *frozen, *m.parameters()]) / 2 ** 20
                if cuda:
                    fns[k]()
                    sync(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fns[k]()
                    sync(device)
                    peak[k] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
        t = interleaved(fns, device, runs=runs, warmup=2)
        for k, ts in t.items():
            row = {"impl": k, "path": vs[k][1], "mode": mode, "T": T, "E": E, "H": H, "I": I, "top_k": top_k, "r": r,
                   "dtype": str(dt).removeprefix("torch."), "ms": Timing.of(ts), "x base": ratios(t, k, "base"),
                   "x PEFT": ratios(t, k, "PEFT") if "PEFT" in t and k not in ("PEFT", "base") else "",
                   "saved MB": saved.get(k, ""),
                   "saved x PEFT": (saved[k] / saved["PEFT"] if saved.get("PEFT") and k in saved else ""),
                   "rel err": _rel(outs[k], ref) if ref is not None and k not in ("base", "PEFT") else ""}
            if cuda:
                row["peak MB"] = peak.get(k, "")
            rows.append(row)
    return rows


def cases(device: str, quick: bool):
    """(E, H, I, T, dtype, runs): Qwen3-MoE-like blocks; on CUDA bf16 first (goals read the first rows)."""
    if quick:
        return [(8, 256, 128, T, torch.float32, 5) for T in (1, 64)]
    if torch.device(device).type == "cuda":  # gpu_check.sh's bench stage: well under 20 s on an H200
        return [(32, 1024, 512, T, dt, 20) for dt in (torch.bfloat16, torch.float32)
                for T in ((1, 64, 512, 4096) if dt == torch.bfloat16 else (1, 64, 512))]
    return [(16, 1024, 512, T, dt, runs) for dt in (torch.float32, torch.bfloat16)
            for T, runs in ((1, 20), (64, 10), (512, 8))]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import transformers
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    if not hasattr(modeling_qwen3_moe, "Qwen3MoeExperts"):  # transformers < 5: a ModuleList of MLPs
        print(f"bench_moe_lora: transformers {transformers.__version__} has no Qwen3MoeExperts (3-D expert "
              "stacks need transformers >= 5): nothing measured")
        return []
    rows = []
    for E, H, I, T, dt, runs in cases(device, quick):
        rows += measure(device, E, H, I, T, 2, 16, dt, runs)
    return rows


def main(argv=None):
    return cli("moe_lora", "LoRA on MoE expert stacks (target_parameters) on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
