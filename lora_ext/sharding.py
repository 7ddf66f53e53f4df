"""How modules and tensors are wrapped or sharded by torch.distributed, told by class names (so
nothing imports torch.distributed when it is unused): DDP, FSDP1/FSDP2, DTensor parameters."""
from __future__ import annotations

from torch import nn

__all__ = ["is_dtensor", "is_fsdp", "fsdp1_of", "sharding_of", "unwrapped", "wrapper_free", "wrapper_free_name"]

_FSDP = frozenset({"FSDPModule", "FullyShardedDataParallel"})  # FSDP2 / FSDP1 classes, by name
# the child names torch's wrappers put between a module and its parent: activation checkpointing's
# CheckpointWrapper / OffloadWrapper (apply_activation_checkpointing) and FSDP1's wrapper; their
# state_dict() keys leave them out, and so do PEFT's names of the unwrapped model
_WRAPPED = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _classes(m: nn.Module) -> set[str]:
    return {c.__name__ for c in type(m).__mro__}


def is_dtensor(t) -> bool:
    """True for a torch.distributed.tensor.DTensor."""
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def is_fsdp(m: nn.Module) -> bool:
    """True for a module sharded by FSDP (fully_shard's FSDPModule or FSDP1's wrapper)."""
    return bool(_classes(m) & _FSDP)


def wrapper_free_name(name: str) -> str:
    """A module path without the steps torch's wrappers insert ("blocks.0._checkpoint_wrapped_module.up"
    -> "blocks.0.up"), as the model's state_dict() and PEFT name it."""
    return ".".join(a for a in name.split(".") if a not in _WRAPPED)


def wrapper_free(named: dict) -> dict:
    """``named`` (module path -> anything) with wrapper_free_name keys, in the same order."""
    return {wrapper_free_name(n): v for n, v in named.items()}


def fsdp1_of(model: nn.Module) -> str | None:
    """"the model" or "module <name>": the first module of ``model`` that FSDP1 (FullyShardedDataParallel)
    wraps, else None."""
    name = next((n for n, m in model.named_modules() if "FullyShardedDataParallel" in _classes(m)), None)
    return None if name is None else f"module {name!r}" if name else "the model"


def sharding_of(model: nn.Module, ddp: bool = True) -> str | None:
    """How ``model`` is already wrapped or sharded by torch.distributed (DDP when ``ddp``, FSDP's
    fully_shard, DTensor parameters from tensor parallelism), else None."""
    for m in model.modules():
        if ddp and "DistributedDataParallel" in _classes(m):
            return "wrapped in DistributedDataParallel"
        if is_fsdp(m):
            return "sharded with fully_shard (FSDP)"
    if any(is_dtensor(p) for p in model.parameters()):
        return "parallelized (DTensor parameters)"
    return None


def unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside DistributedDataParallel / torch.compile (OptimizedModule) wrappers, nested
    or not (FSDP2 wraps in place), and the prefix of its names in the wrapper's ("module.",
    "_orig_mod.", "module._orig_mod." ...)."""
    prefix = ""
    while True:
        if "DistributedDataParallel" in _classes(model):
            model, prefix = model.module, prefix + "module."
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix
