"""DoRA (use_dora) through the rest of the package: what supports DoRA layers and adapters (merge /
merge_and_unload, save_adapter and training under DDP / FSDP2, `python -m lora_ext merge` of one
adapter) and what refuses them by name (combine, AdapterPool / MultiLoRALinear / patch_peft's mixed
batches, tensor parallelism, CLI sums). PEFT 0.21 is the oracle."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import lora_ext
from lora_ext import Adapter, LayerWeights
from lora_ext.distributed import fully_shard_lora, lora_parameters, save_adapter
from lora_ext.merge import merge_overhead
from lora_ext.peft_pools import POOL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402
from models import tiny_gpt2, tiny_llama  # noqa: E402

peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj"]
STEPS, LR = 2, 1e-2
RTOL, ATOL = 1e-5, 1e-6


def trained(model, seed: int, scale: float = 0.1):
    """Non-zero factors and magnitudes away from the norm (g != 1), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def dora_llama(seed: int = 1):
    model = tiny_llama(seed=0)
    torch.manual_seed(seed)
    lora_ext.inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    lora_ext.mark_only_lora_trainable(model)
    return trained(model, seed)


def peft_dora(path, seed: int = 1, make=tiny_llama, targets=TARGETS):
    """A PEFT DoRA adapter saved at `path`; returns the PeftModel (eval)."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(make(seed=0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    trained(pm, seed).save_pretrained(path)
    return pm.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- 1. combine
def test_combine_refuses_dora_and_peft_add_weighted_adapter_drops_the_magnitudes():
    # PEFT's add_weighted_adapter takes DoRA adapters, but the result (use_dora kept from the first)
    # gets a fresh magnitude, the base weight's row norms: the trained magnitudes are lost
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(8, 6)), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True),
                             adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    trained(pm, 1, scale=0.3)
    pm.add_weighted_adapter(["one", "two"], [0.5, 0.5], "sum", combination_type="cat")
    layer = pm.base_model.model[0]
    assert pm.peft_config["sum"].use_dora
    torch.testing.assert_close(layer.lora_magnitude_vector["sum"].weight, layer.base_layer.weight.norm(dim=1))
    assert not torch.allclose(layer.lora_magnitude_vector["one"].weight, layer.base_layer.weight.norm(dim=1))

    dora, plain = Adapter.from_model(dora_llama(1)), Adapter.from_model(trained(_plain_llama(), 2))
    dora.name = "sql"
    for adapters, who in (([dora, dora], "adapter 0 ('sql')"), ([plain, dora], "adapter 1 ('sql')")):
        with pytest.raises(ValueError, match=rf"combine: {re.escape(who)} is a DoRA adapter \(module "
                                             r"'model\.layers\.0\.self_attn\.q_proj' has a lora_magnitude_vector\): "
                                             r"a weighted sum"):
            lora_ext.combine(adapters, [0.5, 0.5])
    single = Adapter({n: LayerWeights(w.A, w.B, w.scale) for n, w in plain.layers.items()}, {"use_dora": True}, "cfg")
    with pytest.raises(ValueError, match=r"adapter 0 \('cfg'\) is a DoRA adapter \(its config says use_dora=true\)"):
        lora_ext.combine([single], how="linear")
    lw = dora.layers["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"combine: adapter 1 is a DoRA layer \(LayerWeights.magnitude is set\)"):
        lora_ext.combine([(lw.A, lw.B, lw.scale), lw])
    lora_ext.combine([plain, plain])  # plain LoRA still combines


def _plain_llama():
    model = tiny_llama(seed=0)
    lora_ext.inject(model, TARGETS, r=4, alpha=8)
    return model


# ---------------------------------------------------------------- 2. pools and multi-adapter layers
@torch.no_grad()
def test_pools_and_multi_adapter_layers_refuse_dora(tmp_path):
    peft_dora(tmp_path / "dora")
    model = tiny_llama(seed=0)
    pool = lora_ext.AdapterPool(model, target_modules=TARGETS, max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=rf"AdapterPool.load\('d', '{re.escape(str(tmp_path))}/dora'\): the adapter "
                                         r"is DoRA \(module 'model\.layers\.0\.self_attn\.q_proj' has a lora_magnitude_vector\)"):
        pool.load("d", tmp_path / "dora")
    ad = Adapter.from_model(dora_llama())
    with pytest.raises(ValueError, match=r"AdapterPool.load\('d'\): the adapter is DoRA .* built without dora=True"):
        pool.load("d", ad)
    no_mag = Adapter({n: LayerWeights(w.A, w.B, w.scale) for n, w in ad.layers.items()}, {"use_dora": True})
    with pytest.raises(ValueError, match=r"the adapter is DoRA \(its config says use_dora=true\)"):
        pool.load("d", no_mag)
    assert len(pool) == 0 and pool.resident() == []
    want = logits(tiny_llama(seed=0))
    with pool.batch([None, None]):  # still the base model
        torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    # a model with injected DoRA layers: a pool or a multi-adapter layer is never built from them
    injected = dora_llama()
    with pytest.raises(ValueError, match=r"AdapterPool: target_modules=\['q_proj'\] matches "
                                         r"'model\.layers\.0\.self_attn\.q_proj', an injected LoRALinear \(DoRA\)"):
        lora_ext.AdapterPool(injected, target_modules=["q_proj"])
    assert type(injected.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"  # nothing replaced
    with pytest.raises(TypeError, match="MultiLoRALinear: base must be an nn.Linear or transformers Conv1D, "
                                        "got LoRALinear"):
        lora_ext.MultiLoRALinear(injected.model.layers[0].self_attn.q_proj, 2, 4)
    # patch_peft's mixed batches (peft_pools): PEFT's own refusal, before any pool is built
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "dora", adapter_name="d").eval()
    lora_ext.patch_peft(pm)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        pm(input_ids=IDS, adapter_names=["d", "__base__"])
    assert not any(POOL in m.__dict__ for m in pm.modules())


# ---------------------------------------------------------------- 3, 4. tensor parallel, DDP, FSDP2
def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(100 + step))


def _train(model, opt_model, rank: int = 0, world: int = 1) -> list[float]:
    opt = torch.optim.AdamW(lora_parameters(opt_model), lr=LR)
    losses = []
    for step in range(STEPS):
        ids = _batch(step)[rank * 4 // world:(rank + 1) * 4 // world]
        loss = opt_model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _trained_params(model) -> dict:
    return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _dist_case(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA, validate_plan
    res = {}
    for mode in ("ddp", "fsdp2"):
        model = dora_llama().train()
        wrapped = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else fully_shard_lora(model)
        res[mode] = {"losses": _train(model, wrapped, rank, world), "n_lora": len(lora_parameters(wrapped))}
        save_adapter(wrapped, os.path.join(out_dir, mode))
        res[mode]["params"] = _trained_params(model)
    mesh = init_device_mesh("cpu", (world,))
    for style in (ColwiseParallelLoRA(), RowwiseParallelLoRA()):
        try:
            validate_plan(dora_llama(), mesh, {"model.layers.*.self_attn.v_proj": style})
            res[type(style).__name__] = None
        except ValueError as e:
            res[type(style).__name__] = str(e)
    return res


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_dora_trains_under_ddp_and_fsdp2_saves_for_peft_and_is_not_tensor_parallel(tmp_path):
    results = dist_helpers.spawn(__name__, "_dist_case", 2, str(tmp_path))
    ref = dora_llama().train()
    ref_losses = _train(ref, ref)
    ref_params = _trained_params(ref)
    assert sum("lora_magnitude_vector" in n for n in ref_params) == 2 * len(TARGETS)
    for mode in ("ddp", "fsdp2"):
        losses = [sum(r[mode]["losses"][s] for r in results) / 2 for s in range(STEPS)]
        assert losses == pytest.approx(ref_losses, rel=RTOL, abs=ATOL), mode
        for r in results:
            assert r[mode]["n_lora"] == 3 * 2 * len(TARGETS)  # A, B and the magnitude of each layer
            assert set(r[mode]["params"]) == set(ref_params)
            for n, p in ref_params.items():
                torch.testing.assert_close(r[mode]["params"][n], p, rtol=RTOL, atol=ATOL, msg=f"{mode} {n}")
        path = str(tmp_path / mode)
        ad = Adapter.load(path)
        assert ad.config["use_dora"] is True
        for n, w in ad.layers.items():
            torch.testing.assert_close(w.magnitude, ref_params[n + ".lora_magnitude_vector"], rtol=RTOL, atol=ATOL)
        want = logits(ref.eval())
        pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), path).eval()
        torch.testing.assert_close(logits(pm), want, rtol=RTOL, atol=ATOL, msg=mode)
    for style in ("ColwiseParallelLoRA", "RowwiseParallelLoRA"):
        for r in results:
            want = (f"{style}: module 'model.layers.0.self_attn.v_proj' (LoRALinear(in_features=64, out_features=32, "
                    "r=4, use_dora=True)): DoRA layers (use_dora, or a pool's dora=True) are not tensor-parallel")
            assert r[style] is not None and r[style].startswith(want), r[style]


def test_save_adapter_and_lora_parameters_without_process_group(tmp_path):
    model = dora_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in lora_parameters(model))
    assert got == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # magnitudes included
    save_adapter(model, str(tmp_path / "a"))
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(pm), logits(model.eval()), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- 5. python -m lora_ext merge / inspect
def cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_ext", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))


def test_cli_refuses_dora_in_weighted_sums_and_inspect_says_what_it_supports(tmp_path):
    base = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base)
    pm = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    trained(pm, 2).save_pretrained(tmp_path / "plain")
    peft_dora(tmp_path / "dora")
    for args in ([tmp_path / "plain", tmp_path / "dora"], [tmp_path / "dora", "--weights", "0.5"]):
        r = cli("merge", base, *args, "--out", tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"python -m lora_ext merge: error: {tmp_path / 'dora'} is a DoRA adapter (use_dora): it merges only alone "
            "and with weight 1 (a weighted sum of DoRA adapters is not a DoRA adapter: each rescales the rows of "
            "W0 + ΔWᵢ by its own trained magnitude)")
        assert not (tmp_path / "out").exists()
    # one DoRA adapter merges; into a bf16 model as PEFT merges it (fp32 factors and magnitude, one rounding)
    r = cli("merge", base, tmp_path / "dora", "--dtype", "bfloat16", "--out", tmp_path / "bf16")
    assert r.returncode == 0, r.stderr
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    ref = peft.PeftModel.from_pretrained(tiny_llama(seed=0, dtype=torch.bfloat16), tmp_path / "dora").merge_and_unload()
    assert got.keys() == ref.state_dict().keys()
    assert all(torch.equal(got[k], t) for k, t in ref.state_dict().items())  # bit for bit
    r = cli("inspect", tmp_path / "dora", "--pool")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = " ".join(r.stdout.split())
    assert "use_dora │ true" in out and "DoRA magnitudes │ 192 (lora_magnitude_vector" in out, out
    assert ("lora_ext: loads (Adapter.load, load_adapter) and merges (python -m lora_ext merge, alone and with "
            "weight 1: DoRA adapters are not combined)") in out
    assert "AdapterPool: can serve it (dora=True, max_rank >= 4" in out


# ---------------------------------------------------------------- 6. merge / unmerge / merge_and_unload
@pytest.mark.parametrize("make,targets", [(tiny_llama, TARGETS + ["down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2_conv1d"])
def test_merge_and_unload_matches_peft_and_unmerge_restores_the_weights(tmp_path, make, targets):
    pm = peft_dora(tmp_path / "a", make=make, targets=targets)
    ours = make(seed=0)
    lora_ext.load_adapter(ours, str(tmp_path / "a"))
    want, base = logits(pm), {n: p.clone() for n, p in make(seed=0).state_dict().items()}
    torch.testing.assert_close(logits(ours), want, rtol=RTOL, atol=ATOL)
    layers = lora_ext.lora_layers(ours)
    assert layers and all(m.use_dora for m in layers.values())
    assert sorted(lora_ext.merge(ours, safe=True)) == sorted(layers)
    torch.testing.assert_close(logits(ours), want, rtol=RTOL, atol=ATOL)
    assert set(merge_overhead(ours).values()) == {1.0}  # the copy of W0
    assert sorted(lora_ext.unmerge(ours)) == sorted(layers)
    assert all(torch.equal(m.weight, base[n + ".weight"]) for n, m in layers.items())  # bit for bit
    lora_ext.merge(ours)
    name, layer = next(iter(layers.items()))
    layer.weight = nn.Parameter(layer.weight.detach().double(), requires_grad=False)
    with pytest.raises(ValueError, match=rf"unmerge: layer '{name}': DoraMergeState: the weight is .* torch.float64"):
        lora_ext.unmerge(ours)
    assert all(m.merged for m in layers.values())  # checked first: nothing unmerged
    merged = lora_ext.merge_and_unload(_loaded(make, tmp_path / "a"))
    assert not lora_ext.lora_layers(merged)
    peft_merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(peft_merged), rtol=RTOL, atol=ATOL)
    assert merged.state_dict().keys() == peft_merged.state_dict().keys()


def _loaded(make, path):
    model = make(seed=0)
    lora_ext.load_adapter(model, str(path))
    return model


def test_safe_merge_refuses_a_non_finite_dora_scale():
    """A zero row of W with B's row zero: ||W + sBA|| = 0 and the fresh magnitude 0, so g = 0/0."""
    layer = lora_ext.LoRALinear.from_linear(nn.Linear(8, 4), r=2, alpha=2, use_dora=True)
    with torch.no_grad():
        layer.weight[1].zero_()
        layer.reset_lora_parameters()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"merge: layer '0': merge: the DoRA merge g·\(W \+ s·B·A\) would overflow "
                                         r"to inf/NaN in the torch.float32 weight"):
        lora_ext.merge(model, safe=True)
    assert not layer.merged and torch.isfinite(layer.weight).all()


