"""torchfreeze: freeze, unfreeze and fine-tune pretrained PyTorch models correctly.

Public API only. Names are imported on first use, so ``import torchfreeze``
stays cheap and optional integrations (Lightning, transformers) are never
imported unless asked for.

Example:
    >>> import torch.nn as nn, torchfreeze as tfz
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> tfz.freeze(net, "0", "1").param_names
    ('0.weight', '0.bias', '1.weight', '1.bias')
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CacheError,
    DistributedFreezeError,
    FreezeStateError,
    FrozenStateChanged,
    LoadError,
    SchedulerError,
    SelectionError,
    TorchfreezeError,
)

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "Selection": "select",
    "Selector": "select",
    "select": "select",
    "freeze": "freeze",
    "unfreeze": "freeze",
    "frozen": "freeze",
    "freeze_to": "freeze",
    "freeze_state": "freeze",
    "load_freeze_state": "freeze",
    "Layer": "layers",
    "layers": "layers",
    "FrozenBatchNorm": "norm",
    "convert_frozen_batchnorm": "norm",
    "revert_frozen_batchnorm": "norm",
    "Summary": "summary",
    "summary": "summary",
    "param_groups": "groups",
    "GradualUnfreeze": "schedule",
    "fine_tune_schedule": "schedule",
    "LoadReport": "load",
    "load_pretrained": "load",
    "CheckpointInfo": "load",
    "inspect_checkpoint": "load",
    "read_state_dict": "load",
    "CheckError": "check",
    "Diagnosis": "check",
    "Finding": "check",
    "check": "check",
    "VerifyReport": "verify",
    "verify": "verify",
    "FeatureCache": "cache",
}
_SUBMODULES = ("distributed", "integrations")

__all__ = sorted(
    [*_EXPORTS, "__version__", "CacheError", "DistributedFreezeError", "FreezeStateError",
     "FrozenStateChanged", "LoadError", "SchedulerError", "SelectionError", "TorchfreezeError"]
)


def _bind_exports() -> None:
    # Several submodules share their public function's name (freeze, select, check,
    # ...). Importing a submodule binds the package attribute to the *module*, so
    # every submodule is imported here first and the public names bound after.
    for name, module in _EXPORTS.items():
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as exc:  # TODO(integration): explicit imports
            if exc.name != f"{__name__}.{module}":
                raise
            continue
        globals()[name] = getattr(mod, name)


_bind_exports()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'torchfreeze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .cache import FeatureCache
    from .check import CheckError, Diagnosis, Finding, check
    from .freeze import freeze, freeze_state, freeze_to, frozen, load_freeze_state, unfreeze
    from .groups import param_groups
    from .layers import Layer, layers
    from .load import (
        CheckpointInfo,
        LoadReport,
        inspect_checkpoint,
        load_pretrained,
        read_state_dict,
    )
    from .norm import FrozenBatchNorm, convert_frozen_batchnorm, revert_frozen_batchnorm
    from .schedule import GradualUnfreeze, fine_tune_schedule
    from .select import Selection, Selector, select
    from .summary import Summary, summary
    from .verify import VerifyReport, verify
