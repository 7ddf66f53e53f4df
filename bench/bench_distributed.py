"""Distributed training step: communication and time, LoRA vs full fine-tuning of the base model.

Two gloo processes (spawned here, one thread each) train a stack of Megatron MLP blocks
(x + down(gelu(up(x))), LoRA rank r on up and down) one AdamW step at a time:

* tp:   tensor parallel over both ranks; base: torch's ColwiseParallel / RowwiseParallel, every
        weight trained; lora: ColwiseParallelLoRA / RowwiseParallelLoRA, base frozen.
* fsdp: FSDP2, fully_shard on each block and the root; base: every weight trained; lora:
        fully_shard_lora, base frozen (still all-gathered, but only the factors' gradients are
        reduce-scattered).

Communication: every collective of one step (forward, backward, optimizer), counted with
torch.distributed.tensor.debug.CommDebugMode, which sees DTensor's functional all-reduces and
FSDP2's c10d all-gather / reduce-scatter alike. "MB" is the collective size (the all-reduced
tensor, the all-gathered output, the reduce-scattered input); "sent/rank MB" what each rank sends
in a ring: all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n of that.
Time: rounds of REPS steps (bench.common.time_fn), base and LoRA rounds interleaved, the ranks
starting each round together; rank 0's wall time per step: the best round's median (min–max over
all rounds, bench.common.best_of); "lora/base": median (min–max) of the per-round ratios.

Run: python bench/bench_distributed.py [--quick]   (CPU / gloo only; --device is ignored)
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_ext  # noqa: E402
from bench.common import Timing, arg_parser, best_of, save, table, time_fn  # noqa: E402

WORLD = 2
REPS = 5  # steps per variant and round


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down_proj(F.gelu(self.up_proj(x)))


class Net(nn.Module):
    def __init__(self, d, h, n):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _model(cfg, lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Net(cfg["d"], cfg["h"], cfg["blocks"])
    if lora:
        lora_ext.inject(model, ["up_proj", "down_proj"], r=cfg["r"], alpha=2 * cfg["r"])
        lora_ext.mark_only_lora_trainable(model)
        for m in lora_ext.lora_layers(model).values():
            nn.init.normal_(m.lora_B, std=0.02)
    return model.train()


def _setup(mode: str, lora: bool, cfg, mesh):
    """(model, optimizer, input) of one variant on this rank."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_ext.distributed import ColwiseParallelLoRA, RowwiseParallelLoRA, fully_shard_lora, lora_parameters

    model = _model(cfg, lora)
    g = torch.Generator().manual_seed(1)
    if mode == "tp":  # every rank: the whole batch
        x = torch.randn(cfg["batch"], cfg["seq"], cfg["d"], generator=g)
        col, row = (ColwiseParallelLoRA, RowwiseParallelLoRA) if lora else (ColwiseParallel, RowwiseParallel)
        parallelize_module(model, mesh, {"blocks.*.up_proj": col(), "blocks.*.down_proj": row()})
    else:  # every rank: its half of the batch
        x = torch.randn(cfg["batch"], cfg["seq"], cfg["d"], generator=g).chunk(WORLD)[dist.get_rank()]
        if lora:
            fully_shard_lora(model, mesh=mesh)
        else:
            from torch.distributed.fsdp import fully_shard
            for b in model.blocks:
                fully_shard(b, mesh=mesh)
            fully_shard(model, mesh=mesh)
    params = lora_parameters(model) if lora else list(model.parameters())
    return model, torch.optim.AdamW(params, lr=1e-4), x.contiguous()


def _step(model, opt, x):
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _comm_mode():
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._pytree import tree_leaves

    class Counted(CommDebugMode):
        """CommDebugMode that also records each collective's size (its largest tensor argument)."""

        def __init__(self):
            super().__init__()
            self.calls = []  # (op name, bytes)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.get_total_counts()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.get_total_counts() > before:
                ts = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                size = max(t.numel() * t.element_size() for t in ts)
                name = func._overloadpacket.__name__.split(".")[-1].strip("_").replace("_base", "")
                self.calls.append((name.replace("allgather", "all_gather"), size))
            return out

    return Counted()


def _sent(op: str, size: int) -> float:
    """Bytes one rank sends for a collective of `size` bytes in a ring of WORLD ranks."""
    f = (WORLD - 1) / WORLD
    return 2 * f * size if op in ("all_reduce", "allreduce") else f * size


def _measure(mode: str, cfg, mesh, rounds: int) -> list[dict]:
    variants = {v: _setup(mode, v == "lora", cfg, mesh) for v in ("base", "lora")}
    comm = {}
    for v, (model, opt, x) in variants.items():
        _step(model, opt, x)  # warm-up (and optimizer state)
        with _comm_mode() as c:
            _step(model, opt, x)
        kinds = sorted({op for op, _ in c.calls})
        comm[v] = {"collectives": c.get_total_counts(),
                   "ops": ", ".join(f"{op}×{sum(1 for o, _ in c.calls if o == op)}" for op in kinds),
                   "MB": sum(s for _, s in c.calls) / 1e6,
                   "sent/rank MB": sum(_sent(op, s) for op, s in c.calls) / 1e6}
    times = {v: [] for v in variants}
    ratios = []
    for i in range(rounds):
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]  # alternate who goes first
        for v in order:
            dist.barrier()  # the ranks start each round together
            times[v].append(time_fn(lambda: _step(*variants[v]), "cpu", warmup=1, reps=REPS))
        ratios.append(float(times["lora"][-1]) / float(times["base"][-1]))
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, (m, _, _) in variants.items()}
    rows = []
    for v in variants:
        rows.append({"mode": mode, "variant": "full FT" if v == "base" else f"LoRA r={cfg['r']}",
                     "trainable": trainable[v], **comm[v], "step_ms": best_of(times[v])})
    rows[-1]["lora/base"] = Timing.of(ratios)
    rows[0]["lora/base"] = ""
    return rows


def _worker(rank: int, port: int, cfg: dict, rounds: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,))
        rows = [r for mode in ("tp", "fsdp") for r in _measure(mode, cfg, mesh, rounds)]
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool) -> tuple[list[dict], dict]:
    cfg = ({"d": 256, "h": 1024, "blocks": 2, "r": 8, "batch": 4, "seq": 64} if quick else
           {"d": 512, "h": 2048, "blocks": 4, "r": 16, "batch": 8, "seq": 128})
    rounds = 6 if quick else 12
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.spawn(_worker, args=(_free_port(), cfg, rounds, out), nprocs=WORLD, join=True)
        rows = torch.load(out, weights_only=False)
    return rows, {**cfg, "world_size": WORLD, "backend": "gloo", "rounds": rounds, "dtype": "float32"}


def main(argv=None):
    a = arg_parser("distributed", __doc__).parse_args(argv)
    rows, meta = run(a.quick)
    cfg = ", ".join(f"{k}={v}" for k, v in meta.items())
    table(f"distributed training step, {WORLD} gloo processes on CPU ({cfg})", rows)
    if not a.quick:
        print("wrote", save("distributed", rows, meta, device="cpu"))
    return rows


if __name__ == "__main__":
    main()
