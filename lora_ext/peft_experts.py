"""patch_peft for PEFT's ParamWrapper (LoRA on parameters, ``target_parameters``): MoE experts.

PEFT nests one ParamWrapper per targeted parameter of a module (the first registered innermost)
and, on every forward, registers a parametrization that rebuilds each whole expert stack
W + s·B·A for the wrapped module's own forward; in training its backward also forms a weight
gradient of the stack's size. Patched, the outermost wrapper of a transformers experts module
runs ``lora_ext.moe.experts_forward`` instead, on PEFT's own lora_A / lora_B / scaling (read at
call time, so training, set_adapter and save_pretrained stay PEFT's). PEFT's [E·r, in] / [out, E·r]
layout is lora_ext's LoRAParameter layout, so the per-expert views are the same.

Only when every wrapper of the chain has exactly one active adapter, none is merged, adapters are
not disabled and ``lora_ext.moe.fast_path_problem`` accepts the module; otherwise PEFT's forward
runs (with one warning per layer and reason; a disabled or merged chain without one, as for
Linear layers). Inner wrappers are never called by a patched outer one.

Mixed batches (``adapter_names``, which PEFT refuses for ParamWrapper): every adapter of the chain
goes into per-parameter pools [N * E, r_max, in] / [N * E, out, r_max] (adapter n's expert e at row
n * E + e; an adapter a wrapper lacks has rank 0 there), cached on the wrapper and rebuilt when a
factor or scaling changes; each projection's LoRA term is one ``multi_lora_`` over the routed rows
(lora_ext.moe.routed_forward), as in lora_ext.multi_experts. Inference only (no autograd).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .multi_experts import block_lead, lora_adder
from .param_lora import expert_views
from .peft_pools import _stamp
from .targets import is_param_wrapper, outer_wrappers

__all__ = ["is_param_wrapper", "outer_wrappers", "chain_loras", "prepare_experts", "mixed_experts"]
POOLS = "_lora_ext_expert_pools"  # ParamWrapper.__dict__ key of the mixed-batch pools


def _chain(outer: nn.Module) -> list[nn.Module]:
    chain, m = [], outer
    while is_param_wrapper(m):
        chain.append(m)
        m = m.base_layer
    return chain


def chain_loras(outer: nn.Module, n_args: int) -> tuple[nn.Module, dict] | str:
    """(experts module, {parameter name: (A [E, r, in], B [E, out, r], s)}) for
    moe.experts_forward from PEFT's active adapters of the chain; a reason string when PEFT's
    forward must run instead ("" when there is nothing to fuse: disabled or merged, no warning)."""
    chain = _chain(outer)
    if outer.disable_adapters or any(w.merged for w in chain):
        return ""
    loras, base = {}, chain[-1].base_layer
    for w in chain:
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) > 1:
            return f"{len(active)} active adapters at once on {w.parameter_name!r} ({', '.join(active)})"
        if not active:
            continue
        name = active[0]
        E = w.num_experts
        A, B = w.lora_A[name].weight, w.lora_B[name].weight
        if not _is_stack(base, w) or B.shape[1] % E or A.shape[0] != B.shape[1]:
            return f"{w.parameter_name!r} is not an expert stack"
        loras[w.parameter_name] = (*expert_views(A, B, E), float(w.scaling[name]))
    if not loras:
        return ""
    if n_args != 3:
        return f"{n_args} forward arguments (an experts module takes hidden_states, top_k_index, top_k_weights)"
    from .moe import fast_path_problem  # imports transformers (an experts module is one of its)
    why = fast_path_problem(base, list(loras))
    return (base, loras) if why is None else why


# ---------------------------------------------------------------- mixed batches
def _is_stack(base: nn.Module, w: nn.Module) -> bool:
    """Whether wrapper w's parameter is a 3-D expert stack (PEFT's num_experts is 1 for a 2-D one,
    and for a stack of one expert)."""
    P = getattr(base, w.parameter_name, None)
    return isinstance(P, torch.Tensor) and P.dim() == 3


def _stack_problem(base: nn.Module, w: nn.Module, name: str) -> str | None:
    A, B, E = w.lora_A[name].weight, w.lora_B[name].weight, w.num_experts
    if not _is_stack(base, w) or A.shape[0] % E or A.shape[0] != B.shape[1] or not A.dtype.is_floating_point:
        return f"adapter '{name}' of {w.parameter_name!r} is not an expert stack"
    return None


def _expert_pools(w: nn.Module, names: tuple, in_out: tuple, dtype: torch.dtype, device: torch.device):
    """(A_pool [N * E, r_max, in], B_pool [N * E, out, r_max], scales, ranks) of wrapper w over the
    chain's adapters ``names`` (rank 0 for those w lacks), cached on w; rebuilt when an adapter's
    factors (identity, address, version) or scaling changed."""
    E, have = w.num_experts, [n for n in names if n in w.lora_A]
    stamps = tuple(_stamp(w.lora_A[n].weight, w.lora_B[n].weight, w.scaling[n]) for n in have)
    cached = w.__dict__.get(POOLS)
    if cached is not None and cached[0] == (names, dtype, device, stamps):
        return cached[1]
    r_max = max(w.lora_A[n].weight.shape[0] // E for n in have)
    with torch.no_grad(), torch.inference_mode(False):
        A_pool = torch.zeros(len(names) * E, r_max, in_out[0], dtype=dtype, device=device)
        B_pool = torch.zeros(len(names) * E, in_out[1], r_max, dtype=dtype, device=device)
        scales = torch.zeros(len(names) * E, dtype=torch.float32, device=device)
        ranks = torch.zeros(len(names) * E, dtype=torch.int32, device=device)
        for n in have:
            A, B, rows = w.lora_A[n].weight, w.lora_B[n].weight, slice(names.index(n) * E, (names.index(n) + 1) * E)
            r = A.shape[0] // E
            A_pool[rows, :r], B_pool[rows, :, :r] = expert_views(A, B, E)
            scales[rows], ranks[rows] = float(w.scaling[n]), r
    w.__dict__[POOLS] = ((names, dtype, device, stamps), (A_pool, B_pool, scales, ranks))
    return A_pool, B_pool, scales, ranks


def prepare_experts(outer: nn.Module, adapter_names):
    """A patched outer ParamWrapper's part of a mixed batch: a reason to run PEFT's forward (which
    raises PEFT's error), or (base, {parameter: pools}, rows, grad): rows [len(adapter_names)] int32
    the adapter of each input row (-1: "__base__" or none of the chain's), grad the reason to refuse
    the batch if the layer is called with autograd on (None: none)."""
    chain = _chain(outer)
    if outer.disable_adapters or any(w.merged for w in chain):
        return "mixed batch on a disabled or merged ParamWrapper"
    base = chain[-1].base_layer
    from .moe import _in_out, fast_path_problem  # imports transformers (an experts module is one of its)
    why = fast_path_problem(base, [w.parameter_name for w in chain])
    if why is not None:
        return why
    names = tuple(dict.fromkeys(n for w in chain for n in w.lora_A))
    used = [n for n in dict.fromkeys(adapter_names) if n in names]
    for w in chain:
        for n in used:
            if n in w.lora_A and (why := _stack_problem(base, w, n)) is not None:
                return why
    params = [p for w in chain for n in used if n in w.lora_A for p in (w.lora_A[n].weight, w.lora_B[n].weight)]
    grad = ("mixed batch with autograd on (multi_lora_ is inference only: use torch.no_grad())"
            if any(p.requires_grad for p in params + list(base.parameters())) else None)
    weight = getattr(base, chain[0].parameter_name)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"experts weights are {weight.dtype} (multi_lora_ takes float32/16, bfloat16)"
    pools = {w.parameter_name: _expert_pools(w, names, _in_out(base, w.parameter_name), weight.dtype, weight.device)
             for w in chain} if used else {}
    rows = torch.tensor([names.index(n) if n in used else -1 for n in adapter_names], dtype=torch.int32)
    return base, pools, rows.to(weight.device), grad


def mixed_experts(prep, names, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, holder: nn.Module | None = None) -> torch.Tensor:
    """The experts module's output with each batch row's adapter (prepare_experts' ``prep``): the
    [B * L, H] tokens the MoE block passes are rows of B = len(names) sequences (row-major).
    ``holder``: the patched wrapper, whose MoE block patch_peft watches (multi_experts.watch_block):
    its B rows must be len(names), as PEFT checks every layer's input. Traced, sizes are compared,
    never len(names) (a guard on it: one graph per batch size)."""
    base, pools, rows, _ = prep
    T, lead = math.prod(hidden_states.shape[:-1]), block_lead(holder, hidden_states)
    n = rows.shape[0]  # len(names) as a size: traced, compared in the graph (no guard on the batch size)
    if lead is not None and lead[0] != n:
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {lead[0]} respectively (the input of the MoE block around an experts "
                         "module).")
    if T % n:
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {T} tokens in an experts module (not a multiple) respectively.")
    from .moe import routed_forward
    add_lora = lora_adder(pools, rows.repeat_interleave(T // n), base.num_experts)
    return routed_forward(base, hidden_states, top_k_index, top_k_weights, add_lora)
