"""One selector grammar for every torchfreeze function: :func:`select` (its
docstring is the grammar's reference), and the :class:`ModelIndex` of names,
aliases and identities that every function resolves selectors against.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ._compat import child_modules, own_buffers, own_parameters, wrapped_child
from ._report import fmt_count
from .errors import ModelTypeError, SelectionError

__all__ = [
    "ModelIndex",
    "Selection",
    "Selector",
    "closest_names",
    "expand_braces",
    "name_tests",
    "require_module",
    "resolve",
    "select",
    "selector_label",
    "unwrap",
    "wrapped_attr",
]

#: Anything :func:`select` accepts (a union, list or nesting of these).
Selector = Union[
    str,
    "type[nn.Module]",
    nn.Module,
    torch.Tensor,
    Callable[[str, torch.Tensor], bool],
    Iterable[Any],
]

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Selection:
    """What a set of selectors picked in one model.

    Attributes:
        param_names: canonical names of the selected parameters, model order.
        module_names: modules wholly inside the selection (matched directly,
            under a matched module, or all of whose parameters are selected).
        buffer_names: buffers of those modules, plus buffers matched by name.
        params: the parameter objects, in ``param_names`` order.
        modules: the module objects, in ``module_names`` order.
        buffers: the buffer tensors, in ``buffer_names`` order.
    """

    param_names: tuple[str, ...]
    module_names: tuple[str, ...]
    buffer_names: tuple[str, ...] = ()
    params: tuple[nn.Parameter, ...] = field(default=(), repr=False, compare=False)
    modules: tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)
    buffers: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)
    #: (name the selectors covered, name they did not) for each tied parameter
    #: selected under one of its names only
    tied: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.param_names)

    def __contains__(self, name: object) -> bool:
        return name in self.param_names or name in self.module_names or name in self.buffer_names

    def __iter__(self) -> Iterator[str]:
        return iter(self.param_names)

    @property
    def num_params(self) -> int:
        """Number of scalar values in the selected parameters."""
        return sum(p.numel() for p in self.params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "param_names": list(self.param_names),
            "module_names": list(self.module_names),
            "buffer_names": list(self.buffer_names),
            "num_params": self.num_params,
        }

    def __str__(self) -> str:
        shown = ", ".join(self.param_names[:6])
        more = f", … (+{len(self.param_names) - 6})" if len(self.param_names) > 6 else ""
        return (
            f"Selection: {len(self.param_names)} parameters ({fmt_count(self.num_params)} values)"
            f" in {len(self.module_names)} modules: {shown}{more}"
        )



def wrapped_attr(module: nn.Module) -> str | None:
    """The child name under which ``module`` wraps another model, or None.

    ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), ``nn.DataParallel``
    and ``DistributedDataParallel`` (``module``), FSDP1's
    ``FullyShardedDataParallel`` (``_fsdp_wrapped_module``) and activation
    checkpointing's ``CheckpointWrapper`` (``_checkpoint_wrapped_module``).
    FSDP2 (``fully_shard``) changes the class in place and keeps the names.
    """
    private = wrapped_child(module)
    if private is not None:
        return private
    if "module" in child_modules(module) and isinstance(
        module, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    ):
        return "module"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any wrappers around ``model`` itself (see :func:`wrapped_attr`).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while (attr := wrapped_attr(model)) is not None and seen < 8:
        model = child_modules(model)[attr]
        seen += 1
    return model


def selector_label(selector: Any) -> str:
    """A short readable name for a selector (in group names and messages)."""
    if isinstance(selector, str):
        return selector
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, (list, tuple, set, frozenset)):
        return "[" + ",".join(selector_label(s) for s in selector) + "]"
    return getattr(selector, "__name__", type(selector).__name__)


def require_module(model: Any, func: str, arg: str = "model") -> None:
    """Raise :class:`~torchfreeze.errors.ModelTypeError` (a ``TypeError``) unless
    ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, (str, list, tuple, type)) or callable(model):
            hint = " (a selector? the model comes first: tfz." + func + "(model, ...))"
        elif isinstance(model, torch.optim.Optimizer):
            hint = " (the optimizer is passed as optimizer=...)"
        raise ModelTypeError(
            f"tfz.{func}() expects an nn.Module as {arg}, got {type(model).__name__}{hint}. "
            "Pass the model itself (a torch.compile, DataParallel or DDP wrapper works too)."
        )


