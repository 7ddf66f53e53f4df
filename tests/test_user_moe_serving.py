"""Serving LoRA on MoE experts as a multi-tenant user would (AdapterPool(target_parameters=...) and
patch_peft's mixed batches): adapter files with rank_pattern / alpha_pattern on a module's two
projections, batches whose rows do not match the names, stacks of one expert, set_slot misuse.
PEFT (each row's adapter alone) is the oracle."""
import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err
from models import saved_peft
from param_cases import tiny_moe

import lora_ext

peft = pytest.importorskip("peft")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_pair(base, tmp_path, target_modules, r_a, r_b):
    """(PEFT model with adapters "a" (rank r_a) and "b" (r_b) on the experts, loaded from their saved
    directories; a patch_peft'd copy)."""
    saved_peft(base, tmp_path / "a", seed=1, target_modules=target_modules, target_parameters=EXPERTS, r=r_a)
    saved_peft(base, tmp_path / "b", seed=2, target_modules=target_modules, target_parameters=EXPERTS, r=r_b)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    ref.load_adapter(tmp_path / "b", adapter_name="b")
    pm = copy.deepcopy(ref)
    lora_ext.patch_peft(pm)
    return ref, pm


@torch.no_grad()
def per_row(models, base, ids, names):
    """Each row through its adapter's PeftModel alone (None / "__base__": the base model)."""
    return torch.cat([(models.get(n) or base)(input_ids=ids[i:i + 1]).logits for i, n in enumerate(names)])


@torch.no_grad()
def test_pool_reads_rank_pattern_adapters_from_their_files(tmp_path):
    """rank_pattern / alpha_pattern giving gate_up_proj and down_proj different (r, alpha): the file
    alone does not say which nested factor is which (param_files.NeedsModel); the pool reads it against
    its experts, at load() and when an evicted adapter is re-read from its file."""
    base = tiny_moe("qwen3_moe")
    models = {"p": saved_peft(base, tmp_path / "p", seed=1, target_modules=[], target_parameters=EXPERTS, r=4,
                              rank_pattern={"gate_up_proj": 2}, alpha_pattern={"down_proj": 3})}
    ours = copy.deepcopy(base)  # saved by lora_ext itself
    lora_ext.inject(ours, target_parameters=EXPERTS, r=4, alpha=8, rank_pattern={"down_proj": 6},
                    alpha_pattern={"gate_up_proj": 2})
    torch.manual_seed(2)
    for n, p in ours.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn_like(p) * 0.1)
    lora_ext.Adapter.from_model(ours).save(str(tmp_path / "ours"))
    models["ours"] = ours.eval()
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=[], target_parameters=EXPERTS, max_adapters=1, max_rank=8,
                                host_cache_bytes=0)  # every load evicts, every reuse re-reads the file
    for n in models:
        pool.load(n, tmp_path / n)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    for names in (["p", None, "p"], [None, "ours", "ours"], ["p", "p", None]):
        with pool.batch(names):
            got = model(input_ids=ids).logits
        assert rel_err(got, per_row(models, base, ids, names)) < 1e-5, names
    assert rel_err(per_row(models, base, ids, ["p"]), base(input_ids=ids[:1]).logits) > 1e-2


@pytest.fixture(scope="module")
def experts_only(tmp_path_factory):
    """(base, {name: PeftModel}, model, pool): a pool serving only the experts (no Linear layer sees
    the batch rows), adapters "a" (r 3) and "b" (down_proj, r 5)."""
    root = tmp_path_factory.mktemp("experts_only")
    base = tiny_moe("qwen3_moe")
    models = {"a": saved_peft(base, root / "a", seed=1, target_modules=[], target_parameters=EXPERTS, r=3),
              "b": saved_peft(base, root / "b", seed=2, target_modules=[], target_parameters=EXPERTS[1:], r=5)}
    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=[], target_parameters=EXPERTS, max_adapters=2, max_rank=8)
    for n in models:
        pool.load(n, root / n)
    return base, models, model, pool


