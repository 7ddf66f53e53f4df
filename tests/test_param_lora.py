"""LoRAParameter (lora_ext.param_lora): LoRA on a module's parameter, PEFT's
``LoraConfig(target_parameters=[...])`` (its ParamWrapper), mainly transformers MoE expert stacks.

PEFT is the oracle: tiny Qwen3-MoE, gpt-oss (transposed [E, in, out] experts with biases), Mixtral
and Qwen2-MoE (shared expert beside the stack) models get PEFT's factors loaded into a
lora_ext-injected copy by state-dict name, and give PEFT's logits, loss and LoRA gradients, eval
and train, fp32 and bf16, on whatever path the forward takes ("auto": lora_ext.moe's fast path
where it applies) and on the generic path (the module's own forward with P + s B A), forced by
replacing lora_ext.moe. Also: r / scaling from rank_pattern / alpha_pattern / use_rslora as
PEFT's, custom 2-D targets, merges (exact unmerge bit for bit, merge_and_unload equal to PEFT's),
torch.compile(fullgraph=True), errors, and an fp64 gradcheck against a plain-torch reference.
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, rel_err
from torch import nn

import lora_ext
import lora_ext.param_lora as param_lora
from lora_ext.merge import merge_overhead  # (lora_ext.merge is the function)
from lora_ext.param_lora import LoRAParameter, outermost, parameter_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
# transformers >= 5 holds MoE experts as 3-D parameters (older ones: a ModuleList of MLPs)
HAS_EXPERT_STACKS = (hasattr(transformers, "Qwen3MoeConfig")
                     and importlib.util.find_spec("transformers.integrations.moe") is not None)

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ["qwen3_moe", "gpt_oss", "mixtral", "qwen2_moe"]
# fp32: the same math in another order. bf16: both round the effective weight and every GEMM to
# bf16 (PEFT keeps fp32 factors and adds an fp32 delta rounded once; lora_ext bf16 factors).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 6e-2)}  # (logits / loss, grads)


# ---------------------------------------------------------------- models and pairs
def tiny_moe(kind, dtype=torch.float32, device="cpu", impl=None, seed=0):
    """A 2-layer MoE causal LM (4 experts, top-2, hidden 64), eager attention, in eval mode.
    impl: transformers' experts_implementation ("eager", "grouped_mm", "batched_mm"; None: its default)."""
    if not HAS_EXPERT_STACKS:
        pytest.skip(f"transformers {transformers.__version__} has no 3-D expert stacks (needs >= 5)")
    tf = transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, num_experts_per_tok=2, attn_implementation="eager")
    if impl is not None:
        common["experts_implementation"] = impl
    if kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                                         **common))
    elif kind == "gpt_oss":
        model = tf.GptOssForCausalLM(tf.GptOssConfig(intermediate_size=32, num_local_experts=4, sliding_window=8,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                                     **common))
    elif kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    elif kind == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                                         shared_expert_intermediate_size=48, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # gpt-oss's expert and router biases start at zero: make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias") and "experts" in n or n.endswith("router.bias"):
                p.normal_(std=0.05)
    return model.to(device, dtype).eval()


def experts_of(model, layer=0):
    return model.get_submodule(f"model.layers.{layer}.mlp.experts")


def ours_key(peft_key: str) -> str:
    """PEFT's state-dict name -> lora_ext's: no "base_model.model.", no ".default", and lora_A /
    lora_B are parameters, not Linear modules."""
    k = peft_key.removeprefix("base_model.model.").replace(".default", "")
    return k.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")


def randomize(model, seed=1, std=0.1):
    """Non-zero factors (B too), so LoRA matters: N(0, std^2), the same for the same seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, device=p.device) * std)
    return model


def load_from_peft(ours, pm):
    """Loads PEFT's LoRA tensors into ``ours`` by name; every LoRA tensor of ours gets one."""
    sd = {ours_key(k): v for k, v in pm.state_dict().items() if "lora_" in k}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert [k for k in missing if "lora_" in k] == []
    assert len(sd) == sum("lora_" in k for k in ours.state_dict())


def pair(kind="qwen3_moe", dtype=torch.float32, device="cpu", r=3, alpha=5, target_modules=None, impl=None,
         targets=TARGETS, **cfg):
    """(PEFT model, lora_ext model, names inject returned): the same base weights and LoRA factors."""
    base = tiny_moe(kind, dtype, device, impl)
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or [],
                                                   target_parameters=targets, **cfg))
    randomize(pm)
    names = lora_ext.inject(ours, target_modules=target_modules, target_parameters=targets, r=r, alpha=alpha, **cfg)
    load_from_peft(ours, pm)
    lora_ext.mark_only_lora_trainable(ours)
    return pm, ours, names


def check_hparams_as_peft(pm, ours):
    """Same wrappers at the same names, each with PEFT's parameter, r and scaling."""
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if type(m).__name__ == "ParamWrapper"}
    mine = parameter_layers(ours)
    assert mine.keys() == theirs.keys()
    for n, m in mine.items():
        t = theirs[n]
        assert (m.parameter_name, m.r, m.num_experts) == (t.parameter_name, t.r["default"], t.num_experts)
        assert (m.in_features, m.out_features) == (t.in_features, t.out_features)
        assert m.scaling == pytest.approx(t.scaling["default"], rel=1e-12)
        assert m.lora_alpha == pytest.approx(t.lora_alpha["default"])


