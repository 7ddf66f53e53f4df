"""merge_ / unmerge_ ops: fp64 reference, layouts, bit-exact unmerge (MergeState), bad input."""
import itertools

import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ext.ops import MergeState, merge_, unmerge_

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t):
    return t.view(INT[t.dtype])


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a).cpu(), bits(b).cpu())


def adapter(shape, r, dtype, device, ratio=0.05, fifo=False, seed=0):
    """W0 ~ N(0, 0.02) and an adapter whose delta is about `ratio` of W0's size."""
    g = torch.Generator().manual_seed(seed)
    P, Q = shape
    out, inp = (Q, P) if fifo else (P, Q)
    W = torch.randn(P, Q, generator=g) * 0.02
    A = torch.randn(r, inp, generator=g) / r**0.25
    B = torch.randn(out, r, generator=g) * (0.02 * ratio / r**0.25)
    return [t.to(device=device, dtype=dtype) for t in (W, A, B)]


def reference(W, adapters, fifo=False):
    """W + sum s B A in fp64, and a bound on the fp32 error of the kernel's delta."""
    ref, err = W.double().cpu().clone(), torch.zeros(W.shape, dtype=torch.float64)
    for A, B, s in adapters:
        d = s * B.double().cpu() @ A.double().cpu()
        e = abs(s) * B.double().cpu().abs() @ A.double().cpu().abs()
        ref += d.T if fifo else d
        err += (e.T if fifo else e) * (A.shape[0] * len(adapters) + 2) * 2.0**-24
    return ref, err


def assert_rounded_once(W, ref, err):
    """Every element is within one unit in the last place (of W's dtype) of the exact value."""
    fi = torch.finfo(W.dtype)
    ulp = torch.maximum(ref.abs(), torch.tensor(fi.smallest_normal, dtype=torch.float64)) * fi.eps
    bad = (W.double().cpu() - ref).abs() > ulp + err
    assert not bad.any(), f"{int(bad.sum())} elements off by more than 1 ulp"


SHAPES = [(1, 1, 1), (7, 5, 3), (64, 64, 8), (33, 257, 16), (130, 70, 17), (3, 1000, 1), (300, 2, 65),
          (96, 520, 40)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_merge_matches_fp64(device, dtype, shape, fifo):
    P, Q, r = shape
    W, A, B = adapter((P, Q), r, dtype, device, ratio=0.5, fifo=fifo, seed=P * Q + r)
    ref, err = reference(W, [(A, B, 1.75)], fifo)
    out = merge_(W, A, B, 1.75, fan_in_fan_out=fifo)
    assert out is W
    assert rel_err(W, ref) < RTOL[dtype]
    assert_rounded_once(W, ref, err)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_adapters_one_call_and_mixed_dtypes(device, dtype):
    W, A1, B1 = adapter((80, 48), 4, dtype, device, ratio=0.3, seed=1)
    _, A2, B2 = adapter((80, 48), 9, torch.float32, device, ratio=0.3, seed=2)  # fp32 adapter
    ref, err = reference(W, [(A1, B1, 2.0), (A2, B2, -0.5)])
    merge_(W, [A1, A2], [B1, B2], [2.0, -0.5])
    assert_rounded_once(W, ref, err)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_give_identical_bits(device, dtype):
    W, A, B = adapter((40, 72), 6, dtype, device, ratio=1.0, seed=3)
    plain = W.clone()
    merge_(plain, A, B, 0.7)
    fifo = W.T.contiguous()  # [in, out] storage, as in transformers Conv1D
    merge_(fifo, A, B, 0.7, fan_in_fan_out=True)
    assert same_bits(fifo.T, plain)
    colmajor = W.T.contiguous().T  # same logical [out, in] weight, column-major storage
    merge_(colmajor, A, B, 0.7)
    assert same_bits(colmajor, plain)
    wide = torch.zeros(40, 100, dtype=dtype, device=device)
    wide[:, 10:82] = W
    merge_(wide[:, 10:82], A, B, 0.7)  # strided rows
    assert same_bits(wide[:, 10:82], plain)
    assert not wide[:, :10].any() and not wide[:, 82:].any()
    odd = torch.zeros(72, 40, 3, dtype=dtype, device=device)[:, :, 1].T  # no unit stride
    odd.copy_(W)
    merge_(odd, A, B, 0.7)
    assert same_bits(odd, plain)


@pytest.mark.parametrize("device", devices())
def test_plain_unmerge_and_scale_zero(device):
    W0, A, B = adapter((50, 60), 4, torch.float32, device, ratio=0.2)
    W = W0.clone()
    merge_(W, A, B, 3.0)
    unmerge_(W, A, B, 3.0)
    assert rel_err(W, W0.double()) < 1e-6  # plain unmerge: close, not exact
    W = W0.clone()
    merge_(W, A, B, 0.0)
    assert torch.equal(W, W0)


def check_state_sequence(W0, adapters, ops, fifo=False, bits="auto"):
    """Runs merge/unmerge ops on a MergeState; after every op the weight equals the plain
    merge of the adapters currently merged into W0 (bit for bit), and W0 when none is."""
    state, W, cur = MergeState(bits=bits), W0.clone(), []
    for kind, name in ops:
        A, B, s = adapters[name]
        if kind == "merge":
            merge_(W, A, B, s, fan_in_fan_out=fifo, state=state, name=name)
            if name not in cur:
                cur.append(name)
        else:
            unmerge_(W, fan_in_fan_out=fifo, state=state, name=name)
            cur.remove(name)
        expect = W0.clone()
        if cur:
            merge_(expect, [adapters[n][0] for n in cur], [adapters[n][1] for n in cur],
                   [adapters[n][2] for n in cur], fan_in_fan_out=fifo)
        assert state.merged == cur
        assert same_bits(W, expect), f"after {kind} {name}: merged set {cur}"
    return state, W


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(DTYPES), P=st.integers(1, 40), Q=st.integers(1, 70),
       fifo=st.booleans(), bits=st.sampled_from(["auto", 0, 1, 2, 4]),
       ranks=st.lists(st.integers(1, 20), min_size=3, max_size=3),
       log_scales=st.lists(st.floats(-4, 4), min_size=3, max_size=3),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=1, max_size=12),
       seed=st.integers(0, 2**16))
