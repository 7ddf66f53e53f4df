"""Tensor-parallel LoRA (lora_ext.tp): ColwiseParallelLoRA / RowwiseParallelLoRA in
parallelize_module plans, on CPU with gloo, in processes the tests spawn themselves.

A Megatron MLP (colwise up-proj, rowwise down-proj, LoRA injected) must match the single-process
model (loss, input grad, every LoRA grad), and its forward must run exactly the collectives of
the same plan without LoRA (torch's ColwiseParallel / RowwiseParallel on plain Linears)."""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lora_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; TP only reorders sums


# ---------------------------------------------------------------- the model
class MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down_proj(F.gelu(self.up_proj(x)))


class Net(nn.Module):
    def __init__(self, d=16, h=32, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(MLP(d, h) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _models(seed=0, r=4):
    """(plain Linear model, the same with LoRA on up/down_proj and nonzero B)."""
    torch.manual_seed(seed)
    base = Net()
    lora = copy.deepcopy(base)
    lora_ext.inject(lora, target_modules=["up_proj", "down_proj"], r=r, alpha=8)
    lora_ext.mark_only_lora_trainable(lora)
    for m in lora_ext.lora_layers(lora).values():
        nn.init.normal_(m.lora_B, std=0.2)  # B = 0 would make every dA zero
    return base, lora


def _plans():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA
    lora = {"blocks.*.up_proj": ColwiseParallelLoRA(), "blocks.*.down_proj": RowwiseParallelLoRA()}
    base = {"blocks.*.up_proj": ColwiseParallel(), "blocks.*.down_proj": RowwiseParallel()}
    return base, lora


def _input(seed=1):
    torch.manual_seed(seed)
    return torch.randn(3, 5, 16)


def _loss(out):
    return out.square().mean()


# ---------------------------------------------------------------- comm counting
def _comm_mode():
    from torch.distributed.tensor.debug import CommDebugMode

    class Counted(CommDebugMode):
        """CommDebugMode that also sums the bytes each collective sends (its input tensor)."""

        def __init__(self):
            super().__init__()
            self.bytes = 0
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.get_total_counts()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.get_total_counts() > before:
                t = next(a for a in args if isinstance(a, torch.Tensor))
                self.bytes += t.numel() * t.element_size()
                self.calls.append((func._overloadpacket.__name__, tuple(t.shape)))
            return out

    return Counted()


def _counts(model, x, backward=True):
    """{'fwd': (count, bytes, calls), 'bwd': ...} for one forward (+ backward) of model."""
    x = x.clone().requires_grad_(True)
    with _comm_mode() as c:
        loss = _loss(model(x))
    res = {"fwd": (c.get_total_counts(), c.bytes, c.calls)}
    if backward:
        with _comm_mode() as c:
            loss.backward()
        res["bwd"] = (c.get_total_counts(), c.bytes, c.calls)
    return res


# ---------------------------------------------------------------- scenarios (run on every rank)
def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _parity(mesh, compile_mode=None):
    """Max abs errors against the single-process model: output, loss, dx, every LoRA grad."""
    from torch.distributed.tensor.parallel import parallelize_module
    _, ref = _models()
    tp = copy.deepcopy(ref)
    parallelize_module(tp, mesh, _plans()[1])
    if compile_mode is not None:
        tp = torch.compile(tp, fullgraph=compile_mode == "fullgraph", backend="aot_eager")
    x0 = _input()
    errs, grad_placements = {}, {}
    for step in range(2):  # twice: grads accumulate, a compiled model runs its cached graph
        x_ref, x_tp = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        out_ref, out_tp = ref(x_ref), tp(x_tp)
        l_ref, l_tp = _loss(out_ref), _loss(out_tp)
        l_ref.backward()
        l_tp.backward()
        errs[f"out{step}"] = (out_tp - out_ref).abs().max().item()
        errs[f"loss{step}"] = abs(l_tp.item() - l_ref.item())
        errs[f"dx{step}"] = (x_tp.grad - x_ref.grad).abs().max().item()
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        name = name.replace("_orig_mod.", "")
        if p.requires_grad:
            g = _full(p.grad)
            errs[name] = (g - ref_params[name].grad).abs().max().item() / ref_params[name].grad.abs().max().item()
            grad_placements[name] = str(p.grad.placements)
        else:
            assert p.grad is None
    return {"errs": errs, "grad_placements": grad_placements, "loss": l_ref.item()}


def _comms(mesh):
    from torch.distributed.tensor.parallel import parallelize_module
    base, lora = _models()
    base_plan, lora_plan = _plans()
    parallelize_module(base, mesh, base_plan)
    parallelize_module(lora, mesh, lora_plan)
    x = _input()
    res = {"base": _counts(base, x), "lora": _counts(lora, x)}
    lora.eval()
    with torch.no_grad():
        res["lora_eval"] = _counts(lora, x, backward=False)
    # frozen base weights train nothing: base-model backward without LoRA still reduces dx
    return res


def _bad_plans(mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA
    msgs = {}
    catch = dist_helpers.error_catcher(msgs)

    base, _ = _models()
    catch("not_lora", lambda: parallelize_module(base, mesh, {"blocks.0.up_proj": ColwiseParallelLoRA()}))
    odd = nn.Sequential(lora_ext.LoRALinear(15, 7, r=2))
    catch("colwise_odd", lambda: parallelize_module(odd, mesh, {"0": ColwiseParallelLoRA()}))
    catch("rowwise_odd", lambda: parallelize_module(odd, mesh, {"0": RowwiseParallelLoRA()}))
    msgs["odd_untouched"] = type(odd[0]) is lora_ext.LoRALinear and not any(
        type(p) is not nn.Parameter or type(p.data) is not torch.Tensor for p in odd.parameters())
    _, lora = _models()
    parallelize_module(lora, mesh, _plans()[1])
    catch("twice", lambda: parallelize_module(lora, mesh, {"blocks.0.up_proj": ColwiseParallelLoRA()}))
    catch("merge", lambda: lora.blocks[0].down_proj.merge())
    # LoRA on a parameter (target_parameters): no style shards its factors with the parameter
    from torch.distributed.tensor.parallel import ColwiseParallel

    from lora_ext.tp import parallelize_lora
    wrapped = nn.Sequential(nn.Linear(4, 4))
    lora_ext.inject(wrapped, target_parameters=["0.weight"], r=2)
    catch("parameter_style", lambda: parallelize_module(wrapped, mesh, {"0": ColwiseParallelLoRA()}))
    catch("parameter_plan", lambda: parallelize_lora(wrapped, mesh, {"0.base_layer": ColwiseParallel()}))
    msgs["parameter_untouched"] = not any(type(p) is not nn.Parameter for p in wrapped.parameters())
    return msgs


def _conv1d(mesh):
    """fan_in_fan_out (transformers Conv1D layout): weight [in, out] sharded on the other dim."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA
    torch.manual_seed(3)
    ref = nn.Sequential(lora_ext.LoRALinear(8, 12, r=2, fan_in_fan_out=True), nn.Tanh(),
                        lora_ext.LoRALinear(12, 8, r=2, fan_in_fan_out=True))
    for m in (ref[0], ref[2]):
        nn.init.normal_(m.lora_B, std=0.3)
    tp = parallelize_module(copy.deepcopy(ref), mesh, {"0": ColwiseParallelLoRA(), "2": RowwiseParallelLoRA()})
    x = torch.randn(4, 8)
    _loss(ref(x)).backward()
    _loss(tp(x)).backward()
    return max((_full(p.grad) - q.grad).abs().max().item()
               for p, q in zip(tp.parameters(), ref.parameters()) if q.requires_grad)


def _dropout_seeds(mesh):
    """Rowwise shards index their columns locally: each rank adds its TP rank to the dropout seed
    it draws, so ranks seeded alike get independent masks; the RNG advances alike on all ranks."""
    from torch.distributed.tensor.parallel import parallelize_module

    import lora_ext.tp as tp_mod
    from lora_ext.tp import RowwiseParallelLoRA
    seeds, real = [], tp_mod.lora_linear

    def recording(*args):
        seeds.append(None if args[-1] is None else int(args[-1]))
        return real(*args)
    tp_mod.lora_linear = recording
    try:
        torch.manual_seed(7)
        layer = parallelize_module(lora_ext.LoRALinear(8, 6, r=2, dropout=0.5), mesh, RowwiseParallelLoRA())
        layer(torch.randn(4, 8 // mesh.size()))  # the rank's input shard (Shard(-1))
        layer.eval()
        layer(torch.randn(4, 8 // mesh.size()))
    finally:
        tp_mod.lora_linear = real
    return {"seeds": seeds, "next": torch.rand(1).item()}


SCENARIOS = {"parity": _parity, "comms": _comms, "bad": _bad_plans, "conv1d": _conv1d, "dropout": _dropout_seeds,
             "compile": lambda mesh: _parity(mesh, "default"),
             "compile_fullgraph": lambda mesh: _parity(mesh, "fullgraph")}


def spawn(names, world=2):
    """Runs the scenarios on `world` gloo ranks; returns one result dict per rank."""
    return dist_helpers.spawn_scenarios(__name__, names, world)


def _get(results, name):
    for rank, res in enumerate(results):
        if "error" in (res[name] if isinstance(res[name], dict) else {}):
            pytest.fail(f"rank {rank}, {name}:\n{res[name]['error']}")
    return [res[name] for res in results]


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def ws2():
    return spawn(["parity", "comms", "bad", "conv1d", "dropout"], world=2)


def _check_parity(per_rank):
    for rank, res in enumerate(per_rank):
        for key, err in res["errs"].items():
            assert err < 1e-5, f"rank {rank}: {key} differs from the single-process model by {err:.3g}"
        names = set(res["grad_placements"])
        assert {n.rsplit(".", 1)[1] for n in names} == {"lora_A", "lora_B"} and len(names) == 8
        for name, placement in res["grad_placements"].items():
            replicated = ("up_proj.lora_A" in name) or ("down_proj.lora_B" in name)
            assert ("Replicate" in placement) == replicated, (name, placement)


def test_forward_backward_match_single_process(ws2):
    _check_parity(_get(ws2, "parity"))


def test_rowwise_dropout_seeds_differ_per_rank(ws2):
    r0, r1 = _get(ws2, "dropout")
    assert r0["seeds"][1] is None and r1["seeds"][1] is None  # eval: no dropout, no seed
    assert r1["seeds"][0] == r0["seeds"][0] + 1 and r0["next"] == r1["next"]


def test_conv1d_layout(ws2):
    for err in _get(ws2, "conv1d"):
        assert err < 1e-5


def test_lora_forward_adds_no_collective(ws2):
    for res in _get(ws2, "comms"):
        base, lora = res["base"], res["lora"]
        # 2 blocks: one all-reduce each (the row-parallel down_proj output), with and without LoRA
        assert lora["fwd"][0] == base["fwd"][0] == 2
        assert lora["fwd"][1] == base["fwd"][1]  # the same bytes: the one all-reduce covers base + LoRA
        assert res["lora_eval"]["fwd"][0] == 2


def test_lora_backward_collectives(ws2):
    d, r, T = 16, 4, 15
    for res in _get(ws2, "comms"):
        base, lora = res["base"], res["lora"]
        # base: one all-reduce of dx [T, d] per colwise up_proj
        assert base["bwd"][0] == 2 and base["bwd"][1] == 2 * T * d * 4
        # LoRA: + one all-reduce of dA (colwise, r*in) and one of dB (rowwise, out*r) per block
        assert lora["bwd"][0] == 2 + 2 * 2
        assert lora["bwd"][1] == base["bwd"][1] + 2 * (r * d + d * r) * 4


def test_bad_plan_raises(ws2):
    msgs = _get(ws2, "bad")[0]
    assert msgs["not_lora"] and "ColwiseParallelLoRA" in msgs["not_lora"] and "Linear(in_features=16, out_features=32" in msgs["not_lora"]
    assert "not a lora_ext LoRALinear" in msgs["not_lora"]
    assert msgs["colwise_odd"] and "out_features=7 is not divisible by the mesh size 2" in msgs["colwise_odd"]
    assert msgs["rowwise_odd"] and "in_features=15 is not divisible by the mesh size 2" in msgs["rowwise_odd"]
    assert msgs["odd_untouched"]
    assert msgs["twice"] and "already parallelized" in msgs["twice"]
    assert msgs["merge"] and "RowwiseLoRALinear.merge" in msgs["merge"]
    assert "ColwiseParallelLoRA: module LoRAParameter" in msgs["parameter_style"]
    assert "LoRA on parameters (LoRAParameter, target_parameters" in msgs["parameter_style"]
    assert ("plan entry '0.base_layer' puts ColwiseParallel on module '0.base_layer' (inside LoRAParameter '0')"
            in msgs["parameter_plan"]) and "is not tensor-parallel" in msgs["parameter_plan"]
    assert msgs["parameter_untouched"]


def test_compile():
    """torch.compile of the TP model, fullgraph=False and fullgraph=True (no graph break: the
    layer runs our ops on local tensors between from_local / to_local). Backend aot_eager, so
    no C++ toolchain is needed; forward and backward still match the single-process model."""
    res = spawn(["compile", "compile_fullgraph"])
    _check_parity(_get(res, "compile"))
    _check_parity(_get(res, "compile_fullgraph"))


@pytest.mark.slow
def test_world_size_4():
    res = spawn(["parity", "comms"], world=4)
    _check_parity(_get(res, "parity"))
    for r in _get(res, "comms"):
        assert r["lora"]["fwd"][:2] == r["base"]["fwd"][:2] and r["lora"]["bwd"][0] == 6


def test_old_torch_without_public_dtensor_is_named():
    # torch < 2.5 has no public torch.distributed.tensor: the import says which torch is needed
    import subprocess

    code = ("import sys, types, torch\n"
            "sys.modules['torch.distributed.tensor'] = types.ModuleType('torch.distributed.tensor')\n"
            "import lora_ext.distributed\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode != 0 and "need torch >= 2.5" in r.stderr, r.stderr[-2000:]
