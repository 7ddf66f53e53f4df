"""Multi-adapter LoRA ops: every token its own adapter (Punica/S-LoRA style SGMV/BGMV).

``multi_lora_`` is the whole update; ``lora_shrink`` and ``lora_expand_`` are its two halves
for callers that fuse differently. Fake kernels make all three traceable by
``torch.compile(fullgraph=True)``; none is differentiable (serving ops): arguments that require
grad (in grad mode) or carry forward-mode AD tangents raise RuntimeError.

Out-of-range indices: the CPU kernels raise. The CUDA kernels never touch memory for them:
such a token is treated as "no adapter" and counted into ``bad_index_count`` (an int32 tensor
on the device, e.g. ``LoRAContext.bad_index_count``) with an atomic add, so no host sync is
needed; check it whenever convenient (``int(count)`` syncs) and reset it with ``zero_()``.
Ranks are validated on CPU; on CUDA a rank outside 0..r_max is clamped into that range.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._checks import as_scale, fake_dims, fake_float, fake_like, no_grad_needed, one_device, wrote

__all__ = ["multi_lora_", "lora_shrink", "lora_expand_"]


def multi_lora_(y: torch.Tensor, x: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                indices: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                out_slices: Optional[Sequence[int]] = None, *,
                bad_index_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token multi-adapter LoRA, in place; returns ``y``.

    For every token t with ``a = indices[t] >= 0`` and ``r = ranks[a]``::

        y[t] += scales[a] * B_pool[a, :, :r] @ (A_pool[a, :r, :] @ x[t])

    Shapes: x [..., in], y [..., out] (same leading dims, T tokens in all), A_pool
    [S, r_max, in], B_pool [S, out, r_max], indices T int32/int64 (-1 = no adapter),
    scales [S] float32, ranks [S] int32 in 0..r_max (0 = empty slot; padded ranks cost
    nothing). x, y and the pools share one dtype: float32, float16 or bfloat16 (fp32
    accumulation, fp32 intermediate, y rounded once).

    ``out_slices`` (n column widths summing to out) applies n pools at once to column
    slices of y, e.g. packed q/k/v: A_pool is then [n, S, r_max, in], slice i uses
    A_pool[i] and rows out_off[i]:out_off[i+1] of B_pool; scales/ranks may be [n, S].
    Widths are ints (numpy ints and integer tensors too); a float or bool raises TypeError.
    """
    no_grad_needed("multi_lora_", y=y, x=x, A_pool=A_pool, B_pool=B_pool, scales=scales)
    torch.ops.lora_ext.multi_lora_.default(
        y, x, A_pool, B_pool, indices, scales, ranks, _slice_list("multi_lora_", out_slices),
        bad_index_count)
    wrote(y, bad_index_count)
    return y


def lora_shrink(x: torch.Tensor, A_pool: torch.Tensor, indices: torch.Tensor,
                ranks: torch.Tensor, scale: float = 1.0, *,
                bad_index_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First half: ``u[t, :r] = scale * A_pool[a, :r] @ x[t]`` as float32 [T, r_max].

    With a 4-D A_pool [n, S, r_max, in] the result is [n, T, r_max]. Entries past the
    token's rank and rows of tokens without adapter are zero. (``scale`` as in vLLM's
    ``lora_shrink``; per-adapter scales belong to ``lora_expand_``.)
    """
    no_grad_needed("lora_shrink", why="a serving op", x=x, A_pool=A_pool)
    scale = as_scale("lora_shrink", "scale", scale)
    if bad_index_count is None:
        return torch.ops.lora_ext.lora_shrink.default(x, A_pool, indices, ranks, scale)
    u = torch.ops.lora_ext.lora_shrink.counted(x, A_pool, indices, ranks, bad_index_count, scale)
    wrote(bad_index_count)
    return u


def lora_expand_(y: torch.Tensor, u: torch.Tensor, B_pool: torch.Tensor, indices: torch.Tensor,
                 scales: torch.Tensor, ranks: torch.Tensor,
                 out_slices: Optional[Sequence[int]] = None, *,
                 bad_index_count: Optional[torch.Tensor] = None, add_inputs: bool = True
                 ) -> torch.Tensor:
    """Second half, in place: ``y[t] += scales[a] * B_pool[a, :, :r] @ u[t, :r]``; returns y.

    u is [T, r_max] ([n, T, r_max] with out_slices), float32 as lora_shrink returns it or in
    y's dtype. ``add_inputs=False`` overwrites instead: ``y[t] = scales[a] * B_pool[a] @ u[t]``
    (rows of tokens without adapter become zero), as vLLM's ``add_inputs``.
    """
    no_grad_needed("lora_expand_", y=y, u=u, B_pool=B_pool, scales=scales)
    torch.ops.lora_ext.lora_expand_.default(
        y, u, B_pool, indices, scales, ranks, _slice_list("lora_expand_", out_slices),
        bad_index_count, bool(add_inputs))
    wrote(y, bad_index_count)
    return y


def _slice_list(op, out_slices):
    """out_slices as a list of ints (numpy ints and integer tensors too); a float or bool width
    raises TypeError (int() would truncate 2.5 to a valid width silently)."""
    if out_slices is None:
        return None
    widths = []
    for i, w in enumerate(out_slices):
        if isinstance(w, torch.SymInt):  # torch.compile with a varying width: the op checks it
            widths.append(w)
            continue
        if isinstance(w, torch.Tensor) and not w.is_floating_point() and w.dtype != torch.bool:
            w = int(w)  # a 1-element integer tensor (e.g. iterating over a tensor of widths)
        if isinstance(w, (bool, torch.Tensor)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"{op}: out_slices[{i}] must be an int column width, got "
                            f"{type(w).__name__} {w!r:.40}")
        widths.append(int(w))
    return widths


def _tokens(x):
    t = 1
    for s in x.shape[:-1]:
        t = t * s
    return t


_MAX_SLICES = 8  # kMaxSlices in csrc


def _check_slices(op, out, out_slices) -> int:
    """n, the number of column slices; the kernels' checks of out_slices against out."""
    if out_slices is None:
        return 1
    if not 1 <= len(out_slices) <= _MAX_SLICES:
        raise RuntimeError(f"{op}: out_slices must list 1 to {_MAX_SLICES} column widths, got {len(out_slices)}")
    torch._check(all(w >= 0 for w in out_slices) and sum(out_slices) == out,
                 lambda: f"{op}: out_slices {list(out_slices)} must be >= 0 and sum to out = {out}")
    return len(out_slices)


