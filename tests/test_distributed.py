"""Distributed freezing on real processes: 2 ranks, gloo, CPU.

Each 2-rank run costs seconds of process start-up, so one run plays several
scenarios (module-scoped fixtures) and the tests below assert on what each rank
reported. Every run has a hard deadline (see ``_dist_utils.run_ranks``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchfreeze as tfz
import torchfreeze.distributed as tfd
from torchfreeze.errors import DistributedFreezeError

from ._dist_utils import free_port, run_ranks_once

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch built without torch.distributed / gloo"),
]


def _net() -> nn.Sequential:
    torch.manual_seed(0)  # same initial weights on every rank, like a pretrained model
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    )


def _batch(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(16, 4, generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    model.train()
    for _ in range(steps):
        model(_batch(gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in module.state_dict().items()
    }


def _outcome(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


# ---------------------------------------------------------------------------
# DDP: one 2-rank run, several scenarios


def _ddp_scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # 1. what users do by hand: flip requires_grad after wrapping
    model = _net()
    tfz.freeze(model, "0", "1")
    ddp = DDP(model)
    for p in model[0].parameters():
        p.requires_grad_(True)
    _train(ddp, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), rank)
    out["naive"] = _state(model)
    del ddp

    # 2. torchfreeze.distributed.unfreeze on a wrapper built with non-default settings
    model = _net()
    tfz.freeze(model, "0", "1")
    with pytest.warns(FutureWarning):  # torch 2.13 deprecates broadcast_buffers
        ddp = DDP(model, bucket_cap_mb=1, gradient_as_bucket_view=True, broadcast_buffers=False)
    out["kwargs_before"] = tfd.construction_kwargs(ddp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01,
                            weight_decay=0.1)
    out["initial"] = _state(model)
    old = ddp
    ddp = tfd.unfreeze(ddp, "module.0", optimizer=opt, lr_mult=0.5)
    out["kwargs_after"] = tfd.construction_kwargs(ddp)
    out["same_group"] = out["kwargs_after"].pop("process_group") is out["kwargs_before"].pop(
        "process_group")
    out["groups"] = [(g.get("name"), g["lr"], len(g["params"])) for g in opt.param_groups]
    _train(ddp, opt, rank)
    out["unfrozen"] = _state(model)
    out["stale_wrapper"] = _outcome(lambda: old(torch.zeros(2, 4)))

    # 3. refusals and collective errors change nothing on any rank
    flags = [p.requires_grad for p in model.parameters()]
    n_groups = len(opt.param_groups)
    out["tfz_unfreeze"] = _outcome(lambda: tfz.unfreeze(ddp, "module.1"))
    out["tfz_freeze"] = _outcome(lambda: tfz.freeze(ddp, "module.3"))
    typo = "module.1" if rank == 0 else "module.l"  # rank 1 has a typo
    out["typo"] = _outcome(lambda: tfd.unfreeze(ddp, typo, optimizer=opt))
    differ = "module.1" if rank == 0 else "module.1.weight"
    out["differ"] = _outcome(lambda: tfd.unfreeze(ddp, differ, optimizer=opt))
    out["freeze_all"] = _outcome(lambda: tfd.freeze(ddp))
    bad_opt = opt if rank == 0 else "not an optimizer"  # whatever rank 1 raises, 0 hears
    out["bad_optimizer"] = _outcome(lambda: tfd.unfreeze(ddp, "module.1", optimizer=bad_opt))
    out["bad_scheduler"] = _outcome(lambda: tfd.unfreeze(ddp, "module.1", optimizer=opt,
                                                         scheduler=object()))
    out["unchanged"] = (flags == [p.requires_grad for p in model.parameters()]
                        and n_groups == len(opt.param_groups))
    _train(ddp, opt, rank, steps=1)  # the wrapper still works after the failed calls
    out["after_errors"] = _state(model)

    # 4. torchfreeze.distributed.freeze under static_graph, with a communication hook
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = _net()
    ddp = DDP(model, static_graph=True)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(ddp, opt, rank, steps=1)
    before = _state(model)
    ddp = tfd.freeze(ddp, "0", "1")
    out["freeze_kwargs"] = tfd.construction_kwargs(ddp)
    del out["freeze_kwargs"]["process_group"]  # not picklable
    out["freeze_hooks"] = [h.__name__ for h, _ in ddp._comm_hooks]
    out["bn_training_after_train"] = (ddp.train(), model[1].training)[1]
    _train(ddp, opt, rank)
    out["freeze_before"], out["freeze_after"] = before, _state(model)
    probe = DDP(model)
    probe._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    flags = [p.requires_grad for p in model.parameters()]
    out["builtin_hook"] = _outcome(lambda: tfd.unfreeze(probe, "0"))
    out["builtin_unchanged"] = flags == [p.requires_grad for p in model.parameters()]

    # 5. GradualUnfreeze re-wraps at each milestone; gu.model is the current wrapper
    model = _net()
    tfz.freeze(model, "0", "3")  # the scheduled selections, frozen before wrapping
    first = ddp = DDP(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gu = tfz.GradualUnfreeze(ddp, opt, {1: "3", 2: "0"}, lr_mult=0.1, scheduler=sched)
    start = _state(model)
    wrappers = []
    for epoch in range(3):
        out.setdefault("gu_applied", []).append(gu.step(epoch))
        wrappers.append(gu.model)
        _train(gu.model, opt, rank, steps=2)
        sched.step()
    out["gu_new_wrappers"] = (wrappers[0] is first, wrappers[1] is not first,
                              wrappers[2] is not wrappers[1])
    out["gu_lrs"] = [g["lr"] for g in opt.param_groups]
    out["gu_start"], out["gu_end"] = start, _state(model)

    # 6. a real architecture: BERT (from a small config), unfreeze its last encoder layer
    from ._models import tiny_bert

    torch.manual_seed(0)
    bert = tiny_bert()
    tfz.freeze(bert, "bert")  # pretrained backbone frozen, classifier trains
    ddp = DDP(bert)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(300 + rank)
    start = _state(bert)
    for step in range(3):
        if step == 1:
            ddp = tfd.unfreeze(ddp, "module.bert.encoder.layer.3", optimizer=opt, lr_mult=0.5)
        ids, labels = torch.randint(0, 100, (4, 16), generator=gen), torch.randint(0, 3, (4,))
        ddp(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out["bert_start"], out["bert_end"] = start, _state(bert)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks_once(_ddp_scenarios, tmp_path_factory, "ddp")


def test_plain_requires_grad_flip_after_wrapping_desynchronises_ranks(ddp_run) -> None:
    # the failure torchfreeze.distributed prevents: DDP's reducer never heard of layer 0
    r0, r1 = ddp_run
    assert not torch.equal(r0["naive"]["0.weight"], r1["naive"]["0.weight"])
    assert torch.equal(r0["naive"]["3.weight"], r1["naive"]["3.weight"])  # known ones sync


def test_unfreeze_rewraps_so_ranks_stay_bit_identical(ddp_run) -> None:
    r0, r1 = ddp_run
    for name in r0["unfrozen"]:
        assert torch.equal(r0["unfrozen"][name], r1["unfrozen"][name]), name
    assert not torch.equal(r0["unfrozen"]["0.weight"], r0["initial"]["0.weight"])  # it trained
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):  # still frozen BN
        assert torch.equal(r0["unfrozen"][name], r0["initial"][name]), name


def test_unfreeze_adds_optimizer_group_like_tfz_unfreeze(ddp_run) -> None:
    groups = ddp_run[0]["groups"]
    assert len(groups) == 2
    assert groups[1] == ("unfreeze:0", 0.005, 2)  # "module." stripped; lr_mult * 0.01


def test_rewrap_keeps_every_construction_argument(ddp_run) -> None:
    r0 = ddp_run[0]
    assert r0["kwargs_after"] == r0["kwargs_before"]
    assert r0["kwargs_before"]["bucket_cap_mb"] == 1
    assert r0["kwargs_before"]["gradient_as_bucket_view"] is True
    assert r0["kwargs_before"]["broadcast_buffers"] is False
    assert r0["same_group"]
    assert r0["freeze_kwargs"]["static_graph"] is True
    assert r0["freeze_kwargs"]["bucket_cap_mb"] is None  # default kept: small first bucket
    assert r0["freeze_hooks"] == ["allreduce_hook"]


def test_settings_that_cannot_be_rebuilt_are_refused_before_any_change(ddp_run) -> None:
    for r in ddp_run:
        assert r["builtin_hook"].startswith("DistributedFreezeError")
        assert "built-in communication hook" in r["builtin_hook"]
        assert r["builtin_unchanged"]


def test_replaced_wrapper_refuses_to_run(ddp_run) -> None:
    assert ddp_run[0]["stale_wrapper"].startswith("DistributedFreezeError: this Distributed")
    assert "use the wrapper that call returned" in ddp_run[0]["stale_wrapper"]


def test_plain_tfz_freeze_unfreeze_on_ddp_raise_and_change_nothing(ddp_run) -> None:
    for r in ddp_run:
        assert r["tfz_unfreeze"].startswith("DistributedFreezeError")
        assert "torchfreeze.distributed.unfreeze" in r["tfz_unfreeze"]
        assert r["tfz_freeze"].startswith("DistributedFreezeError")
        assert "torchfreeze.distributed.freeze" in r["tfz_freeze"]
        assert r["unchanged"]


def test_selector_error_on_one_rank_stops_every_rank(ddp_run) -> None:
    r0, r1 = ddp_run
    assert r1["typo"].startswith("SelectionError")
    assert r0["typo"].startswith("DistributedFreezeError")
    assert "failed on rank 1: SelectionError" in r0["typo"]
    for r in ddp_run:
        assert "called differently on rank 0 and rank 1" in r["differ"]
        assert "no trainable parameter" in r["freeze_all"]
        assert r["bad_scheduler"].startswith("SchedulerError")
    assert "failed on rank 1" in r0["bad_optimizer"]
    assert r1["bad_optimizer"] != "ok"
    for name in r0["after_errors"]:  # and the job trains on, in sync
        assert torch.equal(r0["after_errors"][name], r1["after_errors"][name]), name


def test_freeze_rewraps_static_graph_and_frozen_weights_stay_put(ddp_run) -> None:
    r0, r1 = ddp_run
    assert r0["bn_training_after_train"] is False
    for name in r0["freeze_after"]:
        assert torch.equal(r0["freeze_after"][name], r1["freeze_after"][name]), name
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert torch.equal(r0["freeze_after"][name], r0["freeze_before"][name]), name
    assert not torch.equal(r0["freeze_after"]["5.weight"], r0["freeze_before"]["5.weight"])


def test_gradual_unfreeze_under_ddp_two_milestones_ranks_identical(ddp_run) -> None:
    r0, r1 = ddp_run
    assert r0["gu_applied"] == [[], [1], [2]]
    assert r0["gu_new_wrappers"] == (True, True, True)
    assert len(r0["gu_lrs"]) == 3
    # parameters; BN 1 trains here, and DDP syncs running stats at the *next* forward
    params = [n for n in r0["gu_end"] if "running" not in n and "num_batches" not in n]
    assert len(params) == 8
    for name in params:
        assert torch.equal(r0["gu_end"][name], r1["gu_end"][name]), name
    for name in ("0.weight", "3.weight", "5.weight"):  # every milestone's layer trained
        assert not torch.equal(r0["gu_end"][name], r0["gu_start"][name]), name


def test_bert_last_layer_unfrozen_under_ddp_stays_in_sync(ddp_run) -> None:
    r0, r1 = ddp_run
    for name in r0["bert_end"]:
        assert torch.equal(r0["bert_end"][name], r1["bert_end"][name]), name
    moved = {n for n in r0["bert_end"] if not torch.equal(r0["bert_end"][n], r0["bert_start"][n])}
    assert "bert.encoder.layer.3.attention.self.query.weight" in moved
    assert "classifier.weight" in moved
    assert all(n.startswith(("bert.encoder.layer.3.", "classifier.")) for n in moved), moved


def test_distributed_functions_refuse_plain_modules() -> None:
    with pytest.raises(DistributedFreezeError, match="takes a DistributedDataParallel"):
        tfd.unfreeze(_net(), "0")
    with pytest.raises(DistributedFreezeError, match="use tfz.freeze"):
        tfd.freeze(_net(), "0")


# ---------------------------------------------------------------------------
# FSDP2 (fully_shard): frozen before sharding, then unfrozen after sharding


def _fsdp_scenarios(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    model = _net()
    tfz.freeze(model, "0", "1")  # a Linear and its BatchNorm
    for i in (0, 3, 5):
        fully_shard(model[i])
    fully_shard(model)
    out["dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01,
                            weight_decay=0.1)
    before = _state(model)
    with tfz.verify(model) as report:
        _train(model, opt, rank)
    out["verify"] = (report.ok, list(report.changed_frozen), len(report.unchanged_trainable))
    out["check_errors"] = [f.code for f in tfz.check(model, optimizer=opt)
                           if f.severity == "error"]
    after = _state(model)
    out["frozen_moved"] = [k for k in ("0.weight", "0.bias", "1.weight", "1.bias",
                                       "1.running_mean", "1.running_var")
                           if not torch.equal(before[k], after[k])]
    out["trained"] = not torch.equal(before["5.weight"], after["5.weight"])

    # unfreeze after sharding, against a 1-process reference on both ranks' batches
    ref = _net()
    tfz.freeze(ref, "0", "1")
    ref.load_state_dict(after)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.01,
                                weight_decay=0.1)
    ref_opt.load_state_dict(_full_optim_state(opt, model))
    returned = tfd.unfreeze(model, "0", optimizer=opt, lr=0.02)
    tfz.unfreeze(ref, "0", optimizer=ref_opt, lr=0.02)
    out["same_module"] = returned is model
    gens = [torch.Generator().manual_seed(200 + r) for r in range(dist.get_world_size())]
    for _ in range(2):
        xs = [_batch(g) for g in gens]
        model(xs[rank]).pow(2).mean().backward()  # FSDP2 averages grads over ranks
        torch.stack([ref(x).pow(2).mean() for x in xs]).mean().backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    got, want = _state(model), _state(ref)
    out["max_diff"] = max((got[k] - want[k]).abs().max().item() for k in want)
    out["unfrozen_moved"] = not torch.equal(got["0.weight"], after["0.weight"])
    out["bn_still_frozen"] = torch.equal(got["1.running_mean"], after["1.running_mean"])

    # freeze after sharding: in place, the frozen shards stop moving
    tfd.freeze(model, "3")
    _train(model, opt, rank, steps=1)
    final = _state(model)
    out["refrozen_moved"] = [k for k in ("3.weight", "3.bias") if not torch.equal(got[k], final[k])]
    out["others_moved"] = not torch.equal(got["5.weight"], final["5.weight"])

    # MixedPrecisionPolicy: a unit wholly frozen at its first forward
    for how in ("tfz", "tfz_dist"):
        out[f"mp_{how}"] = _outcome(lambda how=how: _mixed_precision_unfreeze(how))
    return out


def _mixed_precision_unfreeze(how: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    tfz.freeze(model, "0")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for m in (model[0], model[2], model):
        fully_shard(m, mp_policy=policy)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(8, 4)
    model(x).float().pow(2).mean().backward()  # lazy init: unit 0 has nothing trainable
    opt.step()
    opt.zero_grad()
    (tfz.unfreeze if how == "tfz" else tfd.unfreeze)(model, "0", optimizer=opt)
    model(x).float().pow(2).mean().backward()
    assert model[0].weight.grad.dtype == torch.float32  # reduced in fp32, cast back
    opt.step()


def _full_optim_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """AdamW state with DTensor moments gathered (same param order as the reference)."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()  # its per-param dicts are the live ones: copy, never mutate
    sd["state"] = {
        i: {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in st.items()}
        for i, st in sd["state"].items()
    }
    return sd


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    return run_ranks_once(_fsdp_scenarios, tmp_path_factory, "fsdp")


