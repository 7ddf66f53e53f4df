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


def test_padding_mode_matches_peft_forward_and_refuses_merge():
    # PEFT's lora_A pads with zeros whatever the base's padding_mode: the same here, and the merge
    # (which would pad the delta as the base does) is refused instead of changing the outputs
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                         nn.Conv2d(4, 4, 3, padding=0, padding_mode="circular"))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))
    ours = copy.deepcopy(base)
    lora_ext.inject(ours, ["0", "1"], r=2, alpha=4)
    for n in ("0", "1"):
        with torch.no_grad():
            peft_layer(pm, n).lora_B["default"].weight.normal_()
            ours.get_submodule(n).set_lora_factors(peft_layer(pm, n).lora_A["default"].weight,
                                                   peft_layer(pm, n).lora_B["default"].weight, 2.0)
    x = torch.randn(2, 3, 7, 6)
    assert rel_err(ours(x), pm(x)) <= 1e-5
    assert ours[1].merge_refusal() is None  # no padding: the padding mode does not matter
    w0 = ours[0].weight.clone()
    with pytest.raises(ValueError, match=r"LoRAConv2d\.merge: padding_mode='reflect'"):
        ours[0].merge()
    with pytest.raises(ValueError, match=r"merge: layer '0': LoRAConv2d\.merge: padding_mode='reflect'"):
        lora_ext.merge(ours)
    with pytest.raises(ValueError, match=r"layer '0'.*padding_mode"):
        lora_ext.merge_and_unload(ours)
    assert torch.equal(ours[0].weight, w0) and not ours[1].merged  # nothing merged
    # PEFT merges anyway, and its merged model computes something else (what lora_ext refuses)
    assert rel_err(copy.deepcopy(pm).merge_and_unload()(x), pm(x)) > 1e-4


def test_dilation_follows_peft():
    # PEFT does not pass dilation to lora_A: with padding="same" both sides run an undilated A
    # (the convnet's "dil" layer, checked against PEFT above); merging is refused
    _, _, ours, _ = build_pair("convnet", patterns=False)
    with pytest.raises(ValueError, match=r"LoRAConv2d\.merge: dilation=\(2, 2\)"):
        ours.dil.merge()
    with pytest.raises(ValueError, match=r"merge: layer 'dil'"):
        lora_ext.merge(ours)
    assert not any(m.merged for m in lora_ext.lora_layers(ours).values())
    # with an explicit padding, an undilated A gives another output size: PEFT fails on the sum,
    # lora_ext raises naming the layer's forward
    conv = nn.Conv2d(3, 4, 3, padding=1, dilation=2)
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(conv)), peft.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(1, 3, 9, 9)
    with pytest.raises(RuntimeError):
        pm(x)
    layer = LoRAConv2d.from_conv(conv, r=2)
    with pytest.raises(ValueError, match=r"LoRAConv2d\.forward: lora_A \(not dilated, as PEFT's\)"):
        layer(x)


def test_grouped_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match=r"inject: module '0': Conv2d with groups=2 is not supported"):
        lora_ext.inject(model, ["0", "1"], r=4)
    assert type(model[1]) is nn.Conv2d  # refused before anything changed
    with pytest.raises(ValueError, match=r"LoRAConv2d\.from_conv: Conv2d with groups=2"):
        LoRAConv2d.from_conv(model[0], r=4)
    with pytest.raises(ValueError, match=r"LoRAConv2d: Conv2d with groups=4"):
        LoRAConv2d(4, 8, 3, groups=4)
    # PEFT's own adapter of the grouped conv (forward-only there: it refuses to merge it)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(NotImplementedError):
        copy.deepcopy(pm).merge_and_unload()
    ad = lora_ext.Adapter(
        {"0": lora_ext.LayerWeights(peft_layer(pm, "0").lora_A["default"].weight.detach(),
                                    peft_layer(pm, "0").lora_B["default"].weight.detach(), 1.0, "conv")})
    with pytest.raises(ValueError, match=r"load_adapter: module '0': Conv2d with groups=2"):
        lora_ext.load_adapter(model, ad)
    assert type(model[0]) is nn.Conv2d


