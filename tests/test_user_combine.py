"""A user combining and re-saving adapters, with PEFT as the oracle: combined adapters whose inputs
target some layers only, and adapters whose file holds a targeted embedding's table, saved again."""
import copy
import warnings

import pytest
import torch
from conftest import rel_err
from models import saved_peft, tiny_llama

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")


def peft_lora_modules(pm) -> set:
    """The module names (as the base model's) PEFT wrapped with a LoRA layer."""
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in pm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@torch.no_grad()
def test_combined_adapter_of_some_layers_makes_peft_wrap_only_those(tmp_path):
    """An input whose target_modules are full module names (PEFT's ["model.layers.0.self_attn.q_proj"]),
    or an Adapter built in memory (no config), selects fewer modules than their leaves name: the
    combined config listed the leaves ("q_proj"), so PEFT wrapped q_proj in every layer ("Found
    missing adapter keys" for the others, trained by PEFT if training resumes), not the README's
    "PEFT wraps no other layer"."""
    base = tiny_llama(seed=1)
    saved_peft(base, tmp_path / "a", 0, target_modules=["model.layers.0.self_attn.q_proj"])
    saved_peft(base, tmp_path / "b", 1, r=2, target_modules=["v_proj"])
    a, b = Adapter.load(tmp_path / "a"), Adapter.load(tmp_path / "b")
    m = copy.deepcopy(base)
    lora_ext.inject(m, ["model.layers.1.self_attn.k_proj"], r=3, alpha=5)
    for lw in lora_ext.lora_layers(m).values():
        lw.lora_B.normal_(0, 0.1)
    made = Adapter(Adapter.from_model(m).layers)  # built in memory: no config
    ids = torch.randint(0, 128, (2, 10))
    for i, inputs in enumerate(([a, b], [made, b])):
        both = lora_ext.combine(inputs, [0.8, -0.5])
        both.save(tmp_path / f"both{i}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"both{i}").eval()
        assert peft_lora_modules(theirs) == set(both.layers), both.config["target_modules"]
        assert not [w for w in caught if "missing adapter keys" in str(w.message)]
        ours = copy.deepcopy(base)
        lora_ext.load_adapter(ours, tmp_path / f"both{i}")
        assert rel_err(theirs(ids).logits, ours(ids).logits) < 1e-5
    # leaf names that select all the inputs' modules stay leaves (a short config, as PEFT's)
    saved_peft(base, tmp_path / "c", 2, target_modules=["q_proj"])
    assert lora_ext.combine([Adapter.load(tmp_path / "c"), b]).config["target_modules"] == ["q_proj", "v_proj"]


@torch.no_grad()
def test_embedding_table_from_the_file_is_saved_again(tmp_path):
    """PEFT saves a targeted embedding's table (base_layer.weight: rows of added tokens) and
    load_adapter writes it into the model, but Adapter.from_model dropped it: the re-saved adapter
    gave the base model's rows for those tokens (logits off by ~100%, in PEFT and lora_ext alike).
    Also from a merged model: the table unmerged, the merged weight left bit for bit."""
    base = tiny_llama(seed=1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["embed_tokens", "q_proj"]))
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    pm.base_model.model.model.embed_tokens.base_layer.weight[100:] = torch.randn(28, 64, generator=g)  # new tokens
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    ids = torch.tensor([[101, 110, 127, 5, 64]])
    want = pm(ids).logits
    key = "model.embed_tokens.base_layer.weight"
    table = Adapter.load(tmp_path / "peft").extra[key]
    for merged in (False, True):
        ours = copy.deepcopy(base)
        lora_ext.load_adapter(ours, tmp_path / "peft")
        if merged:
            lora_ext.merge(ours)
        before = ours.model.embed_tokens.weight.clone()
        again = Adapter.from_model(ours)
        assert torch.equal(ours.model.embed_tokens.weight, before)
        assert torch.equal(again.extra[key], table)
        out = tmp_path / f"again{merged}"
        again.save(out)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        reloaded = copy.deepcopy(base)
        lora_ext.load_adapter(reloaded, out)
        assert rel_err(theirs(ids).logits, want) < 1e-5 and rel_err(reloaded(ids).logits, want) < 1e-5
    # a layer merged for good cannot give its table back: named, not saved merged
    lora_ext.merge(ours)
    ours.model.embed_tokens.drop_merge_state()
    with pytest.raises(ValueError, match=r"Adapter.from_model: 'model.embed_tokens' holds the weight an adapter "
                                         r"file gave it .*merged for good"):
        Adapter.from_model(ours)


