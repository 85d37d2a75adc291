"""Snapshot and restore of a model's freeze state, the one rule.

The freeze state is every parameter's ``requires_grad`` and, for every module, its
train/eval mode and the instance attributes torchfreeze sets on it (the BN policy
and the eval pin, see ``_pinning.py``). :func:`restore` puts all of it back
exactly, whatever happened in between; ``tfz.frozen`` leaves its block with it,
and ``fine_tune_schedule`` and ``torchfreeze.distributed`` undo a failed call
with it. Gradients are not part of it: one cleared by a freeze stays cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ._pinning import own_state, set_own_state

__all__ = ["Snapshot", "capture", "restore"]


@dataclass(frozen=True)
class Snapshot:
    """What :func:`capture` saw: (parameter, requires_grad) and (module, training,
    own state) pairs, holding the objects themselves."""

    params: tuple[tuple[nn.Parameter, bool], ...]
    modules: tuple[tuple[nn.Module, bool, tuple[Any, ...]], ...]


def capture(model: nn.Module) -> Snapshot:
    """The freeze state of ``model`` and everything in it, now.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> snap = capture(net)
        >>> _ = net[0].weight.requires_grad_(False), net.eval()
        >>> restore(snap)
        >>> net[0].weight.requires_grad, net[1].training
        (True, True)
    """
    return Snapshot(
        params=tuple((p, p.requires_grad) for p in model.parameters()),
        modules=tuple((m, m.training, own_state(m)) for m in model.modules()),
    )


def restore(snapshot: Snapshot) -> None:
    """Put back exactly what :func:`capture` saw."""
    for p, requires_grad in snapshot.params:
        p.requires_grad_(requires_grad)
    for m, training, state in snapshot.modules:
        set_own_state(m, state)
        m.training = training
