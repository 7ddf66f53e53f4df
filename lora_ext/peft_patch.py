"""Run an existing HF PEFT LoRA model on lora_ext's fused ops, in place (issue 17).

``patch_peft(model)`` replaces the ``forward`` of every PEFT LoRA ``Linear`` instance (nn.Linear
or transformers' Conv1D base) with one that reads PEFT's own state at call time (``lora_A[name]``,
``lora_B[name]``, ``scaling[name]``, ``lora_dropout[name]``, ``base_layer``, ``merged``,
``disable_adapters``, ``active_adapters``, ``lora_variant``...). The module tree, the parameters and
the state_dict stay PEFT's, so save_pretrained, set_adapter/add_adapter/delete_adapter,
disable_adapter(), merge/unmerge, rsLoRA, rank/alpha patterns and modules_to_save keep working.
``unpatch_peft(model)`` restores the original forwards.

Fast paths:
  * one active adapter, not merged, not disabled, vanilla LoRA, plain float base weight (nn.Linear,
    Conv1D, or an nn.Linear subclass computing F.linear: peft_pools.plain_linear):
    ``lora_ext.ops.lora_linear`` (base GEMM + fused low-rank part, dropout via dropout_p);
  * the same with a DoRA adapter (use_dora=True, PEFT's DoraLinearVariant; nn.Linear or Conv1D
    base): ``lora_ext.dora.dora_linear`` on PEFT's ``lora_magnitude_vector[name].weight``,
    lora_A/lora_B and scaling, the norm from ``ops.dora_norm`` (PEFT builds B A and W + s B A every
    forward); with dropout in training PEFT's form and the same dropout draw (same seed, same
    mask). DoRA caching (peft's ENABLE_DORA_CACHING), DoRA on Embedding/Conv layers and DoRA in
    mixed batches (PEFT raises) stay PEFT's;
  * mixed batches (``model(..., adapter_names=[...])``, no autograd, no active dropout):
    ``lora_ext.ops.multi_lora_`` once per layer, from per-layer pools of all the layer's adapters,
    cached on the module; a used adapter's slot is rewritten when its factor tensors (identity,
    data_ptr, _version) or scaling changed, the pools rebuilt when the adapter set changed;
    "__base__" rows get no adapter.
  * the mixed-batch plumbing: PEFT registers a forward pre-hook on every LoRA layer for each
    ``adapter_names`` call (two walks of ``model.modules()``), shared by every thread calling the
    model. The patched LoraModel instead hands the names through a context variable (per thread):
    patched layers read it in their forward, and the layers it did not patch (modules_to_save
    wrappers, fallbacks) get one permanent pre-hook that reads it, so concurrent mixed batches in
    several threads each get their own names in every layer. Its view of the tree
    is cached and walked again when a module is assigned under a walked module (torch's global
    module-registration hook) or the adapter set changes. Beam search, aLoRA offsets and training
    mode keep PEFT's own path.
Anything else (LoRA variants other than DoRA on Linear, lora_bias, quantized or hooked base layers, hooked lora_A/lora_B, several
active adapters at once, dtype mixes outside autocast, unknown forward arguments) calls PEFT's
original forward and warns once per (layer, reason). A disabled or merged layer has no LoRA work
left to fuse: it calls PEFT's forward without a warning. LoRA Embedding layers run mixed batches as
one gather + ``lora_expand_`` over per-layer pools (PEFT loops over the adapters) and PEFT's forward
otherwise (lora_ext has no fused single-adapter embedding op: the same F.embedding math). PEFT's
ParamWrapper (LoRA on parameters, target_parameters) of a transformers experts module: the
outermost wrapper runs lora_ext.moe's experts forward on PEFT's factors, mixed batches too (which
PEFT refuses there; lora_ext/peft_experts.py). Other PEFT LoRA layer types (Conv2d, bitsandbytes, ...)
stay on PEFT's forward: one warning per layer when patching.
Layers that a later ``add_adapter`` creates are patched by calling ``patch_peft`` again.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .layers import factors_like, is_conv1d
from .dora import dora_linear
from .ops import lora_expand_, lora_linear, multi_lora_
from .peft_experts import chain_loras, is_param_wrapper, mixed_experts, outer_wrappers, prepare_experts
from .multi_experts import _record_rows, watch_block
from .peft_pools import (INDICES, POOL, Batch, adapter_problem, base_layer_problem, dora_problem, dropout_p,
                         input_problem, is_dora, operands, optimizer_stepped, plain_linear, prepare)

__all__ = ["patch_peft", "unpatch_peft", "is_patched"]

_ORIG = "_lora_ext_patched"  # set on patched instances
_NAME = "_lora_ext_name"
_WARNED = "_lora_ext_warned"
_HOOKS = "_enable_peft_forward_hooks"  # the LoraModel method patch_peft replaces on the instance
_WALK = "_lora_ext_walk"  # the mixed-batch view of a patched LoraModel's tree, and its signature
# Bumped whenever a module is assigned under a module of a walked tree (torch's global
# registration hook, installed by the first patch_peft; _TRACKED: the walked modules and the LoRA
# layers' containers, held weakly): a cached walk is reused only while its tree has not moved.
_TREE = [0]
_TREE_HOOK = []
_TRACKED: weakref.WeakSet = weakref.WeakSet()
# The Batch of a mixed-batch call of this thread (Dynamo traces ContextVar.get, guarding on it)
_MIXED: contextvars.ContextVar = contextvars.ContextVar("lora_ext_peft_mixed", default=None)
_ENTER: list = []  # [_enter under torch.compiler.disable]


PEFT_MIN = "0.15"  # peft.utils.other.AuxiliaryTrainingWrapper (modules_to_save et al.)


def _peft_classes():
    try:
        from peft.tuners.lora.layer import Embedding, LoraLayer, Linear
    except ImportError as e:  # pragma: no cover - peft is optional for lora_ext itself
        raise ImportError("lora_ext.patch_peft needs the `peft` package") from e
    return Linear, Embedding, LoraLayer


def _peft_model_classes():
    from peft.tuners.lora.model import LoraModel
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as e:
        import peft
        raise ImportError(f"lora_ext.patch_peft needs peft >= {PEFT_MIN}; this is peft "
                          f"{getattr(peft, '__version__', '?')} (pip install -U peft)") from e
    return LoraModel, AuxiliaryTrainingWrapper


def _warn(module: nn.Module, reason: str) -> None:
    """warnings.warn once per (layer, reason)."""
    seen = module.__dict__.setdefault(_WARNED, set())
    if reason in seen:
        return
    seen.add(reason)
    name = module.__dict__.get(_NAME, type(module).__name__)
    warnings.warn(f"lora_ext.patch_peft: layer '{name}' runs PEFT's forward: {reason}", UserWarning,
                  stacklevel=3)


def is_patched(module: nn.Module) -> bool:
    return _ORIG in module.__dict__


# ------------------------------------------------------------------------------------ single adapter
def _single(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor | None:
    dora = is_dora(module, name)
    reason = (base_layer_problem(module, traced=True) or input_problem(module, x)
              or (dora_problem if dora else adapter_problem)(module, name))
    p = dropout_p(module, name) if reason is None else 0.0
    if reason is None and p is None:
        reason = f"adapter '{name}' dropout is {type(module.lora_dropout[name]).__name__}"
    if reason is None and not 0.0 <= p < 1.0:
        reason = f"adapter '{name}' dropout p={p} outside [0, 1)"
    if reason is not None:
        _warn(module, reason)
        return None
    base = module.base_layer
    # e.g. fp32 adapters (PEFT's autocast_adapter_dtype) on a bf16 model
    A, B = factors_like(x, module.lora_A[name].weight, module.lora_B[name].weight)
    scale = module.scaling[name]
    if isinstance(scale, torch.Tensor):  # PEFT's prepare_model_for_compiled_hotswap: s·B, as float(s)
        B, scale = B * scale.to(B.dtype), 1.0  # would be a graph break (and a device sync) per layer
    if dora:  # PEFT's DoraLinearVariant: dropout only when the layer itself trains
        p = p if module.training else 0.0
        return dora_linear(x, base.weight, base.bias, A, B, module.lora_magnitude_vector[name].weight,
                           float(scale), p, p > 0.0, is_conv1d(base))
    return lora_linear(x, base.weight, base.bias, A, B, float(scale), p, p > 0.0, is_conv1d(base))


# ------------------------------------------------------------------------------------ mixed batches
def _mixed(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    reason = input_problem(module, x)
    if reason is None and x.dim() < 2:
        reason = "1-D input in a mixed batch"
    if reason is None and torch.is_grad_enabled() and x.requires_grad:
        reason = "mixed batch with autograd on (multi_lora_ is inference only: use torch.no_grad())"
    if reason is not None:
        _warn(module, reason)
        return None
    y = module.base_layer(x)
    ops = operands(module, x, y, batch, x.shape[1:-1].numel(), False)  # tokens per row (0 rows too)
    if ops is not None:
        A_pool, B_pool, indices, scales, ranks = ops
        multi_lora_(y, x, A_pool, B_pool, indices, scales, ranks)
    return y


def _mixed_embedding(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """PEFT's LoRA Embedding in a mixed batch: y = base(ids); y[t] += s_a * B_a A_a[:, ids[t]]
    (times the base's embed_scale, as PEFT), the A columns gathered from the layer's pools and
    added by one lora_expand_, instead of PEFT's loop over the adapters."""
    if x.dtype not in (torch.int32, torch.int64) or x.dim() < 1:
        _warn(module, f"ids of dtype {x.dtype} / {x.dim()}-D")
        return None
    y = module.base_layer(x)
    ops = operands(module, x, y, batch, x.shape[1:].numel(), True)  # ids per row (0 rows too)
    if ops is None:
        return y
    A_pool, B_pool, indices, scales, ranks = ops
    # [T, r_max]: column ids[t] of token t's A (slot 0 for rows without an adapter: not added)
    u = A_pool[indices.clamp(min=0).long(), :, x.reshape(-1)]
    embed_scale = module._get_embed_scale()
    if embed_scale is not None:
        u = u * embed_scale.to(u.dtype)
    lora_expand_(y.view(-1, y.shape[-1]), u, B_pool, indices, scales, ranks)
    return y


# ------------------------------------------------------------------------------------ forward
def _model_batch(layer: nn.Module, kwargs: dict) -> Batch | None:
    """The mixed batch of the model call this layer call is part of (see _enter), if any."""
    batch = _MIXED.get()
    if batch is not None and "adapter_names" not in kwargs and id(layer) in batch.reached:
        return batch
    return None


def _batch_of(layer: nn.Module, args, kwargs: dict, embedding: bool) -> Batch | None:
    """The mixed batch of a layer call that is one: its model's, or, for a layer called with
    adapter_names directly, one of its own; None when lora_ext does not run it (other arguments,
    adapters disabled, a reason found by prepare: PEFT's forward then)."""
    if layer.disable_adapters:
        return None
    extra = [k for k, v in kwargs.items() if k != "adapter_names" and v is not None]
    if args or extra:
        _warn(layer, f"unsupported forward arguments {extra or f'{len(args)} positional'}")
        return None
    batch = _model_batch(layer, kwargs)
    if batch is None:  # prepare raises PEFT's errors (merged, DoRA); operands the length's
        batch = Batch(kwargs["adapter_names"], None, {id(layer): prepare(layer, kwargs["adapter_names"], embedding)})
    prep = batch.preps[id(layer)]
    if not isinstance(prep, str) and prep[5] is not None and torch.is_grad_enabled():
        prep = prep[5]  # autograd on in this call (the batch may have started outside generate's no_grad)
    if isinstance(prep, str):
        _warn(layer, prep)
        return None
    return batch


def _peft_forward(self, x: torch.Tensor, *args, **kwargs):
    """PEFT's forward, with the calling thread's adapter_names inside a model's mixed batch."""
    batch = _model_batch(self, kwargs)
    if batch is not None:
        kwargs["adapter_names"] = batch.names
    return type(self).forward(self, x, *args, **kwargs)


def _patched_forward(self, x: torch.Tensor, *args, **kwargs):
    if kwargs.get("adapter_names") is not None or _model_batch(self, kwargs) is not None:
        batch = _batch_of(self, args, kwargs, embedding=False)
        y = None if batch is None else _mixed(self, x, batch)
        return _peft_forward(self, x, *args, **kwargs) if y is None else y
    self._check_forward_args(x, *args, **kwargs)
    extra = [k for k, v in kwargs.items() if v is not None]
    if self.disable_adapters or self.merged:
        return _peft_forward(self, x, *args, **kwargs)  # base forward only (PEFT unmerges when disabled): nothing to fuse
    if args or extra:
        _warn(self, f"unsupported forward arguments {extra or f'{len(args)} positional'}")
        return _peft_forward(self, x, *args, **kwargs)
    active = [n for n in self.active_adapters if n in self.lora_A]
    if len(active) > 1:
        _warn(self, f"{len(active)} active adapters at once ({', '.join(active)})")
        return _peft_forward(self, x, *args, **kwargs)
    if not active:
        return _peft_forward(self, x, *args, **kwargs)
    y = _single(self, x, active[0])
    return _peft_forward(self, x, *args, **kwargs) if y is None else y


def _patched_param_forward(self, *args, **kwargs):
    """The outermost ParamWrapper of an experts module: lora_ext.moe's experts forward on PEFT's
    factors (peft_experts.chain_loras; mixed batches: peft_experts.mixed_experts), else PEFT's forward."""
    if kwargs.get("adapter_names") is not None or _model_batch(self, kwargs) is not None:
        batch = _model_batch(self, kwargs)
        names = batch.names if batch is not None else kwargs.pop("adapter_names")
        prep = batch.preps[id(self)] if batch is not None else prepare_experts(self, names)
        if not isinstance(prep, str) and prep[3] is not None and torch.is_grad_enabled():
            prep = prep[3]
        if isinstance(prep, str):
            _warn(self, prep)
            return type(self).forward(self, *args, **kwargs, adapter_names=names)  # PEFT's error
        return mixed_experts(prep, names, *args, **kwargs, holder=self)
    got = chain_loras(self, len(args) + len(kwargs))
    if isinstance(got, str):
        if got and got != "mixed batch":
            _warn(self, got)
        return type(self).forward(self, *args, **kwargs)
    base, loras = got
    from .moe import experts_forward  # imports transformers: only once an experts chain runs
    return experts_forward(base, *args, **kwargs, loras=loras)


def _patched_embedding_forward(self, x: torch.Tensor, *args, **kwargs):
    """Mixed batches -> _mixed_embedding; everything else is PEFT's forward (the same math as
    lora_ext's own LoRAEmbedding: there is no fused single-adapter embedding op)."""
    batch = None
    if kwargs.get("adapter_names") is not None or _model_batch(self, kwargs) is not None:
        batch = _batch_of(self, args, kwargs, embedding=True)
    y = None if batch is None else _mixed_embedding(self, x, batch)
    return _peft_forward(self, x, *args, **kwargs) if y is None else y


def _context_pre_hook(module, args, kwargs):
    """The one forward pre-hook of a layer a patched model leaves to PEFT's forward
    (modules_to_save wrappers, fallbacks), installed when the tree is walked: inside a mixed-batch
    call of its model it passes the calling thread's adapter_names, as PEFT's per-call hook would;
    otherwise it does nothing."""
    batch = _model_batch(module, kwargs)
    if batch is None:
        return None
    kwargs["adapter_names"] = batch.names
    return args, kwargs


def _context_hooked(m: nn.Module) -> bool:
    return any(h is _context_pre_hook for h in m._forward_pre_hooks.values())


def _remove_context_hook(m: nn.Module) -> None:
    for k in [k for k, h in m._forward_pre_hooks.items() if h is _context_pre_hook]:
        del m._forward_pre_hooks[k]
        m._forward_pre_hooks_with_kwargs.pop(k, None)


def _install_tree_hook() -> None:
    """Once per process: by patch_peft, or by the first mixed batch of a patched model that was
    unpickled (torch.load) into a process that never called patch_peft. Also counts optimizer
    steps (peft_pools.OPT_STEPS, part of the mixed-batch pools' stamps)."""
    if not _TREE_HOOK:
        _TREE_HOOK.append(nn.modules.module.register_module_module_registration_hook(_tree_moved))
        _TREE_HOOK.append(register_optimizer_step_post_hook(optimizer_stepped))


def _tree_moved(module, name, submodule):
    # Not traced: Dynamo would guard on _TRACKED's members by position, and a member collected
    # between tracing and guard building fails the compile (IndexError). A module registered
    # while tracing is one the traced code built (transformers slices its ModuleList of layers).
    if torch.compiler.is_compiling():
        return
    if module in _TRACKED:
        _TREE[0] += 1


def _modules(root: nn.Module, LoraLayer) -> list[nn.Module]:
    """Every module under root, once (an explicit stack: cheaper than nested generators); inside a
    LoRA layer only its base layer (the lora_* containers hold the factors, never LoRA layers).
    Every module visited, and those containers, join _TRACKED."""
    out, seen, stack = [], set(), [root]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        if isinstance(m, LoraLayer):
            for k, c in m._modules.items():
                if c is not None and not k.startswith("lora_"):
                    stack.append(c)
                elif c is not None:
                    _TRACKED.add(c)  # adapter containers: tracked, not walked
        else:
            stack.extend(c for c in m._modules.values() if c is not None)
    _TRACKED.update(out)
    return out


@contextlib.contextmanager
def _mixed_batch_hooks(self, *args, **kwargs):
    """LoraModel._enable_peft_forward_hooks for a patched model (see the module docstring)."""
    names, beams = kwargs.get("adapter_names"), kwargs.get("num_beams")
    if (names is None or kwargs.get("alora_offsets") is not None or self.training
            or (isinstance(beams, int) and beams > 1)):
        with type(self)._enable_peft_forward_hooks(self, *args, **kwargs):  # PEFT's own
            yield
        return
    if not _ENTER:  # made on first use: torch.compiler.disable imports Dynamo (and triton)
        _ENTER.append(torch.compiler.disable(_enter))
    token = _MIXED.set(_ENTER[0](self, names))
    try:
        yield
    finally:
        _MIXED.reset(token)


def _enter(model: nn.Module, names) -> Batch:
    """The start of a patched LoraModel's mixed batch, always eager (called through
    torch.compiler.disable: a compiled model traces none of it): the tree's view (adapter names, patched layers, layers that need PEFT's hook), walked
    again when a module was assigned anywhere or the adapter set changed (delete_adapter,
    load_adapter); PEFT's unknown-adapter error; every patched layer's prepare."""
    _install_tree_hook()
    sig = (_TREE[0], id(model), tuple(model.peft_config))  # id: a deepcopy walks its own tree
    walk = model.__dict__.get(_WALK)
    if walk is None or walk[0] != sig:
        Linear, Embedding, LoraLayer = _peft_classes()
        Aux = _peft_model_classes()[1]
        expected, reached, patched = set(), set(), []
        for m in _modules(model, LoraLayer):
            if isinstance(m, LoraLayer):
                expected |= m.lora_A.keys()
                expected |= m.lora_embedding_A.keys()
            if is_patched(m):
                reached.add(id(m))
                patched.append((m, isinstance(m, Embedding)))
            elif isinstance(m, (LoraLayer, Aux)):
                reached.add(id(m))
                if not _context_hooked(m):
                    m.register_forward_pre_hook(_context_pre_hook, with_kwargs=True)
        walk = (sig, frozenset(expected), frozenset(reached), tuple(patched))
        model.__dict__[_WALK] = walk
    _, expected, reached, patched = walk
    unexpected = {n for n in names if n != "__base__"} - expected
    if unexpected:  # PEFT's message
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    rows: dict = {}
    return Batch(names, reached, {id(m): prepare_experts(m, names) if is_param_wrapper(m) else
                                  prepare(m, names, embedding, shared_rows=rows) for m, embedding in patched})


# ------------------------------------------------------------------------------------ public API
def patch_peft(model: nn.Module) -> list[str]:
    """Routes the PEFT LoRA Linear layers of ``model`` (a PeftModel, or a transformers model with
    PEFT adapters loaded) through lora_ext's fused ops, in place, by replacing each instance's
    forward. Returns the names of the layers patched by this call (already patched ones are
    skipped, so calling it again after add_adapter patches only new layers). Undo with
    ``unpatch_peft``."""
    Linear, Embedding, LoraLayer = _peft_classes()
    LoraModel = _peft_model_classes()[0]
    _install_tree_hook()
    _TREE[0] += 1  # patched layers change the mixed-batch view
    patched = []
    outer = outer_wrappers(model)
    for name, m in model.named_modules():
        if isinstance(m, LoraModel) and _HOOKS not in m.__dict__:
            m.__dict__[_HOOKS] = functools.partial(_mixed_batch_hooks, m)
        if is_patched(m):  # patched again: adapter weights may have changed behind autograd's back
            m.__dict__.pop(POOL, None)
        if not isinstance(m, LoraLayer) or is_patched(m):
            continue
        m.__dict__[_NAME] = name
        if isinstance(m, Linear) and "forward" in m.__dict__:
            _warn(m, "its forward is already replaced on the instance (by another tool)")
        elif isinstance(m, Linear) and type(m).forward is Linear.forward:
            m.__dict__[_ORIG] = True
            m.forward = functools.partial(_patched_forward, m)
            plain_linear(m.base_layer)  # probes an nn.Linear subclass now, eagerly (once per class)
            patched.append(name)
        elif isinstance(m, Embedding) and "forward" not in m.__dict__ and type(m).forward is Embedding.forward:
            m.__dict__[_ORIG] = True
            m.forward = functools.partial(_patched_embedding_forward, m)
            patched.append(name)
        elif is_param_wrapper(m) and name in outer and "forward" not in m.__dict__:
            m.__dict__[_ORIG] = True  # the inner wrappers of its chain are never called
            m.forward = functools.partial(_patched_param_forward, m)
            watch_block(model.get_submodule(name.rpartition(".")[0]), m)  # its MoE block: the batch rows
            patched.append(name)
        elif is_param_wrapper(m):
            continue
        else:
            _warn(m, f"{type(m).__module__}.{type(m).__name__} layers are not supported by lora_ext")
    return patched


def unpatch_peft(model: nn.Module) -> list[str]:
    """Restores the forward of every layer ``patch_peft`` patched; returns their names."""
    restored = []
    for name, m in model.named_modules():
        if is_patched(m):
            del m.__dict__[_ORIG]
            m.__dict__.pop("forward", None)  # back to the class's (PEFT's) forward
            restored.append(name)
        for attr in (_NAME, POOL, INDICES, _WARNED, _HOOKS, _WALK):
            m.__dict__.pop(attr, None)
        _remove_context_hook(m)
        for k in [k for k, h in m._forward_pre_hooks.items() if getattr(h, "func", None) is _record_rows]:
            del m._forward_pre_hooks[k]  # watch_block's (patch_peft registers one per experts wrapper)
            m._forward_pre_hooks_with_kwargs.pop(k, None)
    return restored
