"""The ops as a numerics reviewer fuzzes them: random odd shapes (T = 0, 1, odd; in/out 1 and not
multiples of 8; r 1..80), dtypes, strided / offset / expanded layouts against plain-torch fp64
references, bit-identical results across thread counts, and the autograd/tangent contract of the
serving ops (an argument that would silently get no gradient raises)."""
import random

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DTYPES, RTOL, rel_err

from lora_ext.ops import dora_norm, lora_apply_, lora_expand_, lora_linear, lora_shrink, merge_, multi_lora_

F32 = torch.float32
I32 = torch.int32


def laid_out(t: torch.Tensor, mode: str) -> torch.Tensor:
    """t [R, C] as the same values in another layout: a column slice of a wider buffer at a storage
    offset, or the transpose of a contiguous [C, R]."""
    if mode == "wide":
        buf = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        buf[:, 1:1 + t.shape[1]] = t
        return buf[:, 1:1 + t.shape[1]]
    if mode == "transposed":
        return t.t().contiguous().t()
    return t


def ref_multi(y, x, A_pool, B_pool, idx, scales, ranks):
    """fp64, one token at a time: y[t] += s_a * B_a[:, :r] @ (A_a[:r] @ x[t])."""
    out = y.double().clone()
    for t, a in enumerate(idx.tolist()):
        if a >= 0:
            r = int(ranks[a])
            out[t] += float(scales[a]) * (B_pool[a, :, :r].double() @ (A_pool[a, :r].double() @ x[t].double()))
    return out


@pytest.mark.parametrize("case", range(24))
def test_fuzz_lora_apply_against_fp64(case):
    r = random.Random(case)
    dt = DTYPES[case % 3]
    T, i, o = r.choice([0, 1, 3, 7, 9, 33]), r.choice([1, 3, 17, 33]), r.choice([1, 2, 7, 17, 33])
    k = r.choice([1, 2, 5, 16, 17, 33, 80])
    s = r.choice([1.0, -2.5, 0.125, 0.0])
    x = laid_out(torch.randn(T, i).to(dt), r.choice(["contig", "wide", "transposed"]))
    A = laid_out((torch.randn(k, i) / i ** 0.5).to(dt), r.choice(["contig", "transposed"]))
    B = laid_out((torch.randn(o, k) / k ** 0.5).to(dt), r.choice(["contig", "transposed"]))
    buf = torch.randn(T, o + 3).to(dt)
    outside = buf.clone()
    y = buf[:, 1:o + 1]  # written in place: a strided view at a storage offset
    ref = y.double() + s * (x.double() @ A.double().t()) @ B.double().t()
    lora_apply_(y, x, A, B, s)
    assert rel_err(y, ref) <= 4 * RTOL[dt], (dt, T, i, o, k, s)
    assert torch.equal(buf[:, 0], outside[:, 0]) and torch.equal(buf[:, o + 1:], outside[:, o + 1:])


def test_lora_apply_expanded_x_and_overlapping_y():
    x, A, B = torch.randn(1, 9).expand(5, 9), torch.randn(3, 9), torch.randn(7, 3)
    y = torch.zeros(5, 7)
    lora_apply_(y, x, A, B, 0.5)
    assert rel_err(y, 0.5 * (x.double() @ A.double().t()) @ B.double().t()) <= RTOL[F32]
    with pytest.raises(RuntimeError, match="lora_apply_: y has internal overlap"):
        lora_apply_(torch.zeros(1, 7).expand(5, 7), x, A, B, 0.5)


@pytest.mark.parametrize("case", range(12))
def test_fuzz_multi_lora_and_halves_against_fp64(case):
    r = random.Random(100 + case)
    dt = DTYPES[case % 3]
    T, i, o = r.choice([0, 1, 5, 9, 50]), r.choice([1, 3, 17, 33]), r.choice([1, 5, 16, 33])
    S, R = r.choice([1, 2, 3]), r.choice([1, 4, 7, 33])
    x = laid_out(torch.randn(T, i).to(dt), r.choice(["contig", "wide"]))
    A_pool, B_pool = (torch.randn(S, R, i) / i ** 0.5).to(dt), (torch.randn(S, o, R) / R ** 0.5).to(dt)
    idx = torch.randint(-1, S, (T,), dtype=r.choice([torch.int32, torch.int64]))
    scales, ranks = torch.randn(S), torch.randint(0, R + 1, (S,), dtype=I32)
    y0 = torch.randn(T, o).to(dt)
    ref = ref_multi(y0, x, A_pool, B_pool, idx, scales, ranks)
    y = y0.clone()
    multi_lora_(y, x, A_pool, B_pool, idx, scales, ranks)
    assert rel_err(y, ref) <= 4 * RTOL[dt]
    y2 = y0.clone()
    lora_expand_(y2, lora_shrink(x, A_pool, idx, ranks), B_pool, idx, scales, ranks)
    assert rel_err(y2, ref) <= 4 * RTOL[dt]