def ids_for(device="cpu", batch=2, seq=12, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def pin_routing(pm, ours, ids):
    """Both models route ``ids`` as PEFT's does now, with constant routing weights (forward hooks;
    returns their handles). In bf16 a token's top-k can flip between two roundings of the same
    math (lora_ext.moe adds the LoRA term to the rows, PEFT rounds P + s B A to bf16 first): a
    jump in the function, not an error in either."""
    recorded = []
    hooks = [r.register_forward_hook(lambda m, a, out: recorded.append(tuple(t.detach() for t in out)))
             for r in routers(pm)]
    with torch.no_grad():
        pm(input_ids=ids)
    for h in hooks:
        h.remove()
    assert recorded and len(routers(ours)) == len(recorded)
    return [r.register_forward_hook(lambda m, a, o, out=out: out)
            for model in (pm, ours) for r, out in zip(routers(model), recorded)]


def check_parity(pm, ours, dtype, device="cpu"):
    """Logits in eval and train mode, loss and every LoRA gradient, lora_ext vs PEFT (in bf16 with
    the routing pinned, see pin_routing)."""
    tol, tol_g = TOL[dtype]
    ids = ids_for(device)
    pinned = pin_routing(pm, ours, ids) if dtype != torch.float32 else []
    for train in (False, True):
        pm.train(train)
        ours.train(train)
        if not train:
            with torch.no_grad():
                assert rel_err(ours(input_ids=ids).logits, pm(input_ids=ids).logits) < tol
            continue
        out_p, out_o = pm(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
        assert rel_err(out_o.logits, out_p.logits) < tol
        assert abs(out_o.loss.item() - out_p.loss.item()) <= tol * abs(out_p.loss.item())
        out_p.loss.backward()
        out_o.loss.backward()
    for h in pinned:
        h.remove()
    grads_p = {ours_key(n): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_o.keys() == grads_p.keys() and grads_o
    for n, g in grads_o.items():
        assert g is not None and grads_p[n] is not None, n
        assert rel_err(g, grads_p[n]) < tol_g, n


class _NoFastPath:
    """Stands in for lora_ext.moe: the fast path never applies, so the generic path runs."""

    @staticmethod
    def fast_path_problem(*args):
        return "generic path forced by the test"

    @staticmethod
    def experts_forward(*args, **kwargs):
        raise AssertionError("experts_forward called although fast_path_problem refused")


@pytest.fixture(params=["auto", "generic"])
def path(request, monkeypatch):
    """"auto": whatever LoRAParameter.forward picks (lora_ext.moe's fast path for a transformers
    experts module, once it applies); "generic": the module's own forward with P + s B A."""
    if request.param == "generic":
        monkeypatch.setattr(param_lora, "_moe", lambda: _NoFastPath)
    return request.param


def fast_path_problem(module, names):
    """Why lora_ext.moe's fast path does not apply to ``module`` (None: it does)."""
    try:
        from lora_ext import moe
    except ImportError as e:
        return f"lora_ext.moe does not import: {e}"
    return moe.fast_path_problem(module, names)


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


# ---------------------------------------------------------------- merging expert stacks
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_computes_the_unmerged_one_and_unmerge_is_exact(kind, device, path):
    _, ours, _ = pair(kind, device=device)
    ids = ids_for(device)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert sorted(lora_ext.merge(ours)) == sorted(parameter_layers(ours))
        assert lora_ext.merge(ours) == []  # merged already
        P = experts_of(ours).target().down_proj
        assert not torch.equal(P, before["model.layers.0.mlp.experts.base_layer.base_layer.down_proj"])
        assert rel_err(ours(input_ids=ids).logits, want) < 1e-5
        assert all(0 < o < 0.5 for o in merge_overhead(ours).values())
        assert sorted(lora_ext.unmerge(ours)) == sorted(parameter_layers(ours))
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, want)


def expert_reference(w: LoRAParameter) -> torch.Tensor:
    """P + s B_e A_e per expert in fp64, from PEFT's layout by hand (lora_A rows e*r..(e+1)*r,
    lora_B columns j*E + e), transposed for an [E, in, out] stack."""
    E, r = w.num_experts, w.r
    P = getattr(w.target(), w.parameter_name).detach().double()
    A, B = w.lora_A.detach().double(), w.lora_B.detach().double()
    out = P.clone() if P.dim() == 3 else P.clone()[None]
    for e in range(E):
        d = w.scaling * B[:, [j * E + e for j in range(r)]] @ A[e * r:(e + 1) * r]
        out[e] += d.t() if w.transposed else d
    return out if P.dim() == 3 else out[0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_unmerge_restores_the_stack_bit_for_bit_over_many_cycles(kind, dtype, device):
    model = tiny_moe(kind, device=device)
    lora_ext.inject(model, target_parameters=TARGETS, r=4, alpha=8)
    randomize(model, std=0.2)
    model.to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {n: expert_reference(w) for n, w in parameter_layers(model).items()}
    for cycle in range(6):
        lora_ext.merge(model)
        for n, w in parameter_layers(model).items():  # the merged stack: P + s B A rounded once
            assert rel_err(getattr(w.target(), w.parameter_name), refs[n]) < {torch.float32: 1e-6}.get(dtype, 4e-3)
        lora_ext.unmerge(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), (cycle, n)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inexact_merge_then_unmerge_is_close(dtype, device):
    model = tiny_moe("qwen3_moe", device=device)
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    randomize(model, std=0.2)
    model.to(dtype)
    stacks = {n: w for n, w in parameter_layers(model).items()}
    before = {n: getattr(w.target(), w.parameter_name).detach().clone() for n, w in stacks.items()}
    delta = {n: (expert_reference(w) - before[n].double()).norm() for n, w in stacks.items()}
    lora_ext.merge(model, exact=False)
    assert merge_overhead(model) == {}
    lora_ext.unmerge(model)
    for n, w in stacks.items():  # off by a rounding or two of P + s B A: relative to the delta's size
        err = (getattr(w.target(), w.parameter_name).double() - before[n].double()).norm()
        assert 0 < err <= (1e-6 if dtype == torch.float32 else 1e-2) * delta[n], n


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_the_experts_class_back_with_peft_weights(kind, device):
    pm, ours, _ = pair(kind, device=device)
    ids = ids_for(device)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    cls = type(experts_of(pm.base_model.model).get_base_layer())
    theirs, mine = pm.merge_and_unload(), lora_ext.merge_and_unload(ours)
    assert mine is ours and not parameter_layers(mine)
    assert type(experts_of(mine)) is cls and type(experts_of(theirs)) is cls
    sd, sd_p = mine.state_dict(), theirs.state_dict()
    assert sd.keys() == sd_p.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_p[k], rtol=0, atol=1e-6, msg=k)
    with torch.no_grad():
        assert rel_err(mine(input_ids=ids).logits, want) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_safe_merge_refuses_an_overflowing_expert_by_name(device):
    _, ours, _ = pair("qwen3_moe", device=device)
    w = experts_of(ours, 1)  # down_proj of layer 1
    E, r = w.num_experts, w.r
    with torch.no_grad():  # expert 2 only: s * B_2 A_2 overflows fp32
        w.lora_A[2 * r:3 * r] = 1e20
        w.lora_B[:, 2::E] = 1e20
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts'.*expert 2"):
        lora_ext.merge(ours, safe=True)
    assert not any(m.merged for m in parameter_layers(ours).values())
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())  # nothing merged
    with pytest.raises(ValueError, match="expert 2"):
        w.check_merge()
    with pytest.raises(ValueError, match="expert 2"):
        lora_ext.merge_and_unload(ours, safe=True)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_train_mode_unmerges():
    _, ours, _ = pair("qwen3_moe")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lora_ext.merge(ours)
    assert all(m.merged for m in parameter_layers(ours).values())
    ours.train()
    assert not any(m.merged for m in parameter_layers(ours).values())
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_to_dtype_while_merged_then_unmerge_gives_the_converted_original():
    _, ours, _ = pair("qwen3_moe")
    want = {n: p.detach().to(torch.bfloat16) for n, p in ours.named_parameters()}
    lora_ext.merge(ours)
    ours.to(torch.bfloat16)
    lora_ext.unmerge(ours)
    assert all(torch.equal(p, want[n]) for n, p in ours.named_parameters())


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph_model_forward_and_backward(device, path):
    """The whole Qwen3-MoE (grouped_mm experts; transformers' eager experts loop does not compile
    with fullgraph=True even without LoRA) under Dynamo + AOTAutograd."""
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
def test_gradcheck_fp64_and_plain_reference(shape, monkeypatch):
    monkeypatch.setattr(param_lora, "_moe", lambda: _NoFastPath)
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


# ---------------------------------------------------------------- errors
def test_targets_matching_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="matched no parameter"):
        lora_ext.inject(model, target_parameters=["mlp.experts.up_proj"])
    with pytest.raises(ValueError, match="matched no parameter"):  # a module name is not a parameter name
        lora_ext.inject(model, target_parameters=["mlp.experts"])
    assert not parameter_layers(model)