def test_fsdp2_frozen_before_sharding_never_moves_and_verify_says_so(fsdp_run) -> None:
    for r in fsdp_run:  # verify runs on every rank, on its own DTensor shards
        assert r["dtensor"]
        assert r["frozen_moved"] == []
        assert r["trained"]
        assert r["verify"] == (True, [], 0)  # on its own shards, on every rank
        assert r["check_errors"] == []


def test_fsdp2_unfreeze_after_sharding_matches_single_process_training(fsdp_run) -> None:
    for r in fsdp_run:
        assert r["same_module"]
        assert r["unfrozen_moved"]
        assert r["bn_still_frozen"]
        assert r["max_diff"] < 1e-5  # gradients of the unfrozen layer were averaged over ranks
        assert r["refrozen_moved"] == []
        assert r["others_moved"]


def test_fsdp2_unfreeze_after_sharding_under_mixed_precision(fsdp_run) -> None:
    # FSDP2 fixes each unit's gradient dtypes at its first forward; plain requires_grad
    # flips then fail in backward. torchfreeze.distributed recomputes them.
    for r in fsdp_run:
        assert r["mp_tfz"].startswith("RuntimeError"), r["mp_tfz"]
        assert "grad_dtype" in r["mp_tfz"]
        assert r["mp_tfz_dist"] == "ok"


# ---------------------------------------------------------------------------
# the example script, under the real launcher


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    if shutil.which("torchrun"):
        return [shutil.which("torchrun")]
    return [sys.executable, "-m", "torch.distributed.run"]  # what torchrun runs


def _run_example(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [*_torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "examples" / "ddp_finetune.py"),
           "--epochs", "2", "--unfreeze-at", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=70, cwd=tmp_path,
                          env=env)


@pytest.mark.timeout(180)
def test_example_ddp_finetune_runs_under_torchrun(tmp_path) -> None:
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    # no retry: with a barrier before destroy_process_group gloo does not abort at exit
    proc = _run_example(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("epoch 0:") and "param groups 2" in line for line in lines)
    assert any(line.startswith("epoch 1:") and "param groups 3" in line for line in lines)
    assert "ranks in sync: True" in lines


def test_docstring_examples_run() -> None:
    # in a fresh process: the examples create (and destroy) a default process group
    code = ("import doctest, sys, torchfreeze.distributed as m; "
            "r = doctest.testmod(m, optionflags=doctest.ELLIPSIS); "
            "sys.exit(1 if r.failed or r.attempted < 20 else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
