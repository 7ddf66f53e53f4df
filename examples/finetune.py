"""Fine-tune a tiny Llama with LoRA on q/v: loss drops, only A/B change, the adapter is tiny.

python examples/finetune.py [--steps 200] [--device cpu|cuda] [--out DIR]
The synthetic task: counting, token t is followed by (t + 1) mod V.
The adapter is saved in HF PEFT format (adapter_config.json + adapter_model.safetensors): load it
with lora_ext.Adapter.load(DIR) + lora_ext.load_adapter(make_model("cpu"), ...) or with
peft.PeftModel.from_pretrained(make_model("cpu"), DIR).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from tqdm import tqdm

import lora_ext

VOCAB = 128


def make_model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device)


def batch(n: int, length: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """Counting sequences: token t is followed by (t + 1) mod V."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return ((start + torch.arange(length)) % VOCAB).to(device)


def train(steps: int = 200, device: str = "cpu", out_dir: str | None = None, lr: float = 1e-2,
          show: bool = True) -> dict:
    model = make_model(device)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    names = lora_ext.inject(model, ["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
    lora_ext.mark_only_lora_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="LoRA fine-tune", disable=not show):
        ids = batch(16, 24, device, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the frozen base is bit-identical; only lora_A / lora_B moved
    after = model.state_dict()
    changed = {k for k in base_before if not torch.equal(base_before[k], after[k])}
    out_dir = out_dir or tempfile.mkdtemp(prefix="lora_ext_")
    # PEFT format: adapter_config.json + adapter_model.safetensors (PEFT key names)
    lora_ext.Adapter.from_model(model).save(out_dir)
    path = os.path.join(out_dir, "adapter_model.safetensors")
    model_bytes = sum(v.numel() * v.element_size() for v in base_before.values())
    k = max(1, min(10, len(losses)))  # mean of the first / last (up to) 10 steps
    result = {"targets": names, "first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k,
              "base_params_changed": sorted(changed), "adapter_dir": out_dir, "adapter_file": path,
              "adapter_bytes": os.path.getsize(path), "model_bytes": model_bytes,
              "trainable_params": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters())}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    r = train(a.steps, a.device, a.out)
    print(f"LoRA on {len(r['targets'])} modules: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    print(f"trainable params {r['trainable_params']:,} of {r['total_params']:,} "
          f"({100 * r['trainable_params'] / r['total_params']:.2f}%); base params changed: "
          f"{len(r['base_params_changed'])}")
    print(f"model {r['model_bytes'] / 2**20:.2f} MiB, adapter {r['adapter_bytes'] / 2**10:.1f} KiB "
          f"({r['model_bytes'] / r['adapter_bytes']:.0f}x smaller)")
    print(f"adapter (PEFT format) -> {r['adapter_dir']}: lora_ext.Adapter.load(dir) or "
          f"peft.PeftModel.from_pretrained(base, dir)")


if __name__ == "__main__":
    main()
