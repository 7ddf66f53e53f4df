"""The ops as a compiler / shape-inference user sees them: fake kernels (meta tensors, torch.compile
tracing) refuse exactly what the CPU kernels refuse, and accept what they accept with the same
output shapes; argument conversions never truncate silently."""
import numpy as np
import pytest
import torch

from lora_ext.ops import (check_merge_finite, lora_apply_, lora_expand_, lora_linear, lora_shrink, merge_,
                          multi_lora_)

S = 3
F32, F16, F64, I32, I64 = torch.float32, torch.float16, torch.float64, torch.int32, torch.int64


def t(*shape, dt=F32):
    """A spec of a tensor: (shape, dtype)."""
    return (shape, dt)


def build(spec, device):
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        shape, dt = spec
        if device == "meta":
            return torch.empty(shape, dtype=dt, device="meta")
        g = torch.Generator().manual_seed(sum(shape) + 7)
        if dt.is_floating_point:
            return torch.randn(shape, generator=g).to(dt)
        if dt == I32 and len(shape) >= 1 and shape[-1] == S:  # ranks: valid values
            return torch.full(shape, 1, dtype=dt)
        return torch.randint(-1, S, shape, generator=g).to(dt)  # indices
    if isinstance(spec, list):
        return [build(s, device) for s in spec]
    return spec


def call(op, args, kw, device):
    return op(*[build(a, device) for a in args], **{k: build(v, device) for k, v in kw.items()})


def slots(T=5, n=None, idx=I32, sc=F32, rk=I32):
    """indices, scales, ranks specs for S slots (per slice with n)."""
    lead = () if n is None else (n,)
    return t(T, dt=idx), t(*lead, S, dt=sc), t(*lead, S, dt=rk)


def multi_args(T=5, i=8, o=6, r=4, n=None, y=None, x=None, A=None, B=None, idx=I32, sc=F32, rk=I32,
               dt=F32):
    ind, scales, ranks = slots(T, n, idx, sc, rk)
    A = A or (t(S, r, i, dt=dt) if n is None else t(n, S, r, i, dt=dt))
    return [y or t(T, o, dt=dt), x or t(T, i, dt=dt), A, B or t(S, o, r, dt=dt), ind, scales, ranks]


