"""The hooking half of FeatureCache: forward patches, prefix discovery, the cut proof.

* Patches are instance attributes (``module.__dict__["forward"]``), so the
  user's model code and hooks stay as they are. A patch pickles and deep-copies
  to :class:`PlainForward` (the module's own class ``forward``): a copy of a
  model (``copy.deepcopy``, ``torch.save``, ``AveragedModel``) never carries the
  cache or its tensors and runs uncached.
* The prefix of ``upto=`` is found on the first call: every module that
  completes before the boundary returns, minus the boundary's ancestors
  (containers) and descendants (inside it), keeping the outermost ones.
* When a batch replays, prefix modules return :class:`Placeholder` tensors of
  the recorded shapes: no storage, metadata only, so glue code between prefix
  modules (attention-mask construction reads ``inputs_embeds.shape``/``dtype``,
  a ViT concatenates a class token) still runs, on the meta device. Any op that
  consumes a placeholder after the boundary has returned means a path around
  the boundary (a skip connection, hidden states, a cross path): it raises
  :class:`~torchfreeze.errors.CacheError` naming the module whose output
  bypasses the boundary, before the op produces anything. Reading a
  placeholder's values (``.item()``, ``.tolist()``, ``if x.any()``) raises too.
* On the first (computed) pass :class:`Taint` traces data dependence from prefix
  outputs and raises the same error there, before anything is replayed.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .._compat import disabled_torch_function, make_wrapper_subclass, pytree
from ..errors import CacheError

__all__ = [
    "Clock",
    "Discovery",
    "OutputSpec",
    "PatchedForward",
    "Placeholder",
    "PlainForward",
    "PrefixSpec",
    "Taint",
    "flatten_output",
    "install",
    "unflatten_output",
    "uninstall",
]


def describe(obj: object) -> str:
    return type(obj).__name__


# ----------------------------------------------------------------------------- patches
class PlainForward:
    """What a copy or a pickle of a patched module gets: its class's own ``forward``."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlainForward, (self.module,))


def _same(value: Any) -> Any:
    return value


class PatchedForward:
    """``module.forward`` while a FeatureCache is installed: ``handler(self, args, kwargs)``."""

    __slots__ = ("had_own", "handler", "module", "orig", "owner")

    def __init__(self, module: nn.Module, handler: Callable[..., Any], owner: object) -> None:
        self.module = module
        self.handler = handler
        self.owner = owner
        self.had_own = "forward" in module.__dict__ and not isinstance(
            module.__dict__["forward"], PlainForward
        )
        self.orig: Callable[..., Any] = module.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # under torch.compile the cache's bookkeeping (id index, stored rows) runs
            # eagerly: dynamo breaks the graph here instead of tracing into the index
            return _eager(self, args, kwargs)
        return self.handler(self, args, kwargs)

    # A copy must not carry the cache (its stored tensors) nor share it.
    def __reduce__(self) -> tuple[Any, ...]:
        if self.had_own:
            return (_same, (self.orig,))
        return (PlainForward, (self.module,))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self.had_own:
            return copy.deepcopy(self.orig, memo)
        return PlainForward(copy.deepcopy(self.module, memo))


