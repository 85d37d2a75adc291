"""The storage seam of :class:`~torchfreeze.FeatureCache`: sample id -> slot -> rows.

The public class talks to one :class:`Storage` per *namespace* (what keys an
entry besides the sample id: the call of the boundary inside one ``keys()``
block, the autocast dtype) and never touches what is behind it. This module
holds the interface and the byte budget that the namespaces of one cache
share; the implementation is :class:`~torchfreeze.cache.store.SlabStore`
(dense slabs and an id index, in RAM, on disk, or in a shared ``path=``
directory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Hashable
from typing import Literal, Protocol, Union

import torch

__all__ = ["IdBatch", "Storage", "StorageBudget", "StorageMode"]

IdBatch = Union[torch.Tensor, list[Hashable]]
"""A 1-D int64 CPU tensor for integer ids, else a list of hashables."""

StorageMode = Literal["auto", "memory", "disk"]
STORAGE_MODES = ("auto", "memory", "disk")


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

    def read_ids(self, ids: IdBatch, device: torch.device) -> list[torch.Tensor] | None:
        """The rows of ``ids`` as :meth:`read` gives them, when every id is stored and one
        cheap lookup finds them (the steady replay); ``None`` otherwise (no side effect:
        the caller then takes :meth:`lookup` and :meth:`read`)."""
        ...

    def write(self, ids: IdBatch, leaves: list[torch.Tensor]) -> None:
        """Store rows (``leaf[i]`` is the row of ``ids[i]``); ids already present are skipped."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, sample_id: object) -> bool: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


StorageFactory = Callable[[list[torch.Tensor]], Storage]
"""Makes the Storage of a namespace from its first batch of leaves (shapes, dtypes)."""


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

    def memory_room(self, row_bytes: int) -> int | None:
        """Rows that may still go to RAM (None: no bound), so slabs never grow past it."""
        if self.mode == "disk":
            return 0
        if self.max_bytes is None:
            return None
        return max(0, (self.max_bytes - self.memory_nbytes) // max(row_bytes, 1))

    def folder(self) -> str:
        """The cache's temporary folder for disk slabs (made on first use)."""
        if self._dir is None:
            if self.directory is not None:
                os.makedirs(self.directory, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="torchfreeze-cache-", dir=self.directory)
            self._finalizer = weakref.finalize(self, _remove_dir, self._dir)
        return self._dir

    def clear(self) -> None:
        """Forget the byte counts and delete the disk folder (close the stores first)."""
        self.memory_nbytes = 0
        self.disk_nbytes = 0
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._dir = None
