"""multi_lora_ / lora_shrink / lora_expand_: kernels vs a per-token fp64 reference, index
patterns, mixed ranks, slices, bad input, torch.compile, CUDA graphs and bad-index counting."""
import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err

from lora_ext.ops import lora_expand_, lora_shrink, multi_lora_


def reference(y, x, A, B, idx, scales, ranks, out_slices=None):
    """fp64, one token at a time: y[t, slice i] += s * B[a, rows_i, :r] @ (A_i[a, :r] @ x[t])."""
    n = 1 if out_slices is None else len(out_slices)
    S = B.shape[0]
    A4 = (A if out_slices is not None else A[None]).double().cpu()
    Bd = B.double().cpu()
    sc = scales.reshape(-1, S).expand(n, S).double().cpu()
    rk = ranks.reshape(-1, S).expand(n, S).cpu()
    off = [0]
    for w in (out_slices or [B.shape[1]]):
        off.append(off[-1] + w)
    x2 = x.reshape(-1, x.shape[-1]).double().cpu()
    out = y.reshape(x2.shape[0], y.shape[-1]).double().cpu().clone()
    for t, a in enumerate(idx.reshape(-1).tolist()):
        if a < 0:
            continue
        for i in range(n):
            r = int(rk[i, a])
            u = A4[i, a, :r] @ x2[t]
            out[t, off[i]:off[i + 1]] += sc[i, a] * (Bd[a, off[i]:off[i + 1], :r] @ u)
    return out.reshape(y.shape)


def make_indices(pattern, T, S, g):
    if pattern == "random":  # unsorted, with -1
        return torch.randint(-1, S, (T,), generator=g)
    if pattern == "equal":
        return torch.full((T,), S - 1, dtype=torch.long)
    if pattern == "distinct":
        return torch.randperm(S, generator=g)[:T] if T <= S else torch.arange(T) % S
    if pattern == "sorted":
        return torch.randint(0, S, (T,), generator=g).sort().values
    if pattern == "none":
        return torch.full((T,), -1, dtype=torch.long)
    raise ValueError(pattern)


def make(T, i, o, S, r_max, dtype, device, pattern="random", mixed=True, n=None, seed=0,
         idx_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed * 1000003 + T * 7919 + i * 31 + o * 7 + S + r_max)
    x = torch.randn(T, i, generator=g)
    a_shape = (S, r_max, i) if n is None else (n, S, r_max, i)
    A = torch.randn(*a_shape, generator=g) / max(i, 1) ** 0.5
    B = torch.randn(S, o, r_max, generator=g) / r_max ** 0.5
    y = torch.randn(T, o, generator=g)
    sshape = (S,) if n is None else (n, S)
    ranks = (torch.randint(1, r_max + 1, sshape, generator=g) if mixed
             else torch.full(sshape, r_max)).to(torch.int32)
    scales = torch.rand(sshape, generator=g) * 2 - 0.5
    idx = make_indices(pattern, T, S, g).to(idx_dtype)
    y, x, A, B = (t.to(device=device, dtype=dtype) for t in (y, x, A, B))
    return y, x, A, B, idx.to(device), scales.to(device), ranks.to(device)


