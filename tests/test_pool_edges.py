"""AdapterPool / LoRAContext edges: compiled batch sizes, files that change after load, failed
writes and cleanups, inference mode, PEFT's saved embedding tables, index dtypes."""
import copy

import pytest
import torch
from conftest import rel_err
from models import saved_peft, tiny_llama

import lora_ext
from lora_ext import LoRAContext, MultiLoRALinear
from lora_ext.adapters import Adapter, LayerWeights

peft = pytest.importorskip("peft")


@pytest.fixture
def base():
    return tiny_llama()


@torch.no_grad()
def test_compiled_model_compiles_once_for_all_batch_sizes(base, tmp_path):
    """The row-count check must not pin the batch size in the graph (one graph per size before);
    a row mismatch under compile is still reported (CPU: an error naming it)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj"])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=2, max_rank=8)
    pool.load("a", tmp_path / "a")  # a pathlib.Path
    compiled = torch.compile(model)
    counters.clear()
    for bs in range(1, 7):
        ids = torch.randint(0, 128, (bs, 5))
        names = ["a", None] * bs
        with pool.batch(names[:bs]):
            got = compiled(ids).logits
            want = model(ids).logits
        assert rel_err(got, want) < 1e-5, bs
    assert counters["stats"]["unique_graphs"] <= 2
    with pytest.raises(RuntimeError, match="rows/tokens differ"), pool.batch(["a"] * 3):
        compiled(torch.randint(0, 128, (4, 5)))
    with pytest.raises(TypeError, match="sequence of names"):
        pool.batch("a").__enter__()


@torch.no_grad()
def test_evicted_adapter_is_validated_when_read_again(base, tmp_path):
    """A file that changed after load() (now targeting a module the pool does not serve) is
    refused when an evicted adapter is read again, before the batch changes anything."""
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj"])
    saved_peft(base, tmp_path / "b", 2, target_modules=["q_proj"])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=1, max_rank=8,
                                host_cache_bytes=0)
    pool.load("a", str(tmp_path / "a"))
    pool.load("b", str(tmp_path / "b"))  # evicts a, whose host copy is dropped
    saved_peft(base, tmp_path / "a", 3, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"k_proj.*not served") as e, pool.batch(["a"]):
        pass
    assert str(tmp_path / "a") in str(e.value)
    assert pool.resident() == ["b"]
    with pool.batch(["b"]):
        model(torch.randint(0, 128, (1, 4)))


@torch.no_grad()
def test_pool_built_in_inference_mode_and_failed_cleanup(base, tmp_path, monkeypatch):
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj"])
    with torch.inference_mode():  # server start-up code
        model = copy.deepcopy(base)
        pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=2, max_rank=8)
        pool.load("a", str(tmp_path / "a"))
    ids = torch.randint(0, 128, (2, 4))
    with pool.batch(["a", None]):  # served under no_grad: the buffers take in-place updates
        y = model(ids).logits
    clear = pool.context.clear
    calls = []

    def failing_clear():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cleanup failed")
        clear()
    monkeypatch.setattr(pool.context, "clear", failing_clear)
    with pytest.raises(RuntimeError, match="cleanup failed"), pool.batch(["a", None]):
        model(ids)
    with pool.batch(["a", None]):  # not stuck "open"
        assert torch.equal(model(ids).logits, y)
    pool.close()


@torch.no_grad()
def test_failed_write_keeps_the_slot_table_consistent(base, tmp_path, monkeypatch):
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj"])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=1, max_rank=8)
    pool.load("a", str(tmp_path / "a"))
    ids = torch.randint(0, 128, (1, 4))
    with pool.batch(["a"]):
        want = model(ids).logits
    layer = next(iter(pool.layers.values()))
    real = type(layer).set_slot
    monkeypatch.setattr(type(layer), "set_slot", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        pool.load("a", str(tmp_path / "a"))  # replacing a: its slot is half written
    monkeypatch.setattr(type(layer), "set_slot", real)
    assert pool.names() == ["a"] and pool.resident() == []
    with pool.batch(["a"]):  # written again from its host copy
        assert torch.equal(model(ids).logits, want)
    zero = Adapter({"model.layers.0.self_attn.q_proj": LayerWeights(torch.zeros(0, 64), torch.zeros(64, 0), 1.0)})
    with pytest.raises(ValueError, match="rank 0"):
        pool.load("z", zero)
    pool.load("b", str(tmp_path / "a"))  # evicts a: no stale slot left behind
    assert pool.resident() == ["b"]


def test_set_slot_checks_every_pair_before_writing():
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), 2, 4, context=LoRAContext(4))
    A, B = torch.randn(3, 16), torch.randn(8, 3)
    layer.set_slot(0, A, B, 0.5)
    before = (layer.A_pool.clone(), layer.B_pool.clone(), layer.ranks.clone())
    with pytest.raises(ValueError, match="A must be"):
        layer.set_slot(0, torch.randn(8, 16), torch.randn(8, 8), 1.0)  # r = 8 > r_max
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.A_pool, layer.B_pool, layer.ranks)))


@torch.no_grad()
def test_peft_embedding_adapter_with_its_saved_table(base, tmp_path):
    """PEFT saves a targeted embedding's table beside its factors: equal to the model's, the pool
    takes the adapter; a changed table is still refused."""
    pm = saved_peft(base, tmp_path / "e", 1, target_modules=["q_proj", "embed_tokens"])
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "embed_tokens"], max_adapters=2, max_rank=8)
    assert "model.embed_tokens.base_layer.weight" in Adapter.load(tmp_path / "e").extra
    pool.load("e", tmp_path / "e")
    ids = torch.randint(0, 128, (2, 5))
    with pool.batch(["e", None]):
        got = model(ids).logits
    assert rel_err(got, pm(input_ids=ids, adapter_names=["default", "__base__"]).logits) < 1e-5
    ad = Adapter.load(tmp_path / "e")
    ad.extra["model.embed_tokens.base_layer.weight"] += 1
    with pytest.raises(ValueError, match="non-LoRA tensors"):
        pool.load("changed", ad)


def test_modules_to_save_without_its_tensors_is_refused(base, tmp_path):
    """A config whose modules_to_save selects a module the file holds no tensors for (PEFT:
    KeyError) is refused, not served with the base model's module."""
    import json
    saved_peft(base, tmp_path / "a", 1, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    pool = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=["q_proj"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"AdapterPool.load\('a'.*modules_to_save.*'lm_head'.*lm_head.weight"):
        pool.load("a", tmp_path / "a")
    assert "a" not in pool


def test_set_indices_refuses_values_it_would_change():
    ctx = LoRAContext(8)
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), 2, 4, context=ctx)
    layer.set_slot(1, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    for bad in ([0.7], [True]):
        with pytest.raises(TypeError, match="integers"):
            ctx.set_indices(bad)
    for big in (2**32, 2**32 + 1, -2**32 - 1):  # would wrap to 0, 1 and -1 in int32
        ctx.set_indices([big])
        with pytest.raises(RuntimeError, match="does not fit int32"), torch.no_grad():
            layer(torch.randn(1, 16))
    ctx.set_indices(torch.tensor([1], dtype=torch.int64))
    with torch.no_grad():
        layer(torch.randn(1, 16))


def test_set_indices_takes_unsigned_integers():
    """uint16/32/64 indices (numpy's too) serve as uint8 and int ones do (they were refused with
    "indices must be integers, got torch.uint32"); values int32 cannot hold are out of range, never
    wrapped (uint64 2**64 - 1 is -1 as int64: the base model)."""
    np = pytest.importorskip("numpy")
    ctx = LoRAContext(8)
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), 2, 4, context=ctx)
    layer.set_slot(1, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ctx.set_indices(torch.tensor([1, 0, 1], dtype=torch.int32))
        want = layer(x)
        for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
            ctx.set_indices(torch.tensor([1, 0, 1]).to(dtype))
            assert torch.equal(layer(x), want), dtype
        ctx.set_indices(np.array([1, 0, 1], dtype=np.uint32))
        assert torch.equal(layer(x), want)
        for big, dtype in ((2**31, np.uint32), (2**32 - 1, np.uint32), (2**32, np.uint64), (2**63, np.uint64),
                           (2**64 - 1, np.uint64)):
            ctx.set_indices(np.array([0, big], dtype=dtype))
            with pytest.raises(RuntimeError, match=r"indices\[1\] = -2147483648 is out of range.*does not fit int32"):
                layer(x[:2])


def trained_adapter(seed, r=4, targets=("q_proj", "v_proj")):
    m = tiny_llama()
    lora_ext.inject(m, target_modules=list(targets), r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_ext.lora_layers(m).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return Adapter.from_model(m)


@torch.no_grad()
def test_pool_keeps_its_own_copy_of_a_loaded_adapter(base):
    """The host copy of an Adapter passed to load() must not share the caller's tensors: changed
    in place afterwards (training goes on), an evicted and restored adapter served the new values
    on a machine without CUDA (to("cpu").contiguous() returned the same tensor there)."""
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=8)
    ad = trained_adapter(1)
    pool.load("a", ad)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with pool.batch(["a"]):
        want = model(ids).logits
    for w in ad.layers.values():
        w.B.zero_()
    pool.load("b", trained_adapter(2))  # evicts a
    assert pool.resident() == ["b"]
    with pool.batch(["a"]):
        assert torch.equal(model(ids).logits, want)


@torch.no_grad()
def test_evicted_adapter_whose_file_changed_is_not_served(base, tmp_path, monkeypatch):
    """A new (valid) checkpoint written over a loaded adapter's directory was served silently once
    the adapter had been evicted and dropped from the host cache: the same name gave other logits
    depending on cache pressure. Now the batch raises (pool unchanged) until load() picks it up.
    A relative path is kept absolute: after a chdir the same directory is read, not another one."""
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    (tmp_path / "elsewhere").mkdir()
    for where, seed in ((tmp_path, 1), (tmp_path / "elsewhere", 7)):  # same relative path "a"
        trained_adapter(seed).save(str(where / "a"))
    monkeypatch.chdir(tmp_path)
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=8,
                                host_cache_bytes=0)
    pool.load("a", "a")
    with pool.batch(["a"]):
        want = model(ids).logits
    pool.load("b", trained_adapter(2))  # evicts a, whose host copy is dropped
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pool.batch(["a"]):
        assert torch.equal(model(ids).logits, want)
    pool.load("b", trained_adapter(2))
    trained_adapter(3).save(str(tmp_path / "a"))  # a new checkpoint over the loaded one
    with pytest.raises(ValueError, match=r"'a' was evicted and its files in .* changed.*pool.load\('a'"):
        with pool.batch(["a"]):
            pass
    assert pool.resident() == ["b"]
    pool.load("a", tmp_path / "a")  # picks up the new version
    fresh = copy.deepcopy(base)
    ref = lora_ext.AdapterPool(fresh, target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=8)
    ref.load("a", tmp_path / "a")
    with pool.batch(["a"]):
        got = model(ids).logits
    with ref.batch(["a"]):
        assert torch.equal(got, fresh(ids).logits) and not torch.equal(got, want)


