"""A user bringing lora_ext to many model families (tiny models from configs; CPU): inject selects
PEFT's modules and adapter files carry over both ways with PEFT's logits (encoder-decoder, fused qkv,
FalconLinear, scaled and tied embeddings, ViT/Whisper inputs); modules_to_save heads whose state dict
is more than their deduplicated parameters (tied tensors, persistent buffers)."""
import pytest
import torch
from torch import nn

import lora_ext

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _roberta():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=70)
    return transformers.RobertaForMaskedLM(cfg).eval()


class _BNNet(nn.Module):  # a head with BatchNorm: float and int64 persistent buffers
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.norm, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


V = 128
_FAMILIES = {  # builder, inputs, target config
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)), "seq2seq", dict(target_modules=["q", "wo"], layers_to_transform=[1],
                                                     layers_pattern="block")),
    "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        scale_embedding=True)), "seq2seq", dict(target_modules=["q_proj", "fc1", "embed_tokens"],
                                                exclude_modules=["model.decoder.layers.0.self_attn.q_proj"])),
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)), "ids", dict(target_modules="all-linear")),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)), "ids", dict(target_modules=["qkv_proj", "gate_up_proj"])),
    "whisper": (lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)), "audio", dict(target_modules="all-linear", use_rslora=True)),
}


def _family(name):
    torch.manual_seed(0)
    return _FAMILIES[name][0]().eval()


