"""A serving engineer's workflows: AdapterPool / MultiLoRALinear / patch_peft mixed batches against
PEFT's adapter_names (the oracle), on the cases earlier tests left out."""
import copy

import pytest
import torch
from conftest import rel_err
from models import saved_peft, tiny_llama

import lora_ext
from lora_ext.multi import ContextLayer

peft = pytest.importorskip("peft")


def tiny_seq2seq(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg).eval(), ["q", "v", "wo", "shared"]
    cfg = tf.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)
    return tf.BartForConditionalGeneration(cfg).eval(), ["q_proj", "v_proj", "fc1"]


@pytest.mark.parametrize("kind", ["t5", "bart"])
@torch.no_grad()
def test_encoder_decoder_beam_search_matches_peft(kind, tmp_path):
    # generate(num_beams=k) runs the encoder on the original rows and the decoder on each row k
    # times: with each name repeated k times (as the README says for beams) the encoder used to
    # raise (3 rows, 9 names); PEFT's generate(adapter_names=...) hands its encoder the original names
    base, targets = tiny_seq2seq(kind)
    paths = {}
    for i, r in enumerate([2, 8]):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets))
        torch.manual_seed(i)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn_like(p) * 0.1
        paths[f"a{i}"] = str(tmp_path / f"a{i}")
        pm.save_pretrained(paths[f"a{i}"])
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a0"], adapter_name="a0")
    ref.load_adapter(paths["a1"], adapter_name="a1")
    ref.eval()
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=targets, max_adapters=2, max_rank=8)
    for n, p in paths.items():
        pool.load(n, p)
    names = ["a0", None, "a1"]
    ids = torch.randint(2, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False)
    dec = torch.randint(2, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    with pool.batch(names):  # a plain forward: encoder and decoder see the same rows
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    want = ref(input_ids=ids, decoder_input_ids=dec, adapter_names=["a0", "__base__", "a1"]).logits
    assert rel_err(got, want) < 1e-5
    for k in (1, 3):
        want = ref.generate(input_ids=ids, adapter_names=["a0", "__base__", "a1"], num_beams=k, **kw)
        with pool.batch([n for n in names for _ in range(k)]):
            assert torch.equal(model.generate(input_ids=ids, num_beams=k, **kw), want)
    # names that are not each row's name k times in a row cannot be split between encoder and decoder
    with pytest.raises(ValueError, match=r"encoder .* gets 3 rows .* 6 names.*for _ in range\(2\)"):
        with pool.batch(["a0", "a1", None, "a0", "a1", None]):
            model.generate(input_ids=ids, num_beams=2, **kw)
    with pool.batch(names):  # the pool serves on after the error, the indices restored after the encoder
        assert rel_err(model(input_ids=ids, decoder_input_ids=dec).logits, got) == 0


@torch.no_grad()
def test_pool_refuses_a_model_with_lora_outside_the_pool():
    # was: a model with LoRA layers the pool does not own was served anyway: an injected LoRALinear
    # (not targeted: target_modules=None / "all-linear" / another list) added its adapter to every row,
    # base rows included; on a PeftModel "all-linear" even wrapped PEFT's lora_A / lora_B as base layers
    base = tiny_llama()
    injected = copy.deepcopy(base)
    lora_ext.inject(injected, target_modules=["q_proj"], r=4)
    for layer in lora_ext.lora_layers(injected).values():
        torch.nn.init.normal_(layer.lora_B)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    cases = [(injected, None, r"an injected LoRALinear 'model.layers.0.self_attn.q_proj' \(not merged\)"),
             (injected, ["v_proj"], "an injected LoRALinear"),
             (pm, "all-linear", r"PEFT's Linear layer 'base_model.model.model.layers.0.self_attn.q_proj'"),
             (pm, ["v_proj"], "PEFT's Linear layer")]
    for model, targets, what in cases:
        before = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=rf"AdapterPool: .* has {what}.*every row of a mixed batch"):
            lora_ext.AdapterPool(model, target_modules=targets, max_adapters=2, max_rank=4)
        assert [type(m) for m in model.modules()] == before  # nothing replaced
    # merged, the adapter is part of the base model every row gets: served
    ids = torch.randint(0, 128, (2, 5))
    want = injected(input_ids=ids).logits
    lora_ext.merge(injected)
    pool = lora_ext.AdapterPool(injected, target_modules=["v_proj"], max_adapters=2, max_rank=4)
    with pool.batch([None, "__base__"]):
        assert rel_err(injected(input_ids=ids).logits, want) < 1e-5


@torch.no_grad()
def test_set_slot_refuses_factors_that_are_not_floating_point():
    # was: int8 (e.g. quantized factors without their scales), int64 or bool A / B were cast into
    # the pools silently and served as if they were the adapter
    from lora_ext import LoRAContext, MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(8, 6), num_slots=2, r_max=4, context=LoRAContext(8))
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_slot(0, A, B, 1.0)
    pools = layer.A_pool.clone(), layer.B_pool.clone()
    for dtype in (torch.int8, torch.int64, torch.bool):
        with pytest.raises(TypeError, match=rf"set_slot: A must be a floating-point tensor, got {dtype}"):
            layer.set_slot(0, torch.ones(2, 8, dtype=dtype), B, 1.0)
        with pytest.raises(TypeError, match=rf"set_slot: B must be a floating-point tensor, got {dtype}"):
            layer.set_slot(0, A, torch.ones(6, 2, dtype=dtype), 1.0)
    assert torch.equal(layer.A_pool, pools[0]) and torch.equal(layer.B_pool, pools[1])  # slot untouched
    with pytest.raises(TypeError, match=r"A must be a tensor, got list"):
        layer.set_slot(0, [[1.0] * 8] * 2, B, 1.0)
    layer.set_slot(1, A.double(), B.half(), 1.0)  # other float dtypes are converted, as before
    assert torch.equal(layer.A_pool[1, :2], A) and torch.equal(layer.B_pool[1, :, :2], B.half().float())


