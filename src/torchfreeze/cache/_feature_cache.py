"""The public FeatureCache: the keys() protocol, namespaces, refusals, replay and store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .. import _pinning as pinning
from .._compat import pytree
from ..errors import CacheError
from . import _guards as guards
from ._guards import is_batched as _is_batched
from ._hook import (
    Clock,
    Discovery,
    OutputSpec,
    PatchedForward,
    Placeholder,
    PrefixSpec,
    Taint,
    bypass_error,
    describe,
    flatten_output,
    has_placeholder,
    install,
    patches_of,
    unflatten_output,
    uninstall,
)
from ._path import PathStore
from ._storage import STORAGE_MODES, IdBatch, Storage, StorageBudget, StorageMode
from .store import SlabStore

_FLOAT_STORE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_Key = tuple[int, Any]


class _StopAtBoundary(Exception):
    """fill(): the boundary's rows are stored, the rest of the forward is not needed."""


class _Namespace:
    """Entries of one (call index, autocast state): stored rows + how to rebuild outputs."""

    __slots__ = ("dtypes", "hashes", "key", "prefix_specs", "saved", "shapes", "signature",
                 "spec", "storage")

    def __init__(self, key: _Key, prefix_known_empty: bool) -> None:
        self.key = key
        self.saved = False  # path=: its structure.pt is written
        self.storage: Storage | None = None
        self.spec: OutputSpec | None = None
        # id(prefix module) -> output structure per call, recorded on a computed pass;
        # replay needs it to hand out placeholders.
        self.prefix_specs: dict[int, list[PrefixSpec]] | None = {} if prefix_known_empty \
            else None
        self.hashes: dict[Hashable, bytes] = {}
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[torch.dtype] = []
        # what the prefix (its first module) was called with when the entries were
        # computed: no entry is replayed, and none stored, under another signature
        self.signature: Any = None


class _Segment:
    """One stretch of a forward: from the first patched call to the boundary's return."""

    __slots__ = ("calls", "detector", "digests", "hit_index", "leaves", "miss_index", "ns",
                 "replay", "running", "slots", "specs")

    def __init__(self, ns: _Namespace, replay: bool, slots: torch.Tensor | None) -> None:
        self.ns = ns
        self.replay = replay
        self.slots = slots
        self.calls: dict[int, int] = {}
        self.specs: dict[int, list[PrefixSpec]] | None = None
        self.digests: list[bytes] | None = None
        self.detector: guards.RandomOps | None = None  # verifying a new train/eval state
        self.running: str | None = None
        # a partial hit of the upto= form: the prefix runs on the missing rows only
        self.hit_index: torch.Tensor | None = None
        self.miss_index: torch.Tensor | None = None
        self.leaves: list[torch.Tensor] | None = None  # read already (the steady replay)


class _Pass:
    """State of one ``keys()`` block."""

    __slots__ = ("call", "discovery", "ids", "inputs", "lineage", "n", "random", "replayed",
                 "segment", "store", "taint")

    def __init__(self, ids: IdBatch, n: int) -> None:
        self.ids = ids
        self.n = n
        self.call = 0
        self.segment: _Segment | None = None
        self.discovery: Discovery | None = None
        self.store = True
        self.replayed = False
        self.taint: Taint | None = None  # the first pass's data-dependence check
        self.lineage: guards.Lineage | None = None  # first pass: weights reaching the boundary
        self.random: guards.RandomOps | None = None  # first pass: random ops in the prefix
        # what the model was called with (read only when an output requires grad)
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})


class _Keys:
    """The context manager of :meth:`FeatureCache.keys` (a class: it runs every step)."""

    __slots__ = ("cache", "feeders", "ids", "n", "state")

    def __init__(self, cache: FeatureCache, ids: IdBatch, n: int) -> None:
        self.cache = cache
        self.ids = ids
        self.n = n
        self.feeders: list[_Keys] = []

    def __enter__(self) -> FeatureCache:
        cache = self.cache
        if cache._closed:
            raise CacheError(
                "cache.keys() on a closed FeatureCache: close() removed it from the model, "
                "so nothing would be cached or replayed. Create a new FeatureCache."
            )
        if cache._pass is not None:
            raise CacheError(
                "cache.keys() contexts cannot be nested: one batch of ids is already active."
            )
        state = self.state = _Pass(self.ids, self.n)
        if cache._prefix is None:
            state.discovery = Discovery(cache._root, cache.module, cache._clock)
            state.taint = state.discovery.taint
            state.lineage = guards.Lineage(guards.named_tensors(cache._root))
            state.random = guards.RandomOps(state.discovery.where)
            state.taint.__enter__()
            state.lineage.__enter__()
            state.random.__enter__()
        cache._pass = state
        if not cache._feeders:
            return cache
        try:
            for feeder in cache._feeders:
                if not feeder.closed and feeder._pass is None:
                    keys = _Keys(feeder, self.ids, self.n)
                    keys.__enter__()
                    self.feeders.append(keys)
        except BaseException:
            self.__exit__()
            raise
        return cache

    def __exit__(self, *exc: object) -> None:
        if self.feeders:
            for keys in reversed(self.feeders):
                keys.__exit__()
            self.feeders = []
        cache, state = self.cache, self.state
        if state.segment is not None and state.segment.detector is not None:
            state.segment.detector.__exit__(None, None, None)  # the model raised mid-way
        cache._pass = None
        cache._clock.tick += 1  # placeholders of this block are dead from here on
        if state.discovery is not None:
            state.discovery.remove()
        if state.random is not None:
            state.random.__exit__(None, None, None)
        if state.lineage is not None:
            state.lineage.__exit__(None, None, None)
        if state.taint is not None:
            state.taint.__exit__(None, None, None)


