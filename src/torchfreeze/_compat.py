"""Every private PyTorch API torchfreeze relies on, in one place.

torch promises nothing about names that start with an underscore. Each one we
need is reached through this module only and listed in :data:`PRIVATE_APIS`
(what it is, what we use it for). ``tests/test_compat.py`` checks every entry
against the installed torch with real objects, so a torch upgrade that drops or
renames one fails there, in one test, naming it; at run time the accessors below
raise :class:`~torchfreeze.errors.UnsupportedTorchError`, naming the torch
versions this release supports, instead of silently doing the wrong thing.

Supported torch: :data:`MIN_TORCH` and newer minor releases as far as these
APIs still exist; tested: :data:`TESTED_TORCH` (CI pins it, see the README's
"Supported versions").

Example:
    >>> from torchfreeze import _compat
    >>> _compat.missing_private_apis()
    []
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from ._version import __version__
from .errors import UnsupportedTorchError

__all__ = [
    "LAST_LR_ATTR",
    "MIN_TORCH",
    "PRIVATE_APIS",
    "TESTED_TORCH",
    "BatchNormBase",
    "InstanceNormBase",
    "NormBase",
    "TorchDispatchMode",
    "check_torch_version",
    "child_modules",
    "child_schedulers",
    "ddp_bucket_caps",
    "ddp_comm_hooks",
    "ddp_delays_all_reduce",
    "ddp_logging_data",
    "disabled_torch_function",
    "foreach_norm",
    "last_lrs",
    "make_wrapper_subclass",
    "missing_private_apis",
    "module_hooks",
    "nested_schedulers",
    "own_buffers",
    "own_parameters",
    "own_tensor_dicts",
    "pytree",
    "refresh_fsdp_grad_dtypes",
    "remove_ddp_autograd_hooks",
    "storage_key",
    "supported_torch",
    "tensor_version",
    "unsupported",
    "version_and_grad",
    "wrapped_child",
]

_T = TypeVar("_T", bound=torch.Tensor)

MIN_TORCH = (2, 13)
"""The oldest torch this release declares (``torch>=2.13`` in pyproject)."""
TESTED_TORCH = "2.13.0"
"""The torch CI runs (``.ci/constraints.txt``)."""

PRIVATE_APIS: dict[str, str] = {
    "Tensor._version":
        "in-place write counter of a tensor: FeatureCache drops or refuses entries when a "
        "watched tensor was written (cache/_guards.py Watch)",
    "torch.utils._python_dispatch.TorchDispatchMode":
        "sees the aten ops that run, so FeatureCache and tfz.check detect random ops by "
        "their nondeterministic_seeded tag (_random_ops.py RandomOps)",
    "torch.nn.modules.batchnorm._BatchNorm":
        "base class of BatchNorm1d/2d/3d, SyncBatchNorm and LazyBatchNorm: BN policies (norm.py)",
    "torch.nn.modules.batchnorm._NormBase":
        "base class of batch and instance norms: no weight decay for norm layers (groups.py)",
    "torch.nn.modules.instancenorm._InstanceNorm":
        "InstanceNorm with running statistics is pinned like BatchNorm (norm.py)",
    "DistributedDataParallel._get_ddp_logging_data()":
        "parameter count/bytes the reducer was built for, built-in comm hook name "
        "(_check.py wrapped-before-freeze, distributed.py re-wrap refusals)",
    "DistributedDataParallel._comm_hooks":
        "Python comm hooks to carry over to the re-built wrapper (distributed.py)",
    "DistributedDataParallel._delay_all_reduce_params / _delay_all_reduce_all_params":
        "delayed all-reduce cannot be re-built; its parameters are not in the reducer",
    "DistributedDataParallel._bucket_config.per_bucket_bytes_caps":
        "bucket_cap_mb_list to pass to the re-built wrapper (distributed.py)",
    "DistributedDataParallel._remove_autograd_hooks() / _accum_grad_hooks":
        "a replaced wrapper's reducer hooks come off the parameters it shares with the "
        "re-built one (distributed.py)",
    "OptimizedModule._orig_mod / FSDP1 _fsdp_wrapped_module / "
    "CheckpointWrapper._checkpoint_wrapped_module":
        "the child a torch wrapper holds the model under, looked through by every "
        "selector (_select.py)",
    "FSDPModule._get_fsdp_state()._fsdp_param_group._init_mp_dtypes()":
        "FSDP2 reads gradient dtypes at lazy init only; unfreezing a unit under a "
        "MixedPrecisionPolicy after its first forward must recompute them (distributed.py)",
    "SequentialLR._schedulers / ChainedScheduler._schedulers":
        "the child schedulers that must learn about a new param group (_optim.py), and "
        "whose optimizers tfz.check compares (_check.py)",
    "torch._foreach_norm":
        "one fused call for every gradient's norm, AutoFreeze's per-step statistics "
        "(autofreeze.py); falls back to one vector_norm per tensor",
    "torch.utils._pytree":
        "flattening a prefix's nested inputs and outputs (tree_flatten, tree_unflatten, "
        "tree_map_only, tree_leaves) to store and replay them (cache/)",
    "torch.Tensor._make_wrapper_subclass / torch._C._disabled_torch_function_impl":
        "the placeholder tensor that stands in for a skipped prefix's output (cache/_hook.py)",
    "UntypedStorage._cdata":
        "the identity of a tensor's storage, also on the meta device where every data_ptr "
        "is 0: tfz.plan counts each saved activation and weight storage once (_plan.py)",
    "LRScheduler._last_lr":
        "per-group last learning rates, extended with a new group (_optim.py)",
    "nn.Module._load_from_state_dict":
        "overridden by FrozenBatchNorm to accept BN checkpoints without "
        "num_batches_tracked (norm.py)",
    "nn.Module._parameters / _buffers / _non_persistent_buffers_set / _modules":
        "a module's own tensors and children by their registered names, including tied "
        "duplicates and non-persistent buffers (_select.py, groups.py, load.py, norm.py)",
    "nn.Module._forward_pre_hooks / _forward_hooks / ... (the hook dicts)":
        "hooks on a DDP wrapper itself, which a re-built wrapper would lose (distributed.py)",
}
"""Every private torch API torchfreeze uses -> why."""


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the installed torch)."""
    found = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    if found is None:  # pragma: no cover - torch always has a numeric version
        return (0, 0)
    return int(found.group(1)), int(found.group(2))


