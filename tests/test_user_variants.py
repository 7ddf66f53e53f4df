"""A researcher's workflows with LoRA variants (DoRA on linears, convolutions and embeddings, conv /
embedding LoRA, combine, rank / alpha patterns, rsLoRA): regressions found by trying them against
PEFT and plain-torch references."""
import copy
import json

import pytest
import torch
from conftest import rel_err
from torch import nn

import lora_ext
from lora_ext import LoRAConvNd

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_dora_conv_on_an_unbatched_input_keeps_the_base_layer_s_shape(dims, training):
    # was: g and the bias were viewed [1, out, 1, ...], so an unbatched input [C, *spatial] (which
    # nn.ConvNd takes) came out [1, out, *spatial] from a DoRA conv, not [out, *spatial]
    conv = CONVS[dims](3, 4, 3, padding=1)
    layer = LoRAConvNd.from_conv(conv, r=2, alpha=4, dropout=0.2, use_dora=True).train(training)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(1 + torch.rand_like(layer.lora_magnitude_vector))
    x = torch.randn(3, *[6] * dims)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    want = layer(x[None])[0]  # the same dropout draw: one batch of one
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert rel_err(y, conv(x)) > 1e-3  # the adapter does something


class _Net(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return self.emb(ids)


def test_dora_embedding_with_max_norm_takes_g_before_renormalizing_a_as_peft():
    # was: g came from lora_embedding_A after the lookup in A^T had renormalized its rows in place
    # (max_norm); PEFT computes the norm from A before that lookup, so the first forward over rows of
    # A^T longer than max_norm differed from PEFT's (34% here; the earlier test's A rows were short)
    peft = pytest.importorskip("peft")
    emb = nn.Embedding(40, 16, max_norm=1.0)
    pm = peft.get_peft_model(_Net(copy.deepcopy(emb)), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["emb"],
                                                                        use_dora=True))
    theirs = pm.base_model.model.emb
    A, B, m = (theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"],
               theirs.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        A.normal_(0, 2.0), B.normal_(0, 0.3), m.mul_(1.3)
    layer = lora_ext.LoRAEmbedding.from_embedding(copy.deepcopy(emb), r=3, alpha=5, use_dora=True)
    layer.set_lora_factors(A.detach().clone(), B.detach().clone(), theirs.scaling["default"], m.detach().clone())
    ids = torch.randint(0, 40, (3, 11))
    assert (A.detach().t()[ids.flatten()].norm(dim=1) > 1.0).any()  # the lookup renormalizes rows of A^T
    want, got = pm(ids), layer(ids)
    assert rel_err(got, want) < 1e-6
    assert torch.equal(layer.lora_embedding_A, A)  # both renormalized the same rows in place
    g = torch.randn_like(want)
    want.backward(g), got.backward(g)
    for ours, p in ((layer.lora_embedding_A, A), (layer.lora_embedding_B, B), (layer.lora_magnitude_vector, m)):
        assert rel_err(ours.grad, p.grad) < 1e-5
    with torch.no_grad():  # the rows are renormalized now: the next output differs from the first, as PEFT's
        again = pm(ids)
        assert rel_err(layer(ids), again) < 1e-6 and rel_err(again, want) > 1e-3


@pytest.mark.parametrize("kw, msg", [
    (dict(rank_pattern=[("0", 5)]), r"inject: rank_pattern must be a dict .* got list"),
    (dict(rank_pattern={"(": 5}), r"inject: rank_pattern key '\(' is not a valid regex"),
    (dict(alpha_pattern={3: 2.0}), r"inject: alpha_pattern keys must be str .* got 3"),
    (dict(alpha_pattern={"(?=1)": 2.0}), r"inject: alpha_pattern key '\(\?=1\)'.* not supported"),
])
def test_inject_names_a_bad_rank_or_alpha_pattern_before_changing_the_model(kw, msg):
    # was: a list raised AttributeError ('list' object has no attribute 'items'), a bad key a ValueError
    # naming neither inject nor the argument (or a TypeError for a non-str key)
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match=msg):
        lora_ext.inject(model, ["0", "1"], r=2, **kw)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Conv1d
    lora_ext.inject(model, ["0", "1"], r=2, rank_pattern={"1": 3}, alpha_pattern={"0": 6.0})  # good ones work
    assert (model[0].r, model[0].lora_alpha, model[1].r, model[1].lora_alpha) == (2, 6.0, 3, 8)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_combine_overflow_in_its_fp32_arithmetic_names_float32_whatever_the_dtype(dtype):
    # was: with dtype=torch.float64, c = w * s beyond float32's range raised "overflow torch.float64 ...
    # pass a wider dtype": the factors are computed in fp32 first, so no dtype could help
    A, B = torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"overflow torch\.float32 .* computed in it.*use smaller weights"):
        lora_ext.combine([(A, B, 1.0)], [1e40], dtype=dtype)
    out = lora_ext.combine([(A, B, 1.0)], [1e30], dtype=dtype)  # within float32: fine
    assert out.B.dtype == (dtype or torch.float32)
    assert rel_err(out.B.double() @ out.A.double(), 1e30 * B.double() @ A.double()) < 1e-6
    with pytest.raises(ValueError, match=r"overflow torch\.float16 .* pass a wider dtype"):
        lora_ext.combine([(A, B, 1.0)], [1e6], dtype=torch.float16)


def test_combine_of_one_adapter_not_in_a_list_names_the_argument():
    # was: combine(adapter) raised "TypeError: 'Adapter' object is not iterable" (naming neither combine
    # nor the argument), and combine((A, B, scale)) "adapter 0: expected ..., got Tensor"
    A, B = torch.randn(2, 4), torch.randn(3, 2)
    lw = lora_ext.LayerWeights(A, B, 0.5)
    ad = lora_ext.Adapter({"x": lw})
    for one in (ad, lw, (A, B, 0.5)):
        with pytest.raises(TypeError, match=r"combine: adapters must be a list .* got one \w+ \(pass \[it\]\)"):
            lora_ext.combine(one)
    with pytest.raises(TypeError, match=r"combine: adapters must be a list .* got dict"):
        lora_ext.combine({"x": ad})
    for many in ([ad], (ad,), (a for a in [ad])):  # any iterable of them works
        both = lora_ext.combine(many, [2.0])
        assert rel_err(both.layers["x"].B @ both.layers["x"].A, B @ A) < 1e-6


def test_numpy_hyperparameters_save_as_plain_json_numbers(tmp_path):
    """inject accepts numpy numbers (numbers.Real); Adapter.save wrote the weights, then json.dump failed on
    np.float32 (a half-written directory). The config is plain numbers, PEFT loads it, and what JSON
    cannot hold is refused before any file is written."""
    import numpy as np
    peft = pytest.importorskip("peft")

    model = nn.Sequential(nn.Linear(6, 5))
    lora_ext.inject(model, ["0"], r=np.int64(2), alpha=np.float32(6), dropout=np.float32(0.25))
    ad = lora_ext.Adapter.from_model(model)
    ad.save(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (2, 6.0, 0.25)
    assert type(cfg["r"]) is int
    back = peft.PeftModel.from_pretrained(copy.deepcopy(nn.Sequential(nn.Linear(6, 5))), str(tmp_path / "a"))
    assert back.peft_config["default"].r == 2
    ad.config["note"] = object()
    with pytest.raises(TypeError, match=r"Adapter.save: the adapter config holds a object"):
        ad.save(str(tmp_path / "b"))
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
