"""AdapterPool serving LoRA on MoE experts (PEFT's target_parameters; lora_ext.multi_experts).

PEFT is the oracle: each row (token) of a mixed batch gets what the PeftModel of its adapter
gives for that row alone (the base model for None). Tiny Qwen3-MoE, Qwen2-MoE (shared expert), gpt-oss (transposed experts
with biases) and Mixtral; adapters of different ranks on both projections or one, with and
without target_modules beside them; per-row and per-token batches; eviction; errors; compile."""
import copy

import pytest
import torch
from conftest import devices, rel_err
from models import saved_peft
from param_cases import tiny_moe

import lora_ext
from lora_ext.multi_experts import MultiLoRAExperts

peft = pytest.importorskip("peft")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss", "mixtral", "qwen2_moe"])
def saved(request, tmp_path_factory):
    """(base, {name: (PeftModel, path)}): "a" on q_proj + both projections (r 3), "b" on down_proj
    only (r 5, alpha 3), "c" on both with rsLoRA (r 2)."""
    root = tmp_path_factory.mktemp(request.param)
    base = tiny_moe(request.param)
    cfgs = {"a": dict(target_modules=["q_proj"], target_parameters=EXPERTS, r=3),
            "b": dict(target_modules=[], target_parameters=EXPERTS[1:], r=5, lora_alpha=3),
            "c": dict(target_modules=[], target_parameters=EXPERTS, r=2, use_rslora=True)}
    return base, {n: (saved_peft(base, root / n, seed=i + 1, **cfg), root / n) for i, (n, cfg) in enumerate(cfgs.items())}


def make_pool(base, adapters, device="cpu", **kw):
    model = copy.deepcopy(base).to(device)
    pool = lora_ext.AdapterPool(model, **{"target_modules": ["q_proj"], "target_parameters": EXPERTS,
                                          "max_adapters": 3, "max_rank": 8, **kw})
    for n, (_, p) in adapters.items():
        pool.load(n, p)
    return model, pool


@torch.no_grad()
def reference(base, adapters, ids, names):
    """Each row through its adapter's PeftModel alone (None: the base model)."""
    return torch.cat([(adapters[n][0] if n in adapters else base)(input_ids=ids[i:i + 1]).logits for i, n in enumerate(names)])


@pytest.mark.parametrize("device", devices())
@torch.no_grad()
def test_mixed_batch_matches_peft(saved, device):
    base, adapters = saved
    model, pool = make_pool(base, adapters, device)
    names = ["a", None, "b", "c", "a", "__base__"]
    ids = torch.randint(0, 128, (len(names), 7), generator=torch.Generator().manual_seed(0))
    ref = reference(base, adapters, ids, names)
    assert rel_err(ref, base(input_ids=ids).logits) > 1e-2  # the adapters change the experts' outputs
    with pool.batch(names):
        got = model(input_ids=ids.to(device)).logits
    assert rel_err(got, ref) < 1e-5
    # per token: one sequence of one adapter, and decode steps ([T, 1]) of mixed adapters
    with pool.batch(["c"] * 7, per_token=True):
        got = model(input_ids=ids[:1].to(device)).logits
    assert rel_err(got, adapters["c"][0](input_ids=ids[:1]).logits) < 1e-5
    step = ids[:, :1]
    with pool.batch(names, per_token=True):
        got = model(input_ids=step.to(device)).logits
    assert rel_err(got, reference(base, adapters, step, names)) < 1e-5
    with pool.batch(["b"] * 2):  # outside a batch and with the indices changed: no stale slots
        pass
    assert rel_err(model(input_ids=ids.to(device)).logits, base(input_ids=ids).logits) < 1e-6


@torch.no_grad()
def test_bf16_pool_matches_peft(saved):
    base, adapters = saved
    model, pool = make_pool(base, adapters)
    model.to(torch.bfloat16)
    experts = pool.experts["model.layers.0.mlp.experts"]
    assert experts.slots["down_proj"].scales.dtype == torch.float32  # scales stay fp32
    names = ["c", "a", None]
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    with pool.batch(names):
        got = model(input_ids=ids).logits
    assert rel_err(got, reference(base, adapters, ids, names)) < 3e-2


