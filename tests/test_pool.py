"""AdapterPool: PEFT mixed-batch parity (Llama; GPT-2 Conv1D + embedding), LRU eviction, host cache,
rows vs names, failed and concurrent batches, compile without recompiles."""
import copy
import os
import shutil
import threading

import pytest
import torch
from conftest import devices, rel_err
from models import tiny_gpt2, tiny_llama
from torch import nn

import lora_ext

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "o_proj"]
RANKS = [2, 4, 8, 16]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model and 4 PEFT adapters of different ranks saved with save_pretrained."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama()
    paths = {}
    for i, r in enumerate(RANKS):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        torch.manual_seed(10 + i)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn_like(p) * 0.1
        paths[f"a{i}"] = os.path.join(root, f"a{i}")
        pm.save_pretrained(paths[f"a{i}"])
    return base, paths


def peft_multi(base, paths):
    names = list(paths)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    return pm.eval()


def make_pool(base, paths, **kw):
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=TARGETS, **{"max_adapters": 4, "max_rank": 16, **kw})
    for n, p in paths.items():
        pool.load(n, p)
    return model, pool


@torch.no_grad()
def test_mixed_batch_matches_peft(saved):
    base, paths = saved
    pm = peft_multi(base, paths)
    model, pool = make_pool(base, paths)
    names = ["a0", "a3", "__base__", "a1", "a2", "a3", None]
    ids = torch.randint(0, 128, (len(names), 9), generator=torch.Generator().manual_seed(0))
    ref = pm(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
    with pool.batch(names):
        got = model(input_ids=ids).logits
    assert rel_err(got, ref) < 1e-5
    # packed form: one name per token of a [1, T] input
    tok_names = [n for n in names for _ in range(ids.shape[1])]
    with pool.batch(tok_names, per_token=True):
        packed = model(input_ids=ids.reshape(1, -1)).logits
    # positions restart per sequence in the batched run, so compare the first sequence only
    assert rel_err(packed[0, :9], got[0]) < 1e-5


@torch.no_grad()
def test_lru_eviction_host_cache_and_in_use(saved):
    base, paths = saved
    model, pool = make_pool(base, {k: paths[k] for k in ("a0", "a1")}, max_adapters=2)
    ref_model, ref_pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (2, 6))
    with pool.batch(["a0", "a1"]):
        pass
    with pool.batch(["a1"]):  # a0 is now least recently used
        pass
    pool.load("a2", paths["a2"])
    assert pool.resident() == ["a1", "a2"] and len(pool) == 3 and "a0" in pool
    with pool.batch(["a0", "a2"]):  # a0 comes back from the host cache, evicting a1
        got = model(input_ids=ids).logits
    with ref_pool.batch(["a0", "a2"]):
        ref = ref_model(input_ids=ids).logits
    assert rel_err(got, ref) < 1e-6
    with pool.batch(["a0", "a2"]):
        with pytest.raises(RuntimeError, match="used by open batches"):
            pool.load("a3", paths["a3"])
        with pytest.raises(RuntimeError, match="open batch"):
            pool.unload("a0")
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        with pool.batch(["zz"]):
            pass
    pool.unload("a0")
    assert "a0" not in pool and pool.names() == ["a1", "a2"]


@torch.no_grad()
def test_host_cache_budget_rereads_from_disk(saved):
    base, paths = saved
    model, pool = make_pool(base, paths, max_adapters=1, host_cache_bytes=1)
    ref_model, ref_pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (4, 5))
    names = ["a0", "a1", "a2", "a3"]
    for n in names:  # each batch evicts the previous adapter; the 1-byte cache forces disk reads
        with pool.batch([n] * 4), ref_pool.batch([n] * 4):
            assert rel_err(model(input_ids=ids).logits, ref_model(input_ids=ids).logits) < 1e-6
    pool.prefetch("a0")
    assert pool.resident() == ["a0"]


