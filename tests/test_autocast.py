"""The ops inside torch.autocast (csrc/autocast.cpp): functional ops cast their float inputs to the
autocast dtype as F.linear does, in-place ops cast theirs to y's dtype; the result equals the op on
inputs cast by hand, bit for bit, and gradients reach fp32 parameters in fp32. Modules, compile and
patch_peft (HF Trainer's bf16=True is an autocast region) follow."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, rel_err
from torch import nn

import lora_ext
from lora_ext import LoRAContext, MultiLoRALinear, attach_context
from lora_ext.ops import lora_apply_, lora_expand_, lora_linear, lora_shrink, multi_lora_, merge_

LOW = [torch.bfloat16, torch.float16]


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_casts_like_f_linear(device, dtype, p):
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    W, b = torch.randn(24, 40, device=device), torch.randn(24, device=device)
    A = (torch.randn(6, 40, device=device) / 7).requires_grad_()
    B = torch.randn(24, 6, device=device).requires_grad_()
    torch.manual_seed(1)
    with autocast(device, dtype):
        y = lora_linear(x, W, b, A, B, 0.5, p, training=True)
        base = F.linear(x, W, b)
    assert y.dtype == base.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    # the same op on inputs cast by hand (same seed: same dropout mask)
    xc, Ac, Bc = (t.detach().to(dtype).requires_grad_() for t in (x, A, B))
    torch.manual_seed(1)
    ref = lora_linear(xc, W.to(dtype), b.to(dtype), Ac, Bc, 0.5, p, training=True)
    ref.backward(g)
    assert torch.equal(y, ref)
    for got, want in ((x, xc), (A, Ac), (B, Bc)):
        assert got.grad.dtype == torch.float32
        assert torch.equal(got.grad, want.grad.float())


@pytest.mark.parametrize("device", devices())
def test_in_place_ops_compute_in_y_dtype(device):
    dtype = torch.bfloat16
    x = torch.randn(9, 32, device=device)
    A, B = torch.randn(4, 32, device=device) / 6, torch.randn(20, 4, device=device)
    y0 = torch.randn(9, 20, device=device, dtype=dtype)

    y, ref = y0.clone(), y0.clone()
    with autocast(device, dtype):
        lora_apply_(y, x, A, B, 0.7)
    lora_apply_(ref, x.to(dtype), A.to(dtype), B.to(dtype), 0.7)
    assert y.dtype == dtype and torch.equal(y, ref)

    # multi-adapter: pools [S, r_max, in] / [S, out, r_max]; scales stay fp32, -1 = no adapter
    A_pool = torch.randn(3, 4, 32, device=device) / 6
    B_pool = torch.randn(3, 20, 4, device=device)
    idx = torch.tensor([0, 2, -1, 1, 1, 0, 2, -1, 0], device=device, dtype=torch.int32)
    scales = torch.tensor([0.5, 1.0, 2.0], device=device)
    ranks = torch.tensor([4, 2, 3], device=device, dtype=torch.int32)
    y, ref = y0.clone(), y0.clone()
    with autocast(device, dtype):
        multi_lora_(y, x, A_pool, B_pool, idx, scales, ranks)
    multi_lora_(ref, x.to(dtype), A_pool.to(dtype), B_pool.to(dtype), idx, scales, ranks)
    assert torch.equal(y, ref)

    # the halves: lora_shrink is functional (autocast dtype), lora_expand_ writes y's dtype and
    # takes u as it comes (fp32 here)
    with autocast(device, dtype):
        u = lora_shrink(x, A_pool, idx, ranks)
    assert u.dtype == torch.float32
    assert torch.equal(u, lora_shrink(x.to(dtype), A_pool.to(dtype), idx, ranks))
    y, ref = y0.clone(), y0.clone()
    with autocast(device, dtype):
        lora_expand_(y, u, B_pool, idx, scales, ranks)
    lora_expand_(ref, u, B_pool.to(dtype), idx, scales, ranks)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("device", devices())
def test_fp64_and_the_merge_ops_pass_through(device):
    x = torch.randn(4, 16, device=device, dtype=torch.float64)
    W = torch.randn(8, 16, device=device, dtype=torch.float64)
    A, B = torch.randn(2, 16, device=device, dtype=torch.float64), torch.randn(8, 2, device=device, dtype=torch.float64)
    # fp64 is not cast (as with torch's ops): the op names the dtype it does not take
    with pytest.raises(RuntimeError, match="x has dtype Double"), autocast(device, torch.bfloat16):
        lora_linear(x, W, None, A, B, 1.0)
    # merging keeps the weight's dtype (no rule for the merge family)
    Wf = torch.randn(8, 16, device=device)
    Af, Bf = A.float(), B.float()
    merged = Wf.clone()
    with autocast(device, torch.bfloat16):
        merge_(merged, Af, Bf, 0.5)
    ref = Wf.clone()
    merge_(ref, Af, Bf, 0.5)
    assert merged.dtype == torch.float32 and torch.equal(merged, ref)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(32, 64), nn.Linear(64, 32), nn.LayerNorm(32)

    def forward(self, x):  # down gets the bf16 output of an autocast GEMM, up the fp32 of a norm
        return self.down(torch.relu(self.up(self.norm(x))))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compile", [False, True])
def test_lora_linear_module_trains_under_autocast(device, compile):
    model = Block().to(device)
    lora_ext.inject(model, ["up", "down"], r=4, alpha=8)
    ref = copy.deepcopy(model)
    for m in (model, ref):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.1)
        m.load_state_dict(model.state_dict())
    run = torch.compile(model, fullgraph=True) if compile else model
    x = torch.randn(6, 32, device=device)

    def plain(layer, x):  # the same layer by torch's own ops
        return F.linear(x, layer.weight, layer.bias) + layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)

    with autocast(device, torch.bfloat16):
        y = run(x)
        h = ref.norm(x)
        want = plain(ref.down, torch.relu(plain(ref.up, h)))
    assert y.dtype == want.dtype == torch.bfloat16
    assert rel_err(y, want) < 2e-2
    y.float().square().mean().backward()
    want.float().square().mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    exp = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == exp.keys() and len(got) == 6  # 2 x (A, B) + the norm's
    for n in got:
        assert got[n].dtype == torch.float32
        assert rel_err(got[n], exp[n]) < 5e-2, n


@pytest.mark.parametrize("device", devices())
def test_multi_lora_module_under_autocast(device):
    ctx = LoRAContext(max_tokens=16, device=device)
    layer = MultiLoRALinear(nn.Linear(32, 24).to(device), 2, 4)
    attach_context(layer, ctx)
    g = torch.Generator().manual_seed(0)
    for s in range(2):
        layer.set_slot(s, torch.randn(3, 32, generator=g) / 6, torch.randn(24, 3, generator=g), 0.5 + s)
    x = torch.randn(2, 4, 32, device=device)
    ctx.set_indices(torch.tensor([0, 1, -1, 0, 1, 1, 0, -1], device=device))
    with torch.no_grad(), autocast(device, torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        xb, lb = x.bfloat16(), copy.deepcopy(layer).bfloat16()
        attach_context(lb, ctx)
        assert torch.equal(y, lb(xb))


peft = pytest.importorskip("peft")


def test_patch_peft_runs_fused_under_autocast(monkeypatch):
    from peft_cases import Count, build, ids_for, lora_params, n_linear, patch
    ref = build("llama")
    pm = copy.deepcopy(ref)
    patch(pm)
    count = Count(monkeypatch)
    ids = ids_for()
    pm.train(), ref.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lora_ext.patch_peft")
        with autocast("cpu", torch.bfloat16):
            out_p, out_r = pm(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
        assert out_p.logits.dtype == out_r.logits.dtype
        assert rel_err(out_p.logits, out_r.logits) < 3e-2
        out_p.loss.backward(), out_r.loss.backward()
        gp, gr = lora_params(pm), lora_params(ref)
        for n in gr:
            assert gp[n].grad.dtype == torch.float32 and rel_err(gp[n].grad, gr[n].grad) < 6e-2, n
        assert count.linear == n_linear(pm)
        # a mixed batch (inference) under autocast: one multi_lora_ per layer, no fallback
        ref.add_adapter("b", peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
        pm = copy.deepcopy(ref).eval()
        ref.eval()
        patch(pm)
        names = ["b", "default"]
        with torch.no_grad(), autocast("cpu", torch.bfloat16):
            out = pm(input_ids=ids, adapter_names=names).logits
            want = ref(input_ids=ids, adapter_names=names).logits
        assert rel_err(out, want) < 3e-2
        assert count.multi == n_linear(pm)
