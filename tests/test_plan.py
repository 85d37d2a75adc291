"""tfz.plan: memory exact against real steps, the model untouched, budgets, meta, wrappers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze._compat import storage_key
from torchfreeze.cli import main
from torchfreeze.rotate import optimizer_state_bytes

from ._models import TinyResNet, tiny_bert, tiny_convnext, tiny_hf_resnet, tiny_vit


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 2))


def tiny_llama(tied: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def measured(model: nn.Module, batch: Any, k: int, opt: str = "adamw") -> dict[str, int]:
    """Grads, optimizer state and saved activations of one real step at boundary k
    (frozen BatchNorm keeps train mode here, as in the plan's passes)."""
    tfz.freeze_to(model, k, bn="stats")
    params = [p for p in model.parameters() if p.requires_grad]
    optim = {"adamw": lambda: torch.optim.AdamW(params),
             "sgd-momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9)}[opt]()
    fixed = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) not in fixed:
            saved.setdefault(storage_key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if getattr(out, "loss", None) is not None else out.float().sum()
    loss.backward()
    optim.step()
    grads = sum({storage_key(p.grad): p.grad.untyped_storage().nbytes()
                 for p in params}.values())
    tfz.freeze_to(model, 0)
    for p in model.parameters():
        p.grad = None
    return {"grads": grads, "optimizer_state": optimizer_state_bytes(optim),
            "activations": sum(saved.values())}


def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (4, 16), generator=g),
            "labels": torch.tensor([0, 1, 2, 0])}


def test_memory_columns_are_exact_for_a_model_counted_by_hand() -> None:
    p = tfz.plan(mlp(), torch.randn(32, 64))
    assert [r.boundary for r in p.rows] == [0, 1, 2]
    sizes = [64 * 256 + 256, 256 * 256 + 256, 256 * 2 + 2]
    assert [r.trainable for r in p.rows] == [sum(sizes), sizes[1] + sizes[2], sizes[2]]
    for r, tensors in zip(p.rows, (6, 4, 2)):
        assert r.memory.weights == 4 * sum(sizes)
        assert r.memory.grads == 4 * r.trainable
        assert r.memory.optimizer_state == 8 * r.trainable + 4 * tensors  # exp_avg(_sq) + step
    # saved for backward: the input (weight grad of layer 0) and both ReLU outputs
    # (32 x 256 fp32, each also the next Linear's input) at k=0; one ReLU output less
    # per frozen group after it
    relu = 32 * 256 * 4
    assert [r.memory.activations for r in p.rows] == [32 * 64 * 4 + 2 * relu, 2 * relu, relu]
    assert all(r.memory.total == r.memory.weights + r.memory.grads + r.memory.optimizer_state
               + r.memory.activations for r in p.rows)
    assert p.rows[1].upto == "0" and p.rows[1].cache_bytes == relu


@pytest.mark.parametrize("build,batch", [
    (tiny_bert, bert_batch),
    (tiny_llama, lambda: {"input_ids": bert_batch()["input_ids"],
                          "labels": bert_batch()["input_ids"]}),
    (lambda: tiny_llama(tied=False), lambda: {"input_ids": bert_batch()["input_ids"],
                                              "labels": bert_batch()["input_ids"]}),
    (tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16),
                        "labels": torch.tensor([0, 2])}),
    (tiny_hf_resnet, lambda: {"pixel_values": torch.randn(2, 3, 32, 32),
                              "labels": torch.tensor([0, 2])}),
    (tiny_convnext, lambda: {"pixel_values": torch.randn(2, 3, 32, 32),
                             "labels": torch.tensor([0, 2])}),
    (TinyResNet, lambda: torch.randn(2, 3, 8, 8)),
], ids=["bert", "llama-tied", "llama-untied", "vit", "hf-resnet", "convnext",
        "torchvision-style-resnet"])
def test_predicted_memory_equals_a_real_training_step_at_every_boundary(build, batch) -> None:
    model, b = build(), batch()
    p = tfz.plan(model, b, repeat=1)
    for r in p.rows:
        got = measured(model, b, r.boundary)
        assert (r.memory.grads, r.memory.optimizer_state, r.memory.activations) == (
            got["grads"], got["optimizer_state"], got["activations"]), r.boundary


