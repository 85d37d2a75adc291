"""One message for a name that is not among the known ones (demo strategies)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from .errors import TorchfreezeError

__all__ = ["check_choices"]


def check_choices(names: Sequence[str], known: Sequence[str], *, what: str = "strategy",
                  where: str = "") -> None:
    """Raise for an empty list or any name not in ``known``, naming the closest one.

    Example:
        >>> try:
        ...     check_choices(["prob"], ["probe", "full"])
        ... except Exception as err:
        ...     print(err)
        unknown strategy 'prob' (did you mean 'probe'?); choose from probe, full.
    """
    unknown = [n for n in names if n not in known]
    if names and not unknown:
        return
    close = difflib.get_close_matches(unknown[0], known, n=1) if unknown else []
    raise TorchfreezeError(
        f"{where}unknown {what} {', '.join(map(repr, unknown)) or '(none)'}"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; choose from {', '.join(known)}."
    )
