"""LoRA on a module's parameter: MoE expert stacks and other weights no nn.Linear holds.

PEFT's ``LoraConfig(target_parameters=[...])`` (its ParamWrapper), e.g. a transformers MoE's
``mlp.experts.gate_up_proj`` [E, out, in] / ``down_proj``, or [E, in, out] when the experts module
sets ``is_transposed``, or any 2-D parameter [out, in]. Expert e gets its own rank-r update:

    P[e] + s * B_e @ A_e      A_e [r, in], B_e [out, r]   (transposed for an [E, in, out] stack)

The factors are stored as PEFT stores them, so files and state dicts carry over unchanged:
``lora_A`` [E * r, in] (expert-major rows: A_e = lora_A[e * r:(e + 1) * r]) and ``lora_B``
[out, E * r] (column j * E + e is B_e's column j). Several parameters of one module nest, as in
PEFT: the first registered is wrapped first, so ``experts.base_layer.lora_A`` is gate_up_proj's
and ``experts.lora_A`` down_proj's.

Forward: a transformers experts module (transformers.integrations.moe) runs lora_ext.moe's path,
which adds each expert's LoRA term to its rows and never builds an [E, out, in] tensor or a
gradient of that size. Any other module runs its own forward with the effective weights
(torch.func.functional_call), as PEFT does. Merge / unmerge use lora_ext's merge kernels per
expert, exact (bit for bit back to W0) by default. No dropout, DoRA or fan_in_fan_out (PEFT
refuses them here too).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .hparams import _check_hparams, lora_alpha_for, lora_scaling
from .ops import MergeState, check_merge_finite, merge_, unmerge_
from .ops._checks import as_scale
from .sharding import is_dtensor, is_fsdp
from .layers import LoRALayer, set_factor
from .merged_sd import MergedStateDict
from .targets import hooked, pattern_value, read_directly

__all__ = ["LoRAParameter", "inject_parameters", "parameter_layers", "outermost", "generic_path", "target_hparams",
           "check_init", "expert_views"]

_GENERIC = [False]  # generic_path() sets it: every LoRAParameter forward takes the generic path


@contextlib.contextmanager
def generic_path():
    """Within the block every LoRAParameter runs the generic path (the module's own forward with
    P + s B A), also where lora_ext.moe's fast path applies: to compare the two, or to rule the
    fast path out while debugging."""
    before = _GENERIC[0]
    _GENERIC[0] = True
    try:
        yield
    finally:
        _GENERIC[0] = before


def _moe():  # lora_ext.moe imports transformers lazily; this module stays importable without it
    from . import moe
    return moe


class LoRAParameter(MergedStateDict, nn.Module):
    """LoRA on ``base_layer.<parameter_name>`` (2-D [out, in] or a 3-D expert stack); see the module doc.

    Attributes as PEFT's: ``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``num_experts``,
    ``in_features``, ``out_features``, ``merged``. ``transposed``: the stack is [E, in, out].
    Attributes the wrapper lacks are read from the wrapped module (``experts.num_experts``).
    """

    lora_kind = "parameter"

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int = 8, alpha: float = 8,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        where = f"LoRAParameter({parameter_name!r})"
        _check_hparams(where, r, alpha, 0.0)
        inner = _inner(base_layer)
        if (why := wrap_problem(base_layer, parameter_name)) is not None:
            raise why[0](f"{where}: {why[1]}")
        p = getattr(inner, parameter_name)
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.transposed = p.dim() == 3 and bool(getattr(inner, "is_transposed", False))
        self.num_experts = p.shape[0] if p.dim() == 3 else 1
        out_dim, in_dim = (p.shape[-1], p.shape[-2]) if self.transposed else (p.shape[-2], p.shape[-1])
        self.in_features, self.out_features = int(in_dim), int(out_dim)
        self.r, self.lora_alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scaling = lora_scaling(alpha, r, use_rslora)
        E = self.num_experts
        self.lora_A = nn.Parameter(torch.empty(E * r, self.in_features, device=p.device, dtype=p.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, E * r, device=p.device, dtype=p.dtype))
        p.requires_grad_(False)
        self.merged = False
        self._merge_states: list[MergeState] | None = None
        self._merged_factors = None
        self.reset_lora_parameters(init)
        self._ready = True  # from now on, attributes the wrapper lacks are the wrapped module's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not self.__dict__.get("_ready") or name.startswith("lora_"):
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, in_features="
                f"{self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}"
                + (", transposed=True" if self.transposed else ""))

    # ---------------------------------------------------------------- factors
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A: Kaiming-uniform (a=sqrt(5)) over the whole [E * r, in] as PEFT, or Gaussian (std 1/r); B: zeros."""
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRAParameter: init must be 'kaiming' or 'gaussian', got {init!r}")
        with self._unmerged(f"LoRAParameter({self.parameter_name!r}).reset_lora_parameters"), torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [E, r, in], B [E, out, r], s): per-expert views of lora_A / lora_B (differentiable)."""
        return (*expert_views(self.lora_A, self.lora_B, self.num_experts), float(self.scaling))

    def set_lora_factors(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Sets lora_A [E * r, in] and lora_B [out, E * r] (PEFT's layout; another r resizes them in
        place: layers.set_factor) and the scaling; ``lora_alpha`` follows (scale * r, or * sqrt(r) with rsLoRA).
        ``scale``: a real number finite in float32, as the LoRA ops take it (ops._checks.as_scale), else
        TypeError / ValueError naming it, before anything changes."""
        where = f"LoRAParameter({self.parameter_name!r}).set_lora_factors"
        E = self.num_experts
        if (A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0 or A.shape[0] % E
                or A.shape[1] != self.in_features or B.shape[0] != self.out_features):
            raise ValueError(f"{where}: expected A [{E} * r, {self.in_features}] and B [{self.out_features}, "
                             f"{E} * r] with r > 0, got A {tuple(A.shape)}, B {tuple(B.shape)}")
        scale = as_scale(where, "scale", scale)
        with self._unmerged(where):
            old_A, old_B = self.lora_A, self.lora_B
            set_factor(old_A, A.to(old_A.device, old_A.dtype))
            set_factor(old_B, B.to(old_A.device, old_A.dtype))
            self.r = A.shape[0] // E
            self.scaling = scale
            self.lora_alpha = lora_alpha_for(scale, self.r, self.use_rslora)

    # set_lora_factors / reset_lora_parameters on a merged wrapper: unmerge, change, merge again
    # (exactly if it was), as on a LoRALayer; merged for good: ValueError
    _unmerged = LoRALayer._unmerged

    def _merged_exactly(self) -> bool:
        return self._merge_states is not None

    # ---------------------------------------------------------------- forward
    def target(self) -> nn.Module:
        """The module whose forward runs (the innermost base_layer)."""
        return _inner(self)

    def effective_weight(self) -> torch.Tensor:
        """P + s * delta in P's shape and dtype (one fused batched GEMM, fp32 accumulation inside);
        differentiable w.r.t. the factors."""
        P = getattr(self.target(), self.parameter_name)
        A, B, s = self.expert_factors()
        A, B = A.to(P.dtype), B.to(P.dtype)
        if self.num_experts == 1 and P.dim() == 2:
            return torch.addmm(P, B[0], A[0], alpha=s)
        if self.transposed:  # [E, in, out] += s * A_e^T B_e^T
            return torch.baddbmm(P, A.transpose(1, 2), B.transpose(1, 2), alpha=s)
        return torch.baddbmm(P, B, A, alpha=s)

    def forward(self, *args, **kwargs):
        chain = _chain(self)
        base = chain[-1].base_layer
        active = [w for w in chain if not w.merged]
        if not active:
            return base(*args, **kwargs)
        names = [w.parameter_name for w in active]
        # (hooks or a forward replaced on the module, e.g. accelerate's: only the generic path calls it)
        moe = None if _GENERIC[0] or hooked(base) else _moe()
        if moe is not None and len(args) + len(kwargs) == 3 and moe.fast_path_problem(base, names) is None:
            return moe.experts_forward(base, *args, **kwargs,
                                       loras={w.parameter_name: w.expert_factors() for w in active})
        weights = {w.parameter_name: w.effective_weight() for w in active}
        return torch.func.functional_call(base, weights, args, kwargs, strict=False)

    # ---------------------------------------------------------------- merging
    def _expert_views(self, P: torch.Tensor) -> list[torch.Tensor]:
        return [P] if P.dim() == 2 else list(P.unbind(0))

    def _merge_args(self):
        A, B, s = self.expert_factors()
        return [a.detach().contiguous() for a in A], [b.detach().contiguous() for b in B], s

    def check_merge(self) -> None:
        """ValueError if the merged parameter would hold inf/NaN (changes nothing)."""
        P = getattr(self.target(), self.parameter_name).detach()
        As, Bs, s = self._merge_args()
        for e, W in enumerate(self._expert_views(P)):
            try:
                check_merge_finite(W, [As[e]], [Bs[e]], [s], fan_in_fan_out=self.transposed)
            except ValueError as err:
                raise ValueError(f"LoRAParameter({self.parameter_name!r}).merge: expert {e}: {err}") from None

    @torch.no_grad()
    def merge(self, safe: bool = False, exact: bool = True) -> None:
        """P[e] <- round(P[e] + s B_e A_e) for every expert (no-op if merged); ``exact`` keeps a
        MergeState per expert so unmerge gives P back bit for bit; ``safe`` checks first (check_merge)."""
        if self.merged:
            return
        self._check_unsharded("merge")
        if safe:
            self.check_merge()
        P = getattr(self.target(), self.parameter_name).data
        As, Bs, s = self._merge_args()
        states = [MergeState() if exact else None for _ in As]
        for e, W in enumerate(self._expert_views(P)):
            merge_(W, As[e], Bs[e], s, fan_in_fan_out=self.transposed, state=states[e])
        self._merge_states = states if exact else None
        # (copies: As / Bs may be views of lora_A / lora_B, which can be written while merged)
        self._merged_factors = None if exact else ([a.clone() for a in As], [b.clone() for b in Bs], s)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the adapter out of the parameter (bit for bit after an exact merge)."""
        if not self.merged:
            raise ValueError(f"unmerge: LoRAParameter({self.parameter_name!r}) is not merged")
        if self._merged_for_good():
            raise ValueError(f"unmerge: LoRAParameter({self.parameter_name!r}) is merged for good (drop_merge_state)")
        self._check_unsharded("unmerge")
        P = getattr(self.target(), self.parameter_name).data
        for e, W in enumerate(self._expert_views(P)):
            if self._merge_states is not None:
                unmerge_(W, fan_in_fan_out=self.transposed, state=self._merge_states[e])
            else:
                As, Bs, s = self._merged_factors
                unmerge_(W, As[e], Bs[e], s, fan_in_fan_out=self.transposed)
        self._merge_states = self._merged_factors = None
        self.merged = False

    def _check_unsharded(self, what: str) -> None:
        # an FSDP module's unsharded parameter is a temporary buffer; a DTensor shard is not the weight
        if is_dtensor(getattr(self.target(), self.parameter_name)) or is_fsdp(self) or is_fsdp(self.target()):
            raise ValueError(f"{what}: LoRAParameter({self.parameter_name!r}) is sharded (fully_shard / tensor "
                             f"parallel); {what} before tensor-parallel sharding (fully_shard takes "
                             "unmerged layers), or in a single-process copy of the model")

    def merge_refusal(self) -> str | None:  # merge.py asks every layer; a parameter always merges
        return None

    def _merged_for_good(self) -> bool:
        return self.merged and self._merge_states is None and self._merged_factors is None

    def check_unmerge(self) -> None:
        """ValueError if unmerge cannot give the original back (merged for good, or the parameter
        was written since an exact merge)."""
        if self._merged_for_good():
            raise ValueError("merged for good (drop_merge_state), so it cannot be unmerged")
        if self._merge_states is not None:
            P = getattr(self.target(), self.parameter_name).detach()
            for e, (W, st) in enumerate(zip(self._expert_views(P), self._merge_states)):
                try:
                    st.check(W)
                except ValueError as err:
                    raise ValueError(f"{self.parameter_name}[{e}]: {err}" if P.dim() == 3 else str(err)) from None

    def merge_overhead(self) -> float | None:
        """Exact-unmerge side information as a fraction of the parameter's bytes (None: none kept)."""
        if not self.merged or self._merge_states is None:
            return None
        return sum(st.overhead() for st in self._merge_states) / len(self._merge_states)

    def drop_merge_state(self) -> None:
        """Forgets how to unmerge (the parameter then stays merged for good)."""
        self._merge_states = self._merged_factors = None

    def train(self, mode: bool = True):
        """As nn.Module.train; train(True) unmerges a merged wrapper first (its forward skips LoRA);
        one merged for good (drop_merge_state) with factors that require grad raises ValueError, as
        LoRALayer.train."""
        if mode and self.merged:
            if not self._merged_for_good():
                self.unmerge()
            elif self.lora_A.requires_grad or self.lora_B.requires_grad:
                raise ValueError(f"train: LoRAParameter({self.parameter_name!r}) is merged for good "
                                 "(drop_merge_state), so its forward skips LoRA and its factors would not train; "
                                 "freeze them (requires_grad_(False)) or use merge_and_unload")
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        """As nn.Module._apply (.half(), .to(dtype), .cuda(), ...); an exact merge is redone in the
        new dtype (MergeState.convert), so unmerge still gives the converted original bit for bit."""
        states = self._merge_states if self.merged else None
        old = getattr(self.target(), self.parameter_name).detach()
        super()._apply(fn, recurse)
        new = getattr(self.target(), self.parameter_name).data
        if (states is not None and new.dtype != old.dtype and old.dtype == states[0]._dtype
                and new.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            for st, o, n in zip(states, self._expert_views(old), self._expert_views(new)):
                st.convert(o, n, fn)
        return self

    def _merged_weight_key(self, prefix: str) -> str:  # (merged_sd) the wrapped parameter, saved by base_layer
        return prefix + "base_layer." * len(_chain(self)) + self.parameter_name

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """As LoRALayer's: a merged wrapper takes new factors unmerged, loaded and merged again
        (exactly if it was), so the parameter holds the loaded adapter; a state dict with the merged
        parameter itself (merged or not?), or factors for a wrapper merged for good, is an error
        (load_state_dict raises RuntimeError)."""
        param = self._merged_weight_key(prefix)
        if not self.merged or not any(k in state_dict for k in (prefix + "lora_A", prefix + "lora_B", param)):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        where = f"LoRAParameter {prefix[:-1] or self.parameter_name!r} is merged"
        if param in state_dict:
            error_msgs.append(f"{where}, so a state dict with its parameter {param!r} is ambiguous (an unmerged "
                              "model's or a merged one's?); unmerge before loading an unmerged model's state dict")
        elif self._merged_for_good():
            error_msgs.append(f"{where} for good (drop_merge_state), so it cannot take new factors")
        else:
            exact = self._merge_states is not None
            self.unmerge()
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            self.merge(exact=exact)

    def unwrapped(self) -> nn.Module:
        """The wrapped module itself (for merge_and_unload: merge first)."""
        return _inner(self)


def expert_views(A: torch.Tensor, B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, r, in], B [E, out, r]): per-expert views of PEFT's lora_A [E * r, in] (expert-major rows)
    and lora_B [out, E * r] (column j * E + e is expert e's column j)."""
    r = A.shape[0] // E
    return A.view(E, r, A.shape[1]), B.view(B.shape[0], r, E).permute(2, 0, 1)


def wrap_problem(module: nn.Module, parameter_name: str) -> tuple[type, str] | None:
    """(exception type, reason) when ``parameter_name`` of ``module`` (or of the module a
    LoRAParameter chain wraps) cannot take a LoRAParameter; None when it can."""
    inner = _inner(module)
    p = dict(inner.named_parameters(recurse=False)).get(parameter_name)
    if p is None:
        how = " (it is parametrized: weight_norm, ...; remove that first)" if parameter_name in (
            getattr(inner, "parametrizations", None) or ()) else ""
        return TypeError, f"{type(inner).__name__} has no parameter {parameter_name!r} of its own{how}"
    if parameter_name.startswith("lora_") or hasattr(inner, "lora_A"):
        return TypeError, (f"{parameter_name!r} belongs to a LoRA layer ({type(inner).__name__}; is its "
                           "module targeted by target_modules too?)")
    if any(w.parameter_name == parameter_name for w in _chain(module)):
        return ValueError, "the parameter has a LoRAParameter already"
    if p.dim() not in (2, 3) or 0 in p.shape:
        return ValueError, f"the parameter must be 2-D [out, in] or a 3-D expert stack, got shape {list(p.shape)}"
    if not p.dtype.is_floating_point:
        return TypeError, f"the parameter is {p.dtype}, not floating point"
    return None


def _inner(module: nn.Module) -> nn.Module:
    while isinstance(module, LoRAParameter):
        module = module.base_layer
    return module


def _chain(outer: nn.Module) -> list[LoRAParameter]:
    chain, m = [], outer
    while isinstance(m, LoRAParameter):
        chain.append(m)
        m = m.base_layer
    return chain


def outermost(model: nn.Module) -> dict[str, LoRAParameter]:
    """Module name -> outermost LoRAParameter of each wrapped module."""
    found = parameter_layers(model)
    return {n: m for n, m in found.items()
            if not (n.rpartition(".")[2] == "base_layer" and n.rpartition(".")[0] in found)}


def parameter_layers(model: nn.Module) -> dict[str, LoRAParameter]:
    """Name -> every LoRAParameter of ``model`` (nested ones as ``<module>.base_layer``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAParameter)}


def _unwrapped_name(name: str, modules: dict[str, nn.Module]) -> str:
    """A module's name with the wrappers' ``base_layer`` steps left out (PEFT's parameter keys)."""
    while name.rpartition(".")[2] == "base_layer" and isinstance(modules.get(name.rpartition(".")[0]), LoRAParameter):
        name = name.rpartition(".")[0]
    return "" if name == "base_layer" and isinstance(modules.get(""), LoRAParameter) else name


def check_init(init) -> None:
    """inject's ``init``: ValueError unless "kaiming" or "gaussian" (checked before the model changes)."""
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"inject: init must be 'kaiming' or 'gaussian', got {init!r}")


def target_hparams(where: str, name: str, r, alpha, rank_pattern: dict | None = None,
                   alpha_pattern: dict | None = None, dropout=0.0) -> tuple[int, float]:
    """The r / alpha of the target ``name`` (its rank_pattern / alpha_pattern value, else ``r`` /
    ``alpha``), checked as every LoRA layer checks them (hparams._check_hparams, with ``dropout``):
    ValueError starting with ``where``. inject runs it on every target before the model changes."""
    rr, aa = pattern_value(name, rank_pattern, r), pattern_value(name, alpha_pattern, alpha)
    _check_hparams(where, rr, aa, dropout)
    return rr, aa


def plan_parameters(model: nn.Module, target_parameters, r: int = 8, alpha: float = 8,
                    rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                    skip_modules=()) -> list[tuple[str, str, str, int, float]]:
    """What inject_parameters would wrap, checked, changing nothing: (module name, parameter name,
    full name, r, alpha) per parameter, in nesting order, each r / alpha checked (target_hparams).
    ``skip_modules``: names that target_modules replaces by LoRA layers in the same inject call (a
    parameter there is refused)."""
    where = "inject"
    if isinstance(target_parameters, str) or not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(f"{where}: target_parameters must be a list of parameter names (suffixes), "
                         f"got {target_parameters!r}")
    targets = sorted(set(target_parameters))  # PEFT sorts them: the nesting does not depend on their order
    modules = dict(model.named_modules())
    chosen = []
    for name, module in modules.items():
        if isinstance(module, LoRAParameter):
            continue
        clean = _unwrapped_name(name, modules)
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{clean}.{pname}" if clean else pname
            if any(key == t or key.endswith("." + t) for t in targets):
                chosen.append((clean, pname, key))
    if not chosen:
        raise ValueError(f"{where}: target_parameters={targets!r} matched no parameter of {type(model).__name__}")
    bypassed = read_directly(model)
    for clean, pname, key in chosen:
        if clean in bypassed:
            raise TypeError(f"{where}: target_parameters: {key!r} belongs to the out_proj of an nn.MultiheadAttention, "
                            "which reads that weight directly (F.multi_head_attention_forward): a LoRAParameter there "
                            "would never run")
        if not clean:
            raise ValueError(f"{where}: target_parameters: {key!r} is a parameter of the model itself; "
                             "only parameters of submodules can be wrapped")
        if clean in skip_modules:
            raise TypeError(f"{where}: target_parameters: {key!r} belongs to a module that target_modules "
                            "makes a LoRA layer; target one or the other")
        if (why := wrap_problem(model.get_submodule(clean), pname)) is not None:
            raise why[0](f"{where}: target_parameters: {key!r}: {why[1]}")
    return [(clean, pname, key, *target_hparams(f"{where}: target_parameters: {key!r}", key, r, alpha,
                                                rank_pattern, alpha_pattern))
            for clean, pname, key in chosen]


def apply_plan(model: nn.Module, plan, use_rslora: bool = False, init: str = "kaiming") -> list[str]:
    """Wraps what plan_parameters chose; returns the parameters' full names."""
    for clean, pname, _, r, alpha in plan:
        new = LoRAParameter(model.get_submodule(clean), pname, r, alpha, use_rslora, init)
        parent, _, child = clean.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return [key for _, _, key, _, _ in plan]


def inject_parameters(model: nn.Module, target_parameters, r: int = 8, alpha: float = 8,
                      use_rslora: bool = False, rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None, init: str = "kaiming") -> list[str]:
    """PEFT's ``target_parameters``: a LoRAParameter on every parameter whose name (``base_layer``
    steps left out) is a target or ends with "." + a target, e.g. "mlp.experts.gate_up_proj";
    rank_pattern / alpha_pattern keys match the parameter's full name, as in PEFT. Parameters of
    one module nest in registration order. Everything is checked before the model changes.
    Returns the parameter names."""
    _check_hparams("inject", r, alpha, 0.0)
    check_init(init)
    return apply_plan(model, plan_parameters(model, target_parameters, r, alpha, rank_pattern, alpha_pattern),
                      use_rslora, init)
