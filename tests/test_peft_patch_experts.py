"""patch_peft: mixed batches (adapter_names) through PEFT's ParamWrapper on MoE experts
(target_parameters), which PEFT itself refuses ("does not support mixed adapter batches"). The oracle
is unpatched PEFT with each row's adapter set alone (the base model for "__base__")."""
import copy
import warnings

import pytest
import torch
from conftest import rel_err
from models import tiny_qwen3_moe

import lora_ext

peft = pytest.importorskip("peft")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def models():
    """(base, PEFT reference, patched copy): "default" r 4 on q_proj + both projections, "b" r 2 on
    q_proj + both, "c" r 3 rsLoRA on the experts only (PEFT: adapters target the same parameters)."""
    base = tiny_qwen3_moe()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                   target_parameters=EXPERTS))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    pm.add_adapter("c", peft.LoraConfig(r=3, lora_alpha=3, target_modules=[], target_parameters=EXPERTS,
                                        use_rslora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    ref = copy.deepcopy(pm).eval()
    patched = copy.deepcopy(pm).eval()
    lora_ext.patch_peft(patched)
    return base, ref, patched


@torch.no_grad()
def per_row(base, ref, fn, ids, names):
    out = []
    for i, n in enumerate(names):
        if n == "__base__":
            out.append(fn(base, ids[i:i + 1]))
        else:
            ref.base_model.set_adapter(n)
            out.append(fn(ref, ids[i:i + 1]))
    ref.base_model.set_adapter("default")
    return torch.cat(out)


def test_mixed_batch_matches_each_adapter_alone(models):
    base, ref, pm = models
    names = ["default", "__base__", "b", "c", "default", "c"]
    ids = torch.randint(0, 128, (len(names), 7), generator=torch.Generator().manual_seed(1))
    want = per_row(base, ref, lambda m, x: m(input_ids=x).logits, ids, names)
    with pytest.raises(ValueError, match="ParamWrapper does not support mixed adapter batches"):
        with torch.no_grad():
            copy.deepcopy(ref)(input_ids=ids, adapter_names=names)  # what PEFT does (its hooks stay after it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere
        with torch.no_grad():
            got = pm(input_ids=ids, adapter_names=names).logits
    assert rel_err(got, want) < 1e-5
    # the experts' pools follow a factor changed in place (cache stamps)
    wrapper = pm.base_model.model.model.layers[0].mlp.experts
    ref_wrapper = ref.base_model.model.model.layers[0].mlp.experts
    with torch.no_grad():
        for w in (wrapper, ref_wrapper):
            w.lora_B["c"].weight.mul_(-2)
        got = pm(input_ids=ids, adapter_names=names).logits
    assert rel_err(got, per_row(base, ref, lambda m, x: m(input_ids=x).logits, ids, names)) < 1e-5


def test_generate_with_adapter_names_matches_each_adapter_alone(models):
    base, ref, pm = models
    names = ["c", "b", "__base__"]
    ids = torch.randint(0, 128, (len(names), 5), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = per_row(base, ref, lambda m, x: m.generate(input_ids=x, **gen), ids, names)
    assert pm.generate(input_ids=ids, adapter_names=names, **gen).tolist() == want.tolist()


def test_autograd_on_falls_back_to_peft_with_a_warning(models):
    _, _, pm = models
    ids = torch.randint(0, 128, (2, 4))
    with pytest.warns(UserWarning, match="mixed batch with autograd on"), \
            pytest.raises(ValueError, match="ParamWrapper does not support mixed adapter batches"):
        pm(input_ids=ids, adapter_names=["c", "default"])
