"""Model surgery: put LoRA layers into any nn.Module, choose what trains, export PEFT-named state.

    names = lora_ext.inject(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16)
    lora_ext.mark_only_lora_trainable(model)
    sd = lora_ext.lora_state_dict(model)   # {"base_model.model.<path>.lora_A.weight": ...}
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .layers import LoRAEmbedding, LoRALinear, is_conv1d

__all__ = ["inject", "mark_only_lora_trainable", "lora_state_dict", "lora_layers", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
LORA_TYPES = (LoRALinear, LoRAEmbedding)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def _matches(name: str, target) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _pattern_value(name: str, pattern: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern: the first key whose regex matches the end of the name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def inject(model: nn.Module, target_modules: str | Iterable[str] = ("q_proj", "v_proj"), r: int = 8,
           alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
           rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
           init: str = "kaiming", exclude_modules: str | Iterable[str] | None = None) -> list[str]:
    """Replaces the target modules of ``model`` in place by LoRA layers; returns their names.

    target_modules: a list of module-name suffixes (``"q_proj"`` matches ``...attn.q_proj``), a
    regex matched against the full name, or ``"all-linear"`` (every Linear/Conv1D but the output
    head). Targets must be nn.Linear, transformers Conv1D or nn.Embedding. rank_pattern /
    alpha_pattern map name regexes to per-module r / alpha, as in PEFT.
    """
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n, m in model.named_modules()
                  if (isinstance(m, nn.Linear) or is_conv1d(m)) and n not in heads]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        chosen = [n for n, m in model.named_modules()
                  if n and not isinstance(m, LORA_TYPES) and _matches(n, target_modules)]
        # a LoRA layer's own children (none today) or nested matches: keep outermost only
        chosen = [n for n in chosen if not any(n.startswith(p + ".") for p in chosen if p != n)]
    if exclude_modules is not None:
        excl = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [n for n in chosen if not _matches(n, excl)]
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m)})
        raise ValueError(f"inject: target_modules={target_modules!r} matched no module of "
                         f"{type(model).__name__}; Linear/Conv1D/Embedding names there: {leaves}")
    modules = dict(model.named_modules())
    for name in chosen:
        m = modules[name]
        rr = _pattern_value(name, rank_pattern, r)
        aa = _pattern_value(name, alpha_pattern, alpha)
        try:
            if isinstance(m, nn.Linear) or is_conv1d(m):
                new = LoRALinear.from_linear(m, rr, aa, dropout, use_rslora, init)
            elif isinstance(m, nn.Embedding):
                new = LoRAEmbedding.from_embedding(m, rr, aa, use_rslora)
            else:
                raise TypeError(f"inject: module {name!r} is a {type(m).__name__}; LoRA targets must "
                                "be nn.Linear, transformers Conv1D or nn.Embedding")
        except ValueError as e:
            raise ValueError(f"inject: module {name!r}: {e}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> LoRA layer (LoRALinear / LoRAEmbedding) of an injected model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only for LoRA parameters; bias="all" adds every bias, "lora_only" the LoRA layers'."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_trainable: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n.split(".")[-1])
    if bias == "all":
        for n, p in model.named_parameters():
            if n.split(".")[-1] == "bias":
                p.requires_grad_(True)
    elif bias == "lora_only":
        for m in lora_layers(model).values():
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """LoRA weights under HF PEFT's saved key names (adapter name stripped)."""
    out = {}
    for name, m in lora_layers(model).items():
        if isinstance(m, LoRALinear):
            out[f"{prefix}{name}.lora_A.weight"] = m.lora_A.detach()
            out[f"{prefix}{name}.lora_B.weight"] = m.lora_B.detach()
        else:
            out[f"{prefix}{name}.lora_embedding_A"] = m.lora_embedding_A.detach()
            out[f"{prefix}{name}.lora_embedding_B"] = m.lora_embedding_B.detach()
    return out
