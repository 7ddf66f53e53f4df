"""python -m lora_ext demo: train three adapters, save them in PEFT format, serve one mixed batch.

Builds a small Llama from a config, fine-tunes a LoRA adapter (q/v projections) for each of three
synthetic tasks, saves each as a PEFT adapter directory, loads all three into an AdapterPool and
serves one batch whose sequences use different adapters (and the base model). Each sequence's
logits are checked against the merged single-adapter model; the table compares adapter and model
sizes, training time, and the mixed-batch latency with the loop over adapters (one forward per
adapter, PEFT's method).
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import lora_ext

VOCAB, SEQ = 128, 24
# task name -> (rank, step of the counting sequence the adapter learns)
TASKS = {"count_up": (8, 1), "count_by_3": (4, 3), "count_down": (16, -1)}


def tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device).eval()


def sequences(step: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return ((start + step * torch.arange(SEQ)) % VOCAB).to(device)


def train_adapter(base, rank: int, step: int, steps: int, device, show: bool) -> tuple[lora_ext.Adapter, float, float]:
    model = copy.deepcopy(base)
    lora_ext.inject(model, ["q_proj", "v_proj"], r=rank, alpha=2 * rank)
    lora_ext.mark_only_lora_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(step + 100)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train r={rank:<2} step={step:+d}", disable=not show, leave=True,
               mininterval=0.5)
    for _ in bar:
        ids = sequences(step, 16, gen, device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return lora_ext.Adapter.from_model(model), time.perf_counter() - t0, loss.item()


def _median_ms(fn, device, reps=7) -> float:
    times = []
    for _ in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


@torch.no_grad()
def run(device=None, steps: int = 150, out_dir: str | None = None, show: bool = True) -> dict:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    console = Console(width=max(Console().width, 110))
    base = tiny_llama(device)
    out_dir = out_dir or tempfile.mkdtemp(prefix="lora_ext_demo_")
    info = {}
    for name, (rank, step) in TASKS.items():
        with torch.enable_grad():
            ad, secs, loss = train_adapter(base, rank, step, steps, device, show)
        path = os.path.join(out_dir, name)
        ad.save(path)
        info[name] = {"rank": rank, "train_s": secs, "loss": loss, "path": path,
                      "bytes": os.path.getsize(os.path.join(path, "adapter_model.safetensors"))}

    # serve: one pool, one mixed batch (None = base model)
    served = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(served, target_modules=["q_proj", "v_proj"], max_adapters=4, max_rank=16)
    for name, d in info.items():
        pool.load(name, d["path"])
    names = ["count_up", "count_by_3", "count_down", None, "count_up", "count_down", "count_by_3", None]
    gen = torch.Generator().manual_seed(7)
    ids = torch.cat([sequences(TASKS[n][1] if n else 1, 1, gen, device) for n in names])
    with pool.batch(names):
        mixed = served(input_ids=ids).logits

    # check every sequence against the merged single-adapter model; measure task accuracy
    max_err, acc = 0.0, {}
    singles = {}
    for name, d in info.items():
        m = copy.deepcopy(base)
        lora_ext.load_adapter(m, lora_ext.Adapter.load(d["path"]))
        singles[name] = m
        merged = lora_ext.merge_and_unload(copy.deepcopy(m))
        rows = [i for i, n in enumerate(names) if n == name]
        ref = merged(input_ids=ids[rows]).logits
        max_err = max(max_err, ((mixed[rows] - ref).norm() / ref.norm()).item())
        pred = mixed[rows, :-1].argmax(-1)
        acc[name] = (pred == ids[rows, 1:]).float().mean().item()
    rows = [i for i, n in enumerate(names) if n is None]
    ref = base(input_ids=ids[rows]).logits
    max_err = max(max_err, ((mixed[rows] - ref).norm() / ref.norm()).item())
    if max_err > 1e-4:
        raise RuntimeError(f"demo: mixed batch differs from the merged single-adapter models ({max_err:.2e})")

    # latency: mixed batch through the pool vs one forward per adapter (PEFT's loop)
    def pooled():
        with pool.batch(names):
            served(input_ids=ids)

    def loop():
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            (singles[name] if name else base)(input_ids=ids[rows])

    t_pool, t_loop = _median_ms(pooled, device), _median_ms(loop, device)
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    t = Table(title=f"lora_ext demo on {device.type}: 3 adapters, one mixed batch of {len(names)} sequences")
    for col in ("adapter", "rank", "file size", "vs model", "train time", "final loss", "next-token acc"):
        t.add_column(col, justify="right")
    for name, d in info.items():
        t.add_row(name, str(d["rank"]), f"{d['bytes'] / 1024:.1f} KiB", f"{100 * d['bytes'] / model_bytes:.2f}%",
                  f"{d['train_s']:.1f} s", f"{d['loss']:.3f}", f"{100 * acc[name]:.0f}%")
    console.print(t)
    console.print(f"model: {model_bytes / 2**20:.2f} MiB; mixed batch matches the merged single-adapter "
                  f"models (max rel. error {max_err:.1e})")
    console.print(f"mixed-batch forward: pool {t_pool:.2f} ms vs loop over adapters {t_loop:.2f} ms "
                  f"({t_loop / t_pool:.2f}x); adapters saved under {out_dir}")
    pool.close()
    return {"adapters": info, "accuracy": acc, "max_rel_err": max_err, "pool_ms": t_pool,
            "loop_ms": t_loop, "model_bytes": model_bytes}
