"""DoRA (use_dora=True) in LoRALinear, inject and adapter files: PEFT's DoRA is the oracle
(outputs, gradients, dropout masks, files both ways, merges), plus an fp64 plain-torch reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, rel_err
from models import tiny_gpt2, tiny_llama
from peft_cases import randomize
from torch import nn

import lora_ext
from lora_ext import Adapter, LoRALinear, inject, load_adapter

peft = pytest.importorskip("peft")

CASES = {"llama": (tiny_llama, ["q_proj", "v_proj"], False), "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], True)}


def peft_dora(kind, dropout=0.0, seed=1, **cfg):
    make, targets, fifo = CASES[kind]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                     lora_dropout=dropout, fan_in_fan_out=fifo, **cfg))
    return randomize(pm, seed, magnitude=0.2)


def ours_from(pm, tmp_path, kind):
    pm.save_pretrained(tmp_path / "ad")
    model = CASES[kind][0]()
    assert load_adapter(model, str(tmp_path / "ad"))
    return model


def reference(x, W, b, A, B, m, s):
    """fp64 plain torch of DoRA without dropout: g * (W + s B A) x + b, g = m / ||W + s B A|| (detached)."""
    V = W + s * B @ A
    g = m / V.detach().norm(dim=1)
    return g * (x @ V.t()) + (0 if b is None else b)


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_fp64_reference_outputs_and_gradients(fifo, bias):
    lin = nn.Linear(33, 20, bias=bias)
    layer = LoRALinear.from_linear(lin, r=5, alpha=7, use_dora=True)
    if fifo:  # a Conv1D-shaped layer: weight [in, out]
        layer = LoRALinear(33, 20, r=5, alpha=7, bias=bias, fan_in_fan_out=True, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(20) + 0.5)
    x = torch.randn(3, 7, 33, requires_grad=True)
    y = layer(x)
    W = layer.weight.t() if fifo else layer.weight
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    yr = reference(leaves[0], W.double(), None if layer.bias is None else layer.bias.double(), *leaves[1:3],
                   leaves[3], layer.scaling)
    assert rel_err(y, yr) < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    for got, ref in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad), leaves):
        assert rel_err(got, ref.grad) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_new_layer_computes_the_base_layer(dtype, bias):
    """g = 1 exactly at init: the norm is rounded to the magnitude's dtype before dividing, as PEFT.
    So the base layer's outputs bit for bit in fp32 and without a bias; in 16 bits a bias is added to
    x W^T already rounded to the dtype (F.linear rounds x W^T + b once): one extra rounding at most."""
    lin = nn.Linear(64, 48, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()  # as large as x W^T: the bias moves the roundings
    layer = LoRALinear.from_linear(copy.deepcopy(lin), r=4, use_dora=True)
    x = torch.randn(5, 64, dtype=dtype)
    got, want = layer(x), lin(x)
    if dtype == torch.float32 or not bias:
        assert torch.equal(got, want)
    else:  # |round(round(z) + b) - round(z + b)| <= eps/2 (|z| + |got| + |want|), z = x W^T
        eps = torch.finfo(dtype).eps
        z = x.double() @ lin.weight.double().t()
        bound = eps / 2 * (z.abs() + got.double().abs() + want.double().abs())
        assert ((got.double() - want.double()).abs() <= bound).all()
    n = torch.linalg.norm(lin.weight.double(), dim=1)  # fp32 accumulation, rounded to the dtype
    torch.testing.assert_close(layer.lora_magnitude_vector.double(), n, rtol=1e-6 if dtype == torch.float32 else
                               2 ** -8, atol=0)


def test_norm_is_detached_and_only_the_magnitude_learns_scale():
    layer = LoRALinear(16, 8, r=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.weight.grad is None
    sd = lora_ext.lora_state_dict(nn.Sequential(layer), peft_names=False)
    assert sd.keys() == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    layer = LoRALinear(32, 24, r=3, use_dora=True, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 32, device=device)
    want = layer(x)
    got = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_file_loads_with_same_logits_and_gradients(kind, tmp_path):
    pm = peft_dora(kind)
    ours = ours_from(pm, tmp_path, kind)
    assert all(m.use_dora for m in lora_ext.lora_layers(ours).values())
    ids = torch.randint(0, 128, (2, 12))
    pm.train(), ours.train()
    a, b = pm(input_ids=ids).logits, ours(input_ids=ids).logits
    assert rel_err(b, a) < 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    for n, m in lora_ext.lora_layers(ours).items():
        for leaf, key in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                          ("lora_magnitude_vector", "lora_magnitude_vector.default.weight")):
            assert rel_err(getattr(m, leaf).grad, theirs[f"base_model.model.{n}.{key}"]) < 1e-5, (n, leaf)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_dropout_in_training_is_peft_s_expression_with_its_masks(kind, tmp_path):
    pm = peft_dora(kind, dropout=0.3)
    ours = ours_from(pm, tmp_path, kind)
    assert {m.lora_dropout for m in lora_ext.lora_layers(ours).values()} == {0.3}
    ids = torch.randint(0, 128, (2, 12))
    pm.train(), ours.train()
    torch.manual_seed(5)
    a = pm(input_ids=ids).logits
    torch.manual_seed(5)
    b = ours(input_ids=ids).logits  # same RNG draws in the same order: the same masks
    assert rel_err(b, a) < 1e-5
    torch.manual_seed(6)
    assert rel_err(ours(input_ids=ids).logits, a) > 1e-4  # the masks matter


@pytest.mark.parametrize("kind", sorted(CASES))
def test_saved_adapter_loads_in_peft(kind, tmp_path):
    model = CASES[kind][0]()
    inject(model, CASES[kind][1], r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    Adapter.from_model(model).save(tmp_path / "out")
    ad = Adapter.load(str(tmp_path / "out"))
    assert ad.config["use_dora"] is True and all(w.magnitude is not None for w in ad.layers.values())
    pm = peft.PeftModel.from_pretrained(CASES[kind][0](), tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).logits, model.eval()(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("kind", sorted(CASES))
def test_merge_and_unload_matches_peft(kind, tmp_path):
    pm = peft_dora(kind)
    ours = ours_from(pm, tmp_path, kind).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        theirs = pm.merge_and_unload()
        merged = lora_ext.merge_and_unload(ours)
        assert not lora_ext.lora_layers(merged)
        assert rel_err(merged(input_ids=ids).logits, want) < 1e-5
        assert rel_err(theirs(input_ids=ids).logits, want) < 1e-5
        for (n, p), (n2, q) in zip(merged.named_parameters(), theirs.named_parameters()):
            assert n == n2 and rel_err(p, q) < 1e-6, n


# ---------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_rounds_once_and_exact_unmerge_gives_w0_back(fifo, dtype):
    layer = LoRALinear(40, 24, r=3, alpha=5, fan_in_fan_out=fifo, use_dora=True, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 40, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merge_overhead() == 1.0
    W, A, B = w0.double(), layer.lora_A.double(), layer.lora_B.double()
    V = (W.t() if fifo else W) + layer.scaling * B @ A
    n = torch.linalg.norm((V.float() if dtype == torch.float32 else V), dim=1).to(dtype).double()
    want = (layer.lora_magnitude_vector.double() / n).unsqueeze(1) * V
    want = (want.t() if fifo else want).to(dtype)
    assert (layer.weight.double() - want.double()).abs().max() <= (want.double().abs() * 2 ** -20).max() + 1e-30 \
        or dtype != torch.float32
    if dtype != torch.float32:  # at most one unit in the last place from the fp64 value rounded once
        assert (layer.weight != want).float().mean() < 0.01
    assert rel_err(layer(x), y) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge(exact=False)
    assert layer.merge_overhead() == 0.0
    layer.unmerge()  # PEFT's W / g - s B A: close, not bit for bit
    assert rel_err(layer.weight, w0) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def test_dtype_change_while_merged_equals_converted_then_merged():
    layer = LoRALinear(32, 16, r=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    other = copy.deepcopy(layer)
    layer.merge()
    layer.to(torch.bfloat16)
    other.to(torch.bfloat16).merge()
    assert torch.equal(layer.weight, other.weight)
    layer.unmerge()
    other.unmerge()
    assert torch.equal(layer.weight, other.weight)


def test_set_lora_factors_on_a_merged_layer_and_magnitude_rules():
    layer = LoRALinear(16, 8, r=2, use_dora=True)
    x = torch.randn(3, 16)
    A, B, m = torch.randn(4, 16), torch.randn(8, 4), torch.rand(8) + 1
    layer.merge()
    layer.set_lora_factors(A, B, 0.5, m)
    assert layer.merged and layer.r == 4 and torch.equal(layer.lora_magnitude_vector, m)
    ref = reference(x.double(), layer._merge_state.w0.double(), layer.bias.double(), A.double(), B.double(),
                    m.double(), 0.5)
    assert rel_err(layer(x), ref) < 1e-6
    layer.unmerge()
    layer.set_lora_factors(A, B, 0.5)  # no magnitude: the norm, so the layer computes plain LoRA
    plain = F.linear(x, layer.weight + 0.5 * B @ A, layer.bias)
    assert rel_err(layer(x), plain) < 1e-6
    with pytest.raises(ValueError, match=r"set_lora_factors: magnitude must be \[8\]"):
        layer.set_lora_factors(A, B, 0.5, torch.ones(7))
    with pytest.raises(ValueError, match="set_lora_factors: magnitude given, but the layer is not DoRA"):
        LoRALinear(16, 8, r=2).set_lora_factors(A, B, 0.5, m)


# ---------------------------------------------------------------- refusals
def _save_and_edit(tmp_path, edit_cfg=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file
    pm = peft_dora("llama")
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    t = load_file(path)
    if edit_tensors:
        t = edit_tensors(t)
    save_file(t, path)
    if edit_cfg:
        import json
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps(edit_cfg(cfg)))
    return str(tmp_path)


def test_files_whose_magnitudes_disagree_with_use_dora_are_refused(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    d = _save_and_edit(tmp_path / "a", edit_tensors=lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: module 'model.layers.0.self_attn.q_proj' has no "
                                         r"lora_magnitude_vector but the config says use_dora=true"):
        Adapter.load(d)
    d = _save_and_edit(tmp_path / "b", edit_cfg=lambda c: {**c, "use_dora": False})
    with pytest.raises(ValueError, match="has a lora_magnitude_vector .DoRA. but the config says use_dora=false"):
        Adapter.load(d)
    d = _save_and_edit(tmp_path / "c", edit_tensors=lambda t: {**t, key: torch.ones(3)})
    with pytest.raises(ValueError, match=r"has lora_magnitude_vector \(3,\); expected \[64\]"):
        Adapter.load(d)


def test_dora_adapter_into_plain_lora_layers_and_mixed_models_are_refused(tmp_path):
    pm = peft_dora("llama")
    pm.save_pretrained(tmp_path)
    model = tiny_llama()
    inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="is a LoRA layer without DoRA but the adapter is DoRA"):
        load_adapter(model, str(tmp_path))
    mixed = tiny_llama()
    inject(mixed, ["q_proj"], use_dora=True)
    inject(mixed, ["v_proj"])
    with pytest.raises(ValueError, match="Adapter.from_model: .* is a DoRA layer but .* is not"):
        Adapter.from_model(mixed)


def test_state_dict_round_trip_and_plain_lora_into_dora_layers(tmp_path):
    model = tiny_llama()
    inject(model, ["q_proj"], r=2, use_dora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.rand_like(p))
    sd = lora_ext.lora_state_dict(model)
    assert sum("lora_magnitude_vector" in k for k in sd) == 2
    other = tiny_llama()
    inject(other, ["q_proj"], r=2, use_dora=True)
    load_adapter(other, sd)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)
    no_mag = {k: v for k, v in sd.items() if "magnitude" not in k}
    with pytest.raises(ValueError, match="is a DoRA layer but the state dict holds no lora_magnitude_vector"):
        load_adapter(other, no_mag)
