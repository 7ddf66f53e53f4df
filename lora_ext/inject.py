"""Model surgery: put LoRA layers into any nn.Module, choose what trains, export PEFT-named state.

    names = lora_ext.inject(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16)
    lora_ext.mark_only_lora_trainable(model)
    sd = lora_ext.lora_state_dict(model)   # {"base_model.model.<path>.lora_A.weight": ...}
    sd = lora_ext.lora_state_dict(model, peft_names=False)  # {"<path>.lora_A": ...}, model.state_dict() names
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .conv import LoRAConvNd, check_conv_base, is_conv
from .embedding import LoRAEmbedding
from .layers import LoRALayer, LoRALinear, is_conv1d
from .hparams import _check_hparams
from .param_lora import (LoRAParameter, _chain, _inner, apply_plan, check_init, outermost, parameter_layers,
                         plan_parameters, target_hparams)
from .sharding import sharding_of, unwrapped, wrapper_free_name
from .targets import (PEFT_PREFIX, check_layers, check_patterns, check_regex, first_peft_layer, in_layers, matches,
                      read_directly, select_targets, served_layer, unwrappable)

__all__ = ["inject", "mark_only_lora_trainable", "lora_state_dict", "lora_layers", "peft_parameter_layers", "PEFT_PREFIX"]


def join_name(*parts: str) -> str:
    """A module's name and the names under it, dot-joined as named_modules() / state_dict() do: the
    root module's name "" adds no dot (a model that is a LoRA layer itself: "lora_A", not ".lora_A")."""
    return ".".join(p for p in parts if p)


