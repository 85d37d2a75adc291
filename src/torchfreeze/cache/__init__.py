"""FeatureCache: compute a frozen, deterministic prefix once per sample, then replay it.

A frozen prefix whose inputs need no grad records no graph, but its forward
still runs on every step. If the prefix is deterministic and the data are the
same every epoch (no augmentation before it), its output for a sample never
changes, so it can be computed once and replayed. Over E epochs, with f the
prefix's share of forward FLOPs and backward ~ 2x forward, that is at most

    E(3 - 2f) / (f + 3E(1 - f))

times faster than the plain ``requires_grad=False`` loop (-> E as f -> 1).

How it works: :class:`FeatureCache` replaces ``module.forward`` by a wrapper
(an instance attribute, so the model code does not change). Outside a
:meth:`FeatureCache.keys` context the module runs normally. Inside it, every
call looks the batch's sample ids up: hits are replayed, misses are computed
(only the missing rows of the batch) and stored, and the rows are spliced back
in batch order.

Decisions worth knowing:

* **Parameter changes invalidate.** Each call fingerprints the module's
  parameters and buffers (identity, ``data_ptr`` and the in-place version
  counter). If any changed (``load_state_dict``, an in-place edit, an optimizer
  step that reached them) every stored entry is dropped, recomputed on demand,
  ``invalidations`` is incremented and a :class:`UserWarning` names the tensor.
* **Refusals** (:class:`~torchfreeze.errors.CacheError`): trainable parameters;
  active dropout or BatchNorm in train mode (batch statistics); outputs that
  are not a tensor, a flat tuple/list of tensors, or a mapping of tensors
  (HF ``ModelOutput``); inputs that require grad while grad mode is on
  (replaying would cut their gradient); no input with the batch size.
* **Batched inputs** are the tensor arguments whose first dimension equals the
  number of ids; on a mixed batch only these are sliced to the missing rows.
* **Augmentation** before the cached module makes caching wrong. It cannot be
  detected in general; ``validate=True`` hashes every sample's inputs and
  raises when a known id arrives with different input.
* **state_dict is unaffected**; pickling the whole module object
  (``torch.save(model)``) would carry the cache along: :meth:`FeatureCache.close`
  first. For a prefix that is not one submodule (HF embeddings + the first k
  encoder layers), wrap those modules in a small ``nn.Module`` that returns the
  hidden states (``BertPrefix`` in ``bench/bench_cache.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import CacheError
from ..norm import _PinnedEval, is_batchnorm

__all__ = ["FeatureCache", "Storage"]

Storage = Literal["auto", "memory", "disk"]
_STORAGES = ("auto", "memory", "disk")
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_FLOAT_STORE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ALIGN = 64  # byte alignment of tensors inside a disk chunk (any dtype views cleanly)
_INSTALLED = "_torchfreeze_feature_cache"


@dataclass(frozen=True)
class _Spec:
    """The structure of the module's output, so replayed outputs look the same."""

    kind: str  # "tensor" | "sequence" | "mapping"
    cls: type
    slots: tuple[Any, ...]  # sequence: length-long tuple of leaf index or None; mapping: keys
    dtypes: tuple[torch.dtype, ...]
    device: torch.device


def _describe(obj: object) -> str:
    return type(obj).__name__


