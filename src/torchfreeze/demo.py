"""``torchfreeze demo``: a complete transfer-learning run on embedded data.

A small CNN with BatchNorm is pretrained on scikit-learn's bundled digits 0-4
(real 8x8 scans, no download) and saved. It is then fine-tuned on digits 5-9,
with a new 5-class head and few labels, by several strategies side by side:

* ``linear-probe``: backbone frozen (BatchNorm pinned in eval), head trained;
* ``head-cached``: the same, with the backbone's features replayed by
  :class:`torchfreeze.FeatureCache` (same numbers, less compute);
* ``gradual``: :class:`torchfreeze.GradualUnfreeze`, one block per epoch from the
  top, each with a smaller learning rate (discriminative LRs);
* ``full``: everything trainable from the checkpoint, one learning rate;
* ``scratch``: the same recipe as ``full`` from random weights (the baseline).

Every strategy trains under :func:`torchfreeze.verify`, so the results table
says whether the frozen parts really stayed bit-for-bit unchanged.

Example:
    >>> from torchfreeze.demo import run_demo
    >>> result = run_demo(epochs=1, strategies=["linear-probe", "scratch"],
    ...                   out="/tmp/tfz-demo", progress=False)  # doctest: +SKIP
    >>> result["strategies"]["linear-probe"]["verify"]["verdict"]  # doctest: +SKIP
    'ok'
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from ._report import fmt_count
from .errors import TorchfreezeError

__all__ = ["STRATEGIES", "DigitNet", "load_digits_split", "run_demo"]

#: strategy key -> label, in the order they run and are shown.
STRATEGIES: dict[str, str] = {
    "linear-probe": "linear probe",
    "head-cached": "head only + FeatureCache",
    "gradual": "gradual unfreeze",
    "full": "full fine-tune",
    "scratch": "from scratch",
}

PRETRAIN_EPOCHS = 8
PRETRAIN_SHIFT = True
SHOTS = 20  # labelled images per new class: transfer learning's usual few-label regime
BATCH = 8
LR = 3e-3  # pretraining and training from scratch
FT_LR = 1e-3  # pretrained weights: fine-tuned more gently
HEAD_LR = 1e-2  # the new head, in every strategy
GRADUAL_LR_MULT = 0.3  # each block unfrozen deeper gets 0.3x the previous group's rate


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DigitNet(nn.Module):
    """A small CNN for 8x8 digits: ``backbone`` (stem, block1, block2) and ``head``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(OrderedDict(
            stem=_block(1, 16, pool=False),
            block1=_block(16, 32, pool=True),   # 8x8 -> 4x4
            block2=_block(32, 64, pool=True),   # 4x4 -> 2x2
            flatten=nn.Flatten(),
        ))
        self.head = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def _require_demo_extra() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TorchfreezeError(
            "the demo needs scikit-learn (for its bundled digits) and matplotlib, which are "
            "not installed. Install them with: pip install 'torchfreeze[demo]'."
        ) from None
    return load_digits


