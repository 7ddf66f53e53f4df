"""Reading and checking what an adapter's files hold (lora_ext.adapters): the config (its numbers, the
LoRA variants lora_ext does not run: UNSUPPORTED; target_parameters, bias, modules_to_save), the weights
file, the tensors (split into LoRA factors and the rest), the scales, and the modules_to_save tensors a
model needs.

Each raises ValueError (TypeError for an argument of the wrong type) whose message starts with
`where` (the file, or the caller) and names the field or key, never an error from Python's or
torch's internals."""
from __future__ import annotations

import functools
import json
import math
import numbers
import operator
import os
import re

import torch
from torch import nn

from .hparams import lora_alpha_for, lora_scaling
from .sharding import wrapper_free_name
from .targets import (PEFT_PREFIX, _short, check_layers, check_pattern_key, check_regex, in_layers, matches,
                      pattern_value, peft_config)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BIAS_MODES = ("none", "all", "lora_only")  # LoraConfig.bias values PEFT implements

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_KEY = re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
                  r"|lora_magnitude_vector)"
                  r"(?:\.(?!(?:weight|bias)$)[A-Za-z0-9_-]+)?(?:\.weight)?$")  # [.<adapter name>][.weight]
WRAPPER_INNER = re.compile(r"\.(?P<part>modules_to_save|original_module)\.(?P<leaf>[^.]+)$")
# Tensors only training uses (VeLoRA's projection, MonteCLoRA's sampler): dropped on load.
TRAINING_ONLY = re.compile(r"\.lora_(?:velora_embed|monteclora_sampler\.[A-Za-z0-9_]+)$")


def _plain_init(value) -> bool:
    """False for the inits PEFT re-runs on the base weights when it loads the adapter (layer.py update_layer)."""
    return not (isinstance(value, str) and value.lower().startswith(("pissa", "olora", "corda", "loftq")))


# LoraConfig fields whose non-default value changes what PEFT's LoRA Linear/Embedding computes in a
# way lora_ext does not implement (peft/tuners/lora: layer.py lora_variants and update_layer,
# variants.py, model.py), with PEFT's own test for "off": truthiness, or None for sub-configs (PEFT
# turns any dict, even {}, into one). Fields for training only (other init_lora_weights, eva/lora_ga
# configs, lora_dropout, velora_config, monteclora_config, ensure_weight_tying ...) are fine.
UNSUPPORTED = (  # (field, is default, what it does)
    ("init_lora_weights", _plain_init, "PEFT rewrites the base weights when it loads this; save the adapter "
                                       "with path_initial_model_for_weight_conversion for plain LoRA"),
    ("lora_bias", operator.not_, "a trained bias on lora_B"),
    ("alora_invocation_tokens", operator.not_, "aLoRA, applied from the invocation tokens on"),
    ("use_qalora", operator.not_, "QA-LoRA, on group-pooled inputs"),
    ("layer_replication", operator.not_, "replicated decoder layers"),
    ("trainable_token_indices", operator.not_, "trained token embeddings"),
    ("arrow_config", functools.partial(operator.is_, None), "Arrow routing"),
    ("kasa_config", functools.partial(operator.is_, None), "KaSA, with a truncated base weight"),
    ("use_bdlora", functools.partial(operator.is_, None), "block-diagonal LoRA"),
)


def check_covered(where: str, adapter_layers, model: nn.Module) -> None:
    """An adapter directory is a whole adapter (an Adapter or a state dict may update some layers): it
    sets every LoRA layer of ``model``. ValueError naming those it has no factors for, which would
    keep the factors they hold (another adapter's: the model would run neither adapter, silently)."""
    from .inject import lora_layers, peft_parameter_layers  # (inject imports nothing of this module's)
    has = {wrapper_free_name(n) for n in [*lora_layers(model), *peft_parameter_layers(model)]}
    left = sorted(has - set(adapter_layers))
    if left:
        raise ValueError(f"{where} has no factors for the model's LoRA layers {left[:4]}"
                         f"{' ...' if len(left) > 4 else ''}, which would keep the factors they hold (another "
                         "adapter's?): load it into a model without them (the base model), or pass an Adapter or "
                         "a state dict to update only some layers")


