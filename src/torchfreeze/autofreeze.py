"""AutoFreeze: freeze the leading layer groups once they stop learning.

Full fine-tuning keeps updating every layer to the end, but the early layers of
a pretrained model settle first (Liu, Agarwal and Venkataraman, *AutoFreeze:
Automatically Freezing Model Blocks to Accelerate Fine-tuning*, 2021).
:class:`AutoFreeze` watches each layer group's gradient norm during training
and freezes a growing *prefix* of :func:`torchfreeze.layers`: a frozen group
gets no backward, no gradient and no optimizer state, and with ``cache=True``
its forward is replayed from a :class:`~torchfreeze.FeatureCache`.

How a decision is made (``policy="gradnorm"``, :class:`GradNormRule`):

1. Every :meth:`AutoFreeze.step` adds each unfrozen group's gradient L2 norm
   to a per-group accumulator on the gradients' device (one
   ``torch._foreach_norm``, via ``_compat``, over all gradients plus one
   ``index_add_``; no host synchronisation per step).
2. Every ``interval`` steps the accumulated norms are read once (under DDP:
   averaged over ranks first), and the rule computes each group's change rate
   ``r = |prev - cur| / prev`` against the previous interval.
3. A group is *below* when its rate is under the ``percentile`` of the
   unfrozen groups' rates. The leading unfrozen groups that have been below
   for ``patience`` consecutive intervals are frozen, at most
   ``max_per_decision`` per interval, never in the first ``warmup`` intervals,
   never the last group (the head).

The guards (``warmup``, ``patience``, ``max_per_decision``) are not in the
paper; docs/benchmarks.md (the guards' section) shows the rates measured on the demo's
workload (MiniLM on BBC News) that motivate them.

Any ``callable(stats) -> int`` can replace the rule (``stats`` is a
:class:`FreezeStats`): it returns how many leading groups should be frozen
now, and the value is clamped (freezing never shrinks and never reaches the
head). A FreezeOut-style fixed schedule is one line::

    policy=lambda s: (len(s.groups) - 1) * s.step // total_steps

What freezing a group does: ``requires_grad=False`` and ``.grad = None`` (as
:func:`torchfreeze.freeze`), its BatchNorm layers pinned in eval and, with
``pin_eval=True`` (default), the whole group pinned in eval through every
``model.train()`` (dropout off: the frozen prefix becomes a deterministic
function of the input, which caching needs); its parameters leave the
optimizer's param groups and their optimizer state is deleted. No param group
is removed (an emptied one stays, with no parameters), so every per-group list
an LR scheduler keeps stays aligned and the remaining parameters follow their
schedule exactly as before.

Resume::

    model, optimizer, scheduler = build()          # exactly as at the start
    af = tfz.AutoFreeze(model, optimizer, ...)       # same arguments
    af.load_state_dict(ckpt["autofreeze"])           # re-freezes the saved prefix
    optimizer.load_state_dict(ckpt["optimizer"])     # now its groups match
    scheduler.load_state_dict(ckpt["scheduler"])
    model.load_state_dict(ckpt["model"])
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union

import torch
from torch import nn

from ._compat import foreach_norm
from ._freeze import freeze
from ._pinning import pin
from ._report import Report
from ._select import ModelIndex, resolve
from ._state import check_format, register
from ._wrappers import is_ddp, unwrap_optimizer
from .errors import FreezeStateError, TorchfreezeError

if TYPE_CHECKING:  # imported on first use: AutoFreeze without cache=True never needs it
    from .cache import FeatureCache

__all__ = ["AutoFreeze", "FreezeStats", "GradNormRule", "IntervalRecord"]

STATE_FORMAT = register("torchfreeze.autofreeze", "AutoFreeze.state_dict()")
STATE_VERSION = 1


@dataclass(frozen=True)
class FreezeStats:
    """What a freezing policy sees at the end of each interval.

    Attributes:
        step: optimizer steps taken so far (``af.step()`` calls).
        frozen: how many leading groups are frozen now.
        grad_norms: group name -> sum over the interval of the group's per-step
            gradient L2 norm, for every unfrozen group (head included).
        groups: every group's name, in order (the head last).
        interval: how many intervals have ended, this one included (1-based).
        steps_in_interval: steps that contributed to ``grad_norms``.
    """

    step: int
    frozen: int
    grad_norms: dict[str, float]
    groups: tuple[str, ...]
    interval: int
    steps_in_interval: int


class Policy(Protocol):
    def __call__(self, stats: FreezeStats) -> int: ...


PolicyArg = Union[Literal["gradnorm"], Callable[[FreezeStats], int]]


def _percentile(values: Sequence[float], q: float) -> float:
    """``numpy.percentile(values, q)`` (linear interpolation), without numpy."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class GradNormRule:
    """AutoFreeze's gradient-norm rule with robustness guards (the default policy).

    Called once per interval with the accumulated per-group gradient norms, it
    returns how many leading groups should be frozen. See the module docstring
    for the rule; the guards:

    Args:
        percentile: a group is *below* when its change rate is strictly under
            this percentile (0-100) of the unfrozen groups' rates.
        warmup: intervals at the start in which nothing is frozen and nothing
            counts towards ``patience`` (the learning rate warms up and every
            group's gradient changes fast; rates there say little).
        patience: consecutive intervals a group must be below before it freezes.
        max_per_decision: at most this many groups freeze at one interval's end.
        normalize: compare each group's *share* of the unfrozen groups' total norm
            (previous interval: over the same groups) instead of its norm. Removes the
            common mode: on MiniLM/BBC News all groups' norms rise and fall together
            with the batches' difficulty (docs/benchmarks.md).

    Example:
        >>> from torchfreeze.autofreeze import FreezeStats, GradNormRule
        >>> rule = GradNormRule(warmup=0, patience=1)
        >>> names = ("emb", "l0", "l1", "head")
        >>> def at(i, norms):
        ...     return FreezeStats(step=10 * i, frozen=0, grad_norms=dict(zip(names, norms)),
        ...                        groups=names, interval=i, steps_in_interval=10)
        >>> rule(at(1, [1.0, 1.0, 1.0, 1.0]))   # no previous interval: no rate yet
        0
        >>> rule(at(2, [1.0, 0.5, 0.6, 0.4]))   # emb's gradient stopped changing
        1
    """

    def __init__(
        self,
        *,
        percentile: float = 50,
        warmup: int = 1,
        patience: int = 2,
        max_per_decision: int = 1,
        normalize: bool = False,
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not (
            0 < float(percentile) <= 100
        ):
            raise TorchfreezeError(
                f"percentile={percentile!r} must be a number in (0, 100]: a group freezes when "
                "its gradient change rate is below this percentile of the unfrozen groups' "
                "rates (AutoFreeze uses 50)."
            )
        for what, value, low in (("warmup", warmup, 0), ("patience", patience, 1),
                                 ("max_per_decision", max_per_decision, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise TorchfreezeError(f"{what}={value!r} must be an int >= {low}.")
        self.percentile: float = float(percentile)
        self.warmup: int = int(warmup)
        self.patience: int = int(patience)
        self.max_per_decision: int = int(max_per_decision)
        self.normalize: bool = bool(normalize)
        self.prev: dict[str, float] = {}
        self.streak: dict[str, int] = {}
        #: change rates and threshold of the last call (for logs and reports)
        self.rates: dict[str, float] = {}
        self.threshold: float | None = None

    def __call__(self, stats: FreezeStats) -> int:
        unfrozen = [g for g in stats.groups[stats.frozen:] if g in stats.grad_norms]
        cur = {g: float(stats.grad_norms[g]) for g in unfrozen}
        prev = {g: self.prev[g] for g in unfrozen if g in self.prev}
        self.prev = dict(cur)
        if self.normalize:
            cur, prev = _shares(cur), _shares(prev)
        rates: dict[str, float] = {}
        for g, c in cur.items():
            p = prev.get(g)
            if p is None:
                continue
            rates[g] = abs(p - c) / p if p > 0 else (0.0 if c == 0 else math.inf)
        self.rates = rates
        self.threshold = None
        if stats.interval <= self.warmup or not rates:
            self.streak = {}
            return stats.frozen
        finite = [r for g, r in rates.items() if math.isfinite(r) and cur[g] > 0]
        thr = _percentile(finite, self.percentile) if finite else math.inf
        self.threshold = thr
        for g in unfrozen:
            below = g in rates and (rates[g] < thr or cur[g] == 0)
            self.streak[g] = self.streak.get(g, 0) + 1 if below else 0
        n = stats.frozen
        last = len(stats.groups) - 1
        while (n < last and n - stats.frozen < self.max_per_decision
               and self.streak.get(stats.groups[n], 0) >= self.patience):
            n += 1
        return n

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (previous norms and streaks); floats round-trip exactly."""
        return {"prev": dict(self.prev), "streak": dict(self.streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = {str(k): float(v) for k, v in state.get("prev", {}).items()}
        self.streak = {str(k): int(v) for k, v in state.get("streak", {}).items()}

    def __repr__(self) -> str:
        return (f"GradNormRule(percentile={self.percentile:g}, warmup={self.warmup}, "
                f"patience={self.patience}, max_per_decision={self.max_per_decision}"
                + (", normalize=True)" if self.normalize else ")"))


def _shares(norms: dict[str, float]) -> dict[str, float]:
    total = sum(norms.values())
    return {g: v / total for g, v in norms.items()} if total > 0 else dict(norms)


@dataclass
class IntervalRecord(Report):
    """One interval's decision, kept in ``af.history``.

    Attributes:
        step: the step at which the interval ended.
        grad_norms: accumulated gradient norm per unfrozen group.
        rates: change rate per group (``policy="gradnorm"`` only).
        threshold: the percentile the rates were compared with (gradnorm only).
        frozen_before: frozen groups before the decision.
        frozen_after: frozen groups after it.
    """

    step: int
    grad_norms: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    frozen_before: int = 0
    frozen_after: int = 0

    def _rich(self) -> str:
        parts = [f"{g} {v:.3g}" + (f" (r={self.rates[g]:.2f})" if g in self.rates else "")
                 for g, v in self.grad_norms.items()]
        thr = f", threshold {self.threshold:.2f}" if self.threshold is not None else ""
        froze = (f"; froze {self.frozen_after - self.frozen_before}"
                 if self.frozen_after > self.frozen_before else "")
        return f"step {self.step}: " + ", ".join(parts) + thr + froze


class AutoFreeze:
    """Freeze a growing prefix of a model's layer groups as they stop learning.

    Call :meth:`step` after every ``optimizer.step()`` and before
    ``optimizer.zero_grad()`` (it reads the gradients). See the module
    docstring for the rule, what freezing does, and resume.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (then every
            rank must call :meth:`step` at the same steps; the norms are averaged
            over ranks and rank 0's decision is applied everywhere, re-wrapping
            through :func:`torchfreeze.distributed.freeze`: use ``af.model``).
        optimizer: the optimizer over the trainable parameters.
        layers: the groups, in depth order: ``tfz.layers(model)`` (default), a
            list of :class:`~torchfreeze.Layer`, or a list of selectors (one
            group each). The last group is the head and is never frozen.
        interval: steps per decision.
        policy: ``"gradnorm"`` (:class:`GradNormRule`) or a ``callable(stats) ->
            int`` returning the number of leading groups that should be frozen.
            A policy object with ``state_dict``/``load_state_dict`` is saved
            with the AutoFreeze state.
        percentile: ``"gradnorm"``'s percentile (AutoFreeze's 50).
        cache: replay the frozen prefix from a
            :class:`~torchfreeze.FeatureCache` (wrap each forward in
            :meth:`keys`).
        scheduler: the LR scheduler(s) driving ``optimizer``; checked to drive
            it (freezing keeps every param group, so schedulers stay aligned).
        warmup: ``"gradnorm"``: intervals before anything may freeze.
        patience: ``"gradnorm"``: consecutive intervals a group must be below.
        max_per_decision: ``"gradnorm"``: most groups frozen per interval.
        normalize: ``"gradnorm"``: rates of each group's share of the total norm
            (see :class:`GradNormRule`).
        pin_eval: keep frozen groups in eval mode (dropout off) through every
            ``model.train()``; required by ``cache=True``.

    Attributes:
        frozen: names of the frozen groups, in order (a prefix of the groups).
        events: ``[(step, group_name), ...]``: the group was frozen after
            ``step`` optimizer steps; from then on it is bit-identical.
        history: one :class:`IntervalRecord` per interval.
        freed_bytes: optimizer state released by freezing so far.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        >>> af = tfz.AutoFreeze(net, opt, interval=2, policy=lambda s: s.step // 2)
        >>> for _ in range(4):
        ...     net(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step(); _ = af.step(); opt.zero_grad()
        >>> af.frozen, af.events
        (['0', '1'], [(2, '0'), (4, '1')])
        >>> net[0].weight.requires_grad, len(opt.param_groups[0]["params"])
        (False, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        layers: Sequence[Any] | None = None,
        interval: int = 50,
        policy: PolicyArg = "gradnorm",
        percentile: float = 50,
        cache: bool = False,
        scheduler: Any = None,
        warmup: int = 1,
        patience: int = 2,
        max_per_decision: int = 1,
        normalize: bool = False,
        pin_eval: bool = True,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise TorchfreezeError(
                f"interval={interval!r} must be an int >= 1 (optimizer steps per decision; "
                "AutoFreeze evaluates every 50 steps or so)."
            )
        if policy == "gradnorm":
            self.policy: Callable[[FreezeStats], int] = GradNormRule(
                percentile=percentile, warmup=warmup, patience=patience,
                max_per_decision=max_per_decision, normalize=normalize,
            )
        elif callable(policy):
            self.policy = policy
        else:
            raise TorchfreezeError(
                f"policy={policy!r} is not a freezing policy: use 'gradnorm' or a "
                "callable(stats) -> int giving the number of leading groups to freeze now "
                "(e.g. lambda s: s.step // 1000)."
            )
        if cache and not pin_eval:
            raise TorchfreezeError(
                "cache=True needs pin_eval=True: a cached prefix must be deterministic, so "
                "its dropout must be off. Drop pin_eval=False, or cache=True."
            )
        opt = unwrap_optimizer(optimizer)
        if not hasattr(opt, "param_groups") or not hasattr(opt, "state"):
            raise TorchfreezeError(
                f"optimizer must be a torch.optim.Optimizer (got {type(optimizer).__name__}); "
                "AutoFreeze removes frozen parameters from its param groups and state."
            )
        _check_scheduler(scheduler, opt)
        self.model: nn.Module = model
        self.optimizer = optimizer
        self.scheduler: Any = scheduler
        self.interval: int = int(interval)
        self.cache: bool = bool(cache)
        self.pin_eval: bool = bool(pin_eval)
        self._opt: Any = opt
        module = self.module
        idx = ModelIndex(module)
        self._groups: list[tuple[str, list[str]]] = resolve_groups(module, layers, idx)
        self.groups: tuple[str, ...] = tuple(name for name, _ in self._groups)
        self._group_params: list[list[nn.Parameter]] = [
            [idx.params[n] for n in names] for _, names in self._groups
        ]
        # groups frozen before we started (e.g. by the user) count as the prefix
        n0 = 0
        while n0 < len(self._groups) - 1 and not any(
            p.requires_grad for p in self._group_params[n0]
        ):
            n0 += 1
        self._initial: int = n0
        self._n: int = n0
        self._step: int = 0
        self._intervals: int = 0
        self._acc: torch.Tensor | None = None
        self._acc_steps: int = 0
        self._seg_key: tuple[int, ...] | None = None
        self._seg: torch.Tensor | None = None
        self._warned_no_grad: bool = False
        self.events: list[tuple[int, str]] = []
        self.history: list[IntervalRecord] = []
        self.freed_bytes: int = 0
        self._caches: list[FeatureCache] = []
        self._retired: tuple[int, int] = (0, 0)
        self._pinned: list[nn.Module] = []

    # ------------------------------------------------------------------ views

    @property
    def module(self) -> nn.Module:
        """The underlying model (``model.module`` for a DDP wrapper)."""
        inner = self.model.module if is_ddp(self.model) else self.model
        assert isinstance(inner, nn.Module)
        return inner

    @property
    def frozen(self) -> list[str]:
        """Names of the frozen groups, in order."""
        return list(self.groups[: self._n])

    @property
    def num_frozen(self) -> int:
        return self._n

    @property
    def steps(self) -> int:
        """``af.step()`` calls so far."""
        return self._step

    def __repr__(self) -> str:
        return (f"AutoFreeze({len(self.groups)} groups, {self._n} frozen, step {self._step}, "
                f"interval={self.interval}, policy={self.policy!r})")

    # ------------------------------------------------------------------ step

    def step(self) -> list[str]:
        """Record this step's gradient norms; at an interval's end, decide and freeze.

        Returns:
            The names of the groups frozen by this call (usually none).
        """
        self._step += 1
        self._accumulate()
        if self._step % self.interval:
            return []
        return self._decide()

    def _accumulate(self) -> None:
        grads: list[torch.Tensor] = []
        seg: list[int] = []
        for gi in range(self._n, len(self._group_params)):
            for p in self._group_params[gi]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g.coalesce().values()
                grads.append(g)
                seg.append(gi)
        if not grads:
            if not self._warned_no_grad:
                self._warned_no_grad = True
                warnings.warn(
                    "AutoFreeze.step() found no gradient on any unfrozen parameter. Call it "
                    "after optimizer.step() and before optimizer.zero_grad(): it reads the "
                    "gradients of the step that was just taken.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        device = grads[0].device
        if self._acc is None:
            self._acc = torch.zeros(len(self._groups), dtype=torch.float32, device=device)
        key = tuple(seg)
        if key != self._seg_key or self._seg is None:
            # a host->device copy synchronises; it happens only when the set changes
            self._seg = torch.tensor(seg, dtype=torch.long).to(self._acc.device)
            self._seg_key = key
        norms = foreach_norm(grads)
        if all(n.dtype == torch.float32 and n.device == device for n in norms):
            sq = torch.stack(norms)
        else:
            sq = torch.stack([n.to(self._acc.device, torch.float32) for n in norms])
        sq = sq.to(self._acc.device).square_()
        per_group = torch.zeros_like(self._acc).index_add_(0, self._seg, sq)
        self._acc.add_(per_group.sqrt_())
        self._acc_steps += 1

    def _read_norms(self) -> list[float]:
        if self._acc is None:
            return [0.0] * len(self._groups)
        acc = self._acc
        group = self._process_group()
        if group is not None:
            import torch.distributed as dist

            acc = acc.to(_comm_device(group, acc.device), copy=True)
            dist.all_reduce(acc, group=group)
            acc.div_(dist.get_world_size(group))
        values = [float(v) for v in acc.tolist()]  # the one host sync per interval
        self._acc.zero_()
        return values

    def _process_group(self) -> Any:
        if is_ddp(self.model):
            return getattr(self.model, "process_group", None)
        return None

    def _decide(self) -> list[str]:
        self._intervals += 1
        values = self._read_norms()
        steps, self._acc_steps = self._acc_steps, 0
        norms = {self.groups[g]: values[g] for g in range(self._n, len(self.groups))}
        stats = FreezeStats(step=self._step, frozen=self._n, grad_norms=norms,
                            groups=self.groups, interval=self._intervals,
                            steps_in_interval=steps)
        want = self.policy(stats)
        if isinstance(want, bool) or not isinstance(want, numbers.Integral):
            raise TorchfreezeError(
                f"the AutoFreeze policy returned {want!r}; it must return an int: the number "
                f"of leading groups (of {len(self.groups)}) that should be frozen now."
            )
        target = max(self._n, min(int(want), len(self.groups) - 1))
        target = self._agree(target)
        record = IntervalRecord(step=self._step, grad_norms=norms, frozen_before=self._n,
                                frozen_after=target)
        if isinstance(self.policy, GradNormRule):
            record.rates = dict(self.policy.rates)
            record.threshold = self.policy.threshold
        self.history.append(record)
        if target <= self._n:
            return []
        names = list(self.groups[self._n:target])
        self._freeze_upto(target, record_events=True)
        return names

    def _agree(self, target: int) -> int:
        """Under DDP every rank applies rank 0's decision (a custom policy may differ)."""
        group = self._process_group()
        if group is None:
            return target
        import torch.distributed as dist

        device = self._acc.device if self._acc is not None else torch.device("cpu")
        t = torch.tensor([target], dtype=torch.long, device=_comm_device(group, device))
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
        return int(t.item())

    # ------------------------------------------------------------------ freezing

    def _freeze_upto(self, target: int, *, record_events: bool) -> None:
        new = range(self._n, target)
        names = [n for gi in new for n in self._groups[gi][1]]
        params = [p for gi in new for p in self._group_params[gi]]
        if is_ddp(self.model):
            from . import distributed

            self.model = distributed.freeze(self.model, names, bn="eval")
        else:
            freeze(self.module, names, bn="eval")
        if self.pin_eval:
            for gi in new:
                self._pinned += _pin_eval(self.module, self._groups[gi][1])
        self.freed_bytes += _drop_from_optimizer(self._opt, params)
        from ._verify import frozen_now

        frozen_now(params)
        if record_events:
            self.events.extend((self._step, self.groups[gi]) for gi in new)
        self._n = target
        self._seg_key = None
        if self.cache:
            self._new_cache()

    # ------------------------------------------------------------------ cache

    @contextlib.contextmanager
    def keys(self, sample_ids: Iterable[Hashable] | torch.Tensor) -> Iterator[None]:
        """Name the samples of the coming forward pass (one id per sample).

        A no-op unless ``cache=True``. Then the frozen prefix is cached by a
        :class:`~torchfreeze.FeatureCache` with ``upto=`` the last frozen group:
        stored samples skip the whole prefix. When the boundary moves forward,
        the previous boundary's cache stays active beside the new one until the
        new one holds as many entries, so a miss of the new boundary runs only
        the newly frozen groups, from the old boundary's stored output (the old
        prefix never runs again).
        """
        if not self._caches:
            yield None
            return
        with contextlib.ExitStack() as stack:
            for cache in self._caches:
                stack.enter_context(cache.keys(sample_ids))
            yield None
        self._retire_caches()

    @property
    def caches(self) -> list[FeatureCache]:
        """The active :class:`~torchfreeze.FeatureCache` objects, oldest boundary first."""
        return list(self._caches)

    @property
    def cache_hits(self) -> int:
        """Samples whose frozen prefix was replayed, over every cache so far."""
        return self._retired[0] + sum(int(c.hits) for c in self._caches)

    @property
    def cache_misses(self) -> int:
        """Samples whose (newly) frozen groups were computed, over every cache so far."""
        return self._retired[1] + sum(int(c.misses) for c in self._caches)

    def close(self) -> None:
        """Close the caches (``cache=True``): stored entries are dropped, forwards restored."""
        while self._caches:
            self._close_cache(self._caches.pop())
        self._repin()

    def _close_cache(self, cache: Any) -> None:
        self._retired = (self._retired[0] + cache.hits, self._retired[1] + cache.misses)
        cache.close()

    def _new_cache(self) -> None:
        from .cache import FeatureCache

        name = self.groups[self._n - 1]
        try:
            self.module.get_submodule(name)
        except AttributeError:
            warnings.warn(
                f"AutoFreeze(cache=True): the frozen group {name!r} is not one module, so "
                "the prefix up to it cannot be cached; it is cached from the next boundary "
                "on. Pass layers= whose groups are modules to cache it.",
                UserWarning,
                stacklevel=4,
            )
            return
        self._caches.append(FeatureCache(self.module, upto=name, pin_eval=True))

    def _retire_caches(self) -> None:
        retired = False
        while len(self._caches) > 1 and len(self._caches[-1]) >= len(self._caches[0]):
            self._close_cache(self._caches.pop(0))
            retired = True
        if retired:
            self._repin()

    def _repin(self) -> None:
        # a closed cache puts the modules it pinned back in the model's mode; the frozen
        # groups must stay in eval (deterministic), so pin them again
        for m in self._pinned:
            type(m).train(m, False)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: step, frozen groups, events, the running interval.

        Reading the partial interval's accumulated norms synchronises with the
        device once.
        """
        policy_state = None
        sd = getattr(self.policy, "state_dict", None)
        if callable(sd):
            policy_state = sd()
        acc = [float(v) for v in self._acc.tolist()] if self._acc is not None else None
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "groups": list(self.groups),
            "interval": self.interval,
            "step": self._step,
            "intervals": self._intervals,
            "frozen": self._n,
            "events": [[s, g] for s, g in self.events],
            "acc": acc,
            "acc_steps": self._acc_steps,
            "policy": policy_state,
            "history": [r.to_dict() for r in self.history],
            "freed_bytes": self.freed_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a freshly built AutoFreeze.

        Re-freezes the saved prefix (removing it from the optimizer), so call it
        *before* ``optimizer.load_state_dict``.

        Raises:
            FreezeStateError: not an AutoFreeze state, different groups or
                interval, or this AutoFreeze has already frozen groups
                (nothing is changed).
        """
        check_format(state, STATE_FORMAT, hint="Pass the value af.state_dict() returned.")
        if state.get("version", 0) > STATE_VERSION:
            raise FreezeStateError(
                f"AutoFreeze state version {state.get('version')} is newer than this "
                f"torchfreeze understands ({STATE_VERSION}); upgrade torchfreeze."
            )
        if list(state.get("groups", [])) != list(self.groups):
            raise FreezeStateError(
                f"the saved AutoFreeze had groups {list(state.get('groups', []))[:5]}..., this "
                f"one has {list(self.groups)[:5]}...: resume with the same model and layers=. "
                "Nothing was changed."
            )
        if int(state.get("interval", -1)) != self.interval:
            raise FreezeStateError(
                f"the saved AutoFreeze used interval={state.get('interval')}, this one "
                f"interval={self.interval}; resume with the same settings. Nothing was changed."
            )
        if self._n != self._initial or self._step:
            raise FreezeStateError(
                "load_state_dict must be called on a freshly built AutoFreeze (this one has "
                f"already taken {self._step} steps and frozen {self._n} groups). Build model, "
                "optimizer and AutoFreeze as at the start, then load. Nothing was changed."
            )
        target = int(state["frozen"])
        if not self._initial <= target <= len(self.groups) - 1:
            raise FreezeStateError(
                f"the saved AutoFreeze froze {target} groups; this model has "
                f"{len(self.groups)} and {self._initial} are frozen already. Nothing was changed."
            )
        self._step = int(state["step"])
        if target > self._n:
            self._freeze_upto(target, record_events=False)
        self.events = [(int(s), str(g)) for s, g in state.get("events", [])]
        self._intervals = int(state.get("intervals", 0))
        self._acc_steps = int(state.get("acc_steps", 0))
        acc = state.get("acc")
        if acc is not None:
            device = next((p.device for ps in self._group_params for p in ps), None)
            self._acc = torch.tensor(acc, dtype=torch.float32, device=device)
        load = getattr(self.policy, "load_state_dict", None)
        if callable(load) and state.get("policy") is not None:
            load(state["policy"])
        self.history = [IntervalRecord(**r) for r in state.get("history", [])]
        self.freed_bytes = int(state.get("freed_bytes", 0))


# ---------------------------------------------------------------------------
# helpers


#: AutoFreeze options the trainer callbacks pass through (besides their own arguments)
CALLBACK_OPTIONS = ("warmup", "patience", "max_per_decision", "normalize", "pin_eval")


def callback_kwargs(*, layers: Any, interval: int, policy: Any, percentile: float,
                    options: dict[str, Any], **own: Any) -> dict[str, Any]:
    """The AutoFreeze keyword arguments of a trainer callback (Lightning, HF Trainer).

    Raises:
        TorchfreezeError: an option AutoFreeze does not take (named, with the ones it does).
    """
    unknown = sorted(set(options) - set(CALLBACK_OPTIONS))
    if unknown:
        raise TorchfreezeError(
            f"AutoFreezeCallback got unknown options {unknown}; AutoFreeze takes "
            + ", ".join(f"{o}=" for o in CALLBACK_OPTIONS) + "."
        )
    return dict(layers=layers, interval=interval, policy=policy, percentile=percentile,
                **own, **options)


def event_line(af: AutoFreeze, frozen: Sequence[str]) -> str:
    """One log line for a freeze event of a trainer callback."""
    return (f"torchfreeze: step {af.steps}: froze {', '.join(frozen)} "
            f"({len(af.frozen)} of {len(af.groups)} groups frozen)")


def resolve_groups(
    module: nn.Module, layers: Sequence[Any] | None, idx: ModelIndex, *,
    who: str = "AutoFreeze", minimum: int = 2,
) -> list[tuple[str, list[str]]]:
    """``layers=`` of AutoFreeze / RotatingFreeze as ``[(group name, param names)]``:
    ``tfz.layers(module)`` by default, each parameter in exactly one group."""
    from . import _layers  # the parameter layers= shadows the function

    if layers is None:
        found: Sequence[Any] = _layers.layers(module)
    elif isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TorchfreezeError(
            f"layers= must be a list of groups in depth order (tfz.layers(model), or one "
            f"selector per group), got {type(layers).__name__}."
        )
    else:
        found = layers
    groups: list[tuple[str, list[str]]] = []
    seen: dict[int, str] = {}
    for i, item in enumerate(found):
        if isinstance(item, _layers.Layer):
            name, sel = item.name, list(item.param_names)
        else:
            name = item if isinstance(item, str) else f"group{i}"
            sel = item
        names = list(resolve(module, [sel], index=idx, allow_empty=False,
                             what="layers= entry").param_names)
        names = [n for n in names if idx.params[n].is_floating_point() or
                 idx.params[n].is_complex()]
        for n in names:
            p = idx.params[n]
            if id(p) in seen:
                raise TorchfreezeError(
                    f"layers=: parameter {n!r} is in group {seen[id(p)]!r} and in group "
                    f"{name!r}; each parameter must be in exactly one group."
                )
            seen[id(p)] = name
        groups.append((name, names))
    if len(groups) < minimum:
        raise TorchfreezeError(
            (f"{who} needs at least two layer groups (something to freeze and a head that "
             "stays trainable)" if minimum == 2 else
             f"{who} needs at least {minimum} layer group(s)")
            + f"; found {len(groups)} in {idx.describe()}. Pass layers= "
            "explicitly, e.g. layers=['backbone', 'head']."
        )
    return groups


def _check_scheduler(scheduler: Any, opt: Any) -> None:
    if scheduler is None:
        return
    for s in scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]:
        owner = unwrap_optimizer(getattr(s, "optimizer", None))
        if owner is None or getattr(owner, "param_groups", None) is not opt.param_groups:
            raise TorchfreezeError(
                f"scheduler ({type(s).__name__}) does not drive this optimizer "
                f"({type(opt).__name__}); pass the scheduler built on it."
            )


def _pin_eval(module: nn.Module, param_names: Sequence[str]) -> list[nn.Module]:
    """Pin in eval the outermost modules whose parameters all lie in the group."""
    idx = ModelIndex(module)
    inside = {id(idx.params[n]) for n in param_names if n in idx.params}
    pinned: list[str] = []
    for name, m in idx.modules.items():
        ps = [id(p) for p in m.parameters()]
        if not name or not ps or not set(ps) <= inside:
            continue
        if any(name.startswith(p + ".") for p in pinned):
            continue
        pinned.append(name)
        pin(m)  # (or keep the pin it has)
    return [idx.modules[n] for n in pinned]


def _comm_device(group: Any, device: torch.device) -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _drop_from_optimizer(opt: Any, params: Sequence[torch.Tensor]) -> int:
    """Remove ``params`` from every param group and delete their state; bytes freed."""
    ids = {id(p) for p in params}
    for g in opt.param_groups:
        keep = [i for i, p in enumerate(g["params"]) if id(p) not in ids]
        if len(keep) == len(g["params"]):
            continue
        names = g.get("param_names")
        if isinstance(names, list) and len(names) == len(g["params"]):
            g["param_names"] = [names[i] for i in keep]
        g["params"] = [g["params"][i] for i in keep]
    freed = 0
    for p in params:
        st = opt.state.pop(p, None)
        freed += _nbytes(st)
    return freed
