"""Training and deployment workflows around LoRA layers, as users run them: activation
checkpointing (with dropout), HF Trainer with a checkpoint and resume, torch.export / AOTInductor
of injected and patch_peft'd models."""
import copy
import warnings

import pytest
import torch
from conftest import rel_err
from models import tiny_llama
from peft_cases import build, ids_for, n_linear, patch
from torch.utils.checkpoint import checkpoint

import lora_ext


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def injected(dropout: float):
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=dropout)
    lora_ext.mark_only_lora_trainable(model)
    for m in lora_ext.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    return model


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_regenerates_the_dropout_mask(reentrant):
    """The recomputed forward draws the same seed (checkpoint restores torch's RNG), so the mask
    and every gradient are those of the plain run, bit for bit."""
    layer = lora_ext.LoRALinear(32, 48, r=4, alpha=8, dropout=0.3).train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 32, requires_grad=True)
    runs = []
    for wrap in (False, True):
        torch.manual_seed(123)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        y = checkpoint(layer, x, use_reentrant=reentrant) if wrap else layer(x)
        y.square().sum().backward()  # (reentrant checkpointing refuses autograd.grad)
        runs.append((y, x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("kind", ["inject", "patch_peft"])
def test_hf_gradient_checkpointing_with_dropout(kind, reentrant):
    """model.gradient_checkpointing_enable() on a tiny Llama: loss and LoRA gradients equal the
    plain run's with dropout on; at dropout 0 a patched PEFT model matches PEFT's own."""
    ids = ids_for(batch=3, seq=16)

    def run(model, ckpt):
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames the method
        for dropout in (0.2, 0.0):
            if kind == "inject":
                model = injected(dropout)
            else:
                model = build("llama", dropout=dropout)
                peft_ref = run(copy.deepcopy(model), ckpt=True)
                patch(model)
            (l0, g0), (l1, g1) = run(copy.deepcopy(model), ckpt=False), run(model, ckpt=True)
            assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) >= 8
            assert all(torch.equal(g0[n], g1[n]) for n in g0)
            if kind == "patch_peft" and dropout == 0.0:
                assert abs(l1 - peft_ref[0]) <= 1e-5 * abs(peft_ref[0])
                assert all(rel_err(g1[n], peft_ref[1][n]) < 1e-5 for n in g1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("kind", ["inject", "patch_peft"])
def test_hf_trainer_checkpoint_and_resume(kind, tmp_path):
    """HF Trainer on the CPU, dropout on: 4 steps (a checkpoint at step 2) vs resuming from that
    checkpoint in a fresh model: the same losses and bit-identical LoRA weights (Trainer restores
    torch's RNG, from which the dropout seeds are drawn); the frozen base does not move."""
    from transformers import Trainer, TrainingArguments

    def model():
        if kind == "inject":
            return injected(0.2)
        pm = build("llama", dropout=0.2)
        patch(pm)
        return pm

    def train(m, resume=None):
        args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=1,
                                 disable_tqdm=True)
        trainer = Trainer(m, args, train_dataset=Tokens())
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, again = model(), model()
        before = copy.deepcopy(first.state_dict())
        losses = train(first)
        resumed = train(again, resume=str(tmp_path / "checkpoint-2"))
    assert len(losses) == 4 and resumed[-2:] == losses[2:]  # (its log history starts with the first 2)
    after, trained = first.state_dict(), again.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {k for k in before if "lora_" in k} and len(moved) >= 8
    assert all(torch.equal(after[k], trained[k]) for k in after)


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
