"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``): the functional linear forward, the
magnitude's initial value, and merging / unmerging (DoraLayer: what LoRALinear and LoRAConvNd share;
a convolution's DoRA runs on its weight's [out, in * prod(kernel)] view, see lora_ext.conv).

A DoRA layer computes ``y = g * (W0 + s B A) x + b`` per output feature o, with
``g[o] = m[o] / ||W0[o] + s B[o] A||`` (m: the trained ``lora_magnitude_vector`` [out]). As in PEFT
(and section 4.3 of the DoRA paper) the norm is a constant for autograd: gradients reach m, A, B
(and x) but not through the norm. The norm comes from ``ops.dora_norm``, which computes the rows of
W0 + s B A tile by tile in fp32 and never materializes the [out, in] delta (PEFT builds it twice per
forward); it is rounded to m's dtype before the division, as PEFT rounds it to the weight's, so a
fresh layer (m = that norm) has g = 1 exactly. It then computes exactly what the base layer does in
fp32, and in fp16 / bf16 without a bias; in fp16 / bf16 with a bias, ``g * z + b`` adds the bias to
z = (W0 + s B A) x already rounded to that dtype, where F.linear rounds x W0^T + b once, so an
output may differ from the base layer's by that one extra rounding (half an ulp of z; PEFT's fresh
16-bit DoRA layer is not exact either).

With dropout in training, PEFT's forward is ``W0 x + b + (g - 1) W0 d(x) + g s B A d(x)`` (d: the
dropout): the base GEMM runs on x and on d(x). lora_ext computes the same expression.

