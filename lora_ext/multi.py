"""Multi-adapter serving layer: every token of a batch may use a different LoRA adapter.

Design
------
``LoRAContext`` is one small object per model holding a persistent int32 index buffer
``indices`` [max_tokens] (plus a device-side ``bad_index_count``). Every ``MultiLoRALinear``
(nn.Linear or transformers' Conv1D) and ``MultiLoRAEmbedding`` of the model keeps a reference to
the same context. With per-token indices, an input with T tokens reads ``context.indices[:T]``:
token t (in row-major order of the input's leading dims) uses slot ``indices[t]``, -1 meaning
"base model only". With per-row indices (``per_row=True``), every token of batch row b (dim 0 of
the layer's input, any leading shape) uses ``indices[b]``, as PEFT routes ``adapter_names``.
A layer whose input has another number of tokens (rows) than indices were set raises; with no
indices set (``clear()``, outside a pool's batch) every input, of any size, gets the base output.

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
``MultiLoRAEmbedding`` keeps PEFT's embedding factors (A [r, num_embeddings], B [dim, r]): a
token's u is the A column of its id, then ``lora_expand_`` adds ``scale * B @ u``.
The layers are for inference: they mutate the base output in place and have no backward.

DoRA (``dora=True``): a DoRA slot's tokens get ``g * (W0 x + s B A x) + b``, g = m / ||W0 + s B A||
per output feature (lora_ext.dora), constant per adapter: ``set_slot`` computes it once into
``dora_scales`` [S + 1, out] (fp32; row S: ones) with ``dora_bias`` = (1 - g) b, and one fused pass
after multi_lora_ writes ``y * g + (1 - g) b``. Not with out_slices or tensor parallelism.
Tensor parallelism (``lora_ext.tp``): a colwise layer keeps rows ``out_shard`` = (lo, hi) of B_pool,
a rowwise one columns ``in_shard`` of A_pool; ``set_slot`` takes full factors, writes the shard.
MoE experts: lora_ext.multi_experts (MultiLoRAExperts), on the same context.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from .layers import is_conv1d
from .sharding import is_dtensor
from .ops import dora_norm, lora_expand_, multi_lora_
from .ops._checks import as_scale

__all__ = ["LoRAContext", "MultiLoRALinear", "MultiLoRAEmbedding", "attach_context", "apply_keeping_fp32", "ContextLayer"]


_INT32_MAX = 2**31 - 1

# torch._check messages under torch.compile: Dynamo traces them from torch 2.9 on, when the message
# is a function defined in the traced code that reads no outer variable (so inline lambdas below)
_CHECK_MESSAGES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
_OUT_OF_RANGE = -(2**31)  # an index no slot has: the ops raise (CPU) or count it (CUDA)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) + _WIDE_UNSIGNED


class LoRAContext:
    """Per-token or per-row adapter indices shared by all multi-adapter layers of a model."""

    def __init__(self, max_tokens: int, device=None):
        if max_tokens < 1:
            raise ValueError(f"LoRAContext: max_tokens must be >= 1, got {max_tokens}")
        with torch.inference_mode(False):  # updated in place later, inside inference mode or not
            self.indices = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
            self.bad_index_count = torch.zeros(1, dtype=torch.int32, device=device)
            self.count_t = torch.full((), -1, dtype=torch.int32, device=device)
        self.count: Optional[int] = None  # indices set (None: cleared, base only for any input)
        # count_t: the same on the device (-1: cleared), which compiled graphs compare with their
        # input's rows (tokens) without guarding on a Python int (that would recompile per batch size)
        self.per_row = False
        self._tokens_of = None  # (leading dims, tokens()) of the last eager call, until indices change

    @property
    def max_tokens(self) -> int:
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def set_indices(self, indices, per_row: bool = False) -> None:
        """Copies slot indices (n ints, any shape) into the buffer, the rest is -1: one per token, or
        with per_row=True one per batch row. Layers then need inputs of exactly n tokens (rows)."""
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.numel() == 0:  # an empty batch: torch.as_tensor([]) is float32
            idx = idx.to(torch.int32)
        if idx.dtype not in _INDEX_DTYPES:
            raise TypeError(f"LoRAContext.set_indices: indices must be integers (int8 .. int64, uint8 .. "
                            f"uint64), got {idx.dtype}")
        n = idx.numel()
        if n > self.max_tokens:
            raise ValueError(f"LoRAContext: {n} indices exceed max_tokens = {self.max_tokens}")
        if idx.dtype in _WIDE_UNSIGNED:  # few torch ops take them; uint64 >= 2**63 wraps to < 0 in int64
            idx = idx.to(torch.int64)
            idx = idx.masked_fill((idx < 0) | (idx > _INT32_MAX), _OUT_OF_RANGE)
        elif idx.dtype == torch.int64:  # values int32 cannot hold become out of range, not wrapped
            idx = idx.masked_fill((idx < _OUT_OF_RANGE) | (idx > _INT32_MAX), _OUT_OF_RANGE)
        self.indices[:n].copy_(idx, non_blocking=True)
        self.indices[n:].fill_(-1)
        self.count_t.fill_(n)
        self.count, self.per_row = n, per_row
        self._tokens_of = None

    def clear(self) -> None:
        """Every token uses the base model only (inputs of any number of tokens)."""
        self.indices.fill_(-1)
        self.count_t.fill_(-1)
        self.count, self.per_row = None, False
        self._tokens_of = None

    def tokens(self, lead: torch.Size) -> torch.Tensor:
        """The slot of every token of a layer input whose leading (non-feature) dims are `lead`.

        Eager calls with the leading dims of the previous call get its tensor again (every target
        layer of a model asks with the same dims; the indices change only through set_indices /
        clear, which drop it): a view of ``indices``, or with per_row the per-token copy. Not under
        torch.compile, nor while a CUDA graph is captured: there each layer's own gather is
        recorded, so replays read the indices set at replay time."""
        compiling = torch.compiler.is_compiling()
        reuse = not compiling and not (self.indices.is_cuda and torch.cuda.is_current_stream_capturing())
        cached = self._tokens_of
        if reuse and cached is not None and cached[0] == lead:
            return cached[1]
        out = self._tokens(lead, compiling)
        if reuse:
            self._tokens_of = (lead, out)
        return out

    def _tokens(self, lead: torch.Size, compiling: bool) -> torch.Tensor:
        T = math.prod(lead)
        if compiling:  # no Python-int checks (they would specialize the batch size)
            return self._traced_tokens(lead)
        if self.per_row:
            rows, row_len = (lead[0], math.prod(lead[1:])) if len(lead) else (1, 1)
            if rows != self.count:
                k = rows // self.count if self.count and rows % self.count == 0 else 0
                hint = (f"; generate(num_beams={k}) / num_return_sequences={k} expand each row {k}x in "
                        f"place: pass [n for n in names for _ in range({k})]") if k > 1 else ""
                raise ValueError(f"LoRAContext: a layer input has {rows} batch rows (leading dims "
                                 f"{tuple(lead)}) but {self.count} row indices are set (AdapterPool."
                                 f"batch(names): one name per batch row){hint}")
            return self.indices[:rows, None].expand(rows, row_len).reshape(-1)
        if self.count is not None and T != self.count:
            raise ValueError(f"LoRAContext: a layer input has {T} tokens (leading dims {tuple(lead)}) "
                             f"but {self.count} token indices are set (AdapterPool.batch(names, "
                             "per_token=True): one name per token)")
        if T > self.indices.shape[0]:  # cleared (else T == count <= max_tokens): the base model
            return self._padded(T)
        return self.indices[:T]

    def _traced_tokens(self, lead: torch.Size) -> torch.Tensor:
        """_tokens under torch.compile: with the context cleared any input gets the base output; an
        input whose rows (tokens) differ from the indices set gets out-of-range indices, which the ops
        report (CPU: an error; CUDA: bad_index_count, see check()) as the eager path's ValueError
        cannot be raised from a graph."""
        if self.per_row:
            rows, row_len = (lead[0], math.prod(lead[1:])) if len(lead) else (1, 1)
            if _CHECK_MESSAGES:  # symbolic
                torch._check(rows <= self.indices.shape[0],
                             lambda: "LoRAContext: a layer input has more batch rows than the context's max_tokens")
            else:
                torch._check(rows <= self.indices.shape[0])
            idx, n = self.indices[:rows, None].expand(rows, row_len).reshape(-1), rows
            return idx.masked_fill((self.count_t >= 0) & (self.count_t != n), _OUT_OF_RANGE)
        return self._padded(math.prod(lead))

    def _padded(self, n) -> torch.Tensor:
        """indices[:n] for any n (a symbolic one too), -1 (base) past max_tokens, all out of range
        when indices for another number of tokens are set: decided on the device from count_t (no
        host sync, no guard on n), so a cleared context serves inputs of any size, and a graph
        traced or captured while it was cleared still reports a mismatch when replayed in a batch."""
        size = self.indices.shape[0]
        pos = torch.arange(n, device=self.indices.device)
        idx = torch.where(pos < size, self.indices[pos.clamp(max=size - 1)], -1)
        return idx.masked_fill((self.count_t >= 0) & (self.count_t != n), _OUT_OF_RANGE)

    def check(self) -> None:
        """Raises if a CUDA kernel saw an index outside -1 .. S-1 since the last reset."""
        n = int(self.bad_index_count.sum())
        if n:
            self.bad_index_count.zero_()
            raise RuntimeError(f"LoRAContext: {n} token(s) had an adapter index out of range "
                               "(treated as no adapter)")


def _with_data(op: str, what: str, t, like: torch.Tensor) -> None:
    """set_slot's check that a factor is a float tensor with values (meta only in a layer on meta)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():  # ints / bools would be cast silently
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{op}: {what} must be a {'floating-point ' * isinstance(t, torch.Tensor)}tensor, got {got}")
    if t.is_meta and not like.is_meta:
        raise ValueError(f"{op}: {what} is on the meta device (no data, e.g. from a model built under "
                         "init_empty_weights): load its values first")


