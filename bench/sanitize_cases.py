"""Every CUDA kernel of lora_ext over the small awkward shapes, each result checked against the
CPU kernels: the program bench/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck,
synccheck, initcheck), so that one process covers every launch path instead of pytest's startup
per tool.

Cases: T in {1, 8, 9, 17, 40, 65, 72} (decode/streaming and tensor-core paths, partial tiles),
r in {1, 17, 64}, odd in/out (67 x 131) and aligned ones (1024 x 256, split K), x, y and the
factors at misaligned addresses (a storage offset of one element), lora_linear forward and
backward with dropout (same seed on both devices: the same mask; CUDA in both orders of its
halves, 16-bit ones on tensor-core and CUDA-core tiles), multi_lora_ with -1 and out-of-range indices (counted, never touched), mixed ranks
(0 included), out_slices, the two halves lora_shrink / lora_expand_ (add_inputs both ways),
merge_ / exact merge + unmerge through a MergeState / merge_points_, dora_norm in both layouts and
over several chunks (CPU and CUDA give the same bits), and blocks that walk several tiles (merge_'s
strip kernel, multi_lora_'s column groups: GPU-sized grids).

python bench/sanitize_cases.py [--quick]   (quick: T in {1, 9, 40, 72}, r in {1, 17}; for racecheck)
Exit status 1 if any CUDA result differs from the CPU one (printed); run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that memcheck sees every tensor's own allocation.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_ext.ops import (MergeState, dora_norm, lora_apply_, lora_expand_, lora_shrink, merge_,  # noqa: E402
                          multi_lora_, unmerge_)

# the device checked against the CPU: cuda; LORA_EXT_SANITIZE_DEVICE=cpu dry-runs this script's
# plumbing on a machine without a GPU (CPU against itself, valid indices only)
DEV = os.environ.get("LORA_EXT_SANITIZE_DEVICE", "cuda")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
failures: list[str] = []
count = 0


def odd(shape, dtype, gen, scale=1.0):
    """A CPU tensor of `shape` whose storage starts one element into its buffer (misaligned)."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + 1, generator=gen) * scale
    return buf.to(dtype)[1:].view(shape)


def cuda_copy(t: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """t on the GPU, at an address one element past an allocation's start when `misaligned`."""
    if not misaligned:
        return t.to(DEV, copy=True)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def check(name: str, got: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> None:
    global count
    count += 1
    got, ref = got.cpu(), ref.cpu()
    if exact:
        ok = got.shape == ref.shape and torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))
        err = "bits differ"
    else:
        den = ref.double().abs().max().item() or 1.0
        diff = (got.double() - ref.double()).abs().max().item() / den
        ok = diff <= TOL.get(ref.dtype, 1e-4)
        err = f"max |diff| / max |ref| = {diff:.3g}"
    if not ok:
        failures.append(f"{name}: {err}")
        if len(failures) <= 20:
            print("MISMATCH", failures[-1], flush=True)


def single_adapter(Ts, ranks, shapes, dtypes, gen):
    for dt in dtypes:
        for (i, o) in shapes:
            for r in ranks:
                for T in Ts:
                    mis = (i, o) == shapes[0]
                    x, A, B = odd((T, i), dt, gen), odd((r, i), dt, gen, i**-0.5), odd((o, r), dt, gen)
                    y = odd((T, o), dt, gen)
                    tag = f"T={T} in={i} out={o} r={r} {dt}"
                    yc = cuda_copy(y, mis)
                    lora_apply_(yc, cuda_copy(x, mis), cuda_copy(A, mis), cuda_copy(B, mis), 0.7)
                    check(f"lora_apply_ {tag}", yc, lora_apply_(y.clone(), x, A, B, 0.7))
                    lora_linear_case(tag, x, A, B, dt, gen)


