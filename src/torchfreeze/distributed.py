"""Freezing and unfreezing under DistributedDataParallel without desynchronising ranks.

DDP builds its gradient reducer once, for the parameters that require grad
*when the wrapper is constructed*. Flip ``requires_grad`` afterwards and the
newly trainable parameters get a gradient on every rank but are never
all-reduced: each rank steps with its own gradient and the replicas silently
drift apart. Freezing one afterwards fails at the next iteration instead
("Expected to have finished reduction in the prior iteration": the reducer
waits for a gradient that never comes). :func:`unfreeze` and :func:`freeze`
change ``requires_grad`` on ``ddp.module`` and build a new wrapper with the
same construction arguments.

Both are *collective*: every rank must call them, with the same selectors, at
the same point of the program. Before anything changes the ranks exchange what
they are about to do (one small ``all_gather_object``); if any rank's selectors
fail, or the ranks disagree, every rank raises and nothing is changed anywhere,
instead of one rank waiting forever in a broadcast.

Cost of one re-wrap: what any DDP construction costs, one broadcast from rank
0 of every parameter (frozen ones too) and, with ``broadcast_buffers``, every
buffer, plus building a new reducer; and one small ``all_gather_object``.
``bench/bench_rewrap.py`` measures it: on 2 CPU ranks (gloo) a MiniLM-sized
BERT (86 MiB) re-wraps in about 1.05-1.17x the time of a plain
``DistributedDataParallel(model)``, under one training step. The old
wrapper is disabled: its reducer hooks are removed and calling it raises
:class:`~torchfreeze.errors.DistributedFreezeError`.

Construction arguments recovered from the old wrapper (see
:func:`construction_kwargs`): ``device_ids``, ``output_device``, ``dim``,
``broadcast_buffers``, ``process_group`` (or ``device_mesh``),
``bucket_cap_mb`` (``None`` when the default was used, so the small first
bucket is kept), ``bucket_cap_mb_list``, ``find_unused_parameters``,
``gradient_as_bucket_view``, ``static_graph``, ``skip_all_reduce_unused_params``,
``batched_grad_copy``; plus the wrapper's train/eval flag and communication
hooks registered with ``register_comm_hook`` whose state is ``None`` or a
process group. Parameters to ignore are read again from the module, as DDP
does. ``init_sync`` is not stored by DDP: the new wrapper always syncs from
rank 0 (parameters are identical across ranks at that point anyway).
Settings that cannot be carried over safely (``mixed_precision``, delayed
all-reduce parameters, built-in or stateful communication hooks, a
buffer communication hook, hooks on the wrapper itself) raise
:class:`~torchfreeze.errors.DistributedFreezeError` before anything changes.

FSDP2 (``torch.distributed.fsdp.fully_shard``): freeze *before* sharding; the
frozen parameters become ``DTensor`` shards with ``requires_grad=False``, get no
gradient and are never reduce-scattered, and :func:`torchfreeze.verify` and
:func:`torchfreeze.check` compare them shard by shard. To freeze or unfreeze
*after* sharding, call :func:`freeze` / :func:`unfreeze` on the root
``fully_shard`` module on every rank between steps: FSDP2 reads each sharded
parameter's ``requires_grad`` at every all-gather, so no re-wrap is needed;
these functions add the cross-rank agreement check and recompute FSDP2's
per-unit gradient dtypes (under a ``MixedPrecisionPolicy``, unfreezing a unit
that was wholly frozen at its first forward with a plain ``requires_grad``
flip makes the next backward fail: FSDP2 fixed that unit's dtypes then).
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar, overload

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._compat import (
    ddp_bucket_caps,
    ddp_comm_hooks,
    ddp_delays_all_reduce,
    ddp_logging_data,
    module_hooks,
    refresh_fsdp_grad_dtypes,
    remove_ddp_autograd_hooks,
)
from ._freeze import (
    _group_name,
    _touched_bn,
    freeze_state,
)
from ._freeze import freeze as _freeze_module
from ._freeze import unfreeze as _unfreeze_module
from ._select import ModelIndex, Selector, resolve
from ._snapshot import Snapshot, capture, restore
from .errors import DistributedFreezeError, TorchfreezeError
from .norm import BNPolicy, check_bn_policy

__all__ = ["construction_kwargs", "freeze", "swap", "unfreeze"]

_MB = 1024 * 1024
#: a DistributedDataParallel wrapper or an FSDP2 (fully_shard) module
_Wrapped = TypeVar("_Wrapped", bound=nn.Module)
_REPLACED_ATTR = "_torchfreeze_replaced"


# ---------------------------------------------------------------------------
# recovering how the wrapper was built


def construction_kwargs(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The ``DistributedDataParallel`` arguments that rebuild ``ddp`` as it was built.

    Every value is read back from the wrapper's own attributes; only arguments
    this torch version's constructor accepts are returned.

    Raises:
        DistributedFreezeError: the wrapper uses a setting that a new wrapper
            cannot reproduce safely (named in the message).

    Example:
        >>> import socket, torch, torch.nn as nn, torch.distributed as dist
        >>> from torch.nn.parallel import DistributedDataParallel
        >>> import torchfreeze as tfz, torchfreeze.distributed as tfz_dist
        >>> with socket.socket() as sock:  # torchrun does this part; here 1 process
        ...     _ = sock.bind(("127.0.0.1", 0))
        ...     url = "tcp://127.0.0.1:%d" % sock.getsockname()[1]
        >>> dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
        >>> ddp = DistributedDataParallel(nn.Linear(2, 2), bucket_cap_mb=4, static_graph=True)
        >>> kwargs = tfz_dist.construction_kwargs(ddp)
        >>> kwargs["bucket_cap_mb"], kwargs["static_graph"], kwargs["broadcast_buffers"]
        (4.0, True, True)
        >>> dist.barrier()  # no rank tears gloo down while another still uses it
        >>> dist.destroy_process_group()
    """
    _require_ddp(ddp, "construction_kwargs")
    problems = []
    if getattr(ddp, "mixed_precision", None) is not None:
        problems.append("mixed_precision= (its hooks on the module belong to the old wrapper)")
    if ddp_delays_all_reduce(ddp):
        problems.append("delay_all_reduce_named_params= / param_to_hook_all_reduce=")
    if getattr(ddp, "buffer_hook", None) is not None:
        problems.append("a buffer communication hook (_register_buffer_comm_hook)")
    own_hooks = module_hooks(ddp)
    if own_hooks:
        problems.append(f"hooks registered on the wrapper itself ({', '.join(own_hooks)})")
    problems += _comm_hook_problems(ddp)
    if problems:
        raise DistributedFreezeError(
            "this DistributedDataParallel wrapper cannot be rebuilt with the same settings: "
            + "; ".join(problems)
            + ". Freeze/unfreeze before wrapping, or build the new wrapper yourself. "
            "Nothing was changed."
        )

    kwargs: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": bool(ddp.static_graph),
    }
    if getattr(ddp, "device_mesh", None) is not None:
        kwargs["device_mesh"] = ddp.device_mesh
    else:
        kwargs["process_group"] = ddp.process_group
    # bucket_bytes_cap_default is True exactly when bucket_cap_mb was left at None;
    # passing the number back would lose DDP's small first bucket.
    kwargs["bucket_cap_mb"] = None if ddp.bucket_bytes_cap_default else ddp.bucket_bytes_cap / _MB
    per_bucket = ddp_bucket_caps(ddp)
    if per_bucket:
        kwargs["bucket_cap_mb_list"] = [b / _MB for b in per_bucket]
    # broadcast_buffers=False also skips the initial buffer sync: rank-local buffers
    # (the reason to turn it off) must survive the re-wrap.
    kwargs["broadcast_buffers"] = bool(ddp.broadcast_buffers)
    for name in ("skip_all_reduce_unused_params", "batched_grad_copy"):
        if hasattr(ddp, name):
            kwargs[name] = getattr(ddp, name)
    accepted = _ddp_parameters()
    missing = [k for k in kwargs if k not in accepted]
    if missing:  # pragma: no cover - an attribute exists that the constructor lacks
        raise DistributedFreezeError(
            f"DistributedDataParallel in torch {torch.__version__} does not accept {missing} "
            "although the wrapper has them; please report this. Nothing was changed."
        )
    return kwargs


