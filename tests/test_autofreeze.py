"""AutoFreeze: the gradient-norm rule on synthetic norms, and the mechanics of freezing."""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.autofreeze import FreezeStats, GradNormRule, _percentile
from torchfreeze.errors import FreezeStateError, TorchfreezeError
from torchfreeze.norm import bn_policy

from ._models import TinyResNet, tiny_bert

NAMES = ("emb", "l0", "l1", "l2", "head")


def stats(i: int, norms: list[float], frozen: int = 0, names: tuple[str, ...] = NAMES,
          ) -> FreezeStats:
    return FreezeStats(step=10 * i, frozen=frozen, grad_norms=dict(zip(names[frozen:], norms)),
                       groups=names, interval=i, steps_in_interval=10)


# ---------------------------------------------------------------------------
# the rule, on synthetic norms


@pytest.mark.parametrize("q", [10, 25, 50, 75, 90, 100])
def test_percentile_is_numpys(q: float) -> None:
    values = [0.3, 0.01, 0.5, 0.2, 0.7, 0.2]
    assert _percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_rule_rates_are_relative_change_of_the_interval_norm() -> None:
    rule = GradNormRule(warmup=0, patience=1)
    assert rule(stats(1, [4.0, 2.0, 2.0, 2.0, 2.0])) == 0  # no previous interval yet
    assert rule.rates == {}
    rule(stats(2, [3.0, 3.0, 1.0, 2.0, 2.0]))
    assert rule.rates == {"emb": 0.25, "l0": 0.5, "l1": 0.5, "l2": 0.0, "head": 0.0}
    # median of [.25 .5 .5 0 0] is .25; strictly below: l2 and head only, not the prefix
    assert rule.threshold == 0.25


def test_rule_freezes_only_the_leading_run() -> None:
    rule = GradNormRule(warmup=0, patience=1, max_per_decision=5)
    rule(stats(1, [1, 1, 1, 1, 1]))
    # l0 and l1 barely change but emb does: nothing can freeze (prefix only)
    assert rule(stats(2, [2.0, 1.01, 1.01, 1.5, 1.5])) == 0
    # now emb, l0 below the median; l1 is not (it jumped): exactly two freeze
    assert rule(stats(3, [2.0, 1.01, 3.0, 1.0, 1.0])) == 2


def test_rule_patience_needs_consecutive_intervals() -> None:
    rule = GradNormRule(warmup=0, patience=2)
    rule(stats(1, [1, 1, 1, 1, 1]))
    assert rule(stats(2, [1.0, 2, 2, 2, 2])) == 0  # emb below once
    assert rule(stats(3, [2.0, 2, 2, 2, 2])) == 0  # emb jumped: its streak restarts
    assert rule(stats(4, [2.0, 4, 4, 4, 4])) == 0  # below once
    assert rule(stats(5, [2.0, 8, 8, 8, 8])) == 1  # below twice in a row


def test_rule_freezes_at_most_max_per_decision() -> None:
    rule = GradNormRule(warmup=0, patience=1, max_per_decision=1)
    rule(stats(1, [1, 1, 1, 1, 1]))
    # emb and l0 are both below the median (0.2), only emb freezes
    assert rule(stats(2, [1.0, 1.1, 1.2, 3.0, 3.0])) == 1
    # the rule is told one group is frozen now; l0 goes next time
    assert rule(stats(3, [1.1, 1.3, 9.0, 3.0], frozen=1)) == 2


def test_rule_warmup_intervals_freeze_nothing_and_count_nothing() -> None:
    rule = GradNormRule(warmup=3, patience=1)
    rule(stats(1, [1, 1, 1, 1, 1]))
    assert rule(stats(2, [1.0, 2, 2, 2, 2])) == 0
    assert rule(stats(3, [1.0, 4, 4, 4, 4])) == 0
    assert rule.streak == {}
    assert rule(stats(4, [1.0, 8, 8, 8, 8])) == 1


def test_rule_never_freezes_the_head() -> None:
    rule = GradNormRule(warmup=0, patience=1, max_per_decision=10)
    names = ("a", "head")
    rule(stats(1, [1.0, 1.0], names=names))
    assert rule(stats(2, [1.0, 5.0], names=names)) == 1
    # only the head is left: nothing more can freeze, whatever the rates
    assert rule(stats(3, [5.0], frozen=1, names=names)) == 1
    assert rule(stats(4, [5.0], frozen=1, names=names)) == 1


