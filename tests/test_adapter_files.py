"""Hostile or malformed adapter files: every one is refused with a ValueError naming the file and
the field, in bounded time; nothing is accepted silently. Hand-written files (no PEFT needed)."""
import contextlib
import json
import os
import re
import signal
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from lora_ext import Adapter, AdapterPool, LayerWeights, load_adapter
from lora_ext.adapter_checks import PEFT_KEY as _KEY
from lora_ext.targets import pattern_value

CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}


def factors(name="q", r=2, A=None, B=None):
    return {f"base_model.model.{name}.lora_A.weight": torch.randn(r, 4) if A is None else A,
            f"base_model.model.{name}.lora_B.weight": torch.randn(3, r) if B is None else B}


def write(tmp_path, config=None, tensors=None, raw_config=None):
    """An adapter directory; config updates CFG (target_modules: the modules `tensors` hold, as
    PEFT writes it), raw_config replaces the JSON text."""
    d = os.path.join(tmp_path, "ad")
    os.makedirs(d, exist_ok=True)
    tensors = factors() if tensors is None else tensors
    held = sorted({m["path"].rsplit(".", 1)[-1] for m in map(_KEY.match, tensors) if m is not None})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write(raw_config if raw_config is not None else
                json.dumps({**CFG, "target_modules": held or CFG["target_modules"], **(config or {})}))
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    return d


