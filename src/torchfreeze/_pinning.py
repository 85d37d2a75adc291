"""Eval pinning, the one rule: a module kept in eval mode through every ``model.train()``.

``nn.Module.train`` recurses by calling each child's ``train`` attribute, so an
instance attribute ``module.__dict__["train"]`` is consulted by every
``model.train()``. Used by BatchNorm policies (``bn="eval"``), ``FeatureCache(...,
pin_eval=True)`` and AutoFreeze's frozen prefix; only this module touches it.

The pin and the BN policy name (:data:`POLICY_ATTR`) are the instance attributes
torchfreeze sets on a module; :func:`own_state` / :func:`set_own_state` read and put
back both, for the freeze-state snapshot (``_snapshot.py``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["POLICY_ATTR", "PinnedEval", "is_pinned", "own_state", "pin", "pinned_by_anyone",
           "set_own_state", "unpin"]

#: instance attribute holding a module's BN policy (``norm.set_bn_policy``); an
#: instance attribute, so it survives deepcopy and pickling
POLICY_ATTR = "_torchfreeze_bn"
_OWN_ATTRS = (POLICY_ATTR, "train")
_UNSET = object()


class PinnedEval:
    """Stands in for ``module.train``: always ``train(False)``.

    A class (not a bound method) so that deepcopy and pickling keep it.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return type(self.module).train(self.module, False)

    def __getstate__(self) -> nn.Module:
        return self.module

    def __setstate__(self, module: nn.Module) -> None:
        self.module = module


def is_pinned(module: nn.Module) -> bool:
    """Whether ``module`` is pinned in eval by torchfreeze."""
    return isinstance(module.__dict__.get("train"), PinnedEval)


def pinned_by_anyone(module: nn.Module) -> bool:
    """Whether ``module`` has its own ``train`` (ours or someone else's)."""
    return "train" in module.__dict__


def pin(module: nn.Module) -> bool:
    """Put ``module`` in eval and keep it there; False (nothing changed but the mode)
    when it already has its own ``train``.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Dropout())
        >>> pin(m[0]), m.train().training, m[0].training
        (True, True, False)
    """
    if pinned_by_anyone(module):
        type(module).train(module, False)
        return False
    module.__dict__["train"] = PinnedEval(module)
    type(module).train(module, False)
    return True


def unpin(module: nn.Module, *, training: bool) -> None:
    """Undo :func:`pin` (only a torchfreeze pin) and set the mode to ``training``."""
    if is_pinned(module):
        del module.__dict__["train"]
    type(module).train(module, training)


def own_state(module: nn.Module) -> tuple[Any, ...]:
    """``module``'s BN policy and own ``train`` (ours or anyone's) as they are now,
    each or a marker for "not set", for :func:`set_own_state`."""
    d = module.__dict__
    return tuple(d.get(key, _UNSET) for key in _OWN_ATTRS)


def set_own_state(module: nn.Module, state: tuple[Any, ...]) -> None:
    """Put back what :func:`own_state` returned: each attribute set, or removed when
    it was not set. The train/eval mode is not changed."""
    d = module.__dict__
    for key, value in zip(_OWN_ATTRS, state, strict=True):
        if value is _UNSET:
            d.pop(key, None)
        else:
            d[key] = value
