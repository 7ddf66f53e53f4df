"""Model-level merge lifecycle: dtype conversions of merged models, errors naming the layer,
what merge_and_unload leaves behind."""
import copy

import pytest
import torch
from models import tiny_llama
from test_merge_model import base_weights, build, ids, same_bits

import lora_ext


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16])
def test_merged_model_changes_dtype_and_unmerges_exactly(to):
    """.half() / .to(bf16) of a merged fp32 model (an unmerge then raised 'cannot unmerge exactly',
    and so did model.train()): the merge is redone in the new dtype."""
    _, model = build("llama", torch.float32, "cpu")
    ref = copy.deepcopy(model).to(to)  # converted, then merged
    lora_ext.merge(model)
    model.to(to)
    lora_ext.merge(ref)
    merged, ref_merged = base_weights(model), base_weights(ref)
    assert all(same_bits(merged[n], ref_merged[n]) for n in ref_merged)  # conversion and merge commute
    lora_ext.unmerge(ref)
    lora_ext.unmerge(model)
    unmerged, ref_unmerged = base_weights(model), base_weights(ref)
    assert all(same_bits(unmerged[n], ref_unmerged[n]) for n in ref_unmerged)  # = W0 converted
    lora_ext.merge(model)
    model.train()  # unmerges
    assert not any(m.merged for m in lora_ext.lora_layers(model).values())
    x = ids("cpu")
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, ref.eval()(x).logits)


def test_merged_model_round_trips_through_a_wider_dtype():
    """fp32 -> double -> fp32 keeps the merged bits (no re-merge in double, which merge_ does not
    take), so the unmerge is still exact."""
    _, model = build("llama", torch.float32, "cpu")
    before = base_weights(model)
    lora_ext.merge(model)
    model.double().float()
    lora_ext.unmerge(model)
    after = base_weights(model)
    assert all(same_bits(after[n], before[n]) for n in before)


