"""The benchmark goals as one table: measured, goal, measured / goal, pass or fail.

Reads the JSON the benchmarks write (bench/run.py: <name>-<device>.json, or gpu_check.sh's
bench-<gpu>.json, a list of them) and checks the goals of the GPU validation issue:
  multi_lora_ decode (T = 1, 16, 64, r = 16, distinct adapters): >= 75% of the copy-bandwidth
    roofline, >= 3x the loop over adapters and gather + bmm;
  multi_lora_ prefill (T = 8192, 8 adapters): >= 2x the loop of GEMMs, <= 1.3x one adapter's
    addmm pair;
  lora_linear fwd+bwd <= 1.05x the frozen base layer, also for an fp32 model in autocast bf16
    (PEFT's layer beside it);
  merge_ (4096^2, bf16) >= 80% of the copy-bandwidth roofline; merge_ + unmerge_ faster than
    PEFT's own merge + unmerge of the same weight (the exact cycle beside it);
  Llama 4x1024, 16 distinct adapters: AdapterPool faster than PEFT's adapter_names, decode and
    prefill (both x the base model beside it); patch_peft's train step no slower than PEFT's;
  a DoRA layer (4096^2, T = 2048) after patch_peft no slower than PEFT's DoRA layer;
  dora_norm (4096^2, r = 16, fp32 / bf16, both layouts) faster than PEFT's DoRA weight norm;
  LoRA on MoE expert stacks (Qwen3-MoE experts, r = 16, top-2, T = 512 training, T = 1 no_grad):
    lora_ext no slower than PEFT's target_parameters; the activation memory beside it.
A value is the median of its runs; "range" is its fastest-slowest run where the benchmark kept it.
On CUDA the multi_lora_ and merge_ times come from CUDA-graph replays (kernel time, no launch
gaps; merge_ over 4 rotating weights, beyond L2); "eager_ms" beside them is one eager call,
launch gaps and host overhead included.

python bench/goals.py FILE_OR_DIR ... [--md OUT.md] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

# (label, benchmark, row filter, key, ">=" or "<=", target, extra columns shown beside it)
GOALS = [
    *[(f"multi_lora_ decode T={T}: % of copy-bandwidth roofline", "multi_lora",
       {"T": T, "r": 16, "case": "distinct"}, "%roofline", ">=", 75.0, ["multi_lora_ms", "eager_ms"])
      for T in (1, 16, 64)],
    *[(f"multi_lora_ decode T={T}: x faster than the loop over adapters", "multi_lora",
       {"T": T, "r": 16, "case": "distinct"}, "vs_loop", ">=", 3.0, []) for T in (1, 16, 64)],
    *[(f"multi_lora_ decode T={T}: x faster than gather + bmm", "multi_lora",
       {"T": T, "r": 16, "case": "distinct"}, "vs_bmm", ">=", 3.0, []) for T in (1, 16, 64)],
    ("multi_lora_ prefill T=8192, 8 adapters: x faster than the loop of GEMMs", "multi_lora",
     {"case": "prefill 8 adapters"}, "vs_loop", ">=", 2.0, ["multi_lora_ms"]),
    ("multi_lora_ prefill T=8192, 8 adapters: x one adapter's addmm pair", "multi_lora",
     {"case": "prefill 8 adapters"}, "x_single", "<=", 1.3, ["single_ms"]),
    ("LoRALinear fwd+bwd: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear"}, "x base", "<=", 1.05, ["T", "in=out", "dtype"]),
    ("LoRALinear fwd+bwd, CUDA expand-first order: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear (expand first)"}, "x base", "<=", 1.05, []),
    ("LoRALinear fwd+bwd, 16-bit halves on CUDA cores: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear (CUDA cores)"}, "x base", "<=", 1.05, []),
    ("LoRALinear fwd+bwd, bf16 halves on cuBLAS: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear (cuBLAS halves)", "autocast": None}, "x base", "<=", 1.05, []),
    ("LoRALinear fwd+bwd, bf16 halves on cuBLAS, expand first: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear (cuBLAS halves, expand first)", "autocast": None}, "x base", "<=", 1.05, []),
    ("PEFT LoRA Linear + patch_peft fwd+bwd: x the frozen base layer", "lora_linear",
     {"impl": "PEFT + patch_peft"}, "x base", "<=", 1.05, []),
    ("PEFT LoRA Linear fwd+bwd: x the frozen base layer (reference)", "lora_linear",
     {"impl": "PEFT LoRA Linear"}, "x base", None, None, []),
    ("LoRALinear fwd+bwd, fp32 model in autocast bf16: x the frozen base layer", "lora_linear",
     {"impl": "lora_ext LoRALinear", "autocast": "bfloat16"}, "x base", "<=", 1.05, ["T", "in=out"]),
    ("PEFT LoRA Linear fwd+bwd, fp32 model in autocast bf16: x the frozen base layer (reference)",
     "lora_linear", {"impl": "PEFT LoRA Linear", "autocast": "bfloat16"}, "x base", None, None, []),
    *[(f"merge_ 4096^2 bf16 r={r}: % of copy-bandwidth roofline", "merge",
       {"part": "kernel", "out": 4096, "in": 4096, "r": r, "dtype": "bfloat16"}, "%roofline", ">=", 80.0,
       ["merge_ms", "eager_ms", "GB/s"]) for r in (8, 16, 64)],
    *[(f"merge_+unmerge_ 4096^2 {dt} r=16: x faster than PEFT's merge+unmerge", "merge",
       {"part": "peft", "dtype": dt}, "plain: x faster", ">=", 1.0, ["peft_cycle_ms", "plain_cycle_ms"])
      for dt in ("float32", "bfloat16")],
    *[(f"exact (MergeState) merge+unmerge 4096^2 {dt} r=16: x faster than PEFT's", "merge",
       {"part": "peft", "dtype": dt}, "exact: x faster", None, None, ["exact_cycle_ms"])
      for dt in ("float32", "bfloat16")],
    *[(f"dora_norm 4096^2 r=16 {dt} {lay}: x faster than PEFT's DoRA norm", "dora",
       {"dtype": dt, "layout": lay}, "x faster than PEFT", ">=", 1.0, ["lora_ext_ms", "peft_ms", "GB/s"])
      for dt in ("float32", "bfloat16") for lay in ("out x in", "in x out (fifo)")],
    *[(f"Llama 4x1024 {ph}, 16 adapters: AdapterPool x faster than PEFT", "pool",
       {"phase": ph, "adapters": 16}, "speedup vs PEFT", ">=", 1.0, ["lora_ext x base", "PEFT x base"])
      for ph in ("decode", "prefill")],
    *[(f"Llama 4x1024 {ph}, 16 adapters: PEFT + patch_peft x base (PEFT's beside it)", "pool",
       {"phase": ph, "adapters": 16}, "patch_peft x base", None, None, ["PEFT x base"]) for ph in ("decode", "prefill")],
    ("Llama 4x1024 decode, 16 adapters, CUDA graphs: AdapterPool x base", "pool",
     {"phase": "decode", "adapters": 16}, "graph: lora_ext x base", None, None, ["lora_ext graph ms"]),
    ("Llama 4x1024 train step: patch_peft x PEFT", "peft_train", {}, "patch_peft x PEFT", "<=", 1.0, []),
    ("DoRA layer fwd+bwd 4096^2 T=2048: PEFT + patch_peft x PEFT's DoRA layer", "dora_layer",
     {"impl": "PEFT DoRA + patch_peft", "T": 2048, "in=out": 4096}, "x PEFT DoRA", "<=", 1.0, ["norm"]),
    ("DoRA layer fwd+bwd 4096^2 T=2048: lora_ext DoRA x the frozen base layer", "dora_layer",
     {"impl": "lora_ext DoRA", "T": 2048, "in=out": 4096}, "x base", None, None, ["x PEFT DoRA", "norm"]),
    ("Llama 4x1024 train step: activation memory saved for backward, patch_peft x PEFT", "peft_train", {},
     "saved: patch_peft x PEFT", None, None, ["PEFT saved MB", "patch_peft saved MB"]),
    ("MoE experts LoRA fwd+bwd T=512: lora_ext x PEFT target_parameters", "moe_lora",
     {"impl": "lora_ext", "mode": "train", "T": 512}, "x PEFT", "<=", 1.0, ["path", "dtype", "E"]),
    ("MoE experts LoRA fwd+bwd T=512: PEFT + patch_peft x PEFT target_parameters", "moe_lora",
     {"impl": "PEFT + patch_peft", "mode": "train", "T": 512}, "x PEFT", "<=", 1.0, ["path", "dtype", "E"]),
    ("MoE experts LoRA forward T=1 (no_grad): lora_ext x PEFT target_parameters", "moe_lora",
     {"impl": "lora_ext", "mode": "no_grad", "T": 1}, "x PEFT", "<=", 1.0, ["path", "dtype"]),
    ("MoE experts LoRA fwd+bwd T=512: lora_ext x the frozen experts module", "moe_lora",
     {"impl": "lora_ext", "mode": "train", "T": 512}, "x base", None, None, ["path"]),
    ("MoE experts LoRA fwd+bwd T=512: activation memory saved for backward, lora_ext x PEFT", "moe_lora",
     {"impl": "lora_ext", "mode": "train", "T": 512}, "saved x PEFT", None, None, ["saved MB", "path"]),
]


def load(paths: list[str]) -> dict[str, dict]:
    """{benchmark name: its result document} from files (one document or a list) and folders."""
    files = []
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"{p}: no such file or folder")
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    docs = {}
    for f in files:
        try:
            with open(f) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable JSON result file ({e})") from None
        for doc in d if isinstance(d, list) else [d]:
            if isinstance(doc, dict) and "benchmark" in doc and "rows" in doc:
                docs[doc["benchmark"]] = doc
    return docs


def evaluate(docs: dict[str, dict]) -> list[dict]:
    out = []
    for label, bench, filt, key, op, target, extra in GOALS:
        rows = [r for r in docs.get(bench, {}).get("rows", [])
                if all(r.get(k) == v for k, v in filt.items()) and key in r]
        res = {"goal": label, "benchmark": bench, "key": key,
               "target": None if op is None else f"{op} {target:g}"}
        if not rows:
            out.append({**res, "status": "missing"})
            continue
        r = rows[0]
        v = r[key]
        res["measured"] = v
        if f"{key}_min" in r:
            res["range"] = [r[f"{key}_min"], r[f"{key}_max"]]
        res.update({k: r[k] for k in extra if k in r})
        if op is None:
            res["status"] = "info"
        else:
            res["measured/goal"] = v / target
            res["status"] = "pass" if (v >= target if op == ">=" else v <= target) else "FAIL"
        out.append(res)
    return out


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(results: list[dict], docs: dict[str, dict]) -> str:
    devs = sorted({d.get("device", "?") for d in docs.values()})
    lines = [f"Device: {', '.join(devs)}; torch {', '.join(sorted({d.get('torch', '?') for d in docs.values()}))}; "
             f"dates {', '.join(sorted({d.get('date', '?') for d in docs.values()}))}", "",
             "| goal | measured | range (runs) | goal | measured / goal | status | beside it |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rng = "–".join(_num(v) for v in r.get("range", [])) or ""
        extra = ", ".join(f"{k} {_num(r[k])}" for k in r if k not in
                          ("goal", "benchmark", "key", "target", "measured", "range", "measured/goal", "status"))
        lines.append(f"| {r['goal']} | {_num(r.get('measured', '—'))} | {rng} | {r['target'] or '—'} | "
                     f"{_num(r.get('measured/goal', '—'))} | {r['status']} | {extra} |")
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_miss = sum(r["status"] == "missing" for r in results)
    lines += ["", f"{sum(r['status'] == 'pass' for r in results)} pass, {n_fail} fail, {n_miss} missing"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="result JSON files or folders")
    p.add_argument("--md", help="write the table here (markdown)")
    p.add_argument("--json", help="write the evaluated goals here")
    a = p.parse_args(argv)
    try:
        docs = load(a.paths)
    except ValueError as e:
        p.error(str(e))
    if not docs:
        print(f"goals.py: no benchmark results in {', '.join(a.paths)}: every goal is missing", file=sys.stderr)
    results = evaluate(docs)
    md = markdown(results, docs)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"goals": results, "benchmarks": docs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