def test_rule_rate_at_the_threshold_is_not_below() -> None:
    rule = GradNormRule(warmup=0, patience=1)
    rule(stats(1, [1, 1, 1, 1, 1]))
    assert rule(stats(2, [2.0, 2, 2, 2, 2])) == 0  # all rates equal: none strictly below


def test_normalized_rule_ignores_the_common_mode() -> None:
    # every group's norm doubles (a harder batch mix): raw rates are all 1.0 and
    # meaningless; shares do not move, so nothing is "changing" and nothing freezes
    raw = GradNormRule(warmup=0, patience=1)
    norm = GradNormRule(warmup=0, patience=1, normalize=True)
    for rule in (raw, norm):
        rule(stats(1, [4.0, 3.0, 2.0, 1.0, 1.0]))
    assert norm(stats(2, [8.0, 6.0, 4.0, 2.0, 2.0])) == 0
    assert norm.rates == pytest.approx(dict.fromkeys(NAMES, 0.0))
    # the early groups keep their share while the late ones reshuffle: raw sees only
    # the common rise (emb changes as much as anything), shares see emb settled
    raw(stats(2, [8.0, 6.0, 4.0, 2.0, 2.0]))
    nxt = stats(3, [16.2, 12.0, 9.0, 3.0, 5.0])
    assert raw(nxt) == 0 and norm(nxt) == 1
    assert "normalize=True" in repr(norm)


def test_normalized_shares_after_a_freeze_use_the_same_groups() -> None:
    rule = GradNormRule(warmup=0, patience=1, normalize=True)
    rule(stats(1, [10.0, 1.0, 1.0, 1.0, 1.0]))
    # emb froze: the others' shares are compared over the four remaining groups only,
    # so dropping emb's large norm from the total moves nothing
    rule(stats(2, [1.0, 1.0, 1.0, 1.0], frozen=1))
    assert rule.rates == pytest.approx({"l0": 0.0, "l1": 0.0, "l2": 0.0, "head": 0.0})


def test_rule_state_round_trips_through_json() -> None:
    rule = GradNormRule(warmup=0, patience=2)
    rule(stats(1, [1.0, 1.3, 1.7, 1.9, 2.1]))
    rule(stats(2, [1.0, 1.1, 1.2, 1.9, 2.5]))
    other = GradNormRule(warmup=0, patience=2)
    other.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    nxt = stats(3, [1.0, 0.7, 0.9, 1.3, 2.2])
    assert rule(nxt) == other(nxt) == 1


@pytest.mark.parametrize("kwargs", [dict(percentile=0), dict(percentile=101),
                                    dict(percentile="50"), dict(patience=0),
                                    dict(warmup=-1), dict(max_per_decision=1.5)])
def test_rule_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(TorchfreezeError):
        GradNormRule(**kwargs)


# ---------------------------------------------------------------------------
# the mechanics, on real architectures


def _bert_batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 100, (n, 12), generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, af: tfz.AutoFreeze | None,
           steps: range, sched=None) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        x, y = _bert_batch(step)
        loss = nn.functional.cross_entropy(model(input_ids=x).logits, y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if af is not None:
            af.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def schedule_policy(every: int):
    """Freeze one more group every ``every`` steps (a fixed schedule through policy=)."""
    return lambda s: s.step // every


def test_policy_freezes_a_prefix_and_never_the_head() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=2, policy=lambda s: 100)
    assert af.groups[0] == "bert.embeddings" and af.groups[-1] == "head"
    _train(model, opt, af, range(2))
    assert af.frozen == list(af.groups[:-1])
    assert [g for _, g in af.events] == af.frozen and {s for s, _ in af.events} == {2}
    head = [p for n, p in model.named_parameters() if "classifier" in n or "pooler" in n]
    assert all(p.requires_grad for p in head)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.e"))


def test_policy_value_is_clamped_never_shrinks() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    answers = iter([2, 1, -5, 3])
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: next(answers))
    _train(model, opt, af, range(4))
    assert af.events == [(1, "bert.embeddings"), (1, "bert.encoder.layer.0"),
                         (4, "bert.encoder.layer.1")]


