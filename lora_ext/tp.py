"""Tensor-parallel LoRA (Megatron-style) with torch.distributed.tensor: ParallelStyles for
``parallelize_module`` plans, next to torch's own ColwiseParallel / RowwiseParallel.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.tp import ColwiseParallelLoRA, RowwiseParallelLoRA

    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, {"mlp.up_proj": ColwiseParallelLoRA(),
                                     "mlp.down_proj": RowwiseParallelLoRA()})

The factors are sharded so that the LoRA forward adds no collective to the base layer's:

* ColwiseParallelLoRA (W sharded by output rows): A [r, in] replicated, B [out, r] and the bias
  sharded by output rows. Each rank computes its slice of y = x W^T + b + s (x A^T) B^T locally;
  y stays sharded on its last dim (as ColwiseParallel's output).
* RowwiseParallelLoRA (W sharded by input columns): A sharded by input columns, B (and the bias)
  replicated. Each rank computes the partial y_k = x_k W_k^T + s (x_k A_k^T) B^T; the base layer's
  single all-reduce (or reduce-scatter) sums base and LoRA together, and the bias is added once.

Parameters become DTensors (weight/bias as torch's styles place them, lora_A / lora_B as above),
so state_dict / DCP / optimizers see them like any TP parameter. The layer itself runs on the
local shards (``to_local`` / ``from_local`` with the right placements), so
``torch.ops.lora_ext.lora_linear_fwd`` / ``_bwd`` see plain tensors.

Backward: the replicated factor's local gradient is a partial sum (dA for colwise, dB for rowwise);
it is all-reduced once per layer and step (r*in resp. out*r elements), through DTensor's own
Partial -> Replicate redistribution, so its ``.grad`` is a Replicate DTensor holding the full
gradient. The base layer's collectives are unchanged (colwise: one all-reduce of dx).

Multi-adapter serving (``lora_ext.multi.MultiLoRALinear``, e.g. the layers of an AdapterPool):
the same styles shard it the same way. Colwise: the base weight and bias and B_pool
[S, out, r_max] sharded along ``out`` (B_pool dim 1), A_pool replicated; rowwise: the base
weight and A_pool [S, r_max, in] sharded along ``in`` (A_pool's last dim), B_pool and the bias
replicated, the per-token expand added to the partial sum so the base all-reduce covers it.
The pools stay plain tensors holding this rank's shard (``layer.out_shard`` / ``in_shard``),
and ``set_slot`` (the pool's loads) writes only that shard of the full adapter factors:

    pool = AdapterPool(model, target_modules=[...])      # on the unsharded model, every rank
    parallelize_lora(model, mesh, {"model.layers.*.mlp.up_proj": ColwiseParallelLoRA(), ...})
    pool.load("sql", "adapters/sql")                     # each rank writes its shard
    with pool.batch(names): logits = model(ids).logits   # no collective beyond the base plan's

Adapters loaded before parallelizing are sharded with the pools. Packed projections
(out_slices) take rowwise only; embeddings stay replicated (leave them out of the plan).
``parallelize_lora`` is ``parallelize_module`` that first checks the whole plan and raises a
ValueError naming the module (by path) when an entry does not fit, before changing anything. DoRA
layers (LoRALinear(use_dora=True)) are not tensor-parallel: both styles refuse them by name; so is
LoRA on parameters (LoRAParameter, MoE expert stacks): every style on it or inside it is refused.

Dropout (p > 0): each rank draws its mask seed from its own generator, and the mask of element
(t, j) of the rank's x is a hash of (seed, t * in_local + j). Colwise ranks all see the full x:
seed them alike and every output shard sees the same mask. Rowwise ranks hold disjoint input
columns indexed locally, so each adds its TP rank to the seed it draws: ranks seeded alike still
get independent masks across the shards (gradients exact either way).
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
except ImportError as e:  # torch < 2.5 kept these in torch.distributed._tensor
    raise ImportError(f"lora_ext.distributed / lora_ext.tp need torch >= 2.5 (the public "
                      f"torch.distributed.tensor API); this is torch {torch.__version__}") from e
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from .conv import LoRAConvNd
from .layers import LoRALinear, factors_like, is_conv1d
from .merged_linear import MergedLinear
from .multi import MultiLoRAEmbedding, MultiLoRALinear, _MultiLoRA
from .ops import lora_linear, multi_lora_
from .param_lora import LoRAParameter

__all__ = ["ColwiseParallelLoRA", "RowwiseParallelLoRA", "parallelize_lora", "validate_plan"]


def _describe(module: nn.Module) -> str:
    if isinstance(module, LoRALinear):
        return (f"LoRALinear(in_features={module.in_features}, out_features={module.out_features}, r={module.r}"
                + (", use_dora=True)" if module.use_dora else ")"))
    if isinstance(module, _MultiLoRA):
        return f"{type(module).__name__}({module.extra_repr()})"
    text = repr(module).split("\n")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _check(style: str, module: nn.Module, mesh: DeviceMesh, dim_name: str, name: str | None = None) -> None:
    """ValueError, before anything is changed, if ``module`` cannot take the style on ``mesh``."""
    what = f"{style}: module {name!r} ({_describe(module)})" if name is not None else \
        f"{style}: module {_describe(module)}"
    if isinstance(module, MultiLoRAEmbedding):
        raise ValueError(f"{what}: multi-adapter embeddings are not tensor-parallel; leave them out of the "
                         f"plan (replicated)")
    if isinstance(module, LoRAParameter):
        raise ValueError(f"{what}: {_NO_PARAMETER_TP}")
    if not isinstance(module, (LoRALinear, MultiLoRALinear)):
        raise ValueError(f"{what} is a {type(module).__name__}, not a lora_ext LoRALinear or MultiLoRALinear "
                         f"(use torch's {style[:-4]} for plain layers)")
    if module.use_dora if isinstance(module, LoRALinear) else module.dora:
        raise ValueError(f"{what}: DoRA layers (use_dora, or a pool's dora=True) are not tensor-parallel: each output row is divided by "
                         "the norm of that row of W + s·B·A over all input columns (rowwise shards would need an "
                         "all-reduce of it; colwise is not implemented either); leave it out of the plan (replicated)")
    if isinstance(module, (_TPLoRALinear, _TPMultiLoRALinear)) or any(
            isinstance(p, DTensor) for p in module.parameters()):
        raise ValueError(f"{what} is already parallelized (its parameters are DTensors)")
    if mesh.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D device mesh, got {mesh.ndim}-D {tuple(mesh.shape)}; "
                         f"pass the TP sub-mesh (mesh['tp'])")
    if isinstance(module, MultiLoRALinear) and module.out_slices is not None and dim_name == "out_features":
        raise ValueError(f"{what}: a packed projection (out_slices={module.out_slices}) cannot be sharded "
                         f"colwise as one block (each rank would get whole slices, not its share of each); "
                         f"unpack it or use RowwiseParallelLoRA")
    n = mesh.size()
    size = getattr(module, dim_name)
    if size % n != 0:
        raise ValueError(f"{what}: {dim_name}={size} is not divisible by the mesh size {n}")


_NO_PARAMETER_TP = ("LoRA on parameters (LoRAParameter, target_parameters: MoE expert stacks) is not tensor-parallel "
                     "(its factors would have to be sharded with the parameter); leave it and its module out of "
                     "the plan (replicated), or merge it first (lora_ext.merge_and_unload)")


def _replicated_factor(p: DTensor) -> torch.Tensor:
    """The local tensor of a Replicate parameter whose local gradient is a partial sum: the
    from_local / to_local(grad_placements=Partial) round trip all-reduces it in backward (one
    collective of p's size), so p.grad is the full gradient, Replicate. No collective in forward."""
    local = p.to_local()
    return DTensor.from_local(local, p.device_mesh, [Replicate()], run_check=False).to_local(
        grad_placements=[Partial()])


class _TPLoRALinear:
    """Mixin put in front of a LoRALinear's class by the styles (forward on local shards)."""

    _tp_style = ""

    def _local_factors(self, x: torch.Tensor, colwise: bool):
        A = _replicated_factor(self.lora_A) if colwise else self.lora_A.to_local()
        B = self.lora_B.to_local() if colwise else _replicated_factor(self.lora_B)
        return factors_like(x, A, B)

    def merge(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__}.merge: the weight is a DTensor shard here; merge the "
                         f"LoRALinear before parallelize_module (or merge a single-process copy)")

    def unmerge(self):
        raise ValueError(f"{type(self).__name__}.unmerge: the weight is a DTensor shard here; unmerge "
                         f"before parallelize_module")

    def forward(self, x):
        if not isinstance(x, DTensor):
            raise TypeError(f"{self._tp_style}: expected a DTensor input (set by the style's input hook), "
                            f"got {type(x).__name__}")
        mesh = self.weight.device_mesh
        W = self.weight.to_local()
        colwise = self._tp_style == "ColwiseParallelLoRA"
        if colwise:
            # x is Replicate; its local gradient is partial over the output shards: the input
            # hook's from_local backward all-reduces it (the base layer's one collective).
            x_l = x.to_local(grad_placements=[Partial()])
            b = self.bias.to_local() if self.bias is not None else None
        else:
            x_l = x.to_local()  # Shard(-1): the local gradient is this rank's slice, exact
            b = None  # added once, after the partial sums
        if self.merged:
            y = F.linear(x_l, W.t() if self.fan_in_fan_out else W, b)
        else:
            A, B = self._local_factors(x_l, colwise)
            seed = None
            if not colwise and self.training and self.lora_dropout > 0:
                # rowwise shards index their columns locally: one seed per shard, so ranks seeded
                # alike still draw independent masks (the RNG advances alike on every rank)
                seed = torch.randint(0, 2**62, (1,), device=x_l.device, dtype=torch.int64) + mesh.get_local_rank()
            y = lora_linear(x_l, W, b, A, B, self.scaling, self.lora_dropout, self.training,
                            self.fan_in_fan_out, seed)
        return _output(y, mesh, colwise, self.bias)


