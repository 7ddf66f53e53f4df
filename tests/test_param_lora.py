"""LoRAParameter (lora_ext.param_lora): LoRA on a module's parameter, PEFT's
``LoraConfig(target_parameters=[...])`` (its ParamWrapper), mainly transformers MoE expert stacks.

PEFT is the oracle: tiny Qwen3-MoE, gpt-oss (transposed [E, in, out] experts with biases), Mixtral
and Qwen2-MoE (shared expert beside the stack) models get PEFT's factors loaded into a
lora_ext-injected copy by state-dict name, and give PEFT's logits, loss and LoRA gradients, eval
and train, fp32 and bf16, on whatever path the forward takes ("auto": lora_ext.moe's fast path
where it applies) and on the generic path (the module's own forward with P + s B A), forced by
replacing lora_ext.moe. Also: r / scaling from rank_pattern / alpha_pattern / use_rslora as
PEFT's, custom 2-D targets (with their merges), torch.compile(fullgraph=True), and an fp64
gradcheck against a plain-torch reference. Expert-stack merges and errors: test_param_lora_edges.py;
models and pairs: param_cases.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, rel_err
from param_cases import (check_hparams_as_peft, check_parity, expert_reference, experts_of, fast_path_problem, HAS_EXPERT_STACKS, ids_for, KINDS, load_from_peft, ours_key, pair, path, peft, randomize, TARGETS, tiny_moe, transformers)  # noqa: F401  (path: a fixture)
from torch import nn

import lora_ext
import lora_ext.param_lora as param_lora
from lora_ext.param_lora import LoRAParameter, outermost, parameter_layers


# ---------------------------------------------------------------- PEFT parity, whole models
@pytest.mark.parametrize("kind, r, dtype, device", [
    *[(k, r, dt, "cpu") for k in KINDS for r in (1, 3) for dt in (torch.float32, torch.bfloat16)],
    *[pytest.param(k, 3, dt, "cuda", marks=pytest.mark.cuda) for k in KINDS for dt in (torch.float32, torch.bfloat16)]],
    ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None)  # CUDA: r = 3 only
def test_models_match_peft(kind, r, dtype, device, path):
    pm, ours, names = pair(kind, dtype, device, r=r, alpha=2 * r + 1)
    assert names == [f"model.layers.{i}.{t}" for i in range(2) for t in ("mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj")]
    assert sorted(names) == sorted(pm.base_model.targeted_parameter_names)
    check_hparams_as_peft(pm, ours)
    ex = experts_of(ours)  # nested as PEFT: the first parameter registered is innermost
    assert isinstance(ex, LoRAParameter) and ex.parameter_name == "down_proj"
    assert ex.base_layer.parameter_name == "gate_up_proj"
    assert list(outermost(ours)) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert ex.transposed == (kind == "gpt_oss")
    assert ex.num_experts == 4 and ex.is_transposed == (kind == "gpt_oss")  # read from the wrapped module
    check_parity(pm, ours, dtype, device)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_every_transformers_experts_implementation_matches_peft(impl, path):
    pm, ours, _ = pair("qwen3_moe", impl=impl)
    assert ours.config._experts_implementation == impl
    check_parity(pm, ours, torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_with_target_modules_too(kind, device, path):
    """target_modules=["q_proj"] beside the expert stacks: LoRALinear there, LoRAParameter in the MoE."""
    pm, ours, names = pair(kind, device=device, target_modules=["q_proj"])
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(lora_ext.lora_layers(ours)) == 2 and len(parameter_layers(ours)) == 4
    check_parity(pm, ours, torch.float32, device)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")  # PEFT looks
@pytest.mark.parametrize("use_rslora", [False, True])  # among target_modules only, yet applies them
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_rank_and_alpha_patterns_and_rslora_as_peft(kind, use_rslora, path):
    """rank_pattern / alpha_pattern keys match the parameter's full name (PEFT's get_pattern_key):
    a full name, a suffix, and a regex; r and scaling per parameter equal PEFT's."""
    rank_pattern = {"model.layers.0.mlp.experts.gate_up_proj": 1, r"layers\.1\.mlp\.experts\.down_proj": 5}
    alpha_pattern = {"down_proj": 3.0, "layers.1.mlp.experts.gate_up_proj": 11}
    pm, ours, _ = pair(kind, r=2, alpha=4, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                       use_rslora=use_rslora)
    check_hparams_as_peft(pm, ours)
    got = {n: (m.r, m.lora_alpha) for n, m in parameter_layers(ours).items()}
    assert got == {"model.layers.0.mlp.experts.base_layer": (1, 4.0), "model.layers.0.mlp.experts": (2, 3.0),
                   "model.layers.1.mlp.experts.base_layer": (2, 11.0), "model.layers.1.mlp.experts": (5, 3.0)}
    s = experts_of(ours, 1).scaling
    assert s == pytest.approx(3.0 / (5 ** 0.5 if use_rslora else 5))
    check_parity(pm, ours, torch.float32)


