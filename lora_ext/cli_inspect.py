"""`python -m lora_ext inspect ADAPTER` (the parser: lora_ext/cli_merge.py add_parsers): what a PEFT
adapter directory holds and whether lora_ext loads and merges it and an AdapterPool can serve it
(LoRA on parameters, target_parameters: listed by PEFT wrapper path and parameter)."""
from __future__ import annotations

import functools
import json
import os
import re

from .adapters import CONFIG_FILE, Adapter, extra_target
from .hparams import lora_alpha_for
from .param_files import NeedsModel
from .targets import pattern_value

__all__ = ["run_inspect", "one_line"]


def one_line(e: BaseException) -> str:
    """An exception as one line (the CLI's error lines)."""
    return " ".join(str(e).split()) or type(e).__name__


def _group(names: list[str]) -> tuple[str, str]:
    """("model.layers.*.self_attn.q_proj", "0-3") for module names that differ in one index."""
    idx = [re.findall(r"\.(\d+)\.", "." + n + ".") for n in names]
    pattern = re.sub(r"\.\d+(?=\.)", ".*", names[0])
    flat = sorted({int(i[0]) for i in idx if i})
    if not flat:
        return names[0], ""
    runs, start = [], flat[0]
    for a, b in zip(flat, flat[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return pattern, ", ".join(runs)


def _extra_kind(key: str, adapter: Adapter) -> str:
    mod, leaf = extra_target(key)
    if mod in adapter.layers and adapter.layers[mod].kind == "embedding" and leaf == "weight":
        return "the embedding's table (PEFT saves it; servable if unchanged)"
    if leaf == "bias":
        return "trained bias"
    return "modules_to_save"


def _alpha(adapter: Adapter, name: str, w) -> float:
    """A layer's lora_alpha: alpha_pattern on its module name; a parameter layer's (PEFT keys it on
    the parameter's name, which only the model may tell) the alpha its scale and rank give."""
    if w.kind == "parameter":
        return lora_alpha_for(w.scale, w.r, bool(adapter.config.get("use_rslora")))
    return pattern_value(name, adapter.config.get("alpha_pattern"), adapter.config["lora_alpha"])


def _config_max_rank(raw: dict) -> int:
    """The largest rank the config gives (r, rank_pattern): Adapter.load checks the file's against it."""
    ranks = [raw.get("r"), *(raw.get("rank_pattern") or {}).values()]
    return max((r for r in ranks if isinstance(r, int)), default=0)


def _pool_problems_from_config(raw: dict, max_rank: int) -> list[str]:
    """AdapterPool's refusals as far as the config tells them (a file whose layers only the model reads)."""
    why = []
    if raw.get("modules_to_save") or raw.get("bias") not in (None, "none"):
        why.append(f"it carries trained non-LoRA tensors (modules_to_save={json.dumps(raw.get('modules_to_save'))}, "
                   f"bias={json.dumps(raw.get('bias'))}) that a shared pool cannot apply per request")
    if _config_max_rank(raw) > max_rank:
        why.append(f"rank {_config_max_rank(raw)} > max_rank {max_rank}")
    return why


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    # no markup: paths and regexes ("[qk]_proj") print as they are; a verdict is one line (soft_wrap)
    out = Console(highlight=False, markup=False)
    line = functools.partial(out.print, soft_wrap=True)
    path = args.adapter
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    head = Table(title=f"adapter {path}", show_header=False)
    for key in ("peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "r",
                "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                "target_parameters", "fan_in_fan_out", "bias", "modules_to_save", "rank_pattern", "alpha_pattern",
                "use_dora"):
        if key in raw and raw[key] not in (None, {}, []) or key in ("peft_type", "peft_version"):
            head.add_row(key, json.dumps(raw.get(key)) if key in raw else "not recorded")
    try:
        adapter = Adapter.load(path, allow_pickle=args.allow_pickle)
    except NeedsModel as e:  # readable only with the model: the table cannot show its layers
        out.print(head)
        line(f"lora_ext: loads and merges with the model only (load_adapter, python -m lora_ext merge): {one_line(e)}")
        why = _pool_problems_from_config(raw, args.max_rank)
        if why:
            line(f"AdapterPool: cannot serve it: {'; '.join(why)}")
        else:  # AdapterPool.load reads such a file against the pool's experts modules
            modules = raw.get("target_modules")
            serve = ([f"target_modules={json.dumps(modules)}"] if modules else []) + [
                f"target_parameters={raw.get('target_parameters')} (MoE experts)"]
            line(f"AdapterPool: can serve it (max_rank >= {_config_max_rank(raw)}, {', '.join(serve)}; "
                 "AdapterPool.load reads it against the pool's experts modules)")
        return 1 if why and args.pool else 0
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        out.print(head)
        line(f"lora_ext: cannot load this adapter: {one_line(e)}")
        return 1
    groups: dict[tuple, list[str]] = {}
    for name, w in adapter.layers.items():
        alpha = _alpha(adapter, name, w)
        shape = f"{w.A.shape[1]} → {w.B.shape[0]}" + (
            f", kernel {'×'.join(map(str, w.A.shape[2:]))}" if w.kind == "conv" else
            f", {w.num_experts} expert{'s' * (w.num_experts > 1)}" if w.kind == "parameter" else "")
        kind = w.kind if w.kind != "parameter" else f"parameter {w.parameter or '(decided by the model)'}"
        key = (re.sub(r"\.\d+(?=\.)", ".*", name), kind, shape, w.r, alpha, w.scale,
               f"{str(w.A.dtype).removeprefix('torch.')}", w.A.numel() + w.B.numel())
        groups.setdefault(key, []).append(name)
    mods = Table(title=f"{len(adapter.layers)} LoRA modules")
    for col in ("modules", "layers", "kind", "in → out", "r", "alpha", "scale", "dtype", "params"):
        mods.add_column(col, justify="right" if col in ("r", "alpha", "scale", "params") else "left",
                        overflow="fold")
    for (pattern, kind, shape, r, alpha, scale, dtype, n), names in sorted(groups.items()):
        pat, layers = _group(names)
        mods.add_row(pat, layers, kind, shape, str(r), f"{alpha:g}", f"{scale:.6g}", dtype, f"{n * len(names):,}")
    lora_params = sum(w.A.numel() + w.B.numel() for w in adapter.layers.values())
    dora = bool(adapter.config.get("use_dora"))
    if dora:
        head.add_row("DoRA magnitudes", f"{sum(w.magnitude.numel() for w in adapter.layers.values()):,} "
                     "(lora_magnitude_vector, one per output feature)")
    extra_params = sum(t.numel() for t in adapter.extra.values())
    head.add_row("LoRA parameters", f"{lora_params:,}")
    if adapter.extra:
        head.add_row("other tensors", f"{len(adapter.extra)} ({extra_params:,} parameters)")
    head.add_row("size", _fmt_bytes(adapter.nbytes()))
    out.print(head)
    out.print(mods)
    if adapter.extra:
        ex = Table(title="other tensors (loaded by load_adapter / merge)")
        for col in ("key", "shape", "dtype", "what"):
            ex.add_column(col, overflow="fold")
        for k, t in sorted(adapter.extra.items()):
            ex.add_row(k, str(tuple(t.shape)), str(t.dtype).removeprefix("torch."), _extra_kind(k, adapter))
        out.print(ex)
    # AdapterPool's rules (lora_ext.pool_checks), as far as the file alone tells them
    trained = sorted(k for k in adapter.extra if not _extra_kind(k, adapter).startswith("the embedding"))
    max_r = max(w.r for w in adapter.layers.values())
    why = []
    if trained:
        why.append(f"it carries trained non-LoRA tensors ({', '.join(trained[:3])}{' ...' if len(trained) > 3 else ''}) "
                   "that a shared pool cannot apply per request")
    convs = sorted(n for n, w in adapter.layers.items() if w.kind == "conv")
    if convs:  # AdapterPool refuses conv factors (no multi-adapter convolution layers)
        why.append(f"it adapts convolutions ({', '.join(convs[:3])}{' ...' if len(convs) > 3 else ''}), which "
                   "multi-adapter serving does not have")
    dora_emb = sorted(n for n, w in adapter.layers.items() if w.kind == "embedding" and w.magnitude is not None)
    if dora_emb:  # AdapterPool refuses them (MultiLoRAEmbedding has no DoRA)
        why.append(f"it has DoRA on embeddings ({', '.join(dora_emb[:3])}), which multi-adapter serving does not compute")
    params = sorted(n for n, w in adapter.layers.items() if w.kind == "parameter")
    if max_r > args.max_rank:
        why.append(f"rank {max_r} > max_rank {args.max_rank}")
    line("lora_ext: loads (Adapter.load, load_adapter) and merges (python -m lora_ext merge" +
         (", alone and with weight 1: DoRA adapters are not combined)" if dora else
          ", alone and with weight 1: LoRA on parameters is not combined)" if params else ")"))
    if why:
        line(f"AdapterPool: cannot serve it: {'; '.join(why)}")
    else:
        modules = sorted({n.rsplit('.', 1)[-1] for n, w in adapter.layers.items() if w.kind != "parameter"})
        serve = ([f"target_modules covering {', '.join(modules)}"] if modules else []) + (
            [f"target_parameters={adapter.config.get('target_parameters')} (MoE experts)"] if params else [])
        line(f"AdapterPool: can serve it ({'dora=True, ' if dora else ''}max_rank >= {max_r}, {', '.join(serve)})")
    return 1 if why and args.pool else 0
