"""One rule for the wrappers torchfreeze sees through: optimizers and DDP models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_ddp", "unwrap_optimizer"]


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer under Lightning's ``LightningOptimizer`` and accelerate's
    ``AcceleratedOptimizer`` (itself an ``Optimizer`` subclass): same param_groups, and
    its class and ``defaults`` decide which state keys exist.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    for _ in range(4):
        inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            opt = inner
        else:
            break
    return opt


def is_ddp(model: nn.Module) -> TypeGuard[DistributedDataParallel]:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper."""
    # imported here: torch.nn.parallel pulls in torch.distributed machinery
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)
