"""dora_norm (DoRA's column norm ||W + s B A|| per output): fp64 reference, dtypes, layouts, edge
cases, special values, bad input (C++ op and fake kernel), torch.compile, determinism (runs, thread
counts, CPU ISAs); on CUDA (marked): the CPU's bits, graph capture. The emulated CUDA kernel is
compared with the CPU kernel in tests/emu/test_kernels.py."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES, devices

import lora_ext
from lora_ext.ops import dora_norm

OP = torch.ops.lora_ext.dora_norm.default
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu().view(torch.int32),
                                                                      b.cpu().view(torch.int32))


def make(out, inp, r, dtype, device="cpu", fifo=False, seed=0, ab_dtype=None, ratio=0.3):
    """W ~ N(0, 0.02) ([in, out] with fifo) and an adapter whose delta is ~ratio of W."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((inp, out) if fifo else (out, inp), generator=g) * 0.02
    A = torch.randn(r, inp, generator=g) / max(r, 1) ** 0.25
    B = torch.randn(out, r, generator=g) * (0.02 * ratio / max(r, 1) ** 0.25)
    ab = ab_dtype or dtype
    return W.to(device, dtype), A.to(device, ab), B.to(device, ab)


def reference(W, A, B, s, fifo=False):
    """fp64 norms of W + fl32(s B) A, and a bound on the kernel's error: the fp32 delta
    ((r + 2) 2^-24 |s B| |A| per element), then ~2^-24 relative per add and square."""
    Wd = W.double().cpu()
    Wd = Wd.T if fifo else Wd
    sB = (B.float().cpu() * s).double()  # the kernel's fl32(s * B), exact in fp64
    Ad = A.float().cpu().double()
    n = (Wd + sB @ Ad).norm(dim=1)
    e = (A.shape[0] + 2) * 2.0**-24 * (sB.abs() @ Ad.abs())
    return n, 4e-6 * n + e.norm(dim=1) + 1e-30