def test_only_the_routed_stack_of_qwen2_moe_not_its_shared_expert(path):
    """"experts.gate_up_proj" matches mlp.experts only; the shared expert (nn.Linear) stays as it is."""
    pm, ours, names = pair("qwen2_moe", targets=["experts.gate_up_proj"])
    assert names == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert type(ours.model.layers[0].mlp.shared_expert.gate_proj) is nn.Linear
    check_parity(pm, ours, torch.float32)


def test_one_wrapper_merged_the_other_not(path):
    """Merging the inner wrapper (gate_up_proj) only: the forward still adds down_proj's term."""
    pm, ours, _ = pair("qwen3_moe")
    ids = ids_for()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        for i in range(2):
            experts_of(ours, i).base_layer.merge()
        assert [m.merged for m in parameter_layers(ours).values()] == [False, True] * 2  # outer, inner
        assert rel_err(ours(input_ids=ids).logits, want) < 1e-5
        lora_ext.merge(ours)  # the rest
        assert all(m.merged for m in parameter_layers(ours).values())
        assert rel_err(ours(input_ids=ids).logits, want) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_experts_take_the_fast_path(kind, monkeypatch):
    """A transformers experts module runs lora_ext.moe.experts_forward, once, with both wrappers' factors."""
    from lora_ext import moe
    pm, ours, _ = pair(kind)
    why = fast_path_problem(experts_of(ours).target(), ["down_proj", "gate_up_proj"])
    if why is not None:
        pytest.skip(f"lora_ext.moe's fast path does not apply here: {why}")
    calls = []
    real = moe.experts_forward

    def counting(*a, **k):
        calls.append(sorted(k["loras"]))
        return real(*a, **k)
    monkeypatch.setattr(moe, "experts_forward", counting)
    check_parity(pm, ours, torch.float32)
    assert len(calls) == 2 * 2 and all(c == ["down_proj", "gate_up_proj"] for c in calls)  # 2 layers x (eval, train)
    calls.clear()
    with param_lora.generic_path():  # the switch: PEFT's results without lora_ext.moe
        check_parity(pm, ours, torch.float32)
    assert calls == []


