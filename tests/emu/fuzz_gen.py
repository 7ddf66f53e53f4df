"""Random inputs, layouts and comparisons for the differential fuzzing of the emulated CUDA kernels
(tests/emu/test_fuzz.py). Everything derives from one integer seed per case, so any failing case
reruns alone (pytest -k 'op-seed')."""
from __future__ import annotations

import os
import random

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Cases per op family: a few committed (the emulated suite stays well under a minute),
# LORA_EXT_EMU_FUZZ_CASES=N for N per family locally; LORA_EXT_EMU_FUZZ_FIRST shifts the seeds.
CASES = int(os.environ.get("LORA_EXT_EMU_FUZZ_CASES", "3"))
FIRST = int(os.environ.get("LORA_EXT_EMU_FUZZ_FIRST", "0"))
SEEDS = list(range(FIRST, FIRST + CASES))


def rng_for(op: str, seed: int) -> tuple[random.Random, torch.Generator]:
    salt = sum(ord(c) * 131 ** i for i, c in enumerate(op)) % 1_000_003
    return random.Random(seed * 1_000_003 + salt), torch.Generator().manual_seed(seed * 7919 + salt)


def size(r: random.Random, lo: int, hi: int, small_bias: float = 0.3) -> int:
    """A size in [lo, hi]: often small (tails), odd and even alike, sometimes a multiple of 8
    (the 16-byte vector paths)."""
    if r.random() < 0.25 and hi >= 8 * max(1, (lo + 7) // 8):
        return 8 * r.randint(max(1, (lo + 7) // 8), hi // 8)
    if r.random() < small_bias:
        return r.randint(lo, min(hi, lo + 9))
    return r.randint(lo, hi)


def special_values(dtype, activation=False) -> list[float]:
    """+-0, subnormals, huge finite values, +-inf, NaN. For activations (summed in fp32 with other
    products), huge is 1e36: near FLT_MAX, whether a partial sum overflows (inf - inf = NaN, or a
    finite result) depends on the summation order, which neither the CPU nor the CUDA kernels fix."""
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 3e-6}[dtype]
    huge = {torch.float32: 1e36 if activation else 3e38, torch.bfloat16: 1e36 if activation else 3e38,
            torch.float16: 6e4}[dtype]
    return [0.0, -0.0, tiny, -tiny, huge, -huge, float("inf"), float("-inf"), float("nan")]


def values(g: torch.Generator, shape, dtype, scale=1.0, r: random.Random | None = None,
           specials=(), count=0) -> torch.Tensor:
    """randn * scale in dtype; `count` elements replaced by values drawn from `specials`."""
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    flat = t.view(-1)
    if count and flat.numel() and specials:
        for _ in range(count):
            flat[r.randrange(flat.numel())] = r.choice(list(specials))
    return t


def place(r: random.Random, t: torch.Tensor, modes=("contig", "wide", "offset", "transposed")):
    """t [R, C] (contiguous) laid out as: contiguous; a column slice of a wider buffer (row stride
    > C); misaligned by one element (storage offset 1, row stride C + 1 or C); the transpose of a
    contiguous [C, R] (non-unit column stride). Returns (view, buffer, (row0, col0)) where the
    view's elements sit at buffer[row0:, col0:]; buffer is the whole allocation, for checking that
    nothing outside the view changes."""
    mode = r.choice(modes)
    R, C = t.shape
    if mode == "wide":
        left, right = r.randint(0, 9), r.randint(1, 9)
        buf = torch.randn(R, left + C + right, dtype=torch.float64).to(t.dtype)
        buf[:, left:left + C] = t
        return buf[:, left:left + C], buf, mode
    if mode == "offset":
        extra = r.randint(0, 1)
        buf = torch.randn(R * (C + extra) + 1, dtype=torch.float64).to(t.dtype)
        v = buf[1:1 + R * (C + extra)].view(R, C + extra)[:, :C]
        v.copy_(t)
        return v, buf, mode
    if mode == "transposed":
        buf = t.t().contiguous()
        return buf.t(), buf, mode
    buf = t.clone()
    return buf, buf, mode


def nonfinite_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return (torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a == float("inf"), b == float("inf"))
            and torch.equal(a == float("-inf"), b == float("-inf")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error over the elements finite in both (the non-finite ones are compared by
    nonfinite_equal)."""
    a, b = a.double(), b.double()
    m = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[m], b[m]
    if a.numel() == 0:
        return 0.0
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def assert_close(out, ref, tol, what, ref64=None):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert nonfinite_equal(out, ref), (
        f"{what}: non-finite pattern differs from the CPU kernel's: "
        f"emu nan/inf at {nonfinite_where(out)}, CPU at {nonfinite_where(ref)}")
    e = rel_err(out, ref)
    assert e < tol, f"{what}: rel err {e:.3g} vs the CPU kernel (tol {tol:g})"
    if ref64 is not None:
        e64 = rel_err(out, ref64)
        assert e64 < 2 * tol, f"{what}: rel err {e64:.3g} vs the fp64 reference (tol {2 * tol:g})"


def nonfinite_where(t: torch.Tensor, k: int = 6):
    idx = (~torch.isfinite(t.double())).nonzero().tolist()
    return idx[:k] + (["..."] if len(idx) > k else [])


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    ba, bb = bits(a.contiguous()), bits(b.contiguous())
    if not torch.equal(ba, bb):
        diff = (ba != bb).nonzero().tolist()
        i = tuple(diff[0])
        raise AssertionError(f"{what}: {len(diff)} elements differ from the reference bits, first at "
                             f"{i}: emu {a[i].item()!r} vs reference {b[i].item()!r}")


def device(r: random.Random) -> dict:
    """Emulated device: SM count (changes split-K plans), compute capability (tensor cores or
    not) and two schedules (reversed; a random permutation) that must agree bit for bit."""
    return dict(sms=r.choice((1, 8, 132)), cc=r.choice((90, 90, 75)),
                schedules=(1, 2 + r.randrange(10 ** 6)))


def _u64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def dropout_factors(seed: int, p: float, T: int, width: int) -> torch.Tensor:
    """fp64 [T, width] dropout factors as csrc/lowrank_job.h documents them, written anew: element
    i = t * width + k is kept (times 1 / (1 - p), in fp32) when the splitmix64 finaliser of
    (seed, i), high 32 bits, is >= p * 2^32 (fp32)."""
    import numpy as np
    i = torch.arange(T * width, dtype=torch.int64)
    z = _u64(seed % (1 << 64)) + (i + 1) * _u64(0x9E3779B97F4A7C15)  # int64 arithmetic wraps
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    hi = _shr(z ^ _shr(z, 31), 32)
    t = float(np.float32(p) * np.float32(4294967296.0))
    threshold = 4294967040 if not t < 4294967040.0 else int(t)
    keep = float(np.float32(1.0) / (np.float32(1.0) - np.float32(p)))
    return torch.where(hi >= threshold, keep, 0.0).double().view(T, width)
