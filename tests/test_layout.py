"""The Python layer's imports flow one way (issue 15): every import among lora_ext's modules,
function-local ones included, goes to a module below the importer in ORDER, so there is no cycle.
A new module must be given its place in ORDER."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lora_ext")

# Lowest first. A module may import only modules before it; lora_ext/ops/* (as "ops") is at the
# bottom and imports nothing else of lora_ext. "__init__" is `import lora_ext` / `from lora_ext import X`.
ORDER = ["ops", "sharding", "hparams", "dora", "wrappable", "merged_sd", "layers", "embedding", "merged_linear", "conv", "targets", "moe", "param_lora", "inject", "merge", "adapter_checks", "param_files", "adapters", "combine", "multi", "multi_experts", "pool_checks",
         "pool", "tp", "distributed", "peft_pools", "peft_experts", "peft_patch", "__init__", "demo", "cli_inspect", "cli_merge", "__main__"]
COMPILED = {"_C"}  # the extension (no Python imports)


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, PKG)
    return "ops" if rel.startswith("ops" + os.sep) else rel[:-3]


def _package_of(path: str) -> list[str]:
    rel = os.path.relpath(os.path.dirname(path), os.path.dirname(PKG))
    return rel.split(os.sep)  # ["lora_ext"] or ["lora_ext", "ops"]


def _target(dotted: str) -> str | None:
    """lora_ext module that `import <dotted>` loads (None: outside lora_ext or compiled)."""
    parts = dotted.split(".")
    if parts[0] != "lora_ext":
        return None
    if len(parts) == 1:
        return "__init__"
    if parts[1] in COMPILED:
        return None
    return "ops" if parts[1] == "ops" else parts[1]


def _is_submodule(name: str) -> bool:
    return os.path.isfile(os.path.join(PKG, name + ".py")) or os.path.isdir(os.path.join(PKG, name))


def imports_of(path: str) -> set[str]:
    """lora_ext modules imported anywhere in the file (module level, functions, classes, try blocks)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_target(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module
            if dotted == "lora_ext":  # from lora_ext import X / from . import X: a submodule or a name of __init__
                for a in node.names:
                    sub = a.name in COMPILED or _is_submodule(a.name)
                    found.add(_target(f"lora_ext.{a.name}") if sub else "__init__")
            else:
                found.add(_target(dotted))
    found.discard(None)
    return found


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for root, _, files in os.walk(PKG):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(root, fn)
                mod = _module_of(path)
                g.setdefault(mod, set()).update(imports_of(path) - {mod})
    return g


def test_every_module_has_a_place():
    assert set(graph()) == set(ORDER), "add new lora_ext modules to ORDER in tests/test_layout.py"


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_imports_flow_down_the_order():
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in sorted(deps)
           if ORDER.index(d) >= ORDER.index(m)]
    assert not bad, f"imports against the order {ORDER}: {bad}"


def test_ops_import_nothing_else_of_lora_ext():
    assert graph()["ops"] == set()


def test_parser_sees_function_local_and_package_imports():
    # __main__ imports .demo inside a function, and `import lora_ext`; demo does `import lora_ext`.
    assert {"demo", "__init__"} <= imports_of(os.path.join(PKG, "__main__.py"))
    assert imports_of(os.path.join(PKG, "__init__.py")) >= {"ops", "adapters", "merge", "combine", "pool"}
    assert imports_of(os.path.join(PKG, "ops", "merge.py")) == {"ops"}


def test_import_does_not_pull_transformers():
    # transformers is not a runtime dependency: lora_ext.moe (transformers' experts modules) is
    # imported only when an experts forward or check runs
    import subprocess
    import sys

    code = "import sys, lora_ext, lora_ext.distributed; print(sorted(m for m in ('transformers', 'peft', 'lora_ext.moe') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:] + r.stdout