@torch.no_grad()
def test_misuse_errors_name_the_method_and_argument(base):
    """Before: load(123, ad) said 123 'is reserved for the base model', a list among batch names
    raised a bare "unhashable type: 'list'", unload/prefetch of an unknown name and a load with
    every slot in use named no method."""
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=8)
    ad = trained_adapter(1)
    for bad in (123, b"a", ["a"]):
        with pytest.raises(TypeError, match=r"AdapterPool.load: name must be a str, got "):
            pool.load(bad, ad)
    with pytest.raises(ValueError, match="AdapterPool.load: '__base__' is reserved"):
        pool.load("__base__", ad)
    for name in ("", "ü.v1/x"):  # any str is a name
        pool.load(name, ad)
    with pytest.raises(TypeError, match=r"AdapterPool.batch: names\[1\] is a list"), pool.batch(["", ["a"]]):
        pass
    for method in ("unload", "prefetch"):
        with pytest.raises(KeyError, match=rf"AdapterPool.{method}: unknown adapter 'zz'"):
            getattr(pool, method)("zz")
    with pool.batch([""]), pytest.raises(RuntimeError, match=r"AdapterPool.load\('b'\): all 1 slots"):
        pool.load("b", ad)
    assert pool.names() == ["", "ü.v1/x"] and pool.resident() == [""]


