"""Bitwise determinism and batch invariance of every op, and torch.use_deterministic_algorithms.

Same inputs -> same bits, run after run (no atomics whose order shows in a result); in the
multi-adapter ops a token's bits do not depend on where it sits in the batch or on the tokens of
other adapters (README "Determinism"). Split-K shapes are chosen so that the CUDA kernels split.
"""
import pytest
import torch
from conftest import devices

import lora_ext  # noqa: F401
from lora_ext.ops import MergeState, lora_apply_, lora_expand_, lora_linear, lora_shrink, merge_, multi_lora_

RUNS = 12
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a, b):
    return torch.equal(a.view(BITS[a.dtype]) if a.dtype in BITS else a, b.view(BITS[b.dtype]) if b.dtype in BITS else b)


def rand(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def pool(S, r, i, o, dtype, device):
    A = rand(S, r, i, dtype=dtype, device=device, seed=1, scale=i ** -0.5)
    B = rand(S, o, r, dtype=dtype, device=device, seed=2, scale=r ** -0.5)
    scales = torch.linspace(0.5, 1.5, S, device=device)
    ranks = torch.full((S,), r, dtype=torch.int32, device=device)
    return A, B, scales, ranks


def run_multi(x, A, B, idx, scales, ranks):
    y = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    return multi_lora_(y, x, A, B, idx, scales, ranks)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [72, 130, 300])
def test_multi_lora_one_slot_same_bits_and_batch_invariant(device, dtype, T):
    # T = 72, every index 0: which 8 tokens form the tail tile used to vary per run on CUDA
    i, o, r = 1024, 192, 16
    A, B, scales, ranks = pool(1, r, i, o, dtype, device)
    x = rand(T, i, dtype=dtype, device=device, seed=T)
    idx = torch.zeros(T, dtype=torch.int32, device=device)
    first = run_multi(x, A, B, idx, scales, ranks)
    for _ in range(RUNS):
        assert same_bits(run_multi(x, A, B, idx, scales, ranks), first)
    for t0 in (0, T - 64, (T - 64) // 2):  # every token equals itself computed in a T = 64 batch
        part = run_multi(x[t0:t0 + 64], A, B, idx[:64], scales, ranks)
        assert same_bits(part, first[t0:t0 + 64]), t0
    u = lora_shrink(x, A, idx, ranks)
    for _ in range(3):
        assert same_bits(lora_shrink(x, A, idx, ranks), u)
    assert same_bits(lora_shrink(x[:64], A, idx[:64], ranks), u[:64])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [3, 20])
def test_multi_lora_token_independent_of_other_adapters(device, dtype, count):
    # adapter 0's tokens (count of them, <= 8 or > 8) give the same bits whatever the other
    # adapters' tokens are and wherever adapter 0's tokens sit in the batch
    i, o, r, S = 512, 130, 8, 5
    A, B, scales, ranks = pool(S, r, i, o, dtype, device)
    x0 = rand(count, i, dtype=dtype, device=device, seed=7)
    ref = None
    for seed, others in ((0, 0), (1, 5), (2, 40), (3, 200)):
        g = torch.Generator().manual_seed(seed)
        xo = rand(others, i, dtype=dtype, device=device, seed=100 + seed)
        io = torch.randint(1, S, (others,), generator=g)
        perm = torch.randperm(count + others, generator=g)
        x = torch.cat([x0, xo])[perm.to(device)]
        idx = torch.cat([torch.zeros(count, dtype=torch.long), io])[perm].to(torch.int32).to(device)
        y = run_multi(x, A, B, idx, scales, ranks)
        mine = y[torch.argsort(perm)[:count].to(device)]
        if ref is None:
            ref = mine
        assert same_bits(mine, ref), (seed, others)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 9, 200])
def test_single_adapter_ops_same_bits(device, dtype, T):
    # in = 4096: the CUDA shrink splits K (decode and tiled paths)
    i, o, r = 4096, 96, 16
    x = rand(T, i, dtype=dtype, device=device, seed=T)
    A = rand(r, i, dtype=dtype, device=device, seed=1, scale=i ** -0.5)
    B = rand(o, r, dtype=dtype, device=device, seed=2)
    W = rand(o, i, dtype=dtype, device=device, seed=3, scale=i ** -0.5)
    y0 = rand(T, o, dtype=dtype, device=device, seed=4)

    def step():
        y = lora_apply_(y0.clone(), x, A, B, 0.5)
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(0)
        out = lora_linear(xs, W, None, As, Bs, 0.5, dropout_p=0.1, training=True)
        out.backward(y0)
        return [y, out.detach(), xs.grad, As.grad, Bs.grad]

    first = step()
    for _ in range(RUNS):
        for a, b in zip(step(), first):
            assert same_bits(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [72, 130, 300, 34000])
