"""python -m lora_ext merge / inspect with LoRA on parameters (target_parameters, MoE expert stacks):
a tiny Qwen3-MoE saved with save_pretrained and PEFT adapters on its expert stacks; the CLI runs in a
subprocess, PEFT's merge_and_unload is the oracle. Helpers: tests/test_cli_merge.py."""
import pytest
from models import tiny_qwen3_moe
from test_cli_merge import cli, logits, one_error_line, peft_merged, plain_transformers_logits, randomize, rel

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-MoE on disk and PEFT adapters on its expert stacks: with q_proj, and alone with rsLoRA and
    rank / alpha patterns telling gate_up_proj and down_proj apart (only the model says which is which)."""
    d = tmp_path_factory.mktemp("cli_moe")
    tiny_qwen3_moe(seed=0).save_pretrained(d / "base")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    def adapter(name, seed, **cfg):
        pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(d / "base"), peft.LoraConfig(
            task_type="CAUSAL_LM", target_parameters=experts, **cfg))
        randomize(pm, seed)
        pm.save_pretrained(d / name)
        return d / name

    return {"base": d / "base", "mixed": adapter("mixed", 1, r=4, lora_alpha=8, target_modules=["q_proj"]),
            "patterns": adapter("patterns", 2, r=4, lora_alpha=8, target_modules=[], use_rslora=True,
                                rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 16})}


@pytest.mark.parametrize("name", ["mixed", "patterns"])
def test_merge_expert_stack_lora_equals_peft(moe, tmp_path, name):
    out = tmp_path / "merged"
    r = cli("merge", moe["base"], moe[name], "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{6 if name == 'mixed' else 4} modules" in r.stdout
    ref = logits(peft_merged(moe["base"], moe[name]))
    assert rel(plain_transformers_logits(out, tmp_path), ref) <= 1e-5
    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(load_file(moe["base"] / "model.safetensors"))
    assert not [k for k in keys if "lora" in k or "base_layer" in k]


def test_expert_stack_adapters_are_not_summed(moe, tmp_path):
    r = cli("merge", moe["base"], moe["mixed"], moe["mixed"], "--out", tmp_path / "m")
    one_error_line(r, 1, str(moe["mixed"]), "LoRA on parameters (target_parameters)", "alone and with weight 1")


def test_inspect_lists_parameter_layers_and_the_pool_serves_them(moe):
    r = cli("inspect", moe["mixed"], "--pool")
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.count("│") == 10]
    by_module = {row[0]: row for row in rows}
    up = by_module["model.layers.*.mlp.experts.base_layer"]
    assert up[1:5] == ["0-1", "parameter (decided by the model)", "64 → 64, 4 experts", "4"]
    assert by_module["model.layers.*.mlp.experts"][3] == "32 → 64, 4 experts"
    assert "target_parameters" in r.stdout and "mlp.experts.gate_up_proj" in r.stdout
    line = " ".join(r.stdout.split()).partition("AdapterPool: can serve it")[2]
    assert "target_parameters=" in line and "(MoE experts)" in line and "mlp.experts.gate_up_proj" in line
    r = cli("inspect", moe["patterns"])
    assert r.returncode == 0, r.stderr
    assert "loads and merges with the model only" in " ".join(r.stdout.split())
