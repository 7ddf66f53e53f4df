"""LoRA on torch.distributed: DDP, FSDP2 (``fully_shard``) and saving the adapter of a wrapped model.

    lora_ext.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)
    lora_ext.mark_only_lora_trainable(model)          # the base is frozen: only A/B get gradients
    # DDP: plain torch; it reduces only parameters that require grad, i.e. the LoRA factors
    model = torch.nn.parallel.DistributedDataParallel(model)
    # or FSDP2: fully_shard on each block holding LoRA layers, then on the root
    lora_ext.distributed.fully_shard_lora(model)
    opt = torch.optim.AdamW(lora_ext.distributed.lora_parameters(model), lr=1e-3)
    ...
    lora_ext.distributed.save_adapter(model, "out/")  # every rank calls it; rank 0 writes PEFT format

Under FSDP2 the parameters are sharded DTensors between forwards; FSDP2 all-gathers them into
plain tensors before a block's forward/backward, so LoRALinear runs the fused lora_ext ops on
ordinary tensors. save_adapter gathers DTensor factors (FSDP or tensor parallel) with
``full_tensor()``. The tensor-parallel styles of lora_ext.tp (ColwiseParallelLoRA,
RowwiseParallelLoRA) are re-exported here.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .adapters import Adapter, layer_weights, model_config, saved_tensors
from .inject import lora_layers, peft_parameter_layers
from .layers import LoRALayer
from .param_lora import LoRAParameter, outermost, parameter_layers
from .sharding import fsdp1_of, unwrapped, wrapper_free, wrapper_free_name
from .tp import ColwiseParallelLoRA, RowwiseParallelLoRA  # tensor parallel (lora_ext/tp.py), re-exported

__all__ = ["lora_parameters", "fully_shard_lora", "save_adapter", "unwrap", "ColwiseParallelLoRA",
           "RowwiseParallelLoRA"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers (FSDP2 wraps in place)."""
    return unwrapped(model)[0]


def _lora_layers_of(model: nn.Module, who: str) -> dict[str, LoRALayer | LoRAParameter]:
    """Name -> LoRA layer: the LoRALayers, then the LoRAParameter layers under PEFT's paths
    (inject.peft_parameter_layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    found = {**lora_layers(inner), **peft_parameter_layers(inner)}
    if not found:
        raise ValueError(f"{who}: {type(inner).__name__} has no LoRA layers (use lora_ext.inject first)")
    return found


def _trained(m: nn.Module) -> tuple[str, ...]:
    """The names of a LoRA layer's trained parameters (a LoRAParameter's: lora_A, lora_B)."""
    return m.lora_parameter_names if isinstance(m, LoRALayer) else ("lora_A", "lora_B")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (lora_A/lora_B, lora_embedding_A/B) of every LoRA layer, and DoRA layers'
    lora_magnitude_vector, for the optimizer; LoRAParameter layers' (target_parameters) lora_A / lora_B too.

    Works on a plain, a DDP-wrapped or a fully_shard-ed model (then they are the sharded DTensor
    parameters, as FSDP2's optimizer expects). Raises ValueError when there are no LoRA layers.
    """
    return [getattr(m, n) for m in _lora_layers_of(model, "lora_parameters").values() for n in _trained(m)]


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """Elements of nn.ModuleLists holding LoRA layers (LoRAParameter ones too: transformer blocks),
    outermost first; with none, the LoRA layers themselves (a module's outermost LoRAParameter)."""
    blocks, covered = [], set()
    for m in model.modules():
        if id(m) in covered or not isinstance(m, nn.ModuleList):
            continue
        for child in m:
            if id(child) not in covered and any(isinstance(x, (LoRALayer, LoRAParameter)) for x in child.modules()):
                blocks.append(child)
                covered.update(id(x) for x in child.modules())
    return blocks or [*lora_layers(model).values(), *outermost(model).values()]


