"""LoRALinear / LoRAEmbedding modules and model surgery (inject, trainable marking, state dict)."""
import math

import pytest
import torch
from conftest import devices, rel_err
from models import tiny_gpt2, tiny_llama
from torch import nn

import lora_ext
from lora_ext import LoRAEmbedding, LoRALinear


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(self.o_proj(self.q_proj(h) * self.v_proj(h)))
        return self.lm_head(h)


@pytest.mark.parametrize("device", devices())
def test_from_linear_keeps_output_and_shares_weight(device):
    lin = nn.Linear(24, 12).to(device)
    layer = LoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(5, 24, device=device)
    torch.testing.assert_close(layer(x), lin(x))


def test_hparams_and_init():
    lin = nn.Linear(32, 8)
    assert LoRALinear.from_linear(lin, r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    g = LoRALinear.from_linear(lin, r=4, init="gaussian")
    assert abs(g.lora_A.std().item() - 0.25) < 0.08
    k = LoRALinear.from_linear(lin, r=4)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert k.lora_A.abs().max().item() <= bound + 1e-6
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            LoRALinear.from_linear(lin, r=bad)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            LoRALinear.from_linear(lin, dropout=bad)
    with pytest.raises(ValueError, match="init"):
        LoRALinear.from_linear(lin, init="pissa")
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 3))


def test_embedding_layer_matches_formula():
    emb = nn.Embedding(10, 6, padding_idx=0)
    layer = LoRAEmbedding.from_embedding(emb, r=3, alpha=6)
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    torch.testing.assert_close(layer(ids), emb(ids))  # A starts at zero
    layer.lora_embedding_A.data.normal_()
    ref = emb(ids) + 2.0 * layer.lora_embedding_A.t()[ids] @ layer.lora_embedding_B.t()
    torch.testing.assert_close(layer(ids), ref)


@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_with_max_norm_refuses_every_merge(use_dora):
    # max_norm renormalizes the rows of W0 and A^T apart; merged, the rows of W0 + s (B A)^T together:
    # other outputs (and the merged table rewritten in place, so no exact unmerge)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 6, max_norm=1.0), nn.Linear(6, 6))
    lora_ext.inject(model, target_modules=["1", "0"], r=4, alpha=6, use_dora=use_dora)
    with torch.no_grad():
        model[0].lora_embedding_A.normal_()
    model.eval()
    ids = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model(ids)  # renormalizes the looked-up rows (a DoRA layer's g, as PEFT's, is taken before A's are)
        want = model(ids)
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    msg = r"LoRAEmbedding\.merge: max_norm=1\.0: the merged layer would renormalize"
    for merge in (lambda: lora_ext.merge(model), lambda: lora_ext.merge(model, safe=True, exact=False),
                  lambda: lora_ext.merge_and_unload(model)):
        with pytest.raises(ValueError, match=r"merge: layer '0': " + msg):
            merge()
    for safe in (False, True):
        with pytest.raises(ValueError, match="^" + msg):
            model[0].merge(safe=safe)
    with pytest.raises(ValueError, match="^" + msg):
        model[0].check_merge()
    # every layer checked before any changes: the Linear, first in the model, is not merged either
    assert not model[0].merged and not model[1].merged and isinstance(model[0], LoRAEmbedding)
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    # without max_norm the same layer merges
    plain = LoRAEmbedding.from_embedding(nn.Embedding(8, 6), r=4, use_dora=use_dora)
    assert plain.merge_refusal() is None
    lora_ext.merge(plain)
    assert plain.merged