# model.__dict__ keys: what load_adapter put into the model that Adapter.from_model saves again by default
LOADED_MODULES = "_lora_ext_modules_to_save"  # the modules_to_save of the adapters loaded into it
LOADED_TABLES = "_lora_ext_loaded_tables"  # LoRA layers whose own weight a file held ("<layer>.base_layer.weight")


def remember(model: nn.Module, key: str, names) -> None:
    """Adds ``names`` (if any) to the list model.__dict__[key] (LOADED_MODULES, LOADED_TABLES)."""
    if names:
        model.__dict__[key] = list(dict.fromkeys([*model.__dict__.get(key, []), *names]))


def loaded_tables(model: nn.Module, found: dict, copy, where: str) -> dict:
    """{"<layer>.base_layer.weight": copy(weight)} of the LoRA layers (of ``found``) whose own weight
    load_adapter wrote from a file (PEFT saves a targeted embedding's table, e.g. one with new tokens),
    unmerged, so that an adapter saved again keeps it, as PEFT's save_pretrained does; ValueError for
    one merged for good (its weight holds the adapter for good)."""
    out = {}
    for name in model.__dict__.get(LOADED_TABLES, []):
        m = found.get(name)
        if m is None or not hasattr(m, "_unmerged"):  # merged and unloaded, or replaced since
            continue
        if m._merged_for_good():
            raise ValueError(f"{where}: {name!r} holds the weight an adapter file gave it ({name}.base_layer.weight), "
                             "but it is merged for good (drop_merge_state / merge_and_unload), so that weight is lost")
        with m._unmerged(where):  # (copy clones: the weight is merged again after the block)
            out[f"{name}.base_layer.weight"] = copy(m.weight)
    return out


def no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def read_config(cfg_path: str) -> dict:
    if not os.path.isfile(cfg_path):
        # PEFT's save_pretrained of several adapters puts the non-default ones in <dir>/<name>/
        parent = os.path.dirname(cfg_path)
        subs = sorted(d for d in (os.listdir(parent) if os.path.isdir(parent) else [])
                      if os.path.isfile(os.path.join(parent, d, CONFIG_FILE)))
        hint = f"; adapters in its subdirectories: {', '.join(subs)} (load <dir>/<name>)" if subs else ""
        raise FileNotFoundError(f"Adapter.load: {cfg_path} not found (a PEFT adapter directory "
                                f"holds {CONFIG_FILE} and {SAFETENSORS_FILE}){hint}")
    where = f"Adapter.load: {cfg_path}"
    try:
        with open(cfg_path) as f:
            config = json.load(f, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be an adapter config") from None
    except ValueError as e:  # from no_duplicates
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where} has peft_type={config.get('peft_type')!r}, not LORA")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"{where}: {key} must be true or false, got {config[key]!r}")
    for key, is_default, what in UNSUPPORTED:
        if not is_default(config.get(key)):
            raise ValueError(f"{where}: {key}={json.dumps(config[key])[:80]} ({what}) is not supported")
    check_number(where, "r", config.get("r"), int)
    check_number(where, "lora_alpha", config.get("lora_alpha"), float)
    for fld, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = config.get(fld) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{where}: {fld} must be a JSON object (regex -> value), got {pattern!r:.80}")
        for key, value in pattern.items():
            try:
                check_pattern_key(key)
            except ValueError as e:
                raise ValueError(f"{where}: {fld} {e}") from None
            check_number(where, f"{fld}[{key!r}]", value, kind)
    check_dropout(where, config.get("lora_dropout"))
    check_target_parameters(where, config)
    if config.get("bias", "none") not in BIAS_MODES:  # PEFT: NotImplementedError ("none" when absent)
        raise ValueError(f"{where}: bias={_short(config['bias'])} is not one of {', '.join(map(repr, BIAS_MODES))}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(t, str) and t for t in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names (non-empty strings, e.g. "
                         f"[\"lm_head\"]) or null, got {_short(saved)}")
    return config


