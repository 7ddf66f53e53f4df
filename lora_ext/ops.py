"""Python wrappers of the lora_ext custom ops, their fake (meta) kernels and autograd.

Every op is a torch custom op (``torch.ops.lora_ext.*``) with a CPU kernel, a CUDA kernel
and a fake kernel registered here, so it traces under ``torch.compile(fullgraph=True)``
and can be captured in CUDA graphs.
"""
from __future__ import annotations

import torch

__all__ = ["lora_apply_", "build_info"]


def lora_apply_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Adds a LoRA update in place: ``y += scale * (x @ A.T) @ B.T``; returns ``y``.

    Shapes: x [..., in], A [r, in], B [out, r], y [..., out] (same leading dims as x).
    dtypes: float32, float16 or bfloat16, all the same; products accumulate in fp32 and the
    [T, r] intermediate is fp32, so y is rounded once. Any r >= 1 and any in/out sizes.
    x may be non-contiguous; y is written in place whatever its strides.
    Not differentiable (it mutates y): use ``lora_linear`` for training.
    """
    torch.ops.lora_ext.lora_apply_.default(y, x, A, B, float(scale))
    return y


@torch.library.register_fake("lora_ext::lora_apply_")
def _lora_apply_fake(y, x, A, B, scale):
    torch._check(A.dim() == 2 and B.dim() == 2, lambda: "lora_apply_: A and B must be 2-D")
    torch._check(A.shape[1] == x.shape[-1] and B.shape[1] == A.shape[0] and y.shape[-1] == B.shape[0],
                 lambda: f"lora_apply_: shapes y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)} do not fit")
    return None


def build_info() -> list[str]:
    """Backends compiled into lora_ext._C: ``["cpu"]`` or ``["cpu", "cuda:<archs>"]``."""
    return list(torch.ops.lora_ext.build_info.default())
from ._ops_multi import *  # noqa: F401,F403