def test_a_tied_embedding_that_trains_keeps_the_prefix_backward_and_its_cache_off() -> None:
    model = tiny_llama()
    ids = bert_batch()["input_ids"]
    p = tfz.plan(model, {"input_ids": ids, "labels": ids}, repeat=1)
    assert p.groups[-1] == "head"
    for r in p.rows[1:]:
        assert "model.embed_tokens.weight" in r.note and "cannot be cached" in r.note
        assert r.cached_step_seconds is None and r.cached_speedup is None
    # untied: the embedding is the stem; freezing it (k=1) lets the cache in
    untied = tfz.plan(tiny_llama(tied=False), {"input_ids": ids, "labels": ids}, repeat=1)
    assert untied.rows[1].cached_step_seconds is not None and untied.rows[1].note == ""
    assert "k=1-3: model.embed_tokens.weight" in str(p)
    # the tied embedding and head left out of layers=: frozen at every boundary, so the
    # backward stops at the boundary again
    blocks = tfz.plan(model, {"input_ids": ids, "labels": ids}, layers=tfz.layers(model)[:-1],
                      repeat=1)
    assert blocks.groups == ("model.layers.0", "model.layers.1", "model.layers.2")
    assert blocks.rows[0].trainable == sum(p.numel() for p in model.model.layers.parameters())
    assert all("embed_tokens" not in r.note for r in blocks.rows)
    assert blocks.rows[2].flops < p.rows[2].flops
    assert model.lm_head.weight.requires_grad  # and nothing changed


@pytest.mark.parametrize("build,batch", [
    (lambda: tiny_llama(tied=False), lambda: {"input_ids": bert_batch()["input_ids"],
                                              "labels": bert_batch()["input_ids"]}),
    (tiny_bert, bert_batch),
    (tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16),
                        "labels": torch.tensor([0, 2])}),
], ids=["llama-untied", "bert", "vit"])
def test_the_cached_columns_agree_with_what_featurecache_accepts(build, batch) -> None:
    """Llama's rotary tables are made before layer 0 and read by every layer: a cache
    after layer 0 would replay a prefix the rest still reads, and FeatureCache refuses."""
    model, b = build(), batch()
    p = tfz.plan(model, b, repeat=1)
    verdicts = {}
    for r in p.rows[1:]:
        tfz.freeze_to(model, r.boundary)
        cache = tfz.FeatureCache(model, upto=r.upto, pin_eval=True)
        try:
            with cache.keys(list(range(len(b["labels"])))):
                model(**b).loss.backward()
            verdicts[r.boundary] = True
        except tfz.CacheError as err:
            assert "is used by" in str(err)  # a path around the boundary
            verdicts[r.boundary] = False
        finally:
            cache.close()
            tfz.freeze_to(model, 0)
            model.zero_grad(set_to_none=True)
        assert (r.cached_step_seconds is not None) == verdicts[r.boundary], r.boundary
        assert ("FeatureCache cannot replay" in r.note) == (not verdicts[r.boundary])
    if build is not tiny_bert and build is not tiny_vit:
        assert verdicts == {1: True, 2: False, 3: False, 4: True}
        assert "'model.rotary_emb' is read after the boundary" in p.rows[2].note


def test_the_model_is_exactly_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                          nn.Linear(16, 16), nn.Linear(16, 2))
    model.train()
    model[3].eval()
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 7.0)
    grad_obj = model[4].weight.grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {k: v._version for k, v in model.state_dict().items()}
    buffers = {k: id(v) for k, v in model.named_buffers()}
    x = torch.randn(32, 8)
    rng = torch.get_rng_state()
    tfz.plan(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: v._version for k, v in model.state_dict().items()} == versions
    assert {k: id(v) for k, v in model.named_buffers()} == buffers
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[4].weight.grad is grad_obj and model[0].bias.grad is None
    assert model.training and model[1].training and not model[3].training


@pytest.mark.parametrize("repeat", [1, 2, 3])
def test_the_plan_call_runs_the_model_a_bounded_number_of_times(repeat: int) -> None:
    """What a plan costs, in passes over the model: one traced pass (FLOPs, saved
    tensors, data flow), ``repeat`` timed forward + backward passes, and the forward-only
    passes (frozen prefix in train mode; eval mode for the cached rows) one fewer than
    those, at least one each."""
    calls: list[tuple[bool, bool]] = []  # (grad enabled, training) per forward
    model = mlp()
    model.register_forward_pre_hook(
        lambda mod, args: calls.append((torch.is_grad_enabled(), mod.training)))
    tfz.plan(model, torch.randn(8, 64), repeat=repeat)
    forward_only = max(1, repeat - 1)
    assert calls.count((True, True)) == 1 + repeat
    assert calls.count((False, True)) == forward_only
    assert calls.count((False, False)) == forward_only
    assert len(calls) == 1 + repeat + 2 * forward_only
    # a tied embedding trains and is used before every boundary: one more traced pass
    # with only it trainable (input gradients through the prefix) and as many timed
    # ones as forward-only passes; every row's prefix records a graph, so no row reads
    # a no-grad forward and none can be cached: no forward-only pass
    calls.clear()
    llama = tiny_llama()
    llama.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((torch.is_grad_enabled(), mod.training)),
        with_kwargs=True)
    ids = torch.randint(0, 1000, (2, 8))
    p = tfz.plan(llama, {"input_ids": ids, "labels": ids}, repeat=repeat)
    assert calls == [(True, True)] * (1 + 1 + repeat + forward_only)
    assert all(r.step_seconds is not None and r.step_seconds > 0 for r in p.rows)


