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

from ._checks import F32_MAX, as_scale, fake_dims, fake_float, no_tangent, one_device, wrote
from .merge_state import CODE_WIDTHS, MergeState

__all__ = ["merge_", "unmerge_", "check_merge_finite", "dora_norm"]

_NOT_DIFFERENTIABLE = "is not differentiable (it writes in place)"


def _as_lists(op, A, B, scale):
    """(As, Bs, scales) from one adapter (A and B tensors) or sequences of several; TypeError /
    ValueError naming the op and the argument for anything else."""
    if isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor):
        return [A], [B], [as_scale(op, "scale", scale)]
    As, Bs = _tensor_list(op, "A", A, B), _tensor_list(op, "B", B, A)
    if len(As) != len(Bs):
        raise ValueError(f"{op}: A and B must hold one tensor per adapter, got {len(As)} and {len(Bs)}")
    if isinstance(scale, (list, tuple)):
        if len(scale) != len(As):
            raise ValueError(f"{op}: scale must hold one value per adapter ({len(As)}), got {len(scale)}")
        scales = [as_scale(op, f"scale[{i}]", s) for i, s in enumerate(scale)]
    else:
        scales = [as_scale(op, "scale", scale)] * len(As)
    return As, Bs, scales


def _tensor_list(op, name, value, other):
    if isinstance(value, torch.Tensor):  # and `other` is not: one adapter needs both
        raise TypeError(f"{op}: {name} is a tensor but {'B' if name == 'A' else 'A'} is "
                        f"{type(other).__name__}; pass both as tensors (one adapter) or both as "
                        "sequences of tensors (several)")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a tensor or a list/tuple of tensors, got "
                        f"{type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    return list(value)


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
    ``safe=True`` raises ValueError, before touching the weight, exactly when the result would
    hold non-finite values (check_merge_finite; with a state, the result of all merged adapters).
    """
    As, Bs, scales = _as_lists("merge_", A, B, scale)
    no_tangent("merge_", _NOT_DIFFERENTIABLE, weight=weight, A=As, B=Bs)
    if state is None:
        if safe:
            check_merge_finite(weight, As, Bs, scales, fan_in_fan_out=fan_in_fan_out)
        torch.ops.lora_ext.merge_.default(weight, As, Bs, scales, fan_in_fan_out)
        wrote(weight)
        return weight
    names = _names("merge_", name, len(As))
    state._check_layout(weight, fan_in_fan_out)
    new = [i for i, n in enumerate(names) if n not in state.merged]  # merged names: no-ops
    if safe and new:
        check_merge_finite(weight, [As[i] for i in new], [Bs[i] for i in new],
                           [scales[i] for i in new], fan_in_fan_out=fan_in_fan_out, state=state)
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
        wrote(weight)
        return weight
    state._check_layout(weight, fan_in_fan_out)
    state.unmerge(weight, None if name is None else _name_list("unmerge_", name))
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


def _name_list(op, name) -> list[str]:
    names = [name] if isinstance(name, str) else name
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{op}: name must be a str or a list/tuple of str, got {name!r:.80}")
    return list(names)


def _names(op, name, n):
    if name is None:
        return ["default"] if n == 1 else [f"adapter{i}" for i in range(n)]
    names = _name_list(op, name)
    if len(names) != n:
        raise ValueError(f"{op}: got {len(names)} names for {n} adapters")
    if len(set(names)) != n:
        raise ValueError(f"{op}: adapter names must be distinct, got {names}")
    return names


def check_merge_finite(weight: torch.Tensor, As, Bs, scales, *, fan_in_fan_out: bool = False,
                       chunk: int = 1 << 20, state: MergeState | None = None) -> None:
    """Raises ValueError (changing nothing) exactly when ``merge_(weight, As, Bs, scales)`` would
    leave non-finite values (inf or NaN) in ``weight``; with ``state`` (the weight's MergeState,
    ``merge_(..., state=state)``), when the exact merge of the adapters merged so far and these
    would, i.e. ``round(W0 + S)`` over all of them.

    It follows the kernels' arithmetic (csrc/merge_math.h): ``S`` is one fp32 fma chain over all
    adapters' concatenated ranks of ``fl32(s_a * B_a)`` times ``A_a``, and ``W0 + S`` is added in
    fp32 and rounded once. A weight already holding inf/NaN, or inf/NaN in an A or B, is refused
    (both always give a non-finite result). Then a magnitude bound, in float64 (it cannot overflow
    itself): ``max|W| + sum_a |s_a| max_o sum_j |B_a[o, j]| max|A_a|``; below half the dtype's
    largest value (room for every fp32 rounding), no overflow is possible and that is all
    (reductions over A, B and W: the common case). Else (or when ``fl32(s_a * B_a)`` itself may
    overflow) it runs the merge_ kernel itself on copies of ~``chunk`` elements of the weight at a
    time and looks at the bits it would write. As, Bs and scales take merge_'s forms: one
    adapter (A and B tensors) or sequences of several.
    """
    As, Bs, scales = _as_lists("check_merge_finite", As, Bs, scales)
    if weight.numel() == 0:
        return  # nothing to overflow
    w_max = _max_abs(weight)
    if not math.isfinite(w_max):
        raise ValueError("merge: the weight already holds non-finite values (inf or NaN)")
    dev = weight.device  # (a state's snapshots follow its weight when it next changes)
    old = [(a.A.to(dev), a.B.to(dev), a.scale) for a in state._adapters] if state is not None else []
    new = list(zip(As, Bs, scales))
    exact, s_old, s_new = False, 0.0, 0.0
    for i, (A, B, s) in enumerate(old + new):
        s = float(s)
        if not abs(s) <= F32_MAX:
            raise ValueError(f"merge: adapter {i - len(old)}: scale must be finite in float32, got {s}")
        if A.numel() == 0 or B.numel() == 0:
            continue  # no products (the kernel refuses rank 0 with its own message)
        a_max, b_max = _max_abs(A), _max_abs(B)
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            raise ValueError(f"merge: adapter {i - len(old)} has non-finite values (inf or NaN) in A or B")
        exact |= abs(s) * b_max >= F32_MAX / 2  # fl32(s * B) itself may overflow
        bound = abs(s) * B.double().abs().sum(1).max().item() * a_max
        s_old, s_new = (s_old + bound, s_new) if i < len(old) else (s_old, s_new + bound)
    # with a state, weight = round(W0 + S_old), so |W0| <= |weight| (1 + 2^-9) + |S_old| + 2^-25
    # (half an ulp; |S_old| <= 2 s_old with the fp32 roundings)
    bound = w_max * (1 + 2**-7) + 2 * s_old + 2**-20 + s_new if old else w_max + s_new
    if not exact and bound < torch.finfo(weight.dtype).max / 2:
        return
    if old:
        weight = state.original(weight)  # W0: the exact merge computes round(W0 + S_old+new)
    _check_merged_bits(weight, [t[0] for t in old + new], [t[1] for t in old + new],
                       [float(t[2]) for t in old + new], fan_in_fan_out, chunk)


def _max_abs(t: torch.Tensor) -> float:
    """max |t| as a Python float (inf or NaN when t holds one)."""
    lo, hi = torch.aminmax(t)
    lo, hi = lo.item(), hi.item()
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(abs(lo), abs(hi))


def _check_merged_bits(weight, As, Bs, scales, fan_in_fan_out, chunk) -> None:
    """Runs merge_'s kernel on copies of row blocks of ``weight`` (each element's S is the same fp32
    fma chain in any block or layout: csrc/merge_glue.h) and raises if a written value is not finite."""
    rows = weight.shape[0]
    step = max(1, chunk // max(weight.shape[1], 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = weight[r0:r1].clone(memory_format=torch.contiguous_format)  # the check never writes weight
        if fan_in_fan_out:  # weight [in, out]: its rows are A's columns
            torch.ops.lora_ext.merge_.default(w, [A[:, r0:r1] for A in As], Bs, scales, True)
        else:
            torch.ops.lora_ext.merge_.default(w, As, [B[r0:r1] for B in Bs], scales, False)
        if not torch.isfinite(w).all():
            raise ValueError(f"merge: merging would overflow to inf/NaN in rows {r0}..{r1 - 1} "
                             f"of the {weight.dtype} weight; nothing was changed")


@torch.library.register_fake("lora_ext::merge_")
def _merge_fake(weight, A, B, scales, fan_in_fan_out):
    one_device("merge_", weight=weight, A=A, B=B)
    _check_adapters_fake("merge_", weight, A, B, scales, fan_in_fan_out)
    fake_float("merge_", "weight", weight)
    return None


def _check_adapters_fake(op, weight, As, Bs, scales, fan_in_fan_out) -> None:
    """The kernels' checks of the adapters against the weight (csrc/merge_glue.h check_adapters)."""
    if not len(As) == len(Bs) == len(scales):
        raise RuntimeError(f"{op}: A, B and scales must have the same length, got {len(As)}, "
                           f"{len(Bs)} and {len(scales)}")
    fake_dims(op, weight=(weight, 2, "2-D"))
    out, n_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    for i, (A, B) in enumerate(zip(As, Bs)):
        fake_dims(op, **{f"A[{i}]": (A, 2, "2-D [r, in]"), f"B[{i}]": (B, 2, "2-D [out, r]")})
        torch._check(A.shape[0] >= 1, lambda: f"{op}: rank r = A[{i}].size(0) must be >= 1, got A {list(A.shape)}")
        torch._check(A.shape[1] == n_in, lambda: f"{op}: A[{i}] must be [r, in] with in = {n_in}, got A "
                     f"{list(A.shape)} for weight {list(weight.shape)}")
        torch._check(B.shape[0] == out and B.shape[1] == A.shape[0], lambda: f"{op}: B[{i}] must be [out, r] "
                     f"= [{out}, {A.shape[0]}], got B {list(B.shape)} for weight {list(weight.shape)}")
        fake_float(op, f"A[{i}]", A)
        fake_float(op, f"B[{i}]", B)


@torch.library.register_fake("lora_ext::remerge_")
def _remerge_fake(weight, codes, fails, bits, A_old, B_old, s_old, A_new, B_new, s_new,
                  fan_in_fan_out):
    one_device("remerge_", weight=weight, codes=codes, fails=fails, A_old=A_old, B_old=B_old,
               A_new=A_new, B_new=B_new)
    _check_adapters_fake("remerge_", weight, A_old, B_old, s_old, fan_in_fan_out)
    _check_adapters_fake("remerge_", weight, A_new, B_new, s_new, fan_in_fan_out)
    fake_float("remerge_", "weight", weight)
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