def _flatten(out: Any, batch: int) -> tuple[_Spec, list[torch.Tensor]]:
    leaves: list[torch.Tensor] = []
    if isinstance(out, torch.Tensor):
        spec_kind, slots, leaves = "tensor", (), [out]
    elif isinstance(out, Mapping):
        slots_l = []
        for key, value in out.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CacheError(
                    f"FeatureCache can only replay tensors, but the cached module's output "
                    f"{_describe(out)}[{key!r}] is a {_describe(value)}. Cache a module that "
                    "returns a tensor, a flat tuple of tensors or a mapping of tensors "
                    "(wrap it in a small nn.Module that returns only the tensors you need)."
                )
            slots_l.append(key)
            leaves.append(value)
        spec_kind, slots = "mapping", tuple(slots_l)
    elif isinstance(out, (tuple, list)):
        slots_l = []
        for i, value in enumerate(out):
            if value is None:
                slots_l.append(None)
            elif isinstance(value, torch.Tensor):
                slots_l.append(len(leaves))
                leaves.append(value)
            else:
                raise CacheError(
                    f"FeatureCache can only replay tensors, but element {i} of the cached "
                    f"module's output {_describe(out)} is a {_describe(value)}. Cache a module "
                    "that returns a tensor or a flat tuple of tensors (wrap it in a small "
                    "nn.Module that returns only the tensors you need)."
                )
        spec_kind, slots = "sequence", tuple(slots_l)
    else:
        raise CacheError(
            f"FeatureCache can only replay tensors, but the cached module returned a "
            f"{_describe(out)}. Cache a module that returns a tensor, a flat tuple of tensors "
            "or a mapping of tensors (e.g. a HF ModelOutput)."
        )
    if not leaves:
        raise CacheError(
            f"The cached module returned {_describe(out)} with no tensor in it; nothing to cache."
        )
    for i, leaf in enumerate(leaves):
        if leaf.dim() == 0 or leaf.shape[0] != batch:
            raise CacheError(
                f"Output tensor {i} of the cached module has shape {tuple(leaf.shape)}, but the "
                f"batch has {batch} sample ids: every output tensor must have one row per "
                "sample (batch dimension first). Cache a module whose outputs are per-sample."
            )
    spec = _Spec(
        spec_kind, type(out), slots, tuple(t.dtype for t in leaves), leaves[0].device
    )
    return spec, leaves


def _unflatten(spec: _Spec, leaves: list[torch.Tensor]) -> Any:
    if spec.kind == "tensor":
        return leaves[0]
    if spec.kind == "mapping":
        return spec.cls(**dict(zip(spec.slots, leaves)))
    items = [None if s is None else leaves[s] for s in spec.slots]
    if spec.cls in (tuple, list):
        return spec.cls(items)
    try:  # namedtuple-like
        return spec.cls(*items)
    except TypeError:
        return tuple(items)


def _tensors_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def _is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _take(value: Any, batch: int, index: torch.Tensor) -> Any:
    if _is_batched(value, batch):
        return value.index_select(0, index.to(value.device))
    return value


