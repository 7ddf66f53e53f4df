"""AdapterPool's checks of an adapter against the pool's layers, before anything changes, and of the
model; the rows an encoder-decoder model's encoder sees (watch_encoder)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .adapter_checks import check_modules_to_save
from .adapters import Adapter, extra_target
from .layers import LoRALayer
from .multi import ContextLayer, LoRAContext, MultiLoRAEmbedding
from .multi_experts import expert_factors
from .targets import first_peft_layer

__all__ = ["check_adapter", "check_model", "watch_encoder"]


def check_model(model: nn.Module) -> None:
    """ValueError naming the layer when ``model`` holds LoRA that is not the pool's, which would apply
    to every row of a mixed batch, base rows included: an unmerged injected lora_ext layer, or any PEFT
    layer (its "all-linear" would also wrap PEFT's lora_A / lora_B as base layers)."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer) and not getattr(m, "merged", False):
            raise ValueError(f"AdapterPool: {type(model).__name__} has an injected {type(m).__name__} {name!r} (not "
                             "merged), whose adapter would apply to every row of a mixed batch, base rows included: "
                             "merge it into the model first (lora_ext.merge_and_unload), or build the pool on the "
                             "model without it")
    if (name := first_peft_layer(model)) is not None:
        raise ValueError(f"AdapterPool: {type(model).__name__} has PEFT's {type(model.get_submodule(name)).__name__} "
                         f"layer {name!r}, whose "
                         "adapter would apply to every row of a mixed batch, base rows included: build the pool on "
                         "the base model (PeftModel.unload() or merge_and_unload()), or serve PEFT's adapters "
                         "with lora_ext.patch_peft(model) and adapter_names")


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


def watch_encoder(model: nn.Module, context: LoRAContext) -> None:
    """Hooks on an encoder-decoder model's encoder (T5, BART): generate(num_beams=k) / num_return_sequences=k
    run it on the original rows, the decoder on each row k times; with each name repeated k times the
    encoder takes every k-th one (PEFT's generate(adapter_names=...) gives its encoder the original names)."""
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not callable(get_encoder):
        return
    encoder, saved = get_encoder(), {}  # saved: the batch's indices while the encoder runs on fewer rows
    if isinstance(encoder, nn.Module) and any(isinstance(m, ContextLayer) for m in encoder.modules()):
        encoder.register_forward_pre_hook(functools.partial(_encoder_rows, context, saved), with_kwargs=True)
        encoder.register_forward_hook(functools.partial(_encoder_done, context, saved), always_call=True)


_ENCODER_INPUTS = ("input_ids", "inputs_embeds", "input_features", "input_values", "pixel_values")


def _encoder_rows(context: LoRAContext, saved: dict, encoder: nn.Module, args, kwargs) -> None:
    if torch.compiler.is_compiling() or not context.per_row or context.count is None:
        return  # compiled: rows that differ from the names are out-of-range indices, as in any layer
    x = next((t for t in (*args[:1], *map(kwargs.get, _ENCODER_INPUTS)) if t is not None), None)
    n = context.count
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else n
    if rows in (0, n) or n % rows or not n:  # the layers check the rows
        return
    k, full = n // rows, context.indices[:n].clone()
    if not bool((full.view(rows, k) == full.view(rows, k)[:, :1]).all()):
        raise ValueError(f"AdapterPool.batch: the encoder ({type(encoder).__name__}) gets {rows} rows and the batch "
                         f"has {n} names; generate(num_beams={k}) / num_return_sequences={k} run the encoder on the "
                         f"original rows and the decoder on each row {k}x: pass each row's name {k} times, one "
                         f"after the other ([n for n in names for _ in range({k})])")
    saved["indices"] = full
    context.set_indices(full[::k].clone(), per_row=True)


def _encoder_done(context: LoRAContext, saved: dict, encoder: nn.Module, args, out) -> None:
    full = saved.pop("indices", None)
    if full is not None:  # the decoder's rows: each name k times
        context.set_indices(full, per_row=True)
