"""Merge LoRA layers into their base weights for serving, unmerge them to switch adapters.

    lora_ext.merge(model)              # every LoRA layer: W <- round(W + s B A); forward skips LoRA
    lora_ext.unmerge(model)            # W back to the original, bit for bit (any dtype)
    base = lora_ext.merge_and_unload(model)   # plain nn.Linear / nn.Embedding / Conv1D again

Exact unmerge: each merged layer keeps a MergeState (see lora_ext.ops.MergeState): copies of
the merged factors and a few percent of W's size of side information, dropped on unmerge.
``exact=False`` merges without it (unmerge then subtracts, as other libraries do). The per-layer
work is LoRALayer.merge / unmerge (lora_ext.layers); this module applies it to whole models.
Combining adapters (lora_ext.combine) is in lora_ext/combine.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .dora import dora_merge_
from .inject import NESTED_KEY, lora_layers, registrations
from .layers import LoRALayer
from .ops import merge_
from .param_lora import LoRAParameter, outermost, parameter_layers
from .sharding import sharding_of

__all__ = ["merge", "unmerge", "merge_and_unload", "merge_layer", "unmerge_layer", "merge_overhead"]


def merge_layer(layer: LoRALayer, safe: bool = False, exact: bool = True) -> None:
    """Folds the layer's adapter into its weight; no-op when already merged (LoRALayer.merge).

    ``safe=True`` raises ValueError, before touching the weight, if the merged weight would hold
    inf/NaN. ``exact=True`` keeps what is needed to unmerge bit for bit.
    """
    layer.merge(safe=safe, exact=exact)


def unmerge_layer(layer: LoRALayer) -> None:
    """Takes the merged adapter out of the weight (bit for bit after an exact merge; LoRALayer.unmerge)."""
    layer.unmerge()


def _layers_of(model: nn.Module, what: str) -> dict[str, nn.Module]:
    """Name -> LoRA layer of ``model``; ValueError naming the function ``what`` for a sharded model
    or one without lora_ext LoRA layers (a PEFT model: its own merge methods do the work)."""
    wrapped = sharding_of(model, ddp=False)  # (DDP replicas merge like single-process models)
    if wrapped is not None:  # an FSDP block's unsharded weight is a buffer: the merge would be lost
        raise ValueError(f"{what}: {type(model).__name__} is {wrapped}; merge before tensor-parallel sharding "
                         "(fully_shard takes unmerged layers only), or "
                         "in a single-process copy (get_model_state_dict(..., full_state_dict=True))")
    if isinstance(model, LoRALayer):
        return {"": model}
    found = {**lora_layers(model), **parameter_layers(model)}
    if not found:
        peft = next((n for n, m in model.named_modules()
                     if type(m).__module__.startswith("peft.") and hasattr(m, "lora_A")), None)
        if peft is not None:
            raise ValueError(f"{what}: {type(model).__name__} has PEFT LoRA layers (e.g. {peft!r}), not "
                             "lora_ext ones: PEFT's merge_adapter / unmerge_adapter / merge_and_unload merge them")
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers (use lora_ext.inject first)")
    return found


def _check_tied(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """A weight shared with another module (tied embeddings / LM head) would change there too."""
    owners: dict[int, list[str]] = {}
    names: dict[int, set[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, LoRAParameter):  # (its ``weight`` would be the wrapped module's)
            continue
        names.setdefault(id(mod), set()).add(name)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
        for p in mod._parameters.values():  # any parameter a LoRAParameter may wrap (lm_head.weight)
            if p is not None and p is not w:
                owners.setdefault(id(p), []).append(name)
    for name, m in layers.items():
        if isinstance(m, LoRAParameter):  # its parameter is the wrapped module's own
            inner = m.target()
            others = [o for o in owners.get(id(getattr(inner, m.parameter_name)), [])
                      if o not in names.get(id(inner), ())]
        else:
            others = [o for o in owners.get(id(m.weight), []) if o not in names.get(id(m), ())]  # (a reused layer's)
        if others:
            raise ValueError(f"merge: layer {name!r} shares its weight with {others} (tied weights): "
                             "merging would change those modules too; pass allow_tied=True to "
                             "merge anyway")


def merge(model: nn.Module, safe: bool = False, exact: bool = True,
          allow_tied: bool = False) -> list[str]:
    """Merges every LoRA layer of ``model`` (or ``model`` itself if it is one); returns the names
    merged now (already-merged layers are skipped). With ``safe=True`` every layer is checked
    before any weight changes. A LoRA layer whose weight is tied to another module (GPT-2's
    wte / lm_head) raises ValueError unless ``allow_tied=True``."""
    layers = {n: m for n, m in _layers_of(model, "merge").items() if not m.merged}
    if not allow_tied:
        _check_tied(model, layers)
    _check_all(layers, finite=safe)
    for m in layers.values():
        merge_layer(m, exact=exact)
    return list(layers)


def _check_all(layers: dict[str, nn.Module], finite: bool) -> None:
    """Before any weight changes: ValueError naming the first layer that cannot merge exactly what it
    computes (LoRALayer.merge_refusal: some LoRAConv layers, LoRAEmbedding with max_norm), whose weight
    has a dtype the kernels lack (float64) or, with ``finite``, would overflow."""
    for name, m in layers.items():
        try:
            if (dt := unmergeable_dtype(m)) is not None:  # (else a half-merged model)
                raise ValueError(f"its weight is {dt}; the merge kernels take float32, float16 and bfloat16")
            if finite:
                m.check_merge()
            elif (why := m.merge_refusal()) is not None:
                raise ValueError(f"{type(m).__name__}.merge: {why}")
        except ValueError as e:
            raise ValueError(f"merge: layer {name!r}: {e}") from None
    if finite:
        _check_tied_finite(layers)


def unmergeable_dtype(m: nn.Module) -> torch.dtype | None:
    """The dtype of LoRA layer / LoRAParameter ``m``'s weight when the merge kernels lack it (float64), else None."""
    w = getattr(m.target(), m.parameter_name) if isinstance(m, LoRAParameter) else m.weight
    return None if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.dtype


