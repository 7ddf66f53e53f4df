"""LoRA conv layers at their edges, with HF PEFT as the oracle where it has one: padding modes and
dilation as PEFT runs them (and the merges that would change them, refused), grouped convs (as
PEFT's; never merged), bad
factor shapes in files and set_lora_factors, combine, the serving / tensor-parallel refusals, the
layer API and conv subclasses. The models and helpers: tests/test_conv.py."""
import copy
import os

import pytest
import torch
from conftest import devices, rel_err
from test_conv import UNET_TARGETS, ConvNet, base_model, build_pair, inputs, peft_layer
from torch import nn

import lora_ext
from lora_ext.conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAConvNd

peft = pytest.importorskip("peft")


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


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                  lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="circular"),
                                  lambda: nn.Conv3d(3, 4, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 2),
                                                    padding_mode="replicate")],
                         ids=["2d-reflect", "1d-same-circular", "3d-replicate"])
def test_padding_mode_with_dropout_in_training_matches_peft(conv, use_dora):
    # with dropout, PEFT's DoRA term (g - 1) conv(d(x); W) pads d(x) with zeros (F.convNd with the
    # base's padding), not with the base's padding_mode; only the borders would tell them apart
    torch.manual_seed(0)
    base = nn.Sequential(conv())
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5,
                                                                   target_modules=["0"], use_dora=use_dora))
    ours = copy.deepcopy(base)
    lora_ext.inject(ours, ["0"], r=2, alpha=4, dropout=0.5, use_dora=use_dora)
    theirs = peft_layer(pm, "0")
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.3)
        ours[0].set_lora_factors(theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, 2.0)
        if use_dora:
            theirs.lora_magnitude_vector["default"].weight.mul_(1.5)
            ours[0].lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    x = torch.randn(2, 3, *[5] * (base[0].weight.dim() - 2))
    pm.train(), ours.train()
    torch.manual_seed(1)
    want = pm(x)
    torch.manual_seed(1)
    got = ours(x)
    assert rel_err(got, want) <= 1e-5
    want.square().sum().backward()
    got.square().sum().backward()
    assert rel_err(ours[0].lora_A.grad, theirs.lora_A["default"].weight.grad) <= 1e-5
    assert rel_err(ours[0].lora_B.grad, theirs.lora_B["default"].weight.grad) <= 1e-5
    if use_dora:
        assert rel_err(ours[0].lora_magnitude_vector.grad, theirs.lora_magnitude_vector["default"].weight.grad) <= 1e-5


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


