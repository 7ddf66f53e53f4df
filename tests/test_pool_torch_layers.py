"""AdapterPool on torch's own transformer layers (nn.TransformerEncoder, nn.MultiheadAttention),
and outside a batch: the base model for inputs of any size."""
import copy

import pytest
import torch
from conftest import rel_err
from models import tiny_llama
from torch import nn

import lora_ext
from lora_ext.multi import MultiLoRALinear


def torch_encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def test_encoder_layers_get_their_adapters_in_no_grad_eval():
    """In eval under no_grad nn.TransformerEncoderLayer runs a fused kernel on linear1/linear2.weight
    (and its TransformerEncoder packs padded batches into nested tensors): the pool's rows got the
    base model's output (max |diff| 2.3 here), as inject's layers did before they were kept off it."""
    trained = torch_encoder()
    lora_ext.inject(trained, ["linear1", "linear2"], r=4)
    for m in lora_ext.lora_layers(trained).values():
        nn.init.normal_(m.lora_B, std=0.3)
    lora_ext.mark_only_lora_trainable(trained)
    ad = lora_ext.Adapter.from_model(trained)
    served = torch_encoder()
    pool = lora_ext.AdapterPool(served, target_modules=["linear1", "linear2"], max_adapters=2, max_rank=8)
    assert not served.use_nested_tensor and sorted(pool.layers) == [
        f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    pool.load("a", ad)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    for mask in (None, pad):
        want = trained(x, src_key_padding_mask=mask).detach()  # grad mode: torch's plain path
        plain = torch_encoder()(x, src_key_padding_mask=mask).detach()
        assert (want - plain).abs().max() > 0.1
        with torch.no_grad(), pool.batch(["a", None, "a"]):
            got = served(x, src_key_padding_mask=mask)
        # (the attention itself takes torch's fused MHA kernel under no_grad: last bits differ)
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], plain[1], rtol=1e-5, atol=1e-5)


def test_multihead_attention_out_proj_is_refused():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: the pool
    served it (by name and with "all-linear") and its adapters never ran. Refused by name, as
    inject refuses it; "all-linear" / None leave it out."""
    for targets in (None, "all-linear"):
        pool = lora_ext.AdapterPool(torch_encoder(), target_modules=targets, max_adapters=2, max_rank=4)
        assert sorted(pool.layers) == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    for targets in (["linear1", "out_proj"], r".*\.out_proj"):
        enc = torch_encoder()
        with pytest.raises(TypeError, match=r"AdapterPool: target_modules=.* matches 'layers.0.self_attn.out_proj', "
                                            r"the out_proj of an nn.MultiheadAttention"):
            lora_ext.AdapterPool(enc, target_modules=targets, max_adapters=2, max_rank=4)
        assert not any(isinstance(m, MultiLoRALinear) for m in enc.modules())  # refused before any change
    attn_only = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*'0.out_proj', is never served"):
        lora_ext.AdapterPool(attn_only, target_modules="all-linear", max_adapters=2, max_rank=4)


@torch.no_grad()
def test_outside_a_batch_the_base_model_for_any_size():
    """max_tokens bounds the names of one batch; outside a batch an input of more tokens raised
    "more than max_tokens" instead of running the base model. Inside one, rows that differ from
    the names still raise."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8, max_tokens=8)
    m = copy.deepcopy(base)
    lora_ext.inject(m, ["q_proj", "v_proj"], r=4)
    for layer in lora_ext.lora_layers(m).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    pool.load("a", lora_ext.Adapter.from_model(m))
    ids = torch.randint(0, 128, (2, 16))  # 32 tokens
    want = base(ids).logits
    assert torch.equal(model(ids).logits, want)
    with pool.batch(["a", None]):
        got = model(ids).logits
    assert rel_err(got[1], want[1]) < 1e-6 and rel_err(got[0], want[0]) > 1e-3
    assert torch.equal(model(ids).logits, want)
    with pytest.raises(ValueError, match="2 batch rows .* but 1 row indices"), pool.batch(["a"]):
        model(ids)
    with pytest.raises(ValueError, match="32 tokens .* but 8 token indices"), pool.batch(["a"] * 8, per_token=True):
        model(ids)
    with pytest.raises(ValueError, match="9 entries exceed max_tokens 8"), pool.batch(["a"] * 9, per_token=True):
        pass
    assert torch.equal(model(ids).logits, want)
