"""lora_ext.patch_peft against unpatched PEFT through PEFT's own API calls (model.to(dtype), ...):
each case found a patched model that behaved differently from the same PEFT model unpatched."""
import copy
import warnings

import torch
from conftest import rel_err
from peft_cases import CASES, build, ids_for, patch, peft, randomize


def test_float64_model_mixed_batch_falls_back_to_peft():
    # model.to(torch.float64) after patching: a mixed batch sent the LoRA embedding to lora_expand_,
    # which has no fp64 kernel (RuntimeError; PEFT runs it). It now runs PEFT's forward, with a warning.
    ref = build("llama")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, target_modules=CASES["llama"][1]))
    randomize(ref, seed=3)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    pm.to(torch.float64), ref.to(torch.float64)
    ids, names = ids_for(batch=3, seq=5), ["b", "__base__", "default"]
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = pm(input_ids=ids, adapter_names=names).logits
        assert rel_err(out, ref(input_ids=ids, adapter_names=names).logits) < 1e-12
    assert any("embed_tokens" in str(w.message) and "float64" in str(w.message) for w in rec)


def test_mixed_batch_with_grad_and_trainable_base_bias_falls_back_to_peft():
    # bias="lora_only" trains the LoRA layers' base biases. A mixed batch of an adapter PEFT left
    # frozen (added, not active) with autograd on (an evaluation loop without no_grad) ran
    # multi_lora_ in place on the first layer's base output, which requires grad through its bias:
    # RuntimeError (PEFT runs it and back-propagates). Such layers now run PEFT's forward.
    ref = build("gpt2", bias="lora_only")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True, target_modules=CASES["gpt2"][1]))
    randomize(ref, seed=5)
    ref.eval()
    assert not any(p.requires_grad for n, p in ref.named_parameters() if ".b." in n)
    pm = copy.deepcopy(ref)
    patch(pm)
    ids, names = ids_for(batch=3, seq=5), ["b", "__base__", "b"]
    outs = [m(input_ids=ids, adapter_names=names).logits for m in (pm, ref)]
    assert rel_err(outs[0], outs[1]) < 1e-5
    outs[0].square().mean().backward(), outs[1].square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (pm, ref)]
    assert grads[0].keys() == grads[1].keys() and any(n.endswith("base_layer.bias") for n in grads[1])
    for n in grads[1]:
        assert rel_err(grads[0][n], grads[1][n]) < 1e-5, n


def test_forward_pre_hooks_on_lora_factors_are_run():
    # A forward pre-hook on lora_A (an activation probe, an input transform) runs in PEFT's
    # forward. The fused paths read lora_A's weight and skipped it silently (forward hooks were
    # checked, pre-hooks were not): relative logits error 0.42, the hook never called. Such adapters now
    # run PEFT's forward, single and mixed, with a warning.
    ref = build("llama")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    randomize(ref, seed=7)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    calls = {id(pm): 0, id(ref): 0}
    for m in (pm, ref):
        def double_input(module, args, key=id(m)):
            calls[key] += 1
            return (args[0] * 2,)
        for n, mod in m.named_modules():
            if n.endswith("lora_A.default") or n.endswith("lora_A.b"):
                mod.register_forward_pre_hook(double_input)
    ids = ids_for(batch=3, seq=5)
    with torch.no_grad():
        for kw in ({}, {"adapter_names": ["b", "default", "__base__"]}):
            assert rel_err(pm(input_ids=ids, **kw).logits, ref(input_ids=ids, **kw).logits) < 1e-5
    assert calls[id(pm)] == calls[id(ref)] > 0


def test_backward_hooks_on_lora_and_base_layers_are_run():
    # Module backward hooks (gradient probes, gradient surgery) on lora_B or a base layer fire in
    # PEFT's forward; lora_linear reads the weights and bypassed them: never called, and a hook
    # that zeroes lora_B's grad_input left lora_A's gradients non-zero (relative error 1.7 vs
    # PEFT). Such layers now run PEFT's forward.
    ref = build("llama")
    pm = copy.deepcopy(ref)
    patch(pm)
    calls = {id(pm): 0, id(ref): 0}
    for m in (pm, ref):
        def zero_grad_input(module, grad_input, grad_output, key=id(m)):
            calls[key] += 1
            return (torch.zeros_like(grad_input[0]),)

        def count(module, grad_output, key=id(m)):
            calls[key] += 100
        for n, mod in m.named_modules():
            if n.endswith("q_proj.lora_B.default"):
                mod.register_full_backward_hook(zero_grad_input)
            if n.endswith("layers.1.self_attn.v_proj.base_layer"):
                mod.register_full_backward_pre_hook(count)
    ids = ids_for()
    pm.train(), ref.train()
    pm(input_ids=ids, labels=ids).loss.backward(), ref(input_ids=ids, labels=ids).loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (pm, ref)]
    assert grads[0].keys() == grads[1].keys()
    for n in grads[1]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7), n
    assert calls[id(pm)] == calls[id(ref)] > 100
