"""lora_ext.MergedLinear (loralib's LoRA on slices of a fused projection) against a plain-torch
fp64 reference of loralib's maths (grouped conv1d over the enabled slices, zero_pad into the
output): forward, gradients, dropout, merge/unmerge, loralib state dicts, PEFT export."""
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from models import tiny_gpt2
from torch import nn

import lora_ext
from lora_ext import Adapter, MergedLinear
from lora_ext.ops import lora_linear

ENABLES = [[True, False, True], [False, True], [True], [True, True, True], [False, False, True, False]]


def lora_ind(enable, out):
    """loralib's lora_ind: the output rows of the enabled slices."""
    ind = torch.zeros(len(enable), out // len(enable), dtype=torch.bool)
    ind[torch.tensor(enable)] = True
    return ind.view(-1)


def ref_forward(x, W, b, A, B, enable, scaling, fan_in_fan_out, x_lora=None):
    """loralib's MergedLinear.forward in plain torch (x [batch, T, in]): x_lora is dropout(x)."""
    out = W.shape[1] if fan_in_fan_out else W.shape[0]
    result = F.linear(x, W.t() if fan_in_fan_out else W, b)
    after_A = F.linear(x if x_lora is None else x_lora, A)
    after_B = F.conv1d(after_A.transpose(-2, -1), B.unsqueeze(-1), groups=sum(enable)).transpose(-2, -1)
    padded = x.new_zeros(*after_B.shape[:-1], out)
    padded[..., lora_ind(enable, out)] = after_B
    return result + padded * scaling


def ref_delta(A, B, enable, scaling, out):
    """The [out, in] weight update of loralib's merge (grouped conv1d, zero-padded rows)."""
    delta = F.conv1d(A.unsqueeze(0), B.unsqueeze(-1), groups=sum(enable)).squeeze(0)
    full = A.new_zeros(out, A.shape[1])
    full[lora_ind(enable, out)] = delta
    return full * scaling


def ref_padded(B, enable, r):
    """The fused layer's B [out, k·r], written out element by element."""
    k, d = sum(enable), B.shape[0] // sum(enable)
    full = B.new_zeros(d * len(enable), k * r)
    j = 0
    for i, on in enumerate(enable):
        if on:
            full[i * d:(i + 1) * d, j * r:(j + 1) * r] = B[j * d:(j + 1) * d]
            j += 1
    return full


def make(enable, fan_in_fan_out=False, bias=True, r=3, alpha=5.0, dropout=0.0, d=8, n_in=12, dtype=torch.float32):
    m = MergedLinear(n_in, d * len(enable), r, alpha, dropout, enable, fan_in_fan_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.5)  # as after training (B starts at zero)
        if bias:
            m.bias.normal_()
    return m


@pytest.mark.parametrize("enable", ENABLES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_loralib_maths(enable, fan_in_fan_out, bias):
    m = make(enable, fan_in_fan_out, bias)
    assert m.lora_A.shape == (3 * sum(enable), 12) and m.lora_B.shape == (8 * sum(enable), 3)
    assert m.scaling == 5.0 / 3
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 8 * len(enable))
    y = m(x)
    y.backward(g)
    d = lambda t: t.detach().double().requires_grad_()
    xr, Ar, Br = d(x), d(m.lora_A), d(m.lora_B)
    yr = ref_forward(xr, m.weight.double(), None if m.bias is None else m.bias.double(), Ar, Br, enable,
                     m.scaling, fan_in_fan_out)
    yr.backward(g.double())
    assert rel_err(y, yr) < 1e-6
    for got, want in ((x.grad, xr.grad), (m.lora_A.grad, Ar.grad), (m.lora_B.grad, Br.grad)):
        assert rel_err(got, want) < 1e-6
    assert m.weight.grad is None and (m.bias is None or m.bias.grad is None)  # frozen


@pytest.mark.parametrize("enable", ENABLES[:2])
def test_gradients_are_the_fused_ops_own_on_the_real_entries(enable):
    """lora_B's gradient is, bit for bit, the op's gradient of the padded B at lora_B's entries
    (the padding passes it through untouched); the padding is exact in fp64 (gradcheck)."""
    m = make(enable, fan_in_fan_out=True)
    x, g = torch.randn(7, 12), torch.randn(7, 8 * len(enable))
    m(x).backward(g)
    Bp = ref_padded(m.lora_B.detach(), enable, 3).requires_grad_()
    A = m.lora_A.detach().requires_grad_()
    lora_linear(x, m.weight, m.bias, A, Bp, m.scaling, fan_in_fan_out=True).backward(g)
    assert torch.equal(m.lora_A.grad, A.grad)
    assert torch.equal(ref_padded(m.lora_B.grad, enable, 3), Bp.grad * (ref_padded(torch.ones_like(m.lora_B), enable, 3)))
    B64 = m.lora_B.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(m._padded, (B64,))
    assert torch.equal(m._padded(B64), ref_padded(B64.detach(), enable, 3))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dropout_in_train_mode(fan_in_fan_out):
    """Train mode drops out x once for every slice, through the op's dropout (same seed: the same
    bits as lora_linear with the reference's padded B); eval mode does not."""
    enable = [True, False, True]
    m = make(enable, fan_in_fan_out, dropout=0.3)
    x = torch.randn(4, 6, 12)
    torch.manual_seed(11)
    y = m(x)
    y.sum().backward()
    A = m.lora_A.detach().requires_grad_()
    B = m.lora_B.detach().requires_grad_()
    torch.manual_seed(11)
    want = lora_linear(x, m.weight, m.bias, A, ref_padded(B, enable, 3), m.scaling, 0.3, True, fan_in_fan_out)
    want.sum().backward()
    assert torch.equal(y, want)
    assert torch.equal(m.lora_A.grad, A.grad) and torch.equal(m.lora_B.grad, B.grad)
    m.eval()
    plain = ref_forward(x.double(), m.weight.double(), m.bias.double(), m.lora_A.double(), m.lora_B.double(),
                        enable, m.scaling, fan_in_fan_out)
    assert rel_err(m(x), plain) < 1e-6 and rel_err(y, plain) > 1e-3
    # the mask is x's: rows of the disabled slice (k) never see the LoRA term, dropped out or not
    base = F.linear(x, m.weight.t() if fan_in_fan_out else m.weight, m.bias)
    assert torch.equal(y[..., 8:16], base[..., 8:16])


@pytest.mark.parametrize("enable", ENABLES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_unmerge(enable, fan_in_fan_out):
    m = make(enable, fan_in_fan_out)
    x = torch.randn(2, 5, 12)
    y = m(x)
    W0 = m.weight.detach().clone()
    lora_ext.merge(m)
    assert m.merged
    delta = ref_delta(m.lora_A.double(), m.lora_B.double(), enable, m.scaling, m.out_features)
    want = W0.double() + (delta.t() if fan_in_fan_out else delta)
    assert rel_err(m.weight, want) < 1e-6
    assert rel_err(m(x), y) < 1e-5
    lora_ext.unmerge(m)
    assert torch.equal(m.weight, W0)
    m.merge()
    m.train()  # unmerges, as loralib's train(True)
    assert not m.merged and torch.equal(m.weight, W0)


def test_merge_bf16_is_exact_and_merge_and_unload_gives_the_base_class():
    m = make([True, False, True], dtype=torch.bfloat16)
    W0 = m.weight.detach().clone()
    for _ in range(3):
        m.merge()
        m.unmerge()
    assert torch.equal(m.weight.view(torch.int16), W0.view(torch.int16))
    gpt = tiny_gpt2()
    attn = gpt.transformer.h[0].attn
    attn.c_attn = MergedLinear.from_linear(attn.c_attn, [True, False, True], r=2, alpha=4)
    with torch.no_grad():
        attn.c_attn.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        y = gpt(ids).logits
        served = lora_ext.merge_and_unload(gpt)
        assert type(served.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert rel_err(served(ids).logits, y) < 1e-5
    fresh = tiny_gpt2()
    fresh.load_state_dict(served.state_dict())  # the base model's keys, strictly


def test_loralib_state_dict_round_trip():
    """A checkpoint with loralib's keys and shapes (weight, bias, lora_A [k·r, in], lora_B [k·d, r],
    fan_in_fan_out weight [in, out]) loads with load_state_dict and computes loralib's forward;
    lora_state_dict(peft_names=False) gives it back; load_adapter takes it too."""
    enable = [True, False, True]
    sd = {"weight": torch.randn(12, 24), "bias": torch.randn(24), "lora_A": torch.randn(6, 12),
          "lora_B": torch.randn(16, 3)}
    m = MergedLinear(12, 24, r=3, alpha=6, enable_lora=enable, fan_in_fan_out=True)
    m.load_state_dict(sd)  # strict
    x = torch.randn(2, 4, 12)
    want = ref_forward(x.double(), *(sd[k].double() for k in ("weight", "bias", "lora_A", "lora_B")), enable,
                       2.0, True)
    assert rel_err(m(x), want) < 1e-6
    model = nn.Sequential(m)
    got = lora_ext.lora_state_dict(model, peft_names=False, bias="all")
    assert sorted(got) == ["0.bias", "0.lora_A", "0.lora_B"]
    assert all(torch.equal(got["0." + k], sd[k]) for k in ("bias", "lora_A", "lora_B"))
    other = nn.Sequential(MergedLinear(12, 24, r=3, alpha=6, enable_lora=enable, fan_in_fan_out=True))
    other[0].weight = m.weight
    lora_ext.load_adapter(other, {k: v for k, v in got.items() if "lora_" in k})
    assert torch.equal(other[0].lora_B, sd["lora_B"]) and torch.equal(other[0].lora_A, sd["lora_A"])
    # PEFT names carry the fused layer's B [out, k·r]; load_adapter takes those back as well
    peft_sd = lora_ext.lora_state_dict(model)
    assert peft_sd["base_model.model.0.lora_B.weight"].shape == (24, 6)
    assert torch.equal(peft_sd["base_model.model.0.lora_B.weight"], ref_padded(sd["lora_B"], enable, 3))
    with torch.no_grad():
        other[0].lora_B.zero_()
    lora_ext.load_adapter(other, peft_sd)
    assert torch.equal(other[0].lora_B, sd["lora_B"])
    with pytest.raises(ValueError, match=r"load_adapter: state_dict: '0': MergedLinear.lora_factors_of: expected B"):
        lora_ext.load_adapter(other, {"0.lora_A": sd["lora_A"], "0.lora_B": torch.randn(24, 3)})


def test_merged_layer_loads_a_state_dict_and_set_lora_factors_checks_the_blocks():
    enable = [False, True, True]
    m = make(enable)
    x = torch.randn(3, 12)
    m.merge()
    A, B = torch.randn_like(m.lora_A), torch.randn_like(m.lora_B)
    m.load_state_dict({"lora_A": A, "lora_B": B}, strict=False)  # unmerged, loaded, merged again
    assert m.merged and torch.equal(m.lora_B, B)
    m.unmerge()
    want = m(x)
    # the fused layer's form, of another rank: new parameters, r and lora_alpha follow
    A5, B5 = torch.randn(10, 12), torch.randn(16, 5)
    m.set_lora_factors(A5, ref_padded(B5, enable, 5), 0.25)
    assert m.r == 5 and m.lora_alpha == 0.25 * 5 and m.lora_B.shape == (16, 5) and torch.equal(m.lora_B, B5)
    assert rel_err(m(x), ref_forward(x[None].double(), m.weight.double(), m.bias.double(), A5.double(),
                                     B5.double(), enable, 0.25, False)[0]) < 1e-6
    bad = ref_padded(B5, enable, 5)
    bad[0, 0] = 1.0  # a row of the disabled slice
    with pytest.raises(ValueError, match=r"MergedLinear.set_lora_factors: B \[24, 10\] has non-zero entries outside"):
        m.set_lora_factors(A5, bad, 0.25)
    with pytest.raises(ValueError, match=r"MergedLinear.set_lora_factors: expected A \[2·r, 12\]"):
        m.set_lora_factors(torch.randn(5, 12), torch.randn(24, 5), 1.0)
    with pytest.raises(ValueError, match=r"MergedLinear.set_lora_factors: expected B \[16, 5\]"):
        m.set_lora_factors(A5, torch.randn(20, 5), 1.0)
    assert torch.equal(m.lora_B, B5)  # refused before anything changed
    assert want.shape == m(x).shape


def test_combined_merged_linear_adapters_load_back():
    """combine(how="cat") of two MergedLinear adapters gives the fused layer's B with the rank
    components of each slice interleaved ([B1 q, B1 v, B2 q, B2 v]); load_adapter puts it back into
    the MergedLinear (its columns, and A's rows, put in slice order: the same delta) instead of
    refusing it as 'non-zero entries outside the blocks'. A component writing to two slices is
    still refused."""
    enable = [True, False, True]
    layers = [make(enable, r=2) for _ in range(2)]
    for m in layers:
        m.lora_B.data.normal_()
    ads = [lora_ext.Adapter.from_model(nn.Sequential(m)) for m in layers]
    both = lora_ext.combine(ads, [0.5, 2.0])
    x = torch.randn(3, 12)
    want = F.linear(x, layers[0].weight, layers[0].bias) + sum(
        w * ad.layers["0"].scale * (x @ ad.layers["0"].A.t()) @ ad.layers["0"].B.t() for ad, w in zip(ads, (0.5, 2.0)))
    target = nn.Sequential(make(enable, r=2))
    target[0].weight.data.copy_(layers[0].weight)
    target[0].bias.data.copy_(layers[0].bias)
    assert lora_ext.load_adapter(target, both) == ["0"]
    m = target[0]
    assert m.r == 4 and m.lora_B.shape == (16, 4) and torch.allclose(m.lora_factors()[1] @ m.lora_A,
                                                                        both.layers["0"].B @ both.layers["0"].A, atol=1e-6)
    assert rel_err(m(x), want) < 1e-6
    A, B = both.layers["0"].A.clone(), both.layers["0"].B.clone()
    B[0:8, 0] = 1.0  # column 0 now writes to the q and v slices
    B[16:24, 0] = 1.0
    with pytest.raises(ValueError, match=r"non-zero entries outside the blocks .* in any order of its 8 columns"):
        m.set_lora_factors(A, B, 1.0)


@pytest.mark.parametrize("enable, out, match", [
    ([False, False], 16, r"enable_lora=\[False, False\] enables no slice"),
    ([], 16, r"enable_lora=\[\] enables no slice"),
    (None, 16, r"enable_lora must be a list of bools"),
    ([1, 0, 1], 24, r"enable_lora must be a list of bools"),
    ("TFT", 24, r"enable_lora must be a list of bools"),
    ([True, False, True], 16, r"out_features=16 is not divisible by len\(enable_lora\)=3"),
])
def test_bad_enable_lora_is_refused_by_name(enable, out, match):
    with pytest.raises(ValueError, match="MergedLinear: " + match):
        MergedLinear(8, out, r=2, enable_lora=enable)


def test_bad_hparams_and_targets():
    with pytest.raises(ValueError, match="MergedLinear: LoRA rank r must be a positive int, got 0"):
        MergedLinear(8, 16, r=0, enable_lora=[True, False])
    with pytest.raises(TypeError, match="MergedLinear.from_linear: expected nn.Linear or transformers Conv1D"):
        MergedLinear.from_linear(nn.Embedding(4, 4), [True])


def test_compiles_fullgraph_and_trains_only_lora():
    model = nn.Sequential(nn.Linear(12, 12), make([True, False, True], bias=False), nn.ReLU())
    lora_ext.mark_only_lora_trainable(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["1.lora_A", "1.lora_B"]
    x = torch.randn(3, 5, 12)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in (model[1].lora_A, model[1].lora_B)]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    assert rel_err(out, model(x)) < 1e-6
    for g, p in zip(eager, (model[1].lora_A, model[1].lora_B)):
        assert rel_err(p.grad, g) < 1e-6


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path, use_rslora):
    """GPT-2's c_attn (Conv1D) with LoRA on q and v: Adapter.from_model saves a PEFT LoRA of the
    whole fused layer (rank 2·r, B zero on k's rows) that PeftModel.from_pretrained runs to
    lora_ext's logits; it loads back into MergedLinear layers exactly, and into a plain model."""
    peft = pytest.importorskip("peft")
    enable, r = [True, False, True], 2
    model = tiny_gpt2()
    for block in model.transformer.h:
        block.attn.c_attn = MergedLinear.from_linear(block.attn.c_attn, enable, r=r, alpha=6, use_rslora=use_rslora)
        with torch.no_grad():
            block.attn.c_attn.lora_B.normal_(0, 0.2)
    lora_ext.mark_only_lora_trainable(model)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ours = model(ids).logits
    Adapter.from_model(model).save(tmp_path)
    saved = Adapter.load(tmp_path)
    assert saved.config["r"] == 2 * r and saved.config["fan_in_fan_out"] is True
    assert saved.config["target_modules"] == ["c_attn"]
    layer = model.transformer.h[0].attn.c_attn
    w = saved.layers["transformer.h.0.attn.c_attn"]
    assert w.scale == pytest.approx(layer.scaling, rel=1e-12)
    assert torch.equal(w.B, ref_padded(layer.lora_B.detach(), enable, r)) and torch.equal(w.A, layer.lora_A)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, ours) < 1e-5
    again = tiny_gpt2()
    for block in again.transformer.h:
        block.attn.c_attn = MergedLinear.from_linear(block.attn.c_attn, enable, r=r, alpha=1, use_rslora=use_rslora)
    lora_ext.load_adapter(again, tmp_path)
    for a, b in zip(again.transformer.h, model.transformer.h):
        assert torch.equal(a.attn.c_attn.lora_B, b.attn.c_attn.lora_B)
        assert a.attn.c_attn.scaling == pytest.approx(b.attn.c_attn.scaling, rel=1e-12)
    from lora_ext.distributed import save_adapter

    save_adapter(model, tmp_path / "dist")  # no process group: saves the same adapter
    dist = Adapter.load(tmp_path / "dist")
    assert dist.config == saved.config and all(torch.equal(dist.layers[n].B, w.B) for n, w in saved.layers.items())
    plain = tiny_gpt2()
    lora_ext.load_adapter(plain, tmp_path)  # LoRALinear layers of rank 2·r
    with torch.no_grad():
        assert rel_err(again(ids).logits, ours) < 1e-6 and rel_err(plain(ids).logits, ours) < 1e-6


def test_not_tensor_parallel():
    tp = pytest.importorskip("lora_ext.tp")
    model = nn.Sequential(make([True, False]))
    with pytest.raises(ValueError, match=r"'0', a MergedLinear, which is not tensor-parallel"):
        tp.validate_plan(model, None, {"0": tp.ColwiseParallel()})
    with pytest.raises(ValueError, match=r"is a MergedLinear, not a lora_ext LoRALinear"):
        tp.validate_plan(model, None, {"0": tp.ColwiseParallelLoRA()})


def test_sharded_lora_b_is_refused_by_name(monkeypatch):
    """An FSDP-sharded lora_B (a DTensor) cannot be padded into the fused layer's B: lora_factors
    (and so merge, Adapter.from_model, save_adapter) says so instead of building a wrong one."""
    import lora_ext.merged_linear as ml

    m = make([True, False])
    monkeypatch.setattr(ml, "is_dtensor", lambda t: t is m.lora_B)
    with pytest.raises(ValueError, match=r"MergedLinear.lora_factors: lora_B is sharded"):
        m.lora_factors()
    with pytest.raises(ValueError, match=r"MergedLinear.lora_factors: lora_B is sharded"):
        Adapter.from_model(nn.Sequential(m))


def test_load_adapter_checks_every_merged_linear_before_changing_any():
    """A LoRA of the whole layer that is not zero outside the enabled slices cannot go into a
    MergedLinear: load_adapter refuses it by module before loading any module."""
    model = nn.Sequential(make([True, False, True]), make([True, False, True]))
    before = [m.lora_B.detach().clone() for m in model]
    A = {f"{i}": torch.randn(6, 12) for i in range(2)}
    B = {"0": ref_padded(torch.randn(16, 3), [True, False, True], 3), "1": torch.randn(24, 6)}
    sd = {f"base_model.model.{i}.lora_{f}.weight": t[f"{i}"] for i in range(2) for f, t in (("A", A), ("B", B))}
    with pytest.raises(ValueError, match=r"load_adapter: module '1': MergedLinear.lora_factors_of: B \[24, 6\] "
                                         r"has non-zero entries outside the blocks"):
        lora_ext.load_adapter(model, Adapter({n: lora_ext.LayerWeights(A[n], B[n], 1.0) for n in A}))
    with pytest.raises(ValueError, match=r"load_adapter: state_dict: '1': MergedLinear.lora_factors_of"):
        lora_ext.load_adapter(model, sd)
    assert all(torch.equal(m.lora_B, b) for m, b in zip(model, before))
    with pytest.raises(ValueError, match=r"load_adapter: module '0': MergedLinear.lora_factors_of: expected A \[2·r, 12\]"):
        lora_ext.load_adapter(model, Adapter({"0": lora_ext.LayerWeights(torch.randn(3, 12), torch.randn(24, 3), 1.0)}))


def test_deferred_init_reset_and_repr():
    import numpy as np

    meta = MergedLinear(16, 24, r=4, enable_lora=np.array([True, False, True]), init="gaussian", device="meta")
    layer = meta.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    layer.reset_parameters()  # as nn.Linear's, then the LoRA init it was built with
    assert layer.enable_lora == (True, False, True) and layer.lora_A.shape == (8, 16)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.bias.abs().max() <= 1 / 16 ** 0.5
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.05  # gaussian std 1/r (the per-slice rank)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # B = 0: the base output
    assert "enable_lora=[True, False, True]" in repr(layer) and "bias=False" in repr(make([True], bias=False))
