"""LoRA on torch.distributed (gloo on CPU; NCCL runs the same code): DDP and FSDP2 (fully_shard)
training match single-process training on the concatenated batch, and save_adapter writes a PEFT
adapter from rank 0 that lora_ext and PEFT both load.

Each test spawns its own process group (torch.multiprocessing.spawn, a free TCP port); the
workers save what they saw to files and the test compares it with a single-process run.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lora_ext
from lora_ext.distributed import fully_shard_lora, lora_parameters, save_adapter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402
from models import tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TARGETS = ["q_proj", "v_proj"]
STEPS, LR = 3, 1e-2
# fp32: the only difference from one process is the order of the cross-rank gradient sum
RTOL, ATOL = 1e-5, 1e-6


def _spawn(case: str, world_size: int, out_dir: str) -> list[dict]:
    return dist_helpers.spawn(__name__, "_case", world_size, case, out_dir)


# ---------------------------------------------------------------- models and data (same in every process)
def llama_with_lora():
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    lora_ext.inject(model, TARGETS, r=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():  # non-zero B: A and B both get gradients
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    lora_ext.mark_only_lora_trainable(model)
    return model.train()


def llama_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(100 + step))


def mlp_with_lora():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 41), nn.ReLU(), nn.Linear(41, 30), nn.ReLU(), nn.Linear(30, 5))
    lora_ext.inject(model, ["0", "2"], r=3, alpha=6)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    lora_ext.mark_only_lora_trainable(model)
    return model.train()


def mlp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(8, 30, generator=g), torch.randn(8, 5, generator=g)


def _loss(kind: str, model, batch):
    if kind == "llama":
        return model(input_ids=batch, labels=batch).loss
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _shard(batch, rank: int, world_size: int):
    if isinstance(batch, tuple):
        return tuple(_shard(b, rank, world_size) for b in batch)
    n = batch.shape[0] // world_size
    return batch[rank * n:(rank + 1) * n]


def reference(kind: str) -> dict:
    """One process, the whole batch, the same AdamW steps."""
    model = llama_with_lora() if kind == "llama" else mlp_with_lora()
    opt = torch.optim.AdamW(lora_parameters(model), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        loss = _loss(kind, model, llama_batch(step) if kind == "llama" else mlp_batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "grads": grads, "params": params, "model": model}


# ---------------------------------------------------------------- the workers
def _case(rank: int, world_size: int, case: str, out_dir: str) -> dict:
    return {"ddp": _ddp, "fsdp_llama": _fsdp, "fsdp_mlp": _fsdp}[case](rank, world_size, case, out_dir)


def _ddp(rank: int, world_size: int, case: str, out_dir: str) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = llama_with_lora()
    ddp = nn.parallel.DistributedDataParallel(model)
    reduced = []  # numel of every bucket DDP all-reduces

    def hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    opt = torch.optim.AdamW(lora_parameters(ddp), lr=LR)
    losses, grads, reduced_per_step = [], [], []
    for step in range(STEPS):
        loss = _loss("llama", ddp, _shard(llama_batch(step), rank, world_size))
        opt.zero_grad(set_to_none=True)
        reduced.clear()
        loss.backward()
        reduced_per_step.append(sum(reduced))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.item())
    save_adapter(ddp, os.path.join(out_dir, "ddp_adapter"))
    try:  # DDP registered its parameters already: factors injected now would never be all-reduced
        lora_ext.inject(ddp, ["k_proj"])
        inject_error = None
    except ValueError as e:
        inject_error = str(e)
    return {"losses": losses, "grads": grads, "reduced": reduced_per_step, "inject_error": inject_error,
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "lora_numel": sum(p.numel() for p in lora_parameters(ddp)),
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def _fsdp(rank: int, world_size: int, case: str, out_dir: str) -> dict:
    import lora_ext.layers as layers_mod
    from torch.distributed.tensor import DTensor

    kind = "llama" if case == "fsdp_llama" else "mlp"
    model = llama_with_lora() if kind == "llama" else mlp_with_lora()
    seen = []  # what LoRALinear hands the fused op: plain tensors after FSDP2's all-gather
    op = layers_mod.lora_linear

    def recording_op(x, weight, bias, A, B, *args):
        seen.append(tuple(isinstance(t, DTensor) for t in (x, weight, bias, A, B) if t is not None)
                    + (tuple(A.shape),))
        return op(x, weight, bias, A, B, *args)

    layers_mod.lora_linear = recording_op
    fully_shard_lora(model)
    lora = lora_parameters(model)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(lora, lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        batch = llama_batch(step) if kind == "llama" else mlp_batch(step)
        loss = _loss(kind, model, _shard(batch, rank, world_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.item())
    state_ids = {id(p) for p in opt.state}
    opt_state_ok = (state_ids == {id(p) for p in lora}
                    and all(isinstance(v, DTensor) for s in opt.state.values() for k, v in s.items() if k != "step"))
    save_adapter(model, os.path.join(out_dir, f"{case}_adapter"))
    save_error = None
    if kind == "mlp":  # a write that fails on rank 0 raises on every rank (no rank hangs)
        blocker = os.path.join(out_dir, "not_a_dir")
        if rank == 0:
            open(blocker, "w").close()
        try:
            save_adapter(model, blocker)
        except RuntimeError as e:
            save_error = str(e)
    misuse = {}
    if kind == "mlp":  # what a sharded model refuses, by name
        for what, fn in (("merge", lambda: lora_ext.merge(model)), ("inject", lambda: lora_ext.inject(model, ["0"])),
                         ("from_model", lambda: lora_ext.Adapter.from_model(model))):
            try:
                fn()
            except ValueError as e:
                misuse[what] = str(e)
        if rank == 0:  # the `if rank == 0: save_adapter(...)` mistake: a clear error, no hang
            try:
                save_adapter(model, os.path.join(out_dir, "rank0_only"), timeout_s=2)
            except RuntimeError as e:
                misuse["rank0_only"] = str(e)
        dist.barrier()
        save_adapter(model, os.path.join(out_dir, f"{case}_adapter_again"))  # the next call pairs up
    return {"losses": losses, "grads": grads, "seen": seen, "sharded": sharded, "opt_state_ok": opt_state_ok,
            "n_opt_state": len(opt.state), "n_lora": len(lora), "save_error": save_error, "misuse": misuse,
            "params": {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}}


# ---------------------------------------------------------------- comparisons
def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs().max().item()
    return d, d / max(b.double().abs().max().item(), 1e-30)


def _compare(name: str, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], errs: list) -> None:
    assert set(got) == set(ref), f"{name}: {sorted(set(got) ^ set(ref))}"
    for k in ref:
        errs.append(_err(got[k], ref[k]))
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} {k}: {m}")


def _check_training(kind: str, results: list[dict], world_size: int, ref: dict) -> list:
    errs = []
    for step in range(STEPS):
        loss = sum(r["losses"][step] for r in results) / world_size  # equal shards: mean of means
        errs.append(_err(torch.tensor(loss), torch.tensor(ref["losses"][step])))
        assert loss == pytest.approx(ref["losses"][step], rel=RTOL, abs=ATOL)
        for r in results:
            _compare(f"{kind} step {step} grads", r["grads"][step], ref["grads"][step], errs)
    for r in results:
        _compare(f"{kind} params after {STEPS} steps", r["params"], ref["params"], errs)
    print(f"\n{kind}: max abs err {max(e[0] for e in errs):.2e}, max rel err {max(e[1] for e in errs):.2e}")
    return errs


def _check_saved(path: str, ref_model: nn.Module, kind: str) -> None:
    ad = lora_ext.Adapter.load(path)
    ref = lora_ext.lora_layers(ref_model)
    assert set(ad.layers) == set(ref)
    for name, w in ad.layers.items():
        A, B, s = ref[name].lora_factors()
        torch.testing.assert_close(w.A, A.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(w.B, B.detach(), rtol=RTOL, atol=ATOL)
        assert w.scale == s
    if kind != "llama":
        return
    ids = llama_batch(0)
    ours = tiny_llama(seed=0)
    lora_ext.load_adapter(ours, ad)
    ref_model.eval()
    with torch.no_grad():
        want = ref_model(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=RTOL, atol=ATOL)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=RTOL, atol=ATOL)


def test_ddp_matches_single_process(tmp_path):
    results = _spawn("ddp", 2, str(tmp_path))
    ref = reference("llama")
    _check_training("ddp", results, 2, ref)
    for r in results:
        assert r["trainable"] == sorted(n for n, p in ref["model"].named_parameters() if p.requires_grad)
        assert all(".lora_" in n for n in r["trainable"])
        assert r["reduced"] == [r["lora_numel"]] * STEPS  # DDP all-reduces exactly the LoRA factors
        for g in r["grads"]:
            assert all(".lora_" in n for n in g)  # frozen base: no gradient at all
        assert "already wrapped in DistributedDataParallel; inject the LoRA layers first" in r["inject_error"]
    _check_saved(str(tmp_path / "ddp_adapter"), ref["model"], "llama")


def test_fsdp2_llama_matches_single_process_and_saves_peft(tmp_path):
    results = _spawn("fsdp_llama", 2, str(tmp_path))
    ref = reference("llama")
    _check_training("fsdp2 llama", results, 2, ref)
    for r in results:
        assert r["sharded"]  # base weights and LoRA factors are sharded DTensors between steps
        assert r["opt_state_ok"] and r["n_opt_state"] == r["n_lora"] == 2 * 2 * len(TARGETS)
        # every call of the fused op got plain tensors (FSDP2 unshards before the block's forward)
        assert r["seen"] and all(not any(s[:-1]) for s in r["seen"])
        assert all(s[-1][0] == 4 for s in r["seen"])  # the full (unsharded) rank-4 factor
    _check_saved(str(tmp_path / "fsdp_llama_adapter"), ref["model"], "llama")


def test_fsdp2_world_size_4_uneven_shards(tmp_path):
    """4 ranks, rank-3 factors (one rank holds an empty shard of A), one LoRA layer per group."""
    results = _spawn("fsdp_mlp", 4, str(tmp_path))
    ref = reference("mlp")
    _check_training("fsdp2 mlp x4", results, 4, ref)
    for r in results:
        assert r["sharded"] and r["opt_state_ok"] and r["n_opt_state"] == r["n_lora"] == 4
        assert r["seen"] and all(not any(s[:-1]) and s[-1][0] == 3 for s in r["seen"])
        assert r["save_error"] is not None and "save_adapter: rank 0 could not write" in r["save_error"]
        # a sharded model refuses what would be lost or fail deep inside, by name
        assert "merge before tensor-parallel sharding (fully_shard takes unmerged layers only)" in r["misuse"]["merge"]
        assert "already sharded with fully_shard" in r["misuse"]["inject"]
        assert "use lora_ext.distributed.save_adapter" in r["misuse"]["from_model"]
    assert "rank(s) [1, 2, 3] did not call it within 2 s" in results[0]["misuse"]["rank0_only"]
    _check_saved(str(tmp_path / "fsdp_mlp_adapter"), ref["model"], "mlp")
    _check_saved(str(tmp_path / "fsdp_mlp_adapter_again"), ref["model"], "mlp")


# ---------------------------------------------------------------- one process, no process group
def test_save_adapter_without_process_group(tmp_path):
    model = mlp_with_lora()
    save_adapter(model, str(tmp_path / "a"))
    ad = lora_ext.Adapter.load(str(tmp_path / "a"))
    torch.testing.assert_close(ad.layers["0"].B, model[0].lora_B.detach(), rtol=0, atol=0)


def test_bad_input_names_the_module(tmp_path):
    plain = nn.Sequential(nn.Linear(4, 4))
    for fn in (lambda: save_adapter(plain, str(tmp_path / "x")), lambda: lora_parameters(plain),
               lambda: fully_shard_lora(plain)):
        with pytest.raises(ValueError, match=r"Sequential has no LoRA layers \(use lora_ext.inject"):
            fn()
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="save_adapter: expected an nn.Module"):
        save_adapter({"lora_A": torch.zeros(1)}, str(tmp_path / "x"))
    model = mlp_with_lora()
    with pytest.raises(ValueError, match=r"blocks must be submodules of Sequential"):
        fully_shard_lora(model, blocks=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"blocks=.*Embedding.* matched no module of Sequential"):
        fully_shard_lora(model, blocks=nn.Embedding)
    model[0].merge()
    with pytest.raises(ValueError, match=r"fully_shard_lora: LoRA layer\(s\) \['0'\] are merged"):
        fully_shard_lora(model)


# ---------------------------------------------------------------- 2-D mesh: FSDP2 (dp) x tensor parallel (tp)
D2, H2, R2 = 16, 48, 4


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(D2, H2)
        self.down_proj = nn.Linear(H2, D2)

    def forward(self, x):
        return x + self.down_proj(nn.functional.gelu(self.up_proj(x)))


class _TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def mlp2d_with_lora():
    torch.manual_seed(0)
    model = _TinyMLP()
    lora_ext.inject(model, ["up_proj", "down_proj"], r=R2, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    lora_ext.mark_only_lora_trainable(model)
    return model.train()


def mlp2d_batch(step: int) -> torch.Tensor:
    return torch.randn(8, 5, D2, generator=torch.Generator().manual_seed(300 + step))


def _reference_2d() -> dict:
    model = mlp2d_with_lora()
    opt = torch.optim.AdamW(lora_parameters(model), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        loss = model(mlp2d_batch(step)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "model": model,
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def _fsdp_tp(rank: int, world_size: int, out_dir: str) -> dict:
    import lora_ext.tp as tp_mod
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.distributed import ColwiseParallelLoRA, RowwiseParallelLoRA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = mlp2d_with_lora()
    seen = []  # (any DTensor?, A shape, B shape) for each call of the fused op in the TP layers
    op = tp_mod.lora_linear

    def recording_op(x, weight, bias, A, B, *args):
        seen.append((any(isinstance(t, DTensor) for t in (x, weight, bias, A, B)), tuple(A.shape), tuple(B.shape)))
        return op(x, weight, bias, A, B, *args)

    tp_mod.lora_linear = recording_op
    parallelize_module(model, mesh["tp"], {"blocks.*.up_proj": ColwiseParallelLoRA(),
                                           "blocks.*.down_proj": RowwiseParallelLoRA()})
    fully_shard_lora(model, mesh=mesh["dp"])  # each block, then the root, sharded over "dp"
    lora = lora_parameters(model)
    meshes = {tuple(p.device_mesh.mesh_dim_names) for p in model.parameters() if isinstance(p, DTensor)}
    sharded = all(isinstance(p, DTensor) for p in model.parameters()) and meshes == {("dp", "tp")}
    opt = torch.optim.AdamW(lora, lr=LR)
    dp = mesh["dp"].get_local_rank()
    losses, grads = [], []
    for step in range(STEPS):
        x = _shard(mlp2d_batch(step), dp, 2)  # both tp ranks of a dp group see the same rows
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.item())
    tp_mod.lora_linear = op
    save_adapter(model, os.path.join(out_dir, "fsdp_tp_adapter"))
    return {"losses": losses, "grads": grads, "seen": seen, "sharded": sharded, "dp": dp,
            "n_opt_state": len(opt.state), "n_lora": len(lora),
            "params": {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}}


def test_fsdp2_x_tensor_parallel_2d_mesh(tmp_path):
    """4 ranks on a (dp=2, tp=2) mesh: ColwiseParallelLoRA / RowwiseParallelLoRA on mesh['tp'],
    then fully_shard_lora on mesh['dp']; 3 AdamW steps on the LoRA factors match one process on
    the concatenated batch (losses, every LoRA gradient, the trained factors, the saved adapter)."""
    results = dist_helpers.spawn(__name__, "_fsdp_tp", 4, str(tmp_path))
    ref = _reference_2d()
    errs = []
    for step in range(STEPS):
        for dp in (0, 1):  # the tp ranks of a dp group compute the same loss
            a, b = (r["losses"][step] for r in results if r["dp"] == dp)
            assert a == pytest.approx(b, rel=RTOL, abs=ATOL)
        loss = sum(r["losses"][step] for r in results) / 4
        errs.append(_err(torch.tensor(loss), torch.tensor(ref["losses"][step])))
        assert loss == pytest.approx(ref["losses"][step], rel=RTOL, abs=ATOL)
        for r in results:
            _compare(f"fsdp x tp step {step} grads", r["grads"][step], ref["grads"][step], errs)
    for r in results:
        _compare(f"fsdp x tp params after {STEPS} steps", r["params"], ref["params"], errs)
        assert r["sharded"] and r["n_opt_state"] == r["n_lora"] == 2 * 2 * 2
        # the fused op ran on plain local tensors: the TP shard (h/2 rows or columns) of the
        # FSDP-unsharded (full rank r) factors
        assert set(s[1:] for s in r["seen"]) == {((R2, D2), (H2 // 2, R2)), ((R2, H2 // 2), (D2, R2))}
        assert not any(s[0] for s in r["seen"]) and len(r["seen"]) == 4 * STEPS
    print(f"\nfsdp2 x tp (2x2): max abs err {max(e[0] for e in errs):.2e}, max rel err {max(e[1] for e in errs):.2e}")
    _check_saved(str(tmp_path / "fsdp_tp_adapter"), ref["model"], "mlp")