def inject(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
           alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
           rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
           init: str = "kaiming", exclude_modules: str | Iterable[str] | None = None,
           layers_to_transform: int | list[int] | None = None,
           layers_pattern: str | list[str] | None = None, use_dora: bool = False,
           target_parameters: Iterable[str] | None = None) -> list[str]:
    """Replaces the target modules of ``model`` in place by LoRA layers; returns their names.

    target_modules None: ("q_proj", "v_proj"), or none at all when target_parameters is given.
    target_parameters: PEFT's, LoRA on parameters such as MoE expert stacks
    ("mlp.experts.gate_up_proj"; lora_ext.param_lora.inject_parameters, with r, alpha, use_rslora,
    rank_pattern, alpha_pattern and init; no dropout or DoRA there, as in PEFT); their names
    follow the modules' in the returned list.

    target_modules: a list of module-name suffixes (``"q_proj"`` matches ``...attn.q_proj``), a
    regex matched against the full name, or ``"all-linear"`` (every Linear/Conv1D but the output
    head; no convolutions, as in PEFT). Targets must be nn.Linear, transformers Conv1D, nn.Embedding
    or nn.Conv1d/2d/3d (LoRAConvNd, PEFT's conv LoRA; grouped: r divisible by groups). rank_pattern /
    alpha_pattern map name regexes to per-module r / alpha, as in PEFT. layers_to_transform (an
    int or a list of ints) / layers_pattern (str or list: the layer list's name, e.g. "layers"),
    with a list of target_modules only: PEFT's selection of layers (targets.in_layers; a
    target_modules entry that is a full module name is taken in any layer, as PEFT does).
    nn.MultiheadAttention's out_proj is refused (TypeError; "all-linear" leaves it out): the
    attention reads its weight directly, so LoRA there would never run. So are targets with hooks
    and subclasses whose forward differs from the plain layer's (targets.unwrappable; "all-linear"
    leaves them out). LoRA layers put into an nn.TransformerEncoderLayer keep it off torch's fused
    inference path, which reads linear1/linear2.weight directly (see _no_fused_encoder).
    use_dora: DoRA on every target, Linear/Conv1D, Conv1d/2d/3d and Embedding (PEFT's use_dora;
    lora_ext.dora, lora_ext.conv, lora_ext.embedding).
    """
    wrapped = sharding_of(model)
    if wrapped is not None:  # DDP would not all-reduce factors added now; FSDP/TP shards are in place
        raise ValueError(f"inject: the model is already {wrapped}; inject the LoRA layers "
                         "first, then wrap or shard (lora_ext.distributed)")
    check_patterns("inject", rank_pattern, alpha_pattern)
    if (served := served_layer(model)) is not None:
        kind = type(model.get_submodule(served)).__name__
        raise ValueError(f"inject: {type(model).__name__} is served ({served!r} is a {kind}): a LoRA layer injected "
                         "now would add its adapter to every row of a mixed batch, base rows included; load adapters "
                         "into the pool (AdapterPool.load), or inject into the model before serving it")
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":  # as PEFT, any case
        target_modules = "all-linear"
    if target_parameters is not None:  # everything checked before the model changes
        if dropout or use_dora:
            raise ValueError("inject: target_parameters does not work with " + ("dropout" if dropout else "use_dora=True")
                             + " (the LoRA term is folded into the parameter, as in PEFT); inject those separately")
        _check_hparams("inject", r, alpha, dropout)
        check_init(init)
        skip = ()
        if target_modules:
            check_regex("inject", "target_modules", target_modules)
            layers, pattern = check_layers("inject", layers_to_transform, layers_pattern, target_modules,
                                           allow_negative=False)
            skip = set(select_targets(model, target_modules, exclude_modules, layers, pattern))
        plan = plan_parameters(model, target_parameters, r, alpha, rank_pattern, alpha_pattern, skip)
        chosen = [] if not target_modules else inject(
            model, target_modules, r, alpha, dropout, use_rslora, rank_pattern, alpha_pattern, init,
            exclude_modules, layers_to_transform, layers_pattern, use_dora)
        chosen += apply_plan(model, plan, use_rslora, init)
        _no_fused_encoders(model)
        return chosen
    if target_modules is None:
        target_modules = ("q_proj", "v_proj")
    check_regex("inject", "target_modules", target_modules)
    check_regex("inject", "exclude_modules", exclude_modules)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    check_init(init)  # (an embedding takes no init: checked here, not when the first linear is built)
    layers, pattern = check_layers("inject", layers_to_transform, layers_pattern, target_modules, allow_negative=False)
    chosen = select_targets(model, target_modules, exclude_modules, layers, pattern)
    modules = dict(model.named_modules())
    problems = {n: unwrappable(modules[n]) for n in chosen
                if isinstance(modules[n], (nn.Linear, nn.Embedding)) or is_conv1d(modules[n]) or is_conv(modules[n])}
    for n in chosen:  # the module a LoRAParameter wraps: the wrapper's forward reads its parameters directly
        if isinstance(modules.get(n.rpartition(".")[0] if "." in n else ""), LoRAParameter) and n.endswith("base_layer"):
            problems[n] = "has a LoRAParameter (target_parameters) on its parameters; target one or the other"
    if target_modules == "all-linear":  # every Linear/Conv1D a LoRA layer can stand in for
        chosen = [n for n in chosen if problems[n] is None]
    if not chosen:
        injected = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)
                    and (target_modules == "all-linear" or matches(n, target_modules))
                    and (layers is None or n in target_modules or in_layers(n, layers, pattern))]
        if injected:
            raise ValueError(f"inject: target_modules={target_modules!r} matched only modules that are "
                             f"LoRA layers already ({', '.join(injected[:4])}{', ...' if len(injected) > 4 else ''}); "
                             "set_lora_factors / load_adapter replace their factors")
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m) or is_conv(m)})
        if leaves == [""]:  # the model itself is a layer (any target_modules): refused as "all-linear" picking it
            chosen = [""]
    if "" in chosen:
        raise TypeError(f"inject: the model itself is the target ({type(model).__name__}), which inject cannot "
                        "replace in place; wrap it with LoRALinear.from_linear / LoRAEmbedding.from_embedding / "
                        "LoRAConvNd.from_conv")
    if not chosen:
        where = "" if layers is None else f" in layers_to_transform={layers!r} (layers_pattern={layers_pattern!r})"
        raise ValueError(f"inject: target_modules={target_modules!r} matched no module of "
                         f"{type(model).__name__}{where}; Linear/Conv1D/Embedding/Conv names there: {leaves}")
    bypassed = read_directly(model)
    hparams = {}
    for name in chosen:  # every target, before anything changes
        if name in bypassed:
            raise TypeError(f"inject: module {name!r} is the out_proj of an nn.MultiheadAttention, which "
                            "reads its weight directly (F.multi_head_attention_forward): a LoRA layer there "
                            "would never run")
        if problems.get(name) is not None:
            raise TypeError(f"inject: module {name!r} {problems[name]}{_hook_advice(modules[name])}")
        hparams[name] = target_hparams(f"inject: module {name!r}", name, r, alpha, rank_pattern, alpha_pattern,
                                       dropout)
        if is_conv(modules[name]):
            check_conv_base(f"inject: module {name!r}", modules[name], hparams[name][0], use_dora)
    where_is = registrations(model)
    for name in chosen:
        m = modules[name]
        rr, aa = hparams[name]
        try:
            if isinstance(m, nn.Linear) or is_conv1d(m):
                new = LoRALinear.from_linear(m, rr, aa, dropout, use_rslora, init, use_dora=use_dora)
            elif isinstance(m, nn.Embedding):
                new = LoRAEmbedding.from_embedding(m, rr, aa, use_rslora, use_dora=use_dora)
            elif is_conv(m):
                new = LoRAConvNd.from_conv(m, rr, aa, dropout, use_rslora, init, use_dora=use_dora)
            else:
                raise TypeError(f"inject: module {name!r} is a {type(m).__name__}; LoRA targets must "
                                "be nn.Linear, transformers Conv1D, nn.Embedding or nn.Conv1d/2d/3d")
        except ValueError as e:
            raise ValueError(f"inject: module {name!r}: {e}") from None
        # every place the module is registered (named_modules() names a reused instance once)
        for parent, child in where_is[id(m)]:
            setattr(parent, child, new)
    _no_fused_encoders(model)
    return chosen


