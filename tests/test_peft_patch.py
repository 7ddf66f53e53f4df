"""lora_ext.patch_peft: a PeftModel patched in place vs the same PeftModel unpatched (a deepcopy).
Mixed batches (adapter_names) are in test_peft_mixed.py."""
import copy
import os
import contextlib
import warnings
import weakref

import pytest
import torch
from conftest import rel_err
from models import tiny_gpt2, tiny_llama, tiny_qwen3_moe
from peft_cases import (CASES, TOL, Count, PeftLinear, build, ids_for, lora_params, n_linear, n_lora,
                        patch, peft, randomize)

import lora_ext
import lora_ext.peft_patch as pp


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_parity_3_adamw_steps(kind, dtype, monkeypatch):
    ref = build(kind, dtype, use_rslora=(kind == "gpt2"))
    pm = copy.deepcopy(ref)
    names = patch(pm)
    assert len(names) == n_lora(pm) > 0
    count = Count(monkeypatch)
    pm.train(), ref.train()
    opt_p = torch.optim.AdamW(lora_params(pm).values(), lr=1e-3)
    opt_r = torch.optim.AdamW(lora_params(ref).values(), lr=1e-3)
    tol_out, tol_grad = TOL[dtype]
    for step in range(3):
        ids = ids_for(seed=step)
        out_p, out_r = pm(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
        assert rel_err(out_p.logits, out_r.logits) < tol_out
        assert abs(out_p.loss.item() - out_r.loss.item()) <= tol_out * abs(out_r.loss.item())
        out_p.loss.backward(), out_r.loss.backward()
        gp, gr = lora_params(pm), lora_params(ref)
        assert gp.keys() == gr.keys() and len(gp) > 0
        for n in gr:
            assert rel_err(gp[n].grad, gr[n].grad) < tol_grad, (step, n)
        opt_p.step(), opt_r.step()
        opt_p.zero_grad(), opt_r.zero_grad()
    assert count.linear == 3 * n_linear(pm) and count.multi == 0


def test_dropout_trains_and_eval_is_deterministic(monkeypatch):
    pm = build("llama", dropout=0.2)
    patch(pm)
    count = Count(monkeypatch)
    pm.train()
    ids = ids_for(batch=4, seq=16)
    opt = torch.optim.AdamW(lora_params(pm).values(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert count.linear == 6 * n_linear(pm)
    with torch.no_grad():
        a, b = pm(input_ids=ids).logits, pm(input_ids=ids).logits  # dropout active: masks differ
    assert not torch.equal(a, b)
    pm.eval()
    ref = copy.deepcopy(pm)
    lora_ext.unpatch_peft(ref)
    with torch.no_grad():
        a, b, r = pm(input_ids=ids).logits, pm(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(a, b)
    assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("kind", list(CASES))
def test_adapter_lifecycle_inference(kind, monkeypatch):
    """set_adapter / add_adapter (other rank, rsLoRA) / disable_adapter / merge / unmerge /
    delete_adapter / merge_and_unload, all read at call time."""
    ref = build(kind)
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, fan_in_fan_out=CASES[kind][2],
                                         target_modules=CASES[kind][1]))
    randomize(ref, seed=2)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    count = Count(monkeypatch)
    ids = ids_for()

    def check(fused):
        before = count.linear
        with torch.no_grad():
            assert rel_err(pm(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
        assert (count.linear > before) == fused

    check(True)
    for m in (pm, ref):
        m.set_adapter("b")
    check(True)
    with pm.disable_adapter(), ref.disable_adapter():
        check(False)
    for m in (pm, ref):
        m.merge_adapter()
    check(False)
    for m in (pm, ref):
        m.unmerge_adapter()
    check(True)
    for m in (pm, ref):
        m.set_adapter("default")
        m.delete_adapter("b")
    check(True)
    merged = pm.merge_and_unload()
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5


def test_save_load_round_trip(tmp_path):
    pm = build("gpt2")
    ref_keys = set(copy.deepcopy(pm).state_dict())
    patch(pm)
    assert set(pm.state_dict()) == ref_keys
    pm.train()
    opt = torch.optim.AdamW(lora_params(pm).values(), lr=1e-2)
    ids = ids_for()
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        plain = loaded(input_ids=ids).logits
        assert len(patch(loaded)) == n_linear(loaded)
        assert rel_err(loaded(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5
        assert rel_err(plain, pm(input_ids=ids).logits) < 1e-5


_LOAD_PICKLED = """
import sys, warnings, torch
import lora_ext.peft_patch as pp
warnings.filterwarnings("error", message="lora_ext.patch_peft")
pm, ids, names, want = torch.load(sys.argv[1], weights_only=False)
calls = []
real = pp.multi_lora_
pp.multi_lora_ = lambda *a, **k: (calls.append(1), real(*a, **k))
with torch.no_grad():
    got = pm(input_ids=ids, adapter_names=names).logits
err = ((got - want).norm() / want.norm()).item()
assert err < 1e-6 and len(calls) > 0, (err, len(calls))
print("ok")
"""


def test_torch_save_of_a_patched_model_loads_patched(tmp_path):
    """torch.save(model) of a patched PeftModel (a whole-model checkpoint) loads in a fresh
    process that never called patch_peft, still patched: mixed batches run multi_lora_."""
    import subprocess
    import sys
    pm = build("llama")
    pm.add_adapter("b", peft.LoraConfig(r=8, target_modules=CASES["llama"][1]))
    randomize(pm, seed=4)
    pm.eval()
    patch(pm)
    ids, names = ids_for(), ["b", "default"]
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
    torch.save((pm, ids, names, want), tmp_path / "model.pt")
    out = subprocess.run([sys.executable, "-c", _LOAD_PICKLED, str(tmp_path / "model.pt")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_unpatch_restores_original_forward():
    pm = build("llama").eval()
    ids = ids_for()
    with torch.no_grad():
        before = pm(input_ids=ids).logits
    names = patch(pm)
    assert patch(pm) == []  # idempotent
    layers = [m for m in pm.modules() if isinstance(m, PeftLinear)]
    assert all("forward" in m.__dict__ for m in layers)
    assert sorted(lora_ext.unpatch_peft(pm)) == sorted(names)
    assert all("forward" not in m.__dict__ and m.forward.__func__ is PeftLinear.forward for m in layers)
    assert not any(k.startswith("_lora_ext") for m in layers for k in m.__dict__)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, before)


def test_fallbacks_warn_once_per_layer(monkeypatch):
    ref = build("gpt2", init_lora_weights="mica").eval()  # a LoRA variant patch_peft does not run
    pm = copy.deepcopy(ref)
    names = patch(pm)
    count = Count(monkeypatch)
    ids = ids_for()
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            assert rel_err(pm(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    msgs = [str(w.message) for w in rec if "lora_ext.patch_peft" in str(w.message)]
    assert len(msgs) == len(names)
    assert all("MiCALinearVariant" in m for m in msgs)
    assert {m.split("'")[1] for m in msgs} == set(names)  # each names its layer
    assert count.linear == 0
    # several active adapters at once: PEFT's forward, again one warning per layer
    pm2 = build("gpt2").eval()
    pm2.add_adapter("b", peft.LoraConfig(r=4, fan_in_fan_out=True, target_modules=CASES["gpt2"][1]))
    pm2.base_model.set_adapter(["default", "b"])
    patch(pm2)
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        pm2(input_ids=ids), pm2(input_ids=ids)
    msgs = [str(w.message) for w in rec if "lora_ext.patch_peft" in str(w.message)]
    assert len(msgs) == n_linear(pm2) and all("2 active adapters" in m for m in msgs)


def test_old_peft_is_named_with_the_version_needed(monkeypatch):
    # peft < 0.15 has no AuxiliaryTrainingWrapper: say which peft is needed, not a bare ImportError
    import peft.utils.other as other
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.delattr(other, "AuxiliaryTrainingWrapper")
    with pytest.raises(ImportError, match=r"needs peft >= 0\.15; this is peft"):
        lora_ext.patch_peft(model)


def test_compile_leaves_the_tree_hook_out_of_the_graph(monkeypatch):
    # patch_peft installs a global module-registration hook, and transformers registers modules
    # while tracing (it slices its ModuleList of layers). Traced, the hook's membership test made
    # Dynamo guard on the WeakSet of tracked modules by position: when one of them was collected
    # before the guards were built, the compile failed with IndexError (a flaky CI failure).
    patch(build("llama"))
    seen = []

    class Spy(weakref.WeakSet):
        def __contains__(self, m):
            seen.append(torch.compiler.is_compiling())
            return super().__contains__(m)
    monkeypatch.setattr(pp, "_TRACKED", Spy(pp._TRACKED))
    model, ids = tiny_llama(), ids_for()
    torch._dynamo.reset()
    fwd = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert rel_err(fwd(ids), model(input_ids=ids).logits) < 1e-5
    assert seen and not any(seen)  # the eager forward consulted the hook, the traced one did not


def test_param_wrapper_experts_run_lora_ext_moe():
    """PEFT's ParamWrapper chain on a transformers experts module (target_parameters) runs
    lora_ext.moe.experts_forward on PEFT's own factors: the outer wrapper is patched, logits and
    every gradient equal PEFT's; two active adapters, a merged wrapper and disable_adapter() run
    PEFT's forward; unpatch restores PEFT's forward."""
    import copy
    from unittest import mock

    import peft
    import lora_ext.moe

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    pm = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               target_parameters=experts))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=experts))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ref = copy.deepcopy(pm)
    ids = ids_for(seq=8)
    patched = lora_ext.patch_peft(pm)
    layers = [f"base_model.model.model.layers.{i}" for i in (0, 1)]
    assert sorted(patched) == sorted([f"{x}.mlp.experts" for x in layers] + [f"{x}.self_attn.q_proj" for x in layers])
    spy = mock.patch("lora_ext.moe.experts_forward", wraps=lora_ext.moe.experts_forward)
    pm.eval(), ref.eval()
    with torch.no_grad(), spy as calls:
        assert rel_err(pm(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
        assert calls.call_count == 2
        calls.reset_mock()  # a mixed batch runs too (tests/test_peft_patch_experts.py), not experts_forward
        assert pm(input_ids=ids, adapter_names=["default", "b"]).logits.shape[0] == 2 and calls.call_count == 0
    pm.train(), ref.train()
    with spy as calls:
        pm(input_ids=ids, labels=ids).loss.backward()
        assert calls.call_count == 2
    ref(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(want) and any("experts.base_layer.lora_A" in n for n in got)
    for n in want:
        assert rel_err(got[n], want[n]) < 1e-5, n
    pm.eval(), ref.eval()
    for how in ("both", "merged", "disabled"):
        pm.base_model.set_adapter(["default", "b"] if how == "both" else "default")
        ref.base_model.set_adapter(["default", "b"] if how == "both" else "default")
        wrapper = pm.base_model.model.model.layers[0].mlp.experts
        with warnings.catch_warnings(record=True) as seen, torch.no_grad(), spy as calls:
            warnings.simplefilter("always")
            if how == "merged":
                wrapper.merge(), ref.base_model.model.model.layers[0].mlp.experts.merge()
            ctx = pm.disable_adapter() if how == "disabled" else contextlib.nullcontext()
            ctx_ref = ref.disable_adapter() if how == "disabled" else contextlib.nullcontext()
            with ctx:
                y = pm(input_ids=ids).logits
            with ctx_ref:
                assert rel_err(y, ref(input_ids=ids).logits) < 1e-5
            assert calls.call_count == (1 if how == "merged" else 0)  # layer 1's chain is not merged
            if how == "both":
                assert any("2 active adapters at once" in str(w.message) for w in seen)
            if how == "merged":
                wrapper.unmerge(), ref.base_model.model.model.layers[0].mlp.experts.unmerge()
    pm.base_model.set_adapter("default")
    assert sorted(lora_ext.unpatch_peft(pm)) == sorted(patched)
    assert "forward" not in pm.base_model.model.model.layers[0].mlp.experts.__dict__
