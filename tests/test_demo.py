"""python -m lora_ext demo, shortened: the mixed batch must match the merged single-adapter models."""
import pytest

from lora_ext.demo import TASKS, run


def test_demo_runs_and_checks(tmp_path):
    r = run("cpu", steps=40, out_dir=str(tmp_path), show=False)
    assert r["max_rel_err"] < 1e-4
    assert set(r["adapters"]) == set(TASKS)
    for name, d in r["adapters"].items():
        assert (tmp_path / name / "adapter_config.json").exists()
        assert d["bytes"] * 10 < r["model_bytes"]
    assert r["pool_ms"] > 0 and r["loop_ms"] > 0


def test_demo_needs_a_step():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run("cpu", steps=0, show=False)