@torch.no_grad()
def _out(model, kind):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (2, 10), generator=g)
    if kind == "ids":
        return model(input_ids=ids).logits
    if kind == "seq2seq":
        return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits
    return model(input_features=torch.randn(2, 16, 32, generator=g), decoder_input_ids=ids[:, :6]).logits


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_family_adapters_carry_over_both_ways_with_peft(name, tmp_path):
    kind, cfg = _FAMILIES[name][1:]
    pm = peft.get_peft_model(_family(name), peft.LoraConfig(r=4, lora_alpha=8, **cfg))
    _randomize_lora(pm)
    ref = _out(pm, kind)
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A"))
    assert sorted(lora_ext.inject(_family(name), r=4, alpha=8, **cfg)) == peft_names
    pm.save_pretrained(str(tmp_path / "peft"))
    m = _family(name)
    lora_ext.load_adapter(m, str(tmp_path / "peft"))
    torch.testing.assert_close(_out(m, kind), ref, rtol=1e-5, atol=1e-5)
    lora_ext.Adapter.from_model(m).save(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(_family(name), str(tmp_path / "ours"))
    torch.testing.assert_close(_out(back, kind), ref, rtol=1e-5, atol=1e-5)


def _randomize_lora(model):
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_modules_to_save_with_a_tied_bias_saves_every_state_dict_key(tmp_path):
    # RoBERTa's lm_head.decoder.bias is lm_head.bias (one Parameter, two state-dict keys): PEFT's
    # from_pretrained looks both up (KeyError if one is missing), lora_ext's own load_adapter too
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    m = _roberta()
    lora_ext.inject(m, target_modules=["query", "value"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(m)
    _randomize_lora(m)
    with torch.no_grad():
        m.lm_head.dense.weight.add_(0.1)
        m.lm_head.bias.add_(0.5)
    ref = _logits(m, ids)
    lora_ext.Adapter.from_model(m, modules_to_save=["lm_head"]).save(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(_roberta(), str(tmp_path))
    torch.testing.assert_close(_logits(pm, ids), ref, rtol=1e-5, atol=1e-5)
    served = _roberta()
    lora_ext.load_adapter(served, str(tmp_path))
    torch.testing.assert_close(_logits(served, ids), ref, rtol=1e-5, atol=1e-5)


def test_modules_to_save_with_batchnorm_buffers_both_ways(tmp_path):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    # PEFT -> lora_ext: PEFT saves the copy's state dict, num_batches_tracked (int64) included
    pm = peft.get_peft_model(_BNNet(), peft.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["norm"]))
    _randomize_lora(pm)
    with torch.no_grad():
        pm.base_model.model.norm.modules_to_save.default.running_mean.add_(1.0)
        pm.base_model.model.norm.modules_to_save.default.num_batches_tracked.fill_(7)
    pm.eval()
    with torch.no_grad():
        ref = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = _BNNet().eval()
    lora_ext.load_adapter(m, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    assert m.norm.num_batches_tracked.dtype == torch.int64 and m.norm.num_batches_tracked.item() == 7
    # an int buffer keeps its dtype when Adapter.load converts the floats
    ad = lora_ext.Adapter.load(str(tmp_path / "peft"), dtype=torch.bfloat16)
    assert ad.extra["norm.num_batches_tracked"].dtype == torch.int64
    assert ad.extra["norm.running_mean"].dtype == torch.bfloat16
    # lora_ext -> PEFT and back: the running statistics are saved with the module
    m = _BNNet().eval()
    lora_ext.inject(m, target_modules=["lin"], r=2)
    lora_ext.mark_only_lora_trainable(m)
    _randomize_lora(m)
    with torch.no_grad():
        m.norm.running_mean.add_(1.0)
        m.norm.running_var.mul_(2.0)
        ref = m(x)
    lora_ext.Adapter.from_model(m, modules_to_save=["norm"]).save(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(_BNNet().eval(), str(tmp_path / "ours"))
    again = _BNNet().eval()
    lora_ext.load_adapter(again, str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again(x), ref, rtol=1e-6, atol=1e-6)


def test_integer_lora_factors_are_still_refused(tmp_path):
    m = _BNNet()
    sd = {"base_model.model.lin.lora_A.weight": torch.zeros(2, 8, dtype=torch.int64),
          "base_model.model.lin.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match=r"lin\.lora_A\.weight has dtype torch\.int64"):
        lora_ext.load_adapter(m, sd)


def test_modules_to_save_holding_a_lora_layer_is_refused_by_name(tmp_path):
    # PEFT never adapts a module inside a modules_to_save one: such a file loaded in PEFT gives other
    # logits (it wraps lm_head whole and drops lm_head.dense's factors)
    m = _roberta()
    lora_ext.inject(m, target_modules=["dense"], r=2)
    with pytest.raises(ValueError, match=r"selects module 'lm_head', which holds the LoRA layer 'lm_head\.dense'"):
        lora_ext.Adapter.from_model(m, modules_to_save=["lm_head"])
    # its other submodules save, and PEFT loads them
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    lora_ext.mark_only_lora_trainable(m)
    _randomize_lora(m)
    with torch.no_grad():
        m.lm_head.layer_norm.weight.add_(0.5)
    ref = _logits(m, ids)
    lora_ext.Adapter.from_model(m, modules_to_save=["lm_head.layer_norm"]).save(str(tmp_path))
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_roberta(), str(tmp_path)), ids), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(target_modules=5), dict(target_modules=["query", None]), dict(target_modules=b"query"),
                                dict(target_modules=["query"], exclude_modules=3),
                                dict(target_modules=["query"], exclude_modules=[None])])
def test_target_and_exclude_modules_of_another_type_are_refused_by_name(kw):
    m = _roberta()
    field = "exclude_modules" if "exclude_modules" in kw else "target_modules"
    with pytest.raises(TypeError, match=rf"^inject: {field} must be a str \(a regex\) or a list of str"):
        lora_ext.inject(m, r=2, **kw)
    assert not lora_ext.lora_layers(m)
    with pytest.raises(TypeError, match=r"^Adapter\.from_model: modules_to_save must be"):
        lora_ext.inject(m, target_modules=("query",), r=2)  # a tuple, a set or a generator is fine
        lora_ext.Adapter.from_model(m, modules_to_save=["lm_head", 1])


def test_seq_cls_adapter_of_distilbert_saves_pre_classifier_too(tmp_path):
    # PEFT's modules_to_save rule is a plain str.endswith: task_type="SEQ_CLS" adds "classifier", which
    # also wraps DistilBERT's "pre_classifier"; a re-saved file without it raises KeyError in PEFT
    def distilbert():
        torch.manual_seed(0)
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=128, dim=64, n_layers=1, n_heads=4, hidden_dim=128, max_position_embeddings=64,
            num_labels=3)).eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    pm = peft.get_peft_model(distilbert(), peft.LoraConfig(r=4, target_modules=["q_lin"], task_type="SEQ_CLS"))
    _randomize_lora(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3)
    ref = _logits(pm.eval(), ids)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = distilbert()
    lora_ext.load_adapter(m, str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(m, ids), ref, rtol=1e-5, atol=1e-5)
    ad = lora_ext.Adapter.from_model(m)  # the loaded adapter's modules_to_save, saved again
    assert ad.config["modules_to_save"] == ["pre_classifier", "classifier"]
    ad.save(str(tmp_path / "again"))
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(distilbert(), str(tmp_path / "again")), ids),
                               ref, rtol=1e-5, atol=1e-5)
    served = distilbert()
    lora_ext.load_adapter(served, str(tmp_path / "again"))
    torch.testing.assert_close(_logits(served, ids), ref, rtol=1e-5, atol=1e-5)