@pytest.mark.parametrize("bad", [1.5, "2", None, True])
def test_policy_must_return_an_int(bad) -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: bad)
    with pytest.raises(TorchfreezeError, match="must return an int"):
        _train(model, opt, af, range(1))
    assert af.frozen == []


def test_freezing_drops_params_and_frees_optimizer_state() -> None:
    model = tiny_bert()
    named = [{"params": [], "param_names": []}]
    for n, p in model.named_parameters():
        named[0]["params"].append(p)
        named[0]["param_names"].append(n)
    opt = torch.optim.AdamW(named, lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=3, policy=schedule_policy(3))
    _train(model, opt, af, range(2))
    emb = model.bert.embeddings.word_embeddings.weight
    moment = weakref.ref(opt.state[emb]["exp_avg"])
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t))
    _train(model, opt, af, range(2, 3))
    assert af.frozen == ["bert.embeddings"]
    gc.collect()
    assert moment() is None  # the moments are gone, not just unreferenced by the group
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen_names and all(n.startswith("bert.embeddings") for n in frozen_names)
    g = opt.param_groups[0]
    assert not set(frozen_names) & set(g["param_names"])
    assert [id(p) for p in g["params"]] == [
        id(dict(model.named_parameters())[n]) for n in g["param_names"]]
    after = sum(t.numel() * t.element_size() for s in opt.state.values()
                for t in s.values() if torch.is_tensor(t))
    emb_bytes = sum(2 * p.numel() * 4 + 4 for n, p in model.named_parameters()
                    if n in frozen_names)
    assert af.freed_bytes == state_bytes - after == emb_bytes
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen_names)


def test_frozen_group_is_bit_identical_from_its_freeze_step_on() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    af = tfz.AutoFreeze(model, opt, interval=2, policy=schedule_policy(2))
    with tfz.verify(model, strict=True) as report:
        _train(model, opt, af, range(2))
        at_freeze = {n: p.detach().clone() for n, p in model.named_parameters()
                     if n.startswith("bert.embeddings")}
        _train(model, opt, af, range(2, 7))
    assert [s for s, _ in af.events] == [2, 4, 6]
    for n, before in at_freeze.items():
        assert torch.equal(dict(model.named_parameters())[n], before), n
    assert report.ok and len(report.frozen_inside) == 5 + 16 + 16
    assert "bert.embeddings.word_embeddings.weight" in report.frozen_inside


def test_verify_catches_a_change_after_the_freeze_step() -> None:
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: 1)
    with tfz.verify(model) as report:
        _train(model, opt, af, range(2))
        with torch.no_grad():
            model.bert.embeddings.LayerNorm.weight.add_(1.0)  # a bug moves a frozen tensor
    assert not report.ok
    assert report.changed_frozen == ["bert.embeddings.LayerNorm.weight"]


def test_frozen_groups_stay_in_eval_bn_pinned_and_dropout_off() -> None:
    model = TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: 2)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    model(x).sum().backward()
    opt.step()
    af.step()
    assert af.frozen == ["stem", "layer1"]
    model.train()
    assert not model.bn1.training and not model.layer1[1].training
    assert bn_policy(model.bn1) == "eval" and model.layer2[1].training
    stats = model.layer1[1].running_mean.clone()
    model(x).sum().backward()
    assert torch.equal(model.layer1[1].running_mean, stats)

    bert = tiny_bert()
    opt = torch.optim.SGD(bert.parameters(), lr=0.1)
    af = tfz.AutoFreeze(bert, opt, interval=1, policy=lambda s: 1)
    _train(bert, opt, af, range(1))
    bert.train()
    assert not bert.bert.embeddings.dropout.training
    assert bert.bert.encoder.layer[0].attention.self.dropout.training
    x, _ = _bert_batch(0)
    with torch.no_grad():
        a = bert.bert.embeddings(input_ids=x)
        b = bert.bert.embeddings(input_ids=x)
    assert torch.equal(a, b)  # the frozen prefix is deterministic now


def test_pin_eval_false_keeps_dropout_active() -> None:
    bert = tiny_bert()
    opt = torch.optim.SGD(bert.parameters(), lr=0.1)
    af = tfz.AutoFreeze(bert, opt, interval=1, policy=lambda s: 1, pin_eval=False)
    _train(bert, opt, af, range(1))
    bert.train()
    assert bert.bert.embeddings.dropout.training


