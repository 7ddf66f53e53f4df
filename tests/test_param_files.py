"""Adapter files of LoRA on parameters (PEFT's target_parameters / ParamWrapper; lora_ext.LoRAParameter,
lora_ext.param_files): PEFT's files load into lora_ext and give PEFT's logits, lora_ext's files load
into PEFT (PeftModel.from_pretrained) and give the same logits; MoE expert stacks, 2-D and transposed
parameters, nested wrappers, patterns, bf16; bad files and models raise naming the file and the key."""
import copy
import json
import os
import warnings

import pytest
import torch
from models import tiny_qwen3_moe
from safetensors.torch import load_file, save_file
from torch import nn

import lora_ext
from lora_ext import Adapter, LoRAParameter, load_adapter
from lora_ext.inject import peft_parameter_layers

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
PREFIX = "base_model.model."


def randomize(model, seed=1, std=0.1):
    """Non-zero LoRA factors, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def logits(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS).logits


def peft_saved(path, base, **cfg):
    """A PEFT adapter of ``base`` (a copy) saved to ``path``; returns its logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        randomize(pm)
        pm.save_pretrained(path)
    return logits(pm.eval())


def peft_loaded(path, base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_moe()


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory):
    """PEFT adapter: q_proj (target_modules) and both expert stacks (target_parameters)."""
    d = tmp_path_factory.mktemp("mixed") / "ad"
    return d, peft_saved(d, base, r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)


@pytest.fixture(scope="module")
def patterns(base, tmp_path_factory):
    """Parameters only, rsLoRA, and rank / alpha patterns telling gate_up_proj and down_proj apart."""
    d = tmp_path_factory.mktemp("patterns") / "ad"
    return d, peft_saved(d, base, r=4, lora_alpha=8, target_modules=[], use_rslora=True, target_parameters=EXPERTS,
                         rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 16})


def close(a, b, tol=1e-5):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------- PEFT -> lora_ext
def test_peft_file_loads_with_peft_logits(base, mixed):
    d, want = mixed
    ad = Adapter.load(d)
    kinds = {n: (w.kind, w.parameter, w.num_experts, w.r, w.scale) for n, w in ad.layers.items()}
    # two targets on one experts module: which wrapper holds which is the model's (registration) order
    assert kinds["model.layers.0.mlp.experts.base_layer"] == ("parameter", None, 4, 4, 2.0)
    assert kinds["model.layers.1.mlp.experts"] == ("parameter", None, 4, 4, 2.0)
    assert kinds["model.layers.0.self_attn.q_proj"][:1] == ("linear",)
    named = Adapter.load(d, model=base).layers
    assert named["model.layers.0.mlp.experts.base_layer"].parameter == "gate_up_proj"
    assert named["model.layers.0.mlp.experts"].parameter == "down_proj"
    assert tuple(named["model.layers.0.mlp.experts"].A.shape) == (4 * 4, 32)
    model = copy.deepcopy(base)
    loaded = load_adapter(model, d)
    assert "model.layers.1.mlp.experts.base_layer" in loaded and "model.layers.1.self_attn.q_proj" in loaded
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAParameter) and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj" and experts.r == 4 and experts.scaling == 2.0
    close(logits(model), want)
    assert set(lora_ext.lora_state_dict(model)) == set(load_file(os.path.join(d, "adapter_model.safetensors")))


