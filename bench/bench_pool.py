"""Mixed-batch serving, end to end: a small Llama with 1/4/16 distinct adapters in one batch,
lora_ext AdapterPool vs HF PEFT's ``model(..., adapter_names=[...])``; adapter load times
(from disk and from the pool's host cache).

python bench/bench_pool.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, sync, time_fn  # noqa: E402
import lora_ext  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(device, quick):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = 256 if quick else (1024 if device == "cuda" else 512)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2 if quick else 4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM(cfg).to(device, dt).eval()


@torch.no_grad()
def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import peft

    base = build(device, quick)
    n_max = 4 if quick else 16
    root = tempfile.mkdtemp(prefix="lora_ext_bench_pool_")
    paths = {}
    for i in range(n_max):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(std=0.02)
        paths[f"a{i}"] = os.path.join(root, f"a{i}")
        pm.save_pretrained(paths[f"a{i}"])
        del pm
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a0"], adapter_name="a0")
    for i in range(1, n_max):
        pm.load_adapter(paths[f"a{i}"], adapter_name=f"a{i}")
    pm.eval()
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=TARGETS, max_adapters=n_max, max_rank=16)
    load_times = []
    for n, p in paths.items():
        t0 = time.perf_counter()
        pool.load(n, p)
        sync(device)
        load_times.append((time.perf_counter() - t0) * 1e3)
    load_disk_ms = Timing.of(load_times)  # median (min-max) over the n_max adapters
    batch, seq = (8, 32) if quick else (16, 64)
    ids = torch.randint(0, 1024, (batch, seq), device=device)
    rows = []
    for distinct in ([1, 4] if quick else [1, 4, 16]):
        names = [f"a{i % distinct}" for i in range(batch)]

        def ours():
            with pool.batch(names):
                model(input_ids=ids)

        t_ours = time_fn(ours, device, reps=7)
        t_peft = time_fn(lambda: pm(input_ids=ids, adapter_names=names), device, reps=7)
        t_base = time_fn(lambda: base(input_ids=ids), device, reps=7)
        rows.append({"adapters": distinct, "batch x seq": f"{batch}x{seq}", "lora_ext ms": t_ours,
                     "PEFT ms": t_peft, "base model ms": t_base, "speedup vs PEFT": t_peft / t_ours,
                     "overhead vs base": t_ours / t_base})
    # load times: from disk (file read + slot write) and from the pinned host cache
    small = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=TARGETS, max_adapters=1, max_rank=16)
    small.load("x", paths["a0"])
    small.load("y", paths["a1"])  # evicts x into the host cache
    t0 = time.perf_counter()
    with small.batch(["x"]):  # x comes back from the host cache
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    load_cache_ms = (time.perf_counter() - t0) * 1e3
    for r in rows:
        r["load from disk ms"], r["load from host cache ms"] = load_disk_ms, load_cache_ms
    return rows


def main(argv=None):
    return cli("pool", "mixed-batch forward, small Llama, on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
