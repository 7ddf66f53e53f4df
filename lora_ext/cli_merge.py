"""`python -m lora_ext merge` and the parser of `inspect` (lora_ext/cli_inspect.py; the command line is
lora_ext/__main__.py).

merge: a transformers model directory + PEFT LoRA adapter(s) -> a plain transformers model
directory (save_pretrained, safetensors) with the adapters folded into the weights by lora_ext's
merge (ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ summed in fp32 and rounded once into each weight's dtype).
inspect (lora_ext/cli_inspect.py): what an adapter directory holds and whether lora_ext can load,
merge and pool-serve it.

Problems with the arguments are argparse usage errors (exit 2); inputs lora_ext refuses (an
adapter file, a base that does not fit, a non-finite merge) are one line ``python -m lora_ext
<cmd>: error: ...`` and exit 1. Neither prints a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
import time

import torch
from torch import nn

from .adapter_checks import read_config
from .adapters import CONFIG_FILE, Adapter, extra_target, load_adapter
from .param_files import NeedsModel
from .cli_inspect import one_line, run_inspect
from .combine import combine
from .inject import lora_layers, peft_parameter_layers
from .merge import merge_and_unload, unmergeable_dtype

__all__ = ["add_parsers", "run", "run_merge", "CommandError"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# PEFT's task_type -> the transformers Auto class its AutoPeftModelFor<Task> loads (peft/auto.py)
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
# files of a model directory the merged model takes over verbatim (tokenizer, processor,
# generation settings); save_pretrained writes config.json and the weights itself
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece*.model", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json")
GENERATION_FILE = "generation_config.json"


class CommandError(Exception):
    """An input the command refuses: printed as one line, exit status 1."""


# ---------------------------------------------------------------- argparse
def _directory(s: str) -> str:
    if not os.path.isdir(s):
        what = "not a directory (pass the adapter directory that holds it)" if os.path.exists(s) else "no such directory"
        raise argparse.ArgumentTypeError(f"{s}: {what}")
    return s


def _new_dir(s: str) -> str:
    if not s:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if os.path.exists(s) and not (os.path.isdir(s) and not os.listdir(s)):
        what = "is not empty" if os.path.isdir(s) else "exists and is not a directory"
        raise argparse.ArgumentTypeError(f"{s} {what}: pick a new directory (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(s))  # checked now, not after the merge: its nearest existing folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "Not a directory" if not os.path.isdir(parent) else "Permission denied"
        raise argparse.ArgumentTypeError(f"cannot create directory {s}: {why} ({parent})")
    return s


def _weight(s: str) -> float:
    try:
        w = float(s)
    except ValueError:
        w = float("nan")
    if w != w or w in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return w


def _rank(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return int(s)


def add_parsers(sub, device_arg) -> None:
    """Adds `merge` and `inspect` to __main__'s subparsers (device_arg: its --device type)."""
    m = sub.add_parser("merge", usage="python -m lora_ext merge [BASE] ADAPTER [ADAPTER ...] --out DIR [options]",
                       help="merge PEFT LoRA adapter(s) into a transformers model; save a plain model",
                       description="Merges PEFT LoRA adapters into a transformers model with lora_ext's merge "
                                   "(ΔW summed in fp32, rounded once into each weight) and saves a plain "
                                   "transformers model (safetensors) with the tokenizer files (a single adapter's own, else "
                                   "BASE's) and BASE's generation config.")
    m.add_argument("paths", nargs="+", metavar="PATH",
                   help="BASE: a transformers model directory; omitted, the first adapter's "
                        "base_model_name_or_path (a local directory) is used. ADAPTER: PEFT adapter directories")
    m.add_argument("--out", required=True, type=_new_dir, help="output directory (new or empty)")
    m.add_argument("--weights", nargs="+", type=_weight, metavar="W",
                   help="one weight per adapter: ΔW = Σ wᵢ·ΔWᵢ (default: 1 each)")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of the merged model (auto: BASE's saved dtype); BASE is converted, then merged")
    m.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    m.add_argument("--safe", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse a merge that would put inf/NaN into a weight (default: --safe)")
    m.add_argument("--task", choices=sorted(TASK_CLASSES),
                   help="PEFT task type deciding the model class (default: the adapters' task_type, "
                        "else BASE's config.architectures)")
    m.add_argument("--tied", choices=["untie", "share"],
                   help="an adapter on a tied embedding / LM head: 'untie' gives the head its own copy of the "
                        "table (the merged model computes what the adapter did), 'share' merges into the "
                        "shared table (as PEFT's merge_and_unload). Default: refuse")
    i = sub.add_parser("inspect", help="what a PEFT adapter holds and whether lora_ext can load / merge / serve it")
    i.add_argument("adapter", type=_directory, metavar="ADAPTER", help="a PEFT adapter directory")
    i.add_argument("--pool", action="store_true", help="exit 1 also when an AdapterPool cannot serve it")
    i.add_argument("--max-rank", type=_rank, default=64, help="the AdapterPool's max_rank to check (default 64)")
    for p in (m, i):
        p.add_argument("--allow-pickle", action="store_true",
                       help="also read adapter_model.bin (older PEFT adapters; torch.load(weights_only=True))")


def run(cmd: str, args, parser: argparse.ArgumentParser) -> int:
    """Runs `merge` / `inspect`; refused inputs -> one line on stderr, exit 1."""
    try:
        if cmd == "inspect":
            return run_inspect(args)
        base, adapters = _split_paths(args.paths, parser)
        if args.weights is not None and len(args.weights) != len(adapters):
            parser.error(f"argument --weights: {len(args.weights)} weight(s) for {len(adapters)} adapter(s)")
        return run_merge(args, base, adapters)
    except (CommandError, ValueError, TypeError, OSError, KeyError) as e:
        print(f"python -m lora_ext {cmd}: error: {one_line(e)}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and load warnings off (the command reports what matters)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# ---------------------------------------------------------------- merge
def _subadapters(path: str) -> str:
    """A hint naming the adapters in ``path``'s subdirectories (PEFT's save_pretrained of several
    adapters puts each non-default one in <dir>/<name>/), else ""."""
    try:
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_FILE)))
    except OSError:  # an unreadable directory: the error says what it lacks
        subs = []
    return f"; adapters in its subdirectories: {', '.join(subs)} (pass {os.path.join(path, '<name>')})" if subs else ""