def _check_pool_a(op, x, A_pool, n, sliced) -> None:
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least 1 dim [..., in], got a scalar")
    fake_float(op, "x", x)
    if sliced:
        torch._check(A_pool.dim() == 4 and A_pool.shape[0] == n, lambda: f"{op}: with out_slices, A_pool "
                     f"must be 4-D [n, S, r_max, in] with n = {n}, got shape {list(A_pool.shape)}")
    else:
        fake_dims(op, A_pool=(A_pool, 3, "3-D [S, r_max, in]"))
    torch._check(A_pool.shape[-1] == x.shape[-1], lambda: f"{op}: A_pool must be [S, r_max, in] with "
                 f"in = {x.shape[-1]}, got {list(A_pool.shape)}")
    torch._check(A_pool.shape[-2] >= 1, lambda: f"{op}: A_pool needs r_max >= 1, got {list(A_pool.shape)}")
    fake_like(op, "x", x, A_pool=A_pool)


def _check_y(op, y, T, x_name, x) -> None:
    if y.dim() < 1:
        raise RuntimeError(f"{op}: y must have at least 1 dim [..., out]")
    torch._check(_tokens(y) == T, lambda: f"{op}: y must hold {T} tokens like {x_name} ({x_name} "
                 f"{list(x.shape)}, y {list(y.shape)})")


def _check_pool_b(op, B_pool, S, out, r_max) -> None:
    fake_dims(op, B_pool=(B_pool, 3, "3-D [S, out, r_max]"))
    torch._check(B_pool.shape[0] == S and B_pool.shape[1] == out and B_pool.shape[2] == r_max,
                 lambda: f"{op}: B_pool must be [S, out, r_max] = [{S}, {out}, {r_max}], got {list(B_pool.shape)}")


