"""LoRAParameter merges (exact unmerge, merge_and_unload as PEFT's, safe / inexact merges, tied
parameters, dtype changes while merged) and the errors of inject(target_parameters=...) and
set_lora_factors. Models and pairs: tests/param_cases.py."""

import pytest
import torch
from conftest import devices, rel_err
from param_cases import (expert_reference, experts_of, ids_for, KINDS, pair, path, randomize, TARGETS, tiny_moe)  # noqa: F401  (path: a fixture)
from torch import nn

import lora_ext
from lora_ext.merge import merge_overhead  # (lora_ext.merge is the function)
from lora_ext.param_lora import LoRAParameter, parameter_layers


# ---------------------------------------------------------------- merging expert stacks
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_computes_the_unmerged_one_and_unmerge_is_exact(kind, device, path):
    _, ours, _ = pair(kind, device=device)
    ids = ids_for(device)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert sorted(lora_ext.merge(ours)) == sorted(parameter_layers(ours))
        assert lora_ext.merge(ours) == []  # merged already
        P = experts_of(ours).target().down_proj
        assert not torch.equal(P, before["model.layers.0.mlp.experts.base_layer.base_layer.down_proj"])
        assert rel_err(ours(input_ids=ids).logits, want) < 1e-5
        assert all(0 < o < 0.5 for o in merge_overhead(ours).values())
        assert sorted(lora_ext.unmerge(ours)) == sorted(parameter_layers(ours))
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, want)



@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_unmerge_restores_the_stack_bit_for_bit_over_many_cycles(kind, dtype, device):
    model = tiny_moe(kind, device=device)
    lora_ext.inject(model, target_parameters=TARGETS, r=4, alpha=8)
    randomize(model, std=0.2)
    model.to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {n: expert_reference(w) for n, w in parameter_layers(model).items()}
    for cycle in range(6):
        lora_ext.merge(model)
        for n, w in parameter_layers(model).items():  # the merged stack: P + s B A rounded once
            assert rel_err(getattr(w.target(), w.parameter_name), refs[n]) < {torch.float32: 1e-6}.get(dtype, 4e-3)
        lora_ext.unmerge(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), (cycle, n)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inexact_merge_then_unmerge_is_close(dtype, device):
    model = tiny_moe("qwen3_moe", device=device)
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    randomize(model, std=0.2)
    model.to(dtype)
    stacks = {n: w for n, w in parameter_layers(model).items()}
    before = {n: getattr(w.target(), w.parameter_name).detach().clone() for n, w in stacks.items()}
    delta = {n: (expert_reference(w) - before[n].double()).norm() for n, w in stacks.items()}
    lora_ext.merge(model, exact=False)
    assert merge_overhead(model) == {}
    lora_ext.unmerge(model)
    for n, w in stacks.items():  # off by a rounding or two of P + s B A: relative to the delta's size
        err = (getattr(w.target(), w.parameter_name).double() - before[n].double()).norm()
        assert 0 < err <= (1e-6 if dtype == torch.float32 else 1e-2) * delta[n], n


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_the_experts_class_back_with_peft_weights(kind, device):
    pm, ours, _ = pair(kind, device=device)
    ids = ids_for(device)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    cls = type(experts_of(pm.base_model.model).get_base_layer())
    theirs, mine = pm.merge_and_unload(), lora_ext.merge_and_unload(ours)
    assert mine is ours and not parameter_layers(mine)
    assert type(experts_of(mine)) is cls and type(experts_of(theirs)) is cls
    sd, sd_p = mine.state_dict(), theirs.state_dict()
    assert sd.keys() == sd_p.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_p[k], rtol=0, atol=1e-6, msg=k)
    with torch.no_grad():
        assert rel_err(mine(input_ids=ids).logits, want) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_safe_merge_refuses_an_overflowing_expert_by_name(device):
    _, ours, _ = pair("qwen3_moe", device=device)
    w = experts_of(ours, 1)  # down_proj of layer 1
    E, r = w.num_experts, w.r
    with torch.no_grad():  # expert 2 only: s * B_2 A_2 overflows fp32
        w.lora_A[2 * r:3 * r] = 1e20
        w.lora_B[:, 2::E] = 1e20
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts'.*expert 2"):
        lora_ext.merge(ours, safe=True)
    assert not any(m.merged for m in parameter_layers(ours).values())
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())  # nothing merged
    with pytest.raises(ValueError, match="expert 2"):
        w.check_merge()
    with pytest.raises(ValueError, match="expert 2"):
        lora_ext.merge_and_unload(ours, safe=True)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_train_mode_unmerges():
    _, ours, _ = pair("qwen3_moe")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lora_ext.merge(ours)
    assert all(m.merged for m in parameter_layers(ours).values())
    ours.train()
    assert not any(m.merged for m in parameter_layers(ours).values())
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_to_dtype_while_merged_then_unmerge_gives_the_converted_original():
    _, ours, _ = pair("qwen3_moe")
    want = {n: p.detach().to(torch.bfloat16) for n, p in ours.named_parameters()}
    lora_ext.merge(ours)
    ours.to(torch.bfloat16)
    lora_ext.unmerge(ours)
    assert all(torch.equal(p, want[n]) for n, p in ours.named_parameters())


