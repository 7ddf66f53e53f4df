"""LoRA adapters on disk in HF PEFT's format, both ways.

    adapter = lora_ext.Adapter.load("path/to/adapter")      # adapter_config.json + adapter_model.safetensors
    lora_ext.load_adapter(model, adapter)                    # into an (injected or plain) model
    lora_ext.Adapter.from_model(model).save("out/")          # loads in peft.PeftModel.from_pretrained

Pickle files (adapter_model.bin) are refused unless allow_pickle=True, then read with
torch.load(weights_only=True). Bad files raise ValueError / FileNotFoundError naming the file
and the module; load_adapter validates everything before it touches the model.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .inject import PEFT_PREFIX, _pattern_value, inject, lora_layers
from .layers import LoRAEmbedding, LoRALinear

__all__ = ["Adapter", "LayerWeights", "load_adapter"]

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")


@dataclass
class LayerWeights:
    """One module's LoRA factors: A [r, in] and B [out, r] (embeddings: A [r, num], B [dim, r])."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str = "linear"  # or "embedding"

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass
class Adapter:
    """A LoRA adapter: its PEFT config and the factors of every adapted module (by module path)."""
    layers: dict[str, LayerWeights]
    config: dict = field(default_factory=dict)
    name: str | None = None

    def nbytes(self) -> int:
        return sum(w.A.numel() * w.A.element_size() + w.B.numel() * w.B.element_size()
                   for w in self.layers.values())

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str, allow_pickle: bool = False, device="cpu", dtype=None) -> "Adapter":
        cfg_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"Adapter.load: {cfg_path} not found (a PEFT adapter directory "
                                    f"holds {CONFIG_FILE} and {SAFETENSORS_FILE})")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"Adapter.load: {cfg_path} is not valid JSON: {e}") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"Adapter.load: {cfg_path} has peft_type={config.get('peft_type')!r}, not LORA")
        if config.get("use_dora"):
            raise ValueError(f"Adapter.load: {cfg_path} is a DoRA adapter (use_dora=true); not supported")
        for key in ("r", "lora_alpha"):
            if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
                raise ValueError(f"Adapter.load: {cfg_path}: {key} must be a positive number, got {config.get(key)!r}")
        tensors = _read_weights(path, allow_pickle)
        return cls(_parse_layers(tensors, config, path, device, dtype), config,
                   name=os.path.basename(os.path.normpath(path)))

    @classmethod
    def from_model(cls, model: nn.Module) -> "Adapter":
        """The LoRA factors of an injected model (detached copies) with a matching PEFT config."""
        found = lora_layers(model)
        if not found:
            raise ValueError(f"Adapter.from_model: {type(model).__name__} has no LoRA layers (use lora_ext.inject)")
        layers = {}
        for name, m in found.items():
            if isinstance(m, LoRALinear):
                layers[name] = LayerWeights(m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling)
            else:
                layers[name] = LayerWeights(m.lora_embedding_A.detach().clone(),
                                            m.lora_embedding_B.detach().clone(), m.scaling, "embedding")
        r = Counter(m.r for m in found.values()).most_common(1)[0][0]
        alpha = Counter(m.lora_alpha for m in found.values()).most_common(1)[0][0]
        rslora = any(m.use_rslora for m in found.values())
        config = {
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": sorted({n.split(".")[-1] for n in found}),
            "rank_pattern": {f"^{re.escape(n)}$": m.r for n, m in found.items() if m.r != r},
            "alpha_pattern": {f"^{re.escape(n)}$": m.lora_alpha for n, m in found.items() if m.lora_alpha != alpha},
            "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in found.values()),
            "lora_dropout": max(getattr(m, "lora_dropout", 0.0) for m in found.values()),
            "bias": "none", "task_type": None, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "base_model_name_or_path": None,
            "use_dora": False,
        }
        return cls(layers, config)

    # ---------------------------------------------------------------- writing
    def save(self, path: str) -> None:
        """Writes adapter_config.json + adapter_model.safetensors (PEFT key names)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {}
        for name, w in self.layers.items():
            if w.kind == "linear":
                tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = w.A.contiguous()
                tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = w.B.contiguous()
            else:
                tensors[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = w.A.contiguous()
                tensors[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = w.B.contiguous()
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, os.path.join(path, SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({"peft_type": "LORA", **self.config}, f, indent=2)


def _read_weights(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pk = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, PICKLE_FILE)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"Adapter.load: {st} is corrupt or truncated: {e}") from None
    if os.path.isfile(pk):
        if not allow_pickle:
            raise ValueError(f"Adapter.load: refusing to unpickle {pk} (pickle files can run code); "
                             "convert it to safetensors or pass allow_pickle=True")
        try:
            return torch.load(pk, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unpickling failure is a bad file)
            raise ValueError(f"Adapter.load: {pk} could not be read: {e}") from None
    raise FileNotFoundError(f"Adapter.load: no {SAFETENSORS_FILE} (or {PICKLE_FILE}) in {path}")


def _scale_for(name: str, r: int, config: dict) -> float:
    alpha = _pattern_value(name, config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _parse_layers(tensors: dict, config: dict, path: str, device, dtype) -> dict[str, LayerWeights]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                raise ValueError(f"Adapter.load: {path}: DoRA weights ({key}) are not supported")
            continue  # modules_to_save, biases: not LoRA factors
        parts.setdefault(m["path"], {})[m["kind"]] = t
    if not parts:
        raise ValueError(f"Adapter.load: {path} holds no LoRA weights (keys like "
                         f"'{PEFT_PREFIX}<module>.lora_A.weight')")
    layers = {}
    for name, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a_key not in p or b_key not in p:
            raise ValueError(f"Adapter.load: {path}: module {name!r} has {sorted(p)} but needs {a_key} and {b_key}")
        A, B = p[a_key], p[b_key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"Adapter.load: {path}: module {name!r} has {a_key} {tuple(A.shape)} and "
                             f"{b_key} {tuple(B.shape)}; expected [r, in] and [out, r]")
        r_cfg = _pattern_value(name, config.get("rank_pattern"), config["r"])
        if A.shape[0] != r_cfg:
            raise ValueError(f"Adapter.load: {path}: module {name!r} has rank {A.shape[0]} but the config "
                             f"says r={r_cfg}")
        conv = (lambda t: t.to(device=device, dtype=dtype or t.dtype))
        layers[name] = LayerWeights(conv(A), conv(B), _scale_for(name, A.shape[0], config),
                                    "embedding" if emb else "linear")
    return layers


def load_adapter(model: nn.Module, adapter: Adapter) -> list[str]:
    """Copies an adapter into a model; injects LoRA layers where the model has none yet.

    Every module is validated (exists, right type, shapes fit) before anything changes, so a
    mismatched adapter leaves the model untouched. A LoRA layer of another rank is resized.
    Returns the names of the modules loaded.
    """
    modules = dict(model.named_modules())
    plan = []
    for name, w in adapter.layers.items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"load_adapter: the model has no module {name!r} (adapter "
                             f"{adapter.name or ''} targets {sorted(adapter.layers)[:4]}...)")
        if w.kind == "embedding":
            if not isinstance(m, (nn.Embedding, LoRAEmbedding)):
                raise ValueError(f"load_adapter: module {name!r} is a {type(m).__name__}, the adapter holds embedding weights")
            want = (m.num_embeddings, m.embedding_dim)
            got = (w.A.shape[1], w.B.shape[0])
        else:
            if not isinstance(m, LoRALinear) and not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
                raise ValueError(f"load_adapter: module {name!r} is a {type(m).__name__}, the adapter holds linear weights")
            if isinstance(m, LoRALinear):
                want = (m.in_features, m.out_features)
            elif isinstance(m, nn.Linear):
                want = (m.in_features, m.out_features)
            else:
                want = tuple(m.weight.shape)
            got = (w.A.shape[1], w.B.shape[0])
        if want != got:
            raise ValueError(f"load_adapter: module {name!r} is {want[0]} -> {want[1]} but the adapter's "
                             f"factors are A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")
        plan.append((name, m, w))
    for name, m, w in plan:
        if not isinstance(m, (LoRALinear, LoRAEmbedding)):
            inject(model, f"^{re.escape(name)}$", r=w.r, alpha=w.scale * w.r)
            m = dict(model.named_modules())[name]
        _set_factors(m, w)
    return [p[0] for p in plan]


def _set_factors(m: nn.Module, w: LayerWeights) -> None:
    a_name, b_name = ("lora_A", "lora_B") if isinstance(m, LoRALinear) else ("lora_embedding_A", "lora_embedding_B")
    A_old = getattr(m, a_name)
    A, B = w.A.to(A_old.device, A_old.dtype), w.B.to(A_old.device, A_old.dtype)
    if A_old.shape != A.shape:
        setattr(m, a_name, nn.Parameter(A.clone(), requires_grad=A_old.requires_grad))
        setattr(m, b_name, nn.Parameter(B.clone(), requires_grad=getattr(m, b_name).requires_grad))
    else:
        with torch.no_grad():
            A_old.copy_(A)
            getattr(m, b_name).copy_(B)
    m.r = w.r
    m.scaling = w.scale
    m.lora_alpha = w.scale * (math.sqrt(w.r) if m.use_rslora else w.r)
