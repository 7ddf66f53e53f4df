"""Summarises the ptxas -v reports written by nvcc_log.py; fails on register spills."""
import glob
import os
import re
import shutil
import subprocess

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse(log_dir: str, stems: set[str] | None = None) -> list[dict]:
    """Kernel reports of the logs in log_dir (only <stem>.o.ptxas for stems, when given)."""
    kernels = []
    for path in sorted(glob.glob(os.path.join(log_dir, "*.ptxas"))):
        if stems is not None and os.path.basename(path).split(".")[0] not in stems:
            continue
        cur = None
        for line in open(path):
            if m := _ENTRY.search(line):
                cur = {"name": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0,
                       "stack": 0, "spill_st": 0, "spill_ld": 0, "file": os.path.basename(path)}
                kernels.append(cur)
            elif cur and (m := _SPILL.search(line)):
                cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            elif cur and (m := _USED.search(line)):
                cur["regs"] = int(m.group(1))
                if s := _SMEM.search(line):
                    cur["smem"] = int(s.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    got = out.splitlines()
    return got if len(got) == len(names) else names


def summarise(log_dir: str, stems: set[str] | None = None) -> tuple[str, list[str]]:
    """Returns (summary text, list of spilling kernels)."""
    kernels = parse(log_dir, stems)
    if not kernels:
        return "ptxas: no kernel reports found", []
    names = demangle([k["name"] for k in kernels])
    lines, spills = [], []
    for arch in sorted({k["arch"] for k in kernels}):
        ks = [k for k in kernels if k["arch"] == arch]
        worst = max(ks, key=lambda k: k["regs"])
        lines.append(f"ptxas {arch}: {len(ks)} kernels, registers max {worst['regs']}, "
                     f"smem max {max(k['smem'] for k in ks)} B, "
                     f"spill bytes {sum(k['spill_st'] + k['spill_ld'] for k in ks)}")
    for k, name in zip(kernels, names):
        if k["spill_st"] or k["spill_ld"]:
            spills.append(f"{name} [{k['arch']}]: {k['spill_st']} B spill stores, {k['spill_ld']} B spill loads")
    return "\n".join(lines), spills


def gated(spills: list[str], checked: list[str], strict: bool = False) -> tuple[list[str], list[str]]:
    """Splits summarise()'s spill lines into (fatal, warnings): fatal for the checked archs (all
    of them when strict)."""
    fatal = [s for s in spills if strict or any(f" [{a}]: " in s for a in checked)]
    return fatal, [s for s in spills if s not in fatal]


if __name__ == "__main__":  # used by CMakeLists.txt: python ptxas_report.py LOG_DIR
    import sys

    import os

    import build_config

    text, spilling = summarise(sys.argv[1])
    print(text)
    fatal, warn = gated(spilling, build_config.SPILL_CHECKED_ARCHS, os.environ.get("LORA_EXT_STRICT_SPILLS") == "1")
    if warn:
        print("warning: register spills (allowed on archs lora_ext is not tuned for):\n" + "\n".join(warn))
    if fatal:
        sys.exit("kernels spill registers (0 bytes allowed):\n" + "\n".join(fatal))
