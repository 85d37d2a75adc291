"""FeatureCache on the feature store: path= across runs and ranks, fill(), counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchfreeze as tfz
from torchfreeze.cache._hook import Placeholder
from torchfreeze.errors import CacheError

from ._dist_utils import run_ranks
from ._models import tiny_bert

ROOT = Path(__file__).resolve().parents[1]
UPTO = "bert.encoder.layer.1"
N = 24


def bert() -> nn.Module:
    """A tiny HF BERT whose embeddings and first two layers are frozen (the prefix)."""
    torch.manual_seed(0)
    model = tiny_bert(num_layers=3)
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    return model.eval()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (N, 12), generator=g), torch.arange(N)


def count_prefix_rows(model: nn.Module) -> list[int]:
    """Rows the prefix really computed (a replayed prefix hands out placeholders)."""
    computed = [0]

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, Placeholder):
            computed[0] += out.shape[0]

    model.bert.embeddings.register_forward_hook(hook)
    return computed


def shuffled(n: int) -> torch.Tensor:
    """One fixed shuffle: both processes run the same batches, so the layers after the
    boundary (whose rounding depends on the batch's make-up) give the same bits."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(2))


def run_epoch(model: nn.Module, cache: tfz.FeatureCache, x: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    logits = torch.empty(len(ids), 3)
    for batch in shuffled(len(ids)).split(8):
        with cache.keys(ids[batch]):
            logits[batch] = model(x[batch]).logits.detach()
    return logits


def fill_store(path: Path) -> tuple[nn.Module, torch.Tensor]:
    model, (x, ids) = bert(), data()
    cache = tfz.FeatureCache(model, upto=UPTO, path=path)
    loader = DataLoader(TensorDataset(x, ids), batch_size=8)
    assert cache.fill(loader, lambda b: model(b[0]), lambda b: b[1], progress=False) == N
    logits = run_epoch(model, cache, x, ids)
    assert (cache.hits, cache.misses) == (N, N)
    cache.close()
    return model, logits


def test_a_second_process_replays_with_zero_prefix_calls(tmp_path: Path) -> None:
    model, logits = fill_store(tmp_path / "features")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(logits, tmp_path / "logits.pt")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "tests._store_worker", "replay",
                           str(tmp_path / "features"), str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["prefix_rows"] == 0 and report["misses"] == 0 and report["hits"] == N
    assert report["same"], "replayed logits differ from the first run's"
    assert f"{N} entries" in report["line"] and "100.0% hit rate" in report["line"]


def test_a_store_from_other_weights_boundary_or_dtype_is_never_replayed(tmp_path: Path) -> None:
    path = tmp_path / "features"
    fill_store(path)
    other = bert()
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.bias[0] += 1e-3
    with pytest.raises(CacheError, match=r"weights: 1 tensor\(s\) differ "
                       r"\('bert.encoder.layer.0.output.dense.bias'\).*overwrite=True"):
        tfz.FeatureCache(other, upto=UPTO, path=path)
    assert "forward" not in other.bert.encoder.layer[1].__dict__  # refused: nothing patched
    with pytest.raises(CacheError, match=r"boundary 'bert.encoder.layer.1' \(now "
                       r"'bert.encoder.layer.0'\)"):
        tfz.FeatureCache(bert(), upto="bert.encoder.layer.0", path=path)
    with pytest.raises(CacheError, match=r"dtype None \(now torch.float16\)"):
        tfz.FeatureCache(bert(), upto=UPTO, path=path, dtype=torch.float16)

    # overwrite=True starts fresh: every sample is computed again, with the new weights
    x, ids = data()
    rows = count_prefix_rows(other)
    cache = tfz.FeatureCache(other, upto=UPTO, path=path, overwrite=True)
    fresh = run_epoch(other, cache, x, ids)
    assert (cache.misses, rows[0]) == (N, N)
    with torch.no_grad():  # the same batches uncached: bit-identical
        plain = torch.empty_like(fresh)
        for batch in shuffled(N).split(8):
            plain[batch] = other(x[batch]).logits
    assert torch.equal(fresh, plain)
    # weights that change while a persistent store is open are refused, not replayed
    with torch.no_grad():
        other.bert.embeddings.LayerNorm.weight.mul_(2)
    for _ in range(2):  # and refused again: a caught refusal does not let the next batch replay
        with pytest.raises(CacheError, match="belong to other weights"), cache.keys(ids[:4]):
            other(x[:4])


def test_fill_stops_at_the_boundary_with_dataloader_workers(tmp_path: Path) -> None:
    model, (x, ids) = bert(), data()
    head_calls = [0]
    model.classifier.register_forward_hook(lambda *a: head_calls.__setitem__(0, head_calls[0] + 1))
    cache = tfz.FeatureCache(model, upto=UPTO, path=tmp_path / "features", pin_eval=True)
    loader = DataLoader(TensorDataset(x, ids), batch_size=5, shuffle=True, num_workers=2)
    assert cache.fill(loader, lambda b: model(b[0]), lambda b: b[1], progress=False) == N
    assert head_calls[0] == 0 and len(cache) == N
    assert cache.fill(loader, lambda b: model(b[0]), lambda b: b[1], progress=False) == 0
    # training after fill: the suffix gets gradients, the prefix never runs
    rows = count_prefix_rows(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for xb, ib in loader:
        with cache.keys(ib):
            loss = model(xb).logits.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert rows[0] == 0 and cache.misses == N and cache.hits == 2 * N
    line = str(cache)
    assert "\n" not in line and f"{N} entries" in line and "path=" in line
    assert cache.memory_nbytes == 0 and cache.disk_nbytes == N * 12 * 32 * 4


def test_one_module_form_persists_and_counts_bytes(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).requires_grad_(False)
    x = torch.randn(10, 6)
    first = tfz.FeatureCache(enc, path=tmp_path)
    with first.keys([f"s{i}" for i in range(10)]):
        out = enc(x)
    first.close()
    calls = [0]
    enc[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    again = tfz.FeatureCache(enc, path=tmp_path, device="cpu")
    with again.keys([f"s{i}" for i in reversed(range(10))]):
        assert torch.equal(enc(x.flip(0)), out.flip(0))
    assert calls[0] == 0 and again.disk_nbytes == 10 * 5 * 4 and again.hits == 10
    again.clear()  # empties the files too
    again.close()
    third = tfz.FeatureCache(enc, path=tmp_path)
    assert len(third) == 0
    third.close()
    with pytest.raises(CacheError, match="storage='memory' asks for RAM only"):
        tfz.FeatureCache(enc, path=tmp_path, storage="memory")


def _ddp_ranks(rank: int, folder: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data.distributed import DistributedSampler

    model, (x, ids) = bert(), data()
    model.train()
    ddp = DDP(model)
    rows = count_prefix_rows(model)
    cache = tfz.FeatureCache(model, upto=UPTO, path=os.path.join(folder, "a"), pin_eval=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    dataset = TensorDataset(x, ids)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for xb, ib in loader:
            with cache.keys(ib):
                loss = ddp(xb).logits.square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with cache.keys(ids), torch.no_grad():
        logits = model(x).logits
    result = {"misses": cache.misses, "rows": rows[0], "logits": logits,
              "state": {k: v.clone() for k, v in model.state_dict().items()}}
    cache.close()

    # fill(): each rank fills its shard, then every rank sees every entry
    filler = tfz.FeatureCache(model, upto=UPTO, path=os.path.join(folder, "b"))
    sampler.set_epoch(0)
    result["written"] = filler.fill(loader, lambda b: model(b[0]), lambda b: b[1],
                                    progress=False)
    with filler.keys(ids), torch.no_grad():
        model(x)
    result["after_fill"] = (filler.hits, filler.misses)
    filler.close()
    dist.barrier()
    return result


def test_ddp_ranks_share_one_store_each_sample_computed_once(tmp_path: Path) -> None:
    a, b = run_ranks(_ddp_ranks, tmp_path, str(tmp_path), timeout=150)
    assert a["misses"] + b["misses"] == N  # over 3 shuffled epochs on 2 ranks
    assert a["rows"] + b["rows"] == N
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["written"] + b["written"] == N and 0 < a["written"] < N
    # each rank computed its shard in fill(), then replays all N (the other shard too)
    assert a["after_fill"] == (N, a["written"]) and b["after_fill"] == (N, b["written"])
