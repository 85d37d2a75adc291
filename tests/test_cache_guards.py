"""FeatureCache's replay guards (cache/_guards.py): no replay is ever silently wrong."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import CacheError

from ._models import tiny_bert
from .test_cache_upto import TimmStyleViT

UPTO = "bert.encoder.layer.1"


def frozen_bert() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_bert(num_layers=3)
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    return model.eval()


def tokens(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (n, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ 1. signature
def test_an_all_hit_batch_of_another_padded_length_is_refused_naming_the_argument() -> None:
    model = frozen_bert()
    cache = tfz.FeatureCache(model, upto=UPTO)
    ids = torch.arange(4)
    with cache.keys(ids):
        model(tokens(4, 12))
    with pytest.raises(CacheError, match=r"argument 'input_ids' is an int64 tensor of per-sample "
                       r"shape \(16,\) on cpu now, an int64 tensor of per-sample shape \(12,\)"
                       r".*dynamic padding.*padding='max_length'"), cache.keys(ids):
        model(tokens(4, 16))
    assert (cache.hits, cache.misses) == (0, 4)  # refused before anything was replayed
    with cache.keys(ids):  # the stored length still replays
        model(tokens(4, 12))
    assert cache.hits == 4


def test_a_one_module_cache_refuses_another_length_too() -> None:
    model = frozen_bert()
    cache = tfz.FeatureCache(model.bert.embeddings)
    with cache.keys([0, 1]):
        model.bert.embeddings(tokens(2, 12))
    with pytest.raises(CacheError, match=r"per-sample shape \(8,\) on cpu now"), \
            cache.keys([0, 1]):
        model.bert.embeddings(tokens(2, 8))


def test_a_store_filled_at_one_max_length_refuses_a_job_at_another(tmp_path: Path) -> None:
    model = frozen_bert()
    cache = tfz.FeatureCache(model, upto=UPTO, path=tmp_path / "store")
    with cache.keys(torch.arange(4)):
        model(tokens(4, 12))
    cache.close()
    other = tfz.FeatureCache(frozen_bert(), upto=UPTO, path=tmp_path / "store")
    with pytest.raises(CacheError, match=r"per-sample shape \(24,\) on cpu now.*\(12,\) on cpu "
                       r"when stored.*another path=.*overwrite=True"), other.keys(torch.arange(4)):
        other._root(tokens(4, 24))
    assert other.hits == 0


# ------------------------------------------------------------------ 2. validate=True
def test_validate_covers_the_first_batch_of_the_upto_form() -> None:
    model = frozen_bert()
    cache = tfz.FeatureCache(model, upto=UPTO, validate=True)
    ids = torch.arange(4)
    with cache.keys(ids):  # the discovery pass
        model(tokens(4, 12, seed=1))
    with pytest.raises(CacheError, match="Sample id 0 came back with a different input"), \
            cache.keys(ids):
        model(tokens(4, 12, seed=2))


# ------------------------------------------------- 3. weights outside the prefix modules
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = TimmStyleViT()
    tfz.freeze(model, "patch_embed", "cls_token", "pos_embed", "blocks.{0..1}")
    return model.eval()


def test_a_root_parameter_used_inside_the_prefix_is_watched() -> None:
    model = vit()
    cache = tfz.FeatureCache(model, upto="blocks.1")
    x, ids = torch.randn(5, 3, 8, 8), torch.arange(5)
    with cache.keys(ids):
        model(x)
    with torch.no_grad():
        model.pos_embed.add_(0.5)  # in place: no registration, no new tensor
    with pytest.warns(UserWarning, match="'pos_embed' of the cached prefix changed"), \
            cache.keys(ids):
        cached = model(x)
    assert cache.invalidations == 1 and cache.hits == 0
    assert torch.equal(cached, model(x))


def test_a_store_reopened_with_another_root_parameter_is_refused(tmp_path: Path) -> None:
    model = vit()
    cache = tfz.FeatureCache(model, upto="blocks.1", path=tmp_path / "store")
    with cache.keys(torch.arange(5)):
        model(torch.randn(5, 3, 8, 8))
    cache.close()
    other = vit()
    with torch.no_grad():
        other.cls_token.mul_(3)
    with pytest.raises(CacheError, match=r"1 tensor\(s\) differ \('cls_token'\)"):
        tfz.FeatureCache(other, upto="blocks.1", path=tmp_path / "store")
    assert "forward" not in other.blocks[1].__dict__  # refused: nothing patched


def test_unfreezing_a_root_parameter_of_the_prefix_is_refused_naming_it() -> None:
    model = vit()
    cache = tfz.FeatureCache(model, upto="blocks.1")
    with cache.keys(torch.arange(2)):
        model(torch.randn(2, 3, 8, 8))
    model.pos_embed.requires_grad_(True)
    with pytest.raises(CacheError, match="'pos_embed' is trainable and reaches"), \
            cache.keys(torch.arange(2)):
        model(torch.randn(2, 3, 8, 8))


def test_a_refusal_is_repeated_until_its_cause_is_gone() -> None:
    """A caught refusal must not let the next batch replay: the cause is still there."""
    enc = nn.Linear(3, 3).requires_grad_(False)
    cache = tfz.FeatureCache(enc)
    x, ids = torch.randn(4, 3), torch.arange(4)
    for _ in range(2):
        with cache.keys(ids):
            enc(x)
    enc.weight.requires_grad_(True)
    for _ in range(3):
        with pytest.raises(CacheError, match="1 of its parameters are trainable"), \
                cache.keys(ids):
            enc(x)
    enc.weight.requires_grad_(False)
    with cache.keys(ids):
        assert torch.equal(enc(x), F.linear(x, enc.weight, enc.bias))
    assert (cache.hits, cache.misses) == (8, 4)


# ------------------------------------------------------- the steady replay path
def _write(model: nn.Module) -> None:
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(0.01)


def _swap(model: nn.Module) -> None:
    w = model.bert.embeddings.word_embeddings.weight
    w.data = w.data * 2  # no version bump: a new storage


def _reassign(model: nn.Module) -> None:
    ln = model.bert.embeddings.LayerNorm
    ln.weight = nn.Parameter(ln.weight.detach() * 2, requires_grad=False)


STEADY_CHANGES = {
    "in-place write": (_write, None),
    ".data swap": (_swap, None),
    "reassigned parameter": (_reassign, None),
    "unfrozen weight": (lambda m: m.bert.encoder.layer[1].intermediate.dense.weight
                        .requires_grad_(True), "trainable"),
    "train mode": (lambda m: m.train(), "dropout .* is active because it is in train mode"),
    "another padded length": (lambda m: None, r"per-sample shape \(16,\) on cpu now"),
    "fewer ids than rows": (lambda m: None, "was given 3 sample ids"),
}


def steady_bert() -> tuple[nn.Module, tfz.FeatureCache, torch.Tensor, torch.Tensor]:
    """A BERT whose cache has stored 4 ids and replays them on its steady path."""
    model = frozen_bert()
    cache = tfz.FeatureCache(model, upto=UPTO)
    x, ids = tokens(4, 12), torch.arange(4)
    for _ in range(3):
        with cache.keys(ids):
            model(x)
    assert cache._steady and (cache.hits, cache.misses) == (8, 4)  # in use
    return model, cache, x, ids


@pytest.mark.parametrize("change", list(STEADY_CHANGES))
def test_a_batch_replayed_like_the_last_one_still_passes_every_guard(change: str) -> None:
    """After a full replay, the next batches take a shorter path (checked against what
    the last one was checked against): every change still invalidates or refuses."""
    model, cache, x, ids = steady_bert()
    act, refusal = STEADY_CHANGES[change]
    act(model)
    if change == "another padded length":
        x = tokens(4, 16)
    if change == "fewer ids than rows":
        ids = torch.arange(3)
    if refusal is not None:
        for _ in range(2):
            with pytest.raises(CacheError, match=refusal), cache.keys(ids):
                model(x)
        return
    with pytest.warns(UserWarning, match="of the cached prefix changed"), cache.keys(ids):
        cached = model(x).logits
    with cache.keys(ids):
        again = model(x).logits
    plain = model(x).logits  # outside keys(): uncached, with the changed weights
    assert torch.equal(cached, plain) and torch.equal(again, plain)
    assert (cache.invalidations, cache.misses, cache.hits) == (1, 8, 12)


def test_two_calls_of_the_boundary_per_batch_each_replay_steadily_and_are_watched() -> None:
    """A shared encoder called twice per batch (a sentence pair): two namespaces, each
    with its own steady replay; a weight change reaches both."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).requires_grad_(False)
    cache = tfz.FeatureCache(enc)
    a, b, ids = torch.randn(4, 6), torch.randn(4, 6), torch.arange(4)
    for _ in range(4):
        with cache.keys(ids):
            left, right = enc(a), enc(b)
    assert len(cache._steady) == 2 and (cache.hits, cache.misses) == (24, 8)
    assert torch.equal(left, enc(a)) and torch.equal(right, enc(b))
    with torch.no_grad():
        enc[0].bias.add_(1.0)
    with pytest.warns(UserWarning, match="'0.bias' of the cached prefix changed"), \
            cache.keys(ids):
        left, right = enc(a), enc(b)
    assert torch.equal(left, enc(a)) and torch.equal(right, enc(b))
    assert (cache.invalidations, cache.misses) == (1, 16)


