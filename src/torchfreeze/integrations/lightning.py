"""A Lightning callback that freezes, keeps frozen, and unfreezes on schedule.

What it fixes over ``lightning.pytorch.callbacks.BaseFinetuning``:

* frozen BatchNorm layers stay in eval through Lightning's own ``model.train()``
  calls (after every validation loop, at every epoch), so their running
  statistics never move (Lightning-AI/pytorch-lightning#15062);
* on resume, ``requires_grad``, BN policies *and* the optimizer's param groups
  are rebuilt before Lightning loads the optimizer state (#21901), so a
  checkpoint saved after an unfreeze milestone loads;
* every group it adds is registered with the LR scheduler(s) configured for that
  optimizer (#8720);
* with the ``ddp`` strategy the model is re-wrapped after each unfreeze, so the
  newly trainable parameters are all-reduced (#20340). Strategies it cannot
  handle (FSDP, DeepSpeed, XLA, model parallel) are refused before training.

Hook order this relies on (``Trainer._run`` in lightning 2.x): ``setup`` (we
freeze) -> callback ``load_state_dict`` when resuming (we keep the state) ->
``strategy.setup`` (DDP wrap, ``configure_optimizers``) -> ``on_fit_start`` (we
build a GradualUnfreeze and load its state: the groups the checkpoint had) ->
``restore_training_state`` (Lightning loads optimizer and scheduler state into
groups that now match) -> ``on_train_epoch_start`` (scheduled unfreezing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from .._freeze import freeze as _freeze
from .._freeze import freeze_state, load_freeze_state
from .._select import Selector
from .._state import check_format, register
from .._summary import summary
from ..errors import FreezeStateError, TorchfreezeError
from ..norm import BNPolicy
from ..schedule import GradualUnfreeze
from . import LIGHTNING_FORMAT, STATE_VERSION, _Plan
from . import STATE_FORMAT as _SHARED_FORMAT

__all__ = ["AutoFreezeCallback", "FreezeCallback", "RotatingFreezeCallback"]

# strategies that shard parameters or own the optimizer: requires_grad changes and
# new param groups cannot be applied behind their back
AUTO_FORMAT = register(_SHARED_FORMAT + ".auto", "the Lightning AutoFreezeCallback")
ROTATING_FORMAT = register(_SHARED_FORMAT + ".rotating", "the Lightning RotatingFreezeCallback")

_UNSUPPORTED = ("DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy", "XLAStrategy",
                "SingleDeviceXLAStrategy", "XLAFSDPStrategy")


class FreezeCallback(Callback):
    """Freeze parts of a LightningModule, keep them frozen, unfreeze on schedule.

    Args:
        freeze: selectors frozen in the ``setup`` hook, before
            ``configure_optimizers`` runs (so an optimizer built from
            ``filter(lambda p: p.requires_grad, self.parameters())`` never sees
            them). ``None``: freeze nothing (the module may come frozen already).
        schedule: ``{epoch: selectors}``, frozen with ``freeze`` until their
            epoch; at the start of each listed epoch (0 = the first) the selection
            is unfrozen and added to the optimizer as a new param group,
            registered with the LR scheduler(s) of that optimizer. This is a
            :class:`torchfreeze.GradualUnfreeze` built at fit start
            (``callback.unfreezer``).
        bn: BatchNorm policy of frozen BN layers (``"eval"``, ``"train"``,
            ``"stats"``; see :func:`torchfreeze.freeze`).
        lr: learning rate of each scheduled group.
        lr_mult: instead of ``lr``, a multiple of the first group's learning rate.
        optimizer_index: which of ``trainer.optimizers`` receives the new groups.
        verbose: log the one-line summary ("trainable 4.1 M / 22.7 M (18.1%),
            3 groups") at the start of fitting and after each milestone.

    Layers must exist when the ``setup`` hook runs (built in ``__init__``, not in
    ``configure_model``). Selectors are checked there, so a typo fails before
    the first step, not epochs later.

    Example:
        >>> from torchfreeze.integrations.lightning import FreezeCallback
        >>> cb = FreezeCallback(freeze="backbone", schedule={2: "backbone.layer4"},
        ...                     lr_mult=0.1)
        >>> # pl.Trainer(callbacks=[cb], ...).fit(module)
    """

    def __init__(
        self,
        freeze: Selector | None = None,
        schedule: Mapping[int, Selector] | None = None,
        *,
        bn: BNPolicy = "eval",
        lr: float | None = None,
        lr_mult: float | None = None,
        optimizer_index: int = 0,
        verbose: bool = True,
    ) -> None:
        self._plan = _Plan(freeze, schedule, bn=bn, lr=lr, lr_mult=lr_mult)
        self.optimizer_index = optimizer_index
        self.verbose = verbose
        #: the last summary line logged
        self.headline: str | None = None
        #: the :class:`~torchfreeze.GradualUnfreeze` driving the schedule (from fit start)
        self.unfreezer: GradualUnfreeze | None = None
        self._module: pl.LightningModule | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def applied(self) -> list[int]:
        """Epochs whose milestone has been applied, in order."""
        return list(self.unfreezer.applied) if self.unfreezer is not None else []

    # -- setup and resume -------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy, type(self).__name__)
        self._plan.validate(pl_module)
        self._module = pl_module
        self.unfreezer = None
        self._pending = None
        if self._plan.to_freeze():
            _freeze(pl_module, self._plan.to_freeze(), bn=self._plan.bn)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": LIGHTNING_FORMAT,
            "version": STATE_VERSION,
            "unfreeze": self.unfreezer.state_dict() if self.unfreezer is not None else None,
            "freeze_state": freeze_state(self._module) if self._module is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before strategy.setup builds the optimizer: only check and remember the
        # state. Unfreezing here would make configure_optimizers put the unfrozen
        # parameters in its own groups, and the checkpoint's groups would not load.
        _check_state(state_dict, list(self._plan.schedule))
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        strategy = trainer.strategy
        if self._plan.schedule:
            optimizer = self._optimizer(trainer)
            if strategy.model is None:  # Lightning sets it before on_fit_start
                raise TorchfreezeError(
                    "FreezeCallback: the Lightning strategy has no model at on_fit_start; "
                    "pass the callback to pl.Trainer(callbacks=[...]) and call trainer.fit()."
                )
            self.unfreezer = GradualUnfreeze(
                strategy.model, optimizer, self._plan.schedule, lr=self._plan.lr,
                lr_mult=self._plan.lr_mult, scheduler=self._scheduler(trainer, optimizer),
                bn=self._plan.bn,
            )
            if pending is not None and pending.get("unfreeze") is not None:
                # re-adds the checkpoint's groups (re-wrapping under DDP) before
                # restore_training_state loads the optimizer and scheduler state
                self.unfreezer.load_state_dict(pending["unfreeze"])
                self._sync_wrapper(trainer)
        if pending is not None and pending.get("freeze_state") is not None:
            # exact BN policies and anything frozen outside the schedule
            load_freeze_state(pl_module, pending["freeze_state"])
        self._warn_frozen_in_optimizer(trainer, pl_module)
        self._log(trainer, "")

    # -- schedule ---------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unfreezer is None:
            return
        if self.unfreezer.step(trainer.current_epoch):
            self._sync_wrapper(trainer)
            self._log(trainer, f"epoch {trainer.current_epoch}: ")

    def _sync_wrapper(self, trainer: pl.Trainer) -> None:
        # Under DDP, GradualUnfreeze unfreezes through torchfreeze.distributed, which
        # builds a new wrapper (DDP only all-reduces the parameters trainable when it
        # was built) and retires the old one. Lightning runs every step through
        # strategy.model, so handing it the new wrapper is all the strategy needs.
        assert self.unfreezer is not None
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = self.unfreezer.model

    def _optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        return _optimizer_at(trainer, self.optimizer_index, type(self).__name__)

    @staticmethod
    def _scheduler(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Any:
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs
                  if getattr(c.scheduler, "optimizer", None) is optimizer]
        return scheds[0] if len(scheds) == 1 else (scheds or None)

    # -- reporting --------------------------------------------------------

    def _warn_frozen_in_optimizer(self, trainer: pl.Trainer, module: torch.nn.Module) -> None:
        in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups
                  for p in g["params"]}
        frozen = [n for n, p in module.named_parameters()
                  if not p.requires_grad and id(p) in in_opt]
        if frozen:
            rank_zero_warn(
                f"torchfreeze: {len(frozen)} frozen parameters (e.g. {frozen[:3]}) are in the "
                "optimizer. They get no gradients, so they do not move, but a scheduled unfreeze "
                "cannot give them their own group. Build the optimizer in configure_optimizers "
                "from [p for p in self.parameters() if p.requires_grad]."
            )

    def _log(self, trainer: pl.Trainer, prefix: str) -> None:
        opts = trainer.optimizers
        opt = opts[self.optimizer_index] if 0 <= self.optimizer_index < len(opts) else None
        self.headline = summary(trainer.lightning_module, opt).headline
        if self.verbose:
            rank_zero_info(f"torchfreeze: {prefix}{self.headline}")


def _check_state(state: Any, milestones: list[int]) -> None:
    if isinstance(state, Mapping) and state.get("format") == _SHARED_FORMAT and \
            "unfreeze" in state:
        state = {**state, "format": LIGHTNING_FORMAT}  # written before the formats split
    check_format(state, LIGHTNING_FORMAT, hint="Resume from a checkpoint of a run with "
                 "this callback.")
    saved = (state.get("unfreeze") or {}).get("milestones", [])
    if list(saved) != milestones:
        raise FreezeStateError(
            f"the checkpoint was trained with unfreeze milestones at epochs {list(saved)}, "
            f"but this callback's schedule has {milestones}. Resume with the same schedule "
            "the checkpoint was trained with."
        )


def _check_strategy(strategy: Any, who: str) -> None:
    names = [c.__name__ for c in type(strategy).__mro__]
    bad = next((n for n in names if n in _UNSUPPORTED), None)
    ok = any(n in ("SingleDeviceStrategy", "DDPStrategy") for n in names)
    if bad is not None or not ok or getattr(strategy, "restore_checkpoint_after_setup", False):
        raise TorchfreezeError(
            f"{who} does not support the {type(strategy).__name__} strategy: it shards "
            "parameters or owns the optimizer, so changing requires_grad and the optimizer "
            "during training would desynchronise it. Supported: a single device and "
            "DDPStrategy ('ddp'). For FSDP2 in your own loop, freeze before fully_shard "
            "(see torchfreeze.distributed)."
        )


class AutoFreezeCallback(Callback):
    """:class:`torchfreeze.AutoFreeze` for a LightningModule: freeze layers as they settle.

    Builds an ``AutoFreeze`` over ``tfz.layers(pl_module)`` (or ``layers=``) and
    the optimizer at fit start, and steps it after every optimizer step (with
    gradient accumulation, once per optimizer step). Frozen layers leave the
    optimizer and stay in eval through Lightning's ``model.train()`` calls.
    Resumable: the checkpoint carries its state, which is applied at fit start,
    before Lightning loads the optimizer state into the (shrunk) param groups.
    With the ``ddp`` strategy the model is re-wrapped after each freeze.

    For ``cache=True`` wrap the forward of ``training_step`` in
    ``with callback.autofreeze.keys(sample_ids):``.

    Args:
        layers, interval, policy, percentile, cache: as :class:`torchfreeze.AutoFreeze`.
        optimizer_index: which of ``trainer.optimizers`` to shrink.
        verbose: log each freeze event (rank 0).
        **options: further :class:`~torchfreeze.AutoFreeze` options (``warmup``,
            ``patience``, ``max_per_decision``, ``normalize``, ``pin_eval``).

    Example:
        >>> from torchfreeze.integrations.lightning import AutoFreezeCallback
        >>> cb = AutoFreezeCallback(interval=50)
        >>> # pl.Trainer(callbacks=[cb], ...).fit(module); cb.autofreeze.events
    """

    def __init__(
        self,
        *,
        layers: Any = None,
        interval: int = 50,
        policy: Any = "gradnorm",
        percentile: float = 50,
        cache: bool = False,
        optimizer_index: int = 0,
        verbose: bool = True,
        **options: Any,
    ) -> None:
        from ..autofreeze import AutoFreeze, callback_kwargs

        self._kwargs = callback_kwargs(layers=layers, interval=interval, policy=policy,
                                       percentile=percentile, options=options, cache=cache)
        self._cls = AutoFreeze
        self.optimizer_index = optimizer_index
        self.verbose = verbose
        #: the :class:`~torchfreeze.AutoFreeze` (from fit start)
        self.autofreeze: Any = None
        self._pending: dict[str, Any] | None = None
        self._seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": AUTO_FORMAT, "version": STATE_VERSION,
                "autofreeze": self.autofreeze.state_dict() if self.autofreeze else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # runs before the optimizer exists; applied at fit start (see FreezeCallback)
        check_format(state_dict, AUTO_FORMAT, hint="Resume from a checkpoint of a run with "
                     "this callback.")
        self._pending = dict(state_dict)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_strategy(trainer.strategy, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        opt = _optimizer_at(trainer, self.optimizer_index, type(self).__name__)
        model = trainer.strategy.model
        assert model is not None
        self.autofreeze = self._cls(model, opt,
                                    scheduler=FreezeCallback._scheduler(trainer, opt),
                                    **self._kwargs)
        if pending is not None and pending.get("autofreeze") is not None:
            self.autofreeze.load_state_dict(pending["autofreeze"])
            self._sync_wrapper(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # the gradients of this step are still there: Lightning zeroes them before
        # the next backward, not after optimizer.step()
        if self.autofreeze is None or trainer.global_step == self._seen:
            return
        self._seen = trainer.global_step
        frozen = self.autofreeze.step()
        if frozen:
            self._sync_wrapper(trainer)
            if self.verbose:
                from ..autofreeze import event_line

                rank_zero_info(event_line(self.autofreeze, frozen))

    def _sync_wrapper(self, trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = self.autofreeze.model


def _optimizer_at(trainer: pl.Trainer, index: int, who: str) -> torch.optim.Optimizer:
    opts = trainer.optimizers
    if not 0 <= index < len(opts):
        raise TorchfreezeError(
            f"{who}(optimizer_index={index}) but the trainer has {len(opts)} optimizer(s). "
            "Return an optimizer from configure_optimizers, or pick an existing index."
        )
    opt: torch.optim.Optimizer = opts[index]
    return opt


class RotatingFreezeCallback(Callback):
    """:class:`torchfreeze.RotatingFreeze` for a LightningModule (BAdam, LISA).

    Builds a ``RotatingFreeze`` on the module and its optimizer at fit start (return
    an optimizer over every parameter from ``configure_optimizers``) and steps it
    after every optimizer step: the outgoing groups' optimizer state is freed, not
    only their flags flipped. Resumable: the checkpoint carries the rotation
    (its ``state="keep"`` stash included), applied at fit start before Lightning
    loads the optimizer state. With the ``ddp`` strategy the model is re-wrapped at
    every switch.

    Args:
        optimizer_index: which of ``trainer.optimizers`` rotates.
        **options: :class:`~torchfreeze.RotatingFreeze` options (``layers``, ``active``,
            ``switch_every``, ``order``, ``always``, ``seed``, ``state``).

    Example:
        >>> from torchfreeze.integrations.lightning import RotatingFreezeCallback
        >>> cb = RotatingFreezeCallback(switch_every=50)
        >>> # pl.Trainer(callbacks=[cb], ...).fit(module); cb.rotation.events
    """

    _OPTIONS = ("layers", "active", "switch_every", "order", "always", "seed", "state")

    def __init__(self, *, optimizer_index: int = 0, **options: Any) -> None:
        unknown = sorted(set(options) - set(self._OPTIONS))
        if unknown:
            raise TorchfreezeError(
                f"RotatingFreezeCallback got unknown options {unknown}; it takes "
                + ", ".join(f"{o}=" for o in self._OPTIONS) + "."
            )
        self._options = options
        self.optimizer_index = optimizer_index
        #: the :class:`~torchfreeze.RotatingFreeze` (from fit start)
        self.rotation: Any = None
        self._pending: dict[str, Any] | None = None
        self._seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": ROTATING_FORMAT, "version": STATE_VERSION,
                "rotation": self.rotation.state_dict() if self.rotation else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_format(state_dict, ROTATING_FORMAT, hint="Resume from a checkpoint of a run "
                     "with this callback.")
        self._pending = dict(state_dict)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_strategy(trainer.strategy, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..rotate import RotatingFreeze

        pending, self._pending = self._pending, None
        opt = _optimizer_at(trainer, self.optimizer_index, type(self).__name__)
        model = trainer.strategy.model
        assert model is not None
        self.rotation = RotatingFreeze(model, opt, **self._options)
        if pending is not None and pending.get("rotation") is not None:
            self.rotation.load_state_dict(pending["rotation"])
        self._sync_wrapper(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.rotation is None or trainer.global_step == self._seen:
            return
        self._seen = trainer.global_step
        if self.rotation.step():
            self._sync_wrapper(trainer)

    def _sync_wrapper(self, trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = self.rotation.model