# (T, in, out, S, r_max, pattern)
CASES = [
    (0, 32, 16, 3, 4, "random"), (1, 64, 48, 4, 8, "random"), (1, 16, 16, 1, 1, "equal"),
    (5, 37, 29, 3, 7, "random"), (16, 128, 96, 16, 16, "distinct"), (17, 96, 80, 4, 16, "sorted"),
    (64, 256, 192, 64, 16, "distinct"), (64, 256, 192, 4, 16, "random"), (64, 200, 136, 4, 16, "equal"),
    (130, 129, 67, 5, 33, "random"), (300, 96, 100, 3, 64, "random"), (300, 72, 40, 2, 8, "sorted"),
    (40, 64, 64, 6, 24, "none"), (3, 40, 24, 2, 512, "random"), (20, 48, 33, 3, 512, "equal"),
    (9, 5, 3, 2, 1, "random"), (33, 1, 7, 2, 3, "random"), (150, 257, 40, 2, 20, "random"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(device, dtype, case):
    T, i, o, S, r_max, pattern = case
    y, x, A, B, idx, sc, rk = make(T, i, o, S, r_max, dtype, device, pattern)
    ref = reference(y, x, A, B, idx, sc, rk)
    out = multi_lora_(y, x, A, B, idx, sc, rk)
    assert out is y
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [4, 150])
def test_uniform_rank_int64_indices(device, dtype, T):
    y, x, A, B, idx, sc, rk = make(T, 160, 120, 5, 32, dtype, device, mixed=False,
                                   idx_dtype=torch.int64)
    ref = reference(y, x, A, B, idx, sc, rk)
    multi_lora_(y, x, A, B, idx, sc, rk)
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,pattern", [(3, "random"), (70, "random"), (200, "equal")])
def test_out_slices(device, dtype, T, pattern):
    sl = [64, 24, 24]
    y, x, A, B, idx, sc, rk = make(T, 96, sum(sl), 4, 16, dtype, device, pattern, n=3)
    ref = reference(y, x, A, B, idx, sc, rk, sl)
    multi_lora_(y, x, A, B, idx, sc, rk, sl)
    assert rel_err(y, ref) < RTOL[dtype]
    # [S] scales / ranks shared by the slices
    y, x, A, B, idx, sc, rk = make(T, 40, 30, 3, 8, dtype, device, pattern, n=2)
    sc, rk = sc[0].contiguous(), rk[0].contiguous()
    ref = reference(y, x, A, B, idx, sc, rk, [10, 20])
    multi_lora_(y, x, A, B, idx, sc, rk, [10, 20])
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 12, 90])
def test_shrink_expand_halves(device, dtype, T):
    y, x, A, B, idx, sc, rk = make(T, 136, 72, 4, 24, dtype, device)
    u = lora_shrink(x, A, idx, rk)
    assert u.shape == (T, 24) and u.dtype == torch.float32
    u_ref = torch.zeros(T, 24, dtype=torch.float64)
    for t, a in enumerate(idx.tolist()):
        if a >= 0:
            r = int(rk[a])
            u_ref[t, :r] = A[a, :r].double().cpu() @ x[t].double().cpu()
    assert rel_err(u, u_ref) < RTOL[dtype]
    ref = reference(y, x, A, B, idx, sc, rk)
    lora_expand_(y, u, B, idx, sc, rk)
    assert rel_err(y, ref) < RTOL[dtype]
    # sliced halves
    y, x, A, B, idx, sc, rk = make(T, 48, 40, 3, 8, dtype, device, n=2)
    u = lora_shrink(x, A, idx, rk)
    assert u.shape == (2, T, 8)
    ref = reference(y, x, A, B, idx, sc, rk, [16, 24])
    lora_expand_(y, u, B, idx, sc, rk, [16, 24])
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_leading_dims_and_noncontiguous(device):
    y, x, A, B, idx, sc, rk = make(12, 40, 24, 3, 4, torch.float32, device)
    x3, y3 = x.reshape(3, 4, 40), y.reshape(3, 4, 24).clone()
    ref = reference(y3, x3, A, B, idx, sc, rk)
    multi_lora_(y3, x3, A, B, idx.reshape(3, 4), sc, rk)
    assert rel_err(y3, ref) < 1e-5
    xt = torch.randn(40, 12, device=device).T          # non-unit last stride
    wide = torch.randn(12, 50, device=device)
    ysl = wide[:, 10:34]                                  # column slice of a wider tensor
    before = wide.clone()
    ref = reference(ysl, xt, A, B, idx, sc, rk)
    multi_lora_(ysl, xt, A, B, idx, sc, rk)
    assert rel_err(wide[:, 10:34], ref) < 1e-5
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 34:], before[:, 34:])
    yt = torch.randn(24, 12, device=device).T            # needs a copy back
    ref = reference(yt, xt, A, B, idx, sc, rk)
    multi_lora_(yt, xt, A, B, idx, sc, rk)
    assert rel_err(yt, ref) < 1e-5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_into_column_slice(device, add_inputs):
    """vLLM's offset_start: lora_expand_ into columns off:off+out of a larger output buffer (2-D
    and 3-D), packed slices with per-slice ranks (0 = slice not adapted); the rest is untouched."""
    y, x, A, B, idx, sc, rk = make(12, 48, 40, 3, 8, torch.float32, device, n=2)
    rk[1, 2] = 0
    u = lora_shrink(x, A, idx, rk)
    for lead in [(12,), (3, 4)]:
        wide = torch.randn(*lead, 70, device=device)
        before = wide.clone()
        base = before[..., 20:60].reshape(12, 40) * add_inputs
        ref = reference(base, x, A, B, idx, sc, rk, [16, 24])
        lora_expand_(wide[..., 20:60], u, B, idx.reshape(lead), sc, rk, [16, 24], add_inputs=add_inputs)
        assert rel_err(wide[..., 20:60].reshape(12, 40), ref) < 1e-5
        assert torch.equal(wide[..., :20], before[..., :20]) and torch.equal(wide[..., 60:], before[..., 60:])


