"""What each freeze boundary will cost, from one example batch, before training.

:func:`plan` runs the model a few times on one example batch with every
parameter trainable, cutting the forward and the backward in time at each layer
group of :func:`torchfreeze.layers`, and combines what it measured per group
into one row per boundary ``k`` (groups ``0..k-1`` frozen, the rest trained):

* **time**: each group's forward and backward are timed for real (the median of
  ``repeat`` passes), the frozen prefix's forward under ``no_grad``, as it runs
  when frozen (``repeat - 1`` such passes, at least one). Freezing the prefix
  removes its backward; with :class:`~torchfreeze.FeatureCache` its forward
  also goes after the first epoch, which runs it in eval mode as FeatureCache
  fills it (``pin_eval=True`` or a model in eval mode: it refuses random ops in
  train mode), timed so (no dropout: often faster). FeatureCache's one-time
  discovery pass is not counted. The optimizer step is timed on stand-ins up to
  the size of the largest trainable tensor.
* **memory** (tensor bytes, not the allocator's): weights; gradients of the
  trainable parameters; optimizer state from the optimizer's own state layout
  (one real step on small stand-ins: AdamW keeps 2 values per element and a step
  counter per tensor, SGD with momentum 1, plain SGD none); saved activations
  as autograd packs them (``saved_tensors_hooks``), each storage counted once,
  parameters and buffers excluded.
* **cache**: the bytes of the boundary's output per sample, as
  ``FeatureCache(model, upto=row.upto)`` stores them.
* **FLOPs** from :class:`torch.utils.flop_counter.FlopCounterMode`.

One rule is easy to miss and is measured rather than assumed: if a parameter
that still trains is *used inside the frozen prefix* (an input embedding tied
to the LM head is used first and trained last), the gradient has to flow back
through the whole prefix anyway. The plan then times that prefix's backward with
only such parameters trainable (input gradients, no weight gradients), keeps its
saved activations, and marks the row: caching the prefix is impossible there.
The cached columns also follow FeatureCache's rule against paths around the
boundary (Llama's rotary tables, made before layer 0 and read by every layer):
where it would refuse, they are ``None`` and the row says why.

The model is left exactly as it was: ``requires_grad``, ``.grad``, modes,
parameter and buffer tensors (BatchNorm running statistics included) and the RNG.
A model on the ``meta`` device gets the memory and FLOP columns without running
anything; its time columns are ``None``.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from ._compat import pytree, storage_key
from ._layers import call_model
from ._report import Report, fmt_bytes, fmt_count, render_text
from ._select import ModelIndex, require_module
from ._snapshot import isolated

# the ops FeatureCache's path-around-the-boundary rule ignores or counts as reads: one list
from .cache._hook import _METADATA_FACTORIES, _VALUE_READS, _VALUE_READS_PY
from .errors import PlanError, TorchfreezeError

__all__ = ["Plan", "PlanRow", "StepMemory", "plan"]

OptimizerSpec = Any  # a name, an optimizer class, an optimizer, or params -> optimizer

_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "adamw": lambda ps: torch.optim.AdamW(ps),
    "adam": lambda ps: torch.optim.Adam(ps),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps),
    "adagrad": lambda ps: torch.optim.Adagrad(ps),
}


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


@dataclass(frozen=True)
class StepMemory(Report):
    """Tensor bytes of one training step at a boundary (not the allocator's).

    Attributes:
        weights: every parameter, each storage once (the same at every boundary).
        grads: ``.grad`` of the trainable parameters.
        optimizer_state: what the optimizer keeps for the trainable parameters.
        activations: what autograd saves for the backward pass (peak of one step).
        total: the sum of the four.
    """

    weights: int
    grads: int
    optimizer_state: int
    activations: int
    total: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "total", self.weights + self.grads + self.optimizer_state + self.activations
        )

    def _rich(self) -> str:
        return (f"weights {fmt_bytes(self.weights)}, grads {fmt_bytes(self.grads)}, "
                f"optimizer state {fmt_bytes(self.optimizer_state)}, activations "
                f"{fmt_bytes(self.activations)}: total {fmt_bytes(self.total)}")


@dataclass(frozen=True)
class PlanRow(Report):
    """One freeze boundary: groups ``0 .. boundary-1`` frozen, the rest trained.

    Attributes:
        boundary: how many layer groups are frozen (0: nothing).
        frozen_through: the last frozen group's name (``None`` at boundary 0).
        trainable: trainable scalar parameters.
        step_seconds: one training step with the prefix frozen (forward, backward,
            optimizer step); ``None`` on the meta device.
        cached_step_seconds: one step once the prefix's output is cached (after the
            first epoch); ``None`` where the prefix cannot be cached.
        speedup: ``step_seconds`` of boundary 0 over this row's.
        cached_speedup: boundary 0's time over ``epochs`` over this row's with the
            cache (the first epoch fills it, running the prefix in eval mode).
        memory: the step's tensor bytes, see :class:`StepMemory`.
        cache_bytes: what the cache holds: the boundary output per sample times
            ``batch_size * batches_per_epoch`` samples (one example batch's worth
            when ``batches_per_epoch`` is not given).
        upto: the module to pass as ``FeatureCache(model, upto=...)``.
        flops: forward + backward FLOPs of one uncached step.
        fits: whether the row is within the plan's ``budget`` (``None``: no budget).
        note: why the row differs from the simple picture (gradient through the
            frozen prefix; no cache possible), or ``""``.
    """

    boundary: int
    frozen_through: str | None
    trainable: int
    step_seconds: float | None
    cached_step_seconds: float | None
    speedup: float | None
    cached_speedup: float | None
    memory: StepMemory
    cache_bytes: int | None
    upto: str | None
    flops: int
    fits: bool | None = None
    note: str = ""

    def _rich(self) -> str:
        return (f"boundary {self.boundary} (frozen through {self.frozen_through}): "
                f"{fmt_count(self.trainable)} trainable, step {_fmt_s(self.step_seconds)} "
                f"({_fmt_x(self.speedup)}), cached {_fmt_s(self.cached_step_seconds)}, "
                f"{self.memory}")


@dataclass(frozen=True)
class Plan(Report):
    """The cost of every freeze boundary of one model; see :func:`plan`.

    Attributes:
        rows: one :class:`PlanRow` per boundary, ``rows[k]`` freezes ``k`` groups.
        groups: the layer group names, in depth order.
        optimizer: the optimizer the state bytes and step time are for.
        epochs: the number of epochs ``cached_speedup`` is computed over.
        batch_size: the example batch's size (first dimension of its first tensor).
        batches_per_epoch: as given (``None``: cache bytes are per example batch).
        device: where the model ran (``"meta"``: nothing ran).
        budget: ``{"memory": bytes, "seconds": per step}`` as given, or ``None``.
        plan_seconds: how long :func:`plan` took.
        marks: labels shown next to some boundaries (see :meth:`marked`).
    """

    rows: tuple[PlanRow, ...]
    groups: tuple[str, ...]
    optimizer: str
    epochs: int
    batch_size: int
    batches_per_epoch: int | None
    device: str
    budget: dict[str, float] | None = None
    plan_seconds: float = 0.0
    marks: dict[int, str] = field(default_factory=dict)

    def marked(self, marks: Mapping[int, str]) -> Plan:
        """This plan with a label next to some boundaries (``{5: "partial-freeze"}``),
        e.g. the strategies a run will use; an unknown boundary is refused."""
        bad = [k for k in marks if not (isinstance(k, int) and 0 <= k < len(self.rows))]
        if bad:
            raise PlanError(f"marked(): boundary {bad[0]!r} is not one of this plan's "
                            f"0..{len(self.rows) - 1}.")
        return replace(self, marks={int(k): str(v) for k, v in marks.items()})

    def best(self, *, memory: int | str | None = None,
             seconds: float | str | None = None, cache: bool = False) -> PlanRow:
        """The boundary that trains the most while fitting ``memory`` and ``seconds``.

        Args:
            memory: the most ``row.memory.total`` may be (bytes, or a string such
                as ``"2 GiB"``); defaults to the plan's ``budget``.
            seconds: the most one step may take, averaged over ``epochs`` (the
                cached step where ``cache=True`` and the prefix can be cached; a
                number of seconds or a string such as ``"300 ms"``).
            cache: count on :class:`~torchfreeze.FeatureCache` for ``seconds``.

        Raises:
            PlanError: no boundary fits; the message names the closest one.

        Example:
            >>> import torch, torch.nn as nn, torchfreeze as tfz
            >>> net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
            >>> p = tfz.plan(net, torch.randn(8, 64), optimizer="sgd")
            >>> p.best(memory=p.rows[1].memory.total).boundary
            1
        """
        limits = dict(self.budget or {})
        if memory is not None:
            limits["memory"] = _parse_budget(memory)["memory"]
        if seconds is not None:
            limits["seconds"] = _parse_budget(seconds, default="seconds")["seconds"]
        if not limits:
            raise PlanError("best() needs memory= or seconds= (or a plan made with "
                            "budget=): nothing to fit.")
        if "seconds" in limits and self.device == "meta":
            raise PlanError("best(seconds=...) needs timings, and a plan of a model on the "
                            "meta device has none; pass memory= only, or plan on a real device.")
        misses: list[str] = []
        for row in self.rows:
            why = _misses(row, limits, self.epochs, cache)
            if not why:
                return row
            misses.append(f"boundary {row.boundary}: {why}")
        raise PlanError(
            f"no boundary fits {_describe_limits(limits)}; the deepest one, "
            f"{misses[-1]}. Train on a smaller batch, use another optimizer, or raise the budget."
        )

    def __str__(self) -> str:
        return render_text(self._rich(), width=170)  # the whole table, on one line per row

    def __rich__(self) -> _Fitted:
        return _Fitted(self)

    def _rich(self, drop: Sequence[str] = ()) -> Group:
        per = "epoch" if self.batches_per_epoch else "batch"
        t = Table(title=f"tfz.plan: {self.optimizer}, batch {self.batch_size}, "
                        f"{self.epochs} epochs, on {self.device}", title_justify="left")
        columns: list[tuple[str, str, list[str]]] = [
            (col, just, []) for col, just in (
                ("k", "right"), ("frozen through", "left"), ("trainable", "right"),
                ("step", "right"), ("speed-up", "right"), ("cached step", "right"),
                (f"cached {self.epochs} ep", "right"), ("grads+state", "right"),
                ("activations", "right"), ("total", "right"), (f"cache/{per}", "right"),
                *((("used by", "left"),) if self.marks else ()))]
        for r in self.rows:
            m = r.memory
            mark = "" if r.fits is None else (" ✓" if r.fits else " ✗")
            cells = (f"{r.boundary}{mark}", r.frozen_through or "(nothing)",
                     fmt_count(r.trainable), _fmt_s(r.step_seconds), _fmt_x(r.speedup),
                     _fmt_s(r.cached_step_seconds), _fmt_x(r.cached_speedup),
                     fmt_bytes(m.grads + m.optimizer_state), fmt_bytes(m.activations),
                     fmt_bytes(m.total), fmt_bytes(r.cache_bytes),
                     *((self.marks.get(r.boundary, ""),) if self.marks else ()))
            for (_, _, values), cell in zip(columns, cells):
                values.append(cell)
        shown = [c for c in columns if not any(c[0].startswith(d) for d in drop)]
        for col, just, _ in shown:
            t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        for i in range(len(self.rows)):
            t.add_row(*(values[i] for _, _, values in shown))
        notes = [f"k={r.boundary}: {r.note}" for r in self.rows if r.note]
        hidden = [c[0] for c in columns if c not in shown]
        foot = Text(f"weights {fmt_bytes(self.rows[0].memory.weights)} at every boundary; "
                    f"planned in {self.plan_seconds:.1f} s"
                    + (f"; too narrow here for {', '.join(hidden)} (str(plan), "
                       "plan.to_dict() and the command line's --json have every column)"
                       if hidden else "")
                    + ("".join(f"\n{n}" for n in _dedupe_notes(notes))))
        return Group(t, foot)


#: the columns a narrow console leaves out first (the rest of each row still fits)
_DROP_ORDER = ("activations", "grads+state", "cached step", "cache/", "trainable")


class _Fitted:
    """A plan as rich prints it: the whole table where it fits, else without the columns
    of ``_DROP_ORDER``, one at a time, until it does (never a squeezed-away number)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        drop: list[str] = []
        table = self.plan._rich()
        wide = options.update_width(1 << 14)  # the table's own width, not the console's
        for column in _DROP_ORDER:
            if console.measure(table.renderables[0], options=wide).maximum \
                    <= options.max_width:
                break
            drop.append(column)
            table = self.plan._rich(drop)
        yield table


