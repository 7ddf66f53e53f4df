"""A PEFT user moving to lora_ext: workflows found to behave differently from unpatched PEFT
(patch_peft, lora_ext's loaders on PEFT directories), each against PEFT itself."""
import copy
import warnings

import pytest
import torch
from conftest import rel_err
from models import saved_peft, tiny_gpt2, tiny_llama
from peft_cases import CASES, Count, build, ids_for, n_linear, patch, peft, randomize

import lora_ext


def test_generate_without_no_grad_runs_mixed_batches_fused(monkeypatch):
    # model.generate(..., adapter_names=...) with no torch.no_grad() of the caller's own (generate
    # turns autograd off inside): PEFT starts the mixed batch outside generate's no_grad, and the
    # patched model decided "autograd on" for every layer there: each layer ran PEFT's forward
    # with a warning telling the user to use torch.no_grad(). The grad mode is now the layer call's.
    ref = build("llama")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, target_modules=CASES["llama"][1]))
    randomize(ref, seed=11)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    count = Count(monkeypatch)
    ids, names = ids_for(batch=3, seq=5), ["b", "__base__", "default"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = pm.generate(input_ids=ids, adapter_names=names, **kw)
    assert not [w for w in rec if "lora_ext.patch_peft" in str(w.message)]
    assert count.multi >= 4 * n_linear(pm)  # prefill + decode steps, every layer fused
    assert torch.equal(got, ref.generate(input_ids=ids, adapter_names=names, **kw))
    # a mixed batch that does need autograd (grad on in the layer call) still runs PEFT's forward
    before = count.multi
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = pm(input_ids=ids, adapter_names=names).logits
    assert count.multi == before and out.requires_grad
    assert any("autograd on" in str(w.message) for w in rec)


def test_inject_and_load_adapter_refuse_peft_layers_by_name(tmp_path):
    # inject(peft_model, target_modules="all-linear") wrapped PEFT's own base_layer, lora_A.default
    # and lora_B.default in lora_ext LoRA layers (LoRA on LoRA factors, silently); a named PEFT
    # layer got "is a Linear; LoRA targets must be nn.Linear", and load_adapter into the model
    # under a PeftModel "is a Linear, the adapter holds linear weights". All now name PEFT's layer.

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    keys = set(pm.state_dict())
    for target in ("all-linear", ["q_proj"]):
        with pytest.raises(TypeError, match=r"inject: module .*q_proj.* PEFT's Linear layer .*patch_peft"):
            lora_ext.inject(pm, target_modules=target, r=2)
        assert set(pm.state_dict()) == keys  # nothing injected
    saved_peft(tiny_llama(), tmp_path, 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"load_adapter: module 'model.layers.0.self_attn.q_proj' is PEFT's Linear"):
        lora_ext.load_adapter(pm.get_base_model(), str(tmp_path))
    with pytest.raises(ValueError, match=r"no module .* \(a PeftModel: it has 'base_model.model.model.layers"):
        lora_ext.load_adapter(pm, str(tmp_path))
    assert set(pm.state_dict()) == keys
    assert lora_ext.inject(pm, target_modules=["k_proj"], r=2)  # modules PEFT left alone still take LoRA


def test_bias_all_with_modules_to_save_loads_like_peft(tmp_path):
    # A classifier (task_type SEQ_CLS, or modules_to_save) trained with bias="all": PEFT's file also
    # holds the wrapper's inner "classifier.modules_to_save.bias" and "classifier.original_module.bias",
    # which load_adapter refused ("the model has no such tensor"); PEFT loads the file. They are
    # now read as PEFT does (the model takes "classifier.bias"), and the adapter saves back for PEFT.
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification


    def bert():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return BertForSequenceClassification(cfg).eval()

    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=4, target_modules=["query", "value"], bias="all",
                                                     task_type="SEQ_CLS"))
    randomize(pm, seed=2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in n:  # trained biases and classifier
                p.add_(torch.randn_like(p) * 0.3)
    pm.eval().save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.modules_to_save.bias", "base_model.model.classifier.original_module.bias"} <= set(keys)
    ids = ids_for(batch=2, seq=8)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        model = bert()
        lora_ext.load_adapter(model, str(tmp_path / "peft"))
        assert rel_err(model(input_ids=ids).logits, want) < 1e-5
        lora_ext.Adapter.load(str(tmp_path / "peft")).save(str(tmp_path / "back"))
        back = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "back")).eval()
        assert rel_err(back(input_ids=ids).logits, want) < 1e-5
    # an inner copy that disagrees with the module's own tensor is not dropped: refused by name
    from safetensors.torch import save_file
    keys["base_model.model.classifier.modules_to_save.bias"] = keys["base_model.model.classifier.bias"] + 1
    save_file(keys, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="classifier.modules_to_save.bias"):
        lora_ext.load_adapter(bert(), str(tmp_path / "peft"))