@torch.no_grad()
def test_pool_device_must_be_the_models():
    # was: device= placed only the index buffer there (the pools follow each base layer), so a pool
    # built with another device than the model's failed in every forward, base rows and outside a
    # batch included ("multi_lora_: indices is on meta but y is on cpu"), and could not be rebuilt
    # (one pool per model)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"AdapterPool: module 'model.layers.0.self_attn.q_proj' is on cpu, the "
                                         r"pool's indices on meta .*a pool serves a model on one device"):
        lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=2, max_rank=4, device="meta")
    assert not any(isinstance(m, ContextLayer) for m in model.modules())  # nothing replaced
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=2, max_rank=4, device="cpu")
    ids = torch.randint(0, 128, (2, 5))
    with pool.batch([None, None]):
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_model_cast_after_the_pool_is_built_serves_as_peft(dtype, tmp_path):
    # README: model.to(dtype) after building the pool is fine (pools cast with the weights, scales stay
    # fp32); an adapter loaded before and one after the cast, against PEFT's model cast likewise
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "embed_tokens"]
    saved_peft(base, tmp_path / "a", 1, target_modules=targets)
    saved_peft(base, tmp_path / "b", 2, r=8, lora_alpha=5, target_modules=targets[:2])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=targets, max_adapters=2, max_rank=8)
    pool.load("a", tmp_path / "a")
    model.to(dtype)
    pool.load("b", tmp_path / "b")
    assert all(m.scales.dtype == torch.float32 and m.A_pool.dtype == dtype for m in pool.layers.values())
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ref.load_adapter(tmp_path / "b", adapter_name="b")
    ids = torch.randint(0, 128, (3, 7))
    want32 = ref.eval()(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits
    want = ref.to(dtype)(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits
    with pool.batch(["a", "b", None]):
        got = model(input_ids=ids).logits
    assert got.dtype == dtype
    assert rel_err(got, want) < 2e-2
    assert rel_err(got, want32) < 1.5 * rel_err(want, want32) + 1e-3  # no worse than PEFT's own rounding


@torch.no_grad()
def test_pool_refuses_a_float64_model_by_module():
    # was: built fine, then every forward failed in the op, base rows and outside a batch included
    # ("lora_expand_: y has dtype Double"), naming no module; the pool could not be rebuilt on the model
    model = tiny_llama().double()
    with pytest.raises(ValueError, match=r"AdapterPool: module 'model.embed_tokens' has torch.float64 weights; "
                                         r"multi-adapter serving runs float32, float16 and bfloat16"):
        lora_ext.AdapterPool(model, target_modules=["q_proj", "embed_tokens"], max_adapters=2, max_rank=4)
    assert not any(isinstance(m, ContextLayer) for m in model.modules())  # nothing replaced
    model.float()
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "embed_tokens"], max_adapters=2, max_rank=4)
    ids = torch.randint(0, 128, (2, 5))
    with pool.batch([None, None]):
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_embedding_with_max_norm_is_refused_by_name():
    """PEFT's LoRA embedding renormalizes the looked-up rows of A^T (max_norm) in place; the pool's
    lookup did not (another output, silently): refused, naming the module."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"AdapterPool: module '0': MultiLoRAEmbedding: an nn.Embedding with "
                                         r"max_norm=1.0 is not served"):
        lora_ext.AdapterPool(model, target_modules=["0", "1"], max_adapters=2, max_rank=4)
    assert type(model[0]) is torch.nn.Embedding  # nothing replaced


def test_inject_or_load_adapter_into_a_served_model_is_refused(tmp_path):
    """LoRA injected into a served model (inject, or load_adapter of modules the pool does not serve)
    added its adapter to every row of a mixed batch, base rows included, silently: refused, naming the
    serving layer, before anything changes."""
    base = tiny_llama(seed=0, layers=1)
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj", "o_proj"])
    saved_peft(base, tmp_path / "b", 2, target_modules=["o_proj"])
    served = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(served, target_modules=["q_proj"], max_adapters=2, max_rank=8)
    before = {n: p.detach().clone() for n, p in served.state_dict().items()}
    with pytest.raises(ValueError, match=r"inject: LlamaForCausalLM is served \('model.layers.0.self_attn.q_proj' is a "
                                         r"MultiLoRALinear\)"):
        lora_ext.inject(served, ["o_proj"], r=4)
    with pytest.raises(ValueError, match=r"load_adapter: module 'model.layers.0.self_attn.q_proj' is a MultiLoRALinear"):
        lora_ext.load_adapter(served, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"inject: LlamaForCausalLM is served"):
        lora_ext.load_adapter(served, str(tmp_path / "b"))
    assert not lora_ext.lora_layers(served)
    assert all(torch.equal(t, before[n]) for n, t in served.state_dict().items())
    del pool


def test_all_linear_in_any_case_as_peft():
    """PEFT lowercases target_modules="ALL-LINEAR"; inject and the pool matched no module."""
    model = tiny_llama(seed=0, layers=1)
    ref = copy.deepcopy(model)
    assert sorted(lora_ext.inject(copy.deepcopy(model), "ALL-Linear", r=2)) == sorted(lora_ext.inject(ref, "all-linear", r=2))
    pool = lora_ext.AdapterPool(model, target_modules="All-Linear", max_adapters=2, max_rank=4)
    assert len(pool.layers) == 7  # q k v o gate up down; not lm_head
