"""`python -m lora_ext merge` / `inspect` (lora_ext/cli_merge.py, cli_inspect.py), run as a user runs them: tiny
Llama / GPT-2 models saved with save_pretrained, PEFT adapters saved with save_pretrained, the CLI in a
subprocess, the result loaded with plain transformers and compared with PEFT's merge_and_unload."""
import json
import os
import subprocess
import sys

import pytest
import torch
from models import tiny_gpt2, tiny_llama

import lora_ext
from lora_ext.ops import merge_

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, COLUMNS="200")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
INT16 = torch.int16


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lora_ext", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(r, code, *words):
    """A refusal: exit `code`, no traceback, the last stderr line is the error naming `words`."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"python -m lora_ext {r.args[3]}: error: "), r.stderr
    for w in words:
        assert w in last, (w, last)
    return last


def randomize(model, seed, scale=0.1, also=()):
    """Non-zero LoRA factors (and the named trained tensors), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or any(a in n for a in also):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def save_tokenizer(path):
    """A real (tiny) tokenizer, so the merged directory must load with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "a", "b", "c", "hello", "world"])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Base models and PEFT adapters on disk (adapters made from the saved bases, so their
    base_model_name_or_path is the base directory, as for a user's)."""
    d = tmp_path_factory.mktemp("cli_merge")
    llama, gpt2, llama16 = d / "llama", d / "gpt2", d / "llama_bf16"
    tiny_llama(seed=0).save_pretrained(llama)
    save_tokenizer(llama)
    gen = json.loads((llama / "generation_config.json").read_text())
    (llama / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 7, "do_sample": True,
                                                              "temperature": 0.3}))
    tiny_gpt2(seed=0).save_pretrained(gpt2)
    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(llama16)

    def adapter(name, base, seed, also=(), scale=0.1, **cfg):
        model = AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **cfg))
        randomize(pm, seed, scale, also)
        pm.save_pretrained(d / name)
        return d / name

    return {
        "llama": llama, "gpt2": gpt2, "llama_bf16": llama16, "root": d,
        # rsLoRA, rank/alpha patterns, an embedding LoRA (PEFT also saves the table)
        "patterns": adapter("patterns", llama, 1, r=4, lora_alpha=8, use_rslora=True,
                            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
        "second": adapter("second", llama, 2, r=6, lora_alpha=12, target_modules=["q_proj", "o_proj", "embed_tokens"]),
        # Conv1D (fan_in_fan_out), trained c_attn biases, modules_to_save on the tied lm_head
        "gpt2_ad": adapter("gpt2_ad", gpt2, 3, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                           fan_in_fan_out=True, bias="lora_only", modules_to_save=["lm_head"],
                           also=("c_attn.base_layer.bias", "modules_to_save")),
        "gpt2_wte": adapter("gpt2_wte", gpt2, 4, r=4, lora_alpha=8, target_modules=["wte", "c_fc"],
                            fan_in_fan_out=True),
        "bf16": adapter("bf16", llama16, 5, scale=0.01, r=8, lora_alpha=16,  # |ΔW| ~ 0.1 |W|, as trained
                        target_modules=["q_proj", "k_proj", "up_proj"]),
    }


def peft_merged(base, adapter, dtype=None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def plain_transformers_logits(out, tmp):
    """Loads `out` in a Python where lora_ext and peft cannot be imported; returns its logits."""
    code = ("import sys; sys.modules['lora_ext'] = sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"ids = torch.load({str(tmp / 'ids.pt')!r})\n"
            f"with torch.no_grad(): torch.save(m(input_ids=ids).logits, {str(tmp / 'out.pt')!r})\n")
    torch.save(IDS, tmp / "ids.pt")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return torch.load(tmp / "out.pt").double()


# ---------------------------------------------------------------- fp32: PEFT's merged model
def test_merge_llama_equals_peft_and_loads_without_lora_ext(dirs, tmp_path):
    out = tmp_path / "merged"
    r = cli("merge", dirs["llama"], dirs["patterns"], "--out", out)
    assert r.returncode == 0, r.stderr
    assert "7 modules" in r.stdout and "checked finite" in r.stdout  # the summary table
    ref = logits(peft_merged(dirs["llama"], dirs["patterns"]))
    got = plain_transformers_logits(out, tmp_path)
    assert rel(got, ref) <= 1e-5
    # a plain model: the base's keys, no LoRA or PEFT names
    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(load_file(dirs["llama"] / "model.safetensors"))
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    # tokenizer and generation settings taken over verbatim
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (dirs["llama"] / f).read_bytes(), f
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world a").input_ids == [4, 5, 1]
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7


def test_base_omitted_is_the_adapters_base(dirs, tmp_path):
    cfg = json.loads((dirs["patterns"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(dirs["llama"])
    r = cli("merge", dirs["patterns"], "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r2 = cli("merge", dirs["llama"], dirs["patterns"], "--out", tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a base named by a hub id (not a local directory) is refused: no downloads
    hub = tmp_path / "hub_adapter"
    hub.mkdir()
    (hub / "adapter_model.safetensors").write_bytes((dirs["patterns"] / "adapter_model.safetensors").read_bytes())
    (hub / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3-8B"}))
    r = cli("merge", hub, "--out", tmp_path / "c")
    one_error_line(r, 2, "'meta-llama/Llama-3-8B' is not a local model directory")


def test_gpt2_conv1d_biases_and_modules_to_save_on_the_tied_head(dirs, tmp_path):
    out = tmp_path / "merged"
    r = cli("merge", dirs["gpt2"], dirs["gpt2_ad"], "--out", out)
    assert r.returncode == 0, r.stderr
    ref_model = peft_merged(dirs["gpt2"], dirs["gpt2_ad"])
    got = plain_transformers_logits(out, tmp_path)
    assert rel(got, logits(ref_model)) <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(dirs["gpt2"])
    # the trained lm_head (modules_to_save) replaced the tied one: saved untied, wte unchanged
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
    assert torch.equal(merged.lm_head.weight, ref_model.lm_head.weight)
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.bias, base.transformer.h[0].attn.c_attn.bias)


def test_tied_embedding_lora_refused_untied_or_shared(dirs, tmp_path):
    r = cli("merge", dirs["gpt2"], dirs["gpt2_wte"], "--out", tmp_path / "x")
    one_error_line(r, 1, "'transformer.wte'", "'lm_head'", "--tied untie", "--tied share")
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    # share: both change, as PEFT's merge_and_unload
    r = cli("merge", dirs["gpt2"], dirs["gpt2_wte"], "--out", tmp_path / "share", "--tied", "share")
    assert r.returncode == 0, r.stderr
    shared = AutoModelForCausalLM.from_pretrained(tmp_path / "share")
    assert shared.lm_head.weight is shared.transformer.wte.weight
    assert rel(logits(shared), logits(peft_merged(dirs["gpt2"], dirs["gpt2_wte"]))) <= 1e-5
    # untie: the head keeps the base table, so the merged model computes what the adapter did
    r = cli("merge", dirs["gpt2"], dirs["gpt2_wte"], "--out", tmp_path / "untie", "--tied", "untie")
    assert r.returncode == 0, r.stderr
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "untie")
    assert not untied.config.tie_word_embeddings
    lora_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["gpt2"]), dirs["gpt2_wte"])
    want = logits(lora_model.eval())
    assert rel(logits(untied), want) <= 1e-5
    assert rel(logits(shared), want) > 1e-3  # sharing changes the head too


def test_task_type_picks_the_class_and_the_adapters_tokenizer(dirs, tmp_path):
    """A SEQ_CLS adapter on a causal-LM checkpoint: AutoModelForSequenceClassification, whose head
    (random in BASE) comes from the adapter's modules_to_save; the adapter's own tokenizer wins."""
    base = AutoModelForSequenceClassification.from_pretrained(dirs["llama"], num_labels=3)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert "score" in str(pm.peft_config["default"].modules_to_save)
    randomize(pm, 6, also=("score.modules_to_save",))
    ad = tmp_path / "cls"
    pm.save_pretrained(ad)
    (ad / "tokenizer_config.json").write_text('{"model_max_length": 99}')  # as a fine-tune's saved tokenizer
    out = tmp_path / "merged"
    r = cli("merge", dirs["llama"], ad, "--out", out)
    assert r.returncode == 0, r.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForSequenceClassification" and merged.config.num_labels == 3
    ref = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(dirs["llama"], num_labels=3),
                                         ad).merge_and_unload().eval()
    with torch.no_grad():
        assert rel(merged(input_ids=IDS[:1]).logits.double(), ref(input_ids=IDS[:1]).logits.double()) <= 1e-5
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 99}'
    assert not (out / "tokenizer.json").exists()  # BASE's tokenizer files are not mixed in
    # the same adapter without its head: the class would have a random score layer
    bare = lora_ext.Adapter.load(ad)
    bare.extra.clear()
    bare.save(tmp_path / "bare")
    one_error_line(cli("merge", dirs["llama"], tmp_path / "bare", "--out", tmp_path / "x"), 1,
                   "holds no weights for ['score.weight'] of LlamaForSequenceClassification")


# ---------------------------------------------------------------- several adapters: Σ wᵢ ΔWᵢ
def test_two_adapters_with_weights_are_the_weighted_sum(dirs, tmp_path):
    out = tmp_path / "merged"
    w = (0.7, -0.4)
    r = cli("merge", dirs["llama"], dirs["patterns"], dirs["second"], "--out", out, "--weights", *w)
    assert r.returncode == 0, r.stderr
    got = load_file(out / "model.safetensors")
    base = load_file(dirs["llama"] / "model.safetensors")
    ads = [lora_ext.Adapter.load(dirs[n]) for n in ("patterns", "second")]
    names = sorted(set(ads[0].layers) | set(ads[1].layers))
    assert len(names) == len(ads[0].layers) + len(ads[1].layers) - 3  # q_proj x2 layers, embed_tokens shared
    for name in names:
        items = [(a.layers[name], wi) for a, wi in zip(ads, w) if name in a.layers]
        emb = items[0][0].kind == "embedding"
        W0 = base[name + ".weight"]
        # the fp64 weighted sum (embeddings: ΔW is (B A)ᵀ, [num, dim])
        delta = sum(wi * lw.scale * (lw.B.double() @ lw.A.double()) for lw, wi in items)
        ref = W0.double() + (delta.T if emb else delta)
        assert rel(got[name + ".weight"].double(), ref) < 1e-6, name
        # and bit for bit merge_ of the lists (one pass, fp32 sum, rounded once)
        W = W0.clone()
        merge_(W, [lw.A for lw, _ in items], [lw.B for lw, _ in items], [wi * lw.scale for lw, wi in items],
               fan_in_fan_out=emb)
        assert torch.equal(got[name + ".weight"], W), name
    untouched = set(base) - {n + ".weight" for n in names}
    assert all(torch.equal(got[k], base[k]) for k in untouched)


def test_adapters_with_trained_tensors_are_not_summed(dirs, tmp_path):
    r = cli("merge", dirs["gpt2"], dirs["gpt2_ad"], dirs["gpt2_wte"], "--out", tmp_path / "x", "--tied", "untie")
    one_error_line(r, 1, str(dirs["gpt2_ad"]), "lm_head.weight", "merge such an adapter alone")


# ---------------------------------------------------------------- bf16: rounded once
def _round_to_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bf16 value nearest to each fp64 x, ties to even; the midpoint between x's two bf16 neighbours)."""
    c = x.float().bfloat16()  # within one bf16 step of x (fp64 -> fp32 -> bf16 may round twice)
    bits = c.view(INT16).int()
    cands = torch.stack([(bits + d).short().view(torch.bfloat16) for d in (-1, 0, 1)]).double()
    odd = torch.stack([(bits + d) & 1 for d in (-1, 0, 1)]).double()
    dist = (cands - x).abs()
    best = dist.min(0).values
    pick = torch.where(dist == best, odd, torch.inf).argmin(0)  # nearest; of two, the even one
    out = cands.gather(0, pick.unsqueeze(0))[0].bfloat16()
    lo = torch.where(cands <= x, cands, -torch.inf).max(0).values
    hi = torch.where(cands >= x, cands, torch.inf).min(0).values
    return out, (lo + hi) / 2


def test_bf16_merge_is_the_exactly_rounded_one(dirs, tmp_path):
    out = tmp_path / "merged"
    r = cli("merge", dirs["llama_bf16"], dirs["bf16"], "--out", out)  # --dtype auto: the base's bf16
    assert r.returncode == 0, r.stderr
    got = load_file(out / "model.safetensors")
    base = load_file(dirs["llama_bf16"] / "model.safetensors")
    ad = lora_ext.Adapter.load(dirs["bf16"])
    assert {lw.A.dtype for lw in ad.layers.values()} == {torch.float32}  # PEFT keeps fp32 factors
    peft_fp32 = peft_merged(dirs["llama_bf16"], dirs["bf16"]).state_dict()  # its factors: fp32
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["llama_bf16"]), dirs["bf16"])
    peft_bf16 = pm.to(torch.bfloat16).merge_and_unload().state_dict()  # the whole model in bf16
    ours = theirs = theirs16 = total = 0
    for name, lw in ad.layers.items():
        W0 = base[name + ".weight"]
        S = lw.scale * (lw.B.double() @ lw.A.double())
        x = W0.double() + S
        ref, mid = _round_to_bf16(x)
        # fp32 sums may fall on the other side of a rounding midpoint that x almost touches
        near_tie = (x - mid).abs() <= 2.0 ** -20 * (W0.double().abs() + lw.scale * (lw.B.double().abs() @ lw.A.double().abs()))
        mine = got[name + ".weight"]
        assert mine.dtype == torch.bfloat16
        differ = mine.view(INT16) != ref.view(INT16)
        assert not (differ & ~near_tie).any(), f"{name}: {int((differ & ~near_tie).sum())} elements not rounded once"
        ours += int(differ.sum())
        theirs += int((peft_fp32[name + ".weight"].view(INT16) != ref.view(INT16)).sum())
        theirs16 += int((peft_bf16[name + ".weight"].view(INT16) != ref.view(INT16)).sum())
        total += ref.numel()
    print(f"bf16 merge, elements off the fp64 reference rounded once: lora_ext {ours}, PEFT {theirs}, "
          f"PEFT in bf16 {theirs16} of {total}")
    # PEFT adds its fp32 ΔW into the bf16 weight (one rounding, like ours, up to near-ties); with bf16
    # factors (the model converted to bf16) it rounds ΔW to bf16 first: twice, visibly more often
    assert ours <= theirs and ours <= total // 10000
    assert theirs16 > 10 * max(ours, 1) and theirs16 > total // 1000, (ours, theirs, theirs16, total)