@pytest.mark.parametrize("kind", ["lambda", "onecycle"])
def test_lr_schedule_of_remaining_params_is_unchanged(kind: str) -> None:
    def build():
        torch.manual_seed(0)
        model = tiny_bert()
        opt = torch.optim.AdamW([
            {"params": list(model.bert.embeddings.parameters()), "lr": 1e-3},
            {"params": list(model.bert.encoder.parameters()), "lr": 2e-3},
            {"params": list(model.bert.pooler.parameters()) + list(
                model.classifier.parameters()), "lr": 5e-3},
        ])
        if kind == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 2e-3, 5e-3],
                                                        total_steps=20)
        return model, opt, sched

    model, opt, sched = build()
    af = tfz.AutoFreeze(model, opt, interval=2, policy=schedule_policy(2), scheduler=sched)
    ref_model, ref_opt, ref_sched = build()
    lrs, ref_lrs = [], []
    for step in range(8):
        _train(model, opt, af, range(step, step + 1), sched)
        _train(ref_model, ref_opt, None, range(step, step + 1), ref_sched)
        lrs.append([g["lr"] for g in opt.param_groups])
        ref_lrs.append([g["lr"] for g in ref_opt.param_groups])
    assert lrs == ref_lrs
    assert len(af.frozen) == 4 and opt.param_groups[0]["params"] == []
    diagnosis = tfz.check(model, opt, sched)
    assert not diagnosis.errors and "scheduler-mismatch" not in diagnosis


def test_scheduler_of_another_optimizer_is_refused() -> None:
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(other, 1)
    with pytest.raises(TorchfreezeError, match="does not drive this optimizer"):
        tfz.AutoFreeze(model, opt, scheduler=sched)


def test_check_finds_nothing_wrong_after_freezing() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: 2)
    _train(model, opt, af, range(1))
    x, y = _bert_batch(5)
    nn.functional.cross_entropy(model(input_ids=x).logits, y).backward()
    diagnosis = tfz.check(model, opt)
    assert not diagnosis.errors and not diagnosis.warnings, str(diagnosis)


def test_no_host_sync_between_decisions(monkeypatch) -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=5)
    _train(model, opt, af, range(1))  # first step builds the accumulator
    syncs = []
    for meth in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _name=meth, **k):
            syncs.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, spy)
    for step in range(1, 4):
        x, y = _bert_batch(step)
        nn.functional.cross_entropy(model(input_ids=x).logits, y).backward()
        opt.step()
        syncs.clear()
        af.step()
        assert syncs == [], syncs
        opt.zero_grad()
    x, y = _bert_batch(4)
    nn.functional.cross_entropy(model(input_ids=x).logits, y).backward()
    opt.step()
    syncs.clear()
    af.step()  # step 5 ends the interval: the norms are read once
    assert syncs == ["tolist"]


def test_accumulated_norm_is_the_sum_of_per_step_group_norms() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[FreezeStats] = []
    af = tfz.AutoFreeze(model, opt, interval=2, policy=lambda s: seen.append(s) or 0)
    expected = {"0": 0.0, "1": 0.0, "2": 0.0}
    for step in range(2):
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).sum().backward()
        for name in expected:
            grads = [p.grad for p in model.get_submodule(name).parameters()]
            expected[name] += math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        opt.step()
        af.step()
        opt.zero_grad()
    assert seen[0].grad_norms == pytest.approx(expected, rel=1e-5)
    assert seen[0].steps_in_interval == 2 and seen[0].frozen == 0


def test_monitor_only_policy_freezes_nothing_and_keeps_history() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=2, policy=lambda s: 0)
    _train(model, opt, af, range(6))
    assert af.frozen == [] and len(af.history) == 3
    assert set(af.history[-1].grad_norms) == set(af.groups)
    assert "step 6" in str(af.history[-1])


def test_step_after_zero_grad_warns() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=2)
    with pytest.warns(UserWarning, match="before optimizer.zero_grad"):
        af.step()


def test_keys_is_a_no_op_without_cache() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt)
    x, _ = _bert_batch(0)
    with af.keys(torch.arange(8)):
        out = model(input_ids=x)
    assert out.logits.shape == (8, 3)


