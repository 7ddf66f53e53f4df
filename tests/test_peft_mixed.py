"""lora_ext.patch_peft, mixed batches: one forward with PEFT's adapter_names, patched vs unpatched."""
import copy
import threading
import warnings

import pytest
import torch
from conftest import rel_err
from peft_cases import CASES, Count, build, ids_for, n_linear, patch, peft, randomize

import lora_ext
import lora_ext.peft_patch as pp


def llama_pair(seed, r=8, alpha=16, targets=None):
    """(unpatched PEFT reference, patched copy): tiny Llama with adapters "default" and "b"."""
    ref = build("llama")
    ref.add_adapter("b", peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or CASES["llama"][1]))
    randomize(ref, seed=seed)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    return ref, pm


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_peft(kind, dtype, monkeypatch):
    fifo, targets = CASES[kind][2], CASES[kind][1]
    ref = build(kind, dtype)
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=fifo, target_modules=targets))
    ref.add_adapter("c", peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True, fan_in_fan_out=fifo,
                                         target_modules=targets))
    randomize(ref, seed=5)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    count = Count(monkeypatch)
    ids = ids_for(batch=5, seq=10)
    adapter_names = ["b", "__base__", "default", "c", "b"]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        out = pm(input_ids=ids, adapter_names=adapter_names).logits
        assert rel_err(out, ref(input_ids=ids, adapter_names=adapter_names).logits) < tol
    assert count.multi == n_linear(pm) and count.linear == 0
    # each row equals the single-adapter model
    with torch.no_grad():
        for row, name in [(0, "b"), (3, "c")]:
            ref.set_adapter(name)
            single = ref(input_ids=ids[row:row + 1]).logits
            assert rel_err(out[row:row + 1], single) < tol
        with ref.disable_adapter():
            assert rel_err(out[1:2], ref(input_ids=ids[1:2]).logits) < tol
    # the per-layer pools are rebuilt when a factor changes in place
    with torch.no_grad():
        for m in (pm, ref):
            for n, p in m.named_parameters():
                if "lora_B.c." in n:
                    p.mul_(3.0)
        out = pm(input_ids=ids, adapter_names=adapter_names).logits
        assert rel_err(out, ref(input_ids=ids, adapter_names=adapter_names).logits) < tol


