"""The module API as a loralib / nn.Linear / nn.Embedding user meets it: train() after a merge,
load_state_dict into merged layers, loralib checkpoints and arguments, constructor options,
reset_parameters, argument errors."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoRAEmbedding, LoRALinear


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


def test_loralib_embedding_keys_load():
    emb = LoRAEmbedding.from_embedding(nn.Embedding(10, 6, padding_idx=0), r=3, alpha=6)
    A, B = torch.randn(3, 10), torch.randn(6, 3)  # loralib's lora.Embedding: lora_A [r, num], lora_B [dim, r]
    model = nn.Sequential(emb)
    model.load_state_dict({"0.weight": emb.weight.clone(), "0.lora_A": A, "0.lora_B": B}, strict=True)
    assert torch.equal(emb.lora_embedding_A, A) and torch.equal(emb.lora_embedding_B, B)
    ids = torch.tensor([0, 3, 9])
    ref = emb.weight[ids] + 2.0 * A.t()[ids] @ B.t()  # loralib's forward (scaling 6 / 3)
    torch.testing.assert_close(emb(ids), ref)
    fresh = nn.Sequential(LoRAEmbedding.from_embedding(nn.Embedding(10, 6), r=3, alpha=6))
    assert lora_ext.load_adapter(fresh, {"0.lora_A": A, "0.lora_B": B}) == ["0"]
    assert torch.equal(fresh[0].lora_embedding_A, A)


def test_lora_state_dict_bias_argument_as_loralib():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
    lora_ext.inject(m, ["0", "2"], r=2)
    lora_ext.mark_only_lora_trainable(m)

    def biases(**kw):
        return sorted(k for k in lora_ext.lora_state_dict(m, peft_names=False, **kw) if "lora_" not in k)

    assert biases() == biases(bias="none") == []
    assert biases(bias="lora_only") == ["0.bias"]
    assert biases(bias="all") == ["0.bias", "1.bias"]
    assert "base_model.model.0.base_layer.bias" in lora_ext.lora_state_dict(m, bias="lora_only")
    with pytest.raises(ValueError, match="lora_state_dict: bias must be"):
        lora_ext.lora_state_dict(m, bias="some")


def test_embedding_constructor_matches_nn_embedding():
    kw = dict(padding_idx=-2, max_norm=1.5, norm_type=3.0, scale_grad_by_freq=True, sparse=True)
    torch.manual_seed(0)
    ref = nn.Embedding(10, 4, **kw)
    layer = LoRAEmbedding(10, 4, r=2, **kw)
    for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
        assert getattr(layer, k) == getattr(ref, k), k
    assert layer.padding_idx == 8 and torch.count_nonzero(layer.weight[8]) == 0
    assert "padding_idx=8" in repr(layer) and "sparse=True" in repr(layer)
    with pytest.raises(AssertionError, match="Padding_idx"):
        LoRAEmbedding(10, 4, r=2, padding_idx=10)
    back = LoRAEmbedding.from_embedding(ref, r=2).base_module()  # (merging refuses max_norm)
    assert (back.padding_idx, back.max_norm, back.sparse) == (8, 1.5, True)


def test_sparse_embedding_backward():
    torch.manual_seed(0)
    dense, sparse = nn.Embedding(10, 4), nn.Embedding(10, 4, sparse=True)
    sparse.weight = nn.Parameter(dense.weight.detach().clone())
    grads = []
    for base in (dense, sparse):
        layer = LoRAEmbedding.from_embedding(base, r=2)
        torch.manual_seed(1)
        layer.reset_lora_parameters()
        nn.init.normal_(layer.lora_embedding_A)
        layer(torch.tensor([[1, 2, 2]])).square().sum().backward()  # crashed with sparse=True (A^T's grad)
        grads.append((layer.lora_embedding_A.grad, layer.lora_embedding_B.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_reset_parameters():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, r=4, init="gaussian")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    layer.reset_parameters()  # as nn.Linear's, then the LoRA init the layer was built with
    bound = 1 / math.sqrt(64)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().min() > 0
    assert layer.weight.abs().max() <= bound and torch.count_nonzero(layer.lora_B) == 0
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.05  # gaussian std 1/r, not kaiming's bound 1/8
    assert "bias=False" in repr(LoRALinear(4, 3, r=2, bias=False))
    emb = LoRAEmbedding(10, 4, r=2, padding_idx=1)
    with torch.no_grad():
        for p in emb.parameters():
            p.fill_(7.0)
    emb.reset_parameters()
    assert torch.count_nonzero(emb.weight[1]) == 0 and torch.count_nonzero(emb.lora_embedding_A) == 0
    # deferred init: build on meta, materialize, reset (torch's to_empty + reset_parameters)
    meta = LoRALinear(16, 8, r=2, device="meta").to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.isfinite(meta.weight).all() and torch.count_nonzero(meta.lora_B) == 0


@pytest.mark.parametrize("kw, match", [
    (dict(r=2.0), "rank r must be a positive int, got 2.0"),
    (dict(r=True), "rank r .* got True"),
    (dict(alpha="16"), "alpha must be a finite number, got '16'"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(alpha=True), "alpha must be a finite number"),
    (dict(dropout=None), "dropout must be a number in \\[0, 1\\), got None"),
    (dict(dropout="0.1"), "dropout must be a number"),
])
def test_bad_hparams_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(4, 3, **{"r": 2, **kw})
    with pytest.raises(ValueError, match="inject: module '0'.*" + match):
        lora_ext.inject(nn.Sequential(nn.Linear(4, 3)), ["0"], **{"r": 2, **kw})


def test_numpy_hparams_accepted():
    layer = LoRALinear.from_linear(nn.Linear(4, 3), r=np.int64(2), alpha=np.float32(4.0))
    assert type(layer.r) is int and layer.r == 2 and layer.lora_A.shape == (2, 4) and layer.scaling == 2.0
    emb = LoRAEmbedding.from_embedding(nn.Embedding(5, 3), r=np.int32(2))
    assert type(emb.r) is int and emb.lora_embedding_B.shape == (3, 2)


def test_inject_twice_names_the_lora_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lora_ext.inject(model, target_modules=["0", "2"], r=2)
    for target in (["0", "2"], "all-linear", r"0|2"):
        with pytest.raises(ValueError, match=r"LoRA layers already \(0, 2\)"):
            lora_ext.inject(model, target_modules=target, r=2)
    with pytest.raises(ValueError, match="matched no module"):
        lora_ext.inject(model, target_modules=["q_proj"], r=2)


class _Scaled(nn.Linear):  # a forward of its own: twice the plain output
    def forward(self, x):
        return super().forward(x) * 2


class _Router(nn.Linear):  # MoE-router-like: returns (top-1 scores, logits)
    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1).max(-1).values, logits


class _SameMath(nn.Linear):  # transformers' FalconLinear: x @ W^T + b, F.linear's result
    def forward(self, x):
        return x @ self.weight.T + self.bias


class _Positions(nn.Embedding):  # a learned positional embedding: looks up positions, not ids
    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[-1]).expand_as(ids))


def test_inject_refuses_what_a_lora_layer_cannot_stand_in_for():
    """A Linear subclass with a forward of its own, a positional embedding and a hooked target were
    replaced by LoRA layers computing F.linear / F.embedding of their weights: outputs changed at
    init (B = 0) and hooks stopped firing, silently. Now they are refused by name (\"all-linear\" leaves
    them out); a subclass computing F.linear's result (FalconLinear) is still taken."""
    torch.manual_seed(0)
    hooked = nn.Linear(6, 6)
    hooked.register_forward_hook(lambda mod, args, out: out * 3)
    model = nn.ModuleDict(dict(scaled=_Scaled(6, 6), router=_Router(6, 4), same=_SameMath(6, 6),
                               pos=_Positions(10, 6), hooked=hooked, plain=nn.Linear(6, 6)))
    for name, why in (("scaled", "_Scaled whose forward is not the plain layer's"),
                      ("router", "_Router whose forward"), ("pos", "_Positions whose forward"),
                      ("hooked", "has hooks")):
        with pytest.raises(TypeError, match=rf"inject: module '{name}' (is a )?{why}"):
            lora_ext.inject(model, target_modules=[name, "plain"], r=2)
        assert type(model["plain"]) is nn.Linear  # refused before anything changed
    x = torch.randn(5, 6)
    want = model["same"](x)
    assert lora_ext.inject(model, target_modules="all-linear", r=2) == ["same", "plain"]
    assert isinstance(model["same"], LoRALinear) and type(model["scaled"]) is _Scaled
    torch.testing.assert_close(model["same"](x), want)
