"""lora_ext.moe: LoRA on transformers experts modules' 3-D parameters without W_eff, against the
module's own forward (eager and grouped_mm backends) on P + s * delta via functional_call."""
import importlib
import importlib.util
from unittest import mock

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.func import functional_call

transformers = pytest.importorskip("transformers")
from lora_ext import moe  # noqa: E402  (imports transformers)

H, I, E, S = 16, 8, 4, 2.0
# Every use_experts_implementation flag value: gated [E, 2I, H] (qwen3_moe, mixtral, deepseek_v3,
# qwen2_moe), transposed + biases + interleaved custom gate (gpt_oss), no gate (nemotron_h:
# up_proj), post-expert norm (muse_spark).
# family: (config class, experts class, config keys for hidden, intermediate, experts)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeExperts",
                  ("hidden_size", "moe_intermediate_size", "num_experts")),
    "gpt_oss": ("GptOssConfig", "GptOssExperts",
                ("hidden_size", "intermediate_size", "num_local_experts")),
    "mixtral": ("MixtralConfig", "MixtralExperts",
                ("hidden_size", "intermediate_size", "num_local_experts")),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3Experts",
                    ("hidden_size", "moe_intermediate_size", "n_routed_experts")),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeExperts",
                  ("hidden_size", "moe_intermediate_size", "num_experts")),
    "nemotron_h": ("NemotronHConfig", "NemotronHExperts",
                   ("hidden_size", "moe_intermediate_size", "n_routed_experts")),
    "muse_spark": ("MuseSparkTextConfig", "MuseSparkExperts",
                   ("moe_hidden_size", "moe_intermediate_size", "num_local_experts")),
}
IMPLS = ["eager", "grouped_mm"]


def make_experts(family, impl="eager", dtype=torch.float32, hidden=H, inter=I, experts=E):
    cfg_name, cls_name, keys = FAMILIES[family]
    if importlib.util.find_spec(f"transformers.models.{family}") is None:  # newer than this transformers
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cfg_mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    cfg = getattr(cfg_mod, cfg_name)(**dict(zip(keys, (hidden, inter, experts))))
    cfg._experts_implementation = impl
    module = getattr(mod, cls_name)(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.to(dtype)


def first_name(module):
    return "gate_up_proj" if module.has_gate else "up_proj"


def make_loras(module, names, r, dtype=None, requires_grad=True):
    """{name: (A [E, r, in], B [E, out, r], S)}, B nonzero."""
    loras = {}
    for name in names:
        n_in, n_out = moe._in_out(module, name)
        dt = dtype or getattr(module, name).dtype
        A = (torch.randn(module.num_experts, r, n_in) * 0.3).to(dt).requires_grad_(requires_grad)
        B = (torch.randn(module.num_experts, n_out, r) * 0.3).to(dt).requires_grad_(requires_grad)
        loras[name] = (A, B, S)
    return loras


def reference(module, x, idx, w, loras):
    """The module's own forward with each targeted P replaced by P + s * delta (W_eff)."""
    eff = {}
    for name, (A, B, s) in loras.items():
        P = getattr(module, name)
        delta = torch.bmm(B.to(P.dtype), A.to(P.dtype))  # [E, out, in]
        eff[name] = P + s * (delta.transpose(1, 2) if module.is_transposed else delta)
    return functional_call(module, eff, (x, idx, w))


def routing(T, k, allowed=E, dtype=torch.float32):
    """top_k_index [T, k] distinct experts per token among the first `allowed`, weights [T, k]."""
    idx = torch.stack([torch.randperm(allowed)[:k] for _ in range(T)])
    return idx, torch.softmax(torch.randn(T, k), -1).to(dtype)


def leaves(x, loras):
    return [x] + [t for A, B, _ in loras.values() for t in (A, B)]


def check_against_reference(module, loras, T, k, allowed=E, dtype=torch.float32, tol=1e-5):
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    idx, w = routing(T, k, allowed, dtype)
    ref = reference(module, x, idx, w, loras)
    out = moe.experts_forward(module, x, idx, w, loras)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) <= tol
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves(x, loras), g),
                         torch.autograd.grad(ref, leaves(x, loras), g)):
        assert rel_err(got, want) <= tol


def targets(module, which):
    return {"first": [first_name(module)], "down": ["down_proj"],
            "both": [first_name(module), "down_proj"]}[which]


