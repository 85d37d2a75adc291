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

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_llm.py [--steps 24] [--rows badam,badam-keep]
        [--switch-every N] [--json out.json]
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


def run_row(row: str, steps: int, seed: int, switch_every: int | None = None) -> dict[str, Any]:
    from torchfreeze.demo_llm import DEFAULT, load_lm_data, load_tokenizer, train_strategy

    recipe = replace(DEFAULT, steps=steps, seed=seed, evals=1, switch_every=switch_every)
    data = load_lm_data(load_tokenizer(), recipe)
    r = train_strategy(row, data, recipe, check=False)
    return {
        "row": row, "steps": steps, "samples": steps * recipe.batch_size, "seed": seed,
        "peak_rss_mib": r.peak_rss_mib,
        "switch_every": recipe.switch,
        "optimizer_state_mib": r.state_bytes / 2**20, "grad_mib": r.grad_bytes / 2**20,
        "kept_in_host_mib": r.stash_bytes / 2**20,
        "s_per_step": r.s_per_step, "zero_shot_acc": r.zero_shot_accuracy, "acc": r.accuracy,
    }


def main() -> None:
    from torchfreeze.demo_llm import DEFAULT

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=DEFAULT.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--switch-every", type=int, default=None,
                    help="the rotations' steps per block (default: max(1, steps // 4))")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.seed, args.switch_every)))
        return
    from rich.console import Console
    from rich.table import Table

    results = []
    switch = [] if args.switch_every is None else ["--switch-every", str(args.switch_every)]
    for row in args.rows.split(","):
        out = subprocess.run([sys.executable, __file__, "--row", row, "--steps",
                              str(args.steps), "--seed", str(args.seed), *switch],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"SmolLM2-135M, BBC News as LM, {args.steps} steps x batch "
                        f"{DEFAULT.batch_size}, blocks of {results[0]['switch_every']} steps, "
                        f"seed {args.seed}")
    for col in ("row", "peak RSS MiB", "opt state MiB", "kept in host MiB", "grad MiB",
                "s/step", "acc"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        table.add_row(r["row"], f"{r['peak_rss_mib']:.0f}", f"{r['optimizer_state_mib']:.0f}",
                      f"{r['kept_in_host_mib']:.0f}", f"{r['grad_mib']:.0f}",
                      "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}",
                      f"{100 * r['acc']:.0f}%")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