def _fmt(n: int) -> str:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def _progress(loader: Iterable[Any], *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich bar over samples (rate, ETA), or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:,.0f} samples/s" if task.speed else "- samples/s")

    total = None
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    with contextlib.suppress(TypeError):
        # a Sampler's __len__ is optional (its stub has none): TypeError when it lacks one
        total = len(sampler) if sampler is not None else len(dataset)  # type: ignore[arg-type]
    columns = (TextColumn("fill"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               Rate(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("fill", total=total)
        yield lambda n: bar.advance(task, n)


def _take(value: Any, batch: int, index: torch.Tensor) -> Any:
    if _is_batched(value, batch):
        return value.index_select(0, index.to(value.device))
    return value


def _tensors_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def _autocast_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    device = "cpu"
    for t in _tensors_in(args, kwargs):
        device = t.device.type
        break
    if torch.is_autocast_enabled(device):
        return (device, torch.get_autocast_dtype(device))
    return None


def _namespace_key(call: int, first: torch.Tensor | None) -> _Key:
    """Which entries a call reads and writes: its index in the ``keys()`` block and the
    autocast state of the device of its first tensor argument."""
    device = "cpu" if first is None or first.is_cpu else first.device.type
    autocast = (device, torch.get_autocast_dtype(device)) \
        if torch.is_autocast_enabled(device) else None
    return (call, autocast)


def _resolve_upto(model: nn.Module, upto: Any) -> tuple[nn.Module, str]:
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(upto, nn.Module):
        if id(upto) not in names:
            raise CacheError(
                f"upto= is a {describe(upto)} that is not a submodule of this "
                f"{describe(model)}; pass its name (e.g. 'encoder.layer.3')."
            )
        return upto, names[id(upto)]
    if isinstance(upto, str):
        try:
            return model.get_submodule(upto), upto
        except AttributeError:
            pass
    from .._select import resolve  # a real SelectionError with the closest names

    sel = resolve(model, [upto], default_all=False)
    chosen = set(sel.module_names)
    tops = [n for n in sel.module_names
            if not any(n.startswith(o + ".") for o in chosen if o != n and o)]
    if len(tops) != 1:
        shown = ", ".join(repr(t) for t in tops[:5]) + (", ..." if len(tops) > 5 else "")
        raise CacheError(
            f"upto={upto!r} must name exactly one module (the boundary whose output is "
            f"replayed), but it selects {len(tops)}: {shown}. Name the last frozen module, "
            "e.g. upto='encoder.layer.3'."
        )
    return model.get_submodule(tops[0]), tops[0]


class FeatureCache:
    """Replay the outputs of a frozen, deterministic prefix per sample id.

    Two forms:

    * ``FeatureCache(module)``: ``module`` (e.g. ``model.backbone``) is the prefix.
      On a batch with misses only the missing rows run through it.
    * ``FeatureCache(model, upto="bert.encoder.layer.3")``: the prefix of an
      unmodified model up to a *boundary* module: every module that completes
      before the boundary returns (found on the first call inside :meth:`keys`:
      HF BERT's embeddings and the first encoder layers called in a loop, a
      ResNet's stem and first stages, a ViT's patch embedding and first blocks).
      On a batch whose ids are all stored none of the prefix runs: the prefix
      modules hand out storage-less placeholders (glue code between them only
      reads shapes) and the boundary replays its stored output; the rest of the
      model runs as written. On a batch with some ids stored the prefix modules
      run on the missing rows only and the stored rows are replayed; with none
      stored the model runs normally. Either way the missing rows are stored.

    Keys: an entry is keyed by the sample id, the call of the boundary inside
    one ``keys()`` block (a module called twice - two towers, a shared encoder -
    stores one entry per call) and the autocast state (``bfloat16`` entries are
    never replayed outside autocast).

    Every replay is guarded (``cache/_guards.py``): the prefix must be called as when
    its entries were stored (shapes past the batch dim, dtypes, devices, plain
    arguments), every parameter and buffer whose value reaches the boundary (inside
    the prefix modules or not, found by tracing the first pass) must be frozen and
    unchanged, and no random op may run in the prefix (checked by the ops that run, on
    the first pass and for every new train/eval state).

    The cut is proven: if anything after the boundary reads a prefix output
    other than the boundary's (a skip connection around it,
    ``output_hidden_states=True``, a cross path), :class:`~torchfreeze.errors.CacheError`
    names the module - on the first pass already (data dependence is traced
    while the prefix is discovered), and on every replay, by the op that reads a
    skipped output, before any result is computed from the replay.

    Args:
        model: the module to cache (``upto=None``), or the model whose prefix up to
            ``upto`` is cached.
        upto: the boundary: a module name (or module, or selector naming exactly one
            module) inside ``model``; its output is stored and replayed.
        max_bytes: byte budget. With ``storage="auto"`` (default) it bounds RAM and
            entries past it spill to memory-mapped files on disk; with ``"memory"``
            entries past it are not stored (recomputed each time, counted as
            misses); with ``"disk"`` it bounds the files. ``None``: no bound.
        dtype: store floating outputs in this dtype (``torch.float16`` or
            ``torch.bfloat16`` halve the bytes). Every output - computed or
            replayed - is rounded the same way, so results never depend on
            whether a sample was a hit.
        storage: ``"auto"`` (RAM, then disk past ``max_bytes``), ``"memory"`` or
            ``"disk"``. Disk chunks are raw files mapped with ``torch.from_file``
            in a fresh temporary folder (inside ``directory`` when given), removed
            by :meth:`clear`/:meth:`close`.
        directory: parent folder for disk chunks (default: the system temp dir).
        validate: hash every sample's inputs to the prefix (the batched tensor
            arguments of its first module) and raise
            :class:`~torchfreeze.errors.CacheError` when a known id comes back with
            different input.
        pin_eval: keep the prefix in eval mode through every ``model.train()``
            (dropout off in the frozen prefix, the usual choice for feature
            extraction); undone by :meth:`close`.
        path: a directory that keeps the entries across runs and processes: one
            slab file per output tensor, an append-only index and ``meta.json``
            (boundary, prefix modules, dtype, a content hash of every prefix
            parameter and buffer, torch version). Re-opening it with the same
            prefix reuses every entry (the prefix does not run at all); with other
            weights, another boundary or dtype it is refused, naming what differs.
            Several processes of one node may use it at once (DDP ranks): each id
            is computed once, by whichever process meets it first. A process
            killed while writing never leaves an entry that reads back wrong.
        overwrite: with ``path``, empty a store made under other settings instead
            of refusing it.
        device: where RAM slabs live. ``None`` (default): on the device of the
            boundary's output (a CUDA model keeps its features in GPU memory,
            ``max_bytes`` bounds them). ``"cpu"`` for a CUDA model: a host store;
            replay copies through pinned memory with ``non_blocking=True``. Replayed
            outputs always go to the device the boundary's output was on.

    Attributes:
        hits: samples replayed.
        misses: samples whose prefix output was computed.
        invalidations: times the stored entries were dropped because a prefix
            tensor changed.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> _ = tfz.freeze(model, "0", "2")
        >>> cache = tfz.FeatureCache(model, upto="2")   # prefix: model[0], model[1], model[2]
        >>> x, ids = torch.randn(4, 8), torch.arange(4)
        >>> with cache.keys(ids):
        ...     first = model(x)
        >>> with cache.keys(ids):
        ...     again = model(x)        # model[0..2] do not run: model[2]'s rows are replayed
        >>> torch.equal(first, again), cache.hits, cache.misses
        (True, 4, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        upto: Any = None,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        storage: StorageMode = "auto",
        directory: str | os.PathLike[str] | None = None,
        validate: bool = False,
        pin_eval: bool = False,
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CacheError(
                f"FeatureCache needs an nn.Module (the frozen prefix), got {describe(model)}."
            )
        if storage not in STORAGE_MODES:
            raise CacheError(
                f"storage={storage!r} is not a FeatureCache storage; use one of "
                f"{', '.join(map(repr, STORAGE_MODES))}."
            )
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise CacheError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}.")
        if dtype is not None and dtype not in _FLOAT_STORE:
            raise CacheError(
                f"dtype={dtype} is not a floating storage dtype; use torch.float16, "
                "torch.bfloat16, torch.float32 or None (keep the output dtype)."
            )
        if path is not None and storage == "memory":
            raise CacheError(
                "path= keeps entries in files, but storage='memory' asks for RAM only; "
                "drop one of them."
            )
        persist = None if path is None else PathStore(os.fspath(path), overwrite=overwrite)
        if upto is None:
            boundary, bname = model, ""
        else:
            boundary, bname = _resolve_upto(model, upto)
        for patch in patches_of(boundary):
            owner = patch.owner
            if isinstance(owner, FeatureCache) and owner.module is boundary:
                raise CacheError(
                    f"This {describe(boundary)} already has a FeatureCache; call close() on "
                    "it before creating another one."
                )
        if pin_eval and upto is None and pinning.pinned_by_anyone(boundary):
            raise CacheError(
                f"pin_eval=True, but this {describe(boundary)} already has a pinned train mode "
                "(a torchfreeze BatchNorm policy?). Leave pin_eval off, or put it in eval yourself."
            )
        self._root = model
        self._boundary = boundary
        self._boundary_name = bname
        self.upto: str | None = None if upto is None else bname
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.storage: StorageMode = storage
        self.directory = None if directory is None else os.fspath(directory)
        self.validate = validate
        self.pin_eval = pin_eval
        self.path = None if path is None else os.fspath(path)
        self.overwrite = overwrite
        self.device = None if device is None else torch.device(device)
        self._persist = persist  # path=: the store's metadata and namespace structures
        self._filling = False
        # The prefix modules besides the boundary: known (none) for the one-module form,
        # found on the first keys() pass with upto=.
        self._prefix: list[tuple[str, nn.Module]] | None = [] if upto is None else None
        self._prefix_names: dict[int, str] = {}
        self._guard = guards.Watch()
        self._guard.named = [(bname, boundary)]
        self._verified: set[tuple[bool, ...]] = set()  # train/eval states without random ops
        self._forced_grad = False  # outputs require grad only by requires_grad_() upstream
        if not pin_eval:
            guards.check_deterministic(boundary, bname)
        guards.check_frozen(boundary, bname)

        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._clock = Clock(bname or describe(boundary))
        self._budget = StorageBudget(max_bytes, storage, self.directory)
        self._namespaces: dict[_Key, _Namespace] = {}
        self._pass: _Pass | None = None
        # per namespace: what its last fully replayed batch was checked against
        self._steady: dict[_Key, tuple[_Namespace, guards.Steady]] = {}
        self._closed = False
        self._pinned: list[nn.Module] = []
        self._feeders: list[FeatureCache] = []  # earlier caches activated by keys() (advance)
        guards.Registrations.install()
        self._guard.rebuild()
        self._guard.fingerprint = self._guard.take_fingerprint()
        if upto is not None:
            self._refuse_hidden_states(model, bname)
        self._patches: list[PatchedForward] = [install(boundary, self._on_boundary, self)]
        if boundary is not model:
            self._patches.append(install(model, self._on_root, self))
        if pin_eval:
            self._pin(boundary)
            if upto is not None:
                for _, m in self._registered_prefix():
                    self._pin(m)
        if self._persist is not None:
            try:
                self._open_path()
            except BaseException:
                self.close()
                raise

    # ----------------------------------------------------------------- public
    @property
    def module(self) -> nn.Module:
        """The boundary: the module whose output is stored and replayed."""
        return self._boundary

    @property
    def prefix(self) -> list[str] | None:
        """Names of the prefix modules before the boundary, in execution order (``None``
        until the first pass inside :meth:`keys` found them)."""
        return None if self._prefix is None else [n for n, _ in self._prefix]

    @property
    def nbytes(self) -> int:
        """Bytes of stored outputs, RAM and disk together."""
        return self.memory_nbytes + self.disk_nbytes

    @property
    def memory_nbytes(self) -> int:
        """Bytes of stored outputs held in RAM (or accelerator memory, see ``device``)."""
        return sum(ns.storage.memory_nbytes for ns in self._namespaces.values()
                   if ns.storage is not None)

    @property
    def disk_nbytes(self) -> int:
        """Bytes of stored outputs in files (with ``path``: every process's entries)."""
        return sum(ns.storage.disk_nbytes for ns in self._namespaces.values()
                   if ns.storage is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return sum(len(ns.storage) for ns in self._namespaces.values() if ns.storage is not None)

    def __bool__(self) -> bool:
        """True while the cache is open, however many entries it holds (``len()`` counts
        entries): ``cache.keys(ids) if cache else nullcontext()`` caches from the start."""
        return not self._closed

    def __contains__(self, sample_id: object) -> bool:
        return any(sample_id in ns.storage for ns in self._namespaces.values()
                   if ns.storage is not None)

    def __repr__(self) -> str:
        what = describe(self._boundary) if self.upto is None else \
            f"{describe(self._root)}, upto={self.upto!r}"
        where = f"path={self.path!r}" if self.path is not None else f"storage={self.storage!r}"
        return (f"FeatureCache({what}, entries={len(self)}, hits={self.hits}, "
                f"misses={self.misses}, nbytes={self.nbytes}, {where})")

    def __str__(self) -> str:
        """One line: entries, bytes in RAM and on disk, hit rate, where the store lives."""
        what = describe(self._boundary) if self.upto is None else f"upto={self.upto!r}"
        seen = self.hits + self.misses
        rate = f"{100 * self.hits / seen:.1f}%" if seen else "-"
        where = f", path={self.path}" if self.path is not None else ""
        return (f"FeatureCache({what}): {len(self):,} entries, {_fmt(self.memory_nbytes)} RAM + "
                f"{_fmt(self.disk_nbytes)} disk, {self.hits:,} hits / {self.misses:,} misses "
                f"({rate} hit rate){where}")

    def keys(self, sample_ids: Iterable[Hashable] | torch.Tensor) -> _Keys:
        """Make the prefix replay per sample while the context is active.

        Args:
            sample_ids: one id per sample of the batch, in batch order: a 1-D integer
                tensor or a sequence of hashables (ints, strings). An id must name the
                same input every time (a dataset index, a file name).

        Returns:
            A context manager (entering it gives the cache).

        Example:
            >>> import torch, torch.nn as nn, torchfreeze as tfz
            >>> enc = nn.Linear(3, 3).requires_grad_(False)
            >>> cache = tfz.FeatureCache(enc)
            >>> with cache.keys([10, 11]):
            ...     _ = enc(torch.ones(2, 3))
            >>> len(cache)
            2
        """
        if self._closed:
            raise CacheError(
                "cache.keys() on a closed FeatureCache: close() removed it from the model, "
                "so nothing would be cached or replayed. Create a new FeatureCache."
            )
        ids, n = guards.normalize_ids(sample_ids)
        return _Keys(self, ids, n)

    def advance(self, upto: Any) -> FeatureCache:
        """A cache for a later boundary of the same model, fed by this one.

        The new cache's ``keys()`` also activates this cache, so a batch the new
        one misses runs with this cache replaying: the old prefix never runs
        again for stored ids, only the layers between the two boundaries do.
        This cache stays installed until you :meth:`close` it (e.g. once every
        id is stored in the new one); the new cache keeps working after that.
        Options (``max_bytes``, ``dtype``, ``storage``, ``directory``,
        ``validate``, ``pin_eval``) are copied.

        Args:
            upto: the new boundary; it must run after this cache's boundary.

        Example:
            >>> import torch, torch.nn as nn, torchfreeze as tfz
            >>> model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
            >>> _ = tfz.freeze(model, "0", "1")
            >>> first = tfz.FeatureCache(model, upto="0")
            >>> with first.keys([0, 1]):
            ...     _ = model(torch.ones(2, 4))
            >>> _ = tfz.freeze(model, "1")
            >>> later = first.advance(upto="1")
            >>> with later.keys([0, 1]):        # model[0] replayed by `first`
            ...     _ = model(torch.ones(2, 4))
            >>> first.hits, later.misses, later.prefix
            (2, 2, ['0'])
        """
        if self._closed:
            raise CacheError("advance() on a closed FeatureCache; create a new one instead.")
        if self.upto is None:
            raise CacheError(
                "advance() needs a cache made with upto= (FeatureCache(model, upto=...)): a "
                "one-module cache has no model to move the boundary forward in."
            )
        self._check_later(upto)
        later = FeatureCache(self._root, upto=upto, max_bytes=self.max_bytes, dtype=self.dtype,
                             storage=self.storage, directory=self.directory,
                             validate=self.validate, pin_eval=self.pin_eval, device=self.device)
        later._feeders = [*self._feeders, self]
        return later

    def _check_later(self, upto: Any) -> None:
        """Refuse an advance() boundary that cannot run after this cache's boundary."""
        _, name = _resolve_upto(self._root, upto)
        mine = self._boundary_name
        names = [n for n, _ in self._root.named_modules()]

        def inside(a: str, b: str) -> bool:
            return a == b or a.startswith(b + ".")

        why = None
        if inside(name, mine) or inside(mine, name):
            why = ("is this cache's boundary or contains it" if inside(mine, name)
                   else "is inside this cache's boundary")
        elif any(inside(name, p) for p in self.prefix or ()):
            why = "is part of this cache's prefix (it runs before the boundary)"
        elif self._prefix is None and names.index(name) < names.index(mine):
            why = "is registered before this cache's boundary"
        if why is not None:
            raise CacheError(
                f"advance(upto={name!r}): that module {why}, so it does not run after the "
                f"boundary {mine!r}. Pass a module that runs after {mine!r} (a later layer), "
                "or create a new FeatureCache for an earlier boundary."
            )

    def clear(self) -> None:
        """Drop every stored output and input hash, delete disk chunks, reset counters.

        With ``path`` the store's files are emptied too (for every process: do it
        when no other process uses the store).
        """
        self._drop_entries(wipe=True)
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def close(self) -> None:
        """Release the entries (a ``path`` store stays on disk), then give every patched
        module back its own ``forward`` (and train mode)."""
        self._drop_entries()
        for patch in self._patches:
            uninstall(patch)
        self._patches = []
        for m in self._pinned:
            pinning.unpin(m, training=self._root.training)
        self._pinned = []
        self._closed = True

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # A FeatureCache is not part of a model's state: copies of the model never carry it.
    # (Patched modules deep-copy and pickle to their own forward; an object that holds
    # the cache itself shares it, like an open file.)
    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureCache:
        return self

    def __reduce__(self) -> Any:
        raise CacheError("A FeatureCache cannot be pickled; its entries belong to one process.")

    # --------------------------------------------------------------- forward
    def _on_boundary(self, patch: PatchedForward, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        state = self._pass
        if state is None:
            return patch.orig(*args, **kwargs)
        if state.taint is None:
            return self._boundary_call(state, patch, args, kwargs)
        out = self._boundary_call(state, patch, args, kwargs)
        state.taint.clean(out)  # the boundary's output is what the cut lets through
        return out

    def _boundary_call(self, state: _Pass, patch: PatchedForward, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        try:
            seg = state.segment or self._begin(state, args, kwargs, first_is_boundary=True)
            ns = seg.ns
            disc = state.discovery
            if disc is not None and self.validate and disc.first is not None:
                # the first prefix module's inputs, recorded when it was called
                seg.digests = guards.digest_inputs(*disc.first, state.n, Placeholder)
            if disc is not None and ns.signature is None:
                ns.signature = guards.signature(*(disc.first or (args, kwargs)))
            if seg.replay:
                spec = ns.spec
                assert spec is not None and ns.storage is not None
                if seg.digests is not None:
                    self._check_digests(state, seg)
                if self._filling:
                    self.hits += state.n
                    raise _StopAtBoundary
                leaves = seg.leaves
                if leaves is None:
                    assert seg.slots is not None
                    leaves = ns.storage.read(seg.slots, spec.device)
                self.hits += state.n
                if self._forced_grad:
                    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t
                              for t in leaves]
                if spec.kind == "tensor" and leaves[0].dtype == spec.dtypes[0]:
                    return leaves[0]
                return unflatten_output(spec, self._as_output(spec, leaves))
            if self._prefix == []:
                out = self._rows_forward(state, seg, patch, args, kwargs)
                if self._filling:
                    raise _StopAtBoundary
                return out
            if seg.miss_index is not None:
                return self._partial_boundary(state, seg, patch, args, kwargs)
            if disc is not None:
                disc.running.append(repr(self._boundary_name))
            seg.running = repr(self._boundary_name)
            out = patch.orig(*args, **kwargs)
            self._end_verify(seg)
            if state.taint is not None:
                state.taint.clean(out)
            if has_placeholder(out):
                return out  # an outer cache replays this stretch: nothing real to store
            self._check_digests(state, seg)
            spec, computed = flatten_output(out, state.n)
            if state.discovery is not None:
                self._finish_discovery(state, ns, computed)
            self._refuse_grad(state, computed)
            if seg.specs is not None and ns.prefix_specs is None:
                ns.prefix_specs = seg.specs
            self.misses += state.n
            if not state.store:
                return out
            fresh = self._store(ns, spec, state.ids, computed)
            if self._filling:
                raise _StopAtBoundary
            return out if self.dtype is None else unflatten_output(spec, fresh)
        finally:
            if state.segment is not None and state.segment.detector is not None:
                state.segment.detector.__exit__(None, None, None)
                state.segment.detector = None
            state.segment = None
            state.call += 1
            self._clock.tick += 1

    def _partial_boundary(self, state: _Pass, seg: _Segment, patch: PatchedForward,
                          args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The boundary on a partial hit: compute and store the missing rows, replay the
        stored ones, hand out the full batch in batch order."""
        self._check_digests(state, seg)
        spec, fresh = self._store_missing(state, seg, patch, args, kwargs, refuse_grad=True)
        if self._filling:
            raise _StopAtBoundary
        return self._merge(state, seg, spec, fresh)

    def _store_missing(self, state: _Pass, seg: _Segment, patch: PatchedForward,
                       args: tuple[Any, ...], kwargs: dict[str, Any], *,
                       refuse_grad: bool = False) -> tuple[OutputSpec, list[torch.Tensor]]:
        """The boundary on the missing rows (``seg.miss_index``) of a partial hit: compute,
        store and count them; the hits are counted too. Both forms use it."""
        assert seg.miss_index is not None and seg.hit_index is not None
        batch, miss = state.n, seg.miss_index
        sub_args, sub_kwargs = pytree.tree_map(lambda v: _take(v, batch, miss), (args, kwargs))
        out = patch.orig(*sub_args, **sub_kwargs)
        spec, computed = flatten_output(out, len(miss))
        if refuse_grad:
            self._refuse_grad(state, computed)
        sub_ids: IdBatch = (state.ids.index_select(0, miss)
                            if isinstance(state.ids, torch.Tensor)
                            else [state.ids[i] for i in miss.tolist()])
        fresh = self._store(seg.ns, spec, sub_ids, computed)
        self.misses += len(miss)
        self.hits += len(seg.hit_index)
        return spec, fresh

    def _merge(self, state: _Pass, seg: _Segment, spec: OutputSpec,
               fresh: list[torch.Tensor]) -> Any:
        """Computed rows (``seg.miss_index``) and stored ones (``seg.hit_index``) as one
        output of the whole batch."""
        assert seg.miss_index is not None and seg.hit_index is not None
        assert seg.slots is not None and seg.ns.storage is not None
        batch, miss, hit = state.n, seg.miss_index, seg.hit_index
        replayed = self._as_output(spec, seg.ns.storage.read(seg.slots[hit], spec.device))
        merged = []
        for i, (r, c) in enumerate(zip(replayed, fresh)):
            if r.shape[1:] != c.shape[1:]:
                raise CacheError(
                    f"Output tensor {i} of the cached module has per-sample shape "
                    f"{tuple(c.shape[1:])} in this batch but {tuple(r.shape[1:])} for the cached "
                    "samples (dynamic padding?). Pad inputs to a fixed length when caching."
                )
            full = torch.empty((batch, *c.shape[1:]), dtype=c.dtype, device=c.device)
            full.index_copy_(0, miss.to(c.device), c)
            full.index_copy_(0, hit.to(c.device), r.to(c.device))
            if self._forced_grad and full.is_floating_point() and not c.requires_grad:
                full.requires_grad_()
            merged.append(full)
        return unflatten_output(spec, merged)

    def _on_root(self, patch: PatchedForward, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        state = self._pass
        if state is not None:
            state.inputs = (args, kwargs)
        out = patch.orig(*args, **kwargs)
        if state is not None and state.taint is not None:
            source = state.taint.stale(out)
            if source is not None:
                raise bypass_error(self._clock.boundary, source, "the model's return value "
                                   "(hidden states?)")
        if state is not None and state.replayed:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, Placeholder):
                    raise CacheError(
                        f"FeatureCache(upto={self.upto!r}): the model returns the output of "
                        f"{leaf._source!r} (a prefix module before the boundary), e.g. as hidden "
                        "states (output_hidden_states=True), so the boundary does not cut the "
                        "model there and that output was skipped. Do not ask for hidden states "
                        "while caching, or choose another boundary."
                    )
        return out

    @staticmethod
    def _refuse_hidden_states(model: nn.Module, bname: str) -> None:
        path = [""] + [".".join(bname.split(".")[:i + 1]) for i in range(bname.count(".") + 1)]
        for name in path:
            config = getattr(model.get_submodule(name), "config", None)
            if getattr(config, "output_hidden_states", False) is True:
                where = f"'{name}'" if name else "the model"
                raise CacheError(
                    f"FeatureCache(upto={bname!r}): the config of {where} has "
                    "output_hidden_states=True, so the model returns the outputs of the prefix "
                    "layers besides the boundary's, and those are skipped on replay. Set "
                    "config.output_hidden_states = False while caching."
                )

    def _on_prefix(self, patch: PatchedForward, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        state = self._pass
        if state is None:
            return patch.orig(*args, **kwargs)
        seg = state.segment or self._begin(state, args, kwargs, first_is_boundary=False)
        key = id(patch.module)
        if seg.replay:
            # every batch, once per prefix module: _recorded_call inlined
            state.replayed = True
            k = seg.calls.get(key, 0)
            seg.calls[key] = k + 1
            assert seg.ns.prefix_specs is not None
            specs = seg.ns.prefix_specs.get(key, ())
            if k >= len(specs):
                raise self._other_path_error(patch.module, k, len(specs))
            return specs[k].placeholders(state.n, self._clock, self._prefix_names.get(key) or
                                         describe(patch.module))
        seg.running = repr(self._name_of(patch.module))
        if seg.miss_index is not None:
            spec = self._recorded_call(seg, patch.module)
            return self._missing_rows(seg, patch, args, kwargs, spec, state.n)
        out = patch.orig(*args, **kwargs)
        seg.running = None
        if seg.specs is not None:
            seg.specs.setdefault(key, []).append(PrefixSpec(out, state.n))
        return out

    def _recorded_call(self, seg: _Segment, module: nn.Module) -> PrefixSpec:
        """The recorded output structure of this call of a prefix module (its k-th in the
        segment), or a refusal when the model now calls it more often."""
        key = id(module)
        k = seg.calls.get(key, 0)
        seg.calls[key] = k + 1
        assert seg.ns.prefix_specs is not None
        specs = seg.ns.prefix_specs.get(key, [])
        if k >= len(specs):
            raise self._other_path_error(module, k, len(specs))
        return specs[k]

    def _other_path_error(self, module: nn.Module, k: int, recorded: int) -> CacheError:
        return CacheError(
            f"Prefix module {self._name_of(module)!r} of FeatureCache(upto="
            f"{self.upto!r}) was called {k + 1} times in this batch but {recorded} "
            "when its entries were stored: the model takes another path now. clear() "
            "the cache, or cache a prefix that always runs the same way."
        )

    def _missing_rows(self, seg: _Segment, patch: PatchedForward, args: tuple[Any, ...],
                      kwargs: dict[str, Any], spec: PrefixSpec, batch: int) -> Any:
        """A prefix module on a partial hit: run it on the missing rows only and hand the
        model full-batch outputs whose stored rows hold zeros (no one reads them: the
        boundary replays those rows)."""
        assert seg.miss_index is not None
        miss = seg.miss_index
        sub_args, sub_kwargs = pytree.tree_map(lambda v: _take(v, batch, miss), (args, kwargs))
        out = patch.orig(*sub_args, **sub_kwargs)
        flat, treespec = pytree.tree_flatten(out)
        full = []
        for x, leaf in zip(flat, spec.leaves):
            if isinstance(x, torch.Tensor) and getattr(leaf, "per_sample", False):
                whole = x.new_zeros((batch, *x.shape[1:]))
                whole.index_copy_(0, miss.to(x.device), x)
                x = whole
            full.append(x)
        return pytree.tree_unflatten(full, treespec)

    def _partial_ok(self, ns: _Namespace) -> bool:
        """Whether a partial hit can run the prefix on its missing rows only: every prefix
        output is per sample, and no other cache patches these modules."""
        if not self._prefix or ns.prefix_specs is None or ns.spec is None or self._feeders:
            return False
        for _, m in self._prefix:
            if sum(1 for _ in patches_of(m)) != 1:
                return False
        return all(getattr(leaf, "per_sample", True)
                   for specs in ns.prefix_specs.values() for spec in specs
                   for leaf in spec.leaves)

    def _check_signature(self, ns: _Namespace, args: tuple[Any, ...],
                         kwargs: dict[str, Any], first_is_boundary: bool) -> None:
        """The signature guard: the prefix is called as when the namespace's entries were
        stored (shapes past the batch dim, dtypes, devices, plain arguments), or refused."""
        now = guards.signature(args, kwargs)
        if ns.signature is None:
            ns.signature = now
        elif now != ns.signature:
            first = ("the boundary " + repr(self._boundary_name or describe(self._boundary))
                     if first_is_boundary else "the prefix (its first module)")
            guards.check_signature(first, ns.signature, now, path=self.path)

    def _where_running(self) -> str | None:
        seg = self._pass.segment if self._pass is not None else None
        if seg is None:
            return None
        return seg.running or "the model's own forward (between prefix modules)"

    def _end_verify(self, seg: _Segment) -> None:
        """A segment computed under the random-op detector: refuse, or trust this state."""
        detector = seg.detector
        if detector is None:
            return
        detector.__exit__(None, None, None)
        seg.detector = None
        detector.check()
        self._verified.add(self._guard.training())

    def _begin(self, state: _Pass, args: tuple[Any, ...], kwargs: dict[str, Any], *,
               first_is_boundary: bool) -> _Segment:
        if self._steady:
            steady = self._steady_segment(state, args, kwargs)
            if steady is not None:
                state.segment = steady
                return steady
        self._scan()
        n = state.n
        # the first tensor input: the batch check and the autocast device in one look
        first = None
        batched = False
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, torch.Tensor) and type(value) is not Placeholder:
                if first is None:
                    first = value
                if value.dim() and value.shape[0] == n:
                    batched = True
                    break
        if first is not None and not batched:
            self._check_batch(state, args, kwargs)
        key = _namespace_key(state.call, first)
        ns = self._namespaces.get(key)
        if ns is None:
            ns = self._namespaces[key] = self._new_namespace(key)
        if state.discovery is None:
            self._check_signature(ns, args, kwargs, first_is_boundary)
        slots = None
        replay = False
        if ns.storage is not None:
            slots = ns.storage.lookup(state.ids)
            replay = ns.prefix_specs is not None and (n == 0 or int(slots.min()) >= 0)
        verify = state.discovery is None and self._guard.training() not in self._verified
        if verify:
            replay = False  # a train/eval state not seen yet: compute it under the detector
        seg = _Segment(ns, replay, slots)
        if not replay and not verify and slots is not None and n and self._prefix and \
                state.store and bool((slots >= 0).any()) and self._partial_ok(ns):
            hit = slots >= 0
            seg.hit_index = hit.nonzero().squeeze(1)
            seg.miss_index = (~hit).nonzero().squeeze(1)
        if not replay and self._prefix and ns.prefix_specs is None:
            seg.specs = {}
        if self.validate and state.discovery is None:
            seg.digests = guards.digest_inputs(args, kwargs, n, Placeholder)
        state.segment = seg
        if verify:
            seg.detector = guards.RandomOps(self._where_running)
            seg.detector.__enter__()
        elif replay and seg.digests is None and not self._feeders and not self._filling and \
                state.discovery is None and isinstance(state.ids, torch.Tensor) and \
                ns.spec is not None and ns.spec.device.type == "cpu":
            # (read_ids gathers on the CPU only: elsewhere every batch takes the general path)
            self._steady[key] = (ns, guards.Steady(self._guard, ns.signature))
        return seg

    def _steady_segment(self, state: _Pass, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> _Segment | None:
        """A batch replayed like its namespace's last one, checked in one pass: the batch
        size and every id stored here, every other per-batch rule by
        :meth:`guards.Steady.holds`; ``None`` at the first that does not hold (the general
        path then runs and decides). Namespaces (two calls of the boundary per batch,
        autocast) each keep their own."""
        first = None  # the first tensor argument, as the general path finds it
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, torch.Tensor):
                first = value
                break
        if type(first) is not torch.Tensor or not first.dim() or first.shape[0] != state.n \
                or self.validate or self._filling or state.discovery is not None:
            return None
        entry = self._steady.get(_namespace_key(state.call, first))
        if entry is None:
            return None
        ns, steady = entry
        assert ns.spec is not None and ns.storage is not None
        leaves = ns.storage.read_ids(state.ids, ns.spec.device)  # no side effect
        if leaves is None or not steady.holds(self._guard, args, kwargs):
            del self._steady[ns.key]
            return None
        seg = _Segment(ns, True, None)
        seg.leaves = leaves
        return seg

    def _check_batch(self, state: _Pass, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = [t for t in _tensors_in(args, kwargs) if not isinstance(t, Placeholder)]
        if tensors and not any(_is_batched(t, state.n) for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise CacheError(
                f"cache.keys() was given {state.n} sample ids, but no input of the cached "
                f"{describe(self._boundary)} has {state.n} rows (inputs: {shapes}). Pass one id "
                "per sample of the batch, in batch order."
            )

    def _rows_forward(self, state: _Pass, seg: _Segment, patch: PatchedForward,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """No prefix before the boundary: run the boundary on the missing rows only."""
        batch, ns = state.n, seg.ns
        tensors = list(_tensors_in(args, kwargs))
        if not any(_is_batched(t, batch) for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors) or "no tensors"
            raise CacheError(
                f"cache.keys() was given {batch} sample ids, but no input of the cached "
                f"{describe(self._boundary)} has {batch} rows (inputs: {shapes}). Pass one id "
                "per sample of the batch, in batch order."
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise guards.module_input_grad_error(self._boundary)
        self._check_digests(state, seg)
        hit = seg.slots >= 0 if seg.slots is not None else None
        n_hit = int(hit.sum()) if hit is not None and seg.detector is None else 0
        if n_hit == 0:
            seg.running = f"the cached {describe(self._boundary)}"
            out = patch.orig(*args, **kwargs)
            self._end_verify(seg)
            spec, computed = flatten_output(out, batch)
            fresh = self._store(ns, spec, state.ids, computed)
            self.misses += batch
            return out if self.dtype is None else unflatten_output(spec, fresh)
        assert hit is not None and seg.slots is not None and ns.storage is not None
        seg.miss_index = (~hit).nonzero().squeeze(1)
        seg.hit_index = hit.nonzero().squeeze(1)
        spec, fresh = self._store_missing(state, seg, patch, args, kwargs)
        return self._merge(state, seg, spec, fresh)

    def _refuse_grad(self, state: _Pass, leaves: list[torch.Tensor]) -> None:
        """The gradient guard: a boundary output that requires grad is refused unless
        nothing trainable is upstream of it (only ``requires_grad_()`` inside the model,
        as Hugging Face's ``enable_input_require_grads`` does)."""
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in leaves):
            return
        inputs = {id(t) for t in pytree.tree_leaves(state.inputs) if isinstance(t, torch.Tensor)}
        names, from_input = guards.grad_sources(leaves, guards.named_tensors(self._root),
                                                inputs)
        if names:
            raise guards.trainable_outside_error(self._boundary_name, names)
        if from_input:
            raise guards.input_grad_error(self._boundary_name)
        self._forced_grad = True  # replays hand out outputs that require grad, like these

    def _store(self, ns: _Namespace, spec: OutputSpec, ids: IdBatch,
               computed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Store the rows; return the computed leaves rounded like stored ones."""
        if ns.spec is None:
            ns.spec = spec
        elif not spec.same_structure(ns.spec):
            raise CacheError(
                f"The cached {describe(self._boundary)} returned a differently structured output "
                f"({spec.cls.__name__} with {len(spec.dtypes)} tensor(s) of {spec.dtypes}) than "
                f"the one already stored ({ns.spec.cls.__name__} with "
                f"{len(ns.spec.dtypes)} of {ns.spec.dtypes}); different call arguments? "
                "Use one FeatureCache per way of calling the module, or clear() it."
            )
        taint = self._pass.taint if self._pass is not None else None
        if taint is not None:
            taint.paused = True
        try:
            return self._store_rows(ns, ids, computed)
        finally:
            if taint is not None:
                taint.paused = False

    def _store_rows(self, ns: _Namespace, ids: IdBatch,
                    computed: list[torch.Tensor]) -> list[torch.Tensor]:
        stored = [self._to_store(t) for t in computed]
        if ns.storage is None:
            ns.shapes = [tuple(t.shape[1:]) for t in stored]
            ns.dtypes = [t.dtype for t in stored]
            device = self.device if self.device is not None else stored[0].device
            ns.storage = self._make_storage(ns, device)
        else:
            self._check_shapes(ns, stored)
        if self._persist is not None and not ns.saved:
            self._persist.save(ns, self._prefix or [], forced_grad=self._forced_grad,
                               verified=self._verified)
        ns.storage.write(ids, stored)
        # Computed rows go out rounded exactly like stored ones, so a result never
        # depends on whether its sample was a hit.
        return [s.to(dtype=t.dtype) if s.dtype != t.dtype else t
                for s, t in zip(stored, computed)]

    def _check_shapes(self, ns: _Namespace, stored: list[torch.Tensor]) -> None:
        for i, (shape, t) in enumerate(zip(ns.shapes, stored)):
            if tuple(t.shape[1:]) != shape:
                raise CacheError(
                    f"Output tensor {i} of the cached module has per-sample shape "
                    f"{tuple(t.shape[1:])} in this batch but {shape} for the cached samples "
                    "(dynamic padding?). Pad inputs to a fixed length when caching."
                )

    def _to_store(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        return t.detach().to(dtype=dtype, memory_format=torch.contiguous_format)

    def _as_output(self, spec: OutputSpec, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t if t.dtype == d else t.to(d) for t, d in zip(leaves, spec.dtypes)]

    # ------------------------------------------------------------- the store
    def _new_namespace(self, key: _Key) -> _Namespace:
        ns = _Namespace(key, self._prefix == [])
        loaded = None if self._persist is None else \
            self._persist.load(ns, self._prefix or [], self._boundary)
        if loaded is not None:
            # A store another run (or rank) made: replay from the first batch, no prefix
            # call; train/eval states the writer ran under the random-op detector count.
            forced_grad, verified = loaded
            self._forced_grad |= forced_grad
            self._verified |= verified
            ns.storage = self._make_storage(ns, None)
        return ns

    def _make_storage(self, ns: _Namespace, device: torch.device | None) -> Storage:
        """The one place a Storage is made (CONTRACTS.md 1), for namespace ``ns``
        (``ns.key``: call index, autocast state) of rows ``ns.shapes``/``ns.dtypes``."""
        return SlabStore(ns.shapes, ns.dtypes, budget=self._budget,
                         device=device if device is not None else "cpu",
                         path=None if self._persist is None else self._persist.folder(ns.key))

    def _open_path(self) -> None:
        """Check a ``path=`` store against this model now when its prefix is known."""
        assert self._persist is not None
        if self.upto is not None:
            recorded = self._persist.recorded(self._root, self._boundary_name)
            if recorded is None:
                return  # claimed once discovery found the prefix
            prefix, outside = recorded
            self._adopt_prefix(prefix, self._outside_tensors(outside))
        self._claim_path()

    def _claim_path(self) -> None:
        assert self._persist is not None
        self._persist.claim(self._boundary_name, self._boundary, self._prefix or [],
                            self._guard.names_and_tensors_outside(), self.dtype)

    def _adopt_prefix(self, prefix: list[tuple[str, nn.Module]],
                      outside: list[tuple[str, nn.Module, str]]) -> None:
        """The prefix recorded with a store: no discovery pass, so no prefix call at all."""
        for name, m in prefix:
            guards.check_frozen(m, name)
            if self.pin_eval:
                self._pin(m)
            else:
                guards.check_deterministic(m, name)
        self._prefix = prefix
        self._prefix_names = {id(m): name for name, m in prefix}
        self._patches.extend(install(m, self._on_prefix, self) for _, m in prefix)
        self._set_watch(prefix, outside)
        self._guard.check_frozen(self._boundary_name)

    def _written(self) -> int:
        return sum(getattr(ns.storage, "written", 0) for ns in self._namespaces.values())

    def fill(
        self,
        loader: Iterable[Any],
        forward: Callable[[Any], Any],
        ids: Callable[[Any], Any],
        *,
        progress: bool = True,
    ) -> int:
        """Precompute the entries of every sample of ``loader`` (a pass before training).

        Each batch runs under ``torch.inference_mode`` and only up to the boundary:
        once its rows are stored (or found stored) the rest of the forward is
        skipped. Under ``torch.distributed`` with a ``DistributedSampler`` each rank
        fills its shard, then waits for the others (a barrier); with ``path=`` every
        rank then replays every entry. The first call of the boundary per batch is
        filled (a model calling it twice gets its second calls' entries in training).

        Args:
            loader: batches (a ``DataLoader``; workers are fine).
            forward: ``forward(batch)`` runs the model on a batch.
            ids: ``ids(batch)`` gives the batch's sample ids.
            progress: show a ``rich`` progress bar (samples, rate, ETA) on rank 0.

        Returns:
            The number of entries this process wrote.

        Example:
            >>> import torch, torch.nn as nn, torchfreeze as tfz
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> _ = tfz.freeze(model, "0")
            >>> cache = tfz.FeatureCache(model, upto="0")
            >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10))
            >>> loader = torch.utils.data.DataLoader(data, batch_size=4)
            >>> cache.fill(loader, lambda b: model(b[0]), lambda b: b[1], progress=False)
            10
            >>> with cache.keys(torch.arange(4)):
            ...     _ = model(data.tensors[0][:4])
            >>> cache.hits, cache.misses
            (4, 10)
        """
        if self._closed:
            raise CacheError("fill() on a closed FeatureCache; create a new one.")
        import torch.distributed as dist

        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        before = self._written()
        bar = _progress(loader, enabled=progress and rank0)
        self._filling = True
        try:
            with torch.inference_mode(), bar as (advance):
                for batch in loader:
                    batch_ids = ids(batch)
                    with self.keys(batch_ids), contextlib.suppress(_StopAtBoundary):
                        forward(batch)
                    advance(len(batch_ids))
        finally:
            self._filling = False
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's entries are published once everyone is past it
        return self._written() - before

    # ------------------------------------------------------------- discovery
    def _registered_prefix(self) -> list[tuple[str, nn.Module]]:
        """The prefix guessed from registration order (for pin_eval before the first call)."""
        names = [n for n, _ in self._root.named_modules()]
        bname = self._boundary_name
        out: list[tuple[str, nn.Module]] = []
        for name in names[:names.index(bname)]:
            if name == "" or bname.startswith(name + "."):
                continue  # an ancestor of the boundary
            if any(name.startswith(o + ".") for o, _ in out):
                continue
            out.append((name, self._root.get_submodule(name)))
        return out

    def _finish_discovery(self, state: _Pass, ns: _Namespace,
                          computed: list[torch.Tensor]) -> None:
        disc = state.discovery
        assert disc is not None and state.lineage is not None and state.random is not None
        disc.remove()
        state.discovery = None
        state.lineage.active = state.random.active = False
        found = disc.prefix()
        for feeder in self._feeders:
            names = [n for n, _, _ in found]
            fb = feeder._boundary_name
            if not feeder.closed and not any(fb == n or fb.startswith(n + ".") for n in names):
                raise CacheError(
                    f"FeatureCache(upto={self.upto!r}) was made by advance() from the cache "
                    f"upto={fb!r}, but {fb!r} does not run before {self.upto!r} returns, so it "
                    "cannot feed it. advance() to a module that runs after it."
                )
        if self.pin_eval:
            guessed = {id(m) for _, m in self._registered_prefix()}
            real = {id(m) for _, m, _ in found}
            for m in list(self._pinned):
                if id(m) in guessed and id(m) not in real and m is not self._boundary:
                    self._unpin(m)
            for _, m, _ in found:
                if not guards.is_deterministic(m) or state.random.found is not None:
                    state.store = False  # this pass ran it in train mode: do not keep it
                self._pin(m)
        for name, m, _ in found:
            guards.check_frozen(m, name)
            guards.check_deterministic(m, name)
        if not self.pin_eval:
            state.random.check()  # random ops no module class gives away (DropPath, F.dropout)
        self._prefix = [(name, m) for name, m, _ in found]
        self._prefix_names = {id(m): name for name, m in self._prefix}
        self._patches.extend(install(m, self._on_prefix, self) for _, m in self._prefix)
        ns.prefix_specs = {id(m): [PrefixSpec(o, state.n) for o in outs] for _, m, outs in found}
        # weights outside the prefix modules whose values reach the boundary's output
        inside = [n for n, _ in self._prefix] + [self._boundary_name]
        reaching = state.lineage.reaching(computed)
        outside = {n for n in reaching if not any(n.startswith(p + ".") for p in inside)}
        self._set_watch(self._prefix, self._outside_tensors(outside))
        self._guard.check_frozen(self._boundary_name)
        if state.random.found is None:
            self._verified.add(self._guard.training())
        if self._persist is not None:
            self._claim_path()

    def _name_of(self, module: nn.Module) -> str:
        return self._prefix_names.get(id(module)) or describe(module)

    def _pin(self, module: nn.Module) -> None:
        if pinning.pin(module):  # not pinned before (else: a BatchNorm policy's, for good)
            self._pinned.append(module)

    def _unpin(self, module: nn.Module) -> None:
        pinning.unpin(module, training=self._root.training)
        self._pinned.remove(module)

    # ---------------------------------------------------------------- guards
    def _label(self, top: nn.Module) -> str:
        return self._boundary_name if top is self._boundary else self._name_of(top)

    def _set_watch(self, prefix: list[tuple[str, nn.Module]],
                   outside: list[tuple[str, nn.Module, str]]) -> None:
        """Watch the prefix modules, the boundary and the tensors outside them that reach
        the boundary's output; the fingerprint starts from here."""
        self._guard.named = [*prefix, (self._boundary_name, self._boundary)]
        self._guard.outside = outside
        self._guard.rebuild()
        self._guard.fingerprint = self._guard.take_fingerprint()

    def _scan(self) -> None:
        """Every-batch checks over flat lists (no names); names only on a finding."""
        guard = self._guard
        if guard.stale():
            # a parameter, buffer or module was (re)assigned somewhere: maybe here
            guard.rebuild()
        if guard.random:
            guard.check_random()
        if guard.changed():
            try:
                guard.check_frozen(self._boundary_name)
                self._check_fingerprint()
            except BaseException:
                guard.forget()  # refused: the next batch finds the same change and refuses
                raise

    def _check_fingerprint(self) -> None:
        before = self._guard.fingerprint
        changed = self._guard.differences()
        if not changed:
            return
        if self._persist is not None and self._persist.claimed:
            self._guard.fingerprint = before
            raise guards.changed_error(self._persist.path, changed)
        dropped = len(self)
        if dropped:
            self._drop_entries()
            self.invalidations += 1
            guards.warn_dropped(changed, dropped)

    def _outside_tensors(self, names: Iterable[str]) -> list[tuple[str, nn.Module, str]]:
        """(name, owning module, attribute) of parameters/buffers named on the root."""
        out = []
        for name in sorted(names):
            owner_name, _, attr = name.rpartition(".")
            try:
                owner = self._root.get_submodule(owner_name)
            except AttributeError:
                continue
            out.append((name, owner, attr))
        return out

    def _drop_entries(self, *, wipe: bool = False) -> None:
        self._steady = {}
        for ns in self._namespaces.values():
            if ns.storage is not None:
                ns.storage.close()
        self._namespaces = {}
        self._budget.clear()
        if wipe and self._persist is not None:
            self._persist.wipe()

    def _check_digests(self, state: _Pass, seg: _Segment) -> None:
        if seg.digests is not None:
            guards.check_digests(state.ids, seg.digests, seg.ns.hashes, state.call)
