"""Adapter files of LoRA on parameters (PEFT's target_parameters / ParamWrapper, lora_ext.LoRAParameter),
for lora_ext.adapters: which factors of a file are a parameter's, which parameter each holds, how
they fit the model, and how load_adapter puts them in.

PEFT keys a parameter's factors by its wrapper's module path. The parameters targeted on one module
nest in their registration order, the first innermost: with n of them the k-th (0-based) is under
n-1-k ``base_layer`` steps (inject.peft_parameter_layers), e.g. on an MoE experts module

    base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight   gate_up_proj: [E * r, H]
    base_model.model.model.layers.0.mlp.experts.lora_A.weight              down_proj:    [E * r, I]

A file alone does not say which parameter a wrapper holds when several may be targeted on its
module (the order is the model's): those read as ``LayerWeights.parameter = None`` and load_adapter
decides them from the model (``resolve``). Where rank_pattern / alpha_pattern give those parameters
different ranks or alphas, the scale depends on it too: such a file is read only with the model
(``Adapter.load(path, model=model)``; load_adapter passes it).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .hparams import lora_alpha_for, lora_scaling
from .inject import inject, peft_parameter_layers
from .param_lora import LoRAParameter, _chain, _inner, _unwrapped_name
from .targets import PEFT_PREFIX, matches, name_regex, pattern_value

__all__ = ["NeedsModel", "split_path", "parameter_paths", "read_parameters", "resolve", "check_fit", "check_covered",
           "plan_parameters", "load_parameters"]

BASE = ".base_layer"


class NeedsModel(ValueError):
    """read_parameters without the model, for a file whose scales only the model decides (rank_pattern /
    alpha_pattern telling apart parameters nested on one module): read it with the model."""


def split_path(path: str) -> tuple[str, int]:
    """(module, nesting depth) of a wrapper's path: "m.experts.base_layer" -> ("m.experts", 1)."""
    depth = 0
    while path.endswith(BASE):
        path, depth = path[: -len(BASE)], depth + 1
    return path, depth


def _key(path: str) -> str:
    return f"{PEFT_PREFIX}{path}.lora_A.weight"


def _selects(key: str, targets) -> bool:
    """PEFT's rule (tuners_utils._inject_parameters): the name is a target or ends with "." + one."""
    return any(key == t or key.endswith("." + t) for t in targets)


def _candidates(module: str, targets) -> list[str]:
    """The parameter names p for which a target selects "<module>.<p>" (from the names alone)."""
    out = []
    for t in targets:
        p = t.rpartition(".")[2]
        if p not in out and _selects(f"{module}.{p}", [t]):
            out.append(p)
    return out


def _names_module(target_modules, name: str) -> bool:
    """Whether a list / regex target_modules selects module ``name`` (None, "all-linear" and
    malformed values, which check_targets refuses, select nothing here)."""
    if isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules) or (
            isinstance(target_modules, str) and target_modules != "all-linear"):
        try:
            return matches(name, target_modules)
        except re.error:
            return False
    return False


def parameter_paths(config: dict, paths) -> list[str]:
    """The factor paths of a file that are parameter wrappers under the config's target_parameters:
    paths with ``base_layer`` steps (inner wrappers), and module paths one of whose parameters a
    target selects, unless target_modules (a list or a regex) names the module itself (PEFT
    refuses LoRA on a module and on its parameters at once)."""
    targets = config.get("target_parameters") or []
    out = []
    for path in paths if targets else ():
        module, depth = split_path(path)
        if depth or (_candidates(module, targets) and not _names_module(config.get("target_modules"), module)):
            out.append(path)
    return out


def _groups(paths, where: str) -> dict[str, dict[int, str]]:
    """module -> {depth: path}; ValueError naming a key when the depths are not 0 .. n-1."""
    groups: dict[str, dict[int, str]] = {}
    for path in paths:
        module, depth = split_path(path)
        groups.setdefault(module, {})[depth] = path
    for module, by_depth in groups.items():
        gap = next(d for d in range(len(by_depth) + 1) if d not in by_depth)
        if gap < len(by_depth):
            raise ValueError(f"{where}: {_key(by_depth[max(by_depth)])} has no matching parameter: PEFT nests the "
                             f"n wrappers of a module's parameters at depths 0 .. n-1, but the factors on {module!r} "
                             f"are at depths {sorted(by_depth)} (no {_key(module + BASE * gap)})")
    return groups


