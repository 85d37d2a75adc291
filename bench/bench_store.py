"""B-store: feature-store lookup and replay at 10 thousand vs 1 million stored samples, and RSS.

Part 1 stores 384-wide float16 rows (a MiniLM sentence embedding) for 10 k and
for 1 M sample ids and times one batch of 256 random stored ids: the lookup
(id -> slot) and the replay (slots -> one [256, 384] tensor), the stores used
in alternation so machine noise hits both. The limit is 1.00 (the work per
batch does not depend on the store's size); the target is <= 1.5. For context
the same is timed for the obvious design, a dict of per-sample row views
replayed by ``torch.stack`` (the ``dict + stack (naive)`` row).

Part 2 fills a 512 MiB store (131,072 rows of 4 KiB) and then replays every
row once in random batches of 256, each in a fresh process, and reports the
peak resident set size above the process's baseline. With ``storage="disk"``
the bound is a constant (the batch being read); with ``"auto"`` it is
``max_bytes`` plus that constant.

Run: ``.venv/bin/python bench/bench_store.py``
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import console, fmt_bytes, machine_line, table

from torchfreeze.cache.store import SlabStore

WIDTH, BATCH, ROUNDS = 384, 256, 300
SIZES = (10_000, 1_000_000)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    # VmHWM belongs to this process's address space; ru_maxrss would carry over the
    # peak of the parent that forked it.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def fill(store: SlabStore, size: int) -> None:
    for start in range(0, size, 8192):
        ids = torch.arange(start, min(size, start + 8192))
        store.write(ids, [torch.randn(ids.numel(), WIDTH).to(torch.float16)])


class DictStore:
    """The naive store the slabs are compared with: id -> tuple of row views."""

    def __init__(self, size: int) -> None:
        self.entries: dict[int, tuple[torch.Tensor, ...]] = {}
        for start in range(0, size, 8192):
            chunk = torch.randn(min(size, start + 8192) - start, WIDTH).to(torch.float16)
            for j in range(chunk.shape[0]):
                self.entries[start + j] = (chunk[j],)

    def lookup(self, ids: list[int]) -> list[tuple[torch.Tensor, ...]]:
        return [self.entries[k] for k in ids]

    @staticmethod
    def read(rows: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        return torch.stack([r[0] for r in rows])


def scaling(tmp: str) -> None:
    variants: dict[str, tuple[object, int, int]] = {}  # name -> (store, size, extra RSS bytes)
    for size in SIZES:
        for kind in ("memory", "disk"):
            before = rss()
            store = SlabStore([(WIDTH,)], [torch.float16], storage=kind, directory=tmp)
            fill(store, size)
            variants[f"slabs, {kind}|{size}"] = (store, size, rss() - before)
        before = rss()
        variants[f"dict + stack (naive)|{size}"] = (DictStore(size), size, rss() - before)

    lookup_t: dict[str, list[float]] = {k: [] for k in variants}
    read_t: dict[str, list[float]] = {k: [] for k in variants}
    gen = torch.Generator().manual_seed(0)
    for _ in range(ROUNDS):
        for name, (store, size, _) in variants.items():
            ids = torch.randint(0, size, (BATCH,), generator=gen)
            if isinstance(store, DictStore):
                keys = ids.tolist()  # a dict store is indexed by Python ints
                t0 = time.perf_counter()
                rows = store.lookup(keys)
                t1 = time.perf_counter()
                store.read(rows)
            else:
                assert isinstance(store, SlabStore)
                t0 = time.perf_counter()
                slots = store.lookup(ids)
                t1 = time.perf_counter()
                store.read(slots, torch.device("cpu"))
            t2 = time.perf_counter()
            lookup_t[name].append(t1 - t0)
            read_t[name].append(t2 - t1)

    rows = []
    for family in dict.fromkeys(k.split("|")[0] for k in variants):
        small, big = f"{family}|{SIZES[0]}", f"{family}|{SIZES[1]}"
        med = {k: (statistics.median(lookup_t[k]), statistics.median(read_t[k]))
               for k in (small, big)}
        total = {k: sum(med[k]) for k in med}
        overhead = (variants[big][2] - SIZES[1] * WIDTH * 2) / SIZES[1]
        rows.append([
            family,
            f"{med[small][0] * 1e6:.0f} / {med[big][0] * 1e6:.0f}",
            f"{med[small][1] * 1e6:.0f} / {med[big][1] * 1e6:.0f}",
            f"{med[big][0] / med[small][0]:.2f}",
            f"{total[big] / total[small]:.2f}",
            "1.00",
            f"{overhead:.0f} B" if "disk" not in family else
            f"{fmt_bytes(variants[big][2])} RSS",
        ])
    console().print(table(
        f"B-store part 1: one batch of {BATCH} random ids, 10 k vs 1 M stored "
        f"{WIDTH}-wide float16 rows (median of {ROUNDS}, interleaved)",
        ["storage", "lookup µs 10k / 1M", "replay µs 10k / 1M", "lookup 1M/10k",
         "lookup+replay 1M/10k", "limit", "RAM per entry beyond its row (1M)"],
        rows,
        caption=f"Target: lookup 1M/10k <= 1.5. {machine_line()}",
    ))
    for store, _, _ in variants.values():
        if isinstance(store, SlabStore):
            store.close()


RSS_ROWS, RSS_ROW_BYTES, RSS_BUDGET = 131_072, 4096, 64 * 2**20


def rss_child(kind: str, tmp: str) -> None:
    """Fill and replay a 512 MiB store; print peak RSS above the baseline."""
    budget = RSS_BUDGET if kind == "auto" else None
    store = SlabStore([(RSS_ROW_BYTES // 4,)], [torch.float32], storage=kind,  # type: ignore[arg-type]
                      max_bytes=budget, directory=tmp)
    batch = torch.randn(1024, RSS_ROW_BYTES // 4)
    store.write(torch.arange(1024), [batch])  # warm up the write and read paths
    store.read(store.lookup(torch.arange(BATCH)), torch.device("cpu"))
    base = peak_rss()
    for start in range(1024, RSS_ROWS, 1024):
        store.write(torch.arange(start, start + 1024), [batch])
    for ids in torch.randperm(RSS_ROWS).split(BATCH):
        store.read(store.lookup(ids), torch.device("cpu"))
    peak = peak_rss()
    print(peak - base, store.memory_nbytes, store.disk_nbytes)
    store.close()


def rss_bound(tmp: str) -> None:
    rows = []
    for kind in ("memory", "auto", "disk"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", kind, tmp],
                             capture_output=True, text=True, check=True).stdout.split()
        grew, mem, disk = (int(x) for x in out)
        bound = {"memory": "all rows", "auto": f"max_bytes {fmt_bytes(RSS_BUDGET)} + c",
                 "disk": "c"}[kind]
        rows.append([kind, fmt_bytes(mem), fmt_bytes(disk), fmt_bytes(grew), bound])
    console().print(table(
        f"B-store part 2: peak RSS growth while filling and replaying "
        f"{fmt_bytes(RSS_ROWS * RSS_ROW_BYTES)} ({RSS_ROWS:,} rows of "
        f"{fmt_bytes(RSS_ROW_BYTES)}), one fresh process each",
        ["storage", "rows in RAM", "rows on disk", "peak RSS growth", "bound"],
        rows,
        caption="c = the batch being replayed or written (here 4 MiB written, 1 MiB read) "
                "plus allocator slack. Disk rows are read with preadv into the batch "
                "tensor, so the OS page cache (shared, evictable) holds the hot rows, "
                "not the process.",
    ))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        rss_bound(tmp)
        scaling(tmp)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], sys.argv[3])
    else:
        main()