def test_exact_unmerge_property(dtype, P, Q, fifo, bits, ranks, log_scales, ops, seed):
    g = torch.Generator().manual_seed(seed)
    out, inp = (Q, P) if fifo else (P, Q)
    W0 = (torch.randn(P, Q, generator=g) * 0.02).to(dtype)
    W0.view(-1)[:: max(1, W0.numel() // 3)] = 0.0  # zeros are the hardest case
    adapters = {}
    for i, (r, ls) in enumerate(zip(ranks, log_scales)):
        A = (torch.randn(r, inp, generator=g) * 0.1).to(dtype)
        B = (torch.randn(out, r, generator=g) * 0.02).to(dtype)
        adapters[f"a{i}"] = (A, B, 10.0**ls * (-1) ** i)
    seq, merged = [], set()
    for is_merge, i in ops:  # unmerge only what is merged; merging a merged one is a no-op
        name = f"a{i}"
        if is_merge or name not in merged:
            seq.append(("merge", name))
            merged.add(name)
        else:
            seq.append(("unmerge", name))
            merged.discard(name)
    seq += [("unmerge", n) for n in sorted(merged)]
    state, W = check_state_sequence(W0, adapters, seq, fifo, bits)
    assert same_bits(W, W0) and state.merged == [] and state.nbytes() == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_any_order_of_three(device, dtype):
    W0, A0, B0 = adapter((64, 96), 8, dtype, device, ratio=0.05, seed=4)
    adapters = {"x": (A0, B0, 2.0)}
    for i, n in enumerate("yz"):
        _, A, B = adapter((64, 96), 4 + 8 * i, dtype, device, ratio=0.5, seed=5 + i)
        adapters[n] = (A, B, -1.5 if n == "y" else 0.25)
    for merge_order in itertools.permutations("xyz"):
        for unmerge_order in itertools.permutations("xyz"):
            ops = [("merge", n) for n in merge_order] + [("unmerge", n) for n in unmerge_order]
            _, W = check_state_sequence(W0, adapters, ops)
            assert same_bits(W, W0)
    # interleaved: partial unmerges between merges
    ops = [("merge", "x"), ("merge", "y"), ("unmerge", "x"), ("merge", "z"), ("merge", "x"),
           ("unmerge", "y"), ("unmerge", "z"), ("merge", "y"), ("unmerge", "x"), ("unmerge", "y")]
    _, W = check_state_sequence(W0, adapters, ops)
    assert same_bits(W, W0)


@pytest.mark.parametrize("device", devices())
def test_1000_bf16_cycles_bit_exact(device):
    W0, A, B = adapter((128, 256), 16, torch.bfloat16, device, ratio=0.05, seed=7)
    state, W = MergeState(), W0.clone()
    merge_(W, A, B, 2.0, state=state)
    merged = W.clone()
    unmerge_(W, state=state)
    for _ in range(999):
        merge_(W, A, B, 2.0, state=state)
        assert same_bits(W, merged)
        unmerge_(W, state=state)
    assert same_bits(W, W0)
    naive = W0.clone()  # what a plain W -= s B A does over the same cycles
    for _ in range(1000):
        merge_(naive, A, B, 2.0)
        unmerge_(naive, A, B, 2.0)
    assert not same_bits(naive, W0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05])
def test_side_information_is_small(dtype, ratio):
    W0, A, B = adapter((512, 512), 16, dtype, "cpu", ratio=ratio, seed=8)
    state, W = MergeState(), W0.clone()
    merge_(W, A, B, 1.0, state=state)
    # codes (bits per element) plus exceptions; far below a copy of W (1.0)
    assert 0 < state.overhead() < {0.001: 0.05, 0.01: 0.08, 0.05: 0.15}[ratio]
    assert not state.dense
    unmerge_(W, state=state)
    assert same_bits(W, W0) and state.overhead() == 0


def test_pathological_delta_falls_back_to_a_copy():
    W0 = (torch.randn(64, 64) * 1e-3).to(torch.bfloat16)
    W0[:, :8] = 0
    A, B = torch.randn(4, 64).bfloat16(), torch.randn(64, 4).bfloat16()
    state, W = MergeState(bits=0), W0.clone()
    merge_(W, A, B, 1e3, state=state, name="huge")
    assert state.dense and state.overhead() == pytest.approx(1.0)
    merge_(W, A, B, 1e-3, state=state, name="small")
    unmerge_(W, state=state, name="huge")
    expect = W0.clone()
    merge_(expect, A, B, 1e-3)
    assert same_bits(W, expect)
    unmerge_(W, state=state)
    assert same_bits(W, W0) and not state.dense


@pytest.mark.parametrize("device", devices())
def test_special_values_roundtrip(device):
    vals = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 6e-5, 65504.0, -65504.0, float("inf"), float("-inf"),
                         float("nan"), 1.0, -3.0])
    for dtype in DTYPES:
        W0 = vals.repeat(8, 1).to(dtype=dtype, device=device)
        g = torch.Generator().manual_seed(0)
        A = torch.randn(2, 12, generator=g).to(dtype=dtype, device=device)
        B = torch.randn(8, 2, generator=g).to(dtype=dtype, device=device)
        for s in (1e-6, 1.0, 1e4):
            state, W = MergeState(), W0.clone()
            merge_(W, A, B, s, state=state)
            unmerge_(W, state=state)
            assert same_bits(W, W0), (dtype, s)


