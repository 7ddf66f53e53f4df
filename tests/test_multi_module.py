"""MultiLoRALinear (nn.Linear, Conv1D), MultiLoRAEmbedding + LoRAContext: slots, per-token and
per-row indices, slices, torch.compile without recompiles on index/adapter changes, CUDA graph replay."""
import pytest
import torch
from conftest import RTOL, devices, rel_err
from torch import nn

from lora_ext import LoRAContext, MultiLoRALinear, attach_context
from lora_ext.multi import MultiLoRAEmbedding


def adapters(n, in_f, out_f, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, in_f, generator=g) / in_f**0.5, torch.randn(out_f, r, generator=g), 0.5 + k)
            for k, r in enumerate(ranks[:n])]


def expected(base, x, idx, ads):
    """fp64: base(x) + per-token adapter."""
    x2 = x.reshape(-1, x.shape[-1]).double().cpu()
    y = x2 @ base.weight.double().cpu().T + base.bias.double().cpu()
    for t, a in enumerate(idx.tolist()):
        if a >= 0 and ads[a] is not None:
            A, B, s = ads[a]
            y[t] += s * (B.double() @ (A.double() @ x2[t]))
    return y.reshape(*x.shape[:-1], -1)


class Model(nn.Module):
    def __init__(self, d, slots, r_max, ctx, dtype, device):
        super().__init__()
        self.l1 = MultiLoRALinear(nn.Linear(d, 2 * d).to(device, dtype), slots, r_max)
        self.l2 = MultiLoRALinear(nn.Linear(2 * d, d).to(device, dtype), slots, r_max)
        attach_context(self, ctx)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_reference(device, dtype):
    base = nn.Linear(48, 40).to(device, dtype)
    ctx = LoRAContext(64, device)
    layer = MultiLoRALinear(base, num_slots=4, r_max=16, context=ctx)
    ads = adapters(3, 48, 40, [16, 3, 9])
    for s, (A, B, sc) in enumerate(ads):
        layer.set_slot(s, A.to(device, dtype), B.to(device, dtype), sc)
    ads.append(None)  # slot 3 stays empty
    x = torch.randn(2, 5, 48).to(device, dtype)
    idx = torch.tensor([0, 1, 2, 3, -1, 2, 2, 0, 1, -1], dtype=torch.int32)
    ctx.set_indices(idx)
    with torch.no_grad():
        y = layer(x)
    ref = expected(base, x, idx, [None if a is None else (a[0].to(dtype), a[1].to(dtype), a[2]) for a in ads])
    assert y.shape == (2, 5, 40) and rel_err(y, ref) < RTOL[dtype]
    layer.clear_slot(1)
    ads[1] = None
    with torch.no_grad():
        y = layer(x)
    ref = expected(base, x, idx, [None if a is None else (a[0].to(dtype), a[1].to(dtype), a[2]) for a in ads])
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_sliced_layer(device):
    base = nn.Linear(32, 64 + 16 + 16).to(device)
    layer = MultiLoRALinear(base, 3, 8, out_slices=[64, 16, 16], context=LoRAContext(16, device))
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(4, 32, generator=g), torch.randn(64, 4, generator=g))
    v = (torch.randn(8, 32, generator=g), torch.randn(16, 8, generator=g))
    layer.set_slot(1, [q[0], None, v[0]], [q[1], None, v[1]], 2.0)  # k not adapted
    x = torch.randn(6, 32, device=device)
    layer.context.set_indices([1, -1, 1, 0, 1, 1])
    with torch.no_grad():
        y = layer(x)
    ref = (x.double() @ base.weight.double().T + base.bias.double()).cpu()
    for t in (0, 2, 4, 5):
        ref[t, :64] += 2.0 * (q[1].double() @ (q[0].double() @ x[t].double().cpu()))
        ref[t, 80:] += 2.0 * (v[1].double() @ (v[0].double() @ x[t].double().cpu()))
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_model_to_half_keeps_fp32_scales(device):
    """model.to(bf16) after the slots are loaded (the usual serving order): pools follow the
    base weight, scales stay fp32 with their exact values (1/3 is not a bf16 number)."""
    ctx = LoRAContext(8, device)
    model = Model(16, 2, 4, ctx, torch.float32, device)
    ads = adapters(2, 16, 32, [4, 2])
    for s, (A, B, _) in enumerate(ads):
        model.l1.set_slot(s, A, B, 1 / 3)
    model.to(torch.bfloat16)
    assert model.l1.A_pool.dtype == torch.bfloat16 and model.l1.scales.dtype == torch.float32
    assert model.l1.scales.tolist() == torch.tensor([1 / 3] * 2).tolist()
    ctx.set_indices([0, 1, -1, 1])
    x = torch.randn(4, 16, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model.l1(x)
    ref = expected(model.l1.base, x, torch.tensor([0, 1, -1, 1]),
                   [(A.bfloat16(), B.bfloat16(), 1 / 3) for A, B, _ in ads])
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2


def test_layer_errors():
    layer = MultiLoRALinear(nn.Linear(8, 6), 2, 4)
    with pytest.raises(RuntimeError, match="no LoRAContext"):
        with torch.no_grad():
            layer(torch.randn(3, 8))
    layer.context = LoRAContext(4)
    with pytest.raises(ValueError, match="1 <= r <= 4"):
        layer.set_slot(0, torch.randn(5, 8), torch.randn(6, 5), 1.0)
    with pytest.raises(ValueError, match="B must be"):
        layer.set_slot(0, torch.randn(2, 8), torch.randn(6, 3), 1.0)
    with pytest.raises(IndexError):
        layer.clear_slot(2)
    with pytest.raises(RuntimeError, match="inference layer"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="max_tokens"):
        layer.context.set_indices(torch.zeros(5, dtype=torch.int32))
    layer.context.set_indices([0, 7, -1])
    with pytest.raises(RuntimeError, match="out of range"), torch.no_grad():
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"5 tokens \(leading dims \(5,\)\) but 3 token indices"), torch.no_grad():
        layer(torch.randn(5, 8))


