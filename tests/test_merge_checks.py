"""merge_'s argument checks and ``safe=True`` (check_merge_finite): it refuses a merge exactly when
the kernels would write inf/NaN (their arithmetic: one fp32 fma chain over all adapters' ranks, then
W0 + S rounded once), bad merge_/unmerge_ arguments name the op and the argument, and tensor scales
under torch.compile."""
import pytest
import torch

import lora_ext.ops.merge as merge_mod
from lora_ext.ops import (MergeState, check_merge_finite, dora_norm, lora_apply_, lora_linear, merge_,
                          unmerge_)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def refused(W, As, Bs, ss, **kw):
    """(refused?, W afterwards) of merge_(..., safe=True) on a copy of W."""
    w = W.clone()
    try:
        merge_(w, As, Bs, ss, safe=True, **kw)
    except ValueError as e:
        assert "merge" in str(e)
        assert torch.equal(w.view(torch.uint8), W.view(torch.uint8))  # nothing written
        return True, w
    return False, w


def agrees_with_the_kernel(W, As, Bs, ss, fifo=False):
    plain = W.clone()
    merge_(plain, As, Bs, ss, fan_in_fan_out=fifo)
    no, safe = refused(W, As, Bs, ss, fan_in_fan_out=fifo)
    assert no == (not torch.isfinite(plain).all()), (W, As, Bs, ss, plain)
    try:  # the exact pass one row at a time
        check_merge_finite(W, As, Bs, ss, fan_in_fan_out=fifo, chunk=1)
        assert not no
    except ValueError:
        assert no
    if not no:
        assert torch.equal(safe.view(torch.uint8), plain.view(torch.uint8))
    return no


# ---------------------------------------------------------------- safe=True: the kernels' arithmetic
def test_safe_merge_sums_all_adapters_before_adding_the_weight():
    one = torch.ones(1, 1)
    big = torch.tensor([[3e38]])
    # -3e38 + (3e38 + 3e38): the fp32 sum of the deltas overflows although (W0 + S1) + S2 would not
    assert agrees_with_the_kernel(torch.tensor([[-3e38]]), [one, one], [big, big], [1.0, 1.0])
    # 3e38 + (3e38 - 3e38) is finite, although 3e38 + 3e38 would not be
    assert not agrees_with_the_kernel(torch.tensor([[3e38]]), [one, one], [big, -big], [1.0, 1.0])


def test_a_finite_adapter_with_a_large_row_sum_is_not_blamed():
    """sum_j |B[o, j]| overflows fp32 while B, s B and the result (6e8) are finite."""
    W, A, B = torch.zeros(1, 1), torch.ones(2, 1), torch.tensor([[3e38, 3e38]])
    assert not agrees_with_the_kernel(W, [A], [B], [1e-30])
    check_merge_finite(W, [A], [B], [1e-30])


@pytest.mark.parametrize("where", ["A", "B"])
def test_non_finite_adapters_are_named(where):
    W, A, B = torch.zeros(3, 4), torch.ones(2, 4), torch.ones(3, 2)
    (A if where == "A" else B)[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"adapter 1 has non-finite values \(inf or NaN\) in A or B"):
        merge_(W, [torch.ones(2, 4), A], [torch.ones(3, 2), B], [1.0, 1.0], safe=True)
    assert not W.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_safe_merge_near_overflow_agrees_with_the_kernel(dtype, fifo):
    """Weights and deltas near the dtype's largest value, several adapters that partly cancel:
    refused exactly when merge_ writes inf/NaN, and otherwise the same bits."""
    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(1)
    n_refused = 0
    for trial in range(40):
        P, Q, n = 3, 5, 1 + trial % 3
        out, inp = (Q, P) if fifo else (P, Q)
        W = ((torch.rand(P, Q, generator=g) * 1.6 - 0.8) * big).to(dtype)
        As, Bs, ss = [], [], []
        for _ in range(n):
            r = 1 + trial % 2
            As.append((torch.rand(r, inp, generator=g) + 0.5).to(dtype))
            Bs.append(((torch.rand(out, r, generator=g) * 2 - 1) * big / (2 * r)).to(dtype))
            ss.append(float(torch.rand((), generator=g)) + 0.2)
        n_refused += agrees_with_the_kernel(W, As, Bs, ss, fifo)
    assert 0 < n_refused < 40  # both outcomes were exercised