def test_bad_adapters_leave_pool_unchanged(saved, tmp_path):
    base, paths = saved
    model, pool = make_pool(base, {"a0": paths["a0"]}, max_rank=4)
    with pytest.raises(ValueError, match="rank 8; the pool takes 1 .. max_rank 4"):
        pool.load("big", paths["a2"])
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    other.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="k_proj' is not served"):
        pool.load("k", str(tmp_path))
    with pytest.raises(ValueError, match="reserved"):
        pool.load("__base__", paths["a0"])
    extra = lora_ext.Adapter.load(paths["a0"])  # trained non-LoRA tensors: refused, never dropped
    extra.extra["model.norm.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match="non-LoRA tensors .*model.norm.weight"):
        pool.load("extra", extra)
    assert pool.names() == ["a0"]


@torch.no_grad()
def test_failed_batch_leaves_pool_unchanged(saved, tmp_path):
    """A batch that cannot get its adapters (more names than slots, an evicted adapter whose file
    is gone) raises and leaves nothing in use: later loads, unloads and batches work."""
    base, paths = saved
    gone = shutil.copytree(paths["a0"], tmp_path / "a0")
    model, pool = make_pool(base, {"a0": str(gone), "a1": paths["a1"], "a2": paths["a2"]}, max_adapters=2,
                            host_cache_bytes=1)  # loading a2 evicted a0; the 1-byte cache dropped its copy
    ref_model, ref_pool = make_pool(base, paths)
    assert pool.resident() == ["a1", "a2"]
    shutil.rmtree(gone)
    with pytest.raises(FileNotFoundError, match="'a0' was evicted"):
        with pool.batch(["a2", "a0"]):
            pass
    assert pool.resident() == ["a1", "a2"]
    with pytest.raises(ValueError, match="names has 3 distinct adapters but max_adapters=2"):
        with pool.batch(["a1", "a2", None, "a0"]):
            pass
    assert pool.resident() == ["a1", "a2"]
    pool.unload("a2")
    pool.load("a0", paths["a0"])
    pool.load("a3", paths["a3"])  # evicts a1: nothing is left in use
    ids = torch.randint(0, 128, (3, 6))
    with pool.batch(["a3", None, "a0"]), ref_pool.batch(["a3", None, "a0"]):
        assert rel_err(model(input_ids=ids).logits, ref_model(input_ids=ids).logits) < 1e-6


@torch.no_grad()
def test_names_must_match_rows(saved):
    """One name per batch row (per token with per_token=True), else ValueError; never the rows of
    an earlier batch. Outside a batch the model is the base model."""
    base, paths = saved
    model, pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (3, 5))
    with pool.batch(["a0", "a1", "a2"]):
        model(input_ids=ids)
    for names in (["a3"], ["a3"] * 4):
        with pytest.raises(ValueError, match=f"3 batch rows .* but {len(names)} row indices"):
            with pool.batch(names):
                model(input_ids=ids)
    for n in (14, 16):
        with pytest.raises(ValueError, match=f"15 tokens .* but {n} token indices"):
            with pool.batch(["a3"] * n, per_token=True):
                model(input_ids=ids.reshape(1, -1))
    assert rel_err(model(input_ids=ids).logits, base(input_ids=ids).logits) == 0


