"""B-plan: what ``tfz.plan`` predicts per freeze boundary vs what training measures.

For the real all-MiniLM-L6-v2 on BBC News batches and the real SmolLM2-135M, in
one process: ``tfz.plan`` on one example batch, then real AdamW training steps
with the prefix frozen (groups < k, and any parameter in no group) at several
boundaries, side by side:

* step-time speed-up over boundary 0 (predicted vs measured median step; the
  boundaries take turns, and each turn times a step that follows an untimed one
  at the same boundary, as a training run at one boundary steps);
* tensor memory of a step: grads + optimizer state + saved activations
  (measured: the ``.grad`` storages, ``optimizer.state`` after the step, and
  what autograd packs during the real step's forward);
* epoch speed-up with ``FeatureCache(upto=row.upto)`` over ``--epochs`` epochs
  of ``--batches`` batches (measured wall time from an empty cache against
  boundary 0's steps taken right around it; the median of ``--repeats`` runs),
  and the replayed step (epochs 2 on) predicted vs measured;
* the plan call against one full training step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_plan.py [--models minilm,smollm2] [--json F]

Targets: speed-up within 15 %, memory within 10 %, cached speed-up within 20 %,
the plan call <= 5 training steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import console, machine_line, table

import torchfreeze as tfz
from torchfreeze._compat import storage_key
from torchfreeze.rotate import optimizer_state_bytes


def _loss(out: Any) -> torch.Tensor:
    return out.loss if getattr(out, "loss", None) is not None else out[0].float().sum()


class Stepper:
    """One AdamW per boundary (over what trains there), so boundaries can alternate."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 layers: list[Any]) -> None:
        self.model, self.batch, self.layers = model, batch, layers
        self.opts: dict[int, torch.optim.Optimizer] = {}
        self.times: dict[int, list[float]] = {}
        self.memory: dict[int, dict[str, int]] = {}
        self.fixed = {storage_key(t) for t in (*model.parameters(), *model.buffers())}

    def step(self, k: int, *, record: bool = True) -> float:
        set_boundary(self.model, self.layers, k)
        params = [p for p in self.model.parameters() if p.requires_grad]
        first = k not in self.opts
        if first:
            self.opts[k] = torch.optim.AdamW(params, lr=1e-6)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if key not in self.fixed:
                saved.setdefault(key, t.untyped_storage().nbytes())
            return t

        ctx = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if first
               else contextlib.nullcontext())
        t0 = time.perf_counter()
        with ctx:
            out = self.model(**self.batch)
        _loss(out).backward()
        self.opts[k].step()
        grads = _bytes_once([p.grad for p in params if p.grad is not None])
        self.model.zero_grad(set_to_none=True)
        took = time.perf_counter() - t0
        if first:  # the first step allocates the optimizer state: memory, not time
            self.memory[k] = {"grads": grads, "state": optimizer_state_bytes(self.opts[k]),
                              "activations": sum(saved.values())}
        elif record:
            self.times.setdefault(k, []).append(took)
        return took

    def median(self, k: int) -> float:
        return statistics.median(self.times[k])


