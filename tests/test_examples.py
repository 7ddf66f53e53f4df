"""The fine-tuning example: loss drops, the base stays bit-identical, the adapter is tiny."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finetune_example(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "examples", "finetune.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.train(steps=60, out_dir=str(tmp_path), show=False)
    assert r["last_loss"] < 0.9 * r["first_loss"], r
    assert r["base_params_changed"] == []
    assert r["adapter_bytes"] * 20 < r["model_bytes"]
    assert os.path.exists(r["adapter_file"])
