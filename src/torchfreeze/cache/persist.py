"""What makes a store directory safe to share and to re-open.

* :class:`SharedLog` is the index of a store that several processes of one node
  use at once (DDP ranks, an LR sweep). Slots come from a counter behind an
  exclusive ``flock``; an entry becomes visible to everyone when its 16-byte
  record ``(id, slot | check << 32)`` is appended to ``index.log``, and the
  record is appended only after ``pwrite`` returned for every byte of the row.
  A process killed at any point leaves either no record (its rows are never
  read), or whole records for rows that are whole: a torn record at the tail
  is shorter than 16 bytes, ignored by readers and cut off by the next writer.
* :func:`fingerprint` hashes the content of every parameter and buffer of the
  prefix; :class:`StoreMeta` is the small ``meta.json`` that refuses a store
  made by other weights, another boundary or another dtype.

Ordering guarantees relied on (all hold for a local file system such as ext4,
xfs or tmpfs on Linux, within one kernel): ``pwrite`` data is visible to every
later ``pread`` of any process once the call returned (one page cache);
``flock`` excludes across processes and is released when a process dies;
a write is never visible before the writes that returned ahead of it. A
network file system (NFS, Lustre) does not give the first two across nodes,
so use one store per node there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CacheError
from .index import IdBatch, IdIndex

__all__ = ["SharedLog", "StoreMeta", "fingerprint", "key_of", "load_structure", "open_meta",
           "read_meta", "save_structure"]

_RECORD = 16
_VALID = 1 << 30  # set in every check, so a zero-filled record never passes
_HASHED = 1 << 31  # the id is a 63-bit hash of a non-integer id
_MUL_ID = 0x5851F42D4C957F2D
_MUL_SLOT = 0x14057B7EF767814F


def key_of(sample_id: Hashable) -> tuple[str, int]:
    """A process-independent 63-bit key for a non-integer id (``str``, ``bytes``, tuples).

    Python's ``hash()`` of a string differs between processes, so the key is a
    blake2b of a canonical encoding. Ids whose ``repr`` is not stable across
    processes (objects with addresses) are refused.
    """

    def encode(obj: Any) -> str:
        if isinstance(obj, bool) or not isinstance(obj, (int, str, bytes, tuple)):
            raise CacheError(
                f"sample id {obj!r} ({type(obj).__name__}) cannot key a store on disk (path=): "
                "use ints, strings, bytes or tuples of them, which mean the same in every process."
            )
        if isinstance(obj, tuple):
            return "(" + ",".join(encode(o) for o in obj) + ")"
        return f"{type(obj).__name__}:{obj!r}"

    digest = hashlib.blake2b(encode(sample_id).encode(), digest_size=8).digest()
    return ("#", int.from_bytes(digest, "little") >> 1)


def _checks(keys: torch.Tensor, slots: torch.Tensor, hashed: torch.Tensor) -> torch.Tensor:
    mixed = keys * _MUL_ID + slots * _MUL_SLOT  # int64 arithmetic wraps: a cheap mixer
    return ((mixed >> 33) & (_VALID - 1)) | _VALID | torch.where(hashed, _HASHED, 0)


class SharedLog:
    """The index of a store directory shared by processes (see the module docstring).

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> a, b = SharedLog(d), SharedLog(d)       # two processes, say
        >>> start = a.reserve(2)
        >>> # ... write the rows of slots start, start + 1, then publish them:
        >>> a.commit(torch.tensor([10, 11]), torch.tensor([start, start + 1]))
        tensor([True, True])
        >>> b.lookup(torch.tensor([11, 12])).tolist()
        [1, -1]
        >>> a.close(); b.close()
    """

    def __init__(self, directory: str, *, max_rows: int | None = None) -> None:
        self.directory = directory
        self.max_rows = max_rows
        os.makedirs(directory, exist_ok=True)
        self._lock = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._alloc = os.open(os.path.join(directory, "alloc"), os.O_RDWR | os.O_CREAT, 0o644)
        self._log = os.open(os.path.join(directory, "index.log"), os.O_RDWR | os.O_CREAT, 0o644)
        self.index = IdIndex()
        self._offset = 0
        self.refresh()

    @contextlib.contextmanager
    def locked(self, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        fcntl.flock(self._lock, mode)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------- ids
    def keys(self, ids: IdBatch) -> IdBatch:
        """Ids as this log stores them: ints stay, other ids become ``("#", hash)``."""
        if isinstance(ids, torch.Tensor):
            return ids
        return [k if type(k) is int else key_of(k) for k in ids]

    def lookup(self, ids: IdBatch) -> torch.Tensor:
        keys = self.keys(ids)
        slots = self.index.lookup(keys)
        if bool((slots < 0).any()):
            self.refresh()  # another process may have published them since
            slots = self.index.lookup(keys)
        return slots

    # ------------------------------------------------------------- writing
    def reserve(self, count: int) -> int:
        """First of ``count`` consecutive slots that no other process will get.

        Returns fewer than asked only through :attr:`max_rows`: see :meth:`reserve_upto`.
        """
        start, got = self.reserve_upto(count)
        if got < count:
            raise CacheError(f"the store is full ({self.max_rows} rows)")
        return start

    def reserve_upto(self, count: int) -> tuple[int, int]:
        with self.locked():
            raw = os.pread(self._alloc, 8, 0)
            start = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            got = count if self.max_rows is None else max(0, min(count, self.max_rows - start))
            os.pwrite(self._alloc, (start + got).to_bytes(8, "little"), 0)
        return start, got

    def commit(self, ids: IdBatch, slots: torch.Tensor) -> torch.Tensor:
        """Publish rows already written; returns which ids were new (others won a race)."""
        keys = self.keys(ids)
        with self.locked():
            self._refresh_locked()
            fresh = self.index.lookup(keys) < 0
            if isinstance(keys, torch.Tensor):
                raw_keys = keys[fresh]
                new_keys: IdBatch = raw_keys
                hashed = torch.zeros(int(fresh.sum()), dtype=torch.bool)
            else:
                new_keys = [k for k, f in zip(keys, fresh.tolist()) if f]
                raw_keys = torch.tensor([k[1] if isinstance(k, tuple) else k for k in new_keys],
                                        dtype=torch.long)
                hashed = torch.tensor([isinstance(k, tuple) for k in new_keys], dtype=torch.bool)
            new_slots = slots[fresh]
            if new_slots.numel():
                checks = _checks(raw_keys, new_slots, hashed)
                records = torch.stack([raw_keys, new_slots | (checks << 32)], dim=1)
                size = os.fstat(self._log).st_size
                end = size - size % _RECORD
                if end != size:  # a writer died mid-record: cut the torn tail
                    os.ftruncate(self._log, end)
                # an ndarray is a buffer; numpy's stubs do not say so to memoryview
                data = memoryview(records.numpy()).cast("B")  # type: ignore[arg-type]
                done = 0
                while done < len(data):
                    done += os.pwrite(self._log, data[done:], end + done)
                self.index.insert(new_keys, new_slots)
                self._offset = end + len(data)
        return fresh

    # ------------------------------------------------------------- reading
    def refresh(self) -> None:
        """Take in the records other processes appended since the last look."""
        with self.locked(fcntl.LOCK_SH):
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        size = os.fstat(self._log).st_size
        end = size - size % _RECORD
        if end < self._offset:  # cleared by another process
            self.index.clear()
            self._offset = 0
        if end == self._offset:
            return
        raw = bytearray(os.pread(self._log, end - self._offset, self._offset))
        records = torch.frombuffer(raw, dtype=torch.long).view(-1, 2)
        keys, packed = records[:, 0], records[:, 1]
        slots = packed & 0xFFFFFFFF
        checks = (packed >> 32) & 0xFFFFFFFF
        hashed = (checks & _HASHED) != 0
        ok = checks == _checks(keys, slots, hashed)
        self._offset = end
        if not bool(ok.all()):
            keys, slots, hashed = keys[ok], slots[ok], hashed[ok]
        plain = ~hashed
        if bool(plain.any()):
            self._insert_new(keys[plain].clone(), slots[plain].clone())
        if bool(hashed.any()):
            self._insert_new([("#", k) for k in keys[hashed].tolist()], slots[hashed].clone())

    def _insert_new(self, keys: IdBatch, slots: torch.Tensor) -> None:
        # A commit never publishes an id twice; this guards logs written by older code.
        fresh = self.index.lookup(keys) < 0
        if isinstance(keys, torch.Tensor):
            keys, slots = keys[fresh], slots[fresh]
            uniq, inverse = torch.unique(keys, return_inverse=True)
            if uniq.numel() != keys.numel():
                first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.long)
                first.scatter_reduce_(0, inverse, torch.arange(keys.numel()), "amin")
                keys, slots = keys[first], slots[first]
            self.index.insert(keys, slots)
        else:
            seen: set[Hashable] = set()
            keep = []
            for i, (k, f) in enumerate(zip(keys, fresh.tolist())):
                if f and k not in seen:
                    seen.add(k)
                    keep.append(i)
            self.index.insert([keys[i] for i in keep], slots[torch.tensor(keep, dtype=torch.long)])

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------- lifecycle
    def clear(self) -> None:
        """Forget every entry, for every process (call it when no other process uses the store)."""
        with self.locked():
            os.ftruncate(self._log, 0)
            os.pwrite(self._alloc, (0).to_bytes(8, "little"), 0)
            self.index.clear()
            self._offset = 0

    def flush(self) -> None:
        os.fsync(self._log)

    def close(self) -> None:
        for fd in (self._log, self._alloc, self._lock):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log = self._alloc = self._lock = -1


# ---------------------------------------------------------------- metadata
def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of one tensor: its dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(module: nn.Module) -> dict[str, str]:
    """Content hash of every parameter and buffer (name -> hex digest).

    The identity of a tensor says nothing across processes; its bytes, dtype and
    shape do. BERT-base's 110 M parameters hash in about half a second.

    Example:
        >>> import torch.nn as nn
        >>> fp = fingerprint(nn.Linear(2, 2))
        >>> sorted(fp), len(fp["weight"])
        (['bias', 'weight'], 32)
    """
    out: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)):
        if t is None:
            continue
        key = id(t)
        if key not in seen:
            seen[key] = tensor_digest(t)
        out[name] = seen[key]
    return out


@dataclass
class StoreMeta:
    """The contents of ``meta.json``: what a stored entry was computed from."""

    boundary: str
    dtype: str
    weights: dict[str, str]
    prefix: list[str] = field(default_factory=list)
    torch: str = field(default_factory=lambda: torch.__version__)
    format: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: StoreMeta) -> list[str]:
        """Human-readable reasons why entries made under ``self`` do not fit ``other``."""
        found = []
        if self.format != other.format:
            found.append(f"store format {self.format} (this torchfreeze writes {other.format})")
        if self.boundary != other.boundary:
            found.append(f"boundary {self.boundary!r} (now {other.boundary!r})")
        if self.dtype != other.dtype:
            found.append(f"dtype {self.dtype} (now {other.dtype})")
        if self.prefix != other.prefix:
            found.append(f"prefix modules {self.prefix} (now {other.prefix})")
        changed = sorted(n for n in self.weights.keys() | other.weights.keys()
                         if self.weights.get(n) != other.weights.get(n))
        if changed:
            names = ", ".join(repr(n) for n in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            found.append(f"weights: {len(changed)} tensor(s) differ ({names}{more})")
        if self.torch != other.torch:
            found.append(f"torch {self.torch} (now {other.torch})")
        return found


def read_meta(directory: str) -> StoreMeta | None:
    """The ``meta.json`` of a store directory, None when there is none yet."""
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return StoreMeta(**json.load(fh))
    except (ValueError, TypeError) as exc:
        raise CacheError(
            f"{path} is not a torchfreeze store description ({exc}). Pass overwrite=True to "
            "start a fresh store there, or choose another path."
        ) from exc


def save_structure(directory: str, structure: dict[str, Any]) -> None:
    """Write what replay needs besides the rows (output structure, prefix placeholders)."""
    target = os.path.join(directory, "structure.pt")
    if os.path.exists(target):
        return
    tmp = f"{target}.tmp{os.getpid()}"
    torch.save(structure, tmp)
    os.replace(tmp, target)  # whole or absent, also when two ranks write it at once


def load_structure(directory: str) -> dict[str, Any] | None:
    target = os.path.join(directory, "structure.pt")
    if not os.path.exists(target):
        return None
    # Our own file (output classes, pytree specs): not a tensor-only checkpoint.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation
        structure: dict[str, Any] = torch.load(target, weights_only=False)
        return structure


def open_meta(directory: str, meta: StoreMeta, *, overwrite: bool = False) -> bool:
    """Check (or write) ``directory/meta.json``; True when existing entries are reusable.

    With ``overwrite=True`` a store made under other settings is emptied first.
    Raises :class:`~torchfreeze.errors.CacheError` naming every difference otherwise.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "meta.json")
    lock = os.open(os.path.join(directory, "meta.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two ranks opening at once agree on one meta.json
        try:
            existing = read_meta(directory)
        except CacheError:
            if not overwrite:
                raise
            existing = None
        if existing is not None:
            diff = existing.differences(meta)
            if not diff:
                return True
            if not overwrite:
                raise CacheError(
                    f"The feature store at {directory} was computed with a different prefix, so "
                    f"its entries would be stale: " + "; ".join(diff) + ". Pass overwrite=True "
                    "to empty it and start fresh, or use another path= for this model."
                )
        _empty(directory)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(meta.to_dict(), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of it
        return False
    finally:
        os.close(lock)


_OURS = ("meta.json", "meta.lock")


def _ours(name: str) -> bool:
    return name in _OURS or name.startswith(("ns-", "meta.json.tmp"))


def check_store_folder(directory: str) -> None:
    """Refuse, before anything is patched, a ``path=`` that cannot be a store: a file, or
    a folder of files that are not a torchfreeze store."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CacheError(
            f"path={directory!r} is a file, not a folder: a feature store is a folder of slab "
            "files and meta.json. Point path= at a new or empty folder."
        )
    if os.path.isdir(directory):
        names = os.listdir(directory)
        foreign = sorted(n for n in names if not _ours(n))
        if foreign and "meta.json" not in names:
            raise CacheError(
                f"path={directory!r} holds files that are not a torchfreeze store "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); nothing was "
                "changed. Point path= at an empty or new folder."
            )


def _empty(directory: str) -> None:
    import shutil

    foreign = sorted(n for n in os.listdir(directory) if not _ours(n))
    if foreign:
        raise CacheError(
            f"path={directory!r} holds files that are not a torchfreeze store "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); nothing was "
            "deleted. Point path= at an empty or new folder."
        )
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name == "meta.lock":
            continue
        if os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
