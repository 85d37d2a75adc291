"""torchfreeze: freeze, unfreeze and fine-tune pretrained PyTorch models correctly.

Public API only. The core (``torch`` and ``rich``) is imported with the package;
the optional integrations (``torchfreeze.integrations.lightning``,
``torchfreeze.integrations.transformers``) and the demo are imported only when
you import them, so Lightning and transformers are never loaded unless asked for.

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
from typing import Any

from ._check import CODES, Diagnosis, Finding, check
from ._freeze import freeze, freeze_state, freeze_to, frozen, load_freeze_state, unfreeze
from ._layers import Layer, layers
from ._plan import Plan, PlanRow, StepMemory, plan
from ._select import Selection, Selector, select
from ._summary import Summary, summary
from ._verify import VerifyReport, verify
from ._version import __version__
from .autofreeze import AutoFreeze, FreezeStats
from .cache import FeatureCache
from .errors import (
    CacheError,
    CheckError,
    DistributedFreezeError,
    FreezeStateError,
    FrozenStateChanged,
    LoadError,
    ModelTypeError,
    PlanError,
    SchedulerError,
    SelectionError,
    TiedWeightWarning,
    TorchfreezeError,
    UnsupportedTorchError,
    UnusedRuleWarning,
)
from .groups import param_groups
from .load import CheckpointInfo, LoadReport, inspect_checkpoint, load_pretrained, read_state_dict
from .norm import FrozenBatchNorm, convert_frozen_batchnorm, revert_frozen_batchnorm
from .rotate import RotatingFreeze
from .schedule import FineTune, GradualUnfreeze, fine_tune_schedule

__all__ = [
    "CODES",
    "AutoFreeze",
    "CacheError",
    "CheckError",
    "CheckpointInfo",
    "Diagnosis",
    "DistributedFreezeError",
    "FeatureCache",
    "Finding",
    "FineTune",
    "FreezeStateError",
    "FreezeStats",
    "FrozenBatchNorm",
    "FrozenStateChanged",
    "GradualUnfreeze",
    "Layer",
    "LoadError",
    "LoadReport",
    "ModelTypeError",
    "Plan",
    "PlanError",
    "PlanRow",
    "RotatingFreeze",
    "SchedulerError",
    "Selection",
    "SelectionError",
    "Selector",
    "StepMemory",
    "Summary",
    "TiedWeightWarning",
    "TorchfreezeError",
    "UnsupportedTorchError",
    "UnusedRuleWarning",
    "VerifyReport",
    "__version__",
    "check",
    "convert_frozen_batchnorm",
    "fine_tune_schedule",
    "freeze",
    "freeze_state",
    "freeze_to",
    "frozen",
    "inspect_checkpoint",
    "layers",
    "load_freeze_state",
    "load_pretrained",
    "param_groups",
    "plan",
    "read_state_dict",
    "revert_frozen_batchnorm",
    "select",
    "summary",
    "unfreeze",
    "verify",
]

# imported on first use: distributed pulls in torch.distributed machinery, and the
# integrations import Lightning / transformers
_SUBMODULES = ("distributed", "integrations")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'torchfreeze' has no attribute {name!r}")