# ---------------------------------------------------------------- errors
def test_targets_matching_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="matched no parameter"):
        lora_ext.inject(model, target_parameters=["mlp.experts.up_proj"])
    with pytest.raises(ValueError, match="matched no parameter"):  # a module name is not a parameter name
        lora_ext.inject(model, target_parameters=["mlp.experts"])
    assert not parameter_layers(model)


def test_a_string_of_targets_is_refused_clearly():
    with pytest.raises(ValueError, match="list of parameter names.*got 'mlp.experts.gate_up_proj'"):
        lora_ext.inject(tiny_moe("qwen3_moe"), target_parameters="mlp.experts.gate_up_proj")


def test_a_parameter_of_a_lora_linear():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, ["q_proj"], r=2)
    with pytest.raises(TypeError, match=r"q_proj\.weight'.*LoRA layer"):
        lora_ext.inject(model, target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(TypeError, match="LoRA layer"):
        lora_ext.inject(model, target_parameters=["q_proj.lora_A"])
    assert not parameter_layers(model)


def test_a_parameter_of_a_module_targeted_by_target_modules_too_changes_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'.*LoRA layer"):
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=["q_proj.weight"])
    assert not lora_ext.lora_layers(model) and not parameter_layers(model)


def test_a_bad_shape_among_good_targets_changes_nothing():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.input_layernorm\.weight'.*2-D"):
        lora_ext.inject(model, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "input_layernorm.weight"])
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)


@pytest.mark.parametrize("pattern, match", [
    (dict(rank_pattern={"layers.1.mlp.experts.down_proj": 0}), "rank r must be a positive int, got 0"),
    (dict(rank_pattern={"layers.1.mlp.experts.down_proj": 2.5}), "rank r must be a positive int, got 2.5"),
    (dict(alpha_pattern={"layers.1.mlp.experts.down_proj": float("nan")}), "alpha must be a finite number, got nan"),
])
def test_a_bad_rank_or_alpha_for_a_later_target_changes_nothing(pattern, match):
    # the bad value is the last target's: every one is checked before the first is wrapped
    model = tiny_moe("qwen3_moe")
    where = r"inject: target_parameters: 'model\.layers\.1\.mlp\.experts\.down_proj': LoRA "
    with pytest.raises(ValueError, match=where + match):
        lora_ext.inject(model, target_parameters=TARGETS, **pattern)
    with pytest.raises(ValueError, match=where + match):  # beside target_modules: neither injected
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=TARGETS, **pattern)
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)
    # the same for target_modules: layer 0's q_proj stays an nn.Linear
    key = next(iter(pattern.values()))
    modules = {k.replace("mlp.experts.down_proj", "self_attn.q_proj"): v for k, v in key.items()}
    bad = {next(iter(pattern)): modules}
    with pytest.raises(ValueError, match=r"inject: module 'model\.layers\.1\.self_attn\.q_proj': LoRA " + match):
        lora_ext.inject(model, target_modules=["q_proj"], **bad)
    with pytest.raises(ValueError, match=r"inject: module 'model\.layers\.1\.self_attn\.q_proj': LoRA " + match):
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=TARGETS, **bad)
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)


def test_a_bad_init_or_dropout_with_an_embedding_first_changes_nothing():
    # an embedding takes no init (nor dropout): before, it was wrapped before the first Linear raised
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="inject: init must be 'kaiming' or 'gaussian', got 'xavier'"):
        lora_ext.inject(model, target_modules=["embed_tokens", "q_proj"], init="xavier")
    with pytest.raises(ValueError, match=r"inject: module 'model\.embed_tokens': LoRA dropout must be"):
        lora_ext.inject(model, target_modules=["embed_tokens", "q_proj"], dropout=1.5)
    assert not lora_ext.lora_layers(model)