def _output(y: torch.Tensor, mesh, colwise: bool, bias) -> DTensor:
    """A shard's local output as the layer's DTensor: colwise Shard(-1); rowwise Partial (summed by
    the next redistribute) plus the replicated bias, which so lands in the sum once, no collective."""
    if colwise:
        return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)
    y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    return y if bias is None else y + bias


class _TPMultiLoRALinear:
    """Mixin put in front of a MultiLoRALinear's class by the styles: the base layer and the
    per-token multi-LoRA update on local shards (inference only, as MultiLoRALinear)."""

    _tp_style = ""

    def forward(self, x):
        if not isinstance(x, DTensor):
            raise TypeError(f"{self._tp_style}: expected a DTensor input (set by the style's input hook), "
                            f"got {type(x).__name__}")
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__}: no LoRAContext attached (pass context= or call "
                               "lora_ext.multi.attach_context(model, ctx))")
        base = self.base
        mesh = base.weight.device_mesh
        W = base.weight.to_local()
        if is_conv1d(base):  # transformers Conv1D: weight [in, out]
            W = W.t()
        colwise = self._tp_style == "ColwiseParallelLoRA"
        x_l = x.to_local()  # colwise: Replicate (the full x); rowwise: Shard(-1) (this rank's columns)
        b = base.bias.to_local() if colwise and base.bias is not None else None
        y = F.linear(x_l, W, b)  # rowwise: the bias is added once, after the partial sums
        if y.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is an inference layer; run it under "
                               "torch.no_grad() or torch.inference_mode()")
        # colwise: B_pool holds this rank's output rows; rowwise: A_pool this rank's input columns,
        # so y gets this rank's partial of the LoRA term, summed by the base layer's all-reduce
        multi_lora_(y, x_l, self.A_pool, self.B_pool, self.context.tokens(x_l.shape[:-1]), self.scales,
                    self.ranks, self.out_slices, bad_index_count=self.context.bad_index_count)
        return _output(y, mesh, colwise, base.bias)


