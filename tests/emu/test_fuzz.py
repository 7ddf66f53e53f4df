"""Randomized differential fuzzing of the emulated CUDA kernels against the CPU kernels
(torch.ops.lora_ext.* on CPU) and plain-torch fp64 references: random shapes (T 1..300, odd and
even in/out, r 1..130), dtypes, layouts (column slices of wider buffers, misaligned by one element,
transposed), special values, SM counts (split-K plans), compute capabilities (tensor-core tiles or
not), under two schedules that must give identical bits. A few committed cases per op family;
LORA_EXT_EMU_FUZZ_CASES=N runs N per family (LORA_EXT_EMU_FUZZ_FIRST=k starts at seed k)."""
import pytest
import torch
from conftest import RTOL, under_schedules
from fuzz_gen import (DTYPES, SEEDS, assert_close, assert_same_bits, device, dropout_factors,
                      place, rng_for, size, special_values, values)

CPU = torch.ops.lora_ext


def ref_lowrank(x, A, B, scale, keep=None):
    """fp64 scale * (keep * x) A^T B^T."""
    x64 = x.double() if keep is None else x.double() * keep
    return scale * (x64 @ A.double().t()) @ B.double().t()


def specials_for(r, dtype, n):
    """Special values of the CPU kernels' contract for activations: NaN propagates to its row,
    +-inf gives +-inf or NaN as IEEE says, -0/subnormals/huge finite values are plain values."""
    if r.random() < 0.7:
        return (), 0
    return special_values(dtype, activation=True), r.randint(1, max(1, min(4, n)))


# ------------------------------------------------------------------ lora_apply_
@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_lora_apply(emu, seed):
    r, g = rng_for("lora_apply_", seed)
    dt = r.choice(DTYPES)
    T = size(r, 1, 8) if r.random() < 0.5 else size(r, 9, 300)
    i, o, k = size(r, 1, 700), size(r, 1, 300), size(r, 1, 130)
    spec, cnt = specials_for(r, dt, T * i)
    x = values(g, (T, i), dt, r=r, specials=spec, count=cnt)
    A = values(g, (k, i), dt, scale=i ** -0.5)
    B = values(g, (o, k), dt, scale=k ** -0.5)
    y0 = values(g, (T, o), dt)
    s = r.choice((0.7, -1.3, 2.0, 1.0))
    x_v, _, xmode = place(r, x, ("contig", "wide", "offset"))
    ref = y0.clone()
    CPU.lora_apply_(ref, x, A, B, s)
    y_v, y_buf, ymode = place(r, y0)
    outside = y_buf.clone()
    dev = device(r)

    def run():
        yb = outside.clone()
        yv = yb.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset())
        emu.ops.lora_apply_(yv, x_v, A, B, s)
        return yb
    yb = under_schedules(emu, run, schedules=dev.pop("schedules"), **dev)
    y = yb.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset())
    what = f"lora_apply_ {dt} T={T} in={i} out={o} r={k} x:{xmode} y:{ymode} {dev}"
    ref64 = None if cnt else y0.double() + ref_lowrank(x, A, B, s)
    assert_close(y, ref, RTOL[dt], what, ref64)
    mask = torch.ones_like(yb, dtype=torch.bool)
    mask.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset()).fill_(False)
    assert torch.equal(yb[mask], outside[mask]), f"{what}: wrote outside y"


