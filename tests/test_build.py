"""Build tooling: the ptxas spill check and the CPU-only build decision."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ptxas_report  # noqa: E402

LOG = """ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90a'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16640 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3badPf' for 'sm_90a'
ptxas info    : Function properties for _Z3badPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_ptxas_report_flags_spills(tmp_path):
    (tmp_path / "k_kernels.o.ptxas").write_text(LOG)
    (tmp_path / "stale.o.ptxas").write_text(LOG.replace("bad", "old"))
    summary, spills = ptxas_report.summarise(str(tmp_path), {"k_kernels"})
    assert "sm_90a: 2 kernels, registers max 255, smem max 16640 B, spill bytes 8" in summary
    assert len(spills) == 1 and "bad" in spills[0] and "4 B spill stores" in spills[0]
    _, none = ptxas_report.summarise(str(tmp_path), {"nothing"})
    assert none == []


def test_cpu_only_build_says_why():
    env = dict(os.environ, LORA_EXT_CPU_ONLY="1")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lora_ext: CUDA kernels skipped: LORA_EXT_CPU_ONLY=1; building CPU kernels only" in out.stdout


def test_build_info_lists_backends():
    info = torch.ops.lora_ext.build_info.default()
    assert info[0].split(":")[0] == "cpu"
    assert info[0].split(":")[1] in ("avx512+bf16", "avx512", "avx2", "baseline")
    assert all(b.startswith("cuda:") for b in info[1:])


@pytest.mark.skipif(os.environ.get("LORA_EXT_CPU_ISA") is not None, reason="set by the caller")
def test_cpu_isa_env_caps_and_names_the_kernels():
    # LORA_EXT_CPU_ISA (read when lora_ext loads) caps the CPU kernels; build_info names those
    # picked; an unknown value is reported on stderr, not silently taken as the baseline.
    code = "import lora_ext; print(lora_ext.ops.build_info()[0])"
    def picked(isa):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LORA_EXT_CPU_ISA": isa},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip(), r.stderr
    assert picked("baseline")[0] == "cpu:baseline"
    best, _ = picked("avx512bf16")
    assert picked("avx2")[0] == ("cpu:baseline" if best == "cpu:baseline" else "cpu:avx2")
    out, err = picked("avx-512")
    assert out == best and "LORA_EXT_CPU_ISA=avx-512 is not one of" in err


def test_build_announces_files_and_time(monkeypatch):
    """setup.py's one line up front (pip hides build output unless -v): files, estimate, CPU-only hint."""
    import ast
    import glob

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    ns = {"os": os, "sys": sys}
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_build_plan"]
    exec(compile(ast.Module(fns, []), "setup.py", "exec"), ns)
    cpu = glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    cuda = cpu + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    n_cu = sum(p.endswith(".cu") for p in cuda)
    monkeypatch.setenv("MAX_JOBS", "2")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    line = ns["_build_plan"](cuda)
    assert f"compiling {len(cuda) - n_cu} C++ and {n_cu} CUDA files (2 arch(s))" in line
    assert "MAX_JOBS=2" in line and "LORA_EXT_CPU_ONLY=1" in line and "pip install -v" in line
    assert " min " in line
    assert "CPU kernels only" in ns["_build_plan"](cpu)


@pytest.mark.parametrize("src", ["multi_shrink_kernels.cu", "multi_expand_kernels.cu", "multi_kernels.cu",
                                 "lowrank_tc_kernels.cu"])
def test_tile_kernels_compile_for_pre_ampere(tmp_path, src):
    # README: a TORCH_CUDA_ARCH_LIST with 7.x builds, every multi_lora_ tile on the streaming path
    # and every lora_apply_ / lora_linear tile on CUDA cores.
    # The TF32 wmma fragments exist from sm_80 on: they were declared outside the arch guard, and
    # nvcc stopped with 'incomplete type "AccFrag"' for sm_75 (no GPU needed to see it).
    import build_config as cfg
    home = cfg.cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit")
    cmd = [os.path.join(home, "bin", "nvcc"), f"-std=c++{cfg.CXX_STANDARD}", "-O1", "--expt-relaxed-constexpr",
           "-gencode", "arch=compute_75,code=sm_75", "-c", os.path.join(ROOT, "csrc", "cuda", src),
           "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def test_import_does_not_load_dynamo():
    # `import lora_ext` stays light: Dynamo (and through it triton, whose import aborts under the
    # emulation harness's AddressSanitizer preload) loads only when something compiles
    code = "import sys, lora_ext; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_spills_fail_only_on_tuned_archs():
    spills = ["k1 [sm_90a]: 8 bytes spill stores", "k2 [sm_100]: 4 bytes spill stores"]
    fatal, warn = ptxas_report.gated(spills, ["sm_80", "sm_90", "sm_90a"])
    assert fatal == spills[:1] and warn == spills[1:]
    assert ptxas_report.gated(spills, ["sm_80"], strict=True) == (spills, [])


def test_sdist_carries_what_the_build_needs(tmp_path):
    # no MANIFEST.in: the sdist had no headers, no tools/build_config.py (setup.py imports it)
    import tarfile
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, LORA_EXT_CPU_ONLY="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "tools", "CMakeLists.txt"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not set(tracked) - names, sorted(set(tracked) - names)[:10]
