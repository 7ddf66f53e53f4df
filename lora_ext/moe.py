"""LoRA on the stacked expert parameters of transformers' experts modules, without W_eff.

PEFT's ``LoraConfig(target_parameters=[...])`` puts a low-rank delta on a 3-D expert parameter
P (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``, ...) by materialising
``W_eff = P + s * delta`` for the whole stack on every forward: a full [E, out, in] copy and,
in training, a full [E, out, in] weight gradient. For experts modules decorated with
transformers' ``use_experts_implementation`` this module computes the same function from the
routed rows only. Per expert e, the linear computed with P[e] is ``y = x @ P[e].T``
(``x @ P[e]`` when the module is ``is_transposed``, P then [E, in, out]) and the LoRA adds
``s * (x @ A[e].T) @ B[e].T`` with A [E, r, in], B [E, out, r].

``experts_forward`` follows transformers' grouped_mm backend:

1. route: sort the S = T*k (token, slot) pairs by expert id; x_g [S, H] are the tokens' rows in
   that order; offs [E] int32 are the group ends (``searchsorted``: fixed size, no host sync);
2. each projection: ``y = x_g @ P[e]`` per group (+ bias rows), then the LoRA per group:
   - nothing needs grad: lora_ext's ``multi_lora_`` kernel adds it in place, with the row's
     expert id as adapter index (A, B are the pools, scales all s, ranks all r);
   - otherwise two grouped matmuls through the rank, ``u = x_g @ A[e].T`` [S, r] and
     ``y += s * u @ B[e].T``, differentiable in x, A and B (and in P only if P requires grad);
3. between them the module's own ``_apply_gate`` (``act_fn`` when ``has_gate`` is False); after
   them ``post_expert_norm`` when present and the routing weights;
4. un-sort and sum over k (transformers' deterministic reshape + sum), cast to
   hidden_states' dtype.

No [E, out, in] tensor is built, and backward keeps O(S * (in + r + out)) besides references
to the parameters themselves. Grouped matmuls run on ``torch.nn.functional.grouped_mm`` /
``torch._grouped_mm`` where transformers' ``_can_use_grouped_mm`` allows it and the operands
meet its layout rule (fp32/fp16/bf16; one unit stride, the other a multiple of 16 bytes),
else on transformers' ``grouped_mm_fallback`` op (one matmul per expert), so the base
projections cost what transformers' grouped_mm backend costs. ``config._experts_implementation``
is not consulted: every backend computes this same function.

A and B are used in P's dtype (cast if they differ, as PEFT's ParamWrapper casts its factors).

Supported (``fast_path_problem`` returns None): every value of the decorator's flags, each tested
against the module's own forward on W_eff (tests/test_moe_fast.py): gated ``gate_up_proj`` or
ungated ``up_proj`` (Nemotron-H), ``is_transposed`` with biases and an interleaved
(``is_concatenated=False``) custom ``_apply_gate`` (gpt-oss), ``has_post_expert_norm``
(MuseSpark), and the plain layout (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3). Refused with a
reason: modules without the decorator or with their own forward, expert parallel (sentinel ids),
parametrized parameters, any other parameter or buffer (quantization scales, ...), tensor
subclasses (DTensor, ...), non-float parameters, LoRA on other parameter names.
"""
from __future__ import annotations

import numbers
from typing import Callable, Collection, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.integrations import moe as hf_moe

from .ops import multi_lora_

__all__ = ["fast_path_problem", "experts_forward", "routed_forward"]

LoRASpec = Tuple[torch.Tensor, torch.Tensor, float]  # (A [E, r, in], B [E, out, r], s)

# Attributes use_experts_implementation sets on every instance (has_post_expert_norm and
# _is_expert_parallel are newer than transformers 5.17, whose grouped_mm backend has neither and
# drops ids >= E as later ones do: read with defaults)
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # also multi_lora_'s
_WEIGHT_DTYPES = _GROUPED_MM_DTYPES + (torch.float64,)


def _post_norm(experts: nn.Module) -> bool:
    return getattr(experts, "has_post_expert_norm", False)


