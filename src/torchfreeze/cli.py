"""The ``torchfreeze`` command: ``demo``, ``inspect`` and ``diff``.

Exit status: 0 success; 1 a check failed (``diff --expect-frozen`` found a
tensor that moved); 2 a usage or input error (bad option, missing or unreadable
file, a selector that matches no tensor). Errors print as one line on stderr,
never a traceback.

Example:
    >>> from torchfreeze.cli import main
    >>> main(["diff", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import __version__
from ._report import Report, fmt_count
from .errors import SelectionError, TorchfreezeError
from .select import closest_names, name_tests

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CheckpointDiff",
    "TensorChange",
    "build_parser",
    "diff_checkpoints",
    "main",
    "match_keys",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2



# ---------------------------------------------------------------------------
# selectors over checkpoint keys (no nn.Module needed)


def _prefixes(keys: Iterable[str]) -> list[str]:
    """Every module path implied by dotted tensor names, first-seen order."""
    out: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out[".".join(parts[:i])] = None
    return list(out)


def _under(name: str, keys: Sequence[str]) -> list[str]:
    dotted = name + "."
    return [k for k in keys if k == name or k.startswith(dotted)]


def match_keys(keys: Sequence[str], selectors: Iterable[str]) -> list[str]:
    """Resolve string selectors against checkpoint keys, as ``tfz.select`` does on a model.

    The grammar is the shared one: exact names, globs (``*`` crosses dots),
    brace lists and ranges, ``"re:<regex>"`` (whole-name match). A name or
    pattern that matches a module path selects every tensor under it.

    Args:
        keys: the checkpoint's tensor names.
        selectors: string selectors.

    Returns:
        The matched keys, in ``keys`` order.

    Raises:
        SelectionError: a selector (or one alternative of a brace pattern)
            matched no tensor and no module path; the message names the
            closest real names.

    Example:
        >>> match_keys(["enc.0.w", "enc.1.w", "head.w"], ["enc.{0..1}"])
        ['enc.0.w', 'enc.1.w']
    """
    keys = list(keys)
    modules = _prefixes(keys)
    names = modules + keys
    hit: set[str] = set()
    for sel in selectors:
        for shown, needle, test in name_tests(sel):
            matched = [n for n in names if test(n)]
            if not matched:
                raise _no_key(names, shown, needle, len(keys))
            for n in matched:
                hit.update(_under(n, keys))
    return [k for k in keys if k in hit]


def _no_key(names: list[str], shown: str, needle: str, num_keys: int) -> SelectionError:
    suggestions = closest_names(names, needle)
    if suggestions:
        hint = "Closest real names: " + ", ".join(repr(s) for s in suggestions) + "."
    else:
        top = list(dict.fromkeys(n.split(".")[0] for n in names))[:8]
        hint = "Top-level names: " + (", ".join(repr(t) for t in top) or "(none)") + "."
    return SelectionError(
        f"selector '{shown}' matched no tensor of the checkpoint ({num_keys} tensors). {hint} "
        "Fix the pattern; `torchfreeze inspect CHECKPOINT --depth 2` lists the names.",
        selector=shown,
        suggestions=suggestions,
    )


# ---------------------------------------------------------------------------
# diff


@dataclass(frozen=True)
class TensorChange:
    """How one tensor differs between two checkpoints.

    Attributes:
        name: the tensor's key.
        status: ``"same"`` (bit-identical), ``"changed"``, ``"reshaped"``
            (shape or dtype differs), ``"added"`` (only in AFTER) or
            ``"removed"`` (only in BEFORE).
        shape: shape in BEFORE (AFTER for added tensors).
        rel_change: ``‖after − before‖ / ‖before‖`` (L2 over all values);
            ``None`` where it is undefined (reshaped, added, removed, or a
            zero tensor that became non-zero).
        max_abs_change: largest element-wise ``|after − before|``.
    """

    name: str
    status: str
    shape: tuple[int, ...]
    rel_change: float | None = None
    max_abs_change: float | None = None

    @property
    def moved(self) -> bool:
        return self.status != "same"


@dataclass(frozen=True)
class ModuleChange:
    """Changes of the tensors directly under one module."""

    name: str
    tensors: int
    changed: int
    params: int
    rel_change: float | None  # over the module's tensors together
    max_rel_change: float | None
    tensor_names: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class CheckpointDiff(Report):
    """Per-tensor relative change between two checkpoints, grouped by module.

    Attributes:
        before, after: the sources compared.
        tensors: one :class:`TensorChange` per key of either checkpoint.
        modules: one row per module (``depth`` dotted levels; default: the
            tensor's own module).
        expect_frozen: the selectors given with ``--expect-frozen``.
        expected_frozen: the keys they matched.
        changed_frozen: the expected-frozen keys that moved (the check fails
            when this is non-empty).
    """

    before: str
    after: str
    tensors: tuple[TensorChange, ...]
    modules: tuple[ModuleChange, ...]
    expect_frozen: tuple[str, ...] = ()
    expected_frozen: tuple[str, ...] = field(default=(), repr=False)
    changed_frozen: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no tensor matched by ``expect_frozen`` moved."""
        return not self.changed_frozen

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.moved)

    def _rich(self) -> RenderableType:
        frozen = set(self.expected_frozen)
        bad = set(self.changed_frozen)
        table = Table(title=f"diff {self.before} -> {self.after}", title_justify="left")
        table.add_column("module", overflow="fold")
        table.add_column("tensors", justify="right")
        table.add_column("changed", justify="right")
        table.add_column("params", justify="right")
        table.add_column("rel. change", justify="right")
        table.add_column("max rel. change", justify="right")
        table.add_column("expect frozen")
        for m in self.modules:
            mark = ""
            if any(k in frozen for k in m.tensor_names):
                mark = "MOVED" if any(k in bad for k in m.tensor_names) else "ok"
            table.add_row(
                m.name or "(top level)", str(m.tensors), str(m.changed), fmt_count(m.params),
                _fmt_rel(m.rel_change, m.changed), _fmt_rel(m.max_rel_change, m.changed),
                Text(mark, style="bold red" if mark == "MOVED" else "green"),
            )
        moved = [t for t in self.tensors if t.moved]
        lines: list[RenderableType] = [table, Text(
            f"{len(moved)} of {len(self.tensors)} tensors changed"
            + (f"; {len(self.expected_frozen)} expected frozen" if self.expect_frozen else ""),
            style="bold")]
        odd = [t for t in moved if t.status in ("reshaped", "added", "removed")]
        for t in odd[:10]:
            lines.append(Text(f"  {t.status}: {t.name}", style="yellow"))
        if self.changed_frozen:
            lines.append(Text(_failure_line(self), style="bold red"))
        elif self.expect_frozen:
            lines.append(Text(
                f"OK: all {len(self.expected_frozen)} tensors under --expect-frozen "
                "are bit-identical.", style="bold green"))
        return Group(*lines)


