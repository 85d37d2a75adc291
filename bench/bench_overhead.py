"""B2: per-step cost of a torchfreeze loop vs the same loop written by hand.

Both loops fine-tune the same model (a 12-block residual MLP stack, first 8
blocks frozen, AdamW with no weight decay on biases and norms) for the same
steps. The torchfreeze loop uses ``tfz.freeze`` + ``tfz.param_groups`` and calls
``tfz.check`` once and ``tfz.verify`` around the whole loop; the hand-written
loop sets ``requires_grad`` and builds the two groups itself. What torchfreeze
returns are plain torch objects, so the limit is 1.00: the one-time calls are
all it may add. The two loops advance in lockstep, alternating step by step.

Run: ``.venv/bin/python bench/bench_overhead.py``
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import console, machine_line, table
from bench_cache import mlp_net

import torchfreeze as tfz

STEPS, RUNS, BATCH, LR, WD = 60, 5, 64, 1e-3, 0.05


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 256, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
         y: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def hand_setup(model: nn.Module) -> torch.optim.Optimizer:
    for p in model.prefix.parameters():
        p.requires_grad = False
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or ".norm." in name or p.dim() == 1
             else decay).append(p)
    model.train()
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR)


def tfz_setup(model: nn.Module) -> torch.optim.Optimizer:
    tfz.freeze(model, "prefix")
    model.train()
    return torch.optim.AdamW(tfz.param_groups(model, lr=LR, weight_decay=WD), lr=LR)


def run_once(base: nn.Module, data: list) -> dict[str, float]:
    """One hand-written and one torchfreeze loop, advanced in lockstep.

    Steps alternate between the two loops (and which goes first alternates), so a
    burst of load on this shared machine hits both alike.
    """
    clock = time.perf_counter
    t = {"hand": 0.0, "tfz": 0.0, "hand_steps": 0.0, "tfz_steps": 0.0}
    hand_model, tfz_model = copy.deepcopy(base), copy.deepcopy(base)
    s = clock()
    hand_opt = hand_setup(hand_model)
    t["hand"] += clock() - s
    s = clock()
    tfz_opt = tfz_setup(tfz_model)
    verifying = tfz.verify(tfz_model)
    report = verifying.__enter__()
    t["tfz"] += clock() - s
    losses = {}
    for i, (x, y) in enumerate(data):
        for who in ("hand", "tfz") if i % 2 == 0 else ("tfz", "hand"):
            s = clock()
            if who == "hand":
                losses[who] = step(hand_model, hand_opt, x, y)
                t["hand_steps"] += clock() - s
            else:
                losses[who] = step(tfz_model, tfz_opt, x, y)
                t["tfz_steps"] += clock() - s
                if i == 0:  # once, after the first backward (as check() documents)
                    diagnosis = tfz.check(tfz_model, tfz_opt)
            t[who] += clock() - s
    s = clock()
    verifying.__exit__(None, None, None)
    t["tfz"] += clock() - s
    if not report.ok or any(f.severity == "error" for f in diagnosis):
        raise SystemExit(f"torchfreeze loop is not clean:\n{report}\n{diagnosis}")
    t["loss_diff"] = abs(losses["hand"] - losses["tfz"])
    return t


def main() -> None:
    data = batches()
    base = mlp_net(8, depth=12)
    run_once(base, data[:5])  # warm-up
    totals: dict[str, float] = {}
    for _ in range(RUNS):
        for k, v in run_once(base, data).items():
            totals[k] = totals.get(k, 0.0) + v
    ratio = totals["tfz"] / totals["hand"]
    step_ratio = totals["tfz_steps"] / totals["hand_steps"]
    once = {k: (totals[k] - totals[k + "_steps"]) / RUNS * 1e3 for k in ("hand", "tfz")}
    rows = [[f"{STEPS} steps, 8/12 blocks frozen, AdamW 2 groups",
             f"{totals['hand'] / RUNS / STEPS * 1e3:.2f}",
             f"{totals['tfz'] / RUNS / STEPS * 1e3:.2f}",
             f"{once['hand']:.1f}", f"{once['tfz']:.1f}", f"{step_ratio:.3f}x",
             f"{ratio:.3f}x", "1.00x", f"{ratio:.3f}", f"{totals['loss_diff']:.1e}"]]
    columns = ["loop", "hand ms/step", "tfz ms/step", "hand once ms", "tfz once ms",
               "steps only", "ratio", "limit", "of limit", "final loss diff"]
    caption = (
        "ratio = torchfreeze loop time / hand-written loop time, whole loop including the "
        "one-time freeze/param_groups/check/verify; the two loops run in lockstep, "
        f"alternating step by step, {RUNS} runs summed. Target <= 1.02. "
        "once ms: time outside the training steps per loop (setup, check, verify's snapshot "
        "and comparison). steps only: the same ratio over the training steps alone.\n"
        f"Machine: {machine_line()}"
    )
    console().print(table("B2: per-step overhead of the torchfreeze loop", columns, rows,
                          caption))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    main()
