"""The CUDA merge kernels read the adapters' A and B where they lie (launch.h's Factors): every
layout, dtype mix and fallback gives the CPU's bits."""
import pytest
import torch
from conftest import rand, same_bits, under_schedules

CPU = torch.ops.lora_ext
DTYPES3 = (torch.float32, torch.bfloat16, torch.float16)


def adapters(n, P_out, Q_in, dtype, seed, layout):
    """n adapters for a weight [out, in]: A [r, in], B [out, r] in mixed dtypes and layouts."""
    As, Bs, scales = [], [], []
    for k in range(n):
        r = (1, 5, 16, 18)[k % 4]
        ab = DTYPES3[(k + seed) % 3]
        A = rand(r, Q_in + 1, dtype=ab, seed=seed + 3 * k, scale=0.5)
        B = rand(P_out, r, dtype=ab, seed=seed + 3 * k + 1, scale=0.02)
        if layout == "strided":  # A misaligned (offset 1 element), B column-major
            A, B = A[:, 1:], B.t().contiguous().t()
        else:
            A = A[:, :Q_in].contiguous()
        if k == 1:  # +-inf and NaN in the factors
            B[0, 0], A[-1, -1], A[0, 2] = float("inf"), float("-inf"), float("nan")
        As.append(A)
        Bs.append(B)
        scales.append(0.5 - 0.25 * k)
    return As, Bs, scales


@pytest.mark.parametrize("dtype", DTYPES3)
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("case", ["one", "mixed", "strided", "nine", "transposed_w", "alias"])
def test_merge_reads_factors_in_place(emu, dtype, fifo, case):
    out, inp = 37, 261
    n = {"one": 1, "nine": 9}.get(case, 3)  # nine: more adapters than pieces (fp32 operands)
    As, Bs, scales = adapters(n, out, inp, dtype, seed=7 if fifo else 8,
                              layout="strided" if case == "strided" else "plain")
    W0 = rand(*((inp, out) if fifo else (out, inp)), dtype=dtype, seed=3, scale=0.05)
    if case == "transposed_w":  # a column-major weight: the kernels see W^T
        W0 = W0.t().contiguous().t()

    def run(ops, alias):
        W = W0.clone()
        A = list(As)
        if alias:  # A[0] is rows of the weight it updates: read before any is written
            r0 = A[0].shape[0]
            A[0] = W[:, :r0].t() if fifo else W[:r0]
        ops.merge_(W, A, Bs, scales, fifo)
        return W
    alias = case == "alias"
    ref = run(CPU, alias)
    if alias:  # the CPU reference: the same adapter from a copy of those rows
        r0 = As[0].shape[0]
        A = [(W0[:, :r0].t() if fifo else W0[:r0]).clone()] + As[1:]
        W = W0.clone()
        CPU.merge_(W, A, Bs, scales, fifo)
        assert same_bits(ref, W)
    assert same_bits(under_schedules(emu, lambda: run(emu.ops, alias)), ref)


@pytest.mark.parametrize("fifo", [False, True])
def test_points_remerge_dora_read_factors_in_place(emu, fifo):
    out, inp, dtype = 21, 70, torch.bfloat16
    As, Bs, scales = adapters(3, out, inp, dtype, seed=11, layout="strided")
    W0 = rand(*((inp, out) if fifo else (out, inp)), dtype=dtype, seed=5, scale=0.05)
    idx = torch.tensor([0, 3, W0.numel() // 2, W0.numel() - 1])
    vals = W0.reshape(-1)[idx] + 1

    def steps(ops):
        W = W0.clone()
        ops.merge_points_(W, idx, vals, As, Bs, scales, fifo)
        codes = torch.zeros((W.numel() * 2 + 31) // 32, dtype=torch.int32)
        fails = torch.zeros((W.numel() + 31) // 32, dtype=torch.int32)
        ops.remerge_(W, codes, fails, 2, [], [], [], As[:2], Bs[:2], scales[:2], fifo)
        ops.remerge_(W, codes, fails, 2, As[:2], Bs[:2], scales[:2], As[2:], Bs[2:], scales[2:], fifo)
        norm = ops.dora_norm(W, As[2], Bs[2], 0.75, fifo)
        return W, codes, fails, norm
    for a, b in zip(under_schedules(emu, lambda: steps(emu.ops)), steps(CPU)):
        assert same_bits(a, b)


@pytest.mark.parametrize("dtype", DTYPES3)
@pytest.mark.parametrize("sms", [1, 3])
@pytest.mark.parametrize("ranks", [[16, 16], [7], [33]])
def test_merge_strip_over_row_tiles(emu, dtype, sms, ranks):
    # total rank <= 32: merge_strip_kernel, whose blocks walk several row tiles (few SMs: up to
    # all of them per block), prefetching the next tile's W and L; 33: merge_kernel
    P, Q = 300, 290
    W0 = rand(P, Q, dtype=dtype, seed=61, scale=0.05)
    W0[7, :5] = torch.tensor([float("inf"), float("nan"), -0.0, 0.0, float("-inf")])
    As = [rand(r, Q, dtype=dtype, seed=62 + r) for r in ranks]
    Bs = [rand(P, r, dtype=dtype, seed=63 + r, scale=0.01) for r in ranks]
    scales = [0.75] * len(ranks)
    ref = W0.clone()
    CPU.merge_(ref, As, Bs, scales, False)

    def run():
        W = W0.clone()
        emu.ops.merge_(W, As, Bs, scales, False)
        return W
    assert same_bits(under_schedules(emu, run, sms=sms), ref)
