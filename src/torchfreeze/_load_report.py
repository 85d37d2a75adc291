"""The report of :func:`~torchfreeze.load_pretrained` (its own module: ``errors`` names it
in ``LoadError.report``, and must not import ``load``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ._report import Report, fmt_count, short_path

__all__ = ["LoadReport", "shape_text"]

_MAX_ROWS = 12  # per status in the printed table; to_dict() has everything


def _pct(fraction: float) -> str:
    # 770 classifier values out of 22.7 M must not print as "100.0%"
    if 0 < fraction < 0.001:
        return "<0.1%"
    if 0.999 < fraction < 1:
        return ">99.9%"
    return f"{100 * fraction:.1f}%"


@dataclass
class LoadReport(Report):
    """What :func:`load_pretrained` loaded, skipped and renamed.

    Attributes:
        loaded: model tensors (parameters and buffers) filled from the checkpoint,
            canonical model names, model order.
        missing: model tensors the checkpoint has nothing for (left as initialised).
        unexpected: checkpoint keys that match no model tensor (original names).
        mismatched: model name -> (checkpoint shape, model shape) for names that
            match but shapes differ (skipped, or sliced when ``mismatched="partial"``).
        renamed: checkpoint key -> model name, for every key loaded under another
            name (a ``rename`` rule or an added/removed prefix).
        converted: model name -> (checkpoint dtype, model dtype) for values cast.
        partial: mismatched names whose overlapping slice was copied.
        excluded: model tensors skipped because ``exclude`` selected them.
        ignored: checkpoint key -> why it was deliberately not loaded (e.g. the
            model's non-persistent buffers, which the model computes itself).
        tied: checkpoint key -> model name it shares storage with (loaded once).
        loaded_params: parameter values loaded (partial slices counted by overlap).
        total_params: parameter values in the model (tied ones once).
        loaded_fraction: ``loaded_params / total_params``.
        alignment: the prefix rule applied to checkpoint keys ("" for none).
        source: where the weights came from.
        dry_run: True when nothing was written.
        notes: anything else worth knowing.
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    renamed: dict[str, str]
    converted: dict[str, tuple[str, str]] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    loaded_params: int = 0
    total_params: int = 0
    loaded_fraction: float = 0.0
    alignment: str = ""
    source: str = ""
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    # shapes for the table: checkpoint key / model name -> shape
    _ckpt_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _model_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and every checkpoint key used."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def headline(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched) + len(self.excluded)
        verb = "would load" if self.dry_run else "loaded"
        return (
            f"{verb} {len(self.loaded)}/{total} model tensors"
            + (f" (+{len(self.partial)} partially)" if self.partial else "")
            + f": {_pct(self.loaded_fraction)} of parameters "
            f"({fmt_count(self.loaded_params)} / {fmt_count(self.total_params)})"
        )

    def _rich(self) -> RenderableType:
        # 80 columns: the path is shortened at a separator (the full one is in
        # .source), long names fold inside their column, shapes never break
        table = Table(title=f"load_pretrained from {short_path(self.source)}",
                      title_justify="left")
        table.add_column("status", no_wrap=True)
        table.add_column("name", overflow="fold", ratio=1)
        table.add_column("checkpoint", no_wrap=True)
        table.add_column("model", no_wrap=True)
        ck, md = self._ckpt_shapes, self._model_shapes

        def add(status: str, names: Iterable[str], cells: Any, style: str | None) -> None:
            names = list(names)
            for name in names[:_MAX_ROWS]:
                table.add_row(status, name, *cells(name), style=style)
            if len(names) > _MAX_ROWS:
                table.add_row(status, f"… {len(names) - _MAX_ROWS} more", "", "", style=style)

        add("mismatched", [n for n in self.mismatched if n not in self.partial],
            lambda n: tuple(map(shape_text, self.mismatched[n])), "red")
        add("partial", self.partial,
            lambda n: tuple(map(shape_text, self.mismatched[n])), "yellow")
        add("missing", self.missing, lambda n: ("-", shape_text(md.get(n))), "yellow")
        add("unexpected", self.unexpected, lambda n: (shape_text(ck.get(n)), "-"), "yellow")
        add("excluded", self.excluded, lambda n: ("", shape_text(md.get(n))), "dim")
        add("ignored", [f"{n}: {why}" for n, why in self.ignored.items()],
            lambda n: ("", ""), "dim")
        add("tied", [f"{n} = {m}" for n, m in self.tied.items()], lambda n: ("", ""), "dim")
        casts = Counter(self.converted.values())
        for (src, dst), count in casts.items():
            table.add_row("converted", f"{count} tensors", src, dst, style="dim")
        lines: list[RenderableType] = [Text(self.headline, style="bold")]
        if self.alignment:
            lines.append(Text(f"names aligned: {self.alignment} ({len(self.renamed)} keys)"))
        if table.row_count:
            lines.insert(0, table)
        lines += [Text(note, style="dim") for note in self.notes]
        return Group(*lines)


def shape_text(shape: Sequence[int] | None) -> str:
    return "" if shape is None else str(tuple(shape))
