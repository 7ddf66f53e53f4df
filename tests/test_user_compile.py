"""A user who compiles, exports and serializes lora_ext models (CPU): torch.export with a tensor scale,
a merged model's state dict loaded into an unmerged one, and round trips of every layer kind through
torch.compile / torch.export / torch.save against eager."""
import copy
import io

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoRAConv1d, LoRAEmbedding, LoRALayer, LoRALinear, LoRAParameter, MergedLinear
from lora_ext.ops import lora_apply_, lora_linear


class _Net(nn.Module):
    """Every single-adapter layer kind in one model: embedding, linear, fused qkv (Conv1D layout),
    a 1-d convolution and a LoRAParameter on a plain Linear's weight."""

    def __init__(self, dora: bool):
        super().__init__()
        self.emb = LoRAEmbedding(30, 8, r=2, use_dora=dora)
        self.l1 = LoRALinear(8, 12, r=3, use_dora=dora)
        self.qkv = MergedLinear(12, 12, r=2, enable_lora=[True, False, True], fan_in_fan_out=True)
        self.conv = LoRAConv1d(12, 6, 3, padding=1, r=2, use_dora=dora)
        self.head = LoRAParameter(nn.Linear(6, 5), "weight", r=2)

    def forward(self, ids):
        h = self.qkv(self.l1(self.emb(ids)))
        return self.head(self.conv(h.transpose(1, 2)).transpose(1, 2))


def _net(dora: bool = False, seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    net = _Net(dora)
    with torch.no_grad():  # non-zero adapters everywhere (B / embedding A start at zero)
        for m in net.modules():
            if isinstance(m, (LoRALayer, LoRAParameter)):
                for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                    if isinstance(getattr(m, name, None), nn.Parameter):
                        getattr(m, name).normal_(std=0.3)
    return net.eval()


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


# ------------------------------------------------------------------ torch.export with a tensor scale
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("op", ["lora_linear", "lora_apply_"])
def test_export_tensor_scale_is_a_clear_error(op, strict):
    """A tensor scale cannot reach the kernels' float argument while torch.export traces: the same
    error as under fullgraph=True, naming the op and ``scale`` (before the fix, non-strict export
    raised "scale must be a real number, got SymFloat zuf0")."""
    torch.manual_seed(0)
    W, A, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)

    class M(nn.Module):
        def forward(self, x, s):
            if op == "lora_linear":
                return lora_linear(x, W, None, A, B, s)
            return lora_apply_(torch.zeros(x.shape[0], 6), x, A, B, s)

    x, s = torch.randn(3, 8), torch.tensor(0.7)
    with torch.no_grad():  # eager: the tensor's value is read
        _close(M()(x, s), M()(x, 0.7))
    with torch.no_grad(), pytest.raises(Exception, match=rf"{op}: scale is a tensor.*torch.export.*Python float"):
        torch.export.export(M(), (x, s), strict=strict)
    # a Python float scale exports (it is a constant of the program)
    ep = torch.export.export(M(), (x, 0.7), strict=strict)
    with torch.no_grad():
        _close(ep.module()(x, 0.7), M()(x, 0.7))


# ------------------------------------------------------------------ merged state dicts
@pytest.mark.parametrize("dora", [False, True])
def test_merged_state_dict_into_unmerged_model_raises(dora):
    """state_dict() of a merged model holds merged weights and the factors; loaded into a fresh
    (unmerged) model it would apply the adapter twice. It is marked, also through torch.save /
    torch.load(weights_only=True), and refused naming the layer."""
    net = _net(dora)
    ids = torch.randint(0, 30, (2, 7))
    with torch.no_grad():
        ref = net(ids)
    lora_ext.merge(net)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = _net(dora, seed=1)
    with pytest.raises(RuntimeError, match=r"LoRAEmbedding 'emb': the state dict is a merged layer's.*twice"):
        fresh.load_state_dict(sd)
    for name in ("'l1'", "'qkv'", "'conv'", "LoRAParameter 'head'"):  # every merged layer is named
        with pytest.raises(RuntimeError, match=name):
            _net(dora, seed=1).load_state_dict(sd)
    # what the message suggests works: the unmerged state dict, or the adapter alone
    lora_ext.unmerge(net)
    fresh = _net(dora, seed=1)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        _close(fresh(ids), ref)
    # a merged model loading an unmerged one's factors (no weights) stays right
    lora_ext.merge(fresh)
    fresh.load_state_dict(lora_ext.lora_state_dict(net, peft_names=False), strict=False)
    with torch.no_grad():
        _close(fresh(ids), ref, tol=1e-4)


def test_merged_model_whole_save_and_copies_unmerge_exactly():
    """torch.save(model) / pickle / deepcopy of a merged model keep its merge state: unmerged, the
    copy has the original weights bit for bit (the state dict's mark is not involved)."""
    net = _net()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    lora_ext.merge(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    for copy_ in (torch.load(buf, weights_only=False), copy.deepcopy(net)):
        lora_ext.unmerge(copy_)
        for k, v in copy_.state_dict().items():
            assert torch.equal(v, w0[k]), k


# ------------------------------------------------------------------ compile / export round trips
@pytest.mark.parametrize("dora", [False, True])
def test_export_dynamic_shapes_save_load_matches_eager(dora):
    net = _net(dora)
    ids = torch.randint(0, 30, (2, 7))
    dims = ({0: torch.export.Dim("b", min=1, max=64), 1: torch.export.Dim("t", min=2, max=64)},)
    ep = torch.export.export(net, (ids,), dynamic_shapes=dims)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    with torch.no_grad():
        for shape in [(1, 2), (3, 5), (5, 33)]:
            x = torch.randint(0, 30, shape)
            _close(loaded(x), net(x))


def test_compile_fullgraph_follows_rank_scale_and_merge_changes():
    """One compiled model follows set_lora_factors (same rank, another rank, rank 1), a new scaling,
    merge / unmerge and train / eval, each call equal to eager, with no graph breaks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lora_ext.inject(model, target_modules=["0", "2"], r=4, alpha=8)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(5, 16)
    layer = model[0]
    for r in (4, 7, 1, 3):
        layer.set_lora_factors(torch.randn(r, 16), torch.randn(32, r), 0.25 * r)
        with torch.no_grad():
            _close(compiled(x), model(x))
        lora_ext.merge(model)
        with torch.no_grad():
            _close(compiled(x), model(x))
        lora_ext.unmerge(model)
    layer.scaling = 1.5
    model.train()
    x.requires_grad_(True)
    y, y_ref = compiled(x), model(x)
    _close(y, y_ref)
    g, = torch.autograd.grad(y.square().sum(), layer.lora_A)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), layer.lora_A)
    _close(g, g_ref, tol=1e-4)
