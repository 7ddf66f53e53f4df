"""Mixed-batch serving of MoE expert adapters (PEFT's target_parameters): a small Qwen3-MoE
(4 layers x 512, 8 experts, top-2; quick: 2 x 128), batch 16, LoRA r = 16 on both expert
projections, 1/4/16 distinct adapters in one batch, decode (1 token per sequence) and prefill
(seq 64). lora_ext AdapterPool(target_parameters=...) vs what PEFT offers for such adapters, which
refuses mixed batches ("lora.ParamWrapper does not support mixed adapter batches"): a loop over the
batch's adapters, each group's rows run after ``set_adapter``, and the base model. Variants run
interleaved (each once per run); ratios per run, median (min-max).

python bench/bench_pool_moe.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios  # noqa: E402
import lora_ext  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(device, quick):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    h = 128 if quick else 512
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=h, intermediate_size=2 * h, moe_intermediate_size=h // 2,
                         num_hidden_layers=2 if quick else 4, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=h // 8, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    return Qwen3MoeForCausalLM(cfg).to(device, dt).eval()


@torch.no_grad()
def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import peft

    base = build(device, quick)
    n_max = 4 if quick else 16
    root = tempfile.mkdtemp(prefix="lora_ext_bench_pool_moe_")
    paths = {}
    for i in range(n_max):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=[],
                                                                      target_parameters=EXPERTS))
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
    pool = lora_ext.AdapterPool(model, target_modules=[], target_parameters=EXPERTS, max_adapters=n_max, max_rank=16)
    for n, p in paths.items():
        pool.load(n, p)
    batch, seq = (8, 16) if quick else (16, 64)
    base_elems = sum(p.numel() for p in base.parameters())
    lora_elems = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n and ".a0." in n)
    rows = []
    for phase, length in (("decode", 1), ("prefill", seq)):
        runs = 6 if quick else 100 if device == "cuda" else 30 if length == 1 else 8
        ids = torch.randint(0, 1024, (batch, length), device=device)
        for distinct in ([1, 4] if quick else [1, 4, 16]):
            names = [f"a{i % distinct}" for i in range(batch)]
            groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device) for n in set(names)}

            def ours():
                with pool.batch(names):
                    model(input_ids=ids)

            def peft_loop():  # PEFT's way for these adapters: one forward per adapter, then scatter the rows
                out = None
                for n, rows_n in groups.items():
                    pm.set_adapter(n)
                    logits = pm(input_ids=ids[rows_n]).logits
                    out = logits.new_empty(batch, *logits.shape[1:]) if out is None else out
                    out[rows_n] = logits

            t = interleaved({"lora_ext": ours, "PEFT loop": peft_loop, "base": lambda: base(input_ids=ids)},
                            device, runs=runs)
            rows.append({"phase": phase, "adapters": distinct, "batch x seq": f"{batch}x{length}",
                         "adapter bytes": f"{distinct * lora_elems / base_elems:.1%}",
                         "lora_ext ms": Timing.of(t["lora_ext"]), "PEFT loop ms": Timing.of(t["PEFT loop"]),
                         "base model ms": Timing.of(t["base"]),
                         "lora_ext x base": ratios(t, "lora_ext", "base"),
                         "PEFT loop x base": ratios(t, "PEFT loop", "base"),
                         "speedup vs PEFT loop": ratios(t, "PEFT loop", "lora_ext")})
    return rows


def main(argv=None):
    return cli("pool_moe", "mixed-batch forward of MoE expert adapters, small Qwen3-MoE, on {device}", run, __doc__, argv)


if __name__ == "__main__":
    main()
