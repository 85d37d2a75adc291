"""Gradual unfreezing that survives LR schedulers and resume, and a one-call recipe.

:class:`GradualUnfreeze` unfreezes selections at given epochs, adds each as a
new named param group to the optimizer and registers it with the LR
scheduler. Its ``state_dict()`` holds the freeze state (``requires_grad`` and
BN policies, which a model's state_dict does not record) and the group
structure it built, so a run resumed in this order continues bit for bit::

    model, opt, sched, gu = build()      # exactly as at the start of training
    gu.load_state_dict(ckpt["unfreeze"]) # re-adds the groups, restores requires_grad
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    model.load_state_dict(ckpt["model"])

:func:`fine_tune_schedule` is the fastai-style recipe: train the head for
``head_epochs`` epochs at a higher learning rate, then unfreeze the body.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ._freeze import (
    _refuse_wrapped,
    freeze,
    freeze_state,
    load_freeze_state,
    unfreeze,
    warn_tied,
)
from ._optim import added_group_name, prepare_new_group
from ._select import ModelIndex, Selector, require_module, resolve
from ._snapshot import capture, restore
from ._state import check_format, register
from ._wrappers import is_ddp
from .errors import FreezeStateError, SelectionError, TorchfreezeError
from .norm import BNPolicy, check_bn_policy, set_bn_policy

__all__ = ["FineTune", "GradualUnfreeze", "fine_tune_schedule"]

STATE_FORMAT = register("torchfreeze.gradual_unfreeze", "GradualUnfreeze.state_dict()")
STATE_VERSION = 1


def _is_distributed(model: nn.Module) -> bool:
    """DDP wrappers and FSDP2 roots unfreeze through torchfreeze.distributed: DDP
    must be re-wrapped, FSDP2 needs its mixed-precision dtypes recomputed."""
    if is_ddp(model):
        return True
    from .distributed import _fsdp_module_class

    fsdp = _fsdp_module_class()
    return fsdp is not None and isinstance(model, fsdp)


def _check_epoch(what: str, epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise TorchfreezeError(
            f"{what} {epoch!r} is not an epoch: use an int >= 0 (0 is the first epoch)."
        )
    return int(epoch)


class GradualUnfreeze:
    """Unfreeze selections of a model at given epochs (gradual unfreezing).

    On construction every scheduled selection is frozen (with the BN policy
    ``bn``); :meth:`step` then unfreezes each at its epoch and adds the newly
    trainable parameters to ``optimizer`` as a new group named
    ``"unfreeze@<epoch>"`` (two with ``no_decay=``), registered with
    ``scheduler``, exactly as ``tfz.unfreeze(..., optimizer=, scheduler=)``
    would. Parameters already in the optimizer are not added again.

    For a ``DistributedDataParallel`` model, unfreezing goes through
    :func:`torchfreeze.distributed.unfreeze`, which re-wraps the model:
    ``gu.model`` is always the *current* wrapper, use it for the forward pass
    after each :meth:`step`. (Freeze the scheduled selections before wrapping;
    construction does not change a DDP model.) Parameters that no milestone
    selects are left as they are: freeze them yourself first (e.g.
    ``tfz.freeze(model)``, then unfreeze the head and build the optimizer).

    Args:
        model: the model (or a DDP wrapper).
        optimizer: the optimizer over the currently trainable parameters.
        schedule: ``{epoch: selectors}``; selectors in the grammar of
            :func:`torchfreeze.select` (a list is their union).
        lr: base learning rate of every group added (absolute), or
        lr_mult: a multiple of the first group's base learning rate (default 1).
        scheduler: the LR scheduler (or a list) driving ``optimizer``.
        bn: BN policy for the frozen selections (``"eval"``, ``"train"``,
            ``"stats"``; see :func:`torchfreeze.freeze`).
        no_decay: e.g. ``("bias", "norm")`` as in :func:`torchfreeze.param_groups`:
            when the first group has weight decay, a milestone's matching
            parameters join as a second group ``"unfreeze@<epoch>/no_decay"``
            with weight decay 0. Default ``()``: one group per milestone, all
            hyper-parameters but the LR copied from the first group. Not split
            for DDP models.

    Raises:
        SelectionError: a selector matches nothing, or a milestone is an empty
            list, or selects only buffers (checked for every epoch now,
            not when its epoch comes).
        SchedulerError: the scheduler cannot be extended with new groups.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net[2].parameters(), lr=0.1)
        >>> gu = tfz.GradualUnfreeze(net, opt, {1: "1", 2: "0"}, lr_mult=0.1)
        >>> net[1].weight.requires_grad
        False
        >>> gu.step(2)    # jumping ahead applies every missed milestone
        [1, 2]
        >>> [(g.get("name"), round(g["lr"], 6)) for g in opt.param_groups]
        [(None, 0.1), ('unfreeze@1', 0.01), ('unfreeze@2', 0.01)]
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Mapping[int, Selector],
        *,
        lr: float | None = None,
        lr_mult: float | None = None,
        scheduler: Any = None,
        bn: BNPolicy = "eval",
        no_decay: Iterable[str | type[nn.Module]] = (),
    ) -> None:
        require_module(model, "GradualUnfreeze")
        if not isinstance(schedule, Mapping) or not schedule:
            raise TorchfreezeError(
                "schedule must be a non-empty dict {epoch: selectors}, e.g. "
                f"{{2: 'encoder.layer.11', 4: 'encoder.layer.10'}}; got {schedule!r}."
            )
        check_bn_policy(bn)
        sched = {_check_epoch("schedule key", k): v for k, v in schedule.items()}
        target = model.module if is_ddp(model) else model
        idx = ModelIndex(target)
        selections = {}
        for epoch in sorted(sched):
            try:
                selections[epoch] = resolve(target, [sched[epoch]], index=idx,
                                            allow_empty=False, trainable=True,
                                            what="the milestone")
            except SelectionError as exc:
                raise SelectionError(
                    f"schedule[{epoch}]: {exc}", selector=exc.selector,
                    suggestions=exc.suggestions,
                ) from None
        # validate lr/lr_mult and the scheduler now rather than mid-training
        prepare_new_group(optimizer, [], [], lr=lr, lr_mult=lr_mult, scheduler=scheduler,
                          name="probe")
        self.model = model
        self.optimizer = optimizer
        self.schedule = dict(sorted(sched.items()))
        self.lr = lr
        self.lr_mult = lr_mult
        self.scheduler = scheduler
        self.bn = bn
        self.no_decay = tuple(no_decay)
        self.epoch: int | None = None
        self.applied: list[int] = []
        self.groups: list[dict[str, Any]] = []
        self._initial_groups = len(optimizer.param_groups)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for epoch, sel in list(selections.items())[1:]:
            already = [n for n, p in zip(sel.param_names, sel.params) if id(p) in in_opt]
            if already:
                warnings.warn(
                    f"schedule[{epoch}] selects {len(already)} parameters that are already in "
                    f"the optimizer ({', '.join(already[:3])}{', ...' if len(already) > 3 else ''}"
                    "): they are frozen until epoch "
                    f"{epoch} but keep their current group, so lr/lr_mult does not apply to them. "
                    "Build the optimizer over the initially trainable parameters only.",
                    UserWarning,
                    stacklevel=2,
                )
        for sel in selections.values():
            warn_tied(sel, "freeze")
        if not is_ddp(model):
            freeze(model, [s.params for s in selections.values()], bn=bn)

    @property
    def module(self) -> nn.Module:
        """The underlying model (``model.module`` for a DDP wrapper)."""
        return self.model.module if is_ddp(self.model) else self.model

    def step(self, epoch: int) -> list[int]:
        """Apply every milestone ``<= epoch`` not applied yet, in order.

        Call it at the start of each epoch. Calling it again for the same (or an
        earlier) epoch does nothing.

        Returns:
            The milestones applied by this call.
        """
        epoch = _check_epoch("epoch", epoch)
        due = [m for m in self.schedule if m <= epoch and m not in self.applied]
        for m in due:
            self._apply(m)
        self.epoch = epoch if self.epoch is None else max(self.epoch, epoch)
        return due

    def _apply(self, milestone: int) -> None:
        name = added_group_name(epoch=milestone)
        before = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        n_before = len(self.optimizer.param_groups)
        options: dict[str, dict[str, Any]] = {}
        if _is_distributed(self.model):
            from . import distributed

            self.model = distributed.unfreeze(
                self.model, self.schedule[milestone], optimizer=self.optimizer, lr=self.lr,
                lr_mult=self.lr_mult, scheduler=self.scheduler, group_name=name,
            )
        else:
            options = self._unfreeze_split(milestone, name)
        self.applied.append(milestone)
        idx = ModelIndex(self.module)
        for g in self.optimizer.param_groups[n_before:]:
            added = [idx.param_name[id(p)] for p in g["params"] if id(p) not in before]
            if added:
                gname = str(g.get("name", name))
                record: dict[str, Any] = {"epoch": milestone, "name": gname, "param_names": added}
                if options.get(gname):
                    record["options"] = dict(options[gname])
                self.groups.append(record)

    def _unfreeze_split(self, milestone: int, name: str) -> dict[str, dict[str, Any]]:
        """Unfreeze one milestone as up to two groups: the rest, and its ``no_decay``
        parameters with weight decay 0 (when the first group decays at all)."""
        from .groups import _no_decay_ids

        idx = ModelIndex(self.model)
        sel = resolve(self.model, [self.schedule[milestone]], index=idx)
        params = [p for p in sel.params if p.is_floating_point() or p.is_complex()]
        decays = float(self.optimizer.param_groups[0].get("weight_decay") or 0.0) != 0.0
        nd = _no_decay_ids(idx, self.no_decay, warn=False) if decays and self.no_decay else set()
        parts = [
            (name, [p for p in params if id(p) not in nd], {}),
            (added_group_name(epoch=milestone, no_decay=True),
             [p for p in params if id(p) in nd], {"weight_decay": 0.0}),
        ]
        # validate both groups before anything changes, as tfz.unfreeze does
        commits = [
            prepare_new_group(
                self.optimizer, ps, [idx.param_name[id(p)] for p in ps], lr=self.lr,
                lr_mult=self.lr_mult, scheduler=self.scheduler, name=gname, options=opts,
            )
            for gname, ps, opts in parts
            if ps
        ]
        unfreeze(self.model, self.schedule[milestone])  # requires_grad and BN policies
        for commit in commits:
            commit()
        return {gname: opts for gname, _, opts in parts}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: epoch, applied milestones, added groups, freeze state."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "milestones": list(self.schedule),
            "epoch": self.epoch,
            "applied": list(self.applied),
            "groups": [
                {**g, "param_names": list(g["param_names"])} for g in self.groups
            ],
            "freeze_state": freeze_state(self.module),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a freshly built GradualUnfreeze.

        Re-adds the param groups that had been added (same parameters, same
        order, registered with the scheduler) and restores every
        ``requires_grad`` and BN policy. Call it *before*
        ``optimizer.load_state_dict`` and ``scheduler.load_state_dict`` (they
        need the groups to exist). Everything is checked before anything changes.

        Raises:
            FreezeStateError: the state does not fit this model or schedule.
            TorchfreezeError: this object (or its optimizer) was already stepped.
        """
        check_format(state, STATE_FORMAT)
        if state.get("version", 0) > STATE_VERSION:
            raise FreezeStateError(
                f"GradualUnfreeze state version {state.get('version')} is newer than this "
                f"torchfreeze understands ({STATE_VERSION}); upgrade torchfreeze."
            )
        if list(state.get("milestones", [])) != list(self.schedule):
            raise FreezeStateError(
                f"the saved schedule has milestones {state.get('milestones')} but this one has "
                f"{list(self.schedule)}. Build GradualUnfreeze with the same schedule as the "
                "run that saved it. Nothing was changed."
            )
        if self.applied or len(self.optimizer.param_groups) != self._initial_groups:
            raise TorchfreezeError(
                "load_state_dict needs a freshly built GradualUnfreeze whose optimizer has "
                f"its initial {self._initial_groups} group(s); found milestones {self.applied} "
                f"applied and {len(self.optimizer.param_groups)} groups. Resume in this order: "
                "build everything -> gu.load_state_dict -> optimizer.load_state_dict -> "
                "scheduler.load_state_dict -> model.load_state_dict. Nothing was changed."
            )
        module = self.module
        idx = ModelIndex(module)
        aliases = dict(idx.param_aliases)
        modules = dict(idx.module_aliases)
        fstate = state.get("freeze_state", {})
        names = [n for g in state.get("groups", []) for n in g["param_names"]]
        names += list(fstate.get("frozen", []))
        unknown = [n for n in names if n not in aliases]
        unknown += [n for n in fstate.get("bn", {}) if n not in modules]
        if unknown:
            raise FreezeStateError(
                f"the saved GradualUnfreeze state names {unknown[:5]} that "
                f"{idx.describe()} does not have. Load it into the architecture it was saved "
                "from. Nothing was changed."
            )
        if _is_distributed(self.model):
            from . import distributed

            for g in state.get("groups", []):
                self.model = distributed.unfreeze(
                    self.model, list(g["param_names"]), optimizer=self.optimizer, lr=self.lr,
                    lr_mult=self.lr_mult, scheduler=self.scheduler, group_name=str(g["name"]),
                )
            # requires_grad was restored collectively above; flipping it here would
            # desynchronise ranks, but BN policies are local and must come back too
            for mname, policy in fstate.get("bn", {}).items():
                set_bn_policy(modules[mname], policy, training=module.training)
        else:
            commits = [
                prepare_new_group(
                    self.optimizer, [aliases[n] for n in g["param_names"]],
                    list(g["param_names"]), lr=self.lr, lr_mult=self.lr_mult,
                    scheduler=self.scheduler, name=str(g["name"]), options=g.get("options"),
                )
                for g in state.get("groups", [])
            ]
            for commit in commits:
                commit()
            load_freeze_state(module, fstate)
        self.applied = [int(m) for m in state.get("applied", [])]
        self.epoch = state.get("epoch")
        self.groups = [
            {**g, "param_names": list(g["param_names"])} for g in state.get("groups", [])
        ]

    def __repr__(self) -> str:
        return (
            f"GradualUnfreeze(milestones={list(self.schedule)}, applied={self.applied}, "
            f"epoch={self.epoch})"
        )


class FineTune(NamedTuple):
    """What :func:`fine_tune_schedule` built: unpack or use by name."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    unfreezer: GradualUnfreeze


