"""The doctor: :func:`check` names every known fine-tuning pitfall it can see.

It reads the model, the optimizer's groups and state, the LR scheduler and the
gradients present right now, and changes none of them. Each problem is a
:class:`Finding` with a code, a severity, where it is, what PyTorch does there
(one sentence) and the torchfreeze call that fixes it.

The recommended habit is one line after the first ``backward()`` of a run::

    tfz.check(model, optimizer).raise_for_errors()

Codes:

==========================  ========  ===========================================
code                        severity  meaning
==========================  ========  ===========================================
``all-frozen``              error     no parameter is trainable
``frozen-in-optimizer``     error     a frozen parameter that will move (it has a
                                      ``.grad``, optimizer state or weight decay)
                            warning   ... that is inert for now
``stale-grad``              error     a frozen parameter in the optimizer holds a
                                      ``.grad`` (zeros too)
                            warning   ... outside the optimizer (memory only)
``ignored-group-key``       error     ``requires_grad``/``frozen``/``trainable`` or
                                      another optimizer's option in a param group
                            warning   any other key the optimizer does not read
``no-grad-reached``         error     after a backward, trainable parameters got
                                      no gradient
``bn-stats-drift``          warning   a BN layer with frozen affine parameters in
                                      train mode (its statistics move)
                            info      ... the same by choice (``bn="stats"``), or in
                                      eval now but not pinned
``not-in-optimizer``        error     a trainable parameter is in no group
``duplicate-param``         error     a parameter is in the optimizer twice
``foreign-param``           warning   the optimizer holds tensors the model does
                                      not have (built before a copy or re-shard)
``wrapped-before-freeze``   error     a DDP wrapper built for another set of
                                      trainable parameters than the current one
``scheduler-mismatch``      error     the LR scheduler drives another optimizer or
                                      another number of param groups
``dropout-in-frozen``       info      dropout active inside a frozen region
``random-in-frozen``        info      with ``example_inputs``: a random op ran inside
                                      a frozen region (``DropPath``, ``F.dropout``,
                                      ``torch.rand*``), seen by the ops that ran
==========================  ========  ===========================================
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from ._compat import ddp_delays_all_reduce, ddp_logging_data, nested_schedulers
from ._random_ops import DROPOUT, RandomOps
from ._report import Report
from ._select import ModelIndex
from ._wrappers import unwrap_optimizer
from .errors import CheckError, ModelTypeError, TorchfreezeError
from .norm import FrozenBatchNorm, bn_policy, is_batchnorm

__all__ = ["CODES", "CheckError", "Diagnosis", "Finding", "check"]

Severity = Literal["error", "warning", "info"]
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

#: Every code :func:`check` can report, with a one-line meaning.
CODES: dict[str, str] = {
    "all-frozen": "no parameter is trainable",
    "frozen-in-optimizer": "a parameter with requires_grad=False is in an optimizer group",
    "stale-grad": "a frozen parameter still holds a .grad",
    "ignored-group-key": "a param group has a key the optimizer never reads",
    "no-grad-reached": "after a backward, trainable parameters got no gradient",
    "bn-stats-drift": "a BatchNorm layer with frozen affine parameters updates its statistics",
    "not-in-optimizer": "a trainable parameter is in no optimizer group",
    "duplicate-param": "a parameter appears in the optimizer more than once",
    "foreign-param": "the optimizer holds tensors that are not parameters of the model",
    "wrapped-before-freeze": "a DDP wrapper registered another set of trainable parameters",
    "scheduler-mismatch": "the LR scheduler does not match the optimizer's param groups",
    "dropout-in-frozen": "dropout is active inside a frozen region",
    "random-in-frozen": "a random op ran inside a frozen region (seen with example_inputs)",
}


@dataclass(frozen=True)
class Finding:
    """One problem :func:`check` found.

    Attributes:
        code: kebab-case identifier (see :data:`CODES`).
        severity: ``"error"`` (training is wrong), ``"warning"`` (probably wrong or
            wasteful) or ``"info"`` (worth knowing).
        where: the module, parameter or optimizer group concerned.
        message: what is wrong, and what PyTorch does there.
        fix: the call that fixes it.
        names: every parameter, buffer or module name concerned (``where`` may
            abbreviate them).
    """

    code: str
    severity: Severity
    where: str
    message: str
    fix: str
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code} at {self.where}: {self.message} Fix: {self.fix}"


@dataclass(frozen=True)
class Diagnosis(Report, Sequence["Finding"]):
    """What :func:`check` found: a sequence of :class:`Finding`, errors first.

    Attributes:
        findings: the findings.
        notes: what could not be checked and why (e.g. no backward seen yet).
    """

    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()

    @overload
    def __getitem__(self, i: int) -> Finding: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Finding]: ...
    def __getitem__(self, i: Any) -> Any:
        return self.findings[i]

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __contains__(self, item: object) -> bool:
        """``"stale-grad" in diagnosis`` tests for a code; a Finding tests membership."""
        if isinstance(item, str):
            return any(f.code == item for f in self.findings)
        return item in self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "codes": list(self.codes), **super().to_dict()}

    @property
    def codes(self) -> tuple[str, ...]:
        """The distinct codes found, in report order."""
        return tuple(dict.fromkeys(f.code for f in self.findings))

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    @property
    def ok(self) -> bool:
        """No errors and no warnings (info findings do not count)."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def find(self, code: str) -> list[Finding]:
        """The findings with this code."""
        return [f for f in self.findings if f.code == code]

    def raise_for_errors(self) -> Diagnosis:
        """Raise :class:`CheckError` listing every error finding; else return self.

        Example:
            >>> import torch.nn as nn, torchfreeze as tfz
            >>> tfz.check(nn.Linear(2, 2)).raise_for_errors().ok
            True
        """
        errs = self.errors
        if errs:
            lines = "\n".join(f"  - {f}" for f in errs)
            raise CheckError(
                f"tfz.check found {len(errs)} error{'s' if len(errs) != 1 else ''} in this "
                f"fine-tuning set-up:\n{lines}",
                findings=errs,
            )
        return self

    def _rich(self) -> RenderableType:
        if not self.findings:
            head = Text("torchfreeze check: no findings", style="bold green")
            return Group(head, *(Text(f"note: {n}", style="dim") for n in self.notes))
        counts = [
            f"{n} {sev}{'s' if n != 1 else ''}"
            for sev in ("error", "warning", "info")
            if (n := sum(f.severity == sev for f in self.findings))
        ]
        table = Table(title=f"torchfreeze check: {', '.join(counts)}", title_justify="left",
                      show_lines=True)
        table.add_column("severity")
        table.add_column("code")
        table.add_column("where", max_width=28, overflow="fold")
        table.add_column("what, and the fix", ratio=1)
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        for f in self.findings:
            body = Text(f.message)
            body.append("\nfix: ", style="bold")
            body.append(f.fix)
            table.add_row(Text(f.severity, style=style[f.severity]), f.code, f.where, body)
        return Group(table, *(Text(f"note: {n}", style="dim") for n in self.notes))