def _hook_advice(m: nn.Module) -> str:
    """The hooks of a target inject refuses for them, named, and what to do (transformers'
    gradient_checkpointing_enable registers one on the input embeddings)."""
    hooks = [getattr(h, "__qualname__", type(h).__name__) for d in (m._forward_pre_hooks, m._forward_hooks,
             m._backward_pre_hooks, m._backward_hooks) for h in d.values()]
    if not hooks:
        return ""
    return (f" ({', '.join(hooks)}); inject before registering them (transformers' gradient_checkpointing_enable / "
            "enable_input_require_grads hook the input embeddings: call them after inject), or remove them")


def registrations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute name) under which ``model`` holds it: one instance
    registered in several places (nn.Sequential(shared, act, shared)) is one layer used in each, but
    named_modules() names it once, so replacing it there only would leave the other uses unadapted."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child, m in parent._modules.items():
            if m is not None:
                out.setdefault(id(m), []).append((parent, child))
    return out


NESTED_KEY = "_lora_ext_use_nested_tensor"  # an nn.TransformerEncoder's own setting, before inject


def _no_fused_encoders(model: nn.Module) -> None:
    """Keeps LoRA layers and LoRAParameters (e.g. on self_attn.in_proj_weight, which the fused path
    reads through the wrapper, unadapted) in an nn.TransformerEncoderLayer off torch's fused
    inference path (_no_fused_encoder), and their nn.TransformerEncoder off nested tensors."""
    lora = (LoRALayer, LoRAParameter)
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):
            for m in layer.children():
                if isinstance(m, lora) and _no_fused_encoder not in m._forward_pre_hooks.values():
                    m.register_forward_pre_hook(_no_fused_encoder)
    for m in model.modules():  # their stack would hand them nested tensors (its own fused path)
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(x, lora) for x in m.layers.modules()):
            m.__dict__.setdefault(NESTED_KEY, m.use_nested_tensor)  # merge_and_unload puts it back
            m.use_nested_tensor = False  # as torch sets it for layers its fused path cannot run


def _no_fused_encoder(module: nn.Module, args) -> None:
    """Forward pre-hook of a LoRA layer inside an nn.TransformerEncoderLayer; does nothing. In eval
    under no_grad that layer runs a fused kernel with linear1/linear2.weight, skipping their
    forward (and so the LoRA term); it takes the plain path while any submodule has a hook. An
    nn.TransformerEncoder holding such layers gets use_nested_tensor=False (see inject)."""
    return None


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> LoRA layer (LoRALinear / LoRAEmbedding: any LoRALayer) of an injected model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def peft_parameter_layers(model: nn.Module) -> dict[str, LoRAParameter]:
    """PEFT's module path -> LoRAParameter, for every LoRAParameter of ``model``: PEFT nests the
    wrappers of one module's parameters in their registration order, the first innermost, so with
    n of them the k-th (0-based) is ``<module>`` + (n-1-k) x ``.base_layer``. That is the model's
    own path when inject wrapped them in one call; wrappers added by later calls nest outside, and
    get PEFT's path here (adapter files and PEFT state dicts use it)."""
    out = {}
    for name, outer in outermost(model).items():
        chain = _chain(outer)
        names = {w.parameter_name for w in chain}
        order = [p for p, _ in _inner(outer).named_parameters(recurse=False) if p in names]
        for w in chain:
            out[join_name(name, *["base_layer"] * (len(chain) - 1 - order.index(w.parameter_name)))] = w
    return out


def _check_bias(bias, where: str) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{where}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only for LoRA parameters; bias="all" adds every bias, "lora_only" the LoRA layers'.
    A model with PEFT's layers raises TypeError naming one (their factors, "lora_A.default.weight", would
    be frozen too: PEFT's get_peft_model already trains only its adapters)."""
    _check_bias(bias, "mark_only_lora_trainable")
    if (owner := first_peft_layer(model)) is not None:
        raise TypeError(f"mark_only_lora_trainable: {type(model).__name__} has PEFT's "
                        f"{type(model.get_submodule(owner)).__name__} layer {owner!r}, whose parameters it does not know (it would freeze PEFT's factors too); "
                        "get_peft_model / PeftModel.from_pretrained(..., is_trainable=True) already train only "
                        "the adapters (LoraConfig(bias=...) for biases)")
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