def test_conv_adapter_on_a_model_without_token_embeddings(tmp_path):
    """A time-series transformers model (Autoformer: no get_input_embeddings, transformers raises
    NotImplementedError; a circular-padded Conv1d trend_projection): a conv/linear adapter merges
    to PEFT's weights (the CLI used to die with a traceback in its tie check); one on the circular
    conv is refused naming the module and padding_mode, not as a non-finite merge (with or without
    --no-safe: no merge can fold it in)."""
    from transformers import AutoformerConfig, AutoformerForPrediction
    torch.manual_seed(0)
    cfg = AutoformerConfig(prediction_length=4, context_length=8, lags_sequence=[1, 2], d_model=8, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8,
                           decoder_ffn_dim=8, num_time_features=1, input_size=1)
    AutoformerForPrediction(cfg).save_pretrained(tmp_path / "base")
    for name, targets in (("ok", ["fc1", "out_proj"]), ("circular", ["trend_projection", "fc1"])):
        pm = peft.get_peft_model(AutoformerForPrediction.from_pretrained(tmp_path / "base"),
                                 peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4))
        randomize(pm, 7)
        pm.save_pretrained(tmp_path / name)
    r = cli("merge", tmp_path / "base", tmp_path / "ok", "--out", tmp_path / "out")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    want = peft.PeftModel.from_pretrained(AutoformerForPrediction.from_pretrained(tmp_path / "base"),
                                          tmp_path / "ok").merge_and_unload().state_dict()
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for extra in ((), ("--no-safe",)):
        r = cli("merge", tmp_path / "base", tmp_path / "circular", "--out", tmp_path / "no", *extra)
        last = one_error_line(r, 1, "module 'model.decoder.layers.0.trend_projection' cannot be merged",
                              "padding_mode='circular'")
        assert "non-finite" not in last
        assert not os.path.exists(tmp_path / "no" / "model.safetensors")


