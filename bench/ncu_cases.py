"""One call of each kernel behind a failed bandwidth/overhead goal, at benchmark size, for
``ncu`` (bench/gpu_check.sh's ncu stage): multi_lora_ decode (T = 16, 16 adapters, 4096, r = 16;
T = 4, r = 16: shrink + expand; T = 4, r = 1: one fused launch) and prefill (T = 8192, 8
adapters), merge_ (4096^2, r = 16: the strip kernel), lora_linear forward + backward (T = 8192,
4096^2, r = 16; tensor-core tiles; and with LORA_EXT_CUDA_BLAS=1, the cuBLAS halves) and the
PEFT-style composition of torch ops beside it, lora_apply_ at T = 16 (2 launches, 2x cuBLAS's
pair on the 2026-11-30 H200 run), all bf16, each after one warm-up call outside the profiled
range (--profile-from-start off)."""
import os

import torch

import lora_ext  # noqa: F401
from lora_ext.ops import lora_apply_, lora_linear, merge_, multi_lora_


def cases(dev="cuda", h=4096, big=8192):
    """(name, call) pairs; h (hidden size) and big (prefill / training tokens) shrink them for the
    CPU check of this script (tests/test_user_bench.py)."""
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, device=dev, dtype=bf, generator=g) * s

    T, S, r = 16, 16, 16
    x, y = rnd(T, h), torch.zeros(T, h, device=dev, dtype=bf)
    A, B = rnd(S, r, h, s=0.01), rnd(S, h, r, s=0.01)
    idx = torch.arange(T, device=dev, dtype=torch.int32) % S
    sc, rk = torch.ones(S, device=dev), torch.full((S,), r, device=dev, dtype=torch.int32)
    W = rnd(h, h)
    xl = rnd(big, h).requires_grad_()
    Al, Bl = rnd(r, h, s=0.01).requires_grad_(), rnd(h, r, s=0.01).requires_grad_()
    gy = rnd(big, h)
    yp = torch.zeros(big, h, device=dev, dtype=bf)
    idxp = torch.arange(big, device=dev, dtype=torch.int32) * 8 // big  # 8 runs of big / 8 tokens
    yield "multi_lora_ decode", lambda: multi_lora_(y, x, A, B, idx, sc, rk)
    yield "multi_lora_ decode T=4", lambda: multi_lora_(y[:4], x[:4], A, B, idx[:4], sc, rk)
    A1, B1, rk1 = A[:, :1].contiguous(), B[..., :1].contiguous(), torch.ones_like(rk)  # r * in = 4096
    yield "multi_lora_ decode T=4 r=1 (one launch)", lambda: multi_lora_(y[:4], x[:4], A1, B1, idx[:4], sc, rk1)
    yield "multi_lora_ prefill", lambda: multi_lora_(yp, xl.detach(), A, B, idxp, sc, rk)
    yield "merge_", lambda: merge_(W, A[0], B[0], 1e-3)
    yield "lora_apply_ T=16", lambda: lora_apply_(y, x, A[0], B[0], 1.0)

    def linear():  # fresh gradients: an accumulating x.grad would add a full-size add kernel
        for t in (xl, Al, Bl):
            t.grad = None
        lora_linear(xl, W, None, Al, Bl, 2.0).backward(gy)
    yield "lora_linear fwd+bwd", linear

    def linear_blas():  # the opt-in cuBLAS halves (read at every call)
        os.environ["LORA_EXT_CUDA_BLAS"] = "1"
        try:
            linear()
        finally:
            del os.environ["LORA_EXT_CUDA_BLAS"]
    yield "lora_linear fwd+bwd, cuBLAS halves", linear_blas

    def peft_style():  # what bench_lora_linear's "PEFT-style" row times
        for t in (xl, Al, Bl):
            t.grad = None
        (torch.nn.functional.linear(xl, W) + 2.0 * (xl @ Al.T) @ Bl.T).backward(gy)
    yield "PEFT-style fwd+bwd", peft_style


if __name__ == "__main__":
    calls = list(cases())
    for _, fn in calls:  # warm-up, outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