@pytest.mark.parametrize("device", devices())
def test_untouched_tokens_and_empty_slots(device):
    y, x, A, B, idx, sc, rk = make(40, 32, 24, 4, 8, torch.bfloat16, device, "random")
    rk[1] = 0  # empty slot: its tokens keep the base output
    A[1].fill_(float("nan"))
    y0 = y.clone()
    multi_lora_(y, x, A, B, idx, sc, rk)
    keep = (idx < 0) | (idx == 1)
    assert torch.equal(y[keep], y0[keep])
    # garbage past a slot's rank is never read
    y, x, A, B, idx, sc, rk = make(30, 32, 24, 3, 8, torch.float32, device, "random")
    rk[:] = 3
    ref = reference(y, x, A, B, idx, sc, rk)
    A[:, 3:].fill_(float("nan"))
    B[:, :, 3:].fill_(float("inf"))
    multi_lora_(y, x, A, B, idx, sc, rk)
    assert rel_err(y, ref) < 1e-5


BAD = [
    ("x dtype", lambda a: {**a, "x": a["x"].double()}, "dtype"),
    ("idx dtype", lambda a: {**a, "indices": a["indices"].float()}, "indices must be int32"),
    ("idx count", lambda a: {**a, "indices": a["indices"][:-1]}, "one entry per token"),
    ("A dims", lambda a: {**a, "A_pool": a["A_pool"][0]}, "A_pool must be 3-D"),
    ("A in", lambda a: {**a, "A_pool": a["A_pool"][..., :-1]}, "A_pool must be"),
    ("B shape", lambda a: {**a, "B_pool": a["B_pool"][:, :, :-1]}, "B_pool must be"),
    ("scales dtype", lambda a: {**a, "scales": a["scales"].double()}, "scales must be"),
    ("scales shape", lambda a: {**a, "scales": a["scales"][:-1]}, "scales must be"),
    ("ranks dtype", lambda a: {**a, "ranks": a["ranks"].long()}, "ranks must be"),
    ("slices sum", lambda a: {**a, "out_slices": [3, 4]}, "A_pool must be 4-D|must sum"),
    ("y leading", lambda a: {**a, "y": a["y"][:-1]}, "leading dims|must hold"),
    ("counter", lambda a: {**a, "bad_index_count": torch.zeros(1, device=a["x"].device)},
     "bad_index_count"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(device, name, mutate, msg):
    y, x, A, B, idx, sc, rk = make(6, 16, 12, 3, 4, torch.float32, device)
    args = mutate(dict(y=y, x=x, A_pool=A, B_pool=B, indices=idx, scales=sc, ranks=rk))
    with pytest.raises((RuntimeError, ValueError), match=msg):
        multi_lora_(**args)


@pytest.mark.parametrize("bad", [3, 100, -2])
def test_out_of_range_index_raises_on_cpu(bad):
    y, x, A, B, idx, sc, rk = make(6, 16, 12, 3, 4, torch.float32, "cpu")
    idx[2] = bad
    with pytest.raises(RuntimeError, match=r"indices\[2\] = .* out of range"):
        multi_lora_(y, x, A, B, idx, sc, rk)
    with pytest.raises(RuntimeError, match="out of range"):
        lora_shrink(x, A, idx, rk)


def test_bad_rank_raises_on_cpu():
    y, x, A, B, idx, sc, rk = make(6, 16, 12, 3, 4, torch.float32, "cpu")
    rk[0] = 5
    with pytest.raises(RuntimeError, match="ranks"):
        multi_lora_(y, x, A, B, idx, sc, rk)


def test_y_aliases_x():
    x = torch.randn(4, 8)
    A, B = torch.randn(2, 2, 8), torch.randn(2, 8, 2)
    idx, sc, rk = torch.zeros(4, dtype=torch.int32), torch.ones(2), torch.full((2,), 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="shares memory with x"):
        multi_lora_(x, x, A, B, idx, sc, rk)
    buf = torch.randn(4, 16)
    y = buf[:, :8]
    ref = reference(y, buf[:, 8:], A, B, idx, sc, rk)
    multi_lora_(y, buf[:, 8:], A, B, idx, sc, rk)  # disjoint column blocks of one buffer
    assert rel_err(y, ref) < 1e-6
    with pytest.raises(RuntimeError, match="shares memory with x"):
        multi_lora_(buf[:, 1:9], buf[:, 8:], A, B, idx, sc, rk)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [5, 40, 300])
def test_cuda_out_of_range_counted(T):
    y, x, A, B, idx, sc, rk = make(T, 64, 48, 4, 8, torch.float16, "cuda", "random")
    idx[1], idx[T - 1] = 4, 1 << 20
    y0 = y.clone()
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    ok = idx.clone()
    ok[1] = ok[T - 1] = -1
    ref = reference(y, x, A, B, ok, sc, rk)
    multi_lora_(y, x, A, B, idx, sc, rk, bad_index_count=count)
    assert int(count) == 2
    assert torch.equal(y[1], y0[1]) and torch.equal(y[T - 1], y0[T - 1])
    assert rel_err(y, ref) < RTOL[torch.float16]
    u = lora_shrink(x, A, idx, rk, bad_index_count=count)
    assert int(count) == 4 and u[1].abs().sum() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(7, 0), (0, 16)])