# ---------------------------------------------------------------------------
# helpers

_OptimizerLike = Any  # torch.optim.Optimizer, or a wrapper with .param_groups (Lightning, HF)


def _short(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _compact(names: Sequence[str], idx: ModelIndex) -> list[str]:
    """Parameter names -> the fewest module names covering exactly them.

    ``['block.0.weight', 'block.0.bias', 'block.1.weight', 'block.1.bias']`` ->
    ``['block']`` when those are all of ``block``'s parameters.
    """
    chosen = {id(idx.params[n]) for n in names if n in idx.params}
    covered: dict[str, bool] = {}

    def whole(mod_name: str) -> bool:
        if mod_name not in covered:
            mod = idx.modules.get(mod_name)
            ps = list(mod.parameters()) if mod is not None else []
            covered[mod_name] = bool(ps) and all(id(p) in chosen for p in ps)
        return covered[mod_name]

    out: dict[str, None] = {}  # ordered set
    for name in names:
        parts = name.split(".")
        pick = name
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            if whole(prefix):
                pick = prefix
                break
        out[pick] = None
    return list(out)


def _selector_text(names: Sequence[str], limit: int = 4) -> str:
    """Names as the argument list of a tfz call: ``"a", "b"``."""
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _group_label(gi: int, group: dict[str, Any], oi: int | None) -> str:
    label = f"group {gi}"
    if "name" in group:
        label += f" ({group['name']!r})"
    return label if oi is None else f"optimizer {oi} {label}"


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0] or "(root)"


# every option any torch optimizer takes: such a key in the wrong optimizer's group
# is a user who believes it has an effect
def _all_torch_optimizer_options() -> frozenset[str]:
    keys: set[str] = set()
    for attr in dir(torch.optim):
        cls = getattr(torch.optim, attr)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            try:
                sig = inspect.signature(cls.__init__)
            except (TypeError, ValueError):  # pragma: no cover - C-implemented or odd
                continue
            keys |= {k for k in sig.parameters if k not in ("self", "params", "args", "kwargs")}
    return frozenset(keys)


_TORCH_OPTIONS = _all_torch_optimizer_options()
# keys that torch.optim.lr_scheduler and swa_utils write into groups, that torch's
# optimizer itself adds (param_names, torch >= 2.6), torchfreeze's own group labels,
# and timm's per-group LR scale (read by timm's schedulers)
_KNOWN_EXTRA = frozenset({
    "params", "name", "param_names", "initial_lr", "max_lr", "min_lr", "base_lr",
    "max_momentum", "base_momentum", "swa_lr", "lr_scale",
})
_FREEZE_WORDS = frozenset({"requires_grad", "frozen", "freeze", "trainable"})