# ---------------------------------------------------------------- non-finite, refusals, argument errors
def test_non_finite_merge_refused_under_safe(dirs, tmp_path):
    big = tmp_path / "big"
    ad = lora_ext.Adapter.load(dirs["patterns"])
    for lw in ad.layers.values():
        lw.A.mul_(3000)  # |ΔW| ~ 1e6 > 65504, float16's largest
        lw.B.mul_(3000)
    ad.save(big)
    r = cli("merge", dirs["llama"], big, "--out", tmp_path / "x", "--dtype", "float16")
    one_error_line(r, 1, "refusing to write non-finite weights (--no-safe writes them)", "model.embed_tokens",
                   "overflow to inf/NaN")
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    r = cli("merge", dirs["llama"], big, "--out", tmp_path / "y", "--dtype", "float16", "--no-safe")
    assert r.returncode == 0 and "warning: non-finite values" in r.stderr, r.stderr
    w = load_file(tmp_path / "y" / "model.safetensors")
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert not torch.isfinite(w["model.layers.0.self_attn.q_proj.weight"]).all()


def test_adapter_base_mismatch_and_refused_adapter(dirs, tmp_path):
    r = cli("merge", dirs["llama"], dirs["gpt2_wte"], "--out", tmp_path / "x")
    one_error_line(r, 1, "load_adapter: the model has no module 'transformer.h.0.mlp.c_fc'")
    # DoRA (use_dora, once refused) merges alone as PEFT's merge_and_unload does; lora_bias is still refused
    dora = tmp_path / "dora"
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(dirs["llama"]),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    randomize(pm, 6)  # magnitudes too: g = m / ||W + sBA|| far from 1
    pm.save_pretrained(dora)
    r = cli("merge", dirs["llama"], dora, "--out", tmp_path / "y")
    assert r.returncode == 0, r.stderr
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "y"))
    assert rel(got, logits(peft_merged(dirs["llama"], dora))) <= 1e-5
    r = cli("inspect", dora)
    assert r.returncode == 0 and "use_dora" in r.stdout and "DoRA magnitudes" in r.stdout, r.stdout
    bias = tmp_path / "lora_bias"
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(dirs["llama"]),
                        peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)).save_pretrained(bias)
    one_error_line(cli("merge", dirs["llama"], bias, "--out", tmp_path / "z"), 1, "lora_bias", "not supported")
    r = cli("inspect", bias)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot load this adapter" in r.stdout and "lora_bias" in r.stdout


