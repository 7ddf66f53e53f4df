"""AdapterPool: many LoRA adapters resident at once, one mixed batch through the model.

    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=16, max_rank=64)
    pool.load("sql", "adapters/sql")          # PEFT directory or an Adapter
    pool.load("chat", chat_adapter)
    with pool.batch(["sql", None, "chat"]):   # one name per batch row (dim 0 of the input)
        logits = model(input_ids).logits
    with pool.batch(token_names, per_token=True):  # packed / flattened batches: one name per token

Design:
- The target nn.Linear / transformers Conv1D layers become MultiLoRALinear layers, nn.Embedding
  targets MultiLoRAEmbedding layers, all sharing one LoRAContext; slot s of every layer holds one
  adapter (rank <= max_rank, zero work on the padded part; a layer the adapter does not target gets
  rank 0). Indices, scales, ranks and weights are tensors updated in place, so a torch.compile'd
  model does not recompile when adapters are loaded, evicted or swapped, and a captured CUDA graph
  replays with whatever the pool holds.
- batch(names) writes one slot per batch row (per token) into the context; every layer expands
  them over its input's leading dims and raises if its input has another number of rows (tokens).
  Outside a batch the context is cleared: the model is the base model (inputs of any size). One
  batch at a time: a second one (another thread's, or nested) raises, since they would share the
  index buffer.
- A batch validates its names and reads the files of evicted adapters it needs before it changes
  anything, so a batch that cannot open leaves the pool as it was.
- When all slots are taken, load() evicts the least recently used adapter that the open batch does
  not use (RuntimeError if every one is in use). Evicted adapters stay in a pinned host cache up to
  host_cache_bytes (LRU); reloading from it (or prefetch(name)) copies on a side stream.
- One lock guards the slot table, so loads/unloads may come from several threads while a batch
  runs. On CUDA each slot has an event marking the end of all queued work that touches it: every
  write or clear (load, unload, eviction, on-demand load in batch(), prefetch on the side stream)
  first makes its stream wait for it and then records a new one, and each batch records one on
  exit. So a slot is never written while a batch may still read it, and writes on the current and
  side streams never overlap. A prefetch's event is also kept on the entry (`ready`); the first
  batch using it makes the current stream wait for it. Device temporaries of a side-stream write
  are allocated on the side stream, so the caching allocator reuses them only after that write.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
from collections import OrderedDict

import torch
from torch import nn

from .adapters import Adapter
from .conv import is_conv
from .inject import _no_fused_encoder, registrations
from .layers import LoRALayer, is_conv1d
from .multi import ContextLayer, LoRAContext, MultiLoRAEmbedding, MultiLoRALinear, _MultiLoRA
from .multi_experts import MultiLoRAExperts, expert_factors, read_adapter, watch_block, wrap_experts
from .pool_checks import check_adapter, check_model, watch_encoder
from .param_lora import parameter_layers
from .targets import check_regex, matches, output_head_names, read_directly

__all__ = ["AdapterPool"]

BASE_NAMES = (None, "__base__")


class _Entry:
    """What the pool knows about one adapter name."""

    def __init__(self, name: str, adapter: Adapter, source: str | None, allow_pickle: bool = False):
        self.name, self.adapter, self.source = name, adapter, source
        self.allow_pickle = allow_pickle  # as load() read `source`, for a re-read
        # what load() read from `source`: a re-read (after the host copy was dropped) must match
        self.digest = _digest(adapter) if source is not None else None
        self.slot: int | None = None   # resident slot, or None
        self.in_use = False            # used by the open batch
        self.ready: torch.cuda.Event | None = None  # pending side-stream load (prefetch)


class AdapterPool:
    """Serves many LoRA adapters at once: one mixed batch, each row (or token) its own adapter.

    Replaces ``model``'s target layers in place by multi-adapter layers (see the module docstring).
    target_modules: name suffixes, a regex or "all-linear" (None: every Linear/Conv1D but the head and
    an nn.MultiheadAttention's out_proj, which is refused by name, as by inject).
    max_adapters: resident slots (load() evicts the least recently used beyond it).
    max_rank: the largest adapter rank a slot holds. device: the model's (default: its first parameter's;
    the pools live beside each base layer: a target on another device raises). host_cache_bytes:
    pinned host copies kept of evicted adapters (None: no limit; beyond it they are re-read from their
    files; adapters loaded as Adapter objects have none and stay until unload()). max_tokens: the
    most names one batch() may take (rows, or tokens with per_token=True). dora: also serve DoRA
    adapters (use_dora; linear targets only, a DoRA embedding is refused: MultiLoRALinear's dora=True,
    which costs 2 fp32 rows of out_features per slot and one pass over each output).
    target_parameters: PEFT's, MoE experts' projections to serve too (lora_ext.multi_experts: e.g.
    ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]; a list of target_modules may then be
    empty). A model with LoRAParameter layers, unmerged injected
    LoRA layers or PEFT's layers is refused.
    """

    def __init__(self, model: nn.Module, target_modules=None, max_adapters: int = 16, max_rank: int = 64,
                 device=None, host_cache_bytes: int | None = None, max_tokens: int = 65536, dora: bool = False,
                 target_parameters=None):
        for arg, v, least in (("max_adapters", max_adapters, 1), ("max_rank", max_rank, 1),
                              ("max_tokens", max_tokens, 1), ("host_cache_bytes", host_cache_bytes, 0)):
            if not (arg == "host_cache_bytes" and v is None or _is_int(v) and v >= least):
                raise ValueError(f"AdapterPool: {arg} must be {'None or ' if least == 0 else ''}an int >= {least}, "
                                 f"got {v!r:.80}")
        self.model, self.max_adapters, self.max_rank, self.dora = model, max_adapters, max_rank, bool(dora)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current one, as tensors get
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.host_cache_bytes = host_cache_bytes
        # buffers updated in place by every load and batch: normal tensors even when the pool is
        # built under torch.inference_mode() (inference tensors refuse in-place updates outside it)
        with torch.inference_mode(False):
            self.context = LoRAContext(max_tokens, self.device)
            self.layers = self._replace_targets(target_modules, target_parameters)
        watch_encoder(model, self.context)
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU order, oldest first
        self._slot_owner: list[str | None] = [None] * max_adapters
        self._host: OrderedDict[str, int] = OrderedDict()  # host-cached adapters -> bytes
        self._lock = threading.RLock()
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # per slot: the end of all queued work touching it (at first: the pools' zero fill)
        created = torch.cuda.current_stream(self.device).record_event() if self._side is not None else None
        self._slot_event: list[torch.cuda.Event | None] = [created] * max_adapters
        self._batch_open = False

    # ------------------------------------------------------------------ setup
    def _replace_targets(self, target_modules, target_parameters) -> dict[str, MultiLoRALinear | MultiLoRAEmbedding]:
        """target_modules=None or "all-linear": every Linear/Conv1D but the output head; an output
        head (lm_head) or embedding only when target_modules names it, as in PEFT."""
        served = [n for n, m in self.model.named_modules() if isinstance(m, ContextLayer)]
        if served:  # its layers would wrap the other pool's base layers and need both pools' batches
            raise ValueError(f"AdapterPool: {type(self.model).__name__} is already served by an AdapterPool "
                             f"(multi-adapter layers {', '.join(served[:3])}{', ...' if len(served) > 3 else ''}); "
                             "one pool per model: load more adapters into that pool (max_adapters=)")
        wrapped = sorted(parameter_layers(self.model))
        if wrapped:  # their LoRA would apply to every row of a mixed batch, base rows included
            raise ValueError(f"AdapterPool: {type(self.model).__name__} has LoRA on parameters (LoRAParameter "
                             f"{wrapped[0]!r}{', ...' if len(wrapped) > 1 else ''}), which would apply to every row of a "
                             "mixed batch: merge it into the model first (lora_ext.merge_and_unload), or build the pool "
                             "on the model without it (AdapterPool(..., target_parameters=[...]) serves such adapters)")
        if isinstance(target_modules, str) and target_modules.lower() == "all-linear":  # as PEFT, any case
            target_modules = "all-linear"
        everything = target_modules is None or target_modules == "all-linear"
        check_regex("AdapterPool", "target_modules", None if everything else target_modules)
        heads = output_head_names(self.model) if everything else set()
        bypassed = read_directly(self.model)  # "all-linear" leaves them out, as inject does
        targets = target_modules if everything or isinstance(target_modules, str) else list(target_modules)
        chosen = {}
        for name, m in list(self.model.named_modules()):
            linear = isinstance(m, nn.Linear) or is_conv1d(m)
            if not everything and name in bypassed and matches(name, targets):
                raise TypeError(f"AdapterPool: target_modules={target_modules!r} matches {name!r}, the out_proj "
                                "of an nn.MultiheadAttention, which reads its weight directly "
                                "(F.multi_head_attention_forward): its adapters would never run; leave it out "
                                "of target_modules")
            if not everything and is_conv(m) and matches(name, targets):
                raise ValueError(f"AdapterPool: target_modules={target_modules!r} matches {name!r}, a "
                                 f"{type(m).__name__}: multi-adapter serving has no convolution layers (LoRAConv2d "
                                 "...); use lora_ext.load_adapter, or leave it out of target_modules")
            if not everything and isinstance(m, LoRALayer) and matches(name, targets):
                raise ValueError(f"AdapterPool: target_modules={target_modules!r} matches {name!r}, an injected "
                                 f"{type(m).__name__}{' (DoRA)' if m.use_dora else ''}: a pool serves a base model's "
                                 "nn.Linear / Conv1D / nn.Embedding (multi-adapter serving of DoRA is not supported); "
                                 "build the pool on the model without injected layers, or leave it out of "
                                 "target_modules")
            if name in heads or name in bypassed or not (linear or isinstance(m, nn.Embedding)):
                continue
            if linear if everything else matches(name, targets):
                chosen[name] = m
        self.experts = {} if target_parameters is None else wrap_experts(
            self.model, target_parameters, self.max_adapters, self.max_rank, self.context)
        check_model(self.model)  # LoRA layers outside the pool's (nothing is replaced yet)
        if not chosen and not (self.experts and isinstance(target_modules, (list, tuple))):
            hint = ""
            if isinstance(target_modules, str) and not everything:
                hint = (" (a str is a regex over full module names, as in PEFT: pass a list for name suffixes, "
                        f"[{target_modules!r}])")
            elif everything and bypassed:
                hint = (f" (an nn.MultiheadAttention's out_proj, {sorted(bypassed)[0]!r}, is never served: the "
                        "attention reads its weight directly)")
            raise ValueError(f"AdapterPool: target_modules={target_modules!r} matched no nn.Linear, Conv1D or "
                             f"nn.Embedding of {type(self.model).__name__}{hint}")
        layers = {}
        for name, m in chosen.items():  # all built first: a module that cannot be served changes nothing
            extra = {} if isinstance(m, nn.Embedding) else {"dora": self.dora}
            kind = MultiLoRAEmbedding if isinstance(m, nn.Embedding) else MultiLoRALinear
            try:
                layers[name] = kind(m, self.max_adapters, self.max_rank, context=self.context, **extra)
            except ValueError as e:
                raise ValueError(f"AdapterPool: module {name!r}: {e}") from e
        for name, layer in {**layers, **self.experts}.items():  # the ops take the indices beside the pools
            w = next(layer.base.parameters())
            if w.device != self.device:
                raise ValueError(f"AdapterPool: module {name!r} is on {w.device}, the pool's indices on {self.device} "
                                 "(device=, default: the model's first parameter's): the pools live beside each base "
                                 "layer, so a pool serves a model on one device; move the model there first")
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # the ops' dtypes (pools: the weight's)
                raise ValueError(f"AdapterPool: module {name!r} has {w.dtype} weights; multi-adapter serving runs "
                                 "float32, float16 and bfloat16 models (cast it first, e.g. model.float())")
        where_is = registrations(self.model)  # a module registered in several places is served in each, as inject's
        for name, layer in {**layers, **self.experts}.items():
            if not name:
                raise TypeError(f"AdapterPool: the model itself is a {type(layer.base).__name__}; put it in a module "
                                "(e.g. nn.Sequential(layer)) so the pool can replace it")
            if any(isinstance(parent, nn.TransformerEncoderLayer) for parent, _ in where_is[id(layer.base)]):
                layer.register_forward_pre_hook(_no_fused_encoder)  # off its fused path, as inject does
            for parent, child in where_is[id(layer.base)]:
                setattr(parent, child, layer)
                if isinstance(layer, MultiLoRAExperts):  # its MoE block sees the batch rows
                    watch_block(parent, layer)
        for m in self.model.modules():  # their stack would hand them nested tensors (its own fused path)
            if isinstance(m, nn.TransformerEncoder) and any(isinstance(x, _MultiLoRA) for x in m.layers.modules()):
                m.use_nested_tensor = False
        return layers

    # ------------------------------------------------------------------ registry
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def resident(self) -> list[str]:
        """Names currently in a GPU/CPU slot, least recently used first."""
        return list(self._resident)

    def load(self, name: str, adapter, allow_pickle: bool = False) -> int:
        """Loads (or replaces) adapter `name` from a PEFT directory or an Adapter; returns its slot."""
        if not isinstance(name, str):
            raise TypeError(f"AdapterPool.load: name must be a str, got {type(name).__name__} {name!r:.80}")
        if name in BASE_NAMES:
            raise ValueError(f"AdapterPool.load: {name!r} is reserved for the base model")
        # absolute: an evicted adapter is re-read from the same directory after a chdir
        source = os.path.abspath(os.fspath(adapter)) if isinstance(adapter, (str, os.PathLike)) else None
        ad = read_adapter(source, allow_pickle, self.experts) if source is not None else adapter
        if not isinstance(ad, Adapter):
            raise TypeError(f"AdapterPool.load: expected a path or an Adapter, got {type(adapter).__name__}")
        check_adapter(self, name, ad, source)
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.in_use:
                raise RuntimeError(f"AdapterPool.load: {name!r} is used by an open batch; replace it later")
            entry = _Entry(name, _pinned(ad, name), source, allow_pickle)
            slot = old.slot if old is not None and old.slot is not None else self._free_slot(f"load({name!r})")
            try:
                self._write_slot(entry, slot, stream=None)
            except BaseException:  # the slot holds a partial write: free it; `name` stays as it was,
                self._slot_owner[slot] = None  # not resident (re-written from its copy when used)
                if old is not None and old.slot == slot:
                    old.slot = None
                    self._resident.pop(name, None)
                    if old.adapter is not None:
                        self._host[name] = old.adapter.nbytes()
                raise
            self._entries[name] = entry
            return slot

    def unload(self, name: str) -> None:
        """Forgets `name`: frees its slot and host copy."""
        with self._lock:
            entry = self._entry(name, "unload")
            if entry.in_use:
                raise RuntimeError(f"AdapterPool.unload: {name!r} is used by an open batch")
            if entry.slot is not None:
                self._release_slot(entry)
            self._host.pop(name, None)
            del self._entries[name]

    def prefetch(self, name: str) -> None:
        """Makes `name` resident asynchronously (side stream on CUDA); batch() waits for it."""
        with self._lock:
            entry = self._entry(name, "prefetch")
            if entry.slot is None:
                self._host_copy(entry)
                self._write_slot(entry, self._free_slot(f"prefetch({name!r})"), stream=self._side)

    # ------------------------------------------------------------------ batches
    @contextlib.contextmanager
    def batch(self, names, per_token: bool = False):
        """Routes each batch row (or each token with per_token=True) to its adapter for the block.

        names: one adapter name per batch row, i.e. dim 0 of every target layer's input whatever
        its other dims (one per token with per_token); a layer input with another number of rows
        (tokens) raises ValueError. None or "__base__" means the base model only. Unknown names
        raise KeyError, more distinct names than max_adapters ValueError; a batch that cannot open
        leaves the pool as it was. One batch at a time: a second one raises RuntimeError.
        """
        if isinstance(names, str):
            raise TypeError(f"AdapterPool.batch: names must be a sequence of names (one per row), "
                            f"got the string {names!r}; for one row pass [{names!r}]")
        names = list(names)
        with self._lock:
            used = self._batch_entries(names)
            self._batch_open = True
            for e in used:  # not evicted by the loads below, nor by other threads
                e.in_use = True
        try:
            with self._lock:
                for e in used:
                    if e.slot is None:
                        self._write_slot(e, self._free_slot("batch"), stream=None)
                    self._resident.move_to_end(e.name)
                    if e.ready is not None:  # a prefetch on the side stream: order after it
                        torch.cuda.current_stream(self.device).wait_event(e.ready)
                        e.ready = None
                slots = [-1 if n in BASE_NAMES else self._entries[n].slot for n in names]
            self.context.set_indices(torch.tensor(slots, dtype=torch.int32), per_row=not per_token)
            yield self
        finally:
            with self._lock:
                try:
                    for e in used:
                        if self._side is not None and e.slot is not None:
                            self._slot_event[e.slot] = torch.cuda.current_stream(self.device).record_event()
                    self.context.clear()
                finally:  # the pool takes the next batch whatever failed above
                    for e in used:
                        e.in_use = False
                    self._batch_open = False

    def _batch_entries(self, names: list) -> list[_Entry]:
        """The adapters a batch uses, with their host copies; raises before changing anything."""
        if self._batch_open:
            raise RuntimeError("AdapterPool.batch: another batch is open on this pool (in this or another "
                               "thread); batches share the pool's indices, so open one after the other")
        if len(names) > self.context.max_tokens:
            raise ValueError(f"AdapterPool.batch: {len(names)} entries exceed max_tokens {self.context.max_tokens}")
        for i, n in enumerate(names):
            if n not in BASE_NAMES and not isinstance(n, str):
                raise TypeError(f"AdapterPool.batch: names[{i}] is a {type(n).__name__} ({n!r:.80}); each "
                                "entry is an adapter name (str), None or '__base__'")
            if n not in BASE_NAMES and n not in self._entries:
                raise KeyError(f"AdapterPool.batch: unknown adapter {n!r}; loaded: {self.names()}")
        used = [self._entries[n] for n in dict.fromkeys(names) if n not in BASE_NAMES]
        if len(used) > self.max_adapters:
            raise ValueError(f"AdapterPool.batch: names has {len(used)} distinct adapters but max_adapters="
                             f"{self.max_adapters}; split the batch")
        for e in used:
            self._host_copy(e)
        return used

    # ------------------------------------------------------------------ slots
    def _entry(self, name: str, method: str) -> _Entry:
        if not isinstance(name, str) or name not in self._entries:
            raise KeyError(f"AdapterPool.{method}: unknown adapter {name!r:.80}; loaded: {self.names()}")
        return self._entries[name]

    def _free_slot(self, caller: str) -> int:
        for s, owner in enumerate(self._slot_owner):
            if owner is None:
                return s
        for n in self._resident:  # least recently used first
            e = self._entries[n]
            if not e.in_use:
                slot = e.slot
                self._release_slot(e)
                self._host[n] = e.adapter.nbytes()  # trimmed to host_cache_bytes after the write
                return slot
        raise RuntimeError(f"AdapterPool.{caller}: all {self.max_adapters} slots hold adapters used by open batches")

    def _release_slot(self, e: _Entry) -> None:
        slot = e.slot
        with self._slot_work(slot):  # after batches reading it and a pending prefetch into it
            for layer in (*self.layers.values(), *self.experts.values()):
                layer.clear_slot(slot)
        self._slot_owner[slot] = None
        self._resident.pop(e.name, None)
        e.slot, e.ready = None, None

    def _trim_host_cache(self) -> None:
        """Keeps the (pinned) host copies of evicted adapters (self._host, oldest first) within
        host_cache_bytes: drops those that can be re-read from their file, but not the open batch's."""
        for n in list(self._host):
            if self.host_cache_bytes is None or sum(self._host.values()) <= self.host_cache_bytes:
                return
            e = self._entries[n]
            if e.source is not None and not e.in_use:
                e.adapter = None
                del self._host[n]

    def _host_copy(self, e: _Entry) -> None:
        """Reads an adapter dropped from the host cache from its file again: the adapter load()
        read, else an error (the pool never serves another version than load()'s under a name)."""
        if e.adapter is None:
            try:
                ad = read_adapter(e.source, e.allow_pickle, self.experts)
                check_adapter(self, e.name, ad, e.source)  # the file may have changed since load()
            except (OSError, ValueError) as err:
                raise type(err)(f"AdapterPool: adapter {e.name!r} was evicted and cannot be read again "
                                f"from {e.source}: {err}") from err
            if _digest(ad) != e.digest:
                raise ValueError(f"AdapterPool: adapter {e.name!r} was evicted and its files in {e.source} "
                                 f"changed since it was loaded; pool.load({e.name!r}, {e.source!r}) "
                                 "serves the new version")
            e.adapter = _pinned(ad, e.name)
            self._host[e.name] = e.adapter.nbytes()

    @contextlib.contextmanager
    def _slot_work(self, slot: int, stream=None):
        """Runs the block (writes to `slot`) on `stream` (None: the current one), ordered after all
        queued work touching the slot; the slot's event then marks the end of the block's work."""
        if self._side is None:  # CPU: everything is synchronous
            yield
            return
        stream = stream or torch.cuda.current_stream(self.device)
        stream.wait_event(self._slot_event[slot])
        with torch.cuda.stream(stream):  # temporaries are allocated on (and reused by) `stream`
            yield
        self._slot_event[slot] = stream.record_event()

    def _write_slot(self, e: _Entry, slot: int, stream) -> None:
        """Copies `e` (with its host copy) into `slot`; e is then resident, no longer host-cached."""
        with self._slot_work(slot, stream):
            for mod, layer in self.layers.items():
                w = e.adapter.layers.get(mod)
                if w is None:
                    layer.clear_slot(slot)
                else:
                    mag = {} if w.magnitude is None else {"magnitude": w.magnitude.to(self.device, non_blocking=True)}
                    layer.set_slot(slot, w.A.to(self.device, non_blocking=True),
                                   w.B.to(self.device, non_blocking=True), w.scale, **mag)
            factors = expert_factors(e.name, e.adapter, self.experts, self.max_rank)
            for mod, layer in self.experts.items():
                if mod in factors:
                    layer.set_slot(slot, {p: (A.to(self.device, non_blocking=True), B.to(self.device, non_blocking=True),
                                              scale) for p, (A, B, scale) in factors[mod].items()})
                else:
                    layer.clear_slot(slot)
        e.ready = self._slot_event[slot] if stream is not None else None
        self._slot_owner[slot] = e.name
        e.slot = slot
        self._resident[e.name] = None
        self._resident.move_to_end(e.name)
        self._host.pop(e.name, None)
        self._trim_host_cache()

    def close(self) -> None:
        """Unloads every adapter (frees slots and host copies); the layers stay, serving the base model."""
        with self._lock:
            if self._batch_open:
                raise RuntimeError("AdapterPool.close: a batch is open")
            for name in self.names():
                self.unload(name)