def _run_handler(patch: PatchedForward, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return patch.handler(patch, args, kwargs)


_eager: Callable[[PatchedForward, tuple[Any, ...], dict[str, Any]], Any] = \
    torch.compiler.disable(_run_handler)


def install(module: nn.Module, handler: Callable[..., Any], owner: object) -> PatchedForward:
    patch = PatchedForward(module, handler, owner)
    module.__dict__["forward"] = patch
    return patch


def uninstall(patch: PatchedForward) -> None:
    """Remove ``patch`` from its module, also when another patch was stacked on top."""
    d = patch.module.__dict__
    top = d.get("forward")
    if top is patch:
        if patch.had_own:
            d["forward"] = patch.orig
        else:
            d.pop("forward", None)
        return
    while isinstance(top, PatchedForward):
        if top.orig is patch:
            top.orig = patch.orig
            top.had_own = patch.had_own
            return
        top = top.orig


def patches_of(module: nn.Module) -> Iterator[PatchedForward]:
    top = module.__dict__.get("forward")
    while isinstance(top, PatchedForward):
        yield top
        top = top.orig


# ------------------------------------------------------------------- boundary outputs
@dataclass(frozen=True)
class OutputSpec:
    """The structure of the boundary's output, so replayed outputs look the same."""

    kind: str  # "tensor" | "sequence" | "mapping"
    cls: type
    slots: tuple[Any, ...]  # sequence: leaf index or None per element; mapping: keys
    dtypes: tuple[torch.dtype, ...]
    device: torch.device

    def same_structure(self, other: OutputSpec) -> bool:
        return (self.kind, self.cls, self.slots, self.dtypes) == (
            other.kind, other.cls, other.slots, other.dtypes)


def _not_tensor(where: str, value: object) -> CacheError:
    return CacheError(
        f"FeatureCache can only replay tensors, but {where} is a {describe(value)}. Cache a "
        "module that returns a tensor, a flat tuple of tensors or a mapping of tensors (e.g. "
        "a HF ModelOutput), or choose another boundary with upto=."
    )


def flatten_output(out: Any, batch: int) -> tuple[OutputSpec, list[torch.Tensor]]:
    leaves: list[torch.Tensor] = []
    slots: list[Any] = []
    if isinstance(out, torch.Tensor):
        kind, leaves = "tensor", [out]
    elif isinstance(out, Mapping):
        kind = "mapping"
        for key, value in out.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise _not_tensor(f"the cached module's output {describe(out)}[{key!r}]", value)
            slots.append(key)
            leaves.append(value)
    elif isinstance(out, (tuple, list)):
        kind = "sequence"
        for i, value in enumerate(out):
            if value is None:
                slots.append(None)
            elif isinstance(value, torch.Tensor):
                slots.append(len(leaves))
                leaves.append(value)
            else:
                raise _not_tensor(f"element {i} of the cached module's output "
                                  f"{describe(out)}", value)
    else:
        raise _not_tensor("the cached module's output", out)
    if not leaves:
        raise CacheError(
            f"The cached module returned {describe(out)} with no tensor in it; nothing to cache."
        )
    for i, leaf in enumerate(leaves):
        if leaf.dim() == 0 or leaf.shape[0] != batch:
            raise CacheError(
                f"Output tensor {i} of the cached module has shape {tuple(leaf.shape)}, but the "
                f"batch has {batch} sample ids: every output tensor must have one row per "
                "sample (batch dimension first). Cache a module whose outputs are per-sample."
            )
    spec = OutputSpec(kind, type(out), tuple(slots), tuple(t.dtype for t in leaves),
                      leaves[0].device)
    return spec, leaves


def unflatten_output(spec: OutputSpec, leaves: list[torch.Tensor]) -> Any:
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


# ------------------------------------------------------------------------ placeholders
class Clock:
    """Counts boundary returns of one cache; a placeholder is valid until the next tick."""

    __slots__ = ("boundary", "tick")

    def __init__(self, boundary: str) -> None:
        self.tick = 0
        self.boundary = boundary


_VALUE_READS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "item"}
_METADATA_FACTORIES = {
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided",
}


