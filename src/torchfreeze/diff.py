"""What changed between two checkpoints, tensor by tensor (``torchfreeze diff``).

:func:`diff_checkpoints` compares two state dicts: the relative L2 change of
every tensor, grouped by module, and whether the tensors expected to be frozen
are bit-identical. Key names are aligned first with ``load_pretrained``'s rule
(one prefix swap: ``bert.``, a Lightning ``model.``, ``module.``,
``_orig_mod.``), so a base checkpoint compares against a fine-tuned one saved
from a wrapper or a task model; the report says which alignment was used.

This module sits below the command line (``cli.py``) and the plots
(``_plot.py``); it imports neither.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ._bits import bit_equal
from ._report import Report, fmt_count, short_path
from ._select import closest_names, name_tests
from .errors import SelectionError

__all__ = [
    "CheckpointDiff",
    "ModuleChange",
    "TensorChange",
    "diff_checkpoints",
    "failure_line",
    "match_keys",
]


# ---------------------------------------------------------------------------
# selectors over checkpoint keys (no nn.Module needed)


def _prefixes(keys: Iterable[str]) -> list[str]:
    """Every module path implied by dotted tensor names, first-seen order."""
    out: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out[".".join(parts[:i])] = None
    return list(out)


def _under(name: str, keys: Sequence[str]) -> list[str]:
    dotted = name + "."
    return [k for k in keys if k == name or k.startswith(dotted)]


def match_keys(
    keys: Sequence[str], selectors: Iterable[str], *, aliases: Mapping[str, str] | None = None
) -> list[str]:
    """Resolve string selectors against checkpoint keys, as ``tfz.select`` does on a model.

    The grammar is the shared one: exact names, globs (``*`` crosses dots),
    brace lists and ranges, ``"re:<regex>"`` (whole-name match). A name or
    pattern that matches a module path selects every tensor under it.

    Args:
        keys: the checkpoint's tensor names.
        selectors: string selectors.
        aliases: other names of some keys (``alias -> key``): a selector may use
            either spelling (``bert.encoder`` or ``encoder`` after an alignment).

    Returns:
        The matched keys, in ``keys`` order.

    Raises:
        SelectionError: a selector (or one alternative of a brace pattern)
            matched no tensor and no module path; the message names the
            closest real names.

    Example:
        >>> match_keys(["enc.0.w", "enc.1.w", "head.w"], ["enc.{0..1}"])
        ['enc.0.w', 'enc.1.w']
        >>> match_keys(["enc.0.w", "head.w"], ["bert.enc"], aliases={"bert.enc.0.w": "enc.0.w"})
        ['enc.0.w']
    """
    keys = list(keys)
    aliases = dict(aliases or {})
    alias_keys = list(aliases)
    names = list(dict.fromkeys(_prefixes(keys) + keys + _prefixes(alias_keys) + alias_keys))
    hit: set[str] = set()
    for sel in selectors:
        for shown, needle, test in name_tests(sel):
            matched = [n for n in names if test(n)]
            if not matched:
                raise _no_key(names, shown, needle, len(keys))
            for n in matched:
                hit.update(_under(n, keys))
                hit.update(aliases[k] for k in _under(n, alias_keys))
    return [k for k in keys if k in hit]


def _no_key(names: list[str], shown: str, needle: str, num_keys: int) -> SelectionError:
    suggestions = closest_names(names, needle)
    if suggestions:
        hint = "Closest real names: " + ", ".join(repr(s) for s in suggestions) + "."
    else:
        top = list(dict.fromkeys(n.split(".")[0] for n in names))[:8]
        hint = "Top-level names: " + (", ".join(repr(t) for t in top) or "(none)") + "."
    return SelectionError(
        f"selector '{shown}' matched no tensor of the checkpoint ({num_keys} tensors). {hint} "
        "Fix the pattern; `torchfreeze inspect CHECKPOINT --depth 2` lists the names.",
        selector=shown,
        suggestions=suggestions,
    )


# ---------------------------------------------------------------------------
# diff


@dataclass(frozen=True)
class TensorChange:
    """How one tensor differs between two checkpoints.

    Attributes:
        name: the tensor's key.
        status: ``"same"`` (bit-identical: a NaN equals the same NaN, as in
            :func:`~torchfreeze.verify`), ``"changed"``, ``"reshaped"`` (shape
            differs), ``"retyped"`` (dtype differs, e.g. fp32 vs bf16), ``"added"``
            (only in AFTER) or ``"removed"`` (only in BEFORE).
        shape: shape in BEFORE (AFTER for added tensors).
        rel_change: ``‖after − before‖ / ‖before‖`` (L2 over all values);
            ``None`` where it is undefined (reshaped, added, removed, or a
            zero tensor that became non-zero).
        max_abs_change: largest element-wise ``|after − before|``.
    """

    name: str
    status: str
    shape: tuple[int, ...]
    rel_change: float | None = None
    max_abs_change: float | None = None

    @property
    def moved(self) -> bool:
        return self.status != "same"


@dataclass(frozen=True)
class ModuleChange:
    """Changes of the tensors directly under one module."""

    name: str
    tensors: int
    changed: int
    params: int
    rel_change: float | None  # over the module's tensors together
    max_rel_change: float | None
    tensor_names: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class CheckpointDiff(Report):
    """Per-tensor relative change between two checkpoints, grouped by module.

    Attributes:
        before, after: the sources compared.
        tensors: one :class:`TensorChange` per key of either checkpoint.
        modules: one row per module (``depth`` dotted levels; default: the
            tensor's own module).
        expect_frozen: the selectors given with ``--expect-frozen``.
        expected_frozen: the keys they matched.
        changed_frozen: the expected-frozen keys that moved (the check fails
            when this is non-empty).
        not_compared: expected-frozen integer tensors that only one side has
            (``position_ids`` dropped by a newer transformers): listed, not
            counted as moved.
        alignment: the prefix rule applied to AFTER's keys to match BEFORE's
            (``load_pretrained``'s), ``""`` for none.
        aligned: AFTER key -> BEFORE name, for every key renamed by it.
    """

    before: str
    after: str
    tensors: tuple[TensorChange, ...]
    modules: tuple[ModuleChange, ...]
    expect_frozen: tuple[str, ...] = ()
    expected_frozen: tuple[str, ...] = field(default=(), repr=False)
    changed_frozen: tuple[str, ...] = ()
    not_compared: tuple[str, ...] = ()
    alignment: str = ""
    aligned: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no tensor matched by ``expect_frozen`` moved."""
        return not self.changed_frozen

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.moved)

    def _rich(self) -> RenderableType:
        frozen = set(self.expected_frozen)
        bad = set(self.changed_frozen)
        table = Table(title=f"diff {short_path(self.before)} -> {short_path(self.after)}",
                      title_justify="left")
        table.add_column("module", overflow="fold")
        table.add_column("tensors", justify="right")
        table.add_column("changed", justify="right")
        table.add_column("params", justify="right")
        table.add_column("rel. change", justify="right")
        table.add_column("max rel. change", justify="right")
        table.add_column("expect frozen")
        for m in self.modules:
            mark = ""
            if any(k in frozen for k in m.tensor_names):
                mark = "MOVED" if any(k in bad for k in m.tensor_names) else "ok"
            table.add_row(
                m.name or "(top level)", str(m.tensors), str(m.changed), fmt_count(m.params),
                _fmt_rel(m.rel_change, m.changed), _fmt_rel(m.max_rel_change, m.changed),
                Text(mark, style="bold red" if mark == "MOVED" else "green"),
            )
        moved = [t for t in self.tensors if t.moved]
        lines: list[RenderableType] = [table]
        if self.alignment:
            lines.append(Text(
                f"names aligned: {self.alignment} on {self.after} "
                f"({len(self.aligned)} keys), as load_pretrained does", style="dim"))
        lines += [Text(
            f"{len(moved)} of {len(self.tensors)} tensors changed"
            + (f"; {len(self.expected_frozen)} expected frozen" if self.expect_frozen else ""),
            style="bold")]
        odd = [t for t in moved if t.status in ("reshaped", "retyped", "added", "removed")]
        for t in odd[:10]:
            lines.append(Text(f"  {t.status}: {t.name}", style="yellow"))
        if self.not_compared:
            lines.append(Text(
                f"not compared (integer tensors in one checkpoint only): "
                f"{', '.join(self.not_compared[:4])}", style="dim"))
        if self.changed_frozen:
            lines.append(Text(failure_line(self), style="bold red"))
        elif self.expect_frozen:
            lines.append(Text(
                f"OK: all {len(self.expected_frozen)} tensors under --expect-frozen "
                "are bit-identical.", style="bold green"))
        return Group(*lines)


def _fmt_rel(value: float | None, changed: int) -> str:
    if value is None:
        return "n/a" if changed else "0"
    if value == 0.0:
        return "0" if not changed else "<1e-12"
    return f"{value:.2e}"


def failure_line(diff: CheckpointDiff) -> str:
    """The one line that says which expected-frozen tensors moved."""
    by_name = {t.name: t for t in diff.tensors}
    shown = []
    for name in diff.changed_frozen[:8]:
        t = by_name[name]
        what = f"rel {t.rel_change:.2e}" if t.rel_change is not None else t.status
        shown.append(f"{name} ({what})")
    more = f", … (+{len(diff.changed_frozen) - 8})" if len(diff.changed_frozen) > 8 else ""
    return (
        f"FAILED: {len(diff.changed_frozen)} tensor(s) under --expect-frozen "
        f"{' '.join(diff.expect_frozen)} changed: {', '.join(shown)}{more}"
    )


def _group(name: str, depth: int | None) -> str:
    parts = name.split(".")[:-1]
    return ".".join(parts if depth is None else parts[:depth])


def _compare(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[
        TensorChange, float, float]:
    """The change, plus squared norms (diff, before) for module-level aggregation."""
    if a is None or b is None:
        t = b if a is None else a
        assert t is not None
        status = "added" if a is None else "removed"
        return TensorChange(name, status, tuple(t.shape)), math.nan, 0.0
    if a.shape != b.shape:
        return TensorChange(name, "reshaped", tuple(a.shape)), math.nan, 0.0
    if a.dtype != b.dtype:
        return TensorChange(name, "retyped", tuple(a.shape)), math.nan, 0.0
    if bit_equal(a, b):
        norm = float(a.double().pow(2).sum()) if a.numel() else 0.0
        return TensorChange(name, "same", tuple(a.shape), 0.0, 0.0), 0.0, norm
    da, db = a.detach().double(), b.detach().double()
    if a.is_complex():
        da, db = a.detach().to(torch.complex128), b.detach().to(torch.complex128)
    delta = (db - da).abs()
    d2 = float(delta.pow(2).sum())
    n2 = float(da.abs().pow(2).sum())
    rel = math.sqrt(d2 / n2) if n2 > 0 else None
    return (TensorChange(name, "changed", tuple(a.shape), rel, float(delta.max())), d2, n2)


def _align_after(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """AFTER renamed onto BEFORE's names with ``load_pretrained``'s prefix rule."""
    from .load import align_keys

    def shape_ok(key: str, name: str) -> bool:
        ref = before.get(name)
        return ref is not None and tuple(ref.shape) == tuple(after[key].shape)

    rule = align_keys(list(after), set(before), shape_ok)
    if not rule.describe():
        return dict(after), "", {}
    out: dict[str, torch.Tensor] = {}
    aligned: dict[str, str] = {}
    for key, value in after.items():
        name = rule.apply(key)
        if name in before and name not in out:
            out[name] = value
            aligned[key] = name
    for key, value in after.items():  # keys the rule does not place keep their name
        if key not in aligned and key not in out:
            out[key] = value
    return out, rule.describe(), aligned


def _trainable_dtype(t: torch.Tensor | None) -> bool:
    return t is not None and (t.is_floating_point() or t.is_complex())


def _as_state_dict(source: Any, which: str) -> Mapping[str, torch.Tensor]:
    """A path is read with :func:`~torchfreeze.read_state_dict`; a mapping is used as is."""
    if isinstance(source, (str, os.PathLike)):
        from ._checkpoint import read_state_dict

        return read_state_dict(source)
    if not isinstance(source, Mapping):
        raise TypeError(
            f"diff_checkpoints({which}=...) takes a state dict or a checkpoint path, got a "
            f"{type(source).__name__}. Read other sources with tfz.read_state_dict(...) first "
            "(it also takes unsafe_pickle=True for a trusted pickle)."
        )
    return source


def diff_checkpoints(
    before: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    after: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    expect_frozen: Sequence[str] = (),
    depth: int | None = None,
    before_name: str = "BEFORE",
    after_name: str = "AFTER",
    align: bool = True,
) -> CheckpointDiff:
    """Compare two state dicts tensor by tensor.

    Args:
        before: the reference state dict (e.g. the pretrained checkpoint), or a
            checkpoint path (read with :func:`~torchfreeze.read_state_dict`).
        after: the state dict (or path) to check (e.g. after fine-tuning).
        expect_frozen: selectors (the shared string grammar, over the keys of
            both, in either one's spelling) naming tensors that must be
            bit-identical.
        depth: group by the first ``depth`` dotted levels of the module path;
            default: each tensor's own module.
        before_name, after_name: how the two are named in the report.
        align: rename AFTER's keys onto BEFORE's with ``load_pretrained``'s
            prefix rule when that makes more keys match (a base model's
            checkpoint against a task model's, a Lightning ``model.`` prefix,
            ``module.``, ``_orig_mod.``). Rows use BEFORE's names.

    Returns:
        A :class:`CheckpointDiff`; ``.ok`` is False when an expected-frozen
        tensor moved (changed value, shape or dtype, or missing in ``after``;
        an integer tensor only one side has is listed in ``not_compared``).

    Raises:
        SelectionError: an ``expect_frozen`` selector matched no key.
        LoadError: the keys fit equally well under two different alignments.

    Example:
        >>> import torch
        >>> a = {"body.w": torch.ones(2), "head.w": torch.ones(2)}
        >>> b = {"body.w": torch.ones(2), "head.w": torch.zeros(2)}
        >>> d = diff_checkpoints(a, b, expect_frozen=["body"])
        >>> d.ok, d.changed
        (True, ('head.w',))
        >>> d = diff_checkpoints(a, {"model." + k: v for k, v in b.items()})
        >>> d.alignment, d.changed
        ("removed prefix 'model.'", ('head.w',))
    """
    before, after = _as_state_dict(before, "before"), _as_state_dict(after, "after")
    alignment, aligned = "", dict[str, str]()
    if align:
        after, alignment, aligned = _align_after(before, after)
    keys = list(dict.fromkeys([*before, *after]))
    frozen = match_keys(keys, expect_frozen, aliases=aligned) if expect_frozen else []
    changes: list[TensorChange] = []
    acc: dict[str, list[Any]] = {}
    for key in keys:
        change, d2, n2 = _compare(key, before.get(key), after.get(key))
        changes.append(change)
        row = acc.setdefault(_group(key, depth), [0, 0, 0, 0.0, 0.0, None, False, []])
        row[7].append(key)
        row[0] += 1
        row[1] += int(change.moved)
        ref = before.get(key, after.get(key))
        row[2] += ref.numel() if ref is not None else 0
        if math.isnan(d2) or (change.moved and change.rel_change is None):
            row[6] = True  # undefined somewhere: the module figure is undefined too
        else:
            row[3] += d2
            row[4] += n2
        if change.rel_change is not None:
            row[5] = change.rel_change if row[5] is None else max(row[5], change.rel_change)
    modules = []
    for name, (n, moved, params, d2, n2, mx, undefined, names) in acc.items():
        rel = None if undefined or n2 == 0 else math.sqrt(d2 / n2)
        if not moved:
            rel, mx = 0.0, 0.0
        modules.append(ModuleChange(name, n, moved, params, rel, mx, tuple(names)))
    moved_keys = {c.name for c in changes if c.moved}
    # an integer tensor only one side has (transformers' position_ids, a BN counter)
    # is a serialisation detail, never a trained weight: it cannot have "moved"
    uncounted = tuple(
        c.name for c in changes
        if c.status in ("added", "removed") and c.name in frozen
        and not _trainable_dtype(before.get(c.name, after.get(c.name)))
    )
    return CheckpointDiff(
        before=before_name,
        after=after_name,
        tensors=tuple(changes),
        modules=tuple(modules),
        expect_frozen=tuple(expect_frozen),
        expected_frozen=tuple(frozen),
        changed_frozen=tuple(k for k in frozen if k in moved_keys and k not in uncounted),
        not_compared=uncounted,
        alignment=alignment,
        aligned=aligned,
    )
