"""The Python packages the tests and benchmarks need beyond the lent GPU machine's image (torch,
transformers, safetensors, accelerate, PyYAML are there; no index can be reached from it).

  python3 bench/gpu_deps.py download      here: the wheels into .whl/ (ignored by git, ~4 MB);
                                           name .whl in the device call's carry
  python3 bench/gpu_deps.py install DIR   there (gpu_check.sh): unpacks each wheel whose module
                                           the running Python lacks into DIR (scripts into DIR/bin);
                                           no pip needed. Prints what it unpacked.
Pure-Python wheels plus ninja's manylinux build, for CPython 3.12 on x86-64.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# distribution==version: the module (or, for ninja, the program) that shows it is installed
PACKAGES = {"pytest==9.0.3": "pytest", "iniconfig==2.3.0": "iniconfig", "pluggy==1.6.0": "pluggy",
            "hypothesis==6.155.2": "hypothesis", "sortedcontainers==2.4.0": "sortedcontainers",
            "peft==0.21.2": "peft", "psutil==7.2.2": "psutil", "rich==15.0.0": "rich",
            "markdown-it-py==4.0.0": "markdown_it", "mdurl==0.1.2": "mdurl", "pygments==2.19.2": "pygments",
            "tqdm==4.70.1": "tqdm", "ninja==1.13.2": "ninja (program)"}


def download() -> None:
    os.makedirs(WHEELS, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", WHEELS,
                           *PACKAGES])
    print("\n".join(sorted(os.listdir(WHEELS))))


def _present(what: str) -> bool:
    if what.endswith(" (program)"):
        return shutil.which(what.split()[0]) is not None
    return importlib.util.find_spec(what) is not None


def install(target: str) -> None:
    by_dist = {spec.split("==")[0].replace("-", "_").lower(): mod for spec, mod in PACKAGES.items()}
    done = []
    for whl in sorted(glob.glob(os.path.join(WHEELS, "*.whl"))):
        dist = os.path.basename(whl).split("-")[0].lower()
        if dist not in by_dist or _present(by_dist[dist]):
            continue
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                parts = name.split("/")
                if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts" and parts[2]:
                    dest = os.path.join(target, "bin", parts[2])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with z.open(name) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                elif not parts[0].endswith(".data"):
                    z.extract(name, target)
        done.append(dist)
    print("gpu_deps: unpacked", ", ".join(done) if done else "nothing (all present)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["download"]:
        download()
    elif sys.argv[1:2] == ["install"] and len(sys.argv) == 3:
        install(sys.argv[2])
    else:
        sys.exit(__doc__)
