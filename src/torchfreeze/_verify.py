"""The proof: ``with tfz.verify(model) as report:`` shows frozen stayed frozen.

On entry :func:`verify` copies every frozen tensor; on exit it compares them
bit for bit and fills a :class:`VerifyReport`. "Frozen" is decided per tensor
at entry:

* every parameter with ``requires_grad=False``;
* the buffers (running statistics) of every frozen BatchNorm layer: pinned
  with ``bn="eval"``, a :class:`~torchfreeze.FrozenBatchNorm`, or a BN layer
  whose affine parameters are all frozen and that has no policy (principle 1:
  frozen means weights *and* statistics). Layers frozen with ``bn="stats"``
  (statistics update by choice) or ``bn="train"`` (trainable) are not.

Memory cost: one copy of each frozen tensor (``report.snapshot_bytes``, kept on
the tensor's device, or in host memory with ``offload=True``), plus 16 bytes
per trainable tensor: trainable tensors get a 128-bit fingerprint instead of a
copy, which tells "moved" from "never moved" without doubling the memory of a
full fine-tune. Comparisons are on the raw bits (integer views), so ``NaN``
compares equal to the same ``NaN`` and ``-0.0`` differs from ``0.0``.

Sharded parameters (FSDP2 ``fully_shard``, any DTensor) are compared shard by
shard: each rank checks what it holds (``to_local()``), with no collective, so
call it on every rank and combine ``report.ok`` yourself if you need one
answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from ._bits import bits
from ._report import Report, fmt_count
from ._select import ModelIndex
from .errors import FrozenStateChanged, ModelTypeError
from .norm import FrozenBatchNorm, bn_policy, is_batchnorm

__all__ = ["VerifyReport", "verify"]

_SHOWN = 15


@dataclass
class VerifyReport(Report):
    """What :func:`verify` found; filled when the ``with`` block exits.

    Attributes:
        ok: no frozen tensor changed or disappeared.
        finished: the block has exited (before that the report is empty).
        changed_frozen: frozen parameters and frozen BN buffers that moved
            (any bit), in model order.
        unchanged_trainable: trainable parameters that never moved (a layer
            that does not learn: no gradient reached it, lr 0, not in the
            optimizer, ...). Does not affect ``ok``.
        just_activated: made trainable by a :class:`~torchfreeze.RotatingFreeze`'s
            last switch, none of them changed since: the block ended before their
            turn trained them (a rotation switches after the step that ends a
            turn). If any of them moved, the unchanged ones are in
            ``unchanged_trainable`` instead. Does not affect ``ok``.
        max_abs_change: for every frozen tensor, the largest absolute change
            (0.0 when bit-identical; ``nan`` when a NaN appeared or vanished,
            ``inf`` when the shape changed).
        missing: frozen tensors that no longer exist under their name.
        unfrozen: frozen at entry but trainable at exit (unfrozen inside the
            block, e.g. by a gradual-unfreeze schedule); their changes are not
            counted.
        frozen_inside: trainable at entry and frozen inside the block by
            :class:`~torchfreeze.AutoFreeze`: copied when they froze and
            compared from that moment on (included in ``changed_frozen``).
        frozen_stretches: frozen stretches compared when a
            :class:`~torchfreeze.RotatingFreeze` made the tensor trainable again
            inside the block (a change in one is in ``changed_frozen``).
        num_frozen: frozen tensors compared.
        num_trainable: trainable tensors fingerprinted.
        snapshot_bytes: memory the snapshot held.
    """

    ok: bool = False
    finished: bool = False
    changed_frozen: list[str] = field(default_factory=list)
    unchanged_trainable: list[str] = field(default_factory=list)
    just_activated: list[str] = field(default_factory=list)
    max_abs_change: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unfrozen: list[str] = field(default_factory=list)
    frozen_inside: list[str] = field(default_factory=list)
    frozen_stretches: int = 0
    num_frozen: int = 0
    num_trainable: int = 0
    snapshot_bytes: int = 0
    frozen_values: int = field(default=0, repr=False)
    kinds: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def headline(self) -> str:
        """One line, e.g. ``"verify OK: 12 frozen tensors (1.2 k values) bit-identical"``."""
        if not self.finished:
            return "verify: running (the report is filled when the with-block exits)"
        if self.ok:
            text = (f"verify OK: {self.num_frozen} frozen tensors "
                    f"({fmt_count(self.frozen_values)} values) bit-identical")
        else:
            bad = len(self.changed_frozen) + len(self.missing)
            text = f"verify FAILED: {bad} of {self.num_frozen} frozen tensors changed"
        moved = self.num_trainable - len(self.unchanged_trainable) - len(self.just_activated)
        return text + f"; {moved} of {self.num_trainable} trainable tensors moved"

    def _rich(self) -> RenderableType:
        parts: list[RenderableType] = [
            Text(self.headline, style="bold green" if self.ok else "bold red")
        ]
        if self.changed_frozen or self.missing:
            table = Table(title_justify="left", box=None, pad_edge=False)
            table.add_column("changed frozen tensor")
            table.add_column("kind")
            table.add_column("max |change|", justify="right")
            rows = [(n, self.kinds.get(n, ""), _num(self.max_abs_change.get(n)))
                    for n in self.changed_frozen]
            rows += [(n, self.kinds.get(n, ""), "missing") for n in self.missing]
            for row in rows[:_SHOWN]:
                table.add_row(*row)
            parts.append(table)
            if len(rows) > _SHOWN:
                parts.append(Text(f"... and {len(rows) - _SHOWN} more (report.changed_frozen)"))
        if self.unchanged_trainable:
            shown = ", ".join(self.unchanged_trainable[:6])
            more = (f" (+{len(self.unchanged_trainable) - 6})"
                    if len(self.unchanged_trainable) > 6 else "")
            parts.append(Text(f"trainable but never moved: {shown}{more} (see tfz.check)",
                              style="yellow"))
        if self.just_activated:
            parts.append(Text(f"activated by the rotation's last switch, not trained yet: "
                              f"{len(self.just_activated)} tensors", style="dim"))
        if self.frozen_inside:
            parts.append(Text(f"frozen inside the block, compared from then on: "
                              f"{len(self.frozen_inside)} tensors", style="dim"))
        if self.frozen_stretches:
            parts.append(Text(f"rotation: {self.frozen_stretches} frozen stretches compared "
                              "when their tensors became trainable again", style="dim"))
        if self.unfrozen:
            parts.append(Text(f"unfrozen inside the block, not counted: "
                              f"{', '.join(self.unfrozen[:6])}"
                              f"{' ...' if len(self.unfrozen) > 6 else ''}", style="dim"))
        return Group(*parts)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0.0:
        return "0 (bits only)"  # e.g. -0.0 vs 0.0, or another NaN payload
    return f"{v:.3g}"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach()


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two wrapped integer sums over ``t``'s bytes (as 64-bit and as 32-bit words).

    Exact over the bits, one fast pass each (no temporary copies): any single
    changed value changes the 64-bit sum, and several changes would have to
    cancel in both sums to go unseen, which optimizer updates do not do.
    """
    u8 = bits(t).contiguous().view(torch.uint8)
    n = u8.numel() // 8 * 8
    tail = u8[n:].to(torch.int64).sum()
    if not n:
        return torch.stack([tail, torch.zeros_like(tail)]).cpu()
    words = u8[:n].view(torch.int64)
    halves = words.view(torch.int32).sum(dtype=torch.int32).to(torch.int64)
    return torch.stack([words.sum() + tail, halves]).cpu()


