"""Multi-adapter serving under tensor parallelism (lora_ext.tp + AdapterPool): a tiny Llama whose
pool layers are sharded Megatron-style (colwise q/k/v + rowwise o_proj, colwise gate/up + rowwise
down_proj) on 2 gloo ranks, in processes the test spawns. Mixed batches must give the logits of the
unsharded pool, each rank must hold only its shard of every slot, the forward must run exactly the
collectives of the same plan on the plain model, and a plan that does not fit must raise a
ValueError naming the module."""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lora_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402

TOL = 1e-5  # fp32, relative to the largest logit: TP only reorders sums
ATTN = {"model.layers.*.self_attn.q_proj": "col", "model.layers.*.self_attn.k_proj": "col",
        "model.layers.*.self_attn.v_proj": "col", "model.layers.*.self_attn.o_proj": "row"}
MLP = {"model.layers.*.mlp.gate_proj": "col", "model.layers.*.mlp.up_proj": "col",
       "model.layers.*.mlp.down_proj": "row"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["a0", None, "a2", "a1", "a0"]


def _plan(spec, lora=True):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA
    styles = {"col": ColwiseParallelLoRA, "row": RowwiseParallelLoRA} if lora else \
        {"col": ColwiseParallel, "row": RowwiseParallel}
    return {k: styles[v]() for k, v in spec.items()}


def _adapters(model, ranks=(2, 4, 8, 3)):
    """Adapters a0..a3 (seeded, identical on every rank) on every TARGETS layer of model."""
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}
    g = torch.Generator().manual_seed(7)
    return {f"a{i}": lora_ext.Adapter({n: lora_ext.LayerWeights(torch.randn(r, i_, generator=g) * 0.2,
                                                                torch.randn(o, r, generator=g) * 0.2, 2.0 / r)
                                       for n, (i_, o) in shapes.items()})
            for i, r in enumerate(ranks)}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(rows, cols, seed=0):
    return torch.randint(0, 128, (rows, cols), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- scenarios (run on every rank)
@torch.no_grad()
def _parity(mesh, spec):
    from models import tiny_llama

    from lora_ext.tp import parallelize_lora
    base = tiny_llama()
    ads = _adapters(base)
    ref = copy.deepcopy(base)
    ref_pool = lora_ext.AdapterPool(ref, target_modules=TARGETS, max_adapters=4, max_rank=8)
    tp = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(tp, target_modules=TARGETS, max_adapters=3, max_rank=8)
    for n, ad in ads.items():
        ref_pool.load(n, ad)
    pool.load("a0", ads["a0"])  # loaded before: sharded with the pools
    parallelize_lora(tp, mesh, _plan(spec))
    pool.load("a1", ads["a1"])  # loaded after: set_slot writes the local shard
    pool.load("a2", ads["a2"])
    errs = {}
    ids = _ids(len(NAMES), 9)
    with pool.batch(NAMES), ref_pool.batch(NAMES):
        want = ref(input_ids=ids).logits
        errs["rows"] = _rel(tp(input_ids=ids).logits, want)
    effect = _rel(want, base(input_ids=ids).logits)  # the adapters matter: parity is not trivial
    tok = [n for n in NAMES for _ in range(ids.shape[1])]
    with pool.batch(tok, per_token=True), ref_pool.batch(tok, per_token=True):
        errs["tokens"] = _rel(tp(input_ids=ids.reshape(1, -1)).logits, ref(input_ids=ids.reshape(1, -1)).logits)
    pool.load("a3", ads["a3"])  # evicts the least recently used adapter: a slot rewritten in place
    names = ["a3", "a2", None, "a3"]
    with pool.batch(names), ref_pool.batch(names):
        errs["swap"] = _rel(tp(input_ids=ids[:4]).logits, ref(input_ids=ids[:4]).logits)
    errs["base"] = _rel(tp(input_ids=ids).logits, base(input_ids=ids).logits)  # outside a batch
    # every rank holds its shard of every slot, equal to that slice of the full factors
    k, n = mesh.get_local_rank(), mesh.size()
    shards = {}
    for path, how in spec.items():
        name = path.replace("*", "1")
        layer, w = pool.layers[name], ads["a2"].layers[name]
        slot, r = pool._entries["a2"].slot, w.r
        if how == "col":
            o = layer.out_features // n
            shards[name] = (tuple(layer.A_pool.shape), tuple(layer.B_pool.shape), layer.out_shard,
                            torch.equal(layer.B_pool[slot, :, :r], w.B[k * o:(k + 1) * o]),
                            torch.equal(layer.A_pool[slot, :r], w.A))
        else:
            i = layer.in_features // n
            shards[name] = (tuple(layer.A_pool.shape), tuple(layer.B_pool.shape), layer.in_shard,
                            torch.equal(layer.A_pool[slot, :r], w.A[:, k * i:(k + 1) * i]),
                            torch.equal(layer.B_pool[slot, :, :r], w.B))
    return {"errs": errs, "shards": shards, "effect": effect}


@torch.no_grad()
def _gpt2(mesh):
    """transformers Conv1D (weight [in, out]): GPT-2 MLP, colwise c_fc + rowwise c_proj."""
    from models import tiny_gpt2

    from lora_ext.tp import parallelize_lora
    base = tiny_gpt2()
    g = torch.Generator().manual_seed(3)
    shapes = {f"transformer.h.{i}.mlp.{n}": s for i in range(2) for n, s in (("c_fc", (64, 256)), ("c_proj", (256, 64)))}
    ads = {f"g{j}": lora_ext.Adapter({n: lora_ext.LayerWeights(torch.randn(r, i, generator=g) * 0.2,
                                                               torch.randn(o, r, generator=g) * 0.2, 1.0)
                                      for n, (i, o) in shapes.items()}) for j, r in enumerate((2, 4))}
    models = {}
    for key in ("ref", "tp"):
        models[key] = m = copy.deepcopy(base)
        pool = lora_ext.AdapterPool(m, target_modules=list(shapes), max_adapters=2, max_rank=4)
        if key == "tp":
            parallelize_lora(m, mesh, _plan({"transformer.h.*.mlp.c_fc": "col", "transformer.h.*.mlp.c_proj": "row"}))
        for n, ad in ads.items():
            pool.load(n, ad)
        models[key + "_pool"] = pool
    names, ids = ["g1", None, "g0"], _ids(3, 7)
    with models["tp_pool"].batch(names), models["ref_pool"].batch(names):
        want = models["ref"](input_ids=ids).logits
        return {"err": _rel(models["tp"](input_ids=ids).logits, want),
                "effect": _rel(want, base(input_ids=ids).logits)}


@torch.no_grad()
def _packed(mesh):
    """MultiLoRALinear used directly: colwise up + rowwise packed projection (out_slices), per-slice
    ranks and scales, a slice left out, slots loaded before and after parallelizing; per-token and
    per-row [B, S, H] batches and an empty one against the unsharded layers."""
    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA, parallelize_lora
    ctx, ref_ctx = lora_ext.LoRAContext(16), lora_ext.LoRAContext(16)
    torch.manual_seed(0)
    tp = nn.Sequential(lora_ext.MultiLoRALinear(nn.Linear(16, 32), 3, 8, context=ctx),
                       lora_ext.MultiLoRALinear(nn.Linear(32, 32), 3, 8, out_slices=[16, 8, 8], context=ctx))
    g = torch.Generator().manual_seed(1)

    def fac(i, o, r):
        return torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
    (qa, qb), (ka, kb), (va, vb), (ua, ub), (wa, wb) = fac(32, 16, 8), fac(32, 8, 5), fac(32, 8, 3), fac(16, 32, 6), fac(16, 32, 2)
    tp[1].set_slot(0, [qa, None, va], [qb, None, vb], [0.5, 1.0, 3.0])
    tp[0].set_slot(1, ua, ub, 1.5)
    ref = copy.deepcopy(tp)
    lora_ext.attach_context(ref, ref_ctx)
    parallelize_lora(tp, mesh, {"0": ColwiseParallelLoRA(), "1": RowwiseParallelLoRA()})
    for m in (tp, ref):  # loaded after: each rank writes its shard
        m[1].set_slot(2, [None, ka, va], [None, kb, vb], [1.0, 2.0, 0.25])
        m[0].set_slot(2, wa, wb, 3.0)
    errs = {}
    for name, idx, per_row, shape in [("tokens", [0, 2, -1, 1, 2, 0], False, (2, 3, 16)),
                                      ("rows", [2, 0], True, (2, 3, 16)), ("empty", [], False, (0, 16))]:
        x = torch.randn(*shape, generator=g)
        ctx.set_indices(idx, per_row=per_row)
        ref_ctx.set_indices(idx, per_row=per_row)
        want, got = ref(x), tp(x)
        errs[name] = (tuple(got.shape) == shape[:-1] + (32,), _rel(got, want) if want.numel() else 0.0)
    return {"errs": errs, "in_shard": tp[1].in_shard, "A_pool": tuple(tp[1].A_pool.shape)}


def _comm_mode():
    from torch.distributed.tensor.debug import CommDebugMode

    class Counted(CommDebugMode):
        """CommDebugMode that also sums the bytes each collective sends (its input tensor)."""

        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.get_total_counts()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.get_total_counts() > before:
                t = next(a for a in args if isinstance(a, torch.Tensor))
                self.bytes += t.numel() * t.element_size()
            return out

    return Counted()


@torch.no_grad()
def _comms(mesh):
    """Forward collectives (count, bytes) of the plain model with torch's styles vs the pool model
    with the LoRA styles, a mixed batch; the same plan (attention + MLP) on both."""
    from models import tiny_llama
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.tp import parallelize_lora
    spec = {**ATTN, **MLP}
    base = tiny_llama()
    ads = _adapters(base)
    plain = parallelize_module(copy.deepcopy(base), mesh, _plan(spec, lora=False))
    tp = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(tp, target_modules=TARGETS, max_adapters=3, max_rank=8)
    parallelize_lora(tp, mesh, _plan(spec))
    for n in ("a0", "a1", "a2"):
        pool.load(n, ads[n])
    ids = _ids(len(NAMES), 9)
    res = {}
    with _comm_mode() as c:
        plain(input_ids=ids)
    res["plain"] = (c.get_total_counts(), c.bytes, {str(k): v for k, v in c.get_comm_counts().items()})
    with pool.batch(NAMES):
        with _comm_mode() as c:
            tp(input_ids=ids)
    res["pool"] = (c.get_total_counts(), c.bytes, {str(k): v for k, v in c.get_comm_counts().items()})
    return res


def _bad(mesh):
    from models import tiny_llama
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA, parallelize_lora
    msgs = {}
    catch = dist_helpers.error_catcher(msgs)

    def pooled():
        model = tiny_llama(layers=1)
        lora_ext.AdapterPool(model, target_modules=TARGETS, max_adapters=2, max_rank=4)
        return model

    model = pooled()
    before = {n: type(m) for n, m in model.named_modules()}
    catch("embedding", lambda: parallelize_lora(model, mesh, {"model.layers.0.mlp.up_proj": ColwiseParallelLoRA(),
                                                              "model.embed_tokens": ColwiseParallelLoRA()}))
    catch("torch_style", lambda: parallelize_lora(model, mesh, {"model.layers.*.mlp.up_proj": ColwiseParallel()}))
    catch("torch_on_base", lambda: parallelize_lora(model, mesh, {"model.layers.0.mlp.down_proj.base": ColwiseParallel()}))
    catch("no_match", lambda: parallelize_lora(model, mesh, {"model.layers.*.mlp.upproj": ColwiseParallelLoRA()}))
    catch("twice_in_plan", lambda: parallelize_lora(model, mesh, {"model.layers.0.mlp.up_proj": ColwiseParallelLoRA(),
                                                                  "model.layers.*.mlp.up_proj": ColwiseParallelLoRA()}))
    msgs["untouched"] = before == {n: type(m) for n, m in model.named_modules()} and not any(
        type(p) is not nn.Parameter for p in model.parameters())
    odd = nn.Sequential(lora_ext.MultiLoRALinear(nn.Linear(15, 7), 2, 4), lora_ext.MultiLoRALinear(nn.Linear(8, 6), 2, 4,
                                                                                                   out_slices=[2, 4]))
    catch("colwise_odd", lambda: parallelize_module(odd, mesh, {"0": ColwiseParallelLoRA()}))
    catch("rowwise_odd", lambda: parallelize_lora(odd, mesh, {"0": RowwiseParallelLoRA()}))
    catch("packed", lambda: parallelize_lora(odd, mesh, {"1": ColwiseParallelLoRA()}))
    parallelize_lora(model, mesh, {"model.layers.0.mlp.up_proj": ColwiseParallelLoRA()})
    catch("twice", lambda: parallelize_lora(model, mesh, {"model.layers.0.mlp.up_proj": ColwiseParallelLoRA()}))
    # the base layers sharded with torch's styles first: the pool refuses them, naming the module
    plain = parallelize_module(tiny_llama(layers=1), mesh, {"model.layers.0.mlp.up_proj": ColwiseParallel()})
    catch("pool_after_tp", lambda: lora_ext.AdapterPool(plain, target_modules=TARGETS, max_adapters=2, max_rank=4))
    msgs["pool_after_tp_untouched"] = not any(isinstance(m, lora_ext.MultiLoRALinear) for m in plain.modules())
    return msgs


SCENARIOS = {"attn": lambda mesh: _parity(mesh, ATTN), "mlp": lambda mesh: _parity(mesh, MLP),
             "both": lambda mesh: _parity(mesh, {**ATTN, **MLP}), "comms": _comms, "bad": _bad, "gpt2": _gpt2,
             "packed": _packed}


def spawn(names, world=2):
    """Runs the scenarios on `world` gloo ranks; returns one result dict per rank."""
    return dist_helpers.spawn_scenarios(__name__, names, world)


def _get(results, name):
    for rank, res in enumerate(results):
        if isinstance(res[name], dict) and "error" in res[name]:
            pytest.fail(f"rank {rank}, {name}:\n{res[name]['error']}")
    return [res[name] for res in results]


pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def ws2():
    pytest.importorskip("transformers")
    return spawn(["attn", "mlp", "gpt2", "comms", "bad", "packed"], world=2)


def _check_parity(per_rank, spec):
    for rank, res in enumerate(per_rank):
        assert res["effect"] > 1e-2
        for key, err in res["errs"].items():
            assert err < TOL, f"rank {rank}: {key} logits differ from the unsharded pool by {err:.3g}"
        for name, (a_shape, b_shape, shard, own, replicated) in res["shards"].items():
            colwise = spec[name.replace(".1.", ".*.")] == "col"
            full_in, full_out = a_shape[-1] * (1 if colwise else 2), b_shape[1] * (2 if colwise else 1)
            half = (full_out if colwise else full_in) // 2
            assert shard == (rank * half, (rank + 1) * half), (name, shard)
            assert own and replicated, f"rank {rank}: {name} slot does not hold its shard of the adapter"


def test_attention_plan_matches_unsharded_pool(ws2):
    """Colwise q/k/v (2 of 4 query heads, 1 of 2 kv heads per rank) + rowwise o_proj."""
    _check_parity(_get(ws2, "attn"), ATTN)


def test_mlp_plan_matches_unsharded_pool(ws2):
    _check_parity(_get(ws2, "mlp"), MLP)


def test_conv1d_mlp_matches_unsharded_pool(ws2):
    for res in _get(ws2, "gpt2"):
        assert res["effect"] > 1e-2 and res["err"] < TOL, res


def test_packed_rowwise_matches_unsharded(ws2):
    """Packed q/k/v rowwise with per-slice ranks and scales (MultiLoRALinear used directly)."""
    for rank, res in enumerate(_get(ws2, "packed")):
        assert res["in_shard"] == (16 * rank, 16 * (rank + 1)) and res["A_pool"] == (3, 3, 8, 16)
        for name, (shape_ok, err) in res["errs"].items():
            assert shape_ok and err < TOL, (rank, name, err)


def test_forward_adds_no_collective(ws2):
    for res in _get(ws2, "comms"):
        # 2 decoder layers: one all-reduce each for o_proj and down_proj, with and without adapters
        assert res["pool"][0] == res["plain"][0] == 4, res
        assert res["pool"][1] == res["plain"][1], res  # same bytes: the base all-reduce covers LoRA
        assert res["pool"][2] == res["plain"][2], res


def test_bad_plan_raises(ws2):
    m = _get(ws2, "bad")[0]
    assert "'model.embed_tokens'" in m["embedding"] and "not a lora_ext LoRALinear" in m["embedding"]
    assert "'model.layers.0.mlp.up_proj'" in m["torch_style"] and "ColwiseParallelLoRA" in m["torch_style"]
    assert "'model.layers.0.mlp.down_proj.base'" in m["torch_on_base"]
    assert "the base layer of 'model.layers.0.mlp.down_proj'" in m["torch_on_base"]
    assert "'model.layers.*.mlp.upproj' matches no submodule" in m["no_match"]
    assert "'model.layers.0.mlp.up_proj' is matched by two plan entries" in m["twice_in_plan"]
    assert m["untouched"]
    assert "MultiLoRALinear(in=15, out=7" in m["colwise_odd"] and "out_features=7 is not divisible" in m["colwise_odd"]
    assert "module '0'" in m["rowwise_odd"] and "in_features=15 is not divisible by the mesh size 2" in m["rowwise_odd"]
    assert "module '1'" in m["packed"] and "packed projection" in m["packed"]
    assert "already parallelized" in m["twice"]
    assert "AdapterPool: module 'model.layers.0.mlp.up_proj'" in m["pool_after_tp"]
    assert "already tensor-parallel" in m["pool_after_tp"]
    assert m["pool_after_tp_untouched"]
