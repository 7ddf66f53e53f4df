"""lora_linear op: forward and gradients vs fp64 autograd of the plain composition, dropout."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err

from lora_ext.ops import lora_linear


def make(T, i, o, r, dtype, device, bias=True, fan_in_fan_out=False, lead=()):
    g = torch.Generator().manual_seed(T * 131 + i * 7 + o + r)
    x = torch.randn(*lead, T, i, generator=g)
    W = torch.randn(o, i, generator=g) / i**0.5
    b = torch.randn(o, generator=g) if bias else None
    A = torch.randn(r, i, generator=g) / i**0.5
    B = torch.randn(o, r, generator=g) / r**0.5
    if fan_in_fan_out:
        W = W.t().contiguous()
    conv = lambda t: None if t is None else t.to(device, dtype).requires_grad_()
    return conv(x), W.to(device, dtype), conv(b), conv(A), conv(B)


def reference(x, W, b, A, B, s, fan_in_fan_out=False, mask=None):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()
    xd, bd, Ad, Bd = d(x), d(b), d(A), d(B)
    Wd = W.double()
    y = xd @ (Wd if fan_in_fan_out else Wd.T)
    if bd is not None:
        y = y + bd
    xl = xd if mask is None else xd * mask
    y = y + s * (xl @ Ad.T) @ Bd.T
    return y, (xd, bd, Ad, Bd)


def check_against_reference(x, W, b, A, B, fan_in_fan_out=False):
    """lora_linear (scale 0.7) forward and the gradients of x, bias, A, B vs the fp64 reference."""
    dtype = x.dtype
    y = lora_linear(x, W, b, A, B, 0.7, fan_in_fan_out=fan_in_fan_out)
    yr, leaves = reference(x, W, b, A, B, 0.7, fan_in_fan_out)
    assert y.shape == yr.shape and y.dtype == dtype
    tol = RTOL[dtype] * (1 if dtype == torch.float32 else 2)
    assert rel_err(y, yr) < tol
    if y.numel() == 0:
        return
    # a fixed gradient: with r = 1 and few outputs, g B can cancel, and a random g failed the fp32
    # tolerance about once in 1000 runs (any ISA); fixed, the check is the same every run
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(y.numel())).to(y.device, y.dtype)
    y.backward(g)
    yr.backward(g.double())
    for ours, ref in zip((x, b, A, B), leaves):
        if ours is not None:
            assert rel_err(ours.grad, ref.grad) < tol * 2


SHAPES = [(1, 16, 8, 1), (7, 33, 65, 3), (9, 128, 64, 16), (100, 96, 80, 8), (64, 257, 129, 33),
          (1000, 40, 50, 7), (0, 16, 8, 2), (3, 0, 5, 2), (3, 5, 0, 2)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["linear", "no_bias", "conv1d"])
def test_forward_backward_match_reference(device, dtype, shape, variant):
    fif = variant == "conv1d"
    x, W, b, A, B = make(*shape, dtype, device, bias=variant != "no_bias", fan_in_fan_out=fif,
                         lead=(2,) if shape[0] == 7 else ())
    check_against_reference(x, W, b, A, B, fif)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_shared_by_forward_and_backward(device, dtype):
    # With A = B = I and scale 1 the LoRA branch is exactly dropout(x): read the mask off it.
    T, n, p = 64, 48, 0.3
    # |x| >= 0.5 and a small W, so that the kept/dropped ratio reads clearly even in bf16
    x = torch.randn(T, n)
    x = (x.sign() * (0.5 + x.abs())).to(device, dtype).requires_grad_()
    W = torch.randn(n, n, device=device, dtype=dtype) * (0.05 / n**0.5)
    eye = torch.eye(n, device=device, dtype=dtype)
    A, B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    y = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True)
    branch = (y.double() - x.double() @ W.double().T)
    mask = (branch / x.double()).detach() * (1 - p)
    mask = (mask > 0.5).double()
    frac = 1 - mask.mean().item()
    assert abs(frac - p) < 0.05, frac
    yr, (xd, _, Ad, Bd) = reference(x, W, None, A, B, 1.0, mask=mask / (1 - p))
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    assert rel_err(y, yr) < tol
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(x.grad, xd.grad) < tol
    assert rel_err(A.grad, Ad.grad) < tol
    assert rel_err(B.grad, Bd.grad) < tol
    # a new call draws a new mask; eval mode draws none
    y2 = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True)
    assert not torch.equal(y2, y)
    y3 = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=False)
    assert rel_err(y3, reference(x, W, None, A, B, 1.0)[0]) < tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 8, 1), (9, 128, 64, 16), (100, 96, 80, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_expand_first_order_matches_reference(dtype, shape, bias, monkeypatch):
    # LORA_EXT_CUDA_EXPAND_FIRST=1: bias + LoRA term written first, cuBLAS accumulating into them
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", "1")
    check_against_reference(*make(*shape, dtype, "cuda", bias=bias))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(9, 128, 64, 16), (100, 96, 80, 8), (300, 200, 72, 17)])
@pytest.mark.parametrize("first", ["0", "1"])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_blas_halves_match_reference(shape, first, bias, monkeypatch):
    # LORA_EXT_CUDA_BLAS=1: bf16 halves on cuBLAS (u fp32 via mm's out_dtype, the expand over
    # u's hi + lo bf16 parts), in both orders of the halves
    monkeypatch.setenv("LORA_EXT_CUDA_BLAS", "1")
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", first)
    check_against_reference(*make(*shape, torch.bfloat16, "cuda", bias=bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 128, 64, 16), (300, 200, 72, 17), (130, 4096, 96, 70)])
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
@pytest.mark.parametrize("first", ["0", "1"])
def test_cuda_tile_paths_match_reference(dtype, shape, tensor_cores, first, monkeypatch):
    # 16-bit jobs of > 8 tokens: TF32 tensor-core tiles (sm_80+) or, with
    # LORA_EXT_CUDA_TENSOR_CORES=0, the CUDA-core tiles; both orders of the halves
    monkeypatch.setenv("LORA_EXT_CUDA_TENSOR_CORES", tensor_cores)
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", first)
    check_against_reference(*make(*shape, dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dropout_mask_and_gradients_match_cpu(dtype):
    # The mask is a hash of (seed, element index): one seed gives one mask on both devices, in
    # forward and in backward. With A = I the saved u is dropout(x) itself, so its zeros are the
    # mask; the gradients agree only if backward regenerated the same mask on each device.
    T, n, o, p = 37, 48, 40, 0.3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, n, generator=g)
    x = (x.sign() * (0.5 + x.abs())).to(dtype)  # no zeros: u == 0 exactly where dropped
    W = (torch.randn(o, n, generator=g) / n**0.5).to(dtype)
    b = torch.randn(o, generator=g).to(dtype)
    A, B = torch.eye(n, dtype=dtype), (torch.randn(o, n, generator=g) / n**0.5).to(dtype)
    grad = torch.randn(T, o, generator=g).to(dtype)
    seed = torch.tensor([987654321], dtype=torch.int64)
    fwd, bwd = torch.ops.lora_ext.lora_linear_fwd.default, torch.ops.lora_ext.lora_linear_bwd.default
    out = {}
    for dev in ("cpu", "cuda"):
        a = [t.to(dev) for t in (x, W, b, A, B, seed, grad)]
        y, u = fwd(a[0], a[1], a[2], a[3], a[4], 0.8, p, a[5], False)
        dx, _, dA, dB = bwd(a[6], a[0], a[1], a[3], a[4], u, 0.8, p, a[5], False, [True, False, True, True])
        out[dev] = [t.cpu() for t in (y, u, dx, dA, dB)]
    keep = out["cpu"][1] != 0
    assert abs(1 - keep.double().mean().item() - p) < 0.05
    assert torch.equal(keep, out["cuda"][1] != 0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, c, ref in zip(("y", "u", "dx", "dA", "dB"), out["cuda"], out["cpu"]):
        assert rel_err(c, ref) < tol, name


@pytest.mark.cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cuda_graph_capture_replay_forward_backward(dropout_p):
    # PyTorch's whole-network capture: grads set to None before capture are allocated by the
    # captured backward and overwritten by each replay; the dropout seed is drawn in the graph.
    x, W, b, A, B = make(64, 96, 80, 8, torch.float32, "cuda")
    g = torch.randn(64, 80, device="cuda")
    leaves = (x, b, A, B)

    def step():
        y = lora_linear(x, W, b, A, B, 0.5, dropout_p=dropout_p, training=True)
        y.backward(g)
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        A.mul_(-1.5)
    graph.replay()
    torch.cuda.synchronize()
    if dropout_p == 0.0:
        yr, ref_leaves = reference(x, W, b, A, B, 0.5)
        yr.backward(g.double())
        assert rel_err(y, yr) < 1e-5
        for ours, ref in zip(leaves, ref_leaves):
            assert rel_err(ours.grad, ref.grad) < 1e-5
    else:  # a new mask per replay
        first = y.clone()
        graph.replay()
        assert torch.isfinite(y).all() and not torch.equal(y, first)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("trainable", ["A", "B", "AB", "x"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_gradients_of_any_subset(device, trainable, dropout_p):
    # Frozen x (first layer) or one frozen factor: the backward computes only what is asked,
    # and what it computes matches the reference (dropout: same seed, mask read off the grads).
    x, W, b, A, B = make(515, 37, 41, 5, torch.float32, device)
    for name, t in (("x", x), ("A", A), ("B", B)):
        t.requires_grad_(name in trainable)
    torch.manual_seed(3)
    y = lora_linear(x, W, b, A, B, 0.9, dropout_p=dropout_p, training=True)
    g = torch.randn_like(y)
    y.backward(g)
    mask = None
    if dropout_p:  # same seed, identity factors: the branch is dropout(ones) = keep / (1 - p)
        torch.manual_seed(3)
        eye = torch.eye(37, device=device)
        probe = lora_linear(torch.ones_like(x), eye * 0, None, eye, eye, 1.0, dropout_p=dropout_p,
                            training=True)
        mask = probe.detach()
    yr, (xd, _, Ad, Bd) = reference(x, W, b, A, B, 0.9, mask=mask)
    assert rel_err(y, yr) < 1e-5
    yr.backward(g.double())
    for name, ours, ref in (("x", x, xd), ("A", A, Ad), ("B", B, Bd)):
        if name in trainable:
            assert rel_err(ours.grad, ref.grad) < 2e-5, name
        else:
            assert ours.grad is None


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_double_backward(device, fan_in_fan_out):
    """create_graph=True (gradient penalties, Hessian-vector products) differentiates the
    gradients: they match fp64 autograd of the plain composition (fp64 gradgradcheck would need
    fp64 kernels); with active dropout it is refused by name."""
    x, W, b, A, B = make(9, 12, 10, 3, torch.float32, device, fan_in_fan_out=fan_in_fan_out)
    W = W.requires_grad_()
    y = lora_linear(x, W, b, A, B, 0.7, fan_in_fan_out=fan_in_fan_out)
    gx, gA = torch.autograd.grad(y.square().sum(), (x, A), create_graph=True)
    penalty = gx.square().sum() + gA.square().sum()  # its gradient reaches x, W, b, A and B
    grads = torch.autograd.grad(penalty, (x, W, b, A, B), retain_graph=True)
    yr, (xd, bd, Ad, Bd) = reference(x, W, b, A, B, 0.7, fan_in_fan_out)
    Wd = W.detach().double().requires_grad_()
    yr = xd @ (Wd if fan_in_fan_out else Wd.T) + bd + 0.7 * (xd @ Ad.T) @ Bd.T
    gxr, gAr = torch.autograd.grad(yr.square().sum(), (xd, Ad), create_graph=True)
    want = torch.autograd.grad(gxr.square().sum() + gAr.square().sum(), (xd, Wd, bd, Ad, Bd), retain_graph=True)
    assert rel_err(gx, gxr) < 1e-5 and rel_err(gA, gAr) < 1e-5
    for name, got, ref in zip("xWbAB", grads, want):
        assert rel_err(got, ref) < 1e-5, name
    # Hessian-vector product in A
    v = torch.randn_like(A)
    (hv,) = torch.autograd.grad((gA * v).sum(), A, retain_graph=True)
    (hvr,) = torch.autograd.grad((gAr * v.double()).sum(), Ad)
    assert rel_err(hv, hvr) < 1e-5
    y = lora_linear(x, W, b, A, B, 0.7, dropout_p=0.1, training=True, fan_in_fan_out=fan_in_fan_out)
    with pytest.raises(RuntimeError, match="double backward.*dropout"):
        torch.autograd.grad(y.sum(), A, create_graph=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [2000, 20000])
def test_weight_gradients_do_not_depend_on_threads(dtype, T):
    # The CPU backward sums dA, dB over token chunks fixed by T: same bits with 1 or 2 threads.
    x, W, b, A, B = make(T, 64, 48, 16, dtype, "cpu")
    grads = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            A.grad = B.grad = x.grad = None
            lora_linear(x, W, b, A, B, 0.5).backward(torch.ones(T, 48, dtype=dtype))
            grads.append((A.grad.clone(), B.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(*grads))


@pytest.mark.skipif(os.environ.get("LORA_EXT_CPU_ISA") is not None, reason="already in a subprocess")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_lower_cpu_isas(isa):
    # The CPU micro-kernels exist per ISA, and CI may run any: rerun the CPU kernel tests with a
    # lower one forced (LORA_EXT_CPU_ISA, read when lora_ext loads; avx512: without the
    # AVX512-BF16 dot products).
    # The merge kernels too (AVX-512 transition pieces, AVX2 tiles, portable code).
    here = os.path.dirname(os.path.abspath(__file__))
    for files, expr in ((("test_lora_linear.py", "test_lora_apply.py", "test_multi_lora.py"), "cpu and not compile"),
                        (("test_merge.py",), "not cuda and not compile")):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", expr,
                              *(os.path.join(here, f) for f in files)],
                             env={**os.environ, "LORA_EXT_CPU_ISA": isa}, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert " passed" in run.stdout


def test_bad_input():
    x, W, b, A, B = make(4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(RuntimeError, match="B must be"):
        lora_linear(x, W, b, A, B[:, :1], 1.0)
    with pytest.raises(RuntimeError, match="A must be"):
        lora_linear(x, W, b, A[:, :3], B, 1.0)
    with pytest.raises(RuntimeError, match="weight"):
        lora_linear(x, W[:, :3], b, A, B, 1.0)
    with pytest.raises(RuntimeError, match="bias"):
        lora_linear(x, W, b[:2], A, B, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        lora_linear(x, W.double(), b, A, B, 1.0)
    with pytest.raises(RuntimeError, match="rank r"):
        lora_linear(x, W, b, A[:0], B[:, :0], 1.0)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph_forward_backward(device):
    x, W, b, A, B = make(12, 32, 24, 4, torch.float32, device)

    @torch.compile(fullgraph=True)
    def step(x, A, B):
        return lora_linear(x, W, b, A, B, 0.5, dropout_p=0.1, training=True).square().mean()

    loss = step(x, A, B)
    loss.backward()
    assert A.grad is not None and B.grad is not None and x.grad is not None
    assert torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0


def test_explicit_dropout_seed():
    """seed= fixes the mask without touching torch's RNG; the default draws one from it."""
    x, W, b, A, B = make(33, 20, 12, 4, torch.float32, "cpu")
    s = torch.tensor([12345], dtype=torch.int64)
    state = torch.get_rng_state()
    y1 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, seed=s)
    y2 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, seed=s)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(y1, y2)
    y3 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, seed=s + 1)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("o", [1, 3])
def test_1d_input_with_trainable_bias(device, dtype, o):
    # x [in] (no leading dims, as nn.Linear takes): dbias summed over no dims gave a scalar
    # ("invalid gradient at index 2 - got [] but expected [out]")
    i, r = 5, 2
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(s, generator=g) for s in ((i,), (o, i), (o,), (r, i), (o, r))]
    x, W, b, A, B = (v.to(device=device, dtype=dtype).clone().requires_grad_(True) for v in vals)
    gy = torch.randn(o, generator=g)
    lora_linear(x, W, b, A, B, 0.5).backward(gy.to(device=device, dtype=dtype))
    ref = [v.double().clone().requires_grad_(True) for v in vals]
    xr, Wr, br, Ar, Br = ref
    (xr @ Wr.T + br + 0.5 * (xr @ Ar.T) @ Br.T).backward(gy.double())
    for got, want in zip((x, W, b, A, B), ref):
        assert got.grad.shape == want.shape
        assert rel_err(got.grad.cpu(), want.grad) < (1e-5 if dtype == torch.float32 else 3e-2)
