"""lora_state_dict's key names: module names are model.state_dict()'s (also for a model that is a
LoRA layer itself, the root module ""), PEFT names join "base_model.model." without a stray dot, and
a loralib model needs a LoRAEmbedding's lora_embedding_A/_B renamed to its lora_A/lora_B (README)."""
import os
import re

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import Adapter, LoRAEmbedding, LoRALinear
from lora_ext.adapters import LayerWeights
from lora_ext.inject import trained_biases


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_text():
    with open(README, encoding="utf-8") as f:
        return " ".join(f.read().split())


def _trained_linear(seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(8, 6, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_()
    lora_ext.mark_only_lora_trainable(layer, bias="lora_only")
    return layer


def test_root_layer_module_names_are_its_state_dict_names():
    layer = _trained_linear()
    sd = lora_ext.lora_state_dict(layer, peft_names=False)
    assert sorted(sd) == ["bias", "lora_A", "lora_B"]
    own = layer.state_dict()
    assert all(torch.equal(t, own[k]) for k, t in sd.items())
    fresh = LoRALinear(8, 6, r=2, alpha=4)
    res = fresh.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == ["weight"]
    assert all(torch.equal(getattr(fresh, k), t) for k, t in sd.items())
    emb = LoRAEmbedding(10, 4, r=2)
    assert sorted(lora_ext.lora_state_dict(emb, peft_names=False)) == ["lora_embedding_A", "lora_embedding_B"]


def test_peft_names_join_the_module_path():
    layer = _trained_linear()
    assert sorted(lora_ext.lora_state_dict(layer)) == [
        "base_model.model.base_layer.bias", "base_model.model.lora_A.weight", "base_model.model.lora_B.weight"]
    assert sorted(lora_ext.lora_state_dict(LoRAEmbedding(10, 4, r=2, use_dora=True))) == [
        "base_model.model.lora_embedding_A", "base_model.model.lora_embedding_B", "base_model.model.lora_magnitude_vector"]
    assert sorted(lora_ext.lora_state_dict(layer, prefix="")) == ["base_layer.bias", "lora_A.weight", "lora_B.weight"]
    (name, key, _), = trained_biases(layer)[0]
    assert (name, key, trained_biases(layer)[1]) == ("", "base_layer.bias", "lora_only")
    # inside a model: as before
    m = nn.Sequential(nn.Embedding(10, 6), nn.Sequential(nn.Linear(6, 4)))
    lora_ext.inject(m, target_modules=["0", "1.0"], r=2, alpha=4)
    lora_ext.mark_only_lora_trainable(m, bias="lora_only")
    assert sorted(lora_ext.lora_state_dict(m, peft_names=False)) == [
        "0.lora_embedding_A", "0.lora_embedding_B", "1.0.bias", "1.0.lora_A", "1.0.lora_B"]
    assert sorted(lora_ext.lora_state_dict(m)) == [
        "base_model.model.0.lora_embedding_A", "base_model.model.0.lora_embedding_B",
        "base_model.model.1.0.base_layer.bias", "base_model.model.1.0.lora_A.weight",
        "base_model.model.1.0.lora_B.weight"]
    assert Adapter.from_model(m).config["bias"] == "lora_only"


def test_root_layer_adapter_paths_raise_clearly(tmp_path):
    layer = _trained_linear()
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    for peft_names in (True, False):
        sd = lora_ext.lora_state_dict(_trained_linear(1), peft_names=peft_names)
        with pytest.raises(ValueError, match=r"load_adapter: state_dict: the model \(LoRALinear\) is itself a "
                                             r"LoRA layer, which has no module path"):
            lora_ext.load_adapter(layer, sd)
    assert all(torch.equal(t, before[k]) for k, t in layer.state_dict().items())
    with pytest.raises(ValueError, match=r"Adapter.from_model: the model \(LoRALinear\) is itself a LoRA layer"):
        Adapter.from_model(layer)
    A, B, scale = layer.lora_factors()
    adapter = Adapter({"": LayerWeights(A.detach(), B.detach(), scale, "linear")}, {"r": 2, "lora_alpha": 4})
    with pytest.raises(ValueError, match="Adapter.save: the model is itself a LoRA layer"):
        adapter.save(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


class _LoralibEmbedding(nn.Embedding):
    """loralib's lora.Embedding parameters: weight, lora_A [r, num], lora_B [dim, r]."""

    def __init__(self, num, dim, r):
        super().__init__(num, dim)
        self.lora_A = nn.Parameter(torch.zeros(r, num))
        self.lora_B = nn.Parameter(torch.zeros(dim, r))


class _LoralibLinear(nn.Linear):
    def __init__(self, n_in, n_out, r):
        super().__init__(n_in, n_out)
        self.lora_A = nn.Parameter(torch.zeros(r, n_in))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r))


def test_embedding_module_names_and_loralib_rename_as_readme_says():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    lora_ext.inject(m, target_modules=["0", "1"], r=2, alpha=4)
    with torch.no_grad():
        for p in lora_ext.lora_state_dict(m, peft_names=False).values():
            p.normal_()
    sd = lora_ext.lora_state_dict(m, peft_names=False)
    # both README places say model.state_dict() names and name loralib's lora_A / lora_B
    text = _readme_text()
    places = [text[i:i + 700] for i in (m_.start() for m_ in re.finditer(r"`lora_state_dict\(model, peft_names=False", text))]
    assert len(places) == 2 and "saves loralib's keys" not in text
    for place in places:
        assert "`model.state_dict()` names" in place and "`lora_embedding_A`/`_B`" in place, place
        assert "`lora_A`/`lora_B`" in place, place
    rename, = re.findall(r"\(`(\{k\.replace\([^`]*\})`\)", text)
    own = m.state_dict()
    assert sorted(sd) == ["0.lora_embedding_A", "0.lora_embedding_B", "1.lora_A", "1.lora_B"]
    assert all(torch.equal(t, own[k]) for k, t in sd.items())
    # README: loralib's load_state_dict(strict=False) skips the embedding's factors unless renamed
    ref = nn.Sequential(_LoralibEmbedding(10, 6, 2), _LoralibLinear(6, 4, 2))
    assert sorted(ref.load_state_dict(sd, strict=False).unexpected_keys) == ["0.lora_embedding_A", "0.lora_embedding_B"]
    renamed = eval(rename, {"sd": sd})  # the README's rename
    assert ref.load_state_dict(renamed, strict=False).unexpected_keys == []
    assert torch.equal(ref[0].lora_A, m[0].lora_embedding_A) and torch.equal(ref[0].lora_B, m[0].lora_embedding_B)
    assert torch.equal(ref[1].lora_A, m[1].lora_A)
    # README: load_adapter takes either naming
    for keys in (sd, renamed):
        fresh = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
        lora_ext.inject(fresh, target_modules=["0", "1"], r=2, alpha=4)
        assert sorted(lora_ext.load_adapter(fresh, keys)) == ["0", "1"]
        assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in sd.items())
