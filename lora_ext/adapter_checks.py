"""Checks of what an adapter's files hold (lora_ext.adapters): config numbers and tensors.

Each raises ValueError (TypeError for an argument of the wrong type) whose message starts with
`where` (the file, or the caller) and names the field or key, never an error from Python's or
torch's internals."""
from __future__ import annotations

import math
import os

import torch

from .targets import _short, check_layers, check_regex, in_layers, matches

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_number(where: str, field: str, value, kind: type) -> None:
    """`value` is an int > 0 (kind int) or a finite number > 0 (kind float); bools are neither.
    An int too large for a float (JSON has no limit) is not finite."""
    if kind is int:
        ok = isinstance(value, int)
    else:
        try:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # math.isfinite(10**400)
            ok = False
    if isinstance(value, bool) or not ok or value <= 0:
        what = "an int" if kind is int else "a finite number"
        raise ValueError(f"{where}: {field} must be {what} > 0, got {_short(value)}")


def check_dropout(where: str, value) -> float:
    """A config's lora_dropout (None: 0.0) as a float in [0, 1)."""
    p = 0.0 if value is None else value
    ok = isinstance(p, (int, float)) and not isinstance(p, bool)
    if not ok or not 0.0 <= p < 1.0:  # NaN fails the comparison
        raise ValueError(f"{where}: lora_dropout={_short(value)}; expected a number in [0, 1)")
    return float(p)


def check_tensors(tensors, where: str, allow_nonfinite: bool) -> None:
    """`tensors` is a dict of str -> dense float tensors with data (a pickle may hold sparse, meta or
    quantized tensors, on which the checks below and the LoRA kernels fail), finite unless allowed."""
    if not isinstance(tensors, dict):
        raise ValueError(f"{where} holds a {type(tensors).__name__}, not a dict of tensors")
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(t).__name__}; expected str keys and tensors")
        if t.layout != torch.strided or t.is_meta:
            what = "a meta tensor (no data)" if t.is_meta else f"a {t.layout} tensor"
            raise ValueError(f"{where}: {key} is {what}; expected a dense tensor")
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
        if not allow_nonfinite and not torch.isfinite(t).all():
            raise ValueError(f"{where}: {key} holds NaN or inf values; pass allow_nonfinite=True to load it anyway")


def check_targets(where: str, config: dict, modules, weights: str) -> None:
    """Every module the weights file holds factors for is one PEFT would adapt under the config's
    target_modules / exclude_modules / layers_to_transform / layers_pattern (PeftModel.from_pretrained
    injects only those and silently drops the other tensors, so loading them would not compute what
    PEFT does; lora_ext.inject selects layers by the same rule, targets.in_layers). Checked for the
    forms that need no model: module-name suffixes or a full-name regex; None (PEFT's per-model
    defaults) and "all-linear" are not checked. Fields of another type, and layer fields PEFT's
    LoraConfig refuses (targets.check_layers), are refused."""
    fields = {}
    for fld in ("target_modules", "exclude_modules"):
        value = config.get(fld)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = list(value)
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {fld} must be a string (a regex) or a list of strings, got {_short(value)}")
        check_regex(where, fld, value)
        fields[fld] = value
    target, exclude = fields["target_modules"], fields["exclude_modules"]
    layers, pattern = check_layers(where, config.get("layers_to_transform"), config.get("layers_pattern"), target)
    for name in modules:
        if exclude is not None and exclude != "all-linear" and matches(name, exclude):
            why = f"exclude_modules={_short(exclude)} excludes"
        elif target is not None and target != "all-linear" and not matches(name, target):
            why = f"target_modules={_short(target)} does not select"
        elif not isinstance(target, str) and name not in (target or []) and not in_layers(name, layers, pattern):
            why = (f"layers_to_transform={_short(config.get('layers_to_transform'))} (layers_pattern="
                   f"{_short(config.get('layers_pattern'))}) does not select")
        else:
            continue
        raise ValueError(f"{where}: {why} module {name!r}, but {weights} holds its LoRA factors "
                         "(PeftModel.from_pretrained would not load them): fix the config or the weights")


def check_path(where: str, path) -> str:
    """An adapter directory argument as a str path (TypeError naming the argument otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike (an adapter directory), "
                        f"got {type(path).__name__} {_short(path)}")
    path = os.fspath(path)
    if not isinstance(path, str):  # a PathLike of bytes
        raise TypeError(f"{where}: path must be a str path, got {type(path).__name__} {_short(path)}")
    return path
