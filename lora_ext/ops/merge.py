"""Merge ops (csrc/merge_*.h, csrc/cpu|cuda/merge*): fold LoRA deltas into weights, and take them
out again bit for bit — wrappers and fake kernels (the exact bookkeeping: merge_state.py); and
``dora_norm``, DoRA's norm of the merged weight's rows, without merging.

``merge_`` / ``unmerge_`` with ``state=None`` are the plain in-place ops
(``W += s * B @ A`` in fp32, rounded once). With a :class:`MergeState` they are exact:
after any sequence of merges and unmerges of any adapters, in any order, the weight is
``round(W0 + S)`` for the adapters currently merged (S summed in fp32), and when none is
merged it equals the original ``W0`` bit for bit. How: csrc/merge_math.h.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import F32_MAX, as_scale, no_tangent, one_device
from .merge_state import CODE_WIDTHS, MergeState

__all__ = ["merge_", "unmerge_", "check_merge_finite", "dora_norm"]

_NOT_DIFFERENTIABLE = "is not differentiable (it writes in place)"


def _as_lists(op, A, B, scale):
    if isinstance(A, torch.Tensor):
        return [A], [B], [as_scale(op, "scale", scale)]
    As, Bs = list(A), list(B)
    if isinstance(scale, (list, tuple)):
        scales = [as_scale(op, f"scale[{i}]", s) for i, s in enumerate(scale)]
    else:
        scales = [as_scale(op, "scale", scale)] * len(As)
    return As, Bs, scales


def merge_(weight: torch.Tensor, A, B, scale, *, fan_in_fan_out: bool = False,
           state: MergeState | None = None, name: str | None = None,
           safe: bool = False) -> torch.Tensor:
    """Adds LoRA deltas into ``weight`` in place; returns ``weight``.

    ``weight`` [out, in] (or [in, out] with ``fan_in_fan_out``, e.g. transformers Conv1D and
    embeddings) gets ``sum_a scale_a * B_a @ A_a`` with A_a [r_a, in], B_a [out, r_a]. A, B and
    scale may be one adapter or sequences of several (merged in one pass). The sum is computed
    in fp32 and rounded once into the weight's dtype (fp32, fp16 or bf16); A and B may have any
    of these dtypes. No full-size temporaries.

    With ``state`` (a :class:`MergeState` of this weight), the adapters are merged exactly: they
    can later be unmerged bit for bit with ``unmerge_(..., state=state, name=...)``. ``name``
    names the adapter (default ``"default"``; with several adapters, a sequence of names).
    ``safe=True`` raises ValueError, before touching the weight, if the result would hold
    non-finite values.
    """
    As, Bs, scales = _as_lists("merge_", A, B, scale)
    no_tangent("merge_", _NOT_DIFFERENTIABLE, weight=weight, A=As, B=Bs)
    if safe:
        check_merge_finite(weight, As, Bs, scales, fan_in_fan_out=fan_in_fan_out)
    if state is None:
        torch.ops.lora_ext.merge_.default(weight, As, Bs, scales, fan_in_fan_out)
        return weight
    names = _names(name, len(As))
    state._check_layout(weight, fan_in_fan_out)
    state.merge(weight, list(zip(names, As, Bs, scales)))
    return weight


def unmerge_(weight: torch.Tensor, A=None, B=None, scale=None, *, fan_in_fan_out: bool = False,
             state: MergeState | None = None, name: str | Sequence[str] | None = None) -> torch.Tensor:
    """Takes LoRA deltas out of ``weight`` in place; returns ``weight``.

    With ``state``: removes the adapter(s) ``name`` (default: every merged adapter) exactly;
    A, B and scale are not needed (the state keeps what was merged). Unmerging an adapter that
    is not merged raises ValueError. Without ``state``: ``W -= scale * B @ A`` rounded once,
    like every other implementation (not bit-exact: use a state for that).
    """
    no_tangent("unmerge_", _NOT_DIFFERENTIABLE, weight=weight, A=A, B=B)
    if state is None:
        if A is None or B is None or scale is None:
            raise ValueError("unmerge_: without a MergeState, A, B and scale are required")
        As, Bs, scales = _as_lists("unmerge_", A, B, scale)
        torch.ops.lora_ext.merge_.default(weight, As, Bs, [-s for s in scales], fan_in_fan_out)
        return weight
    state._check_layout(weight, fan_in_fan_out)
    names = None if name is None else ([name] if isinstance(name, str) else list(name))
    state.unmerge(weight, names)
    return weight


def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, *,
              fan_in_fan_out: bool = False) -> torch.Tensor:
    """DoRA's weight norm: ``n[o] = ||W[o, :] + scale * (B @ A)[o, :]||_2``, float32 ``[out]``.

    ``weight`` [out, in] (or [in, out] with ``fan_in_fan_out``, transformers Conv1D), A [r, in],
    B [out, r] (r may be 0: the row norms of W); fp32, fp16 or bf16, A and B in any of them. The
    delta is merge_'s fp32 ``fl32(scale * B) @ A`` and ``W + delta`` is not rounded to W's dtype;
    neither is materialised (W is read once). Squares are summed in fp32 in a fixed order
    (csrc/dora_math.h): the same bits on every run, thread count and device (CPU and CUDA).
    Not differentiable (DoRA detaches this norm): runs without autograd, the result does not
    require grad; a forward-mode AD tangent on an argument raises RuntimeError. Works under
    ``torch.compile(fullgraph=True)`` and in CUDA-graph capture.
    """
    no_tangent("dora_norm", "is not differentiable (DoRA detaches this norm): pass detached tensors",
               weight=weight, A=A, B=B)
    s = as_scale("dora_norm", "scale", scale)
    with torch.no_grad():
        return torch.ops.lora_ext.dora_norm.default(weight, A, B, s, fan_in_fan_out)


def _names(name, n):
    if name is None:
        return ["default"] if n == 1 else [f"adapter{i}" for i in range(n)]
    names = [name] if isinstance(name, str) else list(name)
    if len(names) != n:
        raise ValueError(f"merge_: got {len(names)} names for {n} adapters")
    if len(set(names)) != n:
        raise ValueError(f"merge_: adapter names must be distinct, got {names}")
    return names


def check_merge_finite(weight: torch.Tensor, As, Bs, scales, *, fan_in_fan_out: bool = False,
                       chunk: int = 1 << 20) -> None:
    """Raises ValueError if merging would leave non-finite values in ``weight``.

    Cheap in the common case (reductions and a magnitude bound); only when the bound cannot
    rule out an overflow is the merged result computed, in row chunks of ~``chunk`` elements.
    """
    if weight.numel() == 0:
        return  # nothing to overflow
    lo, hi = torch.aminmax(weight)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ValueError("merge: the weight already holds non-finite values (inf or NaN)")
    bound = max(abs(lo.item()), abs(hi.item()))
    for i, (A, B, s) in enumerate(zip(As, Bs, scales)):
        amin, amax = torch.aminmax(A) if A.numel() else (torch.zeros(()), torch.zeros(()))
        bsum = B.float().abs().sum(1).max().item() if B.numel() else 0.0
        vals = (amin.item(), amax.item(), bsum, float(s))
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"merge: adapter {i} has non-finite values in A, B or its scale")
        bound += abs(float(s)) * bsum * max(abs(vals[0]), abs(vals[1]))
        if abs(float(s)) * bsum >= F32_MAX / 2:  # fl32(s * B) itself may overflow: check for real
            bound = math.inf
    if bound < torch.finfo(weight.dtype).max / 2:
        return
    rows = weight.shape[0]
    step = max(1, chunk // max(weight.shape[1], 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = weight[r0:r1].to(torch.float32, copy=True)  # a copy: the check never writes weight
        for A, B, s in zip(As, Bs, scales):
            if fan_in_fan_out:
                w += A[:, r0:r0 + step].float().t() @ (B.float() * s).t()
            else:
                w += (B[r0:r0 + step].float() * s) @ A.float()
        if not torch.isfinite(w.to(weight.dtype)).all():
            raise ValueError(f"merge: merging would overflow to inf/NaN in rows {r0}..{r1 - 1} "
                             f"of the {weight.dtype} weight; nothing was changed")


@torch.library.register_fake("lora_ext::merge_")
def _merge_fake(weight, A, B, scales, fan_in_fan_out):
    one_device("merge_", weight=weight, A=A, B=B)
    torch._check(len(A) == len(B) == len(scales), lambda: "merge_: A, B and scales lengths differ")
    return None


@torch.library.register_fake("lora_ext::remerge_")
def _remerge_fake(weight, codes, fails, bits, A_old, B_old, s_old, A_new, B_new, s_new,
                  fan_in_fan_out):
    one_device("remerge_", weight=weight, codes=codes, fails=fails, A_old=A_old, B_old=B_old,
               A_new=A_new, B_new=B_new)
    torch._check(bits in CODE_WIDTHS, lambda: f"remerge_: bits must be one of {CODE_WIDTHS}")
    return None


@torch.library.register_fake("lora_ext::merge_points_")
def _merge_points_fake(weight, idx, vals, A, B, scales, fan_in_fan_out):
    one_device("merge_points_", weight=weight, idx=idx, vals=vals, A=A, B=B)
    torch._check(idx.shape == vals.shape, lambda: "merge_points_: idx and vals shapes differ")
    return None


@torch.library.register_fake("lora_ext::merge_code_failures")
def _merge_code_failures_fake(w0, s):
    one_device("merge_code_failures", w0=w0, s=s)
    torch._check(w0.numel() == s.numel(), lambda: "merge_code_failures: one sum per element")
    return w0.new_empty((4,), dtype=torch.int64)


_DORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("lora_ext::dora_norm")
def _dora_norm_fake(weight, A, B, scale, fan_in_fan_out):
    op = "dora_norm"
    one_device(op, weight=weight, A=A, B=B)
    layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
    for name, t, want in (("weight", weight, layout), ("A", A, "[r, in]"), ("B", B, "[out, r]")):
        if t.dim() != 2:
            raise RuntimeError(f"{op}: {name} must be 2-D {want}, got shape {tuple(t.shape)}")
        if t.dtype not in _DORA_DTYPES:
            raise RuntimeError(f"{op}: {name} has dtype {t.dtype}; supported are float32, float16 "
                               "and bfloat16")
    out, n_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    torch._check(A.shape[1] == n_in, lambda: f"{op}: A must be [r, in] with in = {n_in} (weight "
                 f"{tuple(weight.shape)} is {layout}), got A {tuple(A.shape)}")
    torch._check(B.shape[0] == out and B.shape[1] == A.shape[0],
                 lambda: f"{op}: B must be [out, r] = [{out}, {A.shape[0]}], got B {tuple(B.shape)}")
    return weight.new_empty((out,), dtype=torch.float32)
