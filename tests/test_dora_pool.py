"""Multi-adapter serving of DoRA adapters (AdapterPool(dora=True), MultiLoRALinear(dora=True)): every
row of a mixed batch (DoRA, plain LoRA, base) against PEFT serving that row's adapter alone."""
import os

import pytest
import torch
from conftest import devices, rel_err
from models import tiny_gpt2, tiny_llama
from peft_cases import randomize
from torch import nn

import lora_ext
from lora_ext import Adapter, AdapterPool, MultiLoRALinear
from lora_ext.multi import LoRAContext

peft = pytest.importorskip("peft")

CASES = {  # GPT-2: Conv1D with biases (the (1 - g) b term)
    "llama": (tiny_llama, ["q_proj", "v_proj", "o_proj"], False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True),
}


def save_adapters(tmp_path, kind):
    """{name: PEFT model} for two DoRA adapters (ranks 4 and 2) and a plain one, saved under tmp_path/name."""
    make, targets, fifo = CASES[kind]
    out = {}
    for name, seed, r, dora in (("d1", 1, 4, True), ("d2", 2, 2, True), ("plain", 3, 4, False)):
        pm = peft.get_peft_model(make(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                         fan_in_fan_out=fifo, use_dora=dora))
        randomize(pm, seed, magnitude=0.3)
        pm.save_pretrained(tmp_path / name)
        out[name] = pm.eval()
    return out


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_mixed_batch_rows_equal_peft_alone(kind, per_token, tmp_path):
    refs = save_adapters(tmp_path, kind)
    make, targets, _ = CASES[kind]
    model = make()
    pool = AdapterPool(model, target_modules=targets, max_adapters=4, max_rank=8, dora=True)
    for name in refs:
        pool.load(name, tmp_path / name)
    names = ["d1", None, "plain", "d2", "d1"]
    ids = torch.randint(0, 128, (len(names), 9))
    batch = pool.batch([n for n in names for _ in range(9)], per_token=True) if per_token else pool.batch(names)
    with torch.no_grad(), batch:
        out = model(input_ids=ids).logits
    base = make()
    with torch.no_grad():
        for i, n in enumerate(names):
            want = (refs[n] if n else base)(input_ids=ids[i:i + 1]).logits
            assert rel_err(out[i:i + 1], want) < 1e-5, n


