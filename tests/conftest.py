"""Shared test set-up: offline Hugging Face, deterministic CPU torch."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``TORCHFREEZE_CACHE`` root for tests that load SmolLM2-135M: the variable's own
    folder when set, else one folder per test session (shared by the xdist workers), so
    the GGUF file is converted to safetensors (~10 s) once, not once per test module."""
    root = os.environ.get("TORCHFREEZE_CACHE")
    if root:
        return Path(root)
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tfzcache"


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
