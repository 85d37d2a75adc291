"""Adding a param group to a live optimizer and its LR scheduler(s).

torch lets you ``optimizer.add_param_group(...)``, but every LR scheduler keeps
per-group lists (``base_lrs``, ``min_lrs``, ``max_lrs``, ``lr_lambdas``,
``_last_lr``) and per-group keys (``initial_lr``, OneCycleLR's ``max_lr`` and
``min_lr``) that it built when it was created. A group added afterwards is
either never scheduled or makes the next ``scheduler.step()`` fail on a length
mismatch. :func:`prepare_new_group` validates everything first and returns a
``commit()`` that adds the group *and* registers it with the scheduler.

Learning rates of the new group. The *base* learning rate of a group is its
``initial_lr`` (what a scheduler recorded before it changed anything; for
OneCycleLR that is ``max_lr / div_factor``), or its ``lr`` when no scheduler
has touched it. The new group's base is ``lr`` when given, otherwise
``lr_mult`` (default 1) times the *first* group's base. The group joins the
schedule where it currently stands: its current ``lr`` is its base times the
first group's ``lr / base`` ratio, and every other per-group LR value
(``max_lr``, ``min_lr``, ``base_lrs``, ``max_lrs``) is the first group's scaled by
the same factor. Absolute floors (ReduceLROnPlateau's ``min_lrs``,
CosineAnnealingLR's ``eta_min``) are shared, not scaled, and LambdaLR and
MultiplicativeLR give the new group the first group's lambda.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

from ._compat import LAST_LR_ATTR, child_schedulers, last_lrs
from ._select import selector_label
from .errors import SchedulerError, TorchfreezeError

__all__ = ["NO_DECAY_SUFFIX", "added_group_name", "prepare_new_group", "scheduler_checks"]

#: appended to a group's name for its parameters without weight decay
NO_DECAY_SUFFIX = "/no_decay"


def added_group_name(
    *, epoch: int | None = None, selectors: Sequence[Any] = (), no_decay: bool = False
) -> str:
    """The one naming scheme for param groups torchfreeze adds to a live optimizer.

    ``unfreeze@<epoch>`` for a scheduled milestone (:class:`~torchfreeze.GradualUnfreeze`,
    both trainer callbacks), ``unfreeze:<selectors>`` for a direct
    ``tfz.unfreeze(..., optimizer=)``; the part without weight decay gets
    ``/no_decay`` appended, as in :func:`~torchfreeze.param_groups`.

    >>> added_group_name(epoch=2), added_group_name(epoch=2, no_decay=True)
    ('unfreeze@2', 'unfreeze@2/no_decay')
    >>> added_group_name(selectors=("encoder.layer.11", "pooler"))
    'unfreeze:encoder.layer.11,pooler'
    """
    if epoch is not None:
        name = f"unfreeze@{epoch}"
    else:
        parts = [selector_label(s) for s in selectors]
        name = "unfreeze:" + (",".join(parts) if parts else "*")
    return name + (NO_DECAY_SUFFIX if no_decay else "")



# keys that hold learning rates: scaled for the new group, never copied verbatim
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# keys that describe the group, not its hyper-parameters
_OWN_KEYS = ("params", "param_names", "name")

# Schedulers whose only per-group state is base_lrs (+ _last_lr) and group keys.
_BASE_LRS_ONLY: tuple[type, ...] = tuple(
    getattr(lrs, n)
    for n in (
        "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
    )
    if hasattr(lrs, n)
)
_SUPPORTED = (
    "LambdaLR, MultiplicativeLR, StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, "
    "PolynomialLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR, "
    "ReduceLROnPlateau, SequentialLR and ChainedScheduler of these"
)


def _mul(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone() * factor
    return value * factor


def _check_number(what: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TorchfreezeError(
            f"{what}={value!r} is not a finite number. Pass a float such as "
            f"{'0.1' if what == 'lr_mult' else '1e-4'} (nothing was changed)."
        )
    if value < 0 or (positive and value == 0):
        raise TorchfreezeError(
            f"{what}={value!r} must be {'> 0' if positive else '>= 0'} (nothing was changed)."
        )
    return float(value)


def _base(group: Mapping[str, Any]) -> Any:
    return group.get("initial_lr", group["lr"])


def scheduler_checks(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`SchedulerError` if ``scheduler`` cannot be extended by one
    group of ``optimizer`` (nothing is changed)."""
    _plan_scheduler(scheduler, optimizer, lambda key, v: v, None, "scheduler")