@pytest.mark.parametrize("device", devices())
def test_per_row_indices(device):
    """per_row=True: one slot per batch row (dim 0 of the layer input), whatever the leading shape."""
    base = nn.Linear(12, 10).to(device)
    ctx = LoRAContext(8, device)
    layer = MultiLoRALinear(base, 2, 4, context=ctx)
    ads = adapters(2, 12, 10, [4, 2], seed=5)
    for s, (A, B, sc) in enumerate(ads):
        layer.set_slot(s, A.to(device), B.to(device), sc)
    ctx.set_indices([1, -1, 0], per_row=True)
    with torch.no_grad():
        for shape in [(3, 12), (3, 4, 12), (3, 2, 5, 12)]:
            x = torch.randn(shape, device=device)
            idx = torch.tensor([1, -1, 0]).repeat_interleave(x[0, ..., 0].numel())
            assert rel_err(layer(x), expected(base, x, idx, ads)) < 1e-5
        with pytest.raises(ValueError, match=r"2 batch rows \(leading dims \(2, 4\)\) but 3 row indices"):
            layer(torch.randn(2, 4, 12, device=device))
        with pytest.raises(ValueError, match="1 batch rows"):
            layer(torch.randn(12, device=device))
        # the layers of one forward share the per-token indices; new indices are never served stale
        x = torch.randn(3, 4, 12, device=device)
        assert ctx.tokens(x.shape[:-1]) is ctx.tokens(x.shape[:-1])
        for rows in ([0, 1, -1], [-1, -1, 1]):
            ctx.set_indices(rows, per_row=True)
            idx = torch.tensor(rows).repeat_interleave(4)
            assert torch.equal(ctx.tokens(x.shape[:-1]).cpu(), idx.to(torch.int32))
            assert rel_err(layer(x), expected(base, x, idx, ads)) < 1e-5
        ctx.clear()
        assert torch.equal(ctx.tokens(torch.Size([2, 4])).cpu(), torch.full((8,), -1, dtype=torch.int32))