def supported_torch() -> str:
    """The supported torch versions, as a sentence fragment for error messages."""
    return f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]} (tested with {TESTED_TORCH})"


def unsupported(api: str, purpose: str) -> UnsupportedTorchError:
    """The error for a private torch API that the installed torch lacks."""
    newer = torch_version() > torch_version(TESTED_TORCH)
    hint = (
        f"torch {torch.__version__} is newer than any torch this release was tested with"
        if newer else f"torch {torch.__version__} is not supported"
    )
    return UnsupportedTorchError(
        f"torchfreeze {__version__} needs torch's private {api} ({purpose}), which the "
        f"installed torch {torch.__version__} does not have: {hint}. Supported: "
        f"{supported_torch()}. Install torch=={TESTED_TORCH}, or a torchfreeze release "
        "that supports your torch."
    )


def check_torch_version() -> None:
    """Raise :class:`~torchfreeze.errors.UnsupportedTorchError` below :data:`MIN_TORCH`."""
    if torch_version() < MIN_TORCH:
        raise UnsupportedTorchError(
            f"torchfreeze {__version__} supports {supported_torch()}, found torch "
            f"{torch.__version__}. Upgrade torch (pip install 'torch>={MIN_TORCH[0]}."
            f"{MIN_TORCH[1]}')."
        )


check_torch_version()

# ---------------------------------------------------------------------------
# norm layer base classes

try:
    from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
    from torch.nn.modules.batchnorm import _NormBase as NormBase
    from torch.nn.modules.instancenorm import _InstanceNorm as InstanceNormBase
except ImportError as exc:  # pragma: no cover - only on an unsupported torch
    raise unsupported(
        "norm base classes (_BatchNorm, _NormBase, _InstanceNorm)",
        "recognising every BatchNorm/InstanceNorm variant",
    ) from exc


# ---------------------------------------------------------------------------
# pytrees and tensor subclasses (FeatureCache)

try:
    from torch.utils import _pytree as pytree
except ImportError as exc:  # pragma: no cover - only on an unsupported torch
    raise unsupported("torch.utils._pytree", "storing nested prefix outputs") from exc

disabled_torch_function: Any = getattr(torch._C, "_disabled_torch_function_impl", None)
"""Set as ``__torch_function__`` of a tensor subclass that only implements dispatch."""


def make_wrapper_subclass(cls: type[_T], shape: tuple[int, ...],
                          stride: tuple[int, ...] | None,
                          *, dtype: torch.dtype, device: torch.device) -> _T:
    """A tensor of subclass ``cls`` with this metadata and no storage of its own."""
    make = getattr(torch.Tensor, "_make_wrapper_subclass", None)
    if make is None or disabled_torch_function is None:
        raise unsupported("torch.Tensor._make_wrapper_subclass",
                          "the placeholder a FeatureCache returns for a skipped prefix")
    made = make(cls, shape, stride, dtype=dtype, device=device, requires_grad=False)
    if not isinstance(made, cls):  # pragma: no cover - torch changed what it returns
        raise unsupported("torch.Tensor._make_wrapper_subclass", "a tensor of our subclass")
    return made


