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
"""
from __future__ import annotations

from torch import nn

__all__ = ["is_param_wrapper", "outer_wrappers", "chain_loras"]


def is_param_wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "ParamWrapper" and type(m).__module__.startswith("peft.")


def outer_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> outermost ParamWrapper of each wrapped module (inner ones are ``<name>.base_layer``...)."""
    found = {n: m for n, m in model.named_modules() if is_param_wrapper(m)}
    return {n: m for n, m in found.items()
            if not (n.rpartition(".")[2] == "base_layer" and n.rpartition(".")[0] in found)}


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
    loras = {}
    for w in chain:
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) > 1:
            return f"{len(active)} active adapters at once on {w.parameter_name!r} ({', '.join(active)})"
        if not active:
            continue
        name = active[0]
        E = w.num_experts
        A, B = w.lora_A[name].weight, w.lora_B[name].weight
        if E == 1 or B.shape[1] % E or A.shape[0] != B.shape[1]:
            return f"{w.parameter_name!r} is not an expert stack"
        r = A.shape[0] // E
        loras[w.parameter_name] = (A.view(E, r, A.shape[1]), B.view(B.shape[0], r, E).permute(2, 0, 1),
                                   float(w.scaling[name]))
    if not loras:
        return ""
    base = chain[-1].base_layer
    if n_args != 3:
        return f"{n_args} forward arguments (an experts module takes hidden_states, top_k_index, top_k_weights)"
    from .moe import fast_path_problem  # imports transformers (an experts module is one of its)
    why = fast_path_problem(base, list(loras))
    return (base, loras) if why is None else why
