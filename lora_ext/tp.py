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

Dropout (p > 0): each rank draws its mask from its own generator. Rowwise ranks hold disjoint
input columns, so this is ordinary dropout; colwise ranks all see the full x, so seed the ranks
alike if every output shard should see the same mask (gradients are exact either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from .layers import LoRALinear
from .ops import lora_linear

__all__ = ["ColwiseParallelLoRA", "RowwiseParallelLoRA"]


def _describe(module: nn.Module) -> str:
    if isinstance(module, LoRALinear):
        return f"LoRALinear(in_features={module.in_features}, out_features={module.out_features}, r={module.r})"
    text = repr(module).split("\n")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _check(style: str, module: nn.Module, mesh: DeviceMesh, dim_name: str) -> None:
    """ValueError, before anything is changed, if ``module`` cannot take the style on ``mesh``."""
    what = f"{style}: module {_describe(module)}"
    if not isinstance(module, LoRALinear):
        raise ValueError(f"{what} is a {type(module).__name__}, not a lora_ext LoRALinear "
                         f"(use torch's {style[:-4]} for plain layers)")
    if isinstance(module, _TPLoRALinear) or any(isinstance(p, DTensor) for p in module.parameters()):
        raise ValueError(f"{what} is already parallelized (its parameters are DTensors)")
    if mesh.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D device mesh, got {mesh.ndim}-D {tuple(mesh.shape)}; "
                         f"pass the TP sub-mesh (mesh['tp'])")
    n = mesh.size()
    size = getattr(module, dim_name)
    if size % n != 0:
        raise ValueError(f"{what}: {dim_name}={size} is not divisible by the mesh size {n}")


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
        if A.dtype != x.dtype:
            A, B = A.to(x.dtype), B.to(x.dtype)
        return A, B

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
            y = lora_linear(x_l, W, b, A, B, self.scaling, self.lora_dropout, self.training,
                            self.fan_in_fan_out)
        if colwise:
            return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)
        y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        if self.bias is not None:
            y = y + self.bias  # Partial + Replicate: the bias lands in the sum once, no collective
        return y


_CLASSES: dict[tuple[str, type], type] = {}


def _swap_class(module: LoRALinear, style: str) -> None:
    cls = type(module)
    key = (style, cls)
    if key not in _CLASSES:
        prefix = "Colwise" if style == "ColwiseParallelLoRA" else "Rowwise"
        _CLASSES[key] = type(f"{prefix}{cls.__name__}", (_TPLoRALinear, cls),
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


class ColwiseParallelLoRA(ColwiseParallel):
    """ColwiseParallel for a lora_ext LoRALinear: weight, bias and lora_B sharded by output rows,
    lora_A replicated. Same keyword arguments and input/output layouts as torch's ColwiseParallel
    (input Replicate by default, output sharded on the last dim, local tensors out). Forward: no
    collective beyond the base layer's; backward: the base's all-reduce of dx plus one all-reduce
    of dA (r * in elements)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check(type(self).__name__, module, device_mesh, "out_features")
        out_dim = 1 if module.fan_in_fan_out else 0
        src = getattr(self, "src_data_rank", 0)

        def partition(name, mod, mesh):
            if mod is module:
                _distribute(mod, mesh, {"weight": [Shard(out_dim)], "bias": [Shard(0)],
                                        "lora_A": [Replicate()], "lora_B": [Shard(0)]}, src)

        _swap_class(module, type(self).__name__)
        return distribute_module(
            module, device_mesh, partition,
            lambda mod, inputs, mesh: self._prepare_input_fn(self.input_layouts, self.desired_input_layouts,
                                                             mod, inputs, mesh),
            lambda mod, outputs, mesh: self._prepare_output_fn(self.output_layouts, self.use_local_output,
                                                               mod, outputs, mesh))


class RowwiseParallelLoRA(RowwiseParallel):
    """RowwiseParallel for a lora_ext LoRALinear: weight and lora_A sharded by input columns,
    lora_B and bias replicated. Same keyword arguments and layouts as torch's RowwiseParallel
    (input sharded on the last dim, output Replicate by default). Forward: the base layer's one
    all-reduce (or reduce-scatter) covers base + LoRA; backward: one all-reduce of dB (out * r)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check(type(self).__name__, module, device_mesh, "in_features")
        in_dim = 0 if module.fan_in_fan_out else 1
        src = getattr(self, "src_data_rank", 0)
        self.desired_input_layouts = (Shard(-1),)

        def partition(name, mod, mesh):
            if mod is module:
                _distribute(mod, mesh, {"weight": [Shard(in_dim)], "bias": [Replicate()],
                                        "lora_A": [Shard(1)], "lora_B": [Replicate()]}, src)

        _swap_class(module, type(self).__name__)
        return distribute_module(
            module, device_mesh, partition,
            lambda mod, inputs, mesh: self._prepare_input_fn(self.input_layouts, self.desired_input_layouts,
                                                             mod, inputs, mesh),
            lambda mod, outputs, mesh: self._prepare_output_fn(self.output_layouts, self.use_local_output,
                                                               mod, outputs, mesh))
