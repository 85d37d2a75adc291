"""A tiny Hugging Face Trainer job shared by the Trainer-callback tests (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_classifier() -> Any:
    """A 4-layer BertForSequenceClassification with 2 labels, seeded (same weights each call)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=16,
                     num_labels=2)
    return BertForSequenceClassification(cfg)


class TokenData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """n random 8-token sequences with binary labels (fixed seed)."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 100, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}


def training_args(out: Path, **kw: Any) -> Any:
    """TrainingArguments for 2 CPU epochs of batch 4, a checkpoint every 2 steps."""
    from transformers import TrainingArguments

    base = {
        "output_dir": str(out), "num_train_epochs": 2, "per_device_train_batch_size": 4,
        "learning_rate": 1e-3, "weight_decay": 0.1, "report_to": "none", "use_cpu": True,
        "save_strategy": "steps", "save_steps": 2, "logging_strategy": "no",
        "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)