def _projection_names(experts: nn.Module) -> Tuple[str, str]:
    """(first, second): ``gate_up_proj`` (``up_proj`` without gate), then ``down_proj``."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def _in_out(experts: nn.Module, name: str) -> Tuple[int, int]:
    """(in_features, out_features) of projection ``name``."""
    _, a, b = getattr(experts, name).shape
    return (a, b) if experts.is_transposed else (b, a)


def fast_path_problem(experts: nn.Module, param_names: Collection[str]) -> Optional[str]:
    """None when ``experts_forward`` can run ``experts`` with LoRA on exactly ``param_names``
    (names of its 3-D parameters, e.g. ``{"gate_up_proj", "down_proj"}``); else a short reason.

    Accepted: a module whose class went through transformers' ``use_experts_implementation``
    (its ``forward`` is that dispatcher), not expert parallel, no parametrizations, whose
    parameters and buffers are exactly the projections (+ their ``*_bias`` when ``has_bias``)
    and ``post_expert_norm``'s, plain tensors of a float dtype, shaped as the flags say.
    """
    if not isinstance(experts, nn.Module) or not all(hasattr(experts, f) for f in _FLAGS) \
            or not hasattr(experts, "num_experts"):
        return "not a transformers experts module (no use_experts_implementation attributes)"
    code = getattr(type(experts).forward, "__code__", None)
    if code is None or code.co_filename != hf_moe.__file__:
        return f"{type(experts).__name__}.forward is not use_experts_implementation's dispatcher"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallel (sentinel expert ids) is not supported"
    if parametrize.is_parametrized(experts):
        return "its parameters are parametrized (e.g. PEFT's W_eff parametrization is active)"
    first, second = _projection_names(experts)
    unknown = sorted(set(param_names) - {first, second})
    if unknown:
        return f"LoRA on {unknown} is not supported here (only {first} and {second})"
    default_gate = type(experts)._apply_gate is hf_moe._default_apply_gate
    if experts.has_gate and default_gate and not experts.is_concatenated:
        return "is_concatenated=False (interleaved gate/up) with the default _apply_gate"
    if (default_gate or not experts.has_gate) and not callable(getattr(experts, "act_fn", None)):
        return "no act_fn"
    if _post_norm(experts) and not isinstance(getattr(experts, "post_expert_norm", None),
                                                       nn.Module):
        return "has_post_expert_norm=True but no post_expert_norm module"
    expected = [first, second] + ([first + "_bias", second + "_bias"] if experts.has_bias else [])
    for name, _ in list(experts.named_parameters()) + list(experts.named_buffers()):
        if name not in expected and not name.startswith("post_expert_norm."):
            return f"unexpected parameter or buffer {name!r} (quantized or custom experts?)"
    E = experts.num_experts
    for name in expected:
        t = getattr(experts, name, None)
        if type(t) not in (nn.Parameter, torch.Tensor):
            return f"{name} is {type(t).__name__}, not a plain tensor (DTensor? quantized?)"
        if t.dtype not in _WEIGHT_DTYPES:
            return f"{name} has dtype {t.dtype} (float16/bfloat16/float32/float64 supported)"
        if t.dim() != (2 if name.endswith("_bias") else 3) or t.shape[0] != E:
            return f"{name} has shape {tuple(t.shape)}, not [{E}, ...] of the expected rank"
    h_in, _ = _in_out(experts, first)
    _, h_out = _in_out(experts, second)
    if h_in != h_out:
        return f"{second} outputs {h_out} features but {first} takes {h_in}"
    if experts.has_bias:
        for name in (first, second):
            if getattr(experts, name + "_bias").shape[1] != _in_out(experts, name)[1]:
                return f"{name}_bias does not match {name}'s output features"
    return None


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, loras: Mapping[str, LoRASpec]) -> torch.Tensor:
    """``experts(hidden_states, top_k_index, top_k_weights)`` with each ``loras[name] = (A, B, s)``
    added to parameter ``name``: the module's result with P replaced by its effective weight
    (P + s * B[e] @ A[e] per expert, transposed for ``is_transposed``), to rounding.

    hidden_states [..., H] (callers pass [T, H]; leading dims are flattened to T tokens),
    top_k_index [T, k] integer expert ids; a route to an id outside [0, E) (transformers' dropped
    slot E) adds nothing (not reported: that needs a host sync),
    top_k_weights [T, k]. A [E, r, in_features], B [E, out_features, r] of one float dtype, s a
    real number. Returns hidden_states' shape and dtype. ValueError when ``fast_path_problem``
    refuses the module or an argument does not fit.
    """
    problem = fast_path_problem(experts, loras.keys())
    if problem is not None:
        raise ValueError(f"experts_forward: experts: {problem}")
    checked = {name: _checked_lora(experts, name, spec) for name, spec in loras.items()}
    return routed_forward(experts, hidden_states, top_k_index, top_k_weights,
                          lambda name, y, x, ids, offs, tokens: _add_lora(y, x, ids, offs, checked.get(name)))


def routed_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, add_lora: Callable) -> torch.Tensor:
    """experts_forward's routing and projections, with the LoRA terms left to the caller: for each
    projection ``add_lora(name, y, x, ids, offs, tokens)`` returns y [S, out] (in place or not) plus
    the LoRA term of the rows x [S, in], which are sorted by expert (ids [S] the rows' expert ids,
    offs [E] the group ends, tokens [S] the token each row routes). The caller has checked the
    module (fast_path_problem); the arguments are checked here. lora_ext.multi_experts adds
    per-token adapters this way (index slot * E + expert)."""
    first, second = _projection_names(experts)
    H = _in_out(experts, first)[0]
    x = _checked_hidden(experts, hidden_states, H)
    T = x.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T \
            or top_k_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"experts_forward: top_k_index must be an int64/int32 [T={T}, k] "
                         f"tensor, got {top_k_index.dtype} {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape or not top_k_weights.dtype.is_floating_point:
        raise ValueError(f"experts_forward: top_k_weights must be a float tensor shaped like "
                         f"top_k_index {tuple(top_k_index.shape)}, got {top_k_weights.dtype} "
                         f"{tuple(top_k_weights.shape)}")
    k = top_k_index.shape[1]

    # Routes to an id outside [0, E) (transformers' dropped-slot id E, or garbage) are sorted to
    # the tail, past the last group: no grouped matmul reads them, their input rows are zeroed
    # (so is their gradient in backward) and so are their output rows: they add nothing, as a
    # dropped slot in transformers' backends.
    E = experts.num_experts
    flat = top_k_index.reshape(-1)
    ids, perm = torch.sort(torch.where((flat >= 0) & (flat < E), flat, E), stable=True)  # [S] ascending
    kept = (ids < E).unsqueeze(-1)  # [S, 1]
    ids = ids.clamp(max=E - 1)  # in-bounds gathers (biases, multi_lora_) for the tail rows
    experts_range = torch.arange(E, device=ids.device, dtype=ids.dtype)
    offs = torch.searchsorted(ids.masked_fill(~kept.squeeze(-1), E), experts_range, right=True,
                              out_int32=True)  # [E] group ends

    tokens = perm // k
    xs = x[tokens].masked_fill(~kept, 0)
    h = _project(experts, first, xs, ids, offs, tokens, add_lora)  # [S, I or 2I]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)  # [S, I] (tail rows: never read)
    out = _project(experts, second, h, ids, offs, tokens, add_lora)  # [S, H]
    if _post_norm(experts):
        out = experts.post_expert_norm(out)
    out = out.masked_fill(~kept, 0) * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy_(0, perm, out)  # [S, H] in (token, slot) order
    summed = unsorted.view(T, k, out.shape[-1]).sum(dim=1)  # [T, H]
    return summed.to(hidden_states.dtype).reshape(hidden_states.shape)


def _checked_hidden(experts: nn.Module, hidden_states: torch.Tensor, H: int) -> torch.Tensor:
    """hidden_states as [T, H], or ValueError."""
    weight = experts.down_proj
    if not isinstance(hidden_states, torch.Tensor) or not hidden_states.dtype.is_floating_point \
            or hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
        got = (f"{hidden_states.dtype} {tuple(hidden_states.shape)}"
               if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__)
        raise ValueError(f"experts_forward: hidden_states must be a float [..., {H}] tensor, "
                         f"got {got}")
    if hidden_states.device != weight.device:
        raise ValueError(f"experts_forward: hidden_states is on {hidden_states.device} but the "
                         f"experts' parameters are on {weight.device}")
    return hidden_states.reshape(-1, H)


def _checked_lora(experts: nn.Module, name: str, spec) -> LoRASpec:
    """loras[name] as (A [E, r, in], B [E, out, r], float s), or ValueError."""
    where = f"experts_forward: loras[{name!r}]"
    if not isinstance(spec, (tuple, list)) or len(spec) != 3:
        raise ValueError(f"{where} must be a tuple (A, B, s), got {type(spec).__name__}")
    A, B, s = spec
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise ValueError(f"{where}: A and B must be tensors, got {type(A).__name__} and "
                         f"{type(B).__name__}")
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise ValueError(f"{where}: s must be a real number, got {type(s).__name__}")
    E = experts.num_experts
    n_in, n_out = _in_out(experts, name)
    r = A.shape[1] if A.dim() == 3 else -1
    if A.dim() != 3 or r < 1 or tuple(A.shape) != (E, r, n_in):
        raise ValueError(f"{where}: A must be [E={E}, r, in={n_in}], got {tuple(A.shape)}")
    if tuple(B.shape) != (E, n_out, r):
        raise ValueError(f"{where}: B must be [E={E}, out={n_out}, r={r}], got {tuple(B.shape)}")
    if A.dtype != B.dtype or not A.dtype.is_floating_point:
        raise ValueError(f"{where}: A and B must share one float dtype, got {A.dtype} and "
                         f"{B.dtype}")
    weight = getattr(experts, name)
    if A.device != weight.device or B.device != weight.device:
        raise ValueError(f"{where}: A is on {A.device} and B on {B.device} but {name} is on "
                         f"{weight.device}")
    return A, B, float(s)


def _project(experts: nn.Module, name: str, x: torch.Tensor, ids: torch.Tensor,
             offs: torch.Tensor, tokens: torch.Tensor, add_lora: Callable) -> torch.Tensor:
    """y [S, out] = x [S, in] through projection ``name`` of each row's expert ids[i] (+ bias),
    then add_lora's term; rows are grouped by expert (offs)."""
    weight = getattr(experts, name)
    x = x.to(weight.dtype)
    y = _grouped_mm(x, weight if experts.is_transposed else weight.transpose(1, 2), offs)
    if experts.has_bias:
        y = y.add_(getattr(experts, name + "_bias")[ids])
    return add_lora(name, y, x, ids, offs, tokens)