def check_target_parameters(where: str, config: dict) -> list[str]:
    """A config's target_parameters (PEFT's LoRA on parameters, lora_ext.LoRAParameter) as a list
    (None: []), each a non-empty str; with any, the fields PEFT's ParamWrapper refuses (lora_dropout
    > 0, use_dora, fan_in_fan_out, velora_config; lora_bias and kasa_config are refused for every
    adapter) raise ValueError."""
    value = config.get("target_parameters")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{where}: target_parameters must be a list of parameter names (non-empty "
                         f"strings, e.g. \"mlp.experts.gate_up_proj\"), got {_short(value)}")
    if value:
        for key, off in (("lora_dropout", operator.not_), ("use_dora", operator.not_),
                         ("fan_in_fan_out", operator.not_), ("velora_config", functools.partial(operator.is_, None))):
            if not off(config.get(key)):
                raise ValueError(f"{where}: {key}={json.dumps(config[key])} with target_parameters: PEFT's ParamWrapper "
                                 f"(LoRA on parameters) does not work with {key} (PeftModel.from_pretrained "
                                 "refuses this config)")
    return value


def read_weights(path: str, allow_pickle: bool) -> tuple[str, dict]:
    """(the weights file, what it holds)."""
    st, pk = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, PICKLE_FILE)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"Adapter.load: {st} is corrupt or truncated: {e}") from None
        with open(st, "rb") as f:  # safetensors keeps the last of duplicate keys: refuse them
            header = f.read(int.from_bytes(f.read(8), "little"))
        try:
            json.loads(header, object_pairs_hook=no_duplicates)
        except ValueError as e:
            raise ValueError(f"Adapter.load: {st}: {e} in the header") from None
        return st, tensors
    if os.path.isfile(pk):
        if not allow_pickle:
            raise ValueError(f"Adapter.load: refusing to unpickle {pk} (pickle files can run code); "
                             "convert it to safetensors or pass allow_pickle=True (load_adapter takes "
                             "Adapter.load(path, allow_pickle=True); the CLI's merge / inspect: --allow-pickle)")
        try:
            return pk, torch.load(pk, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unpickling failure is a bad file)
            raise ValueError(f"Adapter.load: {pk} could not be read: {e}") from None
    broken = next((f for f in (st, pk) if os.path.islink(f)), None)  # e.g. a half-downloaded hub cache
    raise FileNotFoundError(f"Adapter.load: no {SAFETENSORS_FILE} (or {PICKLE_FILE}) in {path}" + (
        f" ({broken} is a broken symbolic link to {os.readlink(broken)})" if broken else ""))


def check_number(where: str, field: str, value, kind: type) -> None:
    """`value` is an int > 0 (kind int: a rank) or a finite number (kind float: an alpha, which PEFT
    takes of any sign: 0 or a negative scale); bools are neither. An int too large for a float (JSON
    has no limit) is not finite."""
    if kind is int:
        ok = isinstance(value, int) and value > 0
    else:
        try:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # math.isfinite(10**400)
            ok = False
    if isinstance(value, bool) or not ok:
        what = "an int > 0" if kind is int else "a finite number"
        raise ValueError(f"{where}: {field} must be {what}, got {_short(value)}")


def to_save(name: str, modules_to_save) -> bool:
    """Whether ``modules_to_save`` selects module ``name``: PEFT's rule for its list, the names that end
    with an entry (plain str.endswith, so "classifier" also selects DistilBERT's "pre_classifier"), or
    a full-name regex (lora_ext's Adapter.from_model takes one too)."""
    if isinstance(modules_to_save, str):
        return re.fullmatch(modules_to_save, name) is not None
    return any(name.endswith(t) for t in modules_to_save)


