"""AdapterPool: many LoRA adapters resident at once, one mixed batch through the model.

    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=16, max_rank=64)
    pool.load("sql", "adapters/sql")          # PEFT directory or an Adapter
    pool.load("chat", chat_adapter)
    with pool.batch(["sql", None, "chat"]):   # one name per sequence of a [batch, seq] input
        logits = model(input_ids).logits
    with pool.batch(token_names, per_token=True):  # packed / flattened batches: one name per token

Design:
- The target nn.Linear layers become MultiLoRALinear layers sharing one LoRAContext; slot s of every
  layer holds one adapter (rank <= max_rank, zero work on the padded part; a layer the adapter does
  not target gets rank 0). Indices, scales, ranks and weights are tensors updated in place, so a
  torch.compile'd model does not recompile when adapters are loaded, evicted or swapped, and a
  captured CUDA graph replays with whatever the pool holds.
- batch(names) writes per-sequence slots into a small tensor; a forward pre-hook on the model
  expands them to per-token indices from the input's [batch, seq] shape (tensor ops only).
- When all slots are taken, load() evicts the least recently used adapter that no open batch uses
  (RuntimeError if every one is in use). Evicted adapters stay in a pinned host cache up to
  host_cache_bytes (LRU); reloading from it (or prefetch(name)) copies on a side stream.
- One lock guards the slot table, so loads/unloads may come from several threads while batches
  run. On CUDA each slot has an event marking the end of all queued work that touches it: every
  write or clear (load, unload, eviction, on-demand load in batch(), prefetch on the side stream)
  first makes its stream wait for it and then records a new one, and each batch records one on
  exit. So a slot is never written while a batch may still read it, and writes on the current and
  side streams never overlap. A prefetch's event is also kept on the entry (`ready`); the first
  batch using it makes the current stream wait for it. Device temporaries of a side-stream write
  are allocated on the side stream, so the caching allocator reuses them only after that write.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import torch
from torch import nn

from .adapters import Adapter, LayerWeights
from .inject import _matches, _output_head_names
from .multi import LoRAContext, MultiLoRALinear

__all__ = ["AdapterPool"]

BASE_NAMES = (None, "__base__")


class _Entry:
    """What the pool knows about one adapter name."""

    def __init__(self, name: str, adapter: Adapter, source: str | None):
        self.name, self.adapter, self.source = name, adapter, source
        self.slot: int | None = None   # resident slot, or None
        self.in_use = 0                # open batches using it
        self.ready: torch.cuda.Event | None = None  # pending side-stream load (prefetch)


class AdapterPool:
    def __init__(self, model: nn.Module, target_modules=None, max_adapters: int = 16, max_rank: int = 64,
                 device=None, host_cache_bytes: int | None = None, max_tokens: int = 65536):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"AdapterPool: max_adapters and max_rank must be >= 1, got {max_adapters}, {max_rank}")
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.host_cache_bytes = host_cache_bytes
        self.context = LoRAContext(max_tokens, self.device)
        self.layers = self._replace_targets(target_modules)
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU order, oldest first
        self._slot_owner: list[str | None] = [None] * max_adapters
        self._host: OrderedDict[str, int] = OrderedDict()  # host-cached adapters -> bytes
        self._lock = threading.RLock()
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # per slot: the end of all queued work touching it (at first: the pools' zero fill)
        created = torch.cuda.current_stream(self.device).record_event() if self._side is not None else None
        self._slot_event: list[torch.cuda.Event | None] = [created] * max_adapters
        self._seq_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)
        self._per_token = False
        self._hook = model.register_forward_pre_hook(self._expand_indices, with_kwargs=True)

    # ------------------------------------------------------------------ setup
    def _replace_targets(self, target_modules) -> dict[str, MultiLoRALinear]:
        heads = _output_head_names(self.model)
        chosen = {}
        for name, m in list(self.model.named_modules()):
            if not isinstance(m, nn.Linear) or name in heads:
                continue
            if target_modules is None or _matches(name, target_modules if isinstance(target_modules, str)
                                                   else list(target_modules)):
                chosen[name] = m
        if not chosen:
            raise ValueError(f"AdapterPool: target_modules={target_modules!r} matched no nn.Linear of "
                             f"{type(self.model).__name__}")
        modules = dict(self.model.named_modules())
        layers = {}
        for name, lin in chosen.items():
            layer = MultiLoRALinear(lin, self.max_adapters, self.max_rank, context=self.context)
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else self.model, child, layer)
            layers[name] = layer
        return layers

    def _expand_indices(self, module, args, kwargs):
        """Per-sequence slots -> per-token indices from the input's [batch, seq] shape."""
        if self._per_token:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            return None
        b, s = ids.shape[0], ids.shape[1]
        self.context.indices[: b * s].copy_(self._seq_slots[:b].repeat_interleave(s))
        return None

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

    def _validate(self, name: str, ad: Adapter) -> None:
        for mod, w in ad.layers.items():
            layer = self.layers.get(mod)
            if layer is None:
                raise ValueError(f"AdapterPool.load({name!r}): module {mod!r} is not served by this pool "
                                 f"(pool targets e.g. {sorted(self.layers)[:3]})")
            if w.kind != "linear":
                raise ValueError(f"AdapterPool.load({name!r}): module {mod!r} holds {w.kind} weights; "
                                 "the pool serves Linear layers only")
            if w.r > self.max_rank:
                raise ValueError(f"AdapterPool.load({name!r}): module {mod!r} has rank {w.r} > max_rank {self.max_rank}")
            if tuple(w.A.shape) != (w.r, layer.in_features) or tuple(w.B.shape) != (layer.out_features, w.r):
                raise ValueError(f"AdapterPool.load({name!r}): module {mod!r} is {layer.in_features} -> "
                                 f"{layer.out_features}, the adapter has A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")

    def load(self, name: str, adapter, allow_pickle: bool = False) -> int:
        """Loads (or replaces) adapter `name` from a PEFT directory or an Adapter; returns its slot."""
        if name in BASE_NAMES or not isinstance(name, str):
            raise ValueError(f"AdapterPool.load: {name!r} is reserved for the base model")
        source = adapter if isinstance(adapter, str) else None
        ad = Adapter.load(adapter, allow_pickle=allow_pickle) if isinstance(adapter, str) else adapter
        if not isinstance(ad, Adapter):
            raise TypeError(f"AdapterPool.load: expected a path or an Adapter, got {type(adapter).__name__}")
        self._validate(name, ad)
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.in_use:
                raise RuntimeError(f"AdapterPool.load: {name!r} is used by an open batch; replace it later")
            host = Adapter({k: LayerWeights(_pin(w.A), _pin(w.B), w.scale, w.kind) for k, w in ad.layers.items()},
                           ad.config, name)
            entry = _Entry(name, host, source)
            slot = old.slot if old is not None and old.slot is not None else self._free_slot()
            self._entries[name] = entry
            self._host.pop(name, None)
            self._write_slot(entry, slot, stream=None)
            return slot

    def unload(self, name: str) -> None:
        """Forgets `name`: frees its slot and host copy."""
        with self._lock:
            entry = self._entry(name)
            if entry.in_use:
                raise RuntimeError(f"AdapterPool.unload: {name!r} is used by an open batch")
            if entry.slot is not None:
                self._release_slot(entry)
            self._host.pop(name, None)
            del self._entries[name]

    def prefetch(self, name: str) -> None:
        """Makes `name` resident asynchronously (side stream on CUDA); batch() waits for it."""
        with self._lock:
            entry = self._entry(name)
            if entry.slot is None:
                self._write_slot(entry, self._free_slot(), stream=self._side)

    # ------------------------------------------------------------------ batches
    @contextlib.contextmanager
    def batch(self, names, per_token: bool = False):
        """Routes each sequence (or each token with per_token=True) to its adapter for the block.

        names: one adapter name per sequence of a [batch, seq] input (per token with per_token);
        None or "__base__" means the base model only. Unknown names raise KeyError.
        """
        names = list(names)
        if len(names) > self.context.max_tokens:
            raise ValueError(f"AdapterPool.batch: {len(names)} entries exceed max_tokens {self.context.max_tokens}")
        used: list[_Entry] = []
        with self._lock:
            for n in names:
                if n not in BASE_NAMES and n not in self._entries:
                    raise KeyError(f"AdapterPool.batch: unknown adapter {n!r}; loaded: {self.names()}")
            for n in dict.fromkeys(n for n in names if n not in BASE_NAMES):
                e = self._entries[n]
                if e.slot is None:
                    self._write_slot(e, self._free_slot(), stream=None)
                e.in_use += 1
                used.append(e)
                self._resident.move_to_end(n)
            slots = [-1 if n in BASE_NAMES else self._entries[n].slot for n in names]
            for e in used:
                if e.ready is not None:  # a prefetch on the side stream: order after it
                    torch.cuda.current_stream(self.device).wait_event(e.ready)
                    e.ready = None
        idx = torch.tensor(slots, dtype=torch.int32)
        try:
            if per_token:
                self.context.set_indices(idx)
            else:
                self._seq_slots[: len(slots)].copy_(idx, non_blocking=True)
            self._per_token = per_token
            yield self
        finally:
            with self._lock:
                for e in used:
                    e.in_use -= 1
                    if self._side is not None and e.slot is not None:
                        self._slot_event[e.slot] = torch.cuda.current_stream(self.device).record_event()
            self._per_token = False

    # ------------------------------------------------------------------ slots
    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"AdapterPool: unknown adapter {name!r}; loaded: {self.names()}")
        return self._entries[name]

    def _free_slot(self) -> int:
        for s, owner in enumerate(self._slot_owner):
            if owner is None:
                return s
        for n in self._resident:  # least recently used first
            e = self._entries[n]
            if e.in_use == 0:
                slot = e.slot
                self._release_slot(e)
                self._cache_on_host(e)
                return slot
        raise RuntimeError(f"AdapterPool: all {self.max_adapters} slots hold adapters used by open batches")

    def _release_slot(self, e: _Entry) -> None:
        slot = e.slot
        with self._slot_work(slot):  # after batches reading it and a pending prefetch into it
            for layer in self.layers.values():
                layer.clear_slot(slot)
        self._slot_owner[slot] = None
        self._resident.pop(e.name, None)
        e.slot, e.ready = None, None

    def _cache_on_host(self, e: _Entry) -> None:
        """Keeps an evicted adapter's (pinned) host copy within host_cache_bytes, else drops it if
        it can be re-read from its file."""
        nbytes = e.adapter.nbytes()
        self._host[e.name] = nbytes
        if self.host_cache_bytes is None:
            return
        while self._host and sum(self._host.values()) > self.host_cache_bytes:
            victim, _ = self._host.popitem(last=False)
            v = self._entries.get(victim)
            if v is not None and v.source is not None and v.slot is None:
                v.adapter = None  # re-read from disk when needed
            elif v is not None and v.slot is None:
                self._host[victim] = v.adapter.nbytes()  # no file to re-read: must keep it
                self._host.move_to_end(victim, last=False)
                break

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
        if e.adapter is None:  # dropped from the host cache: read the file again
            ad = Adapter.load(e.source)
            e.adapter = Adapter({k: LayerWeights(_pin(w.A), _pin(w.B), w.scale, w.kind)
                                 for k, w in ad.layers.items()}, ad.config, e.name)
        with self._slot_work(slot, stream):
            for mod, layer in self.layers.items():
                w = e.adapter.layers.get(mod)
                if w is None:
                    layer.clear_slot(slot)
                else:
                    layer.set_slot(slot, w.A.to(self.device, non_blocking=True),
                                   w.B.to(self.device, non_blocking=True), w.scale)
        e.ready = self._slot_event[slot] if stream is not None else None
        self._slot_owner[slot] = e.name
        e.slot = slot
        self._resident[e.name] = None
        self._resident.move_to_end(e.name)

    def close(self) -> None:
        """Removes the pool's forward hook (the MultiLoRALinear layers stay)."""
        self._hook.remove()


def _pin(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            t = t.pin_memory()
    return t