@torch.no_grad()
def test_eviction_and_unload(saved):
    base, adapters = saved
    model, pool = make_pool(base, adapters, max_adapters=1)  # each load evicts the previous one
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    for names in (["a", None], ["b", "b"], [None, "c"], ["a", "a"]):
        with pool.batch(names):
            got = model(input_ids=ids).logits
        assert rel_err(got, reference(base, adapters, ids, names)) < 1e-5, names
    pool.unload("a")
    layer = pool.experts["model.layers.1.mlp.experts"]
    assert all(int(p.ranks.abs().sum()) == 0 and float(p.A_pool.abs().sum()) == 0 for p in layer.slots.values())
    assert rel_err(model(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-6


def test_experts_module_is_wrapped_transparently(saved):
    base, adapters = saved
    model, pool = make_pool(base, adapters)
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex, MultiLoRAExperts) and ex.num_experts == 4  # read from the wrapped module
    assert sorted(ex.slots) == sorted(p.rpartition(".")[2] for p in EXPERTS)
    assert tuple(ex.slots["down_proj"].A_pool.shape) == (3 * 4, 8, ex.base.down_proj.shape[1 if ex.is_transposed else 2])
    with pytest.raises(RuntimeError, match="inference layer"):  # autograd on: the base outputs require grad
        with pool.batch(["a"]):
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_errors_name_the_module(saved, tmp_path):
    base, adapters = saved
    with pytest.raises(ValueError, match=r"selects no parameter"):
        lora_ext.AdapterPool(copy.deepcopy(base), target_parameters=["mlp.experts.nothing"])
    with pytest.raises(TypeError, match="list of parameter names"):
        lora_ext.AdapterPool(copy.deepcopy(base), target_parameters="mlp.experts.down_proj")
    with pytest.raises(ValueError, match=r"q_proj.weight, which multi-adapter serving cannot serve"):
        lora_ext.AdapterPool(copy.deepcopy(base), target_parameters=["self_attn.q_proj.weight"])
    # a pool without target_parameters (or serving another projection) refuses the adapter by module
    plain = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.*does not serve.*target_parameters"):
        plain.load("a", adapters["a"][1])
    down = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=[], target_parameters=EXPERTS[1:], max_rank=8)
    down.load("b", adapters["b"][1])
    with pytest.raises(ValueError, match=r"gate_up_proj, which the pool's target_parameters do not select"):
        down.load("c", adapters["c"][1])
    small = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=[], target_parameters=EXPERTS, max_rank=4)
    with pytest.raises(ValueError, match=r"down_proj\) has rank 5; the pool takes 1 .. max_rank 4"):
        small.load("b", adapters["b"][1])
    assert small.names() == [] and down.names() == ["b"]
    # rows that do not divide the tokens the experts get
    model, pool = make_pool(base, adapters)
    layer = pool.experts["model.layers.0.mlp.experts"]
    with torch.no_grad(), pool.batch(["a", "b"]):
        with pytest.raises(ValueError, match="experts got 3 tokens, not a multiple of the 2 batch rows"):
            layer(torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


@torch.no_grad()
def test_compiled_model_does_not_recompile_on_swaps(saved):
    base, adapters = saved
    model, pool = make_pool(base, adapters)
    torch._dynamo.reset()
    fwd = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    with pool.batch(["a", None, "b"]):
        fwd(ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names in (["c", "a", None], ["b", "b", "c"]):
            with pool.batch(names):
                got = fwd(ids)
            assert rel_err(got, reference(base, adapters, ids, names)) < 1e-5, names


def test_hooks_on_the_experts_module_are_refused(saved):
    """Serving runs the experts from their parameters (lora_ext.moe), never calling the module: its
    hooks (accelerate's offloading, user hooks) would be skipped silently, so they are refused."""
    base, adapters = saved
    model = copy.deepcopy(base)
    model.model.layers[1].mlp.experts.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(ValueError, match=r"selects model.layers.1.mlp.experts.gate_up_proj.*has hooks"):
        lora_ext.AdapterPool(model, target_parameters=EXPERTS)
    model, pool = make_pool(base, adapters)
    pool.experts["model.layers.0.mlp.experts"].base.register_forward_pre_hook(lambda m, args: None)
    with torch.no_grad(), pool.batch(["a"]), pytest.raises(RuntimeError, match="has hooks"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
