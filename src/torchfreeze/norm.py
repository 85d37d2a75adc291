"""BatchNorm policies for frozen layers, and FrozenBatchNorm.

PyTorch keeps updating a BatchNorm layer's running statistics in train mode
even when its affine parameters have ``requires_grad=False``, so "frozen" BN
layers drift. torchfreeze gives every frozen BN layer one of three policies:

* ``"eval"`` (default): the layer is pinned in eval mode. ``model.train()``
  (Lightning, HF Trainer and your own loop all call it) leaves it in eval, so
  its running statistics never move and it normalises with them.
* ``"train"``: BN layers inside a frozen selection stay trainable and keep
  updating statistics (fastai's ``train_bn``).
* ``"stats"``: affine frozen, running statistics keep updating (plain PyTorch
  behaviour; opt-in).

:func:`convert_frozen_batchnorm` goes one step further and replaces BN layers
by :class:`FrozenBatchNorm` (buffers only, no parameters), in place, keeping
the state_dict keys; :func:`revert_frozen_batchnorm` undoes it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ._compat import BatchNormBase, InstanceNormBase, NormBase, child_modules
from ._pinning import POLICY_ATTR, PinnedEval, pin, unpin
from ._select import Selector, require_module, resolve
from .errors import SelectionError, TorchfreezeError

__all__ = [
    "BN_POLICIES",
    "BNPolicy",
    "FrozenBatchNorm",
    "bn_policy",
    "convert_frozen_batchnorm",
    "is_batchnorm",
    "revert_frozen_batchnorm",
    "set_bn_policy",
]

BNPolicy = Literal["eval", "train", "stats"]
BN_POLICIES: tuple[str, ...] = ("eval", "train", "stats")


def check_bn_policy(bn: object) -> None:
    """Refuse what is not a BatchNorm policy: one rule and one message for every
    function that takes ``bn=`` (freeze, freeze_to, frozen, schedules, callbacks)."""
    if bn not in BN_POLICIES:
        raise TorchfreezeError(
            f"bn={bn!r} is not a BatchNorm policy. Use 'eval' (frozen BN keeps its "
            "statistics, the default), 'train' (BN stays trainable, fastai's train_bn) or "
            "'stats' (affine frozen, statistics keep updating)."
        )


def is_batchnorm(module: nn.Module) -> bool:
    """True for layers with running statistics: BatchNorm1d/2d/3d, SyncBatchNorm,
    lazy variants, InstanceNorm with ``track_running_stats=True``, FrozenBatchNorm."""
    if isinstance(module, (BatchNormBase, FrozenBatchNorm)):
        return True
    return isinstance(module, InstanceNormBase) and module.track_running_stats


def bn_policy(module: nn.Module) -> str | None:
    """The torchfreeze BN policy set on ``module`` (``None`` when there is none)."""
    return module.__dict__.get(POLICY_ATTR)


_PinnedEval = PinnedEval  # the pin BN policies set (kept for old pickles)


def set_bn_policy(module: nn.Module, policy: str | None, *, training: bool) -> None:
    """Set (or with ``None`` clear) the BN policy of one layer.

    ``training`` is the mode the layer takes when it is not pinned, normally
    the mode of the model it sits in.
    """
    if policy is not None:
        check_bn_policy(policy)
    d = module.__dict__
    unpin(module, training=training)
    if policy is None:
        d.pop(POLICY_ATTR, None)
    else:
        d[POLICY_ATTR] = policy
    if policy == "eval":
        pin(module)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as a tensor (BN layers register weight/bias/statistics at
    run time, so their type is not declared)."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise TorchfreezeError(
            f"{type(module).__name__}.{name} is {type(value).__name__}, expected a tensor: "
            "this BatchNorm layer cannot be converted (nothing was changed)."
        )
    return value


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine transform (any dimensionality).

    Everything is a buffer, so nothing gets a gradient or optimizer state, and
    the forward is one multiply-add. The state_dict keys are those of the BN
    layer it replaces (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so checkpoints load either way.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> bn = nn.BatchNorm2d(3).eval()
        >>> fbn = tfz.FrozenBatchNorm.from_batchnorm(bn)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(bn(x), fbn(x), atol=1e-6)
        True
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_type: type[nn.Module] = nn.BatchNorm2d,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.source_type = source_type
        if affine:
            self.register_buffer("weight", torch.ones(num_features, **kw))
            self.register_buffer("bias", torch.zeros(num_features, **kw))
        else:
            self.weight = None
            self.bias = None
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A FrozenBatchNorm with ``bn``'s statistics, affine values, eps and momentum.

        Raises:
            TorchfreezeError: ``bn`` is not a BatchNorm/SyncBatchNorm/InstanceNorm
                layer that tracks running statistics.
        """
        if not isinstance(bn, NormBase) or not is_batchnorm(bn) or bn.running_mean is None:
            raise TorchfreezeError(
                f"cannot freeze {type(bn).__name__}: only BatchNorm/SyncBatchNorm/InstanceNorm "
                "layers that track running statistics have statistics to freeze."
            )
        ref = bn.running_mean
        out = cls(
            bn.num_features,
            bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            source_type=type(bn),
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            if out.weight is not None and out.bias is not None:
                out.weight.copy_(_tensor(bn, "weight").detach())
                out.bias.copy_(_tensor(bn, "bias").detach())
            out.running_mean.copy_(ref)
            out.running_var.copy_(_tensor(bn, "running_var"))
            if bn.num_batches_tracked is not None:
                out.num_batches_tracked.copy_(bn.num_batches_tracked)
        out.train(bn.training)
        return out

    def to_batchnorm(self) -> nn.Module:
        """The BN layer this replaced, same values; its parameters are frozen."""
        bn = self.source_type(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=True,
            device=self.running_mean.device,
            dtype=self.running_mean.dtype,
        )
        with torch.no_grad():
            if self.weight is not None and self.bias is not None:
                _tensor(bn, "weight").copy_(self.weight)
                _tensor(bn, "bias").copy_(self.bias)
            _tensor(bn, "running_mean").copy_(self.running_mean)
            _tensor(bn, "running_var").copy_(self.running_var)
            _tensor(bn, "num_batches_tracked").copy_(self.num_batches_tracked)
        for p in bn.parameters():
            p.requires_grad_(False)
        return bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.running_var + self.eps).rsqrt()
        shift = -self.running_mean * scale
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        errors: list[str],
    ) -> None:
        # checkpoints of BN layers from before PyTorch 0.4.1 have no num_batches_tracked
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"source={self.source_type.__name__}"
        )


