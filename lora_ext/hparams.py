"""LoRA hyperparameters: the checks of r / alpha / dropout every LoRA layer runs, and the scaling
alpha / r (alpha / sqrt(r) with rsLoRA) both ways. (lora_ext.layers imports these names too.)"""
from __future__ import annotations

import math
import numbers

__all__ = ["lora_scaling", "lora_alpha_for"]


def _check_hparams(name: str, r, alpha, dropout) -> None:
    """ValueError naming the argument for a rank that is not an int > 0 (bool included; numpy ints
    are fine), an alpha that is not a finite number, a dropout that is not a number in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"{name}: LoRA rank r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"{name}: LoRA alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: LoRA dropout must be a number in [0, 1), got {dropout!r}")


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The LoRA term's factor: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_alpha_for(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha whose lora_scaling(alpha, r, use_rslora) is ``scale``."""
    return scale * (math.sqrt(r) if use_rslora else r)