class ModelIndex:
    """Names, aliases and identities of a model's modules, parameters and buffers.

    Built once per call; every alias name (a tied weight reachable under two
    names) maps to the same object, and ``*_name`` maps identity back to the
    canonical (first) name. Wrappers (:func:`wrapped_attr`) are looked through:
    canonical names leave out their ``_orig_mod.``/``module.`` part, and the
    spelled-out names are kept as aliases. Wrapper modules themselves are in
    ``wrappers``, not in ``modules``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.root = model
        self.model = unwrap(model)
        self.modules: dict[str, nn.Module] = {}  # canonical name -> module
        self.params: dict[str, nn.Parameter] = {}  # canonical name -> param
        self.buffers: dict[str, torch.Tensor] = {}  # canonical name -> buffer
        self.wrappers: list[tuple[str, nn.Module]] = []  # (canonical name, wrapper)
        self.module_aliases: list[tuple[str, nn.Module]] = []
        self.param_aliases: list[tuple[str, nn.Parameter]] = []
        self.buffer_aliases: list[tuple[str, torch.Tensor]] = []
        self.module_name: dict[int, str] = {}
        self.param_name: dict[int, str] = {}
        self.buffer_name: dict[int, str] = {}
        for raw, clean, module, is_wrapper in _walk(model):
            names = [clean] if raw == clean else [clean, raw]
            for mname in names:
                self.module_aliases.append((mname, module))
            if is_wrapper:
                self.wrappers.append((clean, module))
            elif id(module) not in self.module_name:
                self.module_name[id(module)] = clean
                self.modules[clean] = module
            for pname, p in own_parameters(module):
                for mname in names:
                    self.param_aliases.append((f"{mname}.{pname}" if mname else pname, p))
                if id(p) not in self.param_name:
                    full = f"{clean}.{pname}" if clean else pname
                    self.param_name[id(p)] = full
                    self.params[full] = p
            for bname, b, _ in own_buffers(module):
                for mname in names:
                    self.buffer_aliases.append((f"{mname}.{bname}" if mname else bname, b))
                if id(b) not in self.buffer_name:
                    full = f"{clean}.{bname}" if clean else bname
                    self.buffer_name[id(b)] = full
                    self.buffers[full] = b
        self._param_order = {id(p): i for i, p in enumerate(self.params.values())}

    def all_names(self) -> list[str]:
        names = [n for n, _ in self.module_aliases if n]
        names += [n for n, _ in self.param_aliases]
        names += [n for n, _ in self.buffer_aliases]
        return list(dict.fromkeys(names))

    def aliases_of(self, p: torch.Tensor) -> list[str]:
        """Every name of parameter ``p`` (several when it is tied), canonical first."""
        return list(dict.fromkeys(n for n, q in self.param_aliases if q is p))

    def describe(self) -> str:
        inside = ""
        if self.root is not self.model:
            inside = f" inside {type(self.root).__name__}"
        return (
            f"{type(self.model).__name__}{inside} ({len(self.modules)} modules, "
            f"{len(self.params)} parameters)"
        )


def _walk(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, bool]]:
    """``named_modules(remove_duplicate=False)`` with, for each module, its raw name,
    its name without wrapper parts, and whether it is a wrapper."""
    stack: list[tuple[str, str, nn.Module]] = [("", "", model)]
    while stack:
        raw, clean, module = stack.pop()
        attr = wrapped_attr(module)
        yield raw, clean, module, attr is not None
        kids = []
        for name, child in child_modules(module).items():
            child_raw = f"{raw}.{name}" if raw else name
            if name == attr:
                child_clean = clean
            else:
                child_clean = f"{clean}.{name}" if clean else name
            kids.append((child_raw, child_clean, child))
        stack.extend(reversed(kids))


# ---------------------------------------------------------------------------
# brace expansion


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{0..3}`` integer ranges (nesting allowed).

    >>> expand_braces("encoder.layer.{0..2}.{q,v}")
    ['encoder.layer.0.q', 'encoder.layer.0.v', 'encoder.layer.1.q', 'encoder.layer.1.v', \
'encoder.layer.2.q', 'encoder.layer.2.v']
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        if pattern[end] == "{":
            depth += 1
        elif pattern[end] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise SelectionError(
            f"selector {pattern!r} has an unclosed '{{'; close it, e.g. 'layer.{{0..3}}'.",
            selector=pattern,
        )
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        step = 1 if b >= a else -1
        alternatives = [str(i) for i in range(a, b + step, step)]
    else:
        alternatives = _split_top_level(body)
        if len(alternatives) < 2:
            raise SelectionError(
                f"selector {pattern!r}: '{{{body}}}' is neither a list '{{a,b}}' nor a range "
                f"'{{0..3}}'. Write one of those, or use 're:' for a regular expression.",
                selector=pattern,
            )
    out: list[str] = []
    for alt in alternatives:
        for rest in expand_braces(head + alt + tail):
            out.append(rest)
    return out


def _split_top_level(body: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


# ---------------------------------------------------------------------------
# matching


@dataclass
class _Hits:
    modules: set[int] = field(default_factory=set)  # ids of modules matched directly
    params: set[int] = field(default_factory=set)  # ids of params matched directly
    buffers: set[int] = field(default_factory=set)  # ids of buffers matched directly
    # parameter names matched by a name test (a tied parameter has several names,
    # and a name selector covers only the ones it spells)
    param_names: set[str] = field(default_factory=set)
    params_by_identity: set[int] = field(default_factory=set)  # tensor/callable selectors

    def empty(self) -> bool:
        return not (self.modules or self.params or self.buffers)

    def update(self, other: _Hits) -> None:
        self.modules |= other.modules
        self.params |= other.params
        self.buffers |= other.buffers
        self.param_names |= other.param_names
        self.params_by_identity |= other.params_by_identity


def _flatten(selectors: Iterable[Any]) -> Iterator[Any]:
    for sel in selectors:
        if isinstance(sel, (str, type, nn.Module, torch.Tensor)) or callable(sel):
            yield sel
        elif isinstance(sel, Iterable) and not isinstance(sel, (dict, bytes)):
            yield from _flatten(sel)
        else:
            raise SelectionError(
                f"{sel!r} ({type(sel).__name__}) is not a selector. Use a name or glob "
                "string, 're:<regex>', an nn.Module subclass, a module or tensor of the model, "
                "a callable (name, param) -> bool, or a list of these.",
                selector=sel,
            )


def _match_names(idx: ModelIndex, test: Callable[[str], bool]) -> _Hits:
    hits = _Hits()
    for name, module in idx.module_aliases:
        if name and test(name):
            hits.modules.add(id(module))
    for name, p in idx.param_aliases:
        if test(name):
            hits.params.add(id(p))
            hits.param_names.add(name)
    for name, b in idx.buffer_aliases:
        if test(name):
            hits.buffers.add(id(b))
    return hits


def name_tests(pattern: str) -> list[tuple[str, str, Callable[[str], bool]]]:
    """The name tests one string selector stands for, one per brace alternative.

    Returns ``(shown, needle, test)`` triples: how to name the alternative in an
    error, the text to find close names for, and the test over dotted names.
    Used for models here and for checkpoint keys by ``torchfreeze diff``.
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise SelectionError(
                f"selector {pattern!r} is not a valid regular expression ({exc}). "
                "Fix the expression, or drop 're:' to use a glob.",
                selector=pattern,
            ) from None
        return [(pattern, pattern[3:], lambda n: rx.fullmatch(n) is not None)]
    tests = []
    for alt in expand_braces(pattern):
        shown = pattern if alt == pattern else f"{alt}' (from '{pattern}"
        tests.append((shown, alt, _name_test(alt)))
    return tests