def check_modules_to_save(where: str, config: dict, extra: dict, model: nn.Module, lora) -> None:
    """The modules PEFT's from_pretrained wraps for the config's modules_to_save (its rule: the module
    names ending with an entry; here the outermost ones that are not LoRA layers (``lora``: their
    names), nor hold or sit in one) have every state dict entry in ``extra`` (Adapter.extra): PEFT
    raises KeyError for a missing one, which lora_ext would leave as the model's. ValueError naming
    the module and the tensor."""
    targets = config.get("modules_to_save") or []
    inside = (lambda n, names: any(n == k or n.startswith(k + ".") for k in names))
    found = [n for n, _ in model.named_modules() if n and to_save(n, targets)
             and not inside(n, lora) and not any(inside(k, [n]) for k in lora)]
    modules = dict(model.named_modules())
    for n in found:
        if inside(n, [k for k in found if k != n]):
            continue
        missing = [f"{n}.{k}" for k in modules[n].state_dict() if f"{n}.{k}" not in extra]
        if missing:
            raise ValueError(f"{where}: modules_to_save={_short(targets)} selects module {n!r}, but the adapter "
                             f"holds no {missing[0]} (PeftModel.from_pretrained raises KeyError; lora_ext would "
                             "leave the model's own): fix the config or the weights")


def check_saved_modules(where: str, modules_to_save, keep: list[str], lora, model: nn.Module) -> None:
    """The modules ``keep`` a model's adapter saves whole for ``modules_to_save`` (Adapter.from_model):
    at least one, and none holding a LoRA layer (``lora``: their names). PEFT adapts no module inside a
    modules_to_save one (it wraps the whole module and drops those factors), so such a file would not
    load as saved. ValueError naming the module and the layer."""
    if not keep:
        raise ValueError(f"{where}: modules_to_save={modules_to_save!r} matched no module "
                         f"of {type(model).__name__} (LoRA layers excluded)")
    held = next(((n, k) for n in keep for k in lora if k.startswith(n + ".")), None)
    if held is not None:
        raise ValueError(f"{where}: modules_to_save={_short(modules_to_save)} selects module {held[0]!r}, which "
                         f"holds the LoRA layer {held[1]!r}; PEFT adapts no module inside a modules_to_save "
                         "one (save its other submodules instead, or do not inject LoRA there)")


def check_dropout(where: str, value) -> float:
    """A config's lora_dropout (None: 0.0) as a float in [0, 1)."""
    p = 0.0 if value is None else value
    ok = isinstance(p, (int, float)) and not isinstance(p, bool)
    if not ok or not 0.0 <= p < 1.0:  # NaN fails the comparison
        raise ValueError(f"{where}: lora_dropout={_short(value)}; expected a number in [0, 1)")
    return float(p)


