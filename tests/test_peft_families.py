"""PEFT parity across model families and config features: scaled embeddings (Gemma), T5 through a
pool, an explicitly targeted lm_head, several adapters in one state dict, mixed rsLoRA layers,
modules_to_save (tiny models from configs; CPU)."""
import math
import tempfile

import pytest
import torch

import lora_ext

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.1


def _ids(b=2, s=8):
    return torch.randint(2, 128, (b, s), generator=torch.Generator().manual_seed(3))


def _gemma():
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   attn_implementation="eager")
    return transformers.GemmaForCausalLM(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def _t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1,
                                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _served(make, targets):
    """(PEFT model with a random adapter on targets, a fresh model, its AdapterPool with that
    adapter loaded as "a" from PEFT's save_pretrained)."""
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize(pm)
    d = tempfile.mkdtemp()
    pm.save_pretrained(d)
    model = make()
    pool = lora_ext.AdapterPool(model, target_modules=targets, max_adapters=2, max_rank=8)
    pool.load("a", d)
    return pm, model, pool


@torch.no_grad()
def _logits(model, x, **kw):
    return model(input_ids=x, **kw).logits


def test_scaled_embedding_keeps_embed_scale_like_peft():
    # Gemma's embed_tokens multiplies by sqrt(hidden) in its forward; PEFT scales base and LoRA outputs
    x = _ids()
    m = _gemma()
    base = _logits(m, x)
    lora_ext.inject(m, target_modules=["embed_tokens"], r=4, alpha=8)
    torch.testing.assert_close(_logits(m, x), base)  # LoRA is zero at init: output unchanged
    pm = peft.get_peft_model(_gemma(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    _randomize(pm)
    d = tempfile.mkdtemp()
    pm.save_pretrained(d)
    served = _gemma()
    lora_ext.load_adapter(served, lora_ext.Adapter.load(d))
    torch.testing.assert_close(_logits(served, x), _logits(pm, x), rtol=1e-5, atol=1e-5)
    merged = lora_ext.merge_and_unload(served, allow_tied=True)
    torch.testing.assert_close(_logits(merged, x), _logits(pm.merge_and_unload(), x), rtol=1e-5, atol=1e-5)


def test_pool_layers_expose_base_weight_t5():
    # T5DenseActDense reads self.wo.weight.dtype; PEFT's LoRA layers expose the base weight
    x = _ids()
    pm, model, pool = _served(_t5, ["q", "wo"])
    with torch.no_grad(), pool.batch(["a", None]):
        got = _logits(model, x, decoder_input_ids=x[:, :5])
    torch.testing.assert_close(got[0], _logits(pm, x, decoder_input_ids=x[:, :5])[0], rtol=1e-5, atol=1e-5)
    assert model.get_input_embeddings().weight.shape == (128, 64)


def test_pool_serves_an_explicitly_named_lm_head_and_all_linear():
    x = _ids()
    pm, model, pool = _served(_llama, ["q_proj", "lm_head"])
    with torch.no_grad(), pool.batch(["a", None]):
        got = _logits(model, x)
    torch.testing.assert_close(got[0], _logits(pm, x)[0], rtol=1e-5, atol=1e-5)
    pool2 = lora_ext.AdapterPool(_llama(), target_modules="all-linear", max_adapters=2, max_rank=8)
    assert "lm_head" not in pool2.layers and len(pool2.layers) == 14


def test_state_dict_with_two_adapters_is_refused():
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    m = _llama()
    lora_ext.inject(m, target_modules=["q_proj"], r=4)
    with pytest.raises(ValueError, match="lora_A.a.weight"):
        lora_ext.load_adapter(m, sd)


def test_from_model_with_rslora_and_plain_layers_loads_in_peft():
    x = _ids()
    m = _llama()
    lora_ext.inject(m, target_modules=["q_proj"], r=4, alpha=8, use_rslora=True)
    lora_ext.inject(m, target_modules=["v_proj"], r=4, alpha=8)
    _randomize(m)
    d = tempfile.mkdtemp()
    lora_ext.Adapter.from_model(m).save(d)
    pm = peft.PeftModel.from_pretrained(_llama(), d)
    assert math.isclose(pm.base_model.model.model.layers[0].self_attn.v_proj.scaling["default"], 2.0)
    torch.testing.assert_close(_logits(pm, x), _logits(m, x), rtol=1e-5, atol=1e-5)
    from lora_ext.distributed import save_adapter  # no process group: simply saves
    d2 = tempfile.mkdtemp()
    save_adapter(m, d2)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_llama(), d2), x), _logits(m, x),
                               rtol=1e-5, atol=1e-5)


def test_from_model_modules_to_save():
    x = _ids()
    m = _bert()
    lora_ext.inject(m, target_modules=["query", "value"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(m)
    m.classifier.requires_grad_(True)
    _randomize(m)
    with torch.no_grad():
        m.classifier.weight += 0.5
        m.classifier.bias += 0.5
    with pytest.warns(UserWarning, match="classifier"):  # its bias alone would be saved
        lora_ext.Adapter.from_model(m)
    ad = lora_ext.Adapter.from_model(m, modules_to_save=["classifier"])
    assert sorted(ad.extra) == ["classifier.bias", "classifier.weight"] and ad.config["bias"] == "none"
    d = tempfile.mkdtemp()
    ad.save(d)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_bert(), d), x), _logits(m, x),
                               rtol=1e-5, atol=1e-5)
    from lora_ext.distributed import save_adapter  # no process group: simply saves, the head too
    d2 = tempfile.mkdtemp()
    save_adapter(m, d2, modules_to_save=["classifier"])
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_bert(), d2), x), _logits(m, x),
                               rtol=1e-5, atol=1e-5)
