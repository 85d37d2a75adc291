"""FeatureCache: replay is exact, only misses run, refusals are clear, storage round-trips."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import CacheError


class Counting(nn.Module):
    """A frozen prefix that records the batch size of every real forward."""

    def __init__(self, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return torch.tanh(self.lin(x))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(Counting(), nn.ReLU(), nn.Linear(5, 3))
    tfz.freeze(model, "0")
    return model


def data(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_replay_is_bit_identical_and_skips_the_module():
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0])
    with cache.keys(torch.arange(8)):
        first = model(x)
    with cache.keys(torch.arange(8)):
        again = model(x)
    assert torch.equal(first, again)
    assert model[0].calls == [8]                       # the second call ran nothing
    assert (cache.hits, cache.misses, len(cache)) == (8, 8, 8)
    assert cache.nbytes == 8 * 5 * 4                   # fp32 rows of 5 features
    assert torch.equal(first, make_model()(x))         # same as never caching


def test_mixed_batch_computes_only_misses_and_splices_in_order():
    model, x = make_model(), data()
    plain = make_model()(x)
    cache = tfz.FeatureCache(model[0])
    with cache.keys([0, 1, 2, 3]):
        model(x[:4])
    order = [6, 2, 7, 0, 5]
    with cache.keys(order):
        out = model(x[order])
    assert model[0].calls == [4, 3]                    # 6, 7, 5 computed; 2, 0 replayed
    assert (cache.hits, cache.misses) == (2, 7)
    torch.testing.assert_close(out, plain[order], rtol=0, atol=1e-6)


def test_outside_keys_the_module_runs_normally_and_close_restores_forward():
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0])
    model(x)
    model(x)
    assert model[0].calls == [8, 8] and len(cache) == 0 and cache.misses == 0
    cache.close()
    assert "forward" not in model[0].__dict__
    again = tfz.FeatureCache(model[0])
    with pytest.raises(CacheError, match="already has a FeatureCache; call close"):
        tfz.FeatureCache(model[0])
    assert model[0].__dict__["forward"].owner is again


def test_head_gradients_and_losses_identical_with_and_without_cache():
    x, y = data(16), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    plain, cached = make_model(), make_model()
    cache = tfz.FeatureCache(cached[0])
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (plain, cached)]
    for _epoch in range(3):
        for ids in (torch.arange(0, 8), torch.arange(8, 16)):
            plain_loss = nn.functional.cross_entropy(plain(x[ids]), y[ids])
            with cache.keys(ids):
                cached_loss = nn.functional.cross_entropy(cached(x[ids]), y[ids])
            for loss, opt in ((plain_loss, opts[0]), (cached_loss, opts[1])):
                opt.zero_grad()
                loss.backward()
            assert torch.equal(plain_loss, cached_loss)
            assert torch.equal(plain[2].weight.grad, cached[2].weight.grad)
            assert cached[0].lin.weight.grad is None
            for opt in opts:
                opt.step()
    assert (cache.hits, cache.misses) == (32, 16)
    assert torch.equal(plain[2].weight, cached[2].weight)


def test_refuses_trainable_parameters():
    module = nn.Linear(3, 3)
    with pytest.raises(CacheError, match=r"2 of its parameters are trainable \(weight, bias\)"):
        tfz.FeatureCache(module)
    assert "forward" not in module.__dict__


def test_refuses_a_module_unfrozen_after_the_cache_was_built():
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0])
    with cache.keys(torch.arange(8)):
        model(x)
    tfz.unfreeze(model, "0")
    with pytest.raises(CacheError, match="trainable"), cache.keys(torch.arange(8)):
        model(x)
    assert (cache.hits, cache.misses, len(cache)) == (0, 8, 8)


def test_refuses_active_dropout_and_pin_eval_fixes_it():
    prefix = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)).requires_grad_(False)
    with pytest.raises(CacheError, match=r"dropout '1' \(p=0.1\) is active.*pin_eval=True"):
        tfz.FeatureCache(prefix)
    model = nn.Sequential(prefix, nn.Linear(4, 2))
    cache = tfz.FeatureCache(prefix, pin_eval=True)
    model.train()
    assert not prefix.training and not prefix[1].training and model[1].training
    x = torch.randn(3, 4)
    with cache.keys([0, 1, 2]):
        a = model(x)
    with cache.keys([0, 1, 2]):
        b = model(x)
    assert torch.equal(a, b)
    cache.close()
    model.train()
    assert prefix[1].training


def test_refuses_dropout_switched_on_later():
    prefix = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).requires_grad_(False).eval()
    cache = tfz.FeatureCache(prefix)
    prefix.train()
    with pytest.raises(CacheError, match="dropout '1'"), cache.keys([0, 1]):
        prefix(torch.randn(2, 4))


def test_batchnorm_train_mode_refused_but_frozen_bn_eval_policy_accepted():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).requires_grad_(False)
    with pytest.raises(CacheError, match="BatchNorm '1' normalises with batch statistics"):
        tfz.FeatureCache(net)
    model = nn.Sequential(net, nn.Linear(4, 2))
    tfz.freeze(model, "0")                              # bn="eval": pinned through train()
    model.train()
    cache = tfz.FeatureCache(net)
    with cache.keys([0, 1]):
        model(torch.randn(2, 4))
    assert cache.misses == 2


def test_refuses_bn_stats_policy():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    tfz.freeze(net, bn="stats")
    net.train()
    with pytest.raises(CacheError, match="BatchNorm"):
        tfz.FeatureCache(net)


class ReturnsDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"h": x * 2, "n": 3}


class ReturnsPooled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_refuses_outputs_that_are_not_per_sample_tensors():
    cache = tfz.FeatureCache(ReturnsDict())
    with pytest.raises(CacheError, match=r"output dict\['n'\] is a int"), \
            cache.keys([0, 1]):
        cache.module(torch.ones(2, 3))
    assert len(cache) == 0
    pooled = tfz.FeatureCache(ReturnsPooled())
    with pytest.raises(CacheError, match="one row per sample"), pooled.keys([0, 1]):
        pooled.module(torch.ones(2, 3))


def test_refuses_inputs_that_require_grad():
    model = make_model()
    cache = tfz.FeatureCache(model[0])
    x = data().requires_grad_()
    with pytest.raises(CacheError, match="requires grad.*cut its gradient"), \
            cache.keys(torch.arange(8)):
        model(x)
    with torch.no_grad(), cache.keys(torch.arange(8)):   # no grad wanted: fine
        model(x)
    assert cache.misses == 8


def test_refuses_ids_that_do_not_match_the_batch():
    model = make_model()
    cache = tfz.FeatureCache(model[0])
    with pytest.raises(CacheError, match="given 3 sample ids.*no input.*3 rows"), \
            cache.keys([0, 1, 2]):
        model(data())
    with pytest.raises(CacheError, match="1-D integer tensor"), cache.keys(torch.rand(8)):
        pass
    with pytest.raises(CacheError, match="cannot be nested"), cache.keys([0]), cache.keys([1]):
        pass


def test_parameter_change_invalidates_and_recomputes():
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0])
    with cache.keys(torch.arange(8)):
        before = model(x)
    with torch.no_grad():
        model[0].lin.weight.add_(0.5)
    with pytest.warns(UserWarning, match=r"'lin.weight' .* changed.*8 stored entries"), \
            cache.keys(torch.arange(8)):
        after = model(x)
    assert cache.invalidations == 1 and cache.misses == 16 and cache.hits == 0
    assert not torch.equal(before, after)
    assert torch.equal(after, model[1:](model[0].__class__.forward(model[0], x)))

    other = make_model(seed=5)
    model.load_state_dict(other.state_dict())             # copy_ bumps the versions
    with pytest.warns(UserWarning, match="changed"), cache.keys(torch.arange(8)):
        loaded = model(x)
    assert cache.invalidations == 2
    assert torch.equal(loaded, other(x))


def test_validate_detects_changed_input_for_a_known_id():
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0], validate=True)
    with cache.keys(torch.arange(8)):
        model(x)
    with cache.keys(torch.arange(8)):
        model(x.clone())                                    # same content: fine
    augmented = x.clone()
    augmented[3] += 0.01
    with pytest.raises(CacheError, match="Sample id 3 came back with a different input"), \
            cache.keys(torch.arange(8)):
        model(augmented)
    assert cache.hits == 8


def test_disk_spill_past_max_bytes_round_trips(tmp_path):
    model, x = make_model(), data()
    row = 5 * 4
    cache = tfz.FeatureCache(model[0], max_bytes=3 * row, directory=tmp_path)
    with cache.keys(torch.arange(8)):
        first = model(x)
    assert (cache.memory_nbytes, cache.disk_nbytes) == (3 * row, 5 * row)
    (folder,) = os.listdir(tmp_path)
    assert len(os.listdir(tmp_path / folder)) == 1
    with cache.keys(torch.arange(7, -1, -1)):
        again = model(x.flip(0))
    assert torch.equal(again, first.flip(0)) and model[0].calls == [8]
    cache.clear()
    assert os.listdir(tmp_path) == [] and cache.nbytes == 0 and cache.hits == 0


def test_disk_only_and_memory_only_budgets(tmp_path):
    model, x = make_model(), data()
    disk = tfz.FeatureCache(model[0], storage="disk", directory=tmp_path)
    with disk.keys(torch.arange(8)):
        first = model(x)
    with disk.keys(torch.arange(8)):
        assert torch.equal(model(x), first)
    assert (disk.memory_nbytes, disk.disk_nbytes, disk.hits) == (0, 8 * 20, 8)
    disk.close()
    assert os.listdir(tmp_path) == []

    mem = tfz.FeatureCache(model[0], storage="memory", max_bytes=2 * 20)
    with mem.keys(torch.arange(8)):
        model(x)
    with mem.keys(torch.arange(8)):
        assert torch.equal(model(x), first)
    assert (len(mem), mem.hits, mem.misses, mem.nbytes) == (2, 2, 14, 40)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_rounds_every_output_the_same_way(dtype):
    model, x = make_model(), data()
    cache = tfz.FeatureCache(model[0], dtype=dtype, storage="disk")
    with cache.keys(torch.arange(8)):
        first = model(x)
    with cache.keys(torch.arange(8)):
        again = model(x)
    assert torch.equal(first, again)                 # hit or miss: same rounding
    assert cache.nbytes == 8 * 5 * 2
    exact = make_model()(x)
    assert not torch.equal(first, exact)
    torch.testing.assert_close(first, exact, rtol=0, atol=2e-2)
    cache.close()


def test_storage_options_are_checked():
    with pytest.raises(CacheError, match="storage='ram' is not"):
        tfz.FeatureCache(nn.Identity(), storage="ram")
    with pytest.raises(CacheError, match="not a floating storage dtype"):
        tfz.FeatureCache(nn.Identity(), dtype=torch.int8)


def test_tuple_outputs_with_none_are_replayed():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, None, x * 2

    cache = tfz.FeatureCache(Pair())
    x = torch.randn(4, 2)
    with cache.keys([0, 1, 2, 3]):
        a = cache.module(x)
    with cache.keys([3, 9, 1, 0]):
        b = cache.module(torch.stack([x[3], x[0] + 5, x[1], x[0]]))
    assert b[1] is None and isinstance(b, tuple)
    assert torch.equal(b[0][[0, 2, 3]], a[0][[3, 1, 0]])
    assert torch.equal(b[2][1], (x[0] + 5) * 2)


def test_hf_bert_model_output_is_replayed():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    tfz.freeze(bert)
    cache = tfz.FeatureCache(bert)
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        plain = bert(input_ids=ids, attention_mask=mask)
    with cache.keys(["a", "b", "c", "d"]):
        first = bert(input_ids=ids, attention_mask=mask)
    with cache.keys(["d", "b"]):
        again = bert(input_ids=ids[[3, 1]], attention_mask=mask[[3, 1]])
    assert type(again) is type(plain)
    assert torch.equal(first.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(again.last_hidden_state, first.last_hidden_state[[3, 1]])
    assert torch.equal(again.pooler_output, first.pooler_output[[3, 1]])
    assert cache.hits == 2


def test_model_copy_keeps_working():
    model = make_model()
    cache = tfz.FeatureCache(model[0])
    clone = copy.deepcopy(model)
    x = data()
    with cache.keys(torch.arange(8)):
        torch.testing.assert_close(model(x), clone(x))