def lora_linear_case(tag, x, A, B, dt, gen):
    T, i = x.shape
    o, r = B.shape
    W, b, g = odd((o, i), dt, gen, i**-0.5), odd((o,), dt, gen), odd((T, o), dt, gen)
    seed = torch.tensor([1234567 + T], dtype=torch.int64)
    fwd, bwd = torch.ops.lora_ext.lora_linear_fwd.default, torch.ops.lora_ext.lora_linear_bwd.default

    def run(dev, p, env):  # (y, u, dx, dA, dB) with the environment variables set
        with mock.patch.dict(os.environ, env):
            a = [t.to(dev) for t in (x, W, b, A, B, seed, g)]
            y, u = fwd(a[0], a[1], a[2], a[3], a[4], 0.5, p, a[5], False)
            grads = bwd(a[6], a[0], a[1], a[3], a[4], u, 0.5, p, a[5], False, [True, False, True, True])
        return (y, u) + tuple(grads[k] for k in (0, 2, 3))

    # CUDA in both orders of its halves (LORA_EXT_CUDA_EXPAND_FIRST) with dropout 0.25; 16-bit
    # jobs of > 8 tokens also on the CUDA-core tiles (LORA_EXT_CUDA_TENSOR_CORES=0); bf16
    # without dropout also with both halves on cuBLAS (LORA_EXT_CUDA_BLAS=1): against the CPU
    first = {"LORA_EXT_CUDA_EXPAND_FIRST": "1"}
    variants = [(0.25, "gemm first", {}), (0.25, "expand first", first)]
    if dt != torch.float32 and T > 8:
        variants.append((0.25, "CUDA cores", {"LORA_EXT_CUDA_TENSOR_CORES": "0"}))
    if dt == torch.bfloat16 and T > 8:
        blas = {"LORA_EXT_CUDA_BLAS": "1"}
        variants += [(0.0, "cuBLAS halves", blas), (0.0, "cuBLAS halves, expand first", {**blas, **first})]
    cpu = {}
    for p, order, env in variants:
        if p not in cpu:
            cpu[p] = run("cpu", p, {})
        for name, c, g_ in zip(("y", "u", "dx", "dA", "dB"), run(DEV, p, env), cpu[p]):
            check(f"lora_linear {name} (dropout {p:g}, {order}) {tag}", c, g_)


