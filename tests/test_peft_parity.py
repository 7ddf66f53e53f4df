"""lora_ext vs HF PEFT on tiny Llama and GPT-2 models: outputs, loss and LoRA gradients."""
import copy

import pytest
import torch
from conftest import rel_err
from models import tiny_gpt2, tiny_llama

import lora_ext

peft = pytest.importorskip("peft")

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj", "embed_tokens"], False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], True),
}
# bf16: both sides round every GEMM output to bf16, in different orders.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def build_pair(kind, dtype, r=4, alpha=8, use_rslora=False):
    make, targets, fan_in_fan_out = CASES[kind]
    base = make(dtype=dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():  # non-zero B (and embedding A) so LoRA matters
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.1
    ours = copy.deepcopy(base)
    names = lora_ext.inject(ours, targets, r=r, alpha=alpha, use_rslora=use_rslora)
    psd = pm.state_dict()
    for name, m in lora_ext.lora_layers(ours).items():
        key = f"base_model.model.{name}"
        if isinstance(m, lora_ext.LoRALinear):
            m.lora_A.data.copy_(psd[f"{key}.lora_A.default.weight"])
            m.lora_B.data.copy_(psd[f"{key}.lora_B.default.weight"])
        else:
            m.lora_embedding_A.data.copy_(psd[f"{key}.lora_embedding_A.default"])
            m.lora_embedding_B.data.copy_(psd[f"{key}.lora_embedding_B.default"])
    lora_ext.mark_only_lora_trainable(ours)
    return pm, ours, names


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_loss_grads_match_peft(kind, dtype):
    pm, ours, names = build_pair(kind, dtype, use_rslora=(kind == "gpt2"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    out_p = pm(input_ids=ids, labels=ids)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_p.logits) < TOL[dtype]
    assert abs(out_o.loss.item() - out_p.loss.item()) <= TOL[dtype] * abs(out_p.loss.item())
    out_p.loss.backward()
    out_o.loss.backward()
    pgrads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    checked = 0
    for name, m in lora_ext.lora_layers(ours).items():
        for ours_p, suffix in [("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                               ("lora_embedding_A", "lora_embedding_A.default"),
                               ("lora_embedding_B", "lora_embedding_B.default")]:
            if hasattr(m, ours_p):
                g_ref = pgrads[f"base_model.model.{name}.{suffix}"]
                assert rel_err(getattr(m, ours_p).grad, g_ref) < TOL[dtype] * (1 if dtype == torch.float32 else 2), (name, ours_p)
                checked += 1
    assert checked == 2 * len(names)
    # only LoRA parameters got gradients
    for n, p in ours.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_state_dict_keys_match_peft():
    pm, ours, _ = build_pair("llama", torch.float32)
    from peft.utils import get_peft_model_state_dict

    ref = get_peft_model_state_dict(pm, save_embedding_layers=False)
    got = lora_ext.lora_state_dict(ours)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