def _max_abs_change(before: torch.Tensor, after: torch.Tensor) -> float:
    if before.shape != after.shape:
        return float("inf")
    if before.is_floating_point() or before.is_complex():
        work = torch.complex128 if before.is_complex() else torch.float64
        a, b = before.to(work), after.to(work)
        diff = (b - a).abs()
        diff[torch.isnan(a) & torch.isnan(b)] = 0.0  # a NaN that stayed NaN did not change
    else:
        diff = (after.to(torch.float64) - before.to(torch.float64)).abs()
    if diff.numel() == 0:
        return 0.0
    if bool(torch.isnan(diff).any()):
        return float("nan")
    return float(diff.max())


def _frozen_bn(m: nn.Module) -> bool:
    if isinstance(m, FrozenBatchNorm):
        return True
    if not is_batchnorm(m) or getattr(m, "running_mean", None) is None:
        return False
    policy = bn_policy(m)
    if policy == "eval":
        return True
    if policy == "stats":
        return False
    own = list(m.parameters(recurse=False))
    return bool(own) and not any(p.requires_grad for p in own)


# the snapshots of the verify() blocks open now: a tensor that AutoFreeze freezes
# inside a block is copied at that moment and compared from then on
_OPEN: list[_Snapshot] = []


def frozen_now(params: Sequence[torch.Tensor]) -> None:
    """Called by AutoFreeze and RotatingFreeze right after they froze ``params``
    (and pinned their BN): they are copied now and compared from then on."""
    for snap in list(_OPEN):
        snap.frozen_now(params)