def test_a_string_of_targets_is_refused_clearly():
    with pytest.raises(ValueError, match="list of parameter names.*got 'mlp.experts.gate_up_proj'"):
        lora_ext.inject(tiny_moe("qwen3_moe"), target_parameters="mlp.experts.gate_up_proj")


def test_a_parameter_of_a_lora_linear():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, ["q_proj"], r=2)
    with pytest.raises(TypeError, match=r"q_proj\.weight'.*LoRA layer"):
        lora_ext.inject(model, target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(TypeError, match="LoRA layer"):
        lora_ext.inject(model, target_parameters=["q_proj.lora_A"])
    assert not parameter_layers(model)


def test_a_parameter_of_a_module_targeted_by_target_modules_too_changes_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'.*LoRA layer"):
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=["q_proj.weight"])
    assert not lora_ext.lora_layers(model) and not parameter_layers(model)


def test_a_bad_shape_among_good_targets_changes_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.input_layernorm\.weight'.*2-D"):
        lora_ext.inject(model, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "input_layernorm.weight"])
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)


@pytest.mark.parametrize("what", ["dropout", "use_dora"])
def test_dropout_and_dora_are_refused(what):
    model = tiny_moe("qwen3_moe")
    kw = {"dropout": 0.1} if what == "dropout" else {"use_dora": True}
    with pytest.raises(ValueError, match=what):
        lora_ext.inject(model, target_parameters=TARGETS, **kw)
    with pytest.raises(ValueError, match=what):  # also beside target_modules, before either is injected
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=TARGETS, **kw)
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)


def test_1d_and_4d_parameters_are_refused():
    with pytest.raises(ValueError, match=r"2-D \[out, in\] or a 3-D expert stack, got shape \[64\]"):
        lora_ext.inject(tiny_moe("qwen3_moe"), target_parameters=["input_layernorm.weight"])
    conv = nn.Module()
    conv.c = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"got shape \[3, 2, 3, 3\]"):
        lora_ext.inject(conv, target_parameters=["c.weight"])
    with pytest.raises(ValueError, match="got shape"):
        LoRAParameter(nn.Linear(3, 4), "bias")


