"""Shared test set-up: offline Hugging Face, deterministic CPU torch."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# rich wraps tables to the terminal width; xdist workers have none (80 columns)
os.environ["COLUMNS"] = "200"

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def gloo_group():
    """A 1-process gloo group for in-process DDP/FSDP2 tests (real multi-rank runs
    live in test_distributed.py)."""
    import torch.distributed as dist

    from ._dist_utils import free_port

    if dist.is_initialized():  # pragma: no cover - another module set one up
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield dist.group.WORLD
    finally:
        dist.barrier()  # the rule for every teardown (gloo aborts without it, #12)
        dist.destroy_process_group()
