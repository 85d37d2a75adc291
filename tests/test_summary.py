from __future__ import annotations

import torch

import torchfreeze as tfz

from ._models import TinyResNet, tiny_bert


def test_summary_counts_and_headline() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    tfz.unfreeze(model, "fc")
    s = tfz.summary(model)
    fc = sum(p.numel() for p in model.fc.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert (s.trainable, s.total, s.frozen) == (fc, total, total - fc)
    assert s.headline == f"trainable {fc} / {tfz._report.fmt_count(total)} " \
                         f"({100 * fc / total:.1f}%)"
    rows = {r.name: r for r in s.rows}
    assert rows["fc"].trainable == fc and rows["layer1"].frozen > 0
    assert rows["layer1"].bn == "1 eval (pinned)"
    text = str(s)
    assert "layer1" in text and "eval (pinned)" in text and "\x1b[" not in text


def test_summary_with_optimizer_groups() -> None:
    model = tiny_bert(num_layers=2)
    tfz.freeze(model, "bert.embeddings")
    groups = [
        {"params": list(model.bert.encoder.parameters()), "lr": 1e-4, "name": "encoder"},
        {"params": list(model.classifier.parameters()), "lr": 1e-3, "name": "head",
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    s = tfz.summary(model, opt)
    assert s.num_groups == 2 and s.headline.endswith(", 2 groups")
    rows = {r.name: r for r in s.rows}
    assert rows["bert.encoder.layer.0"].groups == ("encoder",)
    assert rows["bert.encoder.layer.0"].lr == (1e-4,)
    assert rows["head"].groups == ("head",) and rows["head"].weight_decay == (0.0,)
    assert s.not_in_optimizer == 2  # the pooler is trainable but in no group
    assert "in no optimizer group" in str(s)
    d = s.to_dict()
    assert d["trainable"] == s.trainable and d["rows"][0]["name"] == "bert.embeddings"


def test_summary_by_depth() -> None:
    s = tfz.summary(tiny_bert(num_layers=2), depth=2)
    assert [r.name for r in s.rows] == ["bert.embeddings", "bert.encoder", "bert.pooler",
                                        "classifier"]


def test_summary_refuses_a_non_optimizer_clearly() -> None:
    import pytest
    import torch.nn as nn

    import torchfreeze as tfz

    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(tfz.TorchfreezeError, match=r"optimizer must be a torch optimizer.*int"):
        tfz.summary(net, 1)  # type: ignore[arg-type]
