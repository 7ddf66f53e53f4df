"""torch.func and forward-mode AD through lora_ext's ops and layers: lora_linear's jvp (plain torch
ops under a dual level), the ops that are not differentiable refusing tangents by name (torch's
custom-op autograd dropped them without a word), vmap through torch's batching fallback, and
torch.func.grad raising (README, Ops section)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DTYPES, RTOL, devices, rel_err

from lora_ext import LoRALinear, MergedLinear
from lora_ext.ops import (MergeState, dora_norm, lora_apply_, lora_expand_, lora_linear, lora_shrink,
                          merge_, multi_lora_, unmerge_)


def make(device, dtype, T=(5,), i=12, o=10, r=3, fan_in_fan_out=False):
    g = torch.Generator().manual_seed(7)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    W = t(i, o) if fan_in_fan_out else t(o, i)
    return t(*T, i), W, t(o), t(r, i), t(o, r)


def reference(x, W, b, A, B, s, fan_in_fan_out=False):
    return x @ (W if fan_in_fan_out else W.T) + b + s * (x @ A.T) @ B.T


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("T", [(5,), (2, 3), ()], ids=["2d", "3d", "1d"])
def test_jvp_in_every_argument_matches_fp64(device, dtype, fan_in_fan_out, T):
    """Was: torch.func.jvp gave a zero tangent (nothing requires grad, so torch's custom-op autograd
    ran the kernel and dropped the tangents)."""
    primals = make(device, dtype, T, fan_in_fan_out=fan_in_fan_out)
    tangents = tuple(torch.randn_like(p) for p in primals)
    f = lambda *a: lora_linear(*a, 0.7, fan_in_fan_out=fan_in_fan_out)
    y, ty = torch.func.jvp(f, primals, tangents)
    yr, tyr = torch.func.jvp(lambda *a: reference(*a, 0.7, fan_in_fan_out),
                             tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    assert y.dtype == ty.dtype == dtype and y.shape == ty.shape == yr.shape
    tol = RTOL[dtype] * (1 if dtype == torch.float32 else 2)
    assert rel_err(y, yr) < tol and rel_err(ty, tyr) < tol
    assert rel_err(y, f(*primals)) < tol  # the kernels' values, to rounding


def test_forward_ad_dual_tensors_and_reverse_mode_together():
    """forward_ad's make_dual / unpack_dual (was: tangent None), with A requiring grad as well
    (was: torch's NotImplementedError not naming the op): tangent and gradients both right."""
    x, W, b, A, B = make("cpu", torch.float32)
    v = torch.randn_like(x)
    A.requires_grad_()
    with fwAD.dual_level():
        y = lora_linear(fwAD.make_dual(x, v), W, b, A, B, 0.5)
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None
    xd, Ad = x.double(), A.detach().double().requires_grad_()
    torch.testing.assert_close(tangent.double(), reference(v.double(), W.double(), 0, Ad, B.double(), 0.5),
                               rtol=1e-5, atol=1e-5)
    yr = reference(xd, W.double(), b.double(), Ad, B.double(), 0.5)
    primal.square().sum().backward()
    yr.square().sum().backward()
    assert rel_err(A.grad, Ad.grad) < 1e-5


def test_jacfwd_equals_reference_jacobian():
    x, W, b, A, B = make("cpu", torch.float32, T=(3,))
    J = torch.func.jacfwd(lambda a, bb: lora_linear(x, W, b, a, bb, 0.5), argnums=(0, 1))(A, B)
    Jr = torch.func.jacrev(lambda a, bb: reference(x.double(), W.double(), b.double(), a, bb, 0.5),
                           argnums=(0, 1))(A.double(), B.double())
    for got, want in zip(J, Jr):
        assert rel_err(got, want) < 1e-5


def test_forward_ad_with_dropout_in_training_raises():
    x, W, b, A, B = make("cpu", torch.float32)
    f = lambda xx, training: lora_linear(xx, W, b, A, B, 0.5, dropout_p=0.1, training=training)
    with pytest.raises(RuntimeError, match=r"lora_linear: forward-mode AD \(x carries a tangent\) .*dropout"):
        torch.func.jvp(lambda xx: f(xx, True), (x,), (x,))
    torch.func.jvp(lambda xx: f(xx, False), (x,), (x,))  # eval mode: no dropout, fine


def _dot_test(fn, primals, seed=0):
    """<u, J v> from jvp equals <J^T u, v> from the kernels' backward (the same linear map)."""
    g = torch.Generator().manual_seed(seed)
    tangents = tuple(torch.randn(p.shape, generator=g) for p in primals)
    y, jv = torch.func.jvp(fn, primals, tangents)
    u = torch.randn(y.shape, generator=g)
    leaves = tuple(p.detach().requires_grad_() for p in primals)
    jtu = torch.autograd.grad(fn(*leaves), leaves, u)
    lhs = (u.double() * jv.double()).sum()
    rhs = sum((a.double() * t.double()).sum() for a, t in zip(jtu, tangents))
    assert jv.abs().sum() > 0
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "conv1d_dora", "merged_linear"])
def test_layer_jvp_in_input_and_factors(kind):
    """LoRALinear (DoRA too: its norm is a constant, as in reverse mode) and MergedLinear, through
    torch.func.functional_call: the jvp is the transpose of the gradient the kernels compute."""
    torch.manual_seed(0)
    if kind == "merged_linear":
        layer = MergedLinear(12, 3 * 4, r=2, enable_lora=[True, False, True], alpha=4)
    else:
        layer = LoRALinear(12, 8, r=3, use_dora=kind != "lora", fan_in_fan_out=kind == "conv1d_dora")
    with torch.no_grad():
        layer.lora_B.normal_()
        if kind != "lora" and kind != "merged_linear":
            layer.lora_magnitude_vector.mul_(1.5)
    layer.eval()
    x = torch.randn(4, 12)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = tuple(getattr(layer, n).detach() for n in names)
    call = lambda xx, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (xx,))
    _dot_test(call, (x, *params))


