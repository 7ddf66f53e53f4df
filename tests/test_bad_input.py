"""Nothing silent (ops): aliasing metadata, device mixes with `meta`, fp16 gradient range,
out_slices overflow, scale arguments — each a clear error naming the op and the argument, or the
right answer. Plus the vLLM-compatible arguments of lora_shrink / lora_expand_."""
import pytest
import torch
from conftest import devices, rel_err

from lora_ext.ops import (MergeState, check_merge_finite, lora_apply_, lora_expand_, lora_linear,
                          lora_shrink, merge_, multi_lora_, unmerge_)


def multi(T=6, i=16, o=12, S=3, r=4, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, i, generator=g).to(device, dtype)
    A = torch.randn(S, r, i, generator=g).to(device, dtype)
    B = torch.randn(S, o, r, generator=g).to(device, dtype)
    idx = torch.tensor([0, 1, 2, -1, 1, 0][:T], dtype=torch.int32, device=device)
    scales = torch.tensor([0.5, 1.0, 2.0], device=device)
    ranks = torch.full((S,), r, dtype=torch.int32, device=device)
    return x, A, B, idx, scales, ranks


# ---------------------------------------------------------------- 1. metadata aliasing y
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("what", ["indices", "scales", "ranks", "bad_index_count"])
def test_metadata_sharing_memory_with_y_is_refused(device, what):
    x, A, B, idx, scales, ranks = multi(device=device)
    y = torch.zeros(6, 12, device=device)
    flat = y.view(-1)
    if what == "indices":
        idx = flat[:6].view(torch.int32)
    elif what == "scales":
        scales = flat[:3]
    elif what == "ranks":
        ranks = flat[:3].view(torch.int32)
    kw = {"bad_index_count": flat[:1].view(torch.int32)} if what == "bad_index_count" else {}
    with pytest.raises(RuntimeError, match=f"multi_lora_: .*{what}"):
        multi_lora_(y, x, A, B, idx, scales, ranks, **kw)
    u = torch.zeros(6, 4, device=device)
    with pytest.raises(RuntimeError, match=f"lora_expand_: .*{what}"):
        lora_expand_(y, u, B, idx, scales, ranks, **kw)


# ---------------------------------------------------------------- 2. meta among real tensors
def test_meta_tensor_among_cpu_tensors_raises():
    x, A, B, idx, scales, ranks = multi()
    y = torch.zeros(6, 12)
    meta = dict(device="meta")
    with pytest.raises(RuntimeError, match="multi_lora_: .* is on meta"):
        multi_lora_(y, x, A.to(**meta), B, idx, scales, ranks)
    with pytest.raises(RuntimeError, match="lora_shrink: .*on meta"):
        lora_shrink(x, A, idx.to(**meta), ranks)
    with pytest.raises(RuntimeError, match="lora_expand_: .*on meta"):
        lora_expand_(y, torch.zeros(6, 4), B, idx, scales.to(**meta), ranks)
    with pytest.raises(RuntimeError, match="lora_apply_: .*on meta"):
        lora_apply_(y, x, A[0].to(**meta), B[0], 1.0)
    with pytest.raises(RuntimeError, match="lora_linear: .*on meta"):
        lora_linear(x, torch.zeros(12, 16, device="meta"), None, A[0], B[0], 1.0)
    W = torch.zeros(12, 16)
    with pytest.raises(RuntimeError, match="merge_: .*on meta"):
        merge_(W, A[0].to(**meta), B[0], 1.0)
    # all on meta: shape inference works
    out = lora_shrink(x.to(**meta), A.to(**meta), idx.to(**meta), ranks.to(**meta))
    assert out.shape == (6, 4) and out.device.type == "meta"


# ---------------------------------------------------------------- 4. fp16 gradients keep fp32
@pytest.mark.parametrize("device", devices())
def test_fp16_backward_has_no_spurious_inf(device):
    # |x A^T| ~ 1e5 > 65504: u is fine in fp32 (the forward never rounds it to fp16), and the
    # true dB = s g^T u is ~1e2; rounding s * u to fp16 first made it inf
    T, i, o, r, s = 4, 8, 3, 2, 1e-3
    x = torch.full((T, i), 100.0, dtype=torch.float16, device=device, requires_grad=True)
    A = torch.full((r, i), 150.0, dtype=torch.float16, device=device, requires_grad=True)
    B = torch.full((o, r), 1e-4, dtype=torch.float16, device=device, requires_grad=True)
    W = torch.zeros(o, i, dtype=torch.float16, device=device)
    g = torch.full((T, o), 0.25, dtype=torch.float16, device=device)
    y = lora_linear(x, W, None, A, B, s)
    y.backward(g)
    assert torch.isfinite(y).all() and torch.isfinite(B.grad).all() and torch.isfinite(A.grad).all()
    u = x.detach().double() @ A.detach().double().t()
    ref_dB = s * g.double().t() @ u
    assert rel_err(B.grad, ref_dB) < 2e-3
    gB = g.double() @ B.detach().double()
    assert rel_err(A.grad, s * gB.t() @ x.detach().double()) < 2e-3


