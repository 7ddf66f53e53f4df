"""nvcc wrapper used by setup.py: runs nvcc, keeps its ptxas -v report per object file.

Usage (as PYTORCH_NVCC): python nvcc_log.py LOG_DIR NVCC [nvcc args...]
ptxas info lines go to LOG_DIR/<object>.ptxas; everything else is passed through.
"""
import os
import subprocess
import sys


def main() -> int:
    log_dir, nvcc, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    proc = subprocess.run([nvcc, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    obj = args[args.index("-o") + 1] if "-o" in args else "unknown.o"
    report, other = [], []
    lines = proc.stdout.splitlines()
    for i, line in enumerate(lines):
        is_report = line.startswith("ptxas info") or (
            line.startswith("    ") and i > 0 and lines[i - 1].startswith("ptxas info    : Function properties")
        )
        (report if is_report else other).append(line)
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, os.path.basename(obj) + ".ptxas"), "w") as f:
        f.write("\n".join(report) + "\n")
    if other:
        print("\n".join(other), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
