"""B-real: all-MiniLM-L6-v2 on BBC News at full size: time to accuracy per strategy.

The demo's workload (`torchfreeze demo`) with every article not in the 500-article
test set as training data, over several seeds. For each strategy: final test
accuracy, train seconds until the test accuracy first reaches the plain full
fine-tune's final accuracy minus 0.5 point ("target"), and the speed-up to that
target against (a) the plain-PyTorch full fine-tune and (b) the Hugging Face
`Trainer` running the same full fine-tune (same model, data, AdamW groups, constant
LR, batch size and epochs: what most users run). All rows of a seed run one after
the other in one process, so the ratios are side by side. Evaluation is excluded
from every clock (the Trainer's too: a callback stops it while we evaluate).

`make bench-real` (not in CI; about 17 min per seed on an idle 2-core CPU, 3 seeds).
Rows are :data:`ROWS`: the demo's strategies (from-scratch left out: it never
reaches the target) plus ``hf-trainer``; other strategies join by adding their
name to ROWS: demo strategies registered in ``torchfreeze.demo_news``, or
bench-only ones (``dn.Strategy`` objects) in :data:`EXTRA`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import console, machine_line, table

from torchfreeze import demo_news as dn

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_real -->", "<!-- /bench_real -->"
#: the rows, in the order they run within a seed; "hf-trainer" is the Trainer baseline
ROWS = ["full-fine-tune", "hf-trainer", "partial-freeze", "linear-probe", "gradual-unfreeze",
        "auto-freeze", "auto-freeze:nocache", "freezeout"]
#: bench-only rows (not in the demo): name -> dn.Strategy; ROWS names them to run them
EXTRA: dict[str, dn.Strategy] = {
    # AutoFreeze without the cache, a FreezeOut-style fixed schedule through
    # policy= (cached), and the monitor alone (a policy that never freezes)
    "auto-freeze:nocache": dn.Strategy(
        "auto-freeze:nocache", "AutoFreeze gradnorm, no cache",
        lambda m, r: dn.auto_freeze_setup(m, r, cache=False)),
    "freezeout": dn.Strategy(
        "freezeout", "fixed schedule policy=freezeout_policy(recipe, t0=0.25), cached",
        lambda m, r: dn.auto_freeze_setup(m, r, policy=dn.freezeout_policy(r, t0=0.25))),
    "monitor-only": dn.Strategy(
        "monitor-only", "AutoFreeze(policy=lambda s: 0): the monitor's cost",
        lambda m, r: dn.auto_freeze_setup(m, r, policy=lambda s: 0, cache=False)),
}
TARGET_MARGIN = 0.005
#: the stricter target: the full fine-tune's final accuracy - 0.3 pt
STRICT_MARGIN = 0.003
RECIPE = replace(dn.DEFAULT, shots=None, test=500, epochs=2, evals_per_epoch=2)


def trainer_row(data: dn.NewsData, recipe: dn.Recipe,
                weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same full fine-tune through transformers.Trainer; curve in train seconds."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    model, _ = dn.build_model(weights=weights, seed=recipe.seed + 1,
                              num_labels=len(data.classes))
    setup = dn._plain_pytorch(model, recipe)
    curve = [[0.0, dn._accuracy(model, setup, data)]]
    steps_per_epoch = -(-len(data.train_y) // recipe.batch_size)
    every = max(1, steps_per_epoch // recipe.evals_per_epoch)
    clock = {"t": 0.0, "since": 0.0}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["since"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            last = state.global_step == state.max_steps
            if state.global_step % every and not last:
                return
            clock["t"] += time.perf_counter() - clock["since"]
            curve.append([clock["t"], dn._accuracy(kw["model"], setup, data)])
            kw["model"].train()
            clock["since"] = time.perf_counter()

    rows = [{"input_ids": x, "attention_mask": m, "labels": y}
            for x, m, y in zip(data.train_x, data.train_mask, data.train_y)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=recipe.batch_size,
            num_train_epochs=recipe.epochs, lr_scheduler_type="constant", warmup_steps=0,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
            use_cpu=True, seed=recipe.seed + 2, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          optimizers=(setup.optimizer, None), callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
        trainer.train()
    return {"name": "hf-trainer", "test_accuracy": curve[-1][1], "train_seconds": clock["t"],
            "curve": curve}


def run_seed(seed: int, rows: list[str], recipe: dn.Recipe) -> list[dict[str, Any]]:
    recipe = replace(recipe, seed=seed)
    data = dn.load_news(recipe)
    weights = dn.pretrained_weights()
    out = []
    initial: dict[bool, float] = {}
    for name in rows:
        t0 = time.perf_counter()
        if name == "hf-trainer":
            r = trainer_row(data, recipe, weights)
        else:
            strategy = EXTRA[name] if name in EXTRA else dn.STRATEGIES[name]
            row = dn.train_strategy(strategy, data, recipe, weights=weights,
                                    initial=initial)
            r = {"name": name, "test_accuracy": row.accuracy, "train_seconds": row.seconds,
                 "curve": row.curve, "verify": row.verify}
            if "auto_freeze" in row.info:
                r["auto_freeze"] = row.info["auto_freeze"]
        r["seed"], r["wall_seconds"] = seed, time.perf_counter() - t0
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def summarise(runs: list[list[dict[str, Any]]]) -> list[list[str]]:
    """Per row: mean final accuracy, mean seconds to target, mean per-seed speed-ups."""
    per: dict[str, dict[str, list[float]]] = {}
    for seed_rows in runs:
        by = {r["name"]: r for r in seed_rows}
        target = by["full-fine-tune"]["test_accuracy"] - TARGET_MARGIN
        base = {b: dn.seconds_to(by[b]["curve"], target) for b in ("full-fine-tune",
                                                                   "hf-trainer") if b in by}
        strict = by["full-fine-tune"]["test_accuracy"] - STRICT_MARGIN
        strict_base = dn.seconds_to(by["full-fine-tune"]["curve"], strict)
        for r in seed_rows:
            d = per.setdefault(r["name"], {"acc": [], "t": [], "vs_plain": [], "vs_hf": [],
                                           "missed": [], "strict": []})
            d["acc"].append(r["test_accuracy"])
            t_strict = dn.seconds_to(r["curve"], strict)
            if t_strict is not None and strict_base:
                d["strict"].append(strict_base / t_strict)
            t = dn.seconds_to(r["curve"], target)
            if t is None:
                d["missed"].append(1.0)
                continue
            d["t"].append(t)
            if base.get("full-fine-tune"):
                d["vs_plain"].append(base["full-fine-tune"] / t)
            if base.get("hf-trainer"):
                d["vs_hf"].append(base["hf-trainer"] / t)

    def mean(xs: list[float], fmt: str) -> str:
        if not xs:
            return "-"
        sd = f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else ""
        return f"{statistics.mean(xs):{fmt}}{sd}"

    out = []
    for name, d in per.items():
        reached = f"{len(d['t'])}/{len(d['acc'])}"
        out.append([name, mean([100 * a for a in d["acc"]], ".1f"),
                    f"{statistics.median(100 * a for a in d['acc']):.1f}", reached,
                    mean(d["t"], ".0f"), mean(d["vs_plain"], ".2f"), mean(d["vs_hf"], ".2f"),
                    f"{mean(d['strict'], '.2f')} ({len(d['strict'])}/{len(d['acc'])})"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="JSON lines of seeds run before (bench_real.last.jsonl): "
                             "included in the table")
    parser.add_argument("--evals-per-epoch", type=int, default=RECIPE.evals_per_epoch)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    recipe = replace(RECIPE, epochs=args.epochs, evals_per_epoch=args.evals_per_epoch)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r != "hf-trainer" and r not in dn.STRATEGIES
               and r not in EXTRA]
    if unknown or "full-fine-tune" not in rows:
        parser.error(f"--rows: need full-fine-tune; unknown: {unknown}; "
                     f"choose from hf-trainer, {', '.join(dn.STRATEGIES)}")
    # read before the run: a bad --add file fails now, not after the long run
    earlier: dict[int, list[dict[str, Any]]] = {}
    for path in args.add:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                earlier.setdefault(r["seed"], []).append(r)
    started = time.perf_counter()
    runs = [run_seed(seed, rows, recipe)
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    took = time.perf_counter() - started
    runs = [earlier[s] for s in sorted(earlier)] + runs
    seeds = sorted({r["seed"] for seed_rows in runs for r in seed_rows})
    data_line = (f"{dn.MODEL} on BBC News: every article not in the {recipe.test}-article test "
                 f"set trains ({2225 - recipe.test}), {recipe.max_length} tokens, batch "
                 f"{recipe.batch_size}, {recipe.epochs} epochs (linear-probe "
                 f"{recipe.epochs * dn.STRATEGIES['linear-probe'].epoch_mult}), "
                 f"{recipe.evals_per_epoch} evaluations per epoch, seeds "
                 f"{', '.join(map(str, seeds))}; "
                 f"FeatureCache {'on' if dn._USE_CACHE else 'OFF (uncached)'}")
    t = table(
        "B-real: time to (full fine-tune's final accuracy - 0.5 pt)",
        ["row", "final acc % (mean ± sd)", "median", "reached", "train s to target",
         "speed-up vs plain full FT", "speed-up vs HF Trainer",
         "vs plain to -0.3 pt (reached)"],
        summarise(runs),
        caption=data_line)
    con = console()
    con.print(t)
    machine = machine_line()
    con.print(f"Machine: {machine}; {took / 60:.1f} min"
              + (f" (+ seeds from {', '.join(map(str, args.add))})" if args.add else ""))
    if not args.no_write:
        from rich.console import Console

        buf = Console(width=150, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        buf.print(t)
        block = "\n".join([
            BEGIN, f"Machine: {machine}. Command: `make bench-real` (= `python "
            f"bench/bench_real.py`), {took / 60:.1f} min.", "", "```text",
            buf.export_text().rstrip(), "```", "",
            "Per-seed rows (JSON lines): `bench/bench_real.last.jsonl`.", END])
        (ROOT / "bench" / "bench_real.last.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for seed_rows in runs for r in seed_rows))
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text += "\n## B-real: MiniLM on BBC News, time to accuracy\n\n" + block + "\n"
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
