"""MergeState: the exact merge/unmerge bookkeeping of one weight (csrc/merge_math.h has the
element maths; merge_ / unmerge_ in merge.py take a state)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import wrote

__all__ = ["MergeState", "MergedAdapter", "CODE_WIDTHS", "take_probe", "check_probe"]

CODE_WIDTHS = (0, 1, 2, 4)  # bits of W0 kept per element (csrc/merge_math.h: code_width)


@dataclass
class MergedAdapter:
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
        if bits != "auto" and (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
                               or bits not in CODE_WIDTHS):  # (1.0 reached torch.zeros; True passed as 1)
            raise ValueError(f"MergeState: bits must be 'auto' or one of {CODE_WIDTHS}, got {bits!r}")
        self.requested_bits = bits if bits == "auto" else int(bits)
        self.bits = 0
        self._adapters: list[MergedAdapter] = []
        self._fan_in_fan_out = False
        self._shape: tuple | None = None
        self._dtype: torch.dtype | None = None
        self._codes: torch.Tensor | None = None
        self._exc_idx: torch.Tensor | None = None
        self._exc_val: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None  # W0 itself, only for pathological deltas
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None  # (flat idx, bits) after a merge

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
            new.append(MergedAdapter(name, A.detach().clone(), B.detach().clone(), float(scale)))
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

    def check(self, weight: torch.Tensor) -> None:
        """Raises ValueError (changes nothing) if ``weight`` is not the merged weight of this state
        (another shape or dtype, another tensor, or written since the merge)."""
        if self._adapters:
            self._check_same(weight)

    def convert(self, old: torch.Tensor, new: torch.Tensor, convert) -> None:
        """Redoes the merge in another dtype. ``old``: the merged weight this state belongs to;
        ``new``: ``convert(old)`` (Module._apply's function: .half(), .to(bf16), ...), same shape,
        another float dtype. Writes into ``new`` the exact merge of the converted W0 and the
        converted adapter snapshots and makes this state the state of ``new``: unmerging it then
        gives convert(W0) bit for bit, as converting the unmerged weight would. ``old`` is kept."""
        adapters = self._adapters
        w0 = old.clone()
        self.unmerge(w0)  # w0 = W0; the state is empty again
        new.copy_(w0)
        self.merge(new, [(a.name, convert(a.A), convert(a.B), a.scale) for a in adapters])

    def _check_layout(self, weight: torch.Tensor, fan_in_fan_out: bool) -> None:
        if self._shape is None:
            self._fan_in_fan_out = bool(fan_in_fan_out)
            return
        if bool(fan_in_fan_out) != self._fan_in_fan_out:
            raise ValueError("MergeState: fan_in_fan_out differs from the one used at the first merge")

    def _apply(self, weight: torch.Tensor, new: list[MergedAdapter]) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("MergeState: weight must be a 2-D tensor")
        if not weight.is_contiguous():  # (transposed, strided) the codes and exceptions index W0 in
            work = weight.detach().contiguous()  # row-major order: merge a contiguous copy, write it back
            self._apply(work, new)
            weight.detach().copy_(work)
            return
        old = self._adapters
        dev, numel = weight.device, weight.numel()
        if self._dense is not None:
            self._check_same(weight)
            self._apply_dense(weight, new)
            self._probe = take_probe(weight) if new else None
            return
        if not old:
            _validate(weight, new, self._fan_in_fan_out)
            self._shape, self._dtype = tuple(weight.shape), weight.dtype
            self.bits = (_choose_bits(weight, new, self._fan_in_fan_out) if self.requested_bits == "auto"
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
                [a.A for a in new], [a.B for a in new], [a.scale for a in new], self._fan_in_fan_out)
        except Exception:
            if not old:
                self._reset()
            raise
        wrote(weight)
        # Elements the codes cannot restore under the new sum hold W0 now: keep them exactly.
        fresh = _set_bits(fails)
        if self._exc_idx.numel() and fresh.numel():
            fresh = fresh[~torch.isin(fresh, self._exc_idx.long())]
        if fresh.numel():
            idx, val = fresh, weight.view(-1)[fresh]  # sorted
            if self._exc_idx.numel():
                idx, order = torch.sort(torch.cat([self._exc_idx.long(), idx]))
                val = torch.cat([self._exc_val, val])[order]
            self._exc_idx, self._exc_val = idx.to(self._exc_idx.dtype), val
        if self._exc_idx.numel():
            torch.ops.lora_ext.merge_points_.default(
                weight, self._exc_idx.long(), self._exc_val,
                [a.A for a in new], [a.B for a in new], [a.scale for a in new], self._fan_in_fan_out)
        self._adapters = new
        if not new:  # weight is W0 again, bit for bit
            self._reset()
            return
        if self.nbytes() > weight.numel() * weight.element_size():
            self._densify(weight)
        self._probe = take_probe(weight)

    def _check_same(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self._shape or weight.dtype != self._dtype:
            raise ValueError(f"MergeState: weight is now {tuple(weight.shape)} {weight.dtype}, but "
                             f"{self._shape} {self._dtype} when merged; cannot unmerge exactly")
        # None: a state pickled before probes existed
        check_probe(weight, getattr(self, "_probe", None), "MergeState")

    def original(self, weight: torch.Tensor) -> torch.Tensor:
        """A new tensor holding W0, the weight before the first merge, bit for bit, recomputed from
        ``weight`` (the merged weight of this state; a copy of it when nothing is merged). Neither
        ``weight`` nor the state changes."""
        if not self._adapters:
            return weight.clone()
        self._check_same(weight)
        return self._w0(weight)

    def _w0(self, weight: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return self._dense.to(weight.device, copy=True)
        w0 = weight.clone(memory_format=torch.contiguous_format)  # (flat, row-major indices)
        dev = weight.device
        unused = torch.zeros((w0.numel() + 31) // 32, dtype=torch.int32, device=dev)
        a = self._adapters
        torch.ops.lora_ext.remerge_.default(w0, self._codes.to(dev), unused, self.bits,
                                            [x.A.to(dev) for x in a], [x.B.to(dev) for x in a],
                                            [x.scale for x in a], [], [], [], self._fan_in_fan_out)
        w0.view(-1)[self._exc_idx.long().to(dev)] = self._exc_val.to(dev)
        return w0

    def _densify(self, weight: torch.Tensor) -> None:
        """Pathological deltas (|S| >> |W0| almost everywhere): a plain copy of W0 is smaller."""
        self._dense = self._w0(weight)
        self._codes = self._exc_idx = self._exc_val = None

    def _apply_dense(self, weight: torch.Tensor, new: list[MergedAdapter]) -> None:
        self._dense = self._dense.to(weight.device)
        for a in new:
            a.A, a.B = a.A.to(weight.device), a.B.to(weight.device)
        if new:
            _validate(weight, new, self._fan_in_fan_out)
        weight.copy_(self._dense)
        if new:
            torch.ops.lora_ext.merge_.default(weight, [a.A for a in new], [a.B for a in new],
                                              [a.scale for a in new], self._fan_in_fan_out)
        self._adapters = new
        if not new:
            self._reset()

    def _reset(self) -> None:
        self._adapters = []
        self._codes = self._exc_idx = self._exc_val = self._dense = self._probe = None
        self._shape = self._dtype = None
        self.bits = 0


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def take_probe(weight: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, bit patterns) of 64 evenly spread elements of the merged weight: a later
    transition checks it still has them (check_probe; a state used on another weight would rewrite
    that one). MergeState and DoraMergeState keep one."""
    flat = weight.reshape(-1)
    if idx is None:  # integer arithmetic: float32 linspace rounds n - 1 up to n past 2^24 elements
        k = min(flat.numel(), 64)
        idx = torch.arange(k, device=weight.device) * max(flat.numel() - 1, 0) // max(k - 1, 1)
    ints = {4: torch.int32, 2: torch.int16}.get(flat.element_size(), torch.uint8)  # (DoRA: any dtype)
    return idx, flat[idx].view(ints).clone()


def check_probe(weight: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor] | None, who: str) -> None:
    """ValueError if ``weight`` lacks the bits ``probe`` (take_probe's) recorded of the merged weight:
    another tensor, or one written since the merge, which unmerging would undo. None: no probe."""
    if probe is not None and not torch.equal(take_probe(weight, probe[0].to(weight.device))[1],
                                             probe[1].to(weight.device)):
        raise ValueError(f"{who}: the weight differs from the one this state merged into (another "
                         "tensor, or written since the merge); cannot unmerge exactly")


