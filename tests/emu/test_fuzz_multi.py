"""Randomized differential fuzzing of the emulated multi-adapter kernels (multi_lora_, lora_shrink
(.counted), lora_expand_) against the CPU kernels and fp64 references: decode / streaming / tiled /
tensor-core tile paths (T 1..300, adapters of many or few tokens, sm_75 or sm_90), split K, mixed
ranks (0 included), -1 and out-of-range indices with bad_index_count, int32 and int64 indices,
out_slices (packed q/k/v, empty slices included), y a column slice of a wider buffer, misaligned
by one element or transposed. See test_fuzz.py for the seeds and LORA_EXT_EMU_FUZZ_CASES."""
import pytest
import torch
from conftest import RTOL, under_schedules
from fuzz_gen import (DTYPES, SEEDS, assert_close, assert_same_bits, device, place,
                      rng_for, size, special_values, values)

CPU = torch.ops.lora_ext


def index_pattern(r, g, T, S):
    kind = r.choice(("random", "one", "heavy", "distinct", "sorted"))
    if kind == "one":
        idx = torch.full((T,), r.randrange(S), dtype=torch.int64)
    elif kind == "heavy":  # one adapter with many tokens (tensor cores), others with few
        idx = torch.randint(-1, S, (T,), generator=g)
        idx[torch.rand(T, generator=g) < 0.6] = r.randrange(S)
    elif kind == "distinct":
        idx = torch.randperm(max(T, S), generator=g)[:T] % (S + 1) - 1
    elif kind == "sorted":
        idx = torch.randint(-1, S, (T,), generator=g).sort().values
    else:
        idx = torch.randint(-1, S, (T,), generator=g)
    dtype = r.choice((torch.int32, torch.int64))
    # int64: values whose low 32 bits are a valid slot (a truncating kernel would apply them)
    wide = (2 ** 32, -2 ** 32 + 1, 2 ** 63 - 1) if dtype == torch.int64 else (2 ** 31 - 1, -2 ** 31)
    for _ in range(min(r.choice((0, 0, 1, 3)), T)):
        idx[r.randrange(T)] = r.choice((S, S + 5, -2, -1000) + wide)
    return idx.to(dtype), kind


def slot_args(r, g, S, n, r_max, per_slice):
    shape = (n, S) if per_slice else (S,)
    ranks = torch.randint(0, r_max + 1, shape, generator=g).to(torch.int32)
    if r.random() < 0.5:  # full ranks are common
        ranks[ranks > 0] = r_max
    scales = (torch.rand(shape, generator=g) * 2 - 0.5).float()
    return scales, ranks


def slices_of(r, out):
    if r.random() < 0.5 or out < 1:
        return None
    n = r.randint(1, 3)
    cuts = sorted(r.randint(0, out) for _ in range(n - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [out])]


def case(op, seed):
    r, g = rng_for(op, seed)
    dt = r.choice(DTYPES)
    if seed % 10 == 9:  # the device-side sort at scale: > 1024 tokens or > 1024 slots, tiny rows
        # (slow to emulate: ~1000 blocks; never among the committed seeds 0..2)
        T, S = size(r, 17, 2500), r.choice((r.randint(1, 6), r.randint(900, 1500)))
        i, o, r_max = size(r, 1, 24), size(r, 1, 24), size(r, 1, 6)
    else:
        T = size(r, 1, 16) if r.random() < 0.5 else size(r, 17, 300)
        i, o = size(r, 1, 600), size(r, 1, 300)
        S, r_max = r.randint(1, 6), size(r, 1, 130)
    sl = slices_of(r, o)
    n = 1 if sl is None else len(sl)
    idx, kind = index_pattern(r, g, T, S)
    scales, ranks = slot_args(r, g, S, n, r_max, sl is not None and r.random() < 0.7)
    # fp32 operands of the tensor-core tiles are split into hi + lo TF32 parts, and an inf meets
    # the other side's lo part (inf * 0 = NaN; multi_kernels.cuh): +-inf only with 16-bit x
    spec = special_values(dt, activation=True) if r.random() < 0.3 else ()
    if dt == torch.float32:
        spec = [v for v in spec if abs(v) != float("inf")]
    x, x_buf, xmode = place(r, values(g, (T, i), dt, r=r, specials=spec, count=2 if spec else 0),
                        ("contig", "contig", "wide", "offset"))
    A = values(g, ((n, S) if sl is not None else (S,)) + (r_max, i), dt, scale=i ** -0.5)
    B = values(g, (S, o, r_max), dt, scale=r_max ** -0.5)
    valid = torch.where((idx >= 0) & (idx < S), idx, torch.full_like(idx, -1))
    nbad = int(((idx < -1) | (idx >= S)).sum())
    what = (f"{dt} T={T} in={i} out={o} S={S} r_max={r_max} slices={sl} idx:{kind}/{idx.dtype} "
            f"nbad={nbad} ranks={ranks.tolist()} specials={bool(spec)} x:{xmode}")
    return r, g, dict(dt=dt, T=T, i=i, o=o, S=S, r_max=r_max, sl=sl, n=n, idx=idx, valid=valid,
                      nbad=nbad, scales=scales, ranks=ranks, x=x, x_buf=x_buf, A=A, B=B, exact=not spec), what


