from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import FreezeStateError, SelectionError, TorchfreezeError

from ._models import (
    TinyResNet,
    changed,
    snapshot,
    tiny_bert,
    tiny_convnext,
    tiny_hf_resnet,
    tiny_vit,
)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 3,
                opt: torch.optim.Optimizer | None = None) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def images(n: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 8, 8), torch.randint(0, classes, (n,))


def test_freeze_all_train_fc_only_changes_fc() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    tfz.unfreeze(model, "fc")
    before = snapshot(model)
    train_steps(model, *images())
    # BN running stats of the frozen part included: only the head moved
    assert changed(before, model) == {"fc.weight", "fc.bias"}


def test_middle_layer_frozen_others_train() -> None:
    model = nn.Sequential()
    for i, (a, b) in enumerate([(4, 8), (8, 8), (8, 2)]):
        model.add_module(f"lin{i}", nn.Linear(a, b))
    tfz.freeze(model, "lin1")
    before = snapshot(model)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    train_steps(model, x, y)
    assert changed(before, model) == {"lin0.weight", "lin0.bias", "lin2.weight", "lin2.bias"}


def test_raw_parameter_attribute_frozen_alone() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x * self.weight)

    model = Scale()
    sel = tfz.freeze(model, "weight")
    assert sel.param_names == ("weight",)
    before = snapshot(model)
    train_steps(model, torch.randn(8, 4), torch.randint(0, 2, (8,)))
    assert changed(before, model) == {"lin.weight", "lin.bias"}


def test_freeze_clears_grads_so_adam_with_zero_grads_cannot_move_them() -> None:
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train_steps(model, *images(), steps=1, opt=opt)  # momenta exist for every parameter
    tfz.freeze(model, "layer1")
    assert all(p.grad is None for p in model.layer1.parameters())
    before = snapshot(model)
    opt.zero_grad(set_to_none=False)
    for _ in range(2):
        F.cross_entropy(model(images()[0]), images()[1]).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert not {k for k in changed(before, model) if k.startswith("layer1.")}


def test_frozen_bn_stays_eval_through_model_train() -> None:
    model = TinyResNet()
    tfz.freeze(model, "bn1", "layer1")
    model.train()
    assert not model.bn1.training and not model.layer1[1].training
    assert model.layer2[1].training
    model.eval().train()
    model.apply(lambda m: m.train())  # even apply(train) cannot unpin
    assert not model.bn1.training
    before = snapshot(model)
    train_steps(model, *images())
    assert not {k for k in changed(before, model) if k.startswith(("bn1.", "layer1."))}
    assert "layer2.1.running_mean" in changed(before, model)


def test_bn_train_policy_keeps_bn_trainable_inside_frozen_selection() -> None:
    model = TinyResNet()
    tfz.freeze(model, exclude="fc", bn="train")
    assert model.bn1.weight.requires_grad and not model.conv1.weight.requires_grad
    before = snapshot(model)
    train_steps(model, *images())
    moved = changed(before, model)
    assert {"bn1.weight", "bn1.running_mean", "layer1.1.bias"} <= moved
    assert not {k for k in moved if "conv" in k or k.startswith("layer1.0")}


def test_bn_stats_policy_freezes_affine_but_stats_move() -> None:
    model = TinyResNet()
    tfz.freeze(model, "bn1", bn="stats")
    model.train()
    assert model.bn1.training
    before = snapshot(model)
    train_steps(model, *images())
    moved = changed(before, model)
    assert {"bn1.running_mean", "bn1.running_var"} <= moved
    assert not {"bn1.weight", "bn1.bias"} & moved