@torch.no_grad()
def test_evicted_pickle_adapter_is_read_again(base, tmp_path):
    """load(name, dir, allow_pickle=True) of an adapter_model.bin: read again after eviction
    without allow_pickle, the batch raised 'refusing to unpickle'."""
    from safetensors.torch import load_file
    trained_adapter(1).save(str(tmp_path / "a"))
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=8,
                                host_cache_bytes=0)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        pool.load("a", tmp_path / "a")
    pool.load("a", tmp_path / "a", allow_pickle=True)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with pool.batch(["a"]):
        want = model(ids).logits
    pool.load("b", trained_adapter(2))  # evicts a, whose host copy is dropped
    with pool.batch(["a"]):
        assert torch.equal(model(ids).logits, want)


def test_pool_arguments_are_checked(base):
    """Floats, strings and bools for the sizes raised torch's "zeros(): argument 'size' ..." or a
    bare "'<' not supported", a negative host_cache_bytes was taken; a str target that matches no
    full name hints at the list form (a str is a regex, as in PEFT)."""
    for kw, msg in ((dict(max_adapters=2.5), "max_adapters must be an int >= 1, got 2.5"),
                    (dict(max_rank="8"), "max_rank must be an int >= 1, got '8'"),
                    (dict(max_adapters=True), "max_adapters must be an int >= 1, got True"),
                    (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
                    (dict(host_cache_bytes=-1), "host_cache_bytes must be None or an int >= 0, got -1"),
                    (dict(target_modules="q_proj"), r"a str is a regex .* \['q_proj'\]")):
        with pytest.raises(ValueError, match=r"AdapterPool: .*" + msg):
            lora_ext.AdapterPool(copy.deepcopy(base), **{"target_modules": ["q_proj"], **kw})
    pool = lora_ext.AdapterPool(copy.deepcopy(base), target_modules=["q_proj"], host_cache_bytes=0)
    assert pool.host_cache_bytes == 0 and pool.max_adapters == 16


def test_second_pool_on_a_served_model_is_refused(base):
    """A second pool wrapped the first pool's base layers (target_modules=None) or said "matched no
    nn.Linear" (the targets are multi-adapter layers now)."""
    model = copy.deepcopy(base)
    lora_ext.AdapterPool(model, target_modules=["q_proj"])
    for targets in (None, ["q_proj"], ["v_proj"]):
        with pytest.raises(ValueError, match=r"already served by an AdapterPool \(multi-adapter layers .*q_proj"):
            lora_ext.AdapterPool(model, target_modules=targets)


@torch.no_grad()
def test_random_mixes_match_peft_through_evictions_and_reloads(base, tmp_path):
    """PEFT's mixed batch (adapter_names) is the oracle: names with dots, slashes, unicode and ""
    (any str), rsLoRA, rank/alpha patterns, other target sets and an embedding, 3 slots for 4
    adapters and a 20 kB host cache (evictions, re-reads), unloads and reloads between batches."""
    import random
    specs = {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
             "b.v1/x": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_rslora=True),
             "ü": dict(r=4, lora_alpha=16, target_modules=["v_proj", "embed_tokens"],
                       rank_pattern={"v_proj": 6}, alpha_pattern={"embed_tokens": 3}),
             "": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "embed_tokens"])}
    paths = {n: tmp_path / f"ad{i}" for i, n in enumerate(specs)}
    for i, (n, cfg) in enumerate(specs.items()):
        saved_peft(base, paths[n], 10 + i, **cfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="p0")
    for i, n in enumerate(list(specs)[1:], 1):
        pm.load_adapter(paths[n], adapter_name=f"p{i}")
    pm.eval()
    peft_name = {n: f"p{i}" for i, n in enumerate(specs)} | {None: "__base__", "__base__": "__base__"}
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "k_proj", "v_proj", "embed_tokens"],
                                max_adapters=3, max_rank=16, host_cache_bytes=20000)
    for n in specs:
        pool.load(n, paths[n])
    rng = random.Random(0)
    for it in range(20):
        names = [rng.choice([*specs, None, "__base__"]) for _ in range(rng.randint(1, 5))]
        if len({n for n in names if n not in (None, "__base__")}) > 3:
            continue
        if it % 6 == 5:
            n = rng.choice(list(specs))
            pool.unload(n)
            pool.load(n, paths[n])
        ids = torch.randint(0, 128, (len(names), 7), generator=torch.Generator().manual_seed(it))
        with pool.batch(names):
            got = model(ids).logits
        want = pm(input_ids=ids, adapter_names=[peft_name[n] for n in names]).logits
        assert rel_err(got, want) < 1e-5, (it, names)


