"""Where the newer layers (LoRAConv1d/2d/3d, MergedLinear) meet the rest of lora_ext: memory
layouts and dtype conversions of merged layers, FSDP2's save_adapter, the CLI's inspect."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lora_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, (3, 2), stride=2))
    lora_ext.inject(m, ["0", "2"], r=3, alpha=6)
    with torch.no_grad():
        for layer in lora_ext.lora_layers(m).values():
            layer.lora_B.normal_()
    return m.eval()


def weights(m):
    return {n: layer.weight.detach().clone() for n, layer in lora_ext.lora_layers(m).items()}


def test_channels_last_weights_merge_and_unmerge_exactly():
    """A channels_last conv weight (diffusers' usual layout) has no [out, in*k] view: the merge
    goes through a copy written back, so it merges to the same bits as the contiguous weight and
    unmerges to W0 bit for bit, keeping its layout."""
    ref, cl = conv_net(), conv_net().to(memory_format=torch.channels_last)
    w0 = weights(ref)
    x = torch.randn(2, 3, 9, 8)
    y = ref(x)
    assert lora_ext.merge(cl, safe=True) == ["0", "2"] and lora_ext.merge(ref) == ["0", "2"]
    for n, layer in lora_ext.lora_layers(cl).items():
        assert layer.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(layer.weight, lora_ext.lora_layers(ref)[n].weight)
        assert not torch.equal(layer.weight, w0[n])
    assert torch.allclose(cl(x), y, atol=1e-5)
    lora_ext.unmerge(cl)
    for n, layer in lora_ext.lora_layers(cl).items():
        assert torch.equal(layer.weight, w0[n]) and layer.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("convert", ["layout", "layout+bf16", "train"])
def test_converting_a_merged_conv_to_channels_last(convert):
    """Merged, then converted to channels_last (with a dtype change: the exact merge is redone in
    the new dtype), then unmerged (or train(), which unmerges): the converted W0, bit for bit.
    Used to raise (and .to(bf16, channels_last) to raise half-way, the weight converted but not
    its MergeState)."""
    m = conv_net()
    w0 = weights(m)
    lora_ext.merge(m)
    if convert == "layout+bf16":
        m.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    else:
        m.to(memory_format=torch.channels_last)
    if convert == "train":
        m.train()
        assert not any(layer.merged for layer in lora_ext.lora_layers(m).values())
    else:
        lora_ext.unmerge(m)
    dtype = torch.bfloat16 if convert == "layout+bf16" else torch.float32
    for n, layer in lora_ext.lora_layers(m).items():
        assert layer.weight.dtype == dtype and torch.equal(layer.weight, w0[n].to(dtype))


def fused_and_conv_net():
    """A MergedLinear (q and v of a fused qkv) feeding a Conv1d LoRA, with non-zero factors."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 24), nn.Unflatten(1, (4, 6)), nn.Conv1d(4, 6, 3, padding=1))
    m[0] = lora_ext.MergedLinear.from_linear(m[0], [True, False, True], r=2, alpha=4)
    lora_ext.inject(m, ["2"], r=2, alpha=3)
    with torch.no_grad():
        for layer in lora_ext.lora_layers(m).values():
            layer.lora_B.normal_()
    lora_ext.mark_only_lora_trainable(m)
    return m


def _fsdp_save(rank, world, out_dir):
    from lora_ext.distributed import fully_shard_lora, save_adapter
    m = fused_and_conv_net()
    fully_shard_lora(m)
    save_adapter(m, os.path.join(out_dir, "adapter"))
    return True


def test_fsdp2_save_adapter_of_merged_linear_and_conv(tmp_path):
    """distributed.save_adapter gathers the sharded factors: a MergedLinear's padded B is built from
    the whole lora_B (it used to call lora_factors() on the shard and raise on every rank); the
    files equal Adapter.from_model of the same unsharded model."""
    assert dist_helpers.spawn(__name__, "_fsdp_save", 2, str(tmp_path)) == [True, True]
    saved, ref = lora_ext.Adapter.load(str(tmp_path / "adapter")), lora_ext.Adapter.from_model(fused_and_conv_net())
    assert saved.layers.keys() == ref.layers.keys() == {"0", "2"}
    assert saved.layers["0"].B.shape == (24, 4) and saved.layers["2"].kind == "conv"
    for n, w in ref.layers.items():
        assert torch.equal(saved.layers[n].A, w.A) and torch.equal(saved.layers[n].B, w.B)
        assert saved.layers[n].scale == pytest.approx(w.scale)
    assert saved.config == ref.config


def inspect_cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_ext", "inspect", *map(str, args)], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True, timeout=300)


def test_inspect_of_a_conv_adapter_says_the_pool_cannot_serve_it(tmp_path):
    """AdapterPool refuses conv factors; inspect used to say 'AdapterPool: can serve it' (and
    --pool exited 0) for a conv adapter. Its table names the kernel of conv modules."""
    lora_ext.Adapter.from_model(conv_net()).save(str(tmp_path / "conv"))
    r = inspect_cli(tmp_path / "conv")
    assert r.returncode == 0, r.stderr
    assert "AdapterPool: cannot serve it: it adapts convolutions (0, 2)" in r.stdout, r.stdout
    assert "3 → 8, kernel 3×3" in r.stdout and "8 → 6, kernel 3×2" in r.stdout, r.stdout
    assert inspect_cli(tmp_path / "conv", "--pool").returncode == 1
    lin = nn.Sequential(nn.Linear(4, 4))  # the same verdict code still passes a linear adapter
    lora_ext.inject(lin, ["0"], r=2)
    lora_ext.Adapter.from_model(lin).save(str(tmp_path / "lin"))
    r = inspect_cli(tmp_path / "lin", "--pool")
    assert r.returncode == 0 and "AdapterPool: can serve it" in r.stdout, r.stdout


def test_parametrized_targets_are_refused_by_name_before_anything_changes():
    """A weight_norm'd conv (audio models: Encodec, HiFi-GAN, wav2vec2's pos_conv) or linear has a
    weight recomputed on every access, which a LoRA layer cannot share: inject used to replace the
    other targets and then fail in torch ('cannot assign torch.FloatTensor as parameter weight');
    now it names the module first and changes nothing, "all-linear" leaves such a layer out, and
    each from_* constructor names itself."""
    wn = nn.utils.parametrizations.weight_norm
    m = nn.Sequential(nn.Conv1d(4, 6, 3), wn(nn.Conv1d(6, 6, 3)))
    with pytest.raises(TypeError, match=r"inject: module '1' has parametrizations on \['weight'\] \(weight_norm"):
        lora_ext.inject(m, ["0", "1"], r=2)
    assert type(m[0]) is nn.Conv1d and not lora_ext.lora_layers(m)
    lin = nn.Sequential(nn.Linear(4, 4), wn(nn.Linear(4, 4)))
    assert lora_ext.inject(lin, "all-linear", r=2) == ["0"]
    for make, module in ((lambda x: lora_ext.LoRAConv1d.from_conv(x), wn(nn.Conv1d(4, 6, 3))),
                         (lambda x: lora_ext.LoRAConvNd.from_conv(x), wn(nn.Conv2d(4, 6, 3))),
                         (lambda x: lora_ext.LoRALinear.from_linear(x), wn(nn.Linear(4, 6))),
                         (lambda x: lora_ext.MergedLinear.from_linear(x, [True, False]), wn(nn.Linear(4, 6))),
                         (lambda x: lora_ext.LoRAEmbedding.from_embedding(x), wn(nn.Embedding(5, 3)))):
        with pytest.raises(TypeError, match=r"^(LoRAConv1d\.from_conv|LoRAConv2d\.from_conv|LoRALinear\.from_linear|"
                                            r"MergedLinear\.from_linear|LoRAEmbedding\.from_embedding): the "
                                            r"Parametrized\w+ has parametrizations"):
            make(module)


def test_inspect_shows_the_layer_selection_of_an_adapter(tmp_path):
    """A PEFT adapter trained with layers_to_transform + layers_pattern: inspect lists both fields
    (layers_pattern used to be left out, though it decides which layers PEFT adapts) and the layer."""
    peft = pytest.importorskip("peft")
    from models import tiny_llama
    pm = peft.get_peft_model(tiny_llama(layers=3), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                 layers_to_transform=[2], layers_pattern="layers"))
    pm.save_pretrained(tmp_path / "a")
    r = inspect_cli(tmp_path / "a")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") == 3}
    assert rows["layers_to_transform"].split("│")[2].strip() == "[2]"
    assert rows["layers_pattern"].split("│")[2].strip() == '"layers"'
    assert any("model.layers.*.self_attn.q_proj" in line and "│ 2 " in line for line in r.stdout.splitlines())
