"""LoRA modules: the LoRALayer base and LoRALinear (nn.Linear and transformers' Conv1D).

Parameter names and shapes follow loralib / HF PEFT: ``lora_A`` [r, in], ``lora_B`` [out, r]
(``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B`` [dim, r] for embeddings). The
base ``weight``/``bias`` are frozen; ``scaling`` is alpha / r (alpha / sqrt(r) with rsLoRA).
B (A for embeddings, as in PEFT) starts at zero, so wrapping a layer leaves its output unchanged.

Both derive from LoRALayer (as PEFT's LoraLayer), which owns what the rest of lora_ext needs of a LoRA layer:
merge()/unmerge() (exact, via lora_ext.ops.MergeState), lora_factors() / set_lora_factors() in PEFT's orientation,
and base_module() (the unwrapped module). Others: LoRAEmbedding, MergedLinear, LoRAConv1d/2d/3d (conv.py).
"""
from __future__ import annotations

import abc
import contextlib
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .hparams import _check_hparams, lora_alpha_for, lora_scaling  # noqa: F401  (imported from here too)
from .dora import DoraLayer, DoraMergeState, dora_linear, dora_merge_
from .ops import MergeState, check_merge_finite, lora_linear, merge_, unmerge_
from .merged_sd import MergedStateDict
from .ops._checks import as_scale
from .sharding import is_dtensor, is_fsdp
from .wrappable import is_conv1d, parametrized, unwrappable  # noqa: F401  (imported from here too)

__all__ = ["LoRALayer", "LoRALinear", "is_conv1d", "parametrized"]

