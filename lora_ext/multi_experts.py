"""Multi-adapter serving of LoRA on MoE experts (PEFT's target_parameters): every token its own adapter.

``MultiLoRAExperts`` wraps a transformers experts module (one lora_ext.moe.fast_path_problem
accepts: Qwen3-MoE, Mixtral, gpt-oss, DeepSeek-V3, ...) and serves S adapter slots on its projections
(``gate_up_proj`` / ``up_proj`` and ``down_proj``), sharing a ``LoRAContext`` with the model's
MultiLoRALinear layers (lora_ext.AdapterPool(..., target_parameters=...) builds them).

Layout: expert e of slot s is row ``s * E + e`` of each projection's pools, A_pool [S * E, r_max, in]
and B_pool [S * E, out, r_max] (scales, ranks [S * E]; rank 0 = empty). The forward is
lora_ext.moe's (routes sorted by expert, the base projections as grouped matmuls); each projection's
LoRA term is one ``multi_lora_`` over the routed rows, with index ``s * E + e`` for a row routing
token t (slot s = the context's index of t) to expert e: -1 where the token has no adapter, an
out-of-range index where its slot is (the op reports it as for any multi-adapter layer).
Per-row indices (``pool.batch(names)``) expand over the [B * L] tokens the MoE block flattens its
[B, L, H] input to (row-major, as transformers does); the block's input is seen by a forward
pre-hook on it (``watch_block``), so its B rows are checked against the names as in the other
layers, compiled too (a block given [T, H] tokens: T must be a multiple of the rows). Inference
only, as the other multi layers.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .adapters import Adapter
from .multi import _OUT_OF_RANGE, ContextLayer, LoRAContext, _with_data, apply_keeping_fp32
from .ops import multi_lora_
from .ops._checks import as_scale
from .param_files import NeedsModel, _selects, check_fit, resolve, split_path
from .param_lora import expert_views
from .targets import hooked, outer_wrappers

__all__ = ["MultiLoRAExperts", "PEFTFactors", "wrap_experts", "expert_factors", "read_adapter", "watch_block",
           "block_rows", "block_lead", "lora_adder"]
ROWS = "_lora_ext_block_rows"  # __dict__ key: leading dims of the MoE block's last input (watch_block)

def _moe():  # lora_ext.moe imports transformers: only when experts are served
    from . import moe
    return moe


PEFTFactors = Mapping[str, tuple]  # projection -> (A [E * r, in], B [out, E * r], scale), PEFT's layout


class _ExpertSlots(nn.Module):
    """One projection's pools: A_pool [S * E, r_max, in], B_pool [S * E, out, r_max], scales, ranks."""

    def __init__(self, rows: int, r_max: int, n_in: int, n_out: int, like: torch.Tensor):
        super().__init__()
        kw = dict(dtype=like.dtype, device=like.device)
        with torch.inference_mode(False):
            for k, t in {"A_pool": torch.zeros(rows, r_max, n_in, **kw), "B_pool": torch.zeros(rows, n_out, r_max, **kw),
                         "scales": torch.zeros(rows, dtype=torch.float32, device=like.device),
                         "ranks": torch.zeros(rows, dtype=torch.int32, device=like.device)}.items():
                self.register_buffer(k, t, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        return apply_keeping_fp32(self, lambda: super(_ExpertSlots, self)._apply(fn, *args, **kwargs), ("scales",))


class MultiLoRAExperts(ContextLayer):
    """``base(hidden_states, top_k_index, top_k_weights)`` plus each token's adapter on the experts it
    routes to (see the module doc). ``names``: the projections served (a subset of the module's two).
    Attributes the wrapper lacks are read from ``base`` (``experts.num_experts``, ``act_fn``, ...)."""

    def __init__(self, base: nn.Module, names: Sequence[str], num_slots: int, r_max: int,
                 context: Optional[LoRAContext] = None):
        super().__init__()
        where = f"MultiLoRAExperts({type(base).__name__})"
        problem = _moe().fast_path_problem(base, set(names)) or _hook_problem(base)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if num_slots < 1 or r_max < 1:
            raise ValueError(f"{where}: num_slots and r_max must be >= 1, got {num_slots}, {r_max}")
        self.base, self.context = base, context
        self.num_slots, self.r_max, self.num_experts = num_slots, r_max, base.num_experts
        self.slots = nn.ModuleDict()
        for name in dict.fromkeys(names):
            P = getattr(base, name)
            if P.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{where}: {name} is {P.dtype}; multi-adapter serving takes float32/16, bfloat16")
            self.slots[name] = _ExpertSlots(num_slots * self.num_experts, r_max, *_moe()._in_out(base, name), P)
        self._ready = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not self.__dict__.get("_ready"):
                raise
            return getattr(self._modules["base"], name)

    def extra_repr(self) -> str:
        return (f"projections={list(self.slots)}, num_experts={self.num_experts}, num_slots={self.num_slots}, "
                f"r_max={self.r_max}")

    # ---------------------------------------------------------------- slots
    def _slot_rows(self, method: str, slot) -> slice:
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise TypeError(f"MultiLoRAExperts.{method}: slot must be an int, got {type(slot).__name__} {slot!r:.80}")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRAExperts.{method}: slot must be an int in 0..{self.num_slots - 1}, "
                             f"got {slot!r:.80}")
        E, slot = self.num_experts, int(slot)
        return slice(slot * E, (slot + 1) * E)

    @torch.no_grad()
    def set_slot(self, slot: int, factors: PEFTFactors) -> None:
        """Loads one adapter's factors into ``slot``: ``factors[name] = (A [E * r, in], B [out, E * r],
        scale)`` as PEFT stores a parameter's (expert e: rows e*r.. of A, columns j*E + e of B),
        1 <= r <= r_max; projections not in ``factors`` get rank 0. Everything is checked and staged
        before the slot changes: a refused call leaves it as it was."""
        rows, E = self._slot_rows("set_slot", slot), self.num_experts
        unknown = sorted(set(factors) - set(self.slots))
        if unknown:
            raise ValueError(f"MultiLoRAExperts.set_slot: {unknown} not served (projections {list(self.slots)})")
        staged = {}
        for name, spec in factors.items():
            if not isinstance(spec, (tuple, list)) or len(spec) != 3:
                raise ValueError(f"MultiLoRAExperts.set_slot: factors[{name!r}] must be a tuple (A, B, scale), "
                                 f"got {type(spec).__name__}")
            A, B, scale = spec
            pools = self.slots[name]
            _with_data("MultiLoRAExperts.set_slot", f"{name} A", A, pools.A_pool)
            _with_data("MultiLoRAExperts.set_slot", f"{name} B", B, pools.A_pool)
            n_out, r_max, n_in = pools.B_pool.shape[1], self.r_max, pools.A_pool.shape[2]
            r = A.shape[0] // E if A.dim() == 2 else 0
            if r < 1 or A.shape != (E * r, n_in) or B.shape != (n_out, E * r) or r > r_max:
                raise ValueError(f"MultiLoRAExperts.set_slot: {name} takes A [{E} * r, {n_in}] and B [{n_out}, {E} * r] "
                                 f"with 1 <= r <= r_max {r_max}, got A {tuple(A.shape)}, B {tuple(B.shape)}")
            scale = as_scale("MultiLoRAExperts.set_slot", "scale", scale)
            Ap, Bp = pools.A_pool.new_zeros(E, r_max, n_in), pools.B_pool.new_zeros(E, n_out, r_max)
            Ap[:, :r], Bp[:, :, :r] = expert_views(A.contiguous(), B.contiguous(), E)
            staged[name] = (Ap, Bp, scale, r)
        for name, pools in self.slots.items():
            if name not in staged:
                self._clear(pools, rows)
                continue
            Ap, Bp, scale, r = staged[name]
            pools.A_pool[rows] = Ap
            pools.B_pool[rows] = Bp
            pools.scales[rows] = scale
            pools.ranks[rows] = r

    def clear_slot(self, slot: int) -> None:
        """Empties ``slot``: its tokens get the base experts' output."""
        rows = self._slot_rows("clear_slot", slot)
        for pools in self.slots.values():
            self._clear(pools, rows)

    @staticmethod
    @torch.no_grad()
    def _clear(pools: _ExpertSlots, rows: slice) -> None:
        pools.ranks[rows] = 0
        pools.scales[rows] = 0.0
        pools.A_pool[rows] = 0
        pools.B_pool[rows] = 0

    # ---------------------------------------------------------------- forward
    def _token_slots(self, T: int, lead: Optional[torch.Size]) -> torch.Tensor:
        """[T] slot of each of the T = B * L tokens the MoE block passes (per-row indices: row t // L);
        ``lead``: the block's input's leading dims [B, L] (block_rows), checked as any layer's input."""
        ctx = self.context
        if not ctx.per_row:
            return ctx.tokens(torch.Size([T]))
        if lead is not None:  # traced: rows other than the names' give out-of-range indices, as in any layer
            return ctx.tokens(lead)
        if not torch.compiler.is_compiling():
            if T % ctx.count:
                raise ValueError(f"MultiLoRAExperts: the experts got {T} tokens, not a multiple of the {ctx.count} "
                                 "batch rows whose indices are set (AdapterPool.batch(names): one name per batch row)")
            return ctx.indices[:ctx.count].repeat_interleave(T // ctx.count)
        rows = ctx.count_t.clamp(min=1)  # no Python int: no guard on the batch size
        idx = ctx.indices[(torch.arange(T, device=rows.device) * rows // T).clamp(max=ctx.max_tokens - 1)]
        return idx.masked_fill(T % rows != 0, _OUT_OF_RANGE)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        T, lead = math.prod(hidden_states.shape[:-1]), block_lead(self, hidden_states)
        if self.context is None:
            raise RuntimeError("MultiLoRAExperts: no LoRAContext attached (pass context= or call "
                               "lora_ext.multi.attach_context(model, ctx))")
        if (problem := _hook_problem(self.base)) is not None:
            raise RuntimeError(f"MultiLoRAExperts({type(self.base).__name__}): {problem}")
        pools = {n: (p.A_pool, p.B_pool, p.scales, p.ranks) for n, p in self.slots.items()}
        add_lora = lora_adder(pools, self._token_slots(T, lead), self.num_experts, self.context.bad_index_count)
        return _moe().routed_forward(self.base, hidden_states, top_k_index, top_k_weights, add_lora)


def lora_adder(pools: Mapping[str, tuple], slot: torch.Tensor, num_experts: int,
               bad_index_count: Optional[torch.Tensor] = None):
    """routed_forward's add_lora for per-token adapters: pools[name] = (A_pool [S * E, r_max, in],
    B_pool [S * E, out, r_max], scales, ranks); slot [T] each token's slot (-1: none; outside
    -1 .. S-1: an out-of-range index, which the op reports). The rows' index s * E + e is computed once
    and serves both projections (their rows, expert ids and tokens are the same). Inference only."""
    index, num_slots = [], next(iter(pools.values()))[0].shape[0] // num_experts if pools else 0

    def add_lora(name, y, x, ids, offs, tokens):
        if y.requires_grad:
            raise RuntimeError("MultiLoRAExperts is an inference layer; run it under torch.no_grad() or "
                               "torch.inference_mode()")
        if name not in pools:
            return y
        if not index:
            s = slot[tokens].long()
            bad = (s < -1) | (s >= num_slots)
            index.append(torch.where(bad, num_slots * num_experts, torch.where(s < 0, -1, s * num_experts + ids)))
        return multi_lora_(y, x, *pools[name][:2], index[0], *pools[name][2:], bad_index_count=bad_index_count)

    return add_lora


def watch_block(block: nn.Module, holder: nn.Module) -> None:
    """A forward pre-hook on ``block`` (the MoE block calling an experts module) that keeps its input's
    leading dims on ``holder`` for block_rows: transformers' blocks flatten hidden states [B, L, H] to the
    [B * L, H] tokens the experts get, so only the block sees the B rows a per-row batch must match."""
    block.register_forward_pre_hook(functools.partial(_record_rows, holder), with_kwargs=True)


def _record_rows(holder: nn.Module, block: nn.Module, args, kwargs) -> None:
    # a dict, not an attribute: Dynamo traces its updates as side effects (no guard, no graph break)
    x = args[0] if args else kwargs.get("hidden_states")
    holder.__dict__.setdefault(ROWS, {})["lead"] = (x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() >= 3
                                                    else None)


def block_lead(holder: Optional[nn.Module], hidden_states: torch.Tensor) -> Optional[torch.Size]:
    """The leading dims whose rows the names must match: the watched block's input's (block_rows), or
    hidden_states' own when they have rows (3-D+); None for bare [T, H] tokens."""
    found = None if holder is None else block_rows(holder, math.prod(hidden_states.shape[:-1]))
    return found or (hidden_states.shape[:-1] if hidden_states.dim() >= 3 else None)


def block_rows(holder: nn.Module, T: int) -> Optional[torch.Size]:
    """The leading dims [B, L, ...] of the watched block's last input if they hold the T tokens the
    experts got (None otherwise, or when the experts are called directly); consumed."""
    box = holder.__dict__.get(ROWS)
    lead = None if box is None else box.pop("lead", None)
    return lead if lead is not None and math.prod(lead) == T else None


def _hook_problem(base: nn.Module) -> str | None:
    if hooked(base):  # routed_forward runs the experts from their parameters, never calling the module
        return ("it has hooks or a forward replaced on the instance (e.g. accelerate's offloading), which serving "
                "its experts would skip; register them on the MultiLoRAExperts wrapper instead")
    return None


def wrap_experts(model: nn.Module, target_parameters, num_slots: int, r_max: int,
                 context: LoRAContext) -> dict[str, MultiLoRAExperts]:
    """{module name: MultiLoRAExperts} for the modules of ``model`` one of whose own parameters
    ``target_parameters`` selects (PEFT's rule: the full name "<module>.<param>" is a target or ends
    with "." + one), not yet put into the model. ValueError naming the module when it cannot be
    served (lora_ext.moe.fast_path_problem's reason), when nothing is selected, or when the model
    holds PEFT's ParamWrapper layers (its forward would fail on the wrapped experts, and their LoRA
    would apply to every row)."""
    where = "AdapterPool: target_parameters"
    if isinstance(target_parameters, str) or not all(isinstance(t, str) for t in target_parameters):
        raise TypeError(f"{where} must be a list of parameter names (as PEFT's), got {target_parameters!r:.80}")
    targets = list(target_parameters)
    peft = sorted(outer_wrappers(model))
    if peft:
        raise ValueError(f"AdapterPool: {type(model).__name__} has PEFT LoRA on parameters (ParamWrapper {peft[0]!r}"
                         f"{', ...' if len(peft) > 1 else ''}), which would apply to every row of a mixed batch: build "
                         "the pool on the base model (e.g. PeftModel.unload() or merge_and_unload()), or serve PEFT's "
                         "adapters with lora_ext.patch_peft(model) and adapter_names")
    out = {}
    for name, m in model.named_modules():
        selected = [p for p, _ in m.named_parameters(recurse=False) if _selects(f"{name}.{p}", targets)]
        if selected:
            try:
                out[name] = MultiLoRAExperts(m, selected, num_slots, r_max, context)
            except ValueError as e:
                raise ValueError(f"{where}={targets} selects {name}.{selected[0]}, which multi-adapter serving cannot "
                                 f"serve: {e}") from e
    if not out:
        raise ValueError(f"{where}={targets} selects no parameter of {type(model).__name__} (full names "
                         "'<module>.<parameter>', e.g. 'mlp.experts.gate_up_proj')")
    return out


def read_adapter(source: str, allow_pickle: bool, experts: Mapping[str, MultiLoRAExperts]) -> Adapter:
    """Adapter.load(source) for an AdapterPool; a file that needs the model to tell which parameter
    each of a module's nested factors holds (rank_pattern / alpha_pattern giving its projections
    different r / alpha: param_files.NeedsModel) is read against the pool's experts modules."""
    try:
        return Adapter.load(source, allow_pickle=allow_pickle)
    except NeedsModel:
        if not experts:
            raise
    view = nn.Module()  # the served experts modules at their names in the model, nothing else
    for name, layer in experts.items():
        parent, (*path, leaf) = view, name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, layer.base)
    return Adapter.load(source, allow_pickle=allow_pickle, model=view)


def expert_factors(where: str, ad, experts: Mapping[str, MultiLoRAExperts], r_max: int) -> dict[str, dict]:
    """{module: {projection: (A [E * r, in], B [out, E * r], scale)}} of an Adapter's "parameter" layers
    (PEFT's nested wrapper paths) for ``experts`` (wrap_experts'); ValueError naming the file
    (``where``) and the module when one does not fit: a module or parameter the pool does not serve,
    factors of another shape, a rank above ``r_max``."""
    given = {path: w.parameter for path, w in ad.layers.items() if w.kind == "parameter"}
    for path in given:
        module = split_path(path)[0]
        if module not in experts:
            served = f"experts {sorted(experts)[:3]}" if experts else "no experts (AdapterPool(..., target_parameters=[...]))"
            raise ValueError(f"{where}: module {path!r} holds LoRA on a parameter (target_parameters) of {module!r}, "
                             f"which this pool does not serve (it serves {served})")
    found = resolve(None, given, ad.config.get("target_parameters") or [], where,
                    modules={name: layer.base for name, layer in experts.items()}) if given else {}
    out: dict[str, dict] = {}
    for path, (module, pname, _, inner) in found.items():
        w = ad.layers[path]
        check_fit(f"{where}: module {path!r}", module, inner, pname, w.A, w.B, w.num_experts)
        if pname not in experts[module].slots:
            raise ValueError(f"{where}: module {path!r} holds LoRA on {module}.{pname}, which the pool's "
                             f"target_parameters do not select (served: {list(experts[module].slots)})")
        if not 1 <= w.r <= r_max:
            raise ValueError(f"{where}: module {path!r} ({module}.{pname}) has rank {w.r}; the pool takes 1 .. "
                             f"max_rank {r_max}")
        out.setdefault(module, {})[pname] = (w.A, w.B, w.scale)
    return out
