from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import SelectionError, TorchfreezeError
from torchfreeze.norm import bn_policy, is_batchnorm

from ._models import TinyResNet, changed, snapshot, tiny_hf_resnet


def warm(bn: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Give a BN layer non-trivial statistics and affine values."""
    bn.train()
    for _ in range(3):
        bn(torch.randn(*shape) * 3 + 1)
    if getattr(bn, "affine", False):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize(
    ("bn", "shape"),
    [
        (nn.BatchNorm1d(4), (8, 4)),
        (nn.BatchNorm1d(4), (8, 4, 5)),
        (nn.BatchNorm2d(4), (8, 4, 3, 3)),
        (nn.BatchNorm3d(4, affine=False), (8, 4, 2, 2, 2)),
        (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (8, 4, 3, 3)),
    ],
)
def test_frozen_batchnorm_matches_eval_batchnorm(bn: nn.Module, shape: tuple[int, ...]) -> None:
    warm(bn, shape)
    fbn = tfz.FrozenBatchNorm.from_batchnorm(bn)
    x = torch.randn(*shape)
    torch.testing.assert_close(fbn(x), bn(x), atol=1e-5, rtol=1e-5)
    assert set(fbn.state_dict()) == set(bn.state_dict())
    assert not list(fbn.parameters())
    back = fbn.to_batchnorm()
    assert type(back) is type(bn) and back.eps == bn.eps and back.momentum == bn.momentum
    torch.testing.assert_close(back.eval()(x), bn(x))


def test_convert_in_place_keeps_outputs_and_state_dict_keys() -> None:
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.37
    model.train()
    model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    keys = list(model.state_dict())
    names = tfz.convert_frozen_batchnorm(model, "layer{1..2}", "bn1")
    assert names == ["bn1", "layer1.1", "layer2.1"]
    assert isinstance(model.layer1[1], tfz.FrozenBatchNorm)
    assert isinstance(model.layer3[1], nn.BatchNorm2d)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)
    # the converted layers cannot move in train mode
    before = snapshot(model)
    model.train()
    model(torch.randn(4, 3, 8, 8))
    assert not {k for k in changed(before, model) if k.startswith(("bn1", "layer1", "layer2"))}
    expected = model.eval()(x)  # layer3/4 statistics moved in that train-mode forward
    # and back, keeping momentum/eps and values, still frozen
    assert tfz.revert_frozen_batchnorm(model) == names
    assert isinstance(model.layer1[1], nn.BatchNorm2d) and model.layer1[1].momentum == 0.37
    assert not model.layer1[1].weight.requires_grad and bn_policy(model.layer1[1]) == "eval"
    model.eval()
    torch.testing.assert_close(model(x), expected)


def test_state_dict_loads_across_conversion_and_old_checkpoints() -> None:
    src = TinyResNet()
    warm(src.bn1, (4, 8, 3, 3))
    dst = TinyResNet()
    tfz.convert_frozen_batchnorm(dst)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.bn1.running_var, src.bn1.running_var)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst.load_state_dict(old)  # pre-0.4.1 BN checkpoints had no num_batches_tracked


def test_sync_batchnorm_converts_and_is_a_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.SyncBatchNorm(2))
    assert is_batchnorm(model[1])
    tfz.freeze(model)
    model.train()
    assert not model[1].training  # eval pin applies to SyncBatchNorm too
    tfz.convert_frozen_batchnorm(model)
    assert model[1].source_type is nn.SyncBatchNorm
    out = model(torch.randn(2, 1, 3, 3))
    assert out.shape == (2, 2, 3, 3)
    tfz.revert_frozen_batchnorm(model)
    assert type(model[1]) is nn.SyncBatchNorm


def test_instance_norm_with_running_stats_follows_policy() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.InstanceNorm2d(2, affine=True,
                                                                track_running_stats=True))
    tfz.freeze(model)
    before = snapshot(model)
    model.train()
    model(torch.randn(2, 1, 3, 3))
    assert not changed(before, model)


def test_convert_errors_change_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(SelectionError, match="contains no BatchNorm"):
        tfz.convert_frozen_batchnorm(model)
    with pytest.raises(SelectionError, match="contains no FrozenBatchNorm"):
        tfz.revert_frozen_batchnorm(TinyResNet())
    with pytest.raises(TorchfreezeError, match="from_batchnorm"):
        tfz.convert_frozen_batchnorm(nn.BatchNorm1d(3))
    with pytest.raises(TorchfreezeError, match="only BatchNorm"):
        tfz.FrozenBatchNorm.from_batchnorm(nn.LayerNorm(3))


def test_hf_resnet_frozen_backbone_bn_statistics_never_move() -> None:
    model = tiny_hf_resnet()
    tfz.freeze(model, "resnet")
    before = snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        out = model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.randint(0, 3, (4,)))
        out.loss.backward()
        opt.step()
    moved = changed(before, model)
    assert moved and all(k.startswith("classifier") for k in moved)


def test_every_function_taking_bn_refuses_an_unknown_policy_alike_and_changes_nothing() -> None:
    """One rule, one message: what each policy does, for freeze, freeze_to, frozen,
    GradualUnfreeze and set_bn_policy; the model is as it was."""
    from torchfreeze.norm import set_bn_policy

    model = TinyResNet()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = [
        lambda: tfz.freeze(model, "layer1", bn="evaluate"),
        lambda: tfz.freeze_to(model, 2, bn="evaluate"),
        lambda: tfz.frozen(model, "layer1", bn="evaluate").__enter__(),
        lambda: tfz.GradualUnfreeze(model, opt, schedule={0: "fc"}, bn="evaluate"),
        lambda: set_bn_policy(model.bn1, "evaluate", training=True),
    ]
    for call in calls:
        with pytest.raises(TorchfreezeError) as info:
            call()
        assert "bn='evaluate' is not a BatchNorm policy. Use 'eval'" in str(info.value)
        assert "'stats' (affine frozen, statistics keep updating)" in str(info.value)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not changed(before, model)
    assert bn_policy(model.bn1) is None and bn_policy(model.layer1[1]) is None