def apply_keeping_fp32(module: nn.Module, apply, keys) -> nn.Module:
    """``module._apply`` (``apply()``) keeping buffers ``keys`` fp32: model.to(torch.bfloat16) /
    .half() casts the pools with the base weight, but per-slot scales stay fp32 (the ops take them
    in fp32; a bf16 alpha/r would also lose digits). Outside inference mode: pools made there would
    be inference tensors, which set_slot could not update in place outside it (a loader thread)."""
    fp32 = {k: getattr(module, k) for k in keys if hasattr(module, k)}
    with torch.inference_mode(False):
        out = apply()
        for k, old in fp32.items():
            if getattr(module, k).dtype != torch.float32:
                setattr(module, k, old.to(getattr(module, k).device))
    return out


class ContextLayer(nn.Module):
    """A multi-adapter layer: reads its tokens' slots from ``self.context`` (a LoRAContext)."""

    serves_adapters = True  # what inject looks for (targets.SERVING): no LoRA goes into a served model


class _MultiLoRA(ContextLayer):
    """S adapter slots of rank <= r_max: A_pool [S, r_max, in] ([n, S, r_max, in] with out_slices),
    B_pool [S, out, r_max], scales and ranks, all updated in place."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, num_slots: int,
                 r_max: int, out_slices: Optional[Sequence[int]], context: Optional[LoRAContext]):
        super().__init__()
        name = type(self).__name__
        if num_slots < 1 or r_max < 1:
            raise ValueError(f"{name}: num_slots and r_max must be >= 1, got {num_slots}, {r_max}")
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.r_max = num_slots, r_max
        self.out_slices = None if out_slices is None else [int(s) for s in out_slices]
        if self.out_slices is not None and sum(self.out_slices) != self.out_features:
            raise ValueError(f"{name}: out_slices {self.out_slices} must sum to "
                             f"out_features = {self.out_features}")
        n = 1 if self.out_slices is None else len(self.out_slices)
        self.num_outputs = n
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        a_shape = (num_slots, r_max, self.in_features)
        sshape = (num_slots,) if out_slices is None else (n, num_slots)
        with torch.inference_mode(False):  # set_slot updates them in place, in inference mode or not
            buffers = {"A_pool": torch.zeros(a_shape if out_slices is None else (n, *a_shape), **kw),
                       "B_pool": torch.zeros(num_slots, self.out_features, r_max, **kw),
                       "scales": torch.zeros(sshape, dtype=torch.float32, device=kw["device"]),
                       "ranks": torch.zeros(sshape, dtype=torch.int32, device=kw["device"])}
        for k, t in buffers.items():
            self.register_buffer(k, t, persistent=False)
        self.context = context
        # tensor parallel (lora_ext.tp): the rows of `out` (B_pool dim 1) / columns of `in`
        # (A_pool last dim) this rank holds, as (lo, hi) of the full dim; None = all
        self.out_shard: Optional[tuple[int, int]] = None
        self.in_shard: Optional[tuple[int, int]] = None
        if is_dtensor(base.weight):
            raise ValueError(f"{name}: the base {type(base).__name__} (in={in_features}, out={out_features}) "
                             "is already tensor-parallel (DTensor weight); wrap the plain model first (e.g. "
                             "create the AdapterPool), then parallelize the multi-adapter layers with "
                             "lora_ext.tp.ColwiseParallelLoRA / RowwiseParallelLoRA")

    # model code reads its projections' weight (T5's wo.weight.dtype, get_input_embeddings().weight):
    # the base layer's, as PEFT's LoRA layers expose it
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base, "bias", None)

    def _apply(self, fn, *args, **kwargs):
        return apply_keeping_fp32(self, lambda: super(_MultiLoRA, self)._apply(fn, *args, **kwargs),
                                  ("scales", "dora_scales", "dora_bias"))

    def _slice_bounds(self) -> list:
        return [0, *itertools.accumulate(self.out_slices or [self.out_features])]

    @torch.no_grad()
    def set_slot(self, slot: int, A, B, scale) -> None:
        """Loads an adapter into a slot, in place (no recompiles, graph-safe).

        A [r, in] and B [out, r] (with out_slices: sequences of n such pairs, B_i [out_i, r_i];
        a None pair leaves that slice unadapted: rank 0). r <= r_max. ``scale``: a float, with
        out_slices also n floats, one per slice (packed modules may differ in r, hence in
        alpha/r). Always the full factors: a tensor-parallel layer writes only its shard
        (columns ``in_shard`` of A, rows ``out_shard`` of B). All is checked and copied before the
        slot is written: a rejected call leaves it as it was; views of the pools may be passed."""
        slot = self._slot_index("set_slot", slot)
        self._write_slot(slot, self._stage_slot(A, B, scale))

    def _slot_index(self, method: str, slot) -> int:
        name = f"{type(self).__name__}.{method}"
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise TypeError(f"{name}: slot must be an int, got {type(slot).__name__} {slot!r:.80}")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"{name}: slot {slot} out of range 0..{self.num_slots - 1}")
        return int(slot)

    def _stage_slot(self, A, B, scale) -> list:
        """set_slot's checks and copies (new tensors like the pools'), the slot untouched: per slice
        (A [r_max, local in], this rank's rows of B [rows, r_max], their first local row, rank, scale)."""
        name = f"{type(self).__name__}.set_slot"
        As, Bs = ([A], [B]) if self.out_slices is None else (list(A), list(B))
        if len(As) != self.num_outputs or len(Bs) != self.num_outputs:
            raise ValueError(f"{name}: expected {self.num_outputs} (A, B) pairs")
        scales = self._slot_scales(scale)
        off = self._slice_bounds()
        for i, (a, b) in enumerate(zip(As, Bs)):  # every pair checked before anything is copied
            if (a is None) != (b is None):
                raise ValueError(f"{name}: A and B of slice {i} must both be tensors or both None")
            if a is None:
                continue
            _with_data(name, "A", a, self.A_pool)
            _with_data(name, "B", b, self.A_pool)
            r = a.shape[0] if a.dim() == 2 else -1
            if r < 0 or a.shape[1] != self.in_features or not 1 <= r <= self.r_max:
                raise ValueError(f"{name}: A must be [r, {self.in_features}] with "
                                 f"1 <= r <= {self.r_max}, got {tuple(a.shape)}")
            if tuple(b.shape) != (off[i + 1] - off[i], r):
                raise ValueError(f"{name}: B must be [{off[i + 1] - off[i]}, {r}], "
                                 f"got {tuple(b.shape)}")
        in_lo, in_hi = self.in_shard or (0, self.in_features)
        out_lo, out_hi = self.out_shard or (0, self.out_features)
        staged = []
        for i, (a, b) in enumerate(zip(As, Bs)):
            # the rows of slice i this rank holds: full rows lo..hi, local rows lo-out_lo..hi-out_lo
            lo, hi = max(off[i], out_lo), min(off[i + 1], out_hi)
            Ap = self.A_pool.new_zeros(self.A_pool.shape[-2:])
            Bp = self.B_pool.new_zeros(max(hi, lo) - lo, self.r_max)
            r = 0 if a is None else a.shape[0]
            if r:
                Ap[:r].copy_(a[:, in_lo:in_hi])
                Bp[:, :r].copy_(b[lo - off[i]:max(hi, lo) - off[i]])
            staged.append((Ap, Bp, lo - out_lo, r, scales[i] if r else 0.0))
        return staged

    def _write_slot(self, slot: int, staged: list) -> None:
        """Writes _stage_slot's slices into the slot (copies that cannot fail)."""
        for i, (Ap, Bp, lo, r, s) in enumerate(staged):
            at = slot if self.out_slices is None else (i, slot)
            self.A_pool[at].copy_(Ap)
            self.B_pool[slot, lo:lo + Bp.shape[0]].copy_(Bp)
            self.ranks[at] = r
            self.scales[at] = s

    def _slot_scales(self, scale) -> list:
        """set_slot's scale as n floats finite in float32 (one per slice; n = 1 without out_slices)."""
        op, n = f"{type(self).__name__}.set_slot", self.num_outputs
        if not isinstance(scale, (list, tuple)) and not (isinstance(scale, torch.Tensor) and scale.dim() == 1
                                                         and scale.numel() > 1):
            return [as_scale(op, "scale", scale)] * n
        values = list(scale)
        if self.out_slices is None or len(values) != n:
            what = "a number" if self.out_slices is None else f"a number or {n} numbers (one per slice)"
            raise ValueError(f"{op}: scale must be {what}, got {len(values)} values")
        return [as_scale(op, f"scale[{i}]", v) for i, v in enumerate(values)]

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empties a slot: tokens that still point at it get the base output only."""
        slot = self._slot_index("clear_slot", slot)
        self.ranks[..., slot] = 0
        self.scales[..., slot] = 0.0
        self.A_pool[..., slot, :, :].zero_()
        self.B_pool[slot].zero_()
        if getattr(self, "dora", False):
            self.dora_scales[slot], self.dora_bias[slot] = 1.0, 0.0

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__}: no LoRAContext attached (pass context= or call "
                               "lora_ext.multi.attach_context(model, ctx))")
        if is_dtensor(self.base.weight):
            raise ValueError(f"{type(self).__name__}: its base layer was tensor-parallelized on its own (e.g. torch's "
                             "ColwiseParallel on '<name>.base'), the adapter pools were not; parallelize the "
                             "MultiLoRALinear itself with lora_ext.tp.ColwiseParallelLoRA / RowwiseParallelLoRA")
        y = self.base(x)
        if y.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is an inference layer; run it under "
                               "torch.no_grad() or torch.inference_mode()")
        return y

    def extra_repr(self) -> str:
        shard = "".join(f", {k}={v}" for k, v in (("in_shard", self.in_shard), ("out_shard", self.out_shard)) if v)
        return (f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, "
                f"r_max={self.r_max}, out_slices={self.out_slices}{shard}")


class MultiLoRALinear(_MultiLoRA):
    """``y = base(x) + per-token LoRA`` with S adapter slots of rank <= r_max.

    Args:
        base: the frozen nn.Linear or transformers Conv1D (weight [in, out]); its weight's dtype
            and device are used for the pools.
        num_slots: S, adapters resident at once.
        r_max: the largest rank a slot can hold.
        out_slices: column widths of a packed projection (sum = out_features), or None.
        context: the model's LoRAContext (or set later with ``attach_context``).
        dora: slots may hold DoRA adapters (set_slot's ``magnitude``; see the module docstring):
            2 more fp32 rows of ``out`` per slot and one elementwise pass over the output.
    """

    def __init__(self, base: nn.Module, num_slots: int, r_max: int,
                 out_slices: Optional[Sequence[int]] = None,
                 context: Optional[LoRAContext] = None, dora: bool = False):
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise TypeError(f"MultiLoRALinear: base must be an nn.Linear or transformers Conv1D, got "
                            f"{type(base).__name__} (no multi-adapter layer for convolutions or other modules)")
        in_f, out_f = base.weight.shape if is_conv1d(base) else (base.in_features, base.out_features)
        super().__init__(base, in_f, out_f, num_slots, r_max, out_slices, context)
        self.dora = bool(dora)
        if self.dora:
            if out_slices is not None:
                raise ValueError("MultiLoRALinear: dora=True with out_slices is not supported (one DoRA "
                                 "magnitude per output feature of the whole layer)")
            with torch.inference_mode(False):
                kw = dict(dtype=torch.float32, device=base.weight.device)
                self.register_buffer("dora_scales", torch.ones(num_slots + 1, out_f, **kw), persistent=False)
                self.register_buffer("dora_bias", torch.zeros(num_slots + 1, out_f, **kw), persistent=False)

    @torch.no_grad()
    def set_slot(self, slot: int, A, B, scale, magnitude: Optional[torch.Tensor] = None) -> None:
        """As _MultiLoRA.set_slot; ``magnitude`` [out] makes it a DoRA adapter (layer built with
        dora=True): its g = m / ||W0 + scale B A|| is computed here, once, in fp32 from m as given
        and the norm rounded to the base weight's dtype (as PEFT, whose norm has the input's dtype,
        and LoRALinear(use_dora=True), whose m has the weight's), before the slot is written. A g that
        is not finite (a zero row of W0 + scale B A, or a non-finite magnitude) raises ValueError; the
        slot keeps what it held."""
        name, W = f"{type(self).__name__}.set_slot", self.base.weight
        slot = self._slot_index("set_slot", slot)
        if magnitude is not None:
            if not self.dora:
                raise ValueError(f"{name}: a DoRA magnitude needs a layer built with dora=True")
            _with_data(name, "magnitude", magnitude, W)
            if tuple(magnitude.shape) != (self.out_features,):
                raise ValueError(f"{name}: magnitude must be [{self.out_features}], got {tuple(magnitude.shape)}")
            if self.in_shard or self.out_shard:
                raise ValueError(f"{name}: DoRA adapters are not served under tensor parallelism")
        staged = self._stage_slot(A, B, scale)  # the slot is written once g is known too
        if not self.dora:
            return self._write_slot(slot, staged)
        g = torch.ones(self.out_features, dtype=torch.float32, device=self.dora_scales.device)
        if magnitude is not None:
            Ap, Bp, _, r, s = staged[0]
            s = float(torch.tensor(s, dtype=torch.float32))  # the scale as the slot holds it
            n = dora_norm(W, Ap[:r].to(W.device, W.dtype), Bp[:, :r].to(W.device, W.dtype), s,
                          fan_in_fan_out=is_conv1d(self.base))
            g = (magnitude.to(W.device).float() / n.to(W.dtype).float()).to(g.device)
            bad = torch.nonzero(~torch.isfinite(g)).flatten().tolist()
            if bad:  # refused before any write: the slot keeps what it held
                raise ValueError(f"{name}: DoRA's g = magnitude / ||W0 + scale·B·A|| is not finite for output "
                                 f"feature(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} (a zero row of W0 + scale·B·A, "
                                 f"or a non-finite magnitude; PEFT would output NaN/inf there); slot {slot} is unchanged")
        bias = 0.0 if self.bias is None else ((1 - g) * self.bias.float()).to(g.device)
        self._write_slot(slot, staged)
        self.dora_scales[slot], self.dora_bias[slot] = g, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        idx = self.context.tokens(x.shape[:-1])
        multi_lora_(y, x, self.A_pool, self.B_pool, idx, self.scales,
                    self.ranks, self.out_slices, bad_index_count=self.context.bad_index_count)
        if self.dora:  # y = y * g + (1 - g) b per token, rounded once (rows S: g = 1 for no/bad slots)
            S = self.num_slots
            gi = torch.where((idx >= 0) & (idx < S), idx, S).long()
            y2 = y.view(-1, self.out_features)
            if self.bias is None:  # (1 - g) b = 0: no gather of it
                y2.mul_(self.dora_scales[gi])
            else:
                torch.addcmul(self.dora_bias[gi], y2, self.dora_scales[gi], out=y2)
        return y


class MultiLoRAEmbedding(_MultiLoRA):
    """``y = base(ids) + per-token LoRA`` for an nn.Embedding, PEFT's LoRA embedding per slot:
    ``y[t] += scale * B @ A[:, ids[t]]`` with A [r, num_embeddings], B [embedding_dim, r]."""

    def __init__(self, base: nn.Embedding, num_slots: int, r_max: int,
                 context: Optional[LoRAContext] = None):
        if getattr(base, "max_norm", None) is not None:  # PEFT renormalizes each adapter's looked-up A rows in place
            raise ValueError(f"MultiLoRAEmbedding: an nn.Embedding with max_norm={base.max_norm} is not served "
                             "(PEFT renormalizes each adapter's looked-up rows of A in place); use LoRAEmbedding")
        super().__init__(base, base.num_embeddings, base.embedding_dim, num_slots, r_max, None, context)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(ids)
        idx = self.context.tokens(ids.shape)
        # u = the A column of each token's id (any valid slot for -1 or bad indices: expand skips them)
        u = self.A_pool[idx.clamp(0, self.num_slots - 1), :, ids.reshape(-1)].float()
        if hasattr(self.base, "embed_scale"):  # scaled embeddings (e.g. Gemma 3), as PEFT
            u = u * self.base.embed_scale
        lora_expand_(y, u, self.B_pool, idx, self.scales, self.ranks,
                     bad_index_count=self.context.bad_index_count)
        return y


def attach_context(model: nn.Module, context: LoRAContext) -> int:
    """Points every multi-adapter layer (MultiLoRALinear / Embedding / Experts) of ``model`` at ``context``;
    returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, ContextLayer):
            m.context = context
            n += 1
    return n
