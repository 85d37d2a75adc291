"""freeze / unfreeze / frozen / freeze_to, and the JSON-able freeze state.

"Frozen" here means bit-for-bit unchanged: ``requires_grad=False`` *and* no
``.grad`` left behind (a zero grad still feeds momentum and weight decay), and
BatchNorm layers whose running statistics do not move (see :mod:`.norm`).
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._select import ModelIndex, Selection, Selector, require_module, resolve
from ._snapshot import capture, restore
from ._state import check_format, register
from .errors import DistributedFreezeError, FreezeStateError, TiedWeightWarning, TorchfreezeError
from .norm import (
    BN_POLICIES,
    BNPolicy,
    bn_policy,
    check_bn_policy,
    is_batchnorm,
    set_bn_policy,
)

__all__ = [
    "freeze",
    "freeze_state",
    "freeze_to",
    "frozen",
    "load_freeze_state",
    "unfreeze",
]

FREEZE_STATE_FORMAT = register("torchfreeze.freeze_state", "tfz.freeze_state()")
FREEZE_STATE_VERSION = 1


def _refuse_wrapped(model: nn.Module, action: str) -> None:
    """DDP registers its gradient reducer for the parameters trainable when it was
    built; changing ``requires_grad`` afterwards desynchronises ranks silently."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise DistributedFreezeError(
            f"tfz.{action}() was called on a DistributedDataParallel wrapper. DDP only "
            "all-reduces the parameters that were trainable when it was built, so changing "
            f"requires_grad now makes ranks silently diverge. Use "
            f"torchfreeze.distributed.{action}(ddp_model, ...) (it re-wraps), or "
            f"{action} before wrapping. Nothing was changed."
        )


def warn_tied(sel: Selection, action: str, stacklevel: int = 3) -> None:
    """Say when a tied parameter changes under a name the selectors did not cover."""
    done = {"freeze": "frozen", "unfreeze": "unfrozen"}.get(action, f"{action}d")
    for inside, outside in sel.tied:
        warnings.warn(
            f"{action} {inside!r} also {action}s {outside!r}: they are one tied tensor "
            f"(weight tying), so both names are {done}. Select both names to make this "
            "explicit, or untie the weights first if you meant only one.",
            TiedWeightWarning,
            stacklevel=stacklevel,
        )


def _touched_bn(sel: Selection, idx: ModelIndex) -> list[nn.Module]:
    """BN layers wholly selected, or whose own parameters the selection touches."""
    picked = {id(p) for p in sel.params}
    whole = {id(m) for m in sel.modules}
    return [
        m
        for m in idx.modules.values()
        if is_batchnorm(m)
        and (id(m) in whole or any(id(p) in picked for p in m.parameters(recurse=False)))
    ]


def freeze(
    model: nn.Module,
    *selectors: Selector,
    bn: BNPolicy = "eval",
    exclude: Selector | None = None,
) -> Selection:
    """Freeze the selected parameters (no selector: the whole model).

    Sets ``requires_grad=False``, clears ``.grad`` (``None``, not zeros: a zero
    grad still drives momentum and weight decay), and applies the BatchNorm
    policy ``bn`` to every BN layer whose parameters are all frozen.

    Args:
        model: the model (not a DDP wrapper; see :mod:`torchfreeze.distributed`).
        *selectors: what to freeze, in the grammar of :func:`torchfreeze.select`;
            none at all: the whole model; an empty list: nothing.
        bn: ``"eval"`` (BN stays in eval through ``model.train()``; its statistics
            never move), ``"train"`` (BN layers in the selection stay trainable)
            or ``"stats"`` (affine frozen, statistics keep updating).
        exclude: selectors to leave alone.

    Returns:
        The :class:`~torchfreeze.Selection` that was frozen.

    Raises:
        SelectionError: a selector matched nothing, or only buffers (nothing is
            changed).
        DistributedFreezeError: ``model`` is a DDP wrapper (nothing is changed).

    Warns:
        TiedWeightWarning: a selected parameter is tied to a name the selectors
            did not cover (``lm_head`` and the input embedding): both are frozen.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        >>> _ = tfz.freeze(net, "0", "1")
        >>> net.train().training, net[1].training   # frozen BN stays in eval
        (True, False)
    """
    require_module(model, "freeze")
    check_bn_policy(bn)
    _refuse_wrapped(model, "freeze")
    idx = ModelIndex(model)
    sel = resolve(model, selectors, exclude=exclude, index=idx, trainable=True)
    warn_tied(sel, "freeze")
    bns = _touched_bn(sel, idx)
    keep_trainable: set[int] = set()
    if bn == "train":
        keep_trainable = {id(p) for m in bns for p in m.parameters(recurse=False)}
    for p in sel.params:
        if id(p) in keep_trainable:
            continue
        p.requires_grad_(False)
        p.grad = None
    for m in bns:
        own = list(m.parameters(recurse=False))
        if bn == "train":
            set_bn_policy(m, "train", training=model.training)
        elif all(not p.requires_grad for p in own):
            set_bn_policy(m, bn, training=model.training)
    return sel