Merging writes ``round(g * (W0 + s B A))`` (fp32 inside, rounded once into the weight's dtype).
``DoraMergeState`` keeps what unmerging needs: exact, a copy of W0 (1x the weight's bytes); or not
exact, the factors and g, unmerged as PEFT does (``W / g - s B A``, not bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import dora_norm, lora_linear, merge_, unmerge_
from .ops.merge_state import check_probe, take_probe

__all__ = ["dora_scale", "dora_linear", "dora_merge_", "DoraMergeState", "DoraLayer"]


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """g = m / ||W0 + s B A|| per output feature, fp32 [out]; differentiable in m only (the norm is
    detached). The norm is rounded to m's dtype first (as PEFT's is to the weight's). m: [out], or a
    convolution's magnitude as PEFT stores it ([1, out, 1, ...]; read as [out])."""
    with torch.no_grad():
        n = dora_norm(weight.detach(), A.detach(), B.detach(), scale, fan_in_fan_out=fan_in_fan_out)
        n = n.to(magnitude.dtype).to(n.dtype)
    return magnitude.reshape(-1).to(n.dtype) / n


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float = 0.0,
                training: bool = False, fan_in_fan_out: bool = False) -> torch.Tensor:
    """DoRA linear layer, x [..., in] -> [..., out]: ``g * (x W0^T + s (x A^T) B^T) + b`` with
    g = dora_scale(...) (PEFT's forward; with dropout in training PEFT's dropout form, see the module
    docstring). weight [out, in] ([in, out] with fan_in_fan_out), A [r, in], B [out, r], m [out]."""
    g = dora_scale(magnitude, weight, A, B, scale, fan_in_fan_out)
    if not training or dropout_p == 0:
        z = lora_linear(x, weight, None, A, B, scale, 0.0, False, fan_in_fan_out)  # (W0 + s B A) x
        g = g.to(z.dtype)
        return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
    W = weight.t() if fan_in_fan_out else weight
    xd = F.dropout(x, dropout_p, True)
    u = F.linear(xd, W)  # W0 d(x)
    v = F.linear(F.linear(xd, A), B) * scale  # s B A d(x)
    g = g.to(u.dtype)
    return F.linear(x, W, bias) + (g - 1) * u + g * v


class DoraMergeState:
    """What unmerging a DoRA layer needs (LoRALinear keeps it as its ``_merge_state``): exact, a copy
    of W0; else the factors and g (PEFT's unmerge, ``W / g - s B A``, not bit for bit). ``weight``: the
    merged weight; an exact state keeps MergeState's probe of it, so unmerging a weight written since
    the merge (which restoring W0 would undo) raises ValueError, as MergeState does."""

    def __init__(self, weight: torch.Tensor, w0: torch.Tensor | None, factors: tuple | None, fan_in_fan_out: bool):
        self.w0, self.factors, self.fan_in_fan_out = w0, factors, fan_in_fan_out
        self._probe = take_probe(weight) if w0 is not None else None

    @property
    def exact(self) -> bool:
        return self.w0 is not None

    def check(self, weight: torch.Tensor) -> None:
        """Raises ValueError (changes nothing) if ``weight`` cannot be the merged weight of this state
        (another shape; exact: another dtype than W0's copy, or written since the merge).
        lora_ext.unmerge checks every layer first."""
        if self.w0 is not None:
            shape, dtype = tuple(self.w0.shape), self.w0.dtype
        else:  # W / g - s B A works in any dtype
            A, B = self.factors[:2]
            shape = (A.shape[1], B.shape[0]) if self.fan_in_fan_out else (B.shape[0], A.shape[1])
            dtype = weight.dtype
        if tuple(weight.shape) != shape or weight.dtype != dtype:
            raise ValueError(f"DoraMergeState: the weight is {tuple(weight.shape)} {weight.dtype}, but the DoRA merge "
                             f"was of a {shape} {dtype} weight (replaced since the merge?)")
        check_probe(weight, getattr(self, "_probe", None), "DoraMergeState")  # None: pickled before probes

    def overhead(self) -> float:
        """Bytes kept beside the weight, as a fraction of the weight's (1.0: the W0 copy)."""
        return 1.0 if self.w0 is not None else 0.0

    def unmerge(self, weight: torch.Tensor) -> None:
        self.check(weight)
        if self.w0 is not None:
            weight.copy_(self.w0)
            return
        A, B, s, g = self.factors
        Wf = weight.float()  # the weight itself when fp32
        Wf.div_(_along_out(g.to(Wf.device), self.fan_in_fan_out))
        unmerge_(Wf, A.to(Wf.device), B.to(Wf.device), s, fan_in_fan_out=self.fan_in_fan_out)
        weight.copy_(Wf)

    def apply(self, fn, old: torch.Tensor, new: torch.Tensor, merge_again) -> None:
        """After nn.Module._apply(fn) (``.to()``, ``.half()``...) moved the merged weight ``old`` to
        ``new``: W0's copy goes through fn too, and after a change to another fp32/fp16/bf16 dtype the
        merge is redone from it (merge_again(new)), so the converted merged layer equals the converted
        layer merged (other dtypes, e.g. ``.double()``: the merged weight is converted as it is). A dtype
        change first checks ``old`` (ValueError if written since the merge: the write would be lost, as
        in MergeState.convert), then probes ``new``."""
        if self.w0 is None:
            return
        w0 = fn(self.w0)
        if w0.dtype != self.w0.dtype:
            self.check(old)
            if w0.dtype in (torch.float32, torch.float16, torch.bfloat16):
                new.copy_(w0)
                merge_again(new)
            self._probe = take_probe(new)
        self.w0 = w0


def _along_out(g: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """g [out] shaped to scale a weight's output features ([out, 1], or [1, out] for [in, out])."""
    return g.view(1, -1) if fan_in_fan_out else g.view(-1, 1)


@torch.no_grad()
def dora_merge_(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """weight <- round(g * (W0 + s B A)) in place (computed in fp32, rounded once); returns g (fp32 [out],
    from the unmerged weight, as forward computes it)."""
    g = dora_scale(magnitude, weight, A, B, scale, fan_in_fan_out).float()
    Wf = weight.float()  # the weight itself when fp32
    merge_(Wf, A, B, scale, fan_in_fan_out=fan_in_fan_out)
    Wf.mul_(_along_out(g, fan_in_fan_out))
    weight.copy_(Wf)
    return g


class DoraLayer:
    """The DoRA part of a LoRA layer (LoRALayer derives from it; ``use_dora`` layers have the
    parameter ``lora_magnitude_vector``): its shape, its initial value, the merge check and the
    re-merge after a dtype change, all on the weight's 2-D view (``_merge_weight`` / ``_merge_factors``)."""

    use_dora: bool = False

    def _magnitude_shape(self, out: int) -> tuple[int, ...]:
        """lora_magnitude_vector's shape as PEFT stores it for ``out`` output features ([out] here)."""
        return (out,)

    @torch.no_grad()
    def _set_magnitude(self, magnitude: torch.Tensor | None) -> None:
        """DoRA's magnitude <- ``magnitude``, or ||W + scaling B A|| per output feature (PEFT's initial value)."""
        if magnitude is None:
            A, B, s = self._merge_factors()
            magnitude = dora_norm(self._merge_weight(self.weight), A, B, s, fan_in_fan_out=self._weight_in_out)
        self.lora_magnitude_vector.copy_(magnitude.reshape(self.lora_magnitude_vector.shape))

    def _dora_remerge(self, W: torch.Tensor) -> None:  # DoraMergeState.apply: merge W0 (2-D view) again
        A, B, s = self._merge_factors()
        dora_merge_(W, A.detach(), B.detach(), s, self.lora_magnitude_vector.detach(), self._weight_in_out)

    def _check_dora_merge(self) -> None:
        """ValueError if the merged weight g·(W + s·B·A) would hold inf/NaN (changes nothing)."""
        W = self._merge_weight(self.weight.detach()).clone()
        self._dora_remerge(W)
        if not torch.isfinite(W).all():
            raise ValueError(f"merge: the DoRA merge g·(W + s·B·A) would overflow to inf/NaN in the {W.dtype} "
                             "weight (g = lora_magnitude_vector / ||W + s·B·A|| per output feature: a zero-norm "
                             "row or a huge magnitude); nothing was changed")