def read_parameters(where: str, config: dict, factors: dict, model: nn.Module | None = None) -> dict[str, tuple]:
    """{path: (A, B, scale, parameter name or None, num_experts)} for the parameter factors of a file
    ({path: (A, B)}, paths from parameter_paths) under its config: r / lora_alpha, rank_pattern /
    alpha_pattern (keys on the parameter's full name, as PEFT) and use_rslora; lora_A's rows are
    num_experts blocks of r. The parameter is named when the config leaves one candidate, or by
    ``model`` (resolve, check_fit, check_covered: then everything is checked against it).
    ValueError naming the file (``where``) and the key otherwise."""
    targets = config.get("target_parameters") or []
    if targets and not factors:
        raise ValueError(f"{where}: the config says target_parameters={targets}, but the file holds no LoRA factors "
                         f"of parameters (keys like '{PEFT_PREFIX}<module>.lora_A.weight', nested as PEFT's "
                         "ParamWrapper): fix the config or the weights")
    found = resolve(model, dict.fromkeys(factors), targets, where) if model is not None else {}
    out = {}
    for module, by_depth in _groups(factors, where).items():
        cands = _candidates(module, targets)
        if model is None and len(by_depth) > len(cands):
            raise ValueError(f"{where}: {_key(by_depth[max(by_depth)])} has no matching parameter: the file holds "
                             f"{len(by_depth)} nested LoRA factors on {module!r}, but target_parameters={targets} "
                             f"selects at most {len(cands)} of its parameters ({cands})")
        for depth, path in sorted(by_depth.items()):
            A, B = factors[path]
            name = found[path][1] if path in found else cands[0] if len(cands) == len(by_depth) == 1 else None
            values = {(pattern_value(f"{module}.{p}", config.get("rank_pattern"), config["r"]),
                       pattern_value(f"{module}.{p}", config.get("alpha_pattern"), config["lora_alpha"]))
                      for p in ([name] if name else cands)}
            if len(values) > 1:
                raise NeedsModel(f"{where}: the config says target_parameters={targets}; which of {cands} {_key(path)} "
                                 f"holds is decided by the model's parameter order, and rank_pattern / alpha_pattern "
                                 f"give them different (r, alpha) {sorted(values)}: read it with the model "
                                 "(Adapter.load(path, model=model), load_adapter(model, path))")
            r, alpha = values.pop()
            if A.shape[0] % r:
                raise ValueError(f"{where}: {_key(path)} has {A.shape[0]} rows, not a multiple of the rank the config "
                                 f"says (r={r}): a parameter's lora_A is [E * r, in], r rows per expert")
            out[path] = (A, B, lora_scaling(alpha, r, bool(config.get("use_rslora"))), name, A.shape[0] // r)
            if path in found:
                module_, pname, _, inner = found[path]
                check_fit(f"{where}: {_key(path)}", module_, inner, pname, A, B, A.shape[0] // r)
    if model is not None:
        check_covered(model, found, targets, where)
    return out


def resolve(model: nn.Module | None, given: dict[str, str | None], targets, where: str,
            modules: dict[str, nn.Module] | None = None) -> dict[str, tuple]:
    """path -> (module, parameter name, its LoRAParameter in ``model`` or None, the module holding
    the parameter) for the wrapper paths ``given`` (-> the parameter each says it holds, or None).
    The wrappers on one module hold, innermost first, in registration order: the parameters the
    model wraps there already; or those ``given`` names (all of them); or those ``targets`` select.
    ValueError (``where``, the module, the key) when the model has no such module or parameters.
    ``modules`` (name -> module) instead of ``model``'s: e.g. an AdapterPool's served experts."""
    modules = dict(model.named_modules()) if modules is None else modules
    existing = peft_parameter_layers(model) if model is not None else {}
    out = {}
    for module, by_depth in _groups(given, where).items():
        n, mod = len(by_depth), modules.get(module) if module else None
        if mod is None:
            raise ValueError(f"{where}: the model has no module {module!r}, whose parameters the adapter holds LoRA "
                             f"factors for ({_key(by_depth[0])})")
        inner, chain = _inner(mod), _chain(mod)
        if hasattr(inner, "lora_A"):
            raise ValueError(f"{where}: module {module!r} is a LoRA layer ({type(inner).__name__}), but the adapter "
                             f"holds factors of its parameters ({_key(by_depth[0])}; PEFT's target_parameters)")
        own = [p for p, _ in inner.named_parameters(recurse=False)]
        named = [given[p] for p in by_depth.values()]
        if chain:
            held = {w.parameter_name for w in chain}
            how = "the model's LoRAParameter wrappers there hold"
        elif all(named):
            held = set(named)
            unknown = sorted(held - set(own))
            if unknown:
                raise ValueError(f"{where}: module {module!r} ({type(inner).__name__}) has no parameter {unknown[0]!r} "
                                 f"of its own (parameters: {own})")
            how = "the adapter names"
        else:
            held = {p for p in own if _selects(f"{module}.{p}", targets)}
            how = f"target_parameters={targets} selects"
        order = [p for p in own if p in held]
        if len(order) != n:
            raise ValueError(f"{where}: module {module!r} ({type(inner).__name__}): {how} {len(order)} of its parameters "
                             f"({order}), but the adapter holds {n} nested LoRA factors on it "
                             f"({', '.join(_key(by_depth[d]) for d in sorted(by_depth))})")
        for depth, path in by_depth.items():
            pname = order[n - 1 - depth]
            if given[path] not in (None, pname):
                raise ValueError(f"{where}: {_key(path)} is {module}.{given[path]}'s, but at that nesting depth PEFT "
                                 f"puts {module}.{pname} (a module's parameters nest in registration order: {order})")
            out[path] = (module, pname, existing.get(path) if chain else None, inner)
    return out


def check_fit(where: str, module: str, inner: nn.Module, pname: str, A: torch.Tensor, B: torch.Tensor,
              num_experts: int) -> None:
    """ValueError (``where``, the parameter) unless A [E * r, in] and B [out, E * r] fit parameter
    ``pname`` of ``inner`` (at ``module``) with E = num_experts, as LoRAParameter lays it out."""
    P = getattr(inner, pname)
    if P.dim() not in (2, 3):
        raise ValueError(f"{where}: parameter {module}.{pname} has shape {list(P.shape)}; LoRA on parameters takes "
                         "2-D [out, in] or 3-D expert stacks")
    E = P.shape[0] if P.dim() == 3 else 1
    transposed = P.dim() == 3 and bool(getattr(inner, "is_transposed", False))
    out_f, in_f = (P.shape[-1], P.shape[-2]) if transposed else (P.shape[-2], P.shape[-1])
    rows = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or rows == 0 or rows % E or A.shape[1] != in_f or tuple(B.shape) != (out_f, rows):
        raise ValueError(f"{where}: parameter {module}.{pname} {list(P.shape)} is {E} expert(s) x {in_f} -> {out_f}, "
                         f"so its factors must be lora_A [{E} * r, {in_f}] and lora_B [{out_f}, {E} * r]; got "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    if num_experts != E:
        raise ValueError(f"{where}: parameter {module}.{pname} has {E} expert(s), but the adapter's rank "
                         f"r={rows // num_experts} makes lora_A's {rows} rows {num_experts} experts' blocks")


def check_covered(model: nn.Module, found: dict, targets, where: str) -> None:
    """ValueError naming the parameter if ``targets`` (PEFT's target_parameters) select one of
    ``model`` that ``found`` (resolve's) has no factors for: PeftModel.from_pretrained would wrap
    it and leave it at its initialization."""
    have = {(m, p) for m, p, _, _ in found.values()}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if not name or isinstance(m, LoRAParameter) or hasattr(m, "lora_A"):
            continue
        clean = _unwrapped_name(name, modules)
        for p, _ in m.named_parameters(recurse=False):
            if (clean, p) not in have and _selects(f"{clean}.{p}", targets):
                raise ValueError(f"{where}: target_parameters={targets} selects {clean}.{p} in "
                                 f"{type(model).__name__}, but the adapter holds no LoRA factors for it "
                                 "(PeftModel.from_pretrained would leave it at its initialization): fix the "
                                 "config or the weights")


def plan_parameters(model: nn.Module, layers: dict, config: dict, where: str) -> list[tuple]:
    """load_adapter's checks for an adapter's "parameter" layers ({path: LayerWeights}) in ``model``:
    resolve, check_fit, no wrapper merged for good, and, if the config has target_parameters,
    check_covered. Returns load_parameters' items (path, module, parameter name, LoRAParameter or
    None, LayerWeights); nothing changes."""
    found = resolve(model, {p: w.parameter for p, w in layers.items()}, config.get("target_parameters") or [], where)
    items = []
    for path, (module, pname, layer, inner) in found.items():
        w = layers[path]
        check_fit(f"{where}: module {path!r}", module, inner, pname, w.A, w.B, w.num_experts)
        if layer is not None and layer._merged_for_good():  # (a merged one takes it as a merged LoRALayer)
            raise ValueError(f"{where}: module {path!r} (LoRAParameter {pname!r}) is merged for good "
                             "(drop_merge_state / merge_and_unload), so its adapter cannot be replaced")
        items.append((path, module, pname, layer, w))
    check_covered(model, found, config.get("target_parameters") or [], where)
    return items


def load_parameters(wrapper: nn.Module, prefix: str, model: nn.Module, items: list, use_rslora: bool) -> None:
    """load_adapter's part for parameters, after every check: items (path, module, parameter name,
    LoRAParameter or None, LayerWeights). Parameters without a wrapper get one (inject through
    ``wrapper``, the DDP / torch.compile module around ``model``, whose names carry ``prefix``:
    a module's wrappers nest in registration order, as PEFT's), with the adapter's rank and an
    alpha giving its scale under ``use_rslora``; then every wrapper takes its factors."""
    new = {f"{prefix}{module}.{pname}": w for _, module, pname, layer, w in items if layer is None}
    if new:
        inject(wrapper, target_parameters=list(new), use_rslora=use_rslora,
               rank_pattern={name_regex(k): w.r for k, w in new.items()},
               alpha_pattern={name_regex(k): lora_alpha_for(w.scale, w.r, use_rslora) for k, w in new.items()})
    layers = peft_parameter_layers(model)
    for path, _, _, _, w in items:
        layers[path].set_lora_factors(w.A, w.B, w.scale)
