"""Sample id -> slot: a tensor for dataset-index-like integers, a dict for the rest.

Dataset indices are small non-negative integers, so their slot is one gather
from a table indexed by the id: a batch lookup costs the same few tensor ops at
10 thousand or 10 million stored samples. The table grows geometrically and
only while it stays within a constant factor of the number of entries; an
integer far outside that range (a hash, a 64-bit record id) and every other
hashable go through a dict instead, so memory stays proportional to the
entries whatever the ids look like.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

__all__ = ["IdBatch", "IdIndex"]

IdBatch = torch.Tensor | list[Hashable]

# Tables made or grown inside inference_mode (fill()) would be inference tensors that
# later updates outside it may not modify.
_normal_tensors = torch.inference_mode(False)
_MIN_TABLE = 1 << 16  # ids below this always go through the table
_SPREAD = 4  # the table may hold up to this many slots per entry (plus _MIN_TABLE)


class IdIndex:
    """Map sample ids to slots; ``-1`` means "not stored".

    Invariant: an ``int`` id in ``[0, len(table))`` lives in the table only; the
    dict holds the other ids. Growing the table moves the dict's ints that it
    now covers, so a lookup never has to look in both.

    Example:
        >>> import torch
        >>> index = IdIndex()
        >>> index.insert(torch.tensor([3, 7]), torch.tensor([0, 1]))
        >>> index.insert(["a.jpg"], torch.tensor([2]))
        >>> index.lookup(torch.tensor([7, 5, 3])).tolist(), index.lookup(["a.jpg", 3]).tolist()
        ([1, -1, 0], [2, 0])
    """

    @_normal_tensors
    def __init__(self) -> None:
        self._table = torch.full((0,), -1, dtype=torch.long)
        self._other: dict[Hashable, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @_normal_tensors
    def clear(self) -> None:
        self._table = torch.full((0,), -1, dtype=torch.long)
        self._other.clear()
        self._count = 0

    # ----------------------------------------------------------------- lookup
    def lookup(self, ids: IdBatch) -> torch.Tensor:
        """int64 tensor ``[n]``: the slot of each id, ``-1`` where it is not stored."""
        if isinstance(ids, torch.Tensor):
            if not self._other:
                try:  # the usual batch: one gather, which bounds-checks (else the path below)
                    return self._table.index_select(0, ids)
                except (IndexError, RuntimeError):
                    pass
            return self._lookup_tensor(ids)
        table, other, size = self._table, self._other, self._table.numel()
        out = []
        for key in ids:
            if type(key) is int and 0 <= key < size:
                out.append(int(table[key]))
            else:
                out.append(other.get(key, -1))
        return torch.tensor(out, dtype=torch.long)

    def table_slots(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The table's entry of each id (``-1`` where not stored), or ``None`` when an id
        may live outside the table: one gather, which bounds-checks."""
        if self._other:
            return None
        try:
            return self._table.index_select(0, ids)
        except (IndexError, RuntimeError):
            return None

    def _lookup_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        size = self._table.numel()
        if not self._other:
            try:  # the usual batch: one gather, which bounds-checks (else the path below)
                return self._table.index_select(0, ids)
            except (IndexError, RuntimeError):
                pass
        inside = (ids >= 0) & (ids < size)
        slots = self._table[ids.clamp(0, max(size - 1, 0))] if size else torch.full_like(ids, -1)
        slots = torch.where(inside, slots, -1)
        if self._other and not bool(inside.all()):
            # Only ids outside the table (rare: huge or negative ints) take this path.
            for pos in (~inside).nonzero().flatten().tolist():
                slots[pos] = self._other.get(int(ids[pos]), -1)
        return slots

    # ----------------------------------------------------------------- insert
    @_normal_tensors
    def insert(self, ids: IdBatch, slots: torch.Tensor) -> None:
        """Record ``slots[i]`` as the slot of ``ids[i]`` (ids not already present, unique)."""
        if isinstance(ids, torch.Tensor):
            if ids.numel():
                self._reserve(int(ids.max()), ids.numel())
            size = self._table.numel()
            inside = (ids >= 0) & (ids < size)
            self._table[ids[inside]] = slots[inside]
            if not bool(inside.all()):
                for key, slot in zip(ids[~inside].tolist(), slots[~inside].tolist()):
                    self._other[key] = slot
        else:
            ints = [k for k in ids if type(k) is int]
            if ints:
                self._reserve(max(ints), len(ints))
            size = self._table.numel()
            for key, slot in zip(ids, slots.tolist()):
                if type(key) is int and 0 <= key < size:
                    self._table[key] = slot
                else:
                    self._other[key] = slot
        self._count += len(ids)

    def _reserve(self, largest: int, incoming: int) -> None:
        size = self._table.numel()
        if largest < size or largest >= max(_MIN_TABLE, _SPREAD * (self._count + incoming)):
            return
        new_size = max(_MIN_TABLE, 2 * size, largest + 1)
        table = torch.full((new_size,), -1, dtype=torch.long)
        table[:size] = self._table
        self._table = table
        moved = [k for k in self._other if type(k) is int and 0 <= k < new_size]
        for key in moved:
            table[key] = self._other.pop(key)
