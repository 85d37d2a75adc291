"""Put a checkpoint's matching weights into a model, and say exactly what happened.

``model.load_state_dict(sd, strict=False)`` has two silent failures: keys that
differ by a wrapper prefix (``module.``, ``_orig_mod.``, ``bert.``) load nothing
and pass, and a shape-mismatched head raises even with ``strict=False`` (seed
004). :func:`load_pretrained` aligns names, skips or slices mismatches, refuses to
load nothing, and validates everything before it writes a single value.

Example:
    >>> import torch.nn as nn, torchfreeze as tfz
    >>> old = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
    >>> new = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    >>> report = tfz.load_pretrained(new, {"epoch": 9, "state_dict": old.state_dict()})
    >>> report.loaded, report.mismatched["2.weight"]
    (['0.weight', '0.bias'], ((10, 8), (5, 8)))
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import nn

from ._checkpoint import (
    CheckpointInfo,
    CheckpointRow,
    Source,
    inspect_checkpoint,
    read_checkpoint,
    read_state_dict,
)
from ._compat import own_buffers, own_parameters
from ._load_report import LoadReport, shape_text
from ._select import ModelIndex, Selector, require_module, resolve
from .errors import LoadError

__all__ = [
    "CheckpointInfo",
    "CheckpointRow",
    "LoadPlan",
    "LoadReport",
    "Source",
    "align_keys",
    "apply_plan",
    "inspect_checkpoint",
    "load_pretrained",
    "plan_load",
    "read_state_dict",
]

Rename = Union[Mapping[str, str], Sequence[tuple[str, str]]]
_PREFIX_DEPTH = 4  # deepest checkpoint prefix tried for stripping
_FANOUT = 32  # a suffix this common ("weight") says nothing about where keys belong


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------
# the model side


@dataclass
class _Target:
    name: str  # canonical (first) name
    tensor: torch.Tensor
    is_param: bool
    persistent: bool


def _targets(model: nn.Module, idx: ModelIndex) -> dict[str, _Target]:
    """Every name a checkpoint key could match (tied aliases included)."""
    out: dict[str, _Target] = {}
    for mname, module in idx.module_aliases:
        prefix = f"{mname}." if mname else ""
        for pname, p in own_parameters(module):
            out[prefix + pname] = _Target(idx.param_name[id(p)], p, True, True)
        for bname, b, persistent in own_buffers(module):
            out[prefix + bname] = _Target(idx.buffer_name[id(b)], b, False, persistent)
    return out


# ---------------------------------------------------------------------------
# key alignment


@dataclass(frozen=True)
class _Alignment:
    strip: str = ""
    add: str = ""

    def apply(self, key: str) -> str:
        if key.startswith(self.strip):
            return self.add + key[len(self.strip):]
        return key

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"removed prefix {self.strip!r}")
        if self.add:
            parts.append(f"added prefix {self.add!r}")
        return " and ".join(parts)


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, min(len(parts), _PREFIX_DEPTH + 1))]


def align_keys(keys: list[str], names: set[str], shape_ok: Any) -> _Alignment:
    """The prefix rule under which the most checkpoint keys name a model tensor.

    A checkpoint saved from a wrapper (``module.``, ``_orig_mod.``, a Lightning
    ``model.``), from a base model (no ``bert.``), or from a sub-network (a
    backbone loaded into ``model.backbone``) differs from the model by one prefix
    swap. Every swap the names support is scored by matched keys (then by matched
    shapes); the identity wins ties, and two different best swaps are refused.
    """
    by_suffix: dict[str, list[str]] = defaultdict(list)
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix[".".join(parts[i:])].append(".".join(parts[:i]) + "." if i else "")
    votes: Counter[_Alignment] = Counter()
    as_is_under: Counter[str] = Counter()  # keys under a prefix that already match
    base = 0
    for key in keys:
        hit = key in names
        base += hit
        for strip in ["", *_prefixes(key)]:
            rest = key[len(strip):]
            adds = by_suffix.get(rest, ())
            if len(adds) > _FANOUT or "." not in rest:
                # 'weight' alone says nothing about which module a key belongs to
                adds = [""] if rest in names else []
            for add in adds:
                if add != strip:
                    votes[_Alignment(strip, add)] += 1
            if hit:
                as_is_under[strip] += 1
    scores = {a: v + base - as_is_under[a.strip] for a, v in votes.items()}
    best = max(scores.values(), default=0)
    if best <= base:
        return _Alignment()
    top = [a for a, s in scores.items() if s == best]
    if len(top) > 1:
        shape_scores = {a: sum(shape_ok(k, a.apply(k)) for k in keys) for a in top}
        best_shapes = max(shape_scores.values())
        top = [a for a in top if shape_scores[a] == best_shapes]
    if len(top) > 1:
        # different rules can pair up the very same keys ('module.model.' -> 'model.'
        # vs 'module.' -> ''); only a different pairing is a real ambiguity
        pairings: dict[frozenset[tuple[str, str]], _Alignment] = {}
        for a in sorted(top, key=lambda a: (len(a.strip) + len(a.add), a.strip, a.add)):
            pairing = frozenset((k, a.apply(k)) for k in keys if a.apply(k) in names)
            pairings.setdefault(pairing, a)
        if len(pairings) > 1:
            options = list(pairings.values())[:3]
            raise LoadError(
                "the checkpoint's keys fit the model equally well in several places: "
                + "; ".join(o.describe() for o in options)
                + f" (each matches {best} key{'s' if best != 1 else ''}). Load into the "
                "submodule you mean (load_pretrained(model.part, ...)) or say where with "
                "rename={r'^old\\.': 'new.'}."
            )
        top = list(pairings.values())
    return top[0]


def _apply_renames(keys: list[str], rename: Rename | None) -> list[str]:
    if rename is None:
        return keys
    rules = list(rename.items()) if isinstance(rename, Mapping) else list(rename)
    out = list(keys)
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise LoadError(
                f"rename rule {rule!r} is not a (regex, replacement) pair; pass e.g. "
                "rename={r'^encoder\\.': 'backbone.'}."
            )
        pattern, repl = rule
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise LoadError(
                f"rename pattern {pattern!r} is not a valid regular expression ({exc})."
            ) from None
        if not any(rx.search(k) for k in out):
            sample = ", ".join(repr(k) for k in out[:4])
            raise LoadError(
                f"rename pattern {pattern!r} matches no checkpoint key (keys look like "
                f"{sample}). Fix the pattern or drop the rule."
            )
        try:
            out = [rx.sub(repl, k) for k in out]
        except (re.error, IndexError) as exc:
            raise LoadError(f"rename replacement {repl!r} for {pattern!r} fails: {exc}.") from None
    dupes = [k for k, n in Counter(out).items() if n > 1]
    if dupes:
        sources = [k for k, new in zip(keys, out) if new == dupes[0]]
        shown = ", ".join(sources[:4]) + (f", … ({len(sources)} keys)" if len(sources) > 4 else "")
        raise LoadError(
            f"rename maps several checkpoint keys to {dupes[0]!r} ({shown}). "
            "Make the rules specific enough that every key keeps a name of its own."
        )
    return out


# ---------------------------------------------------------------------------
# validation


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    # copy_() would silently truncate floats into integer buffers and drop the
    # imaginary part of complex values; neither is a conversion anyone means.
    if src.is_complex and not dst.is_complex:
        return False
    return not ((src.is_floating_point or src.is_complex)
                and not (dst.is_floating_point or dst.is_complex))


def _unwritable(t: torch.Tensor) -> str | None:
    if t.is_meta:
        return ("is on the meta device (no storage); materialise the model first, "
                "e.g. model.to_empty(device='cpu')")
    if t.is_inference():
        return "is an inference-mode tensor; build the model outside torch.inference_mode()"
    if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
        return "is sharded (DTensor); load the weights before fully_shard/parallelize"
    return None


@dataclass
class _Copy:
    target: _Target
    src: torch.Tensor
    key: str
    slices: tuple[slice, ...] | None = None


def _is_counter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "num_batches_tracked"


@dataclass
class LoadPlan:
    """What :func:`load_pretrained` will write, worked out and checked before any copy.

    Attributes:
        report: the :class:`LoadReport` (as it will be returned).
        copies: one entry per model tensor to fill: the tensor, the checkpoint
            value, and the leading slice to copy (``None``: all of it).
    """

    report: LoadReport
    copies: list[_Copy]


def plan_load(
    model: nn.Module,
    source: Source,
    *,
    rename: Rename | None = None,
    exclude: Selector | None = None,
    mismatched: Literal["skip", "error", "partial"] = "skip",
    unsafe_pickle: bool = False,
) -> LoadPlan:
    """The planning half of :func:`load_pretrained`: read, align, match, check.

    Works out what goes where and raises every error :func:`load_pretrained`
    can raise; never writes to ``model``. :func:`apply_plan` does the copy.

    Example:
        >>> import torch.nn as nn
        >>> from torchfreeze.load import apply_plan, plan_load
        >>> src, dst = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> plan = plan_load(dst, {"module." + k: v for k, v in src.state_dict().items()})
        >>> [(c.target.name, c.key) for c in plan.copies]
        [('weight', 'module.weight'), ('bias', 'module.bias')]
        >>> apply_plan(plan); bool((dst.weight == src.weight).all())
        True
    """
    require_module(model, "load_pretrained")
    if mismatched not in ("skip", "error", "partial"):
        raise LoadError(
            f"mismatched={mismatched!r} is not one of 'skip', 'error', 'partial'."
        )
    idx = ModelIndex(model)
    targets = _targets(model, idx)
    excluded_ids: set[int] = set()
    if exclude is not None:
        sel = resolve(model, [exclude], default_all=False, index=idx)
        excluded_ids = {id(t) for t in (*sel.params, *sel.buffers)}

    ckpt = read_checkpoint(source, unsafe_pickle=unsafe_pickle)
    keys = list(ckpt.tensors)
    renamed_keys = _apply_renames(keys, rename)
    tensors = dict(zip(renamed_keys, ckpt.tensors.values()))
    original = dict(zip(renamed_keys, keys))

    def shape_ok(key: str, name: str) -> bool:
        t = targets.get(name)
        return t is not None and tuple(t.tensor.shape) == tuple(tensors[key].shape)

    alignment = align_keys(renamed_keys, set(targets), shape_ok)
    matched = _match(renamed_keys, targets, alignment, original)

    report = LoadReport(
        loaded=[], missing=[], unexpected=[], mismatched={}, renamed={},
        alignment=alignment.describe(), source=ckpt.origin,
    )
    if ckpt.unwrapped:
        report.notes.append("weights read from " + "".join(f"[{k!r}]" for k in ckpt.unwrapped))
    if ckpt.dropped:
        report.notes.append(f"{len(ckpt.dropped)} non-tensor entries ignored (e.g. "
                            f"{ckpt.dropped[0]!r}).")
    report._ckpt_shapes = {original[k]: tuple(t.shape) for k, t in tensors.items()}
    report._model_shapes = {t.name: tuple(t.tensor.shape) for t in targets.values()}

    plans, problems = _plan_copies(matched, targets, tensors, original, excluded_ids,
                                   mismatched, report)
    for key in renamed_keys:
        if key in matched:
            continue
        if _is_counter(key):
            report.ignored[original[key]] = "BatchNorm counter the model does not keep"
        else:
            report.unexpected.append(original[key])
    _list_loaded_and_missing(plans, targets, idx, excluded_ids, report)
    _count_values(plans, idx, report)
    _refuse(model, ckpt.origin, plans, problems, mismatched, renamed_keys, targets, report)
    return LoadPlan(report, list(plans.values()))


def apply_plan(plan: LoadPlan) -> None:
    """The applying half of :func:`load_pretrained`: copy what :func:`plan_load` planned.

    Values are cast to each model tensor's dtype and device by ``copy_``, under
    ``torch.no_grad()``; with a slice, only the overlapping part is written.
    """
    with torch.no_grad():
        for copy in plan.copies:
            dst = copy.target.tensor
            if copy.slices is None:
                dst.copy_(copy.src)
            else:
                dst[copy.slices].copy_(copy.src[copy.slices])


def load_pretrained(
    model: nn.Module,
    source: Source,
    *,
    rename: Rename | None = None,
    exclude: Selector | None = None,
    mismatched: Literal["skip", "error", "partial"] = "skip",
    dry_run: bool = False,
    unsafe_pickle: bool = False,
) -> LoadReport:
    """Load every checkpoint tensor that fits ``model``, and report the rest.

    Names are matched exactly after ``rename``; when a prefix swap (a wrapper's
    ``module.``/``_orig_mod.``/``model.``, a base model's ``bert.``, a backbone
    checkpoint into ``model.backbone``) makes strictly more keys match, it is
    applied and every renamed key reported. Buffers (BatchNorm running
    statistics) load like parameters; tied parameters load once. Everything is
    validated before the first value is copied (under ``torch.no_grad()``), so a
    raised error leaves the model bit-for-bit as it was.

    Args:
        model: the model to fill.
        source: a path (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``,
            ``.safetensors``, a Hugging Face folder, a sharded ``*.index.json``),
            a (possibly nested) state dict, or an ``nn.Module``.
        rename: ``{regex: replacement}`` (or a list of pairs) applied in order to
            checkpoint keys with ``re.sub`` before matching. A rule that matches no
            key is an error.
        exclude: selectors (the :func:`torchfreeze.select` grammar, on the model)
            of tensors to leave as initialised.
        mismatched: names that match with a different shape are ``"skip"``-ped
            (default; listed in ``mismatched``), an ``"error"``, or ``"partial"``-ly
            copied: the overlapping leading slice (a head grown from 10 to 12
            classes keeps its first 10 rows; an embedding grown by new tokens
            keeps the old rows).
        dry_run: compute the report, write nothing.
        unsafe_pickle: allow pickles that hold Python objects besides tensors
            (``torch.load(weights_only=False)``); this can execute code from the
            file, so only for files you trust.

    Returns:
        A :class:`LoadReport`.

    Raises:
        LoadError: unreadable, corrupt or truncated source; nothing loadable
            at all; a shape mismatch with ``mismatched="error"``; an impossible
            cast or an unwritable model tensor; an ambiguous alignment; a bad
            ``rename``. The model is unchanged. The error's ``report`` attribute
            holds the :class:`LoadReport` when one was computed.
        SelectionError: an ``exclude`` selector matched nothing.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> src = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> dst = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> r = tfz.load_pretrained(dst, {"module." + k: v for k, v in src.state_dict().items()})
        >>> len(r.loaded), r.alignment, r.loaded_fraction
        (7, "removed prefix 'module.'", 1.0)
    """
    plan = plan_load(model, source, rename=rename, exclude=exclude, mismatched=mismatched,
                     unsafe_pickle=unsafe_pickle)
    plan.report.dry_run = dry_run
    if not dry_run:
        apply_plan(plan)
    return plan.report


def _match(
    keys: list[str], targets: dict[str, _Target], alignment: _Alignment, original: dict[str, str]
) -> dict[str, str]:
    """Checkpoint key (after rename) -> model name, under the prefix rule."""
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for key in keys:
        name = alignment.apply(key)
        if name in targets:
            matched[key] = name
            taken.add(name)
    for key in keys:  # a key the prefix rule moved off its exact match keeps it
        if key not in matched and key in targets and key not in taken:
            matched[key] = key
            taken.add(key)
    dup_names = [n for n, c in Counter(matched.values()).items() if c > 1]
    if dup_names:
        keys_for = [original[k] for k, n in matched.items() if n == dup_names[0]]
        raise LoadError(
            f"checkpoint keys {', '.join(map(repr, keys_for))} would all load into "
            f"{dup_names[0]!r}. Drop the duplicates or separate them with rename=."
        )
    return matched


def _plan_copies(
    matched: dict[str, str],
    targets: dict[str, _Target],
    tensors: dict[str, torch.Tensor],
    original: dict[str, str],
    excluded_ids: set[int],
    mismatched: str,
    report: LoadReport,
) -> tuple[dict[int, _Copy], list[str]]:
    """One copy per model tensor (tied ones once); problems that forbid loading."""
    plans: dict[int, _Copy] = {}  # id(model tensor) -> what to copy into it
    problems: list[str] = []
    # a tied tensor takes its values from the key under its canonical name, if present
    for key, name in sorted(matched.items(), key=lambda kv: targets[kv[1]].name != kv[1]):
        target, src = targets[name], tensors[key]
        ckey = original[key]
        if ckey != name:
            report.renamed[ckey] = name
        if not target.persistent:
            report.ignored[ckey] = "non-persistent buffer (the model computes it itself)"
            continue
        if id(target.tensor) in excluded_ids:
            if target.name not in report.excluded:
                report.excluded.append(target.name)
            continue
        if id(target.tensor) in plans:
            first = plans[id(target.tensor)]
            report.tied[ckey] = target.name
            if src.shape == first.src.shape and not torch.equal(src.cpu(), first.src.cpu()):
                report.notes.append(
                    f"{ckey!r} and {original[first.key]!r} are tied in the model but differ "
                    f"in the checkpoint; the model holds {original[first.key]!r}'s values."
                )
            continue
        reason = _unwritable(target.tensor)
        if reason:
            problems.append(f"{target.name} {reason}")
            continue
        if src.is_meta:
            problems.append(f"checkpoint tensor {ckey} is on the meta device (it has no values)")
            continue
        if not _castable(src.dtype, target.tensor.dtype):
            problems.append(
                f"{ckey} is {_dtype(src.dtype)} but {target.name} is "
                f"{_dtype(target.tensor.dtype)}; casting would lose values"
            )
            continue
        ck_shape, md_shape = tuple(src.shape), tuple(target.tensor.shape)
        if src.dtype != target.tensor.dtype and (ck_shape == md_shape or mismatched == "partial"):
            report.converted[target.name] = (_dtype(src.dtype), _dtype(target.tensor.dtype))
        if ck_shape != md_shape:
            report.mismatched[target.name] = (ck_shape, md_shape)
            if mismatched == "partial":
                if len(ck_shape) == len(md_shape):
                    slices = tuple(slice(0, min(a, b)) for a, b in zip(ck_shape, md_shape))
                    plans[id(target.tensor)] = _Copy(target, src, key, slices)
                    report.partial.append(target.name)
                else:
                    report.notes.append(
                        f"{target.name}: checkpoint has {len(ck_shape)} dims, model "
                        f"{len(md_shape)}; no overlapping slice, left as initialised."
                    )
            continue
        plans[id(target.tensor)] = _Copy(target, src, key)
    return plans, problems


def _list_loaded_and_missing(
    plans: dict[int, _Copy], targets: dict[str, _Target], idx: ModelIndex,
    excluded_ids: set[int], report: LoadReport,
) -> None:
    counters_missing = 0
    mismatched_names = set(report.mismatched)
    # state_dict order: module by module, parameters then buffers
    canonical = {t.name: t.tensor for t in targets.values()}
    for name, tensor in canonical.items():
        if id(tensor) in plans:
            if plans[id(tensor)].slices is None:
                report.loaded.append(name)
            continue
        if name in mismatched_names or id(tensor) in excluded_ids:
            continue
        if name in idx.buffers and not targets[name].persistent:
            continue
        if _is_counter(name):
            counters_missing += 1  # a checkpoint from before PyTorch 0.4.1: no counter
            continue
        report.missing.append(name)
    if counters_missing:
        report.notes.append(
            f"{counters_missing} BatchNorm num_batches_tracked counters are not in the "
            "checkpoint; kept as they were."
        )


def _count_values(plans: dict[int, _Copy], idx: ModelIndex, report: LoadReport) -> None:
    total = sum(p.numel() for p in idx.params.values())
    loaded_values = 0
    for plan in plans.values():
        if plan.target.is_param:
            if plan.slices is None:
                loaded_values += plan.target.tensor.numel()
            else:
                n = 1
                for s in plan.slices:
                    n *= s.stop
                loaded_values += n
    report.loaded_params = loaded_values
    report.total_params = total
    report.loaded_fraction = loaded_values / total if total else 0.0


def _refuse(
    model: nn.Module, origin: str, plans: dict[int, _Copy], problems: list[str],
    mismatched: str, keys: list[str], targets: dict[str, _Target], report: LoadReport,
) -> None:
    """Raise when the plan must not be applied (the report rides on the error)."""
    if problems:
        raise _with_report(LoadError(
            f"cannot load {origin} into {type(model).__name__}: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + ". Nothing was changed."
        ), report)
    if mismatched == "error" and report.mismatched:
        shown = "; ".join(f"{n}: checkpoint {shape_text(a)} vs model {shape_text(b)}"
                          for n, (a, b) in list(report.mismatched.items())[:5])
        raise _with_report(LoadError(
            f"{len(report.mismatched)} tensors of {origin} have the wrong shape for "
            f"{type(model).__name__} ({shown}). Nothing was changed. Pass "
            "mismatched='skip' to leave them as initialised, mismatched='partial' to copy "
            "the overlapping slice, or exclude= to leave them out."
        ), report)
    if not any(not _is_counter(p.target.name) for p in plans.values()):
        raise _with_report(_nothing_loaded(model, origin, keys, targets, report), report)


def _with_report(err: LoadError, report: LoadReport) -> LoadError:
    err.report = report
    return err


def _nothing_loaded(
    model: nn.Module, origin: str, keys: list[str], targets: dict[str, _Target],
    report: LoadReport,
) -> LoadError:
    what = f"{type(model).__name__}"
    if report.mismatched:
        n, (a, b) = next(iter(report.mismatched.items()))
        why = (f"every tensor whose name matches has another shape (e.g. {n}: checkpoint "
               f"{shape_text(a)} vs model {shape_text(b)}). Check that this is the right "
               "checkpoint, or pass mismatched='partial' to copy overlapping slices.")
    elif report.excluded:
        why = (f"exclude= left out all {len(report.excluded)} matching tensors. "
               "Narrow the exclude.")
    else:
        ck = ", ".join(repr(k) for k in keys[:3])
        md = ", ".join(repr(n) for n, t in targets.items() if t.persistent)
        md = ", ".join(md.split(", ")[:3])
        why = (f"no checkpoint key names a tensor of the model (checkpoint keys look like {ck}; "
               f"model names like {md}), even after trying to add or remove a leading prefix. "
               "Check that this is the right checkpoint, or map the names with "
               "rename={r'^old\\.': 'new.'}.")
    return LoadError(f"nothing in {origin} was loaded into {what}: {why} Nothing was changed.")
