"""Every CUDA launch site of lora_ext, run by the emulator on shapes that reach each path (tails and
odd sizes included), against the CPU kernels: bit for bit where the design says identical (merge,
remerge, merge_points, dropout masks), within fp32-accumulation tolerance elsewhere; every case
under several schedules (thread/block orders and atomic orders), which must give identical bits."""
import itertools

import pytest
import torch
from conftest import RTOL, lora_apply_case, rand, rel_err, same_bits, under_schedules

CPU = torch.ops.lora_ext


# ------------------------------------------------------------------ lora_apply_ / lora_linear
# (T, in, out, r): decode with split K and 16-byte loads, decode unaligned (in odd: scalar loads,
# r odd: scalar expand), tiled with r <= 16 / <= 32 / > 32 (BN = 16/32/64), tiled with split K.
APPLY = [(3, 600, 70, 8), (5, 301, 33, 5), (70, 96, 90, 12), (40, 64, 65, 20), (9, 40, 30, 40),
         (70, 600, 24, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,i,o,r", APPLY)
def test_lora_apply(emu, dtype, T, i, o, r):
    if dtype == torch.float16 and (T, i) not in ((3, 600), (70, 600)):
        pytest.skip("fp16: the split-K decode and tiled cases")
    x, A, B = rand(T, i, dtype=dtype, seed=1), rand(r, i, dtype=dtype, seed=2, scale=i ** -0.5), \
        rand(o, r, dtype=dtype, seed=3)
    ref, run = lora_apply_case(emu, rand(T, o, dtype=dtype, seed=4), x, A, B, 0.7)
    assert rel_err(under_schedules(emu, run), ref) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [4, 40])
@pytest.mark.parametrize("order", ["gemm_first", "expand_first", "expand_first_no_bias"])
def test_lora_linear_fwd_bwd_with_dropout(emu, dtype, T, order, monkeypatch):
    # expand_first: the CUDA backend's other order (LORA_EXT_CUDA_EXPAND_FIRST=1): the expand
    # writes bias + LoRA term (decode: rows started from the bias or zero) and the GEMM adds x W^T
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", "0" if order == "gemm_first" else "1")
    i, o, r, p = 70, 45, 6, 0.25
    x, W = rand(T, i, dtype=dtype, seed=5), rand(o, i, dtype=dtype, seed=6, scale=0.1)
    A, B = rand(r, i, dtype=dtype, seed=7, scale=0.2), rand(o, r, dtype=dtype, seed=8)
    bias, seed = rand(o, dtype=dtype, seed=9), torch.tensor([123456789], dtype=torch.int64)
    if order == "expand_first_no_bias":
        bias = None
    g = rand(T, o, dtype=dtype, seed=10)
    y_ref, u_ref = CPU.lora_linear_fwd(x, W, bias, A, B, 0.5, p, seed, False)
    y, u = under_schedules(emu, lambda: emu.ops.lora_linear_fwd(x, W, bias, A, B, 0.5, p, seed, False))
    assert rel_err(y, y_ref) < RTOL[dtype] and rel_err(u, u_ref) < RTOL[torch.float32] * 10
    mask = [True, False, True, True]
    ref = CPU.lora_linear_bwd(g, x, W, A, B, u_ref, 0.5, p, seed, False, mask)
    out = under_schedules(emu, lambda: tuple(
        t for t in emu.ops.lora_linear_bwd(g, x, W, A, B, u_ref, 0.5, p, seed, False, mask) if t is not None))
    for a, b in zip(out, [t for t in ref if t is not None]):
        assert rel_err(a, b) < RTOL[dtype]


@pytest.mark.parametrize("T", [9, 70])
@pytest.mark.parametrize("order", ["gemm_first", "expand_first", "expand_first_no_bias"])
def test_blas_halves(emu, T, order, monkeypatch):
    # LORA_EXT_CUDA_BLAS=1: bf16 jobs of > 8 tokens without dropout run both halves as GEMMs
    # (cuBLAS; in this build aten's CPU ones): u in fp32, the expand over u's hi + lo bf16 parts
    monkeypatch.setenv("LORA_EXT_CUDA_BLAS", "1")
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", "0" if order == "gemm_first" else "1")
    dt, (i, o, r) = torch.bfloat16, (70, 45, 6)
    x, W = rand(T, i, dtype=dt, seed=5), rand(o, i, dtype=dt, seed=6, scale=0.1)
    A, B = rand(r, i, dtype=dt, seed=7, scale=0.2), rand(o, r, dtype=dt, seed=8)
    bias = None if order == "expand_first_no_bias" else rand(o, dtype=dt, seed=9)
    seed, g = torch.tensor([1], dtype=torch.int64), rand(T, o, dtype=dt, seed=10)
    y_ref, u_ref = CPU.lora_linear_fwd(x, W, bias, A, B, 0.5, 0.0, seed, False)
    y, u = emu.ops.lora_linear_fwd(x, W, bias, A, B, 0.5, 0.0, seed, False)
    assert rel_err(u, u_ref) < 1e-5 and rel_err(y, y_ref) < RTOL[dt]
    mask = [True, False, True, True]
    ref = CPU.lora_linear_bwd(g, x, W, A, B, u_ref, 0.5, 0.0, seed, False, mask)
    out = emu.ops.lora_linear_bwd(g, x, W, A, B, u_ref, 0.5, 0.0, seed, False, mask)
    for a, b in zip(out, ref):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) < RTOL[dt])
    # lora_apply_ into a strided y; a token whose u is +-inf gives +-inf, not inf - inf = NaN
    x2, A2 = x.clone(), A.clone()
    x2[3, 0], A2[:, 0], A2[0, 0] = 3e38, 0.0, 10.0  # u[3, 0] = inf, the rest finite
    y0 = torch.zeros(T, 2 * o, dtype=dt)[:, ::2]
    ref_y, got_y = y0.clone(), y0.clone()
    CPU.lora_apply_(ref_y, x2, A2, B, 0.7)
    emu.ops.lora_apply_(got_y, x2, A2, B, 0.7)
    assert torch.isinf(ref_y[3]).all() and torch.equal(got_y[3], ref_y[3])
    assert rel_err(torch.cat([got_y[:3], got_y[4:]]), torch.cat([ref_y[:3], ref_y[4:]])) < RTOL[dt]