# ---------------------------------------------------------------- 5. out_slices overflow
@pytest.mark.parametrize("device", devices())
def test_out_slices_that_wrap_around_are_refused(device):
    x, A, B, idx, scales, ranks = multi(device=device)
    y = torch.zeros(6, 12, device=device)
    A4 = A[None].expand(4, -1, -1, -1).contiguous()
    wrap = [2**62, 2**62, 2**62, 2**62 + 12]  # int64 sum wraps to 12
    with pytest.raises(RuntimeError, match="multi_lora_: out_slices .* sum to out = 12"):
        multi_lora_(y, x, A4, B, idx, scales, ranks, wrap)
    with pytest.raises(RuntimeError, match="lora_expand_: out_slices"):
        lora_expand_(y, torch.zeros(4, 6, 4, device=device), B, idx, scales, ranks, wrap)


# ---------------------------------------------------------------- 6. messages name op + argument
@pytest.mark.parametrize("bad,exc", [(None, TypeError), ([1.0], TypeError), ("2", TypeError),
                                     (10**400, ValueError), (float("nan"), ValueError), (True, TypeError),
                                     (1e39, ValueError),  # finite as a double, inf in the fp32 kernels
                                     (torch.tensor(2.0, requires_grad=True), TypeError)])
def test_scale_arguments_are_checked(bad, exc):
    x, A, B, idx, scales, ranks = multi()
    y, W = torch.zeros(6, 12), torch.zeros(12, 16)
    with pytest.raises(exc, match="lora_apply_: scale"):
        lora_apply_(y, x, A[0], B[0], bad)
    with pytest.raises(exc, match="lora_linear: scale"):
        lora_linear(x, W, None, A[0], B[0], bad)
    with pytest.raises(exc, match="merge_: scale"):
        merge_(W, A[0], B[0], bad)
    with pytest.raises((exc, ValueError), match="unmerge_: .*scale"):
        unmerge_(W, A[0], B[0], bad)
    with pytest.raises(exc, match="lora_shrink: scale"):
        lora_shrink(x, A, idx, ranks, bad)
    with pytest.raises(exc, match=r"merge_: scale\[1\]"):
        merge_(W, [A[0], A[1]], [B[0], B[1]], [1.0, bad])


def test_scales_beyond_float32_are_refused_by_the_ops_too():
    x, A, B, idx, scales, ranks = multi()
    y, W = torch.zeros(6, 12), torch.zeros(12, 16)
    ops = torch.ops.lora_ext
    for call in (lambda: ops.lora_apply_.default(y, x, A[0], B[0], -1e39),
                 lambda: ops.lora_linear_fwd.default(x, W, None, A[0], B[0], 1e39, 0.0, None, False),
                 lambda: ops.merge_.default(W, [A[0]], [B[0]], [1e39], False),
                 lambda: ops.lora_shrink.default(x, A, idx, ranks, 1e39)):
        with pytest.raises(RuntimeError, match="must be finite in float32"):
            call()
    assert not y.any() and not W.any()


def test_safe_merge_sees_overflow_of_the_fp32_intermediate():
    """|s B| > FLT_MAX while s B A is finite: the kernel's fl32(s * B) is inf, so safe refuses."""
    W = torch.ones(4, 3)
    A, B = torch.full((2, 3), 1e-30), torch.full((4, 2), 1e20)
    with pytest.raises(ValueError, match="overflow"):
        merge_(W, A, B, 1e19, safe=True)
    assert torch.equal(W, torch.ones(4, 3))


def test_in_place_ops_refuse_inputs_that_require_grad():
    x, A, B, idx, scales, ranks = multi()
    y = torch.zeros(6, 12)
    Ag = A[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="lora_apply_: A requires grad.*lora_linear"):
        lora_apply_(y, x, Ag, B[0], 1.0)
    with pytest.raises(RuntimeError, match="multi_lora_: x requires grad"):
        multi_lora_(y, x.clone().requires_grad_(), A, B, idx, scales, ranks)
    with pytest.raises(RuntimeError, match="lora_expand_: y requires grad"):
        lora_expand_(torch.zeros(6, 12, requires_grad=True), torch.zeros(6, 4), B, idx, scales, ranks)
    with torch.no_grad():  # serving: fine
        lora_apply_(y, x, Ag, B[0], 1.0)
    assert y.any()


def test_duplicate_adapter_names_in_one_merge():
    W = torch.zeros(12, 16)
    x, A, B, *_ = multi()
    with pytest.raises(ValueError, match="distinct"):
        merge_(W, [A[0], A[1]], [B[0], B[1]], [1.0, 1.0], state=MergeState(), name=["a", "a"])
    assert not W.any()