def test_wrong_factor_shapes_in_a_file_are_named(tmp_path):
    base, pm, _, _ = build_pair("unet")
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    good = load_file(path)
    key_a = "base_model.model.down.conv1.lora_A.weight"
    key_b = "base_model.model.down.conv1.lora_B.weight"

    bad = dict(good)  # a 3x3 conv's lora_A saved with a 1x1 kernel
    bad[key_a] = good[key_a][:, :, :1, :1].contiguous()
    save_file(bad, path)
    ad = lora_ext.Adapter.load(str(tmp_path))
    with pytest.raises(ValueError, match=r"load_adapter: module 'down.conv1': the Conv2d \(8 -> 12 channels, "
                                         r"kernel \(3, 3\)\) takes lora_A \[r, 8, 3, 3\]"):
        lora_ext.load_adapter(copy.deepcopy(base), ad)
    injected = copy.deepcopy(base)
    lora_ext.inject(injected, UNET_TARGETS, r=4)
    before = lora_ext.lora_state_dict(injected)
    with pytest.raises(ValueError, match=r"module 'down.conv1'.*LoRAConv2d"):
        lora_ext.load_adapter(injected, ad)
    after = lora_ext.lora_state_dict(injected)
    assert all(torch.equal(before[k], after[k]) for k in before)  # validated before any change

    bad = dict(good)  # lora_B that is not 1x1
    bad[key_b] = good[key_b].expand(-1, -1, 3, 3).contiguous()
    save_file(bad, path)
    with pytest.raises(ValueError, match=rf"Adapter.load: {path}: module 'down.conv1' has lora_A .* and lora_B "
                                         r"\(12, 4, 3, 3\).*\[r, in, \*kernel\] and \[out, r, 1, \.\.\.\]"):
        lora_ext.Adapter.load(str(tmp_path))

    bad = dict(good)  # conv factors on a linear layer's name, linear ones on a conv's
    bad["base_model.model.down.time_emb_proj.lora_A.weight"] = good[key_a].clone()
    bad["base_model.model.down.time_emb_proj.lora_B.weight"] = good[key_b].clone()
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"load_adapter: module 'down.time_emb_proj' is a Linear, the adapter "
                                         r"holds conv weights"):
        lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    bad = dict(good)
    bad[key_a] = good[key_a].flatten(1).contiguous()
    bad[key_b] = good[key_b].flatten(1).contiguous()
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"load_adapter: module 'down.conv1' is a Conv2d, the adapter holds "
                                         r"linear weights"):
        lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))


def test_set_lora_factors_checks_conv_shapes():
    layer = LoRAConv3d.from_conv(nn.Conv3d(2, 3, (1, 2, 3)), r=2)
    A, B = torch.randn(5, 2, 1, 2, 3), torch.randn(3, 5, 1, 1, 1)
    layer.set_lora_factors(A, B, 0.5)  # another rank: resized
    assert layer.r == 5 and layer.lora_alpha == pytest.approx(2.5) and torch.equal(layer.lora_A, A)
    with pytest.raises(ValueError, match=r"LoRAConv3d\.set_lora_factors: the LoRAConv3d .* takes lora_A "
                                         r"\[r, 2, 1, 2, 3\] and lora_B \[3, r, 1, 1, 1\]"):
        layer.set_lora_factors(A.flatten(1), B.flatten(1), 0.5)
    with pytest.raises(ValueError, match=r"LoRAConv3d\.set_lora_factors"):
        layer.set_lora_factors(A, torch.randn(3, 4, 1, 1, 1), 0.5)


def test_combine_conv_adapters_matches_peft_add_weighted_adapter(tmp_path):
    base = base_model("unet")
    cfg = dict(target_modules=["conv1", "conv_shortcut", "proj_out", "to_q"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **cfg), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, **cfg))
    torch.manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.2
    pm.save_pretrained(tmp_path)
    ads = [lora_ext.Adapter.load(os.path.join(tmp_path, name)) for name in ("a", "b")]
    x = inputs("unet")
    for how in ("cat", "linear"):
        pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], f"ab_{how}", combination_type=how)
        pm.set_adapter(f"ab_{how}")
        both = lora_ext.combine(ads, [0.7, -0.4], how=how)
        assert both.layers["down.conv1"].kind == "conv" and both.layers["down.conv1"].A.dim() == 4
        model = copy.deepcopy(base)
        lora_ext.load_adapter(model, both)
        assert rel_err(model(*x), pm(*x)) <= 1e-5, how
    with pytest.raises(ValueError, match=r"combine: module 'down.conv1': adapters have different in/out sizes"):
        other = lora_ext.Adapter({"down.conv1": lora_ext.LayerWeights(torch.randn(2, 8, 1, 1), torch.randn(12, 2, 1, 1), 1.0,
                                                                       "conv")})
        lora_ext.combine([ads[0], other])
    with pytest.raises(ValueError, match=r"combine: module 'down.conv1' has conv and linear factors"):
        flat = lora_ext.Adapter({"down.conv1": lora_ext.LayerWeights(torch.randn(2, 72), torch.randn(12, 2), 1.0)})
        lora_ext.combine([ads[0], flat])


