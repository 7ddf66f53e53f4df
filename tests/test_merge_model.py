"""Module/model-level merge: LoRALinear/LoRAEmbedding.merge/unmerge, lora_ext.merge/unmerge,
merge_and_unload, combine."""
import copy

import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err
from models import tiny_gpt2, tiny_llama
from torch import nn

import lora_ext
from lora_ext import Adapter, LayerWeights, LoRAEmbedding, LoRALinear
from lora_ext.merge import merge_layer, merge_overhead, unmerge_layer
from lora_ext.ops import merge_

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(INT[a.dtype]).cpu(), b.view(INT[b.dtype]).cpu())


def trained(model, seed=0, ratio=0.05):
    """Gives every LoRA layer random factors whose delta s B A is about `ratio` of W's size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            A, B, s = m.lora_factors()
            for p in (A, B):
                p.copy_(torch.randn(p.shape, generator=g))
            delta = s * B.double() @ A.double()
            B.mul_(ratio * m.weight.double().std().item() / delta.std().item())
    return model


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


TARGETS = {"llama": ("q_proj", "v_proj", "down_proj", "embed_tokens"), "gpt2": ("c_attn", "c_fc", "wpe")}


def build(kind, dtype, device):
    model = (tiny_llama if kind == "llama" else tiny_gpt2)(seed=1, dtype=dtype).to(device)
    base = copy.deepcopy(model)
    lora_ext.inject(model, target_modules=TARGETS[kind], r=4, alpha=8)
    trained(model.to(device), seed=2)
    model.to(device=device, dtype=dtype)
    return base, model


def ids(device):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_model_merge_unmerge(device, dtype, kind):
    _, model = build(kind, dtype, device)
    x = ids(device)
    before = base_weights(model)
    with torch.no_grad():
        y_lora = model(x).logits
        names = lora_ext.merge(model)
        assert names and all(m.merged for m in lora_ext.lora_layers(model).values())
        assert lora_ext.merge(model) == []  # idempotent
        y_merged = model(x).logits
    # merged model output == unmerged output within the dtype's rounding
    assert rel_err(y_merged, y_lora.double()) < 4 * RTOL[dtype]
    assert all(0 < v < 0.15 for v in merge_overhead(model).values())  # of W's bytes
    changed = base_weights(model)
    assert any(not same_bits(changed[n], before[n]) for n in before)
    assert sorted(lora_ext.unmerge(model)) == sorted(names)
    after = base_weights(model)
    assert all(same_bits(after[n], before[n]) for n in before)  # bit for bit
    with torch.no_grad():
        assert torch.equal(model(x).logits, y_lora)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload(device, kind):
    base, model = build(kind, torch.float32, device)
    x = ids(device)
    with torch.no_grad():
        y_lora = model(x).logits
    lora_ext.merge(model)  # exact merge first, then unload: same bits as a plain merge
    out = lora_ext.merge_and_unload(model)
    assert out is model and not lora_ext.lora_layers(model)
    for (n1, m1), (n2, m2) in zip(base.named_modules(), model.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
    assert list(model.state_dict()) == list(base.state_dict())
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        y = fresh(x).logits
        assert torch.equal(y, model(x).logits)
    assert rel_err(y, y_lora.double()) < 1e-5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_merge_and_forward(device, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).to(device=device, dtype=dtype)
    layer = trained(nn.Sequential(LoRALinear.from_linear(lin, r=4, alpha=8)))[0]
    W0 = layer.weight.detach().clone()
    x = torch.randn(5, 48, device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged and "merged=True" in repr(layer)
        layer.merge()
        ym = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)  # forward skips LoRA
        assert torch.equal(ym, ref)
        assert rel_err(ym, y.double()) < 4 * RTOL[dtype]
        layer.unmerge()
    assert not layer.merged and same_bits(layer.weight, W0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    plain = merge_layer  # exact=False: no side information, unmerge subtracts
    plain(layer, exact=False)
    assert layer._merge_state is None
    unmerge_layer(layer)
    assert rel_err(layer.weight, W0.double()) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_merge(device, dtype):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 24, padding_idx=0).to(device=device, dtype=dtype)
    layer = trained(nn.Sequential(LoRAEmbedding.from_embedding(emb, r=4, alpha=4)), ratio=0.3)[0]
    x = torch.randint(0, 50, (3, 7), device=device)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        ym = layer(x)
    assert rel_err(ym, y.double()) < 2 * RTOL[dtype]
    base = lora_ext.merge_and_unload(layer)
    assert type(base) is nn.Embedding and base.padding_idx == 0
    assert torch.equal(base(x), ym)
    layer2 = trained(nn.Sequential(LoRAEmbedding.from_embedding(nn.Embedding(50, 24).to(device, dtype))))[0]
    W = layer2.weight.detach().clone()
    layer2.merge()
    layer2.unmerge()
    assert same_bits(layer2.weight, W)


@pytest.mark.parametrize("device", devices())
def test_safe_model_merge(device):
    _, model = build("llama", torch.float16, device)
    before = base_weights(model)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.self_attn\.v_proj'.*non-finite"):
        lora_ext.merge(model, safe=True)
    with pytest.raises(ValueError, match="non-finite"):
        lora_ext.merge_and_unload(model, safe=True)
    assert not any(m.merged for m in lora_ext.lora_layers(model).values())
    after = base_weights(model)
    assert all(same_bits(after[n], before[n]) for n in before)  # nothing touched


def test_tied_weights_are_refused():
    model = tiny_gpt2(seed=1)  # wte is tied to lm_head
    lora_ext.inject(model, target_modules=("c_attn", "wte"), r=4)
    trained(model)
    with pytest.raises(ValueError, match=r"'transformer\.wte' shares its weight with \['lm_head'\]"):
        lora_ext.merge(model)
    with pytest.raises(ValueError, match="tied"):
        lora_ext.merge_and_unload(model)
    assert not any(m.merged for m in lora_ext.lora_layers(model).values())
    assert "transformer.wte" in lora_ext.merge(model, allow_tied=True)
    assert model.lm_head.weight is model.transformer.wte.weight  # merged in both places


def test_merge_needs_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ext.merge(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ext.merge_and_unload(nn.Linear(3, 3))


# ---------------------------------------------------------------- combine
def factors(out, inp, r, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, inp, generator=g).to(dtype), (torch.randn(out, r, generator=g) * 0.1).to(dtype))


@pytest.mark.parametrize("device", devices())
def test_combine_cat_is_exact(device):
    (A1, B1), (A2, B2) = factors(40, 30, 4, 1), factors(40, 30, 7, 2)
    A1, B1, A2, B2 = (t.to(device) for t in (A1, B1, A2, B2))
    c = lora_ext.combine([(A1, B1, 2.0), (A2, B2, 0.5)], [0.7, -1.3], how="cat")
    assert isinstance(c, LayerWeights) and c.r == 11 and c.scale == 1.0 and c.A.dtype == torch.float32
    ref = 0.7 * 2.0 * B1.double() @ A1.double() - 1.3 * 0.5 * B2.double() @ A2.double()
    assert rel_err(c.B.double() @ c.A.double(), ref) < 1e-7
    W0 = torch.randn(40, 30, device=device).bfloat16()
    one, both = W0.clone(), W0.clone()
    merge_(one, c.A, c.B, c.scale)
    merge_(both, [A1, A2], [B1, B2], [0.7 * 2.0, -1.3 * 0.5])
    assert same_bits(one, both)


def test_combine_linear():
    (A1, B1), (A2, B2) = factors(20, 16, 4, 3, torch.float32), factors(20, 16, 4, 4, torch.float32)
    c = lora_ext.combine([(A1, B1, 1.0), (A2, B2, 2.0)], [0.5, -0.25], how="linear")
    assert c.r == 4
    sA = [0.5**0.5, -(0.5**0.5)]
    sB = [0.5**0.5, 0.5**0.5]
    torch.testing.assert_close(c.A, sA[0] * A1 + sA[1] * A2)
    torch.testing.assert_close(c.B, sB[0] * B1 + sB[1] * B2)
    one = lora_ext.combine([(A1, B1, 2.0)], [0.3], how="linear")  # one adapter: w * s * B A
    torch.testing.assert_close(one.B @ one.A, 0.6 * B1 @ A1)
    # not the sum of effects: two copies with weights 1/4 give (sqrt(1/4) + sqrt(1/4))^2 = 1 copy
    same = lora_ext.combine([(A1, B1, 1.0), (A1, B1, 1.0)], [0.25, 0.25], how="linear")
    torch.testing.assert_close(same.B @ same.A, B1 @ A1)
    with pytest.raises(ValueError, match="ranks differ"):
        lora_ext.combine([(A1, B1, 1.0), factors(20, 16, 5, 5, torch.float32) + (1.0,)], how="linear")


def test_combine_bad_input():
    (A1, B1), (A2, B2) = factors(20, 16, 4, 3), factors(21, 16, 4, 4)
    with pytest.raises(ValueError, match="different in/out"):
        lora_ext.combine([(A1, B1, 1.0), (A2, B2, 1.0)])
    with pytest.raises(ValueError, match="how must be"):
        lora_ext.combine([(A1, B1, 1.0)], how="ties")
    with pytest.raises(ValueError, match="2 weights for 1"):
        lora_ext.combine([(A1, B1, 1.0)], [1.0, 2.0])
    with pytest.raises(ValueError, match="ranks differ"):
        lora_ext.combine([(A1, B1[:, :3], 1.0)])
    with pytest.raises(ValueError, match="no adapters"):
        lora_ext.combine([])
    with pytest.raises(TypeError, match="expected an Adapter"):
        lora_ext.combine(["nope"])


def test_combine_adapters_on_a_model():
    x = ids("cpu")
    models, adapters = [], []
    for seed in (5, 6):
        m = tiny_llama(seed=1)
        lora_ext.inject(m, target_modules=("q_proj", "v_proj"), r=4 if seed == 5 else 2, alpha=8)
        trained(m, seed=seed)
        models.append(m)
        adapters.append(Adapter.from_model(m))
    both = lora_ext.combine(adapters, [1.0, -0.5], how="cat")
    assert both.config["r"] == 6 and both.config["lora_alpha"] == 6
    target = tiny_llama(seed=1)
    lora_ext.load_adapter(target, both)
    # effect of the combination == sum of the weighted effects, layer by layer
    for name, m in lora_ext.lora_layers(target).items():
        want = sum(w * a.layers[name].scale * a.layers[name].B.double() @ a.layers[name].A.double()
                   for w, a in zip([1.0, -0.5], adapters))
        got = m.scaling * m.lora_B.double() @ m.lora_A.double()
        assert rel_err(got, want) < 1e-6, name
    with torch.no_grad():
        y = target(x).logits
        lora_ext.merge(target)
        assert rel_err(target(x).logits, y.double()) < 1e-5


def test_combined_adapter_loads_in_peft_as_in_lora_ext(tmp_path):
    """The combined config targets exactly the combined modules: not the first adapter's
    layers_to_transform (PEFT skipped layer 0 of the combination)."""
    peft = pytest.importorskip("peft")
    adapters = []
    for seed, kw in ((5, dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")),
                     (6, dict(target_modules=["q_proj", "v_proj"], use_rslora=True))):
        pm = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kw))
        torch.manual_seed(seed)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn_like(p) * 0.1
        pm.save_pretrained(tmp_path / str(seed))
        adapters.append(Adapter.load(tmp_path / str(seed)))
    both = lora_ext.combine(adapters, [0.7, -0.3])
    assert both.config["layers_to_transform"] is None and "layers_pattern" not in both.config
    assert both.config["task_type"] == "CAUSAL_LM"  # metadata all inputs agree on is kept
    both.save(tmp_path / "both")
    ours = tiny_llama(seed=1)
    lora_ext.load_adapter(ours, both)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "both").eval()
    assert len(lora_ext.lora_layers(ours)) == 4
    with torch.no_grad():
        assert rel_err(theirs(ids("cpu")).logits, ours(ids("cpu")).logits) < 1e-5
