"""Shared by the patch_peft tests: PEFT models of tiny Llama / GPT-2, and helpers."""
import warnings

import pytest
import torch
from models import tiny_gpt2, tiny_llama

import lora_ext
import lora_ext.peft_patch as pp

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

CASES = {  # builder, targets, fan_in_fan_out (GPT-2: Conv1D)
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj", "embed_tokens"], False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], True),
}
# fp32: same math, other summation order. bf16: both round every GEMM to bf16, in different orders
# (and lora_ext runs fp32 adapters in the model's bf16, PEFT in fp32), as tests/test_peft_parity.py.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 6e-2)}  # (logits/loss, grads)


def build(kind, dtype=torch.float32, dropout=0.0, r=4, alpha=8, use_rslora=False, **cfg):
    make, targets, fifo = CASES[kind]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                             fan_in_fan_out=fifo, use_rslora=use_rslora, **cfg)
    pm = peft.get_peft_model(make(dtype=dtype), config)
    randomize(pm)
    return pm


def randomize(model, seed=1, magnitude=None):
    """Non-zero LoRA factors (B, embedding A too) so LoRA matters: N(0, 0.1²). DoRA magnitudes: with
    ``magnitude`` (a spread), scaled by 1 + magnitude·U[0, 1) away from the norm (g != 1); else drawn
    like the factors. Returns the model."""
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if magnitude is not None and "lora_magnitude_vector" in n:
            p.data = p.data * (1 + magnitude * torch.rand_like(p))
        elif "lora_" in n:
            p.data = torch.randn_like(p) * 0.1
    return model


def patch(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_ext.patch_peft(model)


class Count:
    """Counts calls of the fused ops inside lora_ext.peft_patch."""

    def __init__(self, monkeypatch):
        self.linear = self.multi = 0
        real_linear, real_multi = pp.lora_linear, pp.multi_lora_

        def linear(*a, **k):
            self.linear += 1
            return real_linear(*a, **k)

        def multi(*a, **k):
            self.multi += 1
            return real_multi(*a, **k)
        monkeypatch.setattr(pp, "lora_linear", linear)
        monkeypatch.setattr(pp, "multi_lora_", multi)


def ids_for(batch=2, seq=12, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def n_linear(model):
    return sum(isinstance(m, PeftLinear) for m in model.modules())


def n_lora(model):  # LoRA Linear + Embedding layers (what patch_peft patches)
    from peft.tuners.lora.layer import Embedding
    return sum(isinstance(m, (PeftLinear, Embedding)) for m in model.modules())
