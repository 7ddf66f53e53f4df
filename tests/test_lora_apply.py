"""lora_apply_: kernels vs an fp64 plain-torch reference, bad input, torch.compile, CUDA graphs."""
import random

import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err

from lora_ext.ops import lora_apply_


def reference(y, x, A, B, s):
    return y.double() + s * (x.double() @ A.double().T) @ B.double().T


def make(T, i, o, r, dtype, device, lead=()):
    g = torch.Generator().manual_seed(T * 7919 + i * 31 + o * 7 + r)
    x = torch.randn(*lead, T, i, generator=g)
    A = torch.randn(r, i, generator=g) / max(i, 1) ** 0.5
    B = torch.randn(o, r, generator=g) / r**0.5
    y = torch.randn(*lead, T, o, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (y, x, A, B)]


SHAPES = [(1, 64, 64, 1), (0, 32, 16, 4), (3, 4097, 33, 1), (7, 5, 4097, 3), (8, 128, 96, 16),
          (9, 256, 64, 16), (64, 1024, 1024, 16), (130, 257, 131, 31), (33, 96, 80, 64),
          (65, 70, 50, 65), (17, 33, 3, 128), (2, 16, 16, 512), (100, 512, 256, 512)]


def _random_shapes(n, seed=0):
    rnd = random.Random(seed)
    return [(rnd.choice([1, 2, 5, 8, 9, 31, 64, 200]), rnd.randint(1, 700), rnd.randint(1, 700),
             rnd.choice([1, 2, 3, 8, 16, 17, 64])) for _ in range(n)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + _random_shapes(12))
def test_matches_reference(device, dtype, shape):
    T, i, o, r = shape
    y, x, A, B = make(T, i, o, r, dtype, device)
    ref = reference(y, x, A, B, 0.75)
    out = lora_apply_(y, x, A, B, 0.75)
    assert out is y
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_leading_dims_and_noncontiguous(device):
    y, x, A, B = make(6, 40, 24, 4, torch.float32, device, lead=(3,))
    ref = reference(y, x, A, B, 2.0)
    lora_apply_(y, x, A, B, 2.0)
    assert y.shape == (3, 6, 24) and rel_err(y, ref) < 1e-5
    # x transposed (non-unit last stride), y a column slice of a wider tensor
    xt = torch.randn(40, 9, device=device).T
    wide = torch.randn(9, 50, device=device)
    ysl = wide[:, 10:34]
    ref = reference(ysl, xt, A, B, -1.5)
    before = wide.clone()
    lora_apply_(ysl, xt, A, B, -1.5)
    assert rel_err(wide[:, 10:34], ref) < 1e-5
    torch.testing.assert_close(wide[:, :10], before[:, :10], rtol=0, atol=0)
    torch.testing.assert_close(wide[:, 34:], before[:, 34:], rtol=0, atol=0)
    # y non-contiguous in a way that needs a copy (transposed)
    yt = torch.randn(24, 9, device=device).T
    ref = reference(yt, xt, A, B, 0.5)
    lora_apply_(yt, xt, A, B, 0.5)
    assert rel_err(yt, ref) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_zero_scale_and_empty(device):
    y, x, A, B = make(5, 8, 8, 2, torch.float32, device)
    y0 = y.clone()
    lora_apply_(y, x, A, B, 0.0)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    y, x, A, B = make(0, 8, 8, 2, torch.bfloat16, device)
    lora_apply_(y, x, A, B, 1.0)
    assert y.shape == (0, 8)


