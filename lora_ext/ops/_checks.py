"""Argument checks shared by the op wrappers and fake kernels: errors name the op and the argument."""
from __future__ import annotations

import math
import numbers

import torch


def as_scale(op: str, name: str, value) -> float:
    """A finite Python float from a real number (or a 1-element tensor), else TypeError/ValueError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r:.80}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ValueError(f"{op}: {name} must be finite, got {value!r:.80}")
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
