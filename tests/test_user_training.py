"""Fine-tuning workflows as an ML engineer runs them, against PEFT doing the same run: a trained
classification head beside the LoRA layers (saved or warned about), HF Trainer with gradient
accumulation and bf16, fp16 autocast with GradScaler, resuming from a PEFT adapter."""
import copy
import warnings

import pytest
import torch
from models import tiny_llama

import lora_ext

peft = pytest.importorskip("peft")


def seq_cls_model():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def test_a_trained_head_without_bias_is_saved_or_warned_about(tmp_path):
    """LoRA on q/v plus a trained `score` head (Llama's has no bias), as PEFT's SEQ_CLS task trains
    it: Adapter.from_model without modules_to_save used to drop the head without a word (the
    reloaded adapter gave other logits); it now warns naming it, and modules_to_save=["score"]
    saves it: PEFT and load_adapter give the trained model's logits."""
    ids = torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    model = seq_cls_model()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    lora_ext.mark_only_lora_trainable(model)
    model.score.weight.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits

    with pytest.warns(UserWarning, match=r"\['score'\] have trainable weights that are not saved"):
        lora_ext.Adapter.from_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_ext.Adapter.from_model(model, modules_to_save=["score"]).save(str(tmp_path))
        frozen = copy.deepcopy(model)
        frozen.score.weight.requires_grad_(False)
        lora_ext.Adapter.from_model(frozen)  # nothing trainable left unsaved: no warning
    pm = peft.PeftModel.from_pretrained(seq_cls_model(), str(tmp_path)).eval()
    ours = seq_cls_model()
    lora_ext.load_adapter(ours, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=0)


def test_inject_after_gradient_checkpointing_names_the_hook_and_the_order():
    """PEFT's docs enable gradient checkpointing before adding LoRA; transformers then hooks the input
    embeddings (enable_input_require_grads), which a LoRA layer replacing them would drop. inject
    refuses it before changing the model, now naming the hook and the order that works: inject
    first, then gradient_checkpointing_enable (the hook goes on the LoRA layer), and the LoRA
    gradients equal an uncheckpointed run's."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(TypeError, match=r"'model.embed_tokens'.*make_inputs_require_grads.*call them after inject"):
        lora_ext.inject(model, ["q_proj", "embed_tokens"], r=4)
    assert not lora_ext.lora_layers(model)

    model = tiny_llama()
    lora_ext.inject(model, ["q_proj", "embed_tokens"], r=4)
    lora_ext.mark_only_lora_trainable(model)
    for m in lora_ext.lora_layers(model).values():
        torch.nn.init.normal_(getattr(m, m.factor_names[1 if m.lora_kind == "linear" else 0]), std=0.1)
    plain = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    for m in (plain, model):
        m(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and any("lora_embedding_A" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_mark_only_lora_trainable_refuses_a_peft_model():
    """Migrating to patch_peft, one keeps lora_ext.mark_only_lora_trainable(model): on a PeftModel it
    froze PEFT's own factors too ("lora_A.default.weight": the last name part is not lora_*), so
    nothing trained, without a word. It now raises naming PEFT's layer, and changes nothing."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(before) == 8
    with pytest.raises(TypeError, match=r"mark_only_lora_trainable: PeftModel has PEFT's Linear layer "
                                        r"'base_model.model.model.layers.0.self_attn.q_proj'"):
        lora_ext.mark_only_lora_trainable(pm)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == before


