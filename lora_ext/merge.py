"""Merge LoRA layers into their base weights for serving, unmerge them to switch adapters.

    lora_ext.merge(model)              # every LoRA layer: W <- round(W + s B A); forward skips LoRA
    lora_ext.unmerge(model)            # W back to the original, bit for bit (any dtype)
    base = lora_ext.merge_and_unload(model)   # plain nn.Linear / nn.Embedding / Conv1D again
    both = lora_ext.combine([ad1, ad2], [0.7, 0.3], how="cat")   # one adapter adding their effects

Exact unmerge: each merged layer keeps a MergeState (see lora_ext.ops.MergeState): copies of
the merged factors and a few percent of W's size of side information, dropped on unmerge.
``exact=False`` merges without it (unmerge then subtracts, as other libraries do).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from .ops import MergeState, check_merge_finite, merge_, unmerge_
from .adapters import Adapter, LayerWeights
from .inject import lora_layers
from .layers import LoRAEmbedding, LoRALinear

__all__ = ["merge", "unmerge", "merge_and_unload", "merge_layer", "unmerge_layer", "combine",
           "merge_overhead"]

_LAYERS = (LoRALinear, LoRAEmbedding)


def _factors(layer: nn.Module):
    """(A, B, scale, fan_in_fan_out) of a LoRA layer, in the merge ops' convention."""
    if isinstance(layer, LoRALinear):
        return layer.lora_A, layer.lora_B, float(layer.scaling), bool(layer.fan_in_fan_out)
    if isinstance(layer, LoRAEmbedding):  # weight [num, dim] = [in, out]: the Conv1D layout
        return layer.lora_embedding_A, layer.lora_embedding_B, float(layer.scaling), True
    raise TypeError(f"expected a LoRALinear or LoRAEmbedding, got {type(layer).__name__}")


def _check_layer(layer: nn.Module) -> None:
    A, B, s, fifo = _factors(layer)
    check_merge_finite(layer.weight.detach(), [A.detach()], [B.detach()], [s], fan_in_fan_out=fifo)


@torch.no_grad()
def merge_layer(layer: nn.Module, safe: bool = False, exact: bool = True) -> None:
    """Folds the layer's adapter into its weight; no-op when already merged.

    ``safe=True`` raises ValueError, before touching the weight, if the merged weight would hold
    inf/NaN. ``exact=True`` keeps what is needed to unmerge bit for bit.
    """
    if layer.merged:
        return
    A, B, s, fifo = _factors(layer)
    if safe:
        _check_layer(layer)
    W = layer.weight.data
    state = MergeState() if exact else None
    merge_(W, A.detach(), B.detach(), s, fan_in_fan_out=fifo, state=state)
    layer._merge_state = state
    layer._merged_factors = None if exact else (A.detach().clone(), B.detach().clone(), s)
    layer.merged = True


@torch.no_grad()
def unmerge_layer(layer: nn.Module) -> None:
    """Takes the merged adapter out of the weight (bit for bit after an exact merge)."""
    if not layer.merged:
        raise ValueError(f"unmerge: this {type(layer).__name__} is not merged")
    state = getattr(layer, "_merge_state", None)
    fifo = _factors(layer)[3]
    if state is not None:
        unmerge_(layer.weight.data, fan_in_fan_out=fifo, state=state)
    else:  # plain merge: subtract what was added
        A, B, s = layer._merged_factors
        unmerge_(layer.weight.data, A, B, s, fan_in_fan_out=fifo)
    layer._merge_state = layer._merged_factors = None
    layer.merged = False


def _layers_of(model: nn.Module) -> dict[str, nn.Module]:
    if isinstance(model, _LAYERS):
        return {"": model}
    found = lora_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (use lora_ext.inject first)")
    return found