# ------------------------------------------------------------------ lora_linear fwd / bwd
@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_lora_linear(emu, seed, monkeypatch):
    r, g = rng_for("lora_linear", seed)
    dt = r.choice(DTYPES)
    order = r.choice(("gemm_first", "expand_first"))
    monkeypatch.setenv("LORA_EXT_CUDA_EXPAND_FIRST", "1" if order == "expand_first" else "0")
    T = size(r, 1, 8) if r.random() < 0.5 else size(r, 9, 200)
    i, o, k = size(r, 1, 300), size(r, 1, 200), size(r, 1, 130)
    p = r.choice((0.0, 0.0, 0.1, 0.5))
    fan = r.random() < 0.3
    lead = (T,) if r.random() < 0.6 else ((1, T) if T % 2 else (2, T // 2))
    x = values(g, lead + (i,), dt)
    W = values(g, (i, o) if fan else (o, i), dt, scale=i ** -0.5)
    bias = values(g, (o,), dt) if r.random() < 0.6 else None
    A = values(g, (k, i), dt, scale=i ** -0.5)
    B = values(g, (o, k), dt, scale=k ** -0.5)
    sd = torch.tensor([r.randrange(2 ** 62)], dtype=torch.int64)
    s = r.choice((0.5, 2.0, -1.0))
    dev = device(r)
    scheds = dev.pop("schedules")
    what = (f"lora_linear {dt} {order} T={lead} in={i} out={o} r={k} p={p} fan={fan} "
            f"bias={bias is not None} {dev}")
    y_ref, u_ref = CPU.lora_linear_fwd(x, W, bias, A, B, s, p, sd, fan)
    y, u = under_schedules(emu, lambda: emu.ops.lora_linear_fwd(x, W, bias, A, B, s, p, sd, fan),
                           schedules=scheds, **dev)
    # fp64 references with the documented dropout mask (the hash written anew in fuzz_gen.py)
    keep = dropout_factors(int(sd), p, T, i) if p > 0 else torch.ones(T, i, dtype=torch.float64)
    x2, g64 = x.reshape(T, i).double(), None
    Wt = W.double() if fan else W.double().t()
    y64 = x2 @ Wt + (0 if bias is None else bias.double()) + ref_lowrank(x2, A, B, s, keep)
    assert_close(y, y_ref, RTOL[dt], what + " y", y64.view(y_ref.shape))
    assert_close(u, u_ref, 2e-4, what + " u", (x2 * keep) @ A.double().t())
    grad = values(g, lead + (o,), dt)
    mask = [r.random() < 0.7 for _ in range(4)]
    ref = CPU.lora_linear_bwd(grad, x, W, A, B, u_ref, s, p, sd, fan, mask)
    out = under_schedules(emu, lambda: tuple(
        t if t is not None else torch.zeros(0) for t in
        emu.ops.lora_linear_bwd(grad, x, W, A, B, u_ref, s, p, sd, fan, mask)),
        schedules=scheds, **dev)
    g64 = grad.reshape(T, o).double()
    gB = g64 @ B.double()
    ref64 = (g64 @ Wt.t() + s * keep * (gB @ A.double()), g64.t() @ x2 if not fan else x2.t() @ g64,
             s * gB.t() @ (keep * x2), s * g64.t() @ u_ref.double())
    for name, m, a, b, c in zip(("dx", "dW", "dA", "dB"), mask, out, ref, ref64):
        if m:
            assert_close(a, b, RTOL[dt], f"{what} {name}", c.view(b.shape))
        else:
            assert b is None and a.numel() == 0, f"{what}: {name} computed though not asked"


# ------------------------------------------------------------------ merge family (bit for bit)
def adapters(r, g, dt, P, Q, n, fan):
    As, Bs, ss = [], [], []
    for _ in range(n):
        k = size(r, 1, 130)
        spec = special_values(dt) if r.random() < 0.1 else ()
        As.append(values(g, (k, P if fan else Q), dt, r=r, specials=spec, count=2 if spec else 0))
        Bs.append(values(g, (Q if fan else P, k), dt, scale=0.02 / k ** 0.5))
        ss.append(r.choice((0.5, -1.5, 2.0, 1.0)))
    return As, Bs, ss


def weight(r, g, dt, P, Q):
    spec = special_values(dt) if r.random() < 0.4 else ()
    return values(g, (P, Q), dt, scale=0.05, r=r, specials=spec, count=r.randint(1, 6) if spec else 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_merge(emu, seed):
    r, g = rng_for("merge_", seed)
    dt = r.choice(DTYPES)
    P, Q, fan = size(r, 1, 300), size(r, 1, 300), r.random() < 0.3
    W0 = weight(r, g, dt, P, Q)
    As, Bs, ss = adapters(r, g, dt, P, Q, r.randint(1, 3), fan)
    ref = W0.clone()
    CPU.merge_(ref, As, Bs, ss, fan)
    w_v, w_buf, mode = place(r, W0)
    outside = w_buf.clone()
    dev = device(r)

    def run():
        wb = outside.clone()
        emu.ops.merge_(wb.as_strided(w_v.shape, w_v.stride(), w_v.storage_offset()), As, Bs, ss, fan)
        return wb
    wb = under_schedules(emu, run, schedules=dev.pop("schedules"), **dev)
    w = wb.as_strided(w_v.shape, w_v.stride(), w_v.storage_offset())
    what = f"merge_ {dt} P={P} Q={Q} ranks={[a.shape[0] for a in As]} fan={fan} W:{mode}"
    assert_same_bits(w, ref, what)
    mask = torch.ones_like(wb, dtype=torch.bool)
    mask.as_strided(w_v.shape, w_v.stride(), w_v.storage_offset()).fill_(False)
    assert torch.equal(wb[mask], outside[mask]), f"{what}: wrote outside the weight"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_remerge_and_points(emu, seed):
    r, g = rng_for("remerge_", seed)
    dt = r.choice(DTYPES)
    P, Q, fan, nbits = size(r, 1, 200), size(r, 1, 200), r.random() < 0.3, r.choice((0, 1, 2, 4))
    W0 = weight(r, g, dt, P, Q)
    sets = [adapters(r, g, dt, P, Q, r.randint(0, 2), fan) for _ in range(3)] + [([], [], [])]
    words = (P * Q * nbits + 31) // 32, (P * Q + 31) // 32
    n_pts = r.randint(1, 20)
    idx = torch.tensor([r.randrange(P * Q) for _ in range(n_pts)], dtype=torch.int64)
    pts_set = adapters(r, g, dt, P, Q, r.randint(0, 2), fan)

    def steps(ops):
        W = W0.clone()
        codes = torch.zeros(max(words[0], 1), dtype=torch.int32)
        fails = torch.zeros(words[1], dtype=torch.int32)
        out, old = [], ([], [], [])
        for new in sets:
            ops.remerge_(W, codes, fails, nbits, *old, *new, fan)
            out += [W.clone(), codes.clone(), fails.clone()]
            old = new
        ops.merge_points_(W, idx, W0.view(-1)[idx], *pts_set, fan)
        return tuple(out + [W])
    dev = device(r)
    got = under_schedules(emu, lambda: steps(emu.ops), schedules=dev.pop("schedules"), **dev)
    what = f"remerge_ {dt} P={P} Q={Q} bits={nbits} fan={fan} sets={[len(s[0]) for s in sets]}"
    for n, (a, b) in enumerate(zip(got, steps(CPU))):
        assert_same_bits(a, b, f"{what} output {n}")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_merge_code_failures(emu, seed):
    r, g = rng_for("merge_code_failures", seed)
    dt = r.choice(DTYPES)
    n = size(r, 1, 5000)
    w0 = weight(r, g, dt, 1, n).view(-1)
    w0[torch.rand(n, generator=g) < 0.2] = 0
    s = values(g, (n,), torch.float32, scale=r.choice((0.05, 1.0, 1e-6)), r=r,
               specials=special_values(torch.float32) if r.random() < 0.3 else (), count=3)
    dev = device(r)
    got = under_schedules(emu, lambda: emu.ops.merge_code_failures(w0, s),
                          schedules=dev.pop("schedules"), **dev)
    ref = CPU.merge_code_failures(w0, s)
    assert torch.equal(got, ref), f"merge_code_failures {dt} n={n}: {got.tolist()} vs CPU {ref.tolist()}"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_dora_norm(emu, seed):
    r, g = rng_for("dora_norm", seed)
    dt, ab = r.choice(DTYPES), r.choice(DTYPES)
    P, Q, fan = size(r, 1, 300), size(r, 1, 1300), r.random() < 0.4
    W = weight(r, g, dt, P, Q)  # [out, in], or [in, out] with fan_in_fan_out
    n_in, n_out = (P, Q) if fan else (Q, P)
    k = 0 if r.random() < 0.15 else size(r, 1, 130)
    A = values(g, (k, n_in), ab)
    B = values(g, (n_out, k), ab, scale=0.02 / max(k, 1) ** 0.5)
    s = r.choice((0.5, -1.5, 2.0, 1.0))
    w_v, _, mode = place(r, W)
    dev = device(r)
    got = under_schedules(emu, lambda: emu.ops.dora_norm(w_v, A, B, s, fan),
                          schedules=dev.pop("schedules"), **dev)
    what = f"dora_norm {dt} (A/B {ab}) P={P} Q={Q} r={k} fan={fan} W:{mode}"
    assert_same_bits(got, CPU.dora_norm(w_v, A, B, s, fan), what)
    if got.numel() and W.double().abs().max() < 1e15:  # fp32 squares overflow from ~1.8e19
        # against fp64, within fp32 accumulation
        Wd = W.double().t() if fan else W.double()
        ref = (Wd + (B.float() * s).double() @ A.float().double()).norm(dim=1)
        assert_close(got, ref.float(), 1e-5, what)