def _dedupe_notes(notes: list[str]) -> list[str]:
    """One line per distinct note, its boundaries as ranges (``k=1-30: ...``)."""
    by_text: dict[str, list[int]] = {}
    for n in notes:
        label, text = n.split(": ", 1)
        by_text.setdefault(text, []).append(int(label.removeprefix("k=")))
    out = []
    for text, ks in by_text.items():
        runs: list[list[int]] = []
        for b in ks:
            if runs and b == runs[-1][-1] + 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        spans = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
        out.append(f"k={spans}: {text}")
    return out


def _misses(row: PlanRow, limits: Mapping[str, float], epochs: int, cache: bool) -> str:
    out = []
    if "memory" in limits and row.memory.total > limits["memory"]:
        out.append(f"memory {fmt_bytes(row.memory.total)} > {fmt_bytes(limits['memory'])}")
    if "seconds" in limits:
        s = _mean_step(row, epochs, cache)
        if s is None or s > limits["seconds"]:
            out.append(f"step {_fmt_s(s)} > {_fmt_s(limits['seconds'])}")
    return ", ".join(out)


def _mean_step(row: PlanRow, epochs: int, cache: bool) -> float | None:
    if row.step_seconds is None:
        return None
    if cache and row.cached_step_seconds is not None:
        return (row.step_seconds + (epochs - 1) * row.cached_step_seconds) / epochs
    return row.step_seconds


