"""The per-layer adapter pools behind patch_peft's mixed batches (lora_ext/peft_patch.py): every
adapter of a PEFT LoRA layer copied into [S, r_max, in] / [S, out, r_max] pools for multi_lora_,
cached on the layer and rewritten when a factor changes (identity, address, version), its
scaling changes or any optimizer steps, plus the per-call token -> slot indices."""
from __future__ import annotations

import functools

import torch
from torch import nn

POOL = "_lora_ext_pool"  # module.__dict__ keys of the caches
INDICES = "_lora_ext_indices"  # last (adapter_names, rows per name, slot map) -> device indices
OPT_STEPS = [0]  # optimizer steps taken in this process (any optimizer; optimizer_stepped counts)


def _stamp(A: torch.Tensor, B: torch.Tensor, scale) -> tuple:
    # id() too: the cache holds the parameters, so a new adapter's tensors can never reuse a
    # cached (address, version) pair of a deleted one. OPT_STEPS: fused optimizers (AdamW(fused=
    # True), HF Trainer's default on torch >= 2.8) update parameters without bumping _version
    return id(A), A.data_ptr(), A._version, id(B), B.data_ptr(), B._version, scale, OPT_STEPS[0]


def factors_of(module: nn.Module):
    """(adapter names, name -> (A [r, in], B [out, r]) parameters) of a LoRA Linear or Embedding."""
    mods = module._modules
    if "lora_A" in mods and mods["lora_A"]._modules:
        lA, lB = mods["lora_A"]._modules, mods["lora_B"]._modules
        return tuple(lA), lambda n: (lA[n]._parameters["weight"], lB[n]._parameters["weight"])
    eA, eB = mods["lora_embedding_A"]._parameters, mods["lora_embedding_B"]._parameters
    return tuple(eA), lambda n: (eA[n], eB[n])


@torch.no_grad()
def _write_slot(A_pool: torch.Tensor, B_pool: torch.Tensor, s: int, A: torch.Tensor, B: torch.Tensor) -> None:
    """Slot s of the pools = (A, B), zero past their rank."""
    r = A.shape[0]
    A_pool[s, :r].copy_(A)
    A_pool[s, r:].zero_()
    B_pool[s, :, :r].copy_(B)
    B_pool[s, :, r:].zero_()


def pools(module: nn.Module, dtype: torch.dtype, device: torch.device, used: list[str]):
    """(slot of each adapter name, A_pool, B_pool, scales, ranks) over all the layer's adapters,
    cached on the module. Each call checks the adapters it uses: a slot whose factors (identity,
    address, version) or scaling changed is rewritten; a new adapter set rebuilds the pools."""
    names, factors = factors_of(module)
    scaling = module.scaling
    c = module.__dict__.get(POOL)
    if c is not None and c["key"] == (dtype, device, names):
        A_pool, B_pool, scales, ranks = c["value"][1:]
        for n in used:
            s = c["value"][0][n]
            A, B = factors(n)
            stamp = _stamp(A, B, scaling[n])
            if stamp == c["stamps"][s]:
                continue
            r = A.shape[0]
            if A.dim() != 2 or r > A_pool.shape[1] or A.shape[1] != A_pool.shape[2] or B.shape != (B_pool.shape[1], r):
                break  # no longer fits the pools: rebuild them
            _write_slot(A_pool, B_pool, s, A, B)
            with torch.no_grad():
                scales[s] = float(scaling[n])
                ranks[s] = r
            c["stamps"][s], c["params"][s] = stamp, (A, B)
        else:
            return c["value"]
    params = [factors(n) for n in names]
    r_max = max(A.shape[0] for A, _ in params)
    with torch.inference_mode(False):  # rewritten in place later, in inference mode or not
        A_pool = torch.empty(len(names), r_max, params[0][0].shape[1], dtype=dtype, device=device)
        B_pool = torch.empty(len(names), params[0][1].shape[0], r_max, dtype=dtype, device=device)
        scales = torch.tensor([float(scaling[n]) for n in names], dtype=torch.float32, device=device)
        ranks = torch.tensor([A.shape[0] for A, _ in params], dtype=torch.int32, device=device)
    for s, (A, B) in enumerate(params):
        _write_slot(A_pool, B_pool, s, A, B)
    value = ({n: s for s, n in enumerate(names)}, A_pool, B_pool, scales, ranks)
    module.__dict__[POOL] = {"key": (dtype, device, names), "value": value, "params": params,
                              "stamps": [_stamp(A, B, scaling[n]) for n, (A, B) in zip(names, params)]}
    return value


def token_slots(module: nn.Module, adapter_names, per_row: int, device, slot: dict) -> torch.Tensor:
    """int32 pool slot of every token (-1: "__base__" or an adapter this layer lacks); decode
    steps repeat the same names, so the device tensor is cached per (names, tokens per row)."""
    key = (tuple(adapter_names), per_row, device)
    cached = module.__dict__.get(INDICES)
    if cached is not None and cached[0] == key and cached[1] is slot:
        return cached[2]
    rows = torch.tensor([slot.get(n, -1) if n != "__base__" else -1 for n in adapter_names], dtype=torch.int32)
    indices = rows.repeat_interleave(per_row).to(device)
    module.__dict__[INDICES] = (key, slot, indices)
    return indices


@functools.lru_cache(maxsize=64)
def no_rows(n: int, device: torch.device) -> torch.Tensor:
    """[n] int32 of -1: the rows of a layer none of whose adapters a batch of n rows uses."""
    with torch.inference_mode(False):
        return torch.full((n,), -1, dtype=torch.int32, device=device)


def optimizer_stepped(optimizer, args, kwargs) -> None:
    OPT_STEPS[0] += 1
