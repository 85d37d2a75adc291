"""B-LLM: full fine-tune vs LoRA vs freeze-tune vs RotatingFreeze on the real SmolLM2-135M.

BBC News topic classification as language modelling: the prompt is the start of
an article and "Topic:", the target is the topic word; accuracy scores the five
topic words' first tokens at the prompt's end (LM scoring), zero-shot as the
baseline. Each row runs in a fresh process so its peak RSS is its own.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_llm.py [--steps 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROWS = ("zero-shot", "full", "lora", "freeze-last4", "badam", "lisa")
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BATCH, PROMPT_TOKENS, TEST = 4, 48, 100


def _data(tok: Any, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[int]]:
    from torchfreeze.demo_news import _corpus_dir

    root = _corpus_dir()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())  # "sports" on disk
    items = [(f.read_text(errors="ignore"), c) for c, name in enumerate(folders)
             for f in sorted((root / name).iterdir())]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    topic_ids = [tok(" " + t, add_special_tokens=False)["input_ids"][0] for t in TOPICS]

    def encode(text: str) -> list[int]:
        body = tok(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        return body + tok("\nTopic:", add_special_tokens=False)["input_ids"]

    prompts = [encode(items[i][0]) for i in order]
    labels = [items[i][1] for i in order]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.eos_token_id or 0)
    for i, p in enumerate(prompts):  # left padding: the last position is the prompt's end
        ids[i, width - len(p):] = torch.tensor(p)
    mask = (torch.arange(width)[None] >= (width - torch.tensor([len(p) for p in prompts]))[:, None])
    return [ids, mask.long()], torch.tensor(labels), torch.tensor(topic_ids), order


@torch.no_grad()
def _accuracy(model: Any, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
              topic_ids: torch.Tensor) -> float:
    model.eval()
    hits = 0
    for s in range(0, len(ids), 25):
        logits = model(input_ids=ids[s:s + 25], attention_mask=mask[s:s + 25]).logits[:, -1]
        hits += int((logits[:, topic_ids].argmax(-1) == y[s:s + 25]).sum())
    model.train()
    return hits / len(ids)


def run_row(row: str, steps: int, seed: int) -> dict[str, Any]:
    import torchfreeze as tfz
    from torchfreeze.demo_llm import load_smollm2
    from torchfreeze.rotate import optimizer_state_bytes

    torch.manual_seed(seed)
    model, tok = load_smollm2()
    (ids, mask), y, topic_ids, _ = _data(tok, seed)
    test = slice(0, TEST)
    train_ids, train_mask, train_y = ids[TEST:], mask[TEST:], y[TEST:]
    rot = None
    lr = 2e-5
    if row == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj"]))
        lr = 2e-4
    if row == "freeze-last4":  # LLaMA-Factory's freeze-tuning: last 4 layers + final norm
        tfz.freeze(model)
        tfz.unfreeze(model, [f"model.layers.{i}" for i in range(26, 30)], "model.norm")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    switch = max(1, steps // 4)
    if row == "badam":
        rot = tfz.RotatingFreeze(model, opt, order="descending", switch_every=switch,
                                 layers=[f"model.layers.{i}" for i in range(30)])
    if row == "lisa":
        rot = tfz.RotatingFreeze(model, opt, order="random", active=2, switch_every=switch,
                                 always=["model.embed_tokens", "model.norm"], seed=seed)
    zero = _accuracy(model, ids[test], mask[test], y[test], topic_ids)
    times, grad_bytes, state_bytes = [], 0, 0
    if row != "zero-shot":
        model.train()
        for step in range(steps):
            sl = slice(step * BATCH % len(train_ids), step * BATCH % len(train_ids) + BATCH)
            x, m = train_ids[sl], train_mask[sl]
            t0 = time.perf_counter()
            logits = model(input_ids=x, attention_mask=m).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, topic_ids[train_y[sl]])
            loss.backward()
            grad_bytes = max(grad_bytes, sum(p.grad.nbytes for p in model.parameters()
                                             if p.grad is not None))
            opt.step()
            state_bytes = max(state_bytes, optimizer_state_bytes(opt))
            if rot is not None:
                rot.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
    acc = _accuracy(model, ids[test], mask[test], y[test], topic_ids)
    return {
        "row": row, "steps": steps, "samples": steps * BATCH, "seed": seed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_mib": state_bytes / 2**20, "grad_mib": grad_bytes / 2**20,
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else None,
        "zero_shot_acc": zero, "acc": acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=24)
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
    table = Table(title=f"SmolLM2-135M, BBC News as LM, {args.steps} steps x batch {BATCH}, "
                        f"seed {args.seed}")
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
