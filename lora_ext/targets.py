"""Which modules an adapter touches, and how PEFT names them.

Module-name matching (suffix lists, a full-name regex, "all-linear"), PEFT's rank_pattern /
alpha_pattern lookup (in bounded time: keys come from files), the PEFT state-dict key prefix, and
the one builder of a PEFT adapter_config (used by Adapter.from_model and combine), which writes
pattern keys as ``^<re.escape(module path)>$`` like PEFT's own conversions do.
"""
from __future__ import annotations

import functools
import re
import reprlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping

try:
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # Python 3.10
    import sre_parse as _sre

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoRALayer, is_conv1d
from .wrappable import _same_on_probe, hooked, unwrappable  # noqa: F401  (imported from here too)

__all__ = ["PEFT_PREFIX", "matches", "output_head_names", "read_directly", "select_targets", "pattern_value",
           "check_pattern_key", "name_regex", "peft_config", "check_layers", "in_layers", "peft_layer",
           "check_not_peft", "is_param_wrapper", "outer_wrappers"]

PEFT_PREFIX = "base_model.model."
SERVING = "serves_adapters"  # the class attribute of lora_ext.multi's multi-adapter layers


def served_layer(model: nn.Module) -> str | None:
    """The name of a multi-adapter serving layer in ``model`` (an AdapterPool's, MultiLoRALinear...), else None."""
    return next((n for n, m in model.named_modules() if getattr(type(m), SERVING, False)), None)


def output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def read_directly(model: nn.Module) -> set[str]:
    """Names of the Linear modules whose parent reads their weight itself instead of calling them:
    nn.MultiheadAttention's out_proj (F.multi_head_attention_forward), so a LoRA layer there
    would never run."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


_PEFT_LAYERS = ("BaseTunerLayer", "AuxiliaryTrainingWrapper")  # peft's tuner layers, modules_to_save wrappers


def is_param_wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "ParamWrapper" and type(m).__module__.startswith("peft.")


def outer_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> outermost ParamWrapper of each wrapped module (inner ones are ``<name>.base_layer``...)."""
    found = {n: m for n, m in model.named_modules() if is_param_wrapper(m)}
    return {n: m for n, m in found.items()
            if not (n.rpartition(".")[2] == "base_layer" and n.rpartition(".")[0] in found)}