@pytest.mark.parametrize("shape", [(5, 0, 4), (5, 6, 0), (0, 6, 4)], ids=["in=0", "out=0", "T=0"])
def test_empty_widths_forward_backward_and_fake(shape):
    """in / out / T = 0: gradients of the right (empty or zero) shape, and fake kernels that agree."""
    T, i, o = shape
    x, W = torch.randn(T, i, requires_grad=True), torch.randn(o, i)
    A, B = torch.randn(3, i, requires_grad=True), torch.randn(o, 3, requires_grad=True)
    b = torch.randn(o, requires_grad=True)
    y = lora_linear(x, W, b, A, B, 0.5)
    assert y.shape == (T, o)
    y.sum().backward()
    for t in (x, A, B):
        assert t.grad.shape == t.shape and not t.grad.any()
    assert torch.equal(b.grad, torch.full((o,), float(T)))
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_fwd.default,
                          (x, W, b, A, B, 0.5, 0.0, None, False))


def test_compiled_calls_with_a_changing_scale():
    """A scale that changes between calls becomes symbolic under torch.compile: no Python checks
    on it then (the op checks it when it runs)."""
    torch._dynamo.reset()
    x, A, B, *_ = multi()
    W = torch.randn(12, 16)

    @torch.compile(fullgraph=True)
    def step(y, s):
        lora_apply_(y, x, A[0], B[0], s)
        return lora_linear(x, W, None, A[0], B[0], s)

    for s in (0.5, 0.25, 2.0):
        y = torch.zeros(6, 12)
        out = step(y, s)
        ry = lora_apply_(torch.zeros(6, 12), x, A[0], B[0], s)
        assert rel_err(y, ry) < 1e-6 and rel_err(out, lora_linear(x, W, None, A[0], B[0], s)) < 1e-6
    dyn = torch.compile(lambda x: lora_linear(x, W, None, A[0], B[0], 0.5, 0.1, True), dynamic=True,
                        fullgraph=True)
    assert dyn(torch.randn(7, 16)).shape == (7, 12)


def test_safe_merge_of_an_empty_weight():
    W = torch.zeros(0, 16)
    A, B = torch.ones(2, 16), torch.ones(0, 2)
    check_merge_finite(W, [A], [B], [1.0])
    merge_(W, A, B, 1.0, safe=True)
    merge_(torch.zeros(3, 0), torch.ones(2, 0), torch.ones(3, 2), 1.0, safe=True, state=MergeState())


# ---------------------------------------------------------------- vLLM-style arguments
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_scale_expand_u_dtype_and_overwrite(device, dtype):
    x, A, B, idx, scales, ranks = multi(T=6, device=device, dtype=dtype)
    u1 = lora_shrink(x, A, idx, ranks)
    u3 = lora_shrink(x, A, idx, ranks, 0.25)
    assert rel_err(u3, 0.25 * u1) < 1e-6
    y0 = torch.randn(6, 12, device=device).to(dtype)
    ref = y0.clone()
    lora_expand_(ref, u1, B, idx, scales, ranks)
    y = y0.clone()
    lora_expand_(y, u1.to(dtype), B, idx, scales, ranks)  # u in y's dtype
    assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    over = y0.clone()
    lora_expand_(over, u1, B, idx, scales, ranks, add_inputs=False)
    zero = torch.zeros_like(y0)
    lora_expand_(zero, u1, B, idx, scales, ranks)
    assert torch.equal(over, zero)  # y = s B u; rows without adapter are zero
    with pytest.raises(RuntimeError, match="lora_expand_: u must be float32 .* or y's dtype"):
        lora_expand_(y, u1.to(torch.float16 if dtype != torch.float16 else torch.bfloat16), B, idx,
                     scales, ranks)


def test_meta_tensors_get_the_kernels_checks():
    """Fake kernels (meta tensors: shape inference, tracing) refuse what the kernels refuse."""
    m = lambda *s, dt=torch.float32: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    assert lora_linear(m(4, 8), m(6, 8), m(6), m(2, 8), m(6, 2), 1.0).shape == (4, 6)
    for args in [(m(4, 8), m(6, 9), None, m(2, 8), m(6, 2)), (m(4, 8), m(6, 8), m(5), m(2, 8), m(6, 2))]:
        with pytest.raises(RuntimeError, match="lora_linear: shapes"):
            lora_linear(*args, 1.0)
    with pytest.raises(RuntimeError, match="lora_linear: .*dtypes must match"):
        lora_linear(m(4, 8), m(6, 8), None, m(2, 8), m(6, 2, dt=torch.bfloat16), 1.0)
    with pytest.raises(RuntimeError, match="lora_apply_: (shapes|leading dims)"):
        lora_apply_(m(3, 6), m(4, 8), m(2, 8), m(6, 2), 1.0)
