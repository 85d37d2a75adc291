"""GradualUnfreeze resume on a DDP wrapper, in one process (1-rank gloo group)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchfreeze as tfz
from torchfreeze.norm import bn_policy


def build() -> tuple[nn.Module, DistributedDataParallel, torch.optim.Optimizer,
                     tfz.GradualUnfreeze]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2))
    tfz.freeze(model, "0", "1", "2")  # before wrapping
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, ddp, opt, tfz.GradualUnfreeze(ddp, opt, {1: "2"}, lr_mult=0.5)


def test_ddp_resume_restores_groups_and_bn_policies(gloo_group) -> None:
    model, _, opt, gu = build()
    gu.step(1)
    assert gu.model is not None and len(opt.param_groups) == 2
    tfz.freeze(gu.model.module, "1", bn="stats")  # a policy changed during the run, locally
    state = gu.state_dict()
    assert state["freeze_state"]["bn"] == {"1": "stats"}

    fresh, _, fresh_opt, fresh_gu = build()
    assert bn_policy(fresh[1]) == "eval"
    fresh_gu.load_state_dict(state)
    assert isinstance(fresh_gu.model, DistributedDataParallel)
    assert len(fresh_opt.param_groups) == 2 and fresh[2].weight.requires_grad
    assert bn_policy(fresh[1]) == "stats"  # restored, not left at its construction value
    assert [p.requires_grad for p in fresh.parameters()] == [
        p.requires_grad for p in model.parameters()]
