"""Snapshot and restore of a model's freeze state, the one rule.

The freeze state is every parameter's ``requires_grad`` and, for every module, its
train/eval mode and the instance attributes torchfreeze sets on it (the BN policy
and the eval pin, see ``_pinning.py``). :func:`restore` puts all of it back
exactly, whatever happened in between; ``tfz.frozen`` leaves its block with it,
and ``fine_tune_schedule`` and ``torchfreeze.distributed`` undo a failed call
with it. Gradients are not part of it: one cleared by a freeze stays cleared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import own_tensor_dicts
from ._pinning import own_state, set_own_state

__all__ = ["Snapshot", "capture", "isolated", "restore"]


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


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Run ``model`` (on example inputs, to measure or inspect it) and leave it as it was.

    Inside, every buffer is a copy, so BatchNorm statistics and counters move only there
    and the originals keep their values and in-place version counters (a FeatureCache
    watches those); the RNG is forked (CPU and the model's CUDA devices). On exit the
    buffers, the freeze state (:func:`capture`) and every parameter's ``.grad`` (the
    same objects) are put back, whatever happened inside.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> mean = net[1].running_mean.clone()
        >>> with isolated(net):
        ...     net(torch.randn(4, 2)).sum().backward()
        >>> torch.equal(net[1].running_mean, mean), net[0].weight.grad is None
        (True, True)
    """
    saved = [(d, dict(d)) for d in (own_tensor_dicts(m)[1] for m in model.modules())]
    grads = [(p, p.grad) for p in model.parameters()]
    snapshot = capture(model)
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers())
                      if t.device.type == "cuda"})
    copies: dict[int, torch.Tensor] = {}
    for d, before in saved:
        for k, b in before.items():
            if b is not None:
                d[k] = copies.setdefault(id(b), b.detach().clone())
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for d, before in saved:
            d.clear()
            d.update(before)
        restore(snapshot)
        for p, grad in grads:
            p.grad = grad