@pytest.mark.parametrize("device", devices())
def test_conv1d_layer(device):
    """transformers' Conv1D (weight [in, out]) is served like nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(20, 16).to(device)  # nf = out, nx = in
    torch.nn.init.normal_(conv.bias)
    ctx = LoRAContext(8, device)
    layer = MultiLoRALinear(conv, 2, 8, context=ctx)
    assert (layer.in_features, layer.out_features) == (16, 20)
    A, B, sc = adapters(1, 16, 20, [8])[0]
    layer.set_slot(1, A.to(device), B.to(device), sc)
    x = torch.randn(2, 3, 16, device=device)
    ctx.set_indices([1, -1, 1, 1, 0, -1])
    with torch.no_grad():
        y = layer(x)
    lin = nn.Linear(16, 20)
    lin.weight.data, lin.bias.data = conv.weight.detach().T.cpu(), conv.bias.detach().cpu()
    assert rel_err(y, expected(lin, x, torch.tensor([1, -1, 1, 1, 0, -1]), [None, (A, B, sc)])) < 1e-5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_layer(device, dtype):
    """PEFT's LoRA embedding per token: y = E[id] + s * B @ A[:, id] (A [r, num_embeddings], B [dim, r])."""
    emb = nn.Embedding(50, 24).to(device, dtype)
    ctx = LoRAContext(16, device)
    layer = MultiLoRAEmbedding(emb, 3, 8, context=ctx)
    ads = [(A.to(dtype), B.to(dtype), sc) for A, B, sc in adapters(2, 50, 24, [8, 3], seed=7)]
    for s, (A, B, sc) in enumerate(ads):
        layer.set_slot(s, A.to(device), B.to(device), sc)
    ids = torch.randint(0, 50, (2, 5), device=device)
    idx = [0, 1, -1, 2, 0, 1, 1, -1, 0, 2]  # slot 2 stays empty
    ctx.set_indices(idx)
    with torch.no_grad():
        y = layer(ids)
    ref = emb.weight.double().cpu()[ids.reshape(-1).cpu()]
    for t, (i, a) in enumerate(zip(ids.reshape(-1).tolist(), idx)):
        if a in (0, 1):
            A, B, sc = ads[a]
            ref[t] += sc * (B.double() @ A.double()[:, i])
    assert y.shape == (2, 5, 24) and rel_err(y, ref.reshape(2, 5, 24)) < RTOL[dtype]
    ctx.set_indices([2, 0], per_row=True)
    with torch.no_grad():
        y = layer(ids)
    A, B, sc = ads[0]
    assert rel_err(y[0], emb(ids[0])) == 0
    assert rel_err(y[1], emb(ids[1]).double().cpu() + sc * (A.double()[:, ids[1].cpu()].T @ B.double().T)) < RTOL[dtype]
    with pytest.raises(ValueError, match="A must be"):
        layer.set_slot(0, torch.randn(2, 24), torch.randn(24, 2), 1.0)