@torch.no_grad()
def test_save_writes_a_config_that_gives_each_module_its_scale(tmp_path):
    """Adapter.save wrote self.config as it was: an Adapter built in memory got {"peft_type": "LORA"}
    alone (PEFT loaded it with its defaults, r 8 / lora_alpha 8 and its own target_modules, so
    scale 1 for a 0.5 layer; Adapter.load refused it), and a loaded adapter whose layer was
    re-weighted (combine of that layer) kept the old alpha: PEFT and Adapter.load gave the old scale."""
    q = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    made = Adapter({q: lora_ext.LayerWeights(torch.randn(8, 64, generator=g) * 0.1, torch.randn(64, 8, generator=g), 0.5),
                    "model.embed_tokens": lora_ext.LayerWeights(torch.randn(3, 128, generator=g), torch.randn(64, 3, generator=g),
                                                                -2.0, "embedding")}, name="made")
    made.save(tmp_path / "made")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "made").eval()
    assert peft_lora_modules(theirs) == set(made.layers)
    ours = tiny_llama(seed=1)
    lora_ext.load_adapter(ours, made)
    again = tiny_llama(seed=1)
    lora_ext.load_adapter(again, tmp_path / "made")
    ids = torch.randint(0, 128, (2, 10), generator=g)
    want = ours(ids).logits
    assert rel_err(theirs(ids).logits, want) < 1e-5 and rel_err(again(ids).logits, want) < 1e-6

    saved_peft(tiny_llama(seed=1), tmp_path / "a", 0, target_modules=["q_proj", "v_proj"], use_rslora=True,
               rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    a = Adapter.load(tmp_path / "a")
    a.save(tmp_path / "same")  # what Adapter.load gave saves as it was
    assert Adapter.load(tmp_path / "same").config == a.config
    a.layers[q] = lora_ext.combine([a.layers[q]], [0.5])  # rank 4, scale 1: the config says 3 / sqrt(4)
    with pytest.raises(ValueError, match=rf"Adapter.save: module '{q}' has rank 4 and scale 1, but the config gives "
                                         r"r=4, scale 1.5 .*fix adapter.config"):
        a.save(tmp_path / "stale")
    assert not (tmp_path / "stale").exists()  # checked before any file
    dora = Adapter({q: lora_ext.LayerWeights(torch.randn(2, 64), torch.randn(64, 2), 1.0, magnitude=torch.ones(64))},
                   {"r": 2, "lora_alpha": 2})
    with pytest.raises(ValueError, match=r"has a DoRA magnitude but the config says use_dora=false"):
        dora.save(tmp_path / "dora")


def test_rank_zero_factors_are_refused_by_name():
    """Rank-0 factors combined into a rank-0 layer (an Adapter PEFT and inject cannot take, refused
    later by inject, not by combine) and saved with r = 0."""
    zero = lora_ext.LayerWeights(torch.zeros(0, 4), torch.zeros(3, 0), 1.0)
    with pytest.raises(ValueError, match=r"combine: adapter 1, module 'q': A \(0, 4\) and B \(3, 0\) have rank 0"):
        lora_ext.combine([Adapter({"q": lora_ext.LayerWeights(torch.ones(2, 4), torch.ones(3, 2), 1.0)}),
                          Adapter({"q": zero})])
    with pytest.raises(ValueError, match=r"combine: adapter 0: .* have rank 0"):
        lora_ext.combine([(zero.A, zero.B, 1.0)], how="linear")
    with pytest.raises(ValueError, match=r"Adapter.save: module 'q' has rank 0"):
        Adapter({"q": zero}).save("/nonexistent/never/written")


def test_save_refuses_a_module_the_config_does_not_target(tmp_path):
    """A layer added to a loaded adapter (a module its target_modules leave out) was saved with the
    old config: PeftModel.from_pretrained dropped its factors silently (Adapter.load refused the file)."""
    saved_peft(tiny_llama(seed=1), tmp_path / "a", 0, target_modules=["q_proj", "v_proj"])
    a = Adapter.load(tmp_path / "a")
    k = "model.layers.0.self_attn.k_proj"
    a.layers[k] = lora_ext.LayerWeights(torch.randn(4, 64), torch.randn(32, 4), 2.0)
    with pytest.raises(ValueError, match=rf"Adapter.save: target_modules=.*'q_proj'.* does not select module '{k}', "
                                         r"but the adapter holds its LoRA factors"):
        a.save(tmp_path / "more")
    assert not (tmp_path / "more").exists()
    a.config["target_modules"].append("k_proj")
    a.save(tmp_path / "more")
    assert set(Adapter.load(tmp_path / "more").layers) == set(a.layers)
