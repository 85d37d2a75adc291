from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchfreeze as tfz
from torchfreeze._select import expand_braces
from torchfreeze.errors import SelectionError

from ._models import TinyResNet, tiny_bert


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.k_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)
        self.o_proj = nn.Linear(4, 4)


class Encoder(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layer = nn.ModuleList(Attn() for _ in range(n))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in language models


def names(sel: tfz.Selection) -> set[str]:
    return set(sel.param_names)


def test_module_name_selects_everything_under_it() -> None:
    m = Encoder()
    sel = tfz.select(m, "layer.1")
    assert names(sel) == {f"layer.1.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}
    assert "layer.1" in sel.module_names and "layer.1.q_proj" in sel.module_names


def test_parameter_name_selects_one_tensor() -> None:
    m = Encoder()
    assert tfz.select(m, "layer.0.q_proj.bias").param_names == ("layer.0.q_proj.bias",)
    assert tfz.select(m, "layer.0.q_proj.bias").module_names == ()


def test_globs_braces_and_regex() -> None:
    m = Encoder()
    assert names(tfz.select(m, "layer.*.q_proj.weight")) == {
        f"layer.{i}.q_proj.weight" for i in range(4)
    }
    assert names(tfz.select(m, "layer.{0..1}")) == names(tfz.select(m, "layer.0", "layer.1"))
    assert names(tfz.select(m, "layer.[23].o_proj.bias")) == {
        "layer.2.o_proj.bias", "layer.3.o_proj.bias"}
    qkv = tfz.select(m, "layer.0.{q,k,v}_proj")
    assert {n.split(".")[2] for n in qkv.param_names} == {"q_proj", "k_proj", "v_proj"}
    # regexes match the whole dotted name, like globs
    assert names(tfz.select(m, r"re:layer\.[0-9]\.v_proj\.bias")) == {
        f"layer.{i}.v_proj.bias" for i in range(4)}
    with pytest.raises(SelectionError):
        tfz.select(m, "re:v_proj")


def test_expand_braces_ranges_lists_nesting() -> None:
    assert expand_braces("a.{2..0}") == ["a.2", "a.1", "a.0"]
    assert expand_braces("{x,y{1..2}}") == ["x", "y1", "y2"]
    assert expand_braces("plain") == ["plain"]
    with pytest.raises(SelectionError, match="unclosed"):
        expand_braces("a.{0..2")
    with pytest.raises(SelectionError, match="neither a list"):
        expand_braces("a.{b}")


def test_types_objects_callables_and_lists() -> None:
    m = TinyResNet()
    bns = tfz.select(m, nn.BatchNorm2d)
    assert len(bns.module_names) == 5 and len(bns.param_names) == 10
    assert "bn1.running_mean" in bns.buffer_names
    assert names(tfz.select(m, m.fc)) == {"fc.weight", "fc.bias"}
    assert tfz.select(m, m.fc.weight).param_names == ("fc.weight",)
    convs = tfz.select(m, lambda name, p: p.dim() == 4)
    assert names(convs) == {"conv1.weight"} | {f"layer{i}.0.weight" for i in range(1, 5)}
    nested = tfz.select(m, ["fc", ("conv1", [nn.BatchNorm2d])])
    assert names(nested) == names(tfz.select(m, "fc", "conv1", nn.BatchNorm2d))


def test_tied_parameters_are_counted_once_by_identity() -> None:
    m = Encoder()
    sel = tfz.select(m, "head")  # the head's weight is the embedding's
    assert sel.param_names == ("embed.weight",)
    assert len(tfz.select(m)) == len(list(m.parameters()))
    both = tfz.select(m, "embed", "head")
    assert both.param_names == ("embed.weight",) and both.num_params == 40


def test_exclude_subtracts_and_module_is_no_longer_whole() -> None:
    m = Encoder()
    sel = tfz.select(m, "layer.0", exclude="layer.0.o_proj")
    assert "layer.0.o_proj.weight" not in sel.param_names
    assert "layer.0" not in sel.module_names  # not wholly selected any more
    assert "layer.0.q_proj" in sel.module_names


def test_misspelt_name_suggests_the_closest_real_layer() -> None:
    m = TinyResNet()
    with pytest.raises(SelectionError) as info:
        tfz.select(m, "layer44")
    assert info.value.suggestions[0] == "layer4"
    assert "'layer44' matched nothing" in str(info.value) and "'layer4'" in str(info.value)


def test_missing_wrapper_prefix_is_suggested() -> None:
    wrapped = nn.Sequential()
    wrapped.add_module("model", TinyResNet())
    with pytest.raises(SelectionError, match="'model.layer4'"):
        tfz.select(wrapped, "layer4")


def test_every_brace_alternative_must_match() -> None:
    m = Encoder(n=4)
    with pytest.raises(SelectionError, match=r"'layer\.4' \(from 'layer\.\{0\.\.4\}'"):
        tfz.select(m, "layer.{0..4}")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (nn.Conv2d, "matched no module.*Module types present"),
        (lambda n, p: False, "returned False for all"),
        (3.5, "is not a selector"),
        ({"fc": 1}, "is not a selector"),
        (nn.Linear(2, 2), "not part of"),
        (torch.zeros(3), "neither a parameter nor a buffer"),
        ("re:(", "not a valid regular expression"),
        (int, "not an nn.Module subclass"),
    ],
)
def test_bad_selectors_raise_clear_errors(bad: object, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        tfz.select(Encoder(), bad)


def test_exclude_that_matches_nothing_or_removes_everything_raises() -> None:
    m = Encoder()
    with pytest.raises(SelectionError, match="'lyer' matched nothing"):
        tfz.select(m, "layer", exclude="lyer")
    with pytest.raises(SelectionError, match="selection is empty"):
        tfz.select(m, "layer.0", exclude="layer")


def test_select_on_real_bert_names() -> None:
    bert = tiny_bert(num_layers=4)
    sel = tfz.select(bert, "bert.encoder.layer.{0..1}", exclude="*.LayerNorm")
    assert sel.param_names and all(re.match(r"bert\.encoder\.layer\.[01]\.", n)
                                   for n in sel.param_names)
    assert not any("LayerNorm" in n for n in sel.param_names)
    assert tfz.select(bert, "*.attention.self.{query,key}.weight").num_params == 4 * 2 * 32 * 32


def test_selection_reports_and_dict() -> None:
    sel = tfz.select(TinyResNet(), "fc")
    assert "2 parameters" in str(sel)
    assert sel.to_dict()["param_names"] == ["fc.weight", "fc.bias"]
    assert "fc.weight" in sel and "fc" in sel and "nope" not in sel


# ---------------------------------------------------------------------------
# property tests on generated module trees

_leaf = st.sampled_from(["lin", "norm", "emb", "act"])
_tree = st.recursive(
    _leaf,
    lambda children: st.lists(children, min_size=1, max_size=4),
    max_leaves=12,
)


def build(spec: object) -> nn.Module:
    if isinstance(spec, list):
        return nn.Sequential(*[build(s) for s in spec])
    return {"lin": lambda: nn.Linear(2, 2), "norm": lambda: nn.BatchNorm1d(2),
            "emb": lambda: nn.Embedding(3, 2), "act": nn.ReLU}[spec]()


_pattern = st.text(alphabet="0123.*?[]{},", min_size=1, max_size=8)


def _try(model: nn.Module, *sels: object, **kw: object) -> set[str] | None:
    try:
        return names(tfz.select(model, *sels, **kw))
    except SelectionError:
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_tree, a=_pattern, b=_pattern)
def test_grammar_never_crashes_and_union_law_holds(spec: object, a: str, b: str) -> None:
    model = build([spec])
    sa, sb = _try(model, a), _try(model, b)
    union = _try(model, a, b)
    if sa is not None and sb is not None:
        assert union == sa | sb
    else:
        assert union is None  # any part matching nothing is an error, never ignored


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_tree, a=_pattern, b=_pattern)
def test_exclude_law_holds(spec: object, a: str, b: str) -> None:
    model = build([spec])
    sa, sb = _try(model, a), _try(model, b)
    if sa is None or sb is None:
        return
    try:
        got = names(tfz.select(model, a, exclude=b))
    except SelectionError:
        # only when nothing at all is left
        full_a, full_b = tfz.select(model, a), tfz.select(model, b)
        assert not (set(full_a.param_names) - set(full_b.param_names))
        return
    assert got == sa - sb


@settings(max_examples=40, deadline=None)
@given(spec=_tree)
def test_selecting_own_names_is_idempotent(spec: object) -> None:
    model = build([spec])
    everything = tfz.select(model)
    if everything.param_names:
        assert tfz.select(model, list(everything.param_names)).param_names == (
            everything.param_names
        )