def test_the_cached_first_epoch_runs_the_prefix_in_eval_mode_as_featurecache_fills_it() -> None:
    """FeatureCache fills with the prefix in eval mode (it refuses dropout in train
    mode), so the plan times the prefix that way too, and only where a row can be
    cached; every module's mode is back afterwards."""
    seen: list[bool] = []

    def record(mod: nn.Module, args: Any) -> None:
        seen.append(mod.training)

    model = mlp()
    model[1].register_forward_pre_hook(record)
    model[3].eval()  # a mixed-mode model keeps its mix
    tfz.plan(model, torch.randn(8, 64), repeat=2)
    assert False in seen and True in seen
    assert [m.training for m in model] == [True, True, True, False, True]
    # no row can be cached (a tied embedding trains before every boundary): no eval pass
    llama = tiny_llama()
    seen.clear()
    llama.model.layers[0].register_forward_pre_hook(record)
    ids = bert_batch()["input_ids"]
    tfz.plan(llama, {"input_ids": ids, "labels": ids}, repeat=1)
    assert seen and all(seen)


def test_speedup_ordering_and_flops_on_a_model_whose_prefix_dominates() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                        nn.Linear(2048, 4))
    p = tfz.plan(net, torch.randn(256, 512), optimizer="sgd")
    flops = [r.flops for r in p.rows]
    assert flops[0] > flops[1] > flops[2]
    s = [r.speedup for r in p.rows]
    assert s[0] == pytest.approx(1.0)
    assert s[2] > 1.5 and s[2] > s[0]  # only 8 k of 5.3 M parameters train at k=2
    assert p.rows[2].cached_speedup > p.rows[2].speedup  # the forward goes too
    assert p.rows[0].cached_step_seconds is None


def test_optimizer_layouts() -> None:
    net = mlp()
    x = torch.randn(8, 64)
    by = {o: tfz.plan(net, x, optimizer=o, repeat=1).rows[0].memory.optimizer_state
          for o in ("sgd", "sgd-momentum", "adamw")}
    n = sum(p.numel() for p in net.parameters())
    assert by == {"sgd": 0, "sgd-momentum": 4 * n, "adamw": 8 * n + 4 * 6}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    assert tfz.plan(net, x, optimizer=opt, repeat=1).rows[0].memory.optimizer_state == 4 * n
    got = measured(net, x, 1, "sgd-momentum")["optimizer_state"]
    assert tfz.plan(net, x, optimizer="sgd-momentum", repeat=1).rows[1].memory \
        .optimizer_state == got
    with pytest.raises(tfz.PlanError, match="known: adamw"):
        tfz.plan(net, x, optimizer="lion")


def test_best_under_budgets() -> None:
    p = tfz.plan(mlp(), torch.randn(32, 64), repeat=1)
    totals = [r.memory.total for r in p.rows]
    assert p.best(memory=totals[0]).boundary == 0
    assert p.best(memory=totals[0] - 1).boundary == 1
    assert p.best(memory=f"{totals[1] / 1024} KiB").boundary == 1
    with pytest.raises(tfz.PlanError, match=r"no boundary fits memory <= .*boundary 2: memory"):
        p.best(memory=totals[2] - 1)
    assert p.best(seconds=10.0).boundary == 0
    with pytest.raises(tfz.PlanError, match="needs memory= or seconds="):
        p.best()
    marked = tfz.plan(mlp(), torch.randn(32, 64), budget=totals[1], repeat=1)
    assert [r.fits for r in marked.rows] == [False, True, True]
    assert marked.best().boundary == 1
    with pytest.raises(tfz.PlanError, match="float, which could mean bytes or seconds"):
        tfz.plan(mlp(), torch.randn(32, 64), budget=1e9)
    with pytest.raises(tfz.PlanError, match="not a size or a time"):
        tfz.plan(mlp(), torch.randn(32, 64), budget="lots")