def test_biases_loaded_from_a_peft_file_are_saved_again(tmp_path):
    # load_adapter of a bias="all" PEFT adapter into a frozen model (or a "lora_only" one into any),
    # then Adapter.from_model(model).save: the biases it had loaded stayed frozen, so from_model
    # wrote bias "none" without them (no warning), and PEFT loaded that file 1.5 (relative) away from
    # the adapter's logits. The loaded biases are now trainable, as the loaded factors are.

    ids = ids_for(batch=2, seq=8)
    for bias, targets in (("all", ["c_attn"]), ("lora_only", ["c_attn", "c_fc"])):
        pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=targets, fan_in_fan_out=True,
                                                              bias=bias))
        randomize(pm, seed=3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad and "lora_" not in n:
                    p.add_(torch.randn_like(p) * 0.3)
            want = pm.eval()(input_ids=ids).logits
        pm.save_pretrained(tmp_path / bias)
        for frozen in (True, False):
            model = tiny_gpt2().requires_grad_(not frozen)
            lora_ext.load_adapter(model, str(tmp_path / bias))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unfrozen base: "trainable weights not saved"
                adapter = lora_ext.Adapter.from_model(model)
            assert adapter.config["bias"] == bias or (bias == "lora_only" and not frozen)
            adapter.save(str(tmp_path / f"back-{bias}-{frozen}"))
            back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / f"back-{bias}-{frozen}")).eval()
            with torch.no_grad():
                assert rel_err(back(input_ids=ids).logits, want) < 1e-5, (bias, frozen)


def test_loading_an_adapter_directory_over_another_adapter_covers_every_layer(tmp_path):
    # Swapping adapters from disk: load_adapter(model, dir_a) (q, v), then load_adapter(model, dir_b)
    # (q, k). v_proj kept adapter a's factors, silently: logits 1.09 (relative) away from adapter b's
    # (PEFT's hotswap_adapter zeroes the layers the new adapter lacks). A directory is a whole
    # adapter: such a load now raises naming the layers, before anything changes.

    a = saved_peft(tiny_llama(), tmp_path / "a", 1, target_modules=["q_proj", "v_proj"])
    b = saved_peft(tiny_llama(), tmp_path / "b", 2, target_modules=["q_proj", "k_proj"])
    ids = ids_for(batch=2, seq=8)
    model = tiny_llama()
    lora_ext.load_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"load_adapter: adapter b has no factors for the model's LoRA layers "
                                         r"\['model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.v_proj'\]"):
        lora_ext.load_adapter(model, str(tmp_path / "b"))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, a(input_ids=ids).logits) < 1e-5  # untouched
        lora_ext.load_adapter(model, str(tmp_path / "a"))  # the same layers: fine
        fresh = tiny_llama()
        lora_ext.load_adapter(fresh, str(tmp_path / "b"))
        assert rel_err(fresh(input_ids=ids).logits, b(input_ids=ids).logits) < 1e-5


def test_pickled_peft_adapter_refusal_says_how_load_adapter_takes_it(tmp_path):
    # save_pretrained(safe_serialization=False) writes adapter_model.bin; load_adapter(model, dir)
    # said "pass allow_pickle=True", which load_adapter does not take

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize(pm).eval().save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*load_adapter takes Adapter.load\(path, allow_pickle=True\)"):
        lora_ext.load_adapter(tiny_llama(), str(tmp_path))
    model = tiny_llama()
    lora_ext.load_adapter(model, lora_ext.Adapter.load(str(tmp_path), allow_pickle=True))
    ids = ids_for(batch=2, seq=8)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5


@torch.no_grad()
def test_modules_to_save_of_a_loaded_adapter_are_saved_again(tmp_path):
    """load_adapter of a PEFT file with modules_to_save (a trained head), then Adapter.from_model
    without modules_to_save=: the head is saved again (it used to be dropped silently, so a reload
    into a fresh base model got the base's head)."""
    base = tiny_llama()
    pm = saved_peft(base, tmp_path / "peft", seed=3, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained head: the saved file holds it
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    lora_ext.load_adapter(model, str(tmp_path / "peft"))
    again = lora_ext.Adapter.from_model(model)
    assert again.config["modules_to_save"] == ["lm_head"] and "lm_head.weight" in again.extra
    again.save(str(tmp_path / "again"))
    fresh = copy.deepcopy(base)
    lora_ext.load_adapter(fresh, str(tmp_path / "again"))
    ids = torch.randint(0, 128, (2, 6))
    assert rel_err(fresh(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5
