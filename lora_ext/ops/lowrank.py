"""Single-adapter low-rank ops (csrc/lowrank*.h, csrc/cpu|cuda/lowrank*): lora_apply_ and the
autograd-aware lora_linear — wrappers, fake kernels, autograd."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (as_scale, fake_dims, fake_float, fake_like, no_grad_needed, one_device, tangent_of,
                      wrote)

__all__ = ["lora_apply_", "lora_linear", "build_info"]


def lora_apply_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Adds a LoRA update in place: ``y += scale * (x @ A.T) @ B.T``; returns ``y``.

    Shapes: x [..., in], A [r, in], B [out, r], y [..., out] (same leading dims as x).
    dtypes: float32, float16 or bfloat16, all the same; products accumulate in fp32 and the
    [T, r] intermediate is fp32, so y is rounded once. Any r >= 1 and any in/out sizes.
    x may be non-contiguous; y is written in place whatever its strides.
    Not differentiable (it mutates y): use ``lora_linear`` for training.
    """
    no_grad_needed("lora_apply_", ", or use lora_linear to train", y=y, x=x, A=A, B=B)
    torch.ops.lora_ext.lora_apply_.default(y, x, A, B, as_scale("lora_apply_", "scale", scale))
    wrote(y)
    return y


@torch.library.register_fake("lora_ext::lora_apply_")
def _lora_apply_fake(y, x, A, B, scale):
    op = "lora_apply_"
    one_device(op, y=y, x=x, A=A, B=B)
    fake_dims(op, A=(A, 2, "2-D [r, in]"), B=(B, 2, "2-D [out, r]"))
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least 1 dim [..., in], got a scalar")
    if y.dim() != x.dim():
        raise RuntimeError(f"{op}: y must have the same number of dims as x ([..., out] vs [..., in]), "
                           f"got y {list(y.shape)} and x {list(x.shape)}")
    torch._check(A.shape[0] >= 1, lambda: f"{op}: rank r = A.size(0) must be >= 1, got A {list(A.shape)}")
    torch._check(A.shape[1] == x.shape[-1] and B.shape[1] == A.shape[0] and y.shape[-1] == B.shape[0],
                 lambda: f"{op}: shapes y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)} do not fit")
    torch._check(all(a == b for a, b in zip(y.shape[:-1], x.shape[:-1])), lambda: f"{op}: leading dims "
                 f"of y and x must match, got y {list(y.shape)} and x {list(x.shape)}")
    fake_float(op, "x", x)
    fake_like(op, "x", x, A=A, B=B, y=y)
    return None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scale: float, dropout_p: float = 0.0, training: bool = False,
                fan_in_fan_out: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA linear layer: ``y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T``.

    Shapes: x [..., in], weight [out, in] ([in, out] with ``fan_in_fan_out``, transformers'
    Conv1D), bias [out] or None, A [r, in], B [out, r] -> y [..., out].
    Differentiable in x, A, B, bias (and weight if it requires grad; it is normally frozen).
    The base GEMM runs on BLAS/cuBLAS; the low-rank shrink (with the dropout mask) and the expand
    epilogue are lora_ext kernels. Saved for backward per token: x (shared with the caller) and
    the fp32 [T, r] activation x A^T (4·r bytes); the dropout mask is regenerated from a seed:
    ``seed`` (an int64 [1] tensor on x's device) or, by default, one drawn from torch's RNG.
    Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) runs it as plain torch ops
    (_lora_linear_composite); with dropout in training it raises RuntimeError.
    """
    scale = as_scale("lora_linear", "scale", scale)
    if not 0.0 <= as_scale("lora_linear", "dropout_p", dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if (name := tangent_of(x=x, weight=weight, bias=bias, A=A, B=B)) is not None:
        if p > 0:
            raise RuntimeError(f"lora_linear: forward-mode AD ({name} carries a tangent) is not supported "
                               f"with dropout in training (dropout_p={dropout_p}): the kernels regenerate "
                               "the mask from a hash, it is not a tensor; use eval mode or dropout_p=0")
        return _lora_linear_composite(x, weight, bias, A, B, scale, fan_in_fan_out)
    if p == 0:
        seed = None
    elif seed is None:
        seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    y, _ = torch.ops.lora_ext.lora_linear_fwd.default(x, weight, bias, A, B, scale, p, seed,
                                                       fan_in_fan_out)
    return y


def _lora_linear_composite(x, weight, bias, A, B, scale, fan_in_fan_out):
    """lora_linear without dropout in plain torch ops, which forward-mode AD differentiates (torch's
    autograd for custom ops has none, and drops tangents silently when nothing requires grad). The
    kernels' checks and numerics: the [T, r] activation and the low-rank product in fp32, added to
    the base GEMM's result and rounded once into x's dtype."""
    _check_lora_linear(x, weight, bias, A, B, None, fan_in_fan_out)
    u = F.linear(x.float(), A.float())
    y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
    return (y.float() + scale * F.linear(u, B.float())).to(x.dtype)


def _check_lora_linear(x, weight, bias, A, B, seed, fan_in_fan_out) -> int:
    """The checks of the kernels (fake kernel, composite path); returns ``out``."""
    one_device("lora_linear", x=x, weight=weight, bias=bias, A=A, B=B, seed=seed)
    out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    inn = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    torch._check(weight.dim() == 2 and A.dim() == 2 and B.dim() == 2 and x.dim() >= 1
                 and x.shape[-1] == inn and A.shape[1] == inn and tuple(B.shape) == (out, A.shape[0])
                 and (bias is None or tuple(bias.shape) == (out,)),
                 lambda: f"lora_linear: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)}, bias {None if bias is None else tuple(bias.shape)} "
                         "do not fit")
    torch._check(A.shape[0] >= 1, lambda: f"lora_linear: rank r = A.size(0) must be >= 1, got A {list(A.shape)}")
    fake_float("lora_linear", "x", x)
    fake_like("lora_linear", "x", x, weight=weight, A=A, B=B, bias=bias)
    return out


@torch.library.register_fake("lora_ext::lora_linear_fwd")
def _lora_linear_fwd_fake(x, weight, bias, A, B, scale, dropout_p, seed, fan_in_fan_out):
    out = _check_lora_linear(x, weight, bias, A, B, seed, fan_in_fan_out)
    if not 0.0 <= dropout_p < 1.0:
        raise RuntimeError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise RuntimeError("lora_linear: dropout needs `seed`, a one-element int64 tensor on x's device")
    T = math.prod(x.shape[:-1])
    for d in x.shape[:-1]:
        torch._check(d >= 0)
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((T, A.shape[0]), dtype=torch.float32)


@torch.library.register_fake("lora_ext::lora_linear_bwd")
def _lora_linear_bwd_fake(grad, x, weight, A, B, u, scale, dropout_p, seed, fan_in_fan_out, mask):
    one_device("lora_linear_backward", grad=grad, x=x, weight=weight, A=A, B=B, u=u, seed=seed)
    # contiguous, as the kernels return them (not empty_like: x may be a permuted view)
    return tuple(t.new_empty(t.shape) if m else None for t, m in zip((x, weight, A, B), mask))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout_p, seed, fan_in_fan_out = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], seed)
    ctx.scale, ctx.dropout_p, ctx.fan_in_fan_out = scale, dropout_p, fan_in_fan_out


def _lora_linear_backward(ctx, grad_y, grad_u):
    x, weight, A, B, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
        return _differentiable_backward(ctx, grad_y, x, weight, A, B, need)
    dx, dW, dA, dB = torch.ops.lora_ext.lora_linear_bwd.default(
        grad_y, x, weight, A, B, u, ctx.scale, ctx.dropout_p, seed, ctx.fan_in_fan_out,
        [need[0], need[1], need[3], need[4]])
    dbias = None
    if need[2]:  # sum over the leading dims; a 1-D x has none (sum(()) would reduce every dim)
        dbias = grad_y.sum(tuple(range(grad_y.dim() - 1))) if grad_y.dim() > 1 else grad_y.clone()
    return dx, dW, dbias, dA, dB, None, None, None, None


def _differentiable_backward(ctx, g, x, weight, A, B, need):
    """The gradients of _lora_linear_backward in plain torch ops, for double backward (gradient
    penalties, Hessian-vector products): autograd differentiates these. Without dropout only: the
    mask is a hash the kernels regenerate, not a tensor."""
    if ctx.dropout_p > 0:
        raise RuntimeError(f"lora_linear: double backward (create_graph=True) is not supported with "
                           f"dropout in training (dropout_p={ctx.dropout_p}); use eval mode or dropout_p=0")
    s = ctx.scale
    W = weight.t() if ctx.fan_in_fan_out else weight  # [out, in]
    T = math.prod(x.shape[:-1])  # not -1: in or out may be 0
    g2, x2 = g.reshape(T, g.shape[-1]), x.reshape(T, x.shape[-1])
    gB = g2 @ B  # [T, r]
    dx = (g2 @ W + s * (gB @ A)).reshape(x.shape) if need[0] else None
    dW = None
    if need[1]:
        dW = g2.t() @ x2
        dW = dW.t() if ctx.fan_in_fan_out else dW
    dbias = g2.sum(0) if need[2] else None
    dA = s * (gB.t() @ x2) if need[3] else None
    dB = s * (g2.t() @ (x2 @ A.t())) if need[4] else None
    return dx, dW, dbias, dA, dB, None, None, None, None


torch.library.register_autograd("lora_ext::lora_linear_fwd", _lora_linear_backward,
                                setup_context=_lora_linear_setup)


def _lora_linear_bwd_backward(ctx, *grads):
    raise RuntimeError("lora_ext.lora_linear_bwd is not differentiable; differentiate lora_linear "
                       "(its double backward runs on plain torch ops)")


torch.library.register_autograd("lora_ext::lora_linear_bwd", _lora_linear_bwd_backward)


def build_info() -> list[str]:
    """Backends compiled into lora_ext._C: ``["cpu:<isa>"]`` or ``["cpu:<isa>", "cuda:<archs>"]``.

    ``<isa>``: the CPU kernels picked for this machine at load time (``avx512+bf16``, ``avx512``,
    ``avx2`` or ``baseline``; ``LORA_EXT_CPU_ISA`` caps it); ``<archs>``: nvcc's compute
    capabilities, e.g. ``800,900``.
    """
    return list(torch.ops.lora_ext.build_info.default())