_CLASSES: dict[tuple[str, type], type] = {}


def _swap_class(module: nn.Module, style: str) -> None:
    cls = type(module)
    key = (style, cls)
    if key not in _CLASSES:
        prefix = "Colwise" if style == "ColwiseParallelLoRA" else "Rowwise"
        mixin = _TPMultiLoRALinear if isinstance(module, MultiLoRALinear) else _TPLoRALinear
        _CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls),
                             {"_tp_style": style, "__module__": __name__})
    module.__class__ = _CLASSES[key]


def _distribute(module: nn.Module, mesh: DeviceMesh, placements: dict[str, list], src_data_rank) -> None:
    for name, placement in placements.items():
        param = getattr(module, name)
        if param is None:
            continue
        dt = distribute_tensor(param.detach(), mesh, placement, src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(dt,
                                                     requires_grad=param.requires_grad))


_POOLS = ("A_pool", "B_pool", "scales", "ranks")


def _partition_multi(module: MultiLoRALinear, mesh: DeviceMesh, colwise: bool, src_data_rank) -> None:
    """The base layer's weight/bias as torch's Colwise/RowwiseParallel place them; the slot buffers
    as DTensors (colwise: B_pool Shard(1); rowwise: A_pool Shard(-1); the rest Replicate), so that
    distribute_module leaves them alone. _localize_pools then keeps their local tensors."""
    conv = is_conv1d(module.base)
    if colwise:
        _distribute(module.base, mesh, {"weight": [Shard(1 if conv else 0)], "bias": [Shard(0)]}, src_data_rank)
    else:
        _distribute(module.base, mesh, {"weight": [Shard(0 if conv else 1)], "bias": [Replicate()]}, src_data_rank)
    sharded = {"B_pool": Shard(1)} if colwise else {"A_pool": Shard(module.A_pool.dim() - 1)}
    for name in _POOLS:  # adapters already loaded move with the pools (from src_data_rank, as the weights)
        buf = getattr(module, name)
        setattr(module, name, distribute_tensor(buf, mesh, [sharded.get(name, Replicate())],
                                                src_data_rank=src_data_rank))


