"""LoRA adapters on disk in HF PEFT's format, both ways.

    adapter = lora_ext.Adapter.load("path/to/adapter")      # adapter_config.json + adapter_model.safetensors
    lora_ext.load_adapter(model, adapter)                    # into an (injected or plain) model
    lora_ext.Adapter.from_model(model).save("out/")          # loads in peft.PeftModel.from_pretrained

Pickle files (adapter_model.bin) need allow_pickle=True (torch.load(weights_only=True)). Bad files
(wrong types or values, NaN/inf weights unless allow_nonfinite=True, duplicate keys, LoRA variants
lora_ext does not implement) raise ValueError / FileNotFoundError naming the file and the field or
module. DoRA magnitudes are LayerWeights.magnitude; LoRA on parameters (target_parameters: MoE expert
stacks) are kind "parameter" layers (lora_ext.param_files). load_adapter validates everything before
it touches the model. Non-LoRA tensors (modules_to_save, bias="all"/"lora_only") are Adapter.extra.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_checks import (CONFIG_FILE, LOADED_MODULES, LOADED_TABLES, SAFETENSORS_FILE, check_covered, check_dropout,
                             check_modules_to_save, check_not_root, check_path, check_saved_modules, check_targets,
                             check_tensors, config_json, config_scale, loaded_tables, read_config, read_weights, remember,
                             saved_config, split_factors, to_save)
from .conv import check_conv_factors, is_conv
from .inject import inject, lora_layers, peft_parameter_layers, trained_biases
from .layers import LoRALayer, lora_alpha_for
from .param_files import load_parameters, parameter_paths, plan_parameters, read_parameters, split_path
from .param_lora import LoRAParameter, parameter_layers
from .sharding import fsdp1_of, is_dtensor, unwrapped, wrapper_free, wrapper_free_name
from .ops._checks import F32_MAX
from .targets import PEFT_PREFIX, _short, check_not_peft, check_regex, name_regex, pattern_value, peft_config

__all__ = ["Adapter", "LayerWeights", "load_adapter"]

@dataclass
class LayerWeights:
    """One module's LoRA factors: A [r, in] and B [out, r] (embeddings: A [r, num], B [dim, r];
    convolutions, kind "conv": PEFT's A [r, in, *kernel], B [out, r, 1, ...]); a DoRA adapter's
    layers also have ``magnitude`` in PEFT's lora_magnitude_vector shape ([out]; an embedding's [dim];
    a convolution's [1, out, 1, ...]).
    Kind "parameter" (LoRA on a module's parameter, PEFT's target_parameters; lora_ext.LoRAParameter),
    keyed in Adapter.layers by PEFT's wrapper path ("...experts.base_layer"): A [E * r, in] and
    B [out, E * r] as PEFT stores them, ``num_experts`` E (1 for a 2-D parameter) and ``parameter``,
    the parameter's name ("gate_up_proj"; None when only the model tells, see lora_ext.param_files)."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str = "linear"  # or "embedding", "conv", "parameter"
    magnitude: torch.Tensor | None = None
    parameter: str | None = None
    num_experts: int = 1

    @property
    def r(self) -> int:
        """The rank (a parameter's: per expert)."""
        return self.A.shape[0] // self.num_experts