@pytest.mark.parametrize("make", ["linear", "embedding", "dora"])
def test_set_lora_factors_refuses_a_scale_the_ops_refuse(make):
    # ops._checks.as_scale's rule, before anything changes (merged layers stay merged as they were)
    layer = {"linear": lambda: LoRALinear.from_linear(nn.Linear(4, 3), r=2, alpha=4),
             "embedding": lambda: LoRAEmbedding.from_embedding(nn.Embedding(5, 3), r=2, alpha=4),
             "dora": lambda: LoRALinear.from_linear(nn.Linear(4, 3), r=2, alpha=4, use_dora=True)}[make]()
    A0, B0 = (t.detach().clone() for t in layer.lora_factors()[:2])
    name = type(layer).__name__
    for merged in (False, True):
        if merged:
            layer.merge()
        w = layer.weight.detach().clone()
        for bad, err, match in [(float("nan"), ValueError, "scale must be finite in float32"),
                                (float("-inf"), ValueError, "scale must be finite in float32"),
                                (1e39, ValueError, "scale must be finite in float32"),
                                ("2", TypeError, "scale must be a real number, got str '2'"),
                                (None, TypeError, "scale must be a real number")]:
            with pytest.raises(err, match=rf"{name}\.set_lora_factors: {match}"):
                layer.set_lora_factors(torch.randn(A0.shape), torch.randn(B0.shape), bad)
            assert layer.scaling == 2.0 and layer.lora_alpha == 4 and layer.merged == merged
            assert all(torch.equal(a, b) for a, b in zip(layer.lora_factors()[:2], (A0, B0)))
            assert torch.equal(layer.weight, w)
    layer.set_lora_factors(A0, B0, torch.tensor(0.5))  # a 1-element tensor: its value, as the ops take it
    assert type(layer.scaling) is float and layer.scaling == 0.5 and layer.lora_alpha == 1.0 and layer.merged


def test_inject_suffixes_regex_all_linear_and_errors():
    m = Block()
    assert sorted(lora_ext.inject(m, ["q_proj", "v_proj"], r=2)) == ["q_proj", "v_proj"]
    assert isinstance(m.q_proj, LoRALinear) and isinstance(m.o_proj, nn.Linear)
    m = Block()
    assert lora_ext.inject(m, r"(q|o)_proj", r=2) == ["q_proj", "o_proj"]
    m = Block()
    assert sorted(lora_ext.inject(m, "all-linear", r=2)) == ["o_proj", "q_proj", "v_proj"]
    m = Block()
    names = lora_ext.inject(m, ["q_proj", "emb"], r=8, rank_pattern={"q_proj": 4},
                            alpha_pattern={"emb": 32})
    assert names == ["q_proj", "emb"] and m.q_proj.r == 4 and m.emb.scaling == 4.0
    assert isinstance(m.emb, LoRAEmbedding)
    with pytest.raises(ValueError, match="matched no module"):
        lora_ext.inject(Block(), ["k_proj"])
    with pytest.raises(TypeError, match="'norm' is a LayerNorm"):
        lora_ext.inject(Block(), ["norm"])
    with pytest.raises(ValueError, match="'q_proj'.*rank"):
        lora_ext.inject(Block(), ["q_proj"], r=0)


def test_mark_only_lora_trainable_and_state_dict():
    m = Block()
    lora_ext.inject(m, ["q_proj", "v_proj"], r=2)
    lora_ext.mark_only_lora_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    lora_ext.mark_only_lora_trainable(m, bias="lora_only")
    assert m.q_proj.bias.requires_grad and not m.o_proj.bias.requires_grad
    lora_ext.mark_only_lora_trainable(m, bias="all")
    assert m.o_proj.bias.requires_grad
    with pytest.raises(ValueError, match="bias"):
        lora_ext.mark_only_lora_trainable(m, bias="some")
    factors = {f"base_model.model.{n}.lora_{ab}.weight" for n in ("q_proj", "v_proj") for ab in "AB"}
    # trained biases are saved as PEFT saves them (a LoRA layer's own under base_layer)
    assert set(lora_ext.lora_state_dict(m)) == factors | {
        "base_model.model.q_proj.base_layer.bias", "base_model.model.v_proj.base_layer.bias",
        "base_model.model.o_proj.bias", "base_model.model.norm.bias"}
    lora_ext.mark_only_lora_trainable(m)
    assert set(lora_ext.lora_state_dict(m)) == factors