@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("which", ["first", "down", "both"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_weff_reference_fp32(family, impl, which, r):
    module = make_experts(family, impl)
    assert moe.fast_path_problem(module, targets(module, which)) is None
    check_against_reference(module, make_loras(module, targets(module, which), r), T=7, k=2)


@pytest.mark.parametrize("T,k,allowed", [(1, 1, E), (1, 2, E), (6, 1, 2), (6, 2, 2), (9, 2, 3)])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_routing_edges(family, T, k, allowed):
    """T = 1, k = 1 and 2, experts that get no row (allowed < E: empty groups)."""
    module = make_experts(family, "grouped_mm")
    check_against_reference(module, make_loras(module, targets(module, "both"), 3), T, k, allowed)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_fp64_and_gradcheck(family):
    """(muse_spark's post-expert norm computes in fp32, so fp64 gradcheck does not apply to it.)"""
    module = make_experts(family, "eager", torch.float64)
    loras = make_loras(module, targets(module, "both"), 2)
    check_against_reference(module, loras, T=5, k=2, allowed=3, dtype=torch.float64, tol=1e-12)
    small = make_experts(family, "eager", torch.float64, hidden=4, inter=2, experts=3)
    small.requires_grad_(False)
    loras = make_loras(small, targets(small, "both"), 2)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    idx, w = routing(3, 2, allowed=3, dtype=torch.float64)

    def f(x, A1, B1, A2, B2):
        names = targets(small, "both")
        return moe.experts_forward(small, x, idx, w, {names[0]: (A1, B1, S), names[1]: (A2, B2, S)})

    assert torch.autograd.gradcheck(f, tuple(leaves(x, loras)))


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_bf16(family, lora_dtype):
    """bf16 experts; A/B in bf16 or fp32 (used in P's dtype, as PEFT casts its factors)."""
    module = make_experts(family, "grouped_mm", torch.bfloat16)
    loras = make_loras(module, targets(module, "both"), 8, dtype=lora_dtype)
    check_against_reference(module, loras, T=8, k=2, dtype=torch.bfloat16, tol=3e-2)
    x = torch.randn(8, H, dtype=torch.bfloat16)
    idx, w = routing(8, 2, dtype=torch.bfloat16)
    with torch.no_grad():  # multi_lora_ in bf16
        out = moe.experts_forward(module, x, idx, w, loras)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, reference(module, x, idx, w, loras)) <= 3e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_base_parameter_gradients(family):
    """If P (and biases) require grad, their gradients equal those of W_eff."""
    module = make_experts(family, "grouped_mm")
    loras = make_loras(module, targets(module, "both"), 4)
    x = torch.randn(6, H)
    idx, w = routing(6, 2)
    params = list(module.parameters())
    g = torch.randn(6, H)
    want = torch.autograd.grad(reference(module, x, idx, w, loras), params, g)
    got = torch.autograd.grad(moe.experts_forward(module, x, idx, w, loras), params, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_no_grad_path_uses_multi_lora_and_matches(family):
    module = make_experts(family, "grouped_mm")
    loras = make_loras(module, targets(module, "both"), 3)
    x = torch.randn(7, H)
    idx, w = routing(7, 2, allowed=3)
    with mock.patch.object(moe, "multi_lora_", wraps=moe.multi_lora_) as spy:
        grad_out = moe.experts_forward(module, x, idx, w, loras)
        assert spy.call_count == 0 and grad_out.requires_grad
        with torch.no_grad():
            no_grad_out = moe.experts_forward(module, x, idx, w, loras)
        assert spy.call_count == 2
        module.requires_grad_(False)  # grad mode, but nothing requires grad
        frozen = {n: (A.detach(), B.detach(), s) for n, (A, B, s) in loras.items()}
        assert not moe.experts_forward(module, x, idx, w, frozen).requires_grad
        assert spy.call_count == 4
    assert rel_err(no_grad_out, grad_out) <= 1e-6


def test_no_grad_fp64_runs_without_kernel():
    """multi_lora_ has no fp64 kernel: fp64 without grad takes the grouped matmuls."""
    module = make_experts("qwen3_moe", "eager", torch.float64)
    loras = make_loras(module, targets(module, "both"), 3)
    x = torch.randn(5, H, dtype=torch.float64)
    idx, w = routing(5, 2, dtype=torch.float64)
    with torch.no_grad(), mock.patch.object(moe, "multi_lora_", wraps=moe.multi_lora_) as spy:
        out = moe.experts_forward(module, x, idx, w, loras)
        assert spy.call_count == 0
        assert rel_err(out, reference(module, x, idx, w, loras)) <= 1e-12


def test_flattened_hidden_states():
    """[B, L, H] hidden states (with [B*L, k] routing) come back in that shape."""
    module = make_experts("qwen3_moe", "grouped_mm")
    loras = make_loras(module, ["down_proj"], 4, requires_grad=False)
    x = torch.randn(2, 3, H)
    idx, w = routing(6, 2)
    out = moe.experts_forward(module, x, idx, w, loras)
    assert out.shape == x.shape
    assert rel_err(out.reshape(6, H), reference(module, x.reshape(6, H), idx, w, loras)) <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_backward_saves_no_expert_stack(family):
    """Saved for backward: nothing of E * in * out elements besides the parameters themselves
    (the W_eff reference, for contrast, saves such a tensor)."""
    module = make_experts(family, "grouped_mm", hidden=32, inter=16, experts=8)
    module.requires_grad_(False)
    loras = make_loras(module, targets(module, "both"), 4)
    stack = min(p.numel() for p in (module.down_proj, getattr(module, first_name(module))))
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    x = torch.randn(4, 32, requires_grad=True)
    idx, w = routing(4, 2, allowed=8)

    def largest_saved(fn):
        sizes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in param_storages:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(module, x, idx, w, loras).sum().backward()
        return max(sizes)

    assert largest_saved(moe.experts_forward) < stack
    assert largest_saved(reference) >= stack


def test_fast_path_problem_reasons():
    module = make_experts("qwen3_moe")
    assert moe.fast_path_problem(module, ["gate_up_proj", "down_proj"]) is None
    assert moe.fast_path_problem(module, []) is None
    assert "not a transformers experts module" in moe.fast_path_problem(nn.Linear(4, 4), ["weight"])
    assert "up_proj" in moe.fast_path_problem(module, ["gate_up_proj", "up_proj"])
    assert "gate_up_proj" in moe.fast_path_problem(make_experts("nemotron_h"), ["gate_up_proj"])
    module._is_expert_parallel = True
    assert "expert parallel" in moe.fast_path_problem(module, ["down_proj"])
    module._is_expert_parallel = False
    module.register_buffer("down_proj_scale", torch.ones(E))
    assert "down_proj_scale" in moe.fast_path_problem(module, ["down_proj"])

    class Scaled(nn.Module):
        def forward(self, w):
            return 2 * w

    module = make_experts("qwen3_moe")
    nn.utils.parametrize.register_parametrization(module, "down_proj", Scaled())
    assert "parametrized" in moe.fast_path_problem(module, ["down_proj"])

    class OwnForward(type(make_experts("mixtral"))):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    module = make_experts("mixtral")
    module.__class__ = OwnForward
    assert "dispatcher" in moe.fast_path_problem(module, ["down_proj"])
    with pytest.raises(ValueError, match=r"^experts_forward: experts: .*dispatcher"):
        moe.experts_forward(module, torch.randn(2, H), *routing(2, 2), {})


def test_bad_input_raises_value_error():
    module = make_experts("qwen3_moe")
    good = make_loras(module, ["gate_up_proj"], 3, requires_grad=False)
    A, B, s = good["gate_up_proj"]
    x = torch.randn(4, H)
    idx, w = routing(4, 2)
    lora = r"loras\['gate_up_proj'\]"
    cases = [
        ({"gate_up_proj": (A[:, :, :-1], B, s)}, x, idx, w, lora + ": A must be"),
        ({"gate_up_proj": (A, B[:, :, :2], s)}, x, idx, w, lora + ": B must be"),
        ({"gate_up_proj": (A, B.double(), s)}, x, idx, w, lora + ": A and B .*dtype"),
        ({"gate_up_proj": (A, B)}, x, idx, w, lora + " must be a tuple"),
        ({"gate_up_proj": (A, B, "2")}, x, idx, w, lora + ": s must be"),
        ({"down_prj": (A, B, s)}, x, idx, w, r"experts: LoRA on \['down_prj'\]"),
        (good, torch.randn(4, H + 1), idx, w, r"hidden_states must be"),
        (good, x, idx[:3], w[:3], r"top_k_index must be"),
        (good, x, idx.float(), w, r"top_k_index must be"),
        (good, x, idx, w[:, :1], r"top_k_weights must be"),
    ]
    for loras, x_, idx_, w_, match in cases:
        with pytest.raises(ValueError, match="^experts_forward: " + match):
            moe.experts_forward(module, x_, idx_, w_, loras)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("grad", [False, True])
def test_routes_to_ids_outside_the_experts_add_nothing(family, grad):
    # transformers' dropped slot (id == E) and garbage ids: those routes contribute zero, with
    # or without grad, and the kept routes are unchanged (as the routes left out altogether)
    ex = make_experts(family, "grouped_mm")
    loras = make_loras(ex, [first_name(ex), "down_proj"], 3, requires_grad=grad)
    T = 6
    x = torch.randn(T, H, requires_grad=grad)
    idx = torch.randint(0, E, (T, 2))
    w = torch.rand(T, 2)
    bad = idx.clone()
    bad[1, 0], bad[4, 1], bad[5, 0] = E, -3, E + 7
    dropped = w.clone()
    dropped[1, 0] = dropped[4, 1] = dropped[5, 0] = 0.0
    with torch.set_grad_enabled(grad):
        got = moe.experts_forward(ex, x, bad, w, loras)
        want = moe.experts_forward(ex, x, idx, dropped, loras)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-6
    if grad:
        g1, = torch.autograd.grad(got.sum(), x)
        g2, = torch.autograd.grad(want.sum(), x)
        assert torch.isfinite(g1).all() and rel_err(g1, g2) < 1e-6