def test_meta_device_gives_memory_without_running() -> None:
    real = tfz.plan(tiny_bert(), bert_batch(), repeat=1)
    with torch.device("meta"):
        model = tiny_bert()
    p = tfz.plan(model, bert_batch())
    assert p.device == "meta"
    assert all(r.step_seconds is None and r.speedup is None for r in p.rows)
    for a, b in zip(p.rows, real.rows):
        assert (a.memory.weights, a.memory.grads, a.memory.optimizer_state) == (
            b.memory.weights, b.memory.grads, b.memory.optimizer_state)
        assert a.memory.activations == pytest.approx(b.memory.activations, rel=0.01)
        assert a.flops == b.flops and a.cache_bytes == b.cache_bytes
    with pytest.raises(tfz.PlanError, match="meta device has none"):
        p.best(seconds=1.0)


def test_wrappers_are_looked_through() -> None:
    model = tiny_bert()
    base = [r.memory for r in tfz.plan(model, bert_batch(), repeat=1).rows]
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        p = tfz.plan(wrapped, bert_batch(), repeat=1)
        assert [r.memory for r in p.rows] == base
        assert p.rows[2].upto == "bert.encoder.layer.0"


def test_a_batch_the_model_cannot_take_is_refused_and_changes_nothing() -> None:
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(tfz.PlanError, match=r"could not run the example batch: .*"
                                            r"plan called model\(\*\*batch\)"):
        tfz.plan(model, {"input_idz": torch.zeros(2, 8, dtype=torch.long)})
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(tfz.PlanError, match="no floating tensor that requires grad"):
        tfz.plan(_ArgmaxNet(), torch.randn(2, 4))
    with pytest.raises(tfz.PlanError, match="do not run in depth order"):
        tfz.plan(mlp(), torch.randn(2, 64), layers=["4", "2", "0"])
    with pytest.raises(tfz.PlanError, match="epochs=0 must be an int >= 1"):
        tfz.plan(mlp(), torch.randn(2, 64), epochs=0)


class _ArgmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).argmax(-1)


def test_cli_plan_table_json_and_errors(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2))\n"
        "def broken():\n"
        "    raise ValueError('no weights here')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["plan", "mymodels:build", "--batch", "32x64", "--budget", "300 KiB"]) == 0
    out = capsys.readouterr().out
    assert "tfz.plan: adamw, batch 32" in out and "frozen through" in out
    assert main(["plan", "mymodels:build", "--batch", "32x64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["boundary"] for r in data["rows"]] == [0, 1]
    assert set(data["rows"][0]["memory"]) == {"weights", "grads", "optimizer_state",
                                              "activations", "total"}
    assert main(["plan", "mymodels:build", "--batch", "32x64", "--device", "meta",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][1]["step_seconds"] is None
    for argv, msg in (
        (["plan", "mymodels:build", "--batch", "32x65"], "could not run the example batch"),
        (["plan", "mymodels:broken", "--batch", "32x64"], "the factory raised ValueError"),
        (["plan", "mymodels:build", "--batch", "32xx"], "neither 'module:function' nor"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_tokenizer_batch_is_called_with_its_keys() -> None:
    """HF tokenizers return a BatchEncoding (a UserDict, not a dict): model(**batch)."""
    from transformers import BatchEncoding

    batch = BatchEncoding(bert_batch())
    model = tiny_bert()
    assert [r.memory for r in tfz.plan(model, batch, repeat=1).rows] == \
        [r.memory for r in tfz.plan(model, dict(batch), repeat=1).rows]
    assert [g.name for g in tfz.layers(model, batch)] == [g.name for g in tfz.layers(model)]


def test_a_narrow_console_leaves_columns_out_instead_of_squeezing_the_numbers() -> None:
    """Printed where the whole table does not fit, the plan leaves out its least needed
    columns, says which, and keeps every boundary number and step time whole; where it
    fits (and in str()), every column is there."""
    from rich.console import Console

    p = tfz.plan(mlp(), torch.randn(32, 64), repeat=1).marked({0: "full-fine-tune"})
    wide, narrow = Console(width=200, record=True), Console(width=110, record=True)
    wide.print(p)
    narrow.print(p)
    full, cut = wide.export_text(), narrow.export_text()
    assert "activations" in full and "too narrow" not in full
    assert "activations" in str(p)
    header = next(line for line in cut.splitlines() if "frozen through" in line)
    assert "activations" not in header and "step" in header
    assert "too narrow here for" in cut and "activations" in cut.split("too narrow")[1]
    assert all(len(line) <= 110 for line in cut.splitlines())
    rows = [line for line in cut.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in rows] == ["0", "1", "2"]
    assert all("…" not in line.split("│")[4] for line in rows)  # step times whole