# ---------------------------------------------------------------------------
# nn.Module internals


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module``'s directly registered parameters, tied duplicates included."""
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p


def own_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``module``'s directly registered buffers: (name, tensor, persistent)."""
    skip = module._non_persistent_buffers_set
    for name, b in module._buffers.items():
        if b is not None:
            yield name, b, name not in skip


def own_tensor_dicts(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dicts holding ``module``'s own parameters and buffers (live: entries
    registered later show up, which is what change detection needs)."""
    return module._parameters, module._buffers


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

#: ``(tensor._version, tensor.requires_grad)`` in one C-level call: ``_version`` counts
#: in-place writes (optimizer steps, ``copy_``, ``load_state_dict``); the cache reads it
#: for every watched tensor on every batch.
version_and_grad = operator.attrgetter("_version", "requires_grad")
#: ``tensor._version`` alone, for ``map`` over many tensors (no tuple per tensor)
tensor_version = operator.attrgetter("_version")


def child_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``module``'s direct children by registered name, duplicates included (unlike
    ``named_children()``, which drops a child registered twice)."""
    return {name: m for name, m in module._modules.items() if m is not None}


def wrapped_child(module: nn.Module) -> str | None:
    """The private child name under which a torch wrapper holds the wrapped model:
    ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), FSDP1's
    ``FullyShardedDataParallel`` (``_fsdp_wrapped_module``) and activation
    checkpointing's ``CheckpointWrapper`` (``_checkpoint_wrapped_module``, its only
    child); None for any other module."""
    kids = child_modules(module)
    if "_orig_mod" in kids and type(module).__name__ == "OptimizedModule":
        return "_orig_mod"
    for attr in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        if attr in kids and len(kids) == 1:
            return attr
    return None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def module_hooks(module: nn.Module) -> list[str]:
    """Names of the hook dicts registered on ``module`` itself that are not empty."""
    missing = [n for n in _HOOK_DICTS if not isinstance(getattr(module, n, None), dict)]
    if missing:
        raise unsupported(f"nn.Module.{missing[0]}", "hooks registered on a wrapper")
    return [n for n in _HOOK_DICTS if getattr(module, n)]


# ---------------------------------------------------------------------------
# DistributedDataParallel internals


def ddp_logging_data(ddp: nn.Module) -> dict[str, Any]:
    """What DDP logged about itself at construction (parameter counts, comm hook)."""
    get = getattr(ddp, "_get_ddp_logging_data", None)
    if get is None:
        raise unsupported("DistributedDataParallel._get_ddp_logging_data()",
                          "which parameters the wrapper's reducer was built for")
    return dict(get())


def ddp_comm_hooks(ddp: nn.Module) -> list[tuple[Any, Any]]:
    """The Python communication hooks registered on ``ddp``: (hook, state) pairs."""
    hooks = getattr(ddp, "_comm_hooks", None)
    if not isinstance(hooks, list):
        raise unsupported("DistributedDataParallel._comm_hooks",
                          "carrying communication hooks over to a re-built wrapper")
    return list(hooks)


def ddp_delays_all_reduce(ddp: nn.Module, *, all_params: bool = False) -> bool:
    """Whether ``ddp`` delays the all-reduce of some (or, with ``all_params``, all)
    parameters."""
    missing = [a for a in ("_delay_all_reduce_params", "_delay_all_reduce_all_params")
               if not hasattr(ddp, a)]
    if missing:
        raise unsupported(f"DistributedDataParallel.{missing[0]}",
                          "parameters whose all-reduce DDP delays")
    if all_params:
        return bool(ddp._delay_all_reduce_all_params)
    return bool(ddp._delay_all_reduce_params or ddp._delay_all_reduce_all_params)


def ddp_bucket_caps(ddp: nn.Module) -> tuple[int, ...]:
    """Per-bucket byte caps given as ``bucket_cap_mb_list`` (empty when not used)."""
    config = getattr(ddp, "_bucket_config", None)
    if config is None or not hasattr(config, "per_bucket_bytes_caps"):
        raise unsupported("DistributedDataParallel._bucket_config.per_bucket_bytes_caps",
                          "the bucket sizes to give a re-built wrapper")
    return tuple(config.per_bucket_bytes_caps or ())


def remove_ddp_autograd_hooks(ddp: nn.Module) -> None:
    """Take ``ddp``'s reducer hooks off its parameters: the reducer's autograd hooks
    and, under compiled autograd, its accumulate-grad hooks (a torch without either
    has nothing of that kind to remove)."""
    remove = getattr(ddp, "_remove_autograd_hooks", None)
    if remove is not None:
        remove()
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()