def test_embedding_mixed_batches_in_one_expand(monkeypatch):
    # The LoRA embedding is patched without a warning: PEFT's forward for one adapter (the same
    # math), one gather + lora_expand_ for a mixed batch, every row equal to PEFT's.
    ref = build("llama")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens"]))
    randomize(ref, seed=13)
    ref.eval()
    pm = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = lora_ext.patch_peft(pm)
    assert any(n.endswith("embed_tokens") for n in names)
    expands = []
    real = pp.lora_expand_
    monkeypatch.setattr(pp, "lora_expand_", lambda *a, **k: (expands.append(1), real(*a, **k))[1])
    ids = ids_for(batch=4, seq=7)
    with torch.no_grad():
        for mix in (["b", "default", "__base__", "b"], ["default"] * 4):
            out = pm(input_ids=ids, adapter_names=mix).logits
            assert rel_err(out, ref(input_ids=ids, adapter_names=mix).logits) < 1e-5
        assert len(expands) == 2
        assert rel_err(pm(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5  # one adapter
    assert len(expands) == 2


class _EmbFc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_empty_mixed_batch_is_the_empty_base_output():
    # adapter_names=[] with 0 rows: PEFT returns the empty base output, model or layer called
    # directly (was: IndexError from x[0] in the patched Linear and Embedding).
    torch.manual_seed(0)
    ref = peft.get_peft_model(_EmbFc(), peft.LoraConfig(r=2, target_modules=["emb", "fc"]), adapter_name="one").eval()
    randomize(ref, seed=3)
    pm = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no fallback to PEFT's forward
        assert len(lora_ext.patch_peft(pm)) == 2
        m, r = pm.base_model.model, ref.base_model.model
        with torch.no_grad():
            for ids in (torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
                want = ref(ids, adapter_names=[])
                assert want.shape == (*ids.shape, 8) and torch.equal(pm(ids, adapter_names=[]), want)
                assert torch.equal(m.emb(ids, adapter_names=[]), r.emb(ids, adapter_names=[]))
            for x in (torch.randn(0, 8), torch.randn(0, 3, 8)):
                assert torch.equal(m.fc(x, adapter_names=[]), r.fc(x, adapter_names=[]))
            ids = torch.randint(0, 10, (2, 5))  # still the same for rows
            assert rel_err(pm(ids, adapter_names=["one", "__base__"]), ref(ids, adapter_names=["one", "__base__"])) < 1e-5
            for f in (m.fc, r.fc):  # PEFT's error for names that do not match the rows
                with pytest.raises(ValueError, match="Length of `adapter_names`"):
                    f(torch.randn(0, 8), adapter_names=["one"])


def test_mixed_batch_plumbing_without_per_call_hooks(monkeypatch):
    # A patched model hands adapter_names to its patched layers (Linear and Embedding) without
    # registering PEFT's per-call pre-hooks on them, and PEFT's own errors and paths (unknown
    # names, training mode) stay.
    ref, pm = llama_pair(7)
    layers = [m for m in pm.modules() if pp.is_patched(m)]
    seen_hooks = []
    real_multi = pp.multi_lora_
    monkeypatch.setattr(pp, "multi_lora_", lambda *a: (seen_hooks.append(sum(len(m._forward_pre_hooks) for m in layers)),
                                                       real_multi(*a))[1])
    ids, names = ids_for(batch=3, seq=5), ["b", "default", "__base__"]
    with torch.no_grad():
        out = pm(input_ids=ids, adapter_names=names).logits
        assert rel_err(out, ref(input_ids=ids, adapter_names=names).logits) < 1e-5
        assert len(seen_hooks) == n_linear(pm) and set(seen_hooks) == {0}
        with pytest.raises(ValueError, match="non-existing adapter"):
            pm(input_ids=ids, adapter_names=["b", "nope", "b"])
        assert all(not m._forward_pre_hooks for m in pm.modules())  # nothing left behind
        pm.train()
        with pytest.raises(ValueError, match="training mode"):
            pm(input_ids=ids, adapter_names=names)
    assert "_enable_peft_forward_hooks" in pm.base_model.__dict__
    lora_ext.unpatch_peft(pm)
    assert "_enable_peft_forward_hooks" not in pm.base_model.__dict__


def test_mixed_batches_from_two_threads():
    # The names travel in a context variable, per thread: two threads serving different mixes
    # through one patched model each get their own rows (PEFT's hooks are shared by all threads).

    ref = build("gpt2")
    ref.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True, target_modules=CASES["gpt2"][1]))
    randomize(ref, seed=9)
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    ids = ids_for(batch=4, seq=6)
    mixes = [["b", "default", "b", "__base__"], ["default", "__base__", "default", "b"]]
    with torch.no_grad():
        want = [ref(input_ids=ids, adapter_names=m).logits for m in mixes]
    errors = []

    def serve(k):
        try:
            with torch.no_grad():
                for _ in range(10):
                    assert rel_err(pm(input_ids=ids, adapter_names=mixes[k]).logits, want[k]) < 1e-5
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_mixed_batch_caches_follow_the_model():
    # The tree walk and the per-layer pools are cached; tree surgery, adapter add/delete, factor
    # replacement (another rank) and deepcopy must each be seen by the next mixed batch.
    ref, pm = llama_pair(11, r=4, alpha=8, targets=["q_proj", "v_proj"])
    ids, names = ids_for(batch=3, seq=4), ["b", "default", "b"]

    def same():
        with torch.no_grad():
            return rel_err(pm(input_ids=ids, adapter_names=names).logits,
                           ref(input_ids=ids, adapter_names=names).logits) < 1e-5

    assert same()
    walk = pm.base_model.__dict__[pp._WALK]
    assert same() and pm.base_model.__dict__[pp._WALK] is walk  # reused while nothing moved
    # surgery: a LoRA layer replaced by its base layer, in both models
    for m in (pm, ref):
        attn = m.base_model.model.model.layers[0].self_attn
        attn.q_proj = attn.q_proj.base_layer
    assert same()
    assert pm.base_model.__dict__[pp._WALK] is not walk  # walked again
    # a factor replaced by one of a larger rank (pools rebuilt), another scaled in place
    for m in (pm, ref):
        v = m.base_model.model.model.layers[1].self_attn.v_proj
        torch.manual_seed(5)
        v.lora_A["b"].weight = torch.nn.Parameter(torch.randn(12, v.in_features) * 0.1)
        v.lora_B["b"].weight = torch.nn.Parameter(torch.randn(v.out_features, 12) * 0.1)
        with torch.no_grad():
            m.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.mul_(2)
    assert same()
    # adapters added and deleted
    for m in (pm, ref):
        m.add_adapter("c", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        randomize(m, seed=12)
    lora_ext.patch_peft(pm)  # the new layer of "c" on layer 0's q_proj is a new LoRA layer
    names = ["c", "b", "default"]
    assert same()
    for m in (pm, ref):
        m.delete_adapter("c")
    with pytest.raises(ValueError, match="non-existing adapter"), torch.no_grad():
        pm(input_ids=ids, adapter_names=names)
    names = ["default", "__base__", "b"]
    assert same()
    # a deepcopy serves with its own layers
    pm2, ref2 = copy.deepcopy(pm), copy.deepcopy(ref)
    for m in (pm2, ref2):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_A.b." in n:
                    p.mul_(-1)
    with torch.no_grad():
        assert rel_err(pm2(input_ids=ids, adapter_names=names).logits,
                       ref2(input_ids=ids, adapter_names=names).logits) < 1e-5
    assert same()
    # a fused AdamW step (HF Trainer's default optimizer) updates the factors without bumping
    # their _version; pools built in inference mode are rewritten outside it
    with torch.inference_mode():
        pm(input_ids=ids, adapter_names=names)
    for m in (pm, ref):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        m.eval()
    assert same()
    # writes behind autograd's back (.data, PEFT's hotswap_adapter): patch_peft again drops the pools
    for m in (pm, ref):
        for n, p in m.named_parameters():
            if "lora_B.b." in n:
                p.data.mul_(3)
    lora_ext.patch_peft(pm)
    assert same()


def with_lm_head_copies(seed, default_too):
    """(PEFT model in eval mode, its patched deepcopy): Llama with adapters "default" and "b" (r = 4
    on q_proj), "b" with its own modules_to_save copy of lm_head ("default" too if default_too),
    each copy perturbed so that the rows of each adapter differ."""
    ref = build("llama", **({"modules_to_save": ["lm_head"]} if default_too else {}))
    ref.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize(ref, seed=seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "modules_to_save" in n and (default_too or "modules_to_save.b" in n):
                p.add_(torch.randn_like(p))
    ref.eval()
    pm = copy.deepcopy(ref)
    patch(pm)
    return ref, pm


def test_mixed_batch_reaches_modules_to_save():
    # Layers patch_peft leaves to PEFT (a modules_to_save copy of lm_head per adapter) still get
    # the names through PEFT's pre-hook.
    ref, pm = with_lm_head_copies(seed=17, default_too=False)
    # ("default" has no lm_head copy: PEFT's own mixed forward fails on it, so "__base__" here)
    ids, mix = ids_for(batch=3, seq=4), ["b", "__base__", "b"]
    with torch.no_grad():
        out = pm(input_ids=ids, adapter_names=mix).logits
        assert rel_err(out, ref(input_ids=ids, adapter_names=mix).logits) < 1e-5
        ref.set_adapter("b")
        assert rel_err(out[0:1], ref(input_ids=ids[0:1]).logits) < 1e-5  # b's lm_head copy


def test_layers_left_to_peft_get_each_threads_names():
    # A modules_to_save lm_head is left to PEFT's forward. Thread A pauses inside its mixed batch
    # until thread B is inside its own; A's lm_head must still see A's names (PEFT's per-call
    # hooks, shared by all threads, would hand it B's).

    ref, pm = with_lm_head_copies(seed=19, default_too=True)
    ids = ids_for(batch=3, seq=4)
    mixes = {"A": ["b", "default", "b"], "B": ["default", "b", "default"]}
    with torch.no_grad():
        want = {k: ref(input_ids=ids, adapter_names=m).logits for k, m in mixes.items()}
    inside = {k: threading.Event() for k in mixes}
    a_done = threading.Event()

    def pause(module, args):  # on the first decoder layer
        me = threading.current_thread().name
        inside[me].set()
        assert (inside["B"] if me == "A" else a_done).wait(timeout=30)

    pm.base_model.model.model.layers[0].register_forward_pre_hook(pause)
    got, errors = {}, []

    def serve(k):
        try:
            with torch.no_grad():
                got[k] = pm(input_ids=ids, adapter_names=mixes[k]).logits
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if k == "A":
                a_done.set()

    threads = [threading.Thread(target=serve, args=(k,), name=k) for k in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for k in mixes:
        assert rel_err(got[k], want[k]) < 1e-5, k
    lm_head = pm.base_model.model.lm_head
    assert sum(h is pp._context_pre_hook for h in lm_head._forward_pre_hooks.values()) == 1
    lora_ext.unpatch_peft(pm)
    assert not lm_head._forward_pre_hooks


def test_compiled_mixed_batches_trace_one_graph():
    # torch.compile(patched model) served mixed batches: the pools' cache checks (data_ptr) broke
    # the graph in every patched layer and recompiled per layer (19 graphs for 2 batches). The
    # checks now run eagerly when the batch starts; the traced layers read prepared tensors, so
    # every batch size and mix of names (embedding and linear LoRA layers) shares one dynamic graph.
    from torch._dynamo.utils import counters
    ref, pm = llama_pair(21)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(pm)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in [3, 5, 2, 5, 4]:
            names = [["default", "b", "__base__"][i] for i in torch.randint(0, 3, (batch,), generator=gen)]
            ids = ids_for(batch=batch, seq=6, seed=batch)
            out = compiled(input_ids=ids, adapter_names=names).logits
            assert rel_err(out, ref(input_ids=ids, adapter_names=names).logits) < 1e-5
        # a factor written in place between calls is seen by the compiled model (stamps checked eagerly)
        for m in (pm, ref):
            for n, p in m.named_parameters():
                if "lora_B.b." in n:
                    p.mul_(2.0)
        names = ["b", "default", "b"]
        out = compiled(input_ids=ids_for(batch=3, seq=6), adapter_names=names).logits
        assert rel_err(out, ref(input_ids=ids_for(batch=3, seq=6), adapter_names=names).logits) < 1e-5
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            compiled(input_ids=ids_for(batch=3, seq=6), adapter_names=["b", "default"])
    import torch._dynamo.source as dynamo_source
    if not hasattr(dynamo_source, "ContextVarGetSource"):
        return  # this Dynamo (torch 2.11) cannot trace ContextVar.get: a break per layer, results right
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # the first shapes, then one dynamic graph


def test_generate_with_adapter_names_matches_peft(monkeypatch):
    # PEFT's serving call, generate(adapter_names=...), greedy (fused multi_lora_ in every decode
    # step) and with beams (PEFT's own path), token for token as unpatched PEFT
    ref, pm = llama_pair(9)
    ids = ids_for(batch=3, seq=5)
    names = ["b", "__base__", "default"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    count = Count(monkeypatch)
    with torch.no_grad():
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=names, **kw),
                           ref.generate(input_ids=ids, adapter_names=names, **kw))
        assert count.multi >= 5 * n_linear(pm)  # prefill + decode steps, every layer fused
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=names, num_beams=2, **kw),
                           ref.generate(input_ids=ids, adapter_names=names, num_beams=2, **kw))
