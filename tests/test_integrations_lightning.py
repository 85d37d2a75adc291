"""Lightning FreezeCallback: frozen stays frozen (incl. BN stats), schedules, resume, DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import torchfreeze as tfz  # noqa: E402
from torchfreeze.errors import SelectionError, TorchfreezeError  # noqa: E402
from torchfreeze.integrations.lightning import FreezeCallback  # noqa: E402

FROZEN = ["model.conv1", "model.bn1", "model.layer{1..4}"]


def _block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class TinyResNet(nn.Module):
    """torchvision's ResNet names (conv1, bn1, layer1..4, fc) at toy size."""

    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1, self.layer2, self.layer3, self.layer4 = (_block(c) for _ in range(4))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyResNet()

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2,
                                weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


def _data(n: int = 16, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g) * 3 + 1  # far from BN's initial stats
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(tmp: Path, epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
        num_sanity_val_steps=0, **kw,
    )


def _snap(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fit(tmp: Path, epochs: int, ckpt_path: str | None = None, **kw):
    module = Classifier()
    cb = FreezeCallback(freeze=FROZEN, schedule={1: "model.layer4"}, lr_mult=0.5)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(tmp, epochs, callbacks=[cb, ckpt], **kw)
    trainer.fit(module, _data(), _data(8, seed=2), ckpt_path=ckpt_path)
    return module, trainer, cb


def _changed(a: dict, b: dict, prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """One uninterrupted 3-epoch run (milestone at epoch 1) with validation every epoch."""
    tmp = tmp_path_factory.mktemp("pl")
    before = _snap(Classifier())
    module, trainer, cb = _fit(tmp, 3)
    return SimpleNamespace(tmp=tmp, before=before, after=_snap(module), module=module,
                           trainer=trainer, cb=cb)


def test_frozen_layers_and_bn_stats_stay_bit_identical(run3):
    before, after = run3.before, run3.after
    for prefix in ("model.conv1.", "model.bn1.", "model.layer1.", "model.layer2.",
                   "model.layer3."):
        assert _changed(before, after, prefix) == [], prefix
    # running stats included: Lightning's model.train() after each validation did not unpin
    assert torch.equal(before["model.bn1.running_mean"], after["model.bn1.running_mean"])
    assert after["model.layer1.1.num_batches_tracked"].item() == 0
    assert not run3.module.model.bn1.training and not run3.module.model.layer3[1].training


def test_schedule_unfreezes_layer4_at_epoch_1_and_the_head_trains(run3):
    before, after = run3.before, run3.after
    epoch0 = torch.load(run3.tmp / "ckpt" / "epoch=0.ckpt", weights_only=False)["state_dict"]
    assert _changed(before, epoch0, "model.layer4.") == []        # still frozen in epoch 0
    assert _changed(before, epoch0, "model.fc.") != []
    assert set(_changed(before, after, "model.layer4.")) >= {
        "model.layer4.0.weight", "model.layer4.1.weight", "model.layer4.1.running_mean"}
    assert _changed(epoch0, after, "model.fc.") != []
    assert run3.module.model.layer4[1].training                   # BN follows train() again
    assert run3.cb.applied == [1]
    assert run3.cb.headline.startswith("trainable ") and run3.cb.headline.endswith("2 groups")


def test_new_group_is_registered_with_the_lr_scheduler(run3):
    opt = run3.trainer.optimizers[0]
    sched = run3.trainer.lr_scheduler_configs[0].scheduler
    assert [g["name"] for g in opt.param_groups[1:]] == ["unfreeze@1"]
    assert len(sched.base_lrs) == 2
    # lr_mult=0.5 of the first group's base, then decayed by the same StepLR
    assert sched.base_lrs[1] == pytest.approx(0.5e-2)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-2 * 0.5 ** 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)


@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_equals_uninterrupted_run_bit_for_bit(run3, tmp_path, epoch):
    # epoch=1.ckpt was saved after the milestone: its optimizer has two groups, so the
    # callback must rebuild them before Lightning loads the optimizer state
    ckpt = str(run3.tmp / "ckpt" / f"epoch={epoch}.ckpt")
    module, trainer, cb = _fit(tmp_path, 3, ckpt_path=ckpt)
    after = _snap(module)
    assert [k for k in after if not torch.equal(after[k], run3.after[k])] == []
    assert cb.applied == [1]
    assert not module.model.layer3[0].weight.requires_grad
    assert module.model.layer4[0].weight.requires_grad
    assert len(trainer.optimizers[0].param_groups) == 2


def test_a_typo_fails_before_training_and_changes_nothing(tmp_path):
    module = Classifier()
    before = _snap(module)
    cb = FreezeCallback(freeze="model.conv1", schedule={1: "model.layr4"})
    with pytest.raises(SelectionError, match="layer4"):
        _trainer(tmp_path, 1, callbacks=[cb], enable_checkpointing=False).fit(module, _data())
    assert all(p.requires_grad for p in module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_unsupported_strategy_is_refused(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cb = FreezeCallback(freeze="model.conv1")
    fake = SimpleNamespace(strategy=FSDPStrategy())
    module = Classifier()
    with pytest.raises(TorchfreezeError, match="FreezeCallback does not support the FSDPStrategy"):
        cb.setup(fake, module, "fit")
    assert all(p.requires_grad for p in module.parameters())
    from torchfreeze.integrations.lightning import RotatingFreezeCallback

    with pytest.raises(TorchfreezeError, match="^RotatingFreezeCallback does not support the FSDP"):
        RotatingFreezeCallback().setup(fake, module, "fit")


def test_bad_options_are_refused():
    with pytest.raises(TorchfreezeError, match="epoch numbers"):
        FreezeCallback(schedule={-1: "model.fc"})
    with pytest.raises(TorchfreezeError, match="not both"):
        FreezeCallback(schedule={1: "model.fc"}, lr=1e-3, lr_mult=0.1)
    with pytest.raises(TorchfreezeError, match="BatchNorm policy"):
        FreezeCallback(freeze="model", bn="frozen")


def test_checkpoint_with_another_schedule_is_refused(run3, tmp_path):
    module = Classifier()
    cb = FreezeCallback(freeze=FROZEN, schedule={2: "model.layer4"})
    trainer = _trainer(tmp_path, 3, callbacks=[cb], enable_checkpointing=False)
    with pytest.raises(tfz.FreezeStateError, match="same schedule"):
        trainer.fit(module, _data(), ckpt_path=str(run3.tmp / "ckpt" / "epoch=1.ckpt"))


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
import lightning.pytorch as pl
from test_integrations_lightning import Classifier, FROZEN, _data
from torchfreeze.integrations.lightning import FreezeCallback

class Check(pl.Callback):
    def on_train_epoch_end(self, trainer, module):
        self.wrapped = type(trainer.strategy.model).__name__

module = Classifier()
before = {{k: v.clone() for k, v in module.state_dict().items()}}
cb = FreezeCallback(freeze=FROZEN, schedule={{1: "model.layer4"}}, lr_mult=0.5)
trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, num_sanity_val_steps=0,
                     callbacks=[cb, Check()], default_root_dir={out!r})
trainer.fit(module, _data(16), _data(8, seed=2))
torch.save({{"after": module.state_dict(), "before": before, "applied": cb.applied,
            "groups": len(trainer.optimizers[0].param_groups)}},
           os.path.join({out!r}, f"rank{{trainer.global_rank}}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_with_schedule_keeps_ranks_equal(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        here=str(Path(__file__).parent), out=str(tmp_path))))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["applied"] == r1["applied"] == [1]
    assert r0["groups"] == r1["groups"] == 2
    diff = [k for k in r0["after"] if not torch.equal(r0["after"][k], r1["after"][k])]
    assert diff == []
    before, after = r0["before"], r0["after"]
    assert _changed(before, after, "model.layer3.") == []
    assert _changed(before, after, "model.layer4.0.") == ["model.layer4.0.weight"]
    assert _changed(before, after, "model.fc.") != []


def test_one_line_summary_is_logged_at_fit_start(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        _trainer(tmp_path, 1, callbacks=[FreezeCallback(freeze=FROZEN)],
                 enable_checkpointing=False, limit_train_batches=1).fit(Classifier(), _data())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torchfreeze:")]
    # only the head (fc: 4 * 3 + 3) trains; 739 parameters in all
    assert lines == ["torchfreeze: trainable 15 / 739 (2.0%), 1 group"]


def test_a_state_saved_by_the_other_kind_of_callback_is_refused_naming_both() -> None:
    from torchfreeze.integrations import _Plan, _state
    from torchfreeze.integrations.lightning import _check_state

    lightning_state = FreezeCallback(freeze="model.conv1", schedule={1: "model.fc"}).state_dict()
    hf_state = _state([1], None)  # what the Hugging Face FreezeCallback saves
    plan = _Plan("model.conv1", {1: "model.fc"}, bn="eval", lr=None, lr_mult=None)
    with pytest.raises(tfz.FreezeStateError, match=r"expected a state saved by the Hugging "
                       r"Face FreezeCallback .*got a state saved by the Lightning FreezeCallback"):
        plan.check_state(lightning_state)
    with pytest.raises(tfz.FreezeStateError, match=r"expected a state saved by the Lightning "
                       r"FreezeCallback .*got a state saved by the Hugging Face FreezeCallback"):
        _check_state(hf_state, [1])
    # a Lightning state written before the formats split (the shared format) still
    # resumes in Lightning, and is still refused by the Hugging Face callback
    legacy = {**lightning_state, "format": hf_state["format"]}
    _check_state(legacy, [])  # (no unfreezer before setup: no milestones saved)
    with pytest.raises(tfz.FreezeStateError, match="Lightning FreezeCallback"):
        plan.check_state(legacy)


def test_an_optimizer_index_out_of_range_names_the_callback_and_what_the_trainer_has():
    class MyFreeze(FreezeCallback):
        pass

    trainer = SimpleNamespace(optimizers=[torch.optim.SGD([nn.Parameter(torch.ones(1))],
                                                          lr=0.1)])
    assert MyFreeze(optimizer_index=0)._optimizer(trainer) is trainer.optimizers[0]
    with pytest.raises(TorchfreezeError, match=r"^MyFreeze\(optimizer_index=1\) but the "
                       r"trainer has 1 optimizer\(s\)\. .*pick an existing index"):
        MyFreeze(optimizer_index=1)._optimizer(trainer)
