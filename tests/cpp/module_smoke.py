"""Imports the CMake-built lora_ext._C (ctest: python_module) and runs lora_apply_ through torch.ops.

Usage: python module_smoke.py BUILD_DIR {cpu|cuda}, with PYTHONPATH=BUILD_DIR (set by ctest).
Checks that the module imported is the one in BUILD_DIR, that build_info reports the backends
the build was configured with, and one CPU call per dtype against an fp64 reference.
"""
import os
import sys

import torch

import lora_ext

build_dir, backend = os.path.realpath(sys.argv[1]), sys.argv[2]
so = os.path.realpath(lora_ext._C.__file__)
assert so.startswith(build_dir + os.sep), f"imported {so}, not the module built in {build_dir}"

info = lora_ext.ops.build_info()
assert info[0].startswith("cpu:") and any(i.startswith("cuda:") for i in info) == (backend == "cuda"), info

rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
g = torch.Generator().manual_seed(0)
for dtype, tol in rtol.items():
    x, A = torch.randn(37, 129, generator=g), torch.randn(5, 129, generator=g) / 129**0.5
    B, y = torch.randn(67, 5, generator=g) / 5**0.5, torch.randn(37, 67, generator=g)
    y, x, A, B = (t.to(dtype) for t in (y, x, A, B))
    ref = y.double() + 0.5 * (x.double() @ A.double().T) @ B.double().T
    torch.ops.lora_ext.lora_apply_(y, x, A, B, 0.5)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{dtype}: rel err {err}"
try:
    torch.ops.lora_ext.lora_apply_(y, x, A[:, :5], B, 0.5)
    raise AssertionError("bad shapes were accepted")
except RuntimeError as e:
    assert "A must be [r, in]" in str(e), e
print(f"ok: {so} {info}")
