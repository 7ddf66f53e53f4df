"""Shared cases of the LoRAParameter tests (tests/test_param_lora.py, test_param_lora_edges.py):
tiny MoE models of four transformers families, PEFT / lora_ext pairs with the same factors,
parity checks, the "auto" / "generic" path fixture."""
import copy
import importlib.util

import pytest
import torch
from conftest import rel_err

import lora_ext
import lora_ext.param_lora as param_lora
from lora_ext.param_lora import LoRAParameter, parameter_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
# transformers >= 5 holds MoE experts as 3-D parameters (older ones: a ModuleList of MLPs)
HAS_EXPERT_STACKS = (hasattr(transformers, "Qwen3MoeConfig")
                     and importlib.util.find_spec("transformers.integrations.moe") is not None)

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ["qwen3_moe", "gpt_oss", "mixtral", "qwen2_moe"]
# fp32: the same math in another order. bf16: both round the effective weight and every GEMM to
# bf16 (PEFT keeps fp32 factors and adds an fp32 delta rounded once; lora_ext bf16 factors).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 6e-2)}  # (logits / loss, grads)


# ---------------------------------------------------------------- models and pairs
def tiny_moe(kind, dtype=torch.float32, device="cpu", impl=None, seed=0):
    """A 2-layer MoE causal LM (4 experts, top-2, hidden 64), eager attention, in eval mode.
    impl: transformers' experts_implementation ("eager", "grouped_mm", "batched_mm"; None: its default)."""
    if not HAS_EXPERT_STACKS:
        pytest.skip(f"transformers {transformers.__version__} has no 3-D expert stacks (needs >= 5)")
    tf = transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, num_experts_per_tok=2, attn_implementation="eager")
    if impl is not None:
        common["experts_implementation"] = impl
    if kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                                         **common))
    elif kind == "gpt_oss":
        model = tf.GptOssForCausalLM(tf.GptOssConfig(intermediate_size=32, num_local_experts=4, sliding_window=8,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                                     **common))
    elif kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    elif kind == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                                         shared_expert_intermediate_size=48, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # gpt-oss's expert and router biases start at zero: make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias") and "experts" in n or n.endswith("router.bias"):
                p.normal_(std=0.05)
    return model.to(device, dtype).eval()


def experts_of(model, layer=0):
    return model.get_submodule(f"model.layers.{layer}.mlp.experts")


def ours_key(peft_key: str) -> str:
    """PEFT's state-dict name -> lora_ext's: no "base_model.model.", no ".default", and lora_A /
    lora_B are parameters, not Linear modules."""
    k = peft_key.removeprefix("base_model.model.").replace(".default", "")
    return k.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")


def randomize(model, seed=1, std=0.1):
    """Non-zero factors (B too), so LoRA matters: N(0, std^2), the same for the same seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, device=p.device) * std)
    return model


def load_from_peft(ours, pm):
    """Loads PEFT's LoRA tensors into ``ours`` by name; every LoRA tensor of ours gets one."""
    sd = {ours_key(k): v for k, v in pm.state_dict().items() if "lora_" in k}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert [k for k in missing if "lora_" in k] == []
    assert len(sd) == sum("lora_" in k for k in ours.state_dict())


def pair(kind="qwen3_moe", dtype=torch.float32, device="cpu", r=3, alpha=5, target_modules=None, impl=None,
         targets=TARGETS, **cfg):
    """(PEFT model, lora_ext model, names inject returned): the same base weights and LoRA factors."""
    base = tiny_moe(kind, dtype, device, impl)
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or [],
                                                   target_parameters=targets, **cfg))
    randomize(pm)
    names = lora_ext.inject(ours, target_modules=target_modules, target_parameters=targets, r=r, alpha=alpha, **cfg)
    load_from_peft(ours, pm)
    lora_ext.mark_only_lora_trainable(ours)
    return pm, ours, names