def test_frozen_restores_exact_prior_state_of_partly_frozen_model() -> None:
    model = TinyResNet()
    tfz.freeze(model, "layer1")
    model.layer3.eval()  # a hand-set mode must survive too
    state = [(p.requires_grad) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    with tfz.frozen(model, "layer2", "layer3", "fc") as sel:
        assert "fc.weight" in sel.param_names
        assert not model.fc.weight.requires_grad and not model.layer2[1].training
        model.train()
    assert [p.requires_grad for p in model.parameters()] == state
    assert [m.training for m in model.modules()] == modes
    model.train()  # layer1's BN is still pinned, layer2's is not any more
    assert not model.layer1[1].training and model.layer2[1].training


def test_frozen_restores_on_exception() -> None:
    model = TinyResNet()
    with pytest.raises(RuntimeError), tfz.frozen(model):
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert model.bn1.training


def test_misspelt_selector_raises_and_changes_nothing() -> None:
    model = TinyResNet()
    tfz.freeze(model, "layer2")
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    for call in (lambda: tfz.freeze(model, "layer1", "layer44"),
                 lambda: tfz.unfreeze(model, "layer2", "fcc"),
                 lambda: tfz.freeze(model, "layer1", bn="nope")):
        with pytest.raises(TorchfreezeError):
            call()
        assert [p.requires_grad for p in model.parameters()] == flags
        assert [m.training for m in model.modules()] == modes


def test_unfreeze_unpins_bn_and_follows_model_mode() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    model.train()
    tfz.unfreeze(model, "layer4")
    assert model.layer4[1].training and not model.layer3[1].training
    assert tfz.unfreeze(model, "layer4").param_names  # idempotent


def test_lr_without_optimizer_is_refused() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    with pytest.raises(TorchfreezeError, match="pass optimizer="):
        tfz.unfreeze(model, "fc", lr=0.1)
    assert not model.fc.weight.requires_grad


def test_pinned_eval_survives_deepcopy_and_pickle() -> None:
    model = TinyResNet()
    tfz.freeze(model, "bn1")
    clone = copy.deepcopy(model).train()
    assert not clone.bn1.training and clone.layer1[1].training
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).train()
    assert not loaded.bn1.training


@pytest.mark.parametrize(("n", "frozen_layers"), [(-1, 5), (2, 2), (0, 0), (6, 6)])
def test_freeze_to_fastai_semantics(n: int, frozen_layers: int) -> None:
    model = TinyResNet()  # stem(conv1,bn1), layer1..4, fc
    groups = tfz.layers(model)
    assert [g.name for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    tfz.freeze_to(model, n)
    for i, g in enumerate(groups):
        flags = {model.get_parameter(name).requires_grad for name in g.param_names}
        assert flags == {i >= frozen_layers}, g.name


def test_freeze_to_out_of_range_raises_and_changes_nothing() -> None:
    model = TinyResNet()
    with pytest.raises(TorchfreezeError, match="only 6 layer groups"):
        tfz.freeze_to(model, 7)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "head"),
    [(tiny_bert, "classifier"), (tiny_vit, "classifier"), (tiny_hf_resnet, "classifier"),
     (tiny_convnext, "classifier")],
)
def test_freeze_to_on_real_architectures(factory, head: str) -> None:
    model = factory()
    tfz.freeze_to(model, -1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head) or "pooler" in n or "layernorm" in n.lower()
                             for n in trainable)
    tfz.freeze_to(model, 2)  # stem and first block frozen, the rest trains
    groups = tfz.layers(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(groups[0].param_names) | set(groups[1].param_names)


def test_freeze_state_roundtrip_json_into_fresh_model() -> None:
    model = TinyResNet()
    tfz.freeze(model)
    tfz.unfreeze(model, "layer4", "fc")
    tfz.freeze(model, "layer3.1", bn="stats")
    state = json.loads(json.dumps(tfz.freeze_state(model)))
    fresh = TinyResNet()
    tfz.load_freeze_state(fresh, state)
    assert [p.requires_grad for p in fresh.parameters()] == [
        p.requires_grad for p in model.parameters()]
    fresh.train()
    model.train()
    assert [m.training for m in fresh.modules()] == [m.training for m in model.modules()]
    assert tfz.freeze_state(fresh) == state


def test_load_freeze_state_rejects_wrong_model_and_changes_nothing() -> None:
    state = tfz.freeze_state(TinyResNet())
    state["frozen"] = ["layer9.0.weight"]
    model = TinyResNet()
    with pytest.raises(FreezeStateError, match="unknown names.*layer9"):
        tfz.load_freeze_state(model, state)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(FreezeStateError, match="tfz.freeze_state"):
        tfz.load_freeze_state(model, {"frozen": []})


def test_freeze_on_real_bert_leaves_selected_layers_bit_identical() -> None:
    model = tiny_bert(num_layers=4)
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    before = snapshot(model)
    ids = torch.randint(0, 100, (4, 8))
    labels = torch.randint(0, 3, (4,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    moved = changed(before, model)
    assert not {k for k in moved if k.startswith(("bert.embeddings", "bert.encoder.layer.0.",
                                                  "bert.encoder.layer.1."))}
    assert any(k.startswith("bert.encoder.layer.3.") for k in moved)


def test_selection_error_is_lookup_error_for_callers() -> None:
    with pytest.raises(LookupError):
        tfz.freeze(TinyResNet(), "nope")
    with pytest.raises(SelectionError):
        tfz.unfreeze(TinyResNet(), ["fc", "nope"])