@pytest.mark.parametrize("device", devices())
def test_compile_no_recompile_on_swaps(device):
    torch._dynamo.reset()
    ctx = LoRAContext(32, device)
    model = Model(16, 3, 8, ctx, torch.float32, device)
    ads = adapters(3, 16, 32, [8, 2, 5], seed=3)
    for s, (A, B, sc) in enumerate(ads):
        model.l1.set_slot(s, A.to(device), B.to(device), sc)
    cmodel = torch.compile(model, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(4):
            if step == 2:  # swap an adapter of a different rank into slot 1
                A, B, sc = adapters(1, 16, 32, [7], seed=9)[0]
                model.l1.set_slot(1, A.to(device), B.to(device), sc)
                model.l2.set_slot(0, *[t.to(device) for t in adapters(1, 32, 16, [3])[0][:2]], 0.25)
            x = torch.randn(2, 6, 16, device=device)
            ctx.set_indices(torch.randint(-1, 3, (12,), generator=gen))
            ref = model(x)
            out = cmodel(x)
            assert rel_err(out, ref) < 1e-5


@pytest.mark.cuda
def test_cuda_graph_model_replay():
    ctx = LoRAContext(64, "cuda")
    model = Model(64, 4, 16, ctx, torch.bfloat16, "cuda")
    for s, (A, B, sc) in enumerate(adapters(4, 64, 128, [16, 4, 8, 1])):
        model.l1.set_slot(s, A.cuda().bfloat16(), B.cuda().bfloat16(), sc)
    xs = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    ctx.set_indices(torch.zeros(40, dtype=torch.int32))
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(xs)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = model(xs)
        for seed in range(3):
            idx = torch.randint(-1, 4, (40,), generator=torch.Generator().manual_seed(seed))
            ctx.set_indices(idx)
            xs.copy_(torch.randn_like(xs))
            g.replay()
            ref = model(xs)
            torch.cuda.synchronize()
            assert rel_err(ys, ref) < RTOL[torch.bfloat16]
        ctx.check()


def test_slots_writable_after_cast_in_inference_mode():
    """model.half() / .to(...) inside torch.inference_mode() (a server's load path): the pools must
    stay normal tensors, so set_slot / clear_slot work afterwards outside inference mode, e.g. from
    a loader thread (inference mode is per thread)."""
    import threading

    ctx = LoRAContext(8)
    layer = MultiLoRALinear(nn.Linear(16, 12), 2, 4, context=ctx)
    with torch.inference_mode():
        layer.to(torch.bfloat16)
    assert layer.A_pool.dtype == torch.bfloat16 and layer.scales.dtype == torch.float32
    A, B, sc = adapters(1, 16, 12, [3])[0]
    errors = []

    def load():
        try:
            layer.set_slot(1, A, B, sc)
            layer.clear_slot(0)
        except RuntimeError as e:
            errors.append(e)
    t = threading.Thread(target=load)
    t.start()
    t.join()
    assert not errors, errors
    ctx.set_indices([1, 0, -1])
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    ref = expected(layer.base, x, torch.tensor([1, -1, -1]), [None, (A.bfloat16(), B.bfloat16(), sc)])
    assert rel_err(y, ref) < RTOL[torch.bfloat16]


def test_sliced_layer_per_slice_scales():
    """A packed q/v projection from a PEFT adapter with rank_pattern: the slices differ in r, so
    their alpha/r differ too; set_slot takes one scale per slice. Bad scales leave the slot as it was."""
    base = nn.Linear(24, 16 + 8 + 8)
    ctx = LoRAContext(8)
    layer = MultiLoRALinear(base, 2, 8, out_slices=[16, 8, 8], context=ctx)
    (qa, qb, _), (va, vb, _) = adapters(2, 24, 16, [8, 4], seed=11)
    vb = vb[:8]
    layer.set_slot(0, [qa, None, va], [qb, None, vb], [16 / 8, 1.0, torch.tensor(16 / 4)])
    assert layer.scales[:, 0].tolist() == [2.0, 0.0, 4.0] and layer.ranks[:, 0].tolist() == [8, 0, 4]
    x = torch.randn(3, 24)
    ctx.set_indices([0, -1, 0])
    with torch.no_grad():
        y = layer(x)
    ref = (x.double() @ base.weight.double().T + base.bias.double())
    for t in (0, 2):
        ref[t, :16] += 2.0 * (qb.double() @ (qa.double() @ x[t].double()))
        ref[t, 24:] += 4.0 * (vb.double() @ (va.double() @ x[t].double()))
    assert rel_err(y, ref) < 1e-5
    before = [t.clone() for t in (layer.A_pool, layer.B_pool, layer.scales, layer.ranks)]
    for bad, err, msg in [(float("nan"), ValueError, r"set_slot: scale must be finite"),
                          ([1.0, float("inf"), 1.0], ValueError, r"scale\[1\] must be finite"),
                          ([1.0, 2.0], ValueError, "a number or 3 numbers"), ("2", TypeError, "real number")]:
        with pytest.raises(err, match=msg):
            layer.set_slot(0, [va, qa, va], [vb, qb[:8, :], vb], bad)
    with pytest.raises(ValueError, match="slice 1 must both be tensors or both None"):
        layer.set_slot(0, [qa, None, va], [qb, vb, vb], 1.0)
    plain = MultiLoRALinear(nn.Linear(24, 16), 2, 8, context=ctx)
    with pytest.raises(ValueError, match="scale must be a number, got 2 values"):
        plain.set_slot(0, qa, qb, [1.0, 2.0])
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.A_pool, layer.B_pool, layer.scales, layer.ranks)))


