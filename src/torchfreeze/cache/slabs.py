"""Dense slabs: one ``[capacity, *shape]`` tensor (or file) per output tensor.

A stored sample is a row index (its *slot*) into every slab, so replaying a
batch is one ``index_select`` per output tensor in RAM, and one positioned read
per row (consecutive rows coalesced) on disk.

Disk slabs are plain files written with ``pwrite`` and read with ``preadv``
straight into the destination tensor, not memory-mapped. Mapped pages count in
the process's resident set (RSS) until unmapped, so a mapped store of N bytes
ends up with N bytes of RSS after one epoch; with positioned I/O the OS page
cache holds the hot part (shared by every process of the node, evicted under
pressure) and the process itself keeps only the batch it reads. Files grow by
writing past their end (sparse until written), which needs no coordination
between processes that write disjoint rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import CacheError

__all__ = ["DiskSlab", "MemorySlab", "row_nbytes"]

_MIN_ROWS = 64
# Slabs made or grown inside inference_mode (fill()) would be inference tensors that
# later writes outside it may not modify.
_normal_tensors = torch.inference_mode(False)


def row_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one stored sample of this per-sample shape and dtype."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU ``[k, row_nbytes]`` uint8 view of ``rows``."""
    rows = rows.detach().to("cpu").contiguous()
    return rows.reshape(rows.shape[0], -1).view(torch.uint8)


def runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """``(first position, first slot, length)`` of each run of consecutive slots."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for pos in range(1, len(slots) + 1):
        if pos == len(slots) or slots[pos] != slots[pos - 1] + 1:
            out.append((start, slots[start], pos - start))
            start = pos
    return out


class MemorySlab:
    """A ``[capacity, *shape]`` tensor that doubles when full (at most ``max_rows``).

    Example:
        >>> import torch
        >>> slab = MemorySlab((2,), torch.float32)
        >>> slab.write(torch.tensor([0, 1]), torch.tensor([[1., 2.], [3., 4.]]))
        >>> slab.read(torch.tensor([1, 0, 1])).tolist()
        [[3.0, 4.0], [1.0, 2.0], [3.0, 4.0]]
    """

    @_normal_tensors
    def __init__(self, shape: Sequence[int], dtype: torch.dtype, *,
                 device: torch.device | str = "cpu", max_rows: int | None = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.data = torch.empty((0, *self.shape), dtype=dtype, device=self.device)
        self.growths = 0

    @property
    def capacity(self) -> int:
        return int(self.data.shape[0])

    @_normal_tensors
    def reserve(self, rows: int, cap: int | None = None) -> None:
        """Make room for slots ``[0, rows)``: geometric growth, so n writes copy O(n) rows.

        ``cap`` (and ``max_rows``) bound the growth: a slab never holds more rows
        than its byte budget allows.
        """
        if rows <= self.capacity:
            return
        new = max(rows, 2 * self.capacity, _MIN_ROWS)
        for bound in (self.max_rows, cap):
            if bound is not None:
                new = min(new, bound)
        if new < rows:
            raise CacheError(f"internal: slab of {self.max_rows} rows asked for {rows}")
        data = torch.empty((new, *self.shape), dtype=self.dtype, device=self.device)
        data[: self.capacity] = self.data
        self.data = data
        self.growths += 1

    @_normal_tensors
    def write(self, slots: torch.Tensor, rows: torch.Tensor, cap: int | None = None) -> None:
        if slots.numel():
            self.reserve(int(slots.max()) + 1, cap)
            self.data.index_copy_(0, slots.to(self.device),
                                  rows.detach().to(self.device, self.dtype))

    def read(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        index = slots.to(self.device)
        if out is not None and out.device == self.device:
            return torch.index_select(self.data, 0, index, out=out)
        rows = self.data.index_select(0, index)
        return rows if out is None else out.copy_(rows)

    @_normal_tensors
    def clear(self) -> None:
        self.data = torch.empty((0, *self.shape), dtype=self.dtype, device=self.device)


class DiskSlab:
    """Rows of one output tensor in a file: row ``s`` at byte ``s * row_nbytes``.

    Example:
        >>> import tempfile, os, torch
        >>> slab = DiskSlab(os.path.join(tempfile.mkdtemp(), "slab.bin"), (2,), torch.int16)
        >>> slab.write(torch.tensor([5, 6]), torch.tensor([[1, 2], [3, 4]], dtype=torch.int16))
        >>> slab.read(torch.tensor([6, 5])).tolist()
        [[3, 4], [1, 2]]
        >>> slab.close()
    """

    def __init__(self, path: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.path = path
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.row_nbytes = row_nbytes(self.shape, dtype)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        data = _as_bytes(rows.to(self.dtype)).numpy()
        rb = self.row_nbytes
        for pos, slot, length in runs(slots.tolist()):
            # an ndarray is a buffer; numpy's stubs do not say so to memoryview
            view = memoryview(data[pos:pos + length]).cast("B")  # type: ignore[arg-type]
            offset, done = slot * rb, 0
            while done < len(view):  # pwrite may write less than asked (signals, 2 GiB cap)
                done += os.pwrite(self._fd, view[done:], offset + done)

    def read(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``slots`` into ``out`` (a fresh CPU tensor when None, may be pinned)."""
        n = slots.numel()
        if out is None:
            out = torch.empty((n, *self.shape), dtype=self.dtype)
        if n == 0:
            return out
        buf = out.view(n, -1).view(torch.uint8).numpy() if out.numel() else None
        rb = self.row_nbytes
        if buf is None or rb == 0:
            return out
        for pos, slot, length in runs(slots.tolist()):
            # an ndarray is a buffer; numpy's stubs do not say so to memoryview
            view = memoryview(buf[pos:pos + length]).cast("B")  # type: ignore[arg-type]
            offset, done = slot * rb, 0
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got == 0:
                    raise CacheError(
                        f"The store file {self.path} ends before row {slot + (done // rb)}: it "
                        "was truncated (cleared by another process, or damaged). Re-open the "
                        "FeatureCache with overwrite=True to start fresh."
                    )
                done += got
        return out

    def flush(self) -> None:
        os.fsync(self._fd)

    def truncate(self) -> None:
        os.ftruncate(self._fd, 0)

    @property
    def file_nbytes(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
