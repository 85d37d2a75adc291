"""Small real architectures for tests (random weights, built from configs, no download)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert(num_layers: int = 4, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                     num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def tiny_vit(num_layers: int = 3) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                    intermediate_size=64, image_size=16, patch_size=4, num_labels=3)
    return ViTForImageClassification(cfg)


def tiny_hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 2, 1],
                       num_labels=3)
    return ResNetForImageClassification(cfg)


def tiny_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 2, 1], num_labels=3)
    return ConvNextForImageClassification(cfg)


class TinyResNet(nn.Module):
    """torchvision-ResNet-shaped: conv1/bn1 stem, layer1..layer4, fc (freeze the backbone)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_net() -> nn.Sequential:
    """stem (conv+BN) -> block (conv+BN) -> head."""
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                         nn.ReLU()))
    net.add_module("block", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                          nn.ReLU()))
    net.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    return net


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned (for bit-for-bit comparisons)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    """Names of state_dict entries that are not bit-identical to ``before``."""
    now = model.state_dict(keep_vars=True)
    return {k for k, v in before.items() if not torch.equal(v, now[k].detach())}