def test_serving_and_tensor_parallel_refuse_convs():
    model = base_model("unet")
    with pytest.raises(ValueError, match=r"AdapterPool: target_modules=\['conv1', 'to_q'\] matches 'down.conv1', "
                                         r"a Conv2d: multi-adapter serving has no convolution layers"):
        lora_ext.AdapterPool(copy.deepcopy(model), target_modules=["conv1", "to_q"], max_adapters=2, max_rank=4)
    pool = lora_ext.AdapterPool(copy.deepcopy(model), target_modules=["to_q"], max_adapters=2, max_rank=4)
    ad = lora_ext.Adapter({"down.conv1": lora_ext.LayerWeights(torch.randn(2, 8, 3, 3), torch.randn(12, 2, 1, 1), 1.0, "conv")})
    with pytest.raises(ValueError, match=r"AdapterPool.load\('x'\): module 'down.conv1' holds convolution LoRA "
                                         r"factors"):
        pool.load("x", ad)
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base must be an nn.Linear or transformers Conv1D, got Conv2d"):
        lora_ext.MultiLoRALinear(nn.Conv2d(3, 4, 1), 2, 4)
    tp = pytest.importorskip("lora_ext.tp")
    injected = nn.Sequential(nn.Conv2d(3, 4, 1))
    lora_ext.inject(injected, ["0"], r=2)
    with pytest.raises(ValueError, match=r"'0', a LoRAConv2d, which is not tensor-parallel"):
        tp.validate_plan(injected, None, {"0": tp.ColwiseParallel()})
    with pytest.raises(ValueError, match=r"is a LoRAConv2d, not a lora_ext LoRALinear"):
        tp.validate_plan(injected, None, {"0": tp.ColwiseParallelLoRA()})


def test_layer_api():
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 0), bias=False).eval()
    layer = LoRAConvNd.from_conv(conv, r=3, alpha=6, dropout=0.1, init="gaussian")
    assert type(layer) is LoRAConv2d and not layer.training and layer.weight is conv.weight
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_init == "gaussian"
    assert layer.lora_A.shape == (3, 3, 3, 2) and layer.lora_B.shape == (5, 3, 1, 1) and not layer.lora_B.any()
    x = torch.randn(2, 3, 8, 7)
    assert torch.equal(layer(x), conv(x))  # B = 0 at start
    assert "LoRAConv2d(3, 5, kernel_size=(3, 2), stride=(2, 2), padding=(1, 0), r=3, alpha=6" in repr(layer)
    with pytest.raises(TypeError, match=r"LoRAConv1d\.from_conv: expected Conv1d, got Conv2d"):
        LoRAConv1d.from_conv(conv)
    with pytest.raises(TypeError, match=r"LoRAConvNd\.from_conv: expected nn.Conv1d, nn.Conv2d or nn.Conv3d, got ConvTranspose2d"):
        LoRAConvNd.from_conv(nn.ConvTranspose2d(3, 3, 2))
    with pytest.raises(ValueError, match=r"LoRAConv2d: LoRA rank r must be a positive int, got 0"):
        LoRAConv2d(3, 5, 3, r=0)
    # built directly on meta, then materialized
    with torch.device("meta"):
        m = LoRAConv1d(4, 6, 5, padding=2, r=2, alpha=4)
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.isfinite(m.weight).all() and not m.lora_B.any() and m.lora_A.abs().sum() > 0
    # inject: convs are targets by name, not part of "all-linear" (as PEFT)
    net = ConvNet()
    assert lora_ext.inject(net, "all-linear") == ["head"]
    with pytest.raises(TypeError, match=r"inject: module 'c1' has hooks"):
        net2 = ConvNet()
        net2.c1.register_forward_hook(lambda *a: None)
        lora_ext.inject(net2, ["c1"])


class SameConv(nn.Conv2d):  # as diffusers' old LoRACompatibleConv without a LoRA: the plain forward
    def forward(self, x, scale: float = 1.0):
        return super().forward(x)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_conv_subclasses():
    model = nn.Sequential(SameConv(3, 4, 3, padding=1), ScaledConv(4, 4, 1))
    x = torch.randn(1, 3, 5, 5)
    want = model(x)
    with pytest.raises(TypeError, match=r"inject: module '1' is a ScaledConv whose forward is not the plain layer's"):
        lora_ext.inject(model, ["0", "1"])
    lora_ext.inject(model, ["0"], r=2)
    assert type(model[0]) is LoRAConv2d and model[0].base_class is SameConv
    model[0].lora_B.data.normal_()
    lora_ext.merge_and_unload(model)
    assert type(model[0]) is SameConv and rel_err(model(x), want) > 1e-3  # the merged adapter