@pytest.mark.parametrize("device", devices())
def test_exact_merge_is_idempotent(device):
    W0, A, B = adapter((20, 30), 3, torch.float16, device)
    state, W = MergeState(), W0.clone()
    merge_(W, A, B, 1.0, state=state, name="a")
    once = W.clone()
    merge_(W, A, B, 1.0, state=state, name="a")
    assert same_bits(W, once) and state.merged == ["a"]


BAD = [
    ("B shape", lambda W, A, B: (W, A, B[:-1]), ValueError, r"B\[0\] must be \[out, r\]|needs A"),
    ("A shape", lambda W, A, B: (W, A[:, :-1], B), ValueError, r"A\[0\] must be \[r, in\]|needs A"),
    ("rank mismatch", lambda W, A, B: (W, A, B[:, :-1]), ValueError, r"B\[0\] must be|needs A"),
    ("r = 0", lambda W, A, B: (W, A[:0], B[:, :0]), ValueError, r"rank r|needs A"),
    ("int weight", lambda W, A, B: (W.int(), A, B), ValueError, "dtype"),
    ("fp64 weight", lambda W, A, B: (W.double(), A, B), ValueError, "dtype"),
    ("int adapter", lambda W, A, B: (W, A.int(), B), ValueError, "dtype"),
    ("3-D weight", lambda W, A, B: (W[None], A, B), ValueError, "2-D"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(device, exact, name, mutate, exc, msg):
    W, A, B = mutate(*adapter((12, 10), 3, torch.float32, device))
    before = W.clone()
    state = MergeState() if exact else None
    with pytest.raises((RuntimeError, exc), match=msg):
        merge_(W, A, B, 1.0, state=state)
    assert torch.equal(W, before)
    if exact:
        assert state.merged == [] and state.nbytes() == 0


def test_bad_state_use():
    W, A, B = adapter((12, 10), 3, torch.bfloat16, "cpu")
    state = MergeState()
    with pytest.raises(ValueError, match="not merged"):
        unmerge_(W, state=state, name="default")
    merge_(W, A, B, 1.0, state=state, name="a")
    with pytest.raises(ValueError, match=r"\['b'\] are not merged"):
        unmerge_(W, state=state, name="b")
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        unmerge_(W, fan_in_fan_out=True, state=state, name="a")
    with pytest.raises(ValueError, match="cannot unmerge exactly"):
        unmerge_(W.float(), state=state, name="a")
    with pytest.raises(ValueError, match="bits"):
        MergeState(bits=3)
    with pytest.raises(ValueError, match="A, B and scale are required"):
        unmerge_(W)
    with pytest.raises(ValueError, match=r"merge_: scale must hold one value per adapter \(1\), got 2"):
        merge_(W, [A], [B], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        merge_(W, A, B, float("nan"), state=state, name="c")
    # (a non-contiguous weight merges exactly: tests/test_user_merge.py)
    # the state of W used on another weight of the same shape (or W written since): refused,
    # nothing written; W itself still unmerges exactly
    other = torch.randn_like(W)
    kept = other.clone()
    with pytest.raises(ValueError, match="differs from the one this state merged into"):
        unmerge_(other, state=state, name="a")
    assert torch.equal(other, kept)
    unmerge_(W, state=state, name="a")


def test_low_level_ops_reject_bad_state_tensors():
    W, A, B = adapter((12, 10), 3, torch.float32, "cpu")
    ok_codes, ok_fails = torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    op = torch.ops.lora_ext.remerge_
    with pytest.raises(RuntimeError, match="bits must be"):
        op(W, ok_codes, ok_fails, 3, [], [], [], [A], [B], [1.0], False)
    with pytest.raises(RuntimeError, match="codes must be contiguous with at least"):
        op(W, ok_codes[:1], ok_fails, 4, [], [], [], [A], [B], [1.0], False)
    with pytest.raises(RuntimeError, match="fails must be int32"):
        op(W, ok_codes, ok_fails.long(), 1, [], [], [], [A], [B], [1.0], False)
    pts = torch.ops.lora_ext.merge_points_
    with pytest.raises(RuntimeError, match=r"idx must lie in \[0, 120\)"):
        pts(W, torch.tensor([0, 120]), torch.zeros(2), [A], [B], [1.0], False)
    with pytest.raises(RuntimeError, match="idx must lie"):
        pts(W, torch.tensor([-1]), torch.zeros(1), [A], [B], [1.0], False)
    with pytest.raises(RuntimeError, match="one value per index"):
        pts(W, torch.tensor([1, 2]), torch.zeros(3), [A], [B], [1.0], False)


@pytest.mark.parametrize("device", devices())
def test_safe_merge(device):
    W = torch.full((4, 6), 60000.0, dtype=torch.float16, device=device)
    A = torch.ones(2, 6, dtype=torch.float16, device=device)
    B = torch.full((4, 2), 4000.0, dtype=torch.float16, device=device)
    before = W.clone()
    with pytest.raises(ValueError, match="overflow"):
        merge_(W, A, B, 1.0, safe=True)
    with pytest.raises(ValueError, match="overflow"):
        merge_(W, A, B, 1.0, safe=True, state=MergeState())
    B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        merge_(W, A, B, 1e-6, safe=True)
    assert torch.equal(W, before)


@pytest.mark.parametrize("device", devices())
def test_safe_merge_fp32_never_writes_and_names_real_rows(device):
    # fp32: the check's working copy must not alias the weight; the message names real rows
    W = torch.full((20, 6), 3e38, dtype=torch.float32, device=device)
    A = torch.ones(2, 6, device=device)
    B = torch.full((20, 2), 1e38, device=device)
    before = W.clone()
    with pytest.raises(ValueError, match=r"rows 0\.\.19 of") as e:
        merge_(W, A, B, 1.0, safe=True)
    assert "104" not in str(e.value)
    assert torch.equal(W, before)
    merge_(W, A, B.nan_to_num(0.0) * 0, 1.0, safe=True)  # fine: nothing raised


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def f(W, A, B):
        W = W * 2
        torch.ops.lora_ext.merge_(W, [A], [B], [0.5], False)
        return W + 1

    W, A, B = adapter((24, 40), 4, torch.float32, device)
    ref, _ = reference(W * 2, [(A, B, 0.5)])
    assert rel_err(f(W, A, B), ref + 1) < 1e-6


# Bit patterns with every kind of special value, per dtype: payload and signalling NaNs of both
# signs, +-inf, +-0, smallest/largest subnormals, normals.
SPECIAL_BITS = {
    torch.float32: [0x7FC00000, 0x7FC12345, 0x7F800001, 0xFFC0ABCD, 0xFF800F00, 0x7F800000, 0xFF800000,
                    0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F800000, 0xC0400000, 0x2F000000],
    torch.float16: [0x7E00, 0x7E55, 0x7C01, 0xFE77, 0xFC10, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001,
                    0x83FF, 0x3C00, 0xC200, 0x1000],
    torch.bfloat16: [0x7FC0, 0x7FC5, 0x7F81, 0xFFD3, 0xFF90, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001,
                     0x807F, 0x3F80, 0xC040, 0x2F00],
}
CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}


def special_weight(dtype, rows, device):
    pats = torch.tensor(SPECIAL_BITS[dtype], dtype=torch.int64)
    n = rows * 37
    raw = pats[torch.arange(n) * 5 % len(pats)]
    raw = torch.where(raw >= 2 ** (raw.new_tensor(torch.finfo(dtype).bits) - 1),
                      raw - 2 ** raw.new_tensor(torch.finfo(dtype).bits), raw)
    return raw.to(INT[dtype]).view(dtype).view(rows, 37).to(device)


def merged_reference(W0, A, B, s):
    """merge_math.h's definition for a rank-1 adapter: S = fma(fl32(s*B), A, +0); W0 NaN stays
    (bits included), a NaN result is the canonical NaN, anything else is round(W0 + S)."""
    S = (B.float().cpu() * s) @ A.float().cpu() + 0.0  # rank 1: one rounded product, -0 -> +0
    w0 = W0.cpu()
    out = (w0.float() + S).to(W0.dtype)
    canon = torch.tensor(CANONICAL_NAN[W0.dtype], dtype=torch.int64).to(INT[W0.dtype]).view(W0.dtype)
    out = torch.where(torch.isnan(w0.float() + S), canon, out)
    return torch.where(torch.isnan(w0), w0, out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_bits_are_defined(device, dtype):
    # 13 x 37: AVX2 6 x 16 full tiles and scalar tails on the CPU, one partial tile on CUDA.
    W0 = special_weight(dtype, 13, device)
    A = torch.linspace(-2, 2, 37).view(1, 37)
    B = torch.linspace(-1, 1.5, 13).view(13, 1)
    A[0, 3], B[5, 0] = 3e38, -3e38  # S = -inf at (5, 3): W0 = +inf there gives NaN (inf - inf)
    A[0, 7] = float("nan")           # a NaN column in A: NaN sums everywhere in column 7
    A, B = A.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)
    W0[5, 3] = float("inf")
    ref = merged_reference(W0, A, B, 1.0)
    W = W0.clone()
    merge_(W, A, B, 1.0)
    assert same_bits(W, ref), (bits(W.cpu()) != bits(ref)).nonzero()[:5].tolist()
    # exact merges restore every element bit for bit, NaN payloads and signs included
    A[0, 7] = 0.5
    for s in (1e-3, 1.0, 1e3):
        state, W = MergeState(), W0.clone()
        merge_(W, A, B, s, state=state)
        unmerge_(W, state=state)
        assert same_bits(W, W0), (dtype, s)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_code_failures_counts_what_remerge_fails(device, dtype):
    # rank 1: the kernels' S is one rounded product, which torch reproduces exactly
    W0, A, B = adapter((37, 53), 1, dtype, device, ratio=3.0, seed=5)
    W0.view(-1)[::7] = 0  # zeros: where the codes cannot restore W0
    s = ((B.float() * 0.75) @ A.float() + 0.0).view(-1)
    counts = torch.ops.lora_ext.merge_code_failures(W0, s).tolist()
    for k, count in zip((0, 1, 2, 4), counts):
        W = W0.clone()
        codes = torch.zeros((W.numel() * k + 31) // 32 + 1, dtype=torch.int32, device=device)
        fails = torch.zeros((W.numel() + 31) // 32, dtype=torch.int32, device=device)
        torch.ops.lora_ext.remerge_(W, codes, fails, k, [], [], [], [A], [B], [0.75], False)
        popcount = sum(bin(v & 0xFFFFFFFF).count("1") for v in fails.tolist())
        assert popcount == count, (k, popcount, count)
    assert counts[0] >= counts[-1] and counts[0] > 0