@torch.no_grad()
def test_threads_load_evict_and_reload_while_batches_run(base, tmp_path):
    """120 batches over 3 served names in 3 slots while two threads load (paths and Adapter
    objects), unload, and reload the served names with the same weights: every slot the batches
    need is evicted and written again under them; results equal a single-threaded pool's."""
    import random
    import threading
    ads = {f"s{i}": trained_adapter(i, r=(2, 4, 8)[i % 3]) for i in range(5)}
    for n, ad in ads.items():
        ad.save(str(tmp_path / n))
    served, others = ["s0", "s1", "s2"], ["s3", "s4"]
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(0))
    rng = random.Random(1)
    batches = [[rng.choice([*served, None]) for _ in range(4)] for _ in range(120)]
    ref_model = copy.deepcopy(base)
    ref = lora_ext.AdapterPool(ref_model, target_modules=["q_proj", "v_proj"], max_adapters=3, max_rank=8)
    for n in served:
        ref.load(n, ads[n])
    want = {}
    for names in map(tuple, batches):
        if names not in want:
            with ref.batch(names):
                want[names] = ref_model(ids).logits
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=3, max_rank=8,
                                host_cache_bytes=30000)
    for n in served:
        pool.load(n, tmp_path / n)
    stop, errors = threading.Event(), []

    def churn(seed, mine):
        r = random.Random(seed)
        while not stop.is_set():
            n = r.choice([mine, *served])
            source = ads[n] if r.random() < 0.5 else tmp_path / n
            try:
                if n == mine and n in pool and r.random() < 0.3:
                    pool.unload(n)
                else:
                    pool.load(n, source)
            except RuntimeError as e:  # in use by the open batch / every slot is: refused, as documented
                if "used by an open batch" not in str(e) and "used by open batches" not in str(e):
                    errors.append(e)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=churn, args=(i, n)) for i, n in enumerate(others)]
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 Python threads busy beside the batches: no OpenMP workers spinning
    for t in threads:
        t.start()
    try:
        for names in batches:
            with pool.batch(names):
                got = model(ids).logits
            assert rel_err(got, want[tuple(names)]) < 1e-6, names
    finally:
        stop.set()
        for t in threads:
            t.join()
        torch.set_num_threads(intra_op)
    assert not errors, errors[:3]


