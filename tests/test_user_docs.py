"""What README.md and the CLI tell a user, checked against what the code does (the README's python
blocks run in tests/test_readme.py; these check its prose and the CLI's verdicts)."""
import argparse
import copy
import os
import re

import pytest
import torch
from models import tiny_qwen3_moe

import lora_ext
from lora_ext.__main__ import main
from lora_ext.cli_inspect import run_inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _long_options(argv, capsys) -> set[str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out)) - {"--help"}


@pytest.mark.parametrize("cmd", ["demo", "merge", "inspect", "bench"])
def test_every_cli_option_is_in_the_readme(cmd, capsys):
    """Each long option `python -m lora_ext <cmd> --help` lists is documented in README.md."""
    if cmd == "bench" and not os.path.exists(os.path.join(ROOT, "bench", "run.py")):
        pytest.skip("bench/ is part of the checkout")
    options = _long_options([cmd, "--help"], capsys)
    assert options, cmd
    missing = sorted(o for o in options if not re.search(rf"`{re.escape(o)}[` =]", README))
    assert not missing, f"python -m lora_ext {cmd}: options not in README.md: {missing}"


@pytest.fixture(scope="module")
def experts_adapter(tmp_path_factory):
    """A PEFT adapter on a tiny Qwen3-MoE's expert stacks whose rank_pattern tells gate_up_proj and
    down_proj apart: only the model says which nested factors are whose."""
    peft = pytest.importorskip("peft")
    base = tiny_qwen3_moe(seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"down_proj": 2},
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("experts") / "adapter"
    pm.save_pretrained(path)
    return base, pm.eval(), str(path)


def test_inspect_pool_verdict_holds_for_a_file_only_the_model_reads(experts_adapter, capsys, monkeypatch):
    """inspect's AdapterPool verdict on such a file is what the pool does: it serves it (AdapterPool.load
    reads it against its experts modules), each row as PEFT. inspect used to say mixed batches do not
    serve adapters on parameters; with --pool and a max_rank below the config's ranks it exits 1."""
    base, pm, path = experts_adapter
    monkeypatch.setenv("COLUMNS", "400")
    assert run_inspect(argparse.Namespace(adapter=path, pool=True, max_rank=64, allow_pickle=False)) == 0
    verdict = " ".join(capsys.readouterr().out.split()).partition("AdapterPool: ")[2]
    assert verdict.startswith("can serve it (max_rank >= 4,") and "mlp.experts.down_proj" in verdict, verdict
    assert run_inspect(argparse.Namespace(adapter=path, pool=True, max_rank=3, allow_pickle=False)) == 1
    assert "cannot serve it: rank 4 > max_rank 3" in " ".join(capsys.readouterr().out.split())

    model = copy.deepcopy(base)
    pool = lora_ext.AdapterPool(model, target_modules=["q_proj"], max_adapters=2, max_rank=8,
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pool.load("a", path)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pool.batch(["a", None]):
        got = model(ids).logits
    with torch.no_grad():
        want = pm(ids[:1]).logits[0]
        with pm.disable_adapter():
            want_base = pm(ids[1:]).logits[0]
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want_base, rtol=1e-5, atol=1e-5)


@pytest.fixture
def llama_dirs(tmp_path):
    """A tiny Llama saved with save_pretrained and a PEFT adapter made from it."""
    pytest.importorskip("peft")
    from models import saved_peft, tiny_llama

    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    saved_peft(base, tmp_path / "adapter", seed=1, target_modules=["q_proj", "up_proj"])
    return tmp_path / "base", tmp_path / "adapter"


def _merge_error(capsys, *args) -> str:
    """`python -m lora_ext merge ARGS` in process: a refusal (exit 1), one line, no traceback."""
    assert main(["merge", *map(str, args)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("python -m lora_ext merge: error: "), err
    return err[-1]


def test_merge_refuses_an_unreadable_base_in_one_line(llama_dirs, tmp_path, capsys):
    """A truncated checkpoint, or weights that do not fit config.json, used to end in a traceback
    (the latter's saying "look at the above report", which the command hides)."""
    base, adapter = llama_dirs
    import json
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(base, cut)
    data = (base / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _merge_error(capsys, cut, adapter, "--out", tmp_path / "m1")
    assert f"cannot load {cut}" in line, line
    assert not (tmp_path / "m1").exists()

    wrong = tmp_path / "wrong"
    shutil.copytree(base, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] // 2}))
    line = _merge_error(capsys, wrong, adapter, "--out", tmp_path / "m2")
    assert "do not fit its config.json" in line and "model.layers.0.mlp.down_proj.weight" in line, line
    assert not (tmp_path / "m2").exists()


def test_merge_names_an_adapter_config_that_is_not_json(llama_dirs, tmp_path, capsys):
    """BASE omitted and the adapter's config is not JSON: a refused adapter file (exit 1) saying so, as
    with BASE given (it used to be a usage error saying the config names no base_model_name_or_path)."""
    base, adapter = llama_dirs
    (adapter / "adapter_config.json").write_text("{oops")
    for args in ([adapter], [base, adapter]):
        line = _merge_error(capsys, *args, "--out", tmp_path / "m")
        assert "adapter_config.json is not valid JSON" in line, line