def _check_slot_args(op, T, S, n, indices, scales, ranks, bad_index_count) -> None:
    """indices, scales (None: the shrink has none), ranks and bad_index_count as the kernels check them."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    torch._check(indices.numel() == T, lambda: f"{op}: indices must have one entry per token ({T}), "
                 f"got {indices.numel()}")
    per_slice = {}
    for name, t, dt in (("ranks", ranks, torch.int32), ("scales", scales, torch.float32)):
        if t is None:
            continue
        if t.dtype != dt:
            raise RuntimeError(f"{op}: {name} must be {dt}, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise RuntimeError(f"{op}: {name} must be [S] = [{S}] or [n, S] = [{n}, {S}], got {list(t.shape)}")
        torch._check(t.shape[-1] == S and (t.dim() == 1 or t.shape[0] == n),
                     lambda: f"{op}: {name} must be [S] = [{S}] or [n, S] = [{n}, {S}], got {list(t.shape)}")
        per_slice[name] = t.dim() == 2
    if len(set(per_slice.values())) > 1 and n != 1:
        raise RuntimeError(f"{op}: scales and ranks must both be [S] or both [n, S]")
    if bad_index_count is not None and (bad_index_count.dtype != torch.int32 or bad_index_count.numel() < 1
                                        or not bad_index_count.is_contiguous()):
        raise RuntimeError(f"{op}: bad_index_count must be a contiguous int32 tensor with >= 1 element, "
                           f"got {bad_index_count.dtype} {list(bad_index_count.shape)}")


@torch.library.register_fake("lora_ext::multi_lora_")
def _multi_lora_fake(y, x, A_pool, B_pool, indices, scales, ranks, out_slices=None,
                     bad_index_count=None):
    op = "multi_lora_"
    one_device(op, y=y, x=x, A_pool=A_pool, B_pool=B_pool, indices=indices,
               scales=scales, ranks=ranks, bad_index_count=bad_index_count)
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least 1 dim [..., in], got a scalar")
    T = _tokens(x)
    _check_y(op, y, T, "x", x)
    if y.dim() != x.dim():
        raise RuntimeError(f"{op}: y must have the same dims as x ([..., out] vs [..., in]), got y "
                           f"{list(y.shape)} and x {list(x.shape)}")
    torch._check(all(a == b for a, b in zip(y.shape[:-1], x.shape[:-1])),
                 lambda: f"{op}: leading dims of y and x must match, got y {list(y.shape)} and x {list(x.shape)}")
    n = _check_slices(op, y.shape[-1], out_slices)
    _check_pool_a(op, x, A_pool, n, out_slices is not None)
    S, r_max = A_pool.shape[-3], A_pool.shape[-2]
    _check_pool_b(op, B_pool, S, y.shape[-1], r_max)
    fake_like(op, "x", x, B_pool=B_pool, y=y)
    _check_slot_args(op, T, S, n, indices, scales, ranks, bad_index_count)
    return None


@torch.library.register_fake("lora_ext::lora_shrink")
def _lora_shrink_fake(x, A_pool, indices, ranks, scale=1.0):
    return _lora_shrink_counted_fake(x, A_pool, indices, ranks, None, scale)


@torch.library.register_fake("lora_ext::lora_shrink.counted")
def _lora_shrink_counted_fake(x, A_pool, indices, ranks, bad_index_count, scale=1.0):
    op = "lora_shrink"
    one_device(op, x=x, A_pool=A_pool, indices=indices, ranks=ranks,
               bad_index_count=bad_index_count)
    fake_dims(op, A_pool=(A_pool, (3, 4), "[S, r_max, in] or [n, S, r_max, in]"))
    n = A_pool.shape[0] if A_pool.dim() == 4 else 1
    torch._check(1 <= n <= _MAX_SLICES, lambda: f"{op}: A_pool may hold 1 to {_MAX_SLICES} slices, got {n}")
    _check_pool_a(op, x, A_pool, n, A_pool.dim() == 4)
    T = _tokens(x)
    _check_slot_args(op, T, A_pool.shape[-3], n, indices, None, ranks, bad_index_count)
    shape = (T, A_pool.shape[-2]) if A_pool.dim() == 3 else (A_pool.shape[0], T, A_pool.shape[-2])
    return x.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("lora_ext::lora_expand_")
def _lora_expand_fake(y, u, B_pool, indices, scales, ranks, out_slices=None,
                      bad_index_count=None, add_inputs=True):
    op = "lora_expand_"
    one_device(op, y=y, u=u, B_pool=B_pool, indices=indices, scales=scales,
               ranks=ranks, bad_index_count=bad_index_count)
    if u.dtype not in (torch.float32, y.dtype):
        raise RuntimeError(f"{op}: u must be float32 (lora_shrink's output) or y's dtype {y.dtype}, "
                           f"got {u.dtype}")
    fake_dims(op, u=(u, 2 if out_slices is None else 3,
                     "[T, r_max]" if out_slices is None else "[n, T, r_max] with out_slices"))
    fake_float(op, "y", y)
    T, r_max = u.shape[-2], u.shape[-1]
    _check_y(op, y, T, "u", u)
    n = _check_slices(op, y.shape[-1], out_slices)
    torch._check(out_slices is None or u.shape[0] == n,
                 lambda: f"{op}: u must have n = {n} slices, got {list(u.shape)}")
    fake_dims(op, B_pool=(B_pool, 3, "3-D [S, out, r_max]"))
    S = B_pool.shape[0]
    _check_pool_b(op, B_pool, S, y.shape[-1], r_max)
    fake_like(op, "y", y, B_pool=B_pool)
    _check_slot_args(op, T, S, n, indices, scales, ranks, bad_index_count)
    return None
