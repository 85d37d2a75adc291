"""The one rule for saved states: a state is loaded only into the kind of object that made it.

Every resumable object (``tfz.freeze_state``, ``GradualUnfreeze``, ``AutoFreeze``,
the Hugging Face and Lightning callbacks) saves a ``"format"`` naming its kind and
a ``"version"``. :func:`check_format` refuses anything else with one message that
names what was expected and what was found (the other kind, by name, when it is one
of ours), and a state newer than this torchfreeze understands.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import FreezeStateError

__all__ = ["FORMATS", "check_format", "register"]

#: format -> the object that saves it, for messages
FORMATS: dict[str, str] = {}


def register(fmt: str, made_by: str) -> str:
    """Record that ``made_by`` saves states of format ``fmt``; returns ``fmt``."""
    FORMATS[fmt] = made_by
    return fmt


def check_format(state: Any, fmt: str, *, version: int | None = None,
                 hint: str = "") -> Mapping[str, Any]:
    """``state`` if it was saved by the kind of object that saves ``fmt``, else
    :class:`~torchfreeze.errors.FreezeStateError` naming both kinds.

    Example:
        >>> register("demo.kind", "Demo.state_dict()")
        'demo.kind'
        >>> check_format({"format": "demo.kind", "version": 1}, "demo.kind", version=1)["version"]
        1
    """
    made_by = FORMATS.get(fmt, fmt)
    if isinstance(state, Mapping) and state.get("format") == fmt:
        saved = state.get("version", 0)
        if version is not None and isinstance(saved, int) and saved > version:
            raise FreezeStateError(
                f"this {made_by} state has version {saved}, newer than this torchfreeze "
                f"understands ({version}); upgrade torchfreeze. Nothing was changed."
            )
        return state
    got = state.get("format") if isinstance(state, Mapping) else None
    if isinstance(got, str) and got in FORMATS:
        found = f"a state saved by {FORMATS[got]} (format {got!r})"
    elif isinstance(state, Mapping):
        keys = sorted(map(str, state))[:6]
        found = f"a {type(state).__name__} with keys {keys}" + (
            f" and format {got!r}" if got is not None else "")
    else:
        found = f"a {type(state).__name__}"
    raise FreezeStateError(
        f"expected a state saved by {made_by} (format {fmt!r}), got {found}. "
        + (hint + " " if hint else "") + "Nothing was changed."
    )
