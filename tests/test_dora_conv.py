"""DoRA of convolutions (LoRAConv1d/2d/3d(use_dora=True), inject, adapter files): PEFT's conv DoRA
(DoraConvNdVariant) is the oracle: outputs, gradients, dropout masks, files both ways, merges."""
import copy

import pytest
import torch
import torch.nn.functional as F
import peft_cases
from conftest import rel_err
from torch import nn

import lora_ext
from lora_ext import Adapter, LoRAConv2d, LoRAConvNd, inject, load_adapter

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    """Conv1d, Conv2d (no bias, stride), Conv3d on three inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv3d(2, 5, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, a, b, c):
        return torch.cat([self.c1(a).flatten(1), self.c2(b).flatten(1), self.c3(c).flatten(1)], 1)

    @staticmethod
    def inputs(seed=1):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, 3, 9, generator=g), torch.randn(2, 4, 8, 8, generator=g),
                torch.randn(2, 2, 3, 6, 6, generator=g))


class UNetBlock(nn.Module):
    """A UNet-ish block: down conv, GroupNorm + SiLU res block, 1x1 skip, upsample, concat, out conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(2, 8), nn.Conv2d(8, 16, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 3, padding=1)
        self.skip = nn.Conv2d(8, 16, 1)
        self.conv_out = nn.Conv2d(16 + 8, 3, 3, padding=1)

    def forward(self, x):
        h0 = self.conv_in(x)
        h = self.down(h0)
        r = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(h))))))
        h = F.interpolate(self.skip(h) + r, scale_factor=2.0, mode="nearest")
        return self.conv_out(torch.cat([h, h0], 1))

    @staticmethod
    def inputs(seed=1):
        return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


CASES = {"convnet": (ConvNet, ["c1", "c2", "c3"]),
         "unet": (UNetBlock, ["conv_in", "down", "conv1", "conv2", "skip", "conv_out"])}


def randomize(model, seed=2):
    return peft_cases.randomize(model, seed, magnitude=0.2)


def peft_dora(kind, dropout=0.0):
    make, targets = CASES[kind]
    return randomize(peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True, lora_dropout=dropout)))


def ours_from(pm, tmp_path, kind):
    pm.save_pretrained(tmp_path / "ad")
    model = CASES[kind][0]()
    assert sorted(load_adapter(model, str(tmp_path / "ad"))) == sorted(CASES[kind][1])
    return model


def grads(model):
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            n = n.removeprefix("base_model.model.").replace(".default", "").replace(".weight", "")
            out[n] = p.grad
    return out


@pytest.mark.parametrize("kind", CASES)
def test_peft_file_loads_with_same_outputs_and_gradients(kind, tmp_path):
    pm = peft_dora(kind)
    ours = ours_from(pm, tmp_path, kind)
    for name in CASES[kind][1]:
        m = ours.get_submodule(name)
        assert isinstance(m, LoRAConvNd) and m.use_dora
        theirs = pm.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        assert m.lora_magnitude_vector.shape == theirs.shape and m.lora_magnitude_vector.shape[1] == m.out_channels
        assert torch.equal(m.lora_magnitude_vector, theirs)
    x = CASES[kind][0].inputs()
    want, got = pm(*x), ours(*x)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, CASES[kind][0]()(*x)) > 1e-3  # the adapter does something
    (want ** 2).sum().backward()
    (got ** 2).sum().backward()
    gw, gg = grads(pm), grads(ours)
    assert set(gw) == set(gg) and len(gg) == 3 * len(CASES[kind][1])
    for k in gg:
        assert rel_err(gg[k], gw[k]) < 1e-5, k


@pytest.mark.parametrize("kind", CASES)
def test_dropout_in_training_draws_peft_s_masks(kind, tmp_path):
    pm = peft_dora(kind, dropout=0.3).train()
    ours = ours_from(pm, tmp_path, kind).train()
    assert ours.get_submodule(CASES[kind][1][0]).lora_dropout == 0.3
    x = CASES[kind][0].inputs()
    torch.manual_seed(7)
    want = pm(*x)
    torch.manual_seed(7)
    got = ours(*x)
    assert rel_err(got, want) < 1e-5
    torch.manual_seed(8)  # another seed: other masks (the test can tell them apart)
    assert rel_err(ours(*x), want) > 1e-3
    (want ** 2).sum().backward()
    (got ** 2).sum().backward()
    gw, gg = grads(pm), grads(ours)
    for k in gg:
        assert rel_err(gg[k], gw[k]) < 1e-5, k


@pytest.mark.parametrize("kind", CASES)
def test_saved_adapter_loads_in_peft_and_state_dicts_match(kind, tmp_path):
    model = CASES[kind][0]()
    inject(model, CASES[kind][1], r=4, alpha=8, use_dora=True)
    lora_ext.mark_only_lora_trainable(model)  # as PEFT (the GroupNorms' biases are not saved)
    randomize(model)
    sd = lora_ext.lora_state_dict(model)
    pm = peft_dora(kind)
    theirs = peft.get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    Adapter.from_model(model).save(str(tmp_path / "out"))
    loaded = Adapter.load(str(tmp_path / "out"))
    assert all(torch.equal(loaded.layers[n].magnitude, model.get_submodule(n).lora_magnitude_vector)
               for n in CASES[kind][1])
    pm = peft.PeftModel.from_pretrained(CASES[kind][0](), tmp_path / "out").eval()
    x = CASES[kind][0].inputs()
    with torch.no_grad():
        assert rel_err(model(*x), pm(*x)) < 1e-5
    again = CASES[kind][0]()  # and back into lora_ext: the same model
    load_adapter(again, str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(again(*x), model(*x))


def test_new_layer_computes_the_base_layer_and_starts_at_the_norm():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = LoRAConvNd.from_conv(copy.deepcopy(conv), r=2, alpha=4, use_dora=True, init="gaussian")
    assert type(layer) is LoRAConv2d and layer.lora_magnitude_vector.shape == (1, 6, 1, 1)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.reset_lora_parameters("gaussian")  # B zero again; m = ||W|| per output channel
    assert torch.allclose(layer.lora_magnitude_vector.flatten(), conv.weight.flatten(1).norm(dim=1), rtol=1e-6)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) < 1e-6
    assert "use_dora=True" in repr(layer)
    assert LoRAConvNd.from_conv(nn.Conv1d(3, 5, 2), use_dora=True).lora_magnitude_vector.shape == (1, 5, 1)