def _split_paths(paths: list[str], parser) -> tuple[str, list[str]]:
    """(BASE, adapters) from the positional paths; BASE from the first adapter's config if omitted."""
    for p in paths:
        if not os.path.isdir(p):
            parser.error(f"{p}: " + ("not a directory (pass the model or adapter directory that holds it)"
                                     if os.path.exists(p) else "no such directory"))
    first = paths[0]
    is_adapter = os.path.isfile(os.path.join(first, CONFIG_FILE))
    if not is_adapter and not os.path.isfile(os.path.join(first, "config.json")):
        parser.error(f"{first}: neither a transformers model directory (config.json) nor a PEFT adapter "
                     f"directory ({CONFIG_FILE}){_subadapters(first)}")
    base, adapters = (None, paths) if is_adapter else (first, paths[1:])
    if not adapters:
        parser.error(f"no adapter given after BASE {first}")
    for p in adapters:
        if not os.path.isfile(os.path.join(p, CONFIG_FILE)):
            parser.error(f"{p}: not a PEFT adapter directory (no {CONFIG_FILE}){_subadapters(p)}")
    if base is None:
        with open(os.path.join(first, CONFIG_FILE)) as f:
            try:
                named = json.load(f)
            except ValueError as e:  # a refused adapter file (exit 1), as Adapter.load refuses it
                raise CommandError(f"{os.path.join(first, CONFIG_FILE)} is not valid JSON ({e})") from None
        named = named.get("base_model_name_or_path") if isinstance(named, dict) else None
        if named and not isinstance(named, str):  # a hand-edited config: refused as Adapter.load refuses one
            raise CommandError(f"{os.path.join(first, CONFIG_FILE)}: base_model_name_or_path must be a string (a "
                               f"model directory), got {json.dumps(named)[:80]}")
        if not named:
            parser.error(f"BASE omitted and {os.path.join(first, CONFIG_FILE)} names no base_model_name_or_path: "
                         "pass the base model directory first")
        if not os.path.isfile(os.path.join(named, "config.json")):
            parser.error(f"BASE omitted and the adapter's base_model_name_or_path {named!r} is not a local model "
                         "directory; download it (huggingface-cli download ...) and pass the directory first")
        base = named
    return base, adapters