def test_patterns_need_the_model_and_load_with_it(base, patterns, tmp_path):
    d, want = patterns
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*decided by the model's parameter order.*"
                                         r"Adapter.load\(path, model=model\)"):
        Adapter.load(d)
    ad = Adapter.load(d, model=base)
    up, down = ad.layers["model.layers.1.mlp.experts.base_layer"], ad.layers["model.layers.1.mlp.experts"]
    assert (up.parameter, up.r, up.scale) == ("gate_up_proj", 4, pytest.approx(16 / 2))  # rsLoRA: alpha / sqrt(r)
    assert (down.parameter, down.r, down.scale) == ("down_proj", 2, pytest.approx(8 / 2 ** 0.5))
    model = copy.deepcopy(base)
    load_adapter(model, d)
    close(logits(model), want)
    # and back: parameters only -> target_modules [] (None would make PEFT add its default modules)
    Adapter.from_model(model).save(tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["use_rslora"] is True
    assert sorted(cfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    close(logits(peft_loaded(tmp_path / "back", base)), want)


def test_load_into_wrappers_sets_factors_and_resizes(base, mixed):
    d, want = mixed
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["q_proj"], r=2, alpha=4, target_parameters=EXPERTS)
    lora_ext.mark_only_lora_trainable(model)
    load_adapter(model, d)
    experts = model.model.layers[1].mlp.experts
    assert experts.r == 4 and tuple(experts.lora_A.shape) == (16, 32) and experts.lora_A.requires_grad
    assert not experts.base_layer.base_layer.gate_up_proj.requires_grad
    close(logits(model), want)
    # state dicts: PEFT names and the model's own, into a model with wrappers of that rank
    other = copy.deepcopy(base)
    lora_ext.inject(other, ["q_proj"], r=4, alpha=8, target_parameters=EXPERTS)
    load_adapter(other, lora_ext.lora_state_dict(model))
    close(logits(other), want)
    lora_ext.inject(third := copy.deepcopy(base), ["q_proj"], r=4, alpha=8, target_parameters=EXPERTS)
    load_adapter(third, lora_ext.lora_state_dict(model, peft_names=False))
    close(logits(third), want)


def test_bf16_model_both_ways(tmp_path):
    base16 = tiny_qwen3_moe(dtype=torch.bfloat16)
    want = peft_saved(tmp_path / "p", base16, r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = copy.deepcopy(base16)
    load_adapter(model, tmp_path / "p")
    assert model.model.layers[0].mlp.experts.lora_A.dtype == torch.bfloat16
    got = logits(model)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    Adapter.from_model(model).save(tmp_path / "l")
    back = logits(peft_loaded(tmp_path / "l", base16))
    assert ((back.float() - got.float()).norm() / got.float().norm()).item() < 1e-2


# ---------------------------------------------------------------- lora_ext -> PEFT
def test_lora_ext_file_loads_in_peft(base, mixed, tmp_path):
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["q_proj"], r=4, alpha=8, target_parameters=EXPERTS)
    randomize(model, seed=5)
    ad = Adapter.from_model(model)
    assert ad.layers["model.layers.0.mlp.experts.base_layer"].parameter == "gate_up_proj"
    ad.save(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == set(load_file(mixed[0] / "adapter_model.safetensors"))  # PEFT's own keys
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"] and cfg["lora_dropout"] == 0.0 and cfg["r"] == 4
    close(logits(peft_loaded(tmp_path, base)), logits(model))


def test_wrappers_injected_in_two_calls_are_saved_in_peft_nesting(base, tmp_path):
    """inject(down_proj) then inject(gate_up_proj) nests gate_up_proj outside; PEFT nests it inside."""
    model = copy.deepcopy(base)
    lora_ext.inject(model, target_parameters=["mlp.experts.down_proj"], r=2, alpha=4)
    lora_ext.inject(model, target_parameters=["mlp.experts.gate_up_proj"], r=4, alpha=8)
    randomize(model, seed=6)
    assert model.model.layers[0].mlp.experts.parameter_name == "gate_up_proj"
    assert peft_parameter_layers(model)["model.layers.0.mlp.experts.base_layer"].parameter_name == "gate_up_proj"
    want = logits(model)
    Adapter.from_model(model).save(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["rank_pattern"].values()) == {2}  # down_proj's, by full parameter name
    close(logits(peft_loaded(tmp_path, base)), want)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)  # PEFT's nesting here
    close(logits(fresh), want)
    load_adapter(model, tmp_path)  # the model's own nesting: matched by parameter
    load_adapter(model, lora_ext.lora_state_dict(fresh))
    close(logits(model), want)


class Stack(nn.Module):
    """A transposed expert stack ([E, in, out], is_transposed) and a plain 2-D weight."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 6, 5) / 3)
        self.proj = nn.Parameter(torch.randn(4, 5) / 3)

    def forward(self, x):
        return torch.einsum("bi,eio->bo", x, self.w) @ self.proj.T


def test_transposed_and_2d_parameters_both_ways(tmp_path):
    base = nn.Sequential(Stack())
    x = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                       target_parameters=["0.w", "0.proj"]))
    randomize(pm)
    pm.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        want = pm(x)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "p")
    w = peft_parameter_layers(model)
    assert (w["0.base_layer"].parameter_name, w["0.base_layer"].transposed, w["0"].num_experts) == ("w", True, 1)
    with torch.no_grad():
        close(model(x), want)
    Adapter.from_model(model).save(tmp_path / "l")
    with torch.no_grad():
        close(peft_loaded(tmp_path / "l", base)(x), want)
    bad = Adapter.load(tmp_path / "l")  # swap in / out of the transposed stack's factors
    lw = bad.layers["0.base_layer"]
    lw.A, lw.B = torch.zeros(3 * 2, 5), torch.zeros(6, 3 * 2)
    with pytest.raises(ValueError, match=r"load_adapter: .*'0.base_layer'.*parameter 0.w \[3, 6, 5\] is 3 expert\(s\) "
                                         r"x 6 -> 5, so its factors must be lora_A \[3 \* r, 6\]"):
        load_adapter(copy.deepcopy(base), bad)


# ---------------------------------------------------------------- bad files
def _tamper(src, dst, config=None, drop=(), add=None, change=None):
    """A copy of adapter ``src`` with config fields updated, keys dropped (by substring), added or changed."""
    os.makedirs(dst, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in load_file(src / "adapter_model.safetensors").items() if not any(s in k for s in drop)}
    save_file(t | (add or {}) | {k: f(t[k]) for k, f in (change or {}).items()}, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("field, value", [("lora_dropout", 0.1), ("use_dora", True), ("fan_in_fan_out", True),
                                          ("velora_config", {}), ("lora_bias", True)])
def test_fields_peft_refuses_with_target_parameters(mixed, tmp_path, field, value):
    d = _tamper(mixed[0], tmp_path / "ad", {field: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}=.*(target_parameters|not supported)"):
        Adapter.load(d)
    _tamper(mixed[0], tmp_path / "ad", {field: value, "target_parameters": None},
            drop=("experts",))  # the same field without target_parameters: PEFT's LoRA layers take it
    if field in ("lora_dropout", "fan_in_fan_out", "velora_config"):
        Adapter.load(tmp_path / "ad")


def test_bad_target_parameters_field(mixed, tmp_path):
    with pytest.raises(ValueError, match=r"adapter_config.json: target_parameters must be a list of parameter names"):
        Adapter.load(_tamper(mixed[0], tmp_path / "ad", {"target_parameters": "mlp.experts.gate_up_proj"}))


def test_missing_and_extra_keys_are_named(base, mixed, tmp_path):
    src = mixed[0]
    with pytest.raises(ValueError, match=r"config says target_parameters=.*no LoRA factors of parameters"):
        Adapter.load(_tamper(src, tmp_path / "a", drop=("experts",)))
    # layer 1's experts missing: only the model tells
    d = _tamper(src, tmp_path / "b", drop=("layers.1.mlp.experts",))
    Adapter.load(d)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*selects model.layers.1.mlp.experts.gate_up_proj in "
                                         r"Qwen3MoeForCausalLM, but the adapter holds no LoRA factors for it"):
        load_adapter(model, d)
    assert not lora_ext.lora_layers(model) and not peft_parameter_layers(model)  # untouched
    with pytest.raises(ValueError, match=r"load_adapter: adapter b: .*selects model.layers.1.mlp.experts.gate_up_proj"):
        load_adapter(model, Adapter.load(d))
    # the outer wrapper's factors missing: depth 1 without depth 0
    d = _tamper(src, tmp_path / "c", drop=("layers.0.mlp.experts.lora_",))
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts.base_layer.lora_A.weight has no matching parameter.*"
                                         r"depths \[1\]"):
        Adapter.load(d)
    # a third wrapper on a module with two targeted parameters
    extra = {f"{PREFIX}model.layers.0.mlp.experts.base_layer.base_layer.lora_{x}.weight": torch.zeros(s)
             for x, s in (("A", (16, 64)), ("B", (64, 16)))}
    d = _tamper(src, tmp_path / "d", add=extra)
    with pytest.raises(ValueError, match=r"base_layer.base_layer.lora_A.weight has no matching parameter: .*3 nested"):
        Adapter.load(d)
    with pytest.raises(ValueError, match=r"selects 2 of its parameters \(\['gate_up_proj', 'down_proj'\]\), but the "
                                         r"adapter holds 3"):
        load_adapter(copy.deepcopy(base), d)


def test_shapes_that_do_not_fit_are_named(base, mixed, tmp_path):
    key = f"{PREFIX}model.layers.1.mlp.experts.lora_A.weight"  # down_proj: [4 * 4, 32]
    d = _tamper(mixed[0], tmp_path / "a", change={key: lambda t: t[:10]})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*lora_B"):  # A and B ranks disagree
        Adapter.load(d)
    d = _tamper(mixed[0], tmp_path / "b", change={key: lambda t: t[:, :16].contiguous()})
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj \[4, 64, 32\] is 4 expert\(s\) "
                                         r"x 32 -> 64, so its factors must be lora_A \[4 \* r, 32\].*A \(16, 16\)"):
        load_adapter(model, d)
    assert not lora_ext.lora_layers(model)  # q_proj not injected either
    # rows that are no whole number of experts' blocks under the config's r
    d = _tamper(mixed[0], tmp_path / "c", {"r": 3, "target_modules": []}, drop=("q_proj",))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*experts.*lora_A.weight has 16 rows, not a "
                                         r"multiple of the rank the config says \(r=3\)"):
        Adapter.load(d)


def test_model_mismatches_are_named(base, mixed):
    d = mixed[0]
    with pytest.raises(ValueError, match=r"the model has no module 'model.layers.0.mlp.experts'"):
        load_adapter(tiny_qwen3_moe(layers=1).model.layers[0], d)  # a decoder layer, not the model
    model = copy.deepcopy(base)
    lora_ext.inject(model, target_parameters=EXPERTS, r=4, alpha=8)
    lora_ext.merge(model)
    for w in lora_ext.param_lora.parameter_layers(model).values():
        w.drop_merge_state()
    with pytest.raises(ValueError, match=r"load_adapter: adapter ad: module 'model.layers.0.mlp.experts' \(LoRAParameter "
                                         r"'down_proj'\) is merged for good \(drop_merge_state"):
        load_adapter(model, d)
    ad = Adapter.load(d)
    ad.layers["model.layers.0.mlp.experts"].parameter = "gate_up_proj"  # PEFT puts down_proj there
    with pytest.raises(ValueError, match=r"experts.lora_A.weight is model.layers.0.mlp.experts.gate_up_proj's, but "
                                         r"at that nesting depth PEFT puts model.layers.0.mlp.experts.down_proj"):
        load_adapter(copy.deepcopy(base), ad)
    other = copy.deepcopy(base)
    lora_ext.inject(other, ["q_proj"], target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match=r"model's LoRAParameter wrappers there hold 1 of its parameters"):
        load_adapter(other, d)


def test_from_model_refuses_what_peft_refuses_with_parameters(base):
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["q_proj"], r=4, dropout=0.1)
    lora_ext.inject(model, target_parameters=EXPERTS, r=4)
    with pytest.raises(ValueError, match=r"Adapter.from_model: LoRA layer 'model.layers.0.self_attn.q_proj' needs "
                                         r"lora_dropout=0.1 .*PEFT refuses with target_parameters"):
        Adapter.from_model(model)
    with pytest.raises(ValueError, match=r"modules_to_save=\['experts'\] matched no module"):
        Adapter.from_model(_params_only(base), modules_to_save=["experts"])
    with pytest.raises(ValueError, match=r"Adapter.from_model: LoRAParameter 'weight' wraps the model itself.*top-level"):
        Adapter.from_model(LoRAParameter(nn.Linear(4, 4), "weight", r=2))


def _params_only(base):
    model = copy.deepcopy(base)
    lora_ext.inject(model, target_parameters=EXPERTS, r=2)
    return model


# ---------------------------------------------------------------- training and the rest of the package
def test_lora_parameters_train_and_save_adapter_writes_them(base, tmp_path):
    from lora_ext.distributed import lora_parameters, save_adapter

    model = _params_only(base)
    lora_ext.inject(model, ["q_proj"], r=2)
    lora_ext.mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.experts.base_layer.lora_A" in trainable
    assert all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert model.model.layers[0].mlp.experts.lora_B.abs().sum() > 0
    save_adapter(model, tmp_path / "s")
    Adapter.from_model(model).save(tmp_path / "f")
    assert (tmp_path / "s" / "adapter_config.json").read_text() == (tmp_path / "f" / "adapter_config.json").read_text()
    a, b = load_file(tmp_path / "s" / "adapter_model.safetensors"), load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fsdp_case(rank, world, out_dir):
    """One SGD step of a q_proj + expert-stack LoRA under fully_shard_lora, each rank on its row."""
    from lora_ext.distributed import fully_shard_lora, lora_parameters, save_adapter

    model = _trainable()
    fully_shard_lora(model)
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    model(input_ids=IDS[rank:rank + 1], labels=IDS[rank:rank + 1]).loss.backward()
    opt.step()
    save_adapter(model, os.path.join(out_dir, "fsdp"))
    return type(lora_parameters(model)[-1]).__name__


def _trainable():
    model = tiny_qwen3_moe()
    lora_ext.inject(model, ["q_proj"], r=2, alpha=4, target_parameters=EXPERTS)
    randomize(model, seed=7)
    lora_ext.mark_only_lora_trainable(model)
    return model.train()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp2_trains_and_saves_parameter_lora(tmp_path):
    import dist_helpers
    from lora_ext.distributed import lora_parameters

    assert dist_helpers.spawn(__name__, "_fsdp_case", 2, str(tmp_path)) == ["DTensor", "DTensor"]
    ref = _trainable()
    opt = torch.optim.SGD(lora_parameters(ref), lr=0.5)
    ref(input_ids=IDS, labels=IDS).loss.backward()  # the mean over both rows: FSDP's averaged gradients
    opt.step()
    got, want = Adapter.load(tmp_path / "fsdp"), Adapter.from_model(ref)
    assert got.config == want.config and got.layers.keys() == want.layers.keys()
    for name, w in want.layers.items():
        close(got.layers[name].A, w.A)
        close(got.layers[name].B, w.B)
    assert not torch.equal(want.layers["model.layers.0.mlp.experts"].B, Adapter.from_model(_trainable()).layers[
        "model.layers.0.mlp.experts"].B)  # the step changed the experts' factors
