"""Subprocess side of tests/test_store.py: writers that get killed, concurrent writers.

Run as ``python -m tests._store_worker COMMAND PATH ...``. Row ``i`` of every
store written here holds ``i + 1`` everywhere (so a hole or a torn row, which
reads back zeros, never looks right).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch

import torchfreeze as tfz
from torchfreeze.cache.store import SlabStore

SHAPE = (64, 1024)  # 256 KiB float32 rows: a kill lands inside a row write most of the time


def rows(ids: torch.Tensor, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return (ids + 1).to(torch.float32).view(-1, *([1] * len(shape))).expand(-1, *shape).clone()


def open_store(path: str, shape: tuple[int, ...] = SHAPE) -> SlabStore:
    return SlabStore([shape], [torch.float32], path=path)


def die_inside_write(at: int) -> None:
    """SIGKILL this process in the middle of its ``at``-th ``os.pwrite``, half written.

    Each batch makes three: the slot counter, the rows, the index record, so
    ``at`` picks where a crash lands (a torn row, a torn record).
    """
    real = os.pwrite
    calls = 0

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == at:
            real(fd, memoryview(data)[: len(memoryview(data)) // 2], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd, data, offset)

    os.pwrite = pwrite  # type: ignore[assignment]


def fill_forever(path: str, die_at: int = 0) -> None:
    """Write ids 0, 1, 2, ... in batches of 8 until killed."""
    store = open_store(path)
    if die_at:
        die_inside_write(die_at)
    start = 0
    while True:
        ids = torch.arange(start, start + 8)
        store.write(ids, [rows(ids)])
        start += 8


def race(path: str, parity: int, total: int) -> None:
    """Write the ids of one parity, then read every id once the other process wrote it."""
    shape = (16,)
    store = open_store(path, shape)
    mine = torch.arange(parity, total, 2)
    for batch in mine.split(5):
        store.write(batch, [rows(batch, shape)])
    everyone = torch.arange(total)
    deadline = time.monotonic() + 60
    while True:
        slots = store.lookup(everyone)
        if bool((slots >= 0).all()):
            break
        if time.monotonic() > deadline:
            sys.exit(f"ids never appeared: {(slots < 0).nonzero().flatten()[:10].tolist()}")
        time.sleep(0.01)
    got = store.read(slots, torch.device("cpu"))[0]
    if not torch.equal(got, rows(everyone, shape)):
        bad = (got != rows(everyone, shape)).any(dim=1).nonzero().flatten()[:10].tolist()
        sys.exit(f"wrong rows for ids {bad}")
    store.close()


def replay(path: str, folder: str) -> None:
    """Open a FeatureCache(path=) on the saved model, replay every sample, report calls."""
    import json

    from tests.test_cache_store import UPTO, bert, count_prefix_rows, data, shuffled

    model = bert()
    model.load_state_dict(torch.load(f"{folder}/model.pt"))
    x, ids = data()
    computed = count_prefix_rows(model)
    cache = tfz.FeatureCache(model, upto=UPTO, path=path)
    order = shuffled(len(ids))
    logits = torch.empty(len(ids), 3)
    for batch in order.split(8):
        with cache.keys(ids[batch]):
            logits[batch] = model(x[batch]).logits.detach()
    same = torch.equal(logits, torch.load(f"{folder}/logits.pt"))
    print(json.dumps({"prefix_rows": computed[0], "hits": cache.hits, "misses": cache.misses,
                      "same": same, "line": str(cache)}))


if __name__ == "__main__":
    command, path, *rest = sys.argv[1:]
    if command == "fill":
        fill_forever(path, int(rest[0]) if rest and rest[0] else 0)
    elif command == "replay":
        replay(path, rest[0])
    elif command == "race":
        race(path, int(rest[0]), int(rest[1]))
    else:
        sys.exit(f"unknown command {command}")