def test_a_parameter_of_the_model_itself_is_refused():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="parameter of the model itself"):
        lora_ext.inject(Top(), target_parameters=["w"])


def test_wrapping_the_same_parameter_twice_is_refused():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=2)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        lora_ext.inject(model, target_parameters=["layers.0.mlp.experts.gate_up_proj"])
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        lora_ext.inject(model, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        LoRAParameter(experts_of(model), "gate_up_proj")
    assert {n: p for n, p in model.named_parameters()}.keys() == state.keys()
    assert len(parameter_layers(model)) == 4


def test_set_lora_factors_shapes():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    w = experts_of(model).base_layer  # gate_up_proj: [4, 64, 64] = [E, out, in]
    E, i, o = 4, 64, 64
    for A, B in [((E * 3, i - 1), (o, E * 3)), ((E * 3, i), (o + 1, E * 3)), ((10, i), (o, 10)),
                 ((E * 3, i), (o, E * 2)), ((0, i), (o, 0)), ((E * 3, i, 1), (o, E * 3)), ((E * 3,), (o, E * 3))]:
        with pytest.raises(ValueError, match=r"expected A \[4 \* r, 64\] and B \[64, 4 \* r\]"):
            w.set_lora_factors(torch.zeros(A), torch.zeros(B), 1.0)
    assert w.r == 3 and w.lora_A.shape == (12, 64)
    w.set_lora_factors(torch.ones(E * 5, i), torch.ones(o, E * 5), 0.5)  # another r resizes
    assert (w.r, w.lora_A.shape, w.lora_B.shape, w.scaling, w.lora_alpha) == (5, (20, 64), (64, 20), 0.5, 2.5)
    lora_ext.merge(model)
    with pytest.raises(ValueError, match="merged"):
        w.set_lora_factors(torch.ones(E * 5, i), torch.ones(o, E * 5), 0.5)


def test_target_modules_leave_a_module_with_a_lora_parameter_alone():
    # the wrapper runs the wrapped module's forward with effective parameters: a LoRALinear put
    # inside it would be bypassed for its weight, so "all-linear" skips it and a named target is refused
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    lora_ext.inject(model, target_parameters=["0.weight"], r=2)
    assert lora_ext.inject(model, "all-linear", r=2) == ["2"]
    assert type(model[0].base_layer) is nn.Linear
    with pytest.raises(TypeError, match=r"'0\.base_layer' has a LoRAParameter"):
        lora_ext.inject(model, r".*base_layer", r=2)


def test_merge_refuses_a_parameter_tied_to_another_module():
    # target_parameters=["lm_head.weight"] with tied embeddings: merging would change embed_tokens too
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight
    lora_ext.inject(model, target_parameters=["1.weight"], r=2, alpha=2)
    with torch.no_grad():
        model[1].lora_B.normal_()
    emb = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '1' shares its weight with \['0'\]"):
        lora_ext.merge(model)
    with pytest.raises(ValueError, match="tied"):
        lora_ext.merge_and_unload(model)
    assert not model[1].merged and torch.equal(model[0].weight, emb)
    assert lora_ext.merge(model, allow_tied=True) == ["1"]
    lora_ext.unmerge(model)
    assert torch.equal(model[0].weight, emb)


def test_inexact_merge_keeps_its_own_copy_of_the_factors():
    # unmerge takes out what merge put in (as LoRALinear), even if the factors are written meanwhile
    # (load_state_dict, an optimizer step): merge(exact=False) used to keep views of lora_A
    model = nn.Sequential(nn.Linear(6, 5))
    lora_ext.inject(model, target_parameters=["0.weight"], r=2, alpha=2)
    w = model[0]
    with torch.no_grad():
        w.lora_B.normal_()
    before = w.target().weight.detach().clone()
    lora_ext.merge(model, exact=False)
    with torch.no_grad():
        w.lora_A.mul_(3.0)
        w.lora_B.mul_(3.0)
    lora_ext.unmerge(model)
    torch.testing.assert_close(w.target().weight, before, rtol=0, atol=1e-5)
