"""lora_ext.combine against PEFT's add_weighted_adapter (the oracle) on a tiny Llama: ranks that
differ, rank_pattern / alpha_pattern, rsLoRA, negative and zero weights, other target sets,
embeddings; the combined adapter saved and loaded by PEFT; refusals of what combine does not do."""
import copy

import pytest
import torch
from conftest import rel_err
from models import tiny_llama

import lora_ext
from lora_ext import Adapter

peft = pytest.importorskip("peft")
QV = ["q_proj", "v_proj"]


def peft_adapters(tmp_path, cfgs: dict):
    """A PeftModel holding adapters `cfgs` (name -> LoraConfig kwargs) with random factors, and
    the same adapters read by lora_ext from PEFT's save_pretrained."""
    pm = None
    for name, kw in cfgs.items():
        config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": QV, **kw})
        if pm is None:
            pm = peft.get_peft_model(tiny_llama(seed=1), config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    g = torch.Generator().manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    pm.save_pretrained(tmp_path / "peft")
    return pm.eval(), [Adapter.load(tmp_path / "peft" / name) for name in cfgs]


def peft_deltas(pm, name) -> dict:
    """{module: scaling * B @ A} of PEFT adapter `name` (fp64)."""
    out = {}
    for mn, m in pm.base_model.model.named_modules():
        if name in getattr(m, "lora_A", {}):
            A, B = m.lora_A[name].weight, m.lora_B[name].weight
        elif name in getattr(m, "lora_embedding_A", {}):
            A, B = m.lora_embedding_A[name], m.lora_embedding_B[name]
        else:
            continue
        out[mn] = m.scaling[name] * (B.double() @ A.double())
    return out


def our_deltas(ad) -> dict:
    return {n: w.scale * (w.B.double() @ w.A.double()) for n, w in ad.layers.items()}


def assert_same_deltas(got: dict, want: dict, tol=1e-6):
    for name in set(got) | set(want):  # a module only one side has must be zero on the other
        g, w = got.get(name), want.get(name)
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert rel_err(g, w) < tol, name


CASES = {  # adapters (name -> LoraConfig kwargs), weights, how
    "cat_ranks_neg": ({"a": {}, "b": {"r": 8, "lora_alpha": 4}}, [0.7, -0.3], "cat"),
    "cat_zero_patterns": ({"a": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 5}},
                           "b": {"r": 8}}, [0.0, -1.5], "cat"),
    "cat_targets_embedding": ({"a": {"target_modules": ["embed_tokens", "q_proj"]},
                               "b": {"r": 2, "target_modules": ["embed_tokens", "k_proj", "v_proj"]}},
                              [0.7, 0.3], "cat"),
    "linear_neg_alphas": ({"a": {}, "b": {"lora_alpha": 3}}, [-0.7, 0.3], "linear"),
    "linear_targets_embedding": ({"a": {"target_modules": ["embed_tokens", "q_proj"]},
                                  "b": {"target_modules": ["embed_tokens", "v_proj"]}}, [0.7, -0.3], "linear"),
    "one_adapter": ({"a": {"rank_pattern": {"q_proj": 6}}}, [0.5], "cat"),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_combine_matches_add_weighted_adapter(case, tmp_path):
    cfgs, weights, how = CASES[case]
    pm, ads = peft_adapters(tmp_path, cfgs)
    both = lora_ext.combine(ads, weights, how=how)
    pm.add_weighted_adapter(list(cfgs), weights, "both", combination_type=how)
    assert_same_deltas(our_deltas(both), peft_deltas(pm, "both"))
    # saved in PEFT's format: PeftModel.from_pretrained gives lora_ext's logits and add_weighted_adapter's
    both.save(tmp_path / "both")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "both").eval()
    ours = tiny_llama(seed=1)
    lora_ext.load_adapter(ours, both)
    pm.set_adapter("both")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    want = ours(ids).logits
    assert rel_err(theirs(ids).logits, want) < 1e-5 and rel_err(pm(ids).logits, want) < 1e-5


