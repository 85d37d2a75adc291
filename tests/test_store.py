"""The feature store on its own: dense slabs, the id index, sharing, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchfreeze.cache.index import IdIndex
from torchfreeze.cache.persist import SharedLog, StoreMeta, fingerprint, open_meta
from torchfreeze.cache.store import SlabStore
from torchfreeze.errors import CacheError

from . import _store_worker as worker

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3, 4), (2,)]
DTYPES = [torch.bfloat16, torch.int64]
ROW = 3 * 4 * 2 + 2 * 8  # bytes of one sample in SHAPES/DTYPES


def outputs(ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-id rows that differ between ids and between the two leaves."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g)
    a = (base + ids.view(-1, 1, 1).float()).to(torch.bfloat16)
    b = torch.stack([ids * 7, -ids], dim=1)
    return [a, b]


def make(kind: str, tmp_path: Path, **kw: object) -> SlabStore:
    if kind == "path":
        return SlabStore(SHAPES, DTYPES, path=tmp_path / "ns", **kw)  # type: ignore[arg-type]
    return SlabStore(SHAPES, DTYPES, storage=kind, directory=tmp_path, **kw)  # type: ignore[arg-type]


def assert_replays(store: SlabStore, ids: torch.Tensor) -> None:
    slots = store.lookup(ids)
    assert bool((slots >= 0).all()), f"missing {ids[slots < 0].tolist()}"
    got = store.read(slots, torch.device("cpu"))
    for g, want in zip(got, outputs(ids)):
        assert g.dtype == want.dtype and torch.equal(g, want)


@pytest.mark.parametrize("kind,budget", [("memory", None), ("auto", 40 * ROW),
                                         ("disk", None), ("path", None)])
def test_rows_come_back_bit_identical_in_any_order(kind: str, budget: int | None,
                                                   tmp_path: Path) -> None:
    store = make(kind, tmp_path, max_bytes=budget)
    ids = torch.randperm(100)
    for batch in ids.split(7):
        store.write(batch, outputs(batch))
    assert len(store) == 100
    assert_replays(store, torch.tensor([99, 0, 5, 5, 42, 17]))
    assert_replays(store, torch.randperm(100))
    assert store.lookup(torch.tensor([100, -1, 1 << 40])).tolist() == [-1, -1, -1]
    if kind == "auto":  # the budget holds 40 rows in RAM, the other 60 spilled
        assert (store.memory_nbytes, store.disk_nbytes) == (40 * ROW, 60 * ROW)
    elif kind == "memory":
        assert (store.memory_nbytes, store.disk_nbytes) == (100 * ROW, 0)
    else:
        assert (store.memory_nbytes, store.disk_nbytes) == (0, 100 * ROW)
    store.close()


def test_known_and_repeated_ids_are_stored_once(tmp_path: Path) -> None:
    store = make("memory", tmp_path)
    store.write(torch.tensor([1, 2]), outputs(torch.tensor([1, 2])))
    ids = torch.tensor([2, 3, 3, 1, 4, 3])
    rows = outputs(ids)
    rows[1][2] = -99  # a second, different row for id 3: the first occurrence wins
    store.write(ids, rows)
    assert len(store) == 4 and store.memory_nbytes == 4 * ROW
    assert_replays(store, torch.tensor([1, 2, 3, 4]))


def test_memory_slabs_grow_geometrically() -> None:
    store = SlabStore([(8,)], [torch.float32])
    for start in range(0, 20_000, 10):
        ids = torch.arange(start, start + 10)
        store.write(ids, [ids.float().view(-1, 1).expand(-1, 8)])
    slab = store._mem[0]
    # doubling from 64 rows: log2(20000 / 64) + 1 reallocations, not one per write
    assert slab.growths <= 10 and slab.capacity < 2 * 20_000
    assert store.read(store.lookup(torch.tensor([19_999])), torch.device("cpu"))[0][0, 0] == 19_999


def test_budgets_bound_each_tier(tmp_path: Path) -> None:
    ids = torch.arange(50)
    mem = make("memory", tmp_path, max_bytes=20 * ROW + 5)
    mem.write(ids, outputs(ids))
    assert mem.memory_nbytes == 20 * ROW and mem._mem[0].capacity == 20  # growth stops at it
    assert int((mem.lookup(ids) >= 0).sum()) == 20  # the rest stay misses
    disk = make("disk", tmp_path, max_bytes=30 * ROW)
    disk.write(ids, outputs(ids))
    assert (disk.memory_nbytes, disk.disk_nbytes) == (0, 30 * ROW)
    assert_replays(disk, ids[:30])
    shared = make("path", tmp_path, max_bytes=10 * ROW)
    shared.write(ids, outputs(ids))
    assert len(shared) == 10 and shared.disk_nbytes == 10 * ROW


def test_any_hashable_id(tmp_path: Path) -> None:
    index = IdIndex()
    keys = ["a.jpg", ("shard", 3), -5, 1 << 50, 7]
    index.insert(keys, torch.arange(5))
    found = index.lookup([7, "a.jpg", 1 << 50, ("shard", 3), -5, "b"])
    assert found.tolist() == [4, 0, 3, 1, 2, -1]
    assert index.lookup(torch.tensor([-5, 1 << 50, 7, 8])).tolist() == [2, 3, 4, -1]
    assert index._table.numel() <= 1 << 16  # one huge id does not allocate a huge table
    # growing the table moves the ints it now covers out of the dict
    index.insert(torch.arange(100, 300_000), torch.arange(5, 300_000 - 95))
    assert index.lookup(torch.tensor([299_999, 7, 1 << 50])).tolist() == [299_904, 4, 3]

    shared = make("path", tmp_path)
    names = [f"img{i}.png" for i in range(6)]
    shared.write(names, outputs(torch.arange(6)))
    other = make("path", tmp_path)  # another process, as far as the store can tell
    slots = other.lookup([*reversed(names), "nope"])
    assert slots[-1] == -1
    got = other.read(slots[:-1], torch.device("cpu"))
    assert torch.equal(got[1], outputs(torch.arange(5, -1, -1))[1])
    with pytest.raises(CacheError, match="cannot key a store on disk"):
        shared.write([object()], outputs(torch.arange(1)))


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("kind", ["memory", "path"])
def test_batch_lookup_and_replay_cost_does_not_grow_with_the_store(kind: str,
                                                                   tmp_path: Path) -> None:
    """From 2 k to 400 k stored samples, a batch runs the same tensor ops on batch-sized data.

    (Counted, not timed: wall time on a shared machine is noise; bench/bench_store.py
    measures it at 10 k and 1 M.)
    """
    batch = 256
    traces = []
    for size in (2_000, 400_000):
        store = SlabStore([(4,)], [torch.float32],
                          **({"path": tmp_path / str(size)} if kind == "path" else {}))
        for start in range(0, size, 50_000):
            ids = torch.arange(start, min(size, start + 50_000))
            store.write(ids, [ids.float().view(-1, 1).expand(-1, 4)])
        query = torch.randint(0, 2_000, (batch,))
        with _OpLog() as log:
            rows = store.read(store.lookup(query), torch.device("cpu"))[0]
        assert torch.equal(rows[:, 0], query.float())
        traces.append((log.ops, log.largest))
        store.close()
    assert traces[0][0] == traces[1][0]
    assert traces[1][1] <= batch * 4 * 8  # bytes: batch-sized (int64 slots), never store-sized


def test_two_processes_write_and_read_one_store_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests._store_worker", "race",
                               str(tmp_path), str(parity), "400"],
                              env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for parity in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = worker.open_store(str(tmp_path), (16,))
    slots = store.lookup(torch.arange(400))
    assert len(store) == 400 and slots.unique().numel() == 400  # no slot handed out twice


def test_killed_writer_leaves_no_torn_entry(tmp_path: Path) -> None:
    """Kill writers mid-fill: inside a row write, inside an index record, at a random time.

    Every entry that reads back afterwards is whole, and a new writer completes the store.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    seen = 0
    # pwrite calls go: counter, rows, record, counter, rows, record, ...
    for die_at in ("11", "15", ""):
        proc = subprocess.Popen([sys.executable, "-m", "tests._store_worker", "fill",
                                 str(tmp_path), die_at], env=env, cwd=ROOT)
        try:
            if not die_at:
                log = SharedLog(str(tmp_path))
                deadline = time.monotonic() + 60
                while len(log) <= seen + 8 and time.monotonic() < deadline:
                    time.sleep(0.002)
                    log.refresh()
                log.close()
                proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            proc.kill()
        store = worker.open_store(str(tmp_path))
        stored = store.lookup(torch.arange(100_000))
        present = (stored >= 0).nonzero().flatten()
        assert present.numel() > seen
        seen = present.numel()
        for batch in present.split(64):
            got = store.read(store.lookup(batch), torch.device("cpu"))[0]
            assert torch.equal(got, worker.rows(batch)), "a torn entry read back"
        store.close()
    # a re-open computes what is missing: the next writer fills the holes
    store = worker.open_store(str(tmp_path))
    ids = torch.arange(seen + 16)
    store.write(ids, [worker.rows(ids)])
    got = store.read(store.lookup(ids), torch.device("cpu"))[0]
    assert torch.equal(got, worker.rows(ids))


