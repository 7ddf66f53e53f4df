"""The tensor-core tiles of lora_apply_ / lora_linear (csrc/cuda/lowrank_tc_kernels.cu: 16-bit jobs of
more than 8 tokens on sm_80+), emulated: against the CPU kernels and the CUDA-core tiles (gemm_nt,
LORA_EXT_CUDA_TENSOR_CORES=0 or an sm_75 device), under several schedules; the per-token batch
invariance their fixed K chunks give; +-inf in u."""
import pytest
import torch
from conftest import RTOL, lora_apply_case, rand, rel_err, same_bits, under_schedules

CPU = torch.ops.lora_ext

# (T, in, out, r): one token tile with a tail and BN = 64 (r = 40); K split in 3 with 16-byte
# loads; odd in (scalar x loads), r = 17 (BN = 32, scalar u/B loads), odd out (scalar y);
# r = 1 with 5 K chunks; r = 70 (two rank tiles, expand K steps of 32 + 32 + 6)
SHAPES = [(9, 40, 30, 40), (70, 600, 24, 16), (130, 301, 33, 17), (65, 1030, 72, 1),
          (72, 64, 130, 70)]


def case(dtype, T, i, o, r, seed=0):
    x = rand(T, i + 3, dtype=dtype, seed=seed + 1)[:, 3:]  # row stride i + 3, misaligned start
    A = rand(r, i, dtype=dtype, seed=seed + 2, scale=i ** -0.5)
    B, W = rand(o, r, dtype=dtype, seed=seed + 3), rand(o, i, dtype=dtype, seed=seed + 4, scale=0.05)
    return x, A, B, W


def linear(ops, x, W, bias, A, B, p, seed, mask):
    """(y, u, the gradients asked for) of ops' lora_linear forward and backward (scale 0.5)."""
    y, u = ops.lora_linear_fwd(x, W, bias, A, B, 0.5, p, seed, False)
    g = rand(*y.shape, dtype=y.dtype, seed=99)
    return (y, u) + tuple(t for t in ops.lora_linear_bwd(g, x, W, A, B, u, 0.5, p, seed, False, mask)
                          if t is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,i,o,r", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_lora_apply_tiles(emu, monkeypatch, dtype, T, i, o, r, contiguous):
    x, A, B, _ = case(dtype, T, i, o, r)
    if contiguous:
        x = x.contiguous()
    ref, run = lora_apply_case(emu, rand(T, o, dtype=dtype, seed=5), x, A, B, 0.7)
    tc = under_schedules(emu, run)
    assert rel_err(tc, ref) < RTOL[dtype]
    monkeypatch.setenv("LORA_EXT_CUDA_TENSOR_CORES", "0")
    cores = run()
    with emu.device(cc=75):  # no TF32 MMA: the CUDA-core tiles whatever the variable says
        monkeypatch.delenv("LORA_EXT_CUDA_TENSOR_CORES")
        assert same_bits(run(), cores)
    assert rel_err(cores, ref) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,i,o,r", SHAPES[1:4])
@pytest.mark.parametrize("order", ["gemm_first", "expand_first"])
def test_lora_linear_tiles_with_dropout(emu, monkeypatch, dtype, T, i, o, r, order):
    # dropout on x (0/1 mask staged, 1 / (1 - p) on the sum) and on the backward expand's output
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", "1" if order == "expand_first" else "0")
    x, A, B, W = case(dtype, T, i, o, r, seed=10)
    bias, seed, mask = rand(o, dtype=dtype, seed=16), torch.tensor([424242], dtype=torch.int64), \
        [True, True, True, True]
    for p in (0.0, 0.3):
        got = under_schedules(emu, lambda: linear(emu.ops, x, W, bias, A, B, p, seed, mask))
        ref = linear(CPU, x, W, bias, A, B, p, seed, mask)
        assert rel_err(got[1], ref[1]) < 1e-5, "u: exact products, fp32 sums"
        for k, (a, b) in enumerate(zip(got, ref)):
            assert rel_err(a, b) < RTOL[dtype], k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tokens_same_bits_in_any_batch(emu, dtype):
    # The K chunks depend on `in` alone, and a block that runs all of them (token tiles enough
    # to fill the GPU: 600 tokens on 2 SMs) sums them in the order the split partials are
    # summed, dropout's 1 / (1 - p) included: a token's u (and lora_apply_'s y) does not depend
    # on the other tokens, nor on the GPU's size.
    T, i, o, r = 600, 1030, 40, 24
    x, A, B, W = case(dtype, T, i, o, r, seed=20)
    y0, seed = rand(T, o, dtype=dtype, seed=21), torch.tensor([7], dtype=torch.int64)
    fwd = emu.ops.lora_linear_fwd
    u = {}
    for p in (0.0, 0.3):
        for sms in (132, 2):  # 600 tokens: one K chunk per block on 132 SMs, all in one on 2
            with emu.device(sms=sms):
                u[p, sms] = fwd(x, W, None, A, B, 0.5, p, seed, False)[1]
        assert same_bits(u[p, 132], u[p, 2]), p
    with emu.device(sms=2):
        y_all = y0.clone()
        emu.ops.lora_apply_(y_all, x, A, B, 0.5)
        for t0 in (0, 8, 536):  # 64 tokens: one K chunk per block
            rows = slice(t0, t0 + 64)
            assert same_bits(fwd(x[rows], W, None, A, B, 0.5, 0.0, seed, False)[1], u[0.0, 2][rows]), t0
            y = y0[rows].clone()
            emu.ops.lora_apply_(y, x[rows], A, B, 0.5)
            assert same_bits(y, y_all[rows]), t0


def test_infinite_u(emu):
    # u = +-inf (its hi part is inf, no lo part) gives +-inf in y as on the CPU, not NaN;
    # the other tokens stay finite (bf16: finite x and A whose product overflows fp32)
    dtype, (T, i, o, r) = torch.bfloat16, (20, 70, 45, 6)
    x, A, B, _ = case(dtype, T, i, o, r, seed=30)
    x, A = x.clone(), A.clone()
    x[3, 0], A[:, 0], A[0, 0] = 3e38, 0.0, 10.0  # u[3, 0] = inf
    ref, got = torch.zeros(T, o, dtype=dtype), torch.zeros(T, o, dtype=dtype)
    CPU.lora_apply_(ref, x, A, B, 0.7)
    emu.ops.lora_apply_(got, x, A, B, 0.7)
    assert torch.isinf(ref[3]).all() and torch.equal(got[3], ref[3])
    assert rel_err(torch.cat([got[:3], got[4:]]), torch.cat([ref[:3], ref[4:]])) < RTOL[dtype]
