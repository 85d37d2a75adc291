"""The storage seam of :class:`~torchfreeze.FeatureCache`: sample id -> slot -> rows.

The public class talks to one :class:`Storage` per *namespace* (what keys an
entry besides the sample id: the call of the boundary inside one ``keys()``
block, the autocast dtype) and never touches what is behind it. This module
holds the interface and today's implementation: growable dense slabs, in RAM
up to a byte budget, then in memory-mapped files (``storage="auto"``), or only
one of the two. Lookups of integer ids are one tensor gather (no Python loop
over the ids of a batch); reads are one ``index_select`` per output leaf.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Hashable
from typing import Literal, Protocol, Union

import torch

__all__ = ["IdBatch", "IdIndex", "SlabStorage", "Storage", "StorageBudget", "StorageMode"]

IdBatch = Union[torch.Tensor, list[Hashable]]
"""A 1-D int64 CPU tensor for integer ids, else a list of hashables."""

StorageMode = Literal["auto", "memory", "disk"]
STORAGE_MODES = ("auto", "memory", "disk")
_ALIGN = 64  # byte alignment of leaves inside a disk chunk (every dtype views cleanly)
_FIRST_CAPACITY = 64
# A dense id -> slot table is used for non-negative integer ids below this many
# entries, or below 8x the number of stored ids (dataset indices); other ids go
# to a dict (strings, hashes, negative numbers).
_DENSE_MIN = 1 << 20


class Storage(Protocol):
    """What the public class needs from a store of per-sample rows (CONTRACTS.md 1)."""

    @property
    def memory_nbytes(self) -> int: ...

    @property
    def disk_nbytes(self) -> int: ...

    def lookup(self, ids: IdBatch) -> torch.Tensor:
        """int64 CPU tensor ``[n]``: the slot of each id, -1 where missing."""
        ...

    def read(self, slots: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """One tensor ``[n, *sample_shape]`` per output leaf, rows in the order of ``slots``."""
        ...

    def write(self, ids: IdBatch, leaves: list[torch.Tensor]) -> None:
        """Store rows (``leaf[i]`` is the row of ``ids[i]``); ids already present are skipped."""
        ...

    def __len__(self) -> int: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


StorageFactory = Callable[[list[torch.Tensor]], Storage]
"""Makes the Storage of a namespace from its first batch of leaves (shapes, dtypes)."""


class IdIndex:
    """Sample id -> slot, vectorised for integer ids.

    Non-negative integer ids below a bound live in a dense int64 table (lookup:
    one gather); any other id (strings, tuples, huge or negative integers) in a dict.
    """

    def __init__(self) -> None:
        self._dense = torch.full((0,), -1, dtype=torch.long)
        self._other: dict[Hashable, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(self._dense):
            return bool(self._dense[key] >= 0)
        return key in self._other

    def lookup(self, ids: IdBatch) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            if not self._other:
                try:  # one gather; it bounds-checks (negative or too large: the slow path)
                    return self._dense.index_select(0, ids)
                except (IndexError, RuntimeError):
                    pass
            return self._lookup_mixed(ids.tolist())
        return self._lookup_mixed(ids)

    def _lookup_mixed(self, ids: list[Hashable]) -> torch.Tensor:
        dense, n, other = self._dense, len(self._dense), self._other
        out = [
            int(dense[i]) if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
            else other.get(i, -1)
            for i in ids
        ]
        return torch.tensor(out, dtype=torch.long)

    def add(self, ids: IdBatch, slots: torch.Tensor) -> None:
        """Map new ids (not present, no duplicates) to ``slots``."""
        self._count += len(slots)
        if isinstance(ids, torch.Tensor) and ids.numel():
            hi = int(ids.max())
            if int(ids.min()) >= 0 and hi < max(_DENSE_MIN, 8 * self._count):
                self._grow(hi + 1)
                self._dense.index_copy_(0, ids, slots)
                return
            ids = ids.tolist()
        dense_keys, dense_slots = [], []
        for key, slot in zip(ids, slots.tolist()):
            if isinstance(key, int) and not isinstance(key, bool) and (
                0 <= key < max(_DENSE_MIN, 8 * self._count)
            ):
                dense_keys.append(key)
                dense_slots.append(slot)
            else:
                self._other[key] = slot
        if dense_keys:
            self._grow(max(dense_keys) + 1)
            self._dense[torch.tensor(dense_keys)] = torch.tensor(dense_slots, dtype=torch.long)

    def _grow(self, size: int) -> None:
        n = len(self._dense)
        if size <= n:
            return
        grown = torch.full((max(size, 2 * n),), -1, dtype=torch.long)
        grown[:n] = self._dense
        # integer ids kept in the dict because they were out of range move in
        for key in [k for k in self._other
                    if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(grown)]:
            grown[key] = self._other.pop(key)
        self._dense = grown

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


def _remove_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class StorageBudget:
    """The byte budget and disk folder shared by every namespace of one cache."""

    def __init__(self, max_bytes: int | None, mode: StorageMode,
                 directory: str | None) -> None:
        self.max_bytes = max_bytes
        self.mode: StorageMode = mode
        self.directory = directory
        self.memory_nbytes = 0
        self.disk_nbytes = 0
        self._dir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._files = 0

    def split(self, row_bytes: int, rows: int) -> tuple[int, int]:
        """How many of ``rows`` new rows go to RAM and how many to disk (the rest: dropped)."""
        if self.max_bytes is None:
            return (0, rows) if self.mode == "disk" else (rows, 0)
        mem = disk = 0
        if self.mode != "disk":
            free = (self.max_bytes - self.memory_nbytes) // max(row_bytes, 1)
            mem = max(0, min(rows, free))
        if self.mode == "auto":
            disk = rows - mem
        elif self.mode == "disk":
            free = (self.max_bytes - self.disk_nbytes) // max(row_bytes, 1)
            disk = max(0, min(rows, free))
        return mem, disk

    def new_file(self, nbytes: int) -> torch.Tensor:
        if self._dir is None:
            if self.directory is not None:
                os.makedirs(self.directory, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="torchfreeze-cache-", dir=self.directory)
            self._finalizer = weakref.finalize(self, _remove_dir, self._dir)
        path = os.path.join(self._dir, f"chunk-{self._files:06d}.bin")
        self._files += 1
        return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    def clear(self) -> None:
        """Forget the byte counts and delete the disk folder (its maps must be dropped first)."""
        self.memory_nbytes = 0
        self.disk_nbytes = 0
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._dir = None
        self._files = 0


class _Segment:
    """A run of consecutive slots held in one tensor per leaf (RAM, or one mapped file)."""

    __slots__ = ("count", "leaves", "on_disk", "start")

    def __init__(self, start: int, leaves: list[torch.Tensor], on_disk: bool) -> None:
        self.start = start
        self.count = 0
        self.leaves = leaves
        self.on_disk = on_disk

    @property
    def capacity(self) -> int:
        return self.leaves[0].shape[0]


class SlabStorage:
    """Rows of one namespace in growable slabs: RAM first, then disk chunks.

    The RAM slab doubles (one copy per doubling); disk chunks are files of
    doubling capacity, each filled before the next is made, so a namespace
    has O(log n) segments and a read touches each at most once.
    """

    def __init__(self, example: list[torch.Tensor], budget: StorageBudget) -> None:
        self._shapes = [tuple(t.shape[1:]) for t in example]
        self._dtypes = [t.dtype for t in example]
        self._row_bytes = sum(t[0].nbytes for t in example)
        self._budget = budget
        self._index = IdIndex()
        self._segments: list[_Segment] = []  # in slot order; the RAM slab is the first
        self._next = 0
        self._memory_rows = 0
        self._disk_rows = 0

    @property
    def memory_nbytes(self) -> int:
        return self._memory_rows * self._row_bytes

    @property
    def disk_nbytes(self) -> int:
        return self._disk_rows * self._row_bytes

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def lookup(self, ids: IdBatch) -> torch.Tensor:
        return self._index.lookup(ids)

    def read(self, slots: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        segs = self._segments
        if len(segs) == 1:
            seg = segs[0]
            idx = slots if seg.start == 0 else slots - seg.start
            out = [leaf.index_select(0, idx) for leaf in seg.leaves]
            if out[0].device != device:
                out = [o.to(device, non_blocking=True) for o in out]
            return out
        out = [torch.empty((len(slots), *shape), dtype=dtype)
               for shape, dtype in zip(self._shapes, self._dtypes)]
        for seg in segs:
            mask = (slots >= seg.start) & (slots < seg.start + seg.count)
            where = mask.nonzero().squeeze(1)
            if where.numel() == 0:
                continue
            local = slots.index_select(0, where) - seg.start
            for o, leaf in zip(out, seg.leaves):
                o.index_copy_(0, where, leaf.index_select(0, local).to(o.device))
        return [o.to(device) for o in out]

    def write(self, ids: IdBatch, leaves: list[torch.Tensor]) -> None:
        rows, new_ids = self._new_rows(ids)
        if not rows:
            return
        mem, disk = self._budget.split(self._row_bytes, len(rows))
        parts = [(rows[:mem], False), (rows[mem:mem + disk], True)]
        stored: list[int] = []
        first_slot = self._next
        for part, on_disk in parts:
            if part:
                self._append(leaves, part, on_disk)
                stored.extend(part)
        if not stored:
            return
        # RAM rows then disk rows, in order: the stored ids are a prefix of the new ones
        keep = len(stored)
        self._index.add(new_ids[:keep], torch.arange(first_slot, first_slot + keep))

    def _new_rows(self, ids: IdBatch) -> tuple[list[int], IdBatch]:
        """Row positions of ids not stored yet (first occurrence of duplicates), and those ids."""
        missing = (self._index.lookup(ids) < 0).tolist()
        seen: set[Hashable] = set()
        keys = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        rows = []
        for pos, (key, miss) in enumerate(zip(keys, missing)):
            if miss and key not in seen:
                seen.add(key)
                rows.append(pos)
        if isinstance(ids, torch.Tensor):
            return rows, ids[torch.tensor(rows, dtype=torch.long)]
        return rows, [keys[r] for r in rows]

    def _append(self, leaves: list[torch.Tensor], rows: list[int], on_disk: bool) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=leaves[0].device)
        chunk = [t.index_select(0, index) for t in leaves] if len(rows) != len(leaves[0]) \
            else leaves
        done = 0
        while done < len(rows):
            seg = self._writable(on_disk, len(rows) - done)
            take = min(len(rows) - done, seg.capacity - seg.count)
            for dst, src in zip(seg.leaves, chunk):
                dst[seg.count:seg.count + take].copy_(src[done:done + take])
            seg.count += take
            done += take
        nbytes = len(rows) * self._row_bytes
        if on_disk:
            self._disk_rows += len(rows)
            self._budget.disk_nbytes += nbytes
        else:
            self._memory_rows += len(rows)
            self._budget.memory_nbytes += nbytes
        self._next += len(rows)

    def _writable(self, on_disk: bool, need: int) -> _Segment:
        last = self._segments[-1] if self._segments else None
        if last is not None and last.on_disk == on_disk and last.count < last.capacity:
            return last
        if not on_disk and last is not None and not last.on_disk:
            # RAM slab full: double it (one copy); it is the last segment, so its slots
            # stay consecutive
            grown = max(2 * last.capacity, last.count + need)
            last.leaves = [torch.cat([leaf, leaf.new_empty((grown - leaf.shape[0],
                                                            *leaf.shape[1:]))])
                           for leaf in last.leaves]
            return last
        prev = max((s.capacity for s in self._segments if s.on_disk == on_disk), default=0)
        capacity = max(need, _FIRST_CAPACITY, 2 * prev)
        if on_disk:
            leaves = self._map(capacity)
        else:
            leaves = [torch.empty((capacity, *shape), dtype=dtype)
                      for shape, dtype in zip(self._shapes, self._dtypes)]
        seg = _Segment(self._next, leaves, on_disk)
        self._segments.append(seg)
        return seg

    def _map(self, capacity: int) -> list[torch.Tensor]:
        sizes = [capacity * int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size()
                 for s, d in zip(self._shapes, self._dtypes)]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        raw = self._budget.new_file(total)
        return [raw[off:off + size].view(dtype).view(capacity, *shape)
                for off, size, shape, dtype in zip(offsets, sizes, self._shapes, self._dtypes)]

    def clear(self) -> None:
        self._index.clear()
        self._segments = []
        self._next = 0
        self._memory_rows = 0
        self._disk_rows = 0

    def close(self) -> None:
        self.clear()
