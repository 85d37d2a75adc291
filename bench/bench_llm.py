"""B-LLM: full fine-tune vs LoRA vs freeze-tune vs RotatingFreeze on the real SmolLM2-135M.

BBC News topic classification as language modelling: the prompt is the start of
an article and "Topic:", the target is the topic word; accuracy scores the five
topic words' first tokens at the prompt's end (LM scoring), zero-shot as the
baseline. The task, the strategies and the measurements are
``torchfreeze.demo_llm`` (what ``torchfreeze demo --task llm`` runs); here each
row runs in a fresh process, without ``tfz.verify``'s snapshot, so its peak RSS
is its own. ``badam-keep`` is BAdam with ``state="keep"``: its "opt state" is
what the optimizer holds (one layer, as ``badam``) and "kept in host" is
``rot.stash_bytes``, the state of the layers that left, in host memory (on a CPU
the same RAM: it shows in peak RSS). ``--switch-every 1 --steps 30`` takes BAdam
once through all 30 layers, where the stash is at its largest (29 layers).

``--seeds 0,1,2`` repeats every row per seed (each its own split, LoRA init and
LISA draws) and adds the median table: accuracy, and the training seconds each
row took to come within 1 pt of the same seed's full fine-tune's final accuracy
(the first of ``--evals`` evenly spaced test-set evaluations that does; "-" when
none does).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_llm.py [--steps 24] [--rows badam,badam-keep]
        [--switch-every N] [--seeds 0,1,2] [--evals N] [--lr 1e-4] [--json out.json]

Each row trains at its own rate (``demo_llm.LLMRecipe.lr_of``: the best B-LLM
measured for it); ``--lr`` sets one rate for every row but LoRA's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROWS = ("zero-shot", "full", "lora", "freeze-last4", "badam", "lisa", "badam-keep")


def run_row(row: str, steps: int, seed: int, switch_every: int | None = None,
            evals: int = 1, initial: float | None = None,
            lr: float | None = None) -> dict[str, Any]:
    from torchfreeze.demo_llm import DEFAULT, load_lm_data, load_tokenizer, train_strategy

    recipe = replace(DEFAULT, steps=steps, seed=seed, evals=evals, switch_every=switch_every)
    if lr is not None:  # one rate for every row but LoRA's
        recipe = replace(recipe, lr=lr, badam_lr=lr, lisa_lr=lr)
    data = load_lm_data(load_tokenizer(), recipe)
    r = train_strategy(row, data, recipe, check=False, initial=initial)
    return {
        "row": row, "lr": None if row == "zero-shot" else recipe.lr_of(row),
        "steps": r.steps, "samples": r.samples, "seed": seed,
        "peak_rss_mib": r.peak_rss_mib,
        "switch_every": recipe.switch,
        "optimizer_state_mib": r.state_bytes / 2**20, "grad_mib": r.grad_bytes / 2**20,
        "kept_in_host_mib": r.stash_bytes / 2**20,
        "s_per_step": r.s_per_step, "zero_shot_acc": r.zero_shot_accuracy, "acc": r.accuracy,
        "curve": r.curve, "train_seconds": r.train_seconds,
    }


def median_table(results: list[dict[str, Any]], title: str) -> Any:
    """Per row: accuracy per seed and its median; seconds to within 1 pt of full's final."""
    from statistics import median

    from rich.table import Table

    from torchfreeze.demo_news import seconds_to

    full = {r["seed"]: r["acc"] for r in results if r["row"] == "full"}
    table = Table(title=title)
    for col in ("row", "accuracy per seed", "median", "vs full (median)",
                "s to within 1 pt of full", "s/step"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for row in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == row]
        accs = [r["acc"] for r in rs]
        gaps = [r["acc"] - full[r["seed"]] for r in rs if r["seed"] in full]
        reach = [seconds_to(r["curve"], full[r["seed"]] - 0.01) for r in rs
                 if r["seed"] in full and r["steps"]]
        got = [t for t in reach if t is not None]
        steps = [r["s_per_step"] for r in rs if r["s_per_step"] is not None]
        table.add_row(
            row, " ".join(f"{100 * a:.0f}" for a in accs) + " %", f"{100 * median(accs):.0f} %",
            f"{100 * median(gaps):+.0f} pt" if gaps else "-",
            (f"{median(got):.0f} ({len(got)}/{len(reach)} seeds)" if got
             else f"- (0/{len(reach)} seeds)") if reach else "-",
            f"{median(steps):.2f}" if steps else "-")
    return table


def main() -> None:
    from torchfreeze.demo_llm import DEFAULT

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=DEFAULT.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="comma-separated seeds (overrides --seed); adds the "
                                    "median table")
    ap.add_argument("--evals", type=int, default=1,
                    help="test-set evaluations per trained row, evenly spaced")
    ap.add_argument("--switch-every", type=int, default=None,
                    help="the rotations' steps per block (default: max(1, steps // 4))")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--lr", type=float, default=None,
                    help="one learning rate for every row but LoRA (default: each row's "
                         f"own: full and freeze-last4 {DEFAULT.lr}, badam {DEFAULT.badam_lr}, "
                         f"lisa {DEFAULT.lisa_lr}; LoRA keeps {DEFAULT.lora_lr})")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--initial", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.seed, args.switch_every,
                                 args.evals, args.initial, args.lr)))
        return
    from rich.console import Console
    from rich.table import Table

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    results: list[dict[str, Any]] = []
    passed = [] if args.switch_every is None else ["--switch-every", str(args.switch_every)]
    passed += [] if args.lr is None else ["--lr", repr(args.lr)]  # to each row's process
    for seed in seeds:
        initial: list[str] = []  # the seed's zero-shot accuracy, once measured: the same
        for row in args.rows.split(","):  # weights start every row
            out = subprocess.run([sys.executable, __file__, "--row", row, "--steps",
                                  str(args.steps), "--seed", str(seed), "--evals",
                                  str(args.evals), *passed, *initial],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            initial = ["--initial", repr(results[-1]["zero_shot_acc"])]
            if args.json:  # after every row: a long run keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))
    title = (f"SmolLM2-135M, BBC News as LM, {args.steps} steps x batch "
             f"{DEFAULT.batch_size}, blocks of {results[0]['switch_every']} steps")
    table = Table(title=f"{title}, seed{'s' if len(seeds) > 1 else ''} "
                        f"{','.join(map(str, seeds))}")
    table.add_column("seed", justify="right")
    for col in ("row", "peak RSS MiB", "opt state MiB", "kept in host MiB", "grad MiB",
                "s/step", "acc"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        table.add_row(str(r["seed"]), r["row"], f"{r['peak_rss_mib']:.0f}",
                      f"{r['optimizer_state_mib']:.0f}", f"{r['kept_in_host_mib']:.0f}",
                      f"{r['grad_mib']:.0f}",
                      "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}",
                      f"{100 * r['acc']:.0f}%")
    Console().print(table)
    if len(seeds) > 1:
        Console().print(median_table(results, f"{title}: median of seeds "
                                              f"{','.join(map(str, seeds))}"))


if __name__ == "__main__":
    main()