def _pools():
    x, y = torch.randn(4, 8), torch.zeros(4, 6)
    A_pool, B_pool = torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    idx, ranks = torch.tensor([0, 1, -1, 0]), torch.tensor([3, 2], dtype=torch.int32)
    return x, y, A_pool, B_pool, idx, torch.ones(2), ranks


def _calls(tangent_on):
    """Every op that is not differentiable, called with a tangent on the argument ``tangent_on``."""
    x, y, A_pool, B_pool, idx, scales, ranks = _pools()
    W, A, B = torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
    u = torch.randn(4, 3)
    d = lambda name, t: fwAD.make_dual(t, torch.ones_like(t)) if name == tangent_on else t
    return {
        "lora_apply_": lambda: lora_apply_(d("y", y), d("x", x), A, B, 1.0),
        "multi_lora_": lambda: multi_lora_(y, d("x", x), A_pool, d("B_pool", B_pool), idx, scales, ranks),
        "lora_shrink": lambda: lora_shrink(d("x", x), A_pool, idx, ranks),
        "lora_expand_": lambda: lora_expand_(y, d("u", u), B_pool, idx, scales, ranks),
        "merge_": lambda: merge_(d("weight", W), A, d("B", B), 1.0),
        "unmerge_": lambda: unmerge_(W, d("A", A), B, 1.0),
        "dora_norm": lambda: dora_norm(d("weight", W), A, B, 1.0),
    }


@pytest.mark.parametrize("op,arg", [("lora_apply_", "y"), ("lora_apply_", "x"), ("multi_lora_", "x"),
                                    ("multi_lora_", "B_pool"), ("lora_shrink", "x"), ("lora_expand_", "u"),
                                    ("merge_", "weight"), ("merge_", "B"), ("unmerge_", "A"),
                                    ("dora_norm", "weight")])
def test_ops_that_are_not_differentiable_refuse_tangents(op, arg):
    """Was: the tangent dropped without a word (the output's tangent None / unchanged)."""
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=rf"^{op}: {arg}(\[0\])? carries a forward-mode AD tangent"):
            _calls(arg)[op]()
        _calls(None)[op]()  # no tangent: the op runs


def test_merge_state_unmerge_refuses_tangents():
    W, A, B = torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
    state = MergeState()
    merge_(W, A, B, 1.0, state=state)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"^unmerge_: weight carries a forward-mode AD tangent"):
            unmerge_(fwAD.make_dual(W, torch.ones_like(W)), state=state)
    assert state.merged == ["default"]


def test_lora_shrink_refuses_grad():
    """Was: lora_shrink's output required grad and backward left x.grad None (a torch warning only)."""
    x, _, A_pool, _, idx, _, ranks = _pools()
    with pytest.raises(RuntimeError, match=r"lora_shrink: x requires grad, but lora_shrink is not differentiable"):
        lora_shrink(x.requires_grad_(), A_pool, idx, ranks)
    with torch.no_grad():
        lora_shrink(x, A_pool, idx, ranks)


def test_vmap_works_and_func_grad_raises():
    """README (Ops): vmap runs through torch's per-sample fallback with the right values, dropout
    with vmap's randomness modes; torch.func.grad / jacrev raise RuntimeError."""
    x, W, b, A, B = make("cpu", torch.float32, T=(4, 3))
    f = lambda xx: lora_linear(xx, W, b, A, B, 0.5)
    torch.testing.assert_close(torch.func.vmap(f)(x), f(x))
    As, Bs = torch.randn(4, *A.shape), torch.randn(4, *B.shape)
    got = torch.func.vmap(lambda xx, a, bb: lora_linear(xx, W, b, a, bb, 0.5))(x, As, Bs)
    torch.testing.assert_close(got, torch.stack([lora_linear(x[i], W, b, As[i], Bs[i], 0.5) for i in range(4)]))
    same = x[:1].expand(4, 3, 12).contiguous()  # four identical samples
    drop = lambda xx: lora_linear(xx, W, b, A, B, 0.5, dropout_p=0.5, training=True)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(drop)(same)
    y = torch.func.vmap(drop, randomness="same")(same)
    assert all(torch.equal(y[0], y[i]) for i in range(4))
    y = torch.func.vmap(drop, randomness="different")(same)
    assert not any(torch.equal(y[0], y[i]) for i in range(1, 4))
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda a: f(x).sum() + lora_linear(x, W, b, a, B, 0.5).sum())(A)


def test_compiled_forward_has_no_tangent_check_left():
    """The check is free outside a dual level: fullgraph compile traces the kernel path only."""
    x, W, b, A, B = make("cpu", torch.float32)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    y = torch.compile(lambda xx: lora_linear(xx, W, b, A, B, 0.5), backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(y, lora_linear(x, W, b, A, B, 0.5))
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("lora_linear_fwd" in o for o in ops) and not any("function linear" in o for o in ops), ops