def _fmt_rel(value: float | None, changed: int) -> str:
    if value is None:
        return "n/a" if changed else "0"
    if value == 0.0:
        return "0" if not changed else "<1e-12"
    return f"{value:.2e}"


def _failure_line(diff: CheckpointDiff) -> str:
    by_name = {t.name: t for t in diff.tensors}
    shown = []
    for name in diff.changed_frozen[:8]:
        t = by_name[name]
        what = f"rel {t.rel_change:.2e}" if t.rel_change is not None else t.status
        shown.append(f"{name} ({what})")
    more = f", … (+{len(diff.changed_frozen) - 8})" if len(diff.changed_frozen) > 8 else ""
    return (
        f"FAILED: {len(diff.changed_frozen)} tensor(s) under --expect-frozen "
        f"{' '.join(diff.expect_frozen)} changed: {', '.join(shown)}{more}"
    )


def _group(name: str, depth: int | None) -> str:
    parts = name.split(".")[:-1]
    return ".".join(parts if depth is None else parts[:depth])


def _compare(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[
        TensorChange, float, float]:
    """The change, plus squared norms (diff, before) for module-level aggregation."""
    if a is None or b is None:
        t = b if a is None else a
        assert t is not None
        status = "added" if a is None else "removed"
        return TensorChange(name, status, tuple(t.shape)), math.nan, 0.0
    if a.shape != b.shape or a.dtype != b.dtype:
        return TensorChange(name, "reshaped", tuple(a.shape)), math.nan, 0.0
    if torch.equal(a, b):
        norm = float(a.double().pow(2).sum()) if a.numel() else 0.0
        return TensorChange(name, "same", tuple(a.shape), 0.0, 0.0), 0.0, norm
    da, db = a.detach().double(), b.detach().double()
    if a.is_complex():
        da, db = a.detach().to(torch.complex128), b.detach().to(torch.complex128)
    delta = (db - da).abs()
    d2 = float(delta.pow(2).sum())
    n2 = float(da.abs().pow(2).sum())
    rel = math.sqrt(d2 / n2) if n2 > 0 else None
    return (TensorChange(name, "changed", tuple(a.shape), rel, float(delta.max())), d2, n2)


def diff_checkpoints(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    *,
    expect_frozen: Sequence[str] = (),
    depth: int | None = None,
    before_name: str = "BEFORE",
    after_name: str = "AFTER",
) -> CheckpointDiff:
    """Compare two state dicts tensor by tensor.

    Args:
        before: the reference state dict (e.g. the pretrained checkpoint).
        after: the state dict to check (e.g. after fine-tuning).
        expect_frozen: selectors (the shared string grammar, over the keys of
            both) naming tensors that must be bit-identical.
        depth: group by the first ``depth`` dotted levels of the module path;
            default: each tensor's own module.
        before_name, after_name: how the two are named in the report.

    Returns:
        A :class:`CheckpointDiff`; ``.ok`` is False when an expected-frozen
        tensor moved (changed value, shape or dtype, or missing in ``after``).

    Raises:
        SelectionError: an ``expect_frozen`` selector matched no key.

    Example:
        >>> import torch
        >>> a = {"body.w": torch.ones(2), "head.w": torch.ones(2)}
        >>> b = {"body.w": torch.ones(2), "head.w": torch.zeros(2)}
        >>> d = diff_checkpoints(a, b, expect_frozen=["body"])
        >>> d.ok, d.changed
        (True, ('head.w',))
    """
    keys = list(dict.fromkeys([*before, *after]))
    frozen = match_keys(keys, expect_frozen) if expect_frozen else []
    changes: list[TensorChange] = []
    acc: dict[str, list[Any]] = {}
    for key in keys:
        change, d2, n2 = _compare(key, before.get(key), after.get(key))
        changes.append(change)
        row = acc.setdefault(_group(key, depth), [0, 0, 0, 0.0, 0.0, None, False, []])
        row[7].append(key)
        row[0] += 1
        row[1] += int(change.moved)
        ref = before.get(key, after.get(key))
        row[2] += ref.numel() if ref is not None else 0
        if math.isnan(d2) or (change.moved and change.rel_change is None):
            row[6] = True  # undefined somewhere: the module figure is undefined too
        else:
            row[3] += d2
            row[4] += n2
        if change.rel_change is not None:
            row[5] = change.rel_change if row[5] is None else max(row[5], change.rel_change)
    modules = []
    for name, (n, moved, params, d2, n2, mx, undefined, names) in acc.items():
        rel = None if undefined or n2 == 0 else math.sqrt(d2 / n2)
        if not moved:
            rel, mx = 0.0, 0.0
        modules.append(ModuleChange(name, n, moved, params, rel, mx, tuple(names)))
    moved_keys = {c.name for c in changes if c.moved}
    return CheckpointDiff(
        before=before_name,
        after=after_name,
        tensors=tuple(changes),
        modules=tuple(modules),
        expect_frozen=tuple(expect_frozen),
        expected_frozen=tuple(frozen),
        changed_frozen=tuple(k for k in frozen if k in moved_keys),
    )


# ---------------------------------------------------------------------------
# commands


def _read(path: str) -> dict[str, torch.Tensor]:
    from .load import read_state_dict

    return read_state_dict(path)


def _json_out(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _console() -> Console:
    # Piped output (CI logs, grep) would be cut to 80 columns; module names must stay whole.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=140 if wide else None)


def _cmd_diff(args: argparse.Namespace) -> int:
    before, after = _read(args.before), _read(args.after)
    diff = diff_checkpoints(
        before, after, expect_frozen=args.expect_frozen or (), depth=args.depth,
        before_name=args.before, after_name=args.after,
    )
    if args.plot:
        from ._plot import plot_diff

        plot_diff(diff, args.plot)
    if args.json:
        data = diff.to_dict()
        data["ok"] = diff.ok
        _json_out(data)
    else:
        _console().print(diff)
        if args.plot:
            print(f"drift plot: {args.plot}")
    if not diff.ok:
        print(f"torchfreeze diff: {_failure_line(diff)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _load_factory(spec: str) -> torch.nn.Module:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise TorchfreezeError(
            f"--model {spec!r} is not 'module:factory'. Give an importable module and a "
            "callable returning the nn.Module, e.g. --model mypkg.models:build_model."
        )
    # A user's own model file next to the checkpoint is the common case.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise TorchfreezeError(
            f"--model: cannot import module {mod_name!r} ({exc}). Run from the folder that "
            "contains it, or install the package that provides it."
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")][:10]
            raise TorchfreezeError(
                f"--model: module {mod_name!r} has no attribute {attr!r}. "
                f"It has: {', '.join(public) or '(nothing public)'}."
            )
        obj = getattr(obj, part)
    model = obj if isinstance(obj, torch.nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, torch.nn.Module):
        raise TorchfreezeError(
            f"--model {spec!r} gave a {type(model).__name__}, not an nn.Module. Point it at a "
            "function that builds and returns the model (no arguments)."
        )
    return model


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .load import inspect_checkpoint

    if args.depth is not None and args.depth < 0:
        raise TorchfreezeError(f"--depth must be >= 0, got {args.depth}.")
    info = inspect_checkpoint(args.checkpoint, depth=args.depth,
                              unsafe_pickle=args.unsafe_pickle)
    load_report = None
    if args.model:
        from .load import load_pretrained

        model = _load_factory(args.model)
        load_report = load_pretrained(model, args.checkpoint, dry_run=True,
                                      unsafe_pickle=args.unsafe_pickle)
    if args.json:
        data = info.to_dict()
        if load_report is not None:
            data["load_pretrained"] = load_report.to_dict()
        _json_out(data)
        return EXIT_OK
    console = _console()
    console.print(info)
    if load_report is not None:
        console.print(f"\nload_pretrained({args.model}, dry_run=True):")
        console.print(load_report)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import STRATEGIES, run_demo

    strategies = None
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            close = difflib.get_close_matches(unknown[0], STRATEGIES, n=1) if unknown else []
            raise TorchfreezeError(
                f"--strategies: unknown strategy {', '.join(map(repr, unknown)) or '(none)'}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f". Choose from: {', '.join(STRATEGIES)}."
            )
    if args.epochs < 1:
        raise TorchfreezeError(f"--epochs must be >= 1, got {args.epochs}.")
    run_demo(epochs=args.epochs, strategies=strategies, out=args.out, seed=args.seed,
             console=_console())
    return EXIT_OK


_EXIT_HELP = (
    "exit status: 0 success, 1 a check failed (diff --expect-frozen), "
    "2 usage or input error (bad option, unreadable file, selector matching nothing)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchfreeze`` command (all sub-commands)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="torchfreeze",
        description="Freeze, unfreeze and fine-tune pretrained PyTorch models correctly.",
        epilog=_EXIT_HELP,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"torchfreeze {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", formatter_class=fmt, epilog=_EXIT_HELP,
        help="run the embedded transfer-learning demo (digits, CPU, no download)",
        description=(
            "Pretrain a small CNN with BatchNorm on scikit-learn's digits 0-4, then fine-tune\n"
            "it on digits 5-9 with a new head, with several strategies side by side:\n"
            "  linear-probe   backbone frozen (BatchNorm in eval), head trained\n"
            "  head-cached    the same, backbone features replayed by tfz.FeatureCache\n"
            "  gradual        gradual unfreezing with discriminative learning rates\n"
            "  full           full fine-tune from the pretrained checkpoint\n"
            "  scratch        the same recipe from random weights (baseline)\n"
            "Prints a results table and writes a PNG plot and a JSON of all figures to --out.\n"
            "Needs the demo extra: pip install 'torchfreeze[demo]'."
        ),
    )
    demo.add_argument("--epochs", type=int, default=4, metavar="N",
                      help="fine-tuning epochs per strategy (default: 4)")
    demo.add_argument("--strategies", metavar="LIST",
                      help="comma-separated subset of: linear-probe, head-cached, gradual, "
                           "full, scratch (default: all)")
    demo.add_argument("--out", default="torchfreeze-demo", metavar="DIR",
                      help="output folder (default: torchfreeze-demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_cmd_demo)

    insp = sub.add_parser(
        "inspect", formatter_class=fmt, epilog=_EXIT_HELP,
        help="show the module tree of a checkpoint file",
        description=(
            "Show a checkpoint's tensors, shapes, dtypes and parameter counts per module.\n"
            "Reads .pt/.pth/.bin/.ckpt (weights only), .safetensors and Hugging Face folders.\n"
            "With --model, also show what load_pretrained would do (dry run)."
        ),
    )
    insp.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or folder")
    insp.add_argument("--depth", type=int, metavar="N",
                      help="group tensors by the first N levels of their module path")
    insp.add_argument("--model", metavar="MODULE:FACTORY",
                      help="a function building the target model, e.g. mypkg.models:build; "
                           "shows load_pretrained's dry-run report for it")
    insp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    insp.add_argument("--unsafe-pickle", action="store_true",
                      help="allow pickles holding arbitrary objects (only for trusted files)")
    insp.set_defaults(func=_cmd_inspect)

    diff = sub.add_parser(
        "diff", formatter_class=fmt, epilog=_EXIT_HELP,
        help="relative change per tensor between two checkpoints; check frozen parts",
        description=(
            "Compare two checkpoints tensor by tensor (relative L2 change), grouped by module.\n"
            "With --expect-frozen, fail (exit 1, naming the tensors) when a tensor matched by\n"
            "a selector is not bit-identical. Selectors use torchfreeze's grammar over the\n"
            "checkpoint's names: module or tensor names, globs, {0..3} ranges, 're:<regex>'.\n"
            "Example: torchfreeze diff pretrained.pt finetuned.pt --expect-frozen backbone"
        ),
    )
    diff.add_argument("before", metavar="BEFORE", help="reference checkpoint")
    diff.add_argument("after", metavar="AFTER", help="checkpoint to compare")
    diff.add_argument("--expect-frozen", nargs="+", action="extend", metavar="SELECTOR",
                      help="tensors that must be bit-identical (repeatable)")
    diff.add_argument("--depth", type=int, metavar="N",
                      help="group by the first N levels of the module path "
                           "(default: each tensor's own module)")
    diff.add_argument("--plot", metavar="FILE", help="write a per-module drift bar chart (PNG)")
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.set_defaults(func=_cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``torchfreeze`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args))
    except (TorchfreezeError, OSError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            msg = f"{exc.filename}: {exc.strerror}"
        print(f"torchfreeze {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"torchfreeze {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
