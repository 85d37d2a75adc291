"""Optimizer param groups: discriminative LRs, layer-wise LR decay, no weight decay.

:func:`param_groups` returns plain param-group dicts that any ``torch.optim``
optimizer accepts. Every trainable parameter lands in exactly one group (tied
weights once, by identity), frozen parameters in none, and groups with
identical settings are merged so that fused (and, on GPU, foreach) optimizers
stay fast: their kernels run once per group.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._compat import NormBase, own_parameters
from ._select import ModelIndex, require_module, resolve, selector_label
from .errors import TiedWeightWarning, TorchfreezeError, UnusedRuleWarning

__all__ = ["UnusedRuleWarning", "is_norm_layer", "param_groups", "word_match"]


_OWN_KEYS = ("params", "param_names", "name")
#: the keys torchfreeze itself reads in a rule
_TFZ_KEYS = ("lr", "lr_mult", "weight_decay", "decay_mult")
_NORM_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance)Norm|Norm$")
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
              nn.LocalResponseNorm)
    if t is not None
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalisation layers: torch's BatchNorm*/SyncBatchNorm/InstanceNorm*,
    LayerNorm, GroupNorm, RMSNorm, and by class name the many re-implementations
    (Hugging Face's ``T5LayerNorm``, ``LlamaRMSNorm``, ``ConvNextLayerNorm``, ...)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
        value
    ) or value < 0:
        raise TorchfreezeError(
            f"{where}: {key}={value!r} must be a finite number >= 0 (nothing was built)."
        )
    return float(value)


@functools.cache
def _torch_optimizer_keys() -> frozenset[str]:
    """Every hyper-parameter some ``torch.optim`` optimizer takes."""
    keys: set[str] = set()
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            keys |= _signature_keys(cls)
    return frozenset(keys)


def _signature_keys(cls: type) -> set[str]:
    try:
        params = inspect.signature(cls).parameters  # the constructor's, without self
    except (TypeError, ValueError):  # pragma: no cover - a C-implemented optimizer
        return set()
    return {
        n for n, p in params.items()
        if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _optimizer_keys(optimizer: Any) -> tuple[frozenset[str], str]:
    """The option keys a rule may set, and what they were taken from."""
    if optimizer is None:
        return _torch_optimizer_keys(), "any torch.optim optimizer"
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        keys = set(optimizer.defaults)  # what this optimizer object reads per group
    else:
        keys = _signature_keys(cls)
    if not keys:
        raise TorchfreezeError(
            f"optimizer={optimizer!r}: cannot tell which options it takes (no keyword "
            "parameters in its signature). Pass the optimizer class, e.g. torch.optim.AdamW."
        )
    return frozenset(keys), cls.__name__


def _check_keys(where: str, opts: Mapping[str, Any], optimizer: Any) -> None:
    allowed, source = _optimizer_keys(optimizer)
    valid = sorted(set(_TFZ_KEYS) | allowed)
    for key in opts:
        if key in _TFZ_KEYS or key in allowed or key in _OWN_KEYS or key == "requires_grad":
            continue
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        mean = f"Did you mean {close[0]!r}? " if close else ""
        hint = (
            "If your optimizer takes it, pass optimizer=YourOptimizer so its options are known."
            if optimizer is None
            else f"{source} would silently ignore it."
        )
        raise TorchfreezeError(
            f"{where}: unknown option {key!r}: neither torchfreeze's ({', '.join(_TFZ_KEYS)}) "
            f"nor an option of {source}. {mean}{hint} Nothing was built."
        )


def _check_rule(where: str, options: Any, optimizer: Any = None) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise TorchfreezeError(
            f"{where}: options must be a dict such as {{'lr_mult': 10}}, got "
            f"{type(options).__name__} {options!r}."
        )
    opts = dict(options)
    for a, b in (("lr", "lr_mult"), ("weight_decay", "decay_mult")):
        if a in opts and b in opts:
            raise TorchfreezeError(
                f"{where}: both {a!r} and {b!r} given; {a} is absolute, {b} multiplies the "
                "default. Keep one."
            )
    if "requires_grad" in opts:
        raise TorchfreezeError(
            f"{where}: 'requires_grad' in a param group is silently ignored by torch (the "
            "parameters would still update). Freeze them with tfz.freeze(model, ...) before "
            "building the groups instead."
        )
    bad = [k for k in opts if k in _OWN_KEYS]
    if bad:
        raise TorchfreezeError(
            f"{where}: {bad} are set by param_groups itself and cannot be given in a rule."
        )
    _check_keys(where, opts, optimizer)
    for key in ("lr", "lr_mult", "weight_decay", "decay_mult"):
        if key in opts:
            opts[key] = _number(where, key, opts[key])
    return opts


def _rules_list(rules: Any) -> list[tuple[Any, Any]]:
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        return list(rules.items())
    if isinstance(rules, Sequence) and not isinstance(rules, str) and all(
        isinstance(r, (tuple, list)) and len(r) == 2 for r in rules
    ):
        return [(r[0], r[1]) for r in rules]
    raise TorchfreezeError(
        f"rules must be an ordered mapping selector -> options (or a list of (selector, "
        f"options) pairs), got {type(rules).__name__}."
    )


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")


def _words(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A name's words: split at ``_``/``.``/digits, as is and also at camelCase."""
    plain = tuple(w.lower() for w in _WORD_SPLIT.split(name) if w)
    camel = tuple(w.lower() for w in _WORD_SPLIT.split(_CAMEL.sub("_", name)) if w)
    return plain, camel