def _name_test(alt: str) -> Callable[[str], bool]:
    if _GLOB_CHARS.search(alt):
        return lambda n: fnmatch.fnmatchcase(n, alt)
    return lambda n: n == alt


def closest_names(names: list[str], needle: str) -> list[str]:
    """Up to five real names close to a selector that matched nothing: names that
    end with it first (a missing wrapper prefix such as ``module.``), then by
    spelling (difflib)."""
    core = _GLOB_CHARS.sub("", needle).strip(".")
    suffix = [n for n in names if core and n.endswith("." + core)]
    close = difflib.get_close_matches(core, names, n=5, cutoff=0.5)
    if not close and core:
        # compare against the same number of dotted parts (a deep name vs a short pattern)
        depth = core.count(".") + 1
        heads = list(dict.fromkeys(".".join(n.split(".")[:depth]) for n in names))
        close = difflib.get_close_matches(core, heads, n=5, cutoff=0.5)
    return list(dict.fromkeys(suffix[:3] + close))[:5]


def _match_string(idx: ModelIndex, pattern: str) -> _Hits:
    total = _Hits()
    for shown, needle, test in name_tests(pattern):
        hits = _match_names(idx, test)
        if hits.empty():
            raise _no_match(idx, shown, needle)
        total.update(hits)
    return total


