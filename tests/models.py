"""Tiny transformers models built from configs (no downloads) for parity tests and benches."""
import torch


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, hidden: int = 64, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_qwen3_moe(seed: int = 0, dtype=torch.float32, layers: int = 2):
    """Qwen3-MoE with 4 experts (2 per token): experts.gate_up_proj [4, 64, 64], down_proj [4, 64, 32]."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, head_dim=16, max_position_embeddings=128)
    return Qwen3MoeForCausalLM(cfg).to(dtype).eval()


def saved_peft(base, path, seed: int, **cfg):
    """A PEFT adapter of ``base`` (r 4, alpha 8 unless ``cfg`` says) with random LoRA factors, saved
    to ``path``; returns the PeftModel in eval mode."""
    import copy

    import peft
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **cfg}))
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * 0.1
    pm.save_pretrained(path)
    return pm.eval()
