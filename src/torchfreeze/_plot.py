"""Figures for the command line (matplotlib, Agg backend, imported only when used)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from .errors import TorchfreezeError

if TYPE_CHECKING:  # pragma: no cover
    from .diff import CheckpointDiff

__all__ = ["plot_demo", "plot_diff", "plot_llm", "plot_news", "require_matplotlib"]


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
    _drift_heatmap(fig, ax_heat, labels, layers, values, zero="0 (frozen)", small=".1e",
                   title="relative weight change per layer  ‖Δw‖ / ‖w₀‖  (log scale)")
    _save(fig, path)


def _drift_heatmap(fig: Any, ax: Any, rows: list[str], layers: list[str],
                   values: list[list[float]], *, zero: str, small: str, title: str,
                   rotate: bool = False) -> None:
    """Relative weight change per (row, layer) on a log colour scale, values written in.

    Log scale: a new head moves ~100x more than the backbone. Exact zeros (frozen)
    are masked and drawn in their own colour (green).
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    grid = np.ma.masked_equal(np.asarray(values, dtype=float), 0.0)
    top = float(grid.max()) if grid.count() else 1.0
    low = max(min(float(grid.min()) if grid.count() else 1e-3, top / 10), top * 1e-4)
    cmap = colormaps["magma_r"].with_extremes(bad="#d8ecd3")
    image = ax.imshow(grid, cmap=cmap, norm=LogNorm(vmin=low, vmax=top), aspect="auto")
    if rotate:
        ax.set_xticks(range(len(layers)), labels=layers, rotation=30, ha="right")
    else:
        ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_title(title)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = zero if v == 0.0 else f"{v:.2f}" if v >= 0.01 else f"{v:{small}}"
            dark = v > 0 and math.log(v / low) > 0.45 * math.log(top / low)
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, shrink=0.85)


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


def unoverlap(fig: Any, labels: list[Any]) -> None:
    """Move annotations (in offset points) down, top one first, until none overlaps
    another: several curves often end at the same accuracy and time."""
    fig.draw_without_rendering()  # the final layout, so the boxes are where they print
    placed: list[Any] = []
    for label in sorted(labels, key=lambda t: -t.get_window_extent().y1):
        box = label.get_window_extent()
        for _ in range(len(labels)):
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y - box.height * 72 / fig.dpi - 1)
            box = label.get_window_extent()
        placed.append(box)


def plot_news(payload: dict[str, Any], drift: dict[str, dict[str, float]],
              path: str | os.PathLike[str], *, title: str = "") -> None:
    """Time to accuracy (test accuracy vs train seconds) beside the per-layer drift heat-map.

    Args:
        payload: the BBC News demo's ``results.json`` dict (its ``curve``s).
        drift: strategy -> layer -> relative weight change ``‖Δw‖ / ‖w₀‖``.
        path: the PNG to write.
        title: the figure's title.
    """
    figure_cls, _ = require_matplotlib()
    rows = payload["strategies"]
    fig = figure_cls(figsize=(15, 6), layout="constrained")
    ax_acc, ax_heat = fig.subplots(1, 2, width_ratios=[1, 1.25])
    styles = {"full-fine-tune": ("black", "o"), "from-scratch": ("tab:gray", "s"),
              "linear-probe": ("tab:blue", "^"), "partial-freeze": ("tab:green", "D"),
              "gradual-unfreeze": ("tab:orange", "v"), "auto-freeze": ("tab:purple", "P")}
    seconds = [s for r in rows for s, _ in r["curve"] if s > 0]
    floor = min(seconds) / 2 if seconds else 0.1
    ends = []
    for r in rows:
        color, marker = styles.get(r["name"], (None, "x"))
        # log time axis: the cached linear probe trains in seconds, full fine-tuning in
        # minutes; step 0 (before training) is drawn at the left edge
        xs = [max(s, floor) for s, _ in r["curve"]]
        ys = [100 * a for _, a in r["curve"]]
        ax_acc.plot(xs, ys, marker=marker, color=color, label=r["name"], linewidth=1.8)
        ends.append(ax_acc.annotate(
            f"{ys[-1]:.1f}%", (xs[-1], ys[-1]), textcoords="offset points", xytext=(7, -4),
            fontsize=9, color=color,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}))
    full = next((r for r in rows if r["name"] == "full-fine-tune"), None)
    if full is not None:
        ax_acc.axhline(100 * full["test_accuracy"] - 1, color="black", linestyle=":",
                       linewidth=1, label="full-fine-tune − 1 pt")
    ax_acc.set_xscale("log")
    ax_acc.set_xlabel("train seconds (log scale; evaluation excluded; left edge: before training)")
    ax_acc.set_ylabel(f"test accuracy on {payload['test_samples']} held-out articles (%)")
    ax_acc.set_title("time to accuracy")
    ax_acc.grid(alpha=0.3, which="both")
    ax_acc.margins(x=0.12)
    ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=9,
                  frameon=False)

    names = [r["name"] for r in rows]
    layers = list(drift[names[0]])
    values = [[drift[n][k] for k in layers] for n in names]
    _drift_heatmap(fig, ax_heat, names, layers, values, zero="0", small=".0e", rotate=True,
                   title="relative weight change per layer ‖Δw‖ / ‖w₀‖ (log colour; green: frozen)")
    if title:
        fig.suptitle(title, fontsize=12)
    unoverlap(fig, ends)
    _save(fig, path)


