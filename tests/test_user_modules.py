"""A single-GPU fine-tuning user's workflows with lora_ext's modules (loralib-style), on CPU: autocast,
state dicts of merged models, combining adapters, models that reuse a module, MoE experts with hooks."""
import copy

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext.param_lora import generic_path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomized(module: nn.Module) -> nn.Module:
    """Non-zero LoRA factors (as after training) on every LoRA layer / LoRAParameter of ``module``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rpartition(".")[2] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                p.normal_(0, 0.2)
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_dora_conv_under_autocast_returns_the_base_layers_dtype(bias):
    """A DoRA conv with a bias returned fp32 under bf16 autocast (the bf16 base output minus the fp32
    bias promotes), where nn.Conv2d, the plain LoRA conv and PEFT's DoRA conv return bf16."""
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    layer = randomized(lora_ext.LoRAConv2d.from_conv(conv, r=4, alpha=8, use_dora=True))
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.25)
    x = torch.randn(2, 3, 6, 6)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert conv(x).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 1e-2
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32


class Weights(nn.Module):
    """A module holding a raw 2-D parameter (target_parameters' generic path)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return nn.functional.linear(x, self.w, self.b)


@pytest.mark.parametrize("exact", [True, False])
def test_load_state_dict_into_a_merged_lora_parameter_takes_the_new_factors(exact):
    """A merged LoRAParameter took new factors from load_state_dict while its parameter kept the old
    merged adapter, so the model silently computed the old one (LoRALayer unmerges, loads, merges)."""
    model = nn.Sequential(Weights())
    lora_ext.inject(model, target_parameters=["0.w"], r=2, alpha=4)
    randomized(model)
    w0 = model[0].target().w.detach().clone()
    new = {k: v * 3 for k, v in lora_ext.lora_state_dict(model, peft_names=False).items()}
    ref = copy.deepcopy(model)
    ref.load_state_dict(new, strict=False)
    x = torch.randn(4, 5)
    lora_ext.merge(model, exact=exact)
    model.load_state_dict(new, strict=False)
    assert model[0].merged
    assert rel(model(x), ref(x)) < 1e-6
    lora_ext.unmerge(model)
    if exact:
        assert torch.equal(model[0].target().w, w0)
    else:
        torch.testing.assert_close(model[0].target().w, w0)
    assert rel(model(x), ref(x)) < 1e-6


def test_load_state_dict_with_the_parameter_of_a_merged_lora_parameter_is_refused():
    model = nn.Sequential(Weights())
    lora_ext.inject(model, target_parameters=["0.w"], r=2, alpha=4)
    sd = copy.deepcopy(model.state_dict())
    lora_ext.merge(model)
    merged = model[0].target().w.detach().clone()
    with pytest.raises(RuntimeError, match=r"LoRAParameter '0' is merged.*'0\.base_layer\.w'"):
        model.load_state_dict(sd)
    assert torch.equal(model[0].target().w, merged)


def test_lora_parameter_merged_for_good_refuses_new_factors():
    model = nn.Sequential(Weights())
    lora_ext.inject(model, target_parameters=["0.w"], r=2, alpha=4)
    sd = lora_ext.lora_state_dict(model, peft_names=False)
    lora_ext.merge(model)
    model[0].drop_merge_state()
    with pytest.raises(RuntimeError, match="merged for good"):
        model.load_state_dict(sd, strict=False)


def tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2)).eval()
    lora_ext.inject(model, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=2, alpha=4)
    return randomized(model)


def test_nested_moe_wrappers_merged_take_a_loaded_adapter():
    model = tiny_moe()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    new = {k: v * 2 for k, v in lora_ext.lora_state_dict(model, peft_names=False).items()}
    ref = copy.deepcopy(model)
    ref.load_state_dict(new, strict=False)
    ids = torch.randint(0, 64, (2, 5))
    lora_ext.merge(model)
    model.load_state_dict(new, strict=False)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(ids).logits) < 1e-5
    lora_ext.unmerge(model)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items() if k in base)


def test_hooks_on_an_experts_module_run():
    """The MoE fast path ran the experts without calling the module, so its forward (pre-)hooks were
    skipped silently (a hook changing the output had no effect); the generic path calls it."""
    model = tiny_moe()
    experts = model.model.layers[0].mlp.experts.target()
    ids = torch.randint(0, 64, (2, 5))
    calls = []
    experts.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = experts.register_forward_hook(lambda m, args, out: out * 0.5)
    with torch.no_grad():
        y = model(ids).logits
        assert calls == ["pre"]
        with generic_path():
            ref = model(ids).logits
        handle.remove()
        plain = model(ids).logits
    assert rel(y, ref) < 1e-6
    assert rel(plain, ref) > 1e-3  # the hook changes the output


def test_combine_into_a_dtype_that_overflows_raises():
    """combine(..., dtype=torch.float16) of finite adapters whose c·B exceeds fp16's range gave inf
    factors silently."""
    A, B = torch.randn(2, 10), torch.randn(6, 2) * 1e4
    with pytest.raises(ValueError, match="overflow torch.float16"):
        lora_ext.combine([(A, B, 1.0)], [100.0], dtype=torch.float16)
    out = lora_ext.combine([(A, B, 1.0)], [100.0])  # fp32 holds it
    torch.testing.assert_close(out.B.double() @ out.A.double(), 100 * B.double() @ A.double())
    with pytest.raises(ValueError, match="overflow torch.float32"):
        lora_ext.combine([(A, B * 1e33, 1.0)], [100.0])
    nan = (A, torch.full_like(B, float("nan")), 1.0)  # not finite already: passed through, as merge_ takes it
    assert lora_ext.combine([nan], dtype=torch.float16).B.isnan().all()


def test_a_module_registered_twice_gets_lora_in_both_places():
    """nn.Sequential(shared, act, shared): inject replaced the first registration only (named_modules
    names it once), so the second use ran without LoRA; merge then called the layer's weight "tied"
    to its own other name, and merge_and_unload left a LoRA layer in the second place."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert lora_ext.inject(model, ["0"], r=2, alpha=4) == ["0"]
    assert model[0] is model[2]
    layer = randomized(model[0])
    x = torch.randn(3, 4)

    def f(t):
        return t @ shared.weight.t() + shared.bias + layer.scaling * (t @ layer.lora_A.t()) @ layer.lora_B.t()

    y = model(x)
    assert rel(y, f(torch.relu(f(x)))) < 1e-6
    assert lora_ext.merge(model) == ["0"]  # no allow_tied needed: one layer
    assert rel(model(x), y) < 1e-6
    lora_ext.unmerge(model)
    out = lora_ext.merge_and_unload(model)
    assert type(out[0]) is nn.Linear and out[2] is out[0]
    assert rel(out(x), y) < 1e-6