# id(weight) -> the layer merged into it last: a tied weight (GPT-2's wte / lm_head) can hold several
# merged layers, which unmerge exactly only in reverse merge order (LoRALayer._tied_stack)
_LAST_MERGED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def factors_like(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B in x's dtype for lora_linear (e.g. fp32 adapters on a bf16 model); under autocast
    the op casts every input itself (csrc/autocast.cpp), so they are passed as they are."""
    if A.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return A.to(x.dtype), B.to(x.dtype)
    return A, B


def set_factor(p: nn.Parameter, value: torch.Tensor) -> None:
    """p takes value (a copy), also of another shape (a new rank): the same Parameter object, so an
    optimizer built before steps it (its per-parameter state of the old shape, e.g. Adam's moments,
    then raises torch's size error: make a new optimizer after changing the rank); a stale .grad
    is dropped."""
    with torch.no_grad():
        if p.shape == value.shape:
            p.copy_(value)
        else:
            p.data = value.clone()
            p.grad = None


class LoRALayer(DoraLayer, MergedStateDict, nn.Module, abc.ABC):
    """Base of the LoRA layers: ``weight`` (frozen) plus factors A [r, in], B [out, r] with
    ``scaling`` (``r``, ``lora_alpha``, ``use_rslora``, ``merged``, ``base_class`` attributes).

    Subclasses set ``lora_kind`` ("linear", "embedding" or "conv", as LayerWeights.kind), ``factor_names``
    (the A and B parameter names) and ``_weight_in_out`` (weight stored [in, out]); a Conv1D-wrapping
    LoRALinear is kind "linear" with ``fan_in_fan_out=True``.
    """

    lora_kind: str = ""
    factor_names: tuple[str, str] = ("", "")
    # use_dora (DoraLayer): LoRALinear / LoRAConvNd(use_dora=True) have DoRA's lora_magnitude_vector

    @property
    @abc.abstractmethod
    def _weight_in_out(self) -> bool:
        """Whether ``weight`` is stored [in, out] (Conv1D layout, embeddings)."""

    @property
    def lora_parameter_names(self) -> tuple[str, ...]:
        """The trained LoRA parameters: ``factor_names``, and a DoRA layer's lora_magnitude_vector."""
        return self.factor_names + (("lora_magnitude_vector",) if self.use_dora else ())

    # ---------------------------------------------------------------- factors
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale): the layer's own A [r, in] and B [out, r] parameters (PEFT orientation;
        embeddings: A [r, num_embeddings], B [dim, r]; MergedLinear: B built from its lora_B) and
        its scaling; delta = scale * B @ A. Read them; set them with set_lora_factors."""
        a_name, b_name = self.factor_names
        return getattr(self, a_name), getattr(self, b_name), float(self.scaling)

    @property
    def lora_rank(self) -> int:
        """The rank of lora_factors() (PEFT's ``r`` for this module; ``r`` itself for these layers)."""
        return getattr(self, self.factor_names[0]).shape[0]

    def lora_factors_of(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as lora_factors() would give them were the layer's parameters A and B (here: as they are)."""
        return A, B

    def _new_factors(self, A: torch.Tensor, B: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """set_lora_factors' A, B as the values of the layer's parameters, and the new ``r``."""
        A_old, B_old = (getattr(self, n) for n in self.factor_names)
        if (A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0
                or A.shape[1] != A_old.shape[1] or B.shape[0] != B_old.shape[0]):
            raise ValueError(f"{where}: expected A [r, {A_old.shape[1]}] and "
                             f"B [{B_old.shape[0]}, r] with r > 0, got A {tuple(A.shape)}, B {tuple(B.shape)}")
        return A, B, A.shape[0]

    def set_lora_factors(self, A: torch.Tensor, B: torch.Tensor, scale: float,
                         magnitude: torch.Tensor | None = None) -> None:
        """Sets A [r, in], B [out, r] (converted to the layer's device and dtype) and the scaling.
        Copied into the same Parameter objects, also for another rank (``set_factor``), with ``r`` and
        ``lora_alpha`` updated (``lora_alpha`` = scale * r, or scale * sqrt(r) with rsLoRA).
        A DoRA layer also takes ``magnitude`` (DoRA's lora_magnitude_vector, in its shape: [out], a
        convolution's [1, out, 1, ...]); without one, it is set to ||W0 + scale B A|| per row, so the layer computes what the plain LoRA adapter does.
        A merged layer is unmerged, updated and merged again (exactly if it was), so its weight
        holds the new adapter; one merged for good (``drop_merge_state``) raises ValueError.
        ``scale``: a real number finite in float32, as the LoRA ops take it (ops._checks.as_scale),
        else TypeError / ValueError naming it, before anything changes."""
        a_name, b_name = self.factor_names
        A_old, B_old = getattr(self, a_name), getattr(self, b_name)
        where = f"{type(self).__name__}.set_lora_factors"
        A, B, r = self._new_factors(A, B, where)
        scale = as_scale(where, "scale", scale)
        if magnitude is not None and (not self.use_dora or tuple(magnitude.shape) != self._magnitude_shape(B.shape[0])):
            raise ValueError(f"{where}: " + (f"magnitude must be {list(self._magnitude_shape(B.shape[0]))}, got "
                                             f"{list(magnitude.shape)}"
                                             if self.use_dora else "magnitude given, but the layer is not DoRA "
                                             "(use_dora=False)"))
        with self._unmerged(where):
            if is_dtensor(A_old) or is_dtensor(B_old):
                raise ValueError(f"{where}: the factors are sharded (DTensor, after fully_shard or tensor "
                                 "parallelism); load the adapter before sharding, or into a single-process copy")
            set_factor(A_old, A.to(A_old.device, A_old.dtype))
            set_factor(B_old, B.to(A_old.device, A_old.dtype))
            self.r = r
            self.scaling = scale
            self.lora_alpha = lora_alpha_for(scale, r, self.use_rslora)
            if self.use_dora:
                self._set_magnitude(magnitude)

    @contextlib.contextmanager
    def _unmerged(self, where: str):
        """Runs the block (which changes the adapter or the weight) on the unmerged layer, then merges
        it again (exactly if it was), so a merged layer's weight holds what the block set; a layer
        merged for good (drop_merge_state) raises ValueError. Not merged: just runs the block."""
        if not getattr(self, "merged", False):
            yield
            return
        if self._merged_for_good():
            raise ValueError(f"{where}: the layer is merged for good (drop_merge_state / "
                             "merge_and_unload), so its adapter cannot be replaced")
        exact = self._merged_exactly()
        self.unmerge()
        yield
        self.merge(exact=exact)

    # ---------------------------------------------------------------- merging
    def _merge_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The matrix B @ A adds to (a conv's: [out, in * kernel], a copy when the weight's memory
        layout has no such view, e.g. channels_last); _store_merged writes a copy back."""
        return w

    @staticmethod
    def _store_merged(w: torch.Tensor, W: torch.Tensor) -> None:
        """After an in-place merge / unmerge of W = _merge_weight(w): W's values into w if W is a copy."""
        if W.data_ptr() != w.data_ptr():
            w.copy_(W.view(w.shape))

    def _merge_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:  # lora_factors() as 2-D A, B
        return self.lora_factors()

    def merge_refusal(self) -> str | None:
        """Why merging would change what the layer computes (None: it would not; see conv.py, embedding.py)."""
        return None

    def check_merge(self) -> None:
        """Raises ValueError if merging would put inf/NaN into the weight, or change what the layer
        computes (merge_refusal; changes nothing)."""
        if (why := self.merge_refusal()) is not None:
            raise ValueError(f"{type(self).__name__}.merge: {why}")
        A, B, s = self._merge_factors()
        check_merge_finite(self._merge_weight(self.weight.detach()), [A.detach()], [B.detach()], [s],
                           fan_in_fan_out=self._weight_in_out)
        if self.use_dora:  # the merged weight is g * (W + s B A): g too (a zero-norm row: inf / NaN)
            self._check_dora_merge()

    @torch.no_grad()
    def merge(self, safe: bool = False, exact: bool = True) -> None:
        """Folds the adapter into the weight (no-op if merged); forward then skips LoRA.

        ``safe=True`` raises ValueError, before touching the weight, if the merged weight would
        hold inf/NaN. ``exact=True`` keeps what is needed to unmerge bit for bit (a MergeState).
        """
        if self.merged:
            return
        self._check_unsharded("merge")
        A, B, s = self._merge_factors()
        if safe or self.merge_refusal() is not None:  # check_merge raises for both
            self.check_merge()
        W = self._merge_weight(self.weight.data)
        A, B = A.detach(), B.detach()
        if self.use_dora:  # round(g * (W0 + s B A)); the state unmerges, exactly with a copy of W0
            w0 = W.clone() if exact else None
            g = dora_merge_(W, A, B, s, self.lora_magnitude_vector.detach(), self._weight_in_out)
            state = DoraMergeState(W, w0, None if exact else (A.clone(), B.clone(), s, g), self._weight_in_out)
            factors = None
        else:
            state = MergeState() if exact else None
            merge_(W, A, B, s, fan_in_fan_out=self._weight_in_out, state=state)
            factors = None if exact else (A.clone(), B.clone(), s)
        self._store_merged(self.weight.data, W)
        self._merge_state, self._merged_factors = state, factors
        self.merged = True
        self._merged_data = self.weight.detach() if exact else None  # merged bits for _apply (no copy)
        self._merged_under, self._merged_over = (), ()  # merged last: on top (older links are stale)
        if (prev := _LAST_MERGED.get(id(self.weight))) not in (None, self) and prev.merged and prev.weight is self.weight:
            prev._merged_under, self._merged_over = (self,), (prev,)  # (tuples: not submodules)
        _LAST_MERGED[id(self.weight)] = self

    def _tied_stack(self) -> list["LoRALayer"]:
        """This merged layer after the layers merged later into its (tied) weight and still merged, last
        merged first: the order that unmerges them exactly (each gives back the weight the next merged into)."""
        stack = [self]
        while ((up := getattr(stack[0], "_merged_under", ())) and up[0].merged and up[0].weight is self.weight
               and up[0] not in stack):
            stack.insert(0, up[0])
        return stack

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the merged adapter out of the weight (bit for bit after an exact merge)."""
        if not self.merged:
            raise ValueError(f"unmerge: this {type(self).__name__} is not merged")
        if self._merged_for_good():
            raise ValueError(f"unmerge: this {type(self).__name__} is merged for good (drop_merge_state)")
        self._check_unsharded("unmerge")
        state = getattr(self, "_merge_state", None)
        W = self._merge_weight(self.weight.data)
        if isinstance(state, DoraMergeState):
            state.unmerge(W)
        elif state is not None:
            unmerge_(W, fan_in_fan_out=self._weight_in_out, state=state)
        else:  # plain merge: subtract what was added
            A, B, s = self._merged_factors
            unmerge_(W, A, B, s, fan_in_fan_out=self._weight_in_out)
        self._store_merged(self.weight.data, W)
        self._merge_state = self._merged_factors = self._merged_data = None
        self.merged = False

    def _merged_exactly(self) -> bool:
        state = getattr(self, "_merge_state", None)
        return state is not None and getattr(state, "exact", True)

    def _merged_for_good(self) -> bool:
        return self.merged and getattr(self, "_merge_state", None) is None and getattr(self, "_merged_factors", None) is None

    def train(self, mode: bool = True):
        """As nn.Module.train; ``train(True)`` unmerges a merged layer first (as loralib), since a
        merged layer's forward skips LoRA and its factors would get no gradient. A layer merged for
        good (drop_merge_state) with factors that require grad raises ValueError. Layers merged later
        into a tied weight (lm_head's, registered after wte) are unmerged first (_tied_stack)."""
        if mode and self.merged:
            if not self._merged_for_good():
                for m in self._tied_stack():
                    m.unmerge()
            elif any(getattr(self, n).requires_grad for n in self.lora_parameter_names):
                raise ValueError(f"train: this {type(self).__name__} is merged for good (drop_merge_state), so "
                                 "its forward skips LoRA and its factors would not train; freeze them "
                                 "(requires_grad_(False)) or use merge_and_unload")
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        """As nn.Module._apply (.half(), .to(dtype), .cuda(), ...). An exact merge is redone when
        the weight's dtype changes (MergeState.convert), so unmerge still gives W0 bit for bit, in
        the new dtype: the merged model converted equals the converted model merged, also when another
        module converted a tied weight first (the merged bits are then ``_merged_data``, kept at merge)."""
        state = getattr(self, "_merge_state", None) if self.merged else None
        old = self.weight.detach()
        low = getattr(self, "_merged_over", ())
        if self.merged and fn(old.reshape(-1)[:0]).dtype != old.dtype and (len(self._tied_stack()) > 1 or (
                low and low[0].merged and low[0].weight is self.weight)):  # (checked before anything converts)
            raise ValueError(f"{type(self).__name__}: several merged LoRA layers share this (tied) weight; converting "
                             "it to another dtype is not supported: unmerge the model (lora_ext.unmerge), convert, merge again")
        kept = getattr(self, "_merged_data", None) if state is not None else None
        if kept is not None and kept.dtype != old.dtype and kept.shape == old.shape and torch.equal(fn(kept), old):
            old = kept  # a tied weight another module converted first
        super()._apply(fn, recurse)
        new = self.weight.data
        self._merged_data = new if state is not None else None  # (old bits, converted, not kept alive)
        if isinstance(state, DoraMergeState):  # W0's copy moves (and converts) with the weight
            W = self._merge_weight(new)
            state.apply(fn, self._merge_weight(old), W, self._dora_remerge)
            self._store_merged(new, W)
            return self
        if (state is not None and new.dtype != old.dtype and old.dtype == state._dtype
                and new.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            W = self._merge_weight(new)
            state.convert(self._merge_weight(old), W, fn)
            self._store_merged(new, W)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A merged layer takes new factors as set_lora_factors does (unmerged, loaded, merged again),
        so its weight holds the loaded adapter; a state dict with its ``weight`` (merged or not?) or
        one for a layer merged for good is an error (load_state_dict raises RuntimeError)."""
        if not self.merged or not any(prefix + n in state_dict for n in self.lora_parameter_names + ("weight",)):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        where = f"{type(self).__name__} {prefix[:-1]!r} is merged" if prefix else f"this {type(self).__name__} is merged"
        if prefix + "weight" in state_dict:
            error_msgs.append(f"{where}, so a state dict with its weight is ambiguous (an unmerged model's "
                              "or a merged one's?); unmerge before loading an unmerged model's state dict")
        elif self._merged_for_good():
            error_msgs.append(f"{where} for good (drop_merge_state), so it cannot take new factors")
        else:
            with self._unmerged(where):
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)

    def _check_unsharded(self, what: str) -> None:
        # FSDP's unsharded weight is a temporary buffer (a merge into it is lost at the next reshard,
        # while forward skips LoRA); a DTensor weight is a shard the merge kernels do not take
        if is_dtensor(self.weight) or is_fsdp(self):
            raise ValueError(f"{what}: this {type(self).__name__} is sharded (fully_shard / tensor "
                             f"parallel); {what} before tensor-parallel sharding (fully_shard takes "
                             "unmerged layers), or in a copy (get_model_state_dict(..., full_state_dict=True))")

    def merge_overhead(self) -> float | None:
        """Exact-unmerge side information as a fraction of the weight's bytes (None: none kept)."""
        state = getattr(self, "_merge_state", None) if self.merged else None
        return None if state is None else state.overhead()

    def drop_merge_state(self) -> None:
        """Forgets how to unmerge (a merged layer then stays merged for good)."""
        self._merge_state = self._merged_factors = self._merged_data = None
        self._merged_under = ()

    # ---------------------------------------------------------------- wrapping / unwrapping
    def _adopt(self, module: nn.Module, where: str) -> None:
        """from_* constructors (layer built on meta): shares and freezes ``module``'s weight (and bias),
        allocates the factors on its device and dtype, records base_class; TypeError if the layer cannot
        stand in for it (wrappable.unwrappable: hooks, parametrizations, a subclass's own forward)."""
        if (why := unwrappable(module)) is not None:  # (hooks, parametrizations, a forward of its own)
            raise TypeError(f"{where}: the {type(module).__name__} {why}")
        w = module.weight
        self.weight = w
        w.requires_grad_(False)
        if "bias" in self._parameters:
            self.bias = module.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
        for name in self.lora_parameter_names:
            setattr(self, name, nn.Parameter(torch.empty(getattr(self, name).shape, device=w.device, dtype=w.dtype)))
        self.base_class = type(module)

    def base_module(self) -> nn.Module:
        """A module of the wrapped class (``base_class``) holding this layer's weight (merged or
        not) and bias: what merge_and_unload puts back. A linear layer built directly with
        fan_in_fan_out=True (weight [in, out], base_class nn.Linear) gives a transposed copy of it."""
        with torch.device("meta"):
            base = self._new_base()
        W = self.weight
        if self._weight_in_out and isinstance(base, nn.Linear):  # nn.Linear's weight is [out, in]
            W = nn.Parameter(W.detach().t().contiguous(), requires_grad=W.requires_grad)
        base.weight = W if isinstance(W, nn.Parameter) else nn.Parameter(W, requires_grad=False)
        if hasattr(base, "bias") and hasattr(self, "bias"):  # Linear, Conv1D, ConvNd; not Embedding
            base.bias = self.bias
        base.train(self.training)
        return base

    @abc.abstractmethod
    def _new_base(self) -> nn.Module:
        """An empty module of ``base_class`` with this layer's shape (weight set by the caller)."""


class LoRALinear(LoRALayer):
    """y = x W^T + b + scaling * B A dropout(x), W frozen, A/B trained (fused lora_linear op).

    ``fan_in_fan_out=True`` stores W as [in, out] (transformers' Conv1D layout).
    ``use_dora=True``: DoRA (PEFT's use_dora), y = g * (W + scaling B A) x + b with
    g = lora_magnitude_vector / ||W + scaling B A|| per output feature (dora.py); the magnitude
    [out] is trained too and starts at the norm, so a new layer computes what the base layer does.
    """

    lora_kind = "linear"
    factor_names = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, use_rslora: bool = False, bias: bool = True,
                 fan_in_fan_out: bool = False, init: str = "kaiming", device=None, dtype=None,
                 use_dora: bool = False):
        super().__init__()
        kw = self._init_linear(in_features, out_features, r, alpha, dropout, use_rslora, bias, fan_in_fan_out,
                               init, device, dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.use_dora = bool(use_dora)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **kw))
        self.reset_parameters()

    def _init_linear(self, in_features, out_features, r, alpha, dropout, use_rslora, bias, fan_in_fan_out,
                     init, device, dtype) -> dict:
        """What a linear LoRA layer (LoRALinear, MergedLinear) sets besides its factors: the checked
        hyperparameters and scaling, the frozen weight and bias; returns the factory kwargs."""
        _check_hparams(type(self).__name__, r, alpha, dropout)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.merged = False
        self.base_class: type = nn.Linear
        self.lora_init = init
        return kw

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False) -> "LoRALinear":
        """Wraps an nn.Linear or transformers Conv1D; shares (and freezes) its weight and bias.
        The layer is in the module's mode (train / eval), as base_module() gives it back."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"LoRALinear.from_linear: expected nn.Linear or transformers Conv1D, "
                            f"got {type(linear).__name__}")
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        with torch.device("meta"):
            layer = cls(in_f, out_f, r, alpha, dropout, use_rslora, bias=linear.bias is not None,
                        fan_in_fan_out=conv1d, use_dora=use_dora)
        layer._adopt(linear, f"{cls.__name__}.from_linear")
        layer.reset_lora_parameters(init)
        return layer.train(linear.training)  # an eval model's new layer must not drop out

    def reset_parameters(self) -> None:
        """Re-initializes everything (as nn.Linear.reset_parameters, then reset_lora_parameters with
        the layer's ``lora_init``): weight Kaiming-uniform (a=sqrt(5)), bias U(-1/sqrt(in), 1/sqrt(in)).
        A merged layer is unmerged first and merged again after, as by set_lora_factors."""
        with self._unmerged(f"{type(self).__name__}.reset_parameters"):
            w = self.weight.t() if self.fan_in_fan_out else self.weight  # [out, in]: fan in = in_features
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
            self.reset_lora_parameters(getattr(self, "lora_init", "kaiming"))

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A: Kaiming-uniform (a=sqrt(5), as PEFT) or Gaussian (std 1/r); B: zeros; DoRA's magnitude:
        the weight's row norms (so the layer computes what the base layer does). Sets ``lora_init``.
        A merged layer is unmerged first (a DoRA magnitude is W0's norms, not the merged weight's)
        and merged again after, as by set_lora_factors."""
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"{type(self).__name__}: init must be 'kaiming' or 'gaussian', got {init!r}")
        with self._unmerged(f"{type(self).__name__}.reset_lora_parameters"):
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
            self.lora_init = init
            if self.use_dora:
                self._set_magnitude(None)

    @property
    def _weight_in_out(self) -> bool:
        return bool(self.fan_in_fan_out)

    def _new_base(self) -> nn.Module:
        cls = getattr(self, "base_class", nn.Linear)
        if self.fan_in_fan_out and not issubclass(cls, nn.Linear):  # transformers Conv1D(nf=out, nx=in)
            return cls(self.out_features, self.in_features)
        try:  # (also fan_in_fan_out built directly, base_class nn.Linear: see base_module)
            return cls(self.in_features, self.out_features, bias=self.bias is not None)
        except TypeError:  # a Linear subclass with another signature
            return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        A, B = factors_like(x, self.lora_A, self.lora_B)
        if self.use_dora:
            return dora_linear(x, self.weight, self.bias, A, B, self.lora_magnitude_vector, self.scaling,
                               self.lora_dropout, self.training, self.fan_in_fan_out)
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling, self.lora_dropout,
                           self.training, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.lora_dropout}"
                + (", bias=False" if self.bias is None else "") + (", use_rslora=True" if self.use_rslora else "")
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", use_dora=True" if self.use_dora else "") + (", merged=True" if self.merged else ""))