def assert_close_to_reference(n, W, A, B, s, fifo=False):
    ref, tol = reference(W, A, B, s, fifo)
    assert n.dtype == torch.float32 and n.shape == ref.shape
    err = (n.double().cpu() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


# (out, in, r): tails of the 6 x 16 CPU tiles, one and several 512-wide chunks (partials summed in
# order), r = 0 (plain row norms) and ranks across the 16-wide rank chunks of the CUDA tile.
SHAPES = [(1, 1, 1), (7, 33, 0), (33, 7, 1), (130, 257, 17), (257, 130, 64), (64, 512, 16),
          (40, 1030, 3), (1, 1600, 5), (1100, 20, 2)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_matches_fp64(device, dtype, shape, fifo):
    out, inp, r = shape
    W, A, B = make(out, inp, r, dtype, device, fifo, seed=out * inp + r)
    n = dora_norm(W, A, B, 1.75, fan_in_fan_out=fifo)
    assert n.device == W.device and not n.requires_grad
    assert_close_to_reference(n, W, A, B, 1.75, fifo)


@pytest.mark.parametrize("device", devices())
def test_torch_expression_and_peft(device):
    # what it replaces: torch.linalg.norm(W.float() + s (B @ A).float(), dim=1), and PEFT's DoRA norm
    W, A, B = make(96, 200, 8, torch.float32, device)
    expr = torch.linalg.norm(W.float() + 0.5 * (B.float() @ A.float()), dim=1)
    torch.testing.assert_close(dora_norm(W, A, B, 0.5), expr, rtol=2e-6, atol=0)
    peft_dora = pytest.importorskip("peft.tuners.lora.dora")
    layer = peft_dora.DoraLinearLayer(fan_in_fan_out=True)
    Wt = W.T.contiguous()  # Conv1D layout [in, out]
    ref = layer.get_weight_norm(Wt, B @ A, 0.5)
    torch.testing.assert_close(dora_norm(Wt, A, B, 0.5, fan_in_fan_out=True), ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_dtypes_may_differ(device, dtype):
    for ab in DTYPES:
        W, A, B = make(70, 90, 5, dtype, device, ab_dtype=ab, seed=3)
        assert_close_to_reference(dora_norm(W, A, B, -0.5), W, A, B, -0.5)


@pytest.mark.parametrize("device", devices())
def test_sum_is_not_rounded_to_the_weight_dtype(device):
    # bf16 W = 1 and a delta of 1e-3 (a quarter of bf16's ulp at 1): round(W + S) would give 16
    W = torch.ones(2, 256, dtype=torch.bfloat16, device=device)
    A = torch.ones(1, 256, device=device)
    B = torch.full((2, 1), 1e-3, device=device)
    n = dora_norm(W, A, B, 1.0)
    torch.testing.assert_close(n, torch.full((2,), 16 * 1.001, device=device), rtol=1e-6, atol=0)


def strided_layouts(W):
    """W's values in other layouts: (name, tensor, expect the row-major bits)."""
    P, Q = W.shape
    wide = torch.zeros(P, Q + 3, dtype=W.dtype, device=W.device)
    wide[:, 1:Q + 1] = W
    every2 = torch.zeros(2 * P, Q, dtype=W.dtype, device=W.device)
    every2[::2] = W
    both = torch.zeros(2 * P, 2 * Q, dtype=W.dtype, device=W.device)
    both[::2, ::2] = W
    return [("sliced, misaligned", wide[:, 1:Q + 1], True), ("every other row", every2[::2], True),
            ("every other row and column (copied)", both[::2, ::2], True),
            ("column-major", W.T.contiguous().T, False)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_strided_weights(device, dtype, fifo):
    W, A, B = make(37, 530, 6, dtype, device, fifo, seed=5)
    base = dora_norm(W, A, B, 0.8, fan_in_fan_out=fifo)
    for name, Wv, same in strided_layouts(W):
        n = dora_norm(Wv, A, B, 0.8, fan_in_fan_out=fifo)
        assert_close_to_reference(n, Wv, A, B, 0.8, fifo)
        if same:  # same view of the data for the kernels: same order, same bits
            assert same_bits(n, base), name
    # a column-major weight is the other layout: bits equal those of the transposed problem
    Wc = W.T.contiguous().T
    assert same_bits(dora_norm(Wc, A, B, 0.8, fan_in_fan_out=fifo),
                     dora_norm(W.T.contiguous(), A, B, 0.8, fan_in_fan_out=not fifo))


@pytest.mark.parametrize("device", devices())
def test_expanded_weight_is_read_in_place(device):
    row = torch.randn(1, 300, device=device)
    W = row.expand(5, 300)  # stride (0, 1): fine to read
    A, B = torch.randn(3, 300, device=device), torch.randn(5, 3, device=device) * 0.01
    assert_close_to_reference(dora_norm(W, A, B, 2.0), W, A, B, 2.0)
    WT = torch.randn(1, 40, device=device).expand(300, 40)  # fan_in_fan_out: [in, out]
    BT = torch.randn(40, 3, device=device) * 0.01
    assert_close_to_reference(dora_norm(WT, A, BT, 2.0, fan_in_fan_out=True), WT, A, BT, 2.0, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_cases(device, dtype):
    # out == 0: empty; in == 0: zeros; r == 0: the row norms of W
    W, A, B = make(0, 40, 3, dtype, device)
    n = dora_norm(W, A, B, 1.0)
    assert n.shape == (0,) and n.dtype == torch.float32
    W, A, B = make(9, 0, 3, dtype, device)
    assert torch.equal(dora_norm(W, A, B, 1.0), torch.zeros(9, device=device))
    assert torch.equal(dora_norm(W.T, A, B, 1.0, fan_in_fan_out=True), torch.zeros(9, device=device))
    W, A, B = make(9, 700, 0, dtype, device)
    n = dora_norm(W, A, B, 1.0)
    torch.testing.assert_close(n, W.double().norm(dim=1).float(), rtol=4e-6, atol=0)
    n0 = dora_norm(W, torch.zeros(1, 700, dtype=dtype, device=device),
                   torch.zeros(9, 1, dtype=dtype, device=device), 3.0)
    assert same_bits(n, n0)  # a zero adapter: S = +0, the same sums
    # scale 0: W alone, whatever A and B hold (finite)
    _, A, B = make(9, 700, 4, dtype, device)
    assert same_bits(dora_norm(W, A, B, 0.0), n)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_special_values(device, dtype, fifo):
    W, A, B = make(6, 600, 2, dtype, device, fifo, seed=9)
    Wl = W.T if fifo else W  # logical [out, in] view, writes go to W
    Wl[0, 3] = float("inf")
    Wl[1, 599] = float("-inf")
    Wl[2, 100] = float("nan")
    B[3, 0] = float("inf")  # inf * A: +-inf elements (and NaN where A is 0: none here)
    Wl[4, 7] = torch.finfo(dtype).max  # finite, big: fp32 squares fine below 1.8e19
    Wl[5, 9] = 1e-40 if dtype == torch.float32 else 0.0  # subnormal
    n = dora_norm(W, A, B, 1.0, fan_in_fan_out=fifo)
    assert n[0].item() == float("inf") and n[1].item() == float("inf")
    assert n[2].view(torch.int32).item() == 0x7FC00000  # NaN, canonical bits
    assert n[3].item() == float("inf")
    ref, tol = reference(W, A, B.nan_to_num(posinf=0), 1.0, fifo)
    for o in (4, 5):
        if dtype != torch.float16 and o == 4:
            assert n[o].item() == float("inf")  # 3.4e38 squared overflows fp32, as torch's norm
        else:
            assert abs(n[o].item() - ref[o].item()) <= tol[o].item()
    # inf - inf and NaN in A
    W2, A2, B2 = make(3, 50, 1, dtype, device, seed=10)
    W2[0, 0] = float("inf")
    A2[0, 0], B2[0, 0] = 1.0, -1.0
    n2 = dora_norm(W2, A2, B2 * 2, float(torch.finfo(torch.float32).max))  # fl32(s B) = -inf: inf - inf
    assert torch.isnan(n2[0])
    A2[0, 5] = float("nan")
    n3 = dora_norm(W2, A2, B2, 1.0)
    assert torch.isnan(n3).all()  # every B row is nonzero


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fifo", [False, True])
def test_deterministic_runs_and_threads(device, fifo):
    W, A, B = make(300, 1500, 16, torch.bfloat16, device, fifo, seed=11)
    first = dora_norm(W, A, B, 0.3, fan_in_fan_out=fifo)
    for _ in range(3):
        assert same_bits(dora_norm(W, A, B, 0.3, fan_in_fan_out=fifo), first)
    if device == "cpu":
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert same_bits(dora_norm(W, A, B, 0.3, fan_in_fan_out=fifo), first)
        finally:
            torch.set_num_threads(before)


@pytest.mark.skipif(os.environ.get("LORA_EXT_CPU_ISA") is not None, reason="already in a subprocess")
def test_same_bits_on_every_cpu_isa(tmp_path):
    # the delta tiles (AVX-512 / AVX2 / portable: LORA_EXT_CPU_ISA) give the same bits
    code = ("import sys, torch, lora_ext; sys.path.insert(0, %r); from test_dora_norm import cases; "
            "torch.save([lora_ext.ops.dora_norm(*c[:4], fan_in_fan_out=c[4]) for c in cases()], %r)")
    here = os.path.dirname(os.path.abspath(__file__))
    ref = [dora_norm(*c[:4], fan_in_fan_out=c[4]) for c in cases()]
    for isa in ("avx512", "avx2", "baseline"):
        path = str(tmp_path / f"{isa}.pt")
        run = subprocess.run([sys.executable, "-c", code % (here, path)], capture_output=True, text=True,
                             env={**os.environ, "LORA_EXT_CPU_ISA": isa}, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        for i, (a, b) in enumerate(zip(torch.load(path), ref)):
            assert same_bits(a, b), (isa, i)


def cases():
    out = []
    for k, dt in enumerate(DTYPES):
        for fifo in (False, True):
            W, A, B = make(61, 1100, 19, dt, fifo=fifo, seed=20 + k)
            out.append((W, A, B, 0.7, fifo))
    return out


@pytest.mark.parametrize("device", devices())
def test_no_autograd(device):
    W, A, B = make(20, 30, 4, torch.float32, device)
    A.requires_grad_()
    B.requires_grad_()
    n = dora_norm(W, A, B, 0.5)
    assert not n.requires_grad and n.grad_fn is None


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def f(W, A, B, m):
        n = lora_ext.ops.dora_norm(W, A, B, 0.5)
        return n, m / n

    W, A, B = make(24, 40, 4, torch.float32, device)
    m = torch.rand(24, device=device)
    n, q = f(W, A, B, m)
    assert same_bits(n, dora_norm(W, A, B, 0.5))
    # inductor's fp32 division on CUDA is not eager's correctly rounded one (a few ulp)
    torch.testing.assert_close(q, m / n, rtol=1e-6, atol=0)
    W, A, B = make(24, 40, 4, torch.bfloat16, device, fifo=True)

    @torch.compile(fullgraph=True, dynamic=True)
    def g(W, A, B):
        return lora_ext.ops.dora_norm(W, A, B, 0.5, fan_in_fan_out=True) * 2

    for out in (24, 31):
        W, A, B = make(out, 40, 4, torch.bfloat16, device, fifo=True, seed=out)
        assert same_bits(g(W, A, B), dora_norm(W, A, B, 0.5, fan_in_fan_out=True) * 2)


BAD = [
    ("weight 1-D", lambda W, A, B: (W[0], A, B, 1.0, False), "weight must be 2-D"),
    ("weight fp64", lambda W, A, B: (W.double(), A, B, 1.0, False), "weight has dtype"),
    ("A fp64", lambda W, A, B: (W, A.double(), B, 1.0, False), "A has dtype"),
    ("B int", lambda W, A, B: (W, A, B.int(), 1.0, False), "B has dtype"),
    ("A 3-D", lambda W, A, B: (W, A[None], B, 1.0, False), "A must be 2-D"),
    ("B 1-D", lambda W, A, B: (W, A, B[:, 0], 1.0, False), "B must be 2-D"),
    ("A wrong in", lambda W, A, B: (W, A[:, :-1], B, 1.0, False), "A must be \\[r, in\\]"),
    ("A for fifo", lambda W, A, B: (W, A, B, 1.0, True), "A must be \\[r, in\\]"),
    ("B wrong out", lambda W, A, B: (W, A, B[:-1], 1.0, False), "B must be \\[out, r\\]"),
    ("B wrong r", lambda W, A, B: (W, A, B[:, :-1], 1.0, False), "B must be \\[out, r\\]"),
]


@pytest.mark.parametrize("name,args,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("where", ["op", "fake"])
def test_bad_input(name, args, msg, where):
    W, A, B = make(12, 10, 3, torch.float32)
    a = args(W, A, B)
    if where == "fake":  # the fake kernel (torch.compile, meta tensors) says the same
        a = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in a)
    with pytest.raises(RuntimeError, match="dora_norm: " + msg):
        OP(*a)


def test_bad_scale_and_devices():
    W, A, B = make(12, 10, 3, torch.float32)
    for s in (float("inf"), float("nan"), 1e39):
        with pytest.raises(ValueError, match="dora_norm: scale must be finite"):
            dora_norm(W, A, B, s)
        with pytest.raises(RuntimeError, match="dora_norm: scale must be finite"):
            OP(W, A, B, s, False)
    with pytest.raises(TypeError, match="dora_norm: scale"):
        dora_norm(W, A, B, torch.tensor(1.0, requires_grad=True))
    with pytest.raises(TypeError, match="dora_norm: scale"):
        dora_norm(W, A, B, "1")
    with pytest.raises(RuntimeError, match="dora_norm: A is on meta but weight is on cpu"):
        OP(W, A.to("meta"), B, 1.0, False)


@pytest.mark.cuda
def test_cuda_device_mix():
    W, A, B = make(12, 10, 3, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="dora_norm: A is on cpu but weight is on cuda"):
        dora_norm(W, A.cpu(), B, 1.0)
    with pytest.raises(RuntimeError, match="dora_norm: B is on cuda:0 but weight is on cpu"):
        dora_norm(W.cpu(), A.cpu(), B, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_cpu_and_cuda_give_identical_bits(dtype, fifo):
    # row and column tiles with tails, 1 / several chunks, rank chunks of 16 with tails, r = 0,
    # misaligned rows, column-major weights, mixed adapter dtypes, special values
    for out, inp, r in [(1, 1, 1), (65, 257, 33), (130, 1030, 17), (257, 7, 64), (33, 1600, 0),
                        (300, 513, 1), (4, 5000, 5)]:
        for ab in (dtype, torch.float32):
            W, A, B = make(out, inp, r, dtype, fifo=fifo, seed=out + inp + r, ab_dtype=ab)
            if W.numel() > 4:
                W.view(-1)[3] = float("nan")
                W.view(-1)[-2] = float("inf")
            cpu = dora_norm(W, A, B, 0.9, fan_in_fan_out=fifo)
            for Wv in (W.cuda(), strided_layouts(W.cuda())[0][1], W.T.contiguous().T.cuda()):
                gpu = dora_norm(Wv, A.cuda(), B.cuda(), 0.9, fan_in_fan_out=fifo)
                cpu_v = dora_norm(Wv.cpu(), A, B, 0.9, fan_in_fan_out=fifo)
                assert same_bits(gpu, cpu_v), (out, inp, r, ab)
            assert same_bits(dora_norm(W.cuda(), A.cuda(), B.cuda(), 0.9, fan_in_fan_out=fifo), cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_capture_replay(dtype):
    # no host sync, allocations from shapes only: captured once, replayed on new contents
    W, A, B = make(67, 1100, 5, dtype, "cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dora_norm(W, A, B, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        n = dora_norm(W, A, B, 0.5)
    for k in range(2):
        W2, A2, B2 = make(67, 1100, 5, dtype, "cuda", seed=k + 1)
        W.copy_(W2)
        A.copy_(A2)
        B.copy_(B2)
        g.replay()
        assert same_bits(n, dora_norm(W2.cpu(), A2.cpu(), B2.cpu(), 0.5)), k
