"""LoRAConv1d / LoRAConv2d / LoRAConv3d: HF PEFT's LoRA of nn.Conv1d / nn.Conv2d / nn.Conv3d.

    names = lora_ext.inject(unet, target_modules=["conv1", "conv2", "to_q"], r=4, alpha=4)
    layer = lora_ext.LoRAConv2d.from_conv(nn.Conv2d(64, 128, 3, padding=1), r=8, alpha=16)

As PEFT 0.21's lora Conv1d/2d/3d (peft/tuners/lora/layer.py, _ConvNd): A is a convolution from
in to r channels with the base layer's kernel size, stride and padding, no bias; B a 1x1(x1)
convolution from r to out channels; y = conv(x; W, b) + scaling * B(A(dropout(x))), scaling =
alpha / r (alpha / sqrt(r) with rsLoRA). Parameters (and PEFT's saved factors) ``lora_A``
[r, in, *kernel] and ``lora_B`` [out, r, 1, ...]; B starts at zero.

Seen as matrices over the weight's [out, in * prod(kernel)] view, the LoRA term is the
convolution with scaling * B[out, r] @ A[r, in * prod(kernel)]: merge / unmerge (exact, with a
MergeState) run the merge ops on that 2-D view of the weight (LoRALayer._merge_weight /
_merge_factors; a channels_last weight has no such view: a copy, written back), as PEFT's merge
adds the same delta.

What PEFT does and this layer therefore does too: A is never dilated and pads with zeros whatever
the base layer's ``dilation`` / ``padding_mode`` (PEFT builds it from kernel size, stride and
padding only). Where that makes the merged layer compute something else (a dilation > 1 on a
kernel dimension > 1; a padding_mode other than "zeros" with a non-zero padding) merge raises
ValueError (PEFT merges anyway and changes the outputs); a dilated base with an explicit padding
gives A another output size than the base, so forward raises ValueError naming the layer (PEFT
fails on the addition).

A grouped base (``groups`` = G > 1), as PEFT's: A is still the full convolution from in to r channels
(not grouped) and B a grouped 1x1 convolution (G groups of r / G channels to out / G), lora_B
[out, r / G, 1, ...]; r must be divisible by G. Such a LoRA term is no weight of the grouped base's
shape: merge is refused (merge_refusal; PEFT refuses too), and so are DoRA (PEFT reshapes B @ A, which
is not the term's weight, into the base weight's shape for its norm) and combine.

``use_dora=True``: DoRA as PEFT's DoraConvNdVariant. ``lora_magnitude_vector`` in PEFT's shape
[1, out, 1, ...] starts at the per-output-channel norm of W + scaling B A (over the [out, in *
prod(kernel)] view, ops.dora_norm); with g = m / that norm (detached),
y = conv(x; W, b) + (g - 1) conv(x; W) + g * scaling * B(A(x)); with dropout in training, as PEFT,
x is dropped out once and conv(d(x); W) and B(A(d(x))) both take d(x); as PEFT's, conv(d(x); W) pads
with zeros (F.convNd with the base layer's stride, padding, dilation and groups) whatever its
padding_mode, while conv(x; W, b) pads as the base layer does. Merge / unmerge: the DoRA
merge of lora_ext.dora on the 2-D view (exact unmerge with a copy of W0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hparams import _check_hparams, lora_scaling
from .dora import dora_scale
from .layers import LoRALayer, LoRALinear, factors_like

__all__ = ["LoRAConvNd", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "is_conv", "check_conv_base",
           "check_conv_factors"]

_BASES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FUNCS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d / nn.Conv2d / nn.Conv3d (or a subclass; not the transposed convolutions)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def check_conv_base(where: str, conv: nn.Module, r: int | None = None, use_dora: bool = False) -> None:
    """ValueError starting with ``where`` for a convolution a LoRA conv layer of rank ``r`` (None: any)
    cannot stand in for: a grouped one takes a rank divisible by its groups and no DoRA."""
    G = conv.groups
    if G > 1 and r is not None and r % G:
        raise ValueError(f"{where}: {type(conv).__name__} with groups={G} takes a rank r divisible by groups "
                         f"(lora_B is grouped as the convolution, as PEFT's), got r={r}")
    if G > 1 and use_dora:
        raise ValueError(f"{where}: DoRA of a {type(conv).__name__} with groups={G} is not supported: the LoRA "
                         "term of a grouped convolution is no weight of its shape, which DoRA's norm needs (PEFT "
                         "reshapes B @ A into it, another function); use plain LoRA here")


def check_conv_factors(where: str, conv: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """ValueError starting with ``where`` unless A is [r, in, *kernel] and B [out, r / groups, 1, ...]
    (r > 0, divisible by groups) for the convolution ``conv`` (an nn.ConvNd or a LoRA conv layer):
    PEFT's lora_A / lora_B weights."""
    out_c, in_c, *kernel = conv.weight.shape
    G = conv.groups
    in_c *= G  # the weight's dim 1 is in / groups; A takes every input channel
    r = A.shape[0] if A.dim() >= 1 else 0
    want_a, want_b = (r, in_c, *kernel), (out_c, r // G, *[1] * len(kernel))
    if r == 0 or r % G or tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        k = ", ".join(map(str, kernel))
        per = "r" if G == 1 else f"r / {G}"
        raise ValueError(f"{where}: the {type(conv).__name__} ({in_c} -> {out_c} channels, kernel ({k})"
                         + (f", groups={G}" if G > 1 else "") + f") takes lora_A [r, {in_c}, {k}] and lora_B "
                         f"[{out_c}, {per}, {', '.join('1' * len(kernel))}] with r > 0"
                         + (f" divisible by {G}" if G > 1 else "")
                         + f", got lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")


class LoRAConvNd(LoRALayer):
    """y = conv(x; W, b) + scaling * B(A(dropout(x))), W frozen; see lora_ext.conv. Subclasses
    LoRAConv1d / LoRAConv2d / LoRAConv3d fix the number of spatial dimensions."""

    lora_kind = "conv"
    factor_names = ("lora_A", "lora_B")
    _dims = 0
    _weight_in_out = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming", device=None, dtype=None,
                 use_dora: bool = False):
        super().__init__()
        name = type(self).__name__
        if self._dims not in _BASES:
            raise TypeError(f"{name}: build a LoRAConv1d, LoRAConv2d or LoRAConv3d (or use LoRAConvNd.from_conv)")
        _check_hparams(name, r, alpha, dropout)
        # the base class's own argument checks and normal forms (tuples; "same" / "valid" kept)
        probe = _BASES[self._dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                   bias, padding_mode, device="meta")
        check_conv_base(name, probe, r, use_dora)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(probe, attr))
        kw = {"device": device, "dtype": dtype}
        self.r, self.lora_alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_dropout = dropout
        self.weight = nn.Parameter(torch.empty(probe.weight.shape, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(self.r, in_channels, *self.kernel_size, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_channels, self.r // self.groups, *[1] * self._dims, **kw))
        self.use_dora = bool(use_dora)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self._magnitude_shape(out_channels), **kw))
        self.merged = False
        self.base_class: type = _BASES[self._dims]
        self.lora_init = init
        self.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                  use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False) -> "LoRAConvNd":
        """Wraps an nn.Conv1d / nn.Conv2d / nn.Conv3d (LoRAConvNd.from_conv picks the class); shares
        (and freezes) its weight and bias; in the module's mode (train / eval)."""
        dims = next((d for d, base in _BASES.items() if isinstance(conv, base)), None)
        if dims is None or (cls is not LoRAConvNd and cls._dims != dims):
            want = "nn.Conv1d, nn.Conv2d or nn.Conv3d" if cls is LoRAConvNd else _BASES[cls._dims].__name__
            raise TypeError(f"{cls.__name__}.from_conv: expected {want}, got {type(conv).__name__}")
        klass = _LAYERS[dims] if cls is LoRAConvNd else cls
        check_conv_base(f"{klass.__name__}.from_conv", conv, r, use_dora)
        with torch.device("meta"):
            layer = klass(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, r=r, alpha=alpha,
                          dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
        layer._adopt(conv, f"{klass.__name__}.from_conv")
        layer.reset_lora_parameters(init)
        return layer.train(conv.training)

    def reset_parameters(self) -> None:
        """As nn.ConvNd.reset_parameters (weight Kaiming-uniform a=sqrt(5), bias U(-1/sqrt(fan_in), ..)),
        then reset_lora_parameters with the layer's ``lora_init`` (merged: unmerged, merged again after)."""
        with self._unmerged(f"{type(self).__name__}.reset_parameters"):
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
            self.reset_lora_parameters(getattr(self, "lora_init", "kaiming"))

    # LoRALinear's: A Kaiming-uniform (a=sqrt(5), as PEFT's conv) or Gaussian (std 1/r), B zeros;
    # DoRA's magnitude: the norms of W + scaling B A per output channel
    reset_lora_parameters = LoRALinear.reset_lora_parameters

    # ---------------------------------------------------------------- factors and merging
    def _magnitude_shape(self, out: int) -> tuple[int, ...]:
        """PEFT's conv lora_magnitude_vector: [1, out, 1, ...] (its norm with keepdim, transposed)."""
        return (1, out, *[1] * self._dims)

    def _new_factors(self, A: torch.Tensor, B: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        check_conv_factors(where, self, A, B)
        return A, B, A.shape[0]

    def _merge_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight [out, in, *kernel] as the [out, in * prod(kernel)] matrix B @ A updates: a view,
        or for another memory layout (channels_last) a copy in that order, which LoRALayer writes
        back after the merge / unmerge (the same bits either way)."""
        return w.reshape(w.shape[0], -1)

    def _merge_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B, s = self.lora_factors()
        return A.flatten(1), B.flatten(1), s

    def _dilated(self) -> bool:
        return any(d > 1 and k > 1 for d, k in zip(self.dilation, self.kernel_size))

    def merge_refusal(self) -> str | None:
        if self.groups > 1:
            return (f"groups={self.groups}: lora_A takes every input channel (as PEFT's), so the LoRA term is no "
                    "weight of the grouped convolution's shape (PEFT refuses to merge it too)")
        if self._dilated():
            return (f"dilation={self.dilation}: lora_A is not dilated (as PEFT's), so the merged weight, which "
                    "the convolution dilates, would compute something else")
        padded = (any(k > 1 for k in self.kernel_size) if self.padding == "same"
                  else not isinstance(self.padding, str) and any(self.padding))
        if self.padding_mode != "zeros" and padded:
            return (f"padding_mode={self.padding_mode!r}: lora_A pads with zeros (as PEFT's), so the merged "
                    "weight, padded as the base layer pads, would compute something else at the borders")
        return None

    # ---------------------------------------------------------------- module
    def _new_base(self) -> nn.Module:
        args = (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                self.groups, self.bias is not None, self.padding_mode)
        try:
            return self.base_class(*args)
        except TypeError:  # a Conv subclass with another signature
            return _BASES[self._dims](*args)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped convolution (torch's own code: padding_mode, dilation, groups)."""
        return _BASES[self._dims]._conv_forward(self, x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.merged:
            return out
        A, B = factors_like(x, self.lora_A, self.lora_B)
        dropped = self.lora_dropout > 0 and self.training
        h = F.dropout(x, self.lora_dropout, True) if dropped else x
        conv = _FUNCS[self._dims]
        delta = conv(conv(h, A, None, self.stride, self.padding), B, None, 1, 0, 1, self.groups)
        if delta.shape != out.shape:  # only a dilated base with an explicit padding (see the module docstring)
            raise ValueError(f"{type(self).__name__}.forward: lora_A (not dilated, as PEFT's) gives "
                             f"{tuple(delta.shape)} but the dilated convolution {tuple(out.shape)} for input "
                             f"{tuple(x.shape)} (dilation={self.dilation}, padding={self.padding}); use "
                             "padding='same' or leave this layer out of target_modules")
        if not self.use_dora:
            return out + delta * self.scaling
        # PEFT's DoraConvNdVariant: out + (g - 1) conv(x or d(x); W) + g * scaling * delta
        g = dora_scale(self.lora_magnitude_vector, self._merge_weight(self.weight), A.flatten(1), B.flatten(1),
                       self.scaling).to(out.dtype).view(-1, *[1] * self._dims)  # (also unbatched x: [C, ...])
        if dropped:  # PEFT's conv_fn(d(x), W, ...): zero padding whatever the padding_mode, as A's
            base = conv(h, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        else:  # (under autocast out is 16-bit, the bias fp32: the sum is cast back, as PEFT's result)
            base = out if self.bias is None else out - self.bias.view(-1, *[1] * self._dims)
        return (out + ((g - 1) * base + g * delta * self.scaling)).to(out.dtype)

    def extra_repr(self) -> str:
        opts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"]
        for k, default in (("padding", (0,) * self._dims), ("dilation", (1,) * self._dims), ("groups", 1),
                           ("padding_mode", "zeros")):
            if getattr(self, k) != default:
                opts.append(f"{k}={getattr(self, k)!r}" if isinstance(getattr(self, k), str) else f"{k}={getattr(self, k)}")
        opts.append(f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.lora_dropout}")
        return ", ".join(opts + (["bias=False"] if self.bias is None else []) + (["use_rslora=True"] if self.use_rslora else [])
                         + (["use_dora=True"] if self.use_dora else []) + (["merged=True"] if self.merged else []))


class LoRAConv1d(LoRAConvNd):
    """PEFT's LoRA of an nn.Conv1d: lora_A [r, in, k], lora_B [out, r / groups, 1]."""
    _dims = 1


class LoRAConv2d(LoRAConvNd):
    """PEFT's LoRA of an nn.Conv2d: lora_A [r, in, kh, kw], lora_B [out, r / groups, 1, 1]."""
    _dims = 2


class LoRAConv3d(LoRAConvNd):
    """PEFT's LoRA of an nn.Conv3d: lora_A [r, in, kd, kh, kw], lora_B [out, r / groups, 1, 1, 1]."""
    _dims = 3


_LAYERS = {1: LoRAConv1d, 2: LoRAConv2d, 3: LoRAConv3d}