# ---------------------------------------------------------------- 2-D parameters of other modules
class FLinear(nn.Module):
    """A weight [out, in] that no nn.Linear holds, used through F.linear."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Mixer(nn.Module):
    """A plain 2-D parameter ([out, in] to PEFT) used some other way: right-multiplied and averaged."""

    def __init__(self, n, m):
        super().__init__()
        self.table = nn.Parameter(torch.randn(n, m) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.table) + self.table.mean(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.mix, self.fc = FLinear(12, 10), Mixer(10, 6), nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.mix(self.lin(x)))


NET_TARGETS = ["lin.weight", "mix.table", "fc.weight"]


def net_pair(device="cpu", r=3):
    torch.manual_seed(0)
    base = Net().to(device)
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=7, target_modules=[],
                                                   target_parameters=NET_TARGETS))
    randomize(pm, std=0.3)
    assert lora_ext.inject(ours, target_parameters=NET_TARGETS, r=r, alpha=7) == NET_TARGETS
    load_from_peft(ours, pm)
    lora_ext.mark_only_lora_trainable(ours)
    return pm, ours


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("r", [1, 3])
def test_2d_parameters_of_custom_modules_match_peft(r, device, path):
    pm, ours = net_pair(device, r)
    check_hparams_as_peft(pm, ours)
    m = ours.mix
    assert (m.num_experts, m.out_features, m.in_features, m.transposed) == (1, 10, 6, False)
    assert m.lora_A.shape == (r, 6) and m.lora_B.shape == (10, r)
    x = torch.randn(4, 3, 12, device=device)
    y_p, y_o = pm(x), ours(x)
    assert rel_err(y_o, y_p) < 1e-5
    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_o.backward(g)
    grads_p = {ours_key(n): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads_p[n]) < 1e-5, n
    with torch.no_grad():  # and by hand: mix.table + s B A, used as the module uses it
        s = m.scaling
        T = m.target().table + s * m.lora_B @ m.lora_A
        h = ours.lin(x)
        assert rel_err(ours.mix(h), torch.tanh(h @ T) + T.mean(0)) < 1e-6


@pytest.mark.parametrize("device", devices())
def test_2d_merge_unmerge_and_unload_as_peft(device):
    pm, ours = net_pair(device)
    x = torch.randn(5, 12, device=device)
    want = ours(x).detach()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for _ in range(3):
        assert sorted(lora_ext.merge(ours)) == ["fc", "lin", "mix"]
        assert rel_err(ours(x), want) < 1e-5
        lora_ext.unmerge(ours)
        assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    unloaded, peft_unloaded = lora_ext.merge_and_unload(ours), pm.merge_and_unload()
    assert [type(m) for m in unloaded.children()] == [FLinear, Mixer, nn.Linear]
    sd, sd_p = unloaded.state_dict(), peft_unloaded.state_dict()
    assert sd.keys() == sd_p.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_p[k], rtol=0, atol=1e-6)
    assert rel_err(unloaded(x), want) < 1e-5


# ---------------------------------------------------------------- torch.compile
def skip_without_compilable_fallback():
    """fp32 experts run on transformers' grouped_mm fallback op under torch.compile; before its
    backward became an op too (5.24 has it, 5.17 not) that backward calls offs.tolist(), which
    Dynamo cannot trace: the model without LoRA fails to compile as well."""
    import transformers.integrations.moe  # noqa: F401  (defines torch.ops.transformers)
    if not hasattr(torch.ops.transformers, "grouped_mm_fallback_backward"):
        pytest.skip(f"transformers {transformers.__version__}: its grouped_mm fallback backward does not compile")


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph_model_forward_and_backward(device, path):
    """The whole Qwen3-MoE (grouped_mm experts; transformers' eager experts loop does not compile
    with fullgraph=True even without LoRA) under Dynamo + AOTAutograd."""
    skip_without_compilable_fallback()
    _, ours, _ = pair("qwen3_moe", device=device, impl="grouped_mm", target_modules=["q_proj"])
    ours.train()
    ids = ids_for(device)
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: ours(input_ids=ids, labels=ids).loss, fullgraph=True, backend="aot_eager")
    got = fn(ids)
    got.backward()
    assert rel_err(got, loss) < 1e-5
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, want[n]) < 1e-5, n


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_compile_fullgraph_experts_inductor(kind, device, path):
    """The nested experts wrapper alone, inductor: outputs and gradients (x and every factor)."""
    skip_without_compilable_fallback()
    model = tiny_moe(kind, device=device, impl="grouped_mm")
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    randomize(model)
    ex = experts_of(model)
    x = torch.randn(10, 64, device=device, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)]).to(device)
    wts = torch.rand(10, 2, device=device)
    leaves = [x, *[p for n, p in ex.named_parameters() if "lora_" in n]]
    y = ex(x, idx, wts)
    want = torch.autograd.grad(y.square().sum(), leaves)
    torch._dynamo.reset()
    y_c = torch.compile(ex, fullgraph=True)(x, idx, wts)
    got = torch.autograd.grad(y_c.square().sum(), leaves)
    assert rel_err(y_c, y) < 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------- fp64 gradcheck and reference
class Stack(nn.Module):
    """A 3-D expert stack used per expert: x [E, T, in] -> [E, T, out]; [E, in, out] when is_transposed."""

    def __init__(self, E, i, o, transposed):
        super().__init__()
        self.is_transposed = transposed
        self.w = nn.Parameter(torch.randn((E, i, o) if transposed else (E, o, i), dtype=torch.float64))

    def forward(self, x):
        return torch.bmm(x, self.w if self.is_transposed else self.w.transpose(1, 2))


@pytest.mark.parametrize("shape", ["2d", "3d", "3d transposed"])
def test_gradcheck_fp64_and_plain_reference(shape):
    E, i, o, r = (1 if shape == "2d" else 3), 5, 4, 2
    holder = nn.Module()
    holder.m = Stack(E, i, o, shape == "3d transposed")
    if shape == "2d":
        holder.m = FLinear(i, o).double()
    target = "m.weight" if shape == "2d" else "m.w"
    lora_ext.inject(holder, target_parameters=[target], r=r, alpha=3)
    w = holder.m
    randomize(holder, std=0.5)
    x = torch.randn((6, i) if shape == "2d" else (E, 6, i), dtype=torch.float64, requires_grad=True)
    A = w.lora_A.detach().clone().requires_grad_()
    B = w.lora_B.detach().clone().requires_grad_()

    def f(x, A, B):
        return torch.func.functional_call(w, {"lora_A": A, "lora_B": B}, (x,))
    assert torch.autograd.gradcheck(f, (x, A, B))
    with torch.no_grad():  # against P + s B_e A_e by hand
        W = expert_reference(w)
        want = F.linear(x, W, w.target().bias) if shape == "2d" else \
            torch.bmm(x, W if w.transposed else W.transpose(1, 2))
        assert rel_err(w(x), want) < 1e-12


def test_gradcheck_fp64_transformers_experts(path):
    """Qwen3MoeExperts (eager loop) with both stacks wrapped, fp64: gradients of x and every factor."""
    if not HAS_EXPERT_STACKS:
        pytest.skip(f"transformers {transformers.__version__} has no 3-D expert stacks (needs >= 5)")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    cfg = transformers.Qwen3MoeConfig(hidden_size=6, moe_intermediate_size=4, num_experts=3, num_experts_per_tok=2,
                                      experts_implementation="eager")
    holder = nn.Module()
    holder.experts = Qwen3MoeExperts(cfg).double()
    with torch.no_grad():
        for p in holder.experts.parameters():
            p.normal_()
    lora_ext.inject(holder, target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=2)
    randomize(holder, std=0.5)
    ex = holder.experts
    names = [n for n, _ in ex.named_parameters() if "lora_" in n]
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    wts = torch.rand(5, 2, dtype=torch.float64)

    def f(x, *factors):
        return torch.func.functional_call(ex, dict(zip(names, factors)), (x, idx, wts))
    params = [dict(ex.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *params))
