"""tfz.verify: frozen tensors proven bit-for-bit unchanged, or named when they moved.

Every assertion about "frozen bytes" is made twice: by ``verify`` and by an
independent byte copy taken in the test (:func:`_frozen_bytes`), so a bug in
verify cannot hide a bug in freezing.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze import VerifyReport
from torchfreeze.errors import FrozenStateChanged, TorchfreezeError

from ._models import conv_net, tiny_bert


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, *,
                set_to_none: bool = True) -> None:
    model.train()
    for _ in range(n):
        model(torch.randn(4, 3, 6, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


BLOCK = {"block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias",
         "block.1.running_mean", "block.1.running_var", "block.1.num_batches_tracked"}


def _frozen_bytes(model: nn.Module, bn: str) -> dict[str, bytes]:
    """The tensors that must not move, as raw bytes, per BatchNorm policy.

    * parameters with requires_grad=False, always;
    * running statistics of frozen BN layers only for bn="eval" (pinned in eval).
      With bn="stats" they update by design (affine frozen, statistics not);
      with bn="train" the BN layers are trainable, statistics included.
    """
    out = {n: p.detach().numpy().tobytes() for n, p in model.named_parameters()
           if not p.requires_grad}
    if bn == "eval":
        for mname, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                for bname, b in m.named_buffers():
                    out[f"{mname}.{bname}"] = b.numpy().tobytes()
    return out


# ---------------------------------------------------------------------------
# freezing by hand under Adam, and the right way


def test_hand_freeze_under_adam_moves_the_block() -> None:
    net = conv_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train_steps(net, opt, 1, set_to_none=False)
    for p in net.block.parameters():  # requires_grad=False by hand, after Adam's first step
        p.requires_grad = False
    opt.zero_grad(set_to_none=False)
    diag = tfz.check(net, opt)
    assert {"frozen-in-optimizer", "stale-grad", "bn-stats-drift"} <= set(diag.codes)
    before = _frozen_bytes(net, "eval")
    with tfz.verify(net) as report:
        train_steps(net, opt, 2, set_to_none=False)
    after = _frozen_bytes(net, "eval")
    assert {n for n in before if before[n] != after[n]} == BLOCK  # the independent count
    assert not report.ok and report.finished
    assert set(report.changed_frozen) == BLOCK  # Adam moments + zero grads, and BN drift
    assert all(report.max_abs_change[n] > 0 for n in BLOCK)
    assert report.unchanged_trainable == []
    text = str(report)
    assert text.startswith("verify FAILED: 7 of 7 frozen tensors changed")
    assert "block.0.weight" in text and "block.1.running_mean" in text


def test_strict_raises_naming_the_tensors() -> None:
    net = conv_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train_steps(net, opt, 1, set_to_none=False)
    for p in net.block.parameters():
        p.requires_grad = False
    with pytest.raises(FrozenStateChanged, match=r"7 frozen tensors changed.*block\.0\.weight"
                       ) as err, tfz.verify(net, strict=True):
        train_steps(net, opt, 2, set_to_none=False)
    assert set(err.value.names) == BLOCK
    assert "tfz.check" in str(err.value)


def test_done_right_verifies_ok() -> None:
    """freeze + param_groups + AdamW with weight decay + set_to_none=False."""
    net = conv_net()
    tfz.freeze(net, "block")
    opt = torch.optim.AdamW(tfz.param_groups(net, lr=1e-2, weight_decay=0.05))
    before = _frozen_bytes(net, "eval")
    with tfz.verify(net, strict=True) as report:
        train_steps(net, opt, 3, set_to_none=False)
    assert report.ok and report.changed_frozen == [] and report.unchanged_trainable == []
    assert set(report.max_abs_change) == BLOCK
    assert all(v == 0.0 for v in report.max_abs_change.values())
    assert _frozen_bytes(net, "eval") == before
    assert report.num_frozen == 7 and report.num_trainable == 6
    assert str(report).startswith("verify OK: 7 frozen tensors")


# ---------------------------------------------------------------------------
# the matrix: torchfreeze's own calls keep every frozen byte, in every cell

OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw-wd": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("bn", ["eval", "train", "stats"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_matrix_zero_frozen_bytes_move(opt_name: str, set_to_none: bool, bn: str) -> None:
    net = conv_net()
    tfz.freeze(net, "stem", "block", bn=bn)
    opt = OPTIMIZERS[opt_name](tfz.param_groups(net, lr=1e-2, weight_decay=0.05))
    net.train()
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    frozen_before = _frozen_bytes(net, bn)
    with tfz.verify(net) as report:
        train_steps(net, opt, 3, set_to_none=set_to_none)
    assert _frozen_bytes(net, bn) == frozen_before  # 0 frozen bytes moved
    assert report.ok, str(report)
    assert report.unchanged_trainable == []
    moved_stats = {k for k, v in bn_before.items() if not torch.equal(v, net.state_dict()[k])}
    if bn == "eval":
        assert moved_stats == set()
    else:  # "train" and "stats": statistics update by design, and verify does not count them
        assert moved_stats == set(bn_before)
        assert not any("running" in n for n in report.max_abs_change)


# ---------------------------------------------------------------------------
# what counts as a change


def test_bits_not_values_nan_safe() -> None:
    net = conv_net()
    tfz.freeze(net, "block")
    with torch.no_grad():
        net.block[0].bias[0] = float("nan")
        net.block[0].bias[1] = 0.0
    with tfz.verify(net) as report:
        pass  # the same NaN is the same NaN
    assert report.ok
    with tfz.verify(net) as report, torch.no_grad():
        net.block[0].bias[1] = -0.0  # equal as a float, different bits
    assert report.changed_frozen == ["block.0.bias"]
    assert report.max_abs_change["block.0.bias"] == 0.0
    assert "bits only" in str(report)
    with tfz.verify(net) as report, torch.no_grad():
        net.block[0].bias[0] = 1.0  # NaN vanished
        net.block[0].weight[0, 0, 0, 0] += 0.5
    assert set(report.changed_frozen) == {"block.0.weight", "block.0.bias"}
    assert report.max_abs_change["block.0.weight"] == pytest.approx(0.5, rel=1e-6)
    assert report.max_abs_change["block.0.bias"] != report.max_abs_change["block.0.bias"]


def test_unchanged_trainable_names_a_layer_that_does_not_learn() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)  # block forgotten
    with tfz.verify(net) as report:
        train_steps(net, opt, 2)
    assert report.ok  # nothing frozen moved...
    assert report.unchanged_trainable == ["block.0.weight", "block.0.bias", "block.1.weight",
                                          "block.1.bias"]
    assert "trainable but never moved: block.0.weight" in str(report)


def test_one_ulp_counts_as_moved_for_trainable_and_frozen() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    with tfz.verify(net) as report, torch.no_grad():
        for p in (net.stem[0].weight, net.head[2].weight):
            p[0, 0] = torch.nextafter(p[0, 0], torch.tensor(float("inf")))
    assert report.changed_frozen == ["stem.0.weight"]
    assert 0 < report.max_abs_change["stem.0.weight"] < 1e-6
    assert "head.2.weight" not in report.unchanged_trainable
    assert "head.2.bias" in report.unchanged_trainable


def test_unfrozen_inside_the_block_is_not_counted() -> None:
    net = conv_net()
    tfz.freeze(net, "stem", "block")
    opt = torch.optim.Adam(tfz.param_groups(net, lr=1e-2))
    with tfz.verify(net, strict=True) as report:
        train_steps(net, opt, 1)
        tfz.unfreeze(net, "block", optimizer=opt)
        train_steps(net, opt, 1)
    assert report.ok and report.changed_frozen == []
    assert set(report.unfrozen) == BLOCK  # the BN layer's statistics came with it
    assert report.max_abs_change.keys() == {n.replace("block", "stem") for n in BLOCK}


def test_frozen_batchnorm_conversion_inside_the_block_is_bit_identical() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    with tfz.verify(net, strict=True) as report:
        tfz.convert_frozen_batchnorm(net, "stem")
    assert report.ok and report.num_frozen == 7


def test_removed_frozen_tensor_is_missing() -> None:
    net = conv_net()
    tfz.freeze(net, "head")
    with tfz.verify(net) as report:
        net.head = nn.Identity()
    assert not report.ok and report.missing == ["head.2.weight", "head.2.bias"]
    assert "missing" in str(report)


def test_block_exception_propagates_and_report_is_filled() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    with pytest.raises(KeyError, match="boom"), tfz.verify(net, strict=True) as report:
        with torch.no_grad():
            net.stem[0].weight.add_(1.0)
        raise KeyError("boom")
    assert report.finished and report.changed_frozen == ["stem.0.weight"]


def test_report_before_exit_and_to_dict() -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    with tfz.verify(net) as report:
        assert isinstance(report, VerifyReport) and not report.finished
        assert "running" in str(report)
    plain = json.loads(json.dumps(report.to_dict()))
    assert plain["ok"] is True and plain["changed_frozen"] == []
    assert set(plain["max_abs_change"]) == {
        "stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias",
        "stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"}


def test_memory_cost_is_one_copy_of_frozen_plus_16_bytes_per_trainable() -> None:
    model = tiny_bert()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..2}")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    for offload in (False, True):
        with tfz.verify(model, offload=offload) as report:
            pass
        assert report.ok and report.num_frozen == len(frozen)
        assert report.snapshot_bytes == (
            sum(p.numel() * p.element_size() for p in frozen) + 16 * n_trainable)


def test_real_bert_fine_tune_keeps_frozen_layers() -> None:
    model = tiny_bert()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    opt = torch.optim.AdamW(tfz.param_groups(model, lr=1e-3, weight_decay=0.01))
    model.train()
    with tfz.verify(model, strict=True) as report:
        for _ in range(2):
            out = model(input_ids=torch.randint(0, 100, (2, 6)), labels=torch.tensor([0, 2]))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    assert report.ok and report.unchanged_trainable == []


def test_not_a_module_is_a_clear_error() -> None:
    with pytest.raises(TorchfreezeError, match="expects an nn.Module, got dict"), tfz.verify(
        {"weight": torch.zeros(2)}  # type: ignore[arg-type]
    ):
        pass


# ---------------------------------------------------------------------------
# distributed in one process: DDP names and FSDP2 DTensor shards


def test_ddp_wrapped_model(gloo_group) -> None:
    net = conv_net()
    tfz.freeze(net, "stem")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(tfz.param_groups(ddp, lr=0.1), momentum=0.9)
    with tfz.verify(ddp, strict=True) as report:
        train_steps(ddp, opt, 2)
    # names are the wrapped model's own, whichever wrapper was passed (#12)
    assert report.ok and "stem.0.weight" in report.max_abs_change


def test_fsdp2_dtensor_shards(gloo_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = conv_net()
    tfz.freeze(net, "stem", "block")
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(net.head, mesh=mesh)
    fully_shard(net, mesh=mesh)
    assert isinstance(net.stem[0].weight, DTensor)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    with tfz.verify(net, strict=True) as report:
        train_steps(net, opt, 2, set_to_none=False)
    assert report.ok and report.unchanged_trainable == []
    with tfz.verify(net) as report, torch.no_grad():
        net.block[0].weight.to_local().add_(1.0)
    assert report.changed_frozen == ["block.0.weight"]
    assert report.max_abs_change["block.0.weight"] == pytest.approx(1.0, rel=1e-6)
