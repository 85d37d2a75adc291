"""A ``transformers.Trainer`` callback that freezes, keeps frozen, and unfreezes on schedule.

When the Trainer builds what (transformers 5.x, ``Trainer.train``):

1. ``Trainer.__init__`` ends with the ``on_init_end`` event: the callback freezes
   here, so the frozen parameters are never in the optimizer the Trainer
   builds later (``create_optimizer`` keeps only ``requires_grad`` parameters).
2. ``train()`` loads the ``TrainerState`` of ``resume_from_checkpoint``, then calls
   ``create_optimizer``, wraps the model, builds the LR scheduler and *then*
   loads the optimizer and scheduler state. No callback event fires in between,
   so the callback wraps that Trainer's ``create_optimizer`` (instance attribute,
   set in ``on_init_end``): right after the optimizer is built it replays the
   unfreeze milestones the checkpoint had reached (read from the
   ``TrainerState``, where the callback's ``state()`` was saved), so the
   optimizer has the checkpoint's param groups when its state is loaded.
3. ``on_epoch_begin``: scheduled unfreezing. The new parameters become two
   param groups of the Trainer's optimizer, split like the Trainer's own
   (weight decay / no weight decay, ``Trainer.get_decay_parameter_names``), named
   ``unfreeze@<epoch>`` and ``unfreeze@<epoch>/no_decay`` like
   :class:`~torchfreeze.GradualUnfreeze`'s, and
   are registered with its LR scheduler.

Not supported (refused with a clear error): DeepSpeed and FSDP (they own or
shard the parameters), a schedule on multi-process training (the Trainer keeps
its DDP wrapper in a local variable, so it cannot be re-wrapped),
``model_init`` (the model is re-created inside ``train()``), and
``restore_callback_states_from_checkpoint=True`` (it would replace this
callback by a copy built from JSON).
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .._freeze import freeze as _freeze
from .._freeze import freeze_state, load_freeze_state, unfreeze
from .._optim import added_group_name, prepare_new_group
from .._select import Selector, select
from .._summary import summary
from ..errors import TorchfreezeError
from ..norm import BNPolicy
from . import _Plan, _state

__all__ = ["AutoFreezeCallback", "FreezeCallback", "RotatingFreezeCallback"]

_PATCHED = "_torchfreeze_callback"


class FreezeCallback(TrainerCallback, ExportableState):
    """Freeze parts of the model for ``transformers.Trainer``; unfreeze on schedule.

    Pass it in ``Trainer(callbacks=[...])`` (not ``trainer.add_callback`` after
    the Trainer exists: freezing must happen before the Trainer builds its
    optimizer, which the ``on_init_end`` event guarantees).

    Args:
        freeze: selectors frozen when the Trainer is created.
        schedule: ``{epoch: selectors}``, frozen with ``freeze`` until their epoch;
            at the start of each listed epoch
            (0 = the first) the selection is unfrozen and added to the Trainer's
            optimizer and LR scheduler.
        bn: BatchNorm policy of frozen BN layers (see :func:`torchfreeze.freeze`).
        lr: learning rate of each scheduled group (its base, before the schedule).
        lr_mult: instead of ``lr``, a multiple of ``args.learning_rate``.
        verbose: print the one-line summary at the start of training and after
            each milestone (main process only).

    Example:
        >>> from torchfreeze.integrations.transformers import FreezeCallback
        >>> cb = FreezeCallback(freeze=["bert.embeddings", "bert.encoder.layer.{0..5}"],
        ...                     schedule={1: "bert.encoder.layer.5"}, lr_mult=0.1)
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __init__(
        self,
        freeze: Selector | None = None,
        schedule: Mapping[int, Selector] | None = None,
        *,
        bn: BNPolicy = "eval",
        lr: float | None = None,
        lr_mult: float | None = None,
        verbose: bool = True,
    ) -> None:
        self._plan = _Plan(freeze, schedule, bn=bn, lr=lr, lr_mult=lr_mult)
        self.verbose = verbose
        #: epochs whose milestone has been applied, in order
        self.applied: list[int] = []
        #: the last summary line printed
        self.headline: str | None = None
        self._model: nn.Module | None = None
        self._trainer: Any = None  # weakref.ref to the Trainer, when found

    # -- ExportableState: saved in trainer_state.json with every checkpoint --

    def state(self) -> dict[str, Any]:
        fs = freeze_state(self._model) if self._model is not None else None
        return {"args": {}, "attributes": {"tfz_state": _state(self.applied, fs)}}

    # -- events -------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        _check_args(args)
        if model is None:
            raise TorchfreezeError(
                "FreezeCallback got no model at Trainer init. Pass model= to the Trainer "
                "(model_init re-creates the model inside train() and is not supported)."
            )
        self._plan.validate(model)
        self._model = model
        self.applied = []
        if self._plan.to_freeze():
            _freeze(model, self._plan.to_freeze(), bn=self._plan.bn)
        trainer = _calling_trainer()
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
            _patch_create_optimizer(trainer, self)
        elif self._plan.schedule:
            warnings.warn(
                "FreezeCallback could not find the Trainer that fired on_init_end, so "
                "train(resume_from_checkpoint=...) from a checkpoint saved after an unfreeze "
                "milestone will fail to load the optimizer state, and new groups will not be "
                "split by weight decay. Use transformers.Trainer (or a subclass).",
                stacklevel=2,
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self._model is None:
            raise TorchfreezeError(
                "FreezeCallback never saw the Trainer being created, so it could not freeze "
                "before the optimizer was built. Pass it as Trainer(..., callbacks=[cb]) "
                "instead of trainer.add_callback(cb)."
            )
        if model is not None and model is not self._model:
            raise TorchfreezeError(
                "the Trainer trains a different model object than the one FreezeCallback froze "
                "at init (model_init re-creates it inside train()). Pass model= instead of "
                "model_init."
            )
        if self._plan.schedule and args.world_size > 1:
            raise TorchfreezeError(
                f"FreezeCallback(schedule=...) with {args.world_size} processes: the Trainer "
                "keeps its DistributedDataParallel wrapper in a local variable of its training "
                "loop, so a newly unfrozen layer could not be re-wrapped and ranks would "
                "diverge. Use freeze= only (fixed frozen set), or train in one process."
            )
        opt = _inner_optimizer(optimizer)
        if opt is not None:
            in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
            frozen = [n for n, p in self._model.named_parameters()
                      if not p.requires_grad and id(p) in in_opt]
            if frozen:
                raise TorchfreezeError(
                    f"{len(frozen)} frozen parameters (e.g. {frozen[:3]}) are in the optimizer "
                    "passed to Trainer(optimizers=...). Build it after the Trainer has frozen "
                    "them, or let the Trainer build it (it keeps trainable parameters only)."
                )
        self._print(state, opt, "")

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:
        # state.epoch is epochs completed as a float (1.0 at the start of the second
        # epoch, 1.5 when resuming mid-epoch); the tolerance absorbs float rounding
        epoch = math.floor(state.epoch + 1e-6)
        due = self._plan.due(epoch, self.applied)
        opt = _inner_optimizer(optimizer)
        for e in due:
            self._apply(e, opt, _inner_scheduler(lr_scheduler), args)
        if due:
            self._print(state, opt, f"epoch {epoch}: ")

    # -- internals ----------------------------------------------------------

    def _replay(self, trainer: Any) -> None:
        """Re-apply the milestones a resumed checkpoint had reached (optimizer only
        exists, no scheduler yet: the Trainer builds it from the complete optimizer)."""
        saved = (trainer.state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        st = (saved or {}).get("attributes", {}).get("tfz_state") if isinstance(saved, dict) \
            else None
        if not st:
            return
        applied = self._plan.check_state(st)
        opt = _inner_optimizer(trainer.optimizer)
        for e in applied:
            if e not in self.applied:
                self._apply(e, opt, None, trainer.args)
        if st.get("freeze_state") is not None:
            if self._model is None:  # on_init_end records it before any resume
                raise TorchfreezeError(
                    "FreezeCallback cannot restore the freeze state: it never saw the "
                    "model. Pass it in Trainer(callbacks=[...]), not add_callback() later."
                )
            load_freeze_state(self._model, st["freeze_state"])

    def _apply(self, epoch: int, optimizer: Any, scheduler: Any, args: Any) -> None:
        model = self._model
        assert model is not None
        sel = select(model, self._plan.schedule[epoch])
        trainer = self._trainer() if self._trainer is not None else None
        decay = set(trainer.get_decay_parameter_names(model)) if trainer is not None \
            else set(sel.param_names)
        commits = []
        if optimizer is not None:
            parts = (
                ([(p, n) for p, n in zip(sel.params, sel.param_names) if n in decay],
                 args.weight_decay, False),
                ([(p, n) for p, n in zip(sel.params, sel.param_names) if n not in decay],
                 0.0, True),
            )
            for pairs, wd, no_decay in parts:
                pairs = [(p, n) for p, n in pairs if p.is_floating_point()]
                if not pairs:
                    continue
                # prepared one after the other and committed together: all or nothing
                commits.append(prepare_new_group(
                    optimizer, [p for p, _ in pairs], [n for _, n in pairs],
                    lr=self._plan.lr, lr_mult=self._plan.lr_mult, scheduler=scheduler,
                    name=added_group_name(epoch=epoch, no_decay=no_decay),
                    options={"weight_decay": wd},
                ))
        unfreeze(model, list(sel.params))
        for commit in commits:
            commit()
        self.applied.append(epoch)

    def _print(self, state: Any, optimizer: Any, prefix: str) -> None:
        assert self._model is not None
        self.headline = summary(self._model, optimizer).headline
        if self.verbose and getattr(state, "is_world_process_zero", True):
            print(f"torchfreeze: {prefix}{self.headline}")


def _check_args(args: Any) -> None:
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise TorchfreezeError(
            "FreezeCallback does not support TrainingArguments("
            "restore_callback_states_from_checkpoint=True): the Trainer would replace it by a "
            "copy rebuilt from JSON. Leave it False; FreezeCallback restores its own state on "
            "train(resume_from_checkpoint=...)."
        )
    for name in ("deepspeed", "fsdp"):
        if getattr(args, name, None):
            raise TorchfreezeError(
                f"FreezeCallback does not support {name} in TrainingArguments: it shards or owns "
                "the parameters and optimizer, so freezing and new param groups cannot be applied "
                "behind its back. Freeze the model yourself before building the Trainer."
            )


def _calling_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` fired ``on_init_end`` (callbacks get no reference
    to it, and it is needed to hook ``create_optimizer`` for resume)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _patch_create_optimizer(trainer: Any, callback: FreezeCallback) -> None:
    if getattr(trainer, _PATCHED, None) is not None:
        raise TorchfreezeError(
            "this Trainer already has a torchfreeze FreezeCallback; use one callback with all "
            "selectors (freeze= takes a list, schedule= a dict)."
        )
    ref = weakref.ref(trainer)
    cls_create = type(trainer).create_optimizer  # a subclass's override is kept

    def create_optimizer(*args: Any, **kwargs: Any) -> Any:
        t = ref()
        optimizer = cls_create(t, *args, **kwargs)
        callback._replay(t)
        return optimizer

    trainer.create_optimizer = create_optimizer
    setattr(trainer, _PATCHED, weakref.ref(callback))


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    # accelerate's AcceleratedOptimizer shares param_groups with the optimizer it wraps
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _inner_scheduler(scheduler: Any) -> Any:
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "optimizer") else scheduler


_AUTO_PATCHED = "_torchfreeze_auto_callback"


class AutoFreezeCallback(TrainerCallback, ExportableState):
    """:class:`torchfreeze.AutoFreeze` for ``transformers.Trainer``: freeze layers as they settle.

    Pass it in ``Trainer(callbacks=[...])``. Right after the Trainer builds its
    optimizer, an ``AutoFreeze`` over ``tfz.layers(model)`` (or ``layers=``) is
    built on it, and stepped at every ``on_optimizer_step`` (after
    ``optimizer.step()``, before the gradients are zeroed). Frozen layers leave
    the optimizer (the Trainer's LR scheduler keeps every param group) and stay
    in eval through the Trainer's ``model.train()``. Resumable with
    ``train(resume_from_checkpoint=...)``: the state saved in the checkpoint's
    ``trainer_state.json`` re-freezes the prefix before the optimizer state loads.

    Not supported (refused with a clear error): several processes (the Trainer
    keeps its DDP wrapper in a local variable, so it cannot be re-wrapped after a
    freeze), DeepSpeed, FSDP, ``model_init``,
    ``restore_callback_states_from_checkpoint=True``.

    Args:
        layers, interval, policy, percentile: as :class:`torchfreeze.AutoFreeze`.
        verbose: print each freeze event (main process).
        **options: further :class:`~torchfreeze.AutoFreeze` options (``warmup``,
            ``patience``, ``max_per_decision``, ``normalize``, ``pin_eval``).

    Example:
        >>> from torchfreeze.integrations.transformers import AutoFreezeCallback
        >>> cb = AutoFreezeCallback(interval=50)
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[cb]).train(); cb.autofreeze.events
    """

    def __init__(
        self,
        *,
        layers: Any = None,
        interval: int = 50,
        policy: Any = "gradnorm",
        percentile: float = 50,
        verbose: bool = True,
        **options: Any,
    ) -> None:
        from ..autofreeze import callback_kwargs

        self._kwargs = callback_kwargs(layers=layers, interval=interval, policy=policy,
                                       percentile=percentile, options=options)
        self.verbose = verbose
        #: the :class:`~torchfreeze.AutoFreeze` (once the Trainer built its optimizer)
        self.autofreeze: Any = None
        self._model: nn.Module | None = None

    def state(self) -> dict[str, Any]:
        st = self.autofreeze.state_dict() if self.autofreeze is not None else None
        return {"args": {}, "attributes": {"tfz_auto": st}}

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        _check_args(args)
        if model is None:
            raise TorchfreezeError(
                "AutoFreezeCallback got no model at Trainer init. Pass model= to the Trainer "
                "(model_init re-creates the model inside train() and is not supported)."
            )
        self._model = model
        trainer = _calling_trainer()
        if trainer is None:
            raise TorchfreezeError(
                "AutoFreezeCallback could not find the Trainer that fired on_init_end. Pass "
                "it as transformers.Trainer(..., callbacks=[cb]) (or a subclass)."
            )
        if getattr(trainer, _AUTO_PATCHED, None) is not None:
            raise TorchfreezeError("this Trainer already has an AutoFreezeCallback; use one.")
        _on_optimizer_built(trainer, self._build)
        setattr(trainer, _AUTO_PATCHED, weakref.ref(self))

    def _build(self, trainer: Any, optimizer: Any) -> None:
        from ..autofreeze import AutoFreeze

        if trainer.args.world_size > 1:
            raise TorchfreezeError(
                f"AutoFreezeCallback with {trainer.args.world_size} processes: the Trainer "
                "keeps its DistributedDataParallel wrapper in a local variable of its training "
                "loop, so the model cannot be re-wrapped after a freeze and ranks would fail. "
                "Train in one process, or use tfz.AutoFreeze in your own DDP loop."
            )
        assert self._model is not None
        self.autofreeze = AutoFreeze(self._model, optimizer, **self._kwargs)
        st = _saved_attribute(trainer, type(self).__name__, "tfz_auto")
        if st:
            self.autofreeze.load_state_dict(st)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if self.autofreeze is None:
            raise TorchfreezeError(
                "AutoFreezeCallback never saw the Trainer build its optimizer. Pass it as "
                "Trainer(..., callbacks=[cb]) (not trainer.add_callback(cb)), and let the "
                "Trainer create the optimizer (not optimizers=(...))."
            )
        if model is not None and model is not self._model:
            raise TorchfreezeError(
                "the Trainer trains a different model object than the one AutoFreezeCallback "
                "saw at init (model_init re-creates it inside train()). Pass model= instead."
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.autofreeze is None:
            return
        frozen = self.autofreeze.step()
        if frozen and self.verbose and getattr(state, "is_world_process_zero", True):
            from ..autofreeze import event_line

            print(event_line(self.autofreeze, frozen))


def _on_optimizer_built(trainer: Any, build: Any) -> None:
    """Call ``build(trainer, optimizer)`` right after ``trainer`` builds its optimizer
    (patched on this instance only: the Trainer builds it in train(), after every
    callback hook we get)."""
    ref = weakref.ref(trainer)
    create = trainer.create_optimizer  # another callback's patch, or the class's method

    def create_optimizer(*a: Any, **kw: Any) -> Any:
        optimizer = create(*a, **kw)
        build(ref(), optimizer)
        return optimizer

    trainer.create_optimizer = create_optimizer


def _saved_attribute(trainer: Any, callback: str, key: str) -> Any:
    """``key`` of the attributes ``callback`` saved in the resumed ``trainer_state.json``."""
    saved = (trainer.state.stateful_callbacks or {}).get(callback)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved.get("attributes", {}).get(key) if isinstance(saved, dict) else None


_ROT_PATCHED = "_torchfreeze_rotating_callback"


class RotatingFreezeCallback(TrainerCallback, ExportableState):
    """:class:`torchfreeze.RotatingFreeze` for ``transformers.Trainer`` (BAdam, LISA).

    Pass it in ``Trainer(callbacks=[...])`` with every parameter trainable (the
    Trainer builds its optimizer over the trainable ones). Right after the Trainer
    builds its optimizer, a ``RotatingFreeze`` is built on it, and stepped at every
    ``on_optimizer_step``: the outgoing groups' optimizer state is **freed**, not
    only their ``requires_grad`` flipped (a flag-only callback keeps the full AdamW
    state of every layer). Resumable with ``train(resume_from_checkpoint=...)``: the
    rotation's state is saved in ``trainer_state.json``.

    Not supported (refused with a clear error): several processes (use
    :class:`~torchfreeze.RotatingFreeze` with ``torchfreeze.distributed`` in your own
    DDP loop), ``state="keep"`` (its host-memory stash is not in the checkpoint).

    Args:
        **options: :class:`~torchfreeze.RotatingFreeze` options (``layers``,
            ``active``, ``switch_every``, ``order``, ``always``, ``seed``).

    Example:
        >>> from torchfreeze.integrations.transformers import RotatingFreezeCallback
        >>> cb = RotatingFreezeCallback(switch_every=50, order="descending")
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[cb]).train(); cb.rotation.events
    """

    _OPTIONS = ("layers", "active", "switch_every", "order", "always", "seed", "state")

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self._OPTIONS))
        if unknown:
            raise TorchfreezeError(
                f"RotatingFreezeCallback got unknown options {unknown}; it takes "
                + ", ".join(f"{o}=" for o in self._OPTIONS) + "."
            )
        if options.get("state", "fresh") != "fresh":
            raise TorchfreezeError(
                f"RotatingFreezeCallback(state={options['state']!r}): the Trainer saves callback "
                "state as JSON in trainer_state.json, so a host-memory stash of optimizer "
                "state would be lost on resume. Use the default state='fresh' (BAdam's), or "
                "tfz.RotatingFreeze(state='keep') in your own loop with torch.save."
            )
        self._options = options
        #: the :class:`~torchfreeze.RotatingFreeze` (once the Trainer built its optimizer)
        self.rotation: Any = None
        self._model: nn.Module | None = None

    def state(self) -> dict[str, Any]:
        st = self.rotation.state_dict() if self.rotation is not None else None
        if st is not None:
            st = {k: v for k, v in st.items() if k not in ("stash", "stash_devices")}
        return {"args": {}, "attributes": {"tfz_rotation": st}}

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        _check_args(args)
        if model is None:
            raise TorchfreezeError(
                "RotatingFreezeCallback got no model at Trainer init. Pass model= to the "
                "Trainer (model_init is not supported)."
            )
        self._model = model
        trainer = _calling_trainer()
        if trainer is None:
            raise TorchfreezeError(
                "RotatingFreezeCallback could not find the Trainer that fired on_init_end. "
                "Pass it as transformers.Trainer(..., callbacks=[cb])."
            )
        _on_optimizer_built(trainer, self._build)
        setattr(trainer, _ROT_PATCHED, weakref.ref(self))

    def _build(self, trainer: Any, optimizer: Any) -> None:
        from ..rotate import RotatingFreeze

        if trainer.args.world_size > 1:
            raise TorchfreezeError(
                f"RotatingFreezeCallback with {trainer.args.world_size} processes: the Trainer "
                "keeps its DistributedDataParallel wrapper in a local variable of its training "
                "loop, so it cannot be re-wrapped at a switch. Train in one process, or use "
                "tfz.RotatingFreeze on a DDP model in your own loop."
            )
        assert self._model is not None
        self.rotation = RotatingFreeze(self._model, optimizer, **self._options)
        st = _saved_attribute(trainer, type(self).__name__, "tfz_rotation")
        if st:
            self.rotation.load_state_dict(st)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if self.rotation is None:
            raise TorchfreezeError(
                "RotatingFreezeCallback never saw the Trainer build its optimizer. Pass it as "
                "Trainer(..., callbacks=[cb]) and let the Trainer create the optimizer."
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rotation is not None:
            self.rotation.step()
