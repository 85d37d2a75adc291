"""Shared helpers for the torchfreeze benchmarks.

Every benchmark prints a table with the measured figure, the ratio measured
side by side in one process (variants interleaved, so machine noise hits both),
the theoretical limit, and the ratio to the limit.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

WIDTH = 150


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(*, threads: bool = True) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    used = f" ({torch.get_num_threads()} thread(s) used)" if threads else ""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}{used}, "
        f"Python {platform.python_version()}, {now}"
    )


def cached_limit(f: float, epochs: int) -> float:
    """Best speed-up of a replayed frozen prefix over the plain requires_grad loop.

    Plain: every step costs f (frozen forward) + 3(1-f) (trainable forward and a
    backward of ~2x). Cached: the frozen forward runs in the first epoch only.
    """
    return epochs * (3 - 2 * f) / (f + 3 * epochs * (1 - f))


def plain_limit(f: float) -> float:
    """Best speed-up of a plain requires_grad=False loop over full fine-tuning."""
    return 3 / (3 - 2 * f)


def flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Timer:
    """Accumulates wall time of named variants run in alternation."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start
        return out


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]],
          caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def console() -> Console:
    return Console(width=WIDTH)


def fmt_bytes(n: float) -> str:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
