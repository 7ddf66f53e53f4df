"""inject's layers_to_transform / layers_pattern select the modules PEFT's get_peft_model wraps for
the same config (tiny Llama / GPT-2 built from configs), bad values raise ValueError naming the
argument, and Adapter.load applies the same rule to adapter files (PEFT drops the factors of layers
its config does not select)."""
import json
import warnings

import pytest
import torch
from models import tiny_gpt2, tiny_llama

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")

LLAMA_CASES = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[2], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern=["h", "layers"]),
    dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="model.layers"),
    dict(target_modules=["o_proj"], layers_to_transform=[1], layers_pattern=[]),
    dict(target_modules=["v_proj"], layers_to_transform=1, layers_pattern=""),
    # a full module name is taken in any layer (PEFT's exact-key match skips the layer filter)
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),
    # nothing selected: both refuse
    dict(target_modules=["q_proj"], layers_to_transform=[7]),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks"),
]
GPT2_CASES = [
    dict(target_modules=["c_attn"], layers_to_transform=1),
    dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0], layers_pattern="h"),
    dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern=["layers"]),
]


def peft_wrapped(model, kw):
    """The module names get_peft_model wraps in LoRA layers (None: it raises ValueError)."""
    from peft.tuners.lora import LoraLayer

    try:
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, **kw))
    except ValueError:
        return None
    inner = pm.base_model.model
    return sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))


def ours_wrapped(model, kw):
    try:
        names = lora_ext.inject(model, r=2, alpha=4, **kw)
    except ValueError:
        return None
    assert sorted(names) == sorted(lora_ext.lora_layers(model))
    return sorted(names)


@pytest.mark.parametrize("kw", LLAMA_CASES + GPT2_CASES, ids=str)
def test_inject_wraps_what_peft_wraps(kw):
    make = tiny_gpt2 if kw in GPT2_CASES else (lambda: tiny_llama(layers=3))
    want = peft_wrapped(make(), kw)
    assert ours_wrapped(make(), kw) == want
    if kw.get("layers_to_transform") not in (None, []) and want is not None:
        assert want != ours_wrapped(make(), {"target_modules": kw["target_modules"]})  # the filter did something


@pytest.mark.parametrize("kw, match", [
    (dict(layers_to_transform="1"), r"layers_to_transform must be an int >= 0 or a list of them.*'1'"),
    (dict(layers_to_transform=1.0), r"layers_to_transform must be an int >= 0"),
    (dict(layers_to_transform=True), r"layers_to_transform must be an int >= 0"),
    (dict(layers_to_transform=[0, -1]), r"layers_to_transform must be an int >= 0.*\[0, -1\]"),
    (dict(layers_to_transform=[0, "a"]), r"layers_to_transform must be an int >= 0"),
    (dict(layers_to_transform=[0], layers_pattern=5), r"layers_pattern must be a str or a list of str.*5"),
    (dict(layers_to_transform=[0], layers_pattern=["layers", None]), r"layers_pattern must be a str or a list of str"),
    (dict(layers_to_transform=[0], layers_pattern="("), r"layers_pattern '\(' is not a valid regex"),
    (dict(layers_pattern="layers"), r"layers_pattern='layers' needs layers_to_transform"),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), r"layers_to_transform works only with a list of target_modules"),
    (dict(target_modules="all-linear", layers_to_transform=0), r"layers_to_transform works only with a list of target_modules"),
    (dict(target_modules=r".*q_proj", layers_pattern="layers"), r"layers_pattern works only with a list of target_modules"),
    # an int too long for repr (inside a list) is still described, not Python's 'Exceeds the limit' error
    (dict(layers_to_transform=[10**5000, -1]), r"layers_to_transform must be an int >= 0 .*got <a list holding an int too long"),
    (dict(layers_to_transform=[0], layers_pattern=[10**5000]), r"layers_pattern must be a str .*got <a list holding an int"),
])
def test_bad_layer_arguments_are_refused_by_name(kw, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match="inject: " + match):
        lora_ext.inject(model, **{"target_modules": ["q_proj"], **kw})
    assert not lora_ext.lora_layers(model)
    if kw.get("layers_pattern") == "layers" or isinstance(kw.get("target_modules"), str):
        with pytest.raises(ValueError):  # PEFT's LoraConfig refuses these combinations too
            peft.LoraConfig(**{"target_modules": ["q_proj"], **kw})