class GroupedNet(nn.Module):
    """A depthwise-separable block (MobileNet / ConvNeXt style) and a grouped Conv1d and Conv3d."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)                   # depthwise
        self.grouped = nn.Conv2d(8, 12, (3, 2), stride=(2, 1), padding=1, groups=4)
        self.pw = nn.Conv2d(12, 8, 1)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv3d(6, 6, 2, groups=3)

    def forward(self, x):  # [N, 8, H, W]
        y = self.pw(torch.relu(self.grouped(self.dw(x))))          # [N, 8, H', W']
        y = self.c1(y.flatten(2))                                     # [N, 6, H'W']
        return self.c3(y.view(y.shape[0], 6, 1, -1, 1).expand(-1, -1, 2, -1, 2))


GROUPED = ["dw", "grouped", "pw", "c1", "c3"]


def _grouped_pair(r=8, alpha=16, dropout=0.0):
    torch.manual_seed(0)
    base = GroupedNet()
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=GROUPED, lora_dropout=dropout,
                          rank_pattern={"c3": 6})  # (3 groups)
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    for n in GROUPED:
        nn.init.normal_(peft_layer(pm, n).lora_B["default"].weight, std=0.3)
    ours = copy.deepcopy(base)
    lora_ext.inject(ours, GROUPED, r=r, alpha=alpha, dropout=dropout, rank_pattern={"c3": 6})
    for n in GROUPED:
        lay = peft_layer(pm, n)
        ours.get_submodule(n).set_lora_factors(lay.lora_A["default"].weight.detach(),
                                               lay.lora_B["default"].weight.detach(), lay.scaling["default"])
    return base, pm, ours


@pytest.mark.parametrize("device", devices())
def test_grouped_conv_matches_peft_forward_backward_and_files(tmp_path, device):
    """PEFT's LoRA of a grouped convolution: A the full conv to r channels, B grouped as the base
    (lora_B [out, r / groups, 1, ...]); same outputs and gradients, files both ways."""
    base, pm, ours = _grouped_pair()
    pm, ours = pm.to(device), ours.to(device)
    assert ours.dw.lora_B.shape == (8, 1, 1, 1) and ours.grouped.lora_B.shape == (12, 2, 1, 1)
    assert "groups=4" in repr(ours.grouped)
    x = torch.randn(2, 8, 6, 5, device=device)
    y_p, y_o = pm(x), ours(x)
    assert rel_err(y_o, y_p) <= 1e-5
    y_p.square().sum().backward()
    y_o.square().sum().backward()
    for n in GROUPED:
        for f in ("lora_A", "lora_B"):
            assert rel_err(getattr(ours.get_submodule(n), f).grad, getattr(peft_layer(pm, n), f)["default"].weight.grad) <= 1e-5
    pm.save_pretrained(tmp_path / "peft")  # PEFT's file -> lora_ext
    other = copy.deepcopy(base).to(device)
    lora_ext.load_adapter(other, str(tmp_path / "peft"))
    assert rel_err(other(x), y_p) <= 1e-5
    lora_ext.Adapter.from_model(ours).save(str(tmp_path / "ours"))  # lora_ext's file -> PEFT
    with pytest.warns(UserWarning, match="groups > 1"):
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(device), str(tmp_path / "ours"))
    assert rel_err(back(x), y_p) <= 1e-5
    state = lora_ext.lora_state_dict(ours)  # a state dict back into injected layers
    fresh = copy.deepcopy(base).to(device)
    lora_ext.inject(fresh, GROUPED, r=8, alpha=16, rank_pattern={"c3": 6})
    lora_ext.load_adapter(fresh, state)
    assert rel_err(fresh(x), ours(x)) <= 1e-6


def test_grouped_conv_dropout_in_training_matches_peft():
    _, pm, ours = _grouped_pair(dropout=0.25)
    pm.train(), ours.train()
    x = torch.randn(2, 8, 6, 5)
    torch.manual_seed(3)
    y_p = pm(x)
    torch.manual_seed(3)
    assert rel_err(ours(x), y_p) <= 1e-5


def test_grouped_conv_refusals_are_named():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match=r"inject: module '0': Conv2d with groups=2 takes a rank r divisible by "
                                         r"groups .*got r=3"):
        lora_ext.inject(model, ["0", "1"], r=3)
    with pytest.raises(ValueError, match=r"inject: module '0': DoRA of a Conv2d with groups=2 is not supported"):
        lora_ext.inject(model, ["0", "1"], r=4, use_dora=True)
    assert type(model[1]) is nn.Conv2d  # refused before anything changed
    with pytest.raises(ValueError, match=r"LoRAConv2d\.from_conv: Conv2d with groups=2 takes a rank r divisible"):
        LoRAConv2d.from_conv(model[0], r=5)
    with pytest.raises(ValueError, match=r"LoRAConv2d: Conv2d with groups=4 takes a rank r divisible by groups"):
        LoRAConv2d(4, 8, 3, groups=4, r=2)
    layer = LoRAConv2d.from_conv(model[0], r=4)
    with pytest.raises(ValueError, match=r"set_lora_factors: the LoRAConv2d \(4 -> 8 channels, kernel \(3, 3\), "
                                         r"groups=2\) takes lora_A \[r, 4, 3, 3\] and lora_B \[8, r / 2, 1, 1\]"):
        layer.set_lora_factors(torch.zeros(4, 4, 3, 3), torch.zeros(8, 4, 1, 1), 1.0)  # an ungrouped B
    w0 = layer.weight.clone()
    with pytest.raises(ValueError, match=r"LoRAConv2d\.merge: groups=2: lora_A takes every input channel"):
        layer.merge()
    with pytest.raises(ValueError, match=r"merge: layer '0': LoRAConv2d\.merge: groups=2"):
        lora_ext.merge(nn.Sequential(layer))
    assert torch.equal(layer.weight, w0) and not layer.merged
    # PEFT refuses to merge it too
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(NotImplementedError):
        copy.deepcopy(pm).merge_and_unload()
    A, B = (peft_layer(pm, "0").lora_A["default"].weight.detach(), peft_layer(pm, "0").lora_B["default"].weight.detach())
    with pytest.raises(ValueError, match=r"combine: adapter 0: A \(4, 4, 3, 3\) and B \(8, 2, 1, 1\) are a grouped "
                                         r"convolution's"):
        lora_ext.combine([(A, B, 1.0), (A, B, 1.0)])
    ad = lora_ext.Adapter({"0": lora_ext.LayerWeights(A, B[:, :1], 1.0, "conv")})  # B of 4 groups
    with pytest.raises(ValueError, match=r"load_adapter: module '0': the Conv2d \(4 -> 8 channels, kernel \(3, 3\), "
                                         r"groups=2\) takes lora_A"):
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
                                         r"\(12, 4, 3, 3\).*\[r, in, \*kernel\] and \[out, r / groups, 1, \.\.\.\]"):
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
