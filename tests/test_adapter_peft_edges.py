"""Adapter files at the edges of PEFT's format, PEFT the oracle: an embedding table saved with the
adapter loaded into a merged model, alphas of any sign, modules_to_save tensors missing from the file,
large scales."""
import copy
import os

import pytest
import torch
from models import saved_peft, tiny_llama
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")


def test_embedding_table_of_an_adapter_loaded_into_a_merged_model_matches_peft(tmp_path):
    """PEFT saves a targeted embedding's table (save_embedding_layers="auto"); loaded into a merged
    model it is written under the merged adapter: the logits are PEFT's and unmerge gives the table."""
    base = tiny_llama()
    d1, d2 = str(tmp_path / "a1"), str(tmp_path / "a2")
    saved_peft(base, d1, 1, target_modules=["embed_tokens", "q_proj"])
    tuned = copy.deepcopy(base)  # adapter 2 was trained on another table: PEFT loads the saved one
    with torch.no_grad():
        tuned.model.embed_tokens.weight.add_(torch.randn_like(tuned.model.embed_tokens.weight) * 0.1)
    saved_peft(tuned, d2, 2, target_modules=["embed_tokens", "q_proj"])
    table = load_file(os.path.join(d2, "adapter_model.safetensors"))["base_model.model.model.embed_tokens.base_layer.weight"]
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), d2).eval()
    ids = torch.randint(0, 128, (2, 10))
    ours = copy.deepcopy(base).eval()
    lora_ext.load_adapter(ours, d1)
    lora_ext.merge(ours)
    lora_ext.load_adapter(ours, d2)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
        lora_ext.unmerge(ours)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.model.embed_tokens.weight, table)


def test_embedding_table_for_a_layer_merged_for_good_is_refused_before_any_change(tmp_path):
    base = tiny_llama()
    d = str(tmp_path / "ad")
    saved_peft(base, d, 1, target_modules=["embed_tokens", "q_proj"])
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, d)
    lora_ext.merge(ours)
    ours.model.embed_tokens.drop_merge_state()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"load_adapter: adapter ad holds model.embed_tokens.base_layer.weight, "
                                         r"but 'model.embed_tokens' is merged for good"):
        lora_ext.load_adapter(ours, d)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("alpha, use_rslora", [(0, False), (-8, False), (-8, True)])
def test_alpha_of_any_sign_round_trips_like_peft(tmp_path, alpha, use_rslora):
    """inject takes any finite alpha and from_model writes it; lora_ext reads the file as PEFT does."""
    base = tiny_llama()
    m = copy.deepcopy(base).eval()
    lora_ext.inject(m, ["q_proj", "v_proj"], r=4, alpha=alpha, use_rslora=use_rslora, alpha_pattern={"v_proj": -3.0})
    with torch.no_grad():
        for layer in lora_ext.lora_layers(m).values():
            layer.lora_B.normal_(0, 0.1)
    d = str(tmp_path / "ad")
    Adapter.from_model(m).save(d)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    ours = copy.deepcopy(base).eval()
    lora_ext.load_adapter(ours, d)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(m(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    scales = {n: layer.scaling for n, layer in lora_ext.lora_layers(ours).items()}
    assert scales == {n: layer.scaling["default"] for n, layer in ref.named_modules() if hasattr(layer, "lora_A")
                      for n in [n.removeprefix("base_model.model.")]}


def test_modules_to_save_missing_from_the_file_is_refused_like_peft(tmp_path):
    """The config lists lm_head, the weights file lacks it: PEFT raises KeyError; lora_ext names the
    file and the module instead of serving the model's own lm_head."""
    base = tiny_llama()
    d = str(tmp_path / "ad")
    saved_peft(base, d, 1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    st = os.path.join(d, "adapter_model.safetensors")
    tensors = load_file(st)
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, st)
    with pytest.raises(KeyError):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), d)
    ours = copy.deepcopy(base)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: modules_to_save=\['lm_head'\] selects "
                                         r"module 'lm_head', but the adapter holds no lm_head.weight"):
        lora_ext.load_adapter(ours, d)
    with pytest.raises(ValueError, match=r"load_adapter: adapter ad: modules_to_save=.* module 'lm_head'.*lm_head.weight"):
        lora_ext.load_adapter(ours, Adapter.load(d))
    assert set(lora_ext.lora_layers(ours)) == set()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_modules_to_save_entries_match_module_name_ends_as_in_peft(tmp_path):
    """PEFT wraps every module whose name ends with an entry ("head" selects lm_head); entries matching
    no module of the model (PEFT's SEQ_CLS "classifier") are fine."""
    base = tiny_llama()
    d = str(tmp_path / "ad")
    saved_peft(base, d, 1, target_modules=["q_proj"], modules_to_save=["head", "classifier"])
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    ours = copy.deepcopy(base).eval()
    lora_ext.load_adapter(ours, d)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_large_finite_scale_loads_and_matches_peft(tmp_path):
    """A scale near float32's limit (alpha_pattern 1e34, r=4: 2.5e33) loads and computes PEFT's output."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                                  alpha_pattern={"2": 1e34}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * (1e-16 if "2.lora_B" in n else 0.1))
    d = str(tmp_path / "ad")
    pm.save_pretrained(d)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, d)
    assert ours[2].scaling == 2.5e33
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = ref(x)
        assert torch.isfinite(want).all() and want.abs().max() > 1e10
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=0)
