"""Multi-process runs for the distributed tests: each test spawns its own gloo process group
(torch.multiprocessing.spawn, a free TCP port) and gets back what every rank returned."""
from __future__ import annotations

import datetime
import faulthandler
import importlib
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, fn: str, args: tuple, out_dir: str) -> None:
    # a rank killed by a signal prints every thread's Python stack into the test's output
    faulthandler.enable(all_threads=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = getattr(importlib.import_module(module), fn)(rank, world, *args)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done communicating before any tears its process group down (with gloo, a
        # peer closing its sockets under another's pending work can abort that process at exit)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: CI twice saw a rank abort (SIGABRT, "terminate called
    # without an active exception", no Python stack from faulthandler, so after Python code had
    # finished) while a library's C++ statics were destroyed with a thread still joinable. The
    # result is saved and the process group is down by now; nothing is left to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(module: str, fn: str, world: int, *args) -> list:
    """Runs `module.fn(rank, world, *args)` on `world` gloo ranks; returns each rank's result."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, free_port(), module, fn, args, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _run_scenarios(rank: int, world: int, module: str, names: list[str]) -> dict:
    """One rank: `module.SCENARIOS[name](mesh)` for each name on a 1-D mesh; a failing scenario
    returns {"error": its traceback} (the test reports it)."""
    import traceback

    from torch.distributed.device_mesh import init_device_mesh
    scenarios = importlib.import_module(module).SCENARIOS
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for name in names:
        try:
            res[name] = scenarios[name](mesh)
        except Exception:
            res[name] = {"error": traceback.format_exc()}
    return res


def spawn_scenarios(module: str, names, world: int = 2) -> list[dict]:
    """Runs the named scenarios of `module` on `world` gloo ranks; one result dict per rank."""
    return spawn(__name__, "_run_scenarios", world, module, list(names))


def error_catcher(msgs: dict):
    """catch(key, fn): runs fn and stores its ValueError message under key (None: no error)."""
    def catch(key, fn):
        try:
            fn()
            msgs[key] = None
        except ValueError as e:
            msgs[key] = str(e)
    return catch
