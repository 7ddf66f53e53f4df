"""Builds and loads the emulated CUDA build (csrc/cuda/emu): the very same csrc/cuda sources, compiled
by the host C++ compiler against the emulation header, as torch ops ``torch.ops.lora_ext_emu.*`` on
CPU tensors. Built on demand into build/emu/<hash of sources and flags> (cached), with
AddressSanitizer unless LORA_EXT_EMU_ASAN=0 (then the process must preload libasan: see
tests/test_emulation.py, which runs this suite in such a subprocess).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.utils.cpp_extension as cpp

import lora_ext  # noqa: F401  (the real ops: their schemas are copied)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
ASAN = os.environ.get("LORA_EXT_EMU_ASAN", "1") != "0"

KERNELS = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) + [
    os.path.join(ROOT, "tests", "emu", "planted.cu")]
RUNTIME = os.path.join(CSRC, "cuda", "emu", "runtime.cpp")
GLUE = os.path.join(CSRC, "cuda", "emu", "glue.cpp")

COMMON = ["-std=c++20", "-fPIC", "-g0", "-DLORA_EXT_EMU", "-I" + os.path.join(CSRC, "cuda", "emu", "include"),
          "-I" + CSRC, "-Wno-unused-function", "-Wno-ignored-attributes"]
SAN = ["-fsanitize=address", "-fsanitize-recover=address", "-fno-omit-frame-pointer"] if ASAN else []


def launch_sites() -> list[str]:
    """Every LORA_EXT_LAUNCH call in csrc/cuda/*.cu, as 'file.cu:line'."""
    sites = []
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if "LORA_EXT_LAUNCH(" in line and "#define" not in line:
                    sites.append(f"{os.path.basename(path)}:{i}")
    return sites


def _jobs():
    torch_inc = cpp.include_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    jobs = []
    for src in KERNELS:
        jobs.append((src, ["-x", "c++", "-O1", "-DLORA_EXT_EMU_DEVICE"] + SAN))
    jobs.append((RUNTIME, ["-O2"]))
    jobs.append((GLUE, ["-O1", abi, "-I" + sysconfig.get_paths()["include"]] +
                 [f"-I{p}" for p in torch_inc]))
    return jobs


def _digest(jobs) -> str:
    h = hashlib.sha256()
    files = sorted(set(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)) | set(KERNELS))
    for path in files:
        if os.path.isfile(path):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(repr((jobs, COMMON, SAN, torch.__version__)).encode())
    return h.hexdigest()[:16]


def build() -> str:
    """Compiles (if not cached) and returns the path of the emulated library."""
    jobs = _jobs()
    out = os.path.join(ROOT, "build", "emu", _digest(jobs))
    lib = os.path.join(out, "lora_ext_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out, exist_ok=True)

    def compile_one(job):
        src, flags = job
        obj = os.path.join(out, os.path.basename(src) + ".o")
        cmd = ["g++"] + COMMON + flags + ["-c", src, "-o", obj]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulated build failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        objs = list(pool.map(compile_one, jobs))
    libdirs = cpp.library_paths()
    cmd = (["g++", "-shared", "-o", lib + ".tmp"] + objs + SAN + [f"-L{d}" for d in libdirs] +
           [f"-Wl,-rpath,{d}" for d in libdirs] + ["-lc10", "-ltorch_cpu"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulated link failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
    os.replace(lib + ".tmp", lib)
    return lib


class Emu:
    """The loaded emulated build: ops in ``torch.ops.lora_ext_emu``, plus its controls."""

    def __init__(self):
        self._lib = torch.library.Library("lora_ext_emu", "DEF")
        for full in sorted(torch._C._dispatch_get_all_op_names()):
            if full.startswith("lora_ext::") and full != "lora_ext::build_info":
                name, _, overload = full.partition(".")
                self._lib.define(str(torch._C._get_schema(name, overload)).split("::", 1)[1])
        path = build()
        torch.ops.load_library(path)
        self.c = ctypes.CDLL(path)
        self.c.lora_ext_emu_configure.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        self.c.lora_ext_emu_sites.restype = ctypes.c_char_p
        self.c.lora_ext_emu_take_errors.restype = ctypes.c_char_p
        self.c.lora_ext_emu_planted.argtypes = [ctypes.c_char_p]
        self.c.lora_ext_emu_planted.restype = ctypes.c_char_p
        self.ops = torch.ops.lora_ext_emu
        self.configure()

    def configure(self, schedule: int = 0, sms: int = 132, cc: int = 90) -> None:
        """schedule: 0 threads and blocks in order, 1 reversed, >1 a random permutation seed."""
        self.c.lora_ext_emu_configure(schedule, sms, cc)

    @contextlib.contextmanager
    def device(self, schedule: int = 0, sms: int = 132, cc: int = 90):
        self.configure(schedule, sms, cc)
        try:
            yield self
        finally:
            self.configure()

    def sites(self) -> set[str]:
        return set(self.c.lora_ext_emu_sites().decode().split())

    def take_errors(self) -> str:
        return self.c.lora_ext_emu_take_errors().decode()

    def planted(self, name: str) -> str:
        """Runs planted-bug kernel `name` (tests/emu/planted.cu); returns what the emulator reported."""
        return self.c.lora_ext_emu_planted(name.encode()).decode()