class Placeholder(torch.Tensor):
    """A tensor with shape, dtype and device but no storage, standing in for a skipped output.

    Glue ops on it run on the meta device and give placeholders; ops that only
    read its metadata (``zeros_like``, ``new_ones``) give real tensors. Using it
    after the boundary returned, or reading its values, raises CacheError.
    """

    _clock: Clock
    _tick: int
    _source: str

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                clock: Clock, source: str, stride: tuple[int, ...] | None = None
                ) -> Placeholder:
        t = make_wrapper_subclass(cls, shape, stride, dtype=dtype, device=device)
        t._clock = clock
        t._tick = clock.tick
        t._source = source
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    # torch's stub lists tensor_contents as positional-or-keyword; ours never gets it
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (f"Placeholder(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"output of {self._source!r}, skipped by a FeatureCache)")

    __torch_function__ = disabled_torch_function

    @classmethod
    # the stub declares __torch_dispatch__ as a plain attribute of Tensor
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        flat, _ = pytree.tree_flatten((args, kwargs))
        holders = [x for x in flat if isinstance(x, Placeholder)]
        first = holders[0]
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        for p in holders:
            if p._clock.tick != p._tick:
                raise CacheError(
                    f"FeatureCache(upto={p._clock.boundary!r}): the output of {p._source!r} "
                    f"is used by {name} after the boundary {p._clock.boundary!r} returned, so "
                    "something reads the frozen prefix around the boundary (a skip "
                    "connection, output_hidden_states=True, an encoder-decoder cross path). A "
                    "replayed boundary output cannot stand in for it, and nothing was computed "
                    "from the replay. Choose a boundary whose output is the only thing the "
                    "rest of the model reads from the prefix, or do not cache."
                )
        if name in _VALUE_READS:
            raise CacheError(
                f"The model's code reads the values of {first._source!r}'s output ({name}) "
                f"between prefix modules of FeatureCache(upto={first._clock.boundary!r}), "
                "so the prefix cannot be skipped. Move upto= before that code, or do not cache."
            )
        if name in _METADATA_FACTORIES:
            real = pytree.tree_map_only(
                Placeholder,
                lambda p: torch.empty_strided(p.shape, p.stride(), dtype=p.dtype,
                                              device=p.device),
                (args, kwargs))
            return func(*real[0], **real[1])
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                info = arg.alias_info
                if info is None or not info.is_write:
                    continue
                target = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(target, torch.Tensor) and not isinstance(target, Placeholder):
                    raise CacheError(
                        f"The model writes {first._source!r}'s output into another tensor in "
                        f"place ({name}) inside the prefix of FeatureCache(upto="
                        f"{first._clock.boundary!r}); that tensor would hold garbage when the "
                        "prefix is skipped. Choose another boundary, or do not cache."
                    )
        meta = pytree.tree_map_only(
            torch.Tensor,
            lambda t: (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                       if isinstance(t, Placeholder) else t.to("meta")),
            (args, kwargs))
        try:
            out = func(*meta[0], **meta[1])
        except Exception as exc:
            raise CacheError(
                f"Glue code between the prefix modules of FeatureCache(upto="
                f"{first._clock.boundary!r}) ran {name} on {first._source!r}'s skipped output, "
                f"and it cannot run without values ({exc}). Choose another boundary, or do "
                "not cache."
            ) from exc
        if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None \
                and schema.arguments[0].alias_info.is_write and isinstance(args[0], Placeholder):
            return args[0]  # in place on a placeholder: it stays what it was
        tick = max(p._tick for p in holders)
        device = first.device
        return pytree.tree_map_only(
            torch.Tensor,
            lambda t: Placeholder._at(t, device, first._clock, first._source, tick),
            out)

    @staticmethod
    def _at(t: torch.Tensor, device: torch.device, clock: Clock, source: str,
            tick: int) -> Placeholder:
        p = Placeholder(tuple(t.shape), t.dtype, device, clock, source, tuple(t.stride()))
        p._tick = tick
        return p


@dataclass(frozen=True)
class _Leaf:
    per_sample: bool
    shape: tuple[int, ...]  # per-sample shape when per_sample, else the full shape
    dtype: torch.dtype
    device: torch.device
    stride: tuple[int, ...] | None


class _Holder:
    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = object()


# What sys.getrefcount reports, read the way PrefixSpec reads it, for an object that one
# attribute holds and nothing else (2 on CPython 3.11; interpreters may count otherwise).
_PROBE = _Holder()
_HELD_ONCE = sys.getrefcount(_PROBE.held)


class PrefixSpec:
    """The recorded output structure of one prefix-module call, to rebuild as placeholders."""

    __slots__ = ("last", "leaves", "one", "treespec")

    def __init__(self, out: Any, batch: int) -> None:
        self.last: Placeholder | None = None
        self.one = isinstance(out, torch.Tensor)
        flat, self.treespec = pytree.tree_flatten(out)
        self.leaves: list[Any] = []
        for x in flat:
            if isinstance(x, torch.Tensor):
                per = x.dim() > 0 and x.shape[0] == batch
                contiguous = x.is_contiguous()
                self.leaves.append(_Leaf(per, tuple(x.shape[1:] if per else x.shape), x.dtype,
                                         x.device, None if contiguous or per
                                         else tuple(x.stride())))
            else:
                self.leaves.append(x)

    def placeholders(self, batch: int, clock: Clock, source: str) -> Any:
        if self.one:
            # One tensor (the common case). The last one is handed out again when nothing
            # else holds it any more (as many references as an object held by one
            # attribute only), so no stale reference can come back to life with the new
            # tick.
            if self.last is not None and sys.getrefcount(self.last) == _HELD_ONCE and \
                    self.last.shape[0] == batch:
                self.last._tick = clock.tick
                return self.last
            x = self.leaves[0]
            self.last = Placeholder((batch, *x.shape) if x.per_sample else x.shape, x.dtype,
                                    x.device, clock, source, x.stride)
            return self.last
        flat = [
            Placeholder((batch, *x.shape) if x.per_sample else x.shape, x.dtype, x.device,
                        clock, source, x.stride)
            if isinstance(x, _Leaf) else x
            for x in self.leaves
        ]
        return pytree.tree_unflatten(flat, self.treespec)


def has_placeholder(out: Any) -> bool:
    return any(isinstance(x, Placeholder) for x in pytree.tree_leaves(out))


