"""The feature store: dense slabs + an id index, in RAM, on disk, or shared on disk.

:class:`SlabStore` implements the ``Storage`` seam of the cache package
(``lookup``/``read``/``write``) for one namespace: one slab per output tensor,
``[capacity, *sample_shape]``, and an :class:`~torchfreeze.cache.index.IdIndex`
from sample id to row. A batch lookup is a gather, a batch replay one
``index_select`` per output tensor (RAM) or one positioned read per row (disk):
the cost depends on the batch, not on how many samples are stored.

Slots ``[0, memory rows)`` live in RAM slabs, the slots after them in disk
slabs, so ``storage="auto"`` spills past ``max_bytes`` without moving anything.
With ``path=`` the store is a directory shared by the processes of a node
(:class:`~torchfreeze.cache.persist.SharedLog`); rows are always written before
they are published, so a killed writer never leaves an entry that reads back wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Hashable, Sequence

import torch

from ..errors import CacheError
from ._storage import STORAGE_MODES, IdBatch, StorageBudget, StorageMode
from .index import IdIndex
from .persist import SharedLog
from .slabs import DiskSlab, MemorySlab, row_nbytes

__all__ = ["SlabStore"]

_DISK = 1 << 40  # slots from here on are rows of the disk slabs (slot - _DISK)


def _first_missing(ids: IdBatch, slots: torch.Tensor) -> torch.Tensor:
    """Positions of ids not stored yet, first occurrence of each, in batch order."""
    missing = (slots < 0).nonzero().flatten()
    if isinstance(ids, torch.Tensor):
        if missing.numel() < 2:
            return missing
        uniq, inverse = torch.unique(ids[missing], return_inverse=True)
        if uniq.numel() == missing.numel():
            return missing
        first = torch.full((uniq.numel(),), missing.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(missing.numel()), "amin")
        return missing[first.sort().values]
    seen: set[Hashable] = set()
    keep = []
    for p in missing.tolist():
        if ids[p] not in seen:
            seen.add(ids[p])
            keep.append(p)
    return torch.tensor(keep, dtype=torch.long)


def _pick(ids: IdBatch, pos: torch.Tensor) -> IdBatch:
    if isinstance(ids, torch.Tensor):
        return ids[pos]
    return [ids[p] for p in pos.tolist()]


class SlabStore:
    """Dense per-sample storage of the outputs of one cached call (one namespace).

    Args:
        shapes: per-sample shape of each output tensor (the batch dimension removed).
        dtypes: the stored dtype of each output tensor.
        storage: ``"memory"`` (RAM slabs; rows past ``max_bytes`` are not stored),
            ``"auto"`` (RAM up to ``max_bytes``, disk after it) or ``"disk"`` (disk
            only, at most ``max_bytes``). Ignored with ``path``: always disk.
        max_bytes: byte budget of the tier named above; ``None``: no bound.
        device: where RAM slabs live (the model's device keeps replay on it).
        directory: parent folder of the temporary disk slabs (default: system temp).
        budget: a :class:`~torchfreeze.cache._storage.StorageBudget` shared with other
            stores (the namespaces of one cache); replaces storage/max_bytes/directory.
        path: a directory that persists and that several processes may share
            (``max_bytes`` then bounds its files).

    Example:
        >>> import torch
        >>> store = SlabStore([(3,)], [torch.float32])
        >>> store.write(torch.tensor([10, 11]), [torch.ones(2, 3)])
        >>> slots = store.lookup(torch.tensor([11, 12]))
        >>> slots.tolist(), store.read(slots[:1], torch.device("cpu"))[0].tolist()
        ([1, -1], [[1.0, 1.0, 1.0]])
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[torch.dtype],
        *,
        storage: StorageMode = "memory",
        max_bytes: int | None = None,
        device: torch.device | str = "cpu",
        directory: str | os.PathLike[str] | None = None,
        budget: StorageBudget | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if storage not in STORAGE_MODES:
            raise CacheError(
                f"storage={storage!r} is not one of {', '.join(map(repr, STORAGE_MODES))}.")
        if len(shapes) != len(dtypes) or not shapes:
            raise CacheError("a store needs one shape and one dtype per output tensor")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.dtypes = list(dtypes)
        self.row_nbytes = sum(row_nbytes(s, d) for s, d in zip(self.shapes, self.dtypes))
        if budget is None:
            budget = StorageBudget(max_bytes, storage,
                                   None if directory is None else os.fspath(directory))
        self.budget = budget
        self.device = torch.device(device)
        self.path = None if path is None else os.fspath(path)
        self.written = 0  # entries this process published (fill() reports it)
        self._mem = ([] if budget.mode == "disk" or self.path is not None else
                     [MemorySlab(s, d, device=self.device)
                      for s, d in zip(self.shapes, self.dtypes)])
        self._mem_used = 0
        self._disk_used = 0
        self._disk: list[DiskSlab] = []
        self._log: SharedLog | None = None
        self._index = IdIndex()
        if self.path is not None:
            max_rows = (None if budget.max_bytes is None
                        else budget.max_bytes // max(self.row_nbytes, 1))
            self._open_shared(self.path, max_rows)

    # ---------------------------------------------------------------- set-up
    def _open_shared(self, path: str, max_rows: int | None) -> None:
        self._log = SharedLog(path, max_rows=max_rows)
        spec = {"shapes": [list(s) for s in self.shapes],
                "dtypes": [str(d) for d in self.dtypes]}
        spec_path = os.path.join(path, "spec.json")
        found = None
        with self._log.locked():
            if os.path.exists(spec_path):
                with open(spec_path) as fh:
                    found = json.load(fh)
            else:
                tmp = f"{spec_path}.tmp{os.getpid()}"
                with open(tmp, "w") as fh:
                    json.dump(spec, fh)
                os.replace(tmp, spec_path)
        if found is not None and found != spec:
            self._log.close()
            raise CacheError(
                f"The store at {path} holds outputs of shapes {found['shapes']} and "
                f"dtypes {found['dtypes']}, but this call returns shapes "
                f"{spec['shapes']} and dtypes {spec['dtypes']}. Use another path=, or "
                "overwrite=True to start fresh."
            )
        self._disk = self._open_disk(path)

    def _open_disk(self, directory: str) -> list[DiskSlab]:
        return [DiskSlab(os.path.join(directory, f"slab-{i}.bin"), s, d)
                for i, (s, d) in enumerate(zip(self.shapes, self.dtypes))]

    def _temp_disk(self) -> list[DiskSlab]:
        if not self._disk:
            self._disk = self._open_disk(tempfile.mkdtemp(dir=self.budget.folder()))
        return self._disk

    # ---------------------------------------------------------------- Storage
    def lookup(self, ids: IdBatch) -> torch.Tensor:
        """int64 ``[n]``: the slot of each id, ``-1`` where it is not stored."""
        if self._log is not None:
            return self._log.lookup(ids)
        return self._index.lookup(ids)

    def read(self, slots: torch.Tensor, device: torch.device | str) -> list[torch.Tensor]:
        """One ``[n, *shape]`` tensor per output, rows in the order of ``slots``, on ``device``."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if self._log is not None or not self._mem:
            return [self._from_disk(i, slots, device) for i in range(len(self.shapes))]
        if not self._disk_used:  # nothing spilled: every slot is a memory row (no mask)
            return [self._from_memory(i, slots, device) for i in range(len(self.shapes))]
        n = slots.numel()
        in_mem = slots < _DISK
        if bool(in_mem.all()):
            return [self._from_memory(i, slots, device) for i in range(len(self.shapes))]
        out = []
        pos_mem = in_mem.nonzero().flatten()
        pos_disk = (~in_mem).nonzero().flatten()
        for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
            full = torch.empty((n, *shape), dtype=dtype, device=device)
            full.index_copy_(0, pos_mem.to(device), self._from_memory(i, slots[pos_mem], device))
            full.index_copy_(0, pos_disk.to(device), self._from_disk(i, slots[pos_disk], device))
            out.append(full)
        return out

    def read_ids(self, ids: IdBatch, device: torch.device) -> list[torch.Tensor] | None:
        """The steady replay: every id stored in a RAM slab on the CPU and read to the
        CPU, so a batch is one gather for the slots and one per output; ``None``
        otherwise. A missing id's slot is ``-1``, which the gather refuses, so no separate
        hit test runs (a CUDA gather would fail asynchronously: not taken there)."""
        if self._log is not None or self._disk_used or not self._mem or \
                not isinstance(ids, torch.Tensor) or self.device.type != "cpu" or \
                device.type != "cpu":
            return None
        slots = self._index.table_slots(ids)
        if slots is None:
            return None
        try:
            return [slab.data.index_select(0, slots) for slab in self._mem]
        except IndexError:
            return None  # an id not stored: its slot is -1

    def _staging(self, i: int, n: int, device: torch.device) -> torch.Tensor:
        # Host rows bound for an accelerator go through page-locked memory, so the copy
        # is asynchronous; the caching host allocator keeps the buffer until it is done.
        pin = device.type != "cpu" and torch.cuda.is_available()
        return torch.empty((n, *self.shapes[i]), dtype=self.dtypes[i], pin_memory=pin)

    def _from_memory(self, i: int, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
        slab = self._mem[i]
        if slab.device.type == "cpu":
            if device.type == "cpu":  # the usual replay: one gather, no copy
                return slab.data.index_select(0, slots)
            staged = slab.read(slots, out=self._staging(i, slots.numel(), device))
            return staged.to(device, non_blocking=True)
        return slab.read(slots).to(device)

    def _from_disk(self, i: int, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
        base = 0 if self._log is not None else _DISK
        staged = self._disk[i].read(slots - base, out=self._staging(i, slots.numel(), device))
        return staged.to(device, non_blocking=True)

    def write(self, ids: IdBatch, leaves: list[torch.Tensor]) -> None:
        """Store row ``j`` of every leaf for ``ids[j]``; ids already stored are skipped.

        Rows that do not fit the budget are dropped (they stay misses). An entry
        becomes visible only after all of its bytes were written.
        """
        pos = _first_missing(ids, self.lookup(ids))
        if pos.numel() == 0:
            return
        # Slabs and index tables made inside fill()'s inference_mode would be inference
        # tensors, which later writes outside it may not modify.
        with torch.inference_mode(False):
            self._write_new(_pick(ids, pos), pos, leaves)

    def _write_new(self, new_ids: IdBatch, pos: torch.Tensor, leaves: list[torch.Tensor]) -> None:
        rows = [leaf.index_select(0, pos.to(leaf.device)) if pos.numel() != leaf.shape[0]
                else leaf for leaf in leaves]
        if self._log is not None:
            start, got = self._log.reserve_upto(pos.numel())
            if got == 0:
                return
            slots = torch.arange(start, start + got)
            for slab, r in zip(self._disk, rows):
                slab.write(slots, r[:got])
            fresh = self._log.commit(_pick(new_ids, torch.arange(got)), slots)
            self.written += int(fresh.sum())
            return
        to_mem, to_disk = self.budget.split(self.row_nbytes, pos.numel())
        parts = []
        if to_mem:
            slots = torch.arange(self._mem_used, self._mem_used + to_mem)
            room = self.budget.memory_room(self.row_nbytes)
            cap = None if room is None else self._mem_used + room
            for mslab, r in zip(self._mem, rows):
                mslab.write(slots, r[:to_mem], cap=cap)
            self._mem_used += to_mem
            self.budget.memory_nbytes += to_mem * self.row_nbytes
            parts.append(slots)
        if to_disk:
            file_slots = torch.arange(self._disk_used, self._disk_used + to_disk)
            for slab, r in zip(self._temp_disk(), rows):
                slab.write(file_slots, r[to_mem:to_mem + to_disk])
            self._disk_used += to_disk
            self.budget.disk_nbytes += to_disk * self.row_nbytes
            parts.append(file_slots + _DISK)
        if parts:
            stored = to_mem + to_disk
            self._index.insert(_pick(new_ids, torch.arange(stored)), torch.cat(parts))
            self.written += stored

    def __contains__(self, sample_id: object) -> bool:
        ids: IdBatch = (torch.tensor([sample_id], dtype=torch.long)
                        if type(sample_id) is int else [sample_id])
        return bool(self.lookup(ids)[0] >= 0)

    def __len__(self) -> int:
        if self._log is not None:
            self._log.refresh()
            return len(self._log)
        return len(self._index)

    @property
    def memory_nbytes(self) -> int:
        """Bytes of stored rows in RAM slabs (or on the accelerator, with ``device=``)."""
        return self._mem_used * self.row_nbytes

    @property
    def disk_nbytes(self) -> int:
        """Bytes of stored rows in disk slabs (every process's rows, for a shared store)."""
        if self._log is not None:
            return len(self._log) * self.row_nbytes
        return self._disk_used * self.row_nbytes

    def flush(self) -> None:
        """Push a shared store's bytes to the disk (``fsync``), rows before the index."""
        for slab in self._disk:
            slab.flush()
        if self._log is not None:
            self._log.flush()

    def clear(self) -> None:
        """Forget every entry (for a shared store: every process's; do it when alone)."""
        if self._log is not None:
            with self._log.locked():
                for slab in self._disk:
                    slab.truncate()
            self._log.clear()
            return
        self._index.clear()
        for mslab in self._mem:
            mslab.clear()
        self.budget.memory_nbytes -= self._mem_used * self.row_nbytes
        self.budget.disk_nbytes -= self._disk_used * self.row_nbytes
        self._mem_used = self._disk_used = 0
        for slab in self._disk:
            slab.close()
            os.remove(slab.path)
        self._disk = []

    def close(self) -> None:
        """Release memory, files and temporary folders; a ``path=`` store stays on disk."""
        if self._log is not None:
            self.flush()
            self._log.close()
            self._log = None
            for slab in self._disk:
                slab.close()
            self._disk = []
        else:
            self.clear()