def _no_match(idx: ModelIndex, shown: str, needle: str) -> SelectionError:
    suggestions = closest_names(idx.all_names(), needle)
    if suggestions:
        hint = "Closest real names: " + ", ".join(repr(s) for s in suggestions) + "."
    else:
        top = [n for n, _ in idx.model.named_children()][:8]
        hint = "Top-level modules: " + (", ".join(repr(t) for t in top) or "(none)") + "."
    return SelectionError(
        f"selector '{shown}' matched nothing in {idx.describe()}. {hint} "
        "Fix the name, or check a selector first with tfz.select(model, ...).",
        selector=shown,
        suggestions=suggestions,
    )


def _match_one(idx: ModelIndex, sel: Any) -> _Hits:
    hits = _Hits()
    if isinstance(sel, str):
        return _match_string(idx, sel)
    if isinstance(sel, type):
        if not issubclass(sel, nn.Module):
            raise SelectionError(
                f"type {sel.__name__} is not an nn.Module subclass; a type selector picks "
                "modules by class, e.g. nn.BatchNorm2d.",
                selector=sel,
            )
        hits.modules = {id(m) for m in idx.modules.values() if isinstance(m, sel)}
        if not hits.modules:
            present = sorted({type(m).__name__ for m in idx.modules.values()})
            raise SelectionError(
                f"selector {sel.__name__} matched no module in {idx.describe()}. Module types "
                f"present: {', '.join(present[:12])}{', …' if len(present) > 12 else ''}. "
                "Use one of those types or a name.",
                selector=sel,
                suggestions=difflib.get_close_matches(sel.__name__, present, n=3),
            )
        return hits
    if isinstance(sel, nn.Module):
        sel = unwrap(sel)
        if id(sel) not in idx.module_name:
            raise SelectionError(
                f"the {type(sel).__name__} object given as a selector is not part of "
                f"{idx.describe()}. Pass a submodule of this model (e.g. model.head), "
                "or its name.",
                selector=sel,
            )
        hits.modules.add(id(sel))
        return hits
    if isinstance(sel, torch.Tensor):
        if id(sel) in idx.param_name:
            hits.params.add(id(sel))
            hits.params_by_identity.add(id(sel))
        elif id(sel) in idx.buffer_name:
            hits.buffers.add(id(sel))
        else:
            raise SelectionError(
                f"the tensor of shape {tuple(sel.shape)} given as a selector is neither a "
                f"parameter nor a buffer of {idx.describe()}. Pass the model's own tensor "
                "(e.g. model.fc.weight) or its name.",
                selector=sel,
            )
        return hits
    # a callable (name, param) -> bool
    hits.params = {id(p) for name, p in idx.params.items() if sel(name, p)}
    hits.params_by_identity = set(hits.params)
    if not hits.params:
        fname = getattr(sel, "__name__", type(sel).__name__)
        raise SelectionError(
            f"callable selector {fname} returned False for all {len(idx.params)} parameters "
            f"of {idx.describe()}. Check its condition, e.g. on tfz.select(model).param_names.",
            selector=sel,
        )
    return hits


def _collect(idx: ModelIndex, selectors: Iterable[Any], *, trainable: bool = False) -> _Hits:
    total = _Hits()
    for sel in _flatten(selectors):
        hits = _match_one(idx, sel)
        if trainable and hits.buffers and not (hits.params or hits.modules):
            raise _buffers_only(idx, sel, hits)
        total.update(hits)
    return total


def _buffers_only(idx: ModelIndex, sel: Any, hits: _Hits) -> SelectionError:
    names = [n for n, b in idx.buffers.items() if id(b) in hits.buffers]
    owners = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    shown = sel if isinstance(sel, str) else f"a {type(sel).__name__} of shape {tuple(sel.shape)}"
    return SelectionError(
        f"selector {shown!r} selects only buffers ({', '.join(names[:4])}"
        f"{', ...' if len(names) > 4 else ''}), and buffers are not trainable: requires_grad "
        "does not apply to them. To keep BatchNorm running statistics fixed, freeze the layer "
        f"itself ({', '.join(repr(o) for o in owners[:3] if o) or 'its module'}) with "
        "bn='eval' (the default: statistics never move) or bn='stats' (they keep updating). "
        "Nothing was changed.",
        selector=sel,
        suggestions=[o for o in owners if o],
    )


