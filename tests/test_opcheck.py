"""torch.library.opcheck on every lora_ext op: schema (Tensor(a!) annotations match what is
mutated), fake kernel vs real outputs, autograd registration, AOT dispatch (static and dynamic)."""
import pytest
import torch
from conftest import devices

import lora_ext  # noqa: F401

OPS = torch.ops.lora_ext


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _t(*shape, device, dtype=torch.float32, seed=0, grad=False):
    t = torch.randn(*shape, generator=_g(seed)).to(device=device, dtype=dtype)
    return t.requires_grad_() if grad else t


def cases(device):
    T, i, o, r, S = 5, 24, 20, 4, 3
    x, A, B, W = (_t(T, i, device=device, seed=1), _t(r, i, device=device, seed=2),
                  _t(o, r, device=device, seed=3), _t(o, i, device=device, seed=4))
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    u = _t(T, r, device=device, seed=5)
    Ap, Bp = _t(S, r, i, device=device, seed=6), _t(S, o, r, device=device, seed=7)
    idx = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=device)
    scales = torch.tensor([0.5, 1.0, 2.0], device=device)
    ranks = torch.tensor([4, 2, 3], dtype=torch.int32, device=device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    W16 = _t(o, i, device=device, seed=8, dtype=torch.bfloat16)
    codes, fails = (torch.zeros((o * i * 2 + 31) // 32, dtype=torch.int32, device=device),
                    torch.zeros((o * i + 31) // 32, dtype=torch.int32, device=device))
    A16, B16 = A.to(torch.bfloat16), (B * 0.01).to(torch.bfloat16)
    xp = _t(2, i, 3, device=device, seed=10).permute(0, 2, 1)  # [2, 3, in], not contiguous
    return {
        "lora_apply_": (OPS.lora_apply_.default, (_t(T, o, device=device), x, A, B, 0.5)),
        "lora_linear_fwd": (OPS.lora_linear_fwd.default,
                            (_t(T, i, device=device, seed=1, grad=True), W, _t(o, device=device, grad=True),
                             _t(r, i, device=device, seed=2, grad=True), _t(o, r, device=device, seed=3, grad=True),
                             0.5, 0.2, seed, False)),
        "lora_linear_bwd": (OPS.lora_linear_bwd.default,
                            (_t(T, o, device=device), x, W, A, B, u, 0.5, 0.2, seed, False,
                             [True, False, True, True])),
        # x a permuted view (an NCHW -> NHWC block): outputs are contiguous in the fake kernels too
        "lora_linear_fwd.permuted": (OPS.lora_linear_fwd.default,
                                     (xp.requires_grad_(), W, None, A.clone().requires_grad_(),
                                      B.clone().requires_grad_(), 0.5, 0.0, None, False)),
        "lora_linear_bwd.permuted": (OPS.lora_linear_bwd.default,
                                     (_t(2, 3, o, device=device), xp.detach(), W, A, B, _t(6, r, device=device),
                                      0.5, 0.0, None, False, [True, True, True, True])),
        "multi_lora_": (OPS.multi_lora_.default,
                        (_t(T, o, device=device), x, Ap, Bp, idx, scales, ranks, None, bad)),
        "lora_shrink": (OPS.lora_shrink.default, (x, Ap, idx, ranks, 0.5)),
        "lora_shrink.counted": (OPS.lora_shrink.counted, (x, Ap, idx, ranks, bad, 1.0)),
        "lora_expand_": (OPS.lora_expand_.default,
                         (_t(T, o, device=device), u, Bp, idx, scales, ranks, None, bad, False)),
        "merge_": (OPS.merge_.default, (W16.clone(), [A16], [B16], [1.5], False)),
        "remerge_": (OPS.remerge_.default,
                     (W16.clone(), codes, fails, 2, [], [], [], [A16], [B16], [1.5], False)),
        "merge_points_": (OPS.merge_points_.default,
                          (W16.clone(), torch.tensor([0, 5, o * i - 1], device=device),
                           W16.view(-1)[:3].clone(), [A16], [B16], [0.5], False)),
        "merge_code_failures": (OPS.merge_code_failures.default, (W16, _t(o, i, device=device, seed=9))),
        "dora_norm": (OPS.dora_norm.default, (W16, A16, B16, 1.5, False)),
        # Conv1D layout [in, out], fp32 factors on a bf16 weight, r = 0
        "dora_norm.fifo": (OPS.dora_norm.default, (W16.t().contiguous(), A, B, -0.5, True)),
        "dora_norm.r0": (OPS.dora_norm.default, (W, A[:0], B[:, :0], 1.0, False)),
    }


NAMES = list(cases("cpu"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", NAMES)
def test_opcheck(device, name):
    op, args = cases(device)[name]
    torch.library.opcheck(op, args)


def test_every_op_is_checked():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("lora_ext::")} - {"build_info"}
    assert registered <= set(NAMES), registered - set(NAMES)