def unfreeze(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    lr_mult: float | None = None,
    scheduler: Any = None,
    group_name: str | None = None,
) -> Selection:
    """Make the selected parameters trainable again (no selector: the whole model).

    BN layers in the selection lose their frozen policy and follow the model's
    train/eval mode again. Parameters that are not floating point cannot
    require grad and are left as they are.

    With ``optimizer``, the newly trainable parameters that are not yet in it are
    added as one new param group (named ``group_name``, default
    ``"unfreeze:<selectors>"``, the scheme of every group torchfreeze adds) with
    learning rate ``lr``, or ``lr_mult`` times the first group's; with
    ``scheduler`` that group is registered with the LR scheduler too. Existing
    optimizer state is kept. Everything is validated before anything changes.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        SelectionError: a selector matches nothing (nothing is changed).
        TorchfreezeError: ``lr``/``lr_mult``/``scheduler`` without ``optimizer``, or
            both ``lr`` and ``lr_mult``.
        SchedulerError: ``scheduler`` cannot be extended by the new group (nothing
            is changed).

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = tfz.freeze(net, "0")
        >>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        >>> _ = tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.1)
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.010000000000000002]
    """
    require_module(model, "unfreeze")
    _refuse_wrapped(model, "unfreeze")
    if optimizer is None and (lr is not None or lr_mult is not None or scheduler is not None):
        raise TorchfreezeError(
            "lr, lr_mult and scheduler only apply to the param group unfreeze adds to an "
            "optimizer; pass optimizer= too (nothing was changed)."
        )
    idx = ModelIndex(model)
    sel = resolve(model, selectors, exclude=exclude, index=idx, trainable=True)
    warn_tied(sel, "unfreeze")
    commit = None
    if optimizer is not None:
        from ._optim import prepare_new_group

        newly = [p for p in sel.params if p.is_floating_point() or p.is_complex()]
        names = [idx.param_name[id(p)] for p in newly]
        commit = prepare_new_group(
            optimizer,
            newly,
            names,
            lr=lr,
            lr_mult=lr_mult,
            scheduler=scheduler,
            name=group_name or _group_name(selectors),
        )
    bns = _touched_bn(sel, idx)
    for p in sel.params:
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    for m in bns:
        if all(p.requires_grad for p in m.parameters(recurse=False)):
            set_bn_policy(m, None, training=model.training)
    if commit is not None:
        commit()
    return sel


def _group_name(selectors: tuple[Any, ...]) -> str:
    from ._optim import added_group_name

    return added_group_name(selectors=selectors)


@contextlib.contextmanager
def frozen(
    model: nn.Module,
    *selectors: Selector,
    bn: BNPolicy = "eval",
    exclude: Selector | None = None,
) -> Iterator[Selection]:
    """Freeze temporarily; on exit restore the exact prior state.

    ``requires_grad`` of every parameter, every module's train/eval mode and
    every BN policy are put back as they were, also when the model was already
    partly frozen and also when the block raises. Gradients cleared on entry
    stay cleared (a stale gradient is never brought back).

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        SelectionError: a selector matches nothing (nothing is changed).
        TorchfreezeError: ``bn`` is not one of ``"eval"``, ``"train"``, ``"stats"``.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> with tfz.frozen(net, "0"):
        ...     net[0].weight.requires_grad
        False
        >>> net[0].weight.requires_grad
        True
    """
    require_module(model, "frozen")
    check_bn_policy(bn)
    _refuse_wrapped(model, "freeze")
    snapshot = capture(model)
    sel = freeze(model, *selectors, bn=bn, exclude=exclude)
    try:
        yield sel
    finally:
        restore(snapshot)