BAD = [
    ("dtype", lambda y, x, A, B: (y, x, A.double(), B), "dtype"),
    ("int dtype", lambda y, x, A, B: (y.int(), x.int(), A.int(), B.int()), "dtype"),
    ("B shape", lambda y, x, A, B: (y, x, A, B[:, :-1]), "B must be"),
    ("A shape", lambda y, x, A, B: (y, x, A[:, :-1], B), "A must be"),
    ("y shape", lambda y, x, A, B: (y[:, :-1], x, A, B), r"y\.size\(-1\)"),
    ("leading", lambda y, x, A, B: (y[:-1], x, A, B), "leading dims"),
    ("r=0", lambda y, x, A, B: (y, x, A[:0], B[:, :0]), "rank r"),
    ("A 3-D", lambda y, x, A, B: (y, x, A[None], B), "A must be 2-D"),
    ("B 1-D", lambda y, x, A, B: (y, x, A, B[:, 0]), "B must be 2-D"),
    ("y dims", lambda y, x, A, B: (y[None], x, A, B), "same number of dims"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(device, name, mutate, msg):
    args = mutate(*make(4, 8, 6, 2, torch.float32, device))
    with pytest.raises((RuntimeError, ValueError), match=msg):
        lora_apply_(*args, 1.0)


def test_y_aliases_x():
    x = torch.randn(4, 8)
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="shares memory with x"):
        lora_apply_(x, x, A, B, 1.0)
    with pytest.raises(RuntimeError, match="internal overlap"):
        lora_apply_(torch.zeros(1, 8).expand(4, 8), torch.randn(4, 8), A, B, 1.0)


@pytest.mark.parametrize("device", devices())
def test_disjoint_column_blocks_of_one_buffer(device):
    # y = buf[:, :8], x = buf[:, 8:] (a fused-buffer layout): at::get_overlap_status says TooHard
    # for such views, which was refused as "shares memory"; column blocks that do not meet pass
    buf = torch.randn(5, 20, device=device)
    A, B = torch.randn(3, 12, device=device), torch.randn(8, 3, device=device)
    y, x = buf[:, :8], buf[:, 8:]
    ref = y.cpu() + (x.cpu() @ A.cpu().T) @ B.cpu().T * 0.5
    lora_apply_(y, x, A, B, 0.5)
    assert rel_err(y.cpu(), ref) < 1e-5
    y2, x2 = buf[:, 2:10], buf[:, 8:20]  # columns 8 and 9 in both
    with pytest.raises(RuntimeError, match="shares memory with x"):
        lora_apply_(y2, x2, A, B, 0.5)
    with pytest.raises(RuntimeError, match="shares memory with x"):  # rows of another pitch
        lora_apply_(buf.view(10, 10)[:, :8][:5], buf[:, 8:], A, B, 0.5)


@pytest.mark.cuda
def test_device_mix():
    y, x, A, B = make(4, 8, 6, 2, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="device"):
        lora_apply_(y, x, A.cpu(), B, 1.0)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def f(y, x, A, B):
        y = y * 2
        lora_apply_(y, x, A, B, 0.5)
        return y + 1

    y, x, A, B = make(10, 32, 24, 4, torch.float32, device)
    ref = reference(y * 2, x, A, B, 0.5) + 1
    assert rel_err(f(y, x, A, B), ref) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 300])
def test_cuda_graph_capture_replay(T):
    y, x, A, B = make(T, 512, 384, 16, torch.bfloat16, "cuda")
    y_static, x_static = y.clone(), x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lora_apply_(y_static.clone(), x_static, A, B, 1.0)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lora_apply_(y_static, x_static, A, B, 1.0)
    for _ in range(2):
        x_new = torch.randn_like(x)
        y_new = torch.randn_like(y)
        x_static.copy_(x_new)
        y_static.copy_(y_new)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y_static, reference(y_new, x_new, A, B, 1.0)) < RTOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("T", [2, 40])
def test_cuda_grid_limits(T):
    # out > 65535 * 64 columns and, for decode, r > 65535 * 8 rank rows: beyond the old y-grids
    o = 65536 * 64 + 70
    y, x, A, B = make(T, 24, o, 3, torch.bfloat16, "cuda")
    ref = reference(y[:, -200:], x, A, B[-200:], 0.5)
    lora_apply_(y, x, A, B, 0.5)
    assert rel_err(y[:, -200:], ref) < RTOL[torch.bfloat16]
    if T == 2:
        y, x, A, B = make(T, 16, 8, 65536 * 8 + 9, torch.bfloat16, "cuda")
        ref = reference(y, x, A, B, 1e-3)
        lora_apply_(y, x, A, B, 1e-3)
        assert rel_err(y, ref) < RTOL[torch.bfloat16]