def _add_lora(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, offs: torch.Tensor,
              lora: Optional[LoRASpec]) -> torch.Tensor:
    """y + s * (x @ A[e].T) @ B[e].T for each row's expert e = ids[i] (rows grouped by expert)."""
    if lora is None:
        return y
    A, B, s = lora
    A, B = A.to(y.dtype), B.to(y.dtype)
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or x.requires_grad
                                              or A.requires_grad or B.requires_grad)
    if not needs_grad and y.dtype in _GROUPED_MM_DTYPES:
        E, r = A.shape[0], A.shape[1]
        scales = torch.full((E,), s, dtype=torch.float32, device=y.device)
        ranks = torch.full((E,), r, dtype=torch.int32, device=y.device)
        return multi_lora_(y, x, A, B, ids, scales, ranks)
    # contiguous factors (PEFT's B is a permuted view of lora_B): grouped_mm's operand layout,
    # so torch's kernel runs instead of the per-expert fallback; a copy of E * r * (in + out)
    A, B = A.contiguous(), B.contiguous()
    u = _grouped_mm(x, A.transpose(1, 2), offs)  # [S, r]
    return y.add_(_grouped_mm(u, B.transpose(1, 2), offs), alpha=s)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[S, n]: rows of x [S, m] in group e (rows offs[e-1]:offs[e]) times w[e] [m, n]. torch's
    kernel needs both operands in its layout and n * itemsize a multiple of 16 bytes (the
    output, and in backward its gradient, is [S, n])."""
    if x.dtype in _GROUPED_MM_DTYPES and _grouped_mm_layout(x) and _grouped_mm_layout(w) \
            and w.shape[-1] % (16 // w.element_size()) == 0 \
            and hf_moe._can_use_grouped_mm(x, w, offs):
        return hf_moe._grouped_mm(x, w, offs)
    return torch.ops.transformers.grouped_mm_fallback(x, w, offs)


def _grouped_mm_layout(t: torch.Tensor) -> bool:
    """grouped_mm's operand rule: one of the last two dims has unit stride, the other's stride
    is a multiple of 16 bytes (and covers the unit-stride dim); the start is 16-byte aligned
    (checked in eager only: dynamo cannot trace storage_offset)."""
    align = 16 // t.element_size()
    (m, n), (sm, sn) = t.shape[-2:], t.stride()[-2:]
    if not torch.compiler.is_compiling() and t.storage_offset() % align != 0:
        return False
    if sn == 1 and sm >= max(1, n):
        return sm % align == 0
    if sm == 1 and sn >= max(1, m):
        return sn % align == 0
    return False