@torch.no_grad()
def test_experts_only_pool_checks_batch_rows(experts_only):
    """The experts get the [B * L] tokens flattened: B rows that are not the names' count (or beams
    not expanded in the names) raise as the Linear layers do, instead of spreading the names over
    the rows (rows 0-1 "a", 2-3 "b" for 2 names and 4 rows)."""
    base, models, model, pool = experts_only
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(1))
    with pool.batch(["a", "b"]), pytest.raises(ValueError, match=r"4 batch rows .* but 2 row indices"):
        model(input_ids=ids)
    gen = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with pool.batch(["a", "b"]), pytest.raises(ValueError, match=r"num_beams=2.*range\(2\)"):
        model.generate(input_ids=ids[:2], **gen)
    with pool.batch(["a", "a", "b", "b"]):
        got = model.generate(input_ids=ids[:2], **gen)
    want = torch.cat([models[n].generate(input_ids=ids[i:i + 1], **gen) for i, n in enumerate("ab")])
    assert got.tolist() == want.tolist()
    names = ["b", None, "a", "a"]
    with pool.batch(names):
        assert rel_err(model(input_ids=ids).logits, per_row(models, base, ids, names)) < 1e-5
    # the experts called directly: [B, L, H] rows are checked too; [T, H] must be a multiple
    ex = pool.experts["model.layers.0.mlp.experts"]
    x, idx, w = torch.randn(4, 3, 64), torch.zeros(12, 2, dtype=torch.long), torch.ones(12, 2)
    with pool.batch(["a", "b"]):
        with pytest.raises(ValueError, match=r"4 batch rows"):
            ex(x, idx, w)
        assert ex(x.view(12, 64), idx, w).shape == (12, 64)  # 6 tokens per row: cannot tell
    copied = copy.deepcopy(model)  # the block's hook follows the copy's own experts
    assert rel_err(copied(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-6


@torch.no_grad()
def test_patched_experts_only_checks_adapter_names_length(tmp_path):
    """patch_peft on a model whose only LoRA is on experts: adapter_names of another length than the
    batch raises PEFT's message (PEFT checks it in every Linear layer) instead of spreading them."""
    base = tiny_moe("mixtral")
    ref, pm = peft_pair(base, tmp_path, [], 3, 2)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same as the number of inputs, "
                                         r"but got 2 and 4"):
        pm(input_ids=ids, adapter_names=["a", "b"])
    names = ["b", "__base__", "a", "b"]
    want = []
    for i, n in enumerate(names):
        if n != "__base__":
            ref.set_adapter(n)
        want.append((base if n == "__base__" else ref)(input_ids=ids[i:i + 1]).logits)
    assert rel_err(pm(input_ids=ids, adapter_names=names).logits, torch.cat(want)) < 1e-5
    block = pm.base_model.model.model.layers[0].mlp
    assert len(block._forward_pre_hooks) == 1
    lora_ext.unpatch_peft(pm)
    assert len(block._forward_pre_hooks) == 0


@torch.no_grad()
def test_single_expert_stacks(tmp_path):
    """A stack of one expert [1, out, in] (PEFT's num_experts 1, as for a 2-D parameter) is a stack:
    patch_peft runs it (it fell back to PEFT, "not an expert stack", and refused mixed batches)."""
    base = tiny_moe("mixtral")
    base.config.num_local_experts, base.config.num_experts_per_tok = 1, 1
    base = type(base)(base.config).eval()
    ref, pm = peft_pair(base, tmp_path, ["q_proj"], 2, 3)
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(3))
    names = ["b", "a", "__base__"]
    want = []
    for i, n in enumerate(names):
        if n != "__base__":
            ref.set_adapter(n)
        want.append((base if n == "__base__" else ref)(input_ids=ids[i:i + 1]).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to PEFT
        pm.set_adapter("b")
        assert rel_err(pm(input_ids=ids[:1]).logits, want[0]) < 1e-5
        assert rel_err(pm(input_ids=ids, adapter_names=names).logits, torch.cat(want)) < 1e-5
    model = copy.deepcopy(base)  # and the pool, with PEFT's files
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], target_parameters=EXPERTS, max_rank=4)
    pool.load("a", tmp_path / "a")
    pool.load("b", tmp_path / "b")
    with pool.batch(names):
        assert rel_err(model(input_ids=ids).logits, torch.cat(want)) < 1e-5