_LLM_STYLES = {"zero-shot": ("tab:gray", "o"), "full": ("black", "o"),
               "lora": ("tab:red", "s"), "freeze-last4": ("tab:green", "D"),
               "badam": ("tab:blue", "^"), "lisa": ("tab:orange", "v"),
               "badam-keep": ("tab:cyan", "^")}


def plot_llm(payload: dict[str, Any], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Accuracy against train seconds beside each strategy's training memory.

    The memory bars are measured tensor bytes, stacked: the weights, the gradients
    (at their peak) and the optimizer state (at its peak); activations and the
    process itself are not in them (``bench/bench_llm.py`` measures peak RSS).

    Args:
        payload: the LLM demo's ``results.json`` dict (``torchfreeze.demo_llm``).
        path: the PNG to write.
        title: the figure's title.
    """
    figure_cls, _ = require_matplotlib()
    rows = payload["strategies"]
    fig = figure_cls(figsize=(14, 5.4), layout="constrained")
    ax_acc, ax_mem = fig.subplots(1, 2, width_ratios=[1.2, 1])
    for r in rows:
        color, marker = _LLM_STYLES.get(r["name"], (None, "x"))
        if not r["steps"]:
            ax_acc.axhline(100 * r["accuracy"], color=color, linestyle=":", linewidth=1.2,
                           label=f"{r['name']} ({100 * r['accuracy']:.0f}%)")
            continue
        xs = [s for s, _ in r["curve"]]
        ys = [100 * a for _, a in r["curve"]]
        ax_acc.plot(xs, ys, marker=marker, color=color, linewidth=1.8,
                    label=f"{r['name']} ({ys[-1]:.0f}%)")
    ax_acc.set_xlabel("train seconds (evaluation excluded)")
    ax_acc.set_ylabel(f"accuracy on {payload['test_samples']} held-out articles (%)")
    ax_acc.set_title("accuracy against train seconds")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="best", fontsize=9)

    names = [r["name"] for r in rows]
    mib = 2.0**20
    parts = [("weights", "weight_bytes", "#c9c9c9"), ("gradients", "grad_bytes", "tab:orange"),
             ("optimizer state", "state_bytes", "tab:blue")]
    if any(r.get("stash_bytes") for r in rows):
        parts.append(("state kept in host (state='keep')", "stash_bytes", "tab:cyan"))
    left = [0.0] * len(rows)
    for label, key, color in parts:
        values = [r.get(key, 0) / mib for r in rows]
        ax_mem.barh(range(len(rows)), values, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, values)]
    for i, (total, r) in enumerate(zip(left, rows)):
        ax_mem.annotate(f"{total:.0f} MiB (state {r['state_bytes'] / mib:.0f})", (total, i),
                        textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax_mem.set_yticks(range(len(rows)), labels=names)
    ax_mem.invert_yaxis()
    ax_mem.set_xlabel("MiB, measured tensor bytes (activations not included)")
    ax_mem.set_title("training memory: weights + gradients + AdamW state (peaks)")
    ax_mem.margins(x=0.3)
    ax_mem.grid(axis="x", alpha=0.3)
    ax_mem.legend(loc="lower right", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    _save(fig, path)