@dataclass
class Adapter:
    """A LoRA adapter: its PEFT config and the factors of every adapted module (by module path).

    extra: the other tensors of a PEFT adapter (modules_to_save, biases trained with bias="all" or
    "lora_only"), under PEFT's names less "base_model.model." (e.g. "lm_head.weight",
    "transformer.h.0.attn.c_attn.base_layer.bias"); load_adapter loads them into the model.
    """
    layers: dict[str, LayerWeights]
    config: dict = field(default_factory=dict)
    name: str | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [t for w in self.layers.values() for t in (w.A, w.B, w.magnitude) if t is not None]
        tensors += list(self.extra.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str, allow_pickle: bool = False, device="cpu", dtype=None,
             allow_nonfinite: bool = False, model: nn.Module | None = None) -> "Adapter":
        """Reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

        allow_pickle: also read adapter_model.bin (torch.load(weights_only=True)); refused by
        default. device / dtype: where and as what the tensors are returned (default: cpu, as
        saved). allow_nonfinite: accept NaN/inf weights. model: the model the adapter is for; a
        target_parameters adapter's layers are then checked against it and name their parameter
        (needed only where rank_pattern / alpha_pattern tell apart parameters nested on one module:
        lora_ext.param_files), and the modules its modules_to_save selects must have their tensors
        in the file (as load_adapter checks). Raises ValueError / FileNotFoundError naming the file,
        field or module (key) for anything lora_ext cannot run exactly as PEFT does (a scale not
        finite in float32 included)."""
        path = check_path("Adapter.load", path)
        config = read_config(os.path.join(path, CONFIG_FILE))
        file, tensors = read_weights(path, allow_pickle)
        where = f"Adapter.load: {file}"
        check_tensors(tensors, where, allow_nonfinite)
        factors, extra = split_factors(tensors, where)
        params = {}
        for name in parameter_paths(config, factors):
            A, B, kind, mag = factors.pop(name)
            if kind != "linear" or mag is not None:
                raise ValueError(f"{where}: {PEFT_PREFIX}{name}.lora_A.weight is LoRA on a parameter "
                                 f"(target_parameters), which has 2-D factors and no lora_magnitude_vector; got "
                                 f"A {tuple(A.shape)}, B {tuple(B.shape)}" + ("" if mag is None else " and a magnitude"))
            params[name] = (A, B)
        check_targets(f"Adapter.load: {os.path.join(path, CONFIG_FILE)}", config, factors, os.path.basename(file), extra)
        read = read_parameters(where, config, params, None if model is None else unwrapped(model)[0])
        conv = (lambda t: t.to(device=device, dtype=dtype if dtype and t.is_floating_point() else t.dtype))
        layers = {}
        dora = bool(config.get("use_dora"))
        for name, (A, B, kind, mag) in factors.items():
            r_cfg = pattern_value(name, config.get("rank_pattern"), config["r"])
            if A.shape[0] != r_cfg:
                raise ValueError(f"{where}: module {name!r} has rank {A.shape[0]} but the config says r={r_cfg}")
            if dora != (mag is not None):  # PEFT would drop the magnitude, or make one from the norm
                raise ValueError(f"{where}: module {name!r} " + (
                    "has no lora_magnitude_vector but the config says use_dora=true" if dora else
                    "has a lora_magnitude_vector (DoRA) but the config says use_dora=false"))
            layers[name] = LayerWeights(conv(A), conv(B), config_scale(name, A.shape[0], config), kind,
                                        None if mag is None else conv(mag))
        for name, (A, B, scale, pname, experts) in read.items():
            layers[name] = LayerWeights(conv(A), conv(B), scale, "parameter", parameter=pname, num_experts=experts)
        _check_scales(f"Adapter.load: {os.path.join(path, CONFIG_FILE)}", layers, config)
        if model is not None:
            inner = unwrapped(model)[0]
            check_modules_to_save(f"Adapter.load: {file}", config, extra, inner, _lora_names(layers, inner))
        return cls(layers, config, name=os.path.basename(os.path.normpath(path)),
                   extra={k: conv(t) for k, t in extra.items()})

    @classmethod
    def from_model(cls, model: nn.Module, modules_to_save=None) -> "Adapter":
        """The LoRA factors of an injected model (detached copies) with a matching PEFT config.
        Trained biases (requires_grad) go into ``extra`` under PEFT's names, and the config's
        ``bias`` says "lora_only" or "all" as PEFT would. ``modules_to_save`` (PEFT's: module-name
        suffixes or a regex, e.g. ["classifier"] or ["lm_head"]): those modules' parameters are
        saved whole (``extra``) and listed in the config, so PEFT and load_adapter restore them;
        None: those of the adapters load_adapter put into the model (their config's list), if any.
        A torch.compile / DDP wrapper is looked through: module names are those of the model inside.
        LoRAParameter layers (target_parameters) are kind "parameter" layers under PEFT's nested paths
        (inject.peft_parameter_layers) and the config's target_parameters."""
        model = unwrapped(model)[0]
        modules_to_save = model.__dict__.get(LOADED_MODULES) if modules_to_save is None else modules_to_save
        found, params = lora_layers(model), peft_parameter_layers(model)
        if not found and not params:
            raise ValueError(f"Adapter.from_model: {type(model).__name__} has no LoRA layers (use lora_ext.inject)")
        if (wrapped := fsdp1_of(model)) is not None:
            raise ValueError(f"Adapter.from_model: {wrapped} is wrapped in FSDP1's FullyShardedDataParallel, whose "
                             "parameters are flattened shards here; call it before wrapping (or use fully_shard)")
        layers = {}
        dora_layers(found, "Adapter.from_model")
        for name, m in [*found.items(), *params.items()]:
            A, B, scale = m.lora_factors() if isinstance(m, LoRALayer) else (m.lora_A, m.lora_B, m.scaling)
            if is_dtensor(A) or is_dtensor(B):
                raise ValueError(f"Adapter.from_model: the factors of {name!r} are sharded (DTensor: "
                                 "fully_shard / tensor parallel); use lora_ext.distributed.save_adapter, "
                                 "which gathers them (a collective: call it on every rank)")
            layers[name] = layer_weights(m, A.detach().clone(), B.detach().clone(),
                                         m.lora_magnitude_vector.detach().clone() if getattr(m, "use_dora", False) else None)
        config = model_config(wrapper_free(found), model, wrapper_free(params), "Adapter.from_model")
        extra, config["bias"], kept = saved_tensors(
            model, {**found, **parameter_layers(model)}, modules_to_save, lambda t: t.detach().clone(),
            "Adapter.from_model")
        config["modules_to_save"] = kept and [wrapper_free_name(n) for n in kept]
        return cls(wrapper_free(layers), config, extra=wrapper_free(extra))

    # ---------------------------------------------------------------- writing
    def save(self, path: str) -> None:
        """Writes adapter_config.json + adapter_model.safetensors (PEFT key names; a "parameter" layer's
        under its PEFT wrapper path, e.g. "...experts.base_layer.lora_A.weight")."""
        from safetensors.torch import save_file

        config = saved_config(self.layers, self.config, "Adapter.save")  # (checked before any file)
        os.makedirs(path, exist_ok=True)
        tensors = {}
        for name, w in self.layers.items():
            if w.kind != "embedding":  # Linear and Conv layers: lora_A.weight / lora_B.weight
                tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = w.A.contiguous()
                tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = w.B.contiguous()
            else:
                tensors[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = w.A.contiguous()
                tensors[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = w.B.contiguous()
            if w.magnitude is not None:
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = w.magnitude.contiguous()
        tensors.update({PEFT_PREFIX + k: t.contiguous() for k, t in self.extra.items()})
        config = config_json({"peft_type": "LORA", **config}, "Adapter.save")  # (checked before any file)
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, os.path.join(path, SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            f.write(config)


def extra_target(key: str) -> tuple[str, str]:
    """(module path, attribute) an Adapter.extra key names: PEFT's "<layer>.base_layer.bias" is
    the adapted layer's own bias ("<layer>", "bias")."""
    mod, _, leaf = key.replace(".base_layer.", ".").rpartition(".")
    return mod, leaf


def layer_weights(m: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None) -> LayerWeights:
    """The LayerWeights of LoRA layer ``m`` (a LoRALayer or a LoRAParameter) with factors A, B
    (copies of its lora_factors() / lora_A, lora_B) and DoRA magnitude."""
    if isinstance(m, LoRAParameter):
        return LayerWeights(A, B, float(m.scaling), "parameter", parameter=m.parameter_name, num_experts=m.num_experts)
    return LayerWeights(A, B, float(m.scaling), m.lora_kind, magnitude)


def model_config(found: dict[str, nn.Module], model: nn.Module, params: dict[str, LoRAParameter] | None = None,
                 where: str = "save") -> dict:
    """The PEFT config of LoRA layers ``found`` and LoRAParameter layers ``params`` (PEFT paths:
    inject.peft_parameter_layers) of ``model`` (Adapter.from_model, distributed.save_adapter): its
    target_modules / target_parameters select exactly them in ``model`` (peft_config).
    The config has one use_rslora: a layer scaled the other way gets the alpha that gives its own
    scaling under the config's rule (written to alpha_pattern by peft_config). PEFT refuses
    target_parameters with lora_dropout, use_dora or fan_in_fan_out, which are one field for the
    whole adapter: LoRA layers using them and parameter layers in one model raise ValueError (``where``)."""
    check_not_root(found, model, where)
    params = params or {}
    root = next((m for n, m in params.items() if not split_path(n)[0]), None)
    if root is not None:  # PEFT: "Targeting an nn.Parameter on the top-level module is not supported"
        raise ValueError(f"{where}: LoRAParameter {root.parameter_name!r} wraps the model itself, and PEFT cannot "
                         "target a parameter of the top-level module: wrap the model in a module (nn.Sequential) first")
    layers = {**found, **{f"{split_path(n)[0]}.{m.parameter_name}": m for n, m in params.items()}}
    rslora = any(m.use_rslora for m in layers.values())
    dora = dora_layers(found, where)
    ranks = {n: m.lora_rank if isinstance(m, LoRALayer) else m.r for n, m in layers.items()}  # a MergedLinear's: k·r
    alphas = {n: m.lora_alpha if bool(m.use_rslora) == rslora and ranks[n] == m.r else
              lora_alpha_for(float(m.scaling), ranks[n], rslora) for n, m in layers.items()}
    fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in found.values())
    dropout = max(drops := {float(m.lora_dropout) for m in found.values() if hasattr(m, "lora_dropout")}, default=0.0)
    if len(drops) > 1:  # (layers load_adapter injects from the file all get the config's)
        warnings.warn(f"{where}: the LoRA layers have different lora_dropout {sorted(drops)}, and PEFT's config "
                      f"has one: saved as {dropout:g}, which every layer loaded from it trains with", stacklevel=3)
    if params and (dora or fan_in_fan_out or dropout):
        what = "use_dora" if dora else "fan_in_fan_out (transformers Conv1D)" if fan_in_fan_out else f"lora_dropout={dropout:g}"
        layer = next(n for n, m in found.items() if m.use_dora or getattr(m, "fan_in_fan_out", False)
                     or getattr(m, "lora_dropout", 0.0))
        raise ValueError(f"{where}: LoRA layer {layer!r} needs {what} in the adapter config, which PEFT refuses with "
                         f"target_parameters (LoRAParameter layers, e.g. {next(iter(params))!r}): one PEFT adapter cannot "
                         "hold both" + (" (dropout is for training only: set those layers' lora_dropout to 0 to save "
                                        "them)" if what.startswith("lora_dropout") else ""))
    return peft_config(ranks, alphas, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out, lora_dropout=dropout,
                       model=model, use_dora=dora, parameters=[n for n in layers if n not in found])


def dora_layers(found: dict[str, nn.Module], where: str) -> bool:
    """Whether the LoRA layers ``found`` are DoRA (PEFT's use_dora is one flag for the adapter):
    all or none, else ValueError naming one of each."""
    dora = sorted(n for n, m in found.items() if m.use_dora)
    if dora and len(dora) != len(found):
        plain = sorted(set(found) - set(dora))
        raise ValueError(f"{where}: {dora[0]!r} is a DoRA layer but {plain[0]!r} is not; a PEFT adapter "
                         "config has one use_dora for all its modules (save them as two adapters)")
    return bool(dora)


def saved_tensors(model: nn.Module, found: dict, modules_to_save, copy, where: str):
    """(Adapter.extra, PEFT ``bias`` mode, ``modules_to_save`` list or None) of a model with LoRA
    layers ``found`` (LoRAParameter wrappers too, so that no module_to_save is one or inside one): the state dicts of the modules matching ``modules_to_save`` (PEFT's rule:
    adapter_checks.to_save; LoRA layers excluded), saved whole, and the trained biases
    outside them, each through copy(tensor). Warns for a module whose bias would be saved
    without its other trainable parameters (a head trained like PEFT's modules_to_save)."""
    keep = []
    if modules_to_save is not None:
        check_regex(where, "modules_to_save", modules_to_save)
        targets = modules_to_save if isinstance(modules_to_save, str) else list(modules_to_save)
        keep = [n for n, _ in model.named_modules() if n and n not in found and to_save(n, targets)
                and not any(n.startswith(k + ".") for k in found)]
        keep = [n for n in keep if not any(n.startswith(k + ".") for k in keep if k != n)]
        check_saved_modules(where, modules_to_save, keep, found, model)
    modules = dict(model.named_modules())
    extra = {f"{n}.{k}": copy(t) for n in keep for k, t in modules[n].state_dict(keep_vars=True).items()}
    trained, mode = trained_biases(model, skip=keep)
    extra.update({key: copy(b) for _, key, b in trained} | loaded_tables(model, found, copy, where))
    # trained weights the file would lose (a head trained beside the LoRA layers): only a bias saved, or in a mostly
    # frozen base (an unfrozen one, as after inject alone, is not "trained"), any; (n, names) -> n is or is inside one
    inside, with_bias = lambda n, names: any(n == k or n.startswith(k + ".") for k in names), {t[0] for t in trained}
    base = [p for n, m in modules.items() if not inside(n, found) for p in m.parameters(recurse=False)]
    frozen = 2 * sum(p.numel() for p in base if not p.requires_grad) > sum(p.numel() for p in base)
    half = sorted(n for n, m in modules.items() if (frozen or n in with_bias and n not in found) and not inside(n, keep) and any(
        p.requires_grad for pn, p in m.named_parameters(recurse=False) if pn != "bias" and not (n in found and "lora_" in pn)))
    if half:
        warnings.warn(f"{where}: {half[:4]}{' ...' if len(half) > 4 else ''} have trainable weights that "
                      "are not saved (only LoRA factors and biases are); pass modules_to_save=[...] to save "
                      "those modules, or freeze them (lora_ext.mark_only_lora_trainable)", stacklevel=3)
    return extra, mode, keep or None


def load_adapter(model: nn.Module, adapter: Adapter | dict[str, torch.Tensor]) -> list[str]:
    """Copies an adapter into a model; injects LoRA layers where the model has none yet.

    adapter: an Adapter, a PEFT adapter directory (Adapter.load; it must cover every LoRA layer the model has), or a
    lora_state_dict (PEFT or module names) for LoRA layers the model has (no alpha: they keep scaling and rank).
    Every module is validated (exists, right type, shapes fit) before anything changes, so a
    mismatched adapter leaves the model untouched. A LoRA layer of another rank is resized.
    Adapter.extra tensors (modules_to_save, biases: bias="all"/"lora_only" ones trainable) replace the model's, as PEFT.
    Layers it injects take the config's ``lora_dropout`` and ``use_rslora`` (as PEFT's
    ``from_pretrained``), so training resumes as it ran; layers the model has keep theirs.
    "parameter" layers (target_parameters) go into the model's LoRAParameter wrappers (another rank
    resizes them; merged ones take it merged), or wrappers are injected, nested as PEFT's; each must fit its
    parameter (lora_A [E * r, in], lora_B [out, E * r]), and every parameter the config's
    target_parameters select must have factors (lora_ext.param_files.plan_parameters).
    A torch.compile / DDP wrapper is looked through (module names are those of the model inside;
    a state dict's keys may also carry the wrapper's "_orig_mod." / "module." prefix).
    Returns the names of the modules loaded (a parameter layer's: its PEFT wrapper path).
    """
    wrapper, (model, prefix) = model, unwrapped(model)
    if isinstance(adapter, (str, os.PathLike)):  # a whole adapter: it sets every LoRA layer of the model
        adapter = Adapter.load(check_path("load_adapter", adapter), model=model)
        check_covered(f"load_adapter: adapter {adapter.name}", adapter.layers, model)
    elif not isinstance(adapter, (Adapter, dict)):
        raise TypeError(f"load_adapter: adapter must be an Adapter, an adapter directory (str / os.PathLike) "
                        f"or a LoRA state dict, got {type(adapter).__name__}")
    if isinstance(adapter, dict):
        adapter = _from_state_dict(model, {_inner_key(k, prefix): t for k, t in adapter.items()})
    dropout, rslora = _injected_hparams(adapter)
    where = f"load_adapter: adapter {adapter.name or ''}"
    _check_scales(where, adapter.layers, adapter.config)
    check_modules_to_save(where, adapter.config, adapter.extra, model, _lora_names(adapter.layers, model))
    modules = dict(model.named_modules())
    params = plan_parameters(model, {n: w for n, w in adapter.layers.items() if w.kind == "parameter"},
                             adapter.config, f"load_adapter: adapter {adapter.name or ''}")
    plan = []
    for name, w in adapter.layers.items():
        if w.kind == "parameter":
            continue
        m = modules.get(name)
        if m is None:
            peft = f" (a PeftModel: it has {PEFT_PREFIX + name!r}; lora_ext loads into the plain model)"
            raise ValueError(f"load_adapter: the model has no module {name!r} (adapter {adapter.name or ''} targets "
                             f"{sorted(adapter.layers)[:4]}...){peft if PEFT_PREFIX + name in modules else ''}")
        kind, want = _kind_and_size(m)
        wanted = w.kind if w.kind in ("embedding", "conv") else "linear"
        if kind != wanted:
            check_not_peft("load_adapter", modules, name, ValueError)
            raise ValueError(f"load_adapter: module {name!r} is a {type(m).__name__}, the adapter holds {wanted} weights")
        if kind == "conv":  # kernel shapes and groups too (PEFT's lora_A / lora_B conv weights)
            check_conv_factors(f"load_adapter: module {name!r}", m, w.A, w.B)
        got = (w.A.shape[1], w.B.shape[0])
        if want != got:
            raise ValueError(f"load_adapter: module {name!r} is {want[0]} -> {want[1]} but the adapter's "
                             f"factors are A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")
        if isinstance(m, LoRALayer):  # what the layer can hold (a MergedLinear: B zero outside its slices)
            try:
                m.lora_factors_of(w.A, w.B)
            except ValueError as e:
                raise ValueError(f"load_adapter: module {name!r}: {e}") from None
            if w.magnitude is not None and not m.use_dora:
                raise ValueError(f"load_adapter: module {name!r} is a LoRA layer without DoRA but the adapter is "
                                 "DoRA (use_dora); inject with use_dora=True, or load into the plain model")
        plan.append((name, m, w))
    for key, t in adapter.extra.items():
        mod, leaf = extra_target(key)
        old = getattr(modules.get(mod), leaf, None)
        if not isinstance(old, torch.Tensor) or old.shape != t.shape:
            raise ValueError(f"load_adapter: adapter {adapter.name or ''} holds {key} {tuple(t.shape)} "
                             f"(modules_to_save or a bias) but the model has "
                             f"{tuple(old.shape) if isinstance(old, torch.Tensor) else 'no such tensor'}")
        if not _in_state_dict(modules[mod], leaf):  # PEFT's load_state_dict(strict=False) skips it
            raise ValueError(f"load_adapter: adapter {adapter.name or ''} holds {key} {tuple(t.shape)}, which "
                             f"is not a parameter or persistent buffer of the model (PEFT would not load it)")
        if leaf == "weight" and isinstance(modules[mod], LoRALayer) and modules[mod]._merged_for_good():
            raise ValueError(f"{where} holds {key}, but {mod!r} is merged for good (drop_merge_state / "
                             "merge_and_unload), so its weight cannot be replaced")
    for name, m, w in plan:
        if not isinstance(m, LoRALayer):
            # through the wrapper: inject refuses a model inside DDP (its new factors would not be reduced)
            inject(wrapper, name_regex(prefix + name), r=w.r, alpha=lora_alpha_for(w.scale, w.r, rslora),
                   dropout=dropout, use_rslora=rslora, use_dora=w.magnitude is not None)
            m = dict(model.named_modules())[name]
        m.set_lora_factors(w.A, w.B, w.scale, w.magnitude)
    load_parameters(wrapper, prefix, model, params, rslora)
    modules = dict(model.named_modules())
    for key, t in adapter.extra.items():
        mod, leaf = extra_target(key)
        m, old = modules[mod], getattr(modules[mod], leaf)
        t = t.to(old.device, old.dtype)
        if ".base_layer." in key or isinstance(m, LoRALayer):
            # an adapted layer's own bias/table: PEFT loads it in place (ties kept); a merged layer's
            # weight is written unmerged, then merged again (it holds the merged adapter)
            if unmerge := isinstance(m, LoRALayer) and leaf == "weight":
                remember(model, LOADED_TABLES, [mod])  # from_model saves it again (loaded_tables)
            with m._unmerged(f"{where}: {key}") if unmerge else contextlib.nullcontext(), torch.no_grad():
                getattr(m, leaf).copy_(t)
        else:  # modules_to_save and other biases: PEFT uses its own copy, so ties are cut
            setattr(m, leaf, nn.Parameter(t.clone(), old.requires_grad) if isinstance(old, nn.Parameter) else t.clone())
        if leaf == "bias" and adapter.config.get("bias") in ("all", "lora_only") and isinstance(m.bias, nn.Parameter):
            m.bias.requires_grad_(True)  # trained, as the factors: from_model saves it again
    remember(model, LOADED_MODULES, adapter.config.get("modules_to_save"))  # from_model saves them again by default
    return [p[0] for p in plan] + [p[0] for p in params]


def _check_scales(where: str, layers: dict, config: dict) -> None:
    """Every layer's scale (LayerWeights.scale: alpha / r, alpha / sqrt(r) with use_rslora) is finite in
    float32, the LoRA kernels' arithmetic (ops._checks.as_scale); else ValueError naming the module and
    the config field its alpha comes from (lora_alpha or the alpha_pattern key matching the module)."""
    for name, w in layers.items():
        if abs(w.scale) <= F32_MAX:
            continue
        source = "LayerWeights.scale"  # an Adapter built in memory, without a config
        if "lora_alpha" in config:
            # alpha_pattern keys match a parameter layer's parameter name, the others' module name
            target = f"{split_path(name)[0]}.{w.parameter}" if w.kind == "parameter" and w.parameter else name
            pattern = config.get("alpha_pattern") or {}
            key = next((k for k in pattern if pattern_value(target, {k: pattern[k]}, None) is not None), None)
            source = (f"lora_alpha={_short(config['lora_alpha'])}" if key is None else
                      f"alpha_pattern[{key!r}]={_short(pattern[key])}")
            source += f" / {'sqrt(r)' if config.get('use_rslora') else 'r'}, r={w.r}"
        raise ValueError(f"{where}: module {name!r} has scale {w.scale:g} ({source}), which is not finite in "
                         f"float32 (|scale| <= {F32_MAX:.2g}), the LoRA kernels' arithmetic")


def _lora_names(layers: dict[str, LayerWeights], model: nn.Module) -> set[str]:
    """The modules that are or will be LoRA layers: the model's and the adapter's (``layers``; a
    "parameter" layer's wrapped module)."""
    return {split_path(n)[0] for n in layers} | set(lora_layers(model)) | set(parameter_layers(model))


def _in_state_dict(module: nn.Module, leaf: str) -> bool:
    """Whether module.<leaf> is in its state dict (a parameter or a persistent buffer)."""
    return leaf in module._parameters or (leaf in module._buffers and
                                          leaf not in module._non_persistent_buffers_set)


def _inner_key(key: str, prefix: str) -> str:
    """A state dict key of a wrapped model (prefix: unwrapped()'s) as the inner model's."""
    head = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
    return head + key[len(head):].removeprefix(prefix) if prefix else key


def _injected_hparams(adapter: Adapter) -> tuple[float, bool]:
    """(lora_dropout, use_rslora) of the adapter's config, for the layers load_adapter injects."""
    p = check_dropout(f"load_adapter: adapter {adapter.name or ''}", adapter.config.get("lora_dropout"))
    return p, bool(adapter.config.get("use_rslora", False))


def _from_state_dict(model: nn.Module, state_dict: dict) -> Adapter:
    where = "load_adapter: state_dict"
    check_not_root([*lora_layers(model), *parameter_layers(model)], model, where)
    check_tensors(state_dict, where, allow_nonfinite=True)
    factors, extra = split_factors(state_dict, where, paired=False)
    found = lora_layers(model)
    # LoRAParameter layers: PEFT-named keys use PEFT's wrapper paths, the model's own names its own
    peft_paths = peft_parameter_layers(model)
    params = peft_paths if any(k.startswith(PEFT_PREFIX) for k in state_dict) else parameter_layers(model)
    layers = {}
    for name, (A, B, kind, mag) in factors.items():
        if name in params:
            p = params[name]
            if A.shape != p.lora_A.shape or B.shape != p.lora_B.shape or mag is not None:
                raise ValueError(f"{where}: {name!r} is a LoRAParameter ({p.parameter_name!r}) with lora_A "
                                 f"{tuple(p.lora_A.shape)} and lora_B {tuple(p.lora_B.shape)}, the state dict holds "
                                 f"A {tuple(A.shape)}, B {tuple(B.shape)}{' and a magnitude' if mag is not None else ''} "
                                 "(a state dict holds no alpha: its rank must be the layer's)")
            layers[next(n for n, q in peft_paths.items() if q is p)] = layer_weights(p, A, B, None)
            continue
        m = found.get(name)
        if m is None or m.lora_rank != A.shape[0]:
            problem = "is not a LoRA layer of the model" if m is None else f"has rank {m.lora_rank} in the model but {A.shape[0]} here"
            raise ValueError(f"{where}: {name!r} {problem} (a state dict holds no alpha: inject the LoRA layers "
                             "first, or load a PEFT adapter directory with Adapter.load)")
        try:  # a MergedLinear's lora_B as loralib saves it -> the fused layer's B
            A, B = m.lora_factors_of(A, B)
        except ValueError as e:
            raise ValueError(f"{where}: {name!r}: {e}") from None
        if B.dim() != A.dim() or B.shape[1] * (m.groups if m.lora_kind == "conv" else 1) != A.shape[0]:
            raise ValueError(f"{where}: module {name!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                             "expected [r, in] and [out, r] with r > 0")
        if m.use_dora != (mag is not None):
            raise ValueError(f"{where}: {name!r} is " + ("a DoRA layer but the state dict holds no lora_magnitude_vector"
                                                         if m.use_dora else "not a DoRA layer but the state dict "
                                                         "holds a lora_magnitude_vector for it"))
        # loralib's lora.Embedding names its factors lora_A / lora_B (same shapes as PEFT's lora_embedding_A/B)
        layers[name] = LayerWeights(A, B, m.scaling, m.lora_kind if kind == "linear" else kind, mag)
    return Adapter(layers, name="state_dict", extra=extra)


def _kind_and_size(m: nn.Module) -> tuple[str | None, tuple[int, int] | None]:
    """("linear" / "embedding", (in, out)) of a module an adapter can go into, else (None, None)."""
    if isinstance(m, LoRALayer):
        A, B, _ = m.lora_factors()
        return m.lora_kind, (A.shape[1], B.shape[0])
    if isinstance(m, nn.Embedding):
        return "embedding", (m.num_embeddings, m.embedding_dim)
    if isinstance(m, nn.Linear):
        return "linear", (m.in_features, m.out_features)
    if type(m).__name__ == "Conv1D":  # transformers Conv1D: weight [in, out]
        return "linear", tuple(m.weight.shape)
    if is_conv(m):
        return "conv", (m.in_channels, m.out_channels)
    return None, None
