"""LoRA fine-tuning on several processes: DDP or FSDP2 (fully_shard), then a PEFT adapter from rank 0.

torchrun --nproc_per_node 2 examples/distributed_finetune.py [--mode fsdp|ddp] [--steps 100] [--out DIR]

gloo on CPU, NCCL on CUDA (one GPU per process). Without torchrun it runs as one process. The model
and the task are examples/finetune.py's (a tiny Llama learning to count, LoRA on q/v); each step's
global batch of 16 sequences is split across the ranks, so any world size (dividing 16) trains on
the same data as one process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune import batch, make_model  # noqa: E402

import lora_ext  # noqa: E402
from lora_ext.distributed import fully_shard_lora, lora_parameters, save_adapter  # noqa: E402

GLOBAL_BATCH, SEQ = 16, 24


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
    a = p.parse_args(argv)

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)  # plain `python examples/distributed_finetune.py`: one process
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the world size ({world}) must divide the global batch ({GLOBAL_BATCH})")
    try:
        model = make_model(device)  # same seed on every rank: the same base weights
        torch.manual_seed(0)        # and the same initial LoRA factors
        lora_ext.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)
        lora_ext.mark_only_lora_trainable(model)
        if a.mode == "ddp":
            model = DistributedDataParallel(model)       # all-reduces only the LoRA gradients
        else:
            fully_shard_lora(model)                      # each decoder layer, then the root
        opt = torch.optim.AdamW(lora_parameters(model), lr=a.lr)  # optimizer state: LoRA only
        gen = torch.Generator().manual_seed(1)
        per_rank = GLOBAL_BATCH // world
        model.train()
        losses = []
        for step in range(a.steps):
            ids = batch(GLOBAL_BATCH, SEQ, "cpu", gen)[rank * per_rank:(rank + 1) * per_rank].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)                       # for printing: the global batch's loss
            losses.append(mean.item() / world)
            if rank == 0 and (step % 20 == 0 or step == a.steps - 1):
                print(f"step {step:4d}  loss {losses[-1]:.3f}", flush=True)
        out = a.out or (tempfile.mkdtemp(prefix="lora_ext_dist_") if rank == 0 else None)
        box = [out]
        dist.broadcast_object_list(box, src=0)          # every rank needs the path: save_adapter is a collective
        save_adapter(model, box[0])
        if rank == 0:
            print(f"{a.mode} on {world} process(es) ({dist.get_backend()}): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            print(f"adapter (PEFT format) -> {box[0]}: lora_ext.Adapter.load(dir) or "
                  f"peft.PeftModel.from_pretrained(base, dir)")
        # every rank done communicating before any tears its process group down (with gloo, a
        # peer closing its sockets under another's pending work can abort that process at exit)
        dist.barrier()
        return {"losses": losses, "adapter_dir": box[0], "world_size": world}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