def _ddp_parameters() -> set[str]:
    import inspect

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


def _comm_hook_problems(ddp: DistributedDataParallel) -> list[str]:
    hooks = ddp_comm_hooks(ddp)
    problems = [
        f"communication hook {getattr(h, '__qualname__', h)!r} with state of type "
        f"{type(s).__name__} (its state may be tied to the old bucket layout)"
        for h, s in hooks
        if not (s is None or isinstance(s, dist.ProcessGroup))
    ]
    if not hooks and getattr(ddp, "logger", None) is not None:
        # built-in (C++) hooks are not listed in _comm_hooks; the logger knows them
        name = ddp_logging_data(ddp).get("comm_hook", "")
        if name and name != "builtin_allreduce":
            problems.append(f"built-in communication hook {name!r}")
    return problems


def _fsdp_module_class() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _kind(model: Any, fn: str) -> str:
    """``"ddp"`` or ``"fsdp"``; anything else is refused."""
    if isinstance(model, DistributedDataParallel):
        if getattr(model, _REPLACED_ATTR, False):
            raise DistributedFreezeError(
                "this DistributedDataParallel wrapper was already replaced by "
                "torchfreeze.distributed.freeze/unfreeze; use the wrapper that call returned."
            )
        return "ddp"
    if isinstance(model, _fsdp_module_class()):
        return "fsdp"
    raise DistributedFreezeError(
        f"torchfreeze.distributed.{fn}() takes a DistributedDataParallel wrapper or a "
        f"module sharded with fully_shard (FSDP2), got {type(model).__name__}. For a model "
        f"that is not distributed use tfz.{fn}(); for a torch.compile'd wrapper pass the "
        "DistributedDataParallel object itself."
    )


