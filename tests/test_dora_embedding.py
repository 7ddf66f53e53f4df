"""DoRA on embeddings (LoRAEmbedding(use_dora=True), inject, adapter files, merges): PEFT's
DoraEmbeddingVariant is the oracle (outputs, gradients, files both ways, merge_and_unload)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import peft_cases
from conftest import rel_err
from models import tiny_llama
from torch import nn

import lora_ext
from lora_ext import Adapter, AdapterPool, LoRAEmbedding, inject, load_adapter

peft = pytest.importorskip("peft")

TARGETS = ["embed_tokens", "q_proj"]


def randomize(model, seed=1):
    return peft_cases.randomize(model, seed, magnitude=0.2)


def peft_dora():
    return randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                         use_dora=True)))


def ours_name(peft_name):  # base_model.model.X.lora_A.default.weight -> X.lora_A
    return peft_name.replace("base_model.model.", "", 1).replace(".default.weight", "").replace(".default", "")


class Scaled(nn.Embedding):  # as Gemma's scaled word embedding
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class Net(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return self.emb(ids)


# ---------------------------------------------------------------- the layer
def test_new_layer_computes_the_base_with_peft_magnitude():
    emb = nn.Embedding(50, 12, padding_idx=3)
    pm = peft.get_peft_model(Net(copy.deepcopy(emb)), peft.LoraConfig(r=4, target_modules=["emb"], use_dora=True))
    layer = LoRAEmbedding.from_embedding(copy.deepcopy(emb), r=4, alpha=8, use_dora=True)
    assert layer.lora_magnitude_vector.shape == (12,) and "use_dora=True" in repr(layer)
    want = pm.base_model.model.emb.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector, want, rtol=1e-6, atol=0)
    with torch.no_grad():  # A = 0 at init: PEFT's norm is the table's column norms
        torch.testing.assert_close(layer.lora_magnitude_vector, emb.weight.norm(dim=0), rtol=1e-6, atol=0)
    ids = torch.randint(0, 50, (4, 9))
    torch.testing.assert_close(layer(ids), emb(ids), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["padding_idx", "max_norm", "embed_scale"])
def test_layer_matches_peft_outputs_and_gradients(kind):
    emb = {"padding_idx": lambda: nn.Embedding(40, 16, padding_idx=0),
           "max_norm": lambda: nn.Embedding(40, 16, max_norm=2.5),
           "embed_scale": lambda: Scaled(40, 16)}[kind]()
    pm = randomize(peft.get_peft_model(Net(copy.deepcopy(emb)),
                                       peft.LoraConfig(r=3, lora_alpha=5, target_modules=["emb"], use_dora=True)))
    theirs = pm.base_model.model.emb
    layer = LoRAEmbedding.from_embedding(copy.deepcopy(emb), r=3, alpha=5, use_dora=True)
    layer.set_lora_factors(theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"],
                           theirs.scaling["default"], theirs.lora_magnitude_vector["default"].weight)
    ids = torch.randint(0, 40, (3, 11))
    a, b = pm(ids), layer(ids)
    assert rel_err(b, a) < 1e-6 and rel_err(a, emb(ids)) > 1e-2  # the adapter changes the output
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    for ours, p in ((layer.lora_embedding_A, theirs.lora_embedding_A["default"]),
                    (layer.lora_embedding_B, theirs.lora_embedding_B["default"]),
                    (layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
        assert rel_err(ours.grad, p.grad) < 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_factors_on_a_16_bit_table_keep_its_dtype_as_peft(dtype, use_dora):
    # PEFT's default (autocast_adapter_dtype=True) keeps the factors in fp32 on a 16-bit model; the
    # embedding's output stays in the table's dtype (as nn.Embedding's and PEFT's) for the next layer
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 8)).to(dtype)
    pm = randomize(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0", "1"],
                                                                            use_dora=use_dora)))
    ours = copy.deepcopy(base)
    inject(ours, ["0", "1"], r=3, alpha=5, use_dora=use_dora)
    theirs = {ours_name(n): p for n, p in pm.named_parameters() if "lora_" in n}
    with torch.no_grad():  # a large delta: an error in it would show
        theirs["0.lora_embedding_B"].mul_(10), theirs["1.lora_B"].mul_(10)
    for n, p in ours.named_parameters():
        if "lora_" in n:
            assert theirs[n].dtype == torch.float32
            p.data = theirs[n].detach().clone().reshape(p.shape)
    ids = torch.randint(0, 40, (3, 11))
    tol = 4 * torch.finfo(dtype).eps
    for how in ("embedding", "model"):
        a, b = (pm.base_model.model[0](ids), ours[0](ids)) if how == "embedding" else (pm(ids), ours(ids))
        assert a.dtype == b.dtype == dtype
        assert rel_err(b, a) < tol and rel_err(a, base[0](ids) if how == "embedding" else base(ids)) > 0.1
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    for n, p in ours.named_parameters():
        if "lora_" in n:
            assert p.grad.dtype == torch.float32 and rel_err(p.grad, theirs[n].grad.reshape(p.shape)) < 5 * tol, n


def test_exact_unmerge_bit_for_bit_and_dtype_change_while_merged():
    layer = randomize(LoRAEmbedding(30, 8, r=2, alpha=4, use_dora=True))
    w0 = layer.weight.detach().clone()
    ids = torch.randint(0, 30, (2, 7))
    want = layer(ids).detach()
    layer.merge()
    assert layer.merged and rel_err(layer(ids), want) < 1e-6 and not torch.equal(layer.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    other = copy.deepcopy(layer).to(torch.bfloat16)
    other.merge()
    layer.merge()
    layer.to(torch.bfloat16)  # re-merged from W0's bf16 copy: equals the bf16 layer merged
    assert torch.equal(layer.weight, other.weight)
    layer.unmerge()
    assert torch.equal(layer.weight, w0.to(torch.bfloat16))


def test_compile_fullgraph():
    layer = randomize(LoRAEmbedding(30, 8, r=2, alpha=4, use_dora=True))
    ids = torch.randint(0, 30, (3, 5))
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(ids), layer(ids))


# ---------------------------------------------------------------- PEFT parity on a model
def test_peft_file_loads_with_same_logits_and_gradients(tmp_path):
    pm = peft_dora()
    pm.save_pretrained(tmp_path / "ad")
    ours = tiny_llama()
    assert set(load_adapter(ours, str(tmp_path / "ad"))) >= {"model.embed_tokens"}
    emb = ours.model.embed_tokens
    assert isinstance(emb, LoRAEmbedding) and emb.use_dora and emb.lora_magnitude_vector.shape == (64,)
    ids = torch.randint(0, 128, (2, 12))
    pm.train(), ours.train()
    a, b = pm(input_ids=ids).logits, ours(input_ids=ids).logits
    assert rel_err(b, a) < 1e-5
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    params = dict(ours.named_parameters())
    checked = 0
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert rel_err(params[ours_name(n)].grad, p.grad) < 1e-5, n
            checked += "embed_tokens" in n
    assert checked == 3  # lora_embedding_A, lora_embedding_B, lora_magnitude_vector


def test_ours_saved_loads_in_peft_and_state_dict_keys_are_peft(tmp_path):
    from safetensors.torch import load_file
    model = tiny_llama()
    inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    assert all(m.use_dora for m in lora_ext.lora_layers(model).values())
    randomize(model)
    Adapter.from_model(model).save(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5
    torch.testing.assert_close(pm.base_model.model.model.embed_tokens.lora_magnitude_vector["default"].weight,
                               model.model.embed_tokens.lora_magnitude_vector, rtol=0, atol=0)
    peft_dora().save_pretrained(tmp_path / "peft")
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.lora_magnitude_vector" in keys
    # PEFT also saves the targeted embedding's table (save_embedding_layers), not a LoRA weight
    assert set(lora_ext.lora_state_dict(model)) == keys - {"base_model.model.model.embed_tokens.base_layer.weight"}


def test_merge_and_unload_matches_peft(tmp_path):
    pm = peft_dora()
    pm.save_pretrained(tmp_path / "ad")
    ours = tiny_llama()
    load_adapter(ours, str(tmp_path / "ad"))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        theirs = pm.merge_and_unload()
        merged = lora_ext.merge_and_unload(ours.eval())
        assert not lora_ext.lora_layers(merged) and type(merged.model.embed_tokens) is nn.Embedding
        assert rel_err(merged(input_ids=ids).logits, want) < 1e-5
        for (n, p), (n2, q) in zip(merged.named_parameters(), theirs.named_parameters()):
            assert n == n2 and rel_err(p, q) < 1e-6, n


# ---------------------------------------------------------------- refusals
def test_file_with_a_wrong_embedding_magnitude_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    peft_dora().save_pretrained(tmp_path)
    f = str(tmp_path / "adapter_model.safetensors")
    t = load_file(f)
    t["base_model.model.model.embed_tokens.lora_magnitude_vector"] = torch.ones(128)
    save_file(t, f)
    with pytest.raises(ValueError, match=r"'model.embed_tokens' has lora_magnitude_vector \(128,\); expected \[64\]"):
        Adapter.load(str(tmp_path))


def test_pool_refuses_a_dora_embedding_adapter_by_name(tmp_path):
    peft_dora().save_pretrained(tmp_path / "d")
    pool = AdapterPool(tiny_llama(), target_modules=TARGETS, max_adapters=2, max_rank=8, dora=True)
    with pytest.raises(ValueError, match=r"AdapterPool.load\('d', .*\): module 'model.embed_tokens' is a DoRA "
                                         r"embedding .*no embedding DoRA"):
        pool.load("d", tmp_path / "d")
    assert "d" not in pool
    r = subprocess.run([sys.executable, "-m", "lora_ext", "inspect", str(tmp_path / "d"), "--pool"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "AdapterPool: cannot serve it: it has DoRA on embeddings (model.embed_tokens)" in out, out
