"""Distributed training workflows as a user runs them (2 gloo ranks, spawned once for the module):
activation checkpointing (torch's apply_activation_checkpointing) under FSDP2 and the adapter it
saves, FSDP1 refused by save_adapter, gradient accumulation (DDP no_sync, FSDP2
set_requires_gradient_sync), a sharded model's full state dict / DCP checkpoint and a merge in the
single-process copy (what merge's error advises), tensor-parallel AdamW training and colwise dropout.
Everything is compared with one process on the whole batch (fp32: only the order of sums differs)."""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lora_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

D, H, LR = 12, 20, 1e-2
TOL = dict(rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def base():
    torch.manual_seed(0)
    return Net()


def lora_model(dropout=0.0, train_head=False):
    m = base()
    lora_ext.inject(m, ["up", "down"], r=3, alpha=6, dropout=dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_ext.lora_layers(m).values():  # B != 0: A and B both get gradients
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    lora_ext.mark_only_lora_trainable(m, bias="lora_only" if train_head else "none")
    m.head.requires_grad_(train_head)
    return m.train()


def batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, D, generator=g), torch.randn(n, 3, generator=g)


def trained(m):
    return [p for p in m.parameters() if p.requires_grad]


def _full(t):
    from torch.distributed.tensor import DTensor
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def params_of(m):
    return {n.replace("_checkpoint_wrapped_module.", ""): _full(p) for n, p in m.named_parameters() if p.requires_grad}


def reference(steps, accum=1, train_head=False):
    """One process, the whole batch: losses (per micro-batch) and the trained parameters."""
    m = lora_model(train_head=train_head)
    opt = torch.optim.AdamW(trained(m), lr=LR)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        for a in range(accum):
            x, y = batch(s * accum + a)
            loss = F.mse_loss(m(x), y) / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
    return losses, params_of(m), m


def _mine(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def _mean(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _train(m, step_fn, steps, accum=1):
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = torch.optim.AdamW(trained(m), lr=LR)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        for a in range(accum):
            x, y = batch(s * accum + a)
            with step_fn(a == accum - 1):
                loss = F.mse_loss(m(_mine(x, rank, world)), _mine(y, rank, world)) / accum
                loss.backward()
            losses.append(_mean(loss.item()))
        opt.step()
    return losses


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------- the scenarios (each rank)
def _checkpointed_fsdp2(mesh, out_dir):
    """FSDP2 + torch's activation checkpointing wrappers, a trained head and biases, saved."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lora_ext.distributed import fully_shard_lora, save_adapter
    m = lora_model(train_head=True)
    apply_activation_checkpointing(m, check_fn=lambda mod: isinstance(mod, Block))
    fully_shard_lora(m)  # each (wrapped) block, then the root
    losses = _train(m, lambda last: _Nothing(), steps=2)
    save_adapter(m, os.path.join(out_dir, "checkpointed"), modules_to_save=["head"])
    # FSDP1: its parameters are flattened shards outside forward; refused by name, on every rank
    fsdp1 = FullyShardedDataParallel(lora_model(), use_orig_params=True, device_id=torch.device("cpu"))
    fsdp1_errors = []
    for fn in (lambda: save_adapter(fsdp1, os.path.join(out_dir, "fsdp1")), lambda: lora_ext.Adapter.from_model(fsdp1)):
        try:
            fn()
            fsdp1_errors.append(None)
        except Exception as e:  # noqa: BLE001  (the test checks the type)
            fsdp1_errors.append(f"{type(e).__name__}: {e}")
    return {"losses": losses, "params": params_of(m), "fsdp1_errors": fsdp1_errors}


def _accumulation(mesh, out_dir):
    """2 micro-batches per step: DDP's no_sync and FSDP2's set_requires_gradient_sync(False)."""
    from lora_ext.distributed import fully_shard_lora
    out = {}
    m = lora_model()
    ddp = nn.parallel.DistributedDataParallel(m)
    out["ddp"] = _train(ddp, lambda last: _Nothing() if last else ddp.no_sync(), steps=2, accum=2), params_of(m)
    m = fully_shard_lora(lora_model())

    def sync(last):
        m.set_requires_gradient_sync(last)
        return _Nothing()
    out["fsdp2"] = _train(m, sync, steps=2, accum=2), params_of(m)
    return out


def _state_dicts(mesh, out_dir):
    """A sharded model's full state dict in a single-process copy (merged there), loaded back into a
    fresh sharded model, and a DCP checkpoint of the sharded state dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from lora_ext.distributed import fully_shard_lora
    m = fully_shard_lora(lora_model())
    _train(m, lambda last: _Nothing(), steps=1)
    x, _ = batch(9)
    with torch.no_grad():
        want = m(x)
    sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {}
    if dist.get_rank() == 0:  # cpu_offload: rank 0 holds the full state dict
        single = lora_model()
        single.load_state_dict(sd)
        lora_ext.merge(single)
        with torch.no_grad():
            out["merged"] = (single(x) - want).abs().max().item()
    fresh = fully_shard_lora(lora_model())
    set_model_state_dict(fresh, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    dcp.save({"model": m.state_dict()}, checkpoint_id=os.path.join(out_dir, "dcp"))
    restored = fully_shard_lora(lora_model())
    state = {"model": restored.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    restored.load_state_dict(state["model"])
    with torch.no_grad():
        out["reloaded"] = (fresh(x) - want).abs().max().item()
        out["dcp"] = (restored(x) - want).abs().max().item()
    return out


def _tensor_parallel(mesh, out_dir):
    """up colwise, down rowwise: 3 AdamW steps on the same batch on every rank, then save_adapter;
    a colwise layer with dropout, seeded alike, draws the single-process mask."""
    import copy

    from torch.distributed.tensor import Replicate

    from lora_ext.distributed import save_adapter
    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA, parallelize_lora
    m = lora_model()
    parallelize_lora(m, mesh, {"blocks.*.up": ColwiseParallelLoRA(), "blocks.*.down": RowwiseParallelLoRA()})
    opt = torch.optim.AdamW(trained(m), lr=LR)
    losses = []
    for s in range(3):
        x, y = batch(s)
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    save_adapter(m, os.path.join(out_dir, "tp"))
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(D, H, r=3, alpha=6, dropout=0.4)
    nn.init.normal_(layer.lora_B, std=0.1)
    tp = parallelize_lora(nn.Sequential(copy.deepcopy(layer)), mesh, {"0": ColwiseParallelLoRA(output_layouts=Replicate())})
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    y_ref = layer(x)
    y_ref.square().sum().backward()
    torch.manual_seed(7)
    y_tp = tp(x)
    y_tp.square().sum().backward()
    dropout = {"y": (y_tp, y_ref), "dA": (_full(tp[0].lora_A.grad), layer.lora_A.grad),
               "dB": (_full(tp[0].lora_B.grad), layer.lora_B.grad)}
    return {"losses": losses, "params": params_of(m), "dropout": dropout}


SCENARIOS = {"checkpointed": _checkpointed_fsdp2, "accumulation": _accumulation, "state_dicts": _state_dicts,
             "tensor_parallel": _tensor_parallel}


def _run(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for name, fn in SCENARIOS.items():
        try:
            res[name] = fn(mesh, out_dir)
        except Exception:
            res[name] = {"error": traceback.format_exc()}
    return res


@pytest.fixture(scope="module")
def ws2(tmp_path_factory):
    out = tmp_path_factory.mktemp("user_distributed")
    return dist_helpers.spawn(__name__, "_run", 2, str(out)), out


def _get(ws2, name):
    results, out = ws2
    per_rank = [r[name] for r in results]
    for r in per_rank:
        assert "error" not in r, r["error"]
    return per_rank, out


def _same(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- the tests
def test_activation_checkpointing_under_fsdp2_trains_and_saves_the_unwrapped_names(ws2):
    """apply_activation_checkpointing puts `_checkpoint_wrapped_module` between a block and its
    layers: training matches one process, and save_adapter names the modules as the unwrapped model
    (and PEFT) does, so lora_ext and PEFT load the adapter (it used to write
    `blocks.0._checkpoint_wrapped_module.up`: load_adapter refused it and PEFT loaded nothing)."""
    per_rank, out = _get(ws2, "checkpointed")
    ref_losses, ref_params, ref = reference(steps=2, train_head=True)
    for r in per_rank:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        _same(r["params"], ref_params)
    path = str(out / "checkpointed")
    x, _ = batch(9)
    with torch.no_grad():
        want = ref.eval()(x)
    ad = lora_ext.Adapter.load(path)
    assert sorted(ad.layers) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert all("_checkpoint_wrapped_module" not in k for k in ad.extra)
    plain = base()
    lora_ext.load_adapter(plain, ad)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, **TOL)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(base(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, **TOL)


def test_save_adapter_and_from_model_refuse_fsdp1_by_name(ws2):
    """FSDP1's parameters are flattened shards outside forward. save_adapter said "rank 0 holds other
    LoRA layers than rank 1"; Adapter.from_model returned the shards (rank 0 / 36 / 60) silently."""
    per_rank, _ = _get(ws2, "checkpointed")
    for r in per_rank:
        for where, err in zip(("save_adapter", "Adapter.from_model"), r["fsdp1_errors"]):
            assert err is not None and err.startswith(f"ValueError: {where}: the model is wrapped in FSDP1's "
                                                      "FullyShardedDataParallel"), err
            assert "fully_shard" in err


def test_checkpoint_wrapped_model_state_dict_and_adapter_use_the_unwrapped_names(tmp_path):
    """One process: apply_activation_checkpointing's wrappers are not in the names of
    lora_state_dict (loralib's load_state_dict(strict=False) round trip silently loaded nothing)
    or of Adapter.from_model (lora_ext refused its file and PEFT loaded none of it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    model = lora_model(train_head=True)  # wrappers around blocks and around LoRA layers
    apply_activation_checkpointing(model, check_fn=lambda mod: isinstance(mod, (Block, lora_ext.LoRALinear)))
    with torch.no_grad():
        for p in trained(model):
            p.add_(0.05)
    x, _ = batch(9)
    with torch.no_grad():
        want = model.eval()(x)
    sd = lora_ext.lora_state_dict(model, peft_names=False)
    assert sorted(sd) == sorted(k for k in model.state_dict() if ".lora_" in k or k.endswith(".bias"))
    other = lora_model(train_head=True)
    apply_activation_checkpointing(other, check_fn=lambda mod: isinstance(mod, Block))
    assert not other.load_state_dict(sd, strict=False).unexpected_keys
    got = other.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    ad = lora_ext.Adapter.from_model(model, modules_to_save=["head"])
    assert sorted(ad.layers) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert ad.config["modules_to_save"] == ["head"] and "blocks.0.up.base_layer.bias" in ad.extra
    ad.save(str(tmp_path / "a"))
    plain = base()
    lora_ext.load_adapter(plain, lora_ext.Adapter.load(str(tmp_path / "a")))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, **TOL)


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_gradient_accumulation_without_sync_matches_one_process(ws2, how):
    per_rank, _ = _get(ws2, "accumulation")
    ref_losses, ref_params, _ = reference(steps=2, accum=2)
    for r in per_rank:
        losses, params = r[how]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        _same(params, ref_params)


def test_full_state_dict_dcp_and_merge_in_a_single_process_copy(ws2):
    per_rank, _ = _get(ws2, "state_dicts")
    assert per_rank[0]["merged"] < 1e-5  # the merged single-process copy gives the sharded model's outputs
    for r in per_rank:
        assert r["reloaded"] == 0.0 and r["dcp"] == 0.0


def test_tensor_parallel_adamw_training_and_saved_adapter_match_one_process(ws2):
    per_rank, out = _get(ws2, "tensor_parallel")
    ref_losses, ref_params, _ = reference(steps=3)
    for r in per_rank:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        _same(r["params"], ref_params)
        for k, (got, want) in r["dropout"].items():  # colwise: the full x, the single-process mask
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"dropout {k}: {m}")
    ad = lora_ext.Adapter.load(str(out / "tp"))
    for name, w in ad.layers.items():
        torch.testing.assert_close(w.A, ref_params[f"{name}.lora_A"], **TOL)
        torch.testing.assert_close(w.B, ref_params[f"{name}.lora_B"], **TOL)
