"""Figures for the command line (matplotlib, Agg backend, imported only when used)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from .errors import TorchfreezeError

if TYPE_CHECKING:  # pragma: no cover
    from .diff import CheckpointDiff

__all__ = ["plot_demo", "plot_diff", "require_matplotlib"]


def require_matplotlib() -> Any:
    """Import matplotlib's object API (no pyplot, no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TorchfreezeError(
            "plotting needs matplotlib, which is not installed. Install it with: "
            "pip install 'torchfreeze[demo]' (or pip install matplotlib)."
        ) from None
    return Figure, FigureCanvasAgg


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    _, canvas_cls = require_matplotlib()
    canvas_cls(fig)
    fig.savefig(os.fspath(path), dpi=110)


def plot_demo(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Accuracy per epoch per strategy, and per-layer relative weight change as a heat-map."""
    figure_cls, _ = require_matplotlib()
    results = payload["strategies"]
    fig = figure_cls(figsize=(12, 4.6), layout="constrained")
    ax_acc, ax_heat = fig.subplots(1, 2, width_ratios=[1, 1.15])
    for key, r in results.items():
        curve = [100 * a for a in r["accuracy_per_epoch"]]
        # the cached head trains on the very same numbers as the linear probe: dashed,
        # so the identical curve underneath stays visible
        style = {"linestyle": "--", "marker": "x"} if key == "head-cached" else {"marker": "o"}
        ax_acc.plot(range(1, len(curve) + 1), curve, label=r["label"], **style)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy on digits 5-9 (%)")
    ax_acc.set_title("Fine-tuning from the 0-4 checkpoint vs. from scratch")
    ax_acc.set_xticks(range(1, payload["config"]["epochs"] + 1))
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)

    labels = [r["label"] for r in results.values()]
    layers = list(next(iter(results.values()))["relative_weight_change"])
    values = [[r["relative_weight_change"][name] for name in layers] for r in results.values()]
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    # log scale: the new head moves ~100x more than the backbone; exact zeros (frozen)
    # are masked and drawn in their own colour
    grid = np.ma.masked_equal(np.asarray(values, dtype=float), 0.0)
    top = float(grid.max()) if grid.count() else 1.0
    low = max(min(float(grid.min()) if grid.count() else 1e-3, top / 10), top * 1e-4)
    cmap = colormaps["magma_r"].with_extremes(bad="#d8ecd3")
    image = ax_heat.imshow(grid, cmap=cmap, norm=LogNorm(vmin=low, vmax=top), aspect="auto")
    ax_heat.set_xticks(range(len(layers)), labels=layers)
    ax_heat.set_yticks(range(len(labels)), labels=labels)
    ax_heat.set_title("relative weight change per layer  ‖Δw‖ / ‖w₀‖  (log scale)")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = "0 (frozen)" if v == 0.0 else f"{v:.2f}" if v >= 0.01 else f"{v:.1e}"
            dark = v > 0 and math.log(v / low) > 0.45 * math.log(top / low)
            ax_heat.text(j, i, text, ha="center", va="center", fontsize=8,
                         color="white" if dark else "black")
    fig.colorbar(image, ax=ax_heat, shrink=0.85)
    _save(fig, path)


def plot_diff(diff: CheckpointDiff, path: str | os.PathLike[str]) -> None:
    """Per-module relative change between two checkpoints as a horizontal bar chart."""
    figure_cls, _ = require_matplotlib()
    rows = list(diff.modules)
    frozen = set(diff.expected_frozen)
    moved = set(diff.changed_frozen)
    fig = figure_cls(figsize=(8, 1.2 + 0.28 * len(rows)), layout="constrained")
    ax = fig.subplots()
    names = [m.name or "(top level)" for m in rows]
    values = [0.0 if m.rel_change is None or math.isnan(m.rel_change) else m.rel_change
              for m in rows]
    colors = []
    for m in rows:
        if any(k in moved for k in m.tensor_names):
            colors.append("tab:red")  # expected frozen, but moved
        elif any(k in frozen for k in m.tensor_names):
            colors.append("tab:green")
        else:
            colors.append("tab:blue")
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("relative change ‖after − before‖ / ‖before‖")
    title = f"{os.path.basename(diff.before)} → {os.path.basename(diff.after)}"
    if diff.expect_frozen:
        title += "   (green: expected frozen, red: expected frozen but moved)"
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