def test_same_bits_for_any_thread_count():
    g = torch.Generator().manual_seed(0)
    T, i, o, k, S = 300, 129, 77, 19, 4
    x, A, B = torch.randn(T, i, generator=g), torch.randn(k, i, generator=g), torch.randn(o, k, generator=g)
    W = torch.randn(o, i, generator=g)
    A_pool, B_pool = torch.randn(S, k, i, generator=g), torch.randn(S, o, k, generator=g)
    idx, scales = torch.randint(-1, S, (T,), generator=g), torch.rand(S, generator=g)
    ranks = torch.tensor([19, 3, 0, 7], dtype=I32)
    grad = torch.randn(T, o, generator=g)

    def run():
        y = torch.zeros(T, o)
        lora_apply_(y, x, A, B, 0.7)
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        yl = lora_linear(xs, W, None, As, Bs, 0.3, dropout_p=0.1, training=True, seed=torch.tensor([5]))
        yl.backward(grad)
        ym = torch.zeros(T, o)
        multi_lora_(ym, x, A_pool, B_pool, idx, scales, ranks)
        return [y, yl.detach(), xs.grad, As.grad, Bs.grad, ym, merge_(W.clone(), A, B, 0.5),
                dora_norm(W, A, B, 0.5)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


# ---- the serving ops' per-adapter scales: never silently without a gradient / tangent ----
def _serving_calls():
    T, i, o, S, R = 4, 6, 5, 2, 3
    x, A_pool, B_pool = torch.randn(T, i), torch.randn(S, R, i), torch.randn(S, o, R)
    idx, ranks, u = torch.tensor([0, 1, 0, -1]), torch.full((S,), R, dtype=I32), torch.randn(T, R)
    return S, {
        "multi_lora_": lambda s: multi_lora_(torch.zeros(T, o), x, A_pool, B_pool, idx, s, ranks),
        "lora_expand_": lambda s: lora_expand_(torch.zeros(T, o), u, B_pool, idx, s, ranks),
    }


@pytest.mark.parametrize("op", ["multi_lora_", "lora_expand_"])
def test_scales_that_require_grad_raise(op):
    # the kernels ignore autograd: learnable per-adapter scales got no gradient, without a word
    S, calls = _serving_calls()
    scales = torch.ones(S, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"{op}: scales requires grad"):
        calls[op](scales)
    with torch.no_grad():  # serving: fine, and the values are used
        y = calls[op](scales)
        assert torch.equal(y, calls[op](scales.detach().clone()))


@pytest.mark.parametrize("op", ["multi_lora_", "lora_expand_"])
def test_scales_with_a_tangent_raise(op):
    S, calls = _serving_calls()
    with fwAD.dual_level():
        scales = fwAD.make_dual(torch.ones(S), torch.ones(S))
        with pytest.raises(RuntimeError, match=f"{op}: scales carries a forward-mode AD tangent"):
            calls[op](scales)


def test_nan_or_inf_per_adapter_scale_propagates_as_documented():
    T, i, o, S, R = 5, 6, 4, 3, 2
    x, A_pool, B_pool = torch.randn(T, i), torch.randn(S, R, i), torch.randn(S, o, R)
    idx, ranks = torch.tensor([0, 1, 2, -1, 1]), torch.full((S,), R, dtype=I32)
    scales = torch.tensor([1.0, float("nan"), float("inf")])
    y = multi_lora_(torch.zeros(T, o), x, A_pool, B_pool, idx, scales, ranks)
    ref = ref_multi(torch.zeros(T, o), x, A_pool, B_pool, idx, scales, ranks)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert y[1].isnan().all() and y[2].isinf().all() and torch.equal(y[3], torch.zeros(o))


# ---- in-place writes bump version counters: a value autograd saved is never silently replaced ----
def _inplace_writes():
    """(name, fn(t) writing t [4, 6] in place) for every in-place op wrapper."""
    from lora_ext.ops import MergeState, unmerge_
    T, i, o, S, R = 4, 5, 6, 2, 3
    x, A, B = torch.randn(T, i), torch.randn(R, 6), torch.randn(4, R)
    A_pool, B_pool, idx = torch.randn(S, R, i), torch.randn(S, o, R), torch.tensor([0, 1, -1, 0])
    scales, ranks = torch.ones(S), torch.full((S,), R, dtype=I32)

    def exact_roundtrip(t):
        state = MergeState()
        merge_(t, A, B, 0.5, state=state)
        v = t._version
        state.unmerge(t)  # the state's own transition (layers call it directly)
        assert t._version > v

    return [
        ("lora_apply_", lambda t: lora_apply_(t, x, torch.randn(R, i), torch.randn(o, R), 0.5)),
        ("multi_lora_", lambda t: multi_lora_(t, x, A_pool, B_pool, idx, scales, ranks)),
        ("lora_expand_", lambda t: lora_expand_(t, torch.randn(T, R), B_pool, idx, scales, ranks)),
        ("merge_", lambda t: merge_(t, A, B, 0.5)),
        ("unmerge_", lambda t: unmerge_(t, A, B, 0.5)),
        ("merge_ exact", lambda t: merge_(t, A, B, 0.5, state=MergeState())),
        ("MergeState.unmerge", exact_roundtrip),
    ]


@pytest.mark.parametrize("case", range(7), ids=[n for n, _ in _inplace_writes()])
def test_inplace_ops_invalidate_values_saved_for_backward(case):
    # y * y saves y; writing y afterwards (under no_grad, as serving and merging do) used to keep
    # its version, so backward silently used the new values: torch's own in-place ops raise there
    name, write = _inplace_writes()[case]
    leaf = torch.randn(4, 6, requires_grad=True)
    t = leaf * 1
    loss = (t * t).sum()
    v = t._version
    with torch.no_grad():
        write(t)
    assert t._version > v, name
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