def test_a_batch_with_new_ids_after_steady_replays_computes_only_those() -> None:
    model = frozen_bert()
    cache = tfz.FeatureCache(model, upto=UPTO)
    x = tokens(10, 12)
    for _ in range(3):
        with cache.keys(torch.arange(8)):
            model(x[:8])
    ids = torch.tensor([6, 9, 7, 8])  # two stored, two new (unseen by the gather)
    with cache.keys(ids):
        cached = model(x[ids]).logits
    assert torch.equal(cached, model(x[ids]).logits)
    assert (cache.hits, cache.misses) == (16 + 2, 8 + 2)
    with cache.keys(ids):  # all stored now: a full replay again
        assert torch.equal(model(x[ids]).logits, cached)
    assert cache.hits == 22


def test_an_autocast_batch_after_steady_replays_is_its_own_entry() -> None:
    model, cache, x, ids = steady_bert()
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.keys(ids):
        cached = model(x).logits
    assert (cache.hits, cache.misses) == (8, 8)  # computed under autocast, not replayed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cached, model(x).logits)


# ------------------------------------------------------------------ 4. randomness
class DropPath(nn.Module):
    """timm's stochastic depth: a per-sample bernoulli mask, no nn.Dropout in sight."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Residual(nn.Module):
    def __init__(self, d: int, drop: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.lin(x))


class FunctionalDropout(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), 0.2, self.training)


class Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


@pytest.mark.parametrize("block", [
    lambda: Residual(8, DropPath(0.3)),
    lambda: FunctionalDropout(8),
    lambda: nn.Sequential(nn.Linear(8, 8), Noise()),
], ids=["droppath", "functional-dropout", "randn_like"])
def test_a_random_op_in_a_train_mode_prefix_is_refused_with_the_fix(block) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(block(), block(), nn.Linear(8, 2))
    tfz.freeze(model, "0", "1")
    model.train()
    cache = tfz.FeatureCache(model, upto="1")
    with pytest.raises(CacheError, match=r"runs inside '0(\.\w+)?'.*one draw would be replayed "
                       r"forever.*pin_eval=True"), cache.keys(torch.arange(4)):
        model(torch.randn(4, 8))
    assert len(cache) == 0
    # the fix named in the message works: no random op, replay equals an eval forward
    cache.close()
    cache = tfz.FeatureCache(model, upto="1", pin_eval=True)
    x = torch.randn(4, 8)
    for _ in range(2):
        with cache.keys(torch.arange(4)):
            out = model(x)
    assert cache.hits == 4 and model.training
    model[2].eval()
    assert torch.equal(out, model(x))


def test_switching_to_train_mode_after_the_first_pass_is_verified_again() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Residual(8, DropPath(0.3)), Residual(8, DropPath(0.3)),
                          nn.Linear(8, 2))
    tfz.freeze(model, "0", "1")
    model.eval()
    cache = tfz.FeatureCache(model, upto="1")
    x, ids = torch.randn(4, 8), torch.arange(4)
    for _ in range(2):
        with cache.keys(ids):
            model(x)
    assert cache.hits == 4  # eval: deterministic, replayed
    model.train()
    with pytest.raises(CacheError, match="bernoulli"), cache.keys(ids):
        model(x)
    model.eval()
    with cache.keys(ids):  # back to the verified state: replays again
        model(x)
    assert cache.hits == 8


def test_a_one_module_cache_detects_random_ops_when_it_first_runs() -> None:
    block = Residual(8, DropPath(0.5)).requires_grad_(False).train()
    cache = tfz.FeatureCache(block)
    with pytest.raises(CacheError, match="bernoulli.*pin_eval=True"), cache.keys([0, 1]):
        block(torch.randn(2, 8))


def test_attention_without_dropout_is_not_random() -> None:
    model = frozen_bert()  # eval: SDPA runs with dropout_p=0
    cache = tfz.FeatureCache(model, upto=UPTO)
    for _ in range(2):
        with cache.keys(torch.arange(3)):
            model(tokens(3, 12))
    assert cache.hits == 3


# ------------------------------------------------------------------ 6. ids
def test_0d_integer_tensor_ids_hit_like_ints() -> None:
    enc = nn.Linear(3, 3).requires_grad_(False)
    cache = tfz.FeatureCache(enc)
    x = torch.randn(4, 3)
    for _ in range(3):
        with cache.keys([torch.tensor(i) for i in range(4)]):
            enc(x)
    assert (cache.hits, cache.misses, len(cache)) == (8, 4, 4)
    assert 2 in cache


@pytest.mark.parametrize("bad", [torch.tensor(1.0), object(), torch.tensor([1, 2]), True])
def test_ids_that_cannot_name_a_sample_by_value_are_refused(bad) -> None:
    cache = tfz.FeatureCache(nn.Linear(3, 3).requires_grad_(False))
    with pytest.raises(CacheError, match="cannot be a cache key.*by value"):
        cache.keys([bad, 0])


# -------------------------------------------- 9. Hugging Face input_require_grads
def test_hf_gradient_checkpointing_with_input_require_grads_trains_and_replays() -> None:
    plain, cached = frozen_bert().train(), frozen_bert().train()
    for m in (plain, cached):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
    cache = tfz.FeatureCache(cached, upto=UPTO, pin_eval=True)
    for m in (plain, cached):
        m.bert.embeddings.eval()
        for layer in m.bert.encoder.layer[:2]:
            layer.eval()
    x, y = tokens(4, 12), torch.tensor([0, 1, 2, 0])
    grads = []
    for epoch in range(2):
        for m in (plain, cached):
            torch.manual_seed(epoch)
            with cache.keys(torch.arange(4)) if m is cached else nullcontext():
                loss = m(input_ids=x, labels=y).loss
            m.zero_grad()
            loss.backward()
            grads.append(m.classifier.weight.grad.clone())
    assert cache.hits == 4  # epoch 2 replayed, and the checkpointed layer 2 still trained
    assert torch.allclose(grads[2], grads[3], atol=1e-6)
    assert cached.bert.encoder.layer[2].output.dense.weight.grad is not None


def test_an_input_that_requires_grad_is_still_refused() -> None:
    model = vit()
    cache = tfz.FeatureCache(model, upto="blocks.1")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(CacheError, match="a tensor given to the model requires grad"), \
            cache.keys(torch.arange(2)):
        model(x)


# ------------------------------------------------------------- 10. path=, advance()
def test_path_at_a_file_or_a_foreign_folder_is_refused_at_construction(tmp_path: Path) -> None:
    model = vit()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a folder"):
        tfz.FeatureCache(model, upto="blocks.1", path=tmp_path / "file")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CacheError, match=r"not a torchfreeze store \(cat.jpg\)"):
            tfz.FeatureCache(model, upto="blocks.1", path=tmp_path / "photos",
                             overwrite=overwrite)
    assert "forward" not in model.blocks[1].__dict__
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "photos" / "cat.jpg").exists()


@pytest.mark.parametrize("earlier", ["blocks.0", "blocks.1", "blocks.1.mlp", "patch_embed"])
def test_advance_to_a_boundary_that_does_not_run_later_is_refused(earlier: str) -> None:
    model = vit()
    cache = tfz.FeatureCache(model, upto="blocks.1")
    with cache.keys(torch.arange(2)):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(CacheError, match=rf"advance\(upto='{earlier}'\).*does not run after"):
        cache.advance(upto=earlier)


# ------------------------------------------------------------------ 11. truthiness
def test_an_open_cache_is_truthy_even_when_empty() -> None:
    enc = nn.Linear(3, 3).requires_grad_(False)
    cache = tfz.FeatureCache(enc)
    assert len(cache) == 0 and bool(cache)
    with cache.keys([0, 1]) if cache else nullcontext():
        enc(torch.randn(2, 3))
    assert len(cache) == 2
    cache.close()
    assert not cache


# ------------------------------------------------------------------ 8. torch.compile
@pytest.mark.parametrize("order", ["compile-after-cache", "cache-on-compiled", "one-module"])
def test_torch_compile_works_in_every_order(order: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    tfz.freeze(model, "0", "2")
    x, ids = torch.randn(4, 8), torch.arange(4)
    want = model(x)
    if order == "compile-after-cache":
        cache = tfz.FeatureCache(model, upto="2")
        run = torch.compile(model)
    elif order == "cache-on-compiled":
        run = torch.compile(model)
        cache = tfz.FeatureCache(run, upto="_orig_mod.2")
    else:
        cache = tfz.FeatureCache(model[0])
        run = torch.compile(model)
    outs = []
    for _ in range(2):
        with cache.keys(ids):
            outs.append(run(x))
    assert (cache.hits, cache.misses) == (4, 4)
    for out in outs:
        torch.testing.assert_close(out, want)


# ------------------------------------------------------------------ 5. partial hits
def test_partial_hits_of_the_upto_form_replay_stored_rows_and_compute_only_the_rest() -> None:
    model = frozen_bert()
    x, ids = tokens(20, 12), torch.arange(20)
    with torch.no_grad():
        plain = torch.cat([model(x[b]).logits for b in ids.split(5)])
    rows = [0]
    model.bert.embeddings.word_embeddings.register_forward_hook(  # inside the prefix
        lambda m, a, out: rows.__setitem__(0, rows[0] + out.shape[0]))
    cache = tfz.FeatureCache(model, upto=UPTO)
    with cache.keys(ids[:18:2]):  # 9 of 20 stored
        model(x[:18:2])
    rows[0] = 0
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    got = torch.empty(20, 3)
    with torch.no_grad():
        for b in order.split(5):
            with cache.keys(b):
                got[b] = model(x[b]).logits
    assert (cache.hits, cache.misses) == (9, 9 + 11)  # hits counted per row
    assert rows[0] == 11  # the prefix ran on the 11 missing rows only
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    assert len(cache) == 20


def test_partial_hits_keep_gradients_of_the_suffix_exact() -> None:
    model = vit()
    model.train()
    model.head.weight.grad = None
    x, ids = torch.randn(6, 3, 8, 8), torch.arange(6)
    cache = tfz.FeatureCache(model, upto="blocks.1")
    with cache.keys(ids[:3]):
        model(x[:3])
    with cache.keys(ids):
        model(x).sum().backward()
    cached = model.head.weight.grad.clone()
    model.head.weight.grad = None
    cache.close()
    model(x).sum().backward()
    assert cache.hits == 3
    torch.testing.assert_close(cached, model.head.weight.grad)