def _check_tied_finite(layers: dict[str, nn.Module]) -> None:
    """Layers merging into one (tied) weight: each check_merge saw the weight as it is, but a later one
    merges into it plus the earlier deltas. Merges them into a copy, in merge order, and looks."""
    tied: dict[int, list[tuple[str, LoRALayer]]] = {}
    for name, m in layers.items():
        if isinstance(m, LoRALayer):
            tied.setdefault(id(m.weight), []).append((name, m))
    for group in (g for g in tied.values() if len(g) > 1):
        w = group[0][1].weight.detach().clone()
        for i, (name, m) in enumerate(group):
            A, B, s = m._merge_factors()
            W = m._merge_weight(w)
            if m.use_dora:
                dora_merge_(W, A.detach(), B.detach(), s, m.lora_magnitude_vector.detach(), m._weight_in_out)
            else:
                merge_(W, A.detach(), B.detach(), s, fan_in_fan_out=m._weight_in_out)
            m._store_merged(w, W)
            if not torch.isfinite(w).all():
                raise ValueError(f"merge: layer {name!r}: merged after {[n for n, _ in group[:i]]} into their shared "
                                 "(tied) weight, it would write inf/NaN; nothing was changed")


def unmerge(model: nn.Module) -> list[str]:
    """Unmerges every merged LoRA layer; returns their names. Every layer is checked first (a weight
    written since an exact merge, a layer merged for good): ValueError naming the layer, and
    nothing unmerged. Layers merged into one (tied) weight are unmerged last merged first (the
    exact order); one under a later merge is checked when its turn comes."""
    merged = {n: m for n, m in _layers_of(model, "unmerge").items() if m.merged}
    name_of = {id(m): n for n, m in merged.items()}
    layers: dict[str, nn.Module] = {}
    for m in merged.values():
        for s in (m._tied_stack() if isinstance(m, LoRALayer) else [m]):
            if id(s) in name_of:
                layers.setdefault(name_of[id(s)], s)
    for name, m in layers.items():
        state = getattr(m, "_merge_state", None)
        try:
            if isinstance(m, LoRAParameter):
                m.check_unmerge()
            elif m._merged_for_good():
                raise ValueError("merged for good (drop_merge_state), so it cannot be unmerged")
            elif state is not None and len(m._tied_stack()) == 1:
                state.check(m._merge_weight(m.weight.detach()))
        except ValueError as e:
            raise ValueError(f"unmerge: layer {name!r}: {e}") from None
    for m in layers.values():
        unmerge_layer(m)
    return list(layers)


def merge_overhead(model: nn.Module) -> dict[str, float]:
    """Exact-unmerge side information of each merged layer, as a fraction of its weight's bytes."""
    overheads = {n: m.merge_overhead() for n, m in _layers_of(model, "merge_overhead").items()}
    return {n: o for n, o in overheads.items() if o is not None}


def merge_and_unload(model: nn.Module, safe: bool = False, allow_tied: bool = False) -> nn.Module:
    """Merges every LoRA layer and puts the original module classes back (nn.Linear,
    nn.Embedding, transformers Conv1D) holding the merged weights: the result has the base
    model's structure and state_dict keys (and an nn.TransformerEncoder its use_nested_tensor,
    which inject turned off). Returns ``model`` (or the new module, if ``model``
    is itself a LoRA layer). No side information is kept. ``safe`` and ``allow_tied`` as in
    :func:`merge`."""
    layers = _layers_of(model, "merge_and_unload")
    pending = {n: m for n, m in layers.items() if not m.merged}
    if not allow_tied:
        _check_tied(model, pending)
    _check_all(pending, finite=safe)
    for m in layers.values():
        if not m.merged:
            merge_layer(m, exact=False)
        m.drop_merge_state()  # merged bits are the same either way
    if "" in layers:
        return layers[""].unwrapped() if isinstance(layers[""], LoRAParameter) else layers[""].base_module()
    outer = outermost(model)
    where_is = registrations(model)  # (a layer registered in several places is put back in each)
    for name, m in layers.items():
        if isinstance(m, LoRAParameter) and name not in outer:  # the outermost wrapper gives way to the module
            continue
        base = m.unwrapped() if isinstance(m, LoRAParameter) else m.base_module()
        for parent, child in where_is[id(m)]:
            setattr(parent, child, base)
    for m in model.modules():  # inject turned an nn.TransformerEncoder's nested tensors off
        if NESTED_KEY in m.__dict__:
            m.use_nested_tensor = m.__dict__.pop(NESTED_KEY)
    return model
