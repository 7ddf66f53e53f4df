"""The mixed batches behind patch_peft (lora_ext/peft_patch.py), everything eager: every adapter
of a PEFT LoRA layer copied into [S, r_max, in] / [S, out, r_max] pools for multi_lora_, cached on
the layer and rewritten when a factor changes (identity, address, version), its scaling changes
or any optimizer steps; the token -> slot indices; and what each patched layer of a model's
mixed batch gets (``prepare``, run for every layer when the batch starts, so that a compiled
model's traced layers only read tensors), with the checks that send a layer to PEFT's forward."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .layers import is_conv1d, parametrized
from .targets import _same_on_probe, hooked

POOL = "_lora_ext_pool"  # module.__dict__ keys of the caches
INDICES = "_lora_ext_indices"  # last (adapter_names, rows per name, slot map) -> device indices
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
OPT_STEPS = [0]  # optimizer steps taken in this process (any optimizer; optimizer_stepped counts)
_PLAIN_LINEAR: dict = {}  # (nn.Linear subclass, its forward, no bias) -> whether that is F.linear


def _stamp(A: torch.Tensor, B: torch.Tensor, scale) -> tuple:
    # id() too: the cache holds the parameters, so a new adapter's tensors can never reuse a
    # cached (address, version) pair of a deleted one. OPT_STEPS: fused optimizers (AdamW(fused=
    # True), HF Trainer's default on torch >= 2.8) update parameters without bumping _version
    # A tensor scale (PEFT's prepare_model_for_compiled_hotswap) changes in place (scale_layer's *=)
    scale = (scale, scale._version) if isinstance(scale, torch.Tensor) else scale
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


# ---------------------------------------------------------------- what each layer of a batch gets
class Batch:
    """A mixed batch: ``names`` (adapter_names), ``reached`` (ids of the model's layers that take
    them: the patched ones and those with _context_pre_hook) and ``preps`` (id of a patched layer ->
    its prepare result). A traced patched layer reads only its prep, never ``names``, unless it
    falls back to PEFT's forward: one graph serves every batch size and every mix of names."""
    __slots__ = ("names", "reached", "preps")

    def __init__(self, names, reached, preps):
        self.names, self.reached, self.preps = names, reached, preps


def base_layer_problem(module: nn.Module, traced: bool = False) -> str | None:
    """Why the base layer is not a plain float nn.Linear/Conv1D lora_ext can run (None: it is).
    ``traced``: a FakeTensor weight counts as plain, as torch.export's default (non-strict)
    tracing swaps every plain parameter for one (a quantized subclass stays its own class
    there); the single-adapter path passes it, the mixed batches' pools need real tensors."""
    base = module.base_layer
    if hooked(base):
        return "base layer has hooks or a patched forward"
    simple = type(base) is nn.Linear or is_conv1d(base)
    if not (simple or isinstance(base, nn.Linear)):
        return f"base layer {type(base).__name__} is not a plain nn.Linear/Conv1D (quantized or wrapped)"
    w, b = base.weight, base.bias
    plain = (nn.Parameter, torch.Tensor, FakeTensor) if traced else (nn.Parameter, torch.Tensor)
    if type(w) not in plain or w.dtype not in FLOATS:
        return f"base weight is {type(w).__name__} {w.dtype} (quantized or not a plain float tensor)"
    if b is not None and b.dtype != w.dtype:
        return f"base bias dtype {b.dtype} differs from the base weight's {w.dtype}"
    if not (simple or plain_linear(base)):  # an nn.Linear subclass: fused only if its forward is F.linear
        return parametrized(base) or (f"base layer {type(base).__name__} is an nn.Linear subclass whose forward "
                                      "is not F.linear on a probe, or that holds more than weight and bias")
    return None


def plain_linear(base: nn.Module) -> bool:
    """Whether ``base`` is an unhooked nn.Linear subclass whose forward is F.linear (transformers'
    FalconLinear: x @ W^T + b), so lora_linear may compute its output from its weight. Only one
    holding nothing but weight and bias (a learned logit scale or an extra head, which the forward
    may use, make another instance of a class compute something else; parametrizations too), and
    whose class's forward gave F.linear's output on a probe (targets._same_on_probe), run once per
    class, forward and bias presence, eagerly: patch_peft probes every base layer; a class first
    met while tracing or without real weights (meta, FakeTensor) is not probed there, nor cached
    (PEFT's forward then)."""
    if (not isinstance(base, nn.Linear) or base._modules or base._buffers
            or base._parameters.keys() - {"weight", "bias"}):
        return False
    cls = type(base)
    key = (cls, cls.forward, base.bias is None)  # FalconLinear's forward branches on the bias
    if key in _PLAIN_LINEAR:
        return _PLAIN_LINEAR[key]
    w = base.weight
    if torch.compiler.is_compiling() or type(w) not in (nn.Parameter, torch.Tensor) or w.is_meta:
        return False
    _PLAIN_LINEAR[key] = cls.forward is nn.Linear.forward or _same_on_probe(base)
    return _PLAIN_LINEAR[key]


