"""Mixed-batch serving, end to end: a small Llama (4 layers x 1024, batch 16, LoRA r=16 on q/v)
with 1/4/16 distinct adapters in one batch, decode (1 token per sequence) and prefill (seq 64):
lora_ext AdapterPool vs HF PEFT's ``model(..., adapter_names=[...])``, the same PEFT model after
``lora_ext.patch_peft``, and the base model; adapter load times (from disk and from the pool's host
cache). Variants run interleaved (each once per run); ratios are taken per run and reported as
median (min-max). On CUDA, decode is also timed as servers run it, each step one CUDA-graph
replay (the pool's indices are tensors updated in place, so one graph serves every mix): "graph:
lora_ext x base" against the base model's captured step. "adapter bytes" is what the batch's
distinct adapters add to the weights a decode step reads (decode is bound by weight reads, so it
is the floor of "x base" there). "DoRA": the same batches through AdapterPool(dora=True) holding
DoRA versions of the adapters (PEFT refuses DoRA in mixed batches): "DoRA x lora_ext" is DoRA's
serving cost over plain LoRA (the per-token g·y + (1 - g)·b pass).

python bench/bench_pool.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios, sync  # noqa: E402
import lora_ext  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def build(device, quick):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = 256 if quick else 1024
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
    paths, dora_paths = {}, {}
    for i in range(n_max):
        for dora, out in ((False, paths), (True, dora_paths)):
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                                          use_dora=dora))
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(std=0.02)
                elif "lora_magnitude_vector" in n:
                    p.data.mul_(1 + 0.1 * torch.rand_like(p))
            out[f"a{i}"] = os.path.join(root, f"{'d' if dora else 'a'}{i}")
            pm.save_pretrained(out[f"a{i}"])
            del pm
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a0"], adapter_name="a0")
    for i in range(1, n_max):
        pm.load_adapter(paths[f"a{i}"], adapter_name=f"a{i}")
    pm.eval()
    patched = copy.deepcopy(pm)
    lora_ext.patch_peft(patched)
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=TARGETS, max_adapters=n_max, max_rank=16)
    load_times = []
    for n, p in paths.items():
        t0 = time.perf_counter()
        pool.load(n, p)
        sync(device)
        load_times.append((time.perf_counter() - t0) * 1e3)
    load_disk_ms = Timing.of(load_times)  # median (min-max) over the n_max adapters
    dora_model = copy.deepcopy(base)
    dora_pool = lora_ext.AdapterPool(dora_model, target_modules=TARGETS, max_adapters=n_max, max_rank=16, dora=True)
    for n, p in dora_paths.items():
        dora_pool.load(n, p)
    batch, seq = (8, 32) if quick else (16, 64)
    base_elems = sum(p.numel() for p in base.parameters())
    lora_elems = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n and ".a0." in n)
    rows = []
    for phase, length in (("decode", 1), ("prefill", seq)):
        # a CPU prefill step takes ~0.6 s
        runs = 6 if quick else 100 if device == "cuda" else 45 if length == 1 else 12
        ids = torch.randint(0, 1024, (batch, length), device=device)
        for distinct in ([1, 4] if quick else [1, 4, 16]):
            names = [f"a{i % distinct}" for i in range(batch)]

            def ours():
                with pool.batch(names):
                    model(input_ids=ids)

            def dora():
                with dora_pool.batch(names):
                    dora_model(input_ids=ids)

            fns = {"lora_ext": ours, "DoRA": dora, "PEFT": lambda: pm(input_ids=ids, adapter_names=names),
                   "patch_peft": lambda: patched(input_ids=ids, adapter_names=names),
                   "base": lambda: base(input_ids=ids)}
            if device == "cuda" and length == 1:  # decode as servers run it: one CUDA graph per step
                fns.update(graphs(pool, model, base, ids, names))
            t = interleaved(fns, device, runs=runs)
            ratio = lambda a, b: ratios(t, a, b)  # noqa: E731
            row = {"phase": phase, "adapters": distinct, "batch x seq": f"{batch}x{length}",
                   "adapter bytes": f"{distinct * lora_elems / base_elems:.1%}",
                   "lora_ext ms": Timing.of(t["lora_ext"]), "PEFT ms": Timing.of(t["PEFT"]),
                   "patch_peft ms": Timing.of(t["patch_peft"]), "base model ms": Timing.of(t["base"]),
                   "lora_ext x base": ratio("lora_ext", "base"), "patch_peft x base": ratio("patch_peft", "base"),
                   "PEFT x base": ratio("PEFT", "base"), "speedup vs PEFT": ratio("PEFT", "lora_ext"),
                   "DoRA ms": Timing.of(t["DoRA"]), "DoRA x base": ratio("DoRA", "base"),
                   "DoRA x lora_ext": ratio("DoRA", "lora_ext")}
            if "lora_ext graph" in t:
                row.update({"lora_ext graph ms": Timing.of(t["lora_ext graph"]),
                            "base graph ms": Timing.of(t["base graph"]),
                            "graph: lora_ext x base": ratio("lora_ext graph", "base graph")})
            rows.append(row)
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


def graphs(pool, model, base, ids, names) -> dict:
    """{"lora_ext graph": replay of a captured pool-model step inside pool.batch(names), "base
    graph": replay of the base model's}; {} (with a note) if the model cannot be captured."""
    out = {}
    try:
        for key, net in (("lora_ext graph", model), ("base graph", base)):
            ctx = pool.batch(names) if net is model else contextlib.nullcontext()
            with ctx:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        net(input_ids=ids)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    net(input_ids=ids)
            out[key] = g
    except RuntimeError as e:  # e.g. a host sync inside the model's forward
        print(f"bench_pool: CUDA-graph decode skipped: {e}".splitlines()[0])
        return {}
    g_ours, g_base = out["lora_ext graph"], out["base graph"]

    def ours():
        with pool.batch(names):
            g_ours.replay()

    return {"lora_ext graph": ours, "base graph": g_base.replay}


def main(argv=None):
    return cli("pool", "mixed-batch forward, small Llama, on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