# (name, op, args, kwargs): every one is refused by the CPU kernel
REFUSED = [
    ("apply rank 0", lora_apply_, [t(3, 6), t(3, 8), t(0, 8), t(6, 0), 1.0], {}),
    ("apply fp64", lora_apply_, [t(3, 6, dt=F64), t(3, 8, dt=F64), t(2, 8, dt=F64), t(6, 2, dt=F64), 1.0], {}),
    ("apply y fp16", lora_apply_, [t(3, 6, dt=F16), t(3, 8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply y dims", lora_apply_, [t(20, 6), t(4, 5, 8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply leading dims", lora_apply_, [t(5, 4, 6), t(4, 5, 8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply x 0-d", lora_apply_, [t(), t(), t(2, 8), t(6, 2), 1.0], {}),
    ("apply A 3-D", lora_apply_, [t(3, 6), t(3, 8), t(1, 2, 8), t(6, 2), 1.0], {}),
    ("linear rank 0", lora_linear, [t(4, 8), t(6, 8), None, t(0, 8), t(6, 0), 1.0], {}),
    ("linear fp64", lora_linear, [t(4, 8, dt=F64), t(6, 8, dt=F64), None, t(2, 8, dt=F64), t(6, 2, dt=F64), 1.0], {}),
    ("linear bias dtype", lora_linear, [t(4, 8), t(6, 8), t(6, dt=F16), t(2, 8), t(6, 2), 1.0], {}),
    ("linear int32 seed", lora_linear, [t(4, 8), t(6, 8), None, t(2, 8), t(6, 2), 1.0, 0.5, True],
     {"seed": t(1, dt=I32)}),
    ("linear 2-element seed", lora_linear, [t(4, 8), t(6, 8), None, t(2, 8), t(6, 2), 1.0, 0.5, True],
     {"seed": t(2, dt=I64)}),
    ("multi fp64", multi_lora_, multi_args(dt=F64), {}),
    ("multi x fp16", multi_lora_, multi_args(x=t(5, 8, dt=F16)), {}),
    ("multi pool fp16", multi_lora_, multi_args(A=t(S, 4, 8, dt=F16)), {}),
    ("multi float indices", multi_lora_, multi_args(idx=F32), {}),
    ("multi int64 ranks", multi_lora_, multi_args(rk=I64), {}),
    ("multi fp64 scales", multi_lora_, multi_args(sc=F64), {}),
    ("multi scales shape", multi_lora_, multi_args()[:5] + [t(S + 1), t(S, dt=I32)], {}),
    ("multi y dims", multi_lora_, multi_args(x=t(1, 5, 8)), {}),
    ("multi leading dims", multi_lora_, multi_args(x=t(5, 1, 8), y=t(1, 5, 6)), {}),
    ("multi x 0-d", multi_lora_, multi_args(T=1, x=t(), y=t()), {}),
    ("multi r_max 0", multi_lora_, multi_args(r=0), {}),
    ("multi B_pool r_max", multi_lora_, multi_args(B=t(S, 6, 3)), {}),
    ("multi slices sum", multi_lora_, multi_args(n=2) + [[2, 3]], {}),
    ("multi slices A 3-D", multi_lora_, multi_args() + [[2, 4]], {}),
    ("multi slices n", multi_lora_, multi_args(n=3) + [[2, 4]], {}),
    ("multi mixed flat and per-slice", multi_lora_,
     multi_args(n=2)[:5] + [t(S), t(2, S, dt=I32), [2, 4]], {}),
    ("multi int64 count", multi_lora_, multi_args(), {"bad_index_count": t(1, dt=I64)}),
    ("shrink fp64", lora_shrink, [t(5, 8, dt=F64), t(S, 4, 8, dt=F64), t(5, dt=I32), t(S, dt=I32)], {}),
    ("shrink r_max 0", lora_shrink, [t(5, 8), t(S, 0, 8), t(5, dt=I32), t(S, dt=I32)], {}),
    ("shrink 9 slices", lora_shrink, [t(5, 8), t(9, S, 4, 8), t(5, dt=I32), t(S, dt=I32)], {}),
    ("shrink int64 ranks", lora_shrink, [t(5, 8), t(S, 4, 8), t(5, dt=I32), t(S, dt=I64)], {}),
    ("shrink indices count", lora_shrink, [t(5, 8), t(S, 4, 8), t(4, dt=I32), t(S, dt=I32)], {}),
    ("expand u fp16, y fp32", lora_expand_, [t(5, 6), t(5, 4, dt=F16), t(S, 6, 4), *slots()], {}),
    ("expand u 3-D", lora_expand_, [t(5, 6), t(1, 5, 4), t(S, 6, 4), *slots()], {}),
    ("expand tokens", lora_expand_, [t(5, 6), t(4, 4), t(S, 6, 4), *slots()], {}),
    ("expand B_pool r_max", lora_expand_, [t(5, 6), t(5, 4), t(S, 6, 3), *slots()], {}),
    ("expand y fp64", lora_expand_, [t(5, 6, dt=F64), t(5, 4), t(S, 6, 4, dt=F64), *slots()], {}),
    ("expand B_pool fp16", lora_expand_, [t(5, 6), t(5, 4), t(S, 6, 4, dt=F16), *slots()], {}),
    ("expand float scales", lora_expand_, [t(5, 6), t(5, 4), t(S, 6, 4), *slots(sc=F16)], {}),
    ("expand slices n", lora_expand_, [t(5, 6), t(3, 5, 4), t(S, 6, 4), *slots(), [2, 4]], {}),
    ("merge A width", merge_, [t(6, 8), t(2, 7), t(6, 2), 0.5], {}),
    ("merge B rank", merge_, [t(6, 8), t(2, 8), t(6, 3), 0.5], {}),
    ("merge rank 0", merge_, [t(6, 8), t(0, 8), t(6, 0), 0.5], {}),
    ("merge fp64 weight", merge_, [t(6, 8, dt=F64), t(2, 8), t(6, 2), 0.5], {}),
    ("merge fp64 A", merge_, [t(6, 8), [t(2, 8), t(1, 8, dt=F64)], [t(6, 2), t(6, 1)], 0.5], {}),
    ("merge weight 3-D", merge_, [t(1, 6, 8), t(2, 8), t(6, 2), 0.5], {}),
    ("merge fan_in_fan_out", merge_, [t(6, 8), t(2, 8), t(6, 2), 0.5], {"fan_in_fan_out": True}),
]


@pytest.mark.parametrize("name,op,args,kw", REFUSED, ids=[c[0] for c in REFUSED])
def test_meta_tensors_are_refused_where_the_kernels_refuse(name, op, args, kw):
    opname = op.__name__
    with pytest.raises(RuntimeError, match=f"^{opname}: ") as cpu:
        with torch.no_grad():
            call(op, args, kw, "cpu")
    with pytest.raises(RuntimeError, match=f"^{opname}: ") as meta:
        with torch.no_grad():
            call(op, args, kw, "meta")
    # the same complaint: the kernel's message and the fake kernel's share their first words
    assert cpu.value.args[0].split()[:2] == meta.value.args[0].split()[:2], (cpu.value, meta.value)


def out_shape(r):
    return tuple(r.shape) if isinstance(r, torch.Tensor) else None


ACCEPTED = [
    ("apply 3-D", lora_apply_, [t(2, 3, 6), t(2, 3, 8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply 1-D", lora_apply_, [t(6), t(8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply empty", lora_apply_, [t(0, 6), t(0, 8), t(2, 8), t(6, 2), 1.0], {}),
    ("apply in 0", lora_apply_, [t(3, 6), t(3, 0), t(2, 0), t(6, 2), 1.0], {}),
    ("linear bf16 3-D", lora_linear, [t(2, 3, 8, dt=torch.bfloat16), t(6, 8, dt=torch.bfloat16),
                                      t(6, dt=torch.bfloat16), t(2, 8, dt=torch.bfloat16),
                                      t(6, 2, dt=torch.bfloat16), 1.0], {}),
    ("linear dropout eval", lora_linear, [t(4, 8), t(6, 8), None, t(2, 8), t(6, 2), 1.0, 0.5, False], {}),
    ("linear fan_in_fan_out", lora_linear, [t(4, 8), t(8, 6), None, t(2, 8), t(6, 2), 1.0], {"fan_in_fan_out": True}),
    ("multi 3-D int64", multi_lora_, multi_args(x=t(1, 5, 8), y=t(1, 5, 6), idx=I64), {}),
    ("multi fp16", multi_lora_, multi_args(dt=F16), {"bad_index_count": t(2, dt=I32)}),
    ("multi slices per-slice", multi_lora_, multi_args(n=2) + [[2, 4]], {}),
    ("multi one slice, flat and per-slice", multi_lora_, multi_args(n=1)[:5] + [t(S), t(1, S, dt=I32), [6]], {}),
    ("multi zero-width slice", multi_lora_, multi_args(n=2) + [[0, 6]], {}),
    ("multi no tokens", multi_lora_, multi_args(T=0), {}),
    ("multi in 0", multi_lora_, multi_args(i=0), {}),
    ("shrink 4-D", lora_shrink, [t(5, 8), t(2, S, 4, 8), t(5, dt=I32), t(2, S, dt=I32), 0.5], {}),
    ("shrink 3-D x", lora_shrink, [t(1, 5, 8, dt=F16), t(S, 4, 8, dt=F16), t(1, 5, dt=I64), t(S, dt=I32)], {}),
    ("expand u in y's dtype", lora_expand_, [t(5, 6, dt=F16), t(5, 4, dt=F16), t(S, 6, 4, dt=F16), *slots()], {}),
    ("expand 3-D y, slices", lora_expand_, [t(1, 5, 6), t(2, 5, 4), t(S, 6, 4), *slots(n=2), [2, 4]],
     {"add_inputs": False}),
    ("merge two adapters", merge_, [t(6, 8, dt=F16), [t(2, 8), t(1, 8, dt=torch.bfloat16)],
                                    [t(6, 2), t(6, 1, dt=F16)], [0.5, 2.0]], {}),
    ("merge no adapters", merge_, [t(6, 8), [], [], []], {}),
    ("merge fan_in_fan_out", merge_, [t(8, 6), t(2, 8), t(6, 2), 0.5], {"fan_in_fan_out": True}),
]


@pytest.mark.parametrize("name,op,args,kw", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_meta_tensors_are_accepted_where_the_kernels_accept(name, op, args, kw):
    with torch.no_grad():
        cpu, meta = call(op, args, kw, "cpu"), call(op, args, kw, "meta")
    assert out_shape(meta) == out_shape(cpu)
    if isinstance(meta, torch.Tensor):
        assert meta.dtype == cpu.dtype and meta.device.type == "meta"


def test_compiled_dynamic_shapes_keep_working_with_the_fake_checks():
    """The fake kernels' shape checks hold for symbolic sizes (torch.compile(dynamic=True)): no
    recompile per shape, results as eager."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    Ap, Bp = torch.randn(2, S, 4, 8, generator=g), torch.randn(S, 6, 4, generator=g)
    scales, ranks = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([4, 2, 1], dtype=I32)

    def f(x, idx):
        y = torch.zeros(*x.shape[:-1], 6)
        lora_apply_(y, x, A, B, 0.5)
        multi_lora_(y, x, Ap, Bp, idx, scales, ranks, [2, 4])
        return y

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3), (4, 1), (1, 7)]:
            x = torch.randn(*shape, 8, generator=g)
            idx = torch.randint(-1, S, shape, generator=g, dtype=I32)
            torch.testing.assert_close(cf(x, idx), f(x, idx), rtol=0, atol=0)


@pytest.mark.parametrize("widths", [[2.5, 3.5], [2.0, 4.0], [True, 5], [torch.tensor(2.0), 4]])
def test_out_slices_must_be_integers(widths):
    """int() would truncate 2.5 and 3.5 to 2 and 3 (and 2.5, 4.5 to a valid [2, 4]) silently."""
    x = torch.randn(5, 8)
    A, B = torch.randn(2, S, 4, 8), torch.randn(S, 6, 4)
    idx, scales, ranks = torch.tensor([0, 1, 2, -1, 0], dtype=I32), torch.ones(S), torch.full((S,), 4, dtype=I32)
    with pytest.raises(TypeError, match=r"multi_lora_: out_slices\[\d\] must be an int"):
        multi_lora_(torch.zeros(5, 6), x, A, B, idx, scales, ranks, widths)
    with pytest.raises(TypeError, match=r"lora_expand_: out_slices\[\d\] must be an int"):
        lora_expand_(torch.zeros(5, 6), torch.zeros(2, 5, 4), B, idx, scales, ranks, widths)


@pytest.mark.parametrize("widths", [(2, 4), np.array([2, 4]), torch.tensor([2, 4]), [np.int32(2), 4]])
def test_out_slices_integer_kinds(widths):
    g = torch.Generator().manual_seed(1)
    x, A, B = torch.randn(5, 8, generator=g), torch.randn(2, S, 4, 8, generator=g), torch.randn(S, 6, 4, generator=g)
    idx, ranks = torch.tensor([0, 1, 2, -1, 0], dtype=I32), torch.full((S,), 4, dtype=I32)
    scales = torch.rand(S, generator=g)
    want = torch.zeros(5, 6)
    for t_, a in enumerate(idx.tolist()):  # reference: slice i of y from A[i] and B's rows of it
        if a >= 0:
            want[t_, :2] = scales[a] * B[a, :2] @ (A[0, a] @ x[t_])
            want[t_, 2:] = scales[a] * B[a, 2:] @ (A[1, a] @ x[t_])
    y = multi_lora_(torch.zeros(5, 6), x, A, B, idx, scales, ranks, widths)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    u = lora_shrink(x, A, idx, ranks)
    torch.testing.assert_close(lora_expand_(torch.zeros(5, 6), u, B, idx, scales, ranks, widths), y,
                               rtol=0, atol=0)


def _fuzz_case(rng):
    """A random call: op, args and kwargs as specs (mostly valid, sometimes a wrong size or dtype)."""
    def pick(xs):
        return xs[int(rng.integers(len(xs)))]
    dims = [0, 1, 2, 5]
    lead = pick([(), (pick(dims),), (pick(dims), pick(dims))])
    i, o, r, s, n = pick(dims), pick(dims), pick([0, 1, 2]), S, pick([None, 1, 2])
    dt = pick([F32] * 6 + [F16, torch.bfloat16, F64])
    odd = lambda good, bad: bad if rng.random() < 0.15 else good  # noqa: E731
    T = int(np.prod(lead))
    idx, sc = t(odd(T, T + 1), dt=odd(I32, pick([I64, F32]))), t(*((s,) if n is None else (n, s)), dt=odd(F32, F64))
    rk = t(*((s,) if n is None else odd((n, s), (s,))), dt=odd(I32, I64))
    sl = None if n is None else ([o // 2, o - o // 2] if n == 2 else [o])
    op = pick(["apply", "linear", "multi", "shrink", "expand", "merge"])
    if op == "apply":
        return lora_apply_, [t(*odd(lead, (1,) * len(lead)), o, dt=odd(dt, F16)), t(*lead, i, dt=dt),
                             t(r, i, dt=dt), t(o, odd(r, r + 1), dt=dt), 1.0], {}
    if op == "linear":
        return lora_linear, [t(*lead, i, dt=dt), t(o, i, dt=dt), pick([None, t(odd(o, o + 1), dt=dt)]),
                             t(r, i, dt=dt), t(o, odd(r, r + 1), dt=dt), 1.0], {}
    A = t(s, r, i, dt=odd(dt, F16)) if n is None else t(n, s, r, i, dt=dt)
    if op == "multi":
        return multi_lora_, [t(*lead, o, dt=dt), t(*lead, i, dt=dt), A, t(s, o, odd(r, r + 1), dt=dt),
                             idx, sc, rk, sl], {}
    if op == "shrink":
        return lora_shrink, [t(*lead, i, dt=dt), A, idx, rk], {}
    if op == "expand":
        u = t(T, r, dt=pick([F32, dt])) if n is None else t(n, T, r, dt=pick([F32, dt]))
        return lora_expand_, [t(*lead, o, dt=dt), u, t(s, o, odd(r, r + 1), dt=dt), idx, sc, rk, sl], {}
    fifo = bool(rng.random() < 0.3)
    return merge_, [t(*((i, o) if fifo else (o, i)), dt=dt), t(r, odd(i, i + 1), dt=pick([F32, F16, F64])),
                    t(o, r), 0.5], {"fan_in_fan_out": fifo}


def test_fuzz_fake_kernels_agree_with_the_kernels():
    """Random shapes and dtypes: the CPU kernel and the fake kernel (meta tensors) both accept with
    the same output shape, or both refuse (value checks aside: indices and ranks are data)."""
    rng = np.random.default_rng(0)
    for _ in range(600):
        op, args, kw = _fuzz_case(rng)
        got = {}
        for device in ("cpu", "meta"):
            try:
                with torch.no_grad():
                    got[device] = ("ok", out_shape(call(op, args, kw, device)))
            except RuntimeError as e:
                got[device] = ("refused", str(e))
        if got["cpu"][0] == "refused" and ("out of range" in got["cpu"][1] or "r_max =" in got["cpu"][1]):
            continue  # the values of indices / ranks: only the kernels see them
        assert got["cpu"][0] == got["meta"][0] and (got["cpu"][0] == "refused" or got["cpu"] == got["meta"]), \
            (op.__name__, args, kw, got)


@pytest.mark.parametrize("big", [False, True])
def test_check_merge_finite_takes_one_adapter_like_merge_(big):
    """check_merge_finite(W, A, B, scale) with one adapter's tensors, as merge_ takes them, gives the
    verdict of the list form (it zipped A's rows with B's rows: TypeError or IndexError)."""
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(6, 8, generator=g).half(), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    B = B * (1e5 if big else 1.0)
    if big:
        with pytest.raises(ValueError, match="overflow"):
            check_merge_finite(W, [A], [B], [1.0])
        with pytest.raises(ValueError, match="overflow"):
            check_merge_finite(W, A, B, 1.0)
    else:
        check_merge_finite(W, [A], [B], [1.0])
        check_merge_finite(W, A, B, 1.0)
    with pytest.raises(TypeError, match="check_merge_finite: scale must be a real number"):
        check_merge_finite(W, A, B, [1.0])
    with pytest.raises(TypeError, match="check_merge_finite: A is a tensor but B is list"):
        check_merge_finite(W, A, [B], 1.0)