def freeze_to(
    model: nn.Module,
    n: int,
    *,
    bn: BNPolicy = "eval",
    example_inputs: Any = None,
) -> Selection:
    """Freeze ``layers(model)[:n]`` and unfreeze the rest (fastai semantics).

    ``n`` may be negative: ``freeze_to(model, -1)`` trains only the last layer
    group (the head); ``freeze_to(model, 0)`` trains everything.

    Returns:
        The frozen selection (empty for ``n == 0``).

    Raises:
        TorchfreezeError: ``|n|`` is larger than the number of layer groups.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
        >>> tfz.freeze_to(net, -1).param_names
        ('0.weight', '0.bias', '1.weight', '1.bias')
    """
    from ._layers import layers

    require_module(model, "freeze_to")
    check_bn_policy(bn)
    _refuse_wrapped(model, "freeze")
    groups = layers(model, example_inputs=example_inputs)
    if abs(n) > len(groups):
        raise TorchfreezeError(
            f"freeze_to(model, {n}): the model has only {len(groups)} layer groups "
            f"({', '.join(g.name for g in groups)}). Use -{len(groups)} <= n <= {len(groups)}."
        )
    params = ModelIndex(model).params
    # the tensors themselves: a tied parameter is in one group by design (layers()),
    # so naming it under one of its names here is no surprise worth a warning
    to_freeze = [params[name] for g in groups[:n] for name in g.param_names]
    to_train = [params[name] for g in groups[n:] for name in g.param_names]
    if to_train:
        unfreeze(model, to_train)
    if to_freeze:
        return freeze(model, to_freeze, bn=bn)
    return Selection(param_names=(), module_names=())


# ---------------------------------------------------------------------------
# freeze state (JSON-able), for resume


def freeze_state(model: nn.Module) -> dict[str, Any]:
    """The model's freeze state as plain JSON-able data.

    Holds the names of frozen parameters and the BN policy of each layer that
    has one. Store it next to the model's state_dict (which does not record
    ``requires_grad``) and restore it with :func:`load_freeze_state`.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import json, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = tfz.freeze(net, "1")
        >>> json.dumps(tfz.freeze_state(net)["frozen"])
        '["1.weight", "1.bias"]'
    """
    require_module(model, "freeze_state")
    idx = ModelIndex(model)
    return {
        "format": FREEZE_STATE_FORMAT,
        "version": FREEZE_STATE_VERSION,
        "frozen": [name for name, p in idx.params.items() if not p.requires_grad],
        "bn": {
            name: bn_policy(m) for name, m in idx.modules.items() if bn_policy(m) is not None
        },
    }


def load_freeze_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore a :func:`freeze_state`: every parameter's ``requires_grad`` and
    every BN policy (parameters not listed as frozen become trainable).

    Raises:
        FreezeStateError: the state is not a freeze state, or names parameters or
            modules this model does not have (nothing is changed).
    """
    require_module(model, "load_freeze_state")
    check_format(state, FREEZE_STATE_FORMAT,
                 hint="Pass the value tfz.freeze_state(model) returned.")
    if state.get("version", 0) > FREEZE_STATE_VERSION:
        raise FreezeStateError(
            f"freeze state version {state.get('version')} is newer than this torchfreeze "
            f"understands ({FREEZE_STATE_VERSION}); upgrade torchfreeze."
        )
    _refuse_wrapped(model, "freeze")
    idx = ModelIndex(model)
    param_aliases = {n: p for n, p in idx.param_aliases}
    module_aliases = {n: m for n, m in idx.module_aliases}
    frozen_names = list(state.get("frozen", []))
    policies = dict(state.get("bn", {}))
    unknown = [n for n in frozen_names if n not in param_aliases]
    unknown += [n for n in policies if n not in module_aliases]
    bad = [f"{n}={v!r}" for n, v in policies.items() if v not in BN_POLICIES]
    if unknown or bad:
        names = list(param_aliases) + list(module_aliases)
        close = difflib.get_close_matches(unknown[0], names, n=3) if unknown else []
        raise FreezeStateError(
            f"the freeze state does not fit {idx.describe()}: "
            + (f"unknown names {unknown[:5]}" if unknown else "")
            + (f" invalid BN policies {bad[:5]}" if bad else "")
            + (f"; closest real names: {close}" if close else "")
            + ". Load it into the same architecture it was saved from (for a DDP wrapper, "
            "into ddp.module). Nothing was changed."
        )
    frozen_ids = {id(param_aliases[n]) for n in frozen_names}
    for p in idx.params.values():
        if id(p) in frozen_ids:
            p.requires_grad_(False)
            p.grad = None
        elif p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    wanted = {id(module_aliases[n]): v for n, v in policies.items()}
    for m in idx.modules.values():
        if id(m) in wanted:
            set_bn_policy(m, wanted[id(m)], training=model.training)
        elif bn_policy(m) is not None:
            set_bn_policy(m, None, training=model.training)
