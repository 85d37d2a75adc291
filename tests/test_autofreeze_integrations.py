"""AutoFreeze in Lightning and the Hugging Face Trainer: freezing on schedule, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from torchfreeze.integrations.lightning import AutoFreezeCallback  # noqa: E402
from torchfreeze.norm import bn_policy  # noqa: E402

from ._models import TinyResNet  # noqa: E402


def every(n: int):
    """A fixed schedule through policy=: one more group every n steps."""
    return lambda s: s.step // n


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyResNet(num_classes=3)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


def _data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 6, 6, generator=g) * 3 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=4)


def _fit(tmp: Path, epochs: int, ckpt_path: str | None = None, **kw):
    module = Classifier()
    cb = AutoFreezeCallback(interval=2, policy=every(3), verbose=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp, callbacks=[cb, ckpt], **kw)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, trainer, cb


def test_lightning_freezes_a_prefix_and_shrinks_the_optimizer(tmp_path: Path) -> None:
    module, trainer, cb = _fit(tmp_path, 3)
    af = cb.autofreeze
    # 12 optimizer steps, decisions every 2: 2//3=0, 4//3=1, 6//3=2, ... 12//3=4
    assert af.groups[1:] == ("model.layer1", "model.layer2", "model.layer3", "model.layer4",
                             "model.fc")
    assert af.events == list(zip([4, 6, 10, 12], af.groups[:4]))
    assert af.frozen == list(af.groups[:4])
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.parameters() if p.requires_grad}
    assert not module.model.bn1.training and bn_policy(module.model.bn1) == "eval"


def test_lightning_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    full, _, full_cb = _fit(tmp_path / "a", 3)
    _fit(tmp_path / "b", 1)  # 4 steps: froze the stem at step 4, mid-schedule
    resumed, _, cb = _fit(tmp_path / "c", 3, ckpt_path=str(tmp_path / "b/ckpt/epoch=0.ckpt"))
    assert cb.autofreeze.events == full_cb.autofreeze.events
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("integration", ["lightning", "transformers"])
def test_callbacks_reject_unknown_options_naming_the_valid_ones(integration: str) -> None:
    import importlib

    from torchfreeze.errors import TorchfreezeError

    module = importlib.import_module(f"torchfreeze.integrations.{integration}")
    with pytest.raises(TorchfreezeError, match=r"\['patiense'\].*patience=.*normalize="):
        module.AutoFreezeCallback(patiense=3)


# ---------------------------------------------------------------------------
# Hugging Face Trainer


def _hf_train(out: Path, resume: str | None = None, **cb_kw):
    pytest.importorskip("accelerate")
    from transformers import Trainer

    from torchfreeze.integrations.transformers import AutoFreezeCallback as HFAuto

    from ._hf import TokenData, tiny_classifier, training_args

    args = training_args(out)
    model = tiny_classifier()
    cb = HFAuto(interval=2, verbose=False, **({"policy": every(3)} | cb_kw))
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, cb


def test_hf_trainer_freezes_and_resumes_bit_identical(tmp_path: Path) -> None:
    model, trainer, cb = _hf_train(tmp_path / "a")
    af = cb.autofreeze
    assert af.events == [(4, "bert.embeddings"), (6, "bert.encoder.layer.0")]
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad

    # checkpoint-4 was saved right after the first freeze: its optimizer.pt has the
    # embeddings removed, and loads only because the callback re-froze them first
    resumed, _, rcb = _hf_train(tmp_path / "b", resume=str(tmp_path / "a/checkpoint-4"))
    assert rcb.autofreeze.events == af.events
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_trainer_gradnorm_state_is_saved_as_json(tmp_path: Path) -> None:
    import json

    _, _, cb = _hf_train(tmp_path, policy="gradnorm", warmup=0, patience=1)
    saved = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    st = saved["stateful_callbacks"]["AutoFreezeCallback"]["attributes"]["tfz_auto"]
    assert st["step"] == 8 and st["frozen"] == len(cb.autofreeze.frozen)
    assert set(st["policy"]["prev"]) == set(cb.autofreeze.groups[st["frozen"]:])