def test_no_match_names_the_layers():
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM in layers_to_transform=\[5\]"):
        lora_ext.inject(tiny_llama(), ["q_proj"], layers_to_transform=[5])


def test_adapter_files_follow_the_same_rule(tmp_path):
    """A file whose config selects layer 1 but which also holds layer 0's factors: PEFT loads only
    layer 1 (and drops the rest), so Adapter.load refuses it, naming the field; a PEFT adapter
    trained with layers_to_transform loads and gives PEFT's logits."""
    ids = torch.randint(0, 128, (2, 9))
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj"], r=2, alpha=4)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            m.lora_B.normal_(0, 0.2)
    Adapter.from_model(model).save(tmp_path / "all")
    cfg_path = tmp_path / "all" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) | {"layers_to_transform": [1], "layers_pattern": "layers"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config.json: layers_to_transform=\[1\] \(layers_pattern='layers'\) "
                                         r"does not select module 'model.layers.0.self_attn.q_proj'"):
        Adapter.load(tmp_path / "all")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all")
    assert [n for n, _ in theirs.named_modules() if n.endswith("q_proj.lora_A")] == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A"]
    # trained by PEFT with layers_to_transform: loads, injects the same modules, same logits
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                           layers_to_transform=1, layers_pattern="layers"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    loaded = lora_ext.load_adapter(ours, tmp_path / "peft")
    assert sorted(loaded) == ours_wrapped(tiny_llama(), dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"layers_to_transform": "1"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: layers_to_transform must be an int or a list"):
        Adapter.load(tmp_path / "peft")


@pytest.mark.parametrize("kw", [dict(layers_to_transform=[1]), dict(exclude_modules=["model.layers.0.self_attn.v_proj"])])
def test_adapter_of_a_partly_injected_model_loads_into_peft_as_injected(tmp_path, kw):
    """Adapter.from_model of a model injected in some layers only: PeftModel.from_pretrained wraps
    exactly those modules (its config used to name the leaves, so PEFT wrapped q_proj/v_proj in
    every layer and warned of missing adapter keys), with the same logits; Adapter.load takes it."""
    ids = torch.randint(0, 128, (2, 9))
    model = tiny_llama(layers=3)
    names = lora_ext.inject(model, ["q_proj", "v_proj"], r=2, alpha=4, **kw)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            m.lora_B.normal_(0, 0.2)
        want = model(ids).logits
    Adapter.from_model(model).save(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(layers=3), tmp_path / "a").eval()
    assert sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if hasattr(m, "lora_A") and n.count(".") > 2) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert sorted(Adapter.load(tmp_path / "a").layers) == sorted(names)
    # a model injected everywhere keeps the short form
    full = tiny_llama(layers=3)
    lora_ext.inject(full, ["q_proj", "v_proj"], r=2)
    assert Adapter.from_model(full).config["target_modules"] == ["q_proj", "v_proj"]


def test_combined_layer_selected_adapters_load_into_peft_as_selected(tmp_path):
    """combine of PEFT adapters trained with layers_to_transform=[1]: the combined config names the
    modules in full, so PEFT wraps layer 1 only (its config used to name the leaves: PEFT wrapped
    every layer and warned of missing adapter keys) and gives lora_ext's logits."""
    ids = torch.randint(0, 128, (2, 9))
    for seed in (1, 2):
        pm = peft.get_peft_model(tiny_llama(layers=3), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                       layers_to_transform=[1]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2 * seed)
        pm.save_pretrained(tmp_path / f"a{seed}")
    both = lora_ext.combine([Adapter.load(tmp_path / "a1"), Adapter.load(tmp_path / "a2")], [0.5, 2.0])
    both.save(tmp_path / "both")
    ours = tiny_llama(layers=3)
    lora_ext.load_adapter(ours, tmp_path / "both")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(layers=3), tmp_path / "both").eval()
    assert sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if hasattr(m, "lora_A") and n.count(".") > 2) == sorted(both.layers) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