def test_merged_dora_layer_takes_a_new_magnitude_and_trains_only_unmerged():
    model = trained(nn.Sequential(lora_ext.LoRALinear.from_linear(nn.Linear(8, 4), r=2, alpha=2, use_dora=True)), 3)
    x, new = torch.randn(3, 8), model[0].lora_magnitude_vector.detach() * 2
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[0].lora_magnitude_vector.copy_(new)
    lora_ext.merge(model)
    model.load_state_dict({"0.lora_magnitude_vector": new}, strict=False)  # unmerged, loaded, merged again
    assert model[0].merged
    torch.testing.assert_close(model(x), ref(x), rtol=RTOL, atol=ATOL)
    model[0].drop_merge_state()
    model[0].lora_A.requires_grad_(False)
    model[0].lora_B.requires_grad_(False)
    with pytest.raises(ValueError, match="merged for good .* its factors would not train"):
        model.train()  # the magnitude alone still requires grad


@pytest.mark.cuda
def test_merge_and_unload_on_cuda_matches_peft(tmp_path):
    pm = peft_dora(tmp_path / "a")
    ours = _loaded(tiny_llama, tmp_path / "a").cuda()
    merged = lora_ext.merge_and_unload(ours, safe=True)
    torch.testing.assert_close(logits(merged, IDS.cuda()).cpu(), logits(pm.merge_and_unload()), rtol=RTOL, atol=ATOL)
