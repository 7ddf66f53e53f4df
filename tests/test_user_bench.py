"""The benchmarks' command line and helpers (bench/run.py, bench/common.py): no timing assertions,
nothing is measured (the benchmark modules are replaced by recorders)."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common, run  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    """bench.run.main with every bench_<name> module replaced by one that records its argv."""
    calls = []

    def fake_import(name):
        assert name.startswith("bench.bench_"), name
        return types.SimpleNamespace(main=lambda argv, n=name[len("bench.bench_"):]: calls.append((n, argv)))

    monkeypatch.setattr(run.importlib, "import_module", fake_import)
    return calls


def test_bare_only_is_a_usage_error_not_the_full_suite(recorded, capsys):
    # `--only` with no names used to run every benchmark at full size and overwrite bench/results/
    with pytest.raises(SystemExit) as e:
        run.main(["--only"])
    assert e.value.code == 2
    assert recorded == []
    assert "--only" in capsys.readouterr().err


def test_only_runs_just_the_named_benchmarks(recorded):
    assert run.main(["--device", "cpu", "--quick", "--only", "merge", "roofline"]) == 0
    assert recorded == [("merge", ["--device", "cpu", "--quick"]), ("roofline", ["--device", "cpu", "--quick"])]


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as seen with 2 GPUs; set_device records its argument."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


def test_cuda_index_selects_the_gpu_and_runs_the_cuda_cases(two_gpus):
    # the benchmarks pick their CUDA sizes, dtypes and CUDA-graph timing by device == "cuda";
    # "cuda:1" used to get the CPU cases (and CUDA events on device 0) silently
    assert common.arg_parser("merge").parse_args(["--device", "cuda:1"]).device == "cuda"
    assert two_gpus == [torch.device("cuda:1")]
    assert common.bench_device("cuda") == "cuda" and common.bench_device("cpu") == "cpu"
    assert two_gpus == [torch.device("cuda:1")]


def test_run_passes_cuda_on_after_selecting_the_gpu(two_gpus, recorded):
    assert run.main(["--device", "cuda:1", "--quick", "--only", "lora_apply"]) == 0
    assert two_gpus == [torch.device("cuda:1")]
    assert recorded == [("lora_apply", ["--device", "cuda", "--quick"])]


@pytest.mark.parametrize("bad", ["gpu", "cuda:2", "cuda:x", "cpu:0"])
def test_bad_device_is_a_usage_error(two_gpus, bad, capsys):
    with pytest.raises(SystemExit) as e:
        common.arg_parser("merge").parse_args(["--device", bad])
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err
    assert two_gpus == []


def test_merge_roofline_uses_the_faster_way_to_stream_w():
    # 8x8 fp32 W (256 bytes) read and written, A [2, 8] and B [8, 2] read: 640 bytes. The floor is
    # at the bandwidth of the faster reference: on a CPU W.copy_ also reads its destination, so a
    # copy-only floor was slower than merge_ itself (merge-cpu.json: 138% of "roofline")
    from bench.bench_merge import roofline

    W, A, B = torch.zeros(8, 8), torch.zeros(2, 8), torch.zeros(8, 2)
    assert roofline(W, A, B, t_copy=2.0, t_pass=1.0) == (640, pytest.approx(1.25))
    assert roofline(W, A, B, t_copy=1.0, t_pass=2.0) == (640, pytest.approx(1.25))
    nbytes, ms = roofline(W.bfloat16(), A.bfloat16(), B.bfloat16(), t_copy=1.0, t_pass=1.0)
    assert (nbytes, ms) == (320, pytest.approx(1.25))


def test_interleaved_rotates_which_variant_goes_first():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = common.interleaved(fns, "cpu", runs=3, warmup=1)
    assert order[:3] == list("abc")  # warm-up
    assert order[3:] == list("abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}  # run i of each, by name
    assert common.ratios({"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 3.0]}, "a", "b") == common.Timing.of([2.0, 3.0, 1.0])


def test_multi_lora_bandwidth_is_the_faster_of_copy_and_in_place_pass(monkeypatch):
    # copy_ alone undercounts a CPU's traffic (its stores read the destination first), and the
    # source was an untouched torch.empty (zero pages); the roofline takes the faster reference
    from bench import bench_multi_lora as ml

    seen = []

    def fake_time_fn(fn, device="cpu", **kw):
        fn()
        seen.append(fn)
        return common.Timing(2.0 if len(seen) <= 3 else 1.0)  # 3 copy rounds, then 3 pass rounds

    monkeypatch.setattr(ml, "time_fn", fake_time_fn)
    n = 1 << 25
    assert ml.copy_bandwidth("cpu") == pytest.approx(2 * n / 1.0 / 1e6)
    assert len(seen) == 6
    src = seen[0].__closure__  # the copy's source holds data (not zero pages) and the pass kept it
    a = next(c.cell_contents for c in src if c.cell_contents.dtype == torch.uint8 and c.cell_contents[0] == 1)
    assert int(a[: 1 << 12].min()) == 1


@pytest.mark.parametrize("content", [None, "not json"])
def test_goals_names_a_missing_or_unreadable_result_file(tmp_path, capsys, content):
    from bench import goals

    path = tmp_path / "bench-h200.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:  # was a traceback (FileNotFoundError / JSONDecodeError)
        goals.main([str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("no such file" in err if content is None else "not a readable JSON" in err)


def test_goals_says_when_no_results_were_found(tmp_path, capsys):
    from bench import goals

    assert goals.main([str(tmp_path)]) == 0  # the table (all missing) is still printed
    out, err = capsys.readouterr()
    assert "0 pass, 0 fail" in out and "no benchmark results in" in err


def test_a_results_folder_that_cannot_be_made_is_a_usage_error_before_any_run(recorded, tmp_path, monkeypatch,
                                                                            capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(common, "RESULTS", str(afile))  # $LORA_EXT_BENCH_OUT=afile: failed at the first save
    with pytest.raises(SystemExit) as e:
        run.main(["--device", "cpu", "--only", "roofline"])
    assert e.value.code == 2 and recorded == []
    assert "LORA_EXT_BENCH_OUT" in capsys.readouterr().err
    assert run.main(["--device", "cpu", "--quick", "--only", "roofline"]) == 0  # --quick saves nothing
    from bench import bench_multi_lora

    with pytest.raises(SystemExit) as e:
        bench_multi_lora.main(["--out", str(afile / "sub")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_merge_inference_times_the_three_models_interleaved(monkeypatch):
    # the merged/base ratio came from medians timed one model after the other (merge-cpu.json:
    # 0.89 and 1.23 for the same work); now per-run ratios of interleaved runs
    from bench import bench_merge

    outs = {}

    def fake_interleaved(fns, device="cpu", runs=30, warmup=2):
        assert list(fns) == ["base", "lora", "merged"]
        for k, fn in fns.items():
            outs[k] = fn()
        return {"base": [1.0, 2.0, 4.0], "lora": [1.5, 2.0, 4.0], "merged": [2.0, 2.0, 2.0]}

    monkeypatch.setattr(bench_merge, "interleaved", fake_interleaved)
    rows = bench_merge.bench_inference("cpu", quick=True)
    assert len(rows) == 4
    r = rows[0]
    assert (float(r["merged/base"]), r["merged/base"].min, r["merged/base"].max) == (1.0, 0.5, 2.0)
    assert float(r["lora/base"]) == 1.0 and float(r["merged_ms"]) == 2.0
    assert not torch.equal(outs["merged"], outs["base"])  # the merged model holds the adapter...
    torch.testing.assert_close(outs["merged"], outs["lora"], rtol=2e-2, atol=2e-2)  # ...as the LoRA model


def test_ncu_cases_run_on_small_shapes():
    # bench/ncu_cases.py runs only on a lent GPU: an error there costs device time, so every
    # case runs here first (CPU, small shapes; the cuBLAS-halves case takes the CPU kernels)
    from bench import ncu_cases

    names = []
    for name, call in ncu_cases.cases("cpu", h=256, big=64):
        call()
        names.append(name)
    assert len(names) == len(set(names)) == 9
    assert "LORA_EXT_CUDA_BLAS" not in os.environ