def check_tensors(tensors, where: str, allow_nonfinite: bool) -> None:
    """`tensors` is a dict of str -> dense float tensors with data (a pickle may hold sparse, meta or
    quantized tensors, on which the checks below and the LoRA kernels fail), finite unless allowed.
    A tensor that is not a LoRA factor (a modules_to_save module's) may also be an integer or bool
    buffer, as PEFT saves them (BatchNorm's num_batches_tracked)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"{where} holds a {type(tensors).__name__}, not a dict of tensors")
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(t).__name__}; expected str keys and tensors")
        if t.layout != torch.strided or t.is_meta:
            what = "a meta tensor (no data)" if t.is_meta else f"a {t.layout} tensor"
            raise ValueError(f"{where}: {key} is {what}; expected a dense tensor")
        buffer = not t.is_floating_point() and not t.is_complex() and "lora_" not in key
        if t.dtype not in DTYPES and not buffer:
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
                             + ("" if "lora_" in key else " (or an integer buffer of a modules_to_save module)"))
        if not allow_nonfinite and not torch.isfinite(t).all():
            raise ValueError(f"{where}: {key} holds NaN or inf values; pass allow_nonfinite=True to load it anyway")


def check_targets(where: str, config: dict, modules, weights: str, extra=()) -> None:
    """Every module the weights file holds factors for is one PEFT would adapt under the config's
    target_modules / exclude_modules / layers_to_transform / layers_pattern (PeftModel.from_pretrained
    injects only those and silently drops the other tensors, so loading them would not compute what
    PEFT does; lora_ext.inject selects layers by the same rule, targets.in_layers). Checked for the
    forms that need no model: module-name suffixes or a full-name regex; None (PEFT's per-model
    defaults) and "all-linear" are not checked. Fields of another type, and layer fields PEFT's
    LoraConfig refuses (targets.check_layers), are refused. An ``extra`` tensor (Adapter.extra keys) of
    an adapted module must be under PEFT's "<module>.base_layer.<name>": PEFT skips "<module>.<name>"
    (older PEFT's layout), which lora_ext would load."""
    fields = {}
    for fld in ("target_modules", "exclude_modules"):
        value = config.get(fld)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = list(value)
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {fld} must be a string (a regex) or a list of strings, got {_short(value)}")
        check_regex(where, fld, value)
        fields[fld] = value
    target, exclude = fields["target_modules"], fields["exclude_modules"]
    layers, pattern = check_layers(where, config.get("layers_to_transform"), config.get("layers_pattern"), target)
    for name in modules:
        if exclude is not None and exclude != "all-linear" and matches(name, exclude):
            why = f"exclude_modules={_short(exclude)} excludes"
        elif target is not None and target != "all-linear" and not matches(name, target):
            why = f"target_modules={_short(target)} does not select"
        elif not isinstance(target, str) and name not in (target or []) and not in_layers(name, layers, pattern):
            why = (f"layers_to_transform={_short(config.get('layers_to_transform'))} (layers_pattern="
                   f"{_short(config.get('layers_pattern'))}) does not select")
        else:
            continue
        raise ValueError(f"{where}: {why} module {name!r}, but {weights} holds its LoRA factors "
                         "(PeftModel.from_pretrained would not load them): fix the config or the weights")
    own = next((k for k in extra if k.rpartition(".")[0] in modules), None)
    if own is not None:
        mod, _, leaf = own.rpartition(".")
        raise ValueError(f"{where}: {weights} holds {own}, but {mod!r} has LoRA factors, so PEFT names its own {leaf} "
                         f"{mod}.base_layer.{leaf} and PeftModel.from_pretrained would not load this key (older PEFT "
                         f"saved it so): rename it to {PEFT_PREFIX}{mod}.base_layer.{leaf}, or drop it")


def check_path(where: str, path) -> str:
    """An adapter directory argument as a str path (TypeError naming the argument otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike (an adapter directory), "
                        f"got {type(path).__name__} {_short(path)}")
    path = os.fspath(path)
    if not isinstance(path, str):  # a PathLike of bytes
        raise TypeError(f"{where}: path must be a str path, got {type(path).__name__} {_short(path)}")
    return path


def split_factors(tensors: dict, where: str, paired: bool = True) -> tuple[dict, dict]:
    """PEFT- or module-named tensors -> ({module: (A, B, kind, DoRA magnitude or None)}, {other key less
    the prefix: tensor}).
    paired=False: B's columns need not be A's rows (a loralib MergedLinear's lora_B [k·d, r])."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    extra = {}
    for key, t in tensors.items():
        m = PEFT_KEY.match(key)
        if m is not None:
            part = parts.setdefault(m["path"], {})
            if m["kind"] in part:  # e.g. a PeftModel.state_dict() with two adapters (".lora_A.a", ".lora_A.b")
                raise ValueError(f"{where}: {key} and {part[m['kind']][0]} are both {m['kind']} of module "
                                 f"{m['path']!r} (several adapters in one state dict? pass one adapter's: "
                                 "peft.get_peft_model_state_dict(model, adapter_name=...))")
            part[m["kind"]] = (key, t)
        elif TRAINING_ONLY.search(key):
            continue
        elif "lora_" in key:
            raise ValueError(f"{where}: {key} is not supported (only lora_A/lora_B/lora_embedding_A/B weights "
                             "and DoRA's lora_magnitude_vector; no lora_B biases (lora_bias))")
        else:
            extra[key.removeprefix(PEFT_PREFIX)] = t
    for key in list(extra):
        # bias="all"/"lora_only" with modules_to_save: PEFT also saves the wrapper's inner tensors,
        # "<m>.modules_to_save.bias" (the copy "<m>.bias" holds too) and "<m>.original_module.bias"
        # (the original, unused while the adapter is on); it loads the model from "<m>.<leaf>"
        inner = WRAPPER_INNER.search(key)
        twin = key[:inner.start()] + "." + inner["leaf"] if inner else None
        if twin in extra and (inner["part"] == "original_module" or torch.equal(extra[twin], extra[key])):
            del extra[key]
    if not parts:
        raise ValueError(f"{where} holds no LoRA weights (keys like '{PEFT_PREFIX}<module>.lora_A.weight' "
                         f"or '<module>.lora_A'; got {sorted(tensors)[:4]})")
    factors = {}
    for name, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a_key not in p or b_key not in p:
            raise ValueError(f"{where}: module {name!r} has {sorted(p)} but needs {a_key} and {b_key}")
        A, B = p[a_key][1], p[b_key][1]
        # a Conv1d/2d/3d's (PEFT): lora_A [r, in, *kernel], lora_B [out, r / groups, 1, ...] (load_adapter
        # checks the groups against the model's convolution)
        conv = not emb and A.dim() in (3, 4, 5) and B.dim() == A.dim() and all(n == 1 for n in B.shape[2:])
        if (not conv and (A.dim() != 2 or B.dim() != 2)) or A.shape[0] == 0 or (paired and (
                A.shape[0] % max(B.shape[1], 1) if conv else A.shape[0] != B.shape[1])):
            raise ValueError(f"{where}: module {name!r} has {a_key} {tuple(A.shape)} and "
                             f"{b_key} {tuple(B.shape)}; expected [r, in] and [out, r] with r > 0"
                             + ("" if emb else " (a convolution's: [r, in, *kernel] and [out, r / groups, 1, ...])"))
        kind = "embedding" if emb else "conv" if conv else "linear"
        mag = p.get("lora_magnitude_vector", (None, None))[1]
        # PEFT's magnitude: [out] (linear; an embedding's [dim]), [1, out, 1, ...] (a convolution's, its
        # norm with keepdim, transposed)
        want = (1, B.shape[0], *B.shape[2:]) if kind == "conv" else (B.shape[0],)
        if mag is not None and tuple(mag.shape) != want:
            owner = "a convolution" if kind == "conv" else f"its {b_key}"
            raise ValueError(f"{where}: module {name!r} has lora_magnitude_vector {tuple(mag.shape)}; expected "
                             f"{list(want)} ({owner}'s output features)")
        factors[name] = (A, B, kind, mag)
    return factors, extra


def check_not_root(names, model: nn.Module | None, where: str) -> None:
    """ValueError for a LoRA layer at the model's root (the model is a LoRALinear itself, module name ""):
    PEFT targets only submodules, and adapter files and state dicts name a layer by its module path."""
    if "" in names:
        what = "" if model is None else f" ({type(model).__name__})"
        raise ValueError(f"{where}: the model{what} is itself a LoRA layer, which has no module path (PEFT "
                         "adapts only submodules); put it in a module (e.g. nn.Sequential(layer)), or save "
                         "lora_state_dict(layer, peft_names=False) and load it with layer.load_state_dict(sd, strict=False)")


def config_scale(name: str, r: int, config: dict) -> float | None:
    """The scale an adapter config gives module ``name`` of rank r: alpha (alpha_pattern, else lora_alpha)
    / r, or / sqrt(r) with use_rslora; None without a numeric alpha."""
    alpha = pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha"))
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        return None
    return lora_scaling(alpha, r, bool(config.get("use_rslora")))


def saved_config(layers: dict, config: dict, where: str) -> dict:
    """The config Adapter.save writes for ``layers`` (Adapter.layers, none at the root: check_not_root):
    ``config``, whose target_modules ... must select every module (check_targets) and r / rank_pattern,
    lora_alpha / alpha_pattern, use_rslora and use_dora give it its rank, scale and DoRA magnitude,
    else ValueError naming the module (PEFT and
    Adapter.load would load the file with the config's scale, silently); for an Adapter built in
    memory (no "r"), first the fields of exactly its modules (targets.peft_config, full names; the
    config's own fields win). Parameter layers (target_parameters) are read with the model and not checked here."""
    check_not_root(layers, None, where)
    plain = {n: w for n, w in layers.items() if w.kind != "parameter"}
    if "r" not in config and plain:
        if len(plain) != len(layers):
            raise ValueError(f"{where}: the adapter has LoRA on parameters and no config (r, target_parameters ...): "
                             "save one that Adapter.load or Adapter.from_model gave")
        ranks = {n: w.r for n, w in plain.items()}
        config = {**peft_config(ranks, {n: lora_alpha_for(float(w.scale), w.r, False) for n, w in plain.items()},
                                full_names=True, use_dora=any(w.magnitude is not None for w in plain.values())), **config}
    check_targets(where, config, plain, "the adapter")  # (PEFT would drop a module its target_modules leave out)
    for name, w in plain.items():
        if w.A.shape[0] == 0:
            raise ValueError(f"{where}: module {name!r} has rank 0 (A {tuple(w.A.shape)}): PEFT's r is >= 1")
        r = pattern_value(name, config.get("rank_pattern"), config.get("r"))
        scale = config_scale(name, r, config) if isinstance(r, int) and r > 0 else None
        if scale is None:
            continue  # (a file Adapter.load refuses, naming the field)
        if r != w.r or not math.isclose(scale, float(w.scale), rel_tol=1e-6):
            raise ValueError(f"{where}: module {name!r} has rank {w.r} and scale {float(w.scale):g}, but the config "
                             f"gives r={r}, scale {scale:g} (r / rank_pattern, lora_alpha / alpha_pattern, use_rslora), "
                             "which PEFT and Adapter.load would use: fix adapter.config (or build the Adapter without one)")
        if bool(config.get("use_dora")) != (w.magnitude is not None):
            raise ValueError(f"{where}: module {name!r} " + ("has a DoRA magnitude but the config says use_dora=false"
                             if w.magnitude is not None else "has no DoRA magnitude but the config says use_dora=true"))
    return config


def config_json(config: dict, where: str) -> str:
    """adapter_config.json's text; numpy / torch scalars (an alpha given as np.float32) as plain numbers,
    anything else JSON cannot hold: TypeError naming it (before any file is written)."""
    def plain(o):
        if isinstance(o, torch.Tensor) and o.numel() == 1:
            return o.item()
        if isinstance(o, numbers.Real):  # (numpy's bool_ is no numbers.Real: refused below)
            return int(o) if isinstance(o, numbers.Integral) else float(o)
        raise TypeError(f"{where}: the adapter config holds a {type(o).__name__} ({o!r:.60}), which JSON cannot hold")
    return json.dumps(config, indent=2, default=plain)