# ---------------------------------------------------------------------- prefix discovery
class Discovery:
    """Records which modules complete before the boundary first returns (one pass).

    Forward hooks on every module of the root, removed as soon as the boundary
    returned; outputs are kept so that placeholders can be rebuilt later. Forward
    pre-hooks record the inputs of the first module of the prefix (its signature, and
    ``validate=True``'s digests) and which module runs now (to name the module of a
    random op).
    """

    def __init__(self, root: nn.Module, boundary: nn.Module, clock: Clock) -> None:
        self.root = root
        self.boundary = boundary
        self.names = {id(m): n for n, m in root.named_modules(remove_duplicate=True)}
        bname = self.names[id(boundary)]
        self._ancestors = {id(m) for n, m in root.named_modules()
                           if n == "" or bname.startswith(n + ".")}
        self.done: list[tuple[nn.Module, Any]] = []
        self.first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.running: list[str] = []
        self.taint = Taint(clock)
        self._handles = [m.register_forward_hook(self._hook)
                         for m in root.modules() if m is not boundary]
        self._handles += [m.register_forward_pre_hook(self._pre, with_kwargs=True)
                          for m in root.modules() if m is not boundary]

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if id(module) in self._ancestors:
            return
        if self.first is None:
            self.first = (args, kwargs)
        self.running.append(self.names.get(id(module), describe(module)))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.done.append((module, output))
        if id(module) not in self._ancestors:
            if self.running:
                self.running.pop()
            self.taint.mark(output, self.names.get(id(module), describe(module)))

    def where(self) -> str | None:
        """The module running now (None before the first prefix module started)."""
        if self.first is None:
            return None
        if self.running:
            return repr(self.running[-1])
        return "the model's own forward (between prefix modules)"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def prefix(self) -> list[tuple[str, nn.Module, list[Any]]]:
        """The outermost completed modules that are neither the boundary's ancestors nor
        inside it, in execution order, each with its outputs (one per call)."""
        bname = self.names[id(self.boundary)]

        def inside(name: str, other: str) -> bool:
            return other == "" or name.startswith(other + ".")

        seen: dict[int, tuple[str, nn.Module, list[Any]]] = {}
        for module, out in self.done:
            name = self.names.get(id(module))
            if name is None or inside(bname, name) or inside(name, bname):
                continue
            if id(module) not in seen:
                seen[id(module)] = (name, module, [])
            seen[id(module)][2].append(out)
        names = [n for n, _, _ in seen.values()]
        return [entry for entry in seen.values()
                if not any(inside(entry[0], other) for other in names if other != entry[0])]


# ------------------------------------------------------------ the cut proof, first pass
def bypass_error(boundary: str, source: str, op: str) -> CacheError:
    return CacheError(
        f"FeatureCache(upto={boundary!r}): the output of {source!r} is used by {op} after "
        f"the boundary {boundary!r} returned, so something reads the frozen prefix around "
        "the boundary (a skip connection, output_hidden_states=True, an encoder-decoder "
        "cross path). A replayed boundary output cannot stand in for it. Choose a boundary "
        "whose output is the only thing the rest of the model reads from the prefix, or do "
        "not cache."
    )


class Taint(TorchFunctionMode):
    """Data dependence from prefix outputs during the first (computed) pass.

    Outputs of modules that complete before the boundary returns are tainted with the
    clock's tick; ops propagate taint to their tensor outputs (``*_like``/``new_*``
    factories read only metadata and do not); the boundary's own output is cleaned
    when it returns and the tick moves on. An op after that which consumes a tensor
    tainted with an older tick (and produces a tensor or reads values) is a path
    around the boundary: CacheError, on the first pass already, before any replay.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.taint: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.paused = False  # the cache's own bookkeeping (storing rows) is not the model

    def mark(self, out: Any, source: str) -> None:
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):  # hooks run inner to outer: name the outer
                self.taint[leaf] = (source, self.clock.tick)

    def clean(self, out: Any) -> None:
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.taint.pop(leaf, None)

    def stale(self, out: Any) -> str | None:
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                hit = self.taint.get(leaf)
                if hit is not None and hit[1] != self.clock.tick:
                    return str(hit[0])
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = getattr(func, "__name__", str(func))
        found = None
        for x in pytree.tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor):
                hit = self.taint.get(x)
                if hit is not None and (found is None or hit[1] != self.clock.tick):
                    found = hit
        if found is None or name in _METADATA_FACTORIES:
            return out
        produced = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if found[1] != self.clock.tick and (produced or name in _VALUE_READS
                                            or name in _VALUE_READS_PY):
            raise bypass_error(self.clock.boundary, str(found[0]), name)
        for t in produced:
            if t not in self.taint:
                self.taint[t] = found
        return out


_VALUE_READS_PY = {"tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}
