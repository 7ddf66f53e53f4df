"""lora_linear op: forward and gradients vs fp64 autograd of the plain composition, dropout."""
import pytest
import torch
from conftest import DTYPES, RTOL, devices, rel_err

from lora_ext.ops import lora_linear


def make(T, i, o, r, dtype, device, bias=True, fan_in_fan_out=False, lead=()):
    g = torch.Generator().manual_seed(T * 131 + i * 7 + o + r)
    x = torch.randn(*lead, T, i, generator=g)
    W = torch.randn(o, i, generator=g) / i**0.5
    b = torch.randn(o, generator=g) if bias else None
    A = torch.randn(r, i, generator=g) / i**0.5
    B = torch.randn(o, r, generator=g) / r**0.5
    if fan_in_fan_out:
        W = W.t().contiguous()
    conv = lambda t: None if t is None else t.to(device, dtype).requires_grad_()
    return conv(x), W.to(device, dtype), conv(b), conv(A), conv(B)


def reference(x, W, b, A, B, s, fan_in_fan_out=False, mask=None):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()
    xd, bd, Ad, Bd = d(x), d(b), d(A), d(B)
    Wd = W.double()
    y = xd @ (Wd if fan_in_fan_out else Wd.T)
    if bd is not None:
        y = y + bd
    xl = xd if mask is None else xd * mask
    y = y + s * (xl @ Ad.T) @ Bd.T
    return y, (xd, bd, Ad, Bd)


SHAPES = [(1, 16, 8, 1), (7, 33, 65, 3), (9, 128, 64, 16), (100, 96, 80, 8), (64, 257, 129, 33),
          (0, 16, 8, 2)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["linear", "no_bias", "conv1d"])
def test_forward_backward_match_reference(device, dtype, shape, variant):
    fif = variant == "conv1d"
    x, W, b, A, B = make(*shape, dtype, device, bias=variant != "no_bias", fan_in_fan_out=fif,
                         lead=(2,) if shape[0] == 7 else ())
    y = lora_linear(x, W, b, A, B, 0.7, fan_in_fan_out=fif)
    yr, leaves = reference(x, W, b, A, B, 0.7, fif)
    assert y.shape == yr.shape and y.dtype == dtype
    tol = RTOL[dtype] * (1 if dtype == torch.float32 else 2)
    assert rel_err(y, yr) < tol
    if y.numel() == 0:
        return
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    for ours, ref in zip((x, b, A, B), leaves):
        if ours is not None:
            assert rel_err(ours.grad, ref.grad) < tol * 2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_shared_by_forward_and_backward(device, dtype):
    # With A = B = I and scale 1 the LoRA branch is exactly dropout(x): read the mask off it.
    T, n, p = 64, 48, 0.3
    x = torch.randn(T, n, device=device, dtype=dtype).requires_grad_()
    W = torch.randn(n, n, device=device, dtype=dtype) / n**0.5
    eye = torch.eye(n, device=device, dtype=dtype)
    A, B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    y = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True)
    branch = (y.double() - x.double() @ W.double().T)
    mask = (branch / x.double()).detach() * (1 - p)
    mask = (mask > 0.5).double()
    frac = 1 - mask.mean().item()
    assert abs(frac - p) < 0.05, frac
    yr, (xd, _, Ad, Bd) = reference(x, W, None, A, B, 1.0, mask=mask / (1 - p))
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    assert rel_err(y, yr) < tol
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(x.grad, xd.grad) < tol
    assert rel_err(A.grad, Ad.grad) < tol
    assert rel_err(B.grad, Bd.grad) < tol
    # a new call draws a new mask; eval mode draws none
    y2 = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True)
    assert not torch.equal(y2, y)
    y3 = lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=False)
    assert rel_err(y3, reference(x, W, None, A, B, 1.0)[0]) < tol


def test_bad_input():
    x, W, b, A, B = make(4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(RuntimeError, match="B must be"):
        lora_linear(x, W, b, A, B[:, :1], 1.0)
    with pytest.raises(RuntimeError, match="A must be"):
        lora_linear(x, W, b, A[:, :3], B, 1.0)
    with pytest.raises(RuntimeError, match="weight"):
        lora_linear(x, W[:, :3], b, A, B, 1.0)
    with pytest.raises(RuntimeError, match="bias"):
        lora_linear(x, W, b[:2], A, B, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        lora_linear(x, W.double(), b, A, B, 1.0)
    with pytest.raises(RuntimeError, match="rank r"):
        lora_linear(x, W, b, A[:0], B[:, :0], 1.0)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph_forward_backward(device):
    x, W, b, A, B = make(12, 32, 24, 4, torch.float32, device)

    @torch.compile(fullgraph=True)
    def step(x, A, B):
        return lora_linear(x, W, b, A, B, 0.5, dropout_p=0.1, training=True).square().mean()

    loss = step(x, A, B)
    loss.backward()
    assert A.grad is not None and B.grad is not None and x.grad is not None
    assert torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0