@torch.no_grad()
def test_combine_rslora_is_the_weighted_sum(tmp_path):
    """rsLoRA inputs: combine gives Σ w_i ΔW_i (PEFT's per-adapter deltas), with a use_rslora=False
    config. PEFT 0.21's add_weighted_adapter keeps use_rslora of the first adapter with
    lora_alpha = r, so its result is sqrt(r) too large (huggingface/peft#3449)."""
    pm, ads = peft_adapters(tmp_path, {"a": {"use_rslora": True}, "b": {"r": 8, "use_rslora": True},
                                       "c": {"r": 2}})
    weights = [0.7, -0.3, 1.2]
    for how, idx in (("cat", [0, 1, 2]), ("linear", [0])):
        both = lora_ext.combine([ads[i] for i in idx], [weights[i] for i in idx], how=how)
        assert both.config["use_rslora"] is False
        want = {}
        for i in idx:
            for n, d in peft_deltas(pm, "abc"[i]).items():
                want[n] = want.get(n, 0) + weights[i] * d
        assert_same_deltas(our_deltas(both), want)
    one = lora_ext.combine(ads[:1], [1.0])  # an adapter combined alone with weight 1 is itself
    assert_same_deltas(our_deltas(one), peft_deltas(pm, "a"))


def test_combine_refuses_what_it_does_not_do(tmp_path):
    """A non-float dtype truncated the factors silently (int8: all zeros), a scalar weight raised
    a bare "'float' object is not iterable", a NaN/inf scale gave NaN factors, adapters without
    modules an IndexError; PEFT's other combination types are named as such."""
    _, (a, b) = peft_adapters(tmp_path, {"a": {}, "b": {"r": 8}})
    for how in ("svd", "ties", "dare_linear", "magnitude_prune_svd"):
        with pytest.raises(ValueError, match=rf"how must be 'cat' or 'linear', got '{how}' .*not implemented"):
            lora_ext.combine([a, b], how=how)
    for dtype in (torch.int8, torch.bool, "float16"):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            lora_ext.combine([a, b], dtype=dtype)
    for weights in (0.5, "11"):
        with pytest.raises(TypeError, match="weights must be a sequence of floats, one per adapter"):
            lora_ext.combine([a, b], weights)
    nan_scale = Adapter({n: lora_ext.LayerWeights(w.A, w.B, float("nan")) for n, w in b.layers.items()})
    with pytest.raises(ValueError, match=r"adapter 1, module '.*': weight 1.0 \* scale nan is not finite"):
        lora_ext.combine([a, nan_scale])  # was: NaN columns in every combined B
    with pytest.raises(ValueError, match="scale .* is not finite"):
        lora_ext.combine([(w.A, w.B, float("inf")) for w in list(a.layers.values())[:1]])
    with pytest.raises(ValueError, match="hold no LoRA modules"):  # was: IndexError
        lora_ext.combine([Adapter({}), Adapter({})])
    with pytest.raises(ValueError, match="ranks differ"):  # linear: equal ranks, as PEFT
        lora_ext.combine([a, b], how="linear")
    half = lora_ext.combine([a, copy.deepcopy(b)], (w for w in [0.5, 2.0]), dtype=torch.bfloat16)
    assert all(w.A.dtype == torch.bfloat16 and w.r == 12 for w in half.layers.values())


def test_combine_refuses_lora_on_parameters():
    """target_parameters layers (LayerWeights kind "parameter") are not combined: named, per adapter and per layer."""
    plain = lora_ext.LayerWeights(torch.randn(2, 4), torch.randn(3, 2), 1.0)
    experts = lora_ext.LayerWeights(torch.randn(8, 4), torch.randn(3, 8), 1.0, "parameter", parameter="gate_up_proj",
                                    num_experts=4)
    ad = Adapter({"q": plain, "m.experts.base_layer": experts}, name="moe")
    with pytest.raises(ValueError, match=r"combine: adapter 0 \('moe'\) has LoRA on parameters \(module "
                                         r"'m.experts.base_layer', gate_up_proj\): .*not combined"):
        lora_ext.combine([ad, ad])
    with pytest.raises(ValueError, match=r"combine: adapter 1 is a parameter's LoRA \(kind 'parameter'\)"):
        lora_ext.combine([plain, experts])