def test_a_torn_index_record_is_ignored_then_cut(tmp_path: Path) -> None:
    store = make("path", tmp_path)
    store.write(torch.arange(3), outputs(torch.arange(3)))
    with open(tmp_path / "ns" / "index.log", "ab") as fh:
        fh.write(b"\x07" * 9)  # what a writer killed inside its append leaves
    other = make("path", tmp_path)
    assert len(other) == 3
    other.write(torch.arange(3, 6), outputs(torch.arange(3, 6)))
    assert os.path.getsize(tmp_path / "ns" / "index.log") == 6 * 16
    assert_replays(make("path", tmp_path), torch.arange(6))


def test_a_store_refuses_other_shapes(tmp_path: Path) -> None:
    make("path", tmp_path).close()
    with pytest.raises(CacheError, match=r"shapes \[\[3, 4\], \[2\]\].*overwrite=True"):
        SlabStore([(3, 5), (2,)], DTYPES, path=tmp_path / "ns")


def test_meta_refuses_other_weights_boundary_dtype(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    meta = StoreMeta(boundary="1", dtype="torch.float32", weights=fingerprint(model))
    assert open_meta(str(tmp_path), meta) is False  # a new store
    (tmp_path / "ns-0").mkdir()
    # a fresh module with the same content fingerprints the same
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    twin.load_state_dict(model.state_dict())
    same = StoreMeta(boundary="1", dtype="torch.float32", weights=fingerprint(twin))
    assert open_meta(str(tmp_path), same) is True
    with torch.no_grad():
        twin[1].running_mean[2] += 1e-6
    other = StoreMeta(boundary="0", dtype="torch.float16", weights=fingerprint(twin))
    with pytest.raises(CacheError) as err:
        open_meta(str(tmp_path), other)
    msg = str(err.value)
    for part in ("boundary '1' (now '0')", "dtype torch.float32 (now torch.float16)",
                 "'1.running_mean'", "overwrite=True"):
        assert part in msg
    assert (tmp_path / "ns-0").exists()  # refused: nothing touched
    assert open_meta(str(tmp_path), other, overwrite=True) is False
    assert not (tmp_path / "ns-0").exists()
    assert open_meta(str(tmp_path), other) is True
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a torchfreeze store.*notes.txt.*nothing was deleted"):
        open_meta(str(tmp_path), same, overwrite=True)
    assert (tmp_path / "notes.txt").exists()
