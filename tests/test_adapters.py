"""PEFT-format adapters both ways: PEFT -> lora_ext -> PEFT, bad files, model left unchanged."""
import copy
import json
import os

import pytest
import torch
from conftest import rel_err
from models import tiny_gpt2, tiny_llama

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")


def peft_adapter(tmp_path, seed=1, r=4, targets=("q_proj", "v_proj", "embed_tokens"), rank_pattern=None,
                 alpha_pattern=None, use_rslora=False, base=None):
    base = base or tiny_llama()
    cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {}, use_rslora=use_rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.1
    path = os.path.join(tmp_path, f"adapter{seed}")
    pm.save_pretrained(path)
    return base, pm, path


def test_peft_to_lora_ext_outputs_match(tmp_path):
    base, pm, path = peft_adapter(tmp_path, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})
    ad = Adapter.load(path)
    assert ad.layers["model.layers.0.self_attn.v_proj"].r == 2
    assert ad.layers["model.layers.0.self_attn.q_proj"].scale == 4.0
    assert ad.layers["model.embed_tokens"].kind == "embedding"
    ours = copy.deepcopy(base)
    loaded = lora_ext.load_adapter(ours, ad)  # injects the missing LoRA layers
    assert len(loaded) == 5
    ids = torch.randint(0, 128, (2, 10))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_lora_ext_to_peft_round_trip_exact(tmp_path):
    base, pm, path = peft_adapter(tmp_path, use_rslora=True)
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, Adapter.load(path))
    out = os.path.join(tmp_path, "ours")
    Adapter.from_model(ours).save(out)
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(path, "adapter_model.safetensors")), load_file(os.path.join(out, "adapter_model.safetensors"))
    a = {k: v for k, v in a.items() if "lora_" in k}  # PEFT also saves the targeted embedding table
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(reloaded(ids).logits, pm(ids).logits, rtol=0, atol=0)


def test_gpt2_conv1d_adapter(tmp_path):
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.1)
    pm.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, Adapter.load(str(tmp_path)))
    ids = torch.randint(0, 128, (2, 10))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_rank_change_resizes_layer(tmp_path):
    base, pm, path = peft_adapter(tmp_path, r=8, targets=("q_proj",))
    ours = copy.deepcopy(base)
    lora_ext.inject(ours, ["q_proj"], r=2)
    lora_ext.load_adapter(ours, Adapter.load(path))
    assert ours.model.layers[0].self_attn.q_proj.lora_A.shape == (8, 64)
    ids = torch.randint(0, 128, (1, 6))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_bad_files_raise_clear_errors(tmp_path):
    base, pm, path = peft_adapter(tmp_path, targets=("q_proj",))
    st = os.path.join(path, "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        Adapter.load(str(tmp_path))
    # truncated weights
    bad = os.path.join(tmp_path, "trunc")
    os.makedirs(bad)
    open(os.path.join(bad, "adapter_config.json"), "w").write(open(os.path.join(path, "adapter_config.json")).read())
    open(os.path.join(bad, "adapter_model.safetensors"), "wb").write(open(st, "rb").read()[:200])
    with pytest.raises(ValueError, match="trunc/adapter_model.safetensors is corrupt"):
        Adapter.load(bad)
    # broken JSON
    open(os.path.join(bad, "adapter_config.json"), "w").write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Adapter.load(bad)
    # pickle refused unless opted in
    pk = os.path.join(tmp_path, "pickle")
    os.makedirs(pk)
    open(os.path.join(pk, "adapter_config.json"), "w").write(open(os.path.join(path, "adapter_config.json")).read())
    from safetensors.torch import load_file

    torch.save(load_file(st), os.path.join(pk, "adapter_model.bin"))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        Adapter.load(pk)
    assert len(Adapter.load(pk, allow_pickle=True).layers) == 2
    # rank in file disagrees with config
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    cfg["r"] = 3
    json.dump(cfg, open(os.path.join(pk, "adapter_config.json"), "w"))
    with pytest.raises(ValueError, match="rank 4 but the config says r=3"):
        Adapter.load(pk, allow_pickle=True)


def test_mismatched_adapter_leaves_model_unchanged(tmp_path):
    _, _, path = peft_adapter(tmp_path, targets=("q_proj", "v_proj"))
    ad = Adapter.load(path)
    other = tiny_llama(hidden=32)  # different widths
    lora_ext.inject(other, ["q_proj"], r=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' is 32 -> 32"):
        lora_ext.load_adapter(other, ad)
    after = other.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no module"):
        lora_ext.load_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), ad)
