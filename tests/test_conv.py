"""LoRAConv1d / LoRAConv2d / LoRAConv3d against HF PEFT's conv LoRA (peft.tuners.lora.layer._ConvNd).

Two models: a small conv net (Conv1d, Conv2d with stride / padding / non-square kernel, a dilated
Conv2d with padding="same", a Conv2d dilated along a size-1 kernel dimension, Conv3d) and a
hand-made UNet-like block (diffusers is not installed here: ResNet blocks with a time embedding,
1x1 shortcut, strided downsample, nearest upsample + conv, attention with 1x1 proj_in/proj_out
convs and to_q/to_k/to_v linears). PEFT is the oracle: identical non-zero LoRA weights give the
same outputs and gradients, and the adapter files go both ways.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import lora_ext
from lora_ext.conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAConvNd

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 1))
        self.dil = nn.Conv2d(8, 8, 3, padding="same", dilation=2, bias=False)
        self.tall = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), dilation=(1, 3))  # dilation on a size-1 kernel dim
        self.c3 = nn.Conv3d(8, 5, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.head = nn.Linear(5, 4)

    def forward(self, x):  # x [N, 3, L]
        y = F.silu(self.c1(x))                                   # [N, 6, L/2]
        y = y[:, :, None, :].expand(-1, -1, 6, -1)               # [N, 6, 6, L/2]
        y = F.silu(self.c2(y))
        y = F.silu(self.tall(self.dil(y)))
        y = y[:, :, None].expand(-1, -1, 3, -1, -1)              # [N, 8, 3, H, W]
        y = self.c3(y)
        return self.head(y.mean((2, 3, 4)))


CONVNET_TARGETS = ["c1", "c2", "dil", "tall", "c3", "head"]


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(2, cin), nn.GroupNorm(2, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(t))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.proj_in, self.proj_out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.to_q, self.to_k, self.to_v = (nn.Linear(c, c, bias=False) for _ in range(3))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [N, HW, C]
        y = F.scaled_dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
        return x + self.proj_out(y.transpose(1, 2).reshape(n, c, h, w))


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.time_embedding = nn.Linear(4, 16)
        self.down = ResBlock(8, 12, 16)
        self.downsample = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.mid = Attention(12)
        self.up = ResBlock(12, 8, 16)
        self.upsample_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        temb = self.time_embedding(t)
        h = self.downsample(self.down(self.conv_in(x), temb))
        h = self.up(self.mid(h), temb)
        h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(h))


UNET_TARGETS = ["conv1", "conv2", "conv_shortcut", "downsample", "proj_in", "proj_out", "to_q", "to_v",
                "upsample_conv", "time_emb_proj"]
RANK_PATTERN = {"conv2": 2, "proj_out": 6}
ALPHA_PATTERN = {"conv_shortcut": 3.0}

MODELS = {
    "convnet": (ConvNet, CONVNET_TARGETS, lambda g: (torch.randn(2, 3, 14, generator=g),)),
    "unet": (TinyUNet, UNET_TARGETS, lambda g: (torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, generator=g))),
}


def inputs(kind, dtype=torch.float32):
    return tuple(t.to(dtype) for t in MODELS[kind][2](torch.Generator().manual_seed(5)))


def base_model(kind, dtype=torch.float32):
    torch.manual_seed(0)
    return MODELS[kind][0]().to(dtype)


def build_pair(kind, dtype=torch.float32, r=4, alpha=8, use_rslora=False, dropout=0.0, patterns=True, targets=None):
    """A PEFT model with non-zero LoRA weights and the same adapter injected by lora_ext."""
    base, targets = base_model(kind, dtype), targets or MODELS[kind][1]
    rp, ap = (RANK_PATTERN, ALPHA_PATTERN) if patterns and kind == "unet" else ({}, {})
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=use_rslora,
                          rank_pattern=rp, alpha_pattern=ap)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.2
    ours = copy.deepcopy(base)
    names = lora_ext.inject(ours, targets, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                            rank_pattern=rp, alpha_pattern=ap)
    psd = pm.state_dict()
    for name, m in lora_ext.lora_layers(ours).items():
        m.lora_A.data.copy_(psd[f"base_model.model.{name}.lora_A.default.weight"])
        m.lora_B.data.copy_(psd[f"base_model.model.{name}.lora_B.default.weight"])
    lora_ext.mark_only_lora_trainable(ours)
    return base, pm, ours, names


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_match_peft(kind, use_rslora):
    _, pm, ours, names = build_pair(kind, use_rslora=use_rslora)
    assert sorted(names) == sorted(n for n, m in pm.base_model.model.named_modules()
                                   if isinstance(m, peft.tuners.lora.LoraLayer))
    convs = {n: m for n, m in lora_ext.lora_layers(ours).items() if isinstance(m, LoRAConvNd)}
    assert len(convs) >= 5
    assert {type(m) for m in convs.values()} >= ({LoRAConv1d, LoRAConv2d, LoRAConv3d} if kind == "convnet"
                                                 else {LoRAConv2d})
    for name, m in convs.items():  # the layer's own rank / scaling are PEFT's (rank_pattern, alpha_pattern, rsLoRA)
        p = peft_layer(pm, name)
        assert m.r == p.r["default"] and m.scaling == pytest.approx(p.scaling["default"], rel=1e-12)
    xs = [x.requires_grad_() for x in inputs(kind)]
    xs_p = [x.detach().clone().requires_grad_() for x in xs]
    out_o, out_p = ours(*xs), pm(*xs_p)
    assert rel_err(out_o, out_p) <= 1e-5
    gy = torch.randn_like(out_p)
    out_o.backward(gy)
    out_p.backward(gy)
    for x, xp in zip(xs, xs_p):
        assert rel_err(x.grad, xp.grad) <= 1e-5
    for name, m in lora_ext.lora_layers(ours).items():
        p = peft_layer(pm, name)
        for ours_p, theirs in ((m.lora_A, p.lora_A["default"].weight), (m.lora_B, p.lora_B["default"].weight)):
            assert ours_p.shape == theirs.shape
            assert theirs.grad is not None and theirs.grad.abs().sum() > 0
            assert rel_err(ours_p.grad, theirs.grad) <= 1e-5, name


@pytest.mark.parametrize("kind", list(MODELS))
def test_state_dict_keys_and_shapes_are_peft(kind):
    _, pm, ours, _ = build_pair(kind)
    theirs = peft.get_peft_model_state_dict(pm)
    mine = lora_ext.lora_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    # module names (loralib style) round-trip through load_state_dict
    plain = lora_ext.lora_state_dict(ours, peft_names=False)
    fresh = copy.deepcopy(ours)
    for m in lora_ext.lora_layers(fresh).values():
        m.reset_lora_parameters()
    fresh.load_state_dict(plain, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(lora_ext.lora_state_dict(fresh).values(), mine.values()))


@pytest.mark.parametrize("kind", list(MODELS))
def test_peft_save_pretrained_loads_into_lora_ext(kind, tmp_path):
    base, pm, _, _ = build_pair(kind)
    pm.save_pretrained(tmp_path)
    ad = lora_ext.Adapter.load(str(tmp_path))
    conv_layers = {n: w for n, w in ad.layers.items() if w.kind == "conv"}
    assert conv_layers and all(w.A.dim() >= 3 for w in conv_layers.values())
    want = pm(*inputs(kind))
    plain = copy.deepcopy(base)  # load_adapter injects into a plain model
    loaded = lora_ext.load_adapter(plain, ad)
    assert sorted(loaded) == sorted(ad.layers)
    for name, m in lora_ext.lora_layers(plain).items():
        assert m.r == peft_layer(pm, name).r["default"]
        assert m.scaling == pytest.approx(peft_layer(pm, name).scaling["default"], rel=1e-12)
    assert rel_err(plain(*inputs(kind)), want) <= 1e-5
    # into a model that has LoRA layers already (other rank: resized), from the directory
    injected = copy.deepcopy(base)
    lora_ext.inject(injected, MODELS[kind][1], r=3)
    lora_ext.load_adapter(injected, str(tmp_path))
    assert rel_err(injected(*inputs(kind)), want) <= 1e-5


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("how", ["from_model", "save_adapter"])
def test_lora_ext_save_loads_into_peft(kind, how, tmp_path):
    base, _, ours, _ = build_pair(kind, use_rslora=(kind == "unet"))
    want = ours(*inputs(kind))
    if how == "from_model":
        lora_ext.Adapter.from_model(ours).save(str(tmp_path))
    else:
        from lora_ext.distributed import save_adapter
        save_adapter(ours, str(tmp_path))
    from safetensors.torch import load_file
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert saved.keys() == lora_ext.lora_state_dict(ours).keys()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert any(isinstance(m, peft.tuners.lora.Conv2d) for m in pm.modules())
    assert rel_err(pm(*inputs(kind)), want) <= 1e-5
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["use_rslora"] == (kind == "unet")


def mergeable_weights(model):
    return {n: m.weight.detach().clone() for n, m in lora_ext.lora_layers(model).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_and_exact_unmerge_restores_w0(dtype):
    _, pm, ours, _ = build_pair("unet", dtype=dtype)
    ours.eval()
    x = inputs("unet", dtype)
    w0 = mergeable_weights(ours)
    before = ours(*x)
    merged = lora_ext.merge(ours)
    assert sorted(merged) == sorted(w0)
    assert any(not torch.equal(w0[n], m.weight) for n, m in lora_ext.lora_layers(ours).items())
    after = ours(*x)
    assert rel_err(after, before) <= (1e-5 if dtype == torch.float32 else 3e-2)
    # the merged conv weights are PEFT's merged weights (W0 + scaling * conv-delta), up to rounding
    pm_merged = copy.deepcopy(pm).merge_and_unload()
    for name, m in lora_ext.lora_layers(ours).items():
        assert rel_err(m.weight, pm_merged.get_submodule(name).weight) <= (1e-6 if dtype == torch.float32 else 1e-2)
    lora_ext.unmerge(ours)
    for name, m in lora_ext.lora_layers(ours).items():
        assert torch.equal(m.weight.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           w0[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
    assert torch.equal(ours(*x), before)


def test_converting_a_merged_model_keeps_the_exact_unmerge():
    # .to(bfloat16) while merged redoes the exact merge in bf16 (on the weight's 2-D view): unmerge
    # then gives the converted W0 bit for bit
    _, _, ours, _ = build_pair("convnet", patterns=False)
    w0 = {n: w.to(torch.bfloat16) for n, w in mergeable_weights(ours).items()}
    mergeable = {n: m for n, m in lora_ext.lora_layers(ours).items() if m.merge_refusal() is None}
    assert "dil" not in mergeable and {"c1", "c2", "tall", "c3", "head"} <= set(mergeable)
    for m in mergeable.values():
        m.merge()
    ours.to(torch.bfloat16)
    for name, m in mergeable.items():
        assert m.merged and not torch.equal(m.weight, w0[name])
        m.unmerge()
        assert torch.equal(m.weight.view(torch.int16), w0[name].view(torch.int16)), name


def test_merge_and_unload_gives_plain_convs():
    _, pm, ours, _ = build_pair("unet")
    ours.eval()
    x = inputs("unet")
    want = ours(*x)
    out = lora_ext.merge_and_unload(ours)
    assert not lora_ext.lora_layers(out)
    assert type(out.down.conv1) is nn.Conv2d and out.down.conv1.bias is not None
    assert out.downsample.stride == (2, 2) and out.downsample.padding == (1, 1)
    assert rel_err(out(*x), want) <= 1e-5
    assert set(out.state_dict()) == set(base_model("unet").state_dict())


def test_dropout_in_train_mode_matches_peft():
    # conv layers only: LoRALinear's fused op draws its own masks (a hash of a seed), PEFT's F.dropout
    _, pm, ours, _ = build_pair("convnet", dropout=0.3, targets=[t for t in CONVNET_TARGETS if t != "head"])
    pm.train()
    ours.train()
    x = inputs("convnet")
    torch.manual_seed(7)
    out_p = pm(*x)
    torch.manual_seed(7)
    out_o = ours(*x)
    assert rel_err(out_o, out_p) <= 1e-5  # the same masks: F.dropout on x, drawn in the same order
    out_p.sum().backward()
    out_o.sum().backward()
    for name, m in lora_ext.lora_layers(ours).items():
        assert rel_err(m.lora_A.grad, peft_layer(pm, name).lora_A["default"].weight.grad) <= 1e-5
    torch.manual_seed(8)
    other = ours(*x)
    assert rel_err(other, out_o) > 1e-4  # dropout is on: another seed, other masks
    ours.eval()
    pm.eval()
    assert rel_err(ours(*x), pm(*x)) <= 1e-5  # and off in eval mode (no RNG)
    assert torch.equal(ours(*x), ours(*x))


def test_compile_fullgraph_forward_and_backward():
    _, _, ours, _ = build_pair("unet", dropout=0.1)
    ours.train()
    x = inputs("unet")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda *a: ours(*a).square().mean())(*x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(lambda *a: ours(*a).square().mean(), fullgraph=True)
    loss = compiled(*x)
    loss.backward()
    grads = {n: m.lora_A.grad.clone() for n, m in lora_ext.lora_layers(ours).items()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    ours.eval()
    for m in lora_ext.lora_layers(ours).values():
        m.lora_A.grad = m.lora_B.grad = None
    eager_loss = ours(*x).square().mean()
    eager_loss.backward()
    eager = {n: m.lora_A.grad for n, m in lora_ext.lora_layers(ours).items()}
    comp_eval = torch.compile(lambda *a: ours(*a).square().mean(), fullgraph=True)
    for m in lora_ext.lora_layers(ours).values():
        m.lora_A.grad = m.lora_B.grad = None
    comp_loss = comp_eval(*x)
    comp_loss.backward()
    assert rel_err(comp_loss, eager_loss) <= 1e-5
    for n, m in lora_ext.lora_layers(ours).items():
        assert rel_err(m.lora_A.grad, eager[n]) <= 1e-5, n
