"""A user of `python -m lora_ext merge` / `inspect` with adapter and model directories made elsewhere
(PEFT's save_pretrained, older checkpoints, hand-edited configs, odd paths): regressions found by
using them. The CLI runs in-process (lora_ext.__main__.main); results are compared with PEFT."""
import json
import os

import pytest
import torch
from models import saved_peft, tiny_llama

import lora_ext.__main__ as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_cli")
    tiny_llama(seed=0, layers=1).save_pretrained(d / "llama")
    saved_peft(tiny_llama(seed=0, layers=1), d / "ad", 1, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    return d


def last_err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_seq_cls_head_merges_into_a_pytorch_model_bin_base(tmp_path):
    """An older base saved as pytorch_model.bin and a SEQ_CLS adapter whose modules_to_save holds a
    3-label head: num_labels was read only from safetensors checkpoints, so the model got 2 labels
    and the merge was refused; now it is taken from the saved head, and the logits are PEFT's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification as Cls

    base, ad = tmp_path / "base", tmp_path / "ad"
    tiny_llama(seed=0, layers=1).save_pretrained(base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    os.remove(base / "model.safetensors")
    model = Cls.from_pretrained(base, num_labels=3)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(ad)

    assert cli.main(["merge", str(base), str(ad), "--out", str(tmp_path / "o")]) == 0
    got = Cls.from_pretrained(tmp_path / "o").eval()
    assert got.config.num_labels == 3
    ref = peft.PeftModel.from_pretrained(Cls.from_pretrained(base, num_labels=3), ad).merge_and_unload().eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [5, ["x"], {"path": "x"}, True])
def test_base_model_name_or_path_of_another_type_names_the_file_and_key(dirs, tmp_path, capsys, value):
    """BASE omitted and a hand-edited base_model_name_or_path that is no string: was os.path.join's
    "expected str, bytes or os.PathLike object, not int", naming neither the file nor the key."""
    ad = tmp_path / "ad"
    ad.mkdir()
    cfg = json.loads((dirs / "ad" / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": value}))
    assert cli.main(["merge", str(ad), "--out", str(tmp_path / "o")]) == 1
    err = last_err(capsys)
    assert err.startswith(f"python -m lora_ext merge: error: {ad / 'adapter_config.json'}: "
                          "base_model_name_or_path must be a string"), err


def test_merge_of_a_directory_holding_several_adapters_names_them(dirs, tmp_path, capsys):
    """PEFT's save_pretrained of non-default adapters writes <dir>/<name>/; merge said only "not a PEFT
    adapter directory" (inspect named the subdirectories)."""
    for name in ("sql", "chat"):
        saved_peft(tiny_llama(seed=0, layers=1), tmp_path / "multi" / name, 2, target_modules=["q_proj"])
    multi = tmp_path / "multi"
    for argv in (["merge", str(dirs / "llama"), str(multi)], ["merge", str(multi)]):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--out", str(tmp_path / "o")])
        assert e.value.code == 2
        assert last_err(capsys).endswith(f"; adapters in its subdirectories: chat, sql (pass {multi / '<name>'})")


def test_a_file_given_for_a_directory_is_not_called_missing(dirs, capsys):
    """A user passing adapter_config.json / the weights file was told "no such directory"."""
    for argv in (["inspect", str(dirs / "ad" / "adapter_config.json")],
                 ["merge", str(dirs / "llama"), str(dirs / "ad" / "adapter_model.safetensors"), "--out", "o"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = last_err(capsys)
        assert "not a directory (pass the" in err and "no such directory" not in err, err


def test_out_that_cannot_be_created_is_a_usage_error_before_the_merge(dirs, tmp_path, capsys, monkeypatch):
    """--out under a file: the whole merge ran, then os.makedirs failed (exit 1); now a usage error
    (exit 2) before BASE is loaded, as the demo's --out."""
    import lora_ext.cli_merge as cm

    calls = []
    monkeypatch.setattr(cm, "run_merge", lambda args, base, adapters: calls.append(args) or 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", str(dirs / "llama"), str(dirs / "ad"), "--out", str(tmp_path / "file" / "sub" / "o")])
    assert e.value.code == 2 and calls == []
    assert last_err(capsys).endswith(f"argument --out: cannot create directory {tmp_path / 'file' / 'sub' / 'o'}: "
                                     f"Not a directory ({tmp_path / 'file'})")
    with pytest.raises(SystemExit) as e:  # (os.makedirs("") failed after the merge)
        cli.main(["merge", str(dirs / "llama"), str(dirs / "ad"), "--out", ""])
    assert e.value.code == 2 and calls == []
    assert last_err(capsys).endswith("argument --out: expected a directory path, got ''")
    assert cli.main(["merge", str(dirs / "llama"), str(dirs / "ad"), "--out", str(tmp_path / "new" / "o")]) == 0
    assert len(calls) == 1


def test_inspect_prints_regexes_and_paths_as_they_are_and_verdicts_on_one_line(tmp_path, capsys, monkeypatch):
    """rich markup ate "[qk]" of a target_modules regex and "[bold]" of a path (so the error named
    another file), and the verdict / error lines wrapped at 80 columns when piped."""
    monkeypatch.setenv("COLUMNS", "250")  # wide: the tables fit
    ad = tmp_path / "run[bold]1"
    saved_peft(tiny_llama(seed=0, layers=1), ad, 3, target_modules=r".*\.[qk]_proj")
    assert cli.main(["inspect", str(ad)]) == 0
    out = capsys.readouterr().out
    assert json.dumps(r".*\.[qk]_proj") in out and str(ad) in "".join(out.split()), out  # (the title wraps)
    assert "lora_ext: loads (Adapter.load, load_adapter) and merges (python -m lora_ext merge)\n" in out
    assert "AdapterPool: can serve it (max_rank >= 4, target_modules covering k_proj, q_proj)\n" in out

    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["o_proj"]}))
    monkeypatch.delenv("COLUMNS")  # piped: rich's 80 columns
    assert cli.main(["inspect", str(ad)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"lora_ext: cannot load this adapter: Adapter.load: {ad / 'adapter_config.json'}: "
                           "target_modules=['o_proj'] does not select module"), last
    assert last.endswith("fix the config or the weights"), last


def test_merge_prints_bracketed_paths_as_they_are(dirs, tmp_path, capsys, monkeypatch):
    """rich markup ate "[red]" of --out in the log and the table; the log lines wrapped at 80 columns."""
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the path
    out = tmp_path / "merged[red]"
    assert cli.main(["merge", str(dirs / "llama"), str(dirs / "ad"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"merged 2 module(s); writing {out}\n" in captured.err
    assert f"mergedmodel:{out}" in "".join(captured.out.split())  # (the table's title wraps)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("leaf", ["weight", "bias"])
def test_an_adapted_modules_tensor_without_base_layer_is_refused_not_loaded(dirs, tmp_path, capsys, leaf):
    """A file holding "<q_proj>.weight" (renamed from PEFT's "<q_proj>.base_layer.weight", or an older
    PEFT's layout) for a module it adapts: PeftModel.from_pretrained skips the key, lora_ext replaced
    the base weight with it (merged logits ~60% off PEFT's), silently. Now refused naming the key and
    PEFT's name; renamed to that, it loads as PEFT loads it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import lora_ext

    ad = tmp_path / "ad"
    saved_peft(tiny_llama(seed=0, layers=1), ad, 4, target_modules=["q_proj", "v_proj"],
               **({"bias": "lora_only"} if leaf == "bias" else {}))
    base = AutoModelForCausalLM.from_pretrained(dirs / "llama")
    if leaf == "bias":  # a q_proj with a bias to train
        base.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
        base.config.attention_bias = True
        base.save_pretrained(tmp_path / "base")
    tensors = load_file(ad / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    tensors = {k: t for k, t in tensors.items() if ".base_layer." not in k}
    tensors[f"base_model.model.{q}.{leaf}"] = torch.randn_like(getattr(base.get_submodule(q), leaf))
    save_file(tensors, ad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors holds {q}.{leaf}, but '{q}' has LoRA factors, "
                                         rf"so PEFT names its own {leaf} {q}.base_layer.{leaf} .* rename it to "
                                         rf"base_model.model.{q}.base_layer.{leaf}, or drop it"):
        lora_ext.Adapter.load(ad)
    assert cli.main(["inspect", str(ad)]) == 1
    assert f"holds {q}.{leaf}, but '{q}' has LoRA factors" in capsys.readouterr().out

    tensors[f"base_model.model.{q}.base_layer.{leaf}"] = tensors.pop(f"base_model.model.{q}.{leaf}")
    save_file(tensors, ad / "adapter_model.safetensors")
    ref = peft.PeftModel.from_pretrained(base, ad).eval()
    got = AutoModelForCausalLM.from_pretrained(dirs / "llama") if leaf == "weight" else \
        AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora_ext.load_adapter(got, lora_ext.Adapter.load(ad))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_a_broken_weights_link_is_named(dirs, tmp_path, capsys):
    """A hub-cache style adapter whose adapter_model.safetensors links to a missing blob: was "no
    adapter_model.safetensors in <dir>", while `ls` shows one."""
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text((dirs / "ad" / "adapter_config.json").read_text())
    os.symlink(tmp_path / "blobs" / "abc123", ad / "adapter_model.safetensors")
    assert cli.main(["inspect", str(ad)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"({ad / 'adapter_model.safetensors'} is a broken symbolic link to "
                         f"{tmp_path / 'blobs' / 'abc123'})"), last
