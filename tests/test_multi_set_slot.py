"""MultiLoRALinear.set_slot / clear_slot: factors that are views of the layer's own pools, calls that
fail part way (the slot stays exactly as it was), and the slot argument's type."""
import numpy as np
import pytest
import torch
from torch import nn

import lora_ext.multi as multi
from lora_ext import LoRAContext, MultiLoRALinear

D = 8


def state(layer):
    """Every per-slot buffer of the layer (DoRA's too), cloned."""
    names = ("A_pool", "B_pool", "scales", "ranks") + (("dora_scales", "dora_bias") if layer.dora else ())
    return {k: getattr(layer, k).clone() for k in names}


def assert_same(layer, before):
    for k, t in before.items():
        assert torch.equal(getattr(layer, k), t), k


def factors(r, out=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, D, generator=g), torch.randn(out, r, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("dora", [False, True])
def test_set_slot_from_views_of_its_own_pools(dora):
    """set_slot(s, A_pool[s, :r], B_pool[s, :, :r], new_scale) changes only the scale (was: the slot
    was zeroed before the copy, which then copied zeros: the adapter silently gone)."""
    torch.manual_seed(0)
    ctx = LoRAContext(4)
    mag = {"magnitude": torch.rand(D) + 0.5} if dora else {}
    layer = MultiLoRALinear(nn.Linear(D, D), 2, 4, context=ctx, dora=dora)
    fresh = MultiLoRALinear(layer.base, 2, 4, context=ctx, dora=dora)
    A, B = factors(2)
    layer.set_slot(0, A, B, 1.0, **mag)
    layer.set_slot(0, layer.A_pool[0, :2], layer.B_pool[0, :, :2], 2.0, **mag)
    fresh.set_slot(0, A, B, 2.0, **mag)
    for k, t in state(fresh).items():
        assert torch.equal(getattr(layer, k), t), k
    ctx.set_indices([0, -1])
    x = torch.randn(2, D)
    assert not torch.equal(layer(x)[0], layer.base(x)[0])
    assert torch.equal(layer(x), fresh(x))


@torch.no_grad()
def test_sliced_set_slot_from_views_of_its_own_pools():
    layer = MultiLoRALinear(nn.Linear(D, 12), 2, 4, out_slices=[8, 4], context=LoRAContext(4))
    (qa, qb), (va, vb) = factors(3, 8, seed=1), factors(2, 4, seed=2)
    layer.set_slot(1, [qa, va], [qb, vb], [1.0, 0.5])
    before = state(layer)
    layer.set_slot(1, [layer.A_pool[0, 1, :3], layer.A_pool[1, 1, :2]],
                   [layer.B_pool[1, :8, :3], layer.B_pool[1, 8:, :2]], [3.0, 0.25])
    assert torch.equal(layer.A_pool, before["A_pool"]) and torch.equal(layer.B_pool, before["B_pool"])
    assert layer.scales[:, 1].tolist() == [3.0, 0.25] and layer.ranks[:, 1].tolist() == [3, 2]


@torch.no_grad()
def test_failed_set_slot_leaves_the_slot_as_it_was(monkeypatch):
    """Meta-device factors (a model built under init_empty_weights) pass the shape checks: they are
    refused by name before anything is written (was: the pools zeroed, ranks still the old rank)."""
    ctx = LoRAContext(4)
    layer = MultiLoRALinear(nn.Linear(D, D), 2, 4, context=ctx)
    A, B = factors(2)
    layer.set_slot(0, A, B, 1.0)
    before = state(layer)
    meta = torch.empty(2, D, device="meta"), torch.empty(D, 2, device="meta")
    with pytest.raises(ValueError, match=r"MultiLoRALinear.set_slot: A is on the meta device"):
        layer.set_slot(0, meta[0], meta[1], 1.0)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.set_slot: B is on the meta device"):
        layer.set_slot(0, A, meta[1], 1.0)
    with pytest.raises(TypeError, match=r"MultiLoRALinear.set_slot: A must be a tensor, got list"):
        layer.set_slot(0, A.tolist(), B, 1.0)
    assert_same(layer, before)
    # a copy that fails for any other reason while staging: still nothing written
    monkeypatch.setattr(multi, "_with_data", lambda *a: None)
    with pytest.raises(NotImplementedError):
        layer.set_slot(0, meta[0], meta[1], 3.0)
    assert_same(layer, before)
    # a packed layer: slice 1 fails after slice 0 was read
    packed = MultiLoRALinear(nn.Linear(D, 12), 2, 4, out_slices=[8, 4], context=ctx)
    packed.set_slot(0, [A, None], [B, None], [1.0, 1.0])
    before = state(packed)
    with pytest.raises(NotImplementedError):
        packed.set_slot(0, [factors(3)[0], meta[0]], [factors(3)[1], torch.empty(4, 2, device="meta")], 2.0)
    assert_same(packed, before)
    # a layer on meta (init_empty_weights) takes meta factors
    MultiLoRALinear(nn.Linear(D, D, device="meta"), 2, 4).set_slot(0, meta[0], meta[1], 1.0)


@torch.no_grad()
def test_failed_dora_set_slot_leaves_the_slot_as_it_was(monkeypatch):
    """DoRA's g is computed before the slot is written (was: new A/B/rank/scale with the old g)."""
    ctx = LoRAContext(4)
    layer = MultiLoRALinear(nn.Linear(D, D), 2, 4, context=ctx, dora=True)
    A, B = factors(2)
    layer.set_slot(0, A, B, 1.0, magnitude=torch.rand(D) + 0.5)
    before = state(layer)
    A2, B2 = factors(3, seed=3)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.set_slot: magnitude is on the meta device"):
        layer.set_slot(0, A2, B2, 2.0, magnitude=torch.empty(D, device="meta"))
    with pytest.raises(TypeError, match=r"MultiLoRALinear.set_slot: magnitude must be a tensor"):
        layer.set_slot(0, A2, B2, 2.0, magnitude=[1.0] * D)
    assert_same(layer, before)

    def lost(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(multi, "dora_norm", lost)
    with pytest.raises(RuntimeError, match="device lost"):
        layer.set_slot(0, A2, B2, 2.0, magnitude=torch.rand(D) + 0.5)
    assert_same(layer, before)


@pytest.mark.parametrize("slot", [1.5, True, False, "0", torch.tensor(0), None])
def test_slot_must_be_an_int(slot):
    layer = MultiLoRALinear(nn.Linear(D, D), 2, 4, context=LoRAContext(4), dora=True)
    A, B = factors(2)
    layer.set_slot(0, A, B, 1.0, magnitude=torch.rand(D) + 0.5)
    before = state(layer)
    with pytest.raises(TypeError, match=r"MultiLoRALinear.set_slot: slot must be an int"):
        layer.set_slot(slot, A, B, 2.0)
    with pytest.raises(TypeError, match=r"MultiLoRALinear.clear_slot: slot must be an int"):
        layer.clear_slot(slot)
    assert_same(layer, before)


def test_slot_range_and_numpy_ints():
    layer = MultiLoRALinear(nn.Linear(D, D), 2, 4, context=LoRAContext(4))
    A, B = factors(2)
    for bad in (2, -1):
        with pytest.raises(IndexError, match=rf"MultiLoRALinear.set_slot: slot {bad} out of range 0..1"):
            layer.set_slot(bad, A, B, 1.0)
        with pytest.raises(IndexError, match=rf"MultiLoRALinear.clear_slot: slot {bad} out of range 0..1"):
            layer.clear_slot(bad)
    layer.set_slot(np.int64(1), A, B, 1.0)
    assert layer.ranks.tolist() == [0, 2]
    layer.clear_slot(np.int32(1))
    assert layer.ranks.tolist() == [0, 0]