def _closure(idx: ModelIndex, hits: _Hits) -> tuple[set[int], set[int], set[int]]:
    """Expand matched modules to everything under them."""
    modules, params, buffers = set(), set(hits.params), set(hits.buffers)
    for mod in idx.modules.values():
        if id(mod) in hits.modules and id(mod) not in modules:
            for sub in mod.modules():
                modules.add(id(sub))
            params.update(id(p) for p in mod.parameters())
            buffers.update(id(b) for b in mod.buffers())
    return modules, params, buffers


def _tied(idx: ModelIndex, hits: _Hits, params: set[int]) -> list[tuple[str, str]]:
    """Tied parameters the selectors reached under some of their names only."""
    by_id: dict[int, list[str]] = {}
    for name, p in idx.param_aliases:
        if id(p) in params:
            by_id.setdefault(id(p), []).append(name)
    tied = {i: list(dict.fromkeys(ns)) for i, ns in by_id.items() if len(set(ns)) > 1}
    if not tied:
        return []
    module_ids: dict[str, set[int]] = {}
    for name, m in idx.module_aliases:
        module_ids.setdefault(name, set()).add(id(m))

    def covered(name: str) -> bool:
        if name in hits.param_names:
            return True
        parts = name.split(".")[:-1]
        return any(
            module_ids.get(".".join(parts[:i]), set()) & hits.modules
            for i in range(len(parts) + 1)
        )

    out = []
    for pid, names in tied.items():
        if pid in hits.params_by_identity:
            continue
        inside = [n for n in names if covered(n)]
        outside = [n for n in names if not covered(n)]
        if inside and outside:
            out.append((inside[0], outside[0]))
    return out


def resolve(
    model: nn.Module,
    selectors: Iterable[Any] = (),
    *,
    exclude: Any = None,
    default_all: bool = True,
    allow_empty: bool = True,
    trainable: bool = False,
    index: ModelIndex | None = None,
    what: str = "selection",
) -> Selection:
    """:func:`select` for library code: ``selectors`` as one iterable.

    With no selectors at all and ``default_all=True`` the whole model is
    selected. Selectors that are only empty collections (``[]``, ``[[]]``) select
    nothing: an empty :class:`Selection`, or with ``allow_empty=False`` a
    :class:`SelectionError` naming ``what`` (see the module docstring). With
    ``trainable=True`` a selector that picks only buffers is an error.
    """
    idx = index if index is not None else ModelIndex(model)
    given = list(selectors)
    flat = list(_flatten(given))
    if not given:
        if not default_all:
            raise SelectionError(
                "no selector given. Name what to select, e.g. 'backbone' or nn.BatchNorm2d.",
            )
        hits = _Hits(modules={id(idx.model)})
    elif not flat:
        if not allow_empty:
            raise SelectionError(
                f"{what} {_show(given)} is empty, so it selects nothing. Name what it should "
                "select (e.g. 'head'), or leave it out.",
                selector=given,
            )
        return Selection(param_names=(), module_names=())
    else:
        hits = _collect(idx, flat, trainable=trainable)
    modules, params, buffers = _closure(idx, hits)
    ex_modules: set[int] = set()
    if exclude is not None:
        ex_modules, ex_params, ex_buffers = _closure(idx, _collect(idx, [exclude]))
        modules -= ex_modules
        params -= ex_params
        buffers -= ex_buffers
    # a module is wholly selected when all of its parameters are
    for mod in idx.modules.values():
        own = [id(p) for p in mod.parameters()]
        if own and all(i in params for i in own):
            if id(mod) not in ex_modules:
                modules.add(id(mod))
        elif own:
            modules.discard(id(mod))
    for mod in idx.modules.values():
        if id(mod) in modules:
            buffers.update(id(b) for b in mod.buffers(recurse=False))
    if not (params or modules or buffers):
        raise SelectionError(
            f"the selection is empty: exclude={exclude!r} removed everything that "
            f"{flat!r} matched. Narrow the exclude.",
            selector=flat,
        )
    sel_params = [(n, p) for n, p in idx.params.items() if id(p) in params]
    sel_modules = [(n, m) for n, m in idx.modules.items() if id(m) in modules]
    sel_buffers = [(n, b) for n, b in idx.buffers.items() if id(b) in buffers]
    return Selection(
        param_names=tuple(n for n, _ in sel_params),
        module_names=tuple(n for n, _ in sel_modules),
        buffer_names=tuple(n for n, _ in sel_buffers),
        params=tuple(p for _, p in sel_params),
        modules=tuple(m for _, m in sel_modules),
        buffers=tuple(b for _, b in sel_buffers),
        tied=tuple(_tied(idx, hits, params)) if given else (),
    )