def fine_tune_schedule(
    model: nn.Module,
    *,
    lr: float,
    head: Selector | None = None,
    head_epochs: int = 1,
    head_lr_mult: float = 10.0,
    weight_decay: float = 0.0,
    no_decay: tuple[Any, ...] = ("bias", "norm"),
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    bn: BNPolicy = "eval",
    **optimizer_kwargs: Any,
) -> FineTune:
    """Train the head first, then the whole model with discriminative LRs (fastai style).

    For ``head_epochs`` epochs only the head trains, at ``lr x head_lr_mult``;
    the body is frozen (BN policy ``bn``). At epoch ``head_epochs`` the body is
    unfrozen and joins the optimizer as one group at ``lr``, while the head keeps
    its higher rate (the usual "10x LR for the new classifier"). Call
    ``ft.unfreezer.step(epoch)`` at the start of every epoch.

    The head's groups come from :func:`torchfreeze.param_groups` (so its biases
    and norm layers get no weight decay). The body joins as one group at ``lr``
    (plus ``"unfreeze@<k>/no_decay"`` for its biases and norm layers when
    ``weight_decay`` is set), its other hyper-parameters copied from the head's
    first group. For per-layer body LRs (layer decay) build
    :func:`~torchfreeze.param_groups` and a :class:`GradualUnfreeze` yourself.

    Args:
        model: the model (not a DDP wrapper).
        lr: the body's learning rate once unfrozen.
        head: selectors of the head; default: the last group of
            :func:`torchfreeze.layers` (e.g. BERT's pooler + classifier).
        head_epochs: epochs during which only the head trains (``>= 0``).
        head_lr_mult: the head's learning rate is ``lr x head_lr_mult``.
        weight_decay: weight decay (not applied to ``no_decay`` head parameters).
        no_decay: see :func:`torchfreeze.param_groups`.
        optimizer: optimizer class or factory, called as
            ``optimizer(groups, **optimizer_kwargs)``.
        scheduler: optional factory ``optimizer -> LR scheduler``; the body group
            is registered with it when it joins.
        bn: BN policy of the frozen body.

    Returns:
        :class:`FineTune` ``(optimizer, scheduler, unfreezer)``.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt, sched, gu = tfz.fine_tune_schedule(net, lr=1e-4, head_epochs=2)
        >>> [g["lr"] for g in opt.param_groups]
        [0.001]
        >>> gu.step(2)
        [2]
        >>> [g["lr"] for g in opt.param_groups]
        [0.001, 0.0001]
    """
    from ._layers import layers
    from .groups import param_groups

    require_module(model, "fine_tune_schedule")
    _refuse_wrapped(model, "freeze")
    head_epochs = _check_epoch("head_epochs", head_epochs)
    if isinstance(head_lr_mult, bool) or not isinstance(head_lr_mult, numbers.Real) or (
        head_lr_mult <= 0
    ):
        raise TorchfreezeError(f"head_lr_mult={head_lr_mult!r} must be a number > 0.")
    if not isinstance(lr, numbers.Real) or lr < 0:
        raise TorchfreezeError(f"lr={lr!r} must be a number >= 0.")
    idx = ModelIndex(model)
    if head is None:
        found = layers(model)
        if len(found) < 2:
            raise TorchfreezeError(
                f"cannot tell the head of {idx.describe()} from its body (it has "
                f"{len(found)} layer group). Pass head=... explicitly."
            )
        head = list(found[-1].param_names)
    try:
        head_sel = resolve(model, [head], index=idx, allow_empty=False, trainable=True,
                           what="head=")
    except SelectionError as exc:
        raise SelectionError(f"fine_tune_schedule: {exc}", selector=exc.selector,
                             suggestions=exc.suggestions) from None
    body = [n for n, p in idx.params.items()
            if n not in set(head_sel.param_names) and (p.is_floating_point() or p.is_complex())]
    if not body:
        raise TorchfreezeError(
            "head= selects every parameter, so there is no body to unfreeze later. Select "
            "only the new head (e.g. head='classifier')."
        )
    snapshot = capture(model)
    try:
        unfreeze(model, list(head_sel.params))
        freeze(model, [idx.params[n] for n in body], bn=bn)
        opt = optimizer(
            param_groups(model, lr=lr * head_lr_mult, weight_decay=weight_decay,
                         no_decay=no_decay,
                         optimizer=optimizer if isinstance(optimizer, type) else None),
            **optimizer_kwargs,
        )
        sched = scheduler(opt) if scheduler is not None else None
        gu = GradualUnfreeze(model, opt, {head_epochs: body}, lr=lr, scheduler=sched, bn=bn,
                         no_decay=no_decay)
    except BaseException:
        restore(snapshot)  # a failed call leaves the model as it was
        raise
    return FineTune(opt, sched, gu)