def ref_u(c, scale=1.0):
    """fp64 u [n, T, r_max]: scale * A[sl, a, :rank] x[t], zero past the rank / without adapter."""
    A = c["A"].double().reshape(c["n"], c["S"], c["r_max"], c["i"])
    ranks = c["ranks"].reshape(-1, c["S"]).expand(c["n"], c["S"])
    u = torch.zeros(c["n"], c["T"], c["r_max"], dtype=torch.float64)
    for t, a in enumerate(c["valid"].tolist()):
        if a >= 0:
            for s in range(c["n"]):
                k = int(ranks[s, a])
                u[s, t, :k] = scale * (A[s, a, :k] @ c["x"][t].double())
    return u


def ref_expand(c, u, y0, add=True):
    y = (y0.double() if add else torch.zeros_like(y0, dtype=torch.float64)).clone()
    offs = [0] + list(torch.tensor(c["sl"] or [c["o"]]).cumsum(0).tolist())
    ranks = c["ranks"].reshape(-1, c["S"]).expand(c["n"], c["S"])
    scales = c["scales"].reshape(-1, c["S"]).expand(c["n"], c["S"])
    for t, a in enumerate(c["valid"].tolist()):
        if a >= 0:
            for s in range(c["n"]):
                k, lo, hi = int(ranks[s, a]), offs[s], offs[s + 1]
                y[t, lo:hi] += float(scales[s, a]) * (c["B"][a, lo:hi, :k].double() @ u[s, t, :k])
    return y


def run_on_y(emu, r, y0, fn, dev):
    """fn(y view) under the schedules with y laid out by place(); returns (y view, bad count,
    layout, whether everything outside the view is untouched, the buffer)."""
    y_v, y_buf, mode = place(r, y0)
    start = y_buf.clone()

    def run():
        yb = start.clone()
        bad = torch.zeros(1, dtype=torch.int32)
        fn(yb.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset()), bad)
        return yb, bad
    yb, bad = under_schedules(emu, run, schedules=dev.pop("schedules"), **dev)
    mask = torch.ones_like(yb, dtype=torch.bool)
    mask.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset()).fill_(False)
    outside_ok = torch.equal(yb[mask], start[mask])
    return yb.as_strided(y_v.shape, y_v.stride(), y_v.storage_offset()), bad, mode, outside_ok, yb


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_multi_lora(emu, seed):
    r, g, c, what = case("multi_lora_", seed)
    dt = c["dt"]
    y0 = values(g, (c["T"], c["o"]), dt)
    ref = y0.clone()
    CPU.multi_lora_(ref, c["x"], c["A"], c["B"], c["valid"], c["scales"], c["ranks"], c["sl"])
    dev = device(r)
    what = f"multi_lora_ {what} {dev}"
    y, bad, mode, outside_ok, y_buf = run_on_y(emu, r, y0, lambda yv, bad: emu.ops.multi_lora_(
        yv, c["x"], c["A"], c["B"], c["idx"], c["scales"], c["ranks"], c["sl"], bad), dev)
    what += f" y:{mode}"
    ref64 = ref_expand(c, ref_u(c), y0) if c["exact"] else None
    assert_close(y, ref, RTOL[dt], what, ref64)
    assert int(bad) == c["nbad"], f"{what}: bad_index_count {int(bad)}, want {c['nbad']}"
    assert outside_ok, f"{what}: wrote outside y"
    if r.random() < 0.4:
        # a token's bits depend neither on its position nor on the other adapters' tokens
        # (multi_kernels.cuh): the tokens permuted, one adapter's first; then those alone
        perm = torch.randperm(c["T"], generator=g)
        a = int(c["valid"][perm[0]])
        first = c["valid"][perm] == a
        perm = torch.cat([perm[first], perm[~first]])
        k = int(first.sum())
        for rows in (c["T"], k):
            xp = same_layout(c["x"], c["x_buf"], c["x"][perm])[:rows]
            yp = same_layout(y, y_buf, y0[perm])[:rows]
            with emu.device(**dev):  # the same device (tensor cores or not, SM count)
                emu.ops.multi_lora_(yp, xp, c["A"], c["B"], c["idx"][perm][:rows], c["scales"],
                                    c["ranks"], c["sl"])
            assert_same_bits(yp, y[perm][:rows], f"{what}: tokens permuted, first {rows} "
                             f"(adapter {a}'s {k} tokens first)")