@pytest.mark.parametrize("T", [3, 20])
def test_dropout_mask_bit_for_bit(emu, T):
    # one-hot A: u[t, j] = keep(t, k_j) / (1 - p) * x[t, k_j], one rounding: the masks must agree
    i, r, p = 50, 50, 0.4
    x = rand(T, i, seed=11)
    A, B, W = torch.eye(r, i), torch.zeros(3, r), torch.zeros(3, i)
    seed = torch.tensor([987654321], dtype=torch.int64)
    _, u_ref = CPU.lora_linear_fwd(x, W, None, A, B, 1.0, p, seed, False)
    _, u = under_schedules(emu, lambda: emu.ops.lora_linear_fwd(x, W, None, A, B, 1.0, p, seed, False))
    assert same_bits(u, u_ref)
    assert 0.2 < (u == 0).float().mean() < 0.6
    # the backward's dropout_rows kernel (dA = s gB^T (keep * x)) uses the same mask
    g = rand(T, 3, seed=12)
    dA_ref = CPU.lora_linear_bwd(g, x, W, A, rand(3, r, seed=13), u_ref, 1.0, p, seed, False,
                                 [False, False, True, False])[2]
    dA = emu.ops.lora_linear_bwd(g, x, W, A, rand(3, r, seed=13), u_ref, 1.0, p, seed, False,
                                 [False, False, True, False])[2]
    assert rel_err(dA, dA_ref) < 1e-6


# ------------------------------------------------------------------ merge family (bit for bit)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P,Q,ranks,sliced", [(70, 300, [20], False), (33, 257, [3, 5], True),
                                                (5, 9, [1], False)])