def _plan_scheduler(
    sched: Any,
    optimizer: torch.optim.Optimizer,
    scale: Callable[[str, Any], Any],
    new_lr: Any,
    path: str,
) -> list[Callable[[], None]]:
    """Validate ``sched`` and return the mutations that register one more group."""
    n = len(optimizer.param_groups)
    kind = type(sched).__name__
    if isinstance(sched, (list, tuple)):
        out: list[Callable[[], None]] = []
        for i, s in enumerate(sched):
            out += _plan_scheduler(s, optimizer, scale, new_lr, f"{path}[{i}]")
        return out
    owner = getattr(sched, "optimizer", None)
    if owner is None or getattr(owner, "param_groups", None) is not optimizer.param_groups:
        raise SchedulerError(
            f"{path} ({kind}) does not drive this optimizer "
            f"({type(optimizer).__name__}); found it attached to "
            f"{type(owner).__name__ if owner is not None else 'nothing'}. Pass the scheduler "
            "built on this optimizer (nothing was changed)."
        )
    ops: list[Callable[[], None]] = []

    def extend(attr: str, value_of: Callable[[list[Any]], Any], seq: Any = None) -> None:
        if seq is None:
            seq = getattr(sched, attr, None)
        if not isinstance(seq, list) or len(seq) != n:
            raise SchedulerError(
                f"{path} ({kind}).{attr} has "
                f"{len(seq) if isinstance(seq, list) else type(seq).__name__} entries but the "
                f"optimizer has {n} param groups: a group was added without registering it "
                "with the scheduler. Add groups with tfz.unfreeze(..., scheduler=...) or build "
                "the scheduler after the optimizer is complete (nothing was changed)."
            )
        value = value_of(seq)
        ops.append(lambda: seq.append(value))

    if isinstance(sched, (lrs.SequentialLR, lrs.ChainedScheduler)):
        for i, child in enumerate(child_schedulers(sched)):
            ops += _plan_scheduler(child, optimizer, scale, new_lr, f"{path}._schedulers[{i}]")
        if (last := last_lrs(sched)) is not None:
            extend(LAST_LR_ATTR, lambda s: new_lr, last)
        return ops
    known = isinstance(
        sched, (*_BASE_LRS_ONLY, lrs.LambdaLR, lrs.MultiplicativeLR, lrs.CyclicLR,
                lrs.OneCycleLR, lrs.ReduceLROnPlateau)
    )
    if not known:
        raise SchedulerError(
            f"{path} is a {kind}, which torchfreeze does not know how to extend with a new "
            f"param group (it may keep per-group state that would silently go stale). "
            f"Supported: {_SUPPORTED}. Rebuild the scheduler after unfreezing instead "
            "(nothing was changed)."
        )
    if isinstance(sched, lrs.ReduceLROnPlateau):
        extend("min_lrs", lambda s: s[0])
    else:
        extend("base_lrs", lambda s: scale("base_lrs", s[0]))
    if isinstance(sched, (lrs.LambdaLR, lrs.MultiplicativeLR)):
        # the new group follows the first group's lambda (same shape, scaled base)
        extend("lr_lambdas", lambda s: s[0])
    if isinstance(sched, lrs.CyclicLR):
        extend("max_lrs", lambda s: scale("max_lrs", s[0]))
        if getattr(sched, "cycle_momentum", False):
            extend("base_momentums", lambda s: s[0])
            extend("max_momentums", lambda s: s[0])
    if (last := last_lrs(sched)) is not None:
        extend(LAST_LR_ATTR, lambda s: new_lr, last)
    if type(sched).__module__ != lrs.__name__:
        # a user subclass of a known scheduler: refuse per-group lists we do not know
        handled = {"base_lrs", LAST_LR_ATTR, "min_lrs", "lr_lambdas", "max_lrs",
                   "base_momentums", "max_momentums"}
        extra = [
            k for k, v in vars(sched).items()
            if k not in handled and isinstance(v, list) and len(v) == n and n > 1
        ]
        if extra:
            raise SchedulerError(
                f"{path} ({kind}, a subclass of a torch scheduler) keeps per-group lists "
                f"{extra} that torchfreeze does not know how to extend. Rebuild the scheduler "
                "after unfreezing instead (nothing was changed)."
            )
    return ops