# ---------------------------------------------------------------------------
# FSDP2 internals


def refresh_fsdp_grad_dtypes(unit: nn.Module) -> None:
    """Recompute an FSDP2 unit's gradient dtypes from its current trainable set.

    FSDP2 reads them at lazy init (the first forward) only; a unit wholly frozen
    then has none, and under a MixedPrecisionPolicy the backward after unfreezing
    it assigns a bf16 gradient to an fp32 parameter. Does nothing before lazy init.
    """
    get_state = getattr(unit, "_get_fsdp_state", None)
    if get_state is None:
        raise unsupported("FSDPModule._get_fsdp_state()",
                          "refreshing FSDP2's gradient dtypes after unfreezing")
    group = getattr(get_state(), "_fsdp_param_group", None)
    if group is None or not hasattr(group, "_orig_dtype"):
        return  # lazy init has not run yet; it will read the new state itself
    init = getattr(group, "_init_mp_dtypes", None)
    if init is None:
        raise unsupported("FSDPParamGroup._init_mp_dtypes()",
                          "refreshing FSDP2's gradient dtypes after unfreezing; change "
                          "requires_grad before the first forward instead")
    init()


# ---------------------------------------------------------------------------
# kernels


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor, in one fused call where torch has it."""
    fused = getattr(torch, "_foreach_norm", None)
    if fused is None:  # same values, one kernel per tensor
        return [torch.linalg.vector_norm(t) for t in tensors]
    return list(fused(tensors))


# ---------------------------------------------------------------------------
# LR scheduler internals


#: the attribute holding an LR scheduler's per-group last learning rates
LAST_LR_ATTR = "_last_lr"


def last_lrs(sched: Any) -> list[Any] | None:
    """The live list of ``sched``'s last learning rates, one per param group (what
    ``get_last_lr()`` copies), or None when it keeps none yet."""
    value = getattr(sched, LAST_LR_ATTR, None)
    return value if isinstance(value, list) else None


def nested_schedulers(sched: Any) -> list[Any]:
    """The schedulers inside ``sched`` (a ``SequentialLR``, a ``ChainedScheduler``, or
    anything else keeping them the same way); empty for a plain scheduler."""
    children = getattr(sched, "_schedulers", None)
    return list(children) if isinstance(children, (list, tuple)) else []


def child_schedulers(sched: Any) -> list[Any]:
    """The schedulers inside a ``SequentialLR`` or ``ChainedScheduler``."""
    children = getattr(sched, "_schedulers", None)
    if not isinstance(children, list):
        raise unsupported(f"{type(sched).__name__}._schedulers",
                          "registering a new param group with its child schedulers")
    return children


# ---------------------------------------------------------------------------
# storage identity (tfz.plan)


def storage_key(t: torch.Tensor) -> int:
    """One int per storage: views and other tensors sharing memory get the same key
    (also on the meta device, where every ``data_ptr()`` is 0)."""
    try:
        return int(t.untyped_storage()._cdata)
    except AttributeError as exc:  # pragma: no cover - present in every supported torch
        raise unsupported("UntypedStorage._cdata", "counting storages once (tfz.plan)") from exc


# ---------------------------------------------------------------------------


def missing_private_apis() -> list[str]:
    """The entries of :data:`PRIVATE_APIS` that the installed torch lacks at class
    level (instance attributes are checked by the tests with real objects)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    missing = []
    if disabled_torch_function is None:
        missing.append("torch._C._disabled_torch_function_impl")
    if not hasattr(torch.Tensor, "_version"):
        missing.append("Tensor._version")
    if not hasattr(torch.Tensor, "_make_wrapper_subclass"):
        missing.append("torch.Tensor._make_wrapper_subclass")
    if not hasattr(torch, "_foreach_norm"):
        missing.append("torch._foreach_norm")
    if not hasattr(DistributedDataParallel, "_get_ddp_logging_data"):
        missing.append("DistributedDataParallel._get_ddp_logging_data()")
    if not hasattr(DistributedDataParallel, "_remove_autograd_hooks"):
        missing.append("DistributedDataParallel._remove_autograd_hooks()")
    if not hasattr(nn.Module, "_load_from_state_dict"):
        missing.append("nn.Module._load_from_state_dict")
    if not hasattr(FSDPModule, "_get_fsdp_state"):
        missing.append("FSDPModule._get_fsdp_state()")
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    except ImportError:
        missing.append("torch.distributed.fsdp._fully_shard._fsdp_param_group")
    else:
        if not hasattr(FSDPParamGroup, "_init_mp_dtypes"):
            missing.append("FSDPParamGroup._init_mp_dtypes()")
    return missing
