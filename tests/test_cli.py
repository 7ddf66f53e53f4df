"""`python -m lora_ext info` / `bench --help`, and the benchmarks' shared timing report."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lora_ext
from lora_ext.__main__ import _arch_names, _cubins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import common  # noqa: E402

ENV = dict(os.environ, COLUMNS="200")


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "lora_ext", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- info: archs vs cubins
def test_arch_names_follow_the_cubins():
    # __CUDA_ARCH_LIST__ holds compute capabilities only: 9.0a is 900 there, sm_90a in the binary
    assert _arch_names("800,900", ["sm_80", "sm_90a"]) == ["sm_80", "sm_90a"]
    assert _arch_names("800,900", []) == ["sm_80", "sm_90"]  # no cuobjdump
    assert _arch_names("1000,1200", ["sm_100f", "sm_120a"]) == ["sm_100f", "sm_120a"]
    assert _arch_names("900", ["sm_90", "sm_90a"]) == ["sm_90", "sm_90a"]
    assert _arch_names("800", ["sm_86"]) == ["sm_80"]  # compute_80 -> sm_86: the cubins row differs
    assert _arch_names("unknown", []) == ["unknown"]


def test_info_archs_and_cubins_agree():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    rows = {m.group(1).strip(): m.group(2).strip()
            for m in re.finditer(r"│ ([^│]+?)\s*│ ([^│]*?)\s*│", r.stdout)}
    assert rows["version"] == lora_ext.__version__
    cuda = next((b.split(":", 1)[1] for b in lora_ext.ops.build_info() if b.startswith("cuda:")), None)
    if cuda is None:
        assert rows["CUDA archs"] == "-"
        return
    cubins = _cubins(lora_ext._C.__file__)
    archs = rows["CUDA archs"].split(" (")[0].split(", ")
    if cubins:
        assert sorted(archs) == sorted(cubins), (rows, cubins)
        assert "CUDA cubins" not in rows  # only shown when it says something else
    else:
        assert archs == [f"sm_{int(a) // 10}" for a in cuda.split(",")]


# ---------------------------------------------------------------- bench --help
def test_bench_help_names_the_command():
    r = _run("bench", "--help")
    assert r.returncode == 0, r.stderr
    usage = r.stdout.splitlines()[0]
    assert usage.startswith("usage: python -m lora_ext bench "), usage
    assert "run.py" not in usage
    assert "--only" in r.stdout


def test_benchmark_parsers_name_their_file():
    assert common.arg_parser("merge").format_usage().startswith("usage: bench_merge.py ")


# ---------------------------------------------------------------- min / median / max
def test_timing_is_the_median_with_min_and_max():
    t = common.Timing.of([3.0, 1.0, 2.0, 10.0, 2.5])
    assert t == 2.5 and (t.min, t.max, t.n) == (1.0, 10.0, 5) and t.spread == 10.0
    assert isinstance(2 * t, float) and 5.0 / t == 2.0  # arithmetic as on the old float result
    b = common.best_of([common.Timing.of([2, 3, 4]), common.Timing.of([1.5, 2, 9])])
    assert (float(b), b.min, b.max, b.n) == (2.0, 1.5, 9, 6)
    calls = []
    ft = common.time_fn(lambda: calls.append(1), warmup=1, reps=5)
    assert isinstance(ft, common.Timing) and ft.n == 5 and ft.min <= ft <= ft.max and len(calls) == 6


def test_time_graph_is_time_fn_off_cuda():
    calls = []
    t = common.time_graph(lambda: calls.append(1), "cpu", calls=10, reps=5, warmup=2)
    assert isinstance(t, common.Timing) and t.n == 5 and len(calls) == 7  # no capture, no /calls


def test_interleaved_runs_and_per_run_ratios():
    order = []
    t = common.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=3, warmup=1)
    # warmup, then each run times every variant once, run i starting at variant i mod 2
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in t.values()] == [3, 3]
    r = common.ratios({"x": [2.0, 6.0, 3.0], "base": [1.0, 2.0, 3.0]}, "x", "base")
    assert (float(r), r.min, r.max, r.n) == (2.0, 1.0, 3.0, 3)


def test_table_prints_spread_and_warns(capsys):
    calm = common.Timing(1.0, 0.9, 1.2, 11)
    noisy = common.Timing(2.0, 1.0, 3.0, 11)
    common.table("t", [{"T": 1, "ours_ms": calm, "speedup": 1.5}])
    out = capsys.readouterr().out
    assert "1 (0.9–1.2)" in out and "median (min–max)" in out and "warning" not in out
    common.table("t", [{"T": 1, "ours_ms": calm}, {"T": 64, "ours_ms": noisy}])
    out = capsys.readouterr().out
    assert "2 (1–3) !" in out
    assert re.search(r"warning: 1 timing\(s\) in 't' vary by more than 1\.5x", out), out
    assert "ours_ms [T=64]: min 1 / median 2 / max 3 ms" in out


def test_saved_json_keeps_fields_and_adds_min_max(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    path = common.save("x", [{"T": 1, "ours_ms": common.Timing(2.0, 1.0, 3.0, 5), "speedup": 1.5}])
    with open(path) as f:
        row = json.load(f)["rows"][0]
    assert row == {"T": 1, "ours_ms": 2.0, "ours_ms_min": 1.0, "ours_ms_max": 3.0, "speedup": 1.5}


@pytest.mark.parametrize("name", sorted(f[6:-3] for f in os.listdir(os.path.join(ROOT, "bench"))
                                        if f.startswith("bench_") and f.endswith(".py")))
def test_every_benchmark_times_with_the_shared_helper(name):
    """Each bench_*.py times through bench.common.time_fn, time_graph or interleaved and prints through its
    table/cli (so every figure shows min/median/max and noisy ones are flagged), with no timer of
    its own."""
    with open(os.path.join(ROOT, "bench", f"bench_{name}.py")) as f:
        src = f.read()
    assert any(f in src for f in ("time_fn(", "time_graph(", "interleaved(")) and ("cli(" in src or "table(" in src), name
    assert "statistics.median" not in src and "elapsed_time" not in src, name


def test_cli_without_rich_says_which_extra(monkeypatch, capsys):
    # rich/tqdm are the `cli` extra: without them the CLI names the extra instead of a traceback
    import sys

    from lora_ext.__main__ import main
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert main(["info"]) == 2
    assert "pip install 'lora_ext[cli]'" in capsys.readouterr().err


# ---------------------------------------------------------------- GPU validation helpers
def test_goals_table_pass_fail_missing(tmp_path):
    from bench import goals

    doc = {"benchmark": "multi_lora", "device": "GPU", "torch": "t", "date": "d", "rows": [
        {"T": 1, "r": 16, "case": "distinct", "%roofline": 80.0, "vs_loop": 2.0, "vs_bmm": 9.0},
        {"T": 8192, "r": 16, "case": "prefill 8 adapters", "vs_loop": 3.0, "x_single": 1.4}]}
    lin = {"benchmark": "lora_linear", "rows": [{"impl": "lora_ext LoRALinear", "x base": 1.02,
                                                  "x base_min": 0.9, "x base_max": 1.2}]}
    (tmp_path / "a.json").write_text(json.dumps([doc, lin]))
    res = {r["goal"]: r for r in goals.evaluate(goals.load([str(tmp_path)]))}
    assert res["multi_lora_ decode T=1: % of copy-bandwidth roofline"]["status"] == "pass"
    assert res["multi_lora_ decode T=1: x faster than the loop over adapters"]["status"] == "FAIL"
    assert res["multi_lora_ decode T=16: x faster than gather + bmm"]["status"] == "missing"
    assert res["multi_lora_ prefill T=8192, 8 adapters: x faster than the loop of GEMMs"]["status"] == "pass"
    assert res["multi_lora_ prefill T=8192, 8 adapters: x one adapter's addmm pair"]["status"] == "FAIL"
    r = res["LoRALinear fwd+bwd: x the frozen base layer"]
    assert r["status"] == "pass" and r["range"] == [0.9, 1.2]
    md = goals.markdown(list(res.values()), goals.load([str(tmp_path)]))
    assert "| multi_lora_ decode T=1: x faster than the loop over adapters | 2 |  | >= 3 | 0.667 | FAIL |" in md


def test_sanitize_cases_dry_run_on_cpu():
    # the program gpu_check.sh runs under compute-sanitizer, here CPU against CPU: it must reach
    # every op with valid arguments (CUDA-only parts: out-of-range indices, the bad-index count)
    env = dict(ENV, LORA_EXT_SANITIZE_DEVICE="cpu")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sanitize_cases.py"), "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"sanitize_cases: \d{3} cpu results checked against the CPU kernels, 0 differ", p.stdout)


# ---------------------------------------------------------------- option checks: a message, not a traceback
@pytest.fixture
def cli(monkeypatch):
    """main() with demo.run and bench() replaced by recorders: returns (main, calls)."""
    import lora_ext.__main__ as m
    import lora_ext.demo

    calls = []
    monkeypatch.setattr(lora_ext.demo, "run", lambda *a: calls.append(("demo", *a)))
    monkeypatch.setattr(m, "bench", lambda argv: calls.append(("bench", argv)) or 0)
    return m.main, calls


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--stpes", "0"], ["demo", "extra"], ["info", "--bogus"]])
def test_unknown_options_are_errors(cli, capsys, argv):
    main, calls = cli
    err = _usage_error(main, argv, capsys)
    assert f"python -m lora_ext {argv[0]}: error: unrecognized arguments: {' '.join(argv[1:])}" in err
    assert calls == []


def test_bench_passes_its_options_on(cli):
    main, calls = cli
    assert main(["bench", "--only", "merge", "--device", "cpu", "--quick"]) == 0
    assert calls == [("bench", ["--only", "merge", "--quick", "--device", "cpu"])]


@pytest.mark.parametrize("steps", ["0", "-3", "x"])
def test_demo_steps_must_be_positive(cli, capsys, steps):
    main, calls = cli
    assert f"argument --steps: expected an integer >= 1, got '{steps}'" in _usage_error(
        main, ["demo", "--steps", steps], capsys)
    assert calls == []


@pytest.mark.parametrize("cmd", ["demo", "bench"])
def test_device_cuda_without_gpu(cli, capsys, monkeypatch, cmd):
    main, calls = cli
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "argument --device: cuda: no CUDA GPU is available" in _usage_error(main, [cmd, "--device", "cuda"], capsys)
    assert "argument --device: expected cpu, cuda or cuda:N, got 'gpu'" in _usage_error(
        main, [cmd, "--device", "gpu"], capsys)
    assert calls == []


def test_demo_out_is_a_directory(cli, capsys, tmp_path):
    main, calls = cli
    (tmp_path / "file").write_text("")
    assert f"argument --out: cannot create directory {tmp_path / 'file'}: File exists" in _usage_error(
        main, ["demo", "--out", str(tmp_path / "file")], capsys)
    assert calls == []
    assert main(["demo", "--out", str(tmp_path / "new" / "dir")]) == 0  # created if missing
    assert (tmp_path / "new" / "dir").is_dir() and calls == [("demo", None, 150, str(tmp_path / "new" / "dir"))]


def test_demo_out_not_created_when_another_argument_is_bad(cli, capsys, tmp_path):
    main, calls = cli
    out = tmp_path / "new" / "dir"
    assert "argument --steps: expected an integer >= 1, got '0'" in _usage_error(
        main, ["demo", "--out", str(out), "--steps", "0"], capsys)
    assert not (tmp_path / "new").exists() and calls == []
    (tmp_path / "file").write_text("")
    assert f"cannot create directory {tmp_path / 'file' / 'x'}: Not a directory" in _usage_error(
        main, ["demo", "--out", str(tmp_path / "file" / "x")], capsys)
