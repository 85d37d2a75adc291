"""Trainer integrations: one callback each for Lightning and the Hugging Face Trainer.

Import the one you use explicitly; this package itself imports neither library,
so ``import torchfreeze`` works without them::

    from torchfreeze.integrations.lightning import FreezeCallback       # lightning
    from torchfreeze.integrations.transformers import FreezeCallback    # transformers
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .._select import Selector, resolve
from .._state import check_format, register
from ..errors import FreezeStateError, SelectionError, TorchfreezeError
from ..norm import BNPolicy, check_bn_policy

__all__: list[str] = []


# ---------------------------------------------------------------------------
# shared by both callbacks (private; imports neither trainer library)

STATE_FORMAT = register("torchfreeze.integrations.callback",
                        "the Hugging Face FreezeCallback")
#: Lightning's FreezeCallback saves another layout under its own format: each callback
#: refuses the other's state, naming it.
LIGHTNING_FORMAT = register("torchfreeze.integrations.lightning.callback",
                            "the Lightning FreezeCallback")
STATE_VERSION = 1


class _Plan:
    """What a FreezeCallback was asked to do, validated once, trainer-agnostic."""

    def __init__(
        self,
        freeze: Selector | None,
        schedule: Mapping[int, Selector] | None,
        *,
        bn: BNPolicy,
        lr: float | None,
        lr_mult: float | None,
    ) -> None:
        check_bn_policy(bn)
        if lr is not None and lr_mult is not None:
            raise TorchfreezeError(
                f"pass lr= or lr_mult= for scheduled param groups, not both (got lr={lr}, "
                f"lr_mult={lr_mult})."
            )
        if schedule is not None and not isinstance(schedule, Mapping):
            raise TorchfreezeError(
                f"schedule must be a mapping {{epoch: selectors}}, e.g. {{1: 'backbone.layer4'}}; "
                f"got {type(schedule).__name__}."
            )
        epochs: dict[int, Selector] = {}
        for key, sel in (schedule or {}).items():
            # JSON round trips turn int keys into strings
            epoch = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise TorchfreezeError(
                    f"schedule keys are epoch numbers >= 0 (0 = the first epoch); got {key!r}. "
                    "Use e.g. schedule={1: 'backbone.layer4', 3: 'backbone.layer3'}."
                )
            epochs[epoch] = sel
        self.freeze = freeze
        self.schedule = dict(sorted(epochs.items()))
        self.bn = bn
        self.lr = lr
        self.lr_mult = lr_mult

    def validate(self, model: nn.Module) -> None:
        """Resolve every selector now, so a typo fails before training, not epochs later.

        ``freeze=[]`` freezes nothing; a milestone that selects nothing is an error
        (the rule of :func:`torchfreeze.select`).
        """
        if self.freeze is not None:
            resolve(model, [self.freeze], trainable=True)
        for epoch, sel in self.schedule.items():
            try:
                resolve(model, [sel], allow_empty=False, trainable=True, what="the milestone")
            except SelectionError as exc:
                raise SelectionError(f"schedule[{epoch}]: {exc}", selector=exc.selector,
                                     suggestions=exc.suggestions) from None

    def to_freeze(self) -> list[Selector]:
        """``freeze`` plus every scheduled selection: frozen until its epoch comes."""
        sels = [] if self.freeze is None else [self.freeze]
        return sels + list(self.schedule.values())

    def due(self, epoch: int, applied: list[int]) -> list[int]:
        """Milestones to apply at the start of ``epoch`` (late ones too, in order)."""
        return [e for e in self.schedule if e <= epoch and e not in applied]

    def check_state(self, state: Any) -> list[int]:
        """The applied milestones of a saved callback state, checked against this plan."""
        if isinstance(state, Mapping) and state.get("format") == STATE_FORMAT and \
                "applied" not in state and "unfreeze" in state:
            # the Lightning callback's layout, saved before the two formats split
            state = {**state, "format": LIGHTNING_FORMAT}
        check_format(state, STATE_FORMAT, hint="Resume with the checkpoint of a run that "
                     "used this callback.")
        applied = [int(e) for e in state.get("applied", [])]
        unknown = [e for e in applied if e not in self.schedule]
        if unknown:
            raise FreezeStateError(
                f"the checkpoint was made with unfreeze milestones at epochs {applied}, but this "
                f"callback's schedule has {list(self.schedule)}: epochs {unknown} are not in it. "
                "Resume with the same schedule the checkpoint was trained with."
            )
        return applied


def _state(applied: list[int], freeze_state: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "applied": list(applied),
        "freeze_state": freeze_state,
    }
