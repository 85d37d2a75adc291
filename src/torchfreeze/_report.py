"""Shared rendering for torchfreeze's report dataclasses.

Every report prints as a readable table (``str(report)``, plain text with no
escape codes so it is safe in logs), renders with colour through rich
(``rich.print(report)``), and converts to plain Python with ``to_dict()``.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from rich.console import Console, RenderableType

__all__ = ["Report", "fmt_bytes", "fmt_count", "render_text", "short_path", "to_plain"]


def render_text(renderable: RenderableType, *, width: int = 120) -> str:
    """Render a rich renderable to plain text (no colour, no escape codes)."""
    buf = io.StringIO()
    console = Console(
        file=buf, width=width, force_terminal=False, color_system=None, no_color=True
    )
    console.print(renderable)
    return buf.getvalue().rstrip("\n")


def short_path(path: str, width: int = 44) -> str:
    """``path`` cut from the left at a separator to fit ``width`` characters, so a
    report's title stays on one 80-column line; the file name is always kept.

    >>> short_path("/data/runs/2026-11-30/minilm/checkpoints/model.safetensors", 40)
    '…/minilm/checkpoints/model.safetensors'
    """
    if len(path) <= width:
        return path
    parts = path.replace("\\", "/").split("/")
    out = parts[-1]
    for part in reversed(parts[:-1]):
        if len(out) + len(part) + 3 > width:
            break
        out = f"{part}/{out}"
    return f"…/{out}"


def fmt_count(n: float) -> str:
    """``1234567 -> '1.2 M'``: parameter counts as people read them."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)}"


def fmt_bytes(n: float | None) -> str:
    """``123456789 -> '117.7 MiB'``: byte counts as people read them (``None``: ``'-'``)."""
    if n is None:
        return "-"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def to_plain(value: Any) -> Any:
    """Tuples, sets, dataclasses, torch sizes/dtypes -> JSON-able Python."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.repr}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Report:
    """Mixin for report dataclasses: subclasses implement ``_rich()``."""

    def _rich(self) -> RenderableType:  # pragma: no cover - abstract
        raise NotImplementedError

    def __rich__(self) -> RenderableType:
        return self._rich()

    def __str__(self) -> str:
        return render_text(self._rich())

    def to_dict(self) -> dict[str, Any]:
        plain = to_plain(self)
        if not isinstance(plain, dict):  # pragma: no cover - every Report is a dataclass
            raise TypeError(f"{type(self).__name__} is not a dataclass; it cannot be a Report")
        return plain
