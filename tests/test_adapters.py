"""PEFT-format adapters both ways: PEFT -> lora_ext -> PEFT, bad files, model left unchanged."""
import contextlib
import copy
import json
import os
import warnings

import pytest
import torch
from conftest import rel_err
from models import tiny_gpt2, tiny_llama

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")


def peft_adapter(tmp_path, seed=1, r=4, targets=("q_proj", "v_proj", "embed_tokens"), rank_pattern=None,
                 alpha_pattern=None, use_rslora=False, base=None, **cfg):
    base = base or tiny_llama()
    cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {}, use_rslora=use_rslora, **cfg)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.1
    path = os.path.join(tmp_path, f"adapter{seed}")
    pm.save_pretrained(path)
    return base, pm, path


def test_peft_to_lora_ext_outputs_match(tmp_path):
    base, pm, path = peft_adapter(tmp_path, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})
    ad = Adapter.load(path)
    assert ad.layers["model.layers.0.self_attn.v_proj"].r == 2
    assert ad.layers["model.layers.0.self_attn.q_proj"].scale == 4.0
    assert ad.layers["model.embed_tokens"].kind == "embedding"
    ours = copy.deepcopy(base)
    loaded = lora_ext.load_adapter(ours, ad)  # injects the missing LoRA layers
    assert len(loaded) == 5
    ids = torch.randint(0, 128, (2, 10))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_lora_ext_to_peft_round_trip_exact(tmp_path):
    base, pm, path = peft_adapter(tmp_path, use_rslora=True)
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, Adapter.load(path))
    out = os.path.join(tmp_path, "ours")
    Adapter.from_model(ours).save(out)
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(path, "adapter_model.safetensors")), load_file(os.path.join(out, "adapter_model.safetensors"))
    assert set(a) == set(b)  # the targeted embedding's table PEFT saves too (loaded, so saved again) and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(reloaded(ids).logits, pm(ids).logits, rtol=0, atol=0)


def test_gpt2_conv1d_adapter(tmp_path):
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.1)
    pm.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, Adapter.load(str(tmp_path)))
    ids = torch.randint(0, 128, (2, 10))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_rank_change_resizes_layer(tmp_path):
    base, pm, path = peft_adapter(tmp_path, r=8, targets=("q_proj",))
    ours = copy.deepcopy(base)
    lora_ext.inject(ours, ["q_proj"], r=2)
    lora_ext.load_adapter(ours, Adapter.load(path))
    assert ours.model.layers[0].self_attn.q_proj.lora_A.shape == (8, 64)
    ids = torch.randint(0, 128, (1, 6))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_bad_files_raise_clear_errors(tmp_path):
    base, pm, path = peft_adapter(tmp_path, targets=("q_proj",))
    st = os.path.join(path, "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_config.json") as err:
        Adapter.load(str(tmp_path))
    # PEFT saves extra adapters in <dir>/<name>/: the message names them
    assert f"subdirectories: {os.path.basename(path)} " in str(err.value)
    # truncated weights
    bad = os.path.join(tmp_path, "trunc")
    os.makedirs(bad)
    open(os.path.join(bad, "adapter_config.json"), "w").write(open(os.path.join(path, "adapter_config.json")).read())
    open(os.path.join(bad, "adapter_model.safetensors"), "wb").write(open(st, "rb").read()[:200])
    with pytest.raises(ValueError, match="trunc/adapter_model.safetensors is corrupt"):
        Adapter.load(bad)
    # broken JSON
    open(os.path.join(bad, "adapter_config.json"), "w").write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Adapter.load(bad)
    # pickle refused unless opted in
    pk = os.path.join(tmp_path, "pickle")
    os.makedirs(pk)
    open(os.path.join(pk, "adapter_config.json"), "w").write(open(os.path.join(path, "adapter_config.json")).read())
    from safetensors.torch import load_file

    torch.save(load_file(st), os.path.join(pk, "adapter_model.bin"))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        Adapter.load(pk)
    assert len(Adapter.load(pk, allow_pickle=True).layers) == 2
    # rank in file disagrees with config
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    cfg["r"] = 3
    json.dump(cfg, open(os.path.join(pk, "adapter_config.json"), "w"))
    with pytest.raises(ValueError, match="rank 4 but the config says r=3"):
        Adapter.load(pk, allow_pickle=True)