def _validate(weight: torch.Tensor, adapters: list[MergedAdapter], fan_in_fan_out: bool) -> None:
    if weight.dtype not in _FLOATS:
        raise ValueError(f"merge: weight has dtype {weight.dtype}; supported are float32, float16 "
                         "and bfloat16")
    out, inp = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    for a in adapters:
        if a.A.dtype not in _FLOATS or a.B.dtype not in _FLOATS:
            raise ValueError(f"merge: adapter {a.name!r} has dtypes A {a.A.dtype}, B {a.B.dtype}; "
                             "supported are float32, float16 and bfloat16")
        if (a.A.dim() != 2 or a.B.dim() != 2 or a.A.shape[0] < 1 or a.A.shape[1] != inp
                or a.B.shape != (out, a.A.shape[0])):
            raise ValueError(f"merge: adapter {a.name!r} has A {tuple(a.A.shape)}, B {tuple(a.B.shape)}; "
                             f"the weight {tuple(weight.shape)} needs A [r, {inp}] and B [{out}, r], "
                             "r >= 1"
                             + (" (fan_in_fan_out)" if fan_in_fan_out else ""))
        if a.A.device != weight.device or a.B.device != weight.device:
            raise ValueError(f"merge: adapter {a.name!r} is on {a.A.device}/{a.B.device} but the "
                             f"weight is on {weight.device}")


