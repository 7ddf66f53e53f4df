"""Training and deployment workflows around LoRA layers, as users run them: activation
checkpointing (with dropout), torch.export of injected and patch_peft'd models."""
import copy
import warnings

import pytest
import torch
from models import tiny_llama
from peft_cases import build, ids_for, n_linear, patch

import lora_ext


class Logits(torch.nn.Module):
    """model(input_ids=ids).logits as a module of one tensor input (what torch.export takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def n_fused(ep) -> int:
    """lora_ext op calls in an exported program's graph."""
    return sum(str(n.target).startswith("lora_ext.") for n in ep.graph.nodes)


def test_export_of_a_patched_peft_model_keeps_the_fused_op():
    # torch.export (non-strict, its default) traces with FakeTensor parameters: the patched layers
    # took them for quantized weights and exported PEFT's forward, warning once per layer
    pm = build("llama")
    patch(pm)
    pm.eval()
    ids = ids_for(batch=2, seq=12)
    batch = torch.export.Dim("batch", min=1, max=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer falls back to PEFT's forward
        ep = torch.export.export(Logits(pm), (ids,), dynamic_shapes={"ids": {0: batch}})
    assert n_fused(ep) == n_linear(pm) == 6  # q/v/gate_proj of 2 layers (not the embedding: no fused op)
    other = ids_for(batch=5, seq=12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(other), Logits(pm)(other), rtol=0, atol=0)


@pytest.mark.slow
def test_export_and_aoti_package_of_an_injected_model(tmp_path):
    """An injected model for inference: torch.export with a dynamic batch dim, then AOTInductor
    (the lora_ext ops run through its proxy executor); any batch size gives eager's logits."""
    model = tiny_llama(layers=1)
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1)
    for m in lora_ext.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(Logits(model), (ids_for(batch=2),), dynamic_shapes={"ids": {0: batch}})
    assert n_fused(ep) == 2
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for b in (1, 5):
        ids = ids_for(batch=b, seed=b)
        with torch.no_grad():
            ref = Logits(model)(ids)
            torch.testing.assert_close(ep.module()(ids), ref, rtol=0, atol=0)
            torch.testing.assert_close(loaded(ids), ref, rtol=1e-5, atol=1e-5)