def _localize_pools(module: MultiLoRALinear, mesh: DeviceMesh, colwise: bool) -> None:
    for name in _POOLS:
        setattr(module, name, getattr(module, name).to_local().contiguous())
    k, n = mesh.get_local_rank(), mesh.size()
    if colwise:
        step = module.out_features // n
        module.out_shard = (k * step, (k + 1) * step)
    else:
        step = module.in_features // n
        module.in_shard = (k * step, (k + 1) * step)


def _apply_style(style: ParallelStyle, module: nn.Module, mesh: DeviceMesh, colwise: bool) -> nn.Module:
    name = type(style).__name__
    _check(name, module, mesh, "out_features" if colwise else "in_features")
    src = getattr(style, "src_data_rank", 0)
    multi = isinstance(module, MultiLoRALinear)
    placements = None
    if not multi and colwise:
        placements = {"weight": [Shard(1 if module.fan_in_fan_out else 0)], "bias": [Shard(0)],
                      "lora_A": [Replicate()], "lora_B": [Shard(0)]}
    elif not multi:
        placements = {"weight": [Shard(0 if module.fan_in_fan_out else 1)], "bias": [Replicate()],
                      "lora_A": [Shard(1)], "lora_B": [Replicate()]}

    def partition(_, mod, mesh):
        if mod is module:
            if multi:
                _partition_multi(mod, mesh, colwise, src)
            else:
                _distribute(mod, mesh, placements, src)

    _swap_class(module, name)
    out = distribute_module(
        module, mesh, partition,
        lambda mod, inputs, mesh: style._prepare_input_fn(style.input_layouts, style.desired_input_layouts,
                                                          mod, inputs, mesh),
        lambda mod, outputs, mesh: style._prepare_output_fn(style.output_layouts, style.use_local_output,
                                                            mod, outputs, mesh))
    if multi:
        _localize_pools(module, mesh, colwise)
    return out


class ColwiseParallelLoRA(ColwiseParallel):
    """ColwiseParallel for a lora_ext LoRALinear: weight, bias and lora_B sharded by output rows,
    lora_A replicated. Same keyword arguments and input/output layouts as torch's ColwiseParallel
    (input Replicate by default, output sharded on the last dim, local tensors out). Forward: no
    collective beyond the base layer's; backward: the base's all-reduce of dx plus one all-reduce
    of dA (r * in elements).

    For a MultiLoRALinear: base weight/bias and B_pool sharded along out, A_pool replicated
    (not for packed projections with out_slices)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return _apply_style(self, module, device_mesh, colwise=True)


class RowwiseParallelLoRA(RowwiseParallel):
    """RowwiseParallel for a lora_ext LoRALinear: weight and lora_A sharded by input columns,
    lora_B and bias replicated. Same keyword arguments and layouts as torch's RowwiseParallel
    (input sharded on the last dim, output Replicate by default). Forward: the base layer's one
    all-reduce (or reduce-scatter) covers base + LoRA; backward: one all-reduce of dB (out * r).

    For a MultiLoRALinear: base weight and A_pool sharded along in, B_pool and bias replicated;
    the multi-LoRA expand goes into the partial sum."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return _apply_style(self, module, device_mesh, colwise=False)