def test_layers_as_selectors_and_bad_layers() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    af = tfz.AutoFreeze(model, opt, layers=["bert.embeddings", "bert.encoder",
                                            ["bert.pooler", "classifier"]])
    assert af.groups == ("bert.embeddings", "bert.encoder", "group2")
    with pytest.raises(TorchfreezeError, match="exactly one group"):
        tfz.AutoFreeze(model, opt, layers=["bert", "classifier", "bert.pooler"])
    with pytest.raises(TorchfreezeError, match="at least two layer groups"):
        tfz.AutoFreeze(model, opt, layers=["bert"])
    with pytest.raises(tfz.SelectionError, match="bert.encoder"):
        tfz.AutoFreeze(model, opt, layers=["bert.encodr", "classifier"])
    with pytest.raises(TorchfreezeError, match="interval"):
        tfz.AutoFreeze(model, opt, interval=0)
    with pytest.raises(TorchfreezeError, match="policy"):
        tfz.AutoFreeze(model, opt, policy="freezeout")  # type: ignore[arg-type]


def test_groups_frozen_before_start_count_as_the_prefix() -> None:
    model = tiny_bert()
    tfz.freeze(model, "bert.embeddings")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    af = tfz.AutoFreeze(model, opt, interval=1, policy=lambda s: s.frozen + 1)
    assert af.frozen == ["bert.embeddings"] and af.events == []
    _train(model, opt, af, range(1))
    assert af.frozen == ["bert.embeddings", "bert.encoder.layer.0"]


# ---------------------------------------------------------------------------
# resume


def _build(policy="gradnorm"):
    torch.manual_seed(0)
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 40)
    kwargs = {"policy": policy} if policy != "gradnorm" else {"warmup": 0, "patience": 1}
    af = tfz.AutoFreeze(model, opt, interval=3, scheduler=sched, **kwargs)
    return model, opt, sched, af