def same_layout(view, buf, values):
    """values in a new buffer laid out like `view` in `buf` (strides and alignment: the vector
    paths, and so the bits, depend on them)."""
    out = buf.clone().as_strided(view.shape, view.stride(), view.storage_offset())
    out.copy_(values)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_shrink_expand(emu, seed):
    r, g, c, what = case("lora_shrink", seed)
    dt = c["dt"]
    s = r.choice((1.0, 0.5, -2.0))
    A = c["A"] if c["sl"] is not None or r.random() < 0.5 else c["A"].reshape(
        (1,) + tuple(c["A"].shape[-3:]))  # a 4-D pool with n = 1
    u_ref = CPU.lora_shrink(c["x"], A, c["valid"], c["ranks"], s)
    dev = device(r)
    sched = dev.pop("schedules")
    counted = r.random() < 0.5 or c["nbad"] > 0

    def shrink():
        bad = torch.zeros(1, dtype=torch.int32)
        if counted:
            return emu.ops.lora_shrink.counted(c["x"], A, c["idx"], c["ranks"], bad, s), bad
        return emu.ops.lora_shrink(c["x"], A, c["idx"], c["ranks"], s), bad
    u, bad = under_schedules(emu, shrink, schedules=sched, **dev)
    what = f"lora_shrink {what} counted={counted} scale={s} {dev}"
    u64 = ref_u(c, s).reshape(u_ref.shape)
    assert_close(u, u_ref, 1e-5, what, u64 if c["exact"] else None)
    assert int(bad) == (c["nbad"] if counted else 0), f"{what}: bad_index_count {int(bad)}"
    # the expand, from CPU's u (fp32, or rounded to y's dtype)
    add = r.random() < 0.6
    u_in = u_ref.reshape(c["n"], c["T"], c["r_max"]) if c["sl"] is not None else u_ref.reshape(c["T"], c["r_max"])
    if r.random() < 0.3:
        u_in = u_in.to(dt)
    y0 = values(g, (c["T"], c["o"]), dt)
    ref = y0.clone()
    CPU.lora_expand_(ref, u_in, c["B"], c["valid"], c["scales"], c["ranks"], c["sl"], None, add)
    dev = device(r)
    what_e = f"lora_expand_ {what} add_inputs={add} u:{u_in.dtype} {dev}"
    y, bad, mode, outside_ok, _ = run_on_y(emu, r, y0, lambda yv, bad: emu.ops.lora_expand_(
        yv, u_in, c["B"], c["idx"], c["scales"], c["ranks"], c["sl"], bad, add), dev)
    what_e += f" y:{mode}"
    ref64 = ref_expand(c, u_in.double().reshape(c["n"], c["T"], c["r_max"]), y0, add)
    assert_close(y, ref, RTOL[dt], what_e, ref64 if c["exact"] else None)
    assert int(bad) == c["nbad"], f"{what_e}: bad_index_count {int(bad)}, want {c['nbad']}"
    assert outside_ok, f"{what_e}: wrote outside y"
