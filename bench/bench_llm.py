"""B-LLM: full fine-tune vs LoRA vs freeze-tune vs RotatingFreeze on the real SmolLM2-135M.

BBC News topic classification as language modelling: the prompt is the start of
an article and "Topic:", the target is the topic word; accuracy scores the five
topic words' first tokens at the prompt's end (LM scoring), zero-shot as the
baseline. The task, the strategies and the measurements are
``torchfreeze.demo_llm`` (what ``torchfreeze demo --task llm`` runs); here each
row runs in a fresh process, without ``tfz.verify``'s snapshot, so its peak RSS
is its own.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_llm.py [--steps 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROWS = ("zero-shot", "full", "lora", "freeze-last4", "badam", "lisa")


def run_row(row: str, steps: int, seed: int) -> dict[str, Any]:
    from torchfreeze.demo_llm import DEFAULT, load_lm_data, load_tokenizer, train_strategy

    recipe = replace(DEFAULT, steps=steps, seed=seed, evals=1)
    data = load_lm_data(load_tokenizer(), recipe)
    r = train_strategy(row, data, recipe, check=False)
    return {
        "row": row, "steps": steps, "samples": steps * recipe.batch_size, "seed": seed,
        "peak_rss_mib": r.peak_rss_mib,
        "optimizer_state_mib": r.state_bytes / 2**20, "grad_mib": r.grad_bytes / 2**20,
        "s_per_step": r.s_per_step, "zero_shot_acc": r.zero_shot_accuracy, "acc": r.accuracy,
    }


def main() -> None:
    from torchfreeze.demo_llm import DEFAULT

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=DEFAULT.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.seed)))
        return
    from rich.console import Console
    from rich.table import Table

    results = []
    for row in args.rows.split(","):
        out = subprocess.run([sys.executable, __file__, "--row", row, "--steps",
                              str(args.steps), "--seed", str(args.seed)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"SmolLM2-135M, BBC News as LM, {args.steps} steps x batch "
                        f"{DEFAULT.batch_size}, seed {args.seed}")
    for col in ("row", "peak RSS MiB", "opt state MiB", "grad MiB", "s/step", "acc"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        table.add_row(r["row"], f"{r['peak_rss_mib']:.0f}", f"{r['optimizer_state_mib']:.0f}",
                      f"{r['grad_mib']:.0f}",
                      "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}",
                      f"{100 * r['acc']:.0f}%")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
