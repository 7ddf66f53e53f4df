"""A PEFT LoRA training step, patched vs unpatched: a small Llama (4 layers x 1024, LoRA r=16 on
q/v, AdamW), forward with labels + backward + optimizer step, the same PeftModel before and after
``lora_ext.patch_peft`` (two deepcopies, same weights). Interleaved runs: median (min-max) of
the per-run ratio. Beside it, the activation memory each keeps for backward: the bytes of the
distinct storages one forward saves for backward, parameters excluded (PEFT's LoRA dropout saves
a dropped copy of x and its mask per layer; lora_ext regenerates the mask and saves the [T, r]
intermediate only).

python bench/bench_peft_train.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Timing, cli, interleaved, ratios, saved_bytes  # noqa: E402
import lora_ext  # noqa: E402


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = 256 if quick else 1024
    cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2 if quick else 4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    base = LlamaForCausalLM(cfg).to(device, dt)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules=["q_proj", "v_proj"]))
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.02)
    patched = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_patched = len(lora_ext.patch_peft(patched))
    batch, seq = (2, 64) if quick else (16, 512) if device == "cuda" else (4, 128)
    ids = torch.randint(0, 1024, (batch, seq), device=device)

    def step_of(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return step

    fns = {"PEFT": step_of(ref), "PEFT + patch_peft": step_of(patched)}
    saved = {k: saved_bytes_of(m, ids) for k, m in (("PEFT", ref), ("PEFT + patch_peft", patched))}
    t = interleaved(fns, device, runs=5 if quick else 30)
    ratio = ratios(t, "PEFT + patch_peft", "PEFT")
    return [{"model": f"Llama {cfg.num_hidden_layers}x{h}", "batch x seq": f"{batch}x{seq}",
             "dtype": str(dt).removeprefix("torch."), "LoRA layers": n_patched,
             "PEFT ms": Timing.of(t["PEFT"]), "patch_peft ms": Timing.of(t["PEFT + patch_peft"]),
             "patch_peft x PEFT": ratio, "PEFT saved MB": saved["PEFT"] / 2**20,
             "patch_peft saved MB": saved["PEFT + patch_peft"] / 2**20,
             "saved: patch_peft x PEFT": saved["PEFT + patch_peft"] / saved["PEFT"]}]


def saved_bytes_of(model, ids) -> int:
    """Bytes of the distinct non-parameter storages one training forward saves for backward."""
    model.train()
    torch.manual_seed(0)
    return saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters()))


def main(argv=None):
    return cli("peft_train", "PEFT LoRA train step on {device}, patched vs unpatched", run, __doc__, argv)


if __name__ == "__main__":
    main()