@contextlib.contextmanager
def deadline(seconds):
    """Fails (instead of hanging) when the body runs longer; re's matcher checks for signals."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_valid_file_loads(tmp_path):
    ad = Adapter.load(write(tmp_path, {"rank_pattern": {"q": 2}, "alpha_pattern": {"q": 8}}))
    assert ad.layers["q"].r == 2 and ad.layers["q"].scale == 4.0


# ---------------------------------------------------------------- 7: bounded-time pattern matching
EVIL_KEYS = [r"(a+)+b", r"(a|a)*b", r"(a|aa)+b", r"(a*)*b", r"(\w+\.?)+b", ".*" * 8 + "b", r"(.*a){12}b"]


@pytest.mark.parametrize("key", EVIL_KEYS)
def test_malicious_pattern_key_matches_in_bounded_time(key):
    name = "model." + "a" * 2000
    start = time.perf_counter()
    with deadline(5):
        assert pattern_value(name, {key: 2}, 8) == 8
        assert pattern_value(name + "b", {key: 2}, 8) == 2
    assert time.perf_counter() - start < 1.0


def test_malicious_rank_pattern_in_file_loads_in_bounded_time(tmp_path):
    name = "a" * 60
    d = write(tmp_path, {"rank_pattern": {"(a+)+b": 4}}, factors(name))
    start = time.perf_counter()
    with deadline(5):
        assert Adapter.load(d).layers[name].r == 2
    assert time.perf_counter() - start < 1.0


BENIGN_KEYS = ["q_proj", "q_proj|v_proj", "v_proj|q", r"layers\.0\..*", r"^model\.layers\.1\.self_attn\.q_proj$",
               r"\d\.self_attn\.(q|k)_proj", r"[^.]+_proj", r"[^\d.]_proj", r"\w+\.\w+", r"q_proj{1,2}",
               r"layers\.[01]\.(mlp|self_attn)\..*", r"(.*\.)?q_proj", r"a*?", "", r"\s", r"proj\Z", r"\Aq", r"x|"]
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
         "model.layers.0.mlp.down_proj", "model.embed_tokens", "q_proj", "v_proj", "x", "model.layers.0.self_attn.q_projj"]


@pytest.mark.parametrize("key", BENIGN_KEYS)
def test_pattern_keys_match_like_peft(key):
    for name in NAMES:  # PEFT: peft.utils.other.get_pattern_key
        want = 1 if re.match(rf"(.*\.)?({key})$", name) else 0
        assert pattern_value(name, {key: 1}, 0) == want, (key, name)


@pytest.mark.parametrize("key", [r"(?=q)q", r"(q)\1", r"(?i)Q", r"(?i:Q)", r"\bq", r"(?>q)", r"q++", r"q{100000}",
                                 pytest.param("(" * 5000 + ")" * 5000, id="deep")])
def test_unsupported_pattern_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="rank_pattern"):
        Adapter.load(write(tmp_path, {"rank_pattern": {key: 2}}))


# ---------------------------------------------------------------- 8: malformed config / weights
@pytest.mark.parametrize("raw, field", [("[]", "JSON object"), ("null", "JSON object"), ('"LORA"', "JSON object"),
                                        pytest.param('{"r": ' * 100000 + "2" + "}" * 100000, "nested", id="deep"),
                                        ('{"r": 2, "lora_alpha": 4, "r": 8}', "duplicate key 'r'")])
def test_config_not_an_object(tmp_path, raw, field):
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{field}"):
        Adapter.load(write(tmp_path, raw_config=raw))


@pytest.mark.parametrize("config, field", [
    ({"rank_pattern": {"(": 2}}, "rank_pattern key '\\('"),
    ({"alpha_pattern": {"q[": 2}}, "alpha_pattern key 'q\\['"),
    ({"rank_pattern": ["q"]}, "rank_pattern"),
    ({"rank_pattern": "q"}, "rank_pattern"),
    ({"alpha_pattern": 5}, "alpha_pattern"),
    ({"rank_pattern": {"q": "2"}}, "rank_pattern\\['q'\\]"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern\\['q'\\]"),
    ({"rank_pattern": {"q": 2.5}}, "rank_pattern\\['q'\\]"),
    ({"rank_pattern": {"q": True}}, "rank_pattern\\['q'\\]"),
    ({"r": True}, "r must"),
    ({"r": 2.0}, "r must"),
])
def test_bad_patterns_name_file_and_field(tmp_path, config, field):
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{field}"):
        Adapter.load(write(tmp_path, config))


@pytest.mark.parametrize("tensors, field", [
    (factors(A=torch.tensor(1.0)), "lora_A"),
    (factors(r=0), "r > 0"),
    (factors(A=torch.randn(2, 4, 1)), "lora_A"),
])
def test_bad_tensor_shapes(tmp_path, tensors, field):
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors.*'q'.*{field}"):
        Adapter.load(write(tmp_path, {"rank_pattern": {"q": 2}}, tensors))


def test_rank_zero_via_rank_pattern_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_config.json.*rank_pattern\['q'\]"):
        Adapter.load(write(tmp_path, {"rank_pattern": {"q": 0}}, factors(r=0)))


@pytest.mark.parametrize("obj", [[1, 2], torch.ones(2), None, {"base_model.model.q.lora_A.weight": [1.0]}, {3: torch.ones(2)}])
def test_pickle_holding_non_tensor_dict(tmp_path, obj):
    d = write(tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    torch.save(obj, os.path.join(d, "adapter_model.bin"))
    with pytest.raises(ValueError, match="adapter_model.bin"):
        Adapter.load(d, allow_pickle=True)


# ---------------------------------------------------------------- 9: values accepted silently
@pytest.mark.parametrize("config, field", [
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"alpha_pattern": {"q": float("nan")}}, "alpha_pattern\\['q'\\]"),
    ({"alpha_pattern": {"q": float("-inf")}}, "alpha_pattern\\['q'\\]"),
    ({"use_rslora": "false"}, "use_rslora"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"use_dora": "false"}, "use_dora"),
])
def test_bad_values_name_file_and_field(tmp_path, config, field):
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{field}"):
        Adapter.load(write(tmp_path, config))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8, torch.float8_e4m3fn, torch.complex64])
def test_non_float_weights_are_refused(tmp_path, dtype):
    t = factors()
    t["base_model.model.q.lora_B.weight"] = torch.ones(3, 2).to(dtype)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors.*q.lora_B.weight.*{str(dtype).split('.')[1]}"):
        Adapter.load(write(tmp_path, tensors=t))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_unless_allowed(tmp_path, bad):
    t = factors()
    t["base_model.model.q.lora_A.weight"][1, 2] = bad
    d = write(tmp_path, tensors=t)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*q.lora_A.weight.*allow_nonfinite=True"):
        Adapter.load(d)
    A = Adapter.load(d, allow_nonfinite=True).layers["q"].A
    assert not torch.isfinite(A).all()


def test_duplicate_key_in_safetensors_header(tmp_path):
    d = write(tmp_path)
    data = torch.arange(2, dtype=torch.float32).numpy().tobytes()
    header = ('{"base_model.model.q.lora_A.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              '"base_model.model.q.lora_A.weight":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}').encode()
    header += b" " * (-len(header) % 8)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*duplicate key 'base_model.model.q.lora_A.weight'"):
        Adapter.load(d)


# ---------------------------------------------------------------- LoRA variants lora_ext does not run
@pytest.mark.parametrize("field, value, default", [
    ("init_lora_weights", "pissa", True), ("init_lora_weights", "pissa_niter_4", "gaussian"),
    ("init_lora_weights", "olora", "eva"), ("init_lora_weights", "corda", "mica"),
    ("init_lora_weights", "loftq", "lora_ga"), ("lora_bias", True, False), ("alora_invocation_tokens", [5, 6], None),
    ("use_qalora", True, False), ("layer_replication", [[0, 1]], None),
    ("trainable_token_indices", [1], None), ("arrow_config", {}, None), ("kasa_config", {}, None),
    ("use_bdlora", {}, None),
])
def test_unsupported_variants_name_file_and_field(tmp_path, field, value, default):
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}=.* is not supported"):
        Adapter.load(write(tmp_path, {field: value}))
    assert Adapter.load(write(tmp_path, {field: default})).layers["q"].r == 2


def test_lora_B_bias_is_refused_not_read_as_an_adapter_name(tmp_path):
    t = factors() | {"base_model.model.q.lora_B.bias": torch.randn(3)}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: base_model.model.q.lora_B.bias is not "
                                         r"supported.*lora_bias"):
        Adapter.load(write(tmp_path, tensors=t))
    t = {k.replace(".weight", ".bias.weight"): v for k, v in factors().items()}  # an adapter named "bias"
    assert Adapter.load(write(tmp_path, tensors=t)).layers["q"].r == 2


def test_training_only_tensors_are_dropped(tmp_path):
    t = factors() | {"base_model.model.q.lora_velora_embed": torch.randn(4),
                     "base_model.model.q.lora_monteclora_sampler.std_prior": torch.randn(2)}
    ad = Adapter.load(write(tmp_path, {"velora_config": {}}, tensors=t))
    assert list(ad.layers) == ["q"] and ad.extra == {}


# ---------------------------------------------------------------- 9: the one PEFT config builder
ODD_NAMES = {"h.0.attn": 4, "h.0.attn.c_proj": 2, "blocks.a+b.proj": 3, "x(1).fc": 4, "layer-1.q_proj": 1,
             "model.layers.0.self_attn.q_proj": 2}


def test_peft_config_round_trips_through_peft_and_load(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    from lora_ext.targets import name_regex, peft_config
    alphas = {n: 2.0 * r for n, r in ODD_NAMES.items()} | {"blocks.a+b.proj": 5.0}
    config = peft_config(ODD_NAMES, alphas)
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["rank_pattern"]) == {name_regex(n) for n, r in ODD_NAMES.items() if r != 4}
    assert name_regex("blocks.a+b.proj") == r"^blocks\.a\+b\.proj$"  # re.escape, as PEFT's own conversions
    d = os.path.join(tmp_path, "rt")
    cfg = peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    cfg.save_pretrained(d)
    cfg = peft.LoraConfig.from_pretrained(d)
    assert cfg.rank_pattern == config["rank_pattern"] and cfg.alpha_pattern == config["alpha_pattern"]
    for name, r in ODD_NAMES.items():  # PEFT picks the same rank and alpha for every module
        key = get_pattern_key(cfg.rank_pattern.keys(), name)
        assert cfg.rank_pattern.get(key, cfg.r) == r, name
        key = get_pattern_key(cfg.alpha_pattern.keys(), name)
        assert cfg.alpha_pattern.get(key, cfg.lora_alpha) == alphas[name], name
    tensors = {}
    for name, r in ODD_NAMES.items():
        tensors |= factors(name, r, A=torch.randn(r, 4), B=torch.randn(3, r))
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    ad = Adapter.load(d)
    assert {n: w.r for n, w in ad.layers.items()} == ODD_NAMES
    assert {n: w.scale for n, w in ad.layers.items()} == {n: alphas[n] / r for n, r in ODD_NAMES.items()}


def test_from_model_and_combine_write_pattern_keys_alike():
    from torch import nn

    import lora_ext
    from lora_ext.targets import name_regex
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    lora_ext.inject(model, ["0", "1", "2"], r=4, alpha=4, rank_pattern={"^1$": 2}, alpha_pattern={"^1$": 2})
    ad = Adapter.from_model(model)
    assert ad.config["rank_pattern"] == {name_regex("1"): 2} == ad.config["alpha_pattern"]
    both = lora_ext.combine([ad, ad], how="cat")  # ranks 8, 4, 8
    assert both.config["rank_pattern"] == {name_regex("1"): 4} == both.config["alpha_pattern"]
    assert both.config["r"] == both.config["lora_alpha"] == 8


# ---------------------------------------------------------------- alpha of any sign; scales finite in float32
@pytest.mark.parametrize("config, scale", [
    ({"lora_alpha": 0}, 0.0), ({"lora_alpha": -8}, -4.0), ({"alpha_pattern": {"q": -2.5}}, -1.25),
    ({"lora_alpha": -8, "use_rslora": True}, -8 / 2 ** 0.5),
    ({"lora_alpha": 6e38}, 3e38), ({"alpha_pattern": {"q": -6e38}}, -3e38),  # large, still finite in float32
])
def test_alpha_of_any_sign_and_large_finite_scales_load(tmp_path, config, scale):
    """PEFT takes any lora_alpha / alpha_pattern value (scaling alpha / r, 0 or negative too)."""
    assert Adapter.load(write(tmp_path, config)).layers["q"].scale == pytest.approx(scale)


@pytest.mark.parametrize("config, scale, field", [
    ({"lora_alpha": 1e39}, "5e\\+38", "lora_alpha=1e\\+39 / r"),
    ({"alpha_pattern": {"q": -1e300}}, "-5e\\+299", "alpha_pattern\\['q'\\]=-1e\\+300 / r"),
    ({"lora_alpha": 1e39, "use_rslora": True}, "7.07107e\\+38", "lora_alpha=1e\\+39 / sqrt\\(r\\)"),
])
def test_scale_not_finite_in_float32_names_file_module_and_field(tmp_path, config, scale, field):
    d = write(tmp_path, config)
    want = rf"adapter_config.json: module 'q' has scale {scale} \({field}, r=2\), which is not finite in float32"
    with pytest.raises(ValueError, match=want):
        Adapter.load(d)
    pool = AdapterPool(torch.nn.Sequential(torch.nn.Linear(4, 3)), target_modules=["0"], max_rank=4)
    with pytest.raises(ValueError, match=r"adapter_config.json: module 'q' has scale"):
        pool.load("a", d)
    assert pool.names() == []


def test_load_adapter_refuses_an_adapter_object_whose_scale_overflows_float32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad = Adapter({"0": LayerWeights(torch.randn(2, 4), torch.randn(3, 2), 1e39)}, name="mine")
    with pytest.raises(ValueError, match=r"load_adapter: adapter mine: module '0' has scale 1e\+39 \(LayerWeights.scale\).*float32"):
        load_adapter(model, ad)
    assert isinstance(model[0], torch.nn.Linear) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- bias / modules_to_save values PEFT refuses
@pytest.mark.parametrize("value", ["some", "NONE", None, 1, True, ["all"]])
def test_bias_mode_peft_does_not_implement_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"adapter_config.json: bias=.* is not one of 'none', 'all', 'lora_only'"):
        Adapter.load(write(tmp_path, {"bias": value}))


@pytest.mark.parametrize("config", [{}, {"bias": "none"}, {"bias": "all"}, {"bias": "lora_only"},
                                    {"modules_to_save": None}, {"modules_to_save": ["lm_head", "score"]}])
def test_bias_modes_and_modules_to_save_peft_reads_load(tmp_path, config):
    assert Adapter.load(write(tmp_path, config)).layers["q"].r == 2


@pytest.mark.parametrize("value", ["lm_head", [""], ["lm_head", 3], {"lm_head": 1}, 5])
def test_modules_to_save_not_a_list_of_names_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"adapter_config.json: modules_to_save must be a list of module names"):
        Adapter.load(write(tmp_path, {"modules_to_save": value}))
