"""The `torchfreeze` command: diff --expect-frozen, inspect, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchfreeze as tfz
from torchfreeze.cli import build_parser, diff_checkpoints, main, match_keys
from torchfreeze.errors import SelectionError

from ._models import tiny_bert


@pytest.fixture(scope="module")
def bert_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT before and after one real AdamW step with the embeddings and layer 0 frozen."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_bert(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(before, root / "before.pt")
    save_file({k: v.contiguous() for k, v in before.items()}, str(root / "before.safetensors"))
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.0")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (4, 8))
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    torch.save(model.state_dict(), root / "after.pt")
    # the same file wrapped the way training scripts save it
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / "after-train.ckpt")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    return {p.stem if p.suffix != ".safetensors" else "before-st": p for p in root.iterdir()}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- diff


def test_diff_exits_0_when_expected_frozen_tensors_did_not_move(bert_ckpts, capsys):
    code, out, err = run(capsys, "diff", str(bert_ckpts["before"]), str(bert_ckpts["after"]),
                         "--expect-frozen", "bert.embeddings", "bert.encoder.layer.0")
    assert code == 0, err
    assert "bert.encoder.layer.1.attention.self" in out  # grouped by module
    assert "OK: all" in out and err == ""


def test_diff_exits_1_and_names_the_tensors_that_moved(bert_ckpts, capsys):
    code, out, err = run(capsys, "diff", str(bert_ckpts["before"]),
                         str(bert_ckpts["after-train"]),  # nested checkpoint, unwrapped
                         "--expect-frozen", "bert.encoder.layer.{0..1}")
    assert code == 1
    assert "MOVED" in out  # the table marks the module
    assert "FAILED" in err and "bert.encoder.layer.1.attention.self.query.weight" in err
    assert "bert.encoder.layer.0." not in err.split("changed:", 1)[1]  # layer 0 did not move
    assert len(err.strip().splitlines()) == 1


def test_diff_json_lists_exactly_the_trained_tensors(bert_ckpts, capsys):
    code, out, _ = run(capsys, "diff", str(bert_ckpts["before-st"]), str(bert_ckpts["after"]),
                       "--json", "--expect-frozen", "re:bert\\.encoder\\.layer\\.1\\..*")
    assert code == 1
    data = json.loads(out)
    after = torch.load(bert_ckpts["after"], weights_only=True)
    before = torch.load(bert_ckpts["before"], weights_only=True)
    truly_changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {t["name"] for t in data["tensors"] if t["status"] != "same"} == truly_changed
    assert truly_changed and all(not k.startswith("bert.embeddings") for k in truly_changed)
    assert data["ok"] is False
    assert set(data["changed_frozen"]) == {k for k in truly_changed if ".layer.1." in k}
    query = next(t for t in data["tensors"]
                 if t["name"] == "bert.encoder.layer.1.attention.self.query.weight")
    w0, w1 = before[query["name"]], after[query["name"]]
    assert query["rel_change"] == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-6)


def test_diff_selector_matching_nothing_is_a_usage_error_with_close_names(bert_ckpts, capsys):
    code, out, err = run(capsys, "diff", str(bert_ckpts["before"]), str(bert_ckpts["after"]),
                         "--expect-frozen", "bert.embedings")
    assert code == 2 and out == ""
    assert "matched no tensor" in err and "'bert.embeddings'" in err
    assert len(err.strip().splitlines()) == 1


def test_diff_plot_writes_a_png(bert_ckpts, capsys, tmp_path):
    png = tmp_path / "drift.png"
    code, _, err = run(capsys, "diff", str(bert_ckpts["before"]), str(bert_ckpts["after"]),
                       "--expect-frozen", "bert.embeddings", "--plot", str(png), "--depth", "4")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[1] > 400


def test_diff_of_identical_checkpoints_changes_nothing(bert_ckpts):
    sd = torch.load(bert_ckpts["before"], weights_only=True)
    d = diff_checkpoints(sd, dict(sd), expect_frozen=["bert"])
    assert d.ok and d.changed == ()
    assert all(m.rel_change == 0.0 for m in d.modules)


def test_diff_counts_missing_and_reshaped_tensors_as_moved():
    a = {"body.w": torch.ones(3), "body.b": torch.ones(2), "head.w": torch.ones(2)}
    b = {"body.w": torch.ones(4), "head.w": torch.ones(2), "extra": torch.ones(1)}
    d = diff_checkpoints(a, b, expect_frozen=["body"])
    status = {t.name: t.status for t in d.tensors}
    assert status == {"body.w": "reshaped", "body.b": "removed", "head.w": "same",
                      "extra": "added"}
    assert d.changed_frozen == ("body.w", "body.b")


# --------------------------------------------------------------------------- selectors


def test_match_keys_follows_the_shared_grammar():
    keys = ["enc.layer.0.q.weight", "enc.layer.0.v.weight", "enc.layer.1.q.weight",
            "enc.layer.10.q.weight", "head.weight"]
    assert match_keys(keys, ["enc.layer.1"]) == ["enc.layer.1.q.weight"]  # not layer.10
    assert match_keys(keys, ["enc.layer.{0..1}.q"]) == keys[0:1] + keys[2:3]
    assert match_keys(keys, ["*.v.*", "head"]) == [keys[1], keys[4]]
    assert match_keys(keys, ["re:enc\\.layer\\.\\d\\.q\\.weight"]) == [keys[0], keys[2]]
    with pytest.raises(SelectionError, match=r"'enc.layer.2' \(from 'enc.layer.{1..2}'"):
        match_keys(keys, ["enc.layer.{1..2}"])  # every brace alternative must match
    with pytest.raises(SelectionError, match="not a valid regular expression"):
        match_keys(keys, ["re:(("])


# --------------------------------------------------------------------------- inspect


def test_inspect_safetensors(bert_ckpts, capsys):
    code, out, err = run(capsys, "inspect", str(bert_ckpts["before-st"]), "--depth", "3")
    assert code == 0, err
    assert "bert.encoder.layer" in out and "safetensors" in out


@pytest.mark.parametrize("name", ["before", "after-train"])
def test_inspect_pt_state_dict_json(bert_ckpts, capsys, name):
    code, out, err = run(capsys, "inspect", str(bert_ckpts[name]), "--json")
    assert code == 0, err
    data = json.loads(out)
    sd = torch.load(bert_ckpts["before"], weights_only=True)
    assert data["tensors"] == len(sd)
    assert data["params"] == sum(t.numel() for t in sd.values())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["bert.embeddings.word_embeddings.weight"]["shapes"] == [[100, 32]]


def test_inspect_with_model_shows_the_dry_run(bert_ckpts, capsys, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))\n")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)).state_dict(),
               tmp_path / "ck.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, out, err = run(capsys, "inspect", "ck.pt", "--model", "my_models:build", "--json")
    assert code == 0, err
    report = json.loads(out)["load_pretrained"]
    assert report["dry_run"] is True
    assert sorted(report["loaded"]) == ["0.bias", "0.weight"]
    assert set(report["mismatched"]) == {"1.weight", "1.bias"}  # 3-class head vs 2-class
    code, _, err = run(capsys, "inspect", "ck.pt", "--model", "my_models")
    assert code == 2 and "module:factory" in err


# --------------------------------------------------------------------------- errors, help


@pytest.mark.parametrize("argv", [
    ["inspect", "no/such/file.pt"],
    ["diff", "no/such/file.pt", "no/such/other.pt"],
    ["inspect", "{corrupt}"],
    ["diff", "{before}", "{corrupt}"],
    ["inspect", "{before}", "--depth", "-1"],
])
def test_bad_input_is_one_line_exit_2(bert_ckpts, capsys, argv):
    argv = [a.format(**{k: str(v) for k, v in bert_ckpts.items()}) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"torchfreeze {argv[0]}: error: ")
    assert "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torchfreeze.cli", "inspect",
                           str(tmp_path / "missing.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "missing.safetensors" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("command", ["demo", "inspect", "diff"])
def test_every_command_has_help_with_exit_codes(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: torchfreeze {command}" in out and "exit status: 0" in out


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "diff", "only-one.pt")
    assert code == 2 and "needs two checkpoint files" in err
    code, _, err = run(capsys, "demo", "--strategies", "linear-prob")
    assert code == 2 and "did you mean 'linear-probe'" in err
    assert {a.dest for a in build_parser()._subparsers._group_actions[0].choices["diff"]
            ._actions} >= {"files", "expect_frozen", "plot", "json"}


# ------------------------------------------------------------------ rough edges
def test_inspect_with_a_factory_that_raises_is_one_line_and_exit_2(tmp_path, capsys,
                                                                    monkeypatch):
    (tmp_path / "badmodels.py").write_text("def build():\n    raise ValueError('no config')\n")
    ckpt = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(ckpt))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "inspect", str(ckpt), "--model", "badmodels:build")
    assert code == 2
    assert "the factory raised ValueError: no config" in err and "Traceback" not in err + out


def test_diff_checkpoints_accepts_paths_and_refuses_other_things(tmp_path):
    a, b = {"w": torch.ones(2), "v": torch.zeros(2)}, {"w": torch.ones(2), "v": torch.ones(2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    d = diff_checkpoints(str(tmp_path / "a.safetensors"), tmp_path / "b.safetensors",
                         expect_frozen=["w"])
    assert d.ok and d.changed == ("v",)
    with pytest.raises(TypeError, match=r"state dict or a checkpoint path, got a list.*"
                       r"tfz.read_state_dict"):
        diff_checkpoints([1, 2], a)  # type: ignore[arg-type]


def test_diff_uses_the_bitwise_rule_of_verify_nan_is_unchanged(tmp_path, capsys):
    sd = {"w": torch.tensor([float("nan"), 1.0]), "b": torch.ones(3)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "b.safetensors"))
    code, out, err = run(capsys, "diff", str(tmp_path / "a.safetensors"),
                         str(tmp_path / "b.safetensors"), "--expect-frozen", "w")
    assert code == 0, out + err
    model = torch.nn.Linear(2, 1).requires_grad_(False)  # verify agrees: NaN stays NaN
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with tfz.verify(model) as report:
        pass
    assert report.ok


def test_a_dtype_change_is_named_as_such_not_as_a_reshape():
    a = {"w": torch.ones(2, 2)}
    d = diff_checkpoints(a, {"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    assert [t.status for t in d.tensors] == ["retyped"]
    assert "retyped: w" in str(d) or "retyped" in json.dumps(d.to_dict())


def test_inspect_does_not_count_integer_buffers_as_params(tmp_path):
    save_file({"emb.weight": torch.zeros(4, 3), "emb.position_ids": torch.arange(10)},
              str(tmp_path / "m.safetensors"))
    info = tfz.inspect_checkpoint(str(tmp_path / "m.safetensors"), depth=1)
    assert info.params == 12 and [r.params for r in info.rows] == [12]


def test_demo_help_lists_every_strategy():
    from torchfreeze.demo_news import STRATEGIES

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    text = demo.format_help()
    assert all(name in text for name in STRATEGIES), [n for n in STRATEGIES if n not in text]


def test_diff_reads_a_trusted_pickle_with_the_flag_its_error_names(tmp_path, capsys):
    import argparse

    for name in ("a.pt", "b.pt"):  # a Python object beside the weights: weights_only refuses
        torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, tmp_path / name)
    code, _, err = run(capsys, "diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert code == 2 and "--unsafe-pickle" in err
    code, _, err = run(capsys, "diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"),
                       "--unsafe-pickle")
    assert code == 0, err
