"""RotatingFreeze (BAdam / LISA) on a small Llama: state freed, inactive groups
bit-identical, resume, orders, errors, checkpointing, tied weights, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import FreezeStateError, TorchfreezeError
from torchfreeze.rotate import optimizer_state_bytes

from ._dist_utils import free_port, run_ranks


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM with tied embeddings, as SmolLM2 (seeded, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(100 + i))


def train(model: nn.Module, opt: torch.optim.Optimizer, rot: tfz.RotatingFreeze,
          steps: range, *, set_to_none: bool = True) -> list[float]:
    losses = []
    for i in steps:
        x = batch(i)
        loss = rot.model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        rot.step()
        opt.zero_grad(set_to_none=set_to_none)
        losses.append(loss.item())
    return losses


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lightning_lm() -> Any:
    """A LightningModule around ``tiny_llama()``: AdamW (lr 1e-2) over every parameter."""
    pl = pytest.importorskip("lightning.pytorch")

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = tiny_llama()

        def training_step(self, x: torch.Tensor, _: int) -> torch.Tensor:
            return self.lm(input_ids=x, labels=x).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LM()


def build(order: str = "descending", state: str = "fresh", **kw: Any) -> tuple[Any, ...]:
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rot = tfz.RotatingFreeze(model, opt, switch_every=3, order=order, state=state, **kw)
    return model, opt, rot


def test_optimizer_holds_state_only_for_the_active_group_measured() -> None:
    model, opt, rot = build()
    params = dict(model.named_parameters())
    for i in range(9):
        train(model, opt, rot, range(i, i + 1))
        if rot.steps % 3 == 0:  # just switched: nothing trained yet in the new block
            assert optimizer_state_bytes(opt) == 0
            continue
        active = {n for g, names in rot.groups if g in rot.active for n in names}
        held = {n for n, p in params.items() if p in opt.state}
        assert held == active
        # AdamW: exp_avg + exp_avg_sq in fp32, plus a 4-byte step counter per tensor
        expect = sum(2 * params[n].numel() * 4 + 4 for n in active)
        assert optimizer_state_bytes(opt) == rot.state_bytes() == expect
    assert len(opt.param_groups) == 1  # no group removed: schedulers stay aligned


def test_inactive_groups_are_bit_identical_between_activations_and_verify_proves_it() -> None:
    model, opt, rot = build()
    with tfz.verify(model, strict=True) as report:
        seen: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(18):
            leaving = set(rot.active)
            train(model, opt, rot, range(i, i + 1), set_to_none=False)  # zeros, not None
            for g in leaving - set(rot.active):  # just switched out: remember its weights
                seen[g] = {n: dict(model.named_parameters())[n].detach().clone()
                           for gg, names in rot.groups if gg == g for n in names}
            for g, before in seen.items():
                if g not in rot.active:
                    now = dict(model.named_parameters())
                    assert all(torch.equal(now[n], t) for n, t in before.items()), g
    assert report.ok and report.frozen_stretches > 0
    # every group trained in its turn: nothing is stuck
    assert {g for _, names in rot.events for g in names} == {g for g, _ in rot.groups}


def test_verify_catches_an_inactive_group_that_moved() -> None:
    model, opt, rot = build()
    with tfz.verify(model) as report:
        train(model, opt, rot, range(4))  # head active for 3 steps, then layers.3
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)  # inactive now: something moved it
        train(model, opt, rot, range(4, 15))  # head becomes active again at step 12
    assert not report.ok
    assert "model.norm.weight" in report.changed_frozen
    assert report.max_abs_change["model.norm.weight"] == pytest.approx(1.0)


def test_verify_tells_a_group_the_last_switch_activated_from_one_that_never_learns() -> None:
    model, opt, rot = build()
    with tfz.verify(model) as report:
        train(model, opt, rot, range(6))  # head, layers.3; the 6th rot.step activates layers.2
        assert rot.active == ["model.layers.2"]
    layer2 = sorted(n for g, names in rot.groups if g == "model.layers.2" for n in names)
    assert sorted(report.just_activated) == layer2  # its turn had not trained yet
    assert report.unchanged_trainable == [] and report.ok
    assert "activated by the rotation's last switch, not trained yet" in str(report)
    # once the new turn has trained a step, a tensor of it that did not move is stuck
    with tfz.verify(model) as report2:
        stuck = model.model.layers[2].mlp.up_proj.weight
        stuck.register_hook(torch.zeros_like)  # no gradient ever reaches it
        opt.param_groups[0]["weight_decay"] = 0.0  # nor a decay
        train(model, opt, rot, range(6, 7))
    assert report2.unchanged_trainable == ["model.layers.2.mlp.up_proj.weight"]
    assert report2.just_activated == []


def test_check_finds_nothing_to_fix_but_a_stale_grad_on_an_inactive_group_is_an_error() -> None:
    model, opt, rot = build()
    train(model, opt, rot, range(4))
    x = batch(99)
    model(input_ids=x, labels=x).loss.backward()
    assert tfz.check(model, opt).ok
    inactive = model.model.layers[0].mlp.up_proj.weight
    inactive.grad = torch.zeros_like(inactive)
    found = tfz.check(model, opt)
    assert {f.code for f in found.errors} == {"frozen-in-optimizer", "stale-grad"}
    assert all("model.layers.0.mlp.up_proj.weight" in f.names for f in found.errors)


@pytest.mark.parametrize(("order", "state"), [("descending", "fresh"), ("random", "keep")])
def test_resume_mid_block_is_bit_identical(order: str, state: str) -> None:
    model, opt, rot = build(order, state)
    train(model, opt, rot, range(16))
    expected = weights(model)

    model, opt, rot = build(order, state)
    train(model, opt, rot, range(7))  # mid-block: 7 % 3 != 0
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "rot": rot.state_dict()}
    torch.save(ckpt, "/dev/null")  # the state is torch.save-able (tensors in the stash)

    model, opt, rot = build(order, state)
    rot.load_state_dict(ckpt["rot"])
    opt.load_state_dict(ckpt["opt"])
    model.load_state_dict(ckpt["model"])
    train(model, opt, rot, range(7, 16))
    assert all(torch.equal(expected[n], p) for n, p in model.named_parameters())


def test_keep_returns_a_groups_state_and_fresh_starts_it_again() -> None:
    for state in ("keep", "fresh"):
        model, opt, rot = build(state=state, layers=["model.layers.0", "model.layers.1"])
        w = model.model.layers[1].mlp.up_proj.weight  # descending: layers.1 first
        train(model, opt, rot, range(2))
        x = batch(2)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        left = {k: v.clone() for k, v in opt.state[w].items()}
        rot.step()  # the third step: layers.1 leaves
        opt.zero_grad()
        assert w not in opt.state and rot.active == ["model.layers.0"]
        assert (rot.stash_bytes > 0) == (state == "keep")
        train(model, opt, rot, range(3, 6))  # layers.1 is back, no step taken yet
        if state == "keep":
            assert rot.stash_bytes > 0  # layers.0's state waits now
            assert all(torch.equal(left[k], v) for k, v in opt.state[w].items())
        else:
            assert w not in opt.state
            train(model, opt, rot, range(6, 7))
            assert int(opt.state[w]["step"]) == 1  # bias correction starts again (BAdam)


def test_keep_trains_like_fresh_until_a_group_returns_and_its_stash_is_the_groups_that_left(
        ) -> None:
    runs = {state: build(state=state) for state in ("fresh", "keep")}  # 5 groups, blocks of 3
    (mf, _, fresh), (mk, _, keep) = runs["fresh"], runs["keep"]
    params = dict(mk.named_parameters())
    adamw = {g: sum(8 * params[n].numel() + 4 for n in names) for g, names in keep.groups}
    for i in range(15):  # one cycle: head, layers.3 .. layers.0, and the head is back
        for model, opt, rot in runs.values():
            train(model, opt, rot, range(i, i + 1))
        assert all(torch.equal(a, b) for a, b in zip(mf.parameters(), mk.parameters()))
        left = [names[0] for _, names in keep.events[:-1]]
        assert keep.stash_bytes == sum(adamw[g] for g in left[-4:]) and fresh.stash_bytes == 0
        if i < 14:  # what the optimizer holds is the same until a group returns
            assert keep.state_bytes() == fresh.state_bytes()
    assert keep.active == ["head"] and keep.steps == 15  # keep gives it its AdamW state back
    assert keep.state_bytes() == adamw["head"] and fresh.state_bytes() == 0
    for model, opt, rot in runs.values():
        train(model, opt, rot, range(15, 16))
    assert not torch.equal(mf.lm_head.weight, mk.lm_head.weight)  # old moments vs fresh ones


def test_orders_and_lisa() -> None:
    model = tiny_llama(layers=6)
    opt = torch.optim.AdamW(model.parameters())
    emb = model.model.embed_tokens.weight
    rot = tfz.RotatingFreeze(model, opt, switch_every=1, order="random", active=2, seed=3,
                             always=["model.embed_tokens", "model.norm"])
    assert [g for g, _ in rot.groups] == [f"model.layers.{i}" for i in range(6)]
    for _ in range(9):
        assert emb.requires_grad and model.model.norm.weight.requires_grad  # LISA's always
        assert sum(p.requires_grad for p in model.model.layers.parameters()) == 2 * 9
        rot.step()
    draws = [names for _, names in rot.events]
    # random reshuffling: each cycle of 3 windows covers all 6 layers exactly once
    for c in range(3):
        cycle = [n for names in draws[3 * c:3 * c + 3] for n in names]
        assert sorted(cycle) == sorted(g for g, _ in rot.groups)
    model2 = tiny_llama(layers=6)
    rot2 = tfz.RotatingFreeze(model2, torch.optim.AdamW(model2.parameters()), switch_every=1,
                              order="random", active=2, seed=3,
                              always=["model.embed_tokens", "model.norm"])
    for _ in range(9):
        rot2.step()
    assert [names for _, names in rot2.events] == draws  # same seed, same draws (every rank)
    model3 = tiny_llama(layers=3)
    rot3 = tfz.RotatingFreeze(model3, torch.optim.SGD(model3.parameters(), lr=0.1),
                              switch_every=1, order="ascending")
    for _ in range(4):
        rot3.step()
    assert [n for _, (n,) in rot3.events] == ["model.layers.0", "model.layers.1",
                                              "model.layers.2", "head", "model.layers.0"]


def test_bad_settings_are_refused_and_change_nothing() -> None:
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TorchfreezeError, match="active=5 but there are 5 rotating groups"):
        tfz.RotatingFreeze(model, opt, active=5)
    with pytest.raises(TorchfreezeError, match="order='reverse'"):
        tfz.RotatingFreeze(model, opt, order="reverse")  # type: ignore[arg-type]
    with pytest.raises(TorchfreezeError, match="switch_every=0"):
        tfz.RotatingFreeze(model, opt, switch_every=0)
    partial = torch.optim.AdamW(model.model.layers[3].parameters())
    with pytest.raises(TorchfreezeError, match="does not hold .*AdamW\\(model.parameters"):
        tfz.RotatingFreeze(model, partial)
    half = tiny_llama().to(torch.bfloat16)
    with pytest.raises(TorchfreezeError, match="torch.bfloat16: .* float32"):
        tfz.RotatingFreeze(half, torch.optim.AdamW(half.parameters()))
    assert [p.requires_grad for p in model.parameters()] == flags and not opt.state


def test_bfloat16_weights_are_refused_saying_what_to_do_and_that_works() -> None:
    half = tiny_llama().to(torch.bfloat16)
    with pytest.raises(TorchfreezeError) as err:
        tfz.RotatingFreeze(half, torch.optim.AdamW(half.parameters()))
    msg = str(err.value)
    for advice in ("38 of them (model.layers.0.self_attn.q_proj.weight", "model.float()",
                   "dtype=torch.float32", "torch.autocast(device_type, dtype=torch.bfloat16)",
                   "precision='bf16-mixed', not 'bf16-true'", "bf16=True with a float32 model"):
        assert advice in msg, advice
    assert all(p.requires_grad for p in half.parameters())
    # what it says: float32 weights, the forward in bfloat16 under autocast
    model, opt, rot = build()
    before = weights(model)
    for i in range(4):
        x = batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        rot.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {n for g, names in rot.groups if g in ("head", "model.layers.3")
                     for n in names}
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items()
               if k != "step")


def test_lightning_bf16_true_is_refused_at_fit_start(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from torchfreeze.integrations.lightning import RotatingFreezeCallback

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, precision="bf16-true",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[RotatingFreezeCallback(switch_every=1)])
    data = torch.utils.data.DataLoader([batch(i)[0] for i in range(4)], batch_size=2)
    with pytest.raises(TorchfreezeError, match="precision='bf16-mixed', not 'bf16-true'"):
        trainer.fit(lightning_lm(), data)


def test_load_state_dict_refuses_other_settings_and_other_objects() -> None:
    *_, rot = build()
    sd = rot.state_dict()
    m2 = tiny_llama()
    rot2 = tfz.RotatingFreeze(m2, torch.optim.AdamW(m2.parameters()), switch_every=5)
    with pytest.raises(FreezeStateError, match="switch_every: saved 3, here 5"):
        rot2.load_state_dict(sd)
    with pytest.raises(FreezeStateError, match="expected a state saved by RotatingFreeze"):
        rot2.load_state_dict(tfz.freeze_state(m2))
    assert rot2.active == ["head"] and rot2.steps == 0


def test_scheduler_stays_aligned_through_switches() -> None:
    model, opt, rot = build()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=6)
    for i in range(8):
        train(model, opt, rot, range(i, i + 1))
        sched.step()
    assert len(opt.param_groups) == len(sched.base_lrs) == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_gradient_checkpointing_trains_the_active_block() -> None:
    model, opt, rot = build()
    model.gradient_checkpointing_enable()
    model.train()
    train(model, opt, rot, range(3))  # the head first (embedding tied to lm_head)
    before = weights(model)
    train(model, opt, rot, range(3, 5))  # layers.3 inside checkpointed blocks
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {n for n, _ in model.model.layers[3].named_parameters(prefix="model.layers.3")}


def test_tied_embedding_is_the_head_group_and_shown_tied() -> None:
    model = tiny_llama()
    groups = tfz.layers(model)
    head = groups[-1]
    assert head.kind == "head" and "model.embed_tokens.weight" in head.param_names
    assert head.tied == (("model.embed_tokens.weight", "lm_head.weight"),)
    assert "tied: model.embed_tokens.weight = lm_head.weight" in str(head)
    opt = torch.optim.AdamW(model.parameters())
    rot = tfz.RotatingFreeze(model, opt, switch_every=1)
    rot.step()  # the head (with its tied embedding) leaves
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.requires_grad


def _ddp_rotation(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_llama(layers=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ddp = DistributedDataParallel(model)
    rot = tfz.RotatingFreeze(ddp, opt, switch_every=2, order="random", seed=1)
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(9):
        x = torch.randint(0, 96, (2, 12), generator=g)
        loss = rot.model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        rot.step()
        opt.zero_grad()
    return {"weights": weights(model), "events": rot.events, "groups": dict(rot.groups)}


def test_ddp_ranks_stay_bit_identical_across_switches(tmp_path: Any) -> None:
    r0, r1 = run_ranks(_ddp_rotation, tmp_path)
    assert len(r0["events"]) == 5 and r0["events"] == r1["events"]
    assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in r0["weights"])
    start = tiny_llama(layers=3)
    moved = {n for n, p in start.named_parameters() if not torch.equal(p, r0["weights"][n])}
    # every window trained at least one step: what moved is exactly the groups drawn
    drawn = {n for _, groups in r0["events"] for g in groups for n in r0["groups"][g]}
    assert moved == drawn and len(drawn) < len(r0["weights"]) + 1


def test_data_parallel_is_looked_through_and_trains_like_the_bare_model() -> None:
    model, opt, rot = build()
    train(model, opt, rot, range(8))
    bare = (weights(model), rot.events, optimizer_state_bytes(opt))

    inner = tiny_llama()
    dp = nn.DataParallel(inner)  # on CPU its forward calls the module
    opt = torch.optim.AdamW(dp.parameters(), lr=1e-2, weight_decay=0.1)
    with tfz.verify(dp, strict=True) as report:
        rot = tfz.RotatingFreeze(dp, opt, switch_every=3)
        assert rot.model is dp and [g for g, _ in rot.groups] == [
            "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "head"]
        train(inner, opt, rot, range(8))
    assert report.ok and tfz.check(dp, opt).ok
    assert rot.events == bare[1]
    assert all(torch.equal(bare[0][n], p) for n, p in inner.named_parameters())
    assert optimizer_state_bytes(opt) == bare[2]
    # the state names the inner model's groups: it resumes without the wrapper too
    m2 = tiny_llama()
    rot2 = tfz.RotatingFreeze(m2, torch.optim.AdamW(m2.parameters()), switch_every=3)
    rot2.load_state_dict(rot.state_dict())
    assert rot2.active == rot.active and rot2.steps == 8


class _LMData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = batch(i)[0]
        return {"input_ids": x, "labels": x}


def _hf_fit(out: Any, callbacks: list[Any], resume: str | None = None) -> tuple[Any, Any]:
    from transformers import Trainer

    from ._hf import training_args

    model = tiny_llama()
    trainer = Trainer(model=model, args=training_args(out, weight_decay=0.0, save_steps=3),
                      train_dataset=_LMData(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_hf_callback_frees_state_and_resumes_bit_identical_unlike_a_flag_only_callback(
        tmp_path: Any) -> None:
    from transformers import TrainerCallback

    from torchfreeze.integrations.transformers import RotatingFreezeCallback

    class FlagsOnly(TrainerCallback):  # LMFlow #726: flips requires_grad, keeps the state
        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kw: Any) -> None:
            layer = (state.global_step // 2) % 4
            for i, blk in enumerate(model.model.layers):
                blk.requires_grad_(i == layer)

    _, flag_trainer = _hf_fit(tmp_path / "flags", [FlagsOnly()])
    flag_bytes = optimizer_state_bytes(flag_trainer.optimizer)

    cb = RotatingFreezeCallback(switch_every=2)
    model, trainer = _hf_fit(tmp_path / "a", [cb])
    full = sum(8 * p.numel() + 4 for p in model.parameters())
    assert flag_bytes == full  # every layer that ever trained keeps its AdamW state
    assert cb.rotation.steps == 8 and len(cb.rotation.events) == 5
    assert optimizer_state_bytes(trainer.optimizer) == 0  # step 8 just switched: all freed

    resumed, _ = _hf_fit(tmp_path / "b", [RotatingFreezeCallback(switch_every=2)],
                         resume=str(tmp_path / "a/checkpoint-3"))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_lightning_callback_frees_state_and_resumes_bit_identical(tmp_path: Any) -> None:
    import lightning.pytorch as pl

    from torchfreeze.integrations.lightning import RotatingFreezeCallback

    data = torch.utils.data.DataLoader([batch(i)[0] for i in range(12)], batch_size=4)

    def fit(out: Any, epochs: int, ckpt: str | None = None) -> tuple[Any, Any, Any]:
        module = lightning_lm()
        cb = RotatingFreezeCallback(switch_every=2)
        saver = pl.callbacks.ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=out, callbacks=[cb, saver])
        trainer.fit(module, data, ckpt_path=ckpt)
        return module, trainer, cb

    module, trainer, cb = fit(tmp_path / "a", 3)  # 9 steps: mid-block at every epoch end
    rot = cb.rotation
    assert rot.steps == 9 and [s for s, _ in rot.events] == [0, 2, 4, 6, 8]
    params = dict(module.named_parameters())
    active = {n for g, names in rot.groups if g in rot.active for n in names}
    held = {n for n, p in params.items() if p in trainer.optimizers[0].state}
    assert held == active  # only the active group holds AdamW state
    resumed, _, _ = fit(tmp_path / "b", 3, ckpt=str(tmp_path / "a" / "epoch=0.ckpt"))
    for (name, a), (_, b) in zip(module.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


PL_DDP_SCRIPT = """
import os, torch
import lightning.pytorch as pl
from transformers import LlamaConfig, LlamaForCausalLM
from torchfreeze.integrations.lightning import RotatingFreezeCallback