def _resolve(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The submodules a parallelize_module plan key reaches (fnmatch per dotted atom, as torch)."""
    if key == "":
        return [("", model)]
    found = [("", model)]
    for token in key.split("."):
        found = [(f"{path}.{n}" if path else n, c) for path, m in found
                 for n, c in m.named_children() if fnmatch(n, token)]
    return found


def validate_plan(model: nn.Module, device_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """Raises a ValueError naming the module (by path) for the first plan entry that does not fit:
    a key that matches nothing, a module reached twice, a LoRA style on a module it cannot shard
    (not a LoRALinear / MultiLoRALinear, a DoRA layer, an indivisible dim, a packed projection colwise,
    already parallel), torch's own Colwise/RowwiseParallel on a LoRA layer or on the base of one, or
    any style on a LoRAParameter or a module inside one (not tensor-parallel)."""
    if not isinstance(plan, dict):
        raise TypeError(f"parallelize_lora: expected a dict plan {{module path: style}}, got {type(plan).__name__}")
    owners = {id(m): n for n, m in model.named_modules()}
    parents = {}
    for n, m in model.named_modules():
        for c in m.children():
            parents.setdefault(id(c), m)
    seen: dict[int, str] = {}
    for key, style in plan.items():
        matched = _resolve(model, key)
        if not matched:
            raise ValueError(f"parallelize_lora: plan entry {key!r} matches no submodule of "
                             f"{type(model).__name__}")
        for path, m in matched:
            path = owners.get(id(m), path)
            if id(m) in seen:
                raise ValueError(f"parallelize_lora: module {path!r} is matched by two plan entries "
                                 f"({seen[id(m)]!r} and {key!r})")
            seen[id(m)] = key
            sname = type(style).__name__
            wrapper = next((w for w in (m, *_ancestors(m, parents)) if isinstance(w, LoRAParameter)), None)
            if wrapper is not None:  # any style: nothing shards lora_A / lora_B with the parameter
                inside = "" if wrapper is m else f" (inside LoRAParameter {owners.get(id(wrapper))!r})"
                raise ValueError(f"parallelize_lora: plan entry {key!r} puts {sname} on module {path!r}{inside}: "
                                 f"{_NO_PARAMETER_TP}")
            if isinstance(style, (ColwiseParallelLoRA, RowwiseParallelLoRA)):
                colwise = isinstance(style, ColwiseParallelLoRA)
                _check(sname, m, device_mesh, "out_features" if colwise else "in_features", name=path)
                continue
            parent = parents.get(id(m))
            # torch's styles would shard lora_B [k·d, r] as if it were [out, r]; no conv style exists
            if isinstance(m, (MergedLinear, LoRAConvNd)):
                raise ValueError(f"parallelize_lora: plan entry {key!r} puts {sname} on module {path!r}, a "
                                 f"{type(m).__name__}, which is not tensor-parallel; leave it out of the plan (replicated)")
            lora = isinstance(m, (LoRALinear, _MultiLoRA))
            if lora or isinstance(parent, (LoRALinear, _MultiLoRA)):
                what = m if lora else parent
                hint = ("ColwiseParallelLoRA" if isinstance(style, ColwiseParallel) else
                        "RowwiseParallelLoRA" if isinstance(style, RowwiseParallel) else "a lora_ext.tp style")
                raise ValueError(f"parallelize_lora: plan entry {key!r} puts {sname} on module {path!r}"
                                 f"{'' if lora else ' (the base layer of ' + repr(owners.get(id(parent))) + ')'}: "
                                 f"{_describe(what)} must be parallelized as a whole with {hint}, so that "
                                 f"its LoRA factors are sharded with its weight")


def _ancestors(m: nn.Module, parents: dict[int, nn.Module]) -> list[nn.Module]:
    out = []
    while id(m) in parents:
        m = parents[id(m)]
        out.append(m)
    return out


def parallelize_lora(model: nn.Module, device_mesh: DeviceMesh, plan: dict[str, ParallelStyle], *,
                     src_data_rank: int | None = 0) -> nn.Module:
    """``parallelize_module(model, device_mesh, plan)`` after ``validate_plan``: a plan that does not
    fit raises a ValueError naming the module before anything is changed (torch only warns about a
    key that matches nothing, and its styles do not know the module's path)."""
    validate_plan(model, device_mesh, plan)
    return parallelize_module(model, device_mesh, plan, src_data_rank=src_data_rank)