def test_safe_exact_merge_follows_the_sum_of_all_merged_adapters():
    """With a MergeState the kernel writes round(W0 + S) over every merged adapter: merging a second
    one that overflows that sum is refused, although the current weight plus its delta is finite."""
    one, big = torch.ones(1, 1), torch.tensor([[3e38]])
    W, state = torch.tensor([[-3e38]]), MergeState()
    merge_(W, one, big, 1.0, state=state, name="a", safe=True)  # -3e38 + 3e38 = 0
    before = W.clone()
    with pytest.raises(ValueError, match="overflow"):
        merge_(W, one, big, 1.0, state=state, name="b", safe=True)  # -3e38 + (3e38 + 3e38) = inf
    assert torch.equal(W, before) and state.merged == ["a"]
    plain = torch.tensor([[-3e38]])  # what the merge would have written
    merge_(plain, [one, one], [big, big], [1.0, 1.0])
    assert torch.isinf(plain).all()
    merge_(W, one, -big, 1.0, state=state, name="c", safe=True)  # -3e38 + (3e38 - 3e38): fine
    unmerge_(W, state=state)
    assert torch.equal(W, torch.tensor([[-3e38]]))


def test_typical_weights_get_no_exact_pass(monkeypatch):
    """The bound decides for ordinary weights: the kernel is not run on copies."""
    def no_exact_pass(*args):
        raise AssertionError("exact pass")
    monkeypatch.setattr(merge_mod, "_check_merged_bits", no_exact_pass)
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        W = (torch.randn(64, 48, generator=g) * 0.02).to(dtype)
        A, B = torch.randn(8, 48, generator=g).to(dtype), (torch.randn(64, 8, generator=g) * 0.01).to(dtype)
        merge_(W, [A, A], [B, B], [2.0, 0.5], safe=True)
        merge_(W, A, B, 1.0, safe=True, state=MergeState())


# ---------------------------------------------------------------- merge_ / unmerge_ arguments
W, A, B = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: merge_(W.clone(), A, B, 1.0, state=MergeState(), name=5), TypeError,
     r"merge_: name must be a str or a list/tuple of str, got 5"),
    (lambda: merge_(W.clone(), [A], [B], 1.0, state=MergeState(), name=[None]), TypeError,
     r"merge_: name must be a str"),
    (lambda: merge_(W.clone(), None, None, 1.0), TypeError, r"merge_: A must be a tensor or a list"),
    (lambda: merge_(W.clone(), A, None, 1.0), TypeError, r"merge_: A is a tensor but B is NoneType"),
    (lambda: merge_(W.clone(), None, B, 1.0), TypeError, r"merge_: A must be a tensor or a list/tuple of tensors, got NoneType"),
    (lambda: merge_(W.clone(), [A], B, 1.0), TypeError, r"merge_: B is a tensor but A is list"),
    (lambda: merge_(W.clone(), [A, None], [B, B], 1.0), TypeError, r"merge_: A\[1\] must be a tensor"),
    (lambda: merge_(W.clone(), [A, A], [B], 1.0, state=MergeState()), ValueError,
     r"merge_: A and B must hold one tensor per adapter, got 2 and 1"),
    (lambda: merge_(W.clone(), [A], [B], [1.0, 2.0], state=MergeState()), ValueError,
     r"merge_: scale must hold one value per adapter \(1\), got 2"),
    (lambda: unmerge_(W.clone(), A, None, 1.0), ValueError, r"unmerge_: .*A, B and scale are required"),
    (lambda: unmerge_(W.clone(), A, [B], 1.0), TypeError, r"unmerge_: A is a tensor but B is list"),
    (lambda: unmerge_(W.clone(), 3, [B], 1.0), TypeError, r"unmerge_: A must be a tensor or a list"),
])
def test_bad_merge_arguments_name_the_op_and_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_unmerge_with_a_bad_name():
    w, state = W.clone(), MergeState()
    merge_(w, A, B, 1.0, state=state)
    merged = w.clone()
    for bad in (5, ["default", 2]):
        with pytest.raises(TypeError, match=r"unmerge_: name must be a str or a list/tuple of str"):
            unmerge_(w, state=state, name=bad)
    assert torch.equal(w, merged) and state.merged == ["default"]


# ---------------------------------------------------------------- tensor scales under torch.compile
x = torch.randn(5, 6)
OPS = {
    "lora_linear": lambda s: lora_linear(x, W, None, A, B, s),
    "lora_apply_": lambda s: lora_apply_(torch.zeros(5, 4), x, A, B, s),
    "dora_norm": lambda s: dora_norm(W, A, B, s),
    "merge_": lambda s: merge_(W.clone(), A, B, s),
}


@pytest.mark.parametrize("op", list(OPS))
def test_tensor_scale_under_torch_compile(op):
    """The kernels take the scale as a float argument, which cannot hold a value read from a tensor
    while tracing: the call graph-breaks (compiled == eager); fullgraph=True names the op and the
    argument instead of failing on a guard."""
    f, s = OPS[op], torch.tensor(0.5)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager")(s), f(s))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=rf"{op}: scale is a tensor.*pass scale as a Python float"):
        torch.compile(f, backend="eager", fullgraph=True)(s)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(0.5), f(s))