def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True))

class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()

    def training_step(self, x, _):
        return self.lm(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

class Record(pl.Callback):
    # after the rotation's own hook: the weights of every group as it leaves
    def __init__(self, rot_cb):
        self.rot_cb, self.left, self.wrappers = rot_cb, {{}}, []

    def _wrapper(self, trainer):  # held, so an id is never reused
        if not any(w is trainer.strategy.model for w in self.wrappers):
            self.wrappers.append(trainer.strategy.model)

    def on_train_start(self, trainer, module):
        self.prev = list(self.rot_cb.rotation.active)
        self._wrapper(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rot = self.rot_cb.rotation
        assert trainer.strategy.model is rot.model
        self._wrapper(trainer)
        params = dict(module.named_parameters())
        for g, names in rot.groups:
            if g in self.prev and g not in rot.active:
                self.left[g] = {{n: params[n].detach().clone() for n in names}}
        self.prev = list(rot.active)

module = LM()
before = {{n: p.detach().clone() for n, p in module.named_parameters()}}
rot_cb = RotatingFreezeCallback(switch_every=2, order="random", seed=1)
rec = Record(rot_cb)
data = [torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(i))
        for i in range(28)]  # 2 ranks x 7 steps x batch 2, each rank its own half
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, callbacks=[rot_cb, rec],
                     default_root_dir={out!r})
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
rot = rot_cb.rotation
opt = trainer.optimizers[0]
torch.save({{"before": before,
            "after": {{n: p.detach().clone() for n, p in module.named_parameters()}},
            "left": rec.left, "events": rot.events, "groups": dict(rot.groups),
            "active": rot.active, "steps": rot.steps, "wrappers": len(rec.wrappers),
            "held": sorted(n for n, p in module.named_parameters() if p in opt.state)}},
           os.path.join({out!r}, f"rank{{trainer.global_rank}}.pt"))