@torch.no_grad()
def test_rows_of_any_leading_shape():
    """Inputs without a sequence dim ([batch, features]) or with several are routed by batch row."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    shapes = {"0": (16, 32), "2": (32, 8)}
    ads = {n: lora_ext.Adapter({m: lora_ext.LayerWeights(torch.randn(r, i) / 4, torch.randn(o, r) / 4, 0.5)
                                for m, (i, o) in shapes.items()}) for n, r in (("p", 4), ("q", 2))}
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["0", "2"], max_adapters=2, max_rank=4)
    singles = {None: base}
    for n, ad in ads.items():
        pool.load(n, ad)
        singles[n] = copy.deepcopy(base)
        lora_ext.load_adapter(singles[n], ad)
    names = ["p", None, "q", "p"]
    for x in (torch.randn(4, 16), torch.randn(4, 3, 16)):
        with pool.batch(names):
            got = model(x)
        for i, n in enumerate(names):
            assert rel_err(got[i], singles[n](x[i:i + 1])[0]) < 1e-5


def test_one_batch_at_a_time(saved):
    """A second batch while one is open (another thread's, or nested) raises instead of sharing the
    pool's index buffer."""
    base, paths = saved
    model, pool = make_pool(base, paths)
    opened, release = threading.Event(), threading.Event()

    def hold():
        with pool.batch(["a0", "a1"]):
            opened.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert opened.wait(30)
        with pytest.raises(RuntimeError, match="another batch is open"):
            with pool.batch(["a2", "a3"]):
                pass
    finally:
        release.set()
        t.join()
    with pool.batch(["a2"]):
        with pytest.raises(RuntimeError, match="another batch is open"):
            with pool.batch(["a3"]):
                pass
    pool.unload("a2")  # the refused batches left nothing in use
    assert pool.names() == ["a0", "a1", "a3"]


@torch.no_grad()
def test_gpt2_conv1d_and_embedding_match_peft(tmp_path):
    """GPT-2: Conv1D (c_attn, c_proj) and the token embedding (wte) served in one mixed batch; every
    row's logits equal PEFT's with that adapter alone (base-only rows: the base model)."""
    base = tiny_gpt2()
    targets = ["c_attn", "c_proj", "wte"]
    paths = {}
    for i, r in enumerate((2, 4, 8)):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=True)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        torch.manual_seed(30 + i)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn_like(p) * 0.1
        paths[f"g{i}"] = str(tmp_path / f"g{i}")
        pm.save_pretrained(paths[f"g{i}"])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=targets, max_adapters=3, max_rank=8)
    for n, p in paths.items():
        pool.load(n, p)
    assert {type(m).__name__ for m in pool.layers.values()} == {"MultiLoRALinear", "MultiLoRAEmbedding"}
    names = ["g0", None, "g2", "g1", "g2", "__base__"]
    ids = torch.randint(0, 128, (len(names), 7), generator=torch.Generator().manual_seed(0))
    with pool.batch(names):
        got = model(input_ids=ids).logits
    for name in ("g0", "g1", "g2", None):
        rows = [i for i, n in enumerate(names) if n == name or (name is None and n == "__base__")]
        ref_model = base if name is None else peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval()
        assert rel_err(got[rows], ref_model(input_ids=ids[rows]).logits) < 1e-5
    linear_on_emb = lora_ext.Adapter({"transformer.wte": lora_ext.LayerWeights(torch.zeros(2, 128),
                                                                                torch.zeros(64, 2), 1.0)})
    with pytest.raises(ValueError, match=r"'transformer.wte' \(Embedding\) cannot take linear weights"):
        pool.load("bad", linear_on_emb)


@torch.no_grad()
def test_compiled_model_does_not_recompile_on_swaps(saved):
    base, paths = saved
    model, pool = make_pool(base, {"a0": paths["a0"], "a1": paths["a1"]}, max_adapters=2)
    ref_model, ref_pool = make_pool(base, paths)
    torch._dynamo.reset()
    fwd = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 128, (3, 7))
    with pool.batch(["a0", "a1", None]):
        fwd(ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pool.load("a3", paths["a3"])  # evicts a0
        pool.load("a1", paths["a2"])  # replace a1's weights in place (rank 8 over rank 4)
        for names, ref_names in ([["a3", None, "a1"], ["a3", None, "a2"]], [["a1", "a3", "a3"], ["a2", "a3", "a3"]]):
            with pool.batch(names):
                got = fwd(ids)
            with ref_pool.batch(ref_names):
                ref = ref_model(input_ids=ids).logits
            assert rel_err(got, ref) < 1e-5


@torch.no_grad()
def test_loads_from_threads_while_batches_run(saved):
    base, paths = saved
    model, pool = make_pool(base, {"a0": paths["a0"]}, max_adapters=3)
    ref_model, ref_pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (2, 5))
    errors = []

    def churn(name):
        try:
            for _ in range(5):
                pool.load(name, paths[name])
                pool.unload(name)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(n,)) for n in ("a1", "a2")]
    for t in threads:
        t.start()
    for _ in range(10):
        with pool.batch(["a0", None]):
            got = model(input_ids=ids).logits
        with ref_pool.batch(["a0", None]):
            assert rel_err(got, ref_model(input_ids=ids).logits) < 1e-6
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool.names() == ["a0"]


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_replay_with_new_names(saved):
    base, paths = saved
    model, pool = make_pool(base.cuda(), paths)
    ref_model, ref_pool = make_pool(base.cuda(), paths)
    # sdpa with no padding needs no mask: transformers' eager mask copies a CPU scalar (not capturable)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (4, 8), device="cuda")
    with pool.batch(["a0", "a1", "a2", "a3"]):
        model(input_ids=ids)  # warm-up
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(input_ids=ids).logits
    for names in (["a3", None, "a1", "a1"], ["a2", "a2", "a0", None]):
        with pool.batch(names):
            g.replay()
        with ref_pool.batch(names):
            ref = ref_model(input_ids=ids).logits
        assert rel_err(out, ref) < 1e-4


