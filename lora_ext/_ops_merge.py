"""Merge ops: fold LoRA deltas into weights, and take them out again bit for bit.

``merge_`` / ``unmerge_`` with ``state=None`` are the plain in-place ops
(``W += s * B @ A`` in fp32, rounded once). With a :class:`MergeState` they are exact:
after any sequence of merges and unmerges of any adapters, in any order, the weight is
``round(W0 + S)`` for the adapters currently merged (S summed in fp32), and when none is
merged it equals the original ``W0`` bit for bit. How: csrc/merge_math.h.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._checks import as_scale, one_device

__all__ = ["merge_", "unmerge_", "MergeState", "check_merge_finite"]

_BITS = (0, 1, 2, 4)


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


def _names(name, n):
    if name is None:
        return ["default"] if n == 1 else [f"adapter{i}" for i in range(n)]
    names = [name] if isinstance(name, str) else list(name)
    if len(names) != n:
        raise ValueError(f"merge_: got {len(names)} names for {n} adapters")
    return names


@dataclass
class _Adapter:
    name: str
    A: torch.Tensor  # snapshots (detached copies): what was merged is what gets unmerged
    B: torch.Tensor
    scale: float


class MergeState:
    """Exact merge/unmerge bookkeeping of one weight.

    Holds the ordered list of merged adapters (detached copies of A and B, and the scale) and,
    from the first merge on, side information about the original weight W0:

    * ``codes``: the low ``bits`` bits of each element's order key (``bits`` in {0, 1, 2, 4},
      chosen per weight from a sample so that the total below is smallest), packed in int32;
    * exceptions: sorted flat indices and exact W0 values of the few elements whose W0 the
      codes cannot pin down (where |S| is large against |W0|); only grows while merged.

    ``overhead()`` is their size as a fraction of the weight's bytes (typically 3-12% for bf16);
    the adapter copies cost ``r * (in + out)`` elements each, reported by ``adapter_bytes()``.
    Everything is dropped when the last adapter is unmerged (the weight is then W0 again).
    Should the side information ever outgrow the weight (deltas far larger than W0 almost
    everywhere), the state keeps a plain copy of W0 instead, so it never exceeds 100%.
    The state follows the weight across devices (CPU and CUDA kernels compute the same bits).
    """

    def __init__(self, bits: int | str = "auto"):
        if bits != "auto" and bits not in _BITS:
            raise ValueError(f"MergeState: bits must be 'auto' or one of {_BITS}, got {bits!r}")
        self.requested_bits = bits
        self.bits = 0
        self._adapters: list[_Adapter] = []
        self._fifo = False
        self._shape: tuple | None = None
        self._dtype: torch.dtype | None = None
        self._codes: torch.Tensor | None = None
        self._exc_idx: torch.Tensor | None = None
        self._exc_val: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None  # W0 itself, only for pathological deltas

    # ---- queries ----
    @property
    def merged(self) -> list[str]:
        """Names of the merged adapters, in merge order."""
        return [a.name for a in self._adapters]

    @property
    def dense(self) -> bool:
        """True when the state fell back to a plain copy of W0 (side info would be larger)."""
        return self._dense is not None

    @property
    def num_exceptions(self) -> int:
        return 0 if self._exc_idx is None else int(self._exc_idx.numel())

    def nbytes(self) -> int:
        """Bytes of side information (codes and exceptions)."""
        return sum(t.numel() * t.element_size()
                   for t in (self._codes, self._exc_idx, self._exc_val, self._dense) if t is not None)

    def overhead(self) -> float:
        """Side information as a fraction of the weight's bytes (0 when nothing is merged)."""
        if self._shape is None:
            return 0.0
        wbytes = math.prod(self._shape) * torch.finfo(self._dtype).bits // 8
        return self.nbytes() / max(wbytes, 1)

    def adapter_bytes(self) -> int:
        return sum(a.A.numel() * a.A.element_size() + a.B.numel() * a.B.element_size()
                   for a in self._adapters)

    # ---- transitions ----
    def merge(self, weight: torch.Tensor, adapters) -> None:
        """Merges adapters given as (name, A, B, scale) tuples; merging a merged name is a no-op."""
        new = list(self._adapters)
        have = {a.name for a in new}
        for name, A, B, scale in adapters:
            if name in have:
                continue
            if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
                raise TypeError(f"merge: adapter {name!r}: A and B must be tensors")
            if not math.isfinite(float(scale)):
                raise ValueError(f"merge: adapter {name!r}: scale must be finite, got {scale}")
            new.append(_Adapter(name, A.detach().clone(), B.detach().clone(), float(scale)))
            have.add(name)
        if len(new) != len(self._adapters):
            self._apply(weight, new)

    def unmerge(self, weight: torch.Tensor, names: Sequence[str] | None = None) -> None:
        """Removes the named adapters (default: all) exactly."""
        if names is None:
            names = self.merged
        missing = [n for n in names if n not in self.merged]
        if missing:
            raise ValueError(f"unmerge: adapter(s) {missing} are not merged into this weight "
                             f"(merged: {self.merged})")
        if names:
            self._apply(weight, [a for a in self._adapters if a.name not in set(names)])

    def _check_layout(self, weight: torch.Tensor, fifo: bool) -> None:
        if self._shape is None:
            self._fifo = bool(fifo)
            return
        if bool(fifo) != self._fifo:
            raise ValueError("MergeState: fan_in_fan_out differs from the one used at the first merge")

    def _apply(self, weight: torch.Tensor, new: list[_Adapter]) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("MergeState: weight must be a 2-D tensor")
        if not weight.is_contiguous():
            raise ValueError("MergeState: weight must be contiguous for an exact merge")
        old = self._adapters
        dev, numel = weight.device, weight.numel()
        if self._dense is not None:
            self._check_same(weight)
            self._apply_dense(weight, new)
            return
        if not old:
            _validate(weight, new, self._fifo)
            self._shape, self._dtype = tuple(weight.shape), weight.dtype
            self.bits = (_choose_bits(weight, new, self._fifo) if self.requested_bits == "auto"
                         else self.requested_bits)
            self._codes = torch.zeros((numel * self.bits + 31) // 32, dtype=torch.int32, device=dev)
            self._exc_idx = torch.zeros(0, dtype=_idx_dtype(numel), device=dev)
            self._exc_val = torch.zeros(0, dtype=weight.dtype, device=dev)
        else:
            self._check_same(weight)
        self._codes, self._exc_idx, self._exc_val = (
            t.to(dev) for t in (self._codes, self._exc_idx, self._exc_val))
        for a in old + new:  # adapter snapshots follow the weight too
            if a.A.device != dev:
                a.A, a.B = a.A.to(dev), a.B.to(dev)
        fails = torch.zeros((numel + 31) // 32, dtype=torch.int32, device=dev)
        try:  # the kernel validates everything before it writes
            torch.ops.lora_ext.remerge_.default(
                weight, self._codes, fails, self.bits,
                [a.A for a in old], [a.B for a in old], [a.scale for a in old],
                [a.A for a in new], [a.B for a in new], [a.scale for a in new], self._fifo)
        except Exception:
            if not old:
                self._reset()
            raise
        # Elements the codes cannot restore under the new sum hold W0 now: keep them exactly.
        fresh = _set_bits(fails)
        if self._exc_idx.numel() and fresh.numel():
            fresh = fresh[~torch.isin(fresh, self._exc_idx.long())]
        if fresh.numel():
            idx = torch.cat([self._exc_idx.long(), fresh])
            val = torch.cat([self._exc_val, weight.view(-1)[fresh]])
            idx, order = torch.sort(idx)
            self._exc_idx, self._exc_val = idx.to(self._exc_idx.dtype), val[order]
        if self._exc_idx.numel():
            torch.ops.lora_ext.merge_points_.default(
                weight, self._exc_idx.long(), self._exc_val,
                [a.A for a in new], [a.B for a in new], [a.scale for a in new], self._fifo)
        self._adapters = new
        if not new:  # weight is W0 again, bit for bit
            self._reset()
        elif self.nbytes() > weight.numel() * weight.element_size():
            self._densify(weight)

    def _check_same(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self._shape or weight.dtype != self._dtype:
            raise ValueError(f"MergeState: weight is now {tuple(weight.shape)} {weight.dtype}, but "
                             f"{self._shape} {self._dtype} when merged; cannot unmerge exactly")

    def _densify(self, weight: torch.Tensor) -> None:
        """Pathological deltas (|S| >> |W0| almost everywhere): a plain copy of W0 is smaller."""
        w0 = weight.clone()
        unused = torch.zeros((w0.numel() + 31) // 32, dtype=torch.int32, device=w0.device)
        a = self._adapters
        torch.ops.lora_ext.remerge_.default(w0, self._codes, unused, self.bits,
                                            [x.A for x in a], [x.B for x in a],
                                            [x.scale for x in a], [], [], [], self._fifo)
        w0.view(-1)[self._exc_idx.long()] = self._exc_val
        self._dense = w0
        self._codes = self._exc_idx = self._exc_val = None

    def _apply_dense(self, weight: torch.Tensor, new: list[_Adapter]) -> None:
        self._dense = self._dense.to(weight.device)
        for a in new:
            a.A, a.B = a.A.to(weight.device), a.B.to(weight.device)
        if new:
            _validate(weight, new, self._fifo)
        weight.copy_(self._dense)
        if new:
            torch.ops.lora_ext.merge_.default(weight, [a.A for a in new], [a.B for a in new],
                                              [a.scale for a in new], self._fifo)
        self._adapters = new
        if not new:
            self._reset()

    def _reset(self) -> None:
        self._adapters = []
        self._codes = self._exc_idx = self._exc_val = self._dense = None
        self._shape = self._dtype = None
        self.bits = 0


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _validate(weight: torch.Tensor, adapters: list[_Adapter], fifo: bool) -> None:
    if weight.dtype not in _FLOATS:
        raise ValueError(f"merge: weight has dtype {weight.dtype}; supported are float32, float16 "
                         "and bfloat16")
    out, inp = (weight.shape[1], weight.shape[0]) if fifo else tuple(weight.shape)
    for a in adapters:
        if a.A.dtype not in _FLOATS or a.B.dtype not in _FLOATS:
            raise ValueError(f"merge: adapter {a.name!r} has dtypes A {a.A.dtype}, B {a.B.dtype}; "
                             "supported are float32, float16 and bfloat16")
        if (a.A.dim() != 2 or a.B.dim() != 2 or a.A.shape[0] < 1 or a.A.shape[1] != inp
                or a.B.shape != (out, a.A.shape[0])):
            raise ValueError(f"merge: adapter {a.name!r} has A {tuple(a.A.shape)}, B {tuple(a.B.shape)}; "
                             f"the weight {tuple(weight.shape)} needs A [r, {inp}] and B [{out}, r], "
                             "r >= 1"
                             + (" (fan_in_fan_out)" if fifo else ""))
        if a.A.device != weight.device or a.B.device != weight.device:
            raise ValueError(f"merge: adapter {a.name!r} is on {a.A.device}/{a.B.device} but the "
                             f"weight is on {weight.device}")


def _idx_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _set_bits(words: torch.Tensor) -> torch.Tensor:
    """Sorted int64 positions of the set bits of an int32 bit array (sparse: few set)."""
    nz = torch.nonzero(words).flatten()
    if nz.numel() == 0:
        return nz
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words[nz].unsqueeze(1) >> shifts) & 1
    pos = nz.unsqueeze(1) * 32 + shifts.long()
    return pos[bits.bool()]


# ---- choice of the code width from a sample (plain torch mirror of csrc/merge_math.h) ----
_INT = {16: torch.int16, 32: torch.int32}


def _key(x: torch.Tensor) -> torch.Tensor:
    nb = torch.finfo(x.dtype).bits
    b = x.view(_INT[nb]).long() & ((1 << nb) - 1)
    sign = 1 << (nb - 1)
    mag = b & (sign - 1)
    return torch.where(b & sign != 0, -mag - 1, mag)


def _from_key(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    nb = torch.finfo(dtype).bits
    sign = 1 << (nb - 1)
    b = torch.where(k >= 0, k, (-k - 1) | sign) & ((1 << nb) - 1)
    b = torch.where(b >= sign, b - (1 << nb), b)
    return b.to(_INT[nb]).view(dtype)


def _rec(w: torch.Tensor, s: torch.Tensor, code: torch.Tensor, k: int) -> torch.Tensor:
    wf = w.float()
    t = wf - s
    bv = t - wf
    err = (wf - (t - bv)) + (-s - bv)
    xh = t.to(w.dtype)
    if k == 0:
        return xh
    xf = xh.float()
    up = ((t > xf) | ((t == xf) & (err > 0))).long()
    base = _key(xh) - (1 << (k - 1)) + up
    return _from_key(base + ((code - base) & ((1 << k) - 1)), w.dtype)


def _choose_bits(weight: torch.Tensor, adapters: list[_Adapter], fifo: bool,
                 samples: int = 16384) -> int:
    """Code width with the least expected side information, estimated on a sample."""
    P, Q = weight.shape
    n = weight.numel()
    if n == 0:
        return 0
    g = torch.Generator(device="cpu").manual_seed(0)
    e = torch.randint(0, n, (min(samples, n),), generator=g).to(weight.device)
    p, q = e // Q, e % Q
    s = torch.zeros(e.numel(), dtype=torch.float32, device=weight.device)
    for a in adapters:
        Af, sB = a.A.float(), a.B.float() * a.scale
        lhs, rhs = (Af.t()[p], sB[q]) if fifo else (sB[p], Af.t()[q])
        s += (lhs * rhs).sum(1)
    w0 = weight.view(-1)[e]
    w = (w0.float() + s).to(weight.dtype)
    key0 = _key(w0)
    nb = torch.finfo(weight.dtype).bits
    exc_bits = nb + (32 if n < 2**31 else 64)
    best, best_cost = 0, math.inf
    for k in _BITS:
        fail = (_rec(w, s, key0 & ((1 << k) - 1), k).view(_INT[nb]) != w0.view(_INT[nb]))
        cost = k + fail.float().mean().item() * exc_bits
        if cost < best_cost - 1e-9:
            best, best_cost = k, cost
    return best


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
    torch._check(bits in _BITS, lambda: f"remerge_: bits must be one of {_BITS}")
    return None


@torch.library.register_fake("lora_ext::merge_points_")
def _merge_points_fake(weight, idx, vals, A, B, scales, fan_in_fan_out):
    one_device("merge_points_", weight=weight, idx=idx, vals=vals, A=A, B=B)
    torch._check(idx.shape == vals.shape, lambda: "merge_points_: idx and vals shapes differ")
    return None
