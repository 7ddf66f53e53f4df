"""LoRAEmbedding: nn.Embedding + LoRA in PEFT's layout (lora_embedding_A [r, num_embeddings],
lora_embedding_B [dim, r]; A starts at zero, as in PEFT). Merge, factors and the rest: LoRALayer.

``use_dora=True``: DoRA as PEFT's DoraEmbeddingVariant. The table [num, dim] is an [in, out] weight
(fan_in_fan_out), so ``lora_magnitude_vector`` is [dim] (PEFT's shape), initially the norms
``n[o] = ||E[:, o] + s (B A)[o, :]||`` over the vocabulary (ops.dora_norm, fan_in_fan_out=True); with
g = m / n (n detached) the output is ``g * (E[ids] + s A^T[ids] B^T)`` (times embed_scale, as the
plain output; PEFT: g * base_result + g * s * lora * embed_scale). No dropout (PEFT's embedding LoRA
has none). Factors in another dtype than the table (fp32 adapters on a bf16 model, PEFT's default
autocast_adapter_dtype): the looked-up rows of A^T and B are cast to the table's dtype, so the output
has the table's dtype, as nn.Embedding's and PEFT's (which computes the delta in fp32 and casts the
sum back: the same up to that rounding). Merge / exact unmerge / dtype changes while merged:
lora_ext.dora on the [in, out] weight.

``max_norm`` (as nn.Embedding: looked-up rows renormalized in place) renormalizes the rows of W0 and
of A^T separately, as PEFT; a merged table's rows would be renormalized together (other outputs, and
the merged weight rewritten in place), so merge refuses such a layer (merge_refusal: ValueError
naming max_norm; PEFT merges it and the outputs change), plain or DoRA. DoRA's g is taken, as PEFT's,
between the two renormalizations (after W0's rows, before A^T's), so the first lookup of rows of A^T
longer than max_norm gives another output than the next."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dora import dora_scale
from .hparams import _check_hparams, lora_scaling
from .layers import LoRALayer, factors_like

__all__ = ["LoRAEmbedding"]


class LoRAEmbedding(LoRALayer):
    """nn.Embedding + LoRA (PEFT layout): y = E[ids] + scaling * A^T[ids] B^T, E frozen."""

    lora_kind = "embedding"
    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, alpha: float = 8,
                 use_rslora: bool = False, padding_idx: int | None = None, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 device=None, dtype=None, use_dora: bool = False):
        super().__init__()
        _check_hparams(type(self).__name__, r, alpha, 0.0)
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.r, self.lora_alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        probe = nn.Embedding(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                             scale_grad_by_freq, sparse, device="meta")  # nn.Embedding's checks
        self.padding_idx = probe.padding_idx  # negative -> num_embeddings + padding_idx, as nn.Embedding
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = max_norm, norm_type, scale_grad_by_freq, sparse
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw), requires_grad=False)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, **kw))
        self.use_dora = bool(use_dora)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self._magnitude_shape(embedding_dim), **kw))
        self.merged = False
        self.base_class: type = nn.Embedding
        self.reset_parameters()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, r: int = 8, alpha: float = 8,
                       use_rslora: bool = False, use_dora: bool = False) -> "LoRAEmbedding":
        """Wraps an nn.Embedding; shares (and freezes) its weight. Factors in PEFT's layout:
        lora_embedding_A [r, num_embeddings] (zeros), lora_embedding_B [embedding_dim, r]; use_dora:
        lora_magnitude_vector [embedding_dim] (the norms, so the new layer computes what ``emb`` does).
        The layer is in the module's mode (train / eval)."""
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"LoRAEmbedding.from_embedding: expected nn.Embedding, got {type(emb).__name__}")
        with torch.device("meta"):
            layer = cls(emb.num_embeddings, emb.embedding_dim, r, alpha, use_rslora, emb.padding_idx,
                        emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse, use_dora=use_dora)
        layer._adopt(emb, f"{cls.__name__}.from_embedding")
        # scaled word embeddings (Gemma, Bart, M2M100, ...: forward returns E[ids] * embed_scale): PEFT
        # scales the base output (its base_layer's forward) and the LoRA output alike
        scale = getattr(emb, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            layer.register_buffer("embed_scale", scale, persistent=False)
        elif scale is not None:
            layer.embed_scale = float(scale)
        layer.reset_lora_parameters()
        return layer.train(emb.training)

    def reset_parameters(self) -> None:
        """Re-initializes everything: the table as nn.Embedding.reset_parameters (standard normal,
        padding_idx row zero), then reset_lora_parameters. A merged layer is unmerged first and
        merged again after, as by set_lora_factors."""
        with self._unmerged(f"{type(self).__name__}.reset_parameters"):
            nn.init.normal_(self.weight)
            if self.padding_idx is not None:
                with torch.no_grad():
                    self.weight[self.padding_idx].fill_(0)
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """As PEFT: A zeros, B standard normal, DoRA's magnitude the norms of E + scaling B A (a merged
        layer: unmerged first, merged again after)."""
        with self._unmerged(f"{type(self).__name__}.reset_lora_parameters"):
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            if self.use_dora:
                self._set_magnitude(None)

    @property
    def _weight_in_out(self) -> bool:  # weight [num, dim] = [in, out]: the Conv1D layout
        return True

    def merge_refusal(self) -> str | None:
        if self.max_norm is None:
            return None
        return (f"max_norm={self.max_norm}: the merged layer would renormalize the looked-up rows of W0 + "
                "scaling (B A)^T together, not those of W0 and lora_embedding_A^T separately (as the unmerged layer "
                "and PEFT's do), so it would compute something else")

    def _new_base(self) -> nn.Module:
        cls = getattr(self, "base_class", nn.Embedding)
        kw = dict(padding_idx=self.padding_idx, max_norm=self.max_norm, norm_type=self.norm_type,
                  scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)
        try:
            base = cls(self.num_embeddings, self.embedding_dim, **kw)
        except TypeError:  # an Embedding subclass with another signature (e.g. a scaled embedding)
            base = cls.__new__(cls) if issubclass(cls, nn.Embedding) else nn.Embedding.__new__(nn.Embedding)
            nn.Embedding.__init__(base, self.num_embeddings, self.embedding_dim, **kw)
        scale = getattr(self, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            base.register_buffer("embed_scale", scale, persistent=False)
        elif scale is not None:
            base.embed_scale = scale
        return base

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # loralib's lora.Embedding names the same factors lora_A [r, num_embeddings] / lora_B [dim, r]
        for ours, theirs in zip(self.factor_names, ("lora_A", "lora_B")):
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor, sparse: bool) -> torch.Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse)

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, "embed_scale", None)
        if scale is None:
            return t
        return t * (scale.to(t.dtype) if isinstance(scale, torch.Tensor) else scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._scaled(self._embed(ids, self.weight, self.sparse))
        if self.merged:
            return out
        # DoRA's g as PEFT takes it (max_norm renormalizes looked-up rows in place): from the table after
        # its lookup, from A before A's lookup below
        g = None if not self.use_dora else dora_scale(self.lora_magnitude_vector, self.weight, self.lora_embedding_A,
                                                      self.lora_embedding_B, self.scaling, fan_in_fan_out=True)
        # the lookup in A^T (a transposed view) takes a dense gradient: a sparse one cannot be transposed;
        # it reads the parameter itself (max_norm renormalizes its rows in place, as PEFT's), then the
        # looked-up rows and B go to the table's dtype (fp32 factors on a bf16 table: a bf16 output)
        after_a = self._embed(ids, self.lora_embedding_A.t(), sparse=False)
        after_a, B = factors_like(out, after_a, self.lora_embedding_B)
        out = out + self._scaled((after_a @ B.t()) * self.scaling)
        return out if g is None else out * g.to(out.dtype)

    def extra_repr(self) -> str:
        opts = [f"{k}={getattr(self, k)}" for k, default in (("padding_idx", None), ("max_norm", None),
                ("norm_type", 2.0), ("scale_grad_by_freq", False), ("sparse", False)) if getattr(self, k) != default]
        return ", ".join([f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.lora_alpha}"] + opts
                         + (["use_rslora=True"] if self.use_rslora else [])
                         + (["use_dora=True"] if self.use_dora else []) + (["merged=True"] if self.merged else []))
