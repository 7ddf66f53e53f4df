"""LoRA modules: LoRALinear (nn.Linear and transformers' Conv1D) and LoRAEmbedding.

Parameter names and shapes follow loralib / HF PEFT: ``lora_A`` [r, in], ``lora_B`` [out, r]
(``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B`` [dim, r] for embeddings). The
base ``weight``/``bias`` are frozen; ``scaling`` is alpha / r (alpha / sqrt(r) with rsLoRA).
B (A for embeddings, as in PEFT) starts at zero, so wrapping a layer leaves its output unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import lora_linear

__all__ = ["LoRALinear", "LoRAEmbedding", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out], y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _check_hparams(name: str, r, dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{name}: LoRA rank r must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: LoRA dropout must be in [0, 1), got {dropout!r}")


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class _Mergeable:
    """merge()/unmerge() of the LoRA layers (the work is in lora_ext.merge)."""

    def merge(self, safe: bool = False, exact: bool = True) -> None:
        """Folds the adapter into the weight (no-op if merged); forward then skips LoRA.
        exact=True keeps what is needed to unmerge bit for bit (lora_ext.merge_layer)."""
        from .merge import merge_layer

        merge_layer(self, safe=safe, exact=exact)

    def unmerge(self) -> None:
        """Takes the adapter out of the weight again (lora_ext.unmerge_layer)."""
        from .merge import unmerge_layer

        unmerge_layer(self)


class LoRALinear(_Mergeable, nn.Module):
    """y = x W^T + b + scaling * B A dropout(x), W frozen, A/B trained (fused lora_linear op).

    ``fan_in_fan_out=True`` stores W as [in, out] (transformers' Conv1D layout).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, use_rslora: bool = False, bias: bool = True,
                 fan_in_fan_out: bool = False, init: str = "kaiming", device=None, dtype=None):
        super().__init__()
        _check_hparams(type(self).__name__, r, dropout)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(alpha, r, use_rslora)
        self.lora_dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.merged = False
        self.base_class: type = nn.Linear
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_lora_parameters(init)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming") -> "LoRALinear":
        """Wraps an nn.Linear or transformers Conv1D; shares (and freezes) its weight and bias."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"LoRALinear.from_linear: expected nn.Linear or transformers Conv1D, "
                            f"got {type(linear).__name__}")
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        with torch.device("meta"):
            layer = cls(in_f, out_f, r, alpha, dropout, use_rslora, bias=linear.bias is not None,
                        fan_in_fan_out=conv1d)
        layer.weight = w
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(out_f, r, device=w.device, dtype=w.dtype))
        layer.base_class = type(linear)
        layer.reset_lora_parameters(init)
        return layer

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A: Kaiming-uniform (a=sqrt(5), as PEFT) or Gaussian (std 1/r); B: zeros."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            raise ValueError(f"{type(self).__name__}: init must be 'kaiming' or 'gaussian', got {init!r}")
        nn.init.zeros_(self.lora_B)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype:
            A, B = A.to(x.dtype), B.to(x.dtype)
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling, self.lora_dropout,
                           self.training, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.lora_dropout}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self.merged else ""))


class LoRAEmbedding(_Mergeable, nn.Module):
    """nn.Embedding + LoRA (PEFT layout): y = E[ids] + scaling * A^T[ids] B^T, E frozen."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, alpha: float = 8,
                 use_rslora: bool = False, padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        _check_hparams(type(self).__name__, r, 0.0)
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(alpha, r, use_rslora)
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw), requires_grad=False)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, **kw))
        self.merged = False
        self.base_class: type = nn.Embedding
        nn.init.normal_(self.weight)
        self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, r: int = 8, alpha: float = 8,
                       use_rslora: bool = False) -> "LoRAEmbedding":
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"LoRAEmbedding.from_embedding: expected nn.Embedding, got {type(emb).__name__}")
        with torch.device("meta"):
            layer = cls(emb.num_embeddings, emb.embedding_dim, r, alpha, use_rslora, emb.padding_idx)
        layer.weight = emb.weight
        layer.weight.requires_grad_(False)
        layer.max_norm, layer.norm_type = emb.max_norm, emb.norm_type
        layer.scale_grad_by_freq, layer.sparse = emb.scale_grad_by_freq, emb.sparse
        w = emb.weight
        layer.lora_embedding_A = nn.Parameter(torch.empty(r, emb.num_embeddings, device=w.device, dtype=w.dtype))
        layer.lora_embedding_B = nn.Parameter(torch.empty(emb.embedding_dim, r, device=w.device, dtype=w.dtype))
        layer.base_class = type(emb)
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        """As PEFT: A zeros, B standard normal."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._embed(ids, self.weight)
        if self.merged:
            return out
        after_a = self._embed(ids, self.lora_embedding_A.t())
        return out + (after_a @ self.lora_embedding_B.t()) * self.scaling

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.lora_alpha}"
                + (", merged=True" if self.merged else ""))