"""


def test_lightning_callback_under_ddp_two_processes(tmp_path: Any) -> None:
    """Lightning ``strategy="ddp"``, 2 gloo processes, 7 steps of 2-step blocks (3 switches):
    ranks bit-identical, each inactive group as it was when it last left, what moved is
    exactly what was drawn, AdamW state for the active group only."""
    pytest.importorskip("lightning.pytorch")
    script = tmp_path / "pl_ddp_rotate.py"
    script.write_text(textwrap.dedent(PL_DDP_SCRIPT.format(out=str(tmp_path))))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 7
    assert r0["events"] == r1["events"] and [s for s, _ in r0["events"]] == [0, 2, 4, 6]
    assert r0["wrappers"] == 4  # a new DDP wrapper at fit start and at every switch
    for n, w in r0["after"].items():
        assert torch.equal(w, r1["after"][n]), n  # ranks bit-identical
    groups, after, before = r0["groups"], r0["after"], r0["before"]
    drawn = [g for _, names in r0["events"] for g in names]
    assert len(set(drawn)) == 4 < len(groups)  # 2 of the 6 groups never drawn
    assert set(r0["left"]) == set(drawn) - set(r0["active"])
    for g, names in groups.items():
        if g in r0["active"]:
            continue
        expect = r0["left"].get(g) or {n: before[n] for n in names}
        for n in names:  # inactive: bit-identical to its weights when it last left
            assert torch.equal(after[n], expect[n]), n
    moved = {g for g, names in groups.items()
             if any(not torch.equal(after[n], before[n]) for n in names)}
    assert moved == set(drawn)  # each drawn group trained; nothing else did
    active = sorted(n for g in r0["active"] for n in groups[g])
    assert r0["held"] == r1["held"] == active  # mid-block: state for the active group only


def test_callbacks_refuse_unknown_options_and_the_hf_one_refuses_keep() -> None:
    from torchfreeze.integrations.lightning import RotatingFreezeCallback as PLRot
    from torchfreeze.integrations.transformers import RotatingFreezeCallback as HFRot

    for cls in (PLRot, HFRot):
        with pytest.raises(TorchfreezeError, match=r"unknown options .*switch_every="):
            cls(interval=5)
    with pytest.raises(TorchfreezeError, match="trainer_state.json"):
        HFRot(state="keep")
    assert PLRot(state="keep").rotation is None  # Lightning checkpoints hold tensors


def test_empty_layers_and_always_are_refused_naming_the_problem() -> None:
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TorchfreezeError, match="RotatingFreeze needs at least 1 layer group"):
        tfz.RotatingFreeze(model, opt, layers=[])
    with pytest.raises(tfz.SelectionError, match="always= \\[\\] is empty"):
        tfz.RotatingFreeze(model, opt, always=[])
    assert all(p.requires_grad for p in model.parameters()) and not opt.state
