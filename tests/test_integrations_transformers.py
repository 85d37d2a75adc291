"""Hugging Face Trainer FreezeCallback: frozen never enters the optimizer, schedule, resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer  # noqa: E402

import torchfreeze as tfz  # noqa: E402
from torchfreeze.errors import SelectionError, TorchfreezeError  # noqa: E402
from torchfreeze.integrations.transformers import FreezeCallback  # noqa: E402

from ._hf import TokenData, tiny_classifier, training_args  # noqa: E402

FREEZE = ["bert.embeddings", "bert.encoder.layer.{0..1}"]
SCHEDULE = {1: "bert.encoder.layer.1"}


def _snap(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(a: dict, b: dict, prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


class _Spy(transformers.TrainerCallback):
    """Records what the optimizer held at the start of each epoch."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.frozen_in_opt: list[int] = []

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kw):
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.groups.append(len(optimizer.param_groups))
        self.frozen_in_opt.append(sum(id(p) in ids for p in model.parameters()
                                      if not p.requires_grad))


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """One uninterrupted 2-epoch run (4 steps per epoch), checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("hf")
    model = tiny_classifier()
    before = _snap(model)
    cb, spy = FreezeCallback(freeze=FREEZE, schedule=SCHEDULE, lr_mult=0.5), _Spy()
    trainer = Trainer(model=model, args=training_args(out), train_dataset=TokenData(),
                      callbacks=[cb, spy])
    trainer.train()
    return SimpleNamespace(out=out, before=before, after=_snap(model), model=model,
                           trainer=trainer, cb=cb, spy=spy)


def test_frozen_never_moves_and_scheduled_layer_trains_from_epoch_1(run2):
    before, after = run2.before, run2.after
    assert _changed(before, after, "bert.embeddings.") == []
    assert _changed(before, after, "bert.encoder.layer.0.") == []
    # 2 epochs with weight decay 0.1: layers 1-3 and the head all moved
    for prefix in ("bert.encoder.layer.1.", "bert.encoder.layer.2.", "bert.encoder.layer.3.",
                   "classifier."):
        assert _changed(before, after, prefix) != [], prefix
    # epoch 0 (checkpoint-4): layer 1 still frozen, layer 2 already training
    from safetensors.torch import load_file

    epoch0 = load_file(str(run2.out / "checkpoint-4" / "model.safetensors"))
    assert _changed(before, epoch0, "bert.encoder.layer.1.") == []
    assert _changed(before, epoch0, "bert.encoder.layer.2.") != []


def test_frozen_params_never_enter_the_optimizer(run2):
    assert run2.spy.frozen_in_opt == [0, 0]
    # Trainer's two groups, then the milestone's decay / no-decay pair
    assert run2.spy.groups == [2, 4]
    opt = run2.trainer.optimizer
    new = opt.param_groups[2:]
    # one naming scheme with GradualUnfreeze and param_groups (#12)
    assert [g["name"] for g in new] == ["unfreeze@1", "unfreeze@1/no_decay"]
    assert [g["weight_decay"] for g in new] == [0.1, 0.0]
    name_of = {id(p): n for n, p in run2.model.named_parameters()}
    no_decay = [name_of[id(p)] for p in new[1]["params"]]
    assert no_decay and all("LayerNorm" in n or n.endswith("bias") for n in no_decay)
    assert not any(n.endswith("bias") for n in (name_of[id(p)] for p in new[0]["params"]))
    layer1 = set(tfz.select(run2.model, "bert.encoder.layer.1").param_names)
    held = {id(p) for g in new for p in g["params"]}
    assert held == {id(p) for n, p in run2.model.named_parameters() if n in layer1}


def test_new_groups_follow_the_trainers_lr_scheduler(run2):
    sched = run2.trainer.lr_scheduler
    opt = run2.trainer.optimizer
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == 4
    # linear decay to 0 over 8 steps: every group, new ones included, ends at 0
    assert [g["lr"] for g in opt.param_groups] == [0.0] * 4
    # lr_mult=0.5 of args.learning_rate, under the Trainer's own linear schedule
    assert sched.base_lrs == [pytest.approx(v) for v in (1e-3, 1e-3, 5e-4, 5e-4)]
    assert run2.cb.applied == [1]
    assert run2.cb.headline.endswith("4 groups")


def test_resume_after_the_milestone_matches_the_uninterrupted_run(run2, tmp_path):
    # checkpoint-6 is mid epoch 1, after layer 1 was unfrozen: its optimizer.pt has 4 groups
    model = tiny_classifier()
    cb = FreezeCallback(freeze=FREEZE, schedule=SCHEDULE, lr_mult=0.5)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                      callbacks=[cb])
    trainer.train(resume_from_checkpoint=str(run2.out / "checkpoint-6"))
    after = _snap(model)
    assert [k for k in after if not torch.equal(after[k], run2.after[k])] == []
    assert cb.applied == [1]
    assert len(trainer.optimizer.param_groups) == 4
    assert not model.bert.encoder.layer[0].output.dense.weight.requires_grad
    assert model.bert.encoder.layer[1].output.dense.weight.requires_grad


def test_resume_before_the_milestone_applies_it_on_time(run2, tmp_path):
    model = tiny_classifier()
    cb = FreezeCallback(freeze=FREEZE, schedule=SCHEDULE, lr_mult=0.5)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                      callbacks=[cb])
    trainer.train(resume_from_checkpoint=str(run2.out / "checkpoint-2"))
    after = _snap(model)
    assert [k for k in after if not torch.equal(after[k], run2.after[k])] == []


def test_typo_fails_when_the_trainer_is_built(tmp_path):
    model = tiny_classifier()
    with pytest.raises(SelectionError, match=r"bert\.encoder\.layer"):
        Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                callbacks=[FreezeCallback(freeze=FREEZE, schedule={1: "bert.encodr.layer.1"})])
    assert all(p.requires_grad for p in model.parameters())


def test_a_user_optimizer_holding_frozen_params_is_refused(tmp_path):
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1),
                      train_dataset=TokenData(), optimizers=(opt, sched),
                      callbacks=[FreezeCallback(freeze=FREEZE)])
    before = _snap(model)
    with pytest.raises(TorchfreezeError, match="frozen parameters .* are in the optimizer"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_settings_are_refused(tmp_path):
    model = tiny_classifier()
    args = training_args(tmp_path, restore_callback_states_from_checkpoint=True)
    with pytest.raises(TorchfreezeError, match="restore_callback_states_from_checkpoint"):
        Trainer(model=model, args=args, train_dataset=TokenData(),
                callbacks=[FreezeCallback(freeze=FREEZE)])
    assert all(p.requires_grad for p in model.parameters())
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData())
    trainer.add_callback(FreezeCallback(freeze=FREEZE))
    with pytest.raises(TorchfreezeError, match="callbacks=\\[cb\\]"):
        trainer.train()


def test_one_line_summary_is_printed_at_train_start(tmp_path, capsys):
    model = tiny_classifier()
    args = training_args(tmp_path, max_steps=1, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=TokenData(),
            callbacks=[FreezeCallback(freeze=FREEZE)]).train()
    out = capsys.readouterr().out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    headline = tfz.summary(model).headline  # "trainable 9.9 k / 55.0 k (18.0%)"
    assert trainable < sum(p.numel() for p in model.parameters())
    assert f"torchfreeze: {headline}, 2 groups" in out.splitlines()