def word_match(token: str, name: str) -> bool:
    """True when ``token``'s words appear, in a row, among ``name``'s words.

    ``"norm"`` matches ``norm``, ``norm1``, ``layer_norm``, ``LayerNorm`` and
    ``final_norm``, not ``normal_head`` or ``enormous_proj`` (the Hugging Face
    Trainer's rule: names only at word boundaries).

    >>> [word_match("norm", n) for n in ("norm1", "LayerNorm", "normal_head", "enormous")]
    [True, True, False, False]
    """
    want = _words(token)[0]
    if not want:
        return False
    for words in _words(name):
        for i in range(len(words) - len(want) + 1):
            if words[i : i + len(want)] == want:
                return True
    return False


def _no_decay_ids(idx: ModelIndex, no_decay: Iterable[Any], warn: bool) -> set[int]:
    tokens: list[str] = []
    types: list[type] = []
    for entry in no_decay:
        if isinstance(entry, str):
            tokens.append(entry.lower())
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            raise TorchfreezeError(
                f"no_decay entry {entry!r} is neither a name (e.g. 'bias', 'norm') nor an "
                "nn.Module subclass."
            )
    out: set[int] = set()
    used: set[str | type] = set()
    for mname, module in idx.modules.items():
        own = list(own_parameters(module))
        if not own:
            continue
        path = mname.split(".") if mname else []
        norm_typed = is_norm_layer(module)
        for key, p in own:
            hit = False
            for t in tokens:
                # a token is a word of the parameter's name ('bias', 'attn_bias') or of
                # a module on its path ('norm' in 'LayerNorm', 'norm1', not in
                # 'normal_head'); 'norm' also means every norm layer by type
                if (word_match(t, key) or any(word_match(t, c) for c in path)
                        or (t == "norm" and norm_typed)):
                    used.add(t)
                    hit = True
            for kind in types:
                if isinstance(module, kind):
                    used.add(kind)
                    hit = True
            if hit:
                out.add(id(p))
    if warn:
        for entry in [*tokens, *types]:
            if entry not in used:
                warnings.warn(
                    f"no_decay entry {selector_label(entry)!r} matched no parameter of "
                    f"{idx.describe()}; check its spelling.",
                    UnusedRuleWarning,
                    stacklevel=3,
                )
    return out


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Mapping[Any, Mapping[str, Any]] | Sequence[tuple[Any, Mapping[str, Any]]] | None = None,
    no_decay: Iterable[str | type[nn.Module]] = ("bias", "norm"),
    layer_decay: float | None = None,
    layers: Sequence[Any] | None = None,
    example_inputs: Any = None,
    merge: bool = True,
    optimizer: Any = None,
) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer, over the trainable parameters.

    Each parameter's settings are worked out, then parameters with identical
    settings share one group:

    * ``lr``: the rule's ``"lr"`` when it gives one (absolute, layer decay not
      applied); otherwise ``lr x layer_scale x lr_mult``.
    * ``weight_decay``: the rule's ``"weight_decay"`` when it gives one
      (absolute, wins over ``no_decay``); otherwise 0 for ``no_decay``
      parameters and ``weight_decay x decay_mult`` for the rest.
    * any other key of the rule (``betas``, ``momentum``, ``eps``, ...) is put
      into the group as is; keys no rule sets come from the optimizer defaults.

    Rules are tried in order and the first whose selector matches a parameter
    wins. A rule that matches nothing raises :class:`SelectionError`; a rule
    that matches only frozen parameters, or only parameters an earlier rule
    claimed, emits :class:`UnusedRuleWarning` (it would change nothing).

    Args:
        model: the model; its ``requires_grad`` flags decide what is trainable.
        lr: the base learning rate (the head's, with ``layer_decay``).
        weight_decay: the default weight decay.
        rules: ordered ``{selector: options}`` (or a list of pairs, for
            unhashable selectors). Selectors use the grammar of
            :func:`torchfreeze.select`; options are ``"lr"``, ``"lr_mult"``,
            ``"weight_decay"``, ``"decay_mult"`` and the optimizer's
            hyper-parameters. Any other key (``"lr_mul"``) is an error with a
            did-you-mean. A rule whose selector is an empty list is an error.
        no_decay: names and module types whose parameters get no weight decay.
            A name matches at word boundaries (words split at ``_``, ``.``,
            digits and camelCase) in the parameter's own name (``"bias"``,
            ``attn_bias``) or a module name on its path (``"norm"`` in
            ``LayerNorm``, ``norm1``, ``final_norm``; not in ``normal_head`` or
            ``enormous_proj``); ``"norm"`` also selects every normalisation layer
            by type (see :func:`is_norm_layer`). ``()`` disables it.
        layer_decay: layer-wise LR decay (timm/BEiT): with the groups of
            :func:`torchfreeze.layers` (stem, blocks, head), the head gets ``lr``
            and the group ``k`` levels below it ``lr x layer_decay**k``.
        layers: the depth levels for ``layer_decay``, bottom to top, each a
            selector (or a :class:`~torchfreeze.Layer`), instead of
            :func:`torchfreeze.layers`; the last is the head. Every trainable
            parameter must be in one (the first that matches wins).
        example_inputs: passed to :func:`torchfreeze.layers` for execution order.
        merge: merge groups with identical settings (``False``: one group per
            parameter, only useful for comparisons).
        optimizer: the optimizer class (or object) the groups are for; rule
            options are then checked against what it takes. Default: any
            option some ``torch.optim`` optimizer takes is accepted.

    Returns:
        A list of dicts with ``"params"``, ``"name"``, ``"param_names"``, ``"lr"``,
        ``"weight_decay"`` and the rules' extra keys, in model order of their
        first parameter.

    Raises:
        SelectionError: a rule's selector matched nothing.
        TorchfreezeError: invalid options, ``layer_decay`` outside (0, 1], or no
            trainable parameter at all.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> groups = tfz.param_groups(net, lr=1e-3, weight_decay=0.05,
        ...                           rules={"2": {"lr_mult": 10}})
        >>> for g in groups:
        ...     print(g["name"], g["lr"], g["weight_decay"], g["param_names"])
        default 0.001 0.05 ['0.weight']
        no_decay 0.001 0.0 ['0.bias', '1.weight', '1.bias']
        2 0.01 0.05 ['2.weight']
        2/no_decay 0.01 0.0 ['2.bias']
        >>> opt = torch.optim.AdamW(groups)
    """
    require_module(model, "param_groups")
    lr = _number("param_groups", "lr", lr)
    weight_decay = _number("param_groups", "weight_decay", weight_decay)
    if layer_decay is not None and (
        isinstance(layer_decay, bool)
        or not isinstance(layer_decay, numbers.Real)
        or not 0 < layer_decay <= 1
    ):
        raise TorchfreezeError(
            f"layer_decay={layer_decay!r} must be in (0, 1]: the head gets lr and each "
            "layer below it lr x layer_decay**depth. Typical values: 0.65-0.9."
        )
    rule_list = [
        (sel, _check_rule(f"rule {selector_label(sel)!r}", opts, optimizer))
        for sel, opts in _rules_list(rules)
    ]
    idx = ModelIndex(model)
    trainable = [(n, p) for n, p in idx.params.items() if p.requires_grad]
    if not trainable:
        raise TorchfreezeError(
            f"{idx.describe()} has no trainable parameter, so there is nothing to optimize. "
            "Unfreeze something first (tfz.unfreeze(model, 'head'))."
        )
    trainable_ids = {id(p) for _, p in trainable}

    # resolve every rule before deciding anything, so a bad selector fails first
    owner: dict[int, int] = {}  # param id -> rule index
    param_by_name = dict(idx.param_aliases)
    for i, (sel, _) in enumerate(rule_list):
        picked = resolve(model, [sel], index=idx, allow_empty=False, what="rule")
        live = [p for p in picked.params if id(p) in trainable_ids]
        fresh = [p for p in live if id(p) not in owner]
        if not live:
            warnings.warn(
                f"rule {selector_label(sel)!r} matches only frozen parameters "
                f"({len(picked.params)}: {', '.join(picked.param_names[:3])}"
                f"{', ...' if len(picked.params) > 3 else ''}), so it changes nothing. Unfreeze "
                "them first or drop the rule.",
                UnusedRuleWarning,
                stacklevel=2,
            )
        elif not fresh:
            warnings.warn(
                f"rule {selector_label(sel)!r} changes nothing: every trainable parameter it "
                "matches was already claimed by an earlier rule (the first matching rule wins). "
                "Reorder or drop it.",
                UnusedRuleWarning,
                stacklevel=2,
            )
        for p in fresh:
            owner[id(p)] = i
        fresh_ids = {id(p) for p in fresh}
        for inside, outside in picked.tied:
            if id(param_by_name[inside]) in fresh_ids:
                warnings.warn(
                    f"rule {selector_label(sel)!r} reaches {inside!r}, which is tied to "
                    f"{outside!r} (one tensor): its settings apply under both names.",
                    TiedWeightWarning,
                    stacklevel=2,
                )

    no_decay = tuple(no_decay)
    nd_ids = _no_decay_ids(idx, no_decay, warn=no_decay != ("bias", "norm"))

    depth_of: dict[int, tuple[int, str]] = {}
    n_layers = 0
    if layers is not None and layer_decay is None:
        raise TorchfreezeError("layers= only sets the depth levels for layer_decay; pass both.")
    if layer_decay is not None:
        if layers is None:
            from . import _layers  # the parameter layers= shadows the function

            levels = [(layer.name, list(layer.param_names))
                      for layer in _layers.layers(model, example_inputs=example_inputs)]
        else:
            levels = []
            for level in layers:
                sel = getattr(level, "param_names", level)
                names = resolve(model, [sel], index=idx, allow_empty=False,
                                what="layers= level").param_names
                levels.append((getattr(level, "name", None) or selector_label(sel), list(names)))
        n_layers = len(levels)
        for i, (lname, names) in enumerate(levels):
            for pname in names:
                depth_of.setdefault(id(idx.params[pname]), (i, lname))
        missing = [n for n, p in trainable if id(p) not in depth_of]
        if missing:
            raise TorchfreezeError(
                f"layers= leaves {len(missing)} trainable parameters without a depth level "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); add them to "
                "a level (the last level is the head)."
            )

    merged: dict[Any, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for pname, p in trainable:
        rule_i = owner.get(id(p))
        opts = rule_list[rule_i][1] if rule_i is not None else {}
        name_parts: list[str] = []
        if id(p) in depth_of:
            level, lname = depth_of[id(p)]
            decay = 1.0 if layer_decay is None else layer_decay  # depth_of is empty without it
            p_lr = lr * decay ** (n_layers - 1 - level)
            name_parts.append(lname)
        else:
            p_lr = lr
        if rule_i is not None:
            name_parts.append(selector_label(rule_list[rule_i][0]))
        if "lr" in opts:
            p_lr = opts["lr"]
        elif "lr_mult" in opts:
            p_lr = p_lr * opts["lr_mult"]
        if "weight_decay" in opts:
            p_wd = opts["weight_decay"]
        elif id(p) in nd_ids:
            p_wd = 0.0
            if weight_decay:
                name_parts.append("no_decay")
        else:
            p_wd = weight_decay * opts.get("decay_mult", 1.0)
        settings = {k: v for k, v in opts.items() if k not in ("lr_mult", "decay_mult")}
        settings["lr"] = p_lr
        settings["weight_decay"] = p_wd
        key = tuple(sorted((k, repr(v)) for k, v in settings.items())) if merge else id(p)
        group = merged.get(key)
        if group is None:
            group = {"params": [], "name": None, "param_names": [], "_names": [], **settings}
            merged[key] = group
            out.append(group)
        group["params"].append(p)
        group["param_names"].append(pname)
        label = "/".join(name_parts) or "default"
        if label not in group["_names"]:
            group["_names"].append(label)
    for group in out:
        labels = group.pop("_names")
        group["name"] = "+".join(labels) if len(labels) <= 3 else (
            f"{labels[0]}+{len(labels) - 1} more"
        )
    return out
