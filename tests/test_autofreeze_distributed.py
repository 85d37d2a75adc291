"""AutoFreeze under DDP on real processes: 2 ranks, gloo, CPU.

One 2-rank run plays both scenarios (process start-up costs seconds); the tests
assert on what each rank reported.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchfreeze as tfz

from ._dist_utils import run_ranks_once

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch built without torch.distributed / gloo"),
]


def _net() -> nn.Sequential:
    torch.manual_seed(0)  # same initial weights on every rank, like a pretrained model
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Linear(8, 2),
    )


def _run(rank: int, policy: Any, steps: int) -> dict[str, Any]:
    model = _net()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kwargs: dict[str, Any] = ({"policy": policy} if policy != "gradnorm"
                              else {"warmup": 0, "patience": 1})
    af = tfz.AutoFreeze(ddp, opt, interval=2, **kwargs)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    at_freeze: dict[str, torch.Tensor] = {}
    wrappers = {id(af.model)}
    for _ in range(steps):
        af.model.train()
        af.model(torch.randn(16, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
        for g in af.step():
            at_freeze.update({f"{g}.{n}": t.clone() for n, t in
                              model.get_submodule(g).state_dict().items()})
        opt.zero_grad()
        wrappers.add(id(af.model))
    return {
        "events": list(af.events),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "at_freeze": at_freeze,
        "wrappers": len(wrappers),
        "norms": [r.grad_norms for r in af.history],
        "is_ddp": isinstance(af.model, DDP),
    }


def _scenarios(rank: int) -> dict[str, Any]:
    return {
        "gradnorm": _run(rank, "gradnorm", 10),
        # each rank's policy wants something else: rank 0's decision is applied everywhere
        "disagreeing": _run(rank, lambda s: s.step // 4 + rank, 8),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks_once(_scenarios, tmp_path_factory, "autofreeze")


@pytest.mark.parametrize("scenario", ["gradnorm", "disagreeing"])
def test_ranks_stay_identical_across_freeze_events(ranks, scenario: str) -> None:
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["events"], "the scenario must freeze something"
    assert r0["events"] == r1["events"]
    assert r0["norms"] == r1["norms"]  # averaged over ranks: identical inputs to the rule
    for name, t in r0["state"].items():
        assert torch.equal(t, r1["state"][name]), name
    # every freeze re-wrapped the model, and the frozen groups never moved again
    assert r0["is_ddp"] and r0["wrappers"] == len({s for s, _ in r0["events"]}) + 1
    for name, t in r0["at_freeze"].items():
        assert torch.equal(r0["state"][name], t), name


def test_rank0_decision_wins(ranks) -> None:
    assert [s for s, _ in ranks[1]["disagreeing"]["events"]] == [4, 8]
