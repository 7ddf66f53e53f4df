"""pytest plugin for GPU runs: a test that kills the interpreter must not hide the tests after it.

With ``LORA_EXT_RESUME=<file>`` every test's node id is appended to the file as the test starts,
and tests already listed there are deselected. Run again after a crash and pytest resumes after
the test that crashed (the file's last line), without running it again.
"""
from __future__ import annotations

import os


def _record() -> str | None:
    return os.environ.get("LORA_EXT_RESUME")


def pytest_collection_modifyitems(config, items):
    path = _record()
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        started = set(f.read().splitlines())
    dropped = [item for item in items if item.nodeid in started]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid not in started]


def pytest_runtest_logstart(nodeid, location):
    path = _record()
    if path:
        with open(path, "a") as f:
            f.write(nodeid + "\n")