def input_problem(module: nn.Module, x: torch.Tensor) -> str | None:
    w = module.base_layer.weight
    # under autocast the ops cast their inputs as F.linear does (csrc/autocast.cpp), so an input in
    # another float dtype than the weight (a bf16 activation before an fp32 layer) is expected
    if x.dtype != w.dtype and not (x.dtype in FLOATS and torch.is_autocast_enabled(x.device.type)):
        return f"input dtype {x.dtype} differs from the base weight's {w.dtype}"
    if x.device != w.device:
        return "input and base weight on different devices"
    return None


def adapter_problem(module: nn.Module, name: str) -> str | None:
    """Why adapter `name` of this layer is not a vanilla LoRA lora_ext can run (None: it is).
    (Runs per adapter and call in mixed batches: the submodules are read from _modules directly.)"""
    if name in module.lora_variant or module.use_dora.get(name, False):
        variant = module.lora_variant.get(name)
        return f"adapter '{name}' is a LoRA variant ({type(variant).__name__ if variant else 'DoRA'})"
    return _factors_problem(module, name)


def _factors_problem(module: nn.Module, name: str) -> str | None:
    """Why adapter `name`'s lora_A/lora_B/lora_dropout are not plain modules lora_ext can read."""
    mods = module._modules
    A, B = mods["lora_A"]._modules[name], mods["lora_B"]._modules[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear:
        return f"adapter '{name}' has non-standard lora_A/lora_B modules"
    if hooked(A) or hooked(B) or hooked(mods["lora_dropout"]._modules[name]):
        return f"adapter '{name}' has hooks or a patched forward on lora_A/lora_B/lora_dropout"
    if B._parameters.get("bias") is not None or module.lora_bias.get(name, False):
        return f"adapter '{name}' uses lora_bias"
    return None


def is_dora(module: nn.Module, name: str) -> bool:
    """Whether adapter `name` of a PEFT LoRA layer is DoRA (use_dora=True)."""
    return bool(module.use_dora.get(name, False))


def dora_problem(module: nn.Module, name: str) -> str | None:
    """Why DoRA adapter `name` of a PEFT LoRA Linear is not one that lora_ext.dora.dora_linear runs
    as PEFT's DoraLinearVariant.forward does (None: it is): PEFT's own variant and
    DoraLinearLayer classes (not subclasses) without hooks, a float magnitude [out] beside the base
    weight, plain lora_A/lora_B without lora_bias, PEFT's DoRA caching off (its eval forward would
    reuse a cached norm). Only for the single-adapter path: mixed batches refuse DoRA
    (adapter_problem)."""
    from peft.tuners.lora import dora as peft_dora

    variant, layer = module.lora_variant.get(name), module._modules["lora_magnitude_vector"]._modules.get(name)
    if type(variant).__name__ != "DoraLinearVariant" or type(variant).__module__ != "peft.tuners.lora.variants":
        return f"adapter '{name}' is DoRA with variant {type(variant).__name__} (not PEFT's DoraLinearVariant)"
    if type(layer) is not peft_dora.DoraLinearLayer or hooked(layer):
        return f"adapter '{name}' has a non-standard or hooked DoRA magnitude layer ({type(layer).__name__})"
    if peft_dora.ENABLE_DORA_CACHING:
        return "PEFT's DoRA caching is on (peft.tuners.lora.dora.ENABLE_DORA_CACHING)"
    base, m = module.base_layer, layer._parameters.get("weight")
    w = base.weight
    if type(m) not in (nn.Parameter, torch.Tensor, FakeTensor) or m.dtype not in FLOATS or m.dim() != 1:
        return f"adapter '{name}' DoRA magnitude is not a float vector"
    if m.device != w.device:
        return f"adapter '{name}' DoRA magnitude on {m.device}, base weight on {w.device}"
    if bool(layer.fan_in_fan_out) != is_conv1d(base):
        return f"adapter '{name}' DoRA fan_in_fan_out={layer.fan_in_fan_out} does not match the base layer"
    return _factors_problem(module, name)


def dropout_p(module: nn.Module, name: str) -> float | None:
    """The active dropout probability of adapter `name` (0 in eval), None if not nn.Dropout/Identity."""
    d = module._modules["lora_dropout"]._modules[name]
    if type(d) is nn.Identity:
        return 0.0
    if type(d) is nn.Dropout:
        return float(d.p) if d.training else 0.0
    return None


def autograd_problem(module: nn.Module, used: list[str], op: str) -> str | None:
    """Mixed batches run inference-only ops, in place on the base layer's output: the reason to
    refuse them when the layer runs with autograd on, if a used adapter's factors or a base
    parameter (e.g. a bias="all" bias) requires grad. Checked against the grad mode of the layer's
    own call (generate() turns autograd off inside the model call the batch starts with)."""
    factors = factors_of(module)[1]
    params = [p for n in used for p in factors(n)] + list(module.base_layer.parameters())
    if used and any(p.requires_grad for p in params):
        return f"mixed batch with autograd on ({op} is inference only: use torch.no_grad())"
    return None


def embedding_problem(module: nn.Module) -> str | None:
    base = module.base_layer
    if not isinstance(base, nn.Embedding) or hooked(base):
        return "base layer is not a plain nn.Embedding (or has hooks)"
    if base.max_norm is not None:
        return "base embedding renormalizes rows (max_norm)"
    if base.weight.dtype not in FLOATS:  # e.g. model.to(torch.float64): lora_expand_ has no kernel
        return f"base weight is {base.weight.dtype}"
    return None


def prepare(module: nn.Module, names, embedding: bool, dtype: torch.dtype | None = None,
            shared_rows: dict | None = None):
    """A patched layer's part of a mixed batch, computed eagerly for every layer when a model's
    mixed batch starts (_enter), so that a compiled model traces none of the cache bookkeeping:
    a reason to run PEFT's forward (str), or (A_pool, B_pool, scales, ranks, rows, grad), rows
    [len(names)] int32 the pool slot of each input row (-1: none), pools None when no row uses
    one of the layer's adapters, grad the reason to run PEFT's forward if the layer is called
    with autograd on (None: none). The pools are in the dtype the base layer returns (the
    autocast dtype under autocast, for Linear)."""
    module._check_forward_args(range(len(names)), adapter_names=names)  # PEFT's errors (merged, DoRA)
    reason = embedding_problem(module) if embedding else base_layer_problem(module)
    if reason is not None:
        return reason
    factors = factors_of(module)[0]
    used = [n for n in dict.fromkeys(names) if n != "__base__" and n in factors]
    for n in used:
        if embedding:
            reason = f"adapter '{n}' is a LoRA variant" if n in module.lora_variant else None
        else:
            reason = adapter_problem(module, n)
            if reason is None and dropout_p(module, n) != 0.0:
                reason = f"adapter '{n}' has active dropout in a mixed batch"
        if reason is not None:
            return reason
    grad = autograd_problem(module, used, "lora_expand_" if embedding else "multi_lora_")
    w = module.base_layer.weight
    if not used:
        return None, None, None, None, no_rows(len(names), w.device), None
    if dtype is None:
        dtype = w.dtype
        if not embedding and torch.is_autocast_enabled(w.device.type):
            dtype = torch.get_autocast_dtype(w.device.type)
    slot, A_pool, B_pool, scales, ranks = pools(module, dtype, w.device, used)
    # shared_rows: the rows of the batch's layers whose adapters sit in the same slots (usually
    # all of them: one host-to-device copy per batch, not one per layer)
    shared_rows = {} if shared_rows is None else shared_rows
    key = (w.device, tuple(slot.items()))
    if key not in shared_rows:
        shared_rows[key] = token_slots(module, names, 1, w.device, slot)
    return A_pool, B_pool, scales, ranks, shared_rows[key], grad


def operands(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: Batch, per_row: int, embedding: bool):
    """(A_pool, B_pool, indices [T], scales, ranks) of a prepared layer (its pools prepared again
    here in y's dtype if they are not in it: an autocast region entered inside the model); None
    when no row uses one of its adapters. Raises PEFT's error when the rows do not match x."""
    A_pool, B_pool, scales, ranks, rows, _ = batch.preps[id(module)]
    if x.shape[0] != rows.shape[0]:  # sizes compared in the graph: no guard on len(names)
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(batch.names)} and {len(x)} respectively.")
    if A_pool is None or x.numel() == 0:
        return None
    if A_pool.dtype != y.dtype:
        A_pool, B_pool, scales, ranks, rows, _ = prepare(module, batch.names, embedding, y.dtype)
    return A_pool, B_pool, rows if per_row == 1 else rows.repeat_interleave(per_row), scales, ranks
