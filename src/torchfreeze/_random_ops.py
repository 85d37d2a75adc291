"""Randomness in a forward, the one rule: which aten ops draw random numbers.

A module's class does not tell whether its output is random: timm's ``DropPath``,
torchvision's ``StochasticDepth``, a functional ``F.dropout`` or a ``torch.rand*``
in a ``forward`` draw without any ``nn.Dropout`` in sight. The ops that run do tell:
:func:`random_op` reads an aten op's ``nondeterministic_seeded`` tag (and its
``dropout_p``/``train``/``p`` arguments, for kernels that draw only when asked), and
:class:`RandomOps` is the dispatch mode that sees every op of a forward.

Two users, one rule: ``FeatureCache`` refuses a prefix whose discovery pass (or a
pass in a new train/eval state) ran a random op (``cache/_guards.py``), and
``tfz.check(..., example_inputs=...)`` reports the random ops that ran inside frozen
modules (``random-in-frozen``, ``_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ._compat import TorchDispatchMode

__all__ = ["DROPOUT", "RandomOps", "random_kind", "random_op"]

#: the dropout module classes (known random by class, before anything runs)
DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

Kind = Literal["random", "batch-stats"]


def _arg(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name, a.default_value)
    return None


def random_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Kind | None:
    """``"random"`` when an aten op draws random numbers, ``"batch-stats"`` when it
    normalises with the statistics of its batch (BatchNorm in train mode), else None.

    By the op's ``nondeterministic_seeded`` tag; ops that draw only with a dropout
    probability (attention kernels) or a ``train`` flag count only when they do."""
    name = func.__name__
    if torch.Tag.nondeterministic_seeded in func.tags:
        p = _arg(func, args, kwargs, "dropout_p")
        if p is not None:
            return "random" if p > 0 else None
        train = _arg(func, args, kwargs, "train")
        draws = train is not False and not (name.startswith("native_dropout") and
                                             _arg(func, args, kwargs, "p") == 0)
        return "random" if draws else None
    if "batch_norm" in name and ("with_update" in name or
                                 _arg(func, args, kwargs, "training") is True):
        return "batch-stats"
    return None


def random_op(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an aten op draws random numbers or normalises with batch statistics
    (either makes a sample's output change from call to call)."""
    return random_kind(func, args, kwargs) is not None


class RandomOps(TorchDispatchMode):
    """Records the random ops that run (by their tags, not by module class).

    ``where()`` names the code running at that moment (None: not of interest, the op
    is not recorded). ``found`` is the first ``(where, op name)``; with ``every=True``
    ``seen`` holds every ``(where, op name, kind)``, in order, each once.
    """

    def __init__(self, where: Callable[[], Any], *, every: bool = False) -> None:
        super().__init__()
        self.where = where
        self.every = every
        self.found: tuple[Any, str] | None = None
        self.seen: dict[tuple[Any, str, Kind], None] = {}
        self.active = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.active and (self.every or self.found is None):
            kind = random_kind(func, args, kwargs)
            if kind is not None:
                where = self.where()
                if where is not None:
                    op = str(func.overloadpacket.__name__)
                    if self.found is None:
                        self.found = (where, op)
                    if self.every:
                        self.seen.setdefault((where, op, kind), None)
        return func(*args, **kwargs)
