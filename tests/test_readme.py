"""Every ```python block of README.md runs as pasted (fresh namespace, temp cwd, CPU, seconds).

The blocks are read from README.md when the tests are collected, so blocks added or changed later
are picked up without editing this file. A block that must stay illustrative is marked with an
HTML comment on the line right before its fence (blank lines in between are allowed):

    <!-- no-test -->
    ```python
    ...

and is reported as skipped. Keep those rare.
"""
from __future__ import annotations

import linecache
import os
import re
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NO_TEST = "<!-- no-test -->"
# a snippet is meant to be pasted and run in seconds; this bound only catches runaway ones
MAX_SECONDS = float(os.environ.get("LORA_EXT_README_MAX_S", "60"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[dict]:
    """The ```python blocks of a markdown text: line (1-based, of the opening fence), section
    (the closest heading above), code, skip (a `<!-- no-test -->` comment right before it)."""
    lines = text.splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = _FENCE.match(line)
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip().lower()
        j = i + 1  # the closing fence: same character, at least as long
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            j += 1
        lang = info.split()[0] if info else ""
        if lang in ("python", "py", "python3"):
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            indent = len(m.group("indent"))
            code = "\n".join(ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1:j])
            blocks.append({"line": i + 1, "section": section, "code": code + "\n",
                           "skip": k >= 0 and lines[k].strip() == NO_TEST})
        i = j + 1
    return blocks


def _params():
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    params = []
    for b in blocks:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", b["section"]).strip("-")[:40] or "top"
        marks = [pytest.mark.skip(reason=f"README.md:{b['line']} is marked {NO_TEST}")] if b["skip"] else []
        params.append(pytest.param(b, id=f"L{b['line']}-{slug}", marks=marks))
    return params


def test_parser_finds_blocks_and_markers():
    md = ("# T\n```python\nx = 1\n```\n\n## S\n<!-- no-test -->\n\n```python\ny = 2\n```\n"
          "```bash\nls\n```\n````python\n```inner\n````\n  ```py\n  z = 3\n  ```\n")
    bs = python_blocks(md)
    assert [(b["line"], b["section"], b["code"], b["skip"]) for b in bs] == [
        (2, "T", "x = 1\n", False), (9, "S", "y = 2\n", True), (15, "S", "```inner\n", False),
        (18, "S", "z = 3\n", False)]


def test_readme_has_python_blocks():
    assert len(_params()) >= 1


@pytest.mark.parametrize("block", _params())
def test_readme_snippet(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the snippets' tempfile.mkdtemp() dirs
    name = f"README.md:{block['line']}"
    code = compile(block["code"], name, "exec")
    linecache.cache[name] = (len(block["code"]), None, block["code"].splitlines(True), name)  # tracebacks show it
    namespace = {"__name__": "__main__", "__file__": os.path.join(str(tmp_path), "snippet.py")}
    rng = torch.random.get_rng_state()
    t0 = time.perf_counter()
    try:
        exec(code, namespace)  # a fresh namespace: a missing import fails here as it would when pasted
    finally:
        torch.random.set_rng_state(rng)
    elapsed = time.perf_counter() - t0
    assert elapsed < MAX_SECONDS, f"{name} ({block['section']}) took {elapsed:.1f} s; README snippets should run in seconds"