def test_mismatched_adapter_leaves_model_unchanged(tmp_path):
    _, _, path = peft_adapter(tmp_path, targets=("q_proj", "v_proj"))
    ad = Adapter.load(path)
    other = tiny_llama(hidden=32)  # different widths
    lora_ext.inject(other, ["q_proj"], r=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' is 32 -> 32"):
        lora_ext.load_adapter(other, ad)
    after = other.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no module"):
        lora_ext.load_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), ad)


def randomize_trainable(pm, seed=0):
    """Random values for everything PEFT trains (LoRA factors, modules_to_save copies, biases)."""
    torch.manual_seed(seed)
    for p in pm.parameters():
        if p.requires_grad:
            p.data = torch.randn_like(p) * 0.1


@pytest.mark.parametrize("base_fn, kw", [
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
    (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
], ids=["modules_to_save", "bias=lora_only", "bias=all"])
def test_non_lora_tensors_are_loaded_like_peft(tmp_path, base_fn, kw):
    base = base_fn()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_trainable(pm)
    path = os.path.join(tmp_path, "ad")
    pm.save_pretrained(path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    ad = Adapter.load(path)
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, ad)
    ids = torch.randint(0, 128, (2, 10))
    want = ref(ids).logits
    assert rel_err(ours(ids).logits, want) < 1e-5
    # and they survive a save: PEFT loads our copy to the same logits
    ad.save(os.path.join(tmp_path, "ours"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp_path, "ours"))
    torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)


def test_modules_to_save_of_wrong_shape_leaves_model_unchanged(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"]))
    pm.save_pretrained(str(tmp_path))
    other = tiny_llama(vocab=96)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head.weight \(128, 64\).*\(96, 64\)"):
        lora_ext.load_adapter(other, Adapter.load(str(tmp_path)))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_pattern_key_with_alternation_matches_peft(tmp_path):
    base, pm, path = peft_adapter(tmp_path, targets=("q_proj", "k_proj", "v_proj"),
                                  rank_pattern={"q_proj|v_proj": 2}, alpha_pattern={"k_proj|v_proj": 16})
    ad = Adapter.load(path)
    layer = "model.layers.0.self_attn."
    assert [ad.layers[layer + n].r for n in ("q_proj", "k_proj", "v_proj")] == [2, 4, 2]
    assert [ad.layers[layer + n].scale for n in ("q_proj", "k_proj", "v_proj")] == [4.0, 4.0, 8.0]
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, ad)
    ids = torch.randint(0, 128, (2, 10))
    assert rel_err(ours(ids).logits, pm(ids).logits) < 1e-5