@pytest.fixture
def main_cli(monkeypatch):
    """__main__.main with the merge itself replaced by a recorder (argument checks only)."""
    import lora_ext.__main__ as m
    import lora_ext.cli_merge as cm

    calls = []
    monkeypatch.setattr(cm, "run_merge", lambda args, base, adapters: calls.append(args) or 0)
    return m.main, calls


@pytest.mark.parametrize("case", ["no_base", "no_adapter", "not_adapter", "dtype", "weights", "out", "no_gpu"])
def test_argument_errors_are_usage_errors(dirs, tmp_path, monkeypatch, capsys, main_cli, case):
    main, calls = main_cli
    llama, ad = str(dirs["llama"]), str(dirs["patterns"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv, want = {
        "no_base": ([str(tmp_path / "nope"), ad], f"{tmp_path / 'nope'}: no such directory"),
        "no_adapter": ([llama], f"no adapter given after BASE {llama}"),
        "not_adapter": ([llama, llama], f"{llama}: not a PEFT adapter directory"),
        "dtype": ([llama, ad, "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        "weights": ([llama, ad, "--weights", "1", "2"], "argument --weights: 2 weight(s) for 1 adapter(s)"),
        "out": ([llama, ad], f"argument --out: {tmp_path / 'full'} is not empty"),
        "no_gpu": ([llama, ad, "--device", "cuda"], "argument --device: cuda: no CUDA GPU is available"),
    }[case]
    out = tmp_path / "full" if case == "out" else tmp_path / "new"
    with pytest.raises(SystemExit) as e:
        main(["merge", *argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m lora_ext merge: error: ") and want in err[-1], err
    assert calls == []


def test_weights_must_be_finite_numbers(dirs, capsys, main_cli):
    main, calls = main_cli
    for bad in ("nan", "x", "inf"):
        with pytest.raises(SystemExit):
            main(["merge", str(dirs["llama"]), str(dirs["patterns"]), "--out", "o", "--weights", bad])
        assert f"argument --weights: expected a finite number, got '{bad}'" in capsys.readouterr().err
    assert calls == []


# ---------------------------------------------------------------- inspect
def test_inspect_names_targets_ranks_and_scales(dirs):
    r = cli("inspect", dirs["patterns"])
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.count("│") == 10]
    by_module = {row[0]: row for row in rows}
    # rsLoRA: scale = alpha / sqrt(r); rank_pattern down_proj -> 2, alpha_pattern v_proj -> 3
    assert by_module["model.layers.*.mlp.down_proj"][1:5] == ["0-1", "linear", "128 → 64", "2"]
    assert float(by_module["model.layers.*.mlp.down_proj"][6]) == pytest.approx(8 / 2 ** 0.5, rel=1e-5)
    assert by_module["model.layers.*.self_attn.v_proj"][4:6] == ["4", "3"]
    assert float(by_module["model.layers.*.self_attn.v_proj"][6]) == pytest.approx(3 / 2, rel=1e-5)
    assert by_module["model.layers.*.self_attn.q_proj"][4:6] == ["4", "8"]
    assert by_module["model.embed_tokens"][2:5] == ["embedding", "128 → 64", "4"]
    ad = lora_ext.Adapter.load(dirs["patterns"])
    assert f"{sum(w.A.numel() + w.B.numel() for w in ad.layers.values()):,}" in r.stdout
    assert '"0.21' in r.stdout or f'"{peft.__version__}"' in r.stdout  # peft_version
    assert "AdapterPool: can serve it" in r.stdout


def test_inspect_pool_verdict(dirs):
    r = cli("inspect", dirs["gpt2_ad"])
    assert r.returncode == 0, r.stderr  # loads and merges
    assert "modules_to_save" in r.stdout and "trained bias" in r.stdout
    assert "AdapterPool: cannot serve it" in r.stdout and "lm_head.weight" in r.stdout
    r = cli("inspect", dirs["gpt2_ad"], "--pool")
    assert r.returncode == 1
    r = cli("inspect", dirs["bf16"], "--pool", "--max-rank", "4")
    assert r.returncode == 1 and "rank 8 > max_rank 4" in r.stdout