def _pinned(ad: Adapter, name: str) -> Adapter:
    """A copy of `ad` in (pinned, when CUDA is available) host memory."""
    return Adapter({k: dataclasses.replace(w, A=_pin(w.A), B=_pin(w.B),
                                           magnitude=None if w.magnitude is None else _pin(w.magnitude))
                    for k, w in ad.layers.items()}, ad.config, name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _digest(ad: Adapter) -> bytes:
    """A hash of what the pool serves of `ad`: every module's kind, scale, dtype, shapes and bits."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(ad.layers):
        w = ad.layers[name]
        h.update(repr((name, w.kind, float(w.scale), str(w.A.dtype), str(w.B.dtype), tuple(w.A.shape),
                       tuple(w.B.shape))).encode())
        for t in (w.A, w.B) + (() if w.magnitude is None else (w.magnitude,)):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.digest()


def _pin(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous host tensor equal to `t`, never sharing its memory (the caller's tensors
    may change after load(); ``to("cpu")`` and ``pin_memory()`` would return `t` itself when it
    is already a contiguous CPU / pinned tensor)."""
    pinned = torch.cuda.is_available()
    try:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
    except RuntimeError:  # no pinnable memory left: a pageable copy
        out = torch.empty(t.shape, dtype=t.dtype)
    return out.copy_(t.detach())
