"""Block rotation: train a few layer groups at a time, with optimizer state for those only.

Full-parameter fine-tuning in a fraction of the optimizer memory: one group (or
``active`` groups) trains for ``switch_every`` steps, then the next. This is
BAdam's block coordinate descent (Luo et al. 2024; orders ``"descending"``,
``"ascending"``, ``"random"``) and, with ``order="random"``, ``always=`` the
embeddings and head and ``active=k``, LISA (Pan et al. 2024).

What a switch does, in this order:

1. the outgoing groups get ``requires_grad=False`` and ``.grad=None``, and their
   optimizer state is **removed from the optimizer** (``state="fresh"``, the
   default, as BAdam does: the incoming block starts with fresh Adam moments),
   or moved to host memory and given back when the group returns
   (``state="keep"``);
2. the incoming groups get ``requires_grad=True``.

No param group is added or removed, so LR schedulers stay aligned; torch
optimizers skip a parameter without ``.grad``, so an inactive group is
bit-identical between its activations (weight decay included).
:func:`torchfreeze.verify` proves that for every inactive stretch inside its
block, and :func:`torchfreeze.check` knows the inactive groups are kept in the
optimizer on purpose. Parameters in neither ``layers`` nor ``always`` are frozen
for the whole run.

Under ``DistributedDataParallel`` every switch re-wraps the model once through
:func:`torchfreeze.distributed.swap` (the reducer then covers exactly the
active groups, so there is no "unused parameters" error and no stale reducer);
use ``rot.model`` for the forward pass after each :meth:`RotatingFreeze.step`.
The order is a pure function of ``seed`` and the switch number, so every rank
draws the same groups, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from . import _managed
from ._freeze import freeze, unfreeze
from ._select import ModelIndex, Selector, require_module, resolve
from ._state import check_format, register
from ._wrappers import is_ddp, unwrap_optimizer
from .errors import FreezeStateError, TiedWeightWarning, TorchfreezeError

__all__ = ["RotatingFreeze", "optimizer_state_bytes"]

STATE_FORMAT = register("torchfreeze.rotating_freeze", "RotatingFreeze.state_dict()")
STATE_VERSION = 1

Order = Literal["ascending", "descending", "random"]
StateMode = Literal["fresh", "keep"]
_ORDERS = ("ascending", "descending", "random")
_STATES = ("fresh", "keep")
_TRAINABLE_DTYPES = (torch.float32, torch.float64)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors an optimizer holds as state, counted once per storage.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(256))
        >>> opt = torch.optim.AdamW([w])
        >>> w.grad = torch.ones(256); opt.step()
        >>> optimizer_state_bytes(opt)   # exp_avg + exp_avg_sq (fp32) + the step counter
        2052
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in unwrap_optimizer(optimizer).state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


def _check_int(what: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise TorchfreezeError(f"{what}={value!r} must be an int >= {low} (nothing was changed).")
    return int(value)


def _units(module: nn.Module, layers: Sequence[Any] | None, idx: ModelIndex,
           always: set[int]) -> list[tuple[str, list[str]]]:
    from .autofreeze import resolve_groups

    groups = resolve_groups(module, layers, idx, who="RotatingFreeze", minimum=1)
    out = []
    for name, names in groups:
        kept = [n for n in names if id(idx.params[n]) not in always]
        if kept:
            out.append((name, kept))
    return out


class RotatingFreeze:
    """Train ``active`` layer groups at a time and switch every ``switch_every`` steps.

    Build the optimizer over every parameter first (as for a full fine-tune:
    ``torch.optim.AdamW(model.parameters())``), then the rotation; call
    :meth:`step` after every ``optimizer.step()``. At any moment the optimizer
    holds state only for the active and ``always`` groups.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (re-wrapped at
            every switch: forward through ``rot.model``), or its ``nn.DataParallel``
            wrapper (looked through: the groups are named as in the inner model, and
            it replicates the current ``requires_grad`` flags at every forward, so
            it needs no re-wrap).
        optimizer: an optimizer that holds every parameter of ``layers`` and
            ``always`` (accelerate's wrapper is looked through).
        layers: the rotating groups in depth order (``tfz.layers(model)``, or one
            selector per group); default: every group of ``tfz.layers(model)``
            (without what ``always`` selects).
        active: how many groups train at once.
        switch_every: steps per activation.
        order: ``"descending"`` (last group first, BAdam's default),
            ``"ascending"``, or ``"random"`` (random reshuffling: every group
            once per cycle, a new permutation each cycle, from ``seed``).
        always: selectors that train the whole time (LISA: the embeddings and
            the head).
        seed: seeds the ``"random"`` order (the same on every rank).
        state: ``"fresh"`` (outgoing state is freed; BAdam) or ``"keep"`` (it
            waits in host memory and returns with its group; see
            :attr:`stash_bytes`).

    Raises:
        TorchfreezeError: an option is out of range, ``active`` is not below the
            number of groups, the optimizer lacks a rotating parameter, or a
            rotating parameter is not float32/float64 (bfloat16 weights: keep them
            in float32 and train under autocast; the message says how). Nothing is
            changed.

    Example:
        >>> import torch, torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        >>> rot = tfz.RotatingFreeze(net, opt, switch_every=2)
        >>> rot.active
        ['2']
        >>> for _ in range(4):
        ...     net(torch.randn(8, 4)).sum().backward()
        ...     opt.step(); _ = rot.step(); opt.zero_grad()
        >>> rot.events
        [(0, ['2']), (2, ['1']), (4, ['0'])]
        >>> [n for n, p in net.named_parameters() if p.requires_grad], len(opt.state)
        (['0.weight', '0.bias'], 0)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        layers: Sequence[Any] | None = None,
        active: int = 1,
        switch_every: int = 50,
        order: Order = "descending",
        always: Selector | None = None,
        seed: int = 0,
        state: StateMode = "fresh",
    ) -> None:
        require_module(model, "RotatingFreeze")
        self._check_wrapper(model)
        if order not in _ORDERS:
            raise TorchfreezeError(
                f"order={order!r} is not an order; use one of {', '.join(_ORDERS)}."
            )
        if state not in _STATES:
            raise TorchfreezeError(
                f"state={state!r}: use 'fresh' (free the outgoing optimizer state, BAdam) or "
                "'keep' (hold it in host memory until the group returns)."
            )
        switch_every = _check_int("switch_every", switch_every, 1)
        active = _check_int("active", active, 1)
        seed = _check_int("seed", seed, 0)
        module = model.module if is_ddp(model) else model
        idx = ModelIndex(module)
        always_names: list[str] = []
        if always is not None:
            always_names = [n for n in resolve(module, [always], index=idx, allow_empty=False,
                                               what="always=").param_names
                            if idx.params[n].is_floating_point()]
        always_ids = {id(idx.params[n]) for n in always_names}
        units = _units(module, layers, idx, always_ids)
        if active >= len(units):
            raise TorchfreezeError(
                f"active={active} but there are {len(units)} rotating groups "
                f"({', '.join(n for n, _ in units[:6])}{', ...' if len(units) > 6 else ''}): "
                "nothing would rotate. Use fewer active groups, or train the whole model "
                "without RotatingFreeze. Nothing was changed."
            )
        rotating = [n for _, names in units for n in names] + always_names
        opt = unwrap_optimizer(optimizer)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        missing = [n for n in rotating if id(idx.params[n]) not in held]
        if missing:
            raise TorchfreezeError(
                f"the optimizer does not hold {len(missing)} of the {len(rotating)} parameters "
                f"that rotate ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), "
                "so they could never train when their group is active. Build the optimizer "
                "over every parameter before freezing anything, e.g. "
                "torch.optim.AdamW(model.parameters(), lr=...). Nothing was changed."
            )
        low_names = [n for n in rotating if idx.params[n].dtype not in _TRAINABLE_DTYPES]
        if low_names:
            low = sorted({str(idx.params[n].dtype) for n in low_names})
            raise TorchfreezeError(
                f"rotating parameters are {', '.join(low)}: {len(low_names)} of them "
                f"({', '.join(low_names[:2])}{', ...' if len(low_names) > 2 else ''}). "
                "Updating them in place loses every step smaller than their resolution, and "
                "RotatingFreeze keeps no float32 master copy. Keep the weights in float32 "
                "and compute in bfloat16: load with from_pretrained(..., dtype=torch.float32) "
                "or call model.float() before building the optimizer, and run the forward "
                "under torch.autocast(device_type, dtype=torch.bfloat16) (Lightning: "
                "precision='bf16-mixed', not 'bf16-true'; the Hugging Face Trainer: "
                "bf16=True with a float32 model). Nothing was changed."
            )
        self.model = model
        self.optimizer = optimizer
        self.groups: list[tuple[str, list[str]]] = units
        self.always: list[str] = always_names
        self.num_active = active
        self.switch_every = switch_every
        self.order: Order = order
        self.seed = seed
        self.state_mode: StateMode = state
        self.steps = 0
        self.switches = 0
        self.events: list[tuple[int, list[str]]] = []
        #: host-memory optimizer state of inactive groups (``state="keep"`` only)
        self.stash: dict[str, dict[str, torch.Tensor | Any]] = {}
        self._stash_devices: dict[str, dict[str, torch.device]] = {}
        self._perms: dict[int, list[int]] = {}
        self._current: list[int] = []
        self._rest = [n for n, p in idx.params.items()
                      if n not in set(rotating) and p.is_floating_point()]
        self._activate(self._window(0), first=True)
        _managed.register(self)

    # -- which groups ---------------------------------------------------------

    @staticmethod
    def _check_wrapper(model: nn.Module) -> None:
        from .distributed import _fsdp_module_class

        if isinstance(model, _fsdp_module_class()):
            raise TorchfreezeError(
                "RotatingFreeze does not support FSDP2 (fully_shard) models yet: it would "
                "have to free sharded optimizer state and refresh FSDP2's gradient dtypes at "
                "every switch, which is not tested. Use DistributedDataParallel, or one "
                "process. Nothing was changed."
            )

    @property
    def module(self) -> nn.Module:
        """The underlying model (``model.module`` for a DDP wrapper)."""
        return self.model.module if is_ddp(self.model) else self.model

    @property
    def active(self) -> list[str]:
        """Names of the groups training now (``always`` not included)."""
        return [self.groups[i][0] for i in self._current]

    def _perm(self, cycle: int) -> list[int]:
        if cycle not in self._perms:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + cycle) % (1 << 62))
            self._perms = {cycle: torch.randperm(len(self.groups), generator=gen).tolist()}
        return self._perms[cycle]

    def _window(self, switch: int) -> list[int]:
        """The groups active after ``switch`` switches: a pure function of the settings."""
        n, k = len(self.groups), self.num_active
        if self.order == "ascending":
            return [(switch * k + i) % n for i in range(k)]
        if self.order == "descending":
            return [n - 1 - (switch * k + i) % n for i in range(k)]
        out: list[int] = []
        pos = switch * k
        while len(out) < k:
            cycle, j = divmod(pos, n)
            unit = self._perm(cycle)[j]
            if unit not in out:
                out.append(unit)
            pos += 1
        return out

    # -- switching ------------------------------------------------------------

    def _params(self, units: Sequence[int]) -> Iterator[tuple[str, nn.Parameter]]:
        params = ModelIndex(self.module).params
        for i in units:
            for n in self.groups[i][1]:
                yield n, params[n]

    def _activate(self, window: list[int], *, first: bool = False,
                  restore_stash: bool = True) -> list[str]:
        from ._verify import frozen_now, unfrozen_now

        old = set(range(len(self.groups))) if first else set(self._current)
        outgoing = [i for i in sorted(old) if i not in window]
        incoming = [i for i in window if first or i not in self._current]
        idx = ModelIndex(self.module)
        out_params = [p for _, p in self._params(outgoing)]
        if first:
            out_params += [idx.params[n] for n in self._rest]
        in_params = [p for _, p in self._params(incoming)]
        if first:
            in_params += [idx.params[n] for n in self.always]
        opt = unwrap_optimizer(self.optimizer)
        unfrozen_now(in_params)
        with warnings.catch_warnings():
            # a tied embedding/head is one group of tfz.layers: both names move together
            warnings.simplefilter("ignore", TiedWeightWarning)
            if is_ddp(self.model):
                from .distributed import swap

                self.model = swap(self.model, freeze=out_params, unfreeze=in_params)
            else:
                if out_params:
                    freeze(self.module, out_params)
                if in_params:
                    unfreeze(self.module, in_params)
        for name, p in self._params(outgoing):
            st = opt.state.pop(p, None)
            if self.state_mode == "keep" and st:
                self.stash[name] = {k: v.detach().to("cpu", copy=True)
                                    if isinstance(v, torch.Tensor) else v
                                    for k, v in st.items()}
                self._stash_devices[name] = {k: v.device for k, v in st.items()
                                             if isinstance(v, torch.Tensor)}
        if first:
            for n in self._rest:
                opt.state.pop(idx.params[n], None)
        if restore_stash:
            for name, p in self._params(incoming):
                saved = self.stash.pop(name, None)
                devices = self._stash_devices.pop(name, {})
                if saved is not None:
                    opt.state[p] = {k: v.to(devices.get(k, p.device), copy=True)
                                    if isinstance(v, torch.Tensor) else v
                                    for k, v in saved.items()}
        frozen_now(out_params)
        self._current = list(window)
        self.events.append((self.steps, self.active))
        return [self.groups[i][0] for i in incoming]

    def step(self) -> list[str]:
        """Count one optimizer step; switch groups when ``switch_every`` steps are done.

        Call it after ``optimizer.step()`` (before or after ``zero_grad()``), on
        every rank under DDP.

        Returns:
            The names of the groups that became active (empty when no switch).
        """
        self.steps += 1
        if self.steps % self.switch_every:
            return []
        self.switches += 1
        return self._activate(self._window(self.switches))

    # -- measuring ----------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (measured: :func:`optimizer_state_bytes`)."""
        return optimizer_state_bytes(self.optimizer)

    @property
    def stash_bytes(self) -> int:
        """Bytes of optimizer state waiting in host memory (``state="keep"``)."""
        return sum(v.numel() * v.element_size() for st in self.stash.values()
                   for v in st.values() if isinstance(v, torch.Tensor))

    def managed_ids(self) -> dict[int, str]:
        """``id(param) -> reason`` for every parameter this rotation keeps frozen."""
        params = ModelIndex(self.module).params
        out = {id(p): f"inactive group {self.groups[i][0]!r} of a RotatingFreeze"
               for i in range(len(self.groups)) if i not in self._current
               for _, p in self._params([i])}
        out.update({id(params[n]): "outside every group of a RotatingFreeze"
                    for n in self._rest if n in params})
        return out

    # -- resume ----------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "groups": [name for name, _ in self.groups],
            "active": self.num_active,
            "switch_every": self.switch_every,
            "order": self.order,
            "seed": self.seed,
            "state": self.state_mode,
            "always": list(self.always),
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the rotation stands: steps, active groups, events (and the stash with
        ``state="keep"``). Save it next to the optimizer's state dict."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self._config(),
            "steps": self.steps,
            "switches": self.switches,
            "active": self.active,
            "events": [[s, list(names)] for s, names in self.events],
            "stash": {n: dict(st) for n, st in self.stash.items()},
            "stash_devices": {n: {k: str(d) for k, d in ds.items()}
                              for n, ds in self._stash_devices.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved rotation: activates the saved groups (freeing the state
        of the others) and restores the step count, events and stash. Call it before
        or after ``optimizer.load_state_dict``; the run continues bit for bit,
        mid-block too.

        Raises:
            FreezeStateError: the state was saved by another kind of object, or by
                a rotation with other settings (named). Nothing is changed.
        """
        check_format(state, STATE_FORMAT, version=STATE_VERSION)
        mine, saved = self._config(), dict(state.get("config", {}))
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, here {mine[k]!r}"
                               for k in diff[:3])
            raise FreezeStateError(
                f"this RotatingFreeze state was saved with other settings ({detail}). Build "
                "the RotatingFreeze exactly as in the run that saved it. Nothing was changed."
            )
        names = [name for name, _ in self.groups]
        window = [names.index(n) for n in state["active"]]
        self.stash = {}
        self._stash_devices = {}
        self.steps = int(state["steps"])
        self.switches = int(state["switches"])
        self.events = []
        self._activate(window, restore_stash=False)
        self.stash = {n: dict(st) for n, st in state.get("stash", {}).items()}
        self._stash_devices = {n: {k: torch.device(d) for k, d in ds.items()}
                               for n, ds in state.get("stash_devices", {}).items()}
        self.events = [(int(s), list(n)) for s, n in state.get("events", [])]

    def __repr__(self) -> str:
        return (f"RotatingFreeze(groups={len(self.groups)}, active={self.active}, "
                f"order={self.order!r}, step={self.steps}, switch_every={self.switch_every})")