def trained_biases(model: nn.Module, skip=(), bias: str | None = None) -> tuple[list[tuple[str, str, torch.Tensor]], str]:
    """The biases that require grad (``mark_only_lora_trainable(bias=...)``) as (module name,
    PEFT's key less "base_model.model." — "<layer>.base_layer.bias" for a LoRA layer's own —,
    bias), and the PEFT ``bias`` mode they amount to: "none", "lora_only" (LoRA layers' biases
    only) or "all". Biases inside the modules named in ``skip`` (saved whole) are left out.
    ``bias`` "none" / "lora_only" / "all" picks no bias / the LoRA layers' / every bias instead
    of those that require grad (loralib's lora_state_dict(model, bias=...))."""
    lora, seen, out = lora_layers(model), set(), []
    for name, m in model.named_modules():
        if any(name == k or name.startswith(k + ".") for k in skip):
            continue
        b = m._parameters.get("bias")
        if not isinstance(b, torch.Tensor) or id(b) in seen:
            continue
        if b.requires_grad if bias is None else bias == "all" or (bias == "lora_only" and name in lora):
            seen.add(id(b))
            out.append((name, join_name(name, "base_layer", "bias") if name in lora else join_name(name, "bias"), b))
    only_lora = all(name in lora for name, _, _ in out)
    return out, "none" if not out else "lora_only" if only_lora else "all"


def lora_state_dict(model: nn.Module, prefix: str = PEFT_PREFIX, peft_names: bool = True,
                    bias: str | None = None) -> dict[str, torch.Tensor]:
    """LoRA weights (DoRA's magnitudes too) under HF PEFT's saved key names (adapter name stripped), or with
    peft_names=False under the model's own names (as loralib), for model.load_state_dict(sd, strict=False).
    LoRAParameter layers (target_parameters) are included: lora_A / lora_B under PEFT's nested path
    (peft_parameter_layers: "<module>.base_layer.lora_A.weight" for a module's first targeted parameter
    of two), or the model's own ("<module>.base_layer.lora_A").
    Trained biases (requires_grad, see mark_only_lora_trainable) are included as PEFT saves them
    with bias="lora_only"/"all": "<layer>.base_layer.bias" for a LoRA layer's own bias; ``bias``
    "none" / "lora_only" / "all" (loralib's argument) includes no bias / the LoRA layers' / every
    bias instead. PEFT names are those of the model inside a torch.compile / DDP wrapper (no
    "_orig_mod." or "module." in them), as PEFT and a plain model expect.
    lora_ext.load_adapter(model, sd) takes either and says when a key matches no LoRA layer.
    Module names are model.state_dict()'s: a LoRAEmbedding's factors are "<path>.lora_embedding_A" / "_B"
    (loralib's Embedding calls them lora_A / lora_B). A model that is a LoRA layer itself gets "lora_A",
    "bias" (PEFT: "base_model.model.lora_A.weight"), for model.load_state_dict; load_adapter refuses it.
    A model without lora_ext LoRA layers (none injected, or PEFT's) raises ValueError: not an empty dict."""
    if bias is not None:
        _check_bias(bias, "lora_state_dict")
    if peft_names:
        model = unwrapped(model)[0]
    out = {}

    def put(name: str, leaf: str, peft_leaf: str, t: torch.Tensor) -> None:
        # without the steps of torch's checkpoint / FSDP1 wrappers, as the model's state_dict() and PEFT name it
        out[wrapper_free_name(prefix + join_name(name, peft_leaf) if peft_names else join_name(name, leaf))] = t.detach()

    layers, params = lora_layers(model), peft_parameter_layers(model) if peft_names else parameter_layers(model)
    if not layers and not params:  # (an empty file would be saved, and load as "no adapter")
        owner = first_peft_layer(model)
        raise ValueError(f"lora_state_dict: {type(model).__name__} has no lora_ext LoRA layers" + (
            f" (PEFT's {owner!r}: peft.get_peft_model_state_dict(model) or save_pretrained save PEFT's)"
            if owner is not None else " (use lora_ext.inject first)"))
    for name, m in layers.items():
        linear = m.lora_kind != "embedding"  # PEFT: lora_A.weight for Linear and Conv layers
        # PEFT names: lora_factors() (a MergedLinear's fused-layer B); module names: the parameters
        factors = m.lora_factors()[:2] if peft_names else [getattr(m, p) for p in m.factor_names]
        for p, t in zip(m.factor_names, factors):
            put(name, p, f"{p}.weight" if linear else p, t)
        if m.use_dora:  # PEFT's key has no ".weight"
            put(name, "lora_magnitude_vector", "lora_magnitude_vector", m.lora_magnitude_vector)
    for name, m in params.items():
        for p in ("lora_A", "lora_B"):
            put(name, p, f"{p}.weight", getattr(m, p))
    for name, key, b in trained_biases(model, bias=bias)[0]:
        put("", join_name(name, "bias"), key, b)
    return out