def test_lora_state_dict_module_names_load_with_load_state_dict():
    model, fresh = tiny_llama(), tiny_llama()
    for m in (model, fresh):
        lora_ext.inject(m, ["q_proj", "v_proj", "embed_tokens"], r=4)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_()
    sd = lora_ext.lora_state_dict(model, peft_names=False)
    assert set(sd) == {k for k in model.state_dict() if k.rpartition(".")[2].startswith("lora_")}
    missing, unexpected = fresh.load_state_dict(sd, strict=False)  # loralib's workflow
    assert not unexpected and not any("lora_" in k for k in missing)
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("peft_names", [True, False])
def test_load_adapter_takes_a_lora_state_dict(peft_names):
    model, fresh = tiny_llama(), tiny_llama()
    for m in (model, fresh):
        lora_ext.inject(m, ["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_()
    sd = lora_ext.lora_state_dict(model, peft_names=peft_names)
    assert len(lora_ext.load_adapter(fresh, sd)) == 5
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_adapter_says_when_no_key_matched():
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        lora_ext.load_adapter(model, {"q_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.v_proj' is not a LoRA layer"):
        lora_ext.load_adapter(model, {"model.layers.0.self_attn.v_proj.lora_A": torch.zeros(4, 64),
                                      "model.layers.0.self_attn.v_proj.lora_B": torch.zeros(32, 4)})
    with pytest.raises(ValueError, match="rank 4 in the model but 2"):
        lora_ext.load_adapter(model, {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 64),
                                      "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(64, 2)})


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_exported_like_peft(tmp_path, bias):
    """mark_only_lora_trainable(bias=...) trains biases: lora_state_dict and Adapter.from_model
    carry them under PEFT's names, so both loaders rebuild the trained model."""
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["c_attn"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(model, bias=bias)
    randomize_trainable(model, seed=3)  # B and the biases move off their initial values
    ids = torch.randint(0, 128, (2, 9))
    want = model(input_ids=ids).logits
    sd = lora_ext.lora_state_dict(model)
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in sd
    assert ("base_model.model.transformer.h.0.mlp.c_fc.bias" in sd) == (bias == "all")
    ad = Adapter.from_model(model)
    assert ad.config["bias"] == bias
    ad.save(tmp_path / "a")
    from lora_ext.distributed import save_adapter  # the distributed writer (no process group: saves)
    save_adapter(model, tmp_path / "d")
    assert Adapter.load(tmp_path / "d").extra.keys() == ad.extra.keys() and len(ad.extra) > 0
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, Adapter.load(tmp_path / "a"))
    assert rel_err(ours(input_ids=ids).logits, want) < 1e-6
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert rel_err(theirs(input_ids=ids).logits, want) < 1e-5
    again = copy.deepcopy(base)
    lora_ext.inject(again, ["c_attn"], r=4, alpha=8)
    lora_ext.load_adapter(again, sd)
    assert rel_err(again(input_ids=ids).logits, want) < 1e-6


def test_load_adapter_into_a_merged_model(tmp_path):
    """A merged layer takes the new adapter into its weight (exactly, as it was merged); one
    merged for good refuses by name."""
    base, pm, path = peft_adapter(tmp_path, targets=("q_proj", "v_proj"))
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(model)
    randomize_trainable(model, seed=5)
    w0 = {n: m.weight.detach().clone() for n, m in lora_ext.lora_layers(model).items()}
    lora_ext.merge(model)
    lora_ext.load_adapter(model, Adapter.load(path))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5
    assert all(m.merged for m in lora_ext.lora_layers(model).values())
    lora_ext.unmerge(model)
    for n, m in lora_ext.lora_layers(model).items():
        assert torch.equal(m.weight, w0[n]), n
    layer = next(iter(lora_ext.lora_layers(model).values()))
    layer.merge()
    layer.drop_merge_state()
    A, B, s = layer.lora_factors()
    with pytest.raises(ValueError, match="merged for good"):
        layer.set_lora_factors(A, B, s)


def peft_has(field):
    import dataclasses
    if field not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        pytest.skip(f"this PEFT has no LoraConfig.{field}")


@pytest.mark.parametrize("field, value", [("lora_bias", True), ("alora_invocation_tokens", [5, 6]),
                                          ("init_lora_weights", "pissa"), ("init_lora_weights", "olora")])
def test_peft_variants_lora_ext_does_not_run_are_refused(tmp_path, field, value):
    """PEFT computes something else for these (B x + b; LoRA only from the invocation tokens on;
    PiSSA / OLoRA: from_pretrained rewrites the base weights from the initial adapter)."""
    peft_has(field)
    _, _, path = peft_adapter(tmp_path, targets=("q_proj",), **{field: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}=.* is not supported"):
        Adapter.load(path)


@pytest.mark.parametrize("field", ["velora_config", "monteclora_config"])
def test_training_only_variants_load_like_peft(tmp_path, field):
    """VeLoRA / MonteCLoRA change training only; their extra tensors are dropped."""
    peft_has(field)
    base, pm, path = peft_adapter(tmp_path, targets=("q_proj", "v_proj"), **{field: {}})
    ad = Adapter.load(path)
    assert len(ad.layers) == 4 and ad.extra == {}
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, ad)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(ids).logits
        assert rel_err(want, base(ids).logits) > 1e-3
        assert rel_err(ours(ids).logits, want) < 1e-5


def test_every_peft_lora_variant_is_refused_or_known_to_be_plain_lora():
    """A PEFT upgrade with a new variant fails here until adapter_checks.UNSUPPORTED decides on it
    (use_dora: implemented, lora_ext.dora)."""
    import dataclasses

    from lora_ext.adapter_checks import UNSUPPORTED
    fields = {f.name: f.metadata for f in dataclasses.fields(peft.LoraConfig)}
    variants = {n for n, md in fields.items() if md.get("is_lora_variant")}
    assert variants - {f for f, _, _ in UNSUPPORTED} <= {"velora_config", "monteclora_config", "use_dora"}
    assert set(fields["init_lora_weights"].get("lora_variants", [])) <= {"mica"}  # MiCA: plain forward


def test_loaded_adapter_resumes_training_with_its_dropout_and_rslora(tmp_path):
    # load_adapter injected layers with dropout 0 and use_rslora off whatever the config said,
    # so training resumed from a saved adapter ran without its dropout (PEFT's from_pretrained
    # restores both)
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.25, use_rslora=True)
    for m in lora_ext.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    path = os.path.join(tmp_path, "ad")
    Adapter.from_model(model).save(path)
    resumed = tiny_llama()
    lora_ext.load_adapter(resumed, Adapter.load(path))
    lora_ext.mark_only_lora_trainable(model), lora_ext.mark_only_lora_trainable(resumed)
    ours, theirs = lora_ext.lora_layers(model), lora_ext.lora_layers(resumed)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for n, m in theirs.items():
        assert (m.lora_dropout, m.use_rslora, m.lora_alpha, m.scaling) == (0.25, True, 8.0, ours[n].scaling)
    ids = torch.randint(0, 128, (2, 10))
    for m in (model, resumed):
        m.train()
        torch.manual_seed(5)
        m(input_ids=ids, labels=ids).loss.backward()
    for n in ours:
        assert torch.equal(theirs[n].lora_A.grad, ours[n].lora_A.grad), n
        assert torch.equal(theirs[n].lora_B.grad, ours[n].lora_B.grad), n


def test_bad_lora_dropout_is_refused_before_anything_changes(tmp_path):
    _, _, path = peft_adapter(tmp_path, targets=("q_proj",))
    ad = Adapter.load(path)
    ad.config["lora_dropout"] = 1.0
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"lora_dropout=1.0"):
        lora_ext.load_adapter(model, ad)
    assert not lora_ext.lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_wrapped_model_saves_and_loads_under_the_inner_names(tmp_path, wrap):
    # a torch.compile'd (or DDP) model saved its adapter under "_orig_mod." ("module.") names:
    # PeftModel.from_pretrained then loaded nothing (a missing-keys warning, base logits) and
    # load_adapter into a plain model raised
    import torch.distributed as dist

    model = tiny_llama()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(model)
    for m in lora_ext.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    if wrap == "ddp":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.compile(model) if wrap == "compile" else torch.nn.parallel.DistributedDataParallel(model)
        sd = lora_ext.lora_state_dict(wrapped)
        assert sd.keys() == lora_ext.lora_state_dict(model).keys()
        ad = Adapter.from_model(wrapped)
        assert sorted(ad.layers) == sorted(lora_ext.lora_layers(model)) and len(ad.layers) == 4
        ad.save(os.path.join(tmp_path, "ad"))
        # a state dict under the wrapper's own names loads back into it
        own = lora_ext.lora_state_dict(wrapped, peft_names=False)
        assert all(k.startswith("_orig_mod." if wrap == "compile" else "module.") for k in own)
        assert len(lora_ext.load_adapter(wrapped, own)) == 4
        new = tiny_llama()
        with pytest.raises(ValueError, match="already wrapped in DistributedDataParallel") if wrap == "ddp" else \
                contextlib.nullcontext():  # new layers in a DDP model would never be all-reduced
            lora_ext.load_adapter(torch.nn.parallel.DistributedDataParallel(new) if wrap == "ddp" else
                                  torch.compile(new), ad)
    finally:
        if wrap == "ddp":
            dist.destroy_process_group()
    ids = torch.randint(0, 128, (2, 10))
    plain = tiny_llama()
    lora_ext.inject(plain, ["q_proj", "v_proj"], r=4, alpha=8)
    lora_ext.load_adapter(plain, sd)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Found missing adapter keys")  # PEFT's warning
        pm = peft.PeftModel.from_pretrained(tiny_llama(), os.path.join(tmp_path, "ad"))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert rel_err(tiny_llama()(input_ids=ids).logits, want) > 1e-3
        for got in (plain, pm) + ((new,) if wrap == "compile" else ()):
            assert rel_err(got(input_ids=ids).logits, want) < 1e-5
