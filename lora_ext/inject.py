"""Model surgery: put LoRA layers into any nn.Module, choose what trains, export PEFT-named state.

    names = lora_ext.inject(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16)
    lora_ext.mark_only_lora_trainable(model)
    sd = lora_ext.lora_state_dict(model)   # {"base_model.model.<path>.lora_A.weight": ...}
    sd = lora_ext.lora_state_dict(model, peft_names=False)  # {"<path>.lora_A": ...}, model.state_dict() names
"""
from __future__ import annotations

import functools
import re
import reprlib
from collections.abc import Iterable

try:
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # Python 3.10
    import sre_parse as _sre

import torch
from torch import nn

from .layers import LoRAEmbedding, LoRALinear, is_conv1d

__all__ = ["inject", "mark_only_lora_trainable", "lora_state_dict", "lora_layers", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
LORA_TYPES = (LoRALinear, LoRAEmbedding)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def _matches(name: str, target) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _pattern_value(name: str, pattern: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key with
    re.match(rf"(.*\\.)?({key})$", name) (peft.utils.other.get_pattern_key), in bounded time."""
    for key, value in (pattern or {}).items():
        if _nfa_match(*_compile_key(key), name):
            return value
    return default


# Pattern keys come from files, and re backtracks exponentially on keys like (a+)+b. They are run
# instead as a Thompson NFA (every state advanced in step, O(len(name) * len(key))). States:
# ("char", op, arg, next), ("at", anchor, next), ("split", [nexts]), ("match",).
_CHAR_OPS = (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN)
_CATEGORY = {_sre.CATEGORY_DIGIT: str.isdecimal, _sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
             _sre.CATEGORY_SPACE: str.isspace, _sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
             _sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
             _sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_")}
_ANCHORS = {_sre.AT_BEGINNING: lambda s, i: i == 0, _sre.AT_BEGINNING_STRING: lambda s, i: i == 0,
            _sre.AT_END: lambda s, i: s[i:] in ("", "\n"), _sre.AT_END_STRING: lambda s, i: i == len(s)}
_MAX_STATES = 10_000


@functools.lru_cache(maxsize=1024)
def _compile_key(key: str) -> tuple[list, int]:
    """Raises ValueError for a bad regex, or one using lookarounds, backreferences, atomic groups,
    possessive repeats, \\b/\\B or inline flags, or too large."""
    if not isinstance(key, str):
        raise ValueError(f"key {key!r} is a {type(key).__name__}, not a str")
    try:
        tree = _sre.parse(rf"(.*\.)?({key})$")
        if tree.state.flags & ~re.UNICODE:
            raise ValueError("inline flags such as (?i) are not supported")
        prog = [("match",)]
        return prog, _emit(list(tree), prog, 0)
    except re.error as e:
        raise ValueError(f"key {reprlib.repr(key)} is not a valid regex: {e.msg}") from None
    except (ValueError, OverflowError, RecursionError) as e:
        raise ValueError(f"key {reprlib.repr(key)}: {e if str(e) else 'nested too deeply'}") from None


def _emit(items: list, prog: list, nxt: int) -> int:
    """Appends the states of a parsed regex sequence that continue to state nxt; returns its start."""
    def add(state):
        if len(prog) >= _MAX_STATES:
            raise ValueError(f"more than {_MAX_STATES} NFA states")
        prog.append(state)
        return len(prog) - 1

    for op, av in reversed(items):
        if op in _CHAR_OPS:
            nxt = add(("char", op, av, nxt))
        elif op is _sre.AT and av in _ANCHORS:
            nxt = add(("at", av, nxt))
        elif op is _sre.SUBPATTERN and not av[1] and not av[2]:  # (group, add_flags, del_flags, items)
            nxt = _emit(av[3], prog, nxt)
        elif op is _sre.BRANCH:
            nxt = add(("split", [_emit(alt, prog, nxt) for alt in av[1]]))
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):  # greedy or lazy: same set of matches
            lo, hi, item = av
            if lo > _MAX_STATES or (hi != _sre.MAXREPEAT and hi > _MAX_STATES):
                raise ValueError(f"repeat count above {_MAX_STATES}")
            if hi == _sre.MAXREPEAT:
                loop = add(None)
                prog[loop] = ("split", [_emit(item, prog, loop), nxt])
                nxt = loop
            for _ in range(0 if hi == _sre.MAXREPEAT else hi - lo):
                nxt = add(("split", [_emit(item, prog, nxt), nxt]))
            for _ in range(lo):
                nxt = _emit(item, prog, nxt)
        else:
            raise ValueError(f"{av if op is _sre.AT else op} is not supported (pattern keys are matched in linear "
                             "time: no lookarounds, backreferences, atomic groups, possessive repeats, \\b/\\B "
                             "or inline flags)")
    return nxt


def _char_ok(op, av, c: str) -> bool:
    if op is _sre.LITERAL:
        return ord(c) == av
    if op is _sre.NOT_LITERAL:
        return ord(c) != av
    if op is _sre.ANY:
        return c != "\n"
    if op is _sre.RANGE:
        return av[0] <= ord(c) <= av[1]
    if op is _sre.CATEGORY:
        return _CATEGORY[av](c)
    negate = bool(av) and av[0][0] is _sre.NEGATE  # IN: a character class
    return negate != any(_char_ok(o, a, c) for o, a in av[negate:])


def _nfa_match(prog: list, start: int, s: str) -> bool:
    def closure(states, pos):  # follow splits and anchors; keep char and match states
        out, seen, stack = [], set(), list(states)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            st = prog[i]
            if st[0] == "split":
                stack.extend(st[1])
            elif st[0] == "at":
                if _ANCHORS[st[1]](s, pos):
                    stack.append(st[2])
            else:
                out.append(i)
        return out

    cur = closure([start], 0)
    for pos, c in enumerate(s):
        if not cur or any(prog[i][0] == "match" for i in cur):
            break
        cur = closure([prog[i][3] for i in cur if prog[i][0] == "char" and _char_ok(prog[i][1], prog[i][2], c)], pos + 1)
    return any(prog[i][0] == "match" for i in cur)


def inject(model: nn.Module, target_modules: str | Iterable[str] = ("q_proj", "v_proj"), r: int = 8,
           alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
           rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
           init: str = "kaiming", exclude_modules: str | Iterable[str] | None = None) -> list[str]:
    """Replaces the target modules of ``model`` in place by LoRA layers; returns their names.

    target_modules: a list of module-name suffixes (``"q_proj"`` matches ``...attn.q_proj``), a
    regex matched against the full name, or ``"all-linear"`` (every Linear/Conv1D but the output
    head). Targets must be nn.Linear, transformers Conv1D or nn.Embedding. rank_pattern /
    alpha_pattern map name regexes to per-module r / alpha, as in PEFT.
    """
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n, m in model.named_modules()
                  if (isinstance(m, nn.Linear) or is_conv1d(m)) and n not in heads]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        chosen = [n for n, m in model.named_modules()
                  if n and not isinstance(m, LORA_TYPES) and _matches(n, target_modules)]
        # a LoRA layer's own children (none today) or nested matches: keep outermost only
        chosen = [n for n in chosen if not any(n.startswith(p + ".") for p in chosen if p != n)]
    if exclude_modules is not None:
        excl = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [n for n in chosen if not _matches(n, excl)]
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m)})
        raise ValueError(f"inject: target_modules={target_modules!r} matched no module of "
                         f"{type(model).__name__}; Linear/Conv1D/Embedding names there: {leaves}")
    modules = dict(model.named_modules())
    for name in chosen:
        m = modules[name]
        rr = _pattern_value(name, rank_pattern, r)
        aa = _pattern_value(name, alpha_pattern, alpha)
        try:
            if isinstance(m, nn.Linear) or is_conv1d(m):
                new = LoRALinear.from_linear(m, rr, aa, dropout, use_rslora, init)
            elif isinstance(m, nn.Embedding):
                new = LoRAEmbedding.from_embedding(m, rr, aa, use_rslora)
            else:
                raise TypeError(f"inject: module {name!r} is a {type(m).__name__}; LoRA targets must "
                                "be nn.Linear, transformers Conv1D or nn.Embedding")
        except ValueError as e:
            raise ValueError(f"inject: module {name!r}: {e}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> LoRA layer (LoRALinear / LoRAEmbedding) of an injected model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only for LoRA parameters; bias="all" adds every bias, "lora_only" the LoRA layers'."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_trainable: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n.split(".")[-1])
    if bias == "all":
        for n, p in model.named_parameters():
            if n.split(".")[-1] == "bias":
                p.requires_grad_(True)
    elif bias == "lora_only":
        for m in lora_layers(model).values():
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, prefix: str = PEFT_PREFIX, peft_names: bool = True) -> dict[str, torch.Tensor]:
    """LoRA weights under HF PEFT's saved key names (adapter name stripped), or with
    peft_names=False under the model's own names (as loralib), for model.load_state_dict(sd, strict=False).
    lora_ext.load_adapter(model, sd) takes either and says when a key matches no LoRA layer."""
    out = {}
    for name, m in lora_layers(model).items():
        linear = isinstance(m, LoRALinear)
        for p in ("lora_A", "lora_B") if linear else ("lora_embedding_A", "lora_embedding_B"):
            key = f"{prefix}{name}.{p}{'.weight' if linear else ''}" if peft_names else f"{name}.{p}"
            out[key] = getattr(m, p).detach()
    return out