def load_digits_split(seed: int = 0, *, shots: int | None = None) -> dict[str, torch.Tensor]:
    """scikit-learn's digits as tensors: 0-4 to pretrain, 5-9 (relabelled 0-4) to transfer.

    Returns a dict with ``pre_x``/``pre_y`` (all of digits 0-4), ``train_x``/``train_y``
    (``shots`` images per digit 5-9) and ``test_x``/``test_y`` (the remaining 5-9).
    """
    load_digits = _require_demo_extra()
    shots = SHOTS if shots is None else shots
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.45  # roughly zero mean, unit variance over the whole set
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    old, new = y < 5, y >= 5
    nx, ny = x[new], y[new] - 5
    train = torch.zeros(len(ny), dtype=torch.bool)
    for c in range(5):
        train[(ny == c).nonzero().flatten()[:shots]] = True
    return {
        "pre_x": x[old], "pre_y": y[old],
        "train_x": nx[train], "train_y": ny[train],
        "test_x": nx[~train], "test_y": ny[~train],
    }


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def _batches(n: int, seed: int, epoch: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
    return list(order.split(BATCH))


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """One flat vector per depth-ordered layer (tfz.layers: stem, blocks, head)."""
    from . import layers

    params = dict(model.named_parameters())
    return {
        layer.name.removeprefix("backbone."): torch.cat(
            [params[n].detach().flatten() for n in layer.param_names]).clone()
        for layer in layers(model)
    }


def _verdict(reports: Sequence[Any]) -> dict[str, Any]:
    checked = sum(r.num_frozen for r in reports)
    if not checked:
        return {"verdict": "nothing frozen", "checked": 0, "changed_frozen": []}
    changed = sorted({n for r in reports for n in r.changed_frozen})
    return {
        "verdict": "ok" if not changed else f"CHANGED ({len(changed)})",
        "checked": max(r.num_frozen for r in reports),
        "changed_frozen": changed,
    }


def _train_strategy(
    key: str,
    ckpt: Path,
    data: dict[str, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    advance: Any,
) -> tuple[dict[str, Any], nn.Module, Any]:
    import torchfreeze as tfz

    torch.manual_seed(seed + 1)  # every strategy starts from the same new head
    model = DigitNet(num_classes=5)
    load_report = None
    if key != "scratch":
        # digits 5-9 share nothing with the old classes' head: the shapes happen to
        # match (5 -> 5), so excluding it is what keeps stale class weights out.
        load_report = tfz.load_pretrained(model, ckpt, exclude="head")

    cache = None
    gradual = None
    if key in ("linear-probe", "head-cached", "gradual"):
        tfz.freeze(model, "backbone")  # bn="eval": running statistics never move
    # Pretrained weights are fine-tuned at a lower rate than weights trained from
    # scratch (each with its usual recipe); the new head learns from zero in both.
    base = LR if key == "scratch" else FT_LR
    optimizer = torch.optim.Adam(
        tfz.param_groups(model, lr=base, rules={"head": {"lr": HEAD_LR}}))
    if key == "head-cached":
        cache = tfz.FeatureCache(model.backbone)
    if key == "gradual":
        # one block per epoch from the top; GradualUnfreeze adds each to the optimizer
        gradual = tfz.GradualUnfreeze(
            model, optimizer, {1: "backbone.block2", 2: "backbone.block1", 3: "backbone.stem"},
            lr=FT_LR)
    start = _layer_weights(model)
    trainable0 = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, y = data["train_x"], data["train_y"]
    ids = torch.arange(len(y))
    curve: list[float] = []
    losses: list[float] = []
    reports = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if gradual is not None and gradual.step(epoch):
            # discriminative LRs: each block unfrozen deeper gets GRADUAL_LR_MULT x the
            # rate of the one above it (block2: FT_LR, block1: 0.3 FT_LR, stem: 0.09 FT_LR)
            for depth, group in enumerate(optimizer.param_groups[1:]):
                group["lr"] = FT_LR * GRADUAL_LR_MULT**depth
        model.train()
        total = 0.0
        with tfz.verify(model) as report:
            for idx in _batches(len(y), seed, epoch):
                if cache is not None:
                    with cache.keys(ids[idx]):
                        out = model(x[idx])
                else:
                    out = model(x[idx])
                loss = F.cross_entropy(out, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
        reports.append(report)
        losses.append(total / len(y))
        curve.append(_accuracy(model, data["test_x"], data["test_y"]))
        advance()
    wall = time.perf_counter() - t0
    end = _layer_weights(model)
    change = {
        name: float((end[name] - w).norm() / w.norm().clamp_min(1e-12))
        for name, w in start.items()
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result: dict[str, Any] = {
        "label": STRATEGIES[key],
        "accuracy": curve[-1],
        "accuracy_per_epoch": curve,
        "loss_per_epoch": losses,
        "trainable_params": max(trainable, trainable0),
        "trainable_params_at_start": trainable0,
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": wall,
        "verify": _verdict(reports),
        "relative_weight_change": change,
    }
    if cache is not None:
        result["feature_cache"] = {"hits": cache.hits, "misses": cache.misses,
                                   "bytes": cache.nbytes}
        cache.close()
    return result, model, load_report


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Move each image by up to one pixel: pretrained features that generalise better."""
    pad = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[:, :, dy:dy + 8, dx:dx + 8]


def _pretrain(data: dict[str, torch.Tensor], *, seed: int, advance: Any) -> DigitNet:
    torch.manual_seed(seed)
    model = DigitNet(num_classes=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = data["pre_x"], data["pre_y"]
    model.train()
    gen = torch.Generator().manual_seed(seed + 7919)
    for epoch in range(PRETRAIN_EPOCHS):
        for idx in _batches(len(y), seed + 7919, epoch):
            xb = _shift(x[idx], gen) if PRETRAIN_SHIFT else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        advance()
    return model


def _table(results: dict[str, dict[str, Any]], epochs: int) -> Table:
    total = fmt_count(next(iter(results.values()))["total_params"])
    table = Table(title=f"digits 5-9, {SHOTS} labels per class, {epochs} epochs each "
                        f"(model: {total} parameters)", title_justify="left")
    table.add_column("strategy")
    table.add_column("test accuracy", justify="right")
    if epochs > 1:
        table.add_column("after epoch 1", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("wall time", justify="right")
    table.add_column("frozen parts (verify)")
    for r in results.values():
        v = r["verify"]
        if v["verdict"] == "ok":
            verdict = f"[green]ok[/] ({v['checked']} tensors unchanged)"
        elif v["verdict"] == "nothing frozen":
            verdict = "[dim]-[/]"
        else:
            verdict = f"[bold red]{v['verdict']}[/] {', '.join(v['changed_frozen'][:3])}"
        params = fmt_count(r["trainable_params"])
        if r["trainable_params_at_start"] != r["trainable_params"]:
            params = f"{fmt_count(r['trainable_params_at_start'])}->{params}"
        cells = [r["label"], f"{100 * r['accuracy']:.1f}%"]
        if epochs > 1:
            cells.append(f"{100 * r['accuracy_per_epoch'][0]:.1f}%")
        cells += [params, f"{r['wall_time_s']:.2f} s",
                  verdict]
        table.add_row(*cells)
    return table


def _transfer_verdict(results: dict[str, dict[str, Any]]) -> str | None:
    """One honest sentence: where transfer led and whether scratch caught up."""
    if "scratch" not in results or len(results) < 2:
        return None
    transfer = {k: r for k, r in results.items() if k != "scratch"}
    scratch = results["scratch"]["accuracy_per_epoch"]

    def best(at: int) -> tuple[str, float]:
        k = max(transfer, key=lambda k: transfer[k]["accuracy_per_epoch"][at])
        return transfer[k]["label"], transfer[k]["accuracy_per_epoch"][at]

    (first_label, first), (last_label, last) = best(0), best(-1)
    text = (f"after epoch 1: best transfer ({first_label}) {100 * first:.1f}% vs from scratch "
            f"{100 * scratch[0]:.1f}%")
    if len(scratch) > 1:
        text += (f"; after epoch {len(scratch)}: {last_label} {100 * last:.1f}% vs "
                 f"{100 * scratch[-1]:.1f}%")
        if last < scratch[-1]:
            text += (" (these 8x8 digits are easy: with enough steps a CNN from scratch "
                     "catches up, so transfer's gain here is the head start")
            probe = results.get("linear-probe")
            if probe:
                ratio = probe["total_params"] / max(probe["trainable_params"], 1)
                text += f", and for the linear probe {ratio:.0f}x fewer trainable parameters"
            text += ")"
    return text


def run_demo(
    *,
    epochs: int = 4,
    strategies: Sequence[str] | None = None,
    out: str | os.PathLike[str] = "torchfreeze-demo",
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the transfer-learning demo; print a table; write a PNG and a JSON.

    Args:
        epochs: fine-tuning epochs per strategy.
        strategies: keys of :data:`STRATEGIES` (default: all), run in that order.
        out: output folder: ``pretrained.pt`` (the 0-4 checkpoint),
            ``linear-probe.pt`` (the probe's weights, for ``torchfreeze diff``),
            ``demo.png`` and ``results.json``.
        seed: seeds data split, initialisation and batch order.
        progress: show a rich progress bar while training.
        console: where to print (default: stdout).

    Returns:
        The dict written to ``results.json``.

    Raises:
        TorchfreezeError: scikit-learn or matplotlib is missing, or an unknown strategy.
    """
    console = console or Console(highlight=False)
    keys = list(STRATEGIES) if strategies is None else list(strategies)
    unknown = [k for k in keys if k not in STRATEGIES]
    if unknown or not keys:
        raise TorchfreezeError(
            f"unknown strategy {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(STRATEGIES)}."
        )
    from ._plot import require_matplotlib

    require_matplotlib()
    _require_demo_extra()  # before anything is written
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # The convolutions here are tiny: one thread is fastest, and it keeps the run
    # quick (and the numbers reproducible) on a shared, busy machine.
    torch.set_num_threads(1)
    try:
        return _run(keys, epochs=epochs, out_dir=out_dir, seed=seed, progress=progress,
                    console=console)
    finally:
        torch.set_num_threads(threads)


def _run(keys: list[str], *, epochs: int, out_dir: Path, seed: int, progress: bool,
         console: Console) -> dict[str, Any]:
    import torchfreeze as tfz

    data = load_digits_split(seed)
    console.print(
        f"[bold]torchfreeze demo[/]: pretrain a CNN on digits 0-4 ({len(data['pre_y'])} "
        f"images), transfer to digits 5-9 ({len(data['train_y'])} labelled, "
        f"{len(data['test_y'])} test)"
    )
    results: dict[str, dict[str, Any]] = {}
    load_info: dict[str, Any] | None = None
    total = PRETRAIN_EPOCHS + epochs * len(keys)
    bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True, disable=not progress)
    with bar:
        task = bar.add_task("pretraining on 0-4", total=total)

        def advance() -> None:
            bar.advance(task)

        t0 = time.perf_counter()
        pre = _pretrain(data, seed=seed, advance=advance)
        pre_time = time.perf_counter() - t0
        pre_acc = _accuracy(pre, data["pre_x"], data["pre_y"])
        ckpt = out_dir / "pretrained.pt"
        torch.save(pre.state_dict(), ckpt)
        for key in keys:
            bar.update(task, description=STRATEGIES[key])
            result, model, report = _train_strategy(key, ckpt, data, epochs=epochs,
                                                    seed=seed, advance=advance)
            results[key] = result
            if report is not None and load_info is None:
                load_info = report.to_dict()
                bar.console.print(
                    f"pretrained on 0-4: {100 * pre_acc:.1f}% train accuracy in "
                    f"{pre_time:.1f} s, saved to {ckpt}")
                bar.console.print(report)
            if key == "linear-probe":
                torch.save(model.state_dict(), out_dir / "linear-probe.pt")
    console.print(_table(results, epochs))
    verdict = _transfer_verdict(results)
    if verdict:
        console.print(verdict)
    if "head-cached" in results:
        fc = results["head-cached"]["feature_cache"]
        console.print(f"FeatureCache: backbone ran for {fc['misses']} samples, replayed "
                      f"{fc['hits']} ({fc['bytes'] / 1024:.0f} KiB cached)")
    payload: dict[str, Any] = {
        "config": {"epochs": epochs, "seed": seed, "strategies": keys, "shots": SHOTS,
                   "batch_size": BATCH, "lr": LR, "fine_tune_lr": FT_LR, "head_lr": HEAD_LR,
                   "pretrain_epochs": PRETRAIN_EPOCHS,
                   "torch": torch.__version__, "torchfreeze": tfz.__version__},
        "data": {"pretrain": len(data["pre_y"]), "train": len(data["train_y"]),
                 "test": len(data["test_y"])},
        "pretrain": {"accuracy": pre_acc, "wall_time_s": pre_time, "checkpoint": str(ckpt)},
        "load_report": load_info,
        "strategies": results,
    }
    from ._plot import plot_demo

    png = out_dir / "demo.png"
    plot_demo(payload, png)
    payload["files"] = {"png": str(png), "json": str(out_dir / "results.json")}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {png} and {out_dir / 'results.json'}")
    if "linear-probe" in results:
        console.print(
            f"check it yourself: torchfreeze diff {ckpt} {out_dir / 'linear-probe.pt'} "
            "--expect-frozen backbone")
    return payload
