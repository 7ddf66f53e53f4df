"""Argument checks shared by the op wrappers and fake kernels: errors name the op and the argument."""
from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD


F32_MAX = float(torch.finfo(torch.float32).max)


def as_scale(op: str, name: str, value) -> float:
    """A Python float finite in float32 (the kernels' arithmetic) from a real number or a
    1-element tensor that does not require grad, else TypeError/ValueError. Symbolic values
    (torch.compile with a varying scale) pass through: the op checks them when it runs.
    A tensor's value is unknown while torch.compile traces, and the kernels take a float argument,
    which cannot hold it: the call graph-breaks there (runs eagerly, checked as above); under
    ``fullgraph=True`` and ``torch.export`` that is an error naming the op and the argument."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.requires_grad:
            raise TypeError(f"{op}: {name} is a tensor that requires grad, but {name} is not "
                            "differentiated; pass a float (or detach it)")
        why = (f"{op}: {name} is a tensor, whose value torch.compile / torch.export cannot pass to the "
               f"kernel's float argument while tracing; pass {name} as a Python float (float({name}) outside "
               "the compiled or exported function) to compile the call into the graph")
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break(msg=why)
        value = value.item()
        if isinstance(value, (torch.SymFloat, torch.SymInt)):  # torch.export (non-strict): no graph break there
            raise RuntimeError(why)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r:.80}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not abs(out) <= F32_MAX:  # NaN too
        raise ValueError(f"{op}: {name} must be finite in float32 (|{name}| <= 3.4e38), got {value!r:.80}")
    return out


def one_device(op: str, **tensors) -> None:
    """All given tensors (lists of tensors and None allowed) on one device. Fake kernels call it:
    a `meta` tensor among real ones dispatches to them, and must raise rather than return
    uninitialised results."""
    first = None
    for name, t in tensors.items():
        for i, x in enumerate(t if isinstance(t, (list, tuple)) else [t]):
            if x is None:
                continue
            label = f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
            if first is None:
                first = (label, x.device)
            elif x.device != first[1]:
                raise RuntimeError(f"{op}: {label} is on {x.device} but {first[0]} is on {first[1]}; "
                                   "all tensors must be on one device")


def no_grad_needed(op: str, hint: str = "", *, why: str = "it writes in place", **tensors) -> None:
    """The in-place (and serving) ops are not differentiable: in grad mode an argument that requires
    grad would get no gradient (and a leaf y would change behind autograd's back), so it raises
    instead; so does a forward-mode AD tangent, in any grad mode (no_tangent)."""
    no_tangent(op, f"is not differentiable ({why})", **tensors)
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"{op}: {name} requires grad, but {op} is not differentiable ({why}); "
                               f"run it under torch.no_grad() or torch.inference_mode(){hint}")


def wrote(*tensors) -> None:
    """Bumps the version counters of the tensors an op wrote in place (None skipped), as torch's
    in-place ops do (lora_ext's C++ ops have no ADInplaceOrView kernel, so the dispatcher does not):
    autograd then refuses to backward through a value it saved before the write ("modified by an
    inplace operation") instead of silently using the new values. Not while torch.compile traces:
    the compiled graph writes its mutated inputs back with copy_, which bumps them."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version([t for t in tensors if t is not None])


def tangent_of(**tensors) -> str | None:
    """The name of the first tensor (lists of tensors and None allowed) that carries a forward-mode
    AD tangent (torch.func.jvp / jacfwd, torch.autograd.forward_ad), else None. torch's autograd
    for custom ops has no forward-mode formula, and when no input requires grad it runs the kernel
    without looking at tangents, so the output would silently have none: the wrappers look first.
    Outside a dual level no tensor has a tangent, so the check is one comparison (it is also what
    torch.compile traces)."""
    if fwAD._current_level < 0:
        return None
    for name, t in tensors.items():
        for i, x in enumerate(t if isinstance(t, (list, tuple)) else [t]):
            if isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None:
                return f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
    return None


def no_tangent(op: str, why: str, **tensors) -> None:
    """RuntimeError if an argument carries a forward-mode AD tangent, which the op would drop."""
    if (name := tangent_of(**tensors)) is not None:
        raise RuntimeError(f"{op}: {name} carries a forward-mode AD tangent (torch.func.jvp / jacfwd or "
                           f"torch.autograd.forward_ad), but {op} {why}")


# ---- fake kernels (meta tensors, torch.compile tracing) refuse what the kernels refuse ----
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def fake_float(op: str, name: str, t: torch.Tensor) -> None:
    """A kernel dtype (float32, float16, bfloat16), else the kernels' RuntimeError."""
    if t.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"{op}: {name} has dtype {_dtype_name(t.dtype)}; supported are float32, "
                           "float16 and bfloat16")


def fake_like(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Each given tensor (None allowed) has ref's dtype, else the kernels' RuntimeError."""
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise RuntimeError(f"{op}: {name} has dtype {_dtype_name(t.dtype)} but {ref_name} has "
                               f"{_dtype_name(ref.dtype)}; dtypes must match")


def fake_dims(op: str, **named) -> None:
    """Each tensor's number of dims is the one given ((tensor, dims, shape text) triples)."""
    for name, (t, dims, want) in named.items():
        if t.dim() not in ((dims,) if isinstance(dims, int) else dims):
            raise RuntimeError(f"{op}: {name} must be {want}, got shape {list(t.shape)}")