def test_gpt2_conv1d_injection():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 8))
    ref = model(ids).logits
    names = lora_ext.inject(model, ["c_attn"], r=4)
    layer = model.transformer.h[0].attn.c_attn
    assert len(names) == 2 and layer.fan_in_fan_out and layer.lora_A.shape == (4, 64)
    assert layer.lora_B.shape == (192, 4) and layer.base_class.__name__ == "Conv1D"
    torch.testing.assert_close(model(ids).logits, ref)


@pytest.mark.parametrize("device", devices())
def test_injected_model_compiles_fullgraph_forward_backward(device):
    model = tiny_llama().to(device)
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, dropout=0.1)
    lora_ext.mark_only_lora_trainable(model)
    for m in lora_ext.lora_layers(model).values():
        m.lora_B.data.normal_(std=0.02)
    model.train()
    ids = torch.randint(0, 128, (2, 16), device=device)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda i: model(input_ids=i, labels=i).loss)(ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(lambda i: model(input_ids=i, labels=i).loss, fullgraph=True)
    loss = compiled(ids)
    loss.backward()
    grads = [m.lora_A.grad for m in lora_ext.lora_layers(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    eager = model(input_ids=ids).logits
    comp = torch.compile(lambda i: model(input_ids=i).logits, fullgraph=True)(ids)
    assert rel_err(comp, eager) < 1e-5


def torch_encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def test_multihead_attention_out_proj_is_refused():
    # nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: a LoRA layer
    # there never ran (no gradients) yet merge folded it in, so the merged model differed
    enc = torch_encoder()
    names = lora_ext.inject(enc, "all-linear", r=4)
    assert sorted(names) == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    enc = torch_encoder()
    with pytest.raises(TypeError, match=r"'layers.0.self_attn.out_proj' is the out_proj of an nn.MultiheadAttention"):
        lora_ext.inject(enc, ["linear1", "out_proj"], r=4)
    assert not lora_ext.lora_layers(enc)  # refused before anything changed


def test_transformer_encoder_layers_keep_lora_in_no_grad_eval():
    # in eval under no_grad nn.TransformerEncoderLayer runs a fused kernel on linear1/linear2.weight
    # (and its TransformerEncoder first packs padded batches into nested tensors): the LoRA term
    # was skipped, so evaluation ran the base model (max |diff| 2.3 here)
    enc = torch_encoder()
    lora_ext.inject(enc, ["linear1", "linear2"], r=4)
    for m in lora_ext.lora_layers(enc).values():
        nn.init.normal_(m.lora_B, std=0.3)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    for mask in (None, pad):
        want = enc(x, src_key_padding_mask=mask)  # grad mode: torch's plain path
        assert want.requires_grad
        with torch.no_grad():
            got = enc(x, src_key_padding_mask=mask)
            lora_ext.merge(enc)
            merged = enc(x, src_key_padding_mask=mask)
            lora_ext.unmerge(enc)
        # (the attention itself takes torch's fused MHA kernel under no_grad: last bits differ)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        keep = slice(None) if mask is None else ~mask  # torch's fused path zeroes padded rows
        torch.testing.assert_close(merged[keep], want.detach()[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_injected_layers_take_the_mode_of_the_module_they_wrap(train):
    # inject into an eval model (transformers' from_pretrained returns one) made LoRA layers in
    # training mode: their dropout ran in "eval" (two no_grad forwards differed by 0.3), and so
    # did that of a served model after load_adapter of an adapter saved with lora_dropout
    model = tiny_llama().train(train)
    lora_ext.inject(model, ["q_proj", "v_proj", "embed_tokens"], r=4, dropout=0.3)
    layers = lora_ext.lora_layers(model)
    assert len(layers) == 5 and all(m.training == train for m in layers.values())
    for m in layers.values():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert same != train
    assert all(m.base_module().training == train for m in layers.values())