@pytest.mark.parametrize("what", ["dropout", "use_dora"])
def test_dropout_and_dora_are_refused(what):
    model = tiny_moe("qwen3_moe")
    kw = {"dropout": 0.1} if what == "dropout" else {"use_dora": True}
    with pytest.raises(ValueError, match=what):
        lora_ext.inject(model, target_parameters=TARGETS, **kw)
    with pytest.raises(ValueError, match=what):  # also beside target_modules, before either is injected
        lora_ext.inject(model, target_modules=["q_proj"], target_parameters=TARGETS, **kw)
    assert not parameter_layers(model) and not lora_ext.lora_layers(model)


def test_1d_and_4d_parameters_are_refused():
    with pytest.raises(ValueError, match=r"2-D \[out, in\] or a 3-D expert stack, got shape \[64\]"):
        lora_ext.inject(tiny_moe("qwen3_moe"), target_parameters=["input_layernorm.weight"])
    conv = nn.Module()
    conv.c = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"got shape \[3, 2, 3, 3\]"):
        lora_ext.inject(conv, target_parameters=["c.weight"])
    with pytest.raises(ValueError, match="got shape"):
        LoRAParameter(nn.Linear(3, 4), "bias")


def test_a_parameter_of_the_model_itself_is_refused():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="parameter of the model itself"):
        lora_ext.inject(Top(), target_parameters=["w"])


def test_wrapping_the_same_parameter_twice_is_refused():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=2)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        lora_ext.inject(model, target_parameters=["layers.0.mlp.experts.gate_up_proj"])
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        lora_ext.inject(model, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="has a LoRAParameter already"):
        LoRAParameter(experts_of(model), "gate_up_proj")
    assert {n: p for n, p in model.named_parameters()}.keys() == state.keys()
    assert len(parameter_layers(model)) == 4


def test_set_lora_factors_shapes():
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    w = experts_of(model).base_layer  # gate_up_proj: [4, 64, 64] = [E, out, in]
    E, i, o = 4, 64, 64
    for A, B in [((E * 3, i - 1), (o, E * 3)), ((E * 3, i), (o + 1, E * 3)), ((10, i), (o, 10)),
                 ((E * 3, i), (o, E * 2)), ((0, i), (o, 0)), ((E * 3, i, 1), (o, E * 3)), ((E * 3,), (o, E * 3))]:
        with pytest.raises(ValueError, match=r"expected A \[4 \* r, 64\] and B \[64, 4 \* r\]"):
            w.set_lora_factors(torch.zeros(A), torch.zeros(B), 1.0)
    assert w.r == 3 and w.lora_A.shape == (12, 64)
    w.set_lora_factors(torch.ones(E * 5, i), torch.ones(o, E * 5), 0.5)  # another r resizes
    assert (w.r, w.lora_A.shape, w.lora_B.shape, w.scaling, w.lora_alpha) == (5, (20, 64), (64, 20), 0.5, 2.5)


def test_set_lora_factors_on_a_merged_stack_replaces_the_merged_adapter():
    """As a merged LoRALayer: unmerged, set, merged again (exactly), so the stack holds the new
    adapter and unmerge still gives the original back bit for bit; merged for good: refused."""
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    randomize(model, std=0.2)
    w = experts_of(model).base_layer
    P = getattr(w.target(), w.parameter_name)
    P0 = P.detach().clone()
    lora_ext.merge(model)
    A, B = torch.randn(20, 64) * 0.1, torch.randn(64, 20) * 0.1
    w.set_lora_factors(A, B, 0.5)
    assert w.merged and w.r == 5
    assert rel_err(P, expert_reference(w, P0)) < 1e-6  # P0 + the new adapter, not the old one
    w.reset_lora_parameters()  # B = 0: the merged stack is P0 again
    assert w.merged and torch.equal(P, P0)
    w.set_lora_factors(A, B, 0.5)
    lora_ext.unmerge(model)
    assert torch.equal(P, P0)
    lora_ext.merge(model)
    w.drop_merge_state()
    with pytest.raises(ValueError, match=r"set_lora_factors: the layer is merged for good \(drop_merge_state"):
        w.set_lora_factors(A, B, 0.5)