def test_merge_bit_for_bit(emu, dtype, P, Q, ranks, sliced):
    # rank chunks of 16 with a tail, row/column tails, and a misaligned weight (scalar accesses)
    W0 = rand(P, Q + 1, dtype=dtype, seed=14, scale=0.05)
    W0 = W0[:, 1:] if sliced else W0[:, :Q].contiguous()
    As = [rand(r, Q, dtype=dtype, seed=20 + r) for r in ranks]
    Bs = [rand(P, r, dtype=dtype, seed=30 + r, scale=0.01) for r in ranks]
    scales = [0.5 * (k + 1) for k in range(len(ranks))]
    ref = W0.clone()
    CPU.merge_(ref, As, Bs, scales, False)

    def run():
        W = W0.clone()
        emu.ops.merge_(W, As, Bs, scales, False)
        return W
    assert same_bits(under_schedules(emu, run), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_remerge_and_points_bit_for_bit(emu, dtype):
    P, Q, bits = 40, 130, 2
    W0 = rand(P, Q, dtype=dtype, seed=40, scale=0.02)
    W0[0, :4] = 0  # elements whose W0 the codes cannot restore: exceptions
    A1, B1 = rand(4, Q, dtype=dtype, seed=41), rand(P, 4, dtype=dtype, seed=42, scale=0.01)
    A2, B2 = rand(18, Q, dtype=dtype, seed=43), rand(P, 18, dtype=dtype, seed=44, scale=0.01)
    words = (P * Q * bits + 31) // 32, (P * Q + 31) // 32

    def steps(ops):
        W, codes, fails = W0.clone(), torch.zeros(words[0], dtype=torch.int32), torch.zeros(words[1], dtype=torch.int32)
        out = []
        for old, new in (([], [(A1, B1, 1.5)]), ([(A1, B1, 1.5)], [(A1, B1, 1.5), (A2, B2, -0.5)]),
                         ([(A1, B1, 1.5), (A2, B2, -0.5)], [])):
            ops.remerge_(W, codes, fails, bits, [a for a, _, _ in old], [b for _, b, _ in old],
                         [s for _, _, s in old], [a for a, _, _ in new], [b for _, b, _ in new],
                         [s for _, _, s in new], False)
            out += [W.clone(), codes.clone(), fails.clone()]
        idx = torch.tensor([0, 1, 5, P * Q - 1])
        ops.merge_points_(W, idx, W0.view(-1)[idx], [A2], [B2], [0.25], False)
        return tuple(out + [W])
    for a, b in zip(under_schedules(emu, lambda: steps(emu.ops)), steps(CPU)):
        assert same_bits(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_code_failures(emu, dtype):
    w0 = rand(3000, dtype=dtype, seed=50, scale=0.02)
    w0[::9] = 0
    s = rand(3000, seed=51, scale=0.05)
    ref = CPU.merge_code_failures(w0, s)
    assert torch.equal(under_schedules(emu, lambda: emu.ops.merge_code_failures(w0, s)), ref)


# ------------------------------------------------------------------ dora_norm (bit for bit)
DORA_SIZES = (1, 7, 33, 130, 257)
DTYPES3 = (torch.float32, torch.bfloat16, torch.float16)


def dora_case(out, inp, r, dtype, ab, fifo, seed, special=False):
    W = rand(*((inp, out) if fifo else (out, inp)), dtype=dtype, seed=seed, scale=0.05)
    A = rand(r, inp, dtype=ab, seed=seed + 1)
    B = rand(out, r, dtype=ab, seed=seed + 2, scale=0.02)
    if special and W.numel() >= 8:
        flat = W.view(-1)  # inf, NaN, -0, the dtype's largest and smallest subnormal numbers
        fi = torch.finfo(dtype)
        flat[1], flat[W.numel() // 2], flat[-1] = float("inf"), float("nan"), -0.0
        flat[3], flat[5] = fi.max, fi.smallest_normal * fi.eps
    if special and r > 0:  # +-inf in the factors: inf rows / columns of the delta, which the
        B[out // 2, 0] = float("inf")  # zero padding of the tiles must not turn into NaN (0 * inf)
        A[r - 1, inp - 1] = float("-inf")
    return W, A, B


@pytest.mark.parametrize("dtype", DTYPES3)
@pytest.mark.parametrize("r", [0, 1, 17, 64])
@pytest.mark.parametrize("fifo", [False, True])
def test_dora_norm_bit_for_bit(emu, dtype, r, fifo):
    # every (out, in) of DORA_SIZES: row and column tiles with tails, rank chunks of 16 with
    # tails, the row mode's lane exchanges and the column mode's shared-memory combine; A and B
    # in each dtype in turn, special values in W in every other case
    for k, (out, inp) in enumerate(itertools.product(DORA_SIZES, DORA_SIZES)):
        ab = DTYPES3[k % 3]
        W, A, B = dora_case(out, inp, r, dtype, ab, fifo, seed=k, special=k % 2 == 1)
        ref = CPU.dora_norm(W, A, B, 0.75, fifo)
        got = emu.ops.dora_norm(W, A, B, 0.75, fifo)
        assert same_bits(got, ref), f"out={out} in={inp} r={r} A/B {ab}: {(got - ref).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES3)
@pytest.mark.parametrize("fifo", [False, True])
def test_dora_norm_chunks_layouts_schedules(emu, dtype, fifo):
    # in > 512: several chunks (partials in the workspace, the finishing launch); a misaligned
    # (scalar loads) and a column-major weight (the other mode); every case under every schedule
    for out, inp, r in [(33, 1100, 17), (130, 1030, 1), (7, 1537, 0), (257, 513, 64)]:
        W, A, B = dora_case(out, inp, r, dtype, dtype, fifo, seed=out + inp, special=True)
        wide = torch.zeros(W.shape[0], W.shape[1] + 1, dtype=dtype)
        wide[:, 1:] = W
        for Wv in (W, wide[:, 1:], W.T.contiguous().T):
            ref = CPU.dora_norm(Wv, A, B, -1.25, fifo)
            got = under_schedules(emu, lambda: emu.ops.dora_norm(Wv, A, B, -1.25, fifo))
            assert same_bits(got, ref), f"out={out} in={inp} r={r} strides={Wv.stride()}"


# ------------------------------------------------------------------ multi-adapter ops
def multi_inputs(T, i, o, S, r_max, dtype, idx, n=None, seed=0):
    x = rand(T, i, dtype=dtype, seed=seed + 1)
    A = rand(*((S, r_max, i) if n is None else (n, S, r_max, i)), dtype=dtype, seed=seed + 2, scale=i ** -0.5)
    B = rand(S, o, r_max, dtype=dtype, seed=seed + 3, scale=r_max ** -0.5)
    shape = (S,) if n is None else (n, S)
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, r_max + 1, shape, generator=g).to(torch.int32)
    scales = torch.rand(shape, generator=g) + 0.5
    y = rand(T, o, dtype=dtype, seed=seed + 4)
    return y, x, A, B, idx, scales, ranks


def check_multi(emu, y, x, A, B, idx, scales, ranks, dtype, out_slices=None, **device):
    valid = torch.where((idx >= 0) & (idx < B.shape[0]), idx, torch.full_like(idx, -1))
    ref = y.clone()
    CPU.multi_lora_(ref, x, A, B, valid, scales, ranks, out_slices)

    def run():
        out, bad = y.clone(), torch.zeros(1, dtype=torch.int32)
        emu.ops.multi_lora_(out, x, A, B, idx, scales, ranks, out_slices, bad)
        return out, bad
    out, bad = under_schedules(emu, run, **device)
    assert rel_err(out, ref) < RTOL[dtype]
    assert int(bad) == int(((idx < -1) | (idx >= B.shape[0])).sum())
    return out


# (T, in, out, S, r_max, index pattern): ungrouped streaming (distinct adapters, -1, out of range),
# ungrouped tensor cores (> 8 tokens of one adapter; T = 64: all tokens, both ballots), grouped one
# slot (T = 72: a tail tile of 8), grouped random with -1 / out-of-range, ungrouped random past
# lane 31 (T = 40: an out-of-range index at 38), r_max > 16 (BN = 64), odd in (scalar loads),
# mixed paths.
MULTI = [(5, 600, 70, 4, 8, "distinct"), (12, 520, 40, 3, 16, "one"), (64, 96, 40, 2, 16, "one"),
         (72, 600, 64, 1, 16, "one"), (130, 96, 90, 5, 24, "random"), (40, 37, 33, 3, 7, "random"),
         (30, 64, 48, 4, 16, "mixed")]


def indices(T, S, pattern, g):
    if pattern == "distinct":
        idx = torch.tensor([0, -1, 3, 7, 1])[:T]
    elif pattern == "one":
        idx = torch.zeros(T, dtype=torch.long)
    elif pattern == "mixed":  # adapter 0: 20 tokens (tensor cores), the others <= 8 (streaming)
        idx = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(10) % 3 + 1])
        idx = idx[torch.randperm(T, generator=g)]
    else:
        idx = torch.randint(-1, S, (T,), generator=g)
        idx[3], idx[T - 2] = S + 2, -7  # out of range: counted, not applied
    return idx.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", MULTI, ids=lambda c: "-".join(map(str, c)))
def test_multi_lora(emu, dtype, case):
    T, i, o, S, r_max, pattern = case
    g = torch.Generator().manual_seed(T)
    args = multi_inputs(T, i, o, S, r_max, dtype, indices(T, S, pattern, g))
    check_multi(emu, *args, dtype)


def test_multi_lora_batch_invariance(emu):
    # T = 72, one slot: every token equals itself computed in a T = 64 batch
    y, x, A, B, idx, scales, ranks = multi_inputs(72, 300, 40, 1, 16, torch.bfloat16, torch.zeros(72, dtype=torch.int32))
    full = check_multi(emu, y, x, A, B, idx, scales, ranks, torch.bfloat16)
    part = y[8:].clone()
    emu.ops.multi_lora_(part, x[8:], A, B, idx[8:], scales, ranks)
    assert same_bits(part, full[8:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_lora_out_slices_int64(emu, dtype):
    T, i, S, r_max, slices = 40, 64, 3, 16, [24, 8, 40]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, S, (T,), generator=g)  # int64 indices
    y, x, A, B, _, scales, ranks = multi_inputs(T, i, sum(slices), S, r_max, dtype, idx, n=3)
    check_multi(emu, y, x, A, B, idx, scales, ranks, dtype, out_slices=slices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r_max", [16, 40])
@pytest.mark.parametrize("T", [100, 12])
def test_multi_lora_column_groups(emu, dtype, r_max, T):
    # blocks walk several column tiles (more with fewer SMs): u staged once per slice and kept
    # while it fits one pass (r <= 32 on tensor cores), across slices of uneven widths, zero
    # ranks, streaming and tensor-core tiles, grouped (T = 100) and not (T = 12: 9 tokens of
    # adapter 0 on tensor cores); the same bits as one column tile each
    i, S, slices = 64, 4, [70, 130, 64]
    g = torch.Generator().manual_seed(r_max)
    n0 = 40 if T > 16 else 9
    idx = torch.cat([torch.zeros(n0, dtype=torch.long), torch.randint(-1, S, (T - n0,), generator=g)])
    idx = idx[torch.randperm(T, generator=g)].to(torch.int32)
    y, x, A, B, _, scales, ranks = multi_inputs(T, i, sum(slices), S, r_max, dtype, idx, n=3)
    ranks[1, 2] = 0
    ranks[0, 1] = r_max
    outs = [check_multi(emu, y, x, A, B, idx, scales, ranks, dtype, out_slices=slices, sms=sms)
            for sms in (132, 8, 1)]
    assert same_bits(outs[0], outs[1]) and same_bits(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inp", [600, 601])
@pytest.mark.parametrize("r_max", [6, 40])
@pytest.mark.parametrize("pattern", ["stream", "tc"])
def test_multi_lora_fused_decode_same_bits(emu, dtype, inp, r_max, pattern):
    # up to 8 tokens and r_max * in <= 4096 (r_max = 6 here; 40 is over) multi_lora_ is one
    # launch whose expand computes u itself (K chunks folded in order; 16-byte or, in = 601,
    # scalar loads as the shrink kernel picks them), else shrink + expand as for 9-64 tokens; 9-64
    # tokens: shrink + expand (a tile of 9+ tokens on tensor cores); 66 tokens: sort, shrink,
    # reduce, expand. A token's bits are the same whichever runs, as long as its adapter's
    # path (count > 8) is.
    S, o = 12, 200
    g = torch.Generator().manual_seed(inp + r_max)
    if pattern == "tc":  # adapter 0: 10 tokens (tensor cores) in every prefix compared
        rest = (torch.arange(56) % 12 + 1).masked_fill(torch.arange(56) % 12 == 11, -1)  # <= 5 each
        idx, prefixes = [0] * 10 + rest.tolist(), (64, 16, 12, 10)
    else:  # every adapter <= 8 tokens: streaming
        idx = (torch.arange(66) % 13 - 1)[torch.randperm(66, generator=g)]  # 6 or 5 each
        idx, prefixes = idx.tolist(), (64, 33, 16, 9, 8, 3, 1)
    idx = torch.tensor(idx, dtype=torch.int32)
    y, x, A, B, _, scales, ranks = multi_inputs(66, inp, o, S, r_max, dtype, idx, seed=inp)
    full = check_multi(emu, y, x, A, B, idx, scales, ranks, dtype)
    for rows in prefixes:
        part = check_multi(emu, y[:rows].clone(), x[:rows], A, B, idx[:rows], scales, ranks, dtype)
        assert same_bits(part, full[:rows]), rows


def test_multi_lora_without_tensor_cores(emu):
    # an sm_75 device: every tile (up to 64 tokens) takes the streaming path, 8 tokens at a time
    y, x, A, B, idx, scales, ranks = multi_inputs(100, 64, 40, 2, 16, torch.float32,
                                                  (torch.arange(100) % 2).to(torch.int32))
    check_multi(emu, y, x, A, B, idx, scales, ranks, torch.float32, cc=75)


@pytest.mark.parametrize("T", [6, 50])
def test_shrink_and_expand_halves(emu, T):
    S, i, o, r_max = 3, 300, 50, 16
    g = torch.Generator().manual_seed(T)
    y, x, A, B, idx, scales, ranks = multi_inputs(T, i, o, S, r_max, torch.float32,
                                                  torch.randint(-1, S, (T,), generator=g).to(torch.int32))
    u_ref = CPU.lora_shrink(x, A, idx, ranks, 0.5)
    u = under_schedules(emu, lambda: emu.ops.lora_shrink(x, A, idx, ranks, 0.5))
    assert rel_err(u, u_ref) < 1e-5
    for add_inputs in (True, False):
        ref = y.clone()
        CPU.lora_expand_(ref, u_ref, B, idx, scales, ranks, None, None, add_inputs)

        def run():
            out = y.clone()
            emu.ops.lora_expand_(out, u_ref, B, idx, scales, ranks, None, None, add_inputs)
            return out
        assert rel_err(under_schedules(emu, run), ref) < 1e-5


@pytest.mark.parametrize("T", [7, 40])
def test_halves_count_bad_indices(emu, T):
    """lora_shrink.counted / lora_expand_ with bad_index_count (CUDA-graph serving): out-of-range
    tokens are counted, get zero u rows and are left untouched by the expand (zeroed with
    add_inputs=False); packed slices with per-slice ranks (0 included), y a column slice of a
    larger buffer (vLLM's offset_start)."""
    S, i, slices = 3, 96, [16, 8, 8]
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(-1, S, (T,), generator=g).to(torch.int32)
    idx[1], idx[T - 2] = S, -5
    valid = torch.where((idx >= 0) & (idx < S), idx, torch.full_like(idx, -1))
    y, x, A, B, _, scales, ranks = multi_inputs(T, i, sum(slices), S, 8, torch.float32, idx, n=3, seed=T)
    ranks[1, 0] = 0
    u_ref = CPU.lora_shrink(x, A, valid, ranks, 0.5)

    def shrink():
        bad = torch.zeros(1, dtype=torch.int32)
        return emu.ops.lora_shrink.counted(x, A, idx, ranks, bad, 0.5), bad
    u, bad = under_schedules(emu, shrink)
    assert int(bad) == 2 and rel_err(u, u_ref) < 1e-5 and not u[:, [1, T - 2]].any()
    for add_inputs in (True, False):
        wide = rand(T, 60, seed=T + 9)
        ref = wide[:, 20:52].clone()
        CPU.lora_expand_(ref, u_ref, B, valid, scales, ranks, slices, None, add_inputs)

        def expand():
            out, bad = wide.clone(), torch.zeros(1, dtype=torch.int32)
            emu.ops.lora_expand_(out[:, 20:52], u_ref, B, idx, scales, ranks, slices, bad, add_inputs)
            return out, bad
        out, bad = under_schedules(emu, expand)
        assert int(bad) == 2 and rel_err(out[:, 20:52], ref) < 1e-5
        assert torch.equal(out[:, :20], wide[:, :20]) and torch.equal(out[:, 52:], wide[:, 52:])
        assert torch.equal(out[[1, T - 2], 20:52], wide[[1, T - 2], 20:52] * add_inputs)


def _inf_case(dt, T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 32, generator=g).to(dt)
    x[1, 3] = float("inf")
    A = (torch.rand(1, 4, 32, generator=g) + 0.1).to(dt)
    B = (torch.rand(1, 16, 4, generator=g) + 0.1).to(dt)
    return x, A, B, torch.zeros(T, dtype=torch.int32), torch.ones(1), torch.tensor([4], dtype=torch.int32)


def check_multi_nonfinite(ops, device):
    """The tensor-core tiles (> 8 tokens of one adapter) split fp32 operands into hi + lo TF32
    parts: lo = v - tf32(v) was NaN for v = inf, and tf32 rounds |v| near FLT_MAX up to inf, so a
    row that is inf on the CPU (an fp16 activation overflow) or finite came out NaN."""
    for dt in (torch.float16, torch.bfloat16):
        for T in (4, 12):  # the streaming path, the tensor-core tiles
            x, A, B, idx, sc, rk = _inf_case(dt, T)
            ref = torch.zeros(T, 16, dtype=dt)
            CPU.multi_lora_(ref, x, A, B, idx, sc, rk)
            y = torch.zeros(T, 16, dtype=dt, device=device)
            ops.multi_lora_(y, *(t.to(device) for t in (x, A, B, idx, sc, rk)))
            y = y.cpu()
            assert torch.isinf(ref[1]).all()
            assert torch.isinf(y[1]).all(), f"{dt} T={T}: {y[1, :4].tolist()} (CPU: inf)"
            rest = [0] + list(range(2, T))
            assert rel_err(y[rest], ref[rest]) < 1e-2
    x = torch.ones(12, 8)
    x[0, 0] = 3.4028e38  # finite; tf32(x) would be inf
    A = torch.zeros(1, 1, 8)
    A[0, 0, 0] = 1.0
    idx, rk = torch.zeros(12, dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    u = ops.lora_shrink(x.to(device), A.to(device), idx.to(device), rk.to(device)).cpu()
    assert torch.isfinite(u).all() and abs(u[0, 0].item() / 3.4028e38 - 1) < 1e-6, u[:2].tolist()


def test_multi_lora_tensor_cores_keep_inf_and_huge_finite(emu):
    check_multi_nonfinite(emu.ops, "cpu")


def check_inf_factors(ops, device):
    """+-inf in B (any dtype) or in fp32 x on the tensor-core tiles: the hi part of the other
    operand already carries the infinity, so its lo part must not meet it (0 * inf = NaN, and a
    lo part of the other sign, from a hi part rounded up, gives inf - inf = NaN)."""
    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        T, i, o, r = 12, 64, 40, 8
        x = torch.randn(T, i, generator=g).to(dt)
        A = (torch.randn(1, r, i, generator=g) / 8).to(dt)
        B = torch.randn(1, o, r, generator=g).to(dt)
        B[0, 5, :] = float("inf")  # column 5: +-inf wherever u != 0
        B[0, 9, 2] = float("-inf")
        if dt == torch.float32:
            x[3, 7] = float("inf")  # row 3 of u: +-inf
        idx, sc, rk = torch.zeros(T, dtype=torch.int32), torch.ones(1), torch.tensor([r], dtype=torch.int32)
        ref = torch.zeros(T, o, dtype=dt)
        CPU.multi_lora_(ref, x, A, B, idx, sc, rk)
        y = torch.zeros(T, o, dtype=dt, device=device)
        ops.multi_lora_(y, *(t.to(device) for t in (x, A, B, idx, sc, rk)))
        y = y.cpu()
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), f"{dt}: NaN at {torch.isnan(y).nonzero()[:4].tolist()}"
        assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
        if dt != torch.float32:  # lora_ext's own tiles (16-bit jobs of > 8 tokens)
            ref = torch.zeros(T, o, dtype=dt)
            CPU.lora_apply_(ref, x, A[0], B[0], 1.0)
            y = torch.zeros(T, o, dtype=dt, device=device)
            ops.lora_apply_(y, x.to(device), A[0].to(device), B[0].to(device), 1.0)
            y = y.cpu()
            assert torch.equal(torch.isnan(y), torch.isnan(ref)), f"lora_apply_ {dt}: NaN"
            assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])


def test_tensor_cores_inf_factors(emu):
    check_inf_factors(emu.ops, "cpu")


@pytest.mark.cuda
def test_tensor_cores_inf_factors_cuda():
    check_inf_factors(CPU, "cuda")


@pytest.mark.cuda
def test_multi_lora_tensor_cores_keep_inf_and_huge_finite_cuda():
    check_multi_nonfinite(CPU, "cuda")
