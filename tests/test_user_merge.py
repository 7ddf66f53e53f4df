"""A deployment engineer's merge workflows (README "Merge and unmerge", `python -m lora_ext merge`):
regressions found by using them, each against a plain-torch reference."""
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext.ops import MergeState, merge_, unmerge_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def test_exact_merge_of_a_weight_past_2_24_elements():
    """4097 x 4096 (Llama's 32000 x 4096 lm_head likewise): the state's probe of 64 spread elements
    used a float32 linspace whose last index rounded up to numel, an IndexError after the weight
    was already written (a LoRALinear then held the merged weight but said merged=False)."""
    W = torch.randn(4097, 4096).bfloat16()
    W0 = W.clone()
    A, B = torch.randn(1, 4096), torch.randn(4097, 1) * 1e-2
    state = MergeState()
    merge_(W, A, B, 2.0, state=state)
    ref = W0.clone()
    merge_(ref, A, B, 2.0)  # the plain merge: the same bits
    assert torch.equal(bits(W), bits(ref))
    unmerge_(W, state=state)
    assert torch.equal(bits(W), bits(W0))

    base = nn.Linear(4096, 4097, bias=False).bfloat16()
    for dora in (False, True):  # (DoRA's merge state keeps the same probe)
        layer = lora_ext.LoRALinear.from_linear(base, r=1, use_dora=dora)
        with torch.no_grad():
            layer.lora_B.normal_()
        w0 = layer.weight.detach().clone()
        layer.merge()
        assert layer.merged and not torch.equal(layer.weight, w0)
        layer.unmerge()
        assert torch.equal(bits(layer.weight.detach()), bits(w0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_exact_merge_into_a_non_contiguous_weight(dtype, fifo, layout):
    """README: strided and column-major weights work in place; with a MergeState they raised
    "weight must be contiguous", and lora_ext.merge(model) had merged the layers before such a
    one (a half-merged model, the error naming no layer). Now bit for bit the contiguous results."""
    P, Q = 24, 40
    base = torch.randn(P, Q).to(dtype)
    if layout == "transposed":
        W = base.t().contiguous().t()
    else:
        W = torch.empty(P, 2 * Q, dtype=dtype)[:, ::2]
        W.copy_(base)
    assert not W.is_contiguous()
    out, n_in = (Q, P) if fifo else (P, Q)
    adapters = {"a": (torch.randn(3, n_in), torch.randn(out, 3) * 0.05, 0.7),
                "b": (torch.randn(2, n_in).bfloat16(), torch.randn(out, 2).bfloat16() * 0.05, 1.3)}
    Wc, s, sc = base.clone(), MergeState(), MergeState()
    for name, (A, B, scale) in adapters.items():
        merge_(W, A, B, scale, fan_in_fan_out=fifo, state=s, name=name, safe=True)
        merge_(Wc, A, B, scale, fan_in_fan_out=fifo, state=sc, name=name, safe=True)
        assert torch.equal(bits(W), bits(Wc))
    unmerge_(W, fan_in_fan_out=fifo, state=s, name="a")
    unmerge_(Wc, fan_in_fan_out=fifo, state=sc, name="a")
    assert torch.equal(bits(W), bits(Wc))
    unmerge_(W, fan_in_fan_out=fifo, state=s)
    assert torch.equal(bits(W), bits(base)) and not W.is_contiguous()


def test_model_merge_with_a_column_major_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model[2].weight = nn.Parameter(torch.randn(32, 8).t() * 0.1)  # column-major [8, 32]
    lora_ext.inject(model, target_modules=["0", "2"], r=4, alpha=8)
    with torch.no_grad():
        for m in lora_ext.lora_layers(model).values():
            m.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 16)
    y = model(x)
    w0 = model[2].weight.detach().clone()
    assert lora_ext.merge(model) == ["0", "2"]
    torch.testing.assert_close(model(x), y)
    lora_ext.unmerge(model)
    assert torch.equal(model[2].weight, w0)


@pytest.mark.parametrize("width", [True, 1.0, "1", None])
def test_merge_state_bits_must_be_an_int_code_width(width):
    """MergeState(bits=1.0) failed later inside torch.zeros; bits=True passed as a 1-bit code."""
    with pytest.raises(ValueError, match="MergeState: bits must be"):
        MergeState(bits=width)
    W = torch.randn(8, 16).bfloat16()
    W0 = W.clone()
    state = MergeState(bits=2)
    merge_(W, torch.randn(2, 16), torch.randn(8, 2), 1.0, state=state)
    assert state.bits == 2
    unmerge_(W, state=state)
    assert torch.equal(bits(W), bits(W0))


def test_cli_merge_of_a_float64_checkpoint(tmp_path, capsys):
    """A base saved in float64 (--dtype auto loads it so) crashed with a traceback from the merge
    kernel; now one line naming the module and --dtype, exit 1, and --dtype float32 merges it."""
    peft = pytest.importorskip("peft")
    from models import saved_peft, tiny_llama
    from transformers import AutoModelForCausalLM

    import lora_ext.__main__ as cli

    base, ad = tmp_path / "base64", tmp_path / "ad"
    tiny_llama(seed=0, layers=1, dtype=torch.float64).save_pretrained(base)
    saved_peft(tiny_llama(seed=0, layers=1), ad, 1, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    assert cli.main(["merge", str(base), str(ad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m lora_ext merge: error: module 'model.layers.0.self_attn.") and "float64" in err
    assert "--dtype" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()

    assert cli.main(["merge", str(base), str(ad), "--dtype", "float32", "--out", str(tmp_path / "o")]) == 0
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         ad).merge_and_unload()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert got.dtype == torch.float32
    ref_sd = ref.state_dict()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["merge", "merge_and_unload"])
def test_model_merge_refuses_a_float64_layer_before_any_weight_changes(how):
    """A float64 layer after a float32 one: the first was merged, then the kernel's error (naming no
    layer) left a half-merged model. Now ValueError naming the layer, nothing merged."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    lora_ext.inject(model, target_modules=["0", "2"], r=4, alpha=8)
    model[2].double()
    with torch.no_grad():
        model[0].lora_B.normal_()
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge: layer '2': its weight is torch.float64"):
        getattr(lora_ext, how)(model)
    assert not model[0].merged and torch.equal(model[0].weight, w0)
    assert isinstance(model[0], lora_ext.LoRALinear)


class Tied(nn.Module):
    """An embedding and an LM head sharing one table (GPT-2's wte / lm_head)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(8, 4), nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.emb(i))


@pytest.mark.parametrize("how", ["merge", "merge_and_unload"])
@pytest.mark.parametrize("delta", [20000.0, 12000.0])
def test_safe_merge_of_tied_layers_checks_their_sum(how, delta):
    """fp16 table 40000, each adapter adds `delta`: alone each stays finite, but both merge into the
    one tied weight. safe=True checked each layer against the table as it was and let the sum
    (80000 > 65504) through as inf; now it refuses exactly when the sequential merge overflows."""
    def model():
        m = Tied().half()
        with torch.no_grad():
            m.emb.weight.fill_(40000)
        lora_ext.inject(m, target_modules=["emb", "head"], r=1, alpha=1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora" in name:
                    p.fill_(delta if "_B" in name else 1.0)
        return m

    unsafe = model()
    lora_ext.merge(unsafe, allow_tied=True)
    overflows = not torch.isfinite(unsafe.emb.weight).all()
    assert overflows == (delta == 20000.0)
    m = model()
    w0 = m.emb.weight.detach().clone()
    if overflows:
        with pytest.raises(ValueError, match=r"layer 'head': merged after \['emb'\] .*inf/NaN"):
            getattr(lora_ext, how)(m, safe=True, allow_tied=True)
        assert torch.equal(m.emb.weight, w0) and not m.emb.merged and not m.head.merged
    else:
        getattr(lora_ext, how)(m, safe=True, allow_tied=True)
        assert torch.equal(m.emb.weight, unsafe.emb.weight)


def test_cli_safe_refuses_a_tied_share_merge_that_overflows_only_summed(tmp_path, capsys):
    """`--tied share --safe` with LoRA on both GPT-2 wte and lm_head: each delta alone fits fp16, their
    sum in the shared table does not. It was written (with a warning); now refused, nothing written."""
    peft = pytest.importorskip("peft")
    from models import tiny_gpt2

    import lora_ext.__main__ as cli

    g = tiny_gpt2(seed=0)
    with torch.no_grad():
        g.transformer.wte.weight.fill_(40000.0)
    g.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(g, peft.LoraConfig(task_type="CAUSAL_LM", r=1, lora_alpha=1,
                                                target_modules=["wte", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.fill_(20000.0 if "_B" in n else 1.0)
    pm.save_pretrained(tmp_path / "ad")
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "ad"), "--tied", "share", "--dtype", "float16"]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing to write non-finite weights" in err and "(tied) weight" in err, err
    assert not (tmp_path / "o").exists()
    assert cli.main([*argv, "--no-safe", "--out", str(tmp_path / "o2")]) == 0  # written, with a warning
    assert "warning: non-finite values in ['transformer.wte.weight']" in capsys.readouterr().err


def test_cli_merges_a_pickled_adapter_with_allow_pickle(tmp_path, capsys):
    """An older PEFT adapter (adapter_model.bin): the refusal told a CLI user to pass Adapter.load's
    allow_pickle=True, which the command had no way to take. Now --allow-pickle, same bits."""
    from models import saved_peft, tiny_llama
    from safetensors.torch import load_file

    import lora_ext.__main__ as cli

    base, ad, old = tmp_path / "base", tmp_path / "ad", tmp_path / "old"
    model = tiny_llama(seed=0, layers=1)
    model.save_pretrained(base)
    saved_peft(model, ad, 1, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    old.mkdir()
    (old / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    torch.save(load_file(ad / "adapter_model.safetensors"), old / "adapter_model.bin")

    assert cli.main(["merge", str(base), str(old), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing to unpickle" in err and "the CLI's merge / inspect: --allow-pickle" in err
    assert cli.main(["inspect", str(old)]) == 1 and "--allow-pickle" in capsys.readouterr().out
    assert cli.main(["inspect", str(old), "--allow-pickle"]) == 0 and "2 LoRA modules" in capsys.readouterr().out
    assert cli.main(["merge", str(base), str(old), "--allow-pickle", "--out", str(tmp_path / "o")]) == 0
    assert cli.main(["merge", str(base), str(ad), "--out", str(tmp_path / "ref")]) == 0
    got, ref = load_file(tmp_path / "o" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