def _check_tied(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """A weight shared with another module (tied embeddings / LM head) would change there too."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    for name, m in layers.items():
        others = [o for o in owners.get(id(m.weight), []) if o != name]
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
    layers = {n: m for n, m in _layers_of(model).items() if not m.merged}
    if not allow_tied:
        _check_tied(model, layers)
    if safe:
        _check_all(layers)
    for m in layers.values():
        merge_layer(m, exact=exact)
    return list(layers)


def _check_all(layers: dict[str, nn.Module]) -> None:
    for name, m in layers.items():
        try:
            _check_layer(m)
        except ValueError as e:
            raise ValueError(f"merge: layer {name!r}: {e}") from None


def unmerge(model: nn.Module) -> list[str]:
    """Unmerges every merged LoRA layer; returns their names."""
    layers = {n: m for n, m in _layers_of(model).items() if m.merged}
    for m in layers.values():
        unmerge_layer(m)
    return list(layers)


def merge_overhead(model: nn.Module) -> dict[str, float]:
    """Exact-unmerge side information of each merged layer, as a fraction of its weight's bytes."""
    return {n: m._merge_state.overhead() for n, m in _layers_of(model).items()
            if m.merged and getattr(m, "_merge_state", None) is not None}


def _base_module(layer: nn.Module) -> nn.Module:
    """A module of the layer's original class holding its (merged) weight and bias."""
    cls = getattr(layer, "base_class", nn.Linear if isinstance(layer, LoRALinear) else nn.Embedding)
    W = layer.weight
    with torch.device("meta"):
        if isinstance(layer, LoRAEmbedding):
            kw = dict(padding_idx=layer.padding_idx, max_norm=layer.max_norm, norm_type=layer.norm_type,
                      scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
            try:
                base = cls(layer.num_embeddings, layer.embedding_dim, **kw)
            except TypeError:  # an Embedding subclass with another signature
                base = nn.Embedding(layer.num_embeddings, layer.embedding_dim, **kw)
        elif layer.fan_in_fan_out:  # transformers Conv1D(nf=out, nx=in)
            base = cls(layer.out_features, layer.in_features)
        else:
            try:
                base = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
            except TypeError:  # a Linear subclass with another signature
                base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    base.weight = W if isinstance(W, nn.Parameter) else nn.Parameter(W, requires_grad=False)
    if hasattr(base, "bias") and not isinstance(layer, LoRAEmbedding):
        base.bias = layer.bias
    base.train(layer.training)
    return base


def merge_and_unload(model: nn.Module, safe: bool = False, allow_tied: bool = False) -> nn.Module:
    """Merges every LoRA layer and puts the original module classes back (nn.Linear,
    nn.Embedding, transformers Conv1D) holding the merged weights: the result has the base
    model's structure and state_dict keys. Returns ``model`` (or the new module, if ``model``
    is itself a LoRA layer). No side information is kept. ``safe`` and ``allow_tied`` as in
    :func:`merge`."""
    layers = _layers_of(model)
    pending = {n: m for n, m in layers.items() if not m.merged}
    if not allow_tied:
        _check_tied(model, pending)
    if safe:
        _check_all(pending)
    for m in layers.values():
        if not m.merged:
            merge_layer(m, exact=False)
        m._merge_state = m._merged_factors = None  # merged bits are the same either way
    if "" in layers:
        return _base_module(layers[""])
    modules = dict(model.named_modules())
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, _base_module(m))
    return model


# ---------------------------------------------------------------- combining adapters
def _combine_factors(items: list[tuple[torch.Tensor, torch.Tensor, float]], how: str,
                     dtype: torch.dtype | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if how == "cat":
        # B_i pre-multiplied by c_i = w_i * s_i in fp32, exactly as the merge kernels do, so
        # merging the result (scale 1) gives the same bits as merging the adapters together.
        A = torch.cat([a.float() for a, _, _ in items], 0)
        B = torch.cat([b.float() * torch.tensor(c, dtype=torch.float32, device=b.device)
                       for _, b, c in items], 1)
    elif how == "linear":
        ranks = {a.shape[0] for a, _, _ in items}
        if len(ranks) != 1:
            raise ValueError(f"combine(how='linear'): {where}: ranks differ ({sorted(ranks)}); "
                             "use how='cat'")
        A = sum(math.copysign(math.sqrt(abs(c)), c) * a.float() for a, _, c in items)
        B = sum(math.sqrt(abs(c)) * b.float() for _, b, c in items)
    else:
        raise ValueError(f"combine: how must be 'cat' or 'linear', got {how!r}")
    out = dtype or torch.float32
    return A.to(out), B.to(out)


def _as_factors(x, where: str):
    if isinstance(x, LayerWeights):
        return x.A, x.B, float(x.scale), x.kind
    if isinstance(x, (tuple, list)) and len(x) == 3:
        return x[0], x[1], float(x[2]), None
    raise TypeError(f"combine: {where}: expected an Adapter, a LayerWeights or an (A, B, scale) "
                    f"tuple, got {type(x).__name__}")


def combine(adapters: Sequence, weights: Sequence[float] | None = None, how: str = "cat",
            dtype: torch.dtype | None = None):
    """Combines LoRA adapters into one whose effect is the weighted sum of theirs.

    adapters: Adapter objects (combined module by module; a module missing from some adapters
    takes the others'), LayerWeights, or (A, B, scale) tuples. weights: one float each
    (default 1). Returns the same kind (tuples give a LayerWeights), with scale 1.

    how="cat": exact. Rank sum r_i; A = [A_1; A_2; ...], B = [c_1 B_1, c_2 B_2, ...] with
      c_i = w_i * s_i, so B A = sum_i w_i s_i B_i A_i. The factors are fp32 (``dtype`` to change):
      merging the result gives the same bits as merging all adapters together (``merge_`` with
      the lists and scales w_i s_i).
    how="linear": PEFT's linear combination, equal ranks only: A = sum sign(c_i) sqrt|c_i| A_i,
      B = sum sqrt|c_i| B_i. Same rank, but B A has cross terms B_i A_j: it is not the sum of
      the effects (n copies of one adapter come out scaled by (sum sqrt w_i)^2, not sum w_i).
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("combine: no adapters given")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
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
        items.append((A, B, w * s))
        kinds.add(kind or "linear")
    _check_same_shapes(items, "layer")
    if len(kinds) > 1:
        raise ValueError("combine: linear and embedding factors mixed")
    A, B = _combine_factors(items, how, dtype, "layer")
    return LayerWeights(A, B, 1.0, kinds.pop())


def _check_pair(A, B, where):
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)) or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"combine: {where}: A and B must be 2-D tensors")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"combine: {where}: A {tuple(A.shape)} and B {tuple(B.shape)} ranks differ")
    if not A.is_floating_point() or not B.is_floating_point():
        raise ValueError(f"combine: {where}: A and B must be floating point, got {A.dtype}, {B.dtype}")


def _check_same_shapes(items, where):
    ins, outs = {a.shape[1] for a, _, _ in items}, {b.shape[0] for _, b, _ in items}
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError(f"combine: {where}: adapters have different in/out sizes (in {sorted(ins)}, "
                         f"out {sorted(outs)})")


def _combine_adapters(adapters: list[Adapter], weights, how, dtype) -> Adapter:
    names = sorted({n for a in adapters for n in a.layers})
    layers = {}
    for name in names:
        items, kinds = [], set()
        for i, (ad, w) in enumerate(zip(adapters, weights)):
            lw = ad.layers.get(name)
            if lw is None:
                continue
            _check_pair(lw.A, lw.B, f"adapter {i}, module {name!r}")
            items.append((lw.A, lw.B, w * lw.scale))
            kinds.add(lw.kind)
        if len(kinds) > 1:
            raise ValueError(f"combine: module {name!r} is a linear layer in some adapters and an "
                             "embedding in others")
        _check_same_shapes(items, f"module {name!r}")
        A, B = _combine_factors(items, how, dtype, f"module {name!r}")
        layers[name] = LayerWeights(A, B, 1.0, kinds.pop())
    ranks = {n: lw.r for n, lw in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    config = dict(adapters[0].config)
    fan = any(a.config.get("fan_in_fan_out", False) for a in adapters)
    config.update({"peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False,
                   "target_modules": sorted({n.split(".")[-1] for n in layers}),
                   "rank_pattern": {f"^{n}$".replace(".", r"\."): k for n, k in ranks.items() if k != r},
                   "alpha_pattern": {f"^{n}$".replace(".", r"\."): k for n, k in ranks.items() if k != r},
                   "fan_in_fan_out": fan, "use_dora": False})
    name = "+".join(a.name or f"adapter{i}" for i, a in enumerate(adapters))
    return Adapter(layers, config, name=f"{how}({name})")
