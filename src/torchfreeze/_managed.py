"""Parameters that a live torchfreeze object keeps frozen inside an optimizer on purpose.

:class:`~torchfreeze.RotatingFreeze` leaves every rotating parameter in the
optimizer (no param group is removed, so LR schedulers stay aligned) and keeps
the inactive ones with no ``.grad`` and no state, which torch optimizers skip.
:func:`~torchfreeze.check` asks here, so that it does not report them as
``frozen-in-optimizer`` (it still does the moment one holds a ``.grad`` or state).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

__all__ = ["managed", "register"]


class _Owner(Protocol):
    def managed_ids(self) -> dict[int, str]: ...


_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()


def register(owner: _Owner) -> None:
    """Ask ``owner.managed_ids()`` from now on, as long as ``owner`` lives."""
    _OWNERS.add(owner)


def managed() -> dict[int, str]:
    """``id(parameter) -> who manages it`` over every live owner."""
    out: dict[int, str] = {}
    for owner in list(_OWNERS):
        out.update(owner.managed_ids())
    return out