def peft_layer(modules: dict[str, nn.Module], name: str) -> str | None:
    """The path of the PEFT layer that module ``name`` is or lies inside (``modules``: the model's
    named_modules()): a PEFT tuner layer (its LoRA Linear, with base_layer / lora_A / lora_B) or a
    modules_to_save / trainable-tokens wrapper; None if none. lora_ext does not adapt those."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        owner = ".".join(parts[:i])
        if _is_peft_layer(modules.get(owner)):
            return owner
    return None


def first_peft_layer(model: nn.Module) -> str | None:
    """The path of the first PEFT layer (peft_layer's kinds) in ``model``, else None."""
    return next((n for n, m in model.named_modules() if _is_peft_layer(m)), None)


def _is_peft_layer(m: nn.Module | None) -> bool:
    return m is not None and any(c.__module__.startswith("peft.") and c.__name__ in _PEFT_LAYERS
                                 for c in type(m).__mro__)


def check_not_peft(where: str, modules: dict[str, nn.Module], name: str, cls=TypeError) -> None:
    """Raises ``cls`` naming PEFT's layer when module ``name`` is or lies inside one (peft_layer)."""
    owner = peft_layer(modules, name)
    if owner is not None:
        raise cls(f"{where}: module {name!r} {'is' if owner == name else 'is inside'} PEFT's "
                  f"{type(modules[owner]).__name__} layer {owner!r}: lora_ext does not adapt PEFT's layers "
                  "(lora_ext.patch_peft runs a PEFT model on lora_ext's ops; or inject / load_adapter into the "
                  "model without PEFT's layers)")


def check_regex(where: str, field: str, value) -> None:
    """ValueError starting with ``where`` and naming ``field`` when ``value`` is a string that is not a
    valid regex (a str target is a full-name regex); TypeError when it is neither None, a str nor
    an iterable of str (module-name suffixes; a list's items are checked, a generator's are not:
    that would consume it)."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{where}: {field}={_short(value)} is not a valid regex: {e}") from None
    elif value is not None and (isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable) or (
            isinstance(value, Collection) and not all(isinstance(v, str) for v in value))):
        raise TypeError(f"{where}: {field} must be a str (a regex) or a list of str (module-name suffixes), "
                        f"got {_short(value)}")


def matches(name: str, target) -> bool:
    """target: a regex matched against the full name, or module-name suffixes ("q_proj" matches
    "...attn.q_proj")."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _short(value) -> str:
    """repr(value) for an error message, at most 80 characters (also for an int too long for
    repr: sys.get_int_max_str_digits(), alone or inside a list)."""
    try:
        text = repr(value)
    except ValueError:
        text = (f"<an int of about {value.bit_length() * 0.30103:.0f} digits>" if isinstance(value, int)
                else f"<a {type(value).__name__} holding an int too long to print>")
    return text if len(text) <= 80 else text[:77] + "..."


def check_layers(where: str, layers_to_transform, layers_pattern, target_modules,
                 allow_negative: bool = True) -> tuple[int | list[int] | None, list[str] | None]:
    """PEFT's layers_to_transform (an int or a list of ints: the layer indices to adapt) and
    layers_pattern (a str or a list of str: regexes naming the layer list, e.g. "layers", "h"),
    checked as PEFT's LoraConfig checks them: both only with a list of target_modules (not a regex
    or "all-linear"), layers_pattern only with layers_to_transform. Returns them normalized (lists;
    None for none) for in_layers; ValueError starting with ``where`` and naming the field else.
    allow_negative=False also refuses negative indices (PEFT's never match)."""
    idx = layers_to_transform
    if idx is not None:
        if isinstance(idx, (range, tuple)):
            idx = list(idx)
        ints = [idx] if not isinstance(idx, list) else idx
        if not all(isinstance(i, int) and not isinstance(i, bool) and (allow_negative or i >= 0) for i in ints):
            raise ValueError(f"{where}: layers_to_transform must be {'an int' if allow_negative else 'an int >= 0'} "
                             f"or a list of them (layer indices), got {_short(layers_to_transform)}")
    pattern = layers_pattern
    if pattern is not None:
        # PEFT: an empty layers_pattern ("" or []) means any layer list
        pattern = ([pattern] if pattern else []) if isinstance(pattern, str) else \
            list(pattern) if isinstance(pattern, (list, tuple)) else None
        if pattern is None or not all(isinstance(p, str) for p in pattern):
            raise ValueError(f"{where}: layers_pattern must be a str or a list of str (the name of the layer "
                             f"list, e.g. 'layers' or 'h'), got {_short(layers_pattern)}")
        for p in pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{where}: layers_pattern {p!r} is not a valid regex: {e.msg}") from None
    for fld, value in (("layers_to_transform", idx), ("layers_pattern", pattern)):
        if value is not None and isinstance(target_modules, str):
            raise ValueError(f"{where}: {fld} works only with a list of target_modules (module-name suffixes), "
                             f"not target_modules={_short(target_modules)} (as in PEFT)")
    if pattern and idx is None:
        raise ValueError(f"{where}: layers_pattern={_short(layers_pattern)} needs layers_to_transform (as in PEFT)")
    return idx, pattern


def in_layers(name: str, layers_to_transform, layers_pattern) -> bool:
    """Whether module ``name`` (selected by a target_modules suffix) is in the layers
    layers_to_transform picks (check_layers' values), as PEFT decides it (tuners_utils
    check_target_module_exists): the layer index is the first number in the name after a
    layers_pattern component (the first of the patterns that matches), or with no pattern after
    any component but the first; a name without one is in no layer. No layers_to_transform (or
    an empty list): every name."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def select_targets(model: nn.Module, target_modules, exclude_modules=None, layers_to_transform=None,
                   layers_pattern=None) -> list[str]:
    """Names of the modules of ``model`` that ``target_modules`` picks (see lora_ext.inject):
    module-name suffixes, a full-name regex, or "all-linear" (every Linear/Conv1D but the output
    head and those read_directly names); LoRA layers are skipped and only the outermost of nested
    matches is kept. With a list of target_modules, names matched by a suffix (not given in full)
    must be in the layers ``layers_to_transform`` / ``layers_pattern`` pick (in_layers, after
    check_layers). Names matching ``exclude_modules`` (same forms, no "all-linear") are dropped.
    May be empty."""
    if target_modules == "all-linear":
        skip = output_head_names(model) | read_directly(model)
        chosen = [n for n, m in model.named_modules()
                  if (isinstance(m, nn.Linear) or is_conv1d(m)) and n not in skip]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        chosen = [n for n, m in model.named_modules()
                  if n and not isinstance(m, LoRALayer) and matches(n, target_modules)]
        if not isinstance(target_modules, str):  # PEFT: a name given in full is taken in any layer
            chosen = [n for n in chosen if n in target_modules or in_layers(n, layers_to_transform, layers_pattern)]
        # a LoRA layer's own children (none today) or nested matches: keep outermost only
        chosen = [n for n in chosen if not any(n.startswith(p + ".") for p in chosen if p != n)]
    if exclude_modules is not None:
        excl = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [n for n in chosen if not matches(n, excl)]
    modules = dict(model.named_modules())
    for n in chosen:  # e.g. "all-linear" on a PeftModel: its base_layer, lora_A.default, ...
        check_not_peft("inject", modules, n)
    return chosen


def pattern_value(name: str, pattern: dict | None, default):
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


def check_pattern_key(key: str) -> None:
    """Raises ValueError unless ``key`` is a rank_pattern / alpha_pattern key pattern_value can run
    (a valid regex without lookarounds, backreferences, atomic groups, possessive repeats, \\b/\\B
    or inline flags, and not too large)."""
    _compile_key(key)


def name_regex(name: str) -> str:
    """A regex matching exactly the module path ``name``, as PEFT escapes names (re.escape): as a
    pattern key (PEFT's re.match(rf"(.*\\.)?({key})$", name)) and as a target_modules regex."""
    return f"^{re.escape(name)}$"


def _target_names(names: list[str], model: nn.Module | None, full_names: bool) -> list[str]:
    """target_modules selecting exactly ``names`` (in ``model``, if given; see peft_config)."""
    leaves = sorted({n.split(".")[-1] for n in names})
    chosen = set(names)
    if full_names or (model is not None and any(n and n not in chosen and matches(n, leaves)
                                                for n, _ in model.named_modules())):
        return sorted(chosen)
    return leaves


# What Adapter.from_model writes besides the LoRA shape fields (PEFT's defaults for an inference adapter).
_FROM_SCRATCH = {"bias": "none", "task_type": None, "inference_mode": True, "init_lora_weights": True,
                 "modules_to_save": None, "layers_to_transform": None, "base_model_name_or_path": None}


def _parameter_names(keys: list[str], model: nn.Module | None, full_names: bool) -> list[str]:
    """target_parameters selecting exactly the parameters ``keys`` (full names, "base_layer" steps
    left out) under PEFT's rule (a name is a target or ends with "." + a target): "<module leaf>.<parameter>"
    ("experts.gate_up_proj") when that selects no other parameter of ``model``, else the full names."""
    short = sorted({".".join(k.split(".")[-2:]) for k in keys})
    if full_names or model is None:
        return sorted(keys)
    chosen = set(keys)
    for name, m in model.named_modules():
        clean = name.replace(".base_layer", "")
        for p, _ in m.named_parameters(recurse=False):
            key = f"{clean}.{p}"
            if key not in chosen and any(key == t or key.endswith("." + t) for t in short):
                return sorted(keys)
    return short


def peft_config(ranks: dict[str, int], alphas: dict[str, float], *, use_rslora: bool = False,
                fan_in_fan_out: bool = False, lora_dropout: float = 0.0, model: nn.Module | None = None,
                full_names: bool = False, use_dora: bool = False, parameters=()) -> dict:
    """A PEFT LoRA adapter_config for modules with the given per-module ranks and alphas.

    r / lora_alpha are the most common values; modules that differ get a rank_pattern /
    alpha_pattern entry keyed by name_regex(module). target_modules lists the module-name leaves,
    or, when those name other modules of ``model`` too (a model injected with layers_to_transform,
    exclude_modules or a regex) or ``full_names`` is set, the full module names (PEFT takes a name
    given in full as it is), so that PEFT wraps exactly these modules. The other fields are PEFT's defaults for an
    inference adapter (no layers_to_transform, modules_to_save ...), and ``use_dora``.
    ``parameters``: keys of ranks / alphas that are parameters (LoRAParameter, by full parameter
    name, e.g. "model.layers.0.mlp.experts.gate_up_proj"), written to target_parameters (short
    forms when they select exactly these, _parameter_names) with pattern keys on those names, as
    PEFT matches them; target_modules is then [] if no module is left (None would make PEFT use its
    defaults for the model type).
    """
    params = set(parameters)
    modules = [n for n in ranks if n not in params]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    shape = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
        "target_modules": _target_names(modules, model, full_names) if modules else [],
        "rank_pattern": {name_regex(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {name_regex(n): a for n, a in alphas.items() if a != alpha},
        "fan_in_fan_out": fan_in_fan_out,
    }
    if params:
        shape["target_parameters"] = _parameter_names(sorted(params), model, full_names)
    return {**shape, "lora_dropout": lora_dropout, **_FROM_SCRATCH, "use_dora": use_dora}


def check_patterns(where: str, rank_pattern, alpha_pattern) -> None:
    """ValueError starting with ``where`` for a rank_pattern / alpha_pattern that is not None or a dict
    of str keys (regexes pattern_value can run: lora_ext.targets.check_pattern_key) to values (these are
    checked per target, by _check_hparams)."""
    for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise ValueError(f"{where}: {field} must be a dict (module-name regex -> value), got "
                             f"{type(pattern).__name__} {pattern!r:.80}")
        for key in pattern:
            if not isinstance(key, str):
                raise ValueError(f"{where}: {field} keys must be str (module-name regexes), got {key!r}")
            try:
                check_pattern_key(key)
            except ValueError as e:
                raise ValueError(f"{where}: {field} {e}") from None