def test_lora_state_dict_of_a_model_without_lora_ext_layers_raises():
    """A plain loop saving torch.save(lora_ext.lora_state_dict(model)) each epoch: on a PeftModel (or
    before inject) it returned {} and every checkpoint was empty, without a word. It now raises,
    naming PEFT's layer and PEFT's own state dict function."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"lora_state_dict: PeftModel has no lora_ext LoRA layers \(PEFT's "
                                         r"'base_model.model.model.layers.0.self_attn.q_proj': peft.get_peft_model_state_dict"):
        lora_ext.lora_state_dict(pm)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no lora_ext LoRA layers \(use lora_ext.inject first\)"):
        lora_ext.lora_state_dict(tiny_llama(), peft_names=False)
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj"], r=4)
    assert len(lora_ext.lora_state_dict(model)) == 4  # 2 layers x (A, B)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fp16_model_with_fp32_factors_trains_with_grad_scaler_as_peft(use_dora):
    """The README's recipe for a 16-bit model with a GradScaler (fp16 factors are refused by it):
    fp32 factors after inject, as PEFT's autocast_adapter_dtype keeps them. Three AdamW steps through
    GradScaler("cpu") on an fp16 Llama, LoRA on q/v and the embeddings, the same initial factors:
    the losses equal PEFT's and the factors stay fp32."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "v_proj", "embed_tokens"]

    def run(kind):
        model = tiny_llama(dtype=torch.float16)
        if kind == "peft":
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               use_dora=use_dora))
        else:
            lora_ext.inject(model, targets, r=4, alpha=8, use_dora=use_dora)
            lora_ext.mark_only_lora_trainable(model)
            for p in model.parameters():
                p.data = p.data.float() if p.requires_grad else p.data
        torch.manual_seed(1)
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n and "magnitude" not in n:
                p.data = torch.randn_like(p) * 0.1
        trained = [p for p in model.parameters() if p.requires_grad]
        assert len(trained) == (15 if use_dora else 10) and all(p.dtype == torch.float32 for p in trained)
        model.train()
        opt, scaler, losses = torch.optim.AdamW(trained, lr=1e-2), torch.amp.GradScaler("cpu"), []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            losses.append(loss.item())
        return torch.tensor(losses)

    peft_losses, ours = run("peft"), run("ours")
    assert peft_losses[-1] < peft_losses[0] - 0.05
    torch.testing.assert_close(ours, peft_losses, rtol=2e-4, atol=0)


def test_adapter_of_layers_with_different_dropouts_warns(tmp_path):
    """Two inject calls with their own dropout, then the adapter saved to resume training later: PEFT's
    config holds one lora_dropout, so the file said the larger for every layer, and load_adapter gave
    both layers that dropout, without a word. Saving now warns, naming both values."""
    model = tiny_llama()
    lora_ext.inject(model, ["q_proj"], r=4, dropout=0.1)
    lora_ext.inject(model, ["v_proj"], r=4, dropout=0.3)
    with pytest.warns(UserWarning, match=r"different lora_dropout \[0.1, 0.3\].*saved as 0.3"):
        lora_ext.Adapter.from_model(model).save(str(tmp_path))
    resumed = tiny_llama()
    lora_ext.load_adapter(resumed, str(tmp_path))
    assert {m.lora_dropout for m in lora_ext.lora_layers(resumed).values()} == {0.3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_ext.Adapter.from_model(resumed)  # one dropout: no warning



@pytest.mark.parametrize("kind", ["linear", "parameter"])
def test_a_new_rank_keeps_the_parameter_objects_an_optimizer_steps(kind):
    """set_lora_factors / load_adapter of another rank used to make new Parameter objects: an
    optimizer made before kept stepping the old ones, and the LoRA factors silently stopped
    training. Now the same objects take the new shape (SGD just works; Adam's old-shape state
    raises torch's size error instead of training nothing)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = lora_ext.LoRALinear.from_linear(torch.nn.Linear(12, 10), r=4, alpha=8)
        A, B = torch.randn(6, 12), torch.randn(10, 6)
    else:  # an experts stack [E = 2, 12, 10]: A [E * r, 10], B [12, E * r]
        experts = torch.nn.Module()
        experts.w = torch.nn.Parameter(torch.randn(2, 12, 10))
        layer = lora_ext.LoRAParameter(experts, "w", r=4, alpha=8)
        A, B = torch.randn(2 * 6, 10), torch.randn(12, 2 * 6)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    layer.lora_A.grad = torch.ones_like(layer.lora_A)  # a stale gradient of the old shape
    layer.set_lora_factors(A, B, 0.5)
    assert [id(p) for p in layer.parameters() if p.requires_grad] == [id(p) for p in params]  # the same objects
    assert layer.lora_A.shape == A.shape and layer.lora_A.grad is None and layer.r == 6
    layer.lora_A.grad, layer.lora_B.grad = torch.ones_like(A), torch.ones_like(B)
    opt.step()  # steps the new factors
    assert torch.allclose(layer.lora_A, A - 0.1) and torch.allclose(layer.lora_B, B - 0.1)