def stall(device, stream=None):
    """Queues ~0.5 s of GPU work on `stream` (default: the current one), so what follows stays pending."""
    if device == "cuda":
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            torch.cuda._sleep(int(1e9))


def slot_ranks(pool, slot=0):
    return {int(layer.ranks[slot]) for layer in pool.layers.values()}


@pytest.mark.parametrize("device", devices())
@torch.no_grad()
def test_prefetch_orders_after_running_batch(saved, device):
    """prefetch() evicting the adapter of a still-running batch neither tears that batch nor leaves
    the prefetched slot cleared (rank 0: base output only) by the eviction queued behind the batch."""
    base, paths = saved
    base = copy.deepcopy(base).to(device)
    model, pool = make_pool(base, {"b": paths["a3"], "a": paths["a1"]}, max_adapters=1)  # "a" evicts "b"
    ref_model, ref_pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (2, 8), device=device)
    with pool.batch(["a", "a"]):
        stall(device)
        out_a = model(input_ids=ids).logits
    pool.prefetch("b")
    assert pool.resident() == ["b"]
    with pool.batch(["b", "b"]):
        out_b = model(input_ids=ids).logits
    assert slot_ranks(pool) == {RANKS[3]}
    for out, name in ((out_a, "a1"), (out_b, "a3")):
        with ref_pool.batch([name, name]):
            assert rel_err(out, ref_model(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize("device", devices())
@torch.no_grad()
def test_writes_order_after_pending_prefetch(saved, device):
    """Replacing, evicting or unloading an adapter whose prefetch is still running waits for it."""
    base, paths = saved
    base = copy.deepcopy(base).to(device)
    model, pool = make_pool(base, {"b": paths["a3"], "a": paths["a1"]}, max_adapters=1)
    ref_model, ref_pool = make_pool(base, paths)
    ids = torch.randint(0, 128, (2, 8), device=device)

    def check(name, ref_name, rank):
        with pool.batch([name, name]):
            got = model(input_ids=ids).logits
        with ref_pool.batch([ref_name, ref_name]):
            ref = ref_model(input_ids=ids).logits
        assert pool.resident() == [name] and slot_ranks(pool) == {rank}
        assert rel_err(got, ref) < 1e-4

    stall(device, pool._side)  # keeps each prefetch below pending on the side stream
    pool.prefetch("b")  # evicts "a"
    pool.load("b", paths["a2"])  # replaces "b" in place
    check("b", "a2", RANKS[2])
    stall(device, pool._side)
    pool.prefetch("a")  # evicts "b"
    with pool.batch(["b"]):  # loads "b" again, evicting "a"
        pass
    check("b", "a2", RANKS[2])
    stall(device, pool._side)
    pool.prefetch("a")
    pool.unload("a")
    pool.load("c", paths["a0"])  # into the slot "a" was prefetched to
    check("c", "a0", RANKS[0])
    assert pool.names() == ["b", "c"]


@torch.no_grad()
def test_generate_greedy_and_beams_match_peft(saved):
    # the serving loop: HF generate() inside pool.batch (prefill, then decode steps of one token
    # per row with a KV cache) gives PEFT's generate(adapter_names=...) tokens; beam search
    # expands each row num_beams times in place, so the names are repeated likewise (the error
    # for unrepeated names says how)
    base, paths = saved
    pm = peft_multi(base, paths)
    model, pool = make_pool(base, paths)
    names = ["a3", None, "a1"]
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    peft_names = [n or "__base__" for n in names]
    with pool.batch(names):
        assert torch.equal(model.generate(input_ids=ids, **kw), pm.generate(input_ids=ids, adapter_names=peft_names, **kw))
    ref = pm.generate(input_ids=ids, adapter_names=peft_names, num_beams=2, **kw)
    with pytest.raises(ValueError, match=r"num_beams=2.*for _ in range\(2\)"):
        with pool.batch(names):
            model.generate(input_ids=ids, num_beams=2, **kw)
    with pool.batch([n for n in names for _ in range(2)]):
        assert torch.equal(model.generate(input_ids=ids, num_beams=2, **kw), ref)