def test_empty_batch_and_negative_indices():
    """set_indices([]) (an empty batch; torch.as_tensor([]) is float32) serves T = 0 inputs of any
    leading shape; an index below -1 is reported as given, whatever the index dtype."""
    ctx = LoRAContext(8)
    layer = MultiLoRALinear(nn.Linear(16, 8), 2, 4, context=ctx)
    emb = MultiLoRAEmbedding(nn.Embedding(10, 8), 2, 4, context=ctx)
    layer.set_slot(1, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    with torch.inference_mode():
        for per_row in (False, True):
            ctx.set_indices([], per_row=per_row)
            assert layer(torch.randn(0, 5, 16)).shape == (0, 5, 8)
            assert emb(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 8)
        for dtype in (torch.int64, torch.int32):
            ctx.set_indices(torch.tensor([1, -2], dtype=dtype))
            with pytest.raises(RuntimeError, match=r"indices\[1\] = -2 is out of range"):
                layer(torch.randn(2, 16))


def test_lm_head_with_own_context():
    """An LM head applied to each sequence's last token only (vLLM's sampler indices) has its own
    context: the decoder layers see T tokens, the head one row per sequence; eager and compiled
    (dynamic T, no recompiles) equal the fp64 reference."""
    ctx, head_ctx = LoRAContext(16), LoRAContext(4)
    body = MultiLoRALinear(nn.Linear(12, 12), 2, 4, context=ctx)
    head = MultiLoRALinear(nn.Linear(12, 20), 2, 4, context=head_ctx)
    ads = adapters(2, 12, 20, [4, 2], seed=2)
    for s, (A, B, sc) in enumerate(ads):
        head.set_slot(s, A, B, sc)

    def run(x, last):
        return head(body(x)[last])
    compiled = torch.compile(run, dynamic=True, fullgraph=True)
    for step, (T, last, seqs) in enumerate([(7, [2, 6], [1, 0]), (9, [0, 4, 8], [-1, 1, 0]), (5, [1, 4], [0, 0])]):
        ctx.set_indices(torch.randint(-1, 2, (T,)))
        head_ctx.set_indices(seqs)
        x, last = torch.randn(T, 12), torch.tensor(last)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=step > 1):
            h = body(x)[last]
            want = expected(head.base, h, torch.tensor(seqs), ads)
            assert rel_err(run(x, last), want) < 1e-5 and rel_err(compiled(x, last), want) < 1e-5


@pytest.mark.parametrize("compiled", [False, True])
def test_cleared_context_is_the_base_for_any_size(compiled):
    """Cleared (outside a pool's batch), an input of more tokens than max_tokens gets the base
    output (it raised "more than max_tokens", eager and compiled); with indices set, an input of
    another number of tokens still raises (compiled: the op's error naming the mismatch)."""
    ctx = LoRAContext(4)
    layer = MultiLoRALinear(nn.Linear(8, 8), 2, 4, context=ctx)
    ads = adapters(1, 8, 8, [2])
    layer.set_slot(0, *ads[0])
    run = torch.compile(layer, dynamic=True, fullgraph=True) if compiled else layer
    with torch.no_grad():
        run(torch.randn(3, 8))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):  # one graph for all sizes
        for T in (6, 11, 3):
            x = torch.randn(T, 8)
            torch.testing.assert_close(run(x), layer.base(x), rtol=1e-6, atol=1e-6)
        ctx.set_indices([0, -1, 0])
        x = torch.randn(3, 8)
        assert rel_err(run(x), expected(layer.base, x, torch.tensor([0, -1, 0]), ads)) < 1e-5
        kind, msg = (RuntimeError, "rows/tokens differ") if compiled else (ValueError, "6 tokens .* but 3 token")
        with pytest.raises(kind, match=msg):
            run(torch.randn(6, 8))
        ctx.clear()
        x = torch.randn(9, 8)
        torch.testing.assert_close(run(x), layer.base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9),
                    reason="Dynamo before 2.9 traces no torch._check message")
def test_compiled_rows_over_max_tokens_says_so():
    """Compiled, per-row indices for an input of more batch rows than max_tokens: the symbolic
    check failed with torch's bare 'Expected cond to be True'."""
    layer = MultiLoRALinear(nn.Linear(8, 8), 2, 4, context=LoRAContext(4))
    layer.context.set_indices([0, 1], per_row=True)
    with torch.no_grad(), pytest.raises(Exception, match="more batch rows than the context's max_tokens"):
        torch.compile(layer, dynamic=True, fullgraph=True)(torch.randn(6, 2, 8))


@torch.no_grad()
def test_export_with_a_dynamic_token_count():
    """Non-strict torch.export of a MultiLoRALinear with per-row indices and a dynamic sequence length:
    the token count stays symbolic (torch.Size.numel() would specialize it) and the exported program
    matches eager at other lengths."""
    torch.manual_seed(0)
    ctx = LoRAContext(16)
    layer = MultiLoRALinear(nn.Linear(8, 6), num_slots=2, r_max=4, context=ctx)
    layer.set_slot(0, torch.randn(3, 8), torch.randn(6, 3), 0.5)
    layer.set_slot(1, torch.randn(4, 8), torch.randn(6, 4), 2.0)
    ctx.set_indices(torch.tensor([1, -1, 0]), per_row=True)
    holder = nn.Sequential(layer)
    ep = torch.export.export(holder, (torch.randn(3, 5, 8),), dynamic_shapes=({1: torch.export.Dim("T", max=64)},))
    for T in (2, 7):
        x = torch.randn(3, T, 8)
        torch.testing.assert_close(ep.module()(x), holder(x), rtol=0, atol=0)