def test_inject_refuses_the_model_itself():
    """"all-linear" on a bare nn.Linear picked the model itself (name "") and set an attribute named ""."""
    with pytest.raises(TypeError, match="model itself is the target"):
        lora_ext.inject(nn.Linear(4, 4), "all-linear")


def encoder(layers: int = 2) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), layers)


def test_lora_on_in_proj_weight_of_an_encoder_layer_applies_in_eval_under_no_grad():
    """target_parameters=["self_attn.in_proj_weight"]: in eval under no_grad torch's fused encoder path
    read in_proj_weight through the wrapper (the unadapted weight) and skipped LoRA silently."""
    model = encoder()
    lora_ext.inject(model, target_parameters=["self_attn.in_proj_weight"], r=2, alpha=4)
    randomized(model).eval()
    assert not model.use_nested_tensor
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for kw in ({}, {"src_key_padding_mask": mask}):
        ref = model(x, **kw)  # (with grad: the plain path)
        with torch.no_grad():
            y = model(x, **kw)
        assert rel(y, ref) < 1e-6
    with torch.no_grad():
        y = model(x)
    plain = encoder()
    plain.load_state_dict(lora_ext.merge_and_unload(copy.deepcopy(model)).state_dict())
    with torch.no_grad():
        assert rel(plain.eval()(x), y) < 1e-6


def test_lora_on_the_out_proj_weight_of_multihead_attention_is_refused():
    """nn.MultiheadAttention reads out_proj.weight itself: a LoRAParameter on it was accepted and never ran."""
    model = encoder(1)
    before = dict(model.named_modules())
    with pytest.raises(TypeError, match="out_proj of an nn.MultiheadAttention"):
        lora_ext.inject(model, target_parameters=["self_attn.out_proj.weight"], r=2)
    assert dict(model.named_modules()) == before


def test_train_of_a_lora_parameter_merged_for_good_with_trainable_factors_raises():
    """As a LoRALayer's: train() left it merged and silently trained nothing (the forward skips LoRA)."""
    model = nn.Sequential(Weights())
    lora_ext.inject(model, target_parameters=["0.w"], r=2)
    lora_ext.merge(model.eval())
    model[0].drop_merge_state()
    with pytest.raises(ValueError, match="merged for good"):
        model.train()
    model[0].requires_grad_(False)
    model.train()  # frozen factors: nothing to train
    assert model[0].merged and model.training


def test_inject_into_a_bare_layer_names_the_constructors_whatever_the_targets():
    """inject(nn.Linear(4, 4), ["q_proj"]) said "matched no module ... names there: ['']"; the model
    itself cannot be replaced in place: TypeError naming the from_* constructors, as with "all-linear"."""
    for target in (["q_proj"], "all-linear", ["weight"]):
        with pytest.raises(TypeError, match="the model itself is the target.*from_linear"):
            lora_ext.inject(torch.nn.Linear(4, 4), target_modules=target)
    with pytest.raises(TypeError, match="the model itself is the target.*from_embedding"):
        lora_ext.inject(torch.nn.Embedding(5, 4), target_modules=["q_proj"])


def test_from_constructors_refuse_what_inject_refuses():
    """from_linear / from_embedding / from_conv compute the base output from the weight (F.linear, ...):
    a subclass with a forward of its own, hooks or a forward replaced on the instance would be skipped
    silently, so they are refused as inject refuses them; a subclass computing the plain function
    (FalconLinear's x @ W^T + b) is taken."""
    class Routed(nn.Linear):  # a forward that is not F.linear of its weight
        def forward(self, x):
            return super().forward(x).relu()

    class PlainAgain(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"LoRALinear\.from_linear: the Routed is a Routed whose forward is not the "
                                        r"plain layer's"):
        lora_ext.LoRALinear.from_linear(Routed(4, 3), r=2)
    plain = PlainAgain(4, 3)
    layer = lora_ext.LoRALinear.from_linear(plain, r=2)
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), plain(x))  # B = 0: the base layer's function
    hooked = nn.Linear(4, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(TypeError, match=r"from_linear: the Linear has hooks"):
        lora_ext.LoRALinear.from_linear(hooked, r=2)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    with pytest.raises(TypeError, match=r"LoRAEmbedding\.from_embedding: the Scaled is a Scaled whose forward"):
        lora_ext.LoRAEmbedding.from_embedding(Scaled(10, 4), r=2)

    class Clipped(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).clamp(max=0.0)

    with pytest.raises(TypeError, match=r"LoRAConv2d\.from_conv: the Clipped is a Clipped whose forward"):
        lora_ext.LoRAConvNd.from_conv(Clipped(3, 4, 3), r=2)