def test_cuda_out_of_range_counted_without_launch(shape):
    # out == 0 (or T == 0) launches no kernel: the indices are still counted, as the CPU raises
    T, out = shape
    x, A = torch.randn(T, 8, device="cuda"), torch.randn(3, 4, 8, device="cuda")
    B, u = torch.randn(3, out, 4, device="cuda"), torch.randn(T, 4, device="cuda")
    idx = torch.tensor([0, 3, -1, -2, 1 << 20, 2, -1][:T], dtype=torch.long, device="cuda")
    sc, rk = torch.ones(3, device="cuda"), torch.full((3,), 4, dtype=torch.int32, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    multi_lora_(torch.zeros(T, out, device="cuda"), x, A, B, idx, sc, rk, bad_index_count=count)
    lora_expand_(torch.zeros(T, out, device="cuda"), u, B, idx, sc, rk, bad_index_count=count)
    assert int(count) == (6 if T else 0)
    if T:
        with pytest.raises(RuntimeError, match=r"indices\[1\] = 3 is out of range"):
            multi_lora_(torch.zeros(T, out), x.cpu(), A.cpu(), B.cpu(), idx.cpu(), sc.cpu(), rk.cpu())


@pytest.mark.cuda
def test_cuda_many_slots_and_device_mix():
    # S > 4096 takes the global-memory counting path of the device-side sort
    y, x, A, B, idx, sc, rk = make(500, 16, 8, 5000, 2, torch.float32, "cuda", "random")
    ref = reference(y, x, A, B, idx, sc, rk)
    multi_lora_(y, x, A, B, idx, sc, rk)
    assert rel_err(y, ref) < 1e-5
    with pytest.raises(RuntimeError, match="is on"):
        multi_lora_(y, x, A, B, idx.cpu(), sc, rk)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def f(y, x, A, B, idx, sc, rk):
        y = y * 2
        multi_lora_(y, x, A, B, idx, sc, rk)
        u = lora_shrink(x, A, idx, rk)
        lora_expand_(y, u, B, idx, sc, rk)
        return y + 1

    y, x, A, B, idx, sc, rk = make(24, 32, 24, 3, 4, torch.float32, device)
    ref = reference(reference(y * 2, x, A, B, idx, sc, rk), x, A, B, idx, sc, rk) + 1
    assert rel_err(f(y, x, A, B, idx, sc, rk), ref) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("T", [4, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_replay(T, dtype):
    y, x, A, B, idx, sc, rk = make(T, 256, 192, 6, 16, dtype, "cuda", "random")
    xs, ys, idxs, count = x.clone(), y.clone(), idx.clone(), torch.zeros(1, dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        multi_lora_(ys.clone(), xs, A, B, idxs, sc, rk, bad_index_count=count)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        multi_lora_(ys, xs, A, B, idxs, sc, rk, bad_index_count=count)
    gen = torch.Generator().manual_seed(T)
    for step in range(3):
        new_idx = torch.randint(-1, 6, (T,), generator=gen).to(torch.int32)
        if step == 2:
            new_idx[0] = 6  # out of range: no adapter, counted
        x_new, y_new = torch.randn_like(x), torch.randn_like(y)
        xs.copy_(x_new)
        ys.copy_(y_new)
        idxs.copy_(new_idx)
        sc.mul_(1.5)  # scales (and ranks) are read at replay time too
        count.zero_()
        g.replay()
        torch.cuda.synchronize()
        ok = new_idx.clone()
        ok[ok >= 6] = -1
        assert rel_err(ys, reference(y_new, x_new, A, B, ok, sc, rk)) < RTOL[dtype]
        assert int(count) == (1 if step == 2 else 0)


@pytest.mark.cuda
def test_cuda_streaming_only_path_matches(tmp_path):
    # GPUs below sm_80 have no TF32 wmma: the launcher must keep every tile on the streaming
    # path (tiles of up to 64 tokens in groups of 8). LORA_EXT_MULTI_TENSOR_CORES=0 forces that
    # path here, in a fresh process (the switch is read once).
    import subprocess
    import sys
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from test_multi_lora import make, reference, rel_err, RTOL\n"
        "from lora_ext.ops import multi_lora_\n"
        "for T, pat in [(300, 'equal'), (130, 'random'), (16, 'equal')]:\n"
        "    for dt in (torch.float32, torch.bfloat16):\n"
        "        y, x, A, B, idx, sc, rk = make(T, 256, 130, 4, 24, dt, 'cuda', pat)\n"
        "        ref = reference(y, x, A, B, idx, sc, rk)\n"
        "        multi_lora_(y, x, A, B, idx, sc, rk)\n"
        "        assert rel_err(y, ref) < RTOL[dt], (T, pat, dt)\n"
        "print('ok')\n" % str(__import__("pathlib").Path(__file__).parent))
    env = dict(__import__("os").environ, LORA_EXT_MULTI_TENSOR_CORES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.cuda
def test_cuda_grid_limits():
    # more than 65535 output tiles of 64 columns (a y-grid limit before), decode and prefill
    o = 65536 * 64 + 70
    for T in (3, 40):
        y, x, A, B, idx, sc, rk = make(T, 32, 1, 2, 2, torch.bfloat16, "cuda", "random", mixed=False)
        B = torch.randn(2, o, 2, device="cuda", dtype=torch.bfloat16)
        y = torch.zeros(T, o, device="cuda", dtype=torch.bfloat16)
        multi_lora_(y, x, A, B, idx, sc, rk)
        ref = reference(y[:, -300:].clone().zero_(), x, A, B[:, -300:], idx, sc, rk)
        assert rel_err(y[:, -300:], ref) < RTOL[torch.bfloat16]