def _bn_modules(
    model: nn.Module, selectors: tuple[Selector, ...], want: type | None
) -> list[tuple[str, nn.Module]]:
    sel = resolve(model, selectors, allow_empty=False)
    picked = [
        (name, m)
        for name, m in zip(sel.module_names, sel.modules)
        if (isinstance(m, want) if want else is_batchnorm(m) and not isinstance(m, FrozenBatchNorm))
    ]
    if want is None:
        picked = [(n, m) for n, m in picked if m.running_mean is not None]
    if not picked:
        kind = "FrozenBatchNorm" if want else "BatchNorm (with running statistics)"
        raise SelectionError(
            f"the selection {list(selectors) or '(whole model)'} contains no {kind} layer, "
            f"so there is nothing to convert. Select the part of the model that holds them, "
            f"or check with tfz.select(model, nn.BatchNorm2d).",
            selector=selectors,
        )
    if any(name == "" for name, _ in picked):
        raise TorchfreezeError(
            "the model itself is a BatchNorm layer; conversion happens in place inside a "
            "parent module. Use FrozenBatchNorm.from_batchnorm(bn) for a lone layer."
        )
    return picked


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # by identity: every parent that holds it (under any alias, inside any wrapper
    # such as torch.compile's _orig_mod) gets the new one
    for parent in list(model.modules()):
        for child_name, child in list(child_modules(parent).items()):
            if child is old:
                setattr(parent, child_name, new)


def convert_frozen_batchnorm(model: nn.Module, *selectors: Selector) -> list[str]:
    """Replace BN layers in the selection (default: all) by :class:`FrozenBatchNorm`.

    In place inside their parent modules; eps, momentum, statistics, affine values,
    dtype and device are kept, and so are the state_dict keys.

    Returns:
        The names of the converted layers.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        SelectionError: a selector matches nothing, or the selection holds no
            BatchNorm layer with running statistics (nothing is changed).
        TorchfreezeError: ``model`` itself is the BN layer (use
            :meth:`FrozenBatchNorm.from_batchnorm`).

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        >>> tfz.convert_frozen_batchnorm(net)
        ['1']
        >>> type(net[1]).__name__
        'FrozenBatchNorm'
    """
    require_module(model, "convert_frozen_batchnorm")
    picked = _bn_modules(model, selectors, None)
    new = [(name, m, FrozenBatchNorm.from_batchnorm(m)) for name, m in picked]
    for _, old, fbn in new:
        _replace(model, old, fbn)
    return [name for name, _, _ in new]


def revert_frozen_batchnorm(model: nn.Module, *selectors: Selector) -> list[str]:
    """Turn :class:`FrozenBatchNorm` layers back into the BN class they replaced.

    The restored layers are still frozen (parameters ``requires_grad=False``,
    pinned in eval); call :func:`torchfreeze.unfreeze` to train them.

    Returns:
        The names of the reverted layers.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        SelectionError: a selector matches nothing, or the selection holds no
            FrozenBatchNorm (nothing is changed).

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        >>> tfz.convert_frozen_batchnorm(net)
        ['1']
        >>> tfz.revert_frozen_batchnorm(net)
        ['1']
        >>> type(net[1]).__name__, net[1].weight.requires_grad, net[1].training
        ('BatchNorm2d', False, False)
    """
    require_module(model, "revert_frozen_batchnorm")
    picked = _bn_modules(model, selectors, FrozenBatchNorm)
    new = [(name, m, m.to_batchnorm()) for name, m in picked
           if isinstance(m, FrozenBatchNorm)]
    for _, old, bn in new:
        set_bn_policy(bn, "eval", training=False)
        _replace(model, old, bn)
    return [name for name, _, _ in new]