def _expert_lora_model():
    """Two Linears, LoRA on the second's weight (a LoRAParameter, as target_parameters makes)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    lora_ext.inject(model, target_parameters=["1.weight"], r=2)
    return model


def test_lora_on_parameters_is_refused_by_module():
    """Adapters with LoRA on parameters outside the pool's target_parameters (MoE experts), and models
    with LoRAParameter layers, are refused naming the module."""
    pool = lora_ext.AdapterPool(torch.nn.Sequential(torch.nn.Linear(4, 4)), target_modules=["0"], max_rank=4)
    ad = Adapter({"0": LayerWeights(torch.randn(2, 4), torch.randn(4, 2), 1.0, "parameter", parameter="weight")})
    with pytest.raises(ValueError, match=r"AdapterPool.load\('a'\): module '0' holds LoRA on a parameter "
                                         r"\(target_parameters\) of '0', which this pool does not serve \(it serves no "
                                         r"experts \(AdapterPool\(..., target_parameters"):
        pool.load("a", ad)
    assert pool.names() == []
    with pytest.raises(ValueError, match=r"AdapterPool: Sequential has LoRA on parameters \(LoRAParameter '1'\).*"
                                         r"every row of a mixed batch: merge it into the model first"):
        lora_ext.AdapterPool(_expert_lora_model(), target_modules=["0"])
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base must be an nn.Linear .* got LoRAParameter"):
        MultiLoRALinear(_expert_lora_model()[1], num_slots=2, r_max=2)


@torch.no_grad()
def test_a_module_registered_twice_is_served_in_both_places():
    """nn.Sequential(shared, act, shared): the pool serves the one Linear at both places, as inject
    adapts it (named_modules() names it once); a model that is itself a target is refused."""
    shared = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    injected = copy.deepcopy(model)
    lora_ext.inject(injected, target_modules=["0"], r=2)
    torch.nn.init.normal_(injected[0].lora_B)
    assert injected[2] is injected[0]
    pool = lora_ext.AdapterPool(model, target_modules=["0"], max_rank=2)
    assert model[2] is model[0] and isinstance(model[2], MultiLoRALinear)
    pool.load("a", Adapter.from_model(injected))
    x = torch.randn(3, 6)
    with pool.batch(["a", None, "a"]):
        got = model(x)
    assert torch.allclose(got[[0, 2]], injected(x)[[0, 2]], atol=1e-6)
    assert torch.allclose(got[1], injected[0].base_module()(torch.tanh(injected[0].base_module()(x[1]))), atol=1e-6)
    with pytest.raises(TypeError, match="the model itself is a Linear"):
        lora_ext.AdapterPool(torch.nn.Linear(4, 4))
