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

from typing import Optional, Sequence

import torch

from ._checks import as_scale, no_grad_needed, one_device

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
    """
    no_grad_needed("multi_lora_", y=y, x=x, A_pool=A_pool, B_pool=B_pool)
    torch.ops.lora_ext.multi_lora_.default(
        y, x, A_pool, B_pool, indices, scales, ranks,
        None if out_slices is None else [int(s) for s in out_slices], bad_index_count)
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
    return torch.ops.lora_ext.lora_shrink.counted(x, A_pool, indices, ranks, bad_index_count, scale)


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
    no_grad_needed("lora_expand_", y=y, u=u, B_pool=B_pool)
    torch.ops.lora_ext.lora_expand_.default(
        y, u, B_pool, indices, scales, ranks,
        None if out_slices is None else [int(s) for s in out_slices], bad_index_count,
        bool(add_inputs))
    return y


def _tokens(x):
    t = 1
    for s in x.shape[:-1]:
        t = t * s
    return t


@torch.library.register_fake("lora_ext::multi_lora_")
def _multi_lora_fake(y, x, A_pool, B_pool, indices, scales, ranks, out_slices=None,
                     bad_index_count=None):
    one_device("multi_lora_", y=y, x=x, A_pool=A_pool, B_pool=B_pool, indices=indices,
               scales=scales, ranks=ranks, bad_index_count=bad_index_count)
    n = 1 if out_slices is None else len(out_slices)
    torch._check(A_pool.dim() == (3 if out_slices is None else 4),
                 lambda: "multi_lora_: A_pool must be [S, r_max, in] ([n, S, r_max, in] with out_slices)")
    torch._check(B_pool.dim() == 3, lambda: "multi_lora_: B_pool must be [S, out, r_max]")
    torch._check(A_pool.shape[-1] == x.shape[-1] and B_pool.shape[1] == y.shape[-1]
                 and B_pool.shape[2] == A_pool.shape[-2] and B_pool.shape[0] == A_pool.shape[-3],
                 lambda: f"multi_lora_: shapes y {tuple(y.shape)}, x {tuple(x.shape)}, A_pool "
                         f"{tuple(A_pool.shape)}, B_pool {tuple(B_pool.shape)} do not fit")
    torch._check(indices.numel() == _tokens(x), lambda: "multi_lora_: one index per token")
    torch._check(n >= 1, lambda: "multi_lora_: out_slices must not be empty")
    return None


@torch.library.register_fake("lora_ext::lora_shrink")
def _lora_shrink_fake(x, A_pool, indices, ranks, scale=1.0):
    return _lora_shrink_counted_fake(x, A_pool, indices, ranks, None, scale)


@torch.library.register_fake("lora_ext::lora_shrink.counted")
def _lora_shrink_counted_fake(x, A_pool, indices, ranks, bad_index_count, scale=1.0):
    one_device("lora_shrink", x=x, A_pool=A_pool, indices=indices, ranks=ranks,
               bad_index_count=bad_index_count)
    torch._check(A_pool.dim() in (3, 4), lambda: "lora_shrink: A_pool must be 3-D or 4-D")
    torch._check(A_pool.shape[-1] == x.shape[-1], lambda: "lora_shrink: A_pool.shape[-1] != in")
    T = _tokens(x)
    torch._check(indices.numel() == T, lambda: "lora_shrink: one index per token")
    shape = (T, A_pool.shape[-2]) if A_pool.dim() == 3 else (A_pool.shape[0], T, A_pool.shape[-2])
    return x.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("lora_ext::lora_expand_")
def _lora_expand_fake(y, u, B_pool, indices, scales, ranks, out_slices=None,
                      bad_index_count=None, add_inputs=True):
    one_device("lora_expand_", y=y, u=u, B_pool=B_pool, indices=indices, scales=scales,
               ranks=ranks, bad_index_count=bad_index_count)
    torch._check(B_pool.dim() == 3 and B_pool.shape[1] == y.shape[-1]
                 and B_pool.shape[2] == u.shape[-1],
                 lambda: f"lora_expand_: shapes y {tuple(y.shape)}, u {tuple(u.shape)}, "
                         f"B_pool {tuple(B_pool.shape)} do not fit")
    return None
