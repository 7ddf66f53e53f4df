"""The module API as a loralib / nn.Linear / nn.Embedding user meets it: train() after a merge,
load_state_dict into merged layers."""
import copy

import pytest
import torch
from torch import nn

import lora_ext


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lora_ext.inject(m, ["0", "2"], r=2, alpha=4)
    for layer in lora_ext.lora_layers(m).values():
        nn.init.normal_(layer.lora_B)  # as after training
    lora_ext.mark_only_lora_trainable(m)
    return m


@pytest.mark.parametrize("exact", [True, False])
def test_train_after_merge_unmerges_so_lora_trains(exact):
    m = _mlp()
    w0 = m[0].weight.clone()
    x = torch.randn(5, 8)
    y = m(x)
    m.eval()
    lora_ext.merge(m, exact=exact)
    m.train()  # as loralib: back to training takes the adapter out of the weights
    assert not m[0].merged and not m[2].merged
    if exact:
        assert torch.equal(m[0].weight, w0)
    torch.testing.assert_close(m(x), y)
    m(x).sum().backward()
    assert m[0].lora_A.grad is not None and m[0].lora_A.grad.abs().sum() > 0


def test_train_on_layer_merged_for_good():
    m = _mlp()
    lora_ext.merge(m)
    m[0].drop_merge_state()
    with pytest.raises(ValueError, match="merged for good.*would not train"):
        m.train()
    m[0].lora_A.requires_grad_(False)
    m[0].lora_B.requires_grad_(False)
    m.train()  # frozen factors: training the rest is fine, the layer stays merged
    assert m[0].merged and not m[2].merged
    m.eval()
    lora_ext.merge(m)
    m.eval()  # eval() leaves merged layers merged
    assert m[0].merged and m[2].merged


def test_load_lora_state_dict_into_merged_model_serves_the_new_adapter():
    m, other = _mlp(), _mlp()
    with torch.no_grad():
        for layer in lora_ext.lora_layers(other).values():
            layer.lora_B.mul_(-3)
    x = torch.randn(5, 8)
    want = other(x)
    w0 = m[0].weight.clone()
    for exact in (True, False):
        served = copy.deepcopy(m).eval()
        lora_ext.merge(served, exact=exact)
        # loralib's flow: model.load_state_dict(lora_state_dict, strict=False)
        res = served.load_state_dict(lora_ext.lora_state_dict(other, peft_names=False), strict=False)
        assert not res.unexpected_keys and served[0].merged
        torch.testing.assert_close(served(x), want)
        lora_ext.unmerge(served)
        if exact:
            assert torch.equal(served[0].weight, w0)
        torch.testing.assert_close(served(x), want)


def test_load_state_dict_with_weight_into_merged_layer_raises():
    m = _mlp()
    sd = copy.deepcopy(m.state_dict())
    lora_ext.merge(m)
    with pytest.raises(RuntimeError, match="LoRALinear '0' is merged.*ambiguous"):
        m.load_state_dict(sd)
    lora_ext.unmerge(m)
    m.load_state_dict(sd)
    m[0].merge(exact=False)
    m[0].drop_merge_state()
    with pytest.raises(RuntimeError, match="merged for good"):
        m.load_state_dict(lora_ext.lora_state_dict(m, peft_names=False), strict=False)
