"""B-rewrap: what one ``torchfreeze.distributed.unfreeze`` / ``freeze`` costs under DDP.

A re-wrap is one small ``all_gather_object`` (the ranks agree on the plan), one
broadcast of every parameter and buffer from rank 0 (what any DDP construction
does) and a new reducer. Two processes (gloo, CPU) time, interleaved in one run:

* a training step (forward, backward with all-reduce, AdamW step),
* a plain ``DistributedDataParallel(module)`` construction (the limit: a
  re-wrap cannot be cheaper than building the wrapper),
* a re-wrap (alternately ``unfreeze`` and ``freeze`` of the same block).

Read the ratios: re-wrap / construction (limit 1.0) and re-wrap / training step.
Models: a 2 M-parameter MLP and a MiniLM-sized BERT (22.7 M parameters, built
from its config, random weights).

Run: ``.venv/bin/python bench/bench_rewrap.py [--reps N]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import console, fmt_bytes, machine_line, table


def mlp() -> tuple[nn.Module, Any, str]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(8)],
                          nn.Linear(512, 10))
    return model, torch.randn(32, 512), "6"


def minilm() -> tuple[nn.Module, Any, str]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, vocab_size=30522)
    model = BertModel(cfg, add_pooling_layer=False)
    return model, torch.randint(0, 30522, (8, 32)), "encoder.layer.5"


def _loss(out: Any) -> torch.Tensor:
    t = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return t.float().pow(2).mean()


def _step(ddp: DDP, x: Any, opt: torch.optim.Optimizer) -> None:
    _loss(ddp(x)).backward()
    opt.step()
    opt.zero_grad()


def _rank(rank: int, world: int, port: int, out: str, reps: int) -> None:
    import torchfreeze as tfz
    import torchfreeze.distributed as tfd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    rows = []
    for build in (mlp, minilm):
        model, x, block = build()
        tfz.freeze(model)
        tfz.unfreeze(model, block)  # fine-tuning the last block
        ddp = DDP(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times: dict[str, list[float]] = {"step": [], "construct": [], "rewrap": []}
        _step(ddp, x, opt)  # warm-up (buckets are rebuilt after the first step)
        for i in range(reps):
            dist.barrier()
            t = time.perf_counter()
            _step(ddp, x, opt)
            times["step"].append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            probe = DDP(model)
            times["construct"].append(time.perf_counter() - t)
            tfd._retire(probe)  # drop its hooks: ddp stays the live wrapper
            del probe
            dist.barrier()
            t = time.perf_counter()
            # alternately freeze and unfreeze something outside the trained block
            ddp = (tfd.freeze(ddp, block, exclude=f"{block}.*bias") if i % 2 == 0
                   else tfd.unfreeze(ddp, block, optimizer=opt))
            times["rewrap"].append(time.perf_counter() - t)
        if rank == 0:
            params = sum(p.numel() for p in model.parameters())
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((build.__name__, params, nbytes, med))
    if rank == 0:
        torch.save(rows, Path(out) / "rows.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description="cost of a DDP re-wrap")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(2, port, tmp, args.reps), nprocs=2,
                           start_method="spawn")
        rows = torch.load(Path(tmp) / "rows.pt", weights_only=False)
    ms = 1000.0
    t = table(
        "B-rewrap: torchfreeze.distributed re-wrap, 2 ranks (gloo, CPU), medians of "
        f"{args.reps}",
        ["model", "params", "broadcast", "train step", "DDP()", "re-wrap",
         "re-wrap / DDP() (limit 1.0)", "re-wrap / step"],
        [
            (name, f"{p / 1e6:.1f} M", fmt_bytes(b), f"{m['step'] * ms:.1f} ms",
             f"{m['construct'] * ms:.1f} ms", f"{m['rewrap'] * ms:.1f} ms",
             f"{m['rewrap'] / m['construct']:.2f}", f"{m['rewrap'] / m['step']:.2f}")
            for name, p, b, m in rows
        ],
        caption=machine_line(),
    )
    console().print(t)


if __name__ == "__main__":
    main()
