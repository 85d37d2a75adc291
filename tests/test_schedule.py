"""GradualUnfreeze (milestones, BN, resume bit for bit) and fine_tune_schedule."""

from __future__ import annotations

import doctest
import io
import json

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import torchfreeze as tfz
from torchfreeze.errors import FreezeStateError, SchedulerError, SelectionError, TorchfreezeError

from ._models import TinyResNet, snapshot, tiny_bert


class Net(nn.Module):
    """Stem, two BN blocks and a head: enough to exercise BN policies and groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


SCHEDULE = {2: "block", 4: "stem"}


def build(kind: str = "cosine"):
    torch.manual_seed(1)
    model = Net()
    tfz.freeze(model)
    tfz.unfreeze(model, "head")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=1e-2, weight_decay=0.01))
    if kind == "cosine":
        sched = lrs.CosineAnnealingLR(opt, T_max=6 * 4)
    elif kind == "onecycle":
        sched = lrs.OneCycleLR(opt, max_lr=1e-2, total_steps=6 * 4)
    else:
        sched = lrs.LambdaLR(opt, lambda s: 0.95**s)
    gu = tfz.GradualUnfreeze(model, opt, SCHEDULE, lr_mult=0.1, scheduler=sched,
                             no_decay=("bias", "norm"))
    return model, opt, sched, gu


def train_epochs(model, opt, sched, gu, epochs: range) -> None:
    for epoch in epochs:
        gu.step(epoch)
        model.train()
        gen = torch.Generator().manual_seed(100 + epoch)  # data depends on the epoch only
        for _ in range(4):
            x = torch.randn(8, 6, generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            for g in opt.param_groups:  # no frozen tensor ever in a group
                assert all(p.requires_grad for p in g["params"])


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "lambda"])
def test_resume_3_plus_3_is_bit_identical_to_6(kind: str) -> None:
    model_a, opt_a, sched_a, gu_a = build(kind)
    train_epochs(model_a, opt_a, sched_a, gu_a, range(6))

    model_b, opt_b, sched_b, gu_b = build(kind)
    train_epochs(model_b, opt_b, sched_b, gu_b, range(3))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict(),
                "scheduler": sched_b.state_dict(), "unfreeze": gu_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model_c, opt_c, sched_c, gu_c = build(kind)  # fresh, as at the start
    gu_c.load_state_dict(ckpt["unfreeze"])
    opt_c.load_state_dict(ckpt["optimizer"])
    sched_c.load_state_dict(ckpt["scheduler"])
    model_c.load_state_dict(ckpt["model"])
    assert [p.requires_grad for p in model_c.parameters()] == [
        p.requires_grad for p in model_b.parameters()]
    assert [g["name"] for g in opt_c.param_groups] == [g["name"] for g in opt_b.param_groups]
    model_c.train()
    assert not model_c.stem[1].training  # still frozen with bn="eval": pinned
    train_epochs(model_c, opt_c, sched_c, gu_c, range(3, 6))

    a, c = snapshot(model_a), snapshot(model_c)
    assert a.keys() == c.keys()
    assert [k for k in a if not torch.equal(a[k], c[k])] == []
    assert [p.requires_grad for p in model_c.parameters()] == [
        p.requires_grad for p in model_a.parameters()]
    assert all(p.requires_grad for p in model_c.parameters())
    assert [g["lr"] for g in opt_c.param_groups] == [g["lr"] for g in opt_a.param_groups]
    assert gu_c.applied == [2, 4] and gu_c.epoch == 5


def test_step_is_idempotent_and_jumping_ahead_applies_missed_milestones() -> None:
    model, opt, sched, gu = build()
    assert not any(p.requires_grad for p in model.block.parameters())
    assert gu.step(0) == [] and gu.step(1) == []
    assert gu.step(5) == [2, 4]
    assert gu.step(5) == [] and gu.step(3) == []
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups][-4:] == [
        ("unfreeze@2", 0.01), ("unfreeze@2/no_decay", 0.0),  # biases and BN: no decay
        ("unfreeze@4", 0.01), ("unfreeze@4/no_decay", 0.0)]
    assert len(opt.param_groups) == len(sched.base_lrs) == len(sched.get_last_lr())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_bn_of_a_pending_selection_stays_in_eval_until_its_epoch() -> None:
    model = TinyResNet()
    tfz.freeze(model, exclude="fc")
    opt = torch.optim.SGD(tfz.param_groups(model, lr=0.1), momentum=0.9)
    gu = tfz.GradualUnfreeze(model, opt, {1: "layer4"}, lr_mult=0.1)
    bn = model.layer4[1]
    before = bn.running_mean.clone()
    model.train()
    model(torch.randn(2, 3, 8, 8))
    assert not bn.training and torch.equal(bn.running_mean, before)
    gu.step(1)
    model.train()
    assert bn.training and bn.weight.requires_grad


def test_bad_selector_or_scheduler_fails_at_construction_without_changes() -> None:
    model = Net()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    match = r"schedule\[3\].*'blok' matched nothing.*block"
    with pytest.raises(SelectionError, match=match) as err:
        tfz.GradualUnfreeze(model, opt, {1: "stem", 3: "blok"})
    assert err.value.suggestions[0] == "block"
    assert all(p.requires_grad for p in model.parameters())

    class Custom(lrs.LRScheduler):
        def get_lr(self):
            return [g["lr"] for g in self.optimizer.param_groups]

    with pytest.raises(SchedulerError, match="Custom"):
        tfz.GradualUnfreeze(model, opt, {1: "stem"}, scheduler=Custom(opt))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TorchfreezeError, match="not an epoch"):
        tfz.GradualUnfreeze(model, opt, {-1: "stem"})
    with pytest.raises(TorchfreezeError, match="both lr"):
        tfz.GradualUnfreeze(model, opt, {1: "stem"}, lr=0.1, lr_mult=0.1)
    assert len(opt.param_groups) == 1 and all(p.requires_grad for p in model.parameters())


def test_state_dict_is_json_and_load_checks_before_changing() -> None:
    _model, opt, _sched, gu = build()
    gu.step(2)
    state = gu.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["groups"] == [
        {"epoch": 2, "name": "unfreeze@2", "param_names": ["block.0.weight"]},
        {"epoch": 2, "name": "unfreeze@2/no_decay", "options": {"weight_decay": 0.0},
         "param_names": ["block.0.bias", "block.1.weight", "block.1.bias"]},
    ]
    with pytest.raises(TorchfreezeError, match="freshly built GradualUnfreeze"):
        gu.load_state_dict(state)

    model2, opt2, sched2, gu2 = build()
    flags = [p.requires_grad for p in model2.parameters()]
    bad = dict(state, groups=[dict(state["groups"][0], param_names=["block.9.weight"])])
    with pytest.raises(FreezeStateError, match="block.9.weight"):
        gu2.load_state_dict(bad)
    with pytest.raises(FreezeStateError, match="milestones"):
        gu2.load_state_dict(dict(state, milestones=[1]))
    with pytest.raises(FreezeStateError, match="GradualUnfreeze.state_dict"):
        gu2.load_state_dict({"frozen": []})
    assert [p.requires_grad for p in model2.parameters()] == flags
    assert len(opt2.param_groups) == 2 and len(sched2.base_lrs) == 2  # decay + no_decay
    # optimizer state loaded first: its group count is refused by torch, loudly
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt2.load_state_dict(opt.state_dict())


def test_fine_tune_schedule_head_first_then_discriminative() -> None:
    model = tiny_bert(num_layers=2)
    ft = tfz.fine_tune_schedule(model, lr=1e-4, head_epochs=2, weight_decay=0.01,
                                scheduler=lambda o: lrs.CosineAnnealingLR(o, T_max=20))
    head = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
            "classifier.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    assert {g["lr"] for g in ft.optimizer.param_groups} == {1e-3}  # 10x for the head
    ids = torch.randint(0, 100, (4, 8))
    labels = torch.tensor([0, 1, 2, 0])
    body_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in head}
    for epoch in range(4):
        ft.unfreezer.step(epoch)
        model(input_ids=ids, labels=labels).loss.backward()
        ft.optimizer.step()
        ft.optimizer.zero_grad()
        ft.scheduler.step()
        moved = [n for n, p in model.named_parameters()
                 if n in body_before and not torch.equal(body_before[n], p.detach())]
        assert (moved == []) == (epoch < 2), epoch
    groups = ft.optimizer.param_groups
    assert [(g["name"], g["initial_lr"], g["weight_decay"]) for g in groups[-2:]] == [
        ("unfreeze@2", 1e-4, 0.01), ("unfreeze@2/no_decay", 1e-4, 0.0)]
    assert groups[0]["lr"] / groups[-1]["lr"] == pytest.approx(10.0)
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in groups[-1]["param_names"]
    assert len(groups) == len(ft.scheduler.base_lrs)


def test_fine_tune_schedule_explicit_head_and_failure_leaves_model_as_is() -> None:
    model = TinyResNet()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(SelectionError, match="'fcc' matched nothing"):
        tfz.fine_tune_schedule(model, lr=1e-3, head="fcc")
    with pytest.raises(TypeError):
        tfz.fine_tune_schedule(model, lr=1e-3, head="fc", momentum="x",
                               optimizer=torch.optim.SGD)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training for m in model.modules())
    opt, sched, gu = tfz.fine_tune_schedule(model, lr=1e-3, head="fc", head_epochs=0,
                                            optimizer=torch.optim.SGD, momentum=0.9)
    assert sched is None and [g["lr"] for g in opt.param_groups] == [1e-2]
    assert gu.step(0) == [0] and all(p.requires_grad for p in model.parameters())
    assert opt.param_groups[-1]["lr"] == 1e-3 and opt.param_groups[-1]["momentum"] == 0.9


def test_doctests() -> None:
    import torchfreeze.schedule

    result = doctest.testmod(torchfreeze.schedule)
    assert result.attempted > 0 and result.failed == 0


def test_later_milestone_already_in_the_optimizer_is_reported() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # everything, block included
    with pytest.warns(UserWarning, match=r"schedule\[2\] selects 4 parameters that are already"):
        gu = tfz.GradualUnfreeze(model, opt, {0: "head", 2: "block"}, lr_mult=0.1)
    assert not model.block[0].weight.requires_grad
    gu.step(2)
    assert model.block[0].weight.requires_grad and len(opt.param_groups) == 1


def test_one_group_per_milestone_by_default() -> None:
    model = Net()
    tfz.freeze(model, exclude="head")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=1e-2, weight_decay=0.1))
    gu = tfz.GradualUnfreeze(model, opt, {1: "block"}, lr_mult=0.1)
    gu.step(1)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups][-1:] == [
        ("unfreeze@1", 0.1)]
    assert opt.param_groups[-1]["param_names"] == [
        "block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias"]