def _show(given: list[Any]) -> str:
    return repr(given[0] if len(given) == 1 else given)


def select(model: nn.Module, *selectors: Selector, exclude: Selector | None = None) -> Selection:
    """Resolve selectors against ``model`` without changing it.

    A *selector* picks parameters (and the modules and buffers around them):

    * ``str``: a module, parameter or buffer name. A module name selects
      everything under it. Globs (``*``, ``?``, ``[..]``; ``*`` also crosses dots),
      brace ranges and lists (``encoder.layer.{0..3}``, ``*.{q,k,v}_proj``), and
      ``"re:<regex>"`` (matched against the *whole* dotted name, like a glob).
    * an ``nn.Module`` subclass, e.g. ``nn.BatchNorm2d``: every module of that type.
    * an ``nn.Module`` or ``torch.Tensor`` object that belongs to the model.
    * a callable ``(name, param) -> bool`` over the model's parameters.
    * a list/tuple/set of any of the above (nested freely): their union.

    Every selector (and every alternative of a brace expansion) must match
    something; otherwise :class:`~torchfreeze.errors.SelectionError` names the
    closest real names. Shared/tied parameters are handled once, by identity, under
    the first name PyTorch gives them.

    **Empty selections.** Only a call with *no selector argument at all* means the
    whole model (``tfz.freeze(model)``). An explicit empty collection (``[]``,
    ``()``, ``set()``, ``[[]]``; e.g. a config's ``freeze_layers: []``) selects
    nothing. What "nothing" does depends on what the selection is for:

    * an *action* on the selection (:func:`~torchfreeze.freeze`,
      :func:`~torchfreeze.unfreeze`, :func:`~torchfreeze.frozen`, the callbacks'
      ``freeze=``, an ``exclude=`` anywhere, ``torchfreeze.distributed``) does
      nothing and returns an empty :class:`Selection`;
    * a selection that *defines* something (a ``param_groups`` rule or ``layers=``
      level, a ``GradualUnfreeze``/callback milestone, ``fine_tune_schedule``'s
      ``head=``, ``convert_frozen_batchnorm``) raises
      :class:`~torchfreeze.errors.SelectionError`, exactly like a selector that
      matches nothing.

    ``tfz.freeze(model, *names)`` with an empty ``names`` is the call without
    selectors (Python cannot tell them apart): pass the list itself,
    ``tfz.freeze(model, names)``.

    **Wrappers.** ``torch.compile`` (``_orig_mod``), ``nn.DataParallel`` and
    ``DistributedDataParallel`` (``module``), FSDP1 (``_fsdp_wrapped_module``) and
    activation-checkpoint wrappers (``_checkpoint_wrapped_module``) are looked
    through, at the root or around any submodule: names are the wrapped model's own
    (``encoder.layer.0``), and the wrapper's spelling (``_orig_mod.encoder.layer.0``)
    is accepted as an alias, so names are valid for both.

    **Buffers** are not trainable: naming one alone (``"bn.running_mean"``) in a
    function that changes ``requires_grad`` is a :class:`SelectionError` that names
    the BatchNorm policies (``bn="eval"``/``"stats"``) instead.

    Args:
        model: the model to search.
        *selectors: names, globs, brace patterns, ``"re:"`` regexes, module types,
            module/tensor objects, callables ``(name, param) -> bool``, or lists of
            these. Their union is selected; no selector at all selects the whole
            model, an empty list selects nothing.
        exclude: selectors to subtract (same grammar).

    Returns:
        A :class:`Selection`.

    Raises:
        SelectionError: a selector (or exclude, or one alternative of a brace
            pattern) matched nothing; the message names the closest real names.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> tfz.select(net, "*.weight", exclude="2").param_names
        ('0.weight',)
        >>> len(tfz.select(net, []))   # an explicit empty list selects nothing
        0
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        >>> tfz.select(net, "0", nn.BatchNorm1d).param_names   # a name and a type
        ('0.weight', '0.bias', '1.weight', '1.bias')
    """
    require_module(model, "select")
    return resolve(model, selectors, exclude=exclude)
