"""AdapterPool's checks of an adapter against the pool's layers, before anything changes."""
from __future__ import annotations

import torch

from .adapter_checks import check_modules_to_save
from .adapters import Adapter, extra_target
from .multi import MultiLoRAEmbedding
from .multi_experts import expert_factors

__all__ = ["check_adapter"]


def check_adapter(pool, name: str, ad: Adapter, source: str | None) -> None:
    """ValueError naming the adapter (and its file) and the module unless every layer of ``ad`` fits
    ``pool`` (an AdapterPool): LoRA factors only, of targets the pool serves, ranks <= max_rank,
    DoRA only in a dora=True pool, experts' factors only for its target_parameters."""
    where = f"AdapterPool.load({name!r}{'' if source is None else ', ' + repr(source)})"
    # per-request serving covers the LoRA factors only; never drop trained tensors (but PEFT
    # also saves a targeted embedding's unchanged table: equal to the model's, nothing to apply)
    changed = sorted(k for k, t in ad.extra.items() if not _same_as_model(pool, k, t))
    if changed:
        raise ValueError(f"{where}: the adapter carries non-LoRA tensors (modules_to_save or trained "
                         f"biases: {changed[:3]}{' ...' if len(changed) > 3 else ''}) that a shared pool "
                         "cannot apply per request; use lora_ext.load_adapter")
    # a modules_to_save entry with no tensors in the file (PEFT: KeyError) is not the base's to serve
    check_modules_to_save(where, ad.config, ad.extra, pool.model, set(pool.layers))
    dora = sorted(n for n, w in ad.layers.items() if w.magnitude is not None)
    if (dora or ad.config.get("use_dora")) and not pool.dora:
        what = f"module {dora[0]!r} has a lora_magnitude_vector" if dora else "its config says use_dora=true"
        raise ValueError(f"{where}: the adapter is DoRA ({what}) and the pool was built without dora=True "
                         "(AdapterPool(..., dora=True) serves DoRA and plain adapters in one batch)")
    expert_factors(where, ad, pool.experts, pool.max_rank)
    for mod, w in ad.layers.items():
        layer = pool.layers.get(mod)
        if w.kind == "parameter":
            continue
        if w.kind == "conv":
            raise ValueError(f"{where}: module {mod!r} holds convolution LoRA factors (A {tuple(w.A.shape)}): "
                             "multi-adapter serving has no convolution layers; use lora_ext.load_adapter")
        if w.kind == "embedding" and w.magnitude is not None:
            raise ValueError(f"{where}: module {mod!r} is a DoRA embedding (lora_magnitude_vector "
                             f"{tuple(w.magnitude.shape)}): multi-adapter serving has no embedding DoRA "
                             "(MultiLoRAEmbedding); use lora_ext.load_adapter, or merge the adapter")
        if layer is None:
            raise ValueError(f"{where}: module {mod!r} is not served by this pool "
                             f"(pool targets e.g. {sorted(pool.layers)[:3]})")
        if (w.kind == "embedding") != isinstance(layer, MultiLoRAEmbedding):
            raise ValueError(f"{where}: module {mod!r} ({type(layer.base).__name__}) cannot take {w.kind} weights")
        if not 1 <= w.r <= pool.max_rank:
            raise ValueError(f"{where}: module {mod!r} has rank {w.r}; the pool takes 1 .. max_rank {pool.max_rank}")
        if tuple(w.A.shape) != (w.r, layer.in_features) or tuple(w.B.shape) != (layer.out_features, w.r):
            raise ValueError(f"{where}: module {mod!r} is {layer.in_features} -> {layer.out_features}, "
                             f"the adapter has A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")


def _same_as_model(pool, key: str, t: torch.Tensor) -> bool:
    """Whether extra tensor `key` (PEFT's name less the prefix) equals the served model's."""
    mod, leaf = extra_target(key)
    # a served module's own tensors live on its base layer (PEFT names them base_layer.*)
    m = pool.layers[mod].base if mod in pool.layers else dict(pool.model.named_modules()).get(mod)
    old = getattr(m, leaf, None)
    return (isinstance(old, torch.Tensor) and old.shape == t.shape
            and torch.equal(old.detach(), t.to(old.device, old.dtype)))