# ---------------------------------------------------------------------------
# the checks


def check(
    model: nn.Module,
    optimizer: _OptimizerLike | Sequence[_OptimizerLike] | None = None,
    scheduler: Any = None,
    *,
    example_inputs: Any = None,
) -> Diagnosis:
    """Find the known fine-tuning pitfalls in a model, its optimizer and scheduler.

    Reads, never changes: the model's ``requires_grad`` flags, train/eval modes,
    BN policies and current ``.grad`` values; the optimizer's param groups and
    state; the scheduler's bookkeeping; a DDP wrapper's registration. Some codes
    need a moment in training to be visible: ``no-grad-reached`` and
    ``stale-grad`` look at the gradients present, so the best moment to call it
    is right after the first ``backward()`` (before ``zero_grad``).

    Args:
        model: the model (a DDP/FSDP2-wrapped model works too).
        optimizer: an optimizer (or a list of them, when several train parts of
            the model); without one the optimizer checks are skipped.
        scheduler: the LR scheduler driving ``optimizer``.
        example_inputs: a batch to run the model on once (a tensor, a tuple of
            positional inputs or a dict of keyword inputs, as for
            :func:`~torchfreeze.layers`), under ``torch.no_grad()`` and in the
            model's current train/eval mode, to see which random ops run inside
            frozen modules (``random-in-frozen``: timm's ``DropPath``, a functional
            ``F.dropout``, ``torch.rand*``; by the ops themselves, the rule
            ``FeatureCache`` refuses a prefix by). The model is left exactly as it
            was: buffers (BatchNorm statistics) are swapped for copies during the
            pass, the RNG state is forked, modes and flags are restored.

    Returns:
        A :class:`Diagnosis`: a sequence of :class:`Finding`, errors first.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        TorchfreezeError: ``optimizer`` is not a torch optimizer (or a list of them),
            or the model raised on ``example_inputs``.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-3)  # before freezing: a bug
        >>> _ = tfz.freeze(net, "0")
        >>> tfz.check(net, opt).codes
        ('frozen-in-optimizer',)
        >>> try:
        ...     tfz.check(net, opt).raise_for_errors()
        ... except tfz.TorchfreezeError as err:
        ...     print(str(err).splitlines()[0])
        tfz.check found 1 error in this fine-tuning set-up:
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"tfz.check() expects the model (an nn.Module) first, got {type(model).__name__}. "
            "Call it as tfz.check(model, optimizer, scheduler)."
        )
    if optimizer is None:
        optimizers: list[Any] = []
    elif isinstance(optimizer, (list, tuple)):
        optimizers = list(optimizer)
    else:
        optimizers = [optimizer]
    for opt in optimizers:
        if not isinstance(getattr(opt, "param_groups", None), list):
            raise TorchfreezeError(
                f"tfz.check(): optimizer must be a torch optimizer (or a list of them), got "
                f"{type(opt).__name__} without a param_groups list. Pass the optimizer "
                "object itself, not its param groups or state_dict."
            )
    idx = ModelIndex(model)
    findings: list[Finding] = []
    notes: list[str] = []
    findings += _check_all_frozen(idx)
    membership = _membership(optimizers)
    if optimizers:
        findings += _check_optimizer_params(idx, optimizers, membership)
        findings += _check_group_keys(optimizers)
        findings += _check_not_in_optimizer(idx, membership)
    findings += _check_stale_grads(idx, membership if optimizers else None)
    grad_findings, grad_note = _check_no_grad_reached(idx)
    findings += grad_findings
    if grad_note:
        notes.append(grad_note)
    findings += _check_bn(idx)
    findings += _check_ddp(idx)
    if scheduler is not None:
        findings += _check_scheduler(scheduler, optimizers)
    dropout = _check_dropout(idx)
    findings += dropout
    if example_inputs is not None:
        named = {n for f in dropout for n in f.names}
        findings += _check_random(idx, example_inputs, named)
    if not optimizers:
        notes.append("no optimizer given: optimizer checks (frozen-in-optimizer, "
                     "not-in-optimizer, ignored-group-key, duplicate-param) skipped")
    findings.sort(key=lambda f: _SEVERITY_ORDER[f.severity])
    return Diagnosis(findings=tuple(findings), notes=tuple(notes))


def _check_all_frozen(idx: ModelIndex) -> list[Finding]:
    params = list(idx.params.values())
    if not params or any(p.requires_grad for p in params):
        return []
    last = [n for n, _ in idx.model.named_children()][-1:] or [""]
    return [Finding(
        "all-frozen", "error", "model",
        f"all {len(params)} parameters of {idx.describe()} have requires_grad=False, so "
        "nothing can train and backward() raises 'element 0 of tensors does not require "
        "grad'.",
        f'tfz.unfreeze(model, "{last[0]}") or tfz.freeze_to(model, -1) (train the head)',
        names=tuple(idx.params),
    )]


# param id -> list of (optimizer index, group index)
def _membership(optimizers: list[Any]) -> dict[int, list[tuple[int, int]]]:
    where: dict[int, list[tuple[int, int]]] = {}
    for oi, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                where.setdefault(id(p), []).append((oi, gi))
    return where


def _state_of(opt: Any, p: torch.Tensor) -> dict[str, Any]:
    state = getattr(opt, "state", None)
    try:
        return dict(state.get(p, {})) if state is not None else {}
    except TypeError:  # pragma: no cover - a state mapping keyed otherwise
        return {}


def _check_optimizer_params(
    idx: ModelIndex, optimizers: list[Any], membership: dict[int, list[tuple[int, int]]]
) -> list[Finding]:
    from ._managed import managed

    out: list[Finding] = []
    many = len(optimizers) > 1
    kept = managed()
    foreign: list[tuple[str, tuple[int, ...]]] = []
    for oi, opt in enumerate(optimizers):
        real = unwrap_optimizer(opt)
        for gi, group in enumerate(opt.param_groups):
            label = _group_label(gi, group, oi if many else None)
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            moving: list[str] = []
            inert: list[str] = []
            reasons: set[str] = set()
            has_grad = False
            for p in group["params"]:
                name = idx.param_name.get(id(p))
                if name is None:
                    foreign.append((label, tuple(p.shape)))
                    continue
                if p.requires_grad:
                    continue
                state = _state_of(real, p)
                if id(p) in kept and p.grad is None and not state:
                    continue  # inactive in a RotatingFreeze: step() skips it, by design
                why = []
                if p.grad is not None:
                    why.append("a .grad")
                    has_grad = True
                if state:
                    why.append(f"{type(real).__name__} state ({', '.join(sorted(state))})")
                if wd:
                    why.append(f"weight_decay={wd:g}")
                if why:
                    moving.append(name)
                    reasons.update(why)
                else:
                    inert.append(name)
            if moving:
                out.append(Finding(
                    "frozen-in-optimizer", "error", label,
                    f"{len(moving)} frozen parameters ({_short(_compact(moving, idx))}) are in "
                    f"this group with {'; '.join(sorted(reasons))}, so "
                    + ("the next step() moves them. " if has_grad else
                       "they move as soon as they hold a .grad again. ")
                    + "requires_grad=False only stops new gradients; step() still applies "
                    "momentum, Adam moments and weight decay to any parameter that has a .grad "
                    "(a zero one from zero_grad(set_to_none=False) included).",
                    "build the optimizer from the trainable parameters only: "
                    "torch.optim.AdamW(tfz.param_groups(model, lr=...)); "
                    f"tfz.freeze(model, {_selector_text(_compact(moving, idx))}) also clears "
                    "their .grad",
                    names=tuple(moving),
                ))
            if inert:
                out.append(Finding(
                    "frozen-in-optimizer", "warning", label,
                    f"{len(inert)} frozen parameters ({_short(_compact(inert, idx))}) are in this "
                    "group. They have no .grad, state or weight decay, so step() skips them "
                    "for now, but any stale .grad makes them move again.",
                    "torch.optim.AdamW(tfz.param_groups(model, lr=...)) puts frozen "
                    "parameters in no group",
                    names=tuple(inert),
                ))
    for pid, places in membership.items():
        if len(places) > 1:
            name = idx.param_name.get(pid, "a tensor outside the model")
            where = ", ".join(
                _group_label(gi, optimizers[oi].param_groups[gi], oi if many else None)
                for oi, gi in places
            )
            out.append(Finding(
                "duplicate-param", "error", name,
                f"{name} is in the optimizer {len(places)} times ({where}), so every step() "
                "updates it more than once (and torch only warns about it for one group).",
                "torch.optim.AdamW(tfz.param_groups(model, ...)) puts each parameter in "
                "exactly one group",
                names=(name,),
            ))
    if foreign:
        shapes = ", ".join(f"{shape} in {label}" for label, shape in foreign[:3])
        out.append(Finding(
            "foreign-param", "warning", foreign[0][0],
            f"the optimizer holds {len(foreign)} tensors that are not parameters of "
            f"{idx.describe()} ({shapes}{', ...' if len(foreign) > 3 else ''}). An optimizer "
            "built before deepcopy(model), fully_shard(model) or a module swap keeps "
            "updating the old tensors, and the model never changes.",
            "build the optimizer after the model is in its final form (wrapped, sharded, "
            "heads replaced): torch.optim.AdamW(tfz.param_groups(model, ...))",
        ))
    return out


def _check_group_keys(optimizers: list[Any]) -> list[Finding]:
    out: list[Finding] = []
    many = len(optimizers) > 1
    for oi, opt in enumerate(optimizers):
        real = unwrap_optimizer(opt)
        defaults = set(getattr(real, "defaults", {}) or {})
        known = defaults | _KNOWN_EXTRA
        kind = type(real).__name__
        for gi, group in enumerate(opt.param_groups):
            unknown = [k for k in group if k not in known]
            if not unknown:
                continue
            label = _group_label(gi, group, oi if many else None)
            for key in unknown:
                value = group[key]
                if key in _FREEZE_WORDS:
                    out.append(Finding(
                        "ignored-group-key", "error", label,
                        f"param group key {key!r}={value!r} is ignored: an optimizer has no "
                        "such option (only a tensor's requires_grad decides whether it gets a "
                        "gradient), so these parameters still train.",
                        "freeze the parameters instead: tfz.freeze(model, <their names>), "
                        "and build the optimizer with tfz.param_groups(model, ...)",
                    ))
                elif key in _TORCH_OPTIONS and defaults:
                    out.append(Finding(
                        "ignored-group-key", "error", label,
                        f"param group key {key!r}={value!r} is an option of other torch "
                        f"optimizers, but {kind} never reads it, so it has no effect. "
                        f"{kind} reads: {', '.join(sorted(defaults))}.",
                        f"remove {key!r}, or use an optimizer that has it",
                    ))
                else:
                    out.append(Finding(
                        "ignored-group-key", "warning", label,
                        f"param group key {key!r} is not read by {kind} (its options: "
                        f"{', '.join(sorted(defaults)) or 'unknown'}); PyTorch keeps unknown "
                        "keys without a word, so a typo here silently does nothing.",
                        f"remove {key!r} (or fix its spelling); per-group settings come out "
                        "right from tfz.param_groups(model, rules=...)",
                    ))
    return out


def _check_not_in_optimizer(
    idx: ModelIndex, membership: dict[int, list[tuple[int, int]]]
) -> list[Finding]:
    missing = [n for n, p in idx.params.items() if p.requires_grad and id(p) not in membership]
    if not missing:
        return []
    mods = _compact(missing, idx)
    return [Finding(
        "not-in-optimizer", "error", _short(mods, 2),
        f"{len(missing)} trainable parameters ({_short(mods)}) are in no optimizer group: "
        "they get gradients (compute and memory) but step() never updates them. Typical "
        "cause: unfreezing after the optimizer was built.",
        f"tfz.unfreeze(model, {_selector_text(mods)}, optimizer=optimizer) adds them as a new "
        f"group; or tfz.freeze(model, {_selector_text(mods)}) if they should not train",
        names=tuple(missing),
    )]


def _check_stale_grads(
    idx: ModelIndex, membership: dict[int, list[tuple[int, int]]] | None
) -> list[Finding]:
    stale = [n for n, p in idx.params.items() if not p.requires_grad and p.grad is not None]
    if not stale:
        return []
    in_opt = [n for n in stale if membership is not None and id(idx.params[n]) in membership]
    out_opt = [n for n in stale if n not in in_opt]
    out: list[Finding] = []
    semantics = (
        "requires_grad=False stops new gradients but keeps an old .grad; "
        "zero_grad(set_to_none=False) turns it into zeros, and step() still applies "
        "momentum, Adam moments and weight decay to a zero gradient."
    )
    if in_opt:
        mods = _compact(in_opt, idx)
        out.append(Finding(
            "stale-grad", "error", _short(mods, 2),
            f"{len(in_opt)} frozen parameters in the optimizer still hold a .grad "
            f"({_short(mods)}). {semantics}",
            f"tfz.freeze(model, {_selector_text(mods)}) clears .grad (set to None); and use "
            "optimizer.zero_grad(set_to_none=True)",
            names=tuple(in_opt),
        ))
    if out_opt:
        mods = _compact(out_opt, idx)
        out.append(Finding(
            "stale-grad", "warning", _short(mods, 2),
            f"{len(out_opt)} frozen parameters still hold a .grad ({_short(mods)}). "
            + ("They are in no optimizer given here, so it costs memory only; "
               if membership is not None else "")
            + semantics,
            f"tfz.freeze(model, {_selector_text(mods)}) clears .grad (set to None)",
            names=tuple(out_opt),
        ))
    return out


def _check_no_grad_reached(idx: ModelIndex) -> tuple[list[Finding], str | None]:
    trainable = {n: p for n, p in idx.params.items() if p.requires_grad}
    if not any(p.grad is not None for p in trainable.values()):
        return [], ("no trainable parameter holds a gradient (no backward yet, or "
                    "zero_grad(set_to_none=True) ran): no-grad-reached not checked; call "
                    "check() right after backward()")
    without = [n for n, p in trainable.items() if p.grad is None]
    if not without:
        return [], None
    # first module in definition order (named_modules order == forward order for
    # the sequential models where this bug lives)
    order = {name: i for i, name in enumerate(idx.modules)}
    owners = list(dict.fromkeys(_owner(n) for n in without))
    owners.sort(key=lambda m: order.get(m if m != "(root)" else "", -1))
    first = owners[0]
    mods = _compact(without, idx)
    others = [m for m in mods if m != first and not m.startswith(first + ".")]
    return [Finding(
        "no-grad-reached", "error", first,
        f"after backward(), {len(without)} trainable parameters got no gradient, first in "
        f"'{first}'" + (f" (also {_short(others)})" if others else "") + ". Likely causes: "
        f"'{first}' or a module after it runs under torch.no_grad() or its output is "
        ".detach()ed, which cuts the graph so nothing before it gets a gradient "
        "(requires_grad=False on a layer does not: gradients still flow through it); "
        "reentrant torch.utils.checkpoint with inputs that do not require grad; or the "
        "module is not used in forward at all.",
        f"remove the no_grad/detach and freeze what must not train with tfz.freeze(model, "
        f'"<that module>"); use checkpoint(..., use_reentrant=False); if \'{first}\' is '
        f'unused on purpose, tfz.freeze(model, "{first}")',
        names=tuple(without),
    )], None


def _check_bn(idx: ModelIndex) -> list[Finding]:
    out: list[Finding] = []
    for name, m in idx.modules.items():
        if not is_batchnorm(m) or isinstance(m, FrozenBatchNorm):
            continue
        if getattr(m, "running_mean", None) is None:
            continue
        policy = bn_policy(m)
        if policy == "eval":
            continue
        own = [p for p in m.parameters(recurse=False)]
        if not own or any(p.requires_grad for p in own):
            continue  # trainable BN (or no affine: we cannot tell it is frozen)
        label = name or "(root)"
        momentum = "cumulative average" if m.momentum is None else f"momentum {m.momentum}"
        if policy == "stats":
            out.append(Finding(
                "bn-stats-drift", "info", label,
                f"{type(m).__name__} '{label}' has frozen affine parameters and its running "
                f"statistics keep updating ({momentum}) in train mode, as chosen with "
                'bn="stats".',
                f'tfz.freeze(model, "{label}", bn="eval") to keep them fixed instead',
                names=(label,),
            ))
        elif m.training:
            out.append(Finding(
                "bn-stats-drift", "warning", label,
                f"{type(m).__name__} '{label}' has frozen affine parameters but is in train "
                f"mode, so every forward pass moves its running_mean/running_var ({momentum}) "
                "and normalises with batch statistics: requires_grad=False does not stop "
                "that, only eval() does, and the next model.train() undoes a manual eval().",
                f'tfz.freeze(model, "{label}") pins it in eval (bn="eval"); bn="stats" if the '
                "drift is wanted",
                names=(label,),
            ))
        else:
            out.append(Finding(
                "bn-stats-drift", "info", label,
                f"{type(m).__name__} '{label}' has frozen affine parameters and is in eval "
                "mode now, but nothing pins it: the next model.train() puts it back in train "
                "mode and its running statistics start moving.",
                f'tfz.freeze(model, "{label}") pins it in eval through every model.train()',
                names=(label,),
            ))
    return out


def _ddp_registered(ddp: Any) -> tuple[int, int] | None:
    """(tensor count, bytes) of the parameters DDP's reducer was built for.

    DDP keeps no Python-visible list of them; the numbers it logged at
    construction (``num_parameter_tensors``, ``total_parameter_size_bytes``)
    are exactly those of ``_build_params_for_reducer()`` at that time.
    """
    if ddp_delays_all_reduce(ddp, all_params=True) or not hasattr(ddp, "logger"):
        return None
    try:
        data = ddp_logging_data(ddp)
        return int(data["num_parameter_tensors"]), int(data["total_parameter_size_bytes"])
    except (KeyError, TypeError, ValueError):  # pragma: no cover - its logged keys changed
        return None


def _ddp_current(ddp: Any) -> tuple[list[str], int]:
    ignore = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    seen: set[int] = set()
    names: list[str] = []
    nbytes = 0
    # mirrors DistributedDataParallel._build_params_for_reducer (torch 2.13),
    # without its side effects
    for mname, mod in ddp.module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or f"{mname}.{pname}" in ignore or id(p) in seen:
                continue
            seen.add(id(p))
            names.append(f"{mname}.{pname}" if mname else pname)
            nbytes += p.numel() * p.element_size()
    return names, nbytes


def _check_ddp(idx: ModelIndex) -> list[Finding]:
    from torch.nn.parallel import DistributedDataParallel

    out: list[Finding] = []
    for name, m in idx.wrappers:
        if not isinstance(m, DistributedDataParallel):
            continue
        registered = _ddp_registered(m)
        if registered is None:
            continue
        count, nbytes = registered
        names, now_bytes = _ddp_current(m)
        if (len(names), now_bytes) == (count, nbytes):
            continue
        label = name or "(the model)"
        if len(names) < count or (len(names) == count and now_bytes < nbytes):
            what = (f"fewer trainable tensors now ({len(names)}, {now_bytes} bytes) than when it "
                    f"was wrapped ({count}, {nbytes} bytes): parameters were frozen after "
                    "wrapping, and DDP's reducer still waits for their gradients (an error on "
                    "the next iteration, or a hang with find_unused_parameters=False)")
        else:
            what = (f"more trainable tensors now ({len(names)}, {now_bytes} bytes) than when it "
                    f"was wrapped ({count}, {nbytes} bytes): parameters were unfrozen after "
                    "wrapping; their gradients are never all-reduced, so ranks silently "
                    "diverge")
        out.append(Finding(
            "wrapped-before-freeze", "error", label,
            f"DistributedDataParallel {label} has {what}. DDP registers the trainable set "
            "once, when it is built.",
            "torchfreeze.distributed.unfreeze(ddp_model, ...) re-wraps; or freeze/unfreeze "
            "ddp_model.module and build DistributedDataParallel again",
        ))
    return out


def _check_scheduler(scheduler: Any, optimizers: list[Any]) -> list[Finding]:
    if isinstance(scheduler, (list, tuple)):
        return [f for s in scheduler for f in _check_scheduler(s, optimizers)]
    children = nested_schedulers(scheduler)  # SequentialLR, ChainedScheduler
    if children:
        return _check_scheduler(children, optimizers)
    sched_opt = getattr(scheduler, "optimizer", None)
    kind = type(scheduler).__name__
    if sched_opt is None:
        return []
    groups = getattr(sched_opt, "param_groups", None)
    # compare the group lists: wrappers (Lightning, accelerate) share the inner list
    if optimizers and not any(groups is o.param_groups for o in optimizers):
        return [Finding(
            "scheduler-mismatch", "error", kind,
            f"the {kind} drives another optimizer ({type(sched_opt).__name__} object) than the "
            "one given, so scheduler.step() changes learning rates nobody uses.",
            "build the scheduler on the optimizer that trains the model",
        )]
    n_groups = len(groups or ())
    for attr in ("base_lrs", "min_lrs", "lr_lambdas", "max_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)) and len(values) != n_groups:
            return [Finding(
                "scheduler-mismatch", "error", kind,
                f"the {kind} knows {len(values)} param groups ({attr}) but the optimizer has "
                f"{n_groups}: a group added after the scheduler was built (e.g. by unfreezing) "
                "gets no schedule, or step() fails.",
                "tfz.unfreeze(model, ..., optimizer=optimizer, scheduler=scheduler) registers "
                "the new group with the scheduler",
            )]
    return []




def _frozen_prefix_boundary(idx: ModelIndex) -> str | None:
    """The last module of the model's frozen prefix in depth order (its leading fully
    frozen layer groups), as ``FeatureCache(model, upto=...)`` wants it; None when the
    model does not start with a frozen layer."""
    from ._layers import layers

    try:
        groups = layers(idx.model)
    except TorchfreezeError:
        return None
    boundary = None
    for group in groups:
        if not group.param_names or any(idx.params[n].requires_grad
                                        for n in group.param_names if n in idx.params):
            break
        if group.name in idx.modules:
            boundary = group.name
    return boundary


def _eval_fix(idx: ModelIndex) -> str:
    """How to keep the frozen modules in eval: the cache over the frozen prefix
    (``pin_eval=True`` pins it through every ``model.train()``), or by hand."""
    boundary = _frozen_prefix_boundary(idx)
    if boundary is not None:
        return (f"tfz.FeatureCache(model, upto='{boundary}', pin_eval=True) keeps the whole "
                f"frozen prefix (up to and including '{boundary}') in eval through every "
                "model.train() and caches it")
    return ("the frozen modules do not form a prefix of the model (a trainable layer "
            "runs first), so they cannot be cached; call .eval() on them after each "
            "model.train()")


def _check_dropout(idx: ModelIndex) -> list[Finding]:
    frozen_region: dict[str, bool] = {}
    for name, m in idx.modules.items():
        ps = list(m.parameters())
        frozen_region[name] = bool(ps) and not any(p.requires_grad for p in ps)
    if not any(frozen_region.values()):
        return []
    regions: list[str] = []
    drops: list[str] = []
    for name, m in idx.modules.items():
        if not name or not frozen_region.get(name) or any(
            name.startswith(r + ".") for r in regions
        ):
            continue
        parent = name.rpartition(".")[0]
        if frozen_region.get(parent) and parent:
            continue  # report the outermost frozen region only
        found = [
            f"{name}.{sub}" for sub, d in m.named_modules()
            if sub and isinstance(d, DROPOUT) and d.training and d.p > 0
        ]
        if found:
            regions.append(name)
            drops += found
    if not drops:
        return []
    # One finding for the whole frozen part: the fix is one cache over the whole frozen
    # prefix (caching a middle layer would replay inputs that upstream dropout randomised).
    cache = _eval_fix(idx)
    return [Finding(
        "dropout-in-frozen", "info", _short(regions, 3),
        f"{len(drops)} dropout layers in frozen modules are active ({_short(drops, 2)}): "
        "train mode randomises their output every step. Often wanted (regularisation), but "
        "the frozen features are then not deterministic and cannot be cached.",
        f"keep it if you want the regularisation; for fixed features, {cache}",
        names=tuple(drops),
    )]


def _random_draws(idx: ModelIndex, example_inputs: Any) -> list[tuple[str, str, str]]:
    """(module, op, kind) of every random op that ran inside a frozen region during one
    forward on ``example_inputs``, each once, in order; the model is left as it was.

    The op rule is ``_random_ops`` (FeatureCache refuses a prefix by it). A draw is
    named after the innermost module running it; it is in a frozen region when the
    innermost running module that has parameters has no trainable one (a
    parameter-less ``DropPath`` belongs to the block that calls it)."""
    from ._layers import call_model
    from ._snapshot import isolated

    model = idx.model
    frozen: dict[int, bool | None] = {}
    for m in idx.modules.values():
        ps = list(m.parameters())
        frozen[id(m)] = not any(p.requires_grad for p in ps) if ps else None
    stack: list[nn.Module] = []

    def where() -> str | None:
        for m in reversed(stack):
            state = frozen.get(id(m))
            if state is not None:
                return idx.module_name.get(id(stack[-1])) if state else None
        return None

    def push(module: nn.Module, *_: Any) -> None:
        stack.append(module)

    def pop(module: nn.Module, *_: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    handles = []
    for m in idx.modules.values():
        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop, always_call=True))
    detector = RandomOps(where, every=True)
    try:
        with isolated(model), torch.no_grad(), detector:
            call_model(model, example_inputs)
    except Exception as exc:
        raise TorchfreezeError(
            f"tfz.check(example_inputs=...): the model raised {type(exc).__name__} on the "
            f"example inputs: {exc}. Pass what the model takes: a tensor (model(x)), a tuple "
            "(model(*x)) or a dict (model(**x))."
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return [(name, op, kind) for name, op, kind in detector.seen]


def _check_random(idx: ModelIndex, example_inputs: Any, named: set[str]) -> list[Finding]:
    """``random-in-frozen``: the random ops that ran inside frozen modules, besides those
    ``dropout-in-frozen`` names already (a dropout module, or a module applying its
    dropout child's ``p`` functionally, as Hugging Face attention does) and BatchNorm
    layers' batch statistics (``bn-stats-drift``'s)."""
    draws: dict[str, list[str]] = {}
    for name, op, kind in _random_draws(idx, example_inputs):
        module = idx.modules.get(name)
        if name in named or (kind == "batch-stats" and module is not None
                             and is_batchnorm(module)):
            continue
        if kind == "random" and module is not None and any(
                f"{name}.{child}".lstrip(".") in named for child, c in module.named_children()
                if isinstance(c, DROPOUT)):
            continue
        what = "batch statistics" if kind == "batch-stats" else op
        draws.setdefault(name, [])
        if what not in draws[name]:
            draws[name].append(what)
    if not draws:
        return []
    modules = list(draws)
    shown = [f"'{n or '(root)'}' ({', '.join(ops)})" for n, ops in draws.items()]
    in_eval = [n for n in modules if n in idx.modules and not idx.modules[n].training]
    msg = (f"random ops ran inside frozen modules on the example inputs: {_short(shown, 3)}. "
           "Their output is random at every step (stochastic depth / DropPath, functional "
           "dropout, torch.rand*, bernoulli), seen by the ops that ran, not by module class. "
           "Often wanted (regularisation), but the frozen features are then not "
           "deterministic and cannot be cached: FeatureCache refuses such a prefix.")
    fixes = ["keep it if you want the regularisation"]
    if len(in_eval) < len(modules):
        fixes.append(f"for fixed features, {_eval_fix(idx)}")
    if in_eval:
        one = len(in_eval) == 1
        msg += (f" {_short([repr(n) for n in in_eval], 2)} {'draws' if one else 'draw'} in "
                f"eval mode too, so eval pinning does not make {'it' if one else 'them'} "
                "deterministic.")
        fixes.append(f"switch the randomness of {_short([repr(n) for n in in_eval], 2)} off "
                     "in its own code or config before caching: eval mode does not")
    fix = "; ".join(fixes)
    return [Finding(
        "random-in-frozen", "info", _short([n or "(root)" for n in modules], 3), msg, fix,
        names=tuple(modules),
    )]
