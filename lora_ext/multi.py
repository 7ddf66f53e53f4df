"""Multi-adapter serving layer: every token of a batch may use a different LoRA adapter.

Design
------
``LoRAContext`` is one small object per model holding a persistent int32 index buffer
``indices`` [max_tokens] (plus a device-side ``bad_index_count``). Every ``MultiLoRALinear``
of the model keeps a reference to the same context and, for an input with T tokens, reads
``context.indices[:T]``: token t (in row-major order of x's leading dims) uses slot
``indices[t]``, -1 meaning "base model only".

The caller (e.g. an adapter pool: ``with pool.batch(names): model(ids)``) writes the indices
*in place* (``context.set_indices(...)``) before each forward. Because the layers only see a
tensor whose identity, shape and dtype never change, and the pools/scales/ranks are tensors
updated in place by ``set_slot`` / ``clear_slot``:

- ``torch.compile`` (fullgraph too) traces the layers once; new indices or swapped adapters
  cause no recompiles (dynamo guards on tensor metadata, not values);
- a captured CUDA graph replays with whatever the buffers hold at replay time (the kernels
  are sized from shapes only and never sync with the host);
- out-of-range indices on CUDA are treated as "no adapter" and counted into
  ``context.bad_index_count`` without a host sync; ``context.check()`` raises if any were
  seen (it syncs; call it when convenient). On CPU the op raises at once.

Slots hold adapters of any rank 1..r_max (rank 0 = empty; padded ranks cost no work).
With ``out_slices`` one layer serves a packed projection (q/k/v, gate/up): each slice has its
own A (``A_pool`` [n, S, r_max, in]) and its rows of B, rank and scale.
The layer is for inference: it mutates the base output in place and has no backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .ops import multi_lora_

__all__ = ["LoRAContext", "MultiLoRALinear", "attach_context"]


class LoRAContext:
    """Per-token adapter indices shared by all MultiLoRALinear layers of a model."""

    def __init__(self, max_tokens: int, device=None):
        if max_tokens < 1:
            raise ValueError(f"LoRAContext: max_tokens must be >= 1, got {max_tokens}")
        self.indices = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.bad_index_count = torch.zeros(1, dtype=torch.int32, device=device)

    @property
    def max_tokens(self) -> int:
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def set_indices(self, indices) -> None:
        """Copies per-token slot indices (T ints, any shape) into the buffer; the rest is -1."""
        idx = torch.as_tensor(indices).reshape(-1)
        T = idx.numel()
        if T > self.max_tokens:
            raise ValueError(f"LoRAContext: {T} tokens exceed max_tokens = {self.max_tokens}")
        self.indices[:T].copy_(idx, non_blocking=True)
        self.indices[T:].fill_(-1)

    def clear(self) -> None:
        """Every token uses the base model only."""
        self.indices.fill_(-1)

    def tokens(self, T: int) -> torch.Tensor:
        torch._check(T <= self.indices.shape[0],
                     lambda: "LoRAContext: the batch has more tokens than max_tokens")
        return self.indices[:T]

    def check(self) -> None:
        """Raises if a CUDA kernel saw an index outside -1 .. S-1 since the last reset."""
        n = int(self.bad_index_count.sum())
        if n:
            self.bad_index_count.zero_()
            raise RuntimeError(f"LoRAContext: {n} token(s) had an adapter index out of range "
                               "(treated as no adapter)")


class MultiLoRALinear(nn.Module):
    """``y = base(x) + per-token LoRA`` with S adapter slots of rank <= r_max.

    Args:
        base: the frozen nn.Linear (its weight's dtype and device are used for the pools).
        num_slots: S, adapters resident at once.
        r_max: the largest rank a slot can hold.
        out_slices: column widths of a packed projection (sum = out_features), or None.
        context: the model's LoRAContext (or set later with ``attach_context``).
    """

    def __init__(self, base: nn.Linear, num_slots: int, r_max: int,
                 out_slices: Optional[Sequence[int]] = None,
                 context: Optional[LoRAContext] = None):
        super().__init__()
        if num_slots < 1 or r_max < 1:
            raise ValueError(f"MultiLoRALinear: num_slots and r_max must be >= 1, got "
                             f"{num_slots}, {r_max}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_slots, self.r_max = num_slots, r_max
        self.out_slices = None if out_slices is None else [int(s) for s in out_slices]
        if self.out_slices is not None and sum(self.out_slices) != self.out_features:
            raise ValueError(f"MultiLoRALinear: out_slices {self.out_slices} must sum to "
                             f"out_features = {self.out_features}")
        n = 1 if self.out_slices is None else len(self.out_slices)
        self.num_outputs = n
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        a_shape = (num_slots, r_max, self.in_features)
        self.register_buffer("A_pool", torch.zeros(a_shape if out_slices is None else (n, *a_shape), **kw),
                             persistent=False)
        self.register_buffer("B_pool", torch.zeros(num_slots, self.out_features, r_max, **kw),
                             persistent=False)
        sshape = (num_slots,) if out_slices is None else (n, num_slots)
        self.register_buffer("scales", torch.zeros(sshape, dtype=torch.float32, device=kw["device"]),
                             persistent=False)
        self.register_buffer("ranks", torch.zeros(sshape, dtype=torch.int32, device=kw["device"]),
                             persistent=False)
        self.context = context

    def _slice_bounds(self):
        widths = self.out_slices or [self.out_features]
        off = [0]
        for w in widths:
            off.append(off[-1] + w)
        return off

    @torch.no_grad()
    def set_slot(self, slot: int, A, B, scale: float) -> None:
        """Loads an adapter into a slot, in place (no recompiles, graph-safe).

        A [r, in] and B [out, r] (with out_slices: sequences of n such pairs, B_i [out_i, r_i];
        a None pair leaves that slice without update). r <= r_max.
        """
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRALinear: slot {slot} out of range 0..{self.num_slots - 1}")
        As, Bs = ([A], [B]) if self.out_slices is None else (list(A), list(B))
        if len(As) != self.num_outputs or len(Bs) != self.num_outputs:
            raise ValueError(f"MultiLoRALinear: expected {self.num_outputs} (A, B) pairs")
        off = self._slice_bounds()
        for i, (a, b) in enumerate(zip(As, Bs)):
            Ap = self.A_pool[slot] if self.out_slices is None else self.A_pool[i, slot]
            Bp = self.B_pool[slot, off[i]:off[i + 1]]
            Ap.zero_()
            Bp.zero_()
            r = 0
            if a is not None:
                r = a.shape[0]
                if a.dim() != 2 or a.shape[1] != self.in_features or not 1 <= r <= self.r_max:
                    raise ValueError(f"MultiLoRALinear: A must be [r, {self.in_features}] with "
                                     f"1 <= r <= {self.r_max}, got {tuple(a.shape)}")
                if tuple(b.shape) != (off[i + 1] - off[i], r):
                    raise ValueError(f"MultiLoRALinear: B must be [{off[i + 1] - off[i]}, {r}], "
                                     f"got {tuple(b.shape)}")
                Ap[:r].copy_(a)
                Bp[:, :r].copy_(b)
            if self.out_slices is None:
                self.ranks[slot] = r
                self.scales[slot] = float(scale) if r else 0.0
            else:
                self.ranks[i, slot] = r
                self.scales[i, slot] = float(scale) if r else 0.0

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empties a slot: tokens that still point at it get the base output only."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRALinear: slot {slot} out of range 0..{self.num_slots - 1}")
        self.ranks[..., slot] = 0
        self.scales[..., slot] = 0.0
        self.A_pool[..., slot, :, :].zero_()
        self.B_pool[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError("MultiLoRALinear: no LoRAContext attached (pass context= or call "
                               "lora_ext.multi.attach_context(model, ctx))")
        y = self.base(x)
        if y.requires_grad:
            raise RuntimeError("MultiLoRALinear is an inference layer; run it under "
                               "torch.no_grad() or torch.inference_mode()")
        T = x.numel() // self.in_features if self.in_features else 0
        multi_lora_(y, x, self.A_pool, self.B_pool, self.context.tokens(T), self.scales,
                    self.ranks, self.out_slices, bad_index_count=self.context.bad_index_count)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, "
                f"r_max={self.r_max}, out_slices={self.out_slices}")


def attach_context(model: nn.Module, context: LoRAContext) -> int:
    """Points every MultiLoRALinear in ``model`` at ``context``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            m.context = context
            n += 1
    return n
