"""Run a function on 2 real CPU processes (gloo) with a hard deadline.

A hung collective must fail the test, not stall CI: the parent polls the
process group with a deadline and kills every rank when it passes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # every rank arrives before any tears gloo down: without it gloo aborts at exit
        # in about 1 run of 6 (#12); after a failure there is no barrier to wait on
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], tmp_path: Path, *args: Any, world: int = 2, timeout: float = 90.0
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world`` spawned gloo ranks; return each rank's result.

    ``fn`` must be importable (module level). An exception on any rank is raised
    here; running past ``timeout`` seconds kills all ranks and raises TimeoutError.
    """
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, free_port(), str(tmp_path), args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks in {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_ranks_once(fn: Callable[..., Any], tmp_path_factory: Any, name: str) -> list[Any]:
    """:func:`run_ranks` once per test session, also under pytest-xdist.

    xdist hands a module's tests to several workers, and each would build the
    module-scoped fixture again; the first worker runs the ranks, the others
    wait on a file lock and read its results (the recipe from xdist's docs).
    """
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return run_ranks(fn, tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / f"tfz-dist-{name}"
    with FileLock(str(shared) + ".lock"):
        done = shared / "done"
        if not done.exists():
            shared.mkdir(exist_ok=True)
            results = run_ranks(fn, shared)
            done.touch()
            return results
    return [torch.load(shared / f"rank{r}.pt", weights_only=False) for r in range(2)]
