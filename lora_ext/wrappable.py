"""Whether a LoRA layer can stand in for a module: a LoRA layer computes the base output itself from
the module's weight (F.linear, F.embedding, Conv1D's addmm, F.conv*d), so a module whose call runs more
(hooks, a forward replaced on the instance, a subclass with its own forward) or whose weight is
recomputed on access (parametrizations) cannot be wrapped. inject, the from_* constructors and
patch_peft ask here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_conv1d", "parametrized", "hooked", "unwrappable"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out], y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def parametrized(module: nn.Module) -> str | None:
    """Why a LoRA layer cannot share a parametrized module's weight (None: not parametrized)."""
    names = sorted(getattr(module, "parametrizations", None) or ())
    if not names:
        return None
    return (f"has parametrizations on {names} (weight_norm, spectral_norm...), so its weight is recomputed "
            "on every access and cannot be shared; remove them first (torch.nn.utils.parametrize."
            "remove_parametrizations)")


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward (forward or backward hooks
    or pre-hooks, or a forward replaced on the instance): the fused paths, which read its
    weights, would skip it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def unwrappable(m: nn.Module) -> str | None:
    """Why a LoRA layer, which computes the base output itself from the target's weight (F.linear,
    F.embedding, Conv1D's addmm, F.conv*d), cannot stand in for the Linear/Embedding/Conv1D/ConvNd ``m`` (None: it
    can): hooks or a replaced forward, or a subclass whose own forward (a router, a positional
    embedding, a quantized layer) gives other outputs than that on a probe input (FalconLinear's
    x @ W^T + b passes; a scaled word embedding's is known: embed_scale)."""
    if hooked(m):
        return "has hooks or a forward replaced on the instance, which a LoRA layer would skip"
    if (why := parametrized(m)) is not None:
        return why
    if is_conv1d(m):
        plain = type(m).forward is next(c for c in type(m).__mro__ if c.__name__ == "Conv1D").forward
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        plain = type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward) or _same_on_probe(m)
    elif isinstance(m, nn.Embedding):
        plain = type(m).forward is nn.Embedding.forward or hasattr(m, "embed_scale") or _same_on_probe(m)
    else:
        plain = type(m).forward is nn.Linear.forward or _same_on_probe(m)
    if plain:
        return None
    return (f"is a {type(m).__name__} whose forward is not the plain layer's (a router, a positional or "
            "quantized layer?), which a LoRA layer would not run; PEFT wraps the layer and calls it")


@torch.no_grad()
def _same_on_probe(m: nn.Module) -> bool:
    """Whether ``m``'s own forward equals F.linear / F.embedding of its weight (a convolution: the
    plain nn.ConvNd forward) on a small random input (False when it cannot run one: meta weights,
    other signatures, other outputs)."""
    w = m.weight
    conv = next((c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(m, c)), None)
    if not isinstance(w, torch.Tensor) or w.is_meta or not w.is_floating_point() or (conv is None and w.dim() != 2):
        return False
    g = torch.Generator(device=w.device).manual_seed(0)
    try:
        if conv is not None:  # the plain class's forward on an input a few kernel extents wide
            size = [d * (k - 1) + 3 for d, k in zip(m.dilation, m.kernel_size)]
            x = torch.randn(1, m.in_channels, *size, generator=g, device=w.device).to(w.dtype)
            want = conv.forward(m, x)
        elif isinstance(m, nn.Embedding):
            x = torch.randint(0, w.shape[0], (2, 3), generator=g, device=w.device)
            want = F.embedding(x, w, m.padding_idx)
        else:
            x = torch.randn(3, w.shape[1], generator=g, device=w.device).to(w.dtype)
            want = F.linear(x, w, m.bias)
        got = m(x)
    except Exception:  # noqa: BLE001 - any failure means "not a plain layer"
        return False
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3))
