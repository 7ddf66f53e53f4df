"""merge_ / unmerge_ / merge_points_ on CUDA: the same bits as the CPU kernels (NaN payloads and
special values included), a MergeState followed across devices, tails and misaligned rows, device
mixes, CUDA-graph capture. (Skipped without a GPU; the CPU side is tests/test_merge.py.)"""
import pytest
import torch
from conftest import DTYPES
from test_merge import adapter, assert_rounded_once, reference, same_bits, special_weight

from lora_ext.ops import MergeState, merge_, unmerge_


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_give_identical_bits(dtype):
    W0, A, B = adapter((257, 300), 24, dtype, "cpu", ratio=0.3, seed=9)
    _, A2, B2 = adapter((257, 300), 5, dtype, "cpu", ratio=2.0, seed=10)
    cpu = W0.clone()
    merge_(cpu, [A, A2], [B, B2], [1.5, -0.25])
    gpu = W0.cuda()
    merge_(gpu, [A.cuda(), A2.cuda()], [B.cuda(), B2.cuda()], [1.5, -0.25])
    assert same_bits(cpu, gpu)
    # a merge state follows its weight: merge on the CPU, unmerge on the GPU, and back
    state, W = MergeState(), W0.clone()
    merge_(W, A, B, 1.5, state=state, name="a")
    W = W.cuda()
    merge_(W, A2.cuda(), B2.cuda(), -0.25, state=state, name="b")
    unmerge_(W, state=state, name="a")
    W = W.cpu()
    unmerge_(W, state=state, name="b")
    assert same_bits(W, W0)


