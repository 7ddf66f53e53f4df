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
