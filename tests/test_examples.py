"""The fine-tuning example: loss drops, the base stays bit-identical, the adapter is tiny."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import lora_ext

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


def test_finetune_script_saves_a_loadable_peft_adapter(tmp_path):
    """`python examples/finetune.py --out DIR` writes a PEFT adapter directory that lora_ext and
    PEFT both load, with the same logits."""
    out = tmp_path / "adapter"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "finetune.py"), "--steps", "3",
                        "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PEFT format" in r.stdout, r.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "examples", "finetune.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ad = lora_ext.Adapter.load(str(out))
    assert len(ad.layers) == 4 and all(w.r == 8 for w in ad.layers.values())
    assert any(w.B.abs().max() > 0 for w in ad.layers.values())  # trained: B moved away from 0
    ours = mod.make_model("cpu").eval()
    lora_ext.load_adapter(ours, ad)
    ids = mod.batch(2, 12, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = mod.make_model("cpu").eval()(input_ids=ids).logits
        logits = ours(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits)

    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(mod.make_model("cpu"), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_distributed_example_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 examples/distributed_finetune.py` (gloo on CPU): trains with
    FSDP2 and rank 0 writes an adapter that lora_ext loads."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "adapter"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), os.path.join(ROOT, "examples", "distributed_finetune.py"),
                        "--steps", "3", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert lora_ext.Adapter.load(str(out)).layers