def prepare_new_group(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    lr: float | None = None,
    lr_mult: float | None = None,
    scheduler: Any = None,
    name: str,
    options: Mapping[str, Any] | None = None,
) -> Callable[[], None]:
    """Validate adding ``params`` to ``optimizer`` as one named group; return ``commit()``.

    Nothing changes until ``commit()`` is called, and everything that could fail
    is checked here. Parameters already in the optimizer are skipped (never
    duplicated); when none is new, ``commit()`` does nothing. Existing optimizer
    state (momenta) is never touched.

    Args:
        optimizer: any ``torch.optim`` optimizer (or a wrapper exposing
            ``param_groups`` and ``add_param_group``) with at least one group.
        params: the parameters to add, in order.
        names: their names (same length), stored as the group's ``"param_names"``
            when the optimizer's groups carry names (torch refuses to mix named
            and unnamed groups).
        lr: the new group's base learning rate (see the module docstring).
        lr_mult: or a multiple of the first group's base learning rate
            (default 1 when neither is given).
        scheduler: an LR scheduler (or a list of them) driving ``optimizer``;
            the new group is registered with it.
        name: the group's ``"name"``.
        options: other hyper-parameters for the group; the rest are copied from
            the first group.

    Returns:
        ``commit()``: adds the group and registers it with the scheduler.

    Raises:
        TorchfreezeError: bad ``lr``/``lr_mult``/``options``, an empty optimizer.
        SchedulerError: the scheduler cannot be extended, or does not drive this
            optimizer, or already lost track of a group.

    Example:
        >>> import torch, torch.nn as nn
        >>> from torchfreeze._optim import prepare_new_group
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(a.parameters(), lr=0.1)
        >>> commit = prepare_new_group(opt, list(b.parameters()), ["weight", "bias"],
        ...                            lr_mult=0.5, name="b")
        >>> commit(); [g["lr"] for g in opt.param_groups]
        [0.1, 0.05]
    """
    if lr is not None and lr_mult is not None:
        raise TorchfreezeError(
            f"got both lr={lr!r} and lr_mult={lr_mult!r} for the new param group; pass one "
            "(lr is absolute, lr_mult multiplies the first group's base lr). Nothing was changed."
        )
    if lr is not None:
        lr = _check_number("lr", lr, positive=False)
    if lr_mult is not None:
        lr_mult = _check_number("lr_mult", lr_mult, positive=False)
    groups = getattr(optimizer, "param_groups", None)
    if not groups or not hasattr(optimizer, "add_param_group"):
        raise TorchfreezeError(
            f"{type(optimizer).__name__} has no param groups to extend; build the optimizer "
            "over the trainable parameters first (nothing was changed)."
        )
    if len(params) != len(names):
        raise TorchfreezeError(
            f"got {len(params)} parameters but {len(names)} names for the new param group."
        )
    extra = dict(options or {})
    bad = [k for k in extra if k in (*_OWN_KEYS, *_LR_KEYS, "requires_grad")]
    if bad:
        raise TorchfreezeError(
            f"options {bad} cannot be set this way: pass lr/lr_mult for the learning rate; "
            "'requires_grad' in a param group is silently ignored by torch (freeze with "
            "tfz.freeze instead). Nothing was changed."
        )
    first = groups[0]
    base0 = _base(first)
    base0_f = float(base0)
    if lr is not None:
        factor = lr / base0_f if base0_f != 0 else None
        new_base: Any = lr
    else:
        factor = 1.0 if lr_mult is None else lr_mult
        new_base = _mul(base0, factor)

    def scale(key: str, value: Any) -> Any:
        # an absolute lr is kept exact wherever the first group holds its base
        # (factor is None only with an absolute lr and a first group at lr 0)
        if factor is None or (lr is not None and float(value) == base0_f):
            return lr
        return _mul(value, factor)

    new_lr = scale("lr", first["lr"])

    # params: skip those already in the optimizer and duplicates, keep order
    present = {id(p) for g in groups for p in g["params"]}
    new: list[tuple[torch.Tensor, str]] = []
    for p, pname in zip(params, names):
        if id(p) in present:
            continue
        if not isinstance(p, torch.Tensor) or not p.is_leaf:
            raise TorchfreezeError(
                f"{pname!r} is not a leaf tensor and cannot be optimized (nothing was changed)."
            )
        present.add(id(p))
        new.append((p, pname))

    sched_ops: list[Callable[[], None]] = []
    if scheduler is not None:
        sched_ops = _plan_scheduler(scheduler, optimizer, scale, new_lr, "scheduler")
    elif "initial_lr" in first and new:
        warnings.warn(
            f"param group {name!r} is added to an optimizer whose groups carry 'initial_lr', "
            "so an LR scheduler drives it; without scheduler= the new group is not "
            "registered and the scheduler's next step fails or skips it. Pass scheduler=.",
            stacklevel=3,
        )

    if not new:
        return lambda: None

    group: dict[str, Any] = {
        k: v for k, v in first.items() if k not in _OWN_KEYS and k not in _LR_KEYS
    }
    group.update(extra)
    group["lr"] = new_lr
    for key in ("initial_lr", "max_lr", "min_lr"):
        if key in first:
            group[key] = new_base if key == "initial_lr" else scale(key, first[key])
    group["params"] = [p for p, _ in new]
    group["name"] = name
    if all("param_names" in g for g in groups):
        group["param_names"] = [n for _, n in new]

    def commit() -> None:
        optimizer.add_param_group(group)
        for op in sched_ops:
            op()

    return commit