def check_hparams_as_peft(pm, ours):
    """Same wrappers at the same names, each with PEFT's parameter, r and scaling."""
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if type(m).__name__ == "ParamWrapper"}
    mine = parameter_layers(ours)
    assert mine.keys() == theirs.keys()
    for n, m in mine.items():
        t = theirs[n]
        assert (m.parameter_name, m.r, m.num_experts) == (t.parameter_name, t.r["default"], t.num_experts)
        assert (m.in_features, m.out_features) == (t.in_features, t.out_features)
        assert m.scaling == pytest.approx(t.scaling["default"], rel=1e-12)
        assert m.lora_alpha == pytest.approx(t.lora_alpha["default"])


def ids_for(device="cpu", batch=2, seq=12, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def pin_routing(pm, ours, ids):
    """Both models route ``ids`` as PEFT's does now, with constant routing weights (forward hooks;
    returns their handles). In bf16 a token's top-k can flip between two roundings of the same
    math (lora_ext.moe adds the LoRA term to the rows, PEFT rounds P + s B A to bf16 first): a
    jump in the function, not an error in either."""
    recorded = []
    hooks = [r.register_forward_hook(lambda m, a, out: recorded.append(tuple(t.detach() for t in out)))
             for r in routers(pm)]
    with torch.no_grad():
        pm(input_ids=ids)
    for h in hooks:
        h.remove()
    assert recorded and len(routers(ours)) == len(recorded)
    return [r.register_forward_hook(lambda m, a, o, out=out: out)
            for model in (pm, ours) for r, out in zip(routers(model), recorded)]


def check_parity(pm, ours, dtype, device="cpu"):
    """Logits in eval and train mode, loss and every LoRA gradient, lora_ext vs PEFT (in bf16 with
    the routing pinned, see pin_routing)."""
    tol, tol_g = TOL[dtype]
    ids = ids_for(device)
    pinned = pin_routing(pm, ours, ids) if dtype != torch.float32 else []
    for train in (False, True):
        pm.train(train)
        ours.train(train)
        if not train:
            with torch.no_grad():
                assert rel_err(ours(input_ids=ids).logits, pm(input_ids=ids).logits) < tol
            continue
        out_p, out_o = pm(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
        assert rel_err(out_o.logits, out_p.logits) < tol
        assert abs(out_o.loss.item() - out_p.loss.item()) <= tol * abs(out_p.loss.item())
        out_p.loss.backward()
        out_o.loss.backward()
    for h in pinned:
        h.remove()
    grads_p = {ours_key(n): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_o.keys() == grads_p.keys() and grads_o
    for n, g in grads_o.items():
        assert g is not None and grads_p[n] is not None, n
        assert rel_err(g, grads_p[n]) < tol_g, n


@pytest.fixture(params=["auto", "generic"])
def path(request):
    """"auto": whatever LoRAParameter.forward picks (lora_ext.moe's fast path for a transformers
    experts module, once it applies); "generic": the module's own forward with P + s B A."""
    if request.param == "generic":
        with param_lora.generic_path():
            yield request.param
    else:
        yield request.param


def fast_path_problem(module, names):
    """Why lora_ext.moe's fast path does not apply to ``module`` (None: it does)."""
    try:
        from lora_ext import moe
    except ImportError as e:
        return f"lora_ext.moe does not import: {e}"
    return moe.fast_path_problem(module, names)

def expert_reference(w: LoRAParameter, P: torch.Tensor | None = None) -> torch.Tensor:
    """P (default: the wrapped parameter) + s B_e A_e per expert in fp64, from PEFT's layout by hand
    (lora_A rows e*r..(e+1)*r, lora_B columns j*E + e), transposed for an [E, in, out] stack."""
    E, r = w.num_experts, w.r
    P = (getattr(w.target(), w.parameter_name) if P is None else P).detach().double()
    A, B = w.lora_A.detach().double(), w.lora_B.detach().double()
    out = P.clone() if P.dim() == 3 else P.clone()[None]
    for e in range(E):
        d = w.scaling * B[:, [j * E + e for j in range(r)]] @ A[e * r:(e + 1) * r]
        out[e] += d.t() if w.transposed else d
    return out if P.dim() == 3 else out[0]