def test_experts_set_slot_errors_name_the_op(experts_only):
    ex = experts_only[3].experts["model.layers.0.mlp.experts"]
    A, B = torch.randn(4 * 2, 32), torch.randn(64, 4 * 2)
    with pytest.raises(ValueError, match=r"set_slot: factors\['down_proj'\] must be a tuple \(A, B, scale\)"):
        ex.set_slot(0, {"down_proj": A})
    with pytest.raises(TypeError, match=r"set_slot: down_proj A must be a tensor, got ndarray"):
        ex.set_slot(0, {"down_proj": (A.numpy(), B, 1.0)})
    with pytest.raises(ValueError, match=r"set_slot: down_proj B is on the meta device"):
        ex.set_slot(0, {"down_proj": (A, B.to("meta"), 1.0)})
    with pytest.raises(TypeError, match=r"set_slot: slot must be an int, got str"):
        ex.set_slot("0", {})
    before = [t.clone() for t in (ex.slots["down_proj"].A_pool, ex.slots["down_proj"].ranks)]
    with pytest.raises(ValueError, match=r"set_slot: factors\['gate_up_proj'\]"):  # refused: slot unchanged
        ex.set_slot(np.int64(0), {"down_proj": (A, B, 1.0), "gate_up_proj": (A,)})
    assert torch.equal(before[0], ex.slots["down_proj"].A_pool) and torch.equal(before[1], ex.slots["down_proj"].ranks)


@torch.no_grad()
def test_compiled_experts_only_pool_reports_row_mismatch(experts_only):
    """Compiled (fullgraph, no recompiles across swaps), the block's rows reach the experts' traced
    indices: a batch whose rows are not the names' count gets out-of-range indices, which the op
    reports (CPU: an error; CUDA: LoRAContext.check), as in the Linear layers' traced path."""
    base, models, model, pool = experts_only
    torch._dynamo.reset()
    fwd = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, dynamic=True)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    with pool.batch(["a", None, "b"]):
        fwd(ids[:3].clone())
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names in (["b", "a", None], ["a", "b"], [None, "b", "b", "a"]):
            with pool.batch(names):
                got = fwd(ids[:len(names)].clone())
            assert rel_err(got, per_row(models, base, ids, names)) < 1e-5, names
        with pool.batch(["a", "b"]), pytest.raises(RuntimeError, match="out of range"):
            fwd(ids)


@torch.no_grad()
def test_compiled_patched_experts_reuse_one_graph_for_every_batch_size(tmp_path):
    """torch.compile(patch_peft'd model) with mixed batches: the experts' part compared len(names) in
    Python (a guard: one graph per batch size, unlike the Linear layers); rows mismatching the names
    still raise PEFT's error."""
    from torch._dynamo.testing import CompileCounter
    base = tiny_moe("qwen3_moe")
    ref, pm = peft_pair(base, tmp_path, [], 4, 5)
    torch._dynamo.reset()  # batch sizes below: none equal to a size of the first trace (duck sizing)
    counter = CompileCounter()
    fwd = torch.compile(pm, backend=counter, dynamic=True)
    ids = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(5))
    fwd(input_ids=ids[:3].clone(), adapter_names=["b", "b", "a"])
    frames = counter.frame_count
    for names in (["a", "b", "__base__", "a", "b", "b"], ["__base__", "a", "b", "b"]):
        want = []
        for i, n in enumerate(names):
            if n != "__base__":
                ref.set_adapter(n)
            want.append((base if n == "__base__" else ref)(input_ids=ids[i:i + 1]).logits)
        got = fwd(input_ids=ids[:len(names)].clone(), adapter_names=names).logits
        assert rel_err(got, torch.cat(want)) < 1e-5, names
    assert counter.frame_count == frames
    with pytest.raises(ValueError, match=r"Length of `adapter_names`.*got 2 and 4"):
        fwd(input_ids=ids[:4].clone(), adapter_names=["a", "b"])


def test_pool_refuses_a_peft_model_with_param_wrappers(experts_only):
    """A pool built on a PeftModel with target_parameters LoRA wrapped the experts inside PEFT's
    ParamWrapper (target_parameters=["gate_up_proj", "down_proj"]): its forward then failed on the wrapper deep in
    PEFT ("does not have a parameter"); refused by name at construction."""
    base = experts_only[0]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    for targets in (EXPERTS, ["gate_up_proj", "down_proj"]):
        with pytest.raises(ValueError, match=r"PEFT LoRA on parameters \(ParamWrapper "
                                             r"'base_model.model.model.layers.0.mlp.experts'.*patch_peft"):
            lora_ext.AdapterPool(pm, target_modules=[], target_parameters=targets)
    assert all(type(m).__name__ != "MultiLoRAExperts" for m in pm.modules())  # nothing changed