def _require_ddp(ddp: Any, fn: str) -> None:
    if _kind(ddp, fn) != "ddp":
        raise DistributedFreezeError(
            f"torchfreeze.distributed.{fn}() takes a DistributedDataParallel wrapper, got "
            f"{type(ddp).__name__}."
        )


def _fsdp_group(model: nn.Module) -> Any:
    """The process group whose ranks share ``model``'s shards (the world when the
    mesh has several dimensions: every rank must then call together)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh.ndim == 1:
            return p.device_mesh.get_group()
    return dist.group.WORLD


def _refresh_fsdp(model: nn.Module) -> None:
    """FSDP2 takes each unit's gradient dtypes from the parameters trainable at its
    lazy init (first forward); a unit wholly frozen then has none, and under a
    MixedPrecisionPolicy the next backward after unfreezing it fails (a bf16
    gradient assigned to an fp32 parameter). Recompute them from the current
    trainable set."""
    fsdp = _fsdp_module_class()
    for m in model.modules():
        if isinstance(m, fsdp):
            refresh_fsdp_grad_dtypes(m)


# ---------------------------------------------------------------------------
# collective validation


def _strip_prefix(selectors: Any, inner: nn.Module) -> Any:
    """Accept names as ``ddp.named_parameters()`` spells them (``module.0``) as well
    as the wrapped model's own (``0``), unless the model has a child named
    ``module`` (then names are the model's own)."""
    if any(name == "module" for name, _ in inner.named_children()):
        return selectors
    if isinstance(selectors, str):
        if selectors == "module":
            return inner
        if selectors.startswith("module."):
            return selectors[len("module."):]
        return selectors
    if isinstance(selectors, (list, tuple, set, frozenset)):
        return [_strip_prefix(s, inner) for s in selectors]
    return selectors


def _agree(group: Any, action: str, error: Exception | None, plan: Any) -> None:
    """Every rank learns whether every rank can go ahead with the same plan."""
    world = dist.get_world_size(group)
    mine = (None if error is None else f"{type(error).__name__}: {error}", plan)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    if error is not None:
        raise error
    failed = [(r, msg) for r, (msg, _) in enumerate(everyone) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise DistributedFreezeError(
            f"torchfreeze.distributed.{action}() failed on rank {rank}: {msg} "
            "Every rank stopped; nothing was changed on any rank."
        )
    plans = [p for _, p in everyone]
    if any(p != plans[0] for p in plans):
        diff = next(r for r, p in enumerate(plans) if p != plans[0])
        raise DistributedFreezeError(
            f"torchfreeze.distributed.{action}() was called differently on rank 0 and rank "
            f"{diff} (selected parameters or current freeze state differ: rank 0 "
            f"{_short(plans[0])}; rank {diff} {_short(plans[diff])}). Every rank must call it "
            "with the same selectors on the same model state. Nothing was changed."
        )


def _short(plan: Any) -> str:
    if len(plan) == 4:  # swap: (freezes, unfreezes, frozen before, bn)
        return (f"freezes {list(plan[0])[:4]}, unfreezes {list(plan[1])[:4]}, "
                f"has frozen {list(plan[2])[:4]}")
    selected, frozen_before = plan[0], plan[1]
    return f"selects {list(selected)[:4]}, has frozen {list(frozen_before)[:4]}"


# ---------------------------------------------------------------------------
# the re-wrap


def _rewrap(
    ddp: DistributedDataParallel, kwargs: dict[str, Any], snapshot: Snapshot
) -> DistributedDataParallel:
    module = ddp.module
    comm_hooks = ddp_comm_hooks(ddp)
    ctor_kwargs = dict(kwargs)
    sync = ctor_kwargs.pop("broadcast_buffers")
    if "forward_sync_buffers" in _ddp_parameters() and sync:
        ctor_kwargs["forward_sync_buffers"] = True
    else:
        # forward_sync_buffers=False would still sync buffers at init; only the
        # deprecated broadcast_buffers=False keeps rank-local buffers untouched
        ctor_kwargs["broadcast_buffers"] = sync
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated")
            warnings.filterwarnings("ignore", message=".*find_unused_parameters=true.*")
            new = DistributedDataParallel(module, **ctor_kwargs)
    except BaseException:
        restore(snapshot)
        raise
    for hook, state in comm_hooks:
        new.register_comm_hook(state, hook)
    new.training = ddp.training
    new.require_backward_grad_sync = ddp.require_backward_grad_sync
    _retire(ddp)
    return new


def _retire(old: DistributedDataParallel) -> None:
    """The old wrapper's reducer would otherwise keep autograd hooks on the shared
    parameters, and a forward through it would arm a reducer nobody finishes."""
    remove_ddp_autograd_hooks(old)
    object.__setattr__(old, _REPLACED_ATTR, True)

    def _refuse(*_: Any, **__: Any) -> None:
        raise DistributedFreezeError(
            "this DistributedDataParallel wrapper was replaced by "
            "torchfreeze.distributed.freeze/unfreeze (its reducer no longer syncs "
            "gradients); use the wrapper that call returned: "
            "ddp = torchfreeze.distributed.unfreeze(ddp, ...)."
        )

    old.register_forward_pre_hook(_refuse)


def _prepare(model: Any, fn: str, selectors: tuple[Any, ...], exclude: Any) -> tuple[Any, ...]:
    kind = _kind(model, fn)
    module = model.module if kind == "ddp" else model
    if kind == "ddp":
        selectors = tuple(_strip_prefix(list(selectors), module)) if selectors else ()
        if exclude is not None:
            exclude = _strip_prefix(exclude, module)
        kwargs = construction_kwargs(model)
        group = model.process_group
    else:
        kwargs = {}
        group = _fsdp_group(model)
    return kind, module, selectors, exclude, kwargs, group


@overload
def unfreeze(
    model: DistributedDataParallel,
    *selectors: Selector,
    exclude: Selector | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    lr_mult: float | None = None,
    scheduler: Any = None,
    group_name: str | None = None,
) -> DistributedDataParallel: ...


@overload
def unfreeze(
    model: _Wrapped,
    *selectors: Selector,
    exclude: Selector | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    lr_mult: float | None = None,
    scheduler: Any = None,
    group_name: str | None = None,
) -> _Wrapped: ...


def unfreeze(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    lr_mult: float | None = None,
    scheduler: Any = None,
    group_name: str | None = None,
) -> nn.Module:
    """Unfreeze parameters of a DDP (or FSDP2) model without desynchronising ranks.

    Collective: every rank must call it, with the same arguments, between
    training steps. For a ``DistributedDataParallel`` wrapper the parameters of
    ``model.module`` are unfrozen and a new wrapper is built with the same
    construction arguments (one broadcast from rank 0); use the returned one.
    Selectors are resolved on ``model.module``; the ``module.`` prefix of
    ``model.named_parameters()`` is accepted too. For a module sharded with
    ``fully_shard`` (FSDP2) the sharded ``DTensor`` parameters are unfrozen in
    place (FSDP2 reads ``requires_grad`` at every all-gather) and the same
    module is returned.

    The optimizer part is exactly :func:`torchfreeze.unfreeze`'s: the newly
    trainable parameters not yet in ``optimizer`` become one new param group
    (``lr``, or ``lr_mult`` times the first group's base LR), registered with
    ``scheduler``. It is validated on every rank before anything changes.

    Args:
        model: the ``DistributedDataParallel`` wrapper (or FSDP2 root module).
        *selectors: what to unfreeze (no selector: everything).
        exclude: selectors to leave frozen.
        optimizer: add the newly trainable parameters to it as a new group.
        lr: learning rate of the new group.
        lr_mult: or: that multiple of the first group's learning rate.
        scheduler: an LR scheduler to register the new group with.
        group_name: name of the new group (default ``"unfreeze:<selectors>"``).

    Returns:
        The new DDP wrapper (the old one is disabled: calling it raises), or the
        FSDP2 module itself.

    Raises:
        SelectionError: a selector matched nothing (raised on that rank, the
            others raise DistributedFreezeError; nothing changed anywhere).
        DistributedFreezeError: another rank failed or was called differently,
            or the wrapper's settings cannot be rebuilt (nothing changed).

    Example:
        >>> import socket, torch, torch.nn as nn, torch.distributed as dist
        >>> from torch.nn.parallel import DistributedDataParallel
        >>> import torchfreeze as tfz, torchfreeze.distributed as tfz_dist
        >>> with socket.socket() as sock:  # torchrun does this part; here 1 process
        ...     _ = sock.bind(("127.0.0.1", 0))
        ...     url = "tcp://127.0.0.1:%d" % sock.getsockname()[1]
        >>> dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = tfz.freeze(net, "0")                 # before wrapping
        >>> ddp = DistributedDataParallel(net)
        >>> opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
        >>> ddp = tfz_dist.unfreeze(ddp, "module.0", optimizer=opt, lr_mult=0.1)  # every rank
        >>> net[0].weight.requires_grad, [g["lr"] for g in opt.param_groups]
        (True, [0.1, 0.010000000000000002])
        >>> dist.barrier()  # no rank tears gloo down while another still uses it
        >>> dist.destroy_process_group()
    """
    _, module, selectors, exclude, kwargs, group = _prepare(model, "unfreeze", selectors,
                                                              exclude)
    error: Exception | None = None
    plan: Any = None
    commit = None
    try:
        if optimizer is None and (lr is not None or lr_mult is not None or scheduler is not None):
            raise TorchfreezeError(
                "lr, lr_mult and scheduler only apply to the param group unfreeze adds to an "
                "optimizer; pass optimizer= too (nothing was changed)."
            )
        idx = ModelIndex(module)
        sel = resolve(module, selectors, exclude=exclude, index=idx, trainable=True)
        if optimizer is not None:
            from ._optim import prepare_new_group

            newly = [p for p in sel.params if p.is_floating_point() or p.is_complex()]
            commit = prepare_new_group(
                optimizer,
                newly,
                [idx.param_name[id(p)] for p in newly],
                lr=lr,
                lr_mult=lr_mult,
                scheduler=scheduler,
                name=group_name or _group_name(selectors),
            )
        plan = (sel.param_names, freeze_state(module)["frozen"])
    except Exception as exc:  # any local failure must reach the other ranks, or they hang
        error = exc
    _agree(group, "unfreeze", error, plan)
    if not plan[0]:  # an explicit empty selection: nothing to do, no re-wrap
        return model

    snapshot = capture(module)
    _unfreeze_module(module, *selectors, exclude=exclude)
    if isinstance(model, DistributedDataParallel):  # _prepare: kind == "ddp"
        model = _rewrap(model, kwargs, snapshot)
    else:
        _refresh_fsdp(module)
    if commit is not None:
        commit()
    return model


@overload
def freeze(
    model: DistributedDataParallel,
    *selectors: Selector,
    bn: BNPolicy = "eval",
    exclude: Selector | None = None,
) -> DistributedDataParallel: ...


@overload
def freeze(
    model: _Wrapped,
    *selectors: Selector,
    bn: BNPolicy = "eval",
    exclude: Selector | None = None,
) -> _Wrapped: ...


def freeze(
    model: nn.Module,
    *selectors: Selector,
    bn: BNPolicy = "eval",
    exclude: Selector | None = None,
) -> nn.Module:
    """Freeze parameters of a DDP (or FSDP2) model without desynchronising ranks.

    Collective, like :func:`unfreeze`; the freezing itself is
    :func:`torchfreeze.freeze` on the model (``.grad`` cleared, BN policy
    ``bn``). Frozen parameters may stay in the optimizer: with no gradient,
    torch optimizers skip them.

    Returns:
        The new DDP wrapper (the old one is disabled: calling it raises), or the
        FSDP2 module itself.

    Raises:
        SelectionError: a selector matched nothing (nothing changed on any rank).
        DistributedFreezeError: a DDP model would have nothing left to train
            (DDP cannot wrap that: use ``model.module`` directly), another rank
            failed or was called differently, or the wrapper cannot be rebuilt.

    Example:
        >>> import socket, torch, torch.nn as nn, torch.distributed as dist
        >>> from torch.nn.parallel import DistributedDataParallel
        >>> import torchfreeze as tfz, torchfreeze.distributed as tfz_dist
        >>> with socket.socket() as sock:  # torchrun does this part; here 1 process
        ...     _ = sock.bind(("127.0.0.1", 0))
        ...     url = "tcp://127.0.0.1:%d" % sock.getsockname()[1]
        >>> dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> ddp = tfz_dist.freeze(DistributedDataParallel(net), "0")  # every rank
        >>> [p.requires_grad for p in ddp.parameters()]
        [False, False, True, True]
        >>> dist.barrier()  # no rank tears gloo down while another still uses it
        >>> dist.destroy_process_group()
    """
    kind, module, selectors, exclude, kwargs, group = _prepare(model, "freeze", selectors,
                                                              exclude)
    error: Exception | None = None
    plan: Any = None
    try:
        check_bn_policy(bn)
        idx = ModelIndex(module)
        sel = resolve(module, selectors, exclude=exclude, index=idx, trainable=True)
        kept: set[int] = set()
        if bn == "train":
            kept = {id(p) for m in _touched_bn(sel, idx) for p in m.parameters(False)}
        going = {id(p) for p in sel.params} - kept
        if kind == "ddp" and not any(
            p.requires_grad and id(p) not in going for p in idx.params.values()
        ):
            raise DistributedFreezeError(
                f"freezing {sel} would leave no trainable parameter, and "
                "DistributedDataParallel cannot wrap a model with nothing to train. Freeze "
                "less, or stop using DDP for this phase (work on ddp_model.module). "
                "Nothing was changed."
            )
        plan = (sel.param_names, freeze_state(module)["frozen"], bn)
    except Exception as exc:  # any local failure must reach the other ranks, or they hang
        error = exc
    _agree(group, "freeze", error, plan)
    if not plan[0]:  # an explicit empty selection: nothing to do, no re-wrap
        return model

    snapshot = capture(module)
    _freeze_module(module, *selectors, bn=bn, exclude=exclude)
    if isinstance(model, DistributedDataParallel):  # _prepare: kind == "ddp"
        return _rewrap(model, kwargs, snapshot)
    return model


def swap(
    model: _Wrapped,
    *,
    freeze: Selector,
    unfreeze: Selector,
    bn: BNPolicy = "eval",
) -> _Wrapped:
    """Freeze ``freeze`` and unfreeze ``unfreeze`` in one collective step, one re-wrap.

    What :class:`~torchfreeze.RotatingFreeze` does at every switch under DDP:
    :func:`unfreeze` followed by :func:`freeze` would build two wrappers (and
    fail when the outgoing block is all that trains); this builds one. Selectors
    are resolved on the wrapped model; ``unfreeze`` wins where both select a
    parameter. Collective and checked on every rank first, like :func:`freeze`.

    Returns:
        The new DDP wrapper (the old one is disabled), or the FSDP2 module itself.

    Raises:
        SelectionError: a selector matched nothing (nothing changed on any rank).
        DistributedFreezeError: nothing would be left to train, another rank
            failed or was called differently, or the wrapper cannot be rebuilt.
    """
    kind, module, _, _, kwargs, group = _prepare(model, "swap", (), None)
    error: Exception | None = None
    plan: Any = None
    try:
        check_bn_policy(bn)
        if kind == "ddp":
            freeze, unfreeze = _strip_prefix(freeze, module), _strip_prefix(unfreeze, module)
        idx = ModelIndex(module)
        out = resolve(module, [freeze], index=idx, trainable=True)
        inc = resolve(module, [unfreeze], index=idx, trainable=True)
        incoming = {id(p) for p in inc.params}
        going = {id(p) for p in out.params} - incoming
        if kind == "ddp" and not any(
            (p.requires_grad or id(p) in incoming) and id(p) not in going
            for p in idx.params.values()
        ):
            raise DistributedFreezeError(
                "the swap would leave no trainable parameter, and DistributedDataParallel "
                "cannot wrap a model with nothing to train. Nothing was changed."
            )
        plan = (out.param_names, inc.param_names, freeze_state(module)["frozen"], bn)
    except Exception as exc:  # any local failure must reach the other ranks, or they hang
        error = exc
    _agree(group, "swap", error, plan)
    snapshot = capture(module)
    keep = [p for p in out.params if id(p) not in incoming]
    if keep:
        _freeze_module(module, keep, bn=bn)
    if inc.params:
        _unfreeze_module(module, list(inc.params))
    if isinstance(model, DistributedDataParallel):  # _prepare: kind == "ddp"
        return _rewrap(model, kwargs, snapshot)  # type: ignore[return-value]
    _refresh_fsdp(module)
    return model
