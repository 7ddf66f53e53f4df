"""A PEFT user's workflows under lora_ext.patch_peft, patched vs the same PeftModel unpatched (a
deepcopy): base layers that are nn.Linear subclasses (transformers' FalconLinear fused, others
PEFT's with a warning), layer calls with extra arguments in mixed batches, and PEFT's compiled
hotswap (tensor scalings: one graph, in-place changes seen by the mixed-batch pools)."""
import copy
import warnings

import pytest
import torch
from conftest import rel_err
from peft_cases import Count, ids_for, lora_params, patch, peft, randomize

import lora_ext
from lora_ext import peft_pools


def tiny_falcon(seed=0):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=False, bias=True)
    return FalconForCausalLM(cfg).eval()


def test_falcon_linear_bases_take_the_fused_path(monkeypatch):
    """FalconLinear (x @ W^T + b, an nn.Linear subclass) computes F.linear: patched layers on it run
    lora_linear (no 'quantized or wrapped' fallback), logits and gradients equal PEFT's, mixed
    batches too."""
    monkeypatch.setattr(peft_pools, "_PLAIN_LINEAR", {})
    ref = peft.get_peft_model(tiny_falcon(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "query_key_value", "dense_h_to_4h", "dense_4h_to_h"]))
    ref.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["query_key_value", "dense_h_to_4h",
                                                                            "dense_4h_to_h"]))
    randomize(ref, seed=4)
    pm = copy.deepcopy(ref)
    assert {type(m.base_layer).__name__ for m in pm.modules() if hasattr(m, "lora_A")} == {"FalconLinear"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        names = lora_ext.patch_peft(pm)
    assert len(names) == 6
    count = Count(monkeypatch)
    ids = ids_for()
    pm.train(), ref.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pm(input_ids=ids, labels=ids)
    assert count.linear == 6
    want = ref(input_ids=ids, labels=ids)
    assert rel_err(out.logits, want.logits) < 1e-5
    out.loss.backward(), want.loss.backward()
    gp, gr = lora_params(pm), lora_params(ref)
    assert gp.keys() == gr.keys() and all(gr[n].grad is not None for n in gr)
    for n in gr:
        assert rel_err(gp[n].grad, gr[n].grad) < 1e-5, n
    pm.eval(), ref.eval()
    with torch.no_grad():
        mix = ["b", "default"]
        assert rel_err(pm(input_ids=ids, adapter_names=mix).logits, ref(input_ids=ids, adapter_names=mix).logits) < 1e-5
    assert count.multi == 6


class ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class HiddenLinear(torch.nn.Linear):  # F.linear written out, another class: probed on its own
    def forward(self, x):
        return x @ self.weight.t() + self.bias


class LogitScaleLinear(torch.nn.Linear):  # transformers' DoryLMHead: a learned scale, 1 when new
    def __init__(self, n_in, n_out, scale=1.0):
        super().__init__(n_in, n_out)
        self.logit_scale = torch.nn.Parameter(torch.full((n_out,), scale))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


def _patched_matches_peft(net, targets):
    """PEFT on ``net`` vs a patched copy: equal outputs; returns the warnings patching and the call gave."""
    ref = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize(ref)
    pm = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora_ext.patch_peft(pm)
        x = torch.randn(5, 8)
        with torch.no_grad():
            assert rel_err(pm(x), ref(x)) < 1e-6
    return seen


def test_linear_subclass_instances_holding_more_than_weight_and_bias_run_peft(monkeypatch):
    """The probe is per class, so a subclass whose forward reads other state (DoryLMHead's
    logit_scale: F.linear's output while it is 1) never takes the fused path: a trained instance
    (scale 2) beside a new one would compute without its scale."""
    monkeypatch.setattr(peft_pools, "_PLAIN_LINEAR", {})
    torch.manual_seed(0)
    net = torch.nn.Sequential(LogitScaleLinear(8, 8), LogitScaleLinear(8, 8, scale=2.0))
    seen = _patched_matches_peft(net, ["0", "1"])
    msgs = [str(w.message) for w in seen if "lora_ext" in str(w.message)]
    assert len(msgs) == 2 and all("holds more than weight and bias" in m for m in msgs), msgs


def test_linear_subclasses_are_probed_once_per_class(monkeypatch):
    """A subclass whose forward is not F.linear keeps PEFT's forward with a warning naming it; the
    probe runs once per class, at patch time."""
    monkeypatch.setattr(peft_pools, "_PLAIN_LINEAR", {})
    probes = []
    real = peft_pools._same_on_probe
    monkeypatch.setattr(peft_pools, "_same_on_probe", lambda m: probes.append(type(m)) or real(m))
    torch.manual_seed(0)
    net = torch.nn.Sequential(ScaledLinear(8, 8), HiddenLinear(8, 8), HiddenLinear(8, 8), ScaledLinear(8, 8))
    seen = _patched_matches_peft(net, ["0", "1", "2", "3"])
    assert sorted(p.__name__ for p in probes) == ["HiddenLinear", "ScaledLinear"]
    msgs = [str(w.message) for w in seen]
    assert sum("ScaledLinear is an nn.Linear subclass whose forward is not F.linear" in m for m in msgs) == 2, msgs
    assert not any("HiddenLinear" in m for m in msgs), msgs


class KwargLinear(torch.nn.Linear):  # a base layer taking an extra forward argument
    def forward(self, x, shift=None):
        y = super().forward(x)
        return y if shift is None else y + shift


@torch.no_grad()
def test_mixed_batch_with_extra_layer_arguments_says_why_it_runs_peft():
    """A layer call with adapter_names and another argument (which PEFT passes to the base layer)
    runs PEFT's forward, with a warning naming the arguments, as a single-adapter call does."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(torch.nn.Sequential(KwargLinear(8, 6)), peft.LoraConfig(r=2, target_modules=["0"]))
    ref.add_adapter("b", peft.LoraConfig(r=3, target_modules=["0"]))
    randomize(ref)
    pm = copy.deepcopy(ref)
    patch(pm)
    layer, want_layer = pm.base_model.model[0], ref.base_model.model[0]
    x, names = torch.randn(2, 4, 8), ["b", "default"]
    for kwargs in ({"shift": 1.5}, {}):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y = layer(x, adapter_names=names, **kwargs)
        assert rel_err(y, want_layer(x, adapter_names=names, **kwargs)) < 1e-6
        msgs = [str(w.message) for w in seen if "lora_ext" in str(w.message)]
        assert msgs == ([f"lora_ext.patch_peft: layer 'base_model.model.0' runs PEFT's forward: unsupported "
                         "forward arguments ['shift']"] if kwargs else []), msgs


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_compiled_hotswap_scaling_tensors_keep_one_graph(tmp_path):
    """PEFT's compiled hotswap (prepare_model_for_compiled_hotswap makes each scaling a tensor,
    hotswap_adapter fills it in place): patched layers compile with fullgraph=True (no .item() per
    layer) and a hotswapped adapter runs in the same graph, as PEFT's."""
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    def adapter(seed, r, alpha):
        torch.manual_seed(0)
        pm = peft.get_peft_model(MLP(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"]))
        return randomize(pm, seed=seed).eval()

    want1, want2 = adapter(1, 4, 8), adapter(2, 2, 16)
    want2.save_pretrained(tmp_path / "two")
    pm = copy.deepcopy(want1)
    prepare_model_for_compiled_hotswap(pm, target_rank=4)
    assert isinstance(pm.base_model.model.up.scaling["default"], torch.Tensor)
    patch(pm)
    torch._dynamo.reset()
    compiled = torch.compile(pm, fullgraph=True, dynamic=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(compiled(x), want1(x)) < 1e-6
        hotswap_adapter(pm, str(tmp_path / "two"), adapter_name="default")
        with torch.compiler.set_stance("fail_on_recompile"):
            assert rel_err(compiled(x), want2(x)) < 1e-6
    # and training through the tensor scaling: PEFT's gradients
    ref = copy.deepcopy(want1)
    prepare_model_for_compiled_hotswap(ref, target_rank=4)
    pm = copy.deepcopy(ref)
    patch(pm)
    pm(x).square().sum().backward(), ref(x).square().sum().backward()
    gp, gr = lora_params(pm), lora_params(ref)
    for n in gr:
        assert rel_err(gp[n].grad, gr[n].grad) < 1e-6, n


@torch.no_grad()
def test_mixed_batches_see_tensor_scalings_changed_in_place():
    """With PEFT's tensor scalings (prepare_model_for_compiled_hotswap), LoraLayer.scale_layer
    multiplies them in place: the mixed-batch pools are rewritten, as for a float scaling."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    torch.manual_seed(0)
    ref = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    ref.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["up", "down"]))
    randomize(ref).eval()
    prepare_model_for_compiled_hotswap(ref, target_rank=4)
    pm = copy.deepcopy(ref)
    patch(pm)
    x, names = torch.randn(2, 3, 8), ["default", "b"]
    assert rel_err(pm(x, adapter_names=names), ref(x, adapter_names=names)) < 1e-6
    for m in (pm, ref):
        for layer in (m.base_model.model.up, m.base_model.model.down):
            layer.scale_layer(0.25)  # the active adapter's: "default"
    assert ref.base_model.model.up.scaling["default"].item() == 0.5
    assert rel_err(pm(x, adapter_names=names), ref(x, adapter_names=names)) < 1e-6
    assert rel_err(pm(x), ref(x)) < 1e-6


@torch.no_grad()
def test_a_linear_subclass_forward_replaced_on_the_class_is_probed_again(monkeypatch):
    monkeypatch.setattr(peft_pools, "_PLAIN_LINEAR", {})

    class Local(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    torch.manual_seed(0)
    ref = peft.get_peft_model(torch.nn.Sequential(Local(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    randomize(ref)
    pm = copy.deepcopy(ref)
    patch(pm)
    x = torch.randn(4, 8)
    assert rel_err(pm(x), ref(x)) < 1e-6 and peft_pools.base_layer_problem(pm.base_model.model[0]) is None
    monkeypatch.setattr(Local, "forward", lambda self, x: 3 * torch.nn.functional.linear(x, self.weight, self.bias))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert rel_err(pm(x), ref(x)) < 1e-6
    assert any("Local is an nn.Linear subclass whose forward is not F.linear" in str(w.message) for w in seen)


class BiasBranchLinear(torch.nn.Linear):  # F.linear with a bias, something else without one
    def forward(self, x):
        y = x @ self.weight.t()
        return y + self.bias if self.bias is not None else 2 * y


@torch.no_grad()
def test_a_linear_subclass_is_probed_with_and_without_a_bias(monkeypatch):
    monkeypatch.setattr(peft_pools, "_PLAIN_LINEAR", {})
    torch.manual_seed(0)
    net = torch.nn.Sequential(BiasBranchLinear(8, 8), BiasBranchLinear(8, 8, bias=False))
    ref = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "1"]))
    randomize(ref)
    pm = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        patch_names = lora_ext.patch_peft(pm)
        x = torch.randn(4, 8)
        assert rel_err(pm(x), ref(x)) < 1e-6
    msgs = [str(w.message) for w in seen if "lora_ext" in str(w.message)]
    assert len(patch_names) == 2 and len(msgs) == 1 and "'base_model.model.1'" in msgs[0], msgs