@pytest.mark.parametrize("kind", CASES)
def test_merge_matches_peft_and_exact_unmerge_gives_w0_back(kind, tmp_path):
    pm = peft_dora(kind)
    ours = ours_from(pm, tmp_path, kind)
    w0 = {n: ours.get_submodule(n).weight.detach().clone() for n in CASES[kind][1]}
    x = CASES[kind][0].inputs()
    with torch.no_grad():
        before = ours(*x)
        lora_ext.merge(ours)
        assert rel_err(ours(*x), before) < 1e-5
        lora_ext.unmerge(ours)
        for n in CASES[kind][1]:
            assert torch.equal(ours.get_submodule(n).weight, w0[n]), n
        merged = lora_ext.merge_and_unload(copy.deepcopy(ours))
        ref = pm.merge_and_unload()
    for n in CASES[kind][1]:
        assert type(merged.get_submodule(n)) is type(ref.get_submodule(n))
        assert rel_err(merged.get_submodule(n).weight, ref.get_submodule(n).weight) < 1e-6, n


def test_channels_last_merge_unmerge_and_dtype_change_while_merged():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    layer = randomize(LoRAConvNd.from_conv(conv, r=2, use_dora=True))
    w0 = layer.weight.detach().clone()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        assert layer.weight.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(layer(x), want) < 1e-5
        layer.unmerge()
        assert torch.equal(layer.weight, w0)
        ref = copy.deepcopy(layer).to(torch.bfloat16)
        ref.merge()
        layer.merge()
        layer.to(torch.bfloat16)  # converted while merged == converted, then merged
        assert torch.equal(layer.weight, ref.weight)
        layer.unmerge()
        assert torch.equal(layer.weight, w0.to(torch.bfloat16))


def test_compile_fullgraph():
    layer = randomize(LoRAConvNd.from_conv(nn.Conv2d(4, 6, 3, padding=1), r=2, use_dora=True)).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(torch.compile(layer, fullgraph=True)(x), layer(x)) < 1e-6


def test_refusals_name_the_module_or_argument(tmp_path):
    layer = LoRAConvNd.from_conv(nn.Conv2d(4, 6, 3, padding=2, dilation=2), r=2, use_dora=True)
    with pytest.raises(ValueError, match=r"LoRAConv2d.merge: dilation=\(2, 2\)"):
        layer.merge()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    with pytest.raises(ValueError, match=r"set_lora_factors: magnitude must be \[1, 6, 1, 1\], got \[6\]"):
        layer.set_lora_factors(A, B, 1.0, torch.ones(6))
    with pytest.raises(ValueError, match="magnitude given, but the layer is not DoRA"):
        LoRAConvNd.from_conv(nn.Conv2d(4, 6, 3), r=2).set_lora_factors(A, B, 1.0, torch.ones(1, 6, 1, 1))
    from safetensors.torch import load_file, save_file
    pm = peft_dora("convnet")
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    t = load_file(path)
    save_file({**t, "base_model.model.c2.lora_magnitude_vector": torch.ones(8)}, path)
    with pytest.raises(ValueError, match=r"module 'c2' has lora_magnitude_vector \(8,\); expected \[1, 8, 1, 1\]"):
        Adapter.load(str(tmp_path))
    plain = ConvNet()
    inject(plain, ["c1", "c2", "c3"], r=4, alpha=8)
    save_file(t, path)
    with pytest.raises(ValueError, match="module 'c1' is a LoRA layer without DoRA but the adapter is DoRA"):
        load_adapter(plain, str(tmp_path))
    with pytest.raises(ValueError, match="combine: .*DoRA"):
        lora_ext.combine([Adapter.load(str(tmp_path))] * 2, [0.5, 0.5])


def test_cli_merge_of_a_conv_dora_file_equals_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_ext.__main__ import main

    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")
    torch.manual_seed(0)
    transformers.ResNetModel(cfg).save_pretrained(tmp_path / "base")
    load = lambda: transformers.ResNetModel.from_pretrained(tmp_path / "base")  # noqa: E731
    randomize(peft.get_peft_model(load(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["convolution"],
                                                          use_dora=True))).save_pretrained(tmp_path / "ad")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "ad"), "--out", str(tmp_path / "out")]) == 0
    got = transformers.ResNetModel.from_pretrained(tmp_path / "out")
    ref = peft.PeftModel.from_pretrained(load(), tmp_path / "ad").merge_and_unload()
    convs = [n for n, _ in ref.named_parameters() if "convolution" in n]
    assert len(convs) == 6 and rel_err(got.get_parameter(convs[0]), load().get_parameter(convs[0])) > 1e-3
    for name, p in ref.named_parameters():
        assert rel_err(got.get_parameter(name), p) < 1e-6, name
