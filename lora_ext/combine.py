"""Combine LoRA adapters into one whose effect is the weighted sum of theirs.

    both = lora_ext.combine([ad1, ad2], [0.7, 0.3], how="cat")   # exact: rank r1 + r2
    lora_ext.load_adapter(model, both)          # or lora_ext.merge it, or save it (PEFT format)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .adapters import Adapter, LayerWeights
from .targets import peft_config

__all__ = ["combine"]

# why DoRA adapters are refused (PEFT's add_weighted_adapter takes them, but gives the result the
# first adapter's use_dora with a fresh magnitude, the base weight's row norms: the trained ones are lost)
_NOT_DORA = ("a weighted sum of DoRA adapters is not a DoRA adapter (each rescales the rows of W0 + ΔWᵢ by its "
             "own trained magnitude), so DoRA adapters cannot be combined; load or merge each alone")
# LoRA on parameters (target_parameters, LayerWeights kind "parameter"): not combined (yet)
_NOT_PARAMETER = ("LoRA on parameters (target_parameters: MoE expert stacks) is not combined; load or merge "
                  "each adapter alone")


def _combine_factors(items: list[tuple[torch.Tensor, torch.Tensor, float]], how: str,
                     dtype: torch.dtype | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if how == "cat":
        # B_i pre-multiplied by c_i = w_i * s_i in fp32, exactly as the merge kernels do, so
        # merging the result (scale 1) gives the same bits as merging the adapters together.
        A = torch.cat([a.float() for a, _, _ in items], 0)
        B = torch.cat([b.float() * torch.tensor(c, dtype=torch.float32, device=b.device)
                       for _, b, c in items], 1)
    else:  # "linear" (checked by combine)
        ranks = {a.shape[0] for a, _, _ in items}
        if len(ranks) != 1:
            raise ValueError(f"combine(how='linear'): {where}: ranks differ ({sorted(ranks)}); "
                             "use how='cat'")
        A = sum(math.copysign(math.sqrt(abs(c)), c) * a.float() for a, _, c in items)
        B = sum(math.sqrt(abs(c)) * b.float() for _, b, c in items)
    # finite inputs whose factors overflow: in the fp32 arithmetic above (whatever ``dtype``: a wider
    # one cannot help), or in ``dtype``
    for t in dict.fromkeys((torch.float32, dtype or torch.float32)):
        A, B = A.to(t), B.to(t)
        if not (A.isfinite().all() and B.isfinite().all()) and all(a.isfinite().all() and b.isfinite().all()
                                                                    for a, b, _ in items):
            fix = ("pass a wider dtype or smaller weights" if t != torch.float32 else
                   "they are computed in it, as the merge kernels compute, whatever dtype; use smaller weights")
            raise ValueError(f"combine: {where}: the combined factors overflow {t} (inputs finite, weights x "
                             f"scales too large for it); {fix}")
    return A, B


def _as_factors(x, where: str):
    if isinstance(x, LayerWeights):
        if x.magnitude is not None:
            raise ValueError(f"combine: {where} is a DoRA layer (LayerWeights.magnitude is set): {_NOT_DORA}")
        if x.kind == "parameter":
            raise ValueError(f"combine: {where} is a parameter's LoRA (kind 'parameter'): {_NOT_PARAMETER}")
        return x.A, x.B, float(x.scale), x.kind
    if isinstance(x, (tuple, list)) and len(x) == 3:
        conv = isinstance(x[0], torch.Tensor) and x[0].dim() > 2  # PEFT's conv factors
        return x[0], x[1], float(x[2]), "conv" if conv else None
    raise TypeError(f"combine: {where}: expected an Adapter, a LayerWeights or an (A, B, scale) "
                    f"tuple, got {type(x).__name__}")


def combine(adapters: Sequence, weights: Sequence[float] | None = None, how: str = "cat",
            dtype: torch.dtype | None = None):
    """Combines LoRA adapters into one whose effect is the weighted sum of theirs.

    adapters: Adapter objects (combined module by module; a module missing from some adapters
    takes the others'), LayerWeights, or (A, B, scale) tuples. weights: one float each
    (default 1). Returns the same kind (tuples give a LayerWeights), with scale 1. A combined
    Adapter gets a new PEFT config for exactly its modules (the inputs' layers_to_transform,
    exclude_modules, modules_to_save ... are not kept, nor are their extra tensors).
    DoRA adapters (use_dora, LayerWeights.magnitude set) raise ValueError naming the adapter:
    a weighted sum of them is no DoRA adapter. So do adapters with LoRA on parameters
    (target_parameters, kind "parameter"): not combined.

    how="cat": exact. Rank sum r_i; A = [A_1; A_2; ...], B = [c_1 B_1, c_2 B_2, ...] with
      c_i = w_i * s_i, so B A = sum_i w_i s_i B_i A_i. The factors are fp32 (``dtype`` to change):
      merging the result gives the same bits as merging all adapters together (``merge_`` with
      the lists and scales w_i s_i).
    how="linear": PEFT's linear combination, equal ranks only: A = sum sign(c_i) sqrt|c_i| A_i,
      B = sum sqrt|c_i| B_i. Same rank, but B A has cross terms B_i A_j: it is not the sum of
      the effects (n copies of one adapter come out scaled by (sum sqrt w_i)^2, not sum w_i).
    """
    single = isinstance(adapters, (Adapter, LayerWeights)) or (  # one adapter, not a list of them
        isinstance(adapters, tuple) and len(adapters) == 3 and isinstance(adapters[0], torch.Tensor))
    if single or isinstance(adapters, (str, bytes, dict, torch.Tensor)) or not isinstance(adapters, Iterable):
        raise TypeError(f"combine: adapters must be a list of Adapters, LayerWeights or (A, B, scale) tuples, got "
                        f"{'one ' if single else ''}{type(adapters).__name__}" + (" (pass [it])" if single else ""))
    adapters = list(adapters)
    if not adapters:
        raise ValueError("combine: no adapters given")
    if how not in ("cat", "linear"):
        raise ValueError(f"combine: how must be 'cat' or 'linear', got {how!r} (PEFT's svd, ties, dare_* and "
                         "magnitude_prune* combinations are not implemented)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"combine: dtype must be a floating-point torch.dtype (or None: float32), got {dtype!r}")
    try:
        if isinstance(weights, (str, bytes)):
            raise TypeError
        weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    except TypeError:
        raise TypeError(f"combine: weights must be a sequence of floats, one per adapter, got "
                        f"{type(weights).__name__} {weights!r:.80}") from None
    if len(weights) != len(adapters):
        raise ValueError(f"combine: {len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"combine: weights must be finite, got {weights}")
    if all(isinstance(a, Adapter) for a in adapters):
        return _combine_adapters(adapters, weights, how, dtype)
    if any(isinstance(a, Adapter) for a in adapters):
        raise TypeError("combine: mix of Adapter and per-layer factors; pass one kind")
    items, kinds = [], set()
    for i, (a, w) in enumerate(zip(adapters, weights)):
        A, B, s, kind = _as_factors(a, f"adapter {i}")
        _check_pair(A, B, f"adapter {i}")
        items.append((A, B, _coefficient(w, s, f"adapter {i}")))
        kinds.add(kind or "linear")
    _check_same_shapes(items, "layer")
    if len(kinds) > 1:
        raise ValueError(f"combine: {' and '.join(sorted(kinds))} factors mixed")
    A, B = _combine_factors(items, how, dtype, "layer")
    return LayerWeights(A, B, 1.0, kinds.pop())


def _check_pair(A, B, where):
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)) or A.dim() != B.dim() or not (
            A.dim() == 2 or (A.dim() in (3, 4, 5) and all(n == 1 for n in B.shape[2:]))):
        raise ValueError(f"combine: {where}: A and B must be 2-D tensors (a convolution's: A [r, in, *kernel], "
                         f"B [out, r, 1, ...] as PEFT's), got A {_shape(A)}, B {_shape(B)}")
    if A.dim() > 2 and B.shape[1] < A.shape[0] and A.shape[0] % B.shape[1] == 0:
        raise ValueError(f"combine: {where}: A {tuple(A.shape)} and B {tuple(B.shape)} are a grouped convolution's "
                         "(lora_B [out, r / groups, 1, ...]), which combine does not take")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"combine: {where}: A {tuple(A.shape)} and B {tuple(B.shape)} ranks differ")
    if A.shape[0] == 0:  # (the result would be no LoRA layer: inject / PEFT need r >= 1)
        raise ValueError(f"combine: {where}: A {tuple(A.shape)} and B {tuple(B.shape)} have rank 0")
    if not A.is_floating_point() or not B.is_floating_point():
        raise ValueError(f"combine: {where}: A and B must be floating point, got {A.dtype}, {B.dtype}")


def _coefficient(weight: float, scale, where: str) -> float:
    """c = weight * scale, the factor of B A in the combination; finite (a NaN scale would
    poison the whole combined module)."""
    c = weight * float(scale)
    if not math.isfinite(c):
        raise ValueError(f"combine: {where}: weight {weight} * scale {float(scale)} is not finite")
    return c


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_same_shapes(items, where):
    # a convolution's in: channels and kernel (A [r, in, *kernel]); out: B [out, r, 1, ...]
    ins, outs = {tuple(a.shape[1:]) for a, _, _ in items}, {(b.shape[0],) + tuple(b.shape[2:]) for _, b, _ in items}
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError(f"combine: {where}: adapters have different in/out sizes (in {sorted(ins)}, "
                         f"out {sorted(outs)})")


def _leaves_select_all(config: dict) -> bool:
    """Whether an adapter's config selects every module its modules' leaf names name: "all-linear" or
    a list of leaf names (no dots: "layers.0.q_proj" is a full name, "self_attn.q_proj" skips
    cross_attn.q_proj), no layers_to_transform / exclude_modules. An Adapter built in memory (no
    target_modules) cannot tell."""
    targets = config.get("target_modules")
    leaves = targets == "all-linear" or (isinstance(targets, (list, tuple)) and
                                         all(isinstance(t, str) and "." not in t for t in targets))
    return leaves and config.get("layers_to_transform") in (None, []) and not config.get("exclude_modules")


def _combine_adapters(adapters: list[Adapter], weights, how, dtype) -> Adapter:
    for i, ad in enumerate(adapters):
        dora = sorted(n for n, lw in ad.layers.items() if lw.magnitude is not None)
        if dora or ad.config.get("use_dora"):
            what = f"module {dora[0]!r} has a lora_magnitude_vector" if dora else "its config says use_dora=true"
            raise ValueError(f"combine: adapter {i} ({ad.name!r}) is a DoRA adapter ({what}): {_NOT_DORA}")
        params = sorted(n for n, lw in ad.layers.items() if lw.kind == "parameter")
        if params:
            raise ValueError(f"combine: adapter {i} ({ad.name!r}) has LoRA on parameters (module {params[0]!r}, "
                             f"{ad.layers[params[0]].parameter or 'a parameter'}): {_NOT_PARAMETER}")
    names = sorted({n for a in adapters for n in a.layers})
    if not names:
        raise ValueError("combine: the adapters hold no LoRA modules")
    layers = {}
    for name in names:
        items, kinds = [], set()
        for i, (ad, w) in enumerate(zip(adapters, weights)):
            lw = ad.layers.get(name)
            if lw is None:
                continue
            _check_pair(lw.A, lw.B, f"adapter {i}, module {name!r}")
            items.append((lw.A, lw.B, _coefficient(w, lw.scale, f"adapter {i}, module {name!r}")))
            kinds.add(lw.kind)
        if len(kinds) > 1:
            raise ValueError(f"combine: module {name!r} has {' and '.join(sorted(kinds))} factors in "
                             "different adapters")
        _check_same_shapes(items, f"module {name!r}")
        A, B = _combine_factors(items, how, dtype, f"module {name!r}")
        layers[name] = LayerWeights(A, B, 1.0, kinds.pop())
    ranks = {n: lw.r for n, lw in layers.items()}  # scale 1: alpha = r everywhere
    # a fresh config: the inputs' targeting fields (layers_to_transform, exclude_modules ...) would
    # make PEFT skip combined modules; only metadata all inputs agree on is kept. Inputs that
    # selected fewer modules than their leaves name get full module names (PEFT would wrap the
    # leaves in every layer)
    narrowed = not all(_leaves_select_all(a.config) for a in adapters)
    config = peft_config(ranks, ranks, fan_in_fan_out=any(a.config.get("fan_in_fan_out", False) for a in adapters),
                         full_names=narrowed)
    config |= {k: adapters[0].config[k] for k in ("task_type", "base_model_name_or_path")
               if k in adapters[0].config and all(a.config.get(k) == adapters[0].config[k] for a in adapters)}
    name = "+".join(a.name or f"adapter{i}" for i, a in enumerate(adapters))
    return Adapter(layers, config, name=f"{how}({name})")