@pytest.mark.cuda
def test_cuda_device_mix():
    W, A, B = adapter((12, 10), 3, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="device"):
        merge_(W, A.cpu(), B, 1.0)
    with pytest.raises(ValueError, match="is on"):
        merge_(W, A.cpu(), B, 1.0, state=MergeState())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_ranks_and_tails(dtype):
    # rank chunks of 16 with a tail, row/column tails of the 32x256 / 64x128 tiles, unaligned rows
    for P, Q, r in [(65, 257, 33), (1, 4099, 16), (129, 3, 1), (200, 130, 100)]:
        W, A, B = adapter((P, Q), r, dtype, "cuda", ratio=0.3, seed=P + Q)
        ref, err = reference(W, [(A, B, 0.9)])
        cpu = W.cpu()
        merge_(cpu, A.cpu(), B.cpu(), 0.9)
        merge_(W, A, B, 0.9)
        assert_rounded_once(W, ref, err)
        assert same_bits(W, cpu)
        base = torch.zeros(P, Q + 1, dtype=dtype, device="cuda")[:, 1:]  # misaligned rows
        base.copy_(W)
        merge_(base, A, B, -0.9)
        merge_(cpu, A.cpu(), B.cpu(), -0.9)
        assert same_bits(base, cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_bits_cpu_and_cuda_agree(dtype):
    W0 = special_weight(dtype, 70, "cpu")
    A = torch.randn(3, 37).to(dtype)
    B = (torch.randn(70, 3) * 1e3).to(dtype)
    A[0, 7], B[9, 2] = float("nan"), float("inf")
    cpu, gpu = W0.clone(), W0.cuda()
    merge_(cpu, A, B, 0.7)
    merge_(gpu, A.cuda(), B.cuda(), 0.7)
    assert same_bits(cpu, gpu)
    A[0, 7], B[9, 2] = 1.0, 2.0
    state, W = MergeState(), W0.clone()  # merge on one device, unmerge on the other
    merge_(W, A, B, 0.7, state=state)
    W = W.cuda()
    unmerge_(W, state=state)
    assert same_bits(W, W0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_graph_capture_replay(dtype):
    # merge_ and unmerge_ (no host sync, shapes only) captured once, replayed on new factors
    W0, A, B = adapter((67, 300), 5, dtype, "cuda")
    W = W0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        merge_(W.clone(), A, B, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        merge_(W, A, B, 0.5)
    for k in range(2):
        A2, B2 = adapter((67, 300), 5, dtype, "cuda", seed=k + 1)[1:]
        A.copy_(A2)
        B.copy_(B2)
        W.copy_(W0)
        g.replay()
        cpu = W0.cpu()
        merge_(cpu, A2.cpu(), B2.cpu(), 0.5)
        assert same_bits(W, cpu), k


@pytest.mark.cuda
def test_cuda_merge_points_graph_capture_and_wide_rows():
    # merge_points_ checks indices on the host only outside capture (a sync); captured, it
    # replays with new indices and values
    W, A, B = adapter((30, 40), 4, torch.bfloat16, "cuda")
    idx = torch.tensor([0, 7, 1199], device="cuda")
    vals = torch.zeros(3, dtype=torch.bfloat16, device="cuda")
    pts = torch.ops.lora_ext.merge_points_
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pts(W.clone(), idx, vals, [A], [B], [1.0], False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pts(W, idx, vals, [A], [B], [1.0], False)
    idx.copy_(torch.tensor([3, 4, 5]))
    vals.copy_(torch.tensor([1.0, 2.0, 3.0]))
    g.replay()
    cpu = W.cpu()
    pts(cpu, idx.cpu(), vals.cpu(), [A.cpu()], [B.cpu()], [1.0], False)
    assert same_bits(W, cpu)
    with pytest.raises(RuntimeError, match="idx must lie"):  # eager: still checked
        pts(W, torch.tensor([1200], device="cuda"), vals[:1], [A], [B], [1.0], False)
    # rows longer than 65535 column tiles (a grid.y limit before)
    W, A, B = adapter((2, 65535 * 128 + 300), 2, torch.float32, "cuda")
    cpu = W.cpu()
    merge_(W, A, B, 0.5)
    merge_(cpu, A.cpu(), B.cpu(), 0.5)
    assert same_bits(W, cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_cuda_reads_factors_in_place(fifo, n):
    # A and B straight from where they lie (launch.h's Factors): mixed dtypes, a misaligned A,
    # a column-major B, a column-major weight, more adapters than pieces (n = 9: fp32 operands),
    # an A that is rows of the weight itself; large enough for the strip kernel's row walks
    out, inp, dtype = 4096, 520, torch.bfloat16
    dts = (torch.float32, torch.bfloat16, torch.float16)
    g = torch.Generator().manual_seed(n)
    As = [(torch.randn(r, inp + 1, generator=g).to(dts[k % 3]))[:, 1:]
          for k, r in enumerate([(1, 5, 16, 18)[k % 4] for k in range(n)])]
    Bs = [(torch.randn(A.shape[0], out, generator=g) * 0.01).to(A.dtype).t() for A in As]
    scales = [0.5 - 0.25 * k for k in range(n)]
    W0 = (torch.randn(*((inp, out) if fifo else (out, inp)), generator=g) * 0.05).to(dtype)
    for Wl in (W0, W0.t().contiguous().t()):
        cpu = Wl.clone()
        merge_(cpu, As, Bs, scales, fan_in_fan_out=fifo)
        gpu = Wl.cuda()
        merge_(gpu, [A.cuda() for A in As], [B.cuda() for B in Bs], scales, fan_in_fan_out=fifo)
        assert same_bits(cpu, gpu.cpu())
    cpu, gpu = W0.clone(), W0.cuda()
    r0 = As[0].shape[0]
    own = (lambda W: W[:, :r0].t()) if fifo else (lambda W: W[:r0])
    ref = W0.clone()
    merge_(ref, [own(W0).clone()] + As[1:], Bs, scales, fan_in_fan_out=fifo)
    merge_(gpu, [own(gpu)] + [A.cuda() for A in As[1:]], [B.cuda() for B in Bs], scales,
           fan_in_fan_out=fifo)
    assert same_bits(ref, gpu.cpu())