@pytest.mark.parametrize("policy", ["gradnorm", "schedule"])
def test_resume_is_bit_identical(policy: str) -> None:
    pol = "gradnorm" if policy == "gradnorm" else schedule_policy(4)
    model, opt, sched, af = _build(pol)
    full_losses = _train(model, opt, af, range(20), sched)
    full_events, full_state = list(af.events), model.state_dict()
    assert len(full_events) >= 2, af.history

    model, opt, sched, af = _build(pol)
    losses = _train(model, opt, af, range(10), sched)  # 10: in the middle of an interval
    ckpt = json.loads(json.dumps(af.state_dict()))  # the state is JSON-able
    ckpt = {"af": ckpt, "opt": opt.state_dict(), "sched": sched.state_dict(),
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "rng": torch.get_rng_state()}  # dropout in the trainable part
    events_before = list(af.events)
    assert events_before and len(events_before) < len(full_events)

    model2, opt2, sched2, af2 = _build(pol)
    af2.load_state_dict(ckpt["af"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    model2.load_state_dict(ckpt["model"])
    torch.set_rng_state(ckpt["rng"])
    assert af2.events == events_before and af2.frozen == af.frozen
    losses += _train(model2, opt2, af2, range(10, 20), sched2)

    assert losses == full_losses
    assert af2.events == full_events
    for (n, a), (_, b) in zip(model2.state_dict().items(), full_state.items()):
        assert torch.equal(a, b), n


def test_load_state_dict_refuses_mismatches() -> None:
    model, opt, sched, af = _build(schedule_policy(3))
    _train(model, opt, af, range(3), sched)
    state = af.state_dict()
    with pytest.raises(FreezeStateError, match="freshly built"):
        af.load_state_dict(state)
    _, _, _, fresh = _build()
    with pytest.raises(FreezeStateError, match="format"):
        fresh.load_state_dict({"frozen": 1})
    bad = dict(state, groups=["a", "b"])
    with pytest.raises(FreezeStateError, match="same model"):
        fresh.load_state_dict(bad)
    with pytest.raises(FreezeStateError, match="interval"):
        fresh.load_state_dict(dict(state, interval=7))
    assert fresh.frozen == [] and fresh.steps == 0


# ---------------------------------------------------------------------------
# cache=True


DATA = _bert_batch(99, n=24)


def _epochs(model, opt, af, steps: int, *, batch: int = 8) -> list[float]:
    x, y = DATA
    losses = []
    for step in range(steps):
        model.train()
        ids = torch.arange(step * batch, (step + 1) * batch) % len(y)
        with af.keys(ids):
            loss = nn.functional.cross_entropy(model(input_ids=x[ids]).logits, y[ids])
        loss.backward()
        opt.step()
        af.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("policy", ["gradnorm", "schedule"])
def test_cache_gives_the_same_decisions_and_losses(policy: str) -> None:
    runs = []
    for cache in (False, True):
        torch.manual_seed(0)
        model = tiny_bert()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        kw = ({"policy": schedule_policy(3)} if policy == "schedule"
              else {"warmup": 0, "patience": 1})
        af = tfz.AutoFreeze(model, opt, interval=3, cache=cache, **kw)
        losses = _epochs(model, opt, af, 18)
        runs.append((losses, list(af.events), model.state_dict(), af))
    (l0, e0, s0, _), (l1, e1, s1, af) = runs
    assert len(e0) >= 2 and e0 == e1
    assert l0 == pytest.approx(l1, abs=1e-5)
    for name, t in s0.items():
        torch.testing.assert_close(s1[name], t, atol=1e-5, rtol=1e-5)
    assert af.caches and af.cache_hits > 0 and af.cache_misses > 0
    af.close()


def test_cache_old_prefix_never_runs_again() -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    answers = {3: 1, 9: 2}  # embeddings frozen after step 3, layer 0 after step 9
    af = tfz.AutoFreeze(model, opt, interval=3, cache=True,
                        policy=lambda s: answers.get(s.step, s.frozen))
    calls: list[str] = []
    model.bert.embeddings.word_embeddings.register_forward_hook(lambda *a: calls.append("emb"))
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda *a: calls.append("l0"))
    _epochs(model, opt, af, 9)  # 3 batches per epoch: epochs 2 and 3 run with emb cached
    assert calls.count("emb") == 3 + 3  # epoch 1, and epoch 2 filling the cache
    calls.clear()
    _epochs(model, opt, af, 3)  # layer 0 frozen now: its outputs are computed once...
    assert calls == ["l0"] * 3  # ...from the embeddings' stored rows
    assert [c.upto for c in af.caches] == ["bert.encoder.layer.0"]  # old cache retired
    calls.clear()
    _epochs(model, opt, af, 3)
    assert calls == []
    model.train()
    assert not model.bert.embeddings.dropout.training  # still pinned after the old cache closed
    af.close()
    assert af.caches == []


def test_demo_auto_freeze_strategy_wires_autofreeze_into_the_shared_loop() -> None:
    from torchfreeze import demo_news as dn

    strategy = dn.STRATEGIES["auto-freeze"]
    model = tiny_bert(num_labels=5)
    setup = strategy.build(model, dn.QUICK)
    assert setup.verify and setup.keys is not None and setup.after_step is not None
    # the full fine-tune's optimizer: body and head groups, every parameter in one
    assert len(setup.optimizer.param_groups) == 2
    assert sum(len(g["params"]) for g in setup.optimizer.param_groups) == len(
        list(model.parameters()))
    x, y = _bert_batch(0)
    for _ in range(4):
        with setup.keys(torch.arange(8)):
            loss = nn.functional.cross_entropy(model(input_ids=x).logits, y % 5)
        loss.backward()
        setup.optimizer.step()
        setup.after_step()
        setup.optimizer.zero_grad()
    setup.close()
    info = setup.info["auto_freeze"]
    per_epoch = dn._steps_per_epoch(dn.QUICK)
    assert info["interval"] == max(2, per_epoch // 4)
    assert info["events"] == []  # gradnorm: 4 steps are too early to freeze anything
    policy = dn.freezeout_policy(dn.QUICK)  # linear from half-way to the end
    total = per_epoch * dn.QUICK.epochs
    groups = tuple("abcdefgh")
    at = [policy(FreezeStats(step=t, frozen=0, grad_norms={}, groups=groups, interval=1,
                             steps_in_interval=1)) for t in (total // 2, 3 * total // 4, total)]
    assert at == [0, 3, 7]