def _model_class(base: str, adapters: list[Adapter], task: str | None):
    """The transformers class to load BASE with: the task type's Auto class (as PEFT's
    AutoPeftModelFor<Task>), else the class config.json's architectures names."""
    import transformers

    tasks = {a.config.get("task_type") for a in adapters} - {None}
    if task is None and len(tasks) > 1:
        raise CommandError(f"the adapters have different task_type values {sorted(tasks)}; pass --task")
    task = task or next(iter(tasks), None)
    if task is not None:
        if task not in TASK_CLASSES:
            raise CommandError(f"task_type {task!r} has no transformers Auto class here "
                               f"(known: {', '.join(sorted(TASK_CLASSES))}); pass --task")
        return getattr(transformers, TASK_CLASSES[task]), task
    config = transformers.AutoConfig.from_pretrained(base)
    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CommandError(f"cannot tell which model class to load {base} with: the adapters have no task_type "
                           f"and config.json's architectures is {arch!r}; pass --task")
    return cls, None


def _checkpoint_keys(base: str) -> set[str] | None:
    """The tensor names of BASE's checkpoint (safetensors or an older pytorch_model.bin: one file or
    an index), None if not found or unreadable (from_pretrained then names the problem)."""
    from safetensors import safe_open

    try:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(base, index)):
                with open(os.path.join(base, index)) as f:
                    return set(json.load(f).get("weight_map", {}))
        single = os.path.join(base, "model.safetensors")
        if os.path.isfile(single):
            with safe_open(single, "pt") as f:
                return set(f.keys())
        single = os.path.join(base, "pytorch_model.bin")
        if os.path.isfile(single):  # mmap: the names without reading the tensors
            return set(torch.load(single, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001  (a corrupt checkpoint: _load_base's error names it)
        return None
    return None


def _num_labels(base: str, adapters: list[Adapter], task: str | None) -> dict:
    """from_pretrained's num_labels for a classification task whose head BASE lacks: the rows of
    the head the adapters save (modules_to_save), so that it fits (PEFT needs the same number)."""
    if task not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    keys = _checkpoint_keys(base)
    if keys is None:
        return {}
    rows = {t.shape[0] for a in adapters for k, t in a.extra.items()
            if k.endswith(".weight") and t.dim() == 2 and k not in keys}
    return {"num_labels": rows.pop()} if len(rows) == 1 else {}


def _load_base(cls, base: str, dtype: str, device: str, extra: set[str], **kwargs):
    import safetensors

    # a truncated or corrupt checkpoint (SafetensorError), weights that do not fit config.json: one line
    # (transformers logs its size report as a warning, which _quiet_transformers hides; named here instead)
    unreadable = (RuntimeError, getattr(safetensors, "SafetensorError", RuntimeError))
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(base, dtype=DTYPES.get(dtype, "auto"), output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
    except unreadable as e:
        raise CommandError(f"cannot load {base} as {cls.__name__}: {one_line(e)}") from None
    bad = sorted(f"{m[0]} ({list(m[1])} in the checkpoint, {list(m[2])} in the model)" if isinstance(m, tuple)
                 else str(m) for m in info.get("mismatched_keys", ()))
    if bad:
        raise CommandError(f"{base}: its weights do not fit its config.json ({type(model).__name__}): "
                           f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    # weights the class has but BASE lacks are random: only the adapters' modules_to_save may fill them
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in extra)
    if missing:
        raise CommandError(f"{base} holds no weights for {missing[:4]}{' ...' if len(missing) > 4 else ''} of "
                           f"{type(model).__name__} (they would be random) and the adapters do not hold them "
                           "(modules_to_save)")
    return model.to(device).eval()


def _same_as_model(model: nn.Module, key: str, t: torch.Tensor) -> bool:
    """Whether an adapter's extra tensor ``key`` equals the model's (AdapterPool's rule)."""
    mod, leaf = extra_target(key)
    try:
        old = getattr(model.get_submodule(mod), leaf, None)
    except AttributeError:
        return False
    return (isinstance(old, torch.Tensor) and old.shape == t.shape
            and torch.equal(old.detach(), t.to(old.device, old.dtype)))


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    """model.get_input_embeddings() / get_output_embeddings(); None where the class has none
    (transformers raises NotImplementedError for models without token embeddings: vision,
    audio, time series)."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def _tied_modules(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding, output head) names when they share one weight, else None."""
    emb, head = _embeddings(model, "get_input_embeddings"), _embeddings(model, "get_output_embeddings")
    if emb is None or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(emb)], names[id(head)]


def _untie(model: nn.Module, head: str) -> None:
    """The output head takes its own copy of the shared table; saved untied."""
    mod = model.get_submodule(head)
    mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    _set_untied(model)


def _set_untied(model: nn.Module) -> None:
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


def _factors_as_saved(model: nn.Module, adapter: Adapter) -> None:
    """load_adapter gives each LoRA layer's factors the weight's dtype (its forward's); the merge
    takes fp32/fp16/bf16 factors on any weight, so put back the file's (combine's fp32) values:
    the merge of an fp32 adapter into a bf16 model is then round(W + ΔW) with ΔW from the file's
    numbers, not from their bf16 roundings (float64 factors become fp32, the kernels' widest).
    A DoRA magnitude becomes fp32 (the file's values; PEFT loads 16-bit adapters as fp32,
    autocast_adapter_dtype): round(g·(W + ΔW)) with the norm and g in fp32, as PEFT's merge.
    LoRAParameter layers (target_parameters) alike: each expert's W + s·B_e·A_e from the file's values."""
    layers = {**lora_layers(model), **peft_parameter_layers(model)}
    for name, w in adapter.layers.items():
        layer = layers[name]
        saved = zip(("lora_A", "lora_B") if w.kind == "parameter" else layer.factor_names, (w.A, w.B))
        if w.magnitude is not None:
            saved = [*saved, ("lora_magnitude_vector", w.magnitude.float())]
        for pname, t in saved:
            if t.dtype not in DTYPES.values():
                t = t.float()
            setattr(layer, pname, nn.Parameter(t.to(getattr(layer, pname).device), requires_grad=False))


def _copy_files(src: str, out: str, patterns) -> list[str]:
    copied = []
    for pat in patterns:
        for path in sorted(glob.glob(os.path.join(glob.escape(src), pat))):
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
                copied.append(os.path.basename(path))
    return sorted(set(copied))


def _has_tokenizer(path: str) -> bool:
    return any(glob.glob(os.path.join(glob.escape(path), p)) for p in ("tokenizer*", "vocab.*", "spiece.model"))


def run_merge(args, base: str, paths: list[str]) -> int:
    """Loads BASE, folds the adapters in (lora_ext.load_adapter + merge_and_unload), saves the model."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # no markup, no wrapping: paths print as they are ("run[v2]"), one line each
    log = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    t0 = time.perf_counter()
    adapters, deferred = [], []
    pickle = args.allow_pickle
    for i, p in enumerate(paths):
        try:
            adapters.append(Adapter.load(p, allow_pickle=pickle))
        except NeedsModel:  # LoRA on parameters whose scales the model's parameter order decides: read
            adapters.append(Adapter({}, read_config(os.path.join(p, CONFIG_FILE))))  # again once it is loaded
            deferred.append(i)
    weights = args.weights or [1.0] * len(adapters)
    dora = [p for p, a in zip(paths, adapters) if a.config.get("use_dora")]
    if dora and (len(adapters) > 1 or weights[0] != 1.0):
        raise CommandError(f"{dora[0]} is a DoRA adapter (use_dora): it merges only alone and with weight 1 (a "
                           "weighted sum of DoRA adapters is not a DoRA adapter: each rescales the rows of W0 + ΔWᵢ "
                           "by its own trained magnitude)")
    params = [p for p, a in zip(paths, adapters) if a.config.get("target_parameters")]
    if params and (len(adapters) > 1 or weights[0] != 1.0):
        raise CommandError(f"{params[0]} has LoRA on parameters (target_parameters): it merges only alone and with "
                           "weight 1 (such adapters are not combined)")
    cls, task = _model_class(base, adapters, args.task)
    log.print(f"loading {base} ({cls.__name__}, dtype {args.dtype}) on {args.device}")
    model = _load_base(cls, base, args.dtype, args.device, {k for a in adapters for k in a.extra},
                       **_num_labels(base, adapters, task))
    for i in deferred:
        adapters[i] = Adapter.load(paths[i], allow_pickle=pickle, model=model)
    if len(adapters) == 1 and weights[0] == 1.0:
        combined = adapters[0]
    else:
        # tensors equal to BASE's (the embedding table PEFT saves with an embedding LoRA) change
        # nothing; others (modules_to_save, trained biases) cannot be weighted or summed
        changed = [f"{p} ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})" for p, keys in
                   ((p, sorted(k for k, t in a.extra.items() if not _same_as_model(model, k, t)))
                    for p, a in zip(paths, adapters)) if keys]
        if changed:
            raise CommandError(f"{'; '.join(changed)}: non-LoRA tensors (modules_to_save or trained biases) "
                               "cannot be weighted or summed: merge such an adapter alone, with weight 1")
        combined = combine(adapters, weights, how="cat")  # exact: rank Σrᵢ, B·A = Σ wᵢsᵢBᵢAᵢ in fp32
    tied = _tied_modules(model)
    adapted = set(combined.layers)
    if tied is not None and adapted & set(tied):
        on = sorted(adapted & set(tied))[0]
        if args.tied is None:
            raise CommandError(f"the adapter changes {on!r}, whose weight is tied to {tied[1 - tied.index(on)]!r} "
                               f"(tie_word_embeddings): pass --tied untie (the head keeps the base table: the "
                               f"merged model computes what the adapter did) or --tied share (both change, as "
                               f"PEFT's merge_and_unload)")
        if args.tied == "untie":
            _untie(model, tied[1])
    loaded = load_adapter(model, combined)
    _factors_as_saved(model, combined)
    if tied is not None and _tied_modules(model) is None:
        _set_untied(model)  # untied, or modules_to_save replaced one of them: the file keeps both
    for name, layer in lora_layers(model).items():  # what no merge can fold in (--no-safe or not)
        if (why := layer.merge_refusal()) is not None:
            raise CommandError(f"module {name!r} cannot be merged: {why}; this adapter runs only unmerged "
                               "(lora_ext.load_adapter, or PEFT without merge_and_unload)")
    for name, layer in {**lora_layers(model), **peft_parameter_layers(model)}.items():
        if (dt := unmergeable_dtype(layer)) is not None:  # (a float64 checkpoint under --dtype auto)
            raise CommandError(f"module {name!r} has a {str(dt).removeprefix('torch.')} weight; the merge "
                               f"takes {', '.join(DTYPES)}: pass --dtype (e.g. --dtype float32)")
    try:
        merged = merge_and_unload(model, safe=args.safe, allow_tied=args.tied == "share")
    except ValueError as e:  # checked before any weight changes
        if "tied weights" in str(e):  # a tie other than the input embedding / LM head pair
            raise CommandError(f"{str(e).split('; pass allow_tied')[0]}; pass --tied share to merge anyway") from None
        raise CommandError(f"refusing to write non-finite weights (--no-safe writes them): {e}") from None
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # only with --no-safe (or a base that held them already)
        log.print(Text("warning:", style="yellow"), f"non-finite values in {bad[:4]}{' ...' if len(bad) > 4 else ''}")
    log.print(f"merged {len(loaded)} module(s); writing {args.out}")
    os.makedirs(args.out, exist_ok=True)
    with _quiet_transformers():
        merged.save_pretrained(args.out)  # safetensors
    tok_src = paths[0] if len(paths) == 1 and _has_tokenizer(paths[0]) else base
    copied = _copy_files(tok_src, args.out, TOKENIZER_FILES) + _copy_files(base, args.out, [GENERATION_FILE])
    table = Table(title=f"merged model: {args.out}", show_header=False)
    table.add_row("base", f"{base} → {type(merged).__name__}" + (f" (task {task})" if task else ""))
    for p, a, w in zip(paths, adapters, weights):
        ranks = sorted({lw.r for lw in a.layers.values()})
        table.add_row("adapter", f"{p}: {len(a.layers)} modules, r {'/'.join(map(str, ranks))}, weight {w:g}"
                      + (f", {len(a.extra)} other tensors" if a.extra else ""))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in merged.parameters()})
    table.add_row("merged", f"{len(loaded)} modules, {', '.join(dtypes)} on {args.device}, "
                  f"{'checked finite' if args.safe else 'not checked (--no-safe)'}")
    if tied is not None:
        table.add_row("tied", f"{tied[0]} / {tied[1]}: " + ("shared" if _tied_modules(merged) else "untied"))
    table.add_row("files", ", ".join(sorted(os.listdir(args.out))))
    table.add_row("copied", f"from {tok_src}" + (f": {', '.join(copied)}" if copied else ": nothing (no tokenizer files)"))
    table.add_row("time", f"{time.perf_counter() - t0:.1f} s")
    Console(highlight=False, markup=False).print(table)
    return 0