def _idx_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _set_bits(words: torch.Tensor) -> torch.Tensor:
    """Sorted int64 positions of the set bits of an int32 bit array (bit e of the array: bit e % 32
    of word e // 32; little-endian, so byte i holds bits 8i ... 8i + 7). Works on the bytes: the
    nonzero ones are few, and their 8-bit expansion is small."""
    b = words.view(torch.uint8)
    nz = torch.nonzero(b).flatten()
    if nz.numel() == 0:
        return nz
    bits = (b[nz].unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.uint8)) & 1
    row, col = bits.nonzero(as_tuple=True)
    return nz[row] * 8 + col


def _choose_bits(weight: torch.Tensor, adapters: list[MergedAdapter], fan_in_fan_out: bool,
                 samples: int = 16384) -> int:
    """Code width with the least expected side information, estimated on a sample: k bits per
    element plus an exception (index + W0) for every element the k-bit codes cannot restore
    (counted by the merge_code_failures op, i.e. csrc/merge_math.h itself)."""
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
        lhs, rhs = (Af.t()[p], sB[q]) if fan_in_fan_out else (sB[p], Af.t()[q])
        s += (lhs * rhs).sum(1)
    fails = torch.ops.lora_ext.merge_code_failures.default(weight.view(-1)[e], s).tolist()
    exc_bits = torch.finfo(weight.dtype).bits + (32 if n < 2**31 else 64)
    best, best_cost = 0, math.inf
    for k, f in zip(CODE_WIDTHS, fails):
        cost = k + f / e.numel() * exc_bits
        if cost < best_cost - 1e-9:
            best, best_cost = k, cost
    return best