def _describe_limits(limits: Mapping[str, float]) -> str:
    parts = []
    if "memory" in limits:
        parts.append(f"memory <= {fmt_bytes(limits['memory'])}")
    if "seconds" in limits:
        parts.append(f"step <= {_fmt_s(limits['seconds'])}")
    return " and ".join(parts)


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0}


def _parse_budget(value: Any, *, default: str = "memory") -> dict[str, float]:
    """``budget=`` / ``best()`` limits as ``{"memory": bytes, "seconds": s}``."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = set(value) - {"memory", "seconds"}
        if unknown:
            raise PlanError(f"budget= keys are 'memory' and 'seconds', got {sorted(unknown)}.")
        out: dict[str, float] = {}
        for key, v in value.items():
            out.update(_parse_budget(v, default=key))
        return out
    if isinstance(value, bool):
        raise PlanError(f"budget={value!r} is not a budget: pass bytes or a string like '4 GiB'.")
    if isinstance(value, int):
        return {default: float(value)}
    if isinstance(value, float):
        if default == "seconds":
            return {"seconds": value}
        raise PlanError(
            f"budget={value!r} is a float, which could mean bytes or seconds: pass an int "
            f"of bytes ({int(value)}), or a string with a unit ('{value:g} s', '4 GiB')."
        )
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m:
            num, unit = float(m.group(1)), m.group(2).lower()
            if unit in _UNITS:
                return {"memory": num * _UNITS[unit]}
            if unit in _TIME_UNITS:
                return {"seconds": num * _TIME_UNITS[unit]}
        raise PlanError(
            f"budget={value!r} is not a size or a time: write e.g. '6 GiB', '800 MB', "
            f"'250 ms' or '2 s' (units: {', '.join(list(_UNITS) + list(_TIME_UNITS))})."
        )
    raise PlanError(f"budget= must be bytes (int), a string like '4 GiB' or '0.5 s', or a "
                    f"mapping {{'memory': ..., 'seconds': ...}}; got {type(value).__name__}.")


# ---------------------------------------------------------------------------
# the optimizer's state layout and step time, measured on stand-ins


@dataclass(frozen=True)
class _OptimizerModel:
    name: str
    factory: Callable[[list[torch.Tensor]], Any]

    def state_bytes(self, params: Sequence[torch.Tensor]) -> int:
        layouts: dict[tuple[torch.dtype, str], tuple[float, float]] = {}
        total = 0.0
        for p in params:
            key = (p.dtype, p.device.type)
            if key not in layouts:
                layouts[key] = self._layout(p.dtype)
            per_tensor, per_element = layouts[key]
            total += per_tensor + per_element * p.numel()
        return round(total)

    def _layout(self, dtype: torch.dtype) -> tuple[float, float]:
        from .rotate import optimizer_state_bytes

        sizes = (64, 192)
        got = []
        for n in sizes:
            w = nn.Parameter(torch.zeros(n, dtype=dtype))
            opt = self.factory([w])
            w.grad = torch.ones_like(w)
            opt.step()
            got.append(optimizer_state_bytes(opt))
        per_element = (got[1] - got[0]) / (sizes[1] - sizes[0])
        return got[0] - per_element * sizes[0], per_element

    def step_cost(self, dtype: torch.dtype, largest: int, total: int,
                  repeat: int) -> _StepCost:
        """One optimizer step measured on stand-ins: 64 one-value tensors (the cost per
        tensor), tensors of 1 M values and tensors as large as the model's largest
        trainable one (capped at 16 M values): the cost per value grows once tensors
        leave the CPU caches, and embedding tables are the large ones. Each size is
        stepped over as many tensors as make the model's trainable values (capped at
        8 M), so a model whose optimizer state is larger than the caches is timed out
        of the caches, as its real step runs."""
        cap = 1 << 24
        sizes = sorted({1 << 20, max(1 << 20, min(largest, cap))})
        out_of_cache = 1 << 23  # 128 MiB of AdamW's fp32 tensors: beyond common L3 caches
        per_tensor = self._time([torch.zeros(1, dtype=dtype) for _ in range(64)], repeat) / 64
        points = []
        for n in sizes:
            copies = max(1, min(total, out_of_cache) // n)
            took = self._time([torch.zeros(n, dtype=dtype) for _ in range(copies)], repeat)
            points.append((n, max(took / copies - per_tensor, 0.0) / n))
        return _StepCost(per_tensor, tuple(points))

    def _time(self, tensors: list[torch.Tensor], repeat: int) -> float:
        ps = [nn.Parameter(t) for t in tensors]
        opt = self.factory(list(ps))
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()  # state allocation is not part of the steady-state step
        times: list[float] = []
        # at least 2 steps, and more while they add up to under 50 ms (at most 15):
        # a step of a few ms is noisier than one over 8 M values
        while len(times) < max(2, repeat) or (sum(times) < 0.05 and len(times) < 15):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


@dataclass(frozen=True)
class _StepCost:
    per_tensor: float
    points: tuple[tuple[int, float], ...] = ()  # (values, seconds per value), ascending

    def seconds(self, params: Sequence[torch.Tensor]) -> float:
        return sum(self.per_tensor + self._per_value(p.numel()) * p.numel() for p in params)

    def _per_value(self, n: int) -> float:
        if not self.points:
            return 0.0
        (n0, c0), (n1, c1) = self.points[0], self.points[-1]
        if n <= n0 or n1 == n0:
            return c0 if n <= n0 else c1
        if n >= n1:
            return c1
        w = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
        return c0 + w * (c1 - c0)


def _optimizer_model(spec: OptimizerSpec) -> _OptimizerModel:
    if isinstance(spec, str):
        key = spec.lower().replace("_", "-")
        if key not in _OPTIMIZERS:
            raise PlanError(f"optimizer={spec!r} is not one plan knows; known: "
                            f"{', '.join(_OPTIMIZERS)}; or pass an optimizer, its class, "
                            "or a function params -> optimizer.")
        return _OptimizerModel(key, _OPTIMIZERS[key])
    if isinstance(spec, torch.optim.Optimizer):
        cls, defaults = type(spec), dict(spec.defaults)
        return _OptimizerModel(cls.__name__, lambda ps: cls(ps, **defaults))
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        cls2: Any = spec
        return _OptimizerModel(spec.__name__, lambda ps: cls2(ps))
    if callable(spec):
        return _OptimizerModel(getattr(spec, "__name__", "custom"), spec)
    raise PlanError(f"optimizer= must be a name ({', '.join(_OPTIMIZERS)}), an optimizer, "
                    f"an optimizer class or a function params -> optimizer; got "
                    f"{type(spec).__name__}.")


# ---------------------------------------------------------------------------
# the passes


@dataclass
class _Cut:
    """Where segment ``k`` starts: after group k-1's module, or before group k's."""

    k: int
    module: nn.Module
    where: str  # "post" | "pre"
    upto: str | None


@dataclass
class _Pass:
    fwd: list[float]
    bwd: list[float]
    fwd_flops: list[int] = field(default_factory=list)
    bwd_flops: list[int] = field(default_factory=list)
    # storage -> (bytes, {(segment that saves it, before that segment used a parameter)})
    saved: dict[int, tuple[int, set[tuple[int, bool]]]] = field(default_factory=dict)
    first_use: dict[int, int] = field(default_factory=dict)  # id(param) -> segment
    cut_bytes: dict[int, int] = field(default_factory=dict)  # k -> bytes of the cut output
    copy_seconds: dict[int, float] = field(default_factory=dict)
    # boundary -> (prefix module whose output is read after it, the op that reads it)
    bypass: dict[int, tuple[str, str]] = field(default_factory=dict)


class _Trace(TorchFunctionMode):
    """The first pass's data flow, for every boundary at once.

    * the segment in which each parameter is first used (and which segments have used
      one yet);
    * paths around a boundary, by FeatureCache's rule (``cache/_hook.py`` ``Taint``): the
      outputs of modules that return in segment t are "prefix" for every boundary k > t,
      except that a boundary's own output is clean for that boundary; ops pass the mark
      on; an op in segment s >= k that reads a tensor marked for k (to produce a tensor
      or read its values) means ``FeatureCache(upto=...)`` refuses boundary k.
    """

    def __init__(self, params: set[int], now: Callable[[], int], p: _Pass, used_in: set[int],
                 n: int, names: Mapping[int, str]) -> None:
        super().__init__()
        self.params, self.now, self.p, self.used_in = params, now, p, used_in
        self.all_bits = (1 << n) - 1
        self.names = names
        self.marks: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (bits, source)

    def module_returned(self, module: nn.Module, _: Any, out: Any) -> None:
        above = self.all_bits & ~((2 << self.now()) - 1)  # boundaries after this segment
        name = self.names.get(id(module))
        if name is None or not above:
            return
        for t in _leaves(out):  # hooks run inner to outer: the outer module names it
            bits, _src = self.marks.get(t, (0, name))
            self.marks[t] = (bits | above, name)

    def boundary_output(self, k: int, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            bits, src = self.marks.get(t, (0, ""))
            self.marks[t] = (bits & ~(1 << k), src)

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        seg = self.now()
        bits, src = 0, ""
        for a in pytree.tree_leaves((args, kwargs)):
            if not isinstance(a, torch.Tensor):
                continue
            if id(a) in self.params:
                self.p.first_use.setdefault(id(a), seg)
                self.used_in.add(seg)
            hit = self.marks.get(a)
            if hit is not None and hit[0]:
                bits |= hit[0]
                src = src or hit[1]
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if not bits or name in _METADATA_FACTORIES:
            return out
        produced = _leaves(out)
        around = bits & ((2 << seg) - 1)  # marked for a boundary this segment is after
        if around and (produced or name in _VALUE_READS or name in _VALUE_READS_PY):
            for k in range(1, seg + 1):
                if around >> k & 1:
                    self.p.bypass.setdefault(k, (src, name))
        for t in produced:
            old = self.marks.get(t, (0, src))
            self.marks[t] = (old[0] | bits, old[1] or src)
        return out


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _default_loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    for t in _leaves(out):
        if t.requires_grad and t.is_floating_point():
            return t.float().sum()
    raise PlanError(
        f"the model's output ({type(out).__name__}) holds no floating tensor that requires "
        "grad, so there is no backward pass to plan; pass loss=lambda out, batch: ... ."
    )


class _Runner:
    def __init__(self, model: nn.Module, batch: Any, cuts: list[_Cut], n_groups: int,
                 loss: Callable[[Any, Any], torch.Tensor] | None,
                 names: Mapping[int, str]) -> None:
        self.model, self.batch, self.cuts, self.n = model, batch, cuts, n_groups
        self.loss, self.names = loss, names
        self.seg = 0

    def run(self, *, flops: bool = False, saved: bool = False, uses: set[int] | None = None,
            skip: frozenset[int] | set[int] = frozenset(), copy_cost: bool = False,
            backward: bool = True) -> _Pass:
        """One pass; ``backward=False``: the forward alone under ``no_grad`` (how a
        frozen prefix whose input needs no grad runs: no graph is recorded)."""
        n = self.n
        fwd_t = [0.0] * (n + 1)  # fwd_t[k]: when segment k starts; [n]: forward end
        arrive = [0.0] * (n + 1)  # arrive[k]: when the grad reaches cut k; [n]: backward start
        fwd_f = [0] * (n + 1)
        arr_f = [0] * (n + 1)
        p = _Pass(fwd=[], bwd=[])
        seen: set[int] = set()
        used_in: set[int] = set()  # segments that have used a parameter so far
        traces: list[_Trace] = []
        counter = FlopCounterMode(display=False) if flops else None
        self.seg = 0

        def total_flops() -> int:
            return counter.get_total_flops() if counter is not None else 0

        def at_cut(cut: _Cut, tensors: list[torch.Tensor]) -> None:
            if cut.k in seen:
                return
            seen.add(cut.k)
            if self.seg != cut.k - 1:
                raise PlanError(
                    f"the layer groups do not run in depth order: boundary {cut.k} was "
                    f"reached while group {self.seg} was running; pass layers= in the "
                    "order the forward runs them."
                )
            fwd_t[cut.k] = time.perf_counter()
            fwd_f[cut.k] = total_flops()
            self.seg = cut.k
            for trace in traces:
                trace.boundary_output(cut.k, tensors)
            if saved:
                p.cut_bytes[cut.k] = sum(t.nbytes for t in tensors)
                if copy_cost and tensors:
                    t0 = time.perf_counter()
                    for t in tensors:
                        t.detach().clone()
                    p.copy_seconds[cut.k] = time.perf_counter() - t0
            grad_t = next((t for t in tensors if t.requires_grad), None)
            if grad_t is not None:
                def arrived(_: torch.Tensor, k: int = cut.k) -> None:
                    arrive[k] = time.perf_counter()
                    arr_f[k] = total_flops()
                grad_t.register_hook(arrived)

        handles = []
        for cut in self.cuts:
            if cut.where == "post":
                handles.append(cut.module.register_forward_hook(
                    lambda m, a, out, cut=cut: at_cut(cut, _leaves(out))))
            else:
                handles.append(cut.module.register_forward_pre_hook(
                    lambda m, a, kw, cut=cut: at_cut(cut, _leaves((a, kw))), with_kwargs=True))

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if key not in skip:
                entry = p.saved.setdefault(key, (t.untyped_storage().nbytes(), set()))
                entry[1].add((self.seg, uses is not None and self.seg not in used_in))
            return t

        with contextlib.ExitStack() as stack:
            for h in handles:
                stack.callback(h.remove)
            if counter is not None:
                stack.enter_context(counter)
            if saved:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            if uses is not None:
                trace = _Trace(uses, lambda: self.seg, p, used_in, n, self.names)
                traces.append(trace)
                stack.enter_context(trace)
                stack.callback(register_module_forward_hook(trace.module_returned).remove)
            if not backward:
                stack.enter_context(torch.no_grad())
            fwd_t[0] = time.perf_counter()
            try:
                out = call_model(self.model, self.batch)
            except PlanError:
                raise
            except Exception as exc:
                raise PlanError(_batch_error(self.model, self.batch, exc)) from exc
            if not backward:
                fwd_t[n] = time.perf_counter()
                p.fwd = [fwd_t[k + 1] - fwd_t[k] for k in range(n)]
                return p
            loss = self.loss(out, self.batch) if self.loss is not None else _default_loss(out)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise PlanError(f"loss= must return a scalar tensor, got "
                                f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}.")
            missing = sorted({c.k for c in self.cuts} - seen)
            if missing:
                raise PlanError(
                    f"boundary {missing[0]} was never reached: its group's module did not "
                    "run on the example batch; pass layers= with groups that the forward runs."
                )
            fwd_t[n] = arrive[n] = time.perf_counter()
            fwd_f[n] = arr_f[n] = total_flops()
            loss.backward()
            end, end_f = time.perf_counter(), total_flops()
        for k in range(1, n):  # a cut whose tensor needs no grad: its segment has no backward
            if not arrive[k]:
                arrive[k], arr_f[k] = end, end_f
        p.fwd = [fwd_t[k + 1] - fwd_t[k] for k in range(n)]
        p.fwd_flops = [fwd_f[k + 1] - fwd_f[k] for k in range(n)]
        # segment k's backward: from the grad reaching its output (arrive[k + 1]; the
        # loss for the last one) to the grad reaching its input (the end for segment 0)
        arrive[0], arr_f[0] = end, end_f
        p.bwd = [max(arrive[k] - arrive[k + 1], 0.0) for k in range(n)]
        p.bwd_flops = [arr_f[k] - arr_f[k + 1] for k in range(n)]
        return p


def _batch_error(model: nn.Module, batch: Any, exc: BaseException) -> str:
    how = ("model(**batch)" if isinstance(batch, Mapping) else
           "model(*batch)" if isinstance(batch, (tuple, list)) else "model(batch)")
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
                       for t in _leaves(batch)[:4]) or "no tensors"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"the model could not run the example batch: {type(exc).__name__}: {msg[:300]}. "
            f"plan called {how} with {shapes}; pass one batch exactly as the training loop "
            f"feeds it (nothing was changed).")


def _set_trainable(params: Sequence[nn.Parameter], trainable: set[int]) -> None:
    for p in params:
        p.requires_grad_(id(p) in trainable)
        p.grad = None


# ---------------------------------------------------------------------------
# the public function


def plan(
    model: nn.Module,
    example_batch: Any,
    *,
    optimizer: OptimizerSpec = "adamw",
    layers: Sequence[Any] | None = None,
    epochs: int = 3,
    batches_per_epoch: int | None = None,
    budget: Any = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    repeat: int = 2,
    cache_dtype: torch.dtype | None = None,
) -> Plan:
    """Predict each freeze boundary's step time, memory and cache size from one batch.

    Args:
        model: the model as it will train (its current modes are used; wrappers
            such as ``torch.compile`` and ``DataParallel`` are looked through and
            the wrapped model runs eagerly).
        example_batch: one batch as the loop feeds it: a dict (``model(**batch)``),
            a tuple or list (``model(*batch)``) or a tensor.
        optimizer: ``"adamw"`` (default), ``"adam"``, ``"sgd"``, ``"sgd-momentum"``,
            ``"rmsprop"``, ``"adagrad"``, an optimizer (its class and defaults are
            used), an optimizer class, or a function ``params -> optimizer``.
        layers: the groups, as for :func:`torchfreeze.layers` (the default) or
            one selector per group in depth order; parameters in none of them stay
            frozen at every boundary (``layers=tfz.layers(model)[:-1]`` plans a
            decoder with its tied embedding and head frozen).
        epochs: the epochs ``cached_speedup`` is computed over.
        batches_per_epoch: scales ``cache_bytes`` to the dataset.
        budget: mark the rows that fit: bytes (int), a string (``"6 GiB"``,
            ``"250 ms"`` per step) or ``{"memory": ..., "seconds": ...}``.
        loss: ``(output, batch) -> scalar``; by default the output's ``.loss``,
            else the sum of its first floating tensor.
        repeat: timed forward + backward passes (the median is kept); the
            passes that refine only the frozen prefix (its forward alone, its
            input-gradient backward) run one fewer, at least one.
        cache_dtype: the dtype ``FeatureCache(dtype=...)`` will store in.

    Returns:
        A :class:`Plan` with one row per boundary (``rows[0]``: nothing frozen,
        ``rows[-1]``: everything but the last group).

    Raises:
        PlanError: the model cannot run the batch, a group's module never runs,
            the groups do not run in depth order, or an argument is invalid.
            The model is unchanged.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
        ...                     nn.ReLU(), nn.Linear(256, 2))
        >>> p = tfz.plan(net, torch.randn(32, 64))
        >>> [r.trainable for r in p.rows]
        [82946, 66306, 514]
        >>> p.rows[2].memory.optimizer_state   # AdamW: 2 fp32 values per weight + 2 steps
        4120
    """
    t_start = time.perf_counter()
    require_module(model, "plan")
    _check_ints(epochs=epochs, batches_per_epoch=batches_per_epoch, repeat=repeat)
    limits = _parse_budget(budget)
    opt = _optimizer_model(optimizer)
    from .autofreeze import resolve_groups

    root = ModelIndex(model).model
    idx = ModelIndex(root)
    try:
        groups = resolve_groups(root, layers, idx, who="plan", minimum=2)
    except TorchfreezeError as exc:
        raise PlanError(str(exc)) from exc
    names = [name for name, _ in groups]
    group_params = [[idx.params[n] for n in members] for _, members in groups]
    cuts = _cuts(idx, names)
    all_params = [p for ps in group_params for p in ps]
    meta = any(p.device.type == "meta" for p in all_params)
    batch = _to_meta(example_batch) if meta else example_batch
    m = _measure(root, batch, cuts, group_params, loss=loss, meta=meta, repeat=repeat)
    if not meta:
        m.optimizer = opt.step_cost(all_params[0].dtype, max(p.numel() for p in all_params),
                                    sum(p.numel() for p in all_params), repeat)
    weights = _bytes_once(all_params)
    rows: list[PlanRow] = []
    for k in range(len(groups)):
        trained = [p for ps in group_params[k:] for p in ps]
        row = _row(k, m, trained, idx, names, cuts, weights=weights, opt=opt, epochs=epochs,
                   base=rows[0].step_seconds if rows else None,
                   batches_per_epoch=batches_per_epoch, cache_dtype=cache_dtype)
        rows.append(_with_fit(row, limits, epochs) if limits else row)
    return Plan(rows=tuple(rows), groups=tuple(names), optimizer=opt.name, epochs=epochs,
                batch_size=int(next((t.shape[0] for t in _leaves(batch) if t.dim() > 0), 1)),
                batches_per_epoch=batches_per_epoch,
                device="meta" if meta else str(all_params[0].device), budget=limits or None,
                plan_seconds=time.perf_counter() - t_start)


def _check_ints(**values: int | None) -> None:
    for name, v in values.items():
        if v is None and name == "batches_per_epoch":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{name}={v!r} must be an int >= 1"
                            + (" or None." if name == "batches_per_epoch" else "."))


def _bytes_once(tensors: Sequence[torch.Tensor]) -> int:
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


@dataclass
class _Measured:
    first: _Pass  # everything trainable, with FLOPs, saved tensors and parameter uses
    dgrad: _Pass | None  # only the parameters used before their own group trainable
    fwd: list[float] | None = None  # median timings per segment (None on meta)
    bwd: list[float] | None = None
    dgrad_bwd: list[float] | None = None
    frozen_fwd: list[float] | None = None  # the forward under no_grad
    eval_fwd: list[float] | None = None  # the same in eval mode (FeatureCache's first epoch)
    optimizer: _StepCost = field(default_factory=lambda: _StepCost(0.0))


def _measure(root: nn.Module, batch: Any, cuts: list[_Cut],
             group_params: list[list[nn.Parameter]], *,
             loss: Callable[[Any, Any], torch.Tensor] | None, meta: bool,
             repeat: int) -> _Measured:
    everything = {id(p) for ps in group_params for p in ps}
    all_params = list({id(p): p for p in root.parameters()}.values())  # ungrouped: frozen
    fixed = {storage_key(t) for t in (*root.parameters(), *root.buffers())}
    with isolated(root):
        fixed |= {storage_key(t) for t in root.buffers()}  # the stand-in copies
        runner = _Runner(root, batch, cuts, len(group_params), loss,
                         ModelIndex(root).module_name)
        _set_trainable(all_params, everything)
        first = runner.run(flops=True, saved=True, uses=everything, skip=fixed,
                           copy_cost=not meta)
        group_of = {id(p): g for g, ps in enumerate(group_params) for p in ps}
        early = {pid for pid, seg in first.first_use.items() if seg < group_of[pid]}
        dgrad = None
        if early:
            _set_trainable(all_params, early)
            dgrad = runner.run(flops=True, saved=True, skip=fixed)
        m = _Measured(first, dgrad)
        if meta:
            return m
        timed, frozen, timed_dgrad, evals = [], [], [], []
        # the boundaries whose frozen prefix runs under no_grad (no trained parameter is
        # used before them): only their rows read the no-grad forward
        no_grad_rows = [k for k in range(1, len(group_params)) if all(
            first.first_use.get(i, k) >= k for i, g in group_of.items() if g >= k)]
        # FeatureCache fills in eval mode (pin_eval=True, or a model in eval mode: it
        # refuses random ops in train mode), often faster (no dropout): timed where a
        # cached row is possible
        cacheable = any(k not in first.bypass for k in no_grad_rows)
        modes = [(mod, mod.training) for mod in root.modules()]
        # one fewer pass (at least one) for what only refines the frozen prefix: its
        # forward alone (a third of a step) and its input-gradient backward
        fewer = max(1, repeat - 1)
        for i in range(repeat):
            _set_trainable(all_params, everything)
            timed.append(runner.run())
            if i >= fewer or not no_grad_rows:
                continue
            frozen.append(runner.run(backward=False))
            if cacheable:
                root.eval()
                try:
                    evals.append(runner.run(backward=False))
                finally:
                    for mod, was in modes:
                        mod.training = was
        # not the traced dgrad pass: it ran second in a fresh model, and its timing of
        # SmolLM2's input-gradient backward put the plan's speed-ups 15-25 % low
        for _ in range(fewer if early else 0):
            _set_trainable(all_params, early)
            timed_dgrad.append(runner.run())
    m.fwd, m.bwd = _median([t.fwd for t in timed]), _median([t.bwd for t in timed])
    m.frozen_fwd = _median([t.fwd for t in frozen]) if frozen else None
    m.eval_fwd = _median([t.fwd for t in evals]) if evals else None
    m.dgrad_bwd = _median([t.bwd for t in timed_dgrad]) if timed_dgrad else None
    return m


def _row(k: int, m: _Measured, trained: list[nn.Parameter], idx: ModelIndex,
         names: list[str], cuts: list[_Cut], *, weights: int, opt: _OptimizerModel,
         epochs: int, base: float | None, batches_per_epoch: int | None,
         cache_dtype: torch.dtype | None) -> PlanRow:
    """Boundary k from the per-segment measurements: segments >= k train; the
    backward reaches back to the first segment that uses a trained parameter."""
    n, first, dgrad = len(names), m.first, m.dgrad
    ids = {id(p) for p in trained}
    start = min([k, *(first.first_use[i] for i in ids if i in first.first_use)])
    through = start < k
    # what the trained segments save; at the first one, not what its leading
    # parameterless ops save (a max-pool right after the boundary): with the
    # prefix frozen their input needs no grad
    act = sum(b for b, segs in first.saved.values()
              if any(s > k or (s == k and (through or not pre)) for s, pre in segs))
    flops = sum(first.fwd_flops) + sum(first.bwd_flops[k:])
    if through and dgrad is not None:
        # the frozen stretch saves what input gradients need (the dgrad pass); a
        # storage it shares with the trained segments (rotary tables, masks) once
        act += sum(b for b, segs in dgrad.saved.values()
                   if any(start <= s < k for s, _ in segs) and all(s < k for s, _ in segs))
        flops += sum(dgrad.bwd_flops[start:k])
    step = cached = speedup = cached_speedup = None
    upto = cuts[k - 1].upto if k > 0 else None
    # the frozen prefix records no graph (unless the backward runs through it)
    prefix = m.fwd if through or k == 0 else m.frozen_fwd
    if m.fwd is not None and m.bwd is not None and prefix is not None:
        b = sum(m.bwd[k:])
        if through and m.dgrad_bwd is not None:
            b += sum(m.dgrad_bwd[start:k])
        o = m.optimizer.seconds(trained)
        step = sum(prefix[:k]) + sum(m.fwd[k:]) + b + o
        if k > 0 and not through and upto is not None and k not in first.bypass:
            copy = first.copy_seconds.get(k, 0.0)  # one write (epoch 1), one read a step
            cached = sum(m.fwd[k:]) + b + o + copy
            fill = sum((m.eval_fwd or prefix)[:k]) + sum(m.fwd[k:]) + b + o + copy
            if base:
                cached_speedup = epochs * base / (fill + (epochs - 1) * cached)
        speedup = (base or step) / step
    cache_bytes = None
    if k > 0 and k in first.cut_bytes:
        per_batch = first.cut_bytes[k]
        if cache_dtype is not None:
            per_batch = _retyped(per_batch, cache_dtype, trained[0].dtype)
        cache_bytes = per_batch * (batches_per_epoch or 1)
    note = ""
    if through:
        used = sorted(idx.param_name[i] for i in ids if first.first_use.get(i, n) < k)
        note = (f"{used[0]}{' (and more)' if len(used) > 1 else ''} trains and is used "
                f"before the boundary: the backward runs through the frozen prefix, and "
                f"the prefix cannot be cached")
    elif k in first.bypass:
        src, op = first.bypass[k]
        note = (f"FeatureCache cannot replay this prefix: the output of {src!r} is read "
                f"after the boundary (by {op})")
    mem = StepMemory(weights=weights, grads=_bytes_once(trained),
                     optimizer_state=opt.state_bytes(trained), activations=act)
    return PlanRow(
        boundary=k, frozen_through=names[k - 1] if k else None,
        trainable=sum(p.numel() for p in trained), step_seconds=step,
        cached_step_seconds=cached, speedup=speedup, cached_speedup=cached_speedup,
        memory=mem, cache_bytes=cache_bytes, upto=upto, flops=int(flops), note=note,
    )


def _with_fit(row: PlanRow, limits: Mapping[str, float], epochs: int) -> PlanRow:
    fits = not _misses(row, limits, epochs, cache=row.cached_step_seconds is not None)
    return replace(row, fits=fits)


def _retyped(per_batch: int, to: torch.dtype, frm: torch.dtype) -> int:
    ratio = torch.empty((), dtype=to).element_size() / torch.empty((), dtype=frm).element_size()
    return int(per_batch * ratio)


def _median(runs: list[list[float]]) -> list[float]:
    return [statistics.median(vals) for vals in zip(*runs)]


def _cuts(idx: ModelIndex, names: list[str]) -> list[_Cut]:
    """For each boundary k >= 1: the hook that starts segment k."""
    out = []
    for k in range(1, len(names)):
        before, after = idx.modules.get(names[k - 1]), idx.modules.get(names[k])
        if before is not None:
            out.append(_Cut(k, before, "post", names[k - 1]))
        elif after is not None:
            out.append(_Cut(k, after, "pre", None))
        else:
            raise PlanError(
                f"boundary {k} lies between groups {names[k - 1]!r} and {names[k]!r}, and "
                "neither is one module, so plan cannot tell when one ends and the next "
                "starts; pass layers= with module names (e.g. layers=['encoder', 'head'])."
            )
    return out


def _to_meta(batch: Any) -> Any:
    return pytree.tree_map(
        lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, batch)

