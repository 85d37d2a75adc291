"""Exceptions raised by torchfreeze.

Every error derives from :class:`TorchfreezeError`. Messages follow one shape:
what was wrong, what was found instead, and what to do about it. Every public
function validates before it changes anything, so when one of these is raised
the model, optimizer and files are exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # errors.py imports nothing of ours at run time
    from ._load_report import LoadReport

__all__ = [
    "CacheError",
    "CheckError",
    "DistributedFreezeError",
    "FreezeStateError",
    "FrozenStateChanged",
    "LoadError",
    "ModelTypeError",
    "PlanError",
    "SchedulerError",
    "SelectionError",
    "TiedWeightWarning",
    "TorchfreezeError",
    "UnsupportedTorchError",
    "UnusedRuleWarning",
]


class TorchfreezeError(Exception):
    """Base class of every error torchfreeze raises."""


class SelectionError(TorchfreezeError, LookupError):
    """A selector matched nothing, or is not a selector at all.

    Attributes:
        selector: the offending selector (as given).
        suggestions: the closest real names, best first.
    """

    def __init__(
        self, message: str, *, selector: object = None, suggestions: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.selector = selector
        self.suggestions = list(suggestions)


class ModelTypeError(TorchfreezeError, TypeError):
    """A function that takes a model got something that is not an ``nn.Module``."""


class LoadError(TorchfreezeError):
    """A checkpoint could not be loaded; the model was left untouched.

    Attributes:
        report: when the checkpoint was read but nothing (or not enough) fit, the
            :class:`~torchfreeze.LoadReport` of what would have loaded and why not.
    """

    report: LoadReport | None = None


class DistributedFreezeError(TorchfreezeError):
    """A freeze/unfreeze would desynchronise ranks of a distributed wrapper."""


class SchedulerError(TorchfreezeError):
    """An optimizer or LR scheduler cannot be extended with a new param group."""


class FreezeStateError(TorchfreezeError):
    """A saved freeze state does not fit the model it is loaded into."""


class CacheError(TorchfreezeError):
    """A FeatureCache cannot cache this module, or its cached values are stale."""


class PlanError(TorchfreezeError):
    """:func:`torchfreeze.plan` could not run the example batch or place a boundary,
    or :meth:`~torchfreeze.Plan.best` found no boundary within the budget."""


class CheckError(TorchfreezeError):
    """:meth:`~torchfreeze.Diagnosis.raise_for_errors` found error findings.

    Attributes:
        findings: the error findings, in report order.
    """

    def __init__(self, message: str, *, findings: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.findings = list(findings)


class UnsupportedTorchError(TorchfreezeError, RuntimeError):
    """The installed torch lacks an API torchfreeze relies on, or is older than the
    supported floor; the message names the supported and tested torch versions
    (every private torch API torchfreeze uses is listed in ``torchfreeze._compat``).
    """


class UnusedRuleWarning(UserWarning):
    """A param-group rule (or ``no_decay`` entry) that changes nothing: it matched
    only frozen parameters, or only parameters an earlier rule already claimed."""


class TiedWeightWarning(UserWarning):
    """Freezing or unfreezing a tied parameter (one tensor under two names, e.g. an
    ``lm_head`` tied to the input embedding) also changes it under the name the
    selectors did not cover."""


class FrozenStateChanged(TorchfreezeError, AssertionError):
    """``verify(strict=True)`` found frozen tensors that changed.

    Attributes:
        names: the tensors that changed.
    """

    def __init__(self, message: str, *, names: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.names = list(names)
