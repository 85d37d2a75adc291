"""unfreeze(optimizer=, scheduler=): a new named group that follows the LR schedule."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import torchfreeze as tfz
from torchfreeze._optim import prepare_new_group
from torchfreeze.errors import SchedulerError, TorchfreezeError


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _setup(opt_cls=torch.optim.SGD, **kw) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = _net()
    tfz.freeze(net, "0")
    opt = opt_cls(tfz.param_groups(net, lr=0.1), **kw)
    return net, opt


def _train_step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(6, 4)
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=10),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=12),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 0.8**e),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=3), lrs.ExponentialLR(o, 0.9)],
        milestones=[3]),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=4), lrs.ExponentialLR(o, 0.9)]),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_new_group_follows_the_schedule(kind: str) -> None:
    net, opt = _setup(torch.optim.SGD, momentum=0.9)
    sched = SCHEDULERS[kind](opt)
    for _ in range(3):
        _train_step(net, opt)
        sched.step()
    lr0_now = opt.param_groups[0]["lr"]
    tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.1, scheduler=sched)
    assert len(opt.param_groups) == 2
    new = opt.param_groups[1]
    assert new["name"] == "unfreeze:0" and new["param_names"] == ["0.weight", "0.bias"]
    assert new["lr"] == pytest.approx(0.1 * lr0_now, rel=1e-12)  # joins where the schedule is
    seen = []
    for _ in range(6):
        _train_step(net, opt)
        sched.step()
        g0, g1 = opt.param_groups
        assert g1["lr"] == pytest.approx(0.1 * g0["lr"], rel=1e-9)
        assert sched.get_last_lr()[1] == pytest.approx(g1["lr"], rel=1e-12)
        seen.append(g1["lr"])
    assert len(set(seen)) > 1  # it moved with the schedule
    # the extended scheduler round-trips through its state_dict
    clone = SCHEDULERS[kind](copy.deepcopy(opt))
    clone.load_state_dict(sched.state_dict())


def test_reduce_lr_on_plateau_reduces_the_new_group_too() -> None:
    net, opt = _setup(torch.optim.SGD)
    sched = lrs.ReduceLROnPlateau(opt, patience=0, factor=0.5, min_lr=[1e-4])
    sched.step(1.0)
    tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.1, scheduler=sched)
    assert sched.min_lrs == [1e-4, 1e-4]
    lrs_new = []
    for loss in (2.0, 3.0, 4.0):  # worse every time: reduce each step
        sched.step(loss)
        lrs_new.append(opt.param_groups[1]["lr"])
    assert lrs_new == pytest.approx([0.005, 0.0025, 0.00125])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_absolute_lr_is_the_base_exactly() -> None:
    net, opt = _setup()
    sched = lrs.CosineAnnealingLR(opt, T_max=10)
    tfz.unfreeze(net, "0", optimizer=opt, lr=0.03, scheduler=sched)
    assert sched.base_lrs == [0.1, 0.03]
    assert opt.param_groups[1]["initial_lr"] == 0.03 and opt.param_groups[1]["lr"] == 0.03


def test_onecycle_group_keys_are_scaled() -> None:
    net, opt = _setup(torch.optim.AdamW)
    sched = lrs.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.5, scheduler=sched)
    g0, g1 = opt.param_groups
    for key in ("initial_lr", "max_lr", "min_lr"):
        assert g1[key] == pytest.approx(0.5 * g0[key])
    assert g1["betas"] == g0["betas"] and g1["max_momentum"] == g0["max_momentum"]


class HomeMadeLR(lrs.LRScheduler):
    def get_lr(self) -> list[float]:
        return [g["lr"] * 0.5 for g in self.optimizer.param_groups]


def _state(net: nn.Module, opt: torch.optim.Optimizer, sched: object) -> tuple:
    return (
        [p.requires_grad for p in net.parameters()],
        len(opt.param_groups),
        [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups],
        copy.deepcopy(sched.state_dict()),
    )


def test_unsupported_scheduler_raises_before_any_change() -> None:
    net, opt = _setup()
    sched = HomeMadeLR(opt)
    before = _state(net, opt, sched)
    with pytest.raises(SchedulerError, match="HomeMadeLR.*does not know how to extend.*Supported"):
        tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.1, scheduler=sched)
    assert _state(net, opt, sched) == before


def test_scheduler_of_another_optimizer_or_out_of_sync_raises() -> None:
    net, opt = _setup()
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(SchedulerError, match="does not drive this optimizer"):
        tfz.unfreeze(net, "0", optimizer=opt, scheduler=lrs.StepLR(other, 1))
    sched = lrs.StepLR(opt, 1)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "param_names": ["x"]})
    with pytest.raises(SchedulerError, match="base_lrs has 1 entries but the optimizer has 2"):
        tfz.unfreeze(net, "0", optimizer=opt, scheduler=sched)
    assert not net[0].weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.1, "lr_mult": 0.1}, "both lr=0.1 and lr_mult=0.1"),
        ({"lr": float("nan")}, "not a finite number"),
        ({"lr_mult": -2}, "must be >= 0"),
    ],
)
def test_bad_lr_leaves_everything_unchanged(kwargs: dict, match: str) -> None:
    net, opt = _setup()
    sched = lrs.StepLR(opt, 1)
    before = _state(net, opt, sched)
    with pytest.raises(TorchfreezeError, match=match):
        tfz.unfreeze(net, "0", optimizer=opt, scheduler=sched, **kwargs)
    assert _state(net, opt, sched) == before


def test_momenta_are_kept_and_params_never_duplicated() -> None:
    net, opt = _setup(torch.optim.AdamW)
    _train_step(net, opt)
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net[2].parameters()}
    # 2.* is already in the optimizer: unfreezing it with 0 adds 0 only
    tfz.unfreeze(net, "0", "2", optimizer=opt, lr_mult=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["2.weight", "2.bias"], ["0.weight", "0.bias"]]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    for p in net[2].parameters():
        assert all(torch.equal(state[id(p)][k], v) for k, v in opt.state[p].items())
    # nothing new: commit adds nothing
    n = len(opt.param_groups)
    tfz.unfreeze(net, "0", optimizer=opt)
    assert len(opt.param_groups) == n


def test_first_group_supplies_other_hyper_parameters() -> None:
    net, opt = _setup(torch.optim.SGD, momentum=0.9, nesterov=True, weight_decay=0.01)
    tfz.unfreeze(net, "0", optimizer=opt, lr=0.5, group_name="backbone")
    g = opt.param_groups[1]
    assert (g["name"], g["lr"], g["momentum"], g["nesterov"]) == ("backbone", 0.5, 0.9, True)
    assert g["weight_decay"] == opt.param_groups[0]["weight_decay"]


def test_unnamed_optimizer_gets_an_unnamed_group() -> None:
    net = _net()
    tfz.freeze(net, "0")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    tfz.unfreeze(net, "0", optimizer=opt)  # torch refuses mixing named and unnamed groups
    assert "param_names" not in opt.param_groups[1] and opt.param_groups[1]["name"] == "unfreeze:0"


def test_scheduled_optimizer_without_scheduler_warns() -> None:
    net, opt = _setup()
    lrs.StepLR(opt, 1)
    with pytest.warns(UserWarning, match="carry 'initial_lr'.*Pass scheduler="):
        tfz.unfreeze(net, "0", optimizer=opt)


def test_prepare_validates_options() -> None:
    net, opt = _setup()
    with pytest.raises(TorchfreezeError, match="'requires_grad' in a param group is silently"):
        prepare_new_group(opt, list(net[0].parameters()), ["0.weight", "0.bias"], name="x",
                          options={"requires_grad": False})
    with pytest.raises(TorchfreezeError, match="2 parameters but 1 names"):
        prepare_new_group(opt, list(net[0].parameters()), ["0.weight"], name="x")
    assert len(opt.param_groups) == 1


def test_hugging_face_warmup_schedule_and_a_list_of_schedulers() -> None:
    from transformers import get_linear_schedule_with_warmup

    net, opt = _setup(torch.optim.AdamW)
    warmup = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    step = lrs.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(3):
        _train_step(net, opt)
        warmup.step()
    tfz.unfreeze(net, "0", optimizer=opt, lr_mult=0.5, scheduler=[warmup, step])
    assert warmup.base_lrs == step.base_lrs == [0.1, 0.05]
    for _ in range(3):
        _train_step(net, opt)
        warmup.step()
        step.step()
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
