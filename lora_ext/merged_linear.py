"""MergedLinear: loralib's LoRA on some slices of a fused projection (GPT-2's c_attn: q and v, not k).

    layer = lora_ext.MergedLinear(768, 3 * 768, r=8, alpha=16, enable_lora=[True, False, True],
                                  fan_in_fan_out=True)
    block.attn.c_attn = lora_ext.MergedLinear.from_linear(block.attn.c_attn, [True, False, True], r=8, alpha=16)

The output is split into n = len(enable_lora) equal slices of d = out / n rows; the k enabled ones
get a LoRA of rank r each. Parameters as loralib's (its checkpoints load with load_state_dict):
``lora_A`` [k·r, in] (rows j·r:(j+1)·r are the j-th enabled slice's A) and ``lora_B`` [k·d, r]
(rows j·d:(j+1)·d its B); ``scaling`` = alpha / r (alpha / sqrt(r) with rsLoRA). The j-th enabled
slice's output gets ``scaling · B_j A_j dropout(x)``, one dropout mask over x for all slices.

For the fused op (and for merge, PEFT export, everything generic over LoRALayer) the adapter is
a LoRA of the whole layer of rank k·r: A = lora_A and B = the zero-padded [out, k·r] matrix whose
rows of the j-th enabled slice hold B_j in columns j·r:(j+1)·r (lora_factors()). B is built from
lora_B by padding and concatenation, so gradients reach exactly lora_B's entries, bit for bit
what the op computes for them. The op's expand then does k·r instead of r multiply-adds per
output element (cheap next to the base GEMM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hparams import _check_hparams
from .layers import LoRALayer, LoRALinear, factors_like, is_conv1d
from .ops import lora_linear
from .sharding import is_dtensor

__all__ = ["MergedLinear"]


def _check_enable_lora(enable_lora, out_features: int) -> tuple[bool, ...]:
    if callable(getattr(enable_lora, "tolist", None)):  # a bool tensor or numpy array
        enable_lora = enable_lora.tolist()
    if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, (list, tuple)) or not all(
            isinstance(e, bool) for e in enable_lora):
        raise ValueError(f"MergedLinear: enable_lora must be a list of bools (one per slice of the output, "
                         f"e.g. [True, False, True] for q, k, v), got {enable_lora!r:.80}")
    if not any(enable_lora):
        raise ValueError(f"MergedLinear: enable_lora={list(enable_lora)} enables no slice (a layer without "
                         "LoRA needs no MergedLinear)")
    if out_features % len(enable_lora) != 0:
        raise ValueError(f"MergedLinear: out_features={out_features} is not divisible by len(enable_lora)="
                         f"{len(enable_lora)} (the output is split into that many equal slices)")
    return tuple(enable_lora)


class MergedLinear(LoRALayer):
    """loralib's MergedLinear on the fused lora_linear op: y = x W^T + b, plus for the j-th slice
    enabled in ``enable_lora`` scaling * dropout(x) A_j^T B_j^T on its rows. W frozen.

    Positional arguments as loralib's (``alpha`` / ``dropout`` for its ``lora_alpha`` /
    ``lora_dropout``; lora_ext's default alpha is 8, loralib's 1; ``eval()`` does not merge:
    lora_ext.merge does). ``fan_in_fan_out=True`` stores W as [in, out] (transformers' Conv1D).
    """

    lora_kind = "linear"
    factor_names = ("lora_A", "lora_B")
    # the base layer as LoRALinear's (nn.Linear or Conv1D, the same attributes)
    _weight_in_out = LoRALinear._weight_in_out
    _new_base = LoRALinear._new_base
    base_forward = LoRALinear.base_forward
    reset_parameters = LoRALinear.reset_parameters
    reset_lora_parameters = LoRALinear.reset_lora_parameters
    _init_linear = LoRALinear._init_linear

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, enable_lora=None, fan_in_fan_out: bool = False, *,
                 bias: bool = True, use_rslora: bool = False, init: str = "kaiming", device=None, dtype=None):
        super().__init__()
        _check_hparams(type(self).__name__, r, alpha, dropout)  # the hyperparameters are named first
        self.enable_lora = _check_enable_lora(enable_lora, out_features)
        kw = self._init_linear(in_features, out_features, r, alpha, dropout, use_rslora, bias, fan_in_fan_out,
                               init, device, dtype)
        k, d = self.groups, self.slice_size
        self.lora_A = nn.Parameter(torch.empty(k * self.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(k * d, self.r, **kw))
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, enable_lora, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming") -> "MergedLinear":
        """Wraps a fused nn.Linear or transformers Conv1D (GPT-2's c_attn); shares (and freezes) its
        weight and bias; in the module's mode (train / eval), as LoRALinear.from_linear."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"MergedLinear.from_linear: expected nn.Linear or transformers Conv1D, "
                            f"got {type(linear).__name__}")
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        with torch.device("meta"):
            layer = cls(in_f, out_f, r, alpha, dropout, enable_lora, conv1d, bias=linear.bias is not None,
                        use_rslora=use_rslora)
        layer._adopt(linear, f"{cls.__name__}.from_linear")
        layer.reset_lora_parameters(init)
        return layer.train(linear.training)

    @property
    def groups(self) -> int:
        """k: the number of enabled slices."""
        return sum(self.enable_lora)

    @property
    def slice_size(self) -> int:
        """d: the rows of the output per slice (out_features / len(enable_lora))."""
        return self.out_features // len(self.enable_lora)

    # ---------------------------------------------------------------- the fused-layer form
    def _padded(self, B: torch.Tensor) -> torch.Tensor:
        """lora_B [k·d, r] -> [out, k·r]: the j-th enabled slice's rows hold B_j in columns
        j·r:(j+1)·r, every other entry is zero (differentiable: pad and cat)."""
        k, d, r = self.groups, self.slice_size, B.shape[1]
        blocks, rows, j = B.split(d), [], 0
        for on in self.enable_lora:
            if on:
                rows.append(F.pad(blocks[j], (j * r, (k - 1 - j) * r)))
                j += 1
            else:
                rows.append(B.new_zeros(d, k * r))
        return torch.cat(rows)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) of the whole fused layer: lora_A [k·r, in], the zero-padded B [out, k·r]
        (a tensor built from lora_B, not a parameter) and the scaling; delta = scale * B @ A."""
        if is_dtensor(self.lora_B):
            raise ValueError("MergedLinear.lora_factors: lora_B is sharded (a DTensor, after fully_shard); "
                             "a MergedLinear's fused-layer factors are built from the whole lora_B: take "
                             "them from a single-process copy of the model")
        return self.lora_A, self._padded(self.lora_B), float(self.scaling)

    def lora_factors_of(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state dict's lora_A / lora_B (loralib's [k·d, r], or the padded [out, k·r]) as
        lora_factors() gives them (ValueError naming the method for other shapes)."""
        A, B, _ = self._new_factors(A, B, "MergedLinear.lora_factors_of")
        return A, self._padded(B)

    def _new_factors(self, A: torch.Tensor, B: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, lora_B, r) from A [k·r, in] and B either loralib's [k·d, r] or the fused layer's
        [out, k·r], which must be zero outside the enabled slices' blocks (what lora_factors and
        PEFT export give) once its columns (and A's rows: the same delta) are put in slice order."""
        k, d, out, n_in = self.groups, self.slice_size, self.out_features, self.in_features
        R = A.shape[0] if A.dim() == 2 else 0
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n_in or R == 0 or R % k != 0:
            raise ValueError(f"{where}: expected A [{k}·r, {n_in}] (r > 0; {k} enabled slices), got A "
                             f"{tuple(A.shape)}, B {tuple(B.shape)}")
        r = R // k
        if tuple(B.shape) == (k * d, r):
            return A, B, r
        if tuple(B.shape) != (out, R):
            raise ValueError(f"{where}: expected B [{k * d}, {r}] (loralib's lora_B) or [{out}, {R}] (the "
                             f"fused layer's, as lora_factors / PEFT export), got B {tuple(B.shape)}")
        if not self._in_blocks(B, r) and (order := self._slice_order(B, r)) is not None:
            A, B = A[order], B[:, order]  # the same delta B @ A, its rank components in slice order
        if not self._in_blocks(B, r):  # also NaN outside the blocks (inside: lora_B may hold it)
            raise ValueError(f"{where}: B [{out}, {R}] has non-zero entries outside the blocks of the enabled "
                             f"slices (enable_lora={list(self.enable_lora)}), in any order of its {R} columns, "
                             "which a MergedLinear cannot hold; load it into a LoRALinear of the whole layer instead")
        return A, self._native(B, r), r

    def _in_blocks(self, B: torch.Tensor, r: int) -> bool:
        """Whether the fused layer's B [out, k·r] is zero (not NaN) outside the enabled slices' blocks."""
        outside = self._padded(B.new_ones(self.groups * self.slice_size, r)) == 0
        return bool(B[outside].eq(0).all())

    def _native(self, B: torch.Tensor, r: int) -> torch.Tensor:
        """The fused layer's B [out, k·r] -> lora_B [k·d, r]: the j-th enabled slice's rows, columns j·r:(j+1)·r."""
        rows = B.split(self.slice_size)
        on = [i for i, e in enumerate(self.enable_lora) if e]
        return torch.cat([rows[i][:, j * r:(j + 1) * r] for j, i in enumerate(on)])

    def _slice_order(self, B: torch.Tensor, r: int) -> list[int] | None:
        """A column order of the fused layer's B [out, k·r] putting r columns writing to each enabled
        slice in that slice's block (combine(how="cat") of MergedLinear adapters interleaves them;
        all-zero columns fill up), or None if there is none."""
        rows = B.split(self.slice_size)
        writes = torch.stack([rows[i].ne(0).any(0) for i, e in enumerate(self.enable_lora) if e])  # [k, k·r]
        groups, spare = [[] for _ in range(self.groups)], []
        for c, hit in enumerate(writes.t().tolist()):
            if sum(hit) > 1:  # a component writing to two slices: no MergedLinear holds it
                return None
            (groups[hit.index(True)] if any(hit) else spare).append(c)
        for g in groups:
            while len(g) < r and spare:
                g.append(spare.pop(0))
        if spare or any(len(g) != r for g in groups):
            return None
        return [c for g in groups for c in sorted(g)]

    # ---------------------------------------------------------------- module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        A, B = factors_like(x, self.lora_A, self.lora_B)
        return lora_linear(x, self.weight, self.bias, A, self._padded(B), self.scaling, self.lora_dropout,
                           self.training, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"enable_lora={list(self.enable_lora)}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.lora_dropout}" + (", bias=False" if self.bias is None else "")
                + (", use_rslora=True" if self.use_rslora else "")
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self.merged else ""))