def test_unmerge_checks_every_layer_first_and_names_the_failing_one():
    """A weight written since the merge raised MergeState's error without the layer's name, after
    the layers before it had been unmerged; a layer merged for good raised a TypeError (unpacking
    None)."""
    _, model = build("llama", torch.bfloat16, "cpu")
    lora_ext.merge(model)
    merged = base_weights(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += 1  # e.g. an optimizer step on W
    with pytest.raises(ValueError, match=r"^unmerge: layer 'model\.layers\.1\.self_attn\.v_proj': .*written since"):
        lora_ext.unmerge(model)
    assert all(m.merged for m in lora_ext.lora_layers(model).values())  # nothing unmerged
    now = base_weights(model)
    assert sum(not same_bits(now[n], merged[n]) for n in merged) == 1
    _, model = build("gpt2", torch.float32, "cpu")
    lora_ext.merge(model)
    model.transformer.h[0].attn.c_attn.drop_merge_state()
    with pytest.raises(ValueError, match=r"^unmerge: layer 'transformer\.h\.0\.attn\.c_attn': merged for good"):
        lora_ext.unmerge(model)
    with pytest.raises(ValueError, match=r"^unmerge: this LoRALinear is merged for good"):
        model.transformer.h[0].attn.c_attn.unmerge()


def test_merge_of_a_peft_model_points_to_peft():
    """lora_ext.merge(peft_model) said 'no LoRA layers (use lora_ext.inject first)'."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(seed=1), LoraConfig(r=2, target_modules=["q_proj"]))
    for fn in (lora_ext.merge, lora_ext.unmerge, lora_ext.merge_and_unload):
        with pytest.raises(ValueError, match=rf"^{fn.__name__}: PeftModel has PEFT LoRA layers .*merge_adapter"):
            fn(peft_model)
    with pytest.raises(ValueError, match=r"^merge: Sequential has no LoRA layers \(use lora_ext.inject"):
        lora_ext.merge(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_merge_and_unload_gives_a_transformer_encoder_its_nested_tensors_back():
    """inject sets use_nested_tensor=False on an nn.TransformerEncoder holding LoRA layers;
    merge_and_unload left it off, so the exported model differed from the base model it equals in
    structure: padded positions held 2.0 instead of 0 (and the fast path was off)."""
    from test_layers import torch_encoder
    from test_merge_model import trained

    base = torch_encoder()
    enc = copy.deepcopy(base)
    lora_ext.inject(enc, ["linear1", "linear2"], r=4)
    trained(enc, ratio=0.1)
    assert not enc.use_nested_tensor
    lora_ext.merge_and_unload(enc)
    assert enc.use_nested_tensor and vars(enc).keys() == vars(base).keys()
    assert not any(m._forward_pre_hooks for m in enc.modules())
    base.load_state_dict(enc.state_dict())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        y, y_base = enc(x, src_key_padding_mask=pad), base(x, src_key_padding_mask=pad)
    assert torch.equal(y, y_base) and not y[1, 3:].any()  # nested path: zeros where padded


def _dora_model(channels_last=False):
    """A merged-ready DoRA model: linear, Conv1D layout, conv2d (channels_last: its merge works on a
    copy of the [out, in * k] view) and embedding, with trained-looking factors and magnitudes."""
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"lin": torch.nn.Linear(16, 8), "conv": torch.nn.Conv2d(4, 6, 3),
                             "emb": torch.nn.Embedding(20, 8)})
    lora_ext.inject(m, target_modules=["lin", "conv", "emb"], r=2, use_dora=True)
    m["fifo"] = lora_ext.LoRALinear(16, 8, r=2, use_dora=True, fan_in_fan_out=True)
    if channels_last:
        m.conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for layer in m.values():
            for n in layer.factor_names:
                getattr(layer, n).normal_()
            layer.lora_magnitude_vector.mul_(1.5)
    return m


@pytest.mark.parametrize("name", ["lin", "fifo", "conv", "emb"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dora_unmerge_refuses_a_weight_written_since_the_merge(name, channels_last):
    """DoRA's exact unmerge copied W0 back over a weight written since the merge, so the write was
    lost without a word (plain LoRA raised): now the same ValueError, naming the layer, nothing
    unmerged, for lora_ext.unmerge, the layer's unmerge, model.train() and a dtype conversion."""
    m = _dora_model(channels_last)
    lora_ext.merge(m)
    with torch.no_grad():
        m[name].weight[(0,) * m[name].weight.dim()] += 1.0  # the first element: one of the probed
    written = m[name].weight.detach().clone()
    with pytest.raises(ValueError, match=rf"^unmerge: layer '{name}': DoraMergeState: .*written since the merge"):
        lora_ext.unmerge(m)
    assert all(layer.merged for layer in m.values())
    with pytest.raises(ValueError, match=r"^DoraMergeState: .*written since the merge\); cannot unmerge exactly"):
        m[name].unmerge()
    with pytest.raises(ValueError, match="written since the merge"):
        m.train()
    assert m[name].merged and torch.equal(m[name].weight, written)
    with pytest.raises(ValueError, match="written since the merge"):
        m[name].half()  # the merge is redone from W0 in fp16: the write would be lost


@pytest.mark.parametrize("channels_last", [False, True])
def test_dora_exact_unmerge_after_conversions(channels_last):
    """The legitimate cases keep working: merge -> .half() -> unmerge gives W0 in fp16, merge ->
    .double() -> .float() -> unmerge gives W0 bit for bit (the probe follows the weight)."""
    m = _dora_model(channels_last)
    w0 = {n: layer.weight.detach().clone() for n, layer in m.items()}
    lora_ext.merge(m)
    m.double().float()
    assert sorted(lora_ext.unmerge(m)) == sorted(w0)
    assert all(torch.equal(m[n].weight, w0[n]) for n in w0)
    lora_ext.merge(m)
    m.half()
    lora_ext.unmerge(m)
    assert all(torch.equal(m[n].weight, w0[n].half()) for n in w0)
    lora_ext.merge(m, exact=False)  # PEFT's unmerge (W / g - s B A) keeps writes, as plain LoRA's
    with torch.no_grad():
        m["lin"].weight.add_(1.0)
    lora_ext.unmerge(m)
    assert (m["lin"].weight.float() - w0["lin"]).mean() > 0.3