def test_bf16_pool_matches_a_bf16_model_with_the_adapter_loaded(tmp_path):
    save_adapters(tmp_path, "gpt2")
    model = tiny_gpt2(dtype=torch.bfloat16)
    pool = AdapterPool(model, target_modules=CASES["gpt2"][1], max_adapters=2, max_rank=8, dora=True)
    pool.load("d1", tmp_path / "d1")
    single = tiny_gpt2(dtype=torch.bfloat16)
    lora_ext.load_adapter(single, str(tmp_path / "d1"))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), pool.batch(["d1", "d1"]):
        out = model(input_ids=ids).logits
    with torch.no_grad():
        want = single.eval()(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 2e-2


def test_compiled_model_swaps_dora_adapters_without_recompiling(tmp_path):
    refs = save_adapters(tmp_path, "llama")
    model = tiny_llama()
    pool = AdapterPool(model, target_modules=CASES["llama"][1], max_adapters=2, max_rank=8, dora=True)
    pool.load("d1", tmp_path / "d1")
    pool.load("plain", tmp_path / "plain")
    ids = torch.randint(0, 128, (2, 9))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    from torch._dynamo.utils import counters
    counters.clear()
    with torch.no_grad():
        for names in (["d1", "plain"], ["plain", None], ["d2", "d1"]):
            if "d2" in names:
                pool.unload("plain")
                pool.load("d2", tmp_path / "d2")  # the freed slot
            with pool.batch(names):
                out = compiled(input_ids=ids).logits
            for i, n in enumerate(names):
                want = (refs[n] if n else tiny_llama())(input_ids=ids[i:i + 1]).logits
                assert rel_err(out[i:i + 1], want) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


def test_eviction_and_reload_keep_the_magnitude(tmp_path):
    refs = save_adapters(tmp_path, "llama")
    model = tiny_llama()
    pool = AdapterPool(model, target_modules=CASES["llama"][1], max_adapters=1, max_rank=8, dora=True)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        for name in ("d1", "d2", "d1", "plain", "d2"):  # one slot: every load evicts (host cache / file)
            pool.load(name, tmp_path / name) if name not in pool else None
            with pool.batch([name]):
                assert rel_err(model(input_ids=ids).logits, refs[name](input_ids=ids).logits) < 1e-5


def test_multi_lora_linear_dora_slots():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    ctx = LoRAContext(16)
    layer = MultiLoRALinear(base, num_slots=3, r_max=4, context=ctx, dora=True)
    dora = lora_ext.LoRALinear.from_linear(nn.Linear(24, 16), r=3, use_dora=True)
    dora.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        dora.lora_B.normal_()
        dora.lora_magnitude_vector.mul_(1.2)
    A, B, m = dora.lora_A.detach(), dora.lora_B.detach(), dora.lora_magnitude_vector.detach()
    layer.set_slot(1, A, B, dora.scaling, magnitude=m)
    layer.set_slot(0, A, B, dora.scaling)  # plain LoRA in a DoRA layer: g = 1
    x = torch.randn(4, 24)
    ctx.set_indices([1, 0, -1, 1])
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y[[0, 3]], dora(x[[0, 3]]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[1], base(x[1]) + dora.scaling * (x[1] @ A.t()) @ B.t(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[2], base(x)[2], rtol=0, atol=0)  # g = 1, b (1 - g) = 0: exact
        layer.clear_slot(1)
        torch.testing.assert_close(layer(x)[0], base(x)[0], rtol=0, atol=0)
    layer.to(torch.bfloat16)
    assert layer.dora_scales.dtype == torch.float32 and layer.dora_bias.dtype == torch.float32
    with pytest.raises(ValueError, match=r"MultiLoRALinear.set_slot: magnitude must be \[16\]"):
        layer.set_slot(1, A, B, 1.0, magnitude=torch.ones(5))
    with pytest.raises(ValueError, match="MultiLoRALinear.set_slot: a DoRA magnitude needs a layer built with dora=True"):
        MultiLoRALinear(base, 2, 4, context=ctx).set_slot(0, A, B, 1.0, magnitude=m)
    with pytest.raises(ValueError, match="dora=True with out_slices is not supported"):
        MultiLoRALinear(base, 2, 4, out_slices=[8, 8], dora=True)


def test_pool_without_dora_refuses_dora_adapters(tmp_path):
    save_adapters(tmp_path, "llama")
    pool = AdapterPool(tiny_llama(), target_modules=CASES["llama"][1], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"AdapterPool.load\('d1', .*\): the adapter is DoRA .*built without dora=True"):
        pool.load("d1", tmp_path / "d1")
    ad = Adapter.load(str(tmp_path / "d1"))
    assert os.path.isdir(tmp_path / "d1") and all(w.magnitude is not None for w in ad.layers.values())


@pytest.mark.parametrize("device", devices())
def test_pool_on_device_matches_cpu(device, tmp_path):
    refs = save_adapters(tmp_path, "gpt2")
    model = tiny_gpt2().to(device)
    pool = AdapterPool(model, target_modules=CASES["gpt2"][1], max_adapters=3, max_rank=8, dora=True)
    for name in refs:
        pool.load(name, tmp_path / name)
    names = ["d2", "plain", None, "d1"]
    ids = torch.randint(0, 128, (len(names), 9))
    with torch.no_grad(), pool.batch(names):
        out = model(input_ids=ids.to(device)).logits.cpu()
    with torch.no_grad():
        for i, n in enumerate(names):
            want = (refs[n] if n else tiny_gpt2())(input_ids=ids[i:i + 1]).logits
            assert rel_err(out[i:i + 1], want) < 1e-5