def _bytes_once(tensors: list[torch.Tensor]) -> int:
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def measure_cached(model: nn.Module, batches: list[dict[str, torch.Tensor]], upto: str,
                   epochs: int) -> tuple[float, list[float]]:
    """One cached run from an empty cache: its wall time and each step's seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    steps = []
    t0 = time.perf_counter()
    cache = tfz.FeatureCache(model, upto=upto, pin_eval=True)
    for _ in range(epochs):
        for i, b in enumerate(batches):
            t1 = time.perf_counter()
            n = next(iter(b.values())).shape[0]
            with cache.keys(list(range(i * n, (i + 1) * n))):
                out = model(**b)
            _loss(out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    cache.close()
    return wall, steps


def minilm(n_batches: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], str]:
    from torchfreeze.demo_news import DEFAULT, build_model, load_news, pretrained_weights

    data = load_news(DEFAULT)
    model, _ = build_model(weights=pretrained_weights(), seed=0)
    model.train()
    bs = DEFAULT.batch_size
    batches = [{"input_ids": data.train_x[i * bs:(i + 1) * bs],
                "attention_mask": data.train_mask[i * bs:(i + 1) * bs],
                "labels": data.train_y[i * bs:(i + 1) * bs]} for i in range(n_batches)]
    return model, batches, f"all-MiniLM-L6-v2, BBC News, {bs} x {DEFAULT.max_length} tokens"


def smollm2(n_batches: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], str]:
    from torchfreeze.demo_llm import load_smollm2
    from torchfreeze.demo_news import _corpus_dir

    model, tok = load_smollm2()
    model.train()
    texts = [f.read_text(errors="ignore") for f in sorted((_corpus_dir() / "business").iterdir())]
    bs, length = 4, 64
    batches = []
    for i in range(n_batches):
        enc = tok(texts[i * bs:(i + 1) * bs], truncation=True, max_length=length,
                  padding="max_length", return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": enc["input_ids"]})
    return model, batches, f"SmolLM2-135M-Instruct, BBC News, {bs} x {length} tokens"


MODELS: dict[str, Callable[[int], tuple[nn.Module, list[dict[str, torch.Tensor]], str]]] = {
    "minilm": minilm, "smollm2": smollm2,
}


def _boundaries(n: int, want: int) -> list[int]:
    picks = sorted({round(i * (n - 1) / (want - 1)) for i in range(want)})
    return picks


def _err(pred: float | None, meas: float | None) -> str:
    if pred is None or meas is None or meas == 0:
        return "-"
    return f"{100 * (pred - meas) / meas:+.1f} %"


def set_boundary(model: nn.Module, layers: list[Any], k: int) -> None:
    """Groups >= k train; groups < k and parameters in no group are frozen."""
    trained = {n for layer in layers[k:] for n in layer.param_names}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)


#: per model: (label, which layer groups): all of tfz.layers, or all but the last
#: (for SmolLM2 the last is the head with the tied embedding: frozen, as freeze-tuning does)
VARIANTS = {"minilm": [("tfz.layers", False)],
            "smollm2": [("tfz.layers: the tied embedding/head trains", False),
                        ("tfz.layers[:-1]: embedding/head frozen", True)]}


def run_model(name: str, *, boundaries: int, steps: int, epochs: int,
              batches: int, repeats: int) -> list[dict[str, Any]]:
    model, data, what = MODELS[name](batches)
    out = []
    for label, drop_head in VARIANTS[name]:
        layers = tfz.layers(model)[:-1] if drop_head else tfz.layers(model)
        out.append(run_variant(model, data, f"{what}; {label}", layers, boundaries=boundaries,
                               steps=steps, epochs=epochs, batches=batches,
                               repeats=repeats))
    return out


def run_variant(model: nn.Module, data: list[dict[str, torch.Tensor]], what: str,
                layers: list[Any], *, boundaries: int, steps: int, epochs: int,
                batches: int, repeats: int) -> dict[str, Any]:
    batch = data[0]
    plan = tfz.plan(model, batch, layers=layers, epochs=epochs, batches_per_epoch=batches)
    console().print(plan)
    picks = _boundaries(len(plan.rows), boundaries)
    st = Stepper(model, batch, layers)
    for _ in range(steps + 1):  # round robin: the machine's noise hits every boundary alike
        for k in picks:  # each visit: an untimed step first, as training runs one boundary
            st.step(k, record=False)  # for many steps (a step right after another
            st.step(k)  # boundary's pays for its memory: 4.1 s against 3.6 s at SmolLM2 k=0)
    rows = []
    for k in picks:
        r, m = plan.rows[k], st.memory[k]
        cached = fill_s = replay_s = None
        if r.upto is not None and r.cached_speedup is not None:
            # each repeat: a cached run from an empty cache against full steps taken
            # right before and after it (the machine's noise drifts; a ratio per repeat)
            ratios, fills, replays = [], [], []
            for _ in range(repeats):
                around = [st.step(0, record=False) for _ in range(3)][1:]
                set_boundary(model, layers, k)
                wall, took = measure_cached(model, data, r.upto, epochs)
                around += [st.step(0, record=False) for _ in range(3)][1:]
                ratios.append(statistics.median(around) * epochs * batches / wall)
                fills += took[1:batches]  # epoch 1 without its first step (AdamW's state)
                replays += took[batches:]
            cached = statistics.median(ratios)
            fill_s, replay_s = statistics.median(fills), statistics.median(replays)
        pred_mem = r.memory.grads + r.memory.optimizer_state + r.memory.activations
        meas_mem = m["grads"] + m["state"] + m["activations"]
        rows.append({
            "boundary": k, "frozen_through": r.frozen_through,
            "pred_step_s": r.step_seconds, "meas_step_s": st.median(k),
            "pred_speedup": r.speedup, "meas_speedup": st.median(0) / st.median(k),
            "pred_tensor_bytes": pred_mem, "meas_tensor_bytes": meas_mem,
            "pred_grads": r.memory.grads, "meas_grads": m["grads"],
            "pred_state": r.memory.optimizer_state, "meas_state": m["state"],
            "pred_activations": r.memory.activations, "meas_activations": m["activations"],
            "pred_cached_speedup": r.cached_speedup, "meas_cached_speedup": cached,
            "pred_replay_step_s": r.cached_step_seconds, "meas_replay_step_s": replay_s,
            "meas_fill_step_s": fill_s,
        })
    for p in model.parameters():
        p.requires_grad_(True)
    return {"what": what, "epochs": epochs, "batches": batches, "repeats": repeats,
            "plan_seconds": plan.plan_seconds, "full_step_seconds": st.median(0),
            "plan_in_steps": plan.plan_seconds / st.median(0), "rows": rows,
            "plan": plan.to_dict()}


def show(result: dict[str, Any]) -> None:
    cols = ["k", "frozen through", "speed-up pred", "meas", "err", "tensor MiB pred", "meas",
            "err", "cached pred", "meas", "err", "replay step pred", "meas"]
    body = []
    for r in result["rows"]:
        body.append([
            r["boundary"], r["frozen_through"] or "(nothing)",
            f"{r['pred_speedup']:.2f}x", f"{r['meas_speedup']:.2f}x",
            _err(r["pred_speedup"], r["meas_speedup"]),
            f"{r['pred_tensor_bytes'] / 2**20:.1f}", f"{r['meas_tensor_bytes'] / 2**20:.1f}",
            _err(r["pred_tensor_bytes"], r["meas_tensor_bytes"]),
            "-" if r["pred_cached_speedup"] is None else f"{r['pred_cached_speedup']:.2f}x",
            "-" if r["meas_cached_speedup"] is None else f"{r['meas_cached_speedup']:.2f}x",
            _err(r["pred_cached_speedup"], r["meas_cached_speedup"]),
            "-" if r["pred_replay_step_s"] is None else f"{r['pred_replay_step_s']:.3f}",
            "-" if r["meas_replay_step_s"] is None else f"{r['meas_replay_step_s']:.3f}",
        ])
    console().print(table(
        f"B-plan {result['what']}: predicted vs measured", cols, body,
        caption=(f"plan call {result['plan_seconds']:.1f} s = {result['plan_in_steps']:.1f} "
                 f"full training steps ({result['full_step_seconds']:.2f} s); cached: "
                 f"{result['epochs']} epochs x {result['batches']} batches, median of "
                 f"{result['repeats']} runs from an empty cache. Targets: speed-up "
                 "15 %, memory 10 %, cached 20 %, plan <= 5 steps. " + machine_line())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--boundaries", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per boundary")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="batches per epoch (cached runs)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="cached runs per boundary (the median ratio is reported)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    torch.manual_seed(0)
    results = []
    for name in args.models.split(","):
        for res in run_model(name, boundaries=args.boundaries, steps=args.steps,
                             epochs=args.epochs, batches=args.batches,
                             repeats=args.repeats):
            show(res)
            results.append(res)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
