"""A one-glance table of what is trainable, frozen, pinned and in which group."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from ._managed import managed
from ._report import Report, fmt_count
from ._select import ModelIndex, require_module
from .errors import TorchfreezeError
from .norm import bn_policy, is_batchnorm

__all__ = ["Summary", "SummaryRow", "summary"]


@dataclass(frozen=True)
class SummaryRow:
    """One row: a layer group (default) or a module prefix (``depth=``)."""

    name: str
    kind: str
    trainable: int
    frozen: int
    bn: str = ""
    groups: tuple[str, ...] = ()
    lr: tuple[float, ...] = ()
    weight_decay: tuple[float, ...] = ()


@dataclass(frozen=True)
class Summary(Report):
    """Trainable/frozen parameter counts per row, BN modes and optimizer groups."""

    rows: tuple[SummaryRow, ...]
    trainable: int
    total: int
    num_groups: int | None = None
    not_in_optimizer: int = 0
    frozen_in_optimizer: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def headline(self) -> str:
        """E.g. ``"trainable 4.1 M / 22.7 M (18.1%), 3 groups"``."""
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        text = f"trainable {fmt_count(self.trainable)} / {fmt_count(self.total)} ({pct:.1f}%)"
        if self.num_groups is not None:
            text += f", {self.num_groups} group{'s' if self.num_groups != 1 else ''}"
        return text

    def _rich(self) -> RenderableType:
        with_opt = self.num_groups is not None
        table = Table(title="torchfreeze summary", title_justify="left")
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("layer", "left"), ("kind", "left"), ("trainable", "right"), ("frozen", "right"),
            ("BatchNorm", "left"))
        for col, justify in columns:
            table.add_column(col, justify=justify)
        if with_opt:
            for col in ("group", "lr", "wd"):
                table.add_column(col)
        for r in self.rows:
            cells = [r.name, r.kind, fmt_count(r.trainable) if r.trainable else "-",
                     fmt_count(r.frozen) if r.frozen else "-", r.bn or "-"]
            if with_opt:
                cells += [", ".join(r.groups) or "-", _nums(r.lr), _nums(r.weight_decay)]
            style = "dim" if r.trainable == 0 else None
            table.add_row(*cells, style=style)
        lines = [Text(self.headline, style="bold")]
        if self.not_in_optimizer:
            lines.append(Text(f"{self.not_in_optimizer} trainable tensors are in no optimizer "
                              "group (see tfz.check)", style="yellow"))
        if self.frozen_in_optimizer:
            lines.append(Text(f"{self.frozen_in_optimizer} frozen tensors are still in the "
                              "optimizer (see tfz.check)", style="red"))
        return Group(table, *lines)


def _nums(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.3g}" for v in values) if values else "-"


def _bn_text(modules: list[nn.Module]) -> str:
    counts: Counter[str] = Counter()
    for m in modules:
        policy = bn_policy(m)
        if policy == "eval":
            counts["eval (pinned)"] += 1
        elif policy:
            counts[policy] += 1
        else:
            counts["train" if m.training else "eval"] += 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def summary(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    depth: int | None = None,
) -> Summary:
    """Summarise what is trainable and frozen, per layer group.

    Args:
        model: the model.
        optimizer: when given, each row also shows its param groups (their
            ``"name"`` when set), learning rates and weight decays.
        depth: instead of layer groups (:func:`torchfreeze.layers`), one row per
            module prefix of ``depth`` dotted parts.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        TorchfreezeError: ``optimizer`` has no ``param_groups``.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
        >>> _ = tfz.freeze(net, "0")
        >>> tfz.summary(net).headline
        'trainable 22 / 132 (16.7%)'
    """
    require_module(model, "summary")
    idx = ModelIndex(model)
    kept = managed()
    if depth is None:
        from ._layers import layers

        buckets: list[tuple[str, str, list[str]]] = [
            (g.name + "".join(f" (tied: {a} = {b})" for a, b in g.tied), g.kind,
             list(g.param_names))
            for g in layers(model)
        ]
    else:
        order: dict[str, list[str]] = {}
        for name in idx.params:
            key = ".".join(name.split(".")[:-1][:depth]) or "(root)"
            order.setdefault(key, []).append(name)
        buckets = [
            (k, type(idx.modules.get(k if k != "(root)" else "", model)).__name__, v)
            for k, v in order.items()
        ]
    group_of: dict[int, list[int]] = {}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        if not isinstance(getattr(optimizer, "param_groups", None), list):
            raise TorchfreezeError(
                f"tfz.summary(): optimizer must be a torch optimizer (something with "
                f".param_groups), got {type(optimizer).__name__}. Pass optimizer=opt."
            )
        groups = list(optimizer.param_groups)
        for gi, g in enumerate(groups):
            for p in g["params"]:
                group_of.setdefault(id(p), []).append(gi)
    bn_modules = [(n, m) for n, m in idx.modules.items() if is_batchnorm(m)]
    rows = []
    for name, kind, pnames in buckets:
        ps = [idx.params[n] for n in pnames]
        trainable = sum(p.numel() for p in ps if p.requires_grad)
        frozen = sum(p.numel() for p in ps if not p.requires_grad)
        bns = [m for n, m in bn_modules if _under(n, pnames)]
        gids = sorted({gi for p in ps for gi in group_of.get(id(p), [])})
        rows.append(
            SummaryRow(
                name=name,
                kind=kind,
                trainable=trainable,
                frozen=frozen,
                bn=_bn_text(bns),
                groups=tuple(str(groups[g].get("name", f"group {g}")) for g in gids),
                lr=tuple(sorted({float(groups[g]["lr"]) for g in gids if "lr" in groups[g]})),
                weight_decay=tuple(
                    sorted({float(groups[g].get("weight_decay", 0.0)) for g in gids})
                ),
            )
        )
    params = list(idx.params.values())
    return Summary(
        rows=tuple(rows),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        num_groups=len(groups) if optimizer is not None else None,
        not_in_optimizer=(
            sum(1 for p in params if p.requires_grad and id(p) not in group_of)
            if optimizer is not None
            else 0
        ),
        # a RotatingFreeze's inactive groups are in the optimizer on purpose (see tfz.check)
        frozen_in_optimizer=sum(1 for p in params if not p.requires_grad and id(p) in group_of
                                and id(p) not in kept),
    )


def _under(module_name: str, param_names: list[str]) -> bool:
    prefix = module_name + "."
    return any(n.startswith(prefix) for n in param_names)
