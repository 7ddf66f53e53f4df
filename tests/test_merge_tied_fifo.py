"""Tied weights merged by several LoRA layers (unmerge / train() / .half() order), fan_in_fan_out layers
built directly (merge_and_unload, init) and MergedLinear's NaN check."""
import math

import pytest
import torch
from torch import nn

import lora_ext


class TiedLM(nn.Module):  # GPT-2 style: the head shares the embedding's table (registered first)
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight


def _tied(targets):
    torch.manual_seed(0)
    m = TiedLM()
    lora_ext.inject(m, target_modules=targets, r=2, alpha=4)
    with torch.no_grad():
        m.head.lora_B.normal_()
        if "emb" in targets:
            m.emb.lora_embedding_A.normal_()
    return m, m.emb.weight.detach().clone()


@pytest.mark.parametrize("how", ["unmerge", "train"])
def test_tied_unmerge_in_reverse_merge_order(how):
    m, W0 = _tied(["emb", "head"])
    assert lora_ext.merge(m, allow_tied=True) == ["emb", "head"]
    assert not torch.equal(m.emb.weight, W0)
    if how == "unmerge":
        assert sorted(lora_ext.unmerge(m)) == ["emb", "head"]
    else:
        m.train()
        assert m.emb.training and m.head.training
    assert not m.emb.merged and not m.head.merged
    assert torch.equal(m.emb.weight, W0)


def test_tied_merged_in_other_order():
    m, W0 = _tied(["emb", "head"])
    m.head.merge()
    m.emb.merge()  # emb merged last: unmerged first
    lora_ext.unmerge(m)
    assert torch.equal(m.emb.weight, W0)
    m.head.merge()
    m.emb.merge()
    m.train()
    assert torch.equal(m.emb.weight, W0)


def test_tied_half_redoes_the_merge():
    ref, _ = _tied(["head"])
    ref.half()
    lora_ext.merge(ref, allow_tied=True)  # converted, then merged
    m, W0 = _tied(["head"])
    lora_ext.merge(m, allow_tied=True)
    m.half()  # the embedding (registered first) converts the shared weight before the head sees it
    assert m.emb.weight.dtype == torch.float16 and m.head.weight is m.emb.weight
    assert torch.equal(m.emb.weight, ref.emb.weight)  # as the untied case: merged, then converted
    lora_ext.unmerge(m)
    assert torch.equal(m.emb.weight, W0.half())  # the converted W0 bit for bit


def _fifo(cls, n_in, n_out):
    kw = {"enable_lora": [True, False]} if cls is lora_ext.MergedLinear else {}
    torch.manual_seed(0)
    layer = cls(n_in, n_out, r=2, alpha=4, fan_in_fan_out=True, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("cls", [lora_ext.LoRALinear, lora_ext.MergedLinear])
@pytest.mark.parametrize("shape", [(8, 8), (8, 6)])
def test_fifo_built_directly_unloads_to_what_it_computes(cls, shape):
    layer = _fifo(cls, *shape)
    x = torch.randn(3, shape[0])
    y = layer(x)
    out = lora_ext.merge_and_unload(nn.Sequential(layer))[0]
    assert type(out) is nn.Linear and out.weight.shape == (shape[1], shape[0])
    torch.testing.assert_close(out(x), y)
    base = _fifo(cls, *shape).base_module()  # unmerged: the base layer
    torch.testing.assert_close(base(x), nn.functional.linear(x, _fifo(cls, *shape).weight.t(), base.bias))


def test_fifo_conv1d_unloads_to_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(6, 8)
    layer = lora_ext.LoRALinear.from_linear(conv, r=2)
    assert layer.base_module().weight is conv.weight  # shared, not copied


@pytest.mark.parametrize("cls", [lora_ext.LoRALinear, lora_ext.MergedLinear])
def test_fifo_init_uses_in_features_fan(cls):
    bound = 1 / math.sqrt(1024)
    kw = {"enable_lora": [True, False]} if cls is lora_ext.MergedLinear else {}
    layer = cls(1024, 16, r=2, fan_in_fan_out=True, **kw)
    assert layer.weight.abs().max() <= bound
    assert layer.weight.abs().max() > 0.9 * bound


def test_merged_linear_nan_inside_a_block_is_not_outside():
    m = lora_ext.MergedLinear(8, 12, 2, 4, 0.0, [True, False, True])
    A, B, s = m.lora_factors()
    B = B.detach().clone()
    B[0, 0] = float("nan")  # slice 0's own block
    m.set_lora_factors(A.detach(), B, s)
    assert torch.isnan(m.lora_B[0, 0])
    B[4, 0] = float("nan")  # slice 1 (disabled): outside every block
    with pytest.raises(ValueError, match="outside the blocks"):
        m.set_lora_factors(A.detach(), B, s)


@pytest.mark.parametrize("first", ["emb", "head"])
def test_converting_a_weight_two_merged_layers_share_is_refused_before_anything_converts(first):
    """Both tied layers merged into one weight: each converted its own MergeState, which cannot hold the
    other's delta (a ValueError from inside Module._apply with the weight half converted, or a later
    unmerge failing). Refused by name before any parameter converts; unmerge, convert, merge works."""
    m, W0 = _tied(["emb", "head"])
    if first == "head":
        m.head.merge()
        m.emb.merge()
    else:
        lora_ext.merge(m, allow_tied=True)
    merged = m.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"several merged LoRA layers share this \(tied\) weight; converting it"):
        m.half()
    assert all(p.dtype == torch.float32 for p in m.parameters()) and torch.equal(m.emb.weight, merged)
    lora_ext.unmerge(m)
    assert torch.equal(m.emb.weight, W0)
    m.half()
    lora_ext.merge(m, allow_tied=True)
    lora_ext.unmerge(m)
    assert torch.equal(m.emb.weight, W0.half())
    m.float()  # one merged layer on a tied weight converts as before
    m.head.merge()
    m.half()


def test_tied_layers_merged_again_in_the_other_order_unmerge():
    """Merge order head, emb; unmerge; merge order emb, head: a stale link from the first round made the
    two layers each other's upper layer, and unmerge looped forever."""
    m, W0 = _tied(["emb", "head"])
    m.head.merge()
    m.emb.merge()
    lora_ext.unmerge(m)
    lora_ext.merge(m, allow_tied=True)  # emb, then head
    assert [type(x).__name__ for x in m.emb._tied_stack()] == ["LoRALinear", "LoRAEmbedding"]
    lora_ext.unmerge(m)
    assert torch.equal(m.emb.weight, W0)