def fully_shard_lora(model: nn.Module, blocks: Iterable[nn.Module] | type | tuple[type, ...] | None = None,
                     **kwargs) -> nn.Module:
    """``torch.distributed.fsdp.fully_shard`` on each block, then on ``model``; returns ``model``.

    blocks: modules of ``model`` or a module class (tuple of classes) to shard separately; default:
    the elements of ``nn.ModuleList``s that hold LoRA layers (e.g. a transformer's decoder layers),
    or, if there are none, each LoRA layer. Frozen base weights and trainable LoRA factors share a
    block's parameter group: both are sharded, only the factors get (reduce-scattered) gradients.
    kwargs go to fully_shard (mesh, reshard_after_forward, mp_policy, offload_policy, ...).
    Call mark_only_lora_trainable(model) before, build the optimizer on lora_parameters(model) after.
    """
    from torch.distributed.fsdp import fully_shard

    found = _lora_layers_of(model, "fully_shard_lora")
    if unwrap(model) is not model:
        raise TypeError(f"fully_shard_lora: got a {type(model).__name__}; pass the model itself, not a "
                        "DDP / torch.compile wrapper")
    merged = [n for n, m in found.items() if m.merged]
    if merged:
        raise ValueError(f"fully_shard_lora: LoRA layer(s) {merged} are merged into their weights; "
                         "unmerge them before sharding")
    if blocks is None:
        chosen = _default_blocks(model)
    elif isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks)):
        chosen = [m for m in model.modules() if isinstance(m, blocks) and m is not model]
        if not chosen:
            raise ValueError(f"fully_shard_lora: blocks={blocks!r} matched no module of {type(model).__name__}")
    else:
        chosen = list(blocks)
        names = {id(m): n for n, m in model.named_modules()}
        for b in chosen:
            if not isinstance(b, nn.Module) or id(b) not in names or b is model:
                raise ValueError(f"fully_shard_lora: blocks must be submodules of {type(model).__name__}; "
                                 f"got a {type(b).__name__} that is not one")
    for b in chosen:
        fully_shard(b, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full, plain CPU copy of a parameter (all-gathers a DTensor: a collective)."""
    t = t.detach()
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.cpu().clone()


def _handshake(found: dict, timeout_s: float) -> None:
    """Before any collective: every rank posts its LoRA layers (names, global factor shapes) in the
    process group's store and waits at most timeout_s for the others, so a rank that does not
    call save_adapter (`if rank == 0: save_adapter(...)`) or holds other layers gives a clear
    error instead of a collective hanging until the process-group timeout. Calls are matched by
    generation (arrivals // world size); a rank that times out withdraws, so the next call of
    every rank still pairs up."""
    import datetime
    import json

    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    arrivals = "lora_ext/save_adapter/arrivals"
    gen = (store.add(arrivals, 1) - 1) // world
    keys = [f"lora_ext/save_adapter/{gen}/{r}" for r in range(world)]
    mine = json.dumps(sorted((n, [list(getattr(m, p).shape) for p in _trained(m)])
                             for n, m in found.items()))
    store.set(keys[rank], mine)
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001  (the store's timeout error type differs across versions)
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        store.delete_key(keys[rank])
        store.add(arrivals, -1)
        raise RuntimeError(f"save_adapter is a collective: rank(s) {missing} did not call it within "
                           f"{timeout_s:g} s; call it on every rank (rank 0 writes the files)") from None
    for r, k in enumerate(keys):
        if store.get(k).decode() != mine:
            raise RuntimeError(f"save_adapter: rank {r} holds other LoRA layers than rank {rank} "
                               "(names or factor shapes differ)")


def save_adapter(model: nn.Module, path: str, timeout_s: float = 300.0, modules_to_save=None) -> None:
    """Writes the model's LoRA adapter in HF PEFT format (adapter_config.json +
    adapter_model.safetensors, as lora_ext.Adapter.save) from rank 0.

    A collective when torch.distributed is initialized: every rank must call it (sharded DTensor
    factors are all-gathered; the other ranks wait until the files are written, and all ranks
    raise if writing fails). A rank that has not called it within ``timeout_s`` seconds of the
    first, or that holds other LoRA layers, makes every caller raise RuntimeError before any
    collective starts. Works on plain, DDP, FSDP2 (fully_shard) and tensor-parallel models;
    without a process group it simply saves. ``modules_to_save``: as Adapter.from_model (whole
    modules saved beside the factors, e.g. a trained classification head; gathered too). DoRA
    layers' magnitudes are gathered too and the config says use_dora=true. LoRAParameter layers
    (target_parameters) are saved as Adapter.from_model saves them (PEFT's nested paths).
    """
    found = _lora_layers_of(model, "save_adapter")
    if (wrapped := fsdp1_of(unwrap(model))) is not None:  # (every rank raises: no collective started)
        raise ValueError(f"save_adapter: {wrapped} is wrapped in FSDP1's FullyShardedDataParallel, whose "
                         "parameters are flattened shards outside its forward; shard with fully_shard (FSDP2, "
                         "lora_ext.distributed.fully_shard_lora), or save from a single-process copy of the model")
    if dist.is_available() and dist.is_initialized():
        _handshake(found, timeout_s)
    layers = {}
    for name, m in found.items():
        if isinstance(m, LoRAParameter):
            layers[name] = layer_weights(m, _full(m.lora_A), _full(m.lora_B), None)
            continue
        # the parameters, gathered, then as lora_factors() gives them (a MergedLinear's padded B is
        # built from its whole lora_B, which an FSDP rank holds only a shard of)
        A, B = m.lora_factors_of(*(_full(getattr(m, p)) for p in m.factor_names))
        mag = _full(m.lora_magnitude_vector) if m.use_dora else None  # DoRA: sharded like the factors
        layers[name] = layer_weights(m, A, B, mag)
    modules = {n: m for n, m in found.items() if isinstance(m, LoRALayer)}
    params = {n: m for n, m in found.items() if isinstance(m, LoRAParameter)}
    # trained biases and modules_to_save, as Adapter.from_model (no module_to_save in a LoRAParameter)
    extra, bias_mode, kept = saved_tensors(unwrap(model), {**modules, **parameter_layers(unwrap(model))},
                                           modules_to_save, _full, "save_adapter")
    # the file names modules as the unwrapped model does: without the steps activation checkpointing's
    # wrappers (apply_activation_checkpointing) insert, which PEFT's model and load_adapter's do not have
    layers, extra, modules, params = map(wrapper_free, (layers, extra, modules, params))
    kept = None if kept is None else [wrapper_free_name(n) for n in kept]
    distributed = dist.is_available() and dist.is_initialized()
    err = None
    if not distributed or dist.get_rank() == 0:
        try:
            config = model_config(modules, unwrap(model), params, "save_adapter") | {"bias": bias_mode, "modules_to_save": kept}
            Adapter(layers, config, extra=extra).save(os.fspath(path))
        except Exception as e:  # reported to every rank below
            if not distributed:
                raise
            err = f"save_adapter: rank 0 could not write {os.fspath(path)!r}: {type(e).__name__}: {e}"
    if distributed:
        msg = [err]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise RuntimeError(msg[0])