def multi_adapter(Ts, ranks, dtypes, gen):
    i, slices = 67, [61, 70]
    o = sum(slices)
    for dt in dtypes:
        for r in ranks:
            S = 3
            rk = torch.tensor([r, 0, max(1, r // 2)], dtype=torch.int32)
            sc = torch.tensor([0.5, 2.0, -1.25])
            for T in Ts:
                tag = f"T={T} in={i} out={o} r_max={r} {dt}"
                x, y = odd((T, i), dt, gen), odd((T, o), dt, gen)
                idx = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
                idx[::5] = S + 4       # out of range: no adapter on CUDA, counted
                idx[3::7] = -3
                bad = int(((idx < -1) | (idx >= S)).sum())
                idx_cpu = torch.where((idx < -1) | (idx >= S), -1, idx)
                for sl in (None, slices):
                    A = odd((S, r, i) if sl is None else (2, S, r, i), dt, gen, i**-0.5)
                    B = odd((S, o, r), dt, gen)
                    idx_d, sc_d, rk_d = (idx if DEV == "cuda" else idx_cpu).to(DEV), sc.to(DEV), rk.to(DEV)
                    cnt = torch.zeros(1, dtype=torch.int32, device=DEV) if DEV == "cuda" else None
                    yc = cuda_copy(y, True)
                    multi_lora_(yc, cuda_copy(x, True), cuda_copy(A, True), cuda_copy(B, True), idx_d,
                                sc_d, rk_d, sl, bad_index_count=cnt)
                    what = f"multi_lora_ {'slices' if sl else ''} {tag}"
                    check(what, yc, multi_lora_(y.clone(), x, A, B, idx_cpu, sc, rk, sl))
                    if cnt is not None and int(cnt) != bad:
                        failures.append(f"{what}: bad_index_count {int(cnt)} != {bad}")
                    u = lora_shrink(x.to(DEV), A.to(DEV), idx_d, rk_d, 0.5)
                    u_ref = lora_shrink(x, A, idx_cpu, rk, 0.5)
                    check(f"lora_shrink {tag}", u, u_ref)
                    for add in (True, False):
                        yc = cuda_copy(y, False)
                        lora_expand_(yc, u_ref.to(DEV), B.to(DEV), idx_d, sc_d, rk_d, sl, add_inputs=add)
                        check(f"lora_expand_ add_inputs={add} {tag}", yc,
                              lora_expand_(y.clone(), u_ref, B, idx_cpu, sc, rk, sl, add_inputs=add))


def merges(ranks, dtypes, gen):
    for dt in dtypes + [torch.float16]:
        for (o, i) in [(37, 131), (300, 257)]:
            for r in ranks:
                W0, A, B = odd((o, i), dt, gen), odd((r, i), dt, gen), odd((o, r), dt, gen, 0.1)
                W0.view(-1)[::11] = 0
                tag = f"{o}x{i} r={r} {dt}"
                Wc = cuda_copy(W0, True)
                merge_(Wc, A.to(DEV), B.to(DEV), 0.3)
                check(f"merge_ {tag}", Wc, merge_(W0.clone(), A, B, 0.3), exact=True)
                # exact: merge two adapters, take one out again (remerge_), then the other
                A2, B2 = odd((r + 2, i), dt, gen), odd((o, r + 2), dt, gen, 0.1)
                res = []
                for dev in ("cpu", DEV):
                    W, st = W0.to(dev), MergeState()
                    merge_(W, [A.to(dev), A2.to(dev)], [B.to(dev), B2.to(dev)], [0.3, -0.2], state=st, name=["a", "b"])
                    unmerge_(W, state=st, name="a")
                    res.append(W.clone())
                    unmerge_(W, state=st)
                    check(f"exact merge + unmerge {tag}", W, W0, exact=True)
                check(f"remerge_ {tag}", res[1], res[0], exact=True)
                idx = torch.tensor([0, 5, o * i - 1])
                vals = odd((3,), dt, gen)
                pts = torch.ops.lora_ext.merge_points_.default
                Wc, Wr = W0.to(DEV), W0.clone()
                pts(Wc, idx.to(DEV), vals.to(DEV), [A.to(DEV)], [B.to(DEV)], [0.3], False)
                pts(Wr, idx, vals, [A], [B], [0.3], False)
                check(f"merge_points_ {tag}", Wc, Wr, exact=True)


def doras(ranks, dtypes, gen):
    """dora_norm: both modes (fan_in_fan_out; a column-major weight), one and several 512-wide
    chunks (the partials' workspace and the finishing launch), r = 0, misaligned weights, fp32
    factors on 16-bit weights: the CPU's bits."""
    for dt in dtypes + [torch.float16]:
        for (o, i) in [(37, 131), (300, 257), (33, 1100)]:
            for r in [0] + ranks:
                for fifo in (False, True):
                    W = odd((i, o) if fifo else (o, i), dt, gen, 0.05)
                    W.view(-1)[::97] = 0
                    A, B = odd((r, i), torch.float32 if r == 1 else dt, gen), odd((o, r), dt, gen, 0.02)
                    tag = f"{o}x{i} r={r} fifo={fifo} {dt}"
                    Ad, Bd = A.to(DEV), B.to(DEV)
                    for name, Wd, Wc in (("misaligned", cuda_copy(W, True), W),
                                         ("column-major", W.t().contiguous().t().to(DEV), W.t().contiguous().t())):
                        check(f"dora_norm {name} {tag}", dora_norm(Wd, Ad, Bd, 0.7, fan_in_fan_out=fifo),
                              dora_norm(Wc, A, B, 0.7, fan_in_fan_out=fifo), exact=True)


def walks(gen):
    """Blocks that walk several tiles, which only grids of GPU size produce: merge_'s strip kernel
    over 2+ row tiles per block (4096 x 1024, r = 16) and multi_lora_'s expand over 2+ column
    tiles per block (T = 2048, out = 4096)."""
    dt = torch.bfloat16
    W0, A, B = odd((4096, 1024), dt, gen), odd((16, 1024), dt, gen), odd((4096, 16), dt, gen, 0.1)
    Wc = cuda_copy(W0, False)
    merge_(Wc, A.to(DEV), B.to(DEV), 0.3)
    check("merge_ strip walk 4096x1024 r=16", Wc, merge_(W0.clone(), A, B, 0.3), exact=True)
    T, i, o, S, r = 2048, 256, 4096, 4, 16
    x, y = odd((T, i), dt, gen), odd((T, o), dt, gen)
    A, B = odd((S, r, i), dt, gen, i**-0.5), odd((S, o, r), dt, gen)
    idx = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
    sc, rk = torch.tensor([0.5, 2.0, -1.25, 1.0]), torch.tensor([r, 3, r, 0], dtype=torch.int32)
    yc = cuda_copy(y, False)
    multi_lora_(yc, x.to(DEV), A.to(DEV), B.to(DEV), idx.to(DEV), sc.to(DEV), rk.to(DEV))
    check(f"multi_lora_ column walk T={T} out={o}", yc, multi_lora_(y.clone(), x, A, B, idx, sc, rk))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {1, 9, 40, 72}, r in {1, 17}, bf16 only")
    a = p.parse_args(argv)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU (LORA_EXT_SANITIZE_DEVICE=cpu: a dry run on the CPU)")
        return 2
    gen = torch.Generator().manual_seed(0)
    Ts = [1, 9, 40, 72] if a.quick else [1, 8, 9, 17, 40, 65, 72]
    ranks = [1, 17] if a.quick else [1, 17, 64]
    dtypes = [torch.bfloat16] if a.quick else [torch.float32, torch.bfloat16]
    single_adapter(Ts, ranks, [(67, 131), (1024, 256)], dtypes, gen)
    multi_adapter(Ts, ranks, dtypes, gen)
    merges(ranks, dtypes, gen)
    doras(ranks, dtypes, gen)
    walks(gen)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_cases: {count} {DEV} results checked against the CPU kernels, {len(failures)} differ")
    for f in failures[20:40]:
        print("MISMATCH", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