def _remove_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class FeatureCache:
    """Replay the outputs of a frozen, deterministic module per sample id.

    Args:
        module: the frozen prefix to cache (all parameters ``requires_grad=False``,
            no active dropout, BatchNorm in eval mode). Its ``forward`` is wrapped
            until :meth:`close`.
        max_bytes: byte budget. With ``storage="auto"`` (default) it bounds RAM and
            entries past it spill to memory-mapped files on disk; with ``"memory"``
            entries past it are not stored (recomputed each time, counted as
            misses); with ``"disk"`` it bounds the files. ``None``: no bound.
        dtype: store floating outputs in this dtype (``torch.float16`` or
            ``torch.bfloat16`` halve the bytes). Every output - computed or
            replayed - is rounded the same way, so results never depend on
            whether a sample was a hit; the accuracy effect is measured in
            ``bench/bench_cache.py``.
        storage: ``"auto"`` (RAM, then disk past ``max_bytes``), ``"memory"`` or
            ``"disk"``. Disk chunks are raw files mapped with ``torch.from_file``
            (the OS pages them in and out like ``numpy.memmap``; any dtype,
            including bfloat16). They live in a fresh temporary folder (inside
            ``directory`` when given) removed by :meth:`clear`/:meth:`close`.
        directory: parent folder for disk chunks (default: the system temp dir).
        validate: hash every sample's batched inputs and raise
            :class:`~torchfreeze.errors.CacheError` when a known id comes back with
            different input (data augmentation, a reshuffled dataset). Costs a
            hash of the inputs per call.
        pin_eval: keep ``module`` in eval mode through every ``model.train()``
            (dropout off in the frozen prefix, the usual choice for feature
            extraction); undone by :meth:`close`.

    Attributes:
        hits: samples replayed. misses: samples computed. invalidations: times the
        stored entries were dropped because the module's tensors changed.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = tfz.freeze(model, "0")
        >>> cache = tfz.FeatureCache(model[0])
        >>> x, ids = torch.randn(4, 8), torch.arange(4)
        >>> with cache.keys(ids):
        ...     first = model(x)
        >>> with cache.keys(ids):
        ...     again = model(x)        # model[0] does not run: its rows are replayed
        >>> torch.equal(first, again), cache.hits, cache.misses
        (True, 4, 4)
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        storage: Storage = "auto",
        directory: str | os.PathLike[str] | None = None,
        validate: bool = False,
        pin_eval: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise CacheError(
                f"FeatureCache needs an nn.Module (the frozen prefix), got {_describe(module)}."
            )
        if storage not in _STORAGES:
            raise CacheError(
                f"storage={storage!r} is not a FeatureCache storage; use one of "
                f"{', '.join(map(repr, _STORAGES))}."
            )
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise CacheError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}.")
        if dtype is not None and dtype not in _FLOAT_STORE:
            raise CacheError(
                f"dtype={dtype} is not a floating storage dtype; use torch.float16, "
                "torch.bfloat16, torch.float32 or None (keep the output dtype)."
            )
        if isinstance(module.__dict__.get(_INSTALLED), FeatureCache):
            raise CacheError(
                f"This {_describe(module)} already has a FeatureCache; call close() on it "
                "before creating another one."
            )
        if "train" in module.__dict__ and pin_eval:
            raise CacheError(
                f"pin_eval=True, but this {_describe(module)} already has a pinned train mode "
                "(a torchfreeze BatchNorm policy?). Leave pin_eval off, or put it in eval yourself."
            )
        self._module = module
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.storage: Storage = storage
        self.directory = None if directory is None else os.fspath(directory)
        self.validate = validate
        self.pin_eval = pin_eval
        if not pin_eval:
            self._check_deterministic()
        self._check_frozen()

        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._entries: dict[Hashable, tuple[torch.Tensor, ...]] = {}
        self._hashes: dict[Hashable, bytes] = {}
        self._spec: _Spec | None = None
        self._memory_nbytes = 0
        self._disk_nbytes = 0
        self._chunk_dir: str | None = None
        self._chunks = 0
        self._dir_finalizer: weakref.finalize | None = None
        self._active: list[Hashable] | None = None
        self._fingerprint = self._take_fingerprint()
        self._fast_fingerprint: tuple[int, ...] = ()

        # The wrapper is an instance attribute: nn.Module.__call__ looks `forward` up on
        # the instance, so the user's model code and its hooks stay as they are.
        self._had_forward = "forward" in module.__dict__
        self._orig_forward = module.forward
        module.__dict__["forward"] = self._forward
        module.__dict__[_INSTALLED] = self
        if pin_eval:
            module.__dict__["train"] = _PinnedEval(module)
            type(module).train(module, False)

    # ----------------------------------------------------------------- public
    @property
    def module(self) -> nn.Module:
        """The cached module."""
        return self._module

    @property
    def nbytes(self) -> int:
        """Bytes of stored outputs, RAM and disk together."""
        return self._memory_nbytes + self._disk_nbytes

    @property
    def memory_nbytes(self) -> int:
        """Bytes of stored outputs held in RAM (or on the module's device)."""
        return self._memory_nbytes

    @property
    def disk_nbytes(self) -> int:
        """Bytes of stored outputs in memory-mapped files."""
        return self._disk_nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._entries

    def __repr__(self) -> str:
        return (
            f"FeatureCache({_describe(self._module)}, entries={len(self)}, hits={self.hits}, "
            f"misses={self.misses}, nbytes={self.nbytes}, storage={self.storage!r})"
        )

    @contextlib.contextmanager
    def keys(self, sample_ids: Iterable[Hashable] | torch.Tensor) -> Iterator[FeatureCache]:
        """Make the cached module replay per sample while the context is active.

        Args:
            sample_ids: one id per sample of the batch, in batch order: a 1-D integer
                tensor or a sequence of hashables (ints, strings). An id must name the
                same input every time (a dataset index, a file name).

        Example:
            >>> import torch, torch.nn as nn, torchfreeze as tfz
            >>> enc = nn.Linear(3, 3).requires_grad_(False)
            >>> cache = tfz.FeatureCache(enc)
            >>> with cache.keys([10, 11]):
            ...     _ = enc(torch.ones(2, 3))
            >>> len(cache)
            2
        """
        ids = self._normalize_ids(sample_ids)
        if self._active is not None:
            raise CacheError(
                "cache.keys() contexts cannot be nested: one batch of ids is already active."
            )
        self._active = ids
        try:
            yield self
        finally:
            self._active = None

    def clear(self) -> None:
        """Drop every stored output and input hash, delete disk chunks, reset counters."""
        self._drop_entries()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def close(self) -> None:
        """Clear, then give the module back its own ``forward`` (and train mode)."""
        self._drop_entries()
        d = self._module.__dict__
        if d.get(_INSTALLED) is self:
            del d[_INSTALLED]
            if self._had_forward:
                d["forward"] = self._orig_forward
            else:
                d.pop("forward", None)
            if self.pin_eval and isinstance(d.get("train"), _PinnedEval):
                del d["train"]

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- checks
    def _check_frozen(self) -> None:
        trainable = [n for n, p in self._module.named_parameters() if p.requires_grad]
        if trainable:
            shown = ", ".join(trainable[:4]) + (", ..." if len(trainable) > 4 else "")
            raise CacheError(
                f"FeatureCache cannot cache this {_describe(self._module)}: {len(trainable)} "
                f"of its parameters are trainable ({shown}). A replayed output carries no "
                "gradient to them. Freeze the module first (tfz.freeze(model, '<its name>')) "
                "or cache a smaller, fully frozen prefix."
            )

    def _check_deterministic(self) -> None:
        for name, m in self._module.named_modules():
            where = name or "<root>"
            if isinstance(m, _DROPOUT) and m.training and m.p > 0:
                raise CacheError(
                    f"FeatureCache cannot cache this {_describe(self._module)}: dropout "
                    f"{where!r} (p={m.p}) is active because it is in train mode, so the "
                    "output changes from call to call. Pass pin_eval=True to keep the cached "
                    "module in eval mode through model.train(), or call .eval() on it."
                )
            if is_batchnorm(m) and (
                m.training or getattr(m, "running_mean", True) is None
            ):
                raise CacheError(
                    f"FeatureCache cannot cache this {_describe(self._module)}: BatchNorm "
                    f"{where!r} normalises with batch statistics (train mode, or no running "
                    "statistics), so a sample's output depends on its batch. Freeze it with "
                    "tfz.freeze(..., bn='eval') (the default: pinned in eval), pass "
                    "pin_eval=True, or call .eval() on it."
                )

    def _take_fingerprint(self) -> dict[str, tuple[int, int, int]]:
        # _version counts in-place writes (optimizer steps, copy_, load_state_dict);
        # data_ptr and id catch `.data =` and replaced tensors.
        m = self._module
        return {
            name: (id(t), t.data_ptr(), t._version)
            for name, t in (*m.named_parameters(), *m.named_buffers())
        }

    def _scan(self) -> None:
        """Every-call checks in one cheap walk (no names); names only on a finding."""
        fast: list[int] = []
        for m in self._module.modules():
            if m.training and (isinstance(m, _DROPOUT) or is_batchnorm(m)):
                self._check_deterministic()
            for tensors in (m._parameters, m._buffers):
                for t in tensors.values():
                    if t is None:
                        continue
                    if t.requires_grad and isinstance(t, nn.Parameter):
                        self._check_frozen()
                    fast += (id(t), t.data_ptr(), t._version)
        key = tuple(fast)
        if key != self._fast_fingerprint:
            self._fast_fingerprint = key
            self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        now = self._take_fingerprint()
        if now == self._fingerprint:
            return
        changed = sorted(k for k in now.keys() | self._fingerprint.keys()
                         if now.get(k) != self._fingerprint.get(k))
        dropped = len(self._entries)
        self._fingerprint = now
        if dropped:
            self._drop_entries()
            self.invalidations += 1
            warnings.warn(
                f"FeatureCache: {changed[0]!r} of the cached {_describe(self._module)} changed "
                f"since its outputs were stored ({len(changed)} tensor(s) changed); the "
                f"{dropped} stored entries were dropped and will be recomputed.",
                UserWarning,
                stacklevel=4,
            )

    def _normalize_ids(self, sample_ids: Any) -> list[Hashable]:
        if isinstance(sample_ids, torch.Tensor):
            if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.is_complex():
                raise CacheError(
                    f"sample_ids must be a 1-D integer tensor or a sequence of hashables, got a "
                    f"{sample_ids.dtype} tensor of shape {tuple(sample_ids.shape)}."
                )
            return sample_ids.tolist()
        if hasattr(sample_ids, "tolist") and not isinstance(sample_ids, (str, bytes)):
            sample_ids = sample_ids.tolist()  # numpy arrays
        if isinstance(sample_ids, (str, bytes)) or not isinstance(sample_ids, Iterable):
            raise CacheError(
                f"sample_ids must be a sequence with one id per sample, got "
                f"{_describe(sample_ids)}."
            )
        ids = list(sample_ids)
        for i in ids:
            if not isinstance(i, Hashable) or isinstance(i, float):
                raise CacheError(
                    f"sample id {i!r} ({_describe(i)}) cannot be a cache key; use ints or strings "
                    "(a dataset index, a file name)."
                )
        return ids

    # --------------------------------------------------------------- forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        ids = self._active
        if ids is None:
            return self._orig_forward(*args, **kwargs)
        return self._cached_forward(ids, args, kwargs)

    def _cached_forward(self, ids: list[Hashable], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        batch = len(ids)
        self._scan()
        tensors = list(_tensors_in(args, kwargs))
        if not any(_is_batched(t, batch) for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors) or "no tensors"
            raise CacheError(
                f"cache.keys() was given {batch} sample ids, but no input of the cached "
                f"{_describe(self._module)} has {batch} rows (inputs: {shapes}). Pass one id "
                "per sample of the batch, in batch order."
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise CacheError(
                f"An input of the cached {_describe(self._module)} requires grad, so replaying "
                "a stored output would silently cut its gradient. Cache a prefix whose inputs "
                "are data (not trainable activations), or run this call outside cache.keys()."
            )
        digests = self._digest_inputs(args, kwargs, batch) if self.validate else None

        hit_pos: list[int] = []
        miss_pos: list[int] = []
        for pos, key in enumerate(ids):
            (hit_pos if key in self._entries else miss_pos).append(pos)
        if digests is not None:
            self._check_digests(ids, digests)

        if not miss_pos:
            leaves = self._replay([ids[p] for p in hit_pos])
            self.hits += batch
            assert self._spec is not None
            return _unflatten(self._spec, leaves)

        if not hit_pos:
            out = self._orig_forward(*args, **kwargs)
            spec, computed = _flatten(out, batch)
        else:
            index = torch.tensor(miss_pos, dtype=torch.long)
            sub_args = tuple(_take(a, batch, index) for a in args)
            sub_kwargs = {k: _take(v, batch, index) for k, v in kwargs.items()}
            out = self._orig_forward(*sub_args, **sub_kwargs)
            spec, computed = _flatten(out, len(miss_pos))
        self._check_spec(spec)
        stored = [self._to_store(t) for t in computed]
        self._store([ids[p] for p in miss_pos], stored)
        if digests is not None:
            for p in miss_pos:
                self._hashes.setdefault(ids[p], digests[p])
        self.misses += len(miss_pos)
        self.hits += len(hit_pos)

        # Computed rows go out rounded exactly like stored ones, so a result never
        # depends on whether its sample was a hit.
        fresh = [s.to(dtype=t.dtype) if s.dtype != t.dtype else t
                 for s, t in zip(stored, computed)]
        if not hit_pos:
            if self.dtype is None:
                return out
            return _unflatten(spec, fresh)
        replayed = self._replay([ids[p] for p in hit_pos])
        hit_index = torch.tensor(hit_pos, dtype=torch.long)
        miss_index = torch.tensor(miss_pos, dtype=torch.long)
        merged = []
        for i, (r, c) in enumerate(zip(replayed, fresh)):
            if r.shape[1:] != c.shape[1:]:
                raise CacheError(
                    f"Output tensor {i} of the cached module has per-sample shape "
                    f"{tuple(c.shape[1:])} in this batch but {tuple(r.shape[1:])} for the cached "
                    "samples (dynamic padding?). Pad inputs to a fixed length when caching."
                )
            full = torch.empty((batch, *c.shape[1:]), dtype=c.dtype, device=c.device)
            full.index_copy_(0, miss_index.to(c.device), c)
            full.index_copy_(0, hit_index.to(c.device), r.to(c.device))
            merged.append(full)
        return _unflatten(spec, merged)

    def _check_spec(self, spec: _Spec) -> None:
        if self._spec is None:
            self._spec = spec
        elif (spec.kind, spec.cls, spec.slots, spec.dtypes) != (
            self._spec.kind, self._spec.cls, self._spec.slots, self._spec.dtypes
        ):
            raise CacheError(
                f"The cached {_describe(self._module)} returned a differently structured output "
                f"({spec.cls.__name__} with {len(spec.dtypes)} tensor(s) of {spec.dtypes}) than "
                f"the one already stored ({self._spec.cls.__name__} with "
                f"{len(self._spec.dtypes)} of {self._spec.dtypes}); different call arguments? "
                "Use one FeatureCache per way of calling the module, or clear() it."
            )

    def _to_store(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        # Always a copy: the caller may modify the returned output in place.
        return t.detach().to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)

    def _replay(self, keys: list[Hashable]) -> list[torch.Tensor]:
        assert self._spec is not None
        rows = [self._entries[k] for k in keys]
        out = []
        for i, dtype in enumerate(self._spec.dtypes):
            column = [r[i] for r in rows]
            try:
                stacked = torch.stack(column)
            except RuntimeError as exc:
                shapes = sorted({tuple(c.shape) for c in column})
                raise CacheError(
                    f"Stored rows of output tensor {i} have different shapes {shapes} (dynamic "
                    "padding?), so they cannot be replayed as one batch. Pad inputs to a fixed "
                    "length when caching."
                ) from exc
            out.append(stacked.to(device=self._spec.device, dtype=dtype))
        return out

    # --------------------------------------------------------------- storage
    def _store(self, keys: list[Hashable], leaves: list[torch.Tensor]) -> None:
        # Duplicate ids in one batch: store the first occurrence only.
        first: dict[Hashable, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        rows = list(first.values())
        row_bytes = sum(t[0].nbytes for t in leaves)
        mem_rows: list[int] = []
        disk_rows: list[int] = []
        mem_free = disk_free = None
        if self.max_bytes is not None:
            mem_free = self.max_bytes - self._memory_nbytes
            disk_free = self.max_bytes - self._disk_nbytes
        for row in rows:
            if self.storage != "disk" and (mem_free is None or row_bytes <= mem_free):
                mem_rows.append(row)
                mem_free = None if mem_free is None else mem_free - row_bytes
            elif self.storage == "auto" or (
                self.storage == "disk" and (disk_free is None or row_bytes <= disk_free)
            ):
                disk_rows.append(row)
                if self.storage == "disk" and disk_free is not None:
                    disk_free -= row_bytes
        if mem_rows:
            if mem_rows == list(range(len(keys))):
                chunk = leaves
            else:
                index = torch.tensor(mem_rows, dtype=torch.long, device=leaves[0].device)
                chunk = [t.index_select(0, index) for t in leaves]
            self._memory_nbytes += row_bytes * len(mem_rows)
            self._add_rows(keys, mem_rows, chunk)
        if disk_rows:
            self._add_rows(keys, disk_rows, self._write_chunk(leaves, disk_rows))
            self._disk_nbytes += row_bytes * len(disk_rows)

    def _add_rows(self, keys: list[Hashable], rows: list[int], chunk: list[torch.Tensor]) -> None:
        for j, row in enumerate(rows):
            self._entries[keys[row]] = tuple(t[j] for t in chunk)

    def _write_chunk(self, leaves: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
        if self._chunk_dir is None:
            if self.directory is not None:
                os.makedirs(self.directory, exist_ok=True)
            self._chunk_dir = tempfile.mkdtemp(prefix="torchfreeze-cache-", dir=self.directory)
            self._dir_finalizer = weakref.finalize(self, _remove_dir, self._chunk_dir)
        index = torch.tensor(rows, dtype=torch.long, device=leaves[0].device)
        parts = [t.index_select(0, index).cpu() for t in leaves]
        offsets, total = [], 0
        for p in parts:
            offsets.append(total)
            total += -(-p.nbytes // _ALIGN) * _ALIGN
        path = os.path.join(self._chunk_dir, f"chunk-{self._chunks:06d}.bin")
        self._chunks += 1
        raw = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        mapped = []
        for p, off in zip(parts, offsets):
            view = raw[off:off + p.nbytes].view(p.dtype).view(p.shape)
            view.copy_(p)
            mapped.append(view)
        return mapped

    def _drop_entries(self) -> None:
        self._entries.clear()
        self._hashes.clear()
        self._spec = None
        self._memory_nbytes = 0
        self._disk_nbytes = 0
        if self._dir_finalizer is not None:
            self._dir_finalizer()  # the maps die with the entries; remove the folder now
            self._dir_finalizer = None
        self._chunk_dir = None
        self._chunks = 0

    # ------------------------------------------------------------ validation
    def _digest_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                       batch: int) -> list[bytes]:
        hashers = [hashlib.blake2b(digest_size=16) for _ in range(batch)]
        for value in (*args, *(v for _, v in sorted(kwargs.items()))):
            if _is_batched(value, batch):
                flat = value.detach().reshape(batch, -1).contiguous()
                if flat.dtype == torch.bool:
                    flat = flat.to(torch.uint8)
                raw = flat.view(torch.uint8).cpu()
                try:
                    arr = raw.numpy()
                except RuntimeError as exc:  # torch built without numpy
                    raise CacheError("validate=True needs numpy to hash inputs.") from exc
                tag = f"{value.dtype}{tuple(value.shape[1:])}".encode()
                for i in range(batch):
                    hashers[i].update(tag)
                    hashers[i].update(arr[i].tobytes())
            else:
                tag = repr(value if not isinstance(value, torch.Tensor)
                           else (value.dtype, tuple(value.shape))).encode()
                for h in hashers:
                    h.update(tag)
        return [h.digest() for h in hashers]

    def _check_digests(self, ids: list[Hashable], digests: list[bytes]) -> None:
        seen: dict[Hashable, bytes] = {}
        for key, digest in zip(ids, digests):
            known = self._hashes.get(key, seen.get(key))
            if known is not None and known != digest:
                raise CacheError(
                    f"Sample id {key!r} came back with a different input than the one its "
                    "output was cached from (data augmentation or a changed dataset before the "
                    "cached module?). Caching is only correct when an id always names the same "
                    "input: move augmentation after the cached prefix, or do not cache."
                )
            seen.setdefault(key, digest)