def unfrozen_now(params: Sequence[torch.Tensor]) -> None:
    """Called by RotatingFreeze right before it makes ``params`` trainable again:
    each is compared with its copy now (so its frozen stretch is proven), then
    watched as a trainable tensor."""
    for snap in list(_OPEN):
        snap.unfrozen_now(params)


class _Snapshot:
    def __init__(self, model: nn.Module, *, offload: bool) -> None:
        idx = ModelIndex(model)
        self.offload = offload
        self.frozen: dict[str, torch.Tensor] = {}
        self.kinds: dict[str, str] = {}
        self.trainable: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # BN buffer -> its layer
        self.frozen_inside: list[str] = []
        self._trainable_ids: dict[int, tuple[str, torch.Tensor]] = {}
        self._bn_later: dict[int, tuple[str, nn.Module, list[tuple[str, torch.Tensor]]]] = {}
        self.bytes = 0
        self.values = 0
        self._params = dict(idx.params)
        self.changed_early: dict[str, float] = {}  # moved while frozen, unfrozen since
        self.checked_stretches = 0
        self.last_activated: set[str] = set()  # by the latest rotation switch
        with torch.no_grad():
            for name, p in idx.params.items():
                if p.requires_grad:
                    self.trainable[name] = _fingerprint(_local(p))
                    self._trainable_ids[id(p)] = (name, p)
                    self.bytes += 16
                else:
                    self._keep(name, p, "parameter")
            for mname, m in idx.modules.items():
                if not is_batchnorm(m):
                    continue
                prefix = f"{mname}." if mname else ""
                bufs = [(prefix + bname, b) for bname, b in m.named_buffers(recurse=False)
                        if b is not None and idx.buffer_name.get(id(b)) == prefix + bname]
                if not _frozen_bn(m):
                    self._bn_later[id(m)] = (mname, m, bufs)
                    continue
                for full, b in bufs:
                    self._keep(full, b, "BN buffer")
                    self.owner[full] = mname

    def frozen_now(self, params: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                entry = self._trainable_ids.pop(id(p), None)
                if entry is None or p.requires_grad:
                    continue
                name = entry[0]
                self.trainable.pop(name, None)
                self._keep(name, p, "parameter")
                self.frozen_inside.append(name)
            for key, (mname, m, bufs) in list(self._bn_later.items()):
                if not _frozen_bn(m):
                    continue
                del self._bn_later[key]
                for full, b in bufs:
                    self._keep(full, b, "BN buffer")
                    self.owner[full] = mname
                    self.frozen_inside.append(full)

    def unfrozen_now(self, params: Sequence[torch.Tensor]) -> None:
        ids = {id(p) for p in params}
        self.last_activated = set()
        with torch.no_grad():
            for name, p in list(self._params.items()):
                if id(p) not in ids or name not in self.frozen:
                    continue
                self.last_activated.add(name)
                before = self.frozen.pop(name)
                after = _local(p).to(before.device)
                if not (before.shape == after.shape and before.dtype == after.dtype
                        and torch.equal(bits(before), bits(after))):
                    self.changed_early[name] = _max_abs_change(before, after)
                self.checked_stretches += 1
                self.trainable[name] = _fingerprint(_local(p))
                self._trainable_ids[id(p)] = (name, p)

    def _keep(self, name: str, t: torch.Tensor, kind: str) -> None:
        local = _local(t)
        copy = local.to("cpu", copy=True) if self.offload else local.clone(
            memory_format=torch.contiguous_format)
        self.frozen[name] = copy
        self.kinds[name] = kind
        self.bytes += copy.numel() * copy.element_size()
        self.values += t.numel()

    def fill(self, report: VerifyReport, model: nn.Module) -> None:
        idx = ModelIndex(model)
        lookup: dict[str, torch.Tensor] = dict(idx.param_aliases)
        lookup.update({n: b for n, b in idx.buffer_aliases if n not in lookup})
        changed, missing, unfrozen = [], [], []
        max_change: dict[str, float] = {}
        with torch.no_grad():
            for name, before in self.frozen.items():
                now = lookup.get(name)
                if now is None:
                    missing.append(name)
                    continue
                if self.kinds[name] == "parameter" and now.requires_grad:
                    unfrozen.append(name)
                    continue
                layer = idx.modules.get(self.owner.get(name, ""))
                if name in self.owner and layer is not None and not _frozen_bn(layer):
                    unfrozen.append(name)  # its BN layer was unfrozen inside the block
                    continue
                after = _local(now)
                if self.offload:
                    after = after.to("cpu")
                same = before.shape == after.shape and before.dtype == after.dtype and (
                    torch.equal(bits(before), bits(after)))
                max_change[name] = 0.0 if same else _max_abs_change(before, after)
                if not same:
                    changed.append(name)
            for name, change in self.changed_early.items():
                if name not in changed:
                    changed.append(name)
                    max_change[name] = change
            stuck = []
            for name, fp in self.trainable.items():
                now = lookup.get(name)
                if now is not None and torch.equal(fp, _fingerprint(_local(now))):
                    stuck.append(name)
            # the last switch's tensors, if none of them moved: no step since the switch
            # (one that moved shows a step ran: then the unchanged ones are stuck)
            just = [n for n in stuck if n in self.last_activated]
            if len(just) < len(self.last_activated & set(self.trainable)):
                just = []
            stuck = [n for n in stuck if n not in just]
        report.changed_frozen = changed
        report.missing = missing
        report.unfrozen = unfrozen
        report.frozen_inside = list(self.frozen_inside)
        report.max_abs_change = max_change
        report.unchanged_trainable = stuck
        report.just_activated = just
        report.frozen_stretches = self.checked_stretches
        report.num_frozen = len(self.frozen)
        report.num_trainable = len(self.trainable)
        report.snapshot_bytes = self.bytes
        report.frozen_values = self.values
        report.kinds = dict(self.kinds)
        report.ok = not changed and not missing
        report.finished = True


@contextlib.contextmanager
def verify(
    model: nn.Module, *, strict: bool = False, offload: bool = False
) -> Iterator[VerifyReport]:
    """Prove that frozen tensors stay bit-for-bit unchanged through a block.

    Args:
        model: the model (DDP- or FSDP2-wrapped works; each rank checks its shards).
        strict: raise :class:`~torchfreeze.errors.FrozenStateChanged` on exit
            when a frozen tensor changed (not when the block itself raised: that
            exception propagates, and the report is still filled).
        offload: keep the snapshot in host memory instead of on the tensors'
            device (saves accelerator memory; costs a device-to-host copy).

    Yields:
        A :class:`VerifyReport`, filled when the block exits.

    Raises:
        FrozenStateChanged: with ``strict=True``, naming the tensors that changed.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> _ = tfz.freeze(net, "0", "1")
        >>> opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> with tfz.verify(net, strict=True) as report:
        ...     net.train()(torch.randn(8, 4)).sum().backward()
        ...     opt.step()
        >>> report.ok, report.changed_frozen, report.unchanged_trainable
        (True, [], [])
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"tfz.verify() expects an nn.Module, got {type(model).__name__}. Pass the model "
            "whose frozen part must stay unchanged."
        )
    report = VerifyReport()
    snapshot = _Snapshot(model, offload=offload)
    _OPEN.append(snapshot)
    try:
        yield report
    except BaseException:
        _OPEN.remove(snapshot)
        with contextlib.suppress(Exception):  # never mask the block's own exception
            snapshot.fill(report, model)
        raise
    _OPEN.remove(snapshot)
    snapshot.fill(report, model)
    if strict and not report.ok:
        bad = report.changed_frozen + report.missing
        detail = ", ".join(
            f"{n} (max |change| {_num(report.max_abs_change.get(n))})"
            if n in report.max_abs_change else f"{n} (missing)"
            for n in bad[:8]
        )
        raise FrozenStateChanged(
            f"{len(bad)} frozen tensors changed inside tfz.verify(): {detail}"
            f"{' ...' if len(bad) > 8 else ''}. Something updated them: run "
            "tfz.check(model, optimizer) after backward() to see what (a frozen parameter "
            "still in the optimizer, a stale .grad, a BatchNorm layer in train mode).",
            names=bad,
        )