def test_single_adapter_tokens_batch_invariant_on_tensor_cores(dtype, T):
    # 16-bit jobs of > 8 tokens on sm_80+: K chunks from `in` alone, so every token's u and
    # lora_apply_'s y are the same bits as in a T = 64 batch (lora_linear's y also holds
    # cuBLAS's x W^T, whose kernel choice may depend on T); 34000 tokens fill an H200 with
    # token tiles alone: every chunk runs in its tile's block, no split-K partials
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tensor-core tiles need sm_80+")
    i, o, r = 4096, 96, 16
    x = rand(T, i, dtype=dtype, device="cuda", seed=T)
    A = rand(r, i, dtype=dtype, device="cuda", seed=1, scale=i ** -0.5)
    B = rand(o, r, dtype=dtype, device="cuda", seed=2)
    W = rand(o, i, dtype=dtype, device="cuda", seed=3, scale=i ** -0.5)
    y0 = rand(T, o, dtype=dtype, device="cuda", seed=4)
    fwd = torch.ops.lora_ext.lora_linear_fwd.default
    u_all = fwd(x, W, None, A, B, 0.5, 0.0, None, False)[1]
    a_all = lora_apply_(y0.clone(), x, A, B, 0.5)
    for t0 in (0, T - 64, (T - 64) // 2):
        u = fwd(x[t0:t0 + 64], W, None, A, B, 0.5, 0.0, None, False)[1]
        assert same_bits(u, u_all[t0:t0 + 64]), t0
        assert same_bits(lora_apply_(y0[t0:t0 + 64].clone(), x[t0:t0 + 64], A, B, 0.5), a_all[t0:t0 + 64])


@pytest.mark.parametrize("device", devices())
def test_use_deterministic_algorithms(device, monkeypatch):
    # every op runs with torch.use_deterministic_algorithms(True) (cuBLAS, used for the base
    # GEMMs, asks for CUBLAS_WORKSPACE_CONFIG as for any torch matmul)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dtype, T, i, o, r, S = torch.bfloat16, 40, 256, 64, 8, 3
    x = rand(T, i, dtype=dtype, device=device, seed=0).requires_grad_()
    A, B, scales, ranks = pool(S, r, i, o, dtype, device)
    W = rand(o, i, dtype=dtype, device=device, seed=3)
    idx = (torch.arange(T, device=device) % (S + 1) - 1).to(torch.int32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = A[0].clone().requires_grad_(), B[0].clone().requires_grad_()
        lora_linear(x, W, None, a, b, 2.0, dropout_p=0.1, training=True).sum().backward()
        lora_apply_(torch.zeros(T, o, dtype=dtype, device=device), x.detach(), A[0], B[0], 1.0)
        multi_lora_(torch.zeros(T, o, dtype=dtype, device=device), x.detach(), A, B, idx, scales, ranks)
        u = lora_shrink(x.detach(), A, idx, ranks)
        lora_expand_(torch.zeros(T, o, dtype=dtype, device=device), u, B, idx, scales, ranks)
        Wm, state = W.clone(), MergeState()
        merge_(Wm, A[0], B[0], 1.0)
        merge_(Wm, A[1], B[1], 0.5, state=state, name="b")
        merge_(Wm, A[2], B[2], 0.5, state=state, name="c")
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_lora_cpu_bits_do_not_depend_on_threads(dtype):
    # CPU work items (packed-panel shrink and expand for big groups, streaming paths for small
    # ones) each own whole tokens: the same bits with 1 or 2 threads.
    i, o, r, S, T = 300, 70, 16, 5, 400
    A, B, scales, ranks = pool(S, r, i, o, dtype, "cpu")
    ranks[3] = 5
    x = rand(T, i, dtype=dtype, device="cpu", seed=3)
    idx = torch.zeros(T, dtype=torch.int32)
    idx[200:] = torch.randint(-1, S, (T - 200,), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((run_multi(x, A, B, idx, scales, ranks), lora_shrink(x, A, idx, ranks)))
    finally:
        torch.set_num_threads(before)
    assert same_bits(outs[0][0], outs[1][0]) and same_bits(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,i,o,r", [(7, 28, 503, 34), (16, 270, 485, 62), (1, 580, 311, 31), (3, 64, 257, 9)])
def test_small_T_single_adapter_bits_do_not_depend_on_threads(dtype, T, i, o, r):
    # T <= 16 (the CPU small path): rank rows were split 0..r by parallel_for, and the shrink pairs
    # rows from the start of its range (a lone row rounds otherwise), the expand folds 8 output
    # rows from the start of its range: 1 and 2 threads gave other bits. Fixed work items now.
    x, W = rand(T, i, dtype=dtype, device="cpu", seed=T), rand(o, i, dtype=dtype, device="cpu", seed=1)
    A = (rand(r, i, dtype=torch.float32, device="cpu", seed=2) / i ** 0.5).to(dtype)
    B, y0 = rand(o, r, dtype=dtype, device="cpu", seed=3), rand(T, o, dtype=dtype, device="cpu", seed=4)
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = y0.clone()
            lora_apply_(y, x, A, B, 0.5)
            u = torch.ops.lora_ext.lora_linear_fwd(x, W, None, A, B, 0.5, 0.0, None, False)[1]
            outs.append((y, u))
    finally:
        torch.set_num_threads(before)
    assert same_bits(outs[0][1], outs[1][1]) and same_bits(outs[0][0], outs[1][0])