@pytest.mark.parametrize("scale, err, match", [
    (float("nan"), ValueError, "scale must be finite in float32"),
    (float("inf"), ValueError, "scale must be finite in float32"),
    (1e39, ValueError, "scale must be finite in float32"),
    ("2", TypeError, "scale must be a real number, got str '2'"),
    (True, TypeError, "scale must be a real number, got bool"),
])
def test_set_lora_factors_refuses_a_scale_the_ops_refuse(scale, err, match):
    # as ops._checks.as_scale: before, NaN was stored and the MoE forward returned NaN logits silently
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=2, alpha=4)
    w = experts_of(model)
    A, B = w.lora_A.detach().clone(), w.lora_B.detach().clone()
    with pytest.raises(err, match=r"LoRAParameter\('down_proj'\)\.set_lora_factors: " + match):
        w.set_lora_factors(torch.randn(A.shape), torch.randn(B.shape), scale)
    assert w.scaling == 2.0 and w.lora_alpha == 4.0 and torch.equal(w.lora_A, A) and torch.equal(w.lora_B, B)
    w.set_lora_factors(A, B, torch.tensor(0.5))  # a 1-element tensor: its value, as the ops take it
    assert type(w.scaling) is float and w.scaling == 0.5 and w.lora_alpha == 1.0


def test_target_modules_leave_a_module_with_a_lora_parameter_alone():
    # the wrapper runs the wrapped module's forward with effective parameters: a LoRALinear put
    # inside it would be bypassed for its weight, so "all-linear" skips it and a named target is refused
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    lora_ext.inject(model, target_parameters=["0.weight"], r=2)
    assert lora_ext.inject(model, "all-linear", r=2) == ["2"]
    assert type(model[0].base_layer) is nn.Linear
    with pytest.raises(TypeError, match=r"'0\.base_layer' has a LoRAParameter"):
        lora_ext.inject(model, r".*base_layer", r=2)


def test_merge_refuses_a_parameter_tied_to_another_module():
    # target_parameters=["lm_head.weight"] with tied embeddings: merging would change embed_tokens too
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight
    lora_ext.inject(model, target_parameters=["1.weight"], r=2, alpha=2)
    with torch.no_grad():
        model[1].lora_B.normal_()
    emb = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '1' shares its weight with \['0'\]"):
        lora_ext.merge(model)
    with pytest.raises(ValueError, match="tied"):
        lora_ext.merge_and_unload(model)
    assert not model[1].merged and torch.equal(model[0].weight, emb)
    assert lora_ext.merge(model, allow_tied=True) == ["1"]
    lora_ext.unmerge(model)
    assert torch.equal(model[0].weight, emb)


def test_inexact_merge_keeps_its_own_copy_of_the_factors():
    # unmerge takes out what merge put in (as LoRALinear), even if the factors are written meanwhile
    # (load_state_dict, an optimizer step): merge(exact=False) used to keep views of lora_A
    model = nn.Sequential(nn.Linear(6, 5))
    lora_ext.inject(model, target_parameters=["0.weight"], r=2, alpha=2)
    w = model[0]
    with torch.no_grad():
        w.lora_B.normal_()
    before = w.target().weight.detach().clone()
    lora_ext.merge(model, exact=False)
    with torch.no_grad():
        w.lora_A.mul_(3.0)
        w.lora_B.mul_(3.0)
    lora_ext.unmerge(model)
    torch.testing.assert_close(w.target().weight, before, rtol=0, atol=1e-5)


def test_load_adapter_into_a_merged_model_as_into_merged_lora_layers(tmp_path):
    """load_adapter into a merged model with expert-parameter layers gives the merged model of the
    loaded adapter (as for merged LoRALayers), and unmerge gives the base stacks back exactly."""
    src = tiny_moe("qwen3_moe")
    lora_ext.inject(src, target_parameters=TARGETS, r=3)
    randomize(src, std=0.2)
    lora_ext.Adapter.from_model(src).save(str(tmp_path / "a"))
    model = tiny_moe("qwen3_moe")
    lora_ext.inject(model, target_parameters=TARGETS, r=3)
    randomize(model, std=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_ext.merge(model)
    lora_ext.load_adapter(model, str(tmp_path / "a"))
    assert all(m.merged for m in parameter_layers(model).values())
    ids = ids_for("cpu")
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, src(input_ids=ids).logits) < 1e-5
    lora_ext.unmerge(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
