"""`torchfreeze demo`: the embedded transfer-learning run (digits 0-4 -> 5-9)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from torchfreeze.cli import main
from torchfreeze.demo import STRATEGIES, run_demo
from torchfreeze.errors import TorchfreezeError

# Seed 3 at one epoch: full fine-tune 93.1%, linear probe 92.2%, from scratch 74.4%.
# Over seeds 0-9 at one epoch, full fine-tune beats scratch in 8 of 10 (mean +6.5 points);
# with 20 labels per class the run-to-run spread is ~10 points, so a fixed seed is pinned.
SEED = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--task", "digits", "--epochs", "1", "--seed", str(SEED),
                     "--out", str(out)])
    return {"code": code, "stdout": buf.getvalue(), "out": out,
            "json": json.loads((out / "results.json").read_text())}


def test_demo_exits_0_and_prints_the_results_table(demo):
    assert demo["code"] == 0
    text = demo["stdout"]
    header = next(line for line in text.splitlines() if "strategy" in line)
    for column in ("test accuracy", "trainable", "wall time", "frozen parts"):
        assert column in header
    for label in STRATEGIES.values():
        assert label in text
    assert "excluded" in text and "head.weight" in text  # load_pretrained's report: head skipped


def test_demo_writes_the_png_and_the_json(demo):
    png = demo["out"] / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 1000 and height > 400  # two panels side by side
    data = demo["json"]
    assert list(data["strategies"]) == list(STRATEGIES)
    for r in data["strategies"].values():
        assert len(r["accuracy_per_epoch"]) == 1 and 0.0 <= r["accuracy"] <= 1.0
        assert set(r["relative_weight_change"]) == {"stem", "block1", "block2", "head"}
    assert data["load_report"]["excluded"] == ["head.weight", "head.bias"]
    assert len(data["load_report"]["loaded"]) == 18


def test_frozen_parts_are_verified_unchanged(demo):
    s = demo["json"]["strategies"]
    for key in ("linear-probe", "head-cached", "gradual"):
        assert s[key]["verify"]["verdict"] == "ok", key
        assert s[key]["verify"]["changed_frozen"] == []
        assert s[key]["verify"]["checked"] == 18  # 3 blocks x (conv, BN weight/bias, 3 stats)
    assert s["full"]["verify"]["verdict"] == "nothing frozen"
    change = s["linear-probe"]["relative_weight_change"]
    assert change["stem"] == change["block1"] == change["block2"] == 0.0
    assert change["head"] > 0.1
    assert s["linear-probe"]["trainable_params"] == 256 * 5 + 5


def test_transfer_beats_scratch_at_equal_epochs(demo):
    s = demo["json"]["strategies"]
    assert s["full"]["accuracy"] > s["scratch"]["accuracy"] + 0.05
    assert s["linear-probe"]["accuracy"] > s["scratch"]["accuracy"] + 0.05


def test_feature_cache_changes_speed_not_numbers(demo):
    s = demo["json"]["strategies"]
    assert s["head-cached"]["accuracy_per_epoch"] == s["linear-probe"]["accuracy_per_epoch"]
    assert s["head-cached"]["loss_per_epoch"] == s["linear-probe"]["loss_per_epoch"]
    cache = s["head-cached"]["feature_cache"]
    assert cache["misses"] == demo["json"]["data"]["train"]  # each image through the backbone once


def test_demo_checkpoints_feed_torchfreeze_diff(demo, capsys):
    pre, probe = str(demo["out"] / "pretrained.pt"), str(demo["out"] / "linear-probe.pt")
    assert main(["diff", pre, probe, "--expect-frozen", "backbone"]) == 0
    assert main(["diff", pre, probe, "--expect-frozen", "backbone", "head"]) == 1
    assert "head.weight" in capsys.readouterr().err


def test_demo_is_deterministic_with_a_seed(demo, tmp_path):
    again = run_demo(epochs=1, strategies=["full", "scratch"], out=tmp_path, seed=SEED,
                     progress=False, console=_quiet())
    for key in ("full", "scratch"):
        first = demo["json"]["strategies"][key]
        assert again["strategies"][key]["accuracy"] == first["accuracy"]
        assert again["strategies"][key]["loss_per_epoch"] == first["loss_per_epoch"]
    assert torch.get_num_threads() == 1  # conftest's setting is restored afterwards


def test_demo_strategies_option_and_errors(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--task", "digits", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(TorchfreezeError, match="unknown strategy 'probe'"):
        run_demo(strategies=["probe"], out=tmp_path, console=_quiet())
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    out = Path(tmp_path) / "new"
    assert main(["demo", "--task", "digits", "--epochs", "1", "--strategies", "scratch",
                 "--out", str(out)]) == 2
    assert "pip install 'torchfreeze[demo]'" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def _quiet() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO())


def test_transfer_verdict_is_honest_about_who_leads() -> None:
    from torchfreeze.demo import _transfer_verdict

    def result(label: str, curve: list[float], trainable: int = 100) -> dict:
        return {"label": label, "accuracy_per_epoch": curve, "trainable_params": trainable,
                "total_params": 2000}

    caught_up = _transfer_verdict({"linear-probe": result("linear probe", [0.8, 0.9], 100),
                                   "scratch": result("from scratch", [0.7, 0.95])})
    assert caught_up.startswith("after epoch 1: best transfer (linear probe) 80.0% vs from "
                                "scratch 70.0%; after epoch 2: linear probe 90.0% vs 95.0%")
    assert "catches up" in caught_up and "20x fewer trainable parameters" in caught_up
    leads = _transfer_verdict({"full": result("full fine-tune", [0.8, 0.97]),
                               "scratch": result("from scratch", [0.7, 0.95])})
    assert "catches up" not in leads and "97.0% vs 95.0%" in leads
    assert _transfer_verdict({"scratch": result("from scratch", [0.7])}) is None
