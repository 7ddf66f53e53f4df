"""Fuzzed adapter files (issue: nothing silent): byte-level safetensors corruption, config JSON of
every type, pickles holding odd tensors, wrong arguments. Every bad input raises ValueError /
TypeError / FileNotFoundError naming the file (or argument) and the field, in bounded time, and a
load that fails leaves the model / pool as it was."""
import json
import os
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_ext
from lora_ext import Adapter, AdapterPool, load_adapter

from test_adapter_files import CFG, deadline, factors, write

OK = (ValueError, TypeError, KeyError, FileNotFoundError)


def write_raw(tmp_path, raw: bytes) -> str:
    d = write(tmp_path)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(raw)
    return d


def st_file(header, data=b"", hlen=None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def header(**over):
    A = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
    B = {"dtype": "F32", "shape": [3, 2], "data_offsets": [32, 56]}
    for k, v in over.items():
        (A if k.startswith("A_") else B)[k[2:]] = v
    return {"base_model.model.q.lora_A.weight": A, "base_model.model.q.lora_B.weight": B}


D = bytes(56)
CORRUPT = {
    "empty": b"", "short": b"\x01\x02\x03", "hlen0": struct.pack("<Q", 0),
    "hlen_2^63": st_file(header(), D, hlen=2**63), "hlen_max": st_file(header(), D, hlen=2**64 - 1),
    "hlen_1e9": st_file(header(), D, hlen=10**9), "hlen_short": st_file(header(), D, hlen=8),
    "truncated_data": st_file(header(), D[:40]), "trailing_data": st_file(header(), D + bytes(8)),
    "json_bad": st_file(b"{not json}", D), "json_list": st_file(b"[1,2]", D), "json_null": st_file(b"null", D),
    "name_not_utf8": st_file(b'{"\xff\xfe": {"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', D),
    "name_surrogate": st_file(b'{"\\ud800": {"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', D),
    "offsets_out_of_range": st_file(header(B_data_offsets=[32, 1000]), D),
    "offsets_reversed": st_file(header(B_data_offsets=[56, 32]), D),
    "offsets_overlap": st_file(header(B_data_offsets=[0, 24]), D),
    "offsets_negative": st_file(header(B_data_offsets=[-8, 16]), D),
    "offsets_vs_shape": st_file(header(B_shape=[3, 3]), D),
    "offsets_strings": st_file(header(B_data_offsets=["32", "56"]), D),
    "dtype_I4": st_file(header(B_dtype="I4"), D), "dtype_E8M0": st_file(header(B_dtype="E8M0"), D),
    "dtype_F8_E4M3": st_file(header(B_dtype="F8_E4M3", B_data_offsets=[32, 38]), D[:38]),
    "dtype_F4": st_file(header(B_dtype="F4", B_data_offsets=[32, 35]), D[:35]),
    "dtype_F6": st_file(header(B_dtype="F6_E2M3", B_data_offsets=[32, 37]), D[:37]),
    "dtype_unknown": st_file(header(B_dtype="WAT"), D), "dtype_number": st_file(header(B_dtype=3), D),
    "shape_huge": st_file(header(B_shape=[2**40, 2**40]), D),
    "shape_overflow": st_file(header(B_shape=[2**32, 2**32, 4], B_dtype="U8", B_data_offsets=[32, 32]), D),
    "shape_negative": st_file(header(B_shape=[-3, 2]), D),
    "shape_huge_zero_size": st_file(header(A_shape=[2**62, 0], A_data_offsets=[0, 0], B_data_offsets=[0, 24]), D[:24]),
    "shape_scalar": st_file(header(A_shape=[], A_data_offsets=[0, 4], B_data_offsets=[4, 28]), D[:28]),
    "rank_zero": st_file(header(A_shape=[0, 4], A_data_offsets=[0, 0], B_shape=[3, 0], B_data_offsets=[0, 0])),
    "metadata_not_str": st_file({**header(), "__metadata__": {"a": 1}}, D),
    "unaligned": st_file(header(A_data_offsets=[2, 34], B_data_offsets=[34, 58]), bytes(58)),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_safetensors_bytes_name_the_file(tmp_path, name):
    d = write_raw(tmp_path, CORRUPT[name])
    with deadline(5), pytest.raises(ValueError, match=r"adapter_model.safetensors"):
        Adapter.load(d)


def test_weights_path_that_is_no_regular_file(tmp_path):
    d = write(tmp_path)
    st = os.path.join(d, "adapter_model.safetensors")
    os.remove(st)
    for make in (os.mkdir, os.mkfifo, lambda p: os.symlink(p, p)):  # a directory, a FIFO (no hang), a loop
        make(st)
        with deadline(5), pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors"):
            Adapter.load(d)
        (os.rmdir if os.path.isdir(st) and not os.path.islink(st) else os.remove)(st)


# ---------------------------------------------------------------- config JSON
@pytest.mark.parametrize("config, field", [
    ({"lora_alpha": 10**400}, "lora_alpha"),  # a JSON int beyond float: OverflowError in math.isfinite
    ({"alpha_pattern": {"q": 10**400}}, r"alpha_pattern\['q'\]"),
    ({"lora_alpha": -(10**400)}, "lora_alpha"),
])
def test_config_ints_beyond_float_name_file_and_field(tmp_path, config, field):
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} must be a finite number"):
        Adapter.load(write(tmp_path, config))


@pytest.mark.parametrize("p", ["0.1", -0.1, 1.0, 5, float("nan"), float("inf"), True, [0.1], {}])
def test_bad_lora_dropout_is_refused_by_adapter_load_and_pool(tmp_path, p):
    d = write(tmp_path, {"lora_dropout": p})
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_dropout=.*expected a number in \[0, 1\)"):
        Adapter.load(d)
    pool = AdapterPool(torch.nn.Sequential(torch.nn.Linear(4, 3)), target_modules=["0"], max_rank=4)
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_dropout"):
        pool.load("a", d)
    assert pool.names() == []


@pytest.mark.parametrize("p", [None, 0, 0.0, 0.5, 0.99])
def test_good_lora_dropout_loads(tmp_path, p):
    assert Adapter.load(write(tmp_path, {"lora_dropout": p})).layers["q"].r == 2


FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias",
          "modules_to_save", "layers_to_transform", "layers_pattern", "peft_type", "task_type", "lora_dropout",
          "base_model_name_or_path", "use_dora", "init_lora_weights", "lora_bias", "exclude_modules", "revision",
          "inference_mode", "layer_replication", "use_qalora", "target_parameters", "kasa_config", "an_unknown_key"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 10**400, -(10**400)]),
                    st.floats(), st.text(max_size=6), st.sampled_from(["q", "LORA", "(", "none", "all", "pissa"]))
VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
    st.one_of(st.text(max_size=4), st.sampled_from(["q", "^q$", "(q)", "(a+)+b"])), c, max_size=3)), max_leaves=6)


@settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck))
@given(over=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4), keep_base=st.booleans())
def test_fuzzed_config_loads_or_names_the_file(tmp_path_factory, over, keep_base):
    """Any JSON object: Adapter.load returns an adapter whose every number is usable, or raises
    ValueError naming adapter_config.json (or the weights, for a rank they disagree on) (wrong-type fields it does not read are ignored, as PEFT
    ignores unknown keys)."""
    d = write(tmp_path_factory.mktemp("c"), raw_config=json.dumps((CFG if keep_base else {}) | over))
    try:
        with deadline(5):
            ad = Adapter.load(d)
    except ValueError as e:
        # config fields, or a rank the weights disagree with (named with the weights file)
        assert re.search(r"adapter_config.json[: ]|adapter_model.safetensors: .*config says", str(e)), str(e)
        return
    w = ad.layers["q"]
    assert w.r == 2 and abs(w.scale) <= torch.finfo(torch.float32).max  # any sign, as PEFT
    assert 0.0 <= (ad.config.get("lora_dropout") or 0.0) < 1.0


# ---------------------------------------------------------------- pickles holding odd tensors
@pytest.mark.parametrize("make, what", [
    (lambda: torch.randn(2, 4).to_sparse(), "sparse_coo"),
    (lambda: torch.randn(2, 4).to_sparse_csr(), "sparse_csr"),
    (lambda: torch.empty(2, 4, device="meta"), "meta tensor"),
])
def test_pickled_sparse_or_meta_tensor_is_refused(tmp_path, make, what):
    d = write(tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    torch.save(factors(A=make()), os.path.join(d, "adapter_model.bin"))
    with pytest.raises(ValueError, match=rf"adapter_model.bin: base_model.model.q.lora_A.weight is .*{what}"):
        Adapter.load(d, allow_pickle=True)
    with pytest.raises(ValueError, match=rf"load_adapter: state_dict: q.lora_A is .*{what}"):
        lora_ext.load_adapter(torch.nn.Module(), {"q.lora_A": make(), "q.lora_B": torch.randn(3, 2)})


def test_pickled_views_noncontiguous_and_mixed_dtypes_load_exactly(tmp_path):
    """Views sharing one storage, transposed / expanded tensors, fp64 A with bf16 B: what PEFT computes."""
    d = write(tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    base = torch.randn(4, 4, dtype=torch.float64)
    A, B = base[:2], base[1:, 1:3].to(torch.bfloat16).t().contiguous().t()  # B non-contiguous
    torch.save(factors(A=A, B=B), os.path.join(d, "adapter_model.bin"))
    x = torch.randn(5, 4)
    want = torch.nn.Linear(4, 3)
    ref = want(x) + 2.0 * (x.double() @ A.t() @ B.double().t()).float()
    for how in ("load_adapter", "pool"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        model[0].load_state_dict(want.state_dict())
        ad = Adapter.load(d, allow_pickle=True)
        ad.layers = {"0": ad.layers["q"]}
        with torch.no_grad():
            if how == "load_adapter":
                load_adapter(model, ad)
                out = model(x)
            else:
                pool = AdapterPool(model, target_modules=["0"], max_rank=4)
                pool.load("a", ad)
                with pool.batch(["a"] * 5):
                    out = model(x)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad", [None, 5, b"/tmp", ["a"]])
def test_adapter_load_of_a_non_path_names_the_argument(bad):
    with pytest.raises(TypeError, match=r"Adapter.load: path must be a str"):
        Adapter.load(bad)


def test_load_adapter_takes_a_directory_and_names_a_bad_argument(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    t = {k.replace(".q.", ".0."): v for k, v in factors().items()}
    d = write(tmp_path, tensors=t)
    assert load_adapter(model, d) == ["0"]
    torch.testing.assert_close(model[0].lora_factors()[0], t["base_model.model.0.lora_A.weight"])
    for bad in (None, 5, [1], b"/tmp"):
        with pytest.raises(TypeError, match=r"load_adapter: adapter must be"):
            load_adapter(model, bad)


# ---------------------------------------------------------------- extra tensors the model does not save
def test_extra_tensor_naming_a_non_persistent_buffer_is_refused(tmp_path):
    """PEFT loads an adapter's extra tensors with load_state_dict(strict=False): one naming a
    non-persistent buffer (a rotary inv_freq) or a plain attribute is not in the state dict and
    never loaded. lora_ext overwrote it (other logits than PEFT's); now it refuses it."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(4, 3)
            self.register_buffer("inv_freq", torch.ones(3), persistent=False)
            self.register_buffer("kept", torch.ones(3))
            self.plain = torch.ones(3)

        def forward(self, x):
            return self.q(x) * self.inv_freq * self.kept * self.plain

    for key in ("inv_freq", "plain"):
        model = Net()
        x = torch.randn(2, 4)
        before = model(x)
        d = write(tmp_path, tensors=factors() | {f"base_model.model.{key}": torch.full((3,), 7.0)})
        with pytest.raises(ValueError, match=rf"load_adapter: adapter ad holds {key} \(3,\).*not a parameter or persistent buffer"):
            load_adapter(model, Adapter.load(d))
        assert torch.equal(model(x), before) and not lora_ext.lora_layers(model)
    model = Net()
    load_adapter(model, Adapter.load(write(tmp_path, tensors=factors() | {"base_model.model.kept": torch.full((3,), 7.0)})))
    assert torch.equal(model.kept, torch.full((3,), 7.0))


# ---------------------------------------------------------------- weights for modules the config does not target
@pytest.mark.parametrize("config, why", [
    ({"target_modules": ["q"]}, r"target_modules=\['q'\] does not select module 'v'"),
    ({"target_modules": "q"}, r"target_modules='q' does not select module 'v'"),
    ({"target_modules": ["q", "v"], "exclude_modules": ["v"]}, r"exclude_modules=\['v'\] excludes module 'v'"),
    ({"target_modules": ".*", "exclude_modules": "v|w"}, r"exclude_modules='v\|w' excludes module 'v'"),
])
def test_weights_for_modules_the_config_does_not_target_are_refused(tmp_path, config, why):
    """PeftModel.from_pretrained adapts only the modules target_modules selects (less
    exclude_modules) and silently drops the other tensors (a Llama adapter whose config lists
    q_proj but whose file also holds v_proj: logits 0.38 apart from what lora_ext computed)."""
    d = write(tmp_path, config, tensors=factors("q") | factors("v"))
    with pytest.raises(ValueError, match=rf"adapter_config.json: {why}, but adapter_model.safetensors holds"):
        Adapter.load(d)
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(4, 3), "v": torch.nn.Linear(4, 3)})
    pool = AdapterPool(model, target_modules=["q", "v"], max_rank=4)
    with pytest.raises(ValueError, match=r"target_modules|exclude_modules"):
        pool.load("a", d)
    assert pool.names() == []


@pytest.mark.parametrize("config", [{"target_modules": None}, {"target_modules": "all-linear"},
                                    {"target_modules": ["v", "q"]}, {"target_modules": "q|v"},
                                    {"target_modules": ["q", "v"], "exclude_modules": ["w"]},
                                    {"target_modules": ["q", "v"], "exclude_modules": []}])
def test_targets_covering_the_weights_load(tmp_path, config):
    assert set(Adapter.load(write(tmp_path, config, tensors=factors("q") | factors("v"))).layers) == {"q", "v"}


@pytest.mark.parametrize("config", [{"target_modules": [{}]}, {"target_modules": 5}, {"target_modules": ["q", 1]},
                                    {"exclude_modules": {"v": 1}}])
def test_targets_of_another_type_are_refused(tmp_path, config):
    field = next(iter(config))
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} must be a string \(a regex\) or a list"):
        Adapter.load(write(tmp_path, config))


@pytest.mark.parametrize("field, value", [("target_modules", "("), ("exclude_modules", "q[")])
def test_invalid_target_regex_is_refused_by_name(tmp_path, field, value):
    """A str target_modules / exclude_modules is a regex; an invalid one raised re.error from deep in
    the matching (hypothesis: target_modules='('), in Adapter.load, inject and AdapterPool alike."""
    config = {"target_modules": ["q"], field: value}
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}='{re.escape(value)}' is not a valid regex"):
        Adapter.load(write(tmp_path, config, tensors=factors("q")))
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(4, 3)})
    with pytest.raises(ValueError, match=rf"inject: {field}='{re.escape(value)}' is not a valid regex"):
        lora_ext.inject(model, **config)
    assert type(model["q"]) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"AdapterPool: target_modules='\(' is not a valid regex"):
        AdapterPool(model, target_modules="(", max_rank=4)
    with pytest.raises(ValueError, match=r"modules_to_save='\(' is not a valid regex"):
        lora_ext.Adapter.from_model(lora_ext.inject(model, ["q"]) and model, modules_to_save="(")
