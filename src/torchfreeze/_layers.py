"""Depth-ordered layer groups, found without per-model code.

A model is split into: everything before its main repeated stack (the stem or
embeddings), each block of that stack, and everything after it (the head).
The *main stack* is the run of two or more consecutive same-typed children of
one module (for ``nn.Sequential``/``ModuleList``/``ModuleDict``: also holding
children of the same types) that holds the most parameters (runs of composite
blocks first, so MiniLM's three embedding tables never beat its six encoder
layers): BERT's ``encoder.layer``, ViT's blocks, ResNet/ConvNeXt stages
(``layer1..layer4`` of torchvision's ResNet, a ``ModuleList`` of stages in
Hugging Face's). Models without one fall back to their top-level children that
hold parameters.

These groups drive :func:`~torchfreeze.freeze_to`, layer-wise LR decay and
unfreezing schedules.

A parameter tied between the stem and the head (a language-model head sharing
the input embedding) is one tensor, so it is in one group: the head's, where it
is used last, as in fastai's ULMFiT split. ``freeze_to(model, -1)`` then trains
the tied embedding/head together with the rest of the head.

Wrappers (``torch.compile``, ``DataParallel``, DDP, FSDP1) are looked through;
the names are the wrapped model's own and are valid selectors for the wrapper too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ._report import Report, fmt_count
from ._select import ModelIndex, require_module
from ._snapshot import capture, restore

__all__ = ["Layer", "layers"]


_Kind = Literal["stem", "block", "head"]

@dataclass(frozen=True)
class Layer(Report):
    """One depth level of a model.

    Attributes:
        index: depth, 0 for the stem/embeddings.
        name: the module that holds the group (its longest common prefix), or
            ``"stem"``/``"head"`` when it spans several.
        kind: ``"stem"``, ``"block"`` or ``"head"``.
        param_names: canonical names of its parameters, model order.
        num_params: scalar parameter count.
        tied: ``(name here, other name)`` for every parameter of the group that
            is one tensor with another module's (an input embedding tied to
            ``lm_head``): freezing the group freezes both names.
    """

    index: int
    name: str
    kind: Literal["stem", "block", "head"]
    param_names: tuple[str, ...] = field(default=())
    num_params: int = 0
    tied: tuple[tuple[str, str], ...] = field(default=())

    def _rich(self) -> str:
        tied = "".join(f"; tied: {a} = {b}" for a, b in self.tied)
        return (
            f"Layer {self.index} {self.name} ({self.kind}, {len(self.param_names)} tensors, "
            f"{fmt_count(self.num_params)} params{tied})"
        )


@dataclass
class _Stack:
    parent: str
    children: list[str]
    coverage: int
    composite: bool

    def rank(self) -> tuple[bool, int, int]:
        # Blocks are modules with children (BertLayer, a ResNet stage). A run of
        # leaves (word/position/type embedding tables) may hold more parameters
        # but is not a stack of blocks; it wins only where no composite run exists.
        return (self.composite, self.coverage, len(self.children))


def _param_ids(m: nn.Module) -> set[int]:
    return {id(p) for p in m.parameters()}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _same_kind(a: nn.Module, b: nn.Module) -> bool:
    """Two blocks of one stack: the same class, and for the generic containers (whose
    class says nothing of what they hold) children of the same classes: ResNet's
    stages are Sequentials of the same block class, but a Sequential of blocks next to
    a Sequential head (``nn.Sequential(stem, nn.Sequential(*blocks), head)``) is not."""
    if type(a) is not type(b):
        return False
    if isinstance(a, _CONTAINERS):
        return {type(c) for c in a.children()} == {type(c) for c in b.children()}
    return True


def _find_stack(idx: ModelIndex) -> _Stack | None:
    best: _Stack | None = None
    for pname, parent in idx.modules.items():
        kids = [
            (n, c) for n, c in parent.named_children() if any(True for _ in c.parameters())
        ]
        i = 0
        while i < len(kids):
            j = i
            while j + 1 < len(kids) and _same_kind(kids[j + 1][1], kids[i][1]):
                j += 1
            if j > i:
                run = kids[i : j + 1]
                ids: set[int] = set()
                for _, c in run:
                    ids |= _param_ids(c)
                cov = sum(p.numel() for p in idx.params.values() if id(p) in ids)
                prefix = f"{pname}." if pname else ""
                composite = all(any(True for _ in c.children()) for _, c in run)
                cand = _Stack(pname, [prefix + n for n, _ in run], cov, composite)
                if best is None or cand.rank() > best.rank():
                    best = cand
            i = j + 1
    return best


def _common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    if not parts:
        return ""
    out: list[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            out.append(level[0])
        else:
            break
    return ".".join(out)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(**x)`` for a dict, ``model(*x)`` for a tuple or list, else ``model(x)``:
    how ``layers`` and ``check`` call a model on its ``example_inputs``."""
    if isinstance(example_inputs, Mapping):  # a dict, or HF's BatchEncoding (a UserDict)
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _execution_order(model: nn.Module, example_inputs: Any) -> dict[int, int]:
    order: dict[int, int] = {}
    handles = []

    def hook(mod: nn.Module, *_: Any) -> None:
        order.setdefault(id(mod), len(order))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(hook))
    before = capture(model)
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        restore(before)
    return order


def layers(model: nn.Module, example_inputs: Any = None) -> list[Layer]:
    """Split ``model`` into depth-ordered layer groups: stem, blocks, head.

    Every parameter lands in exactly one group (tied parameters once). With
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs) the model runs once under ``torch.no_grad()`` and the
    groups follow execution order instead of registration order.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch.nn as nn, torchfreeze as tfz
        >>> net = nn.Sequential(nn.Embedding(10, 4),
        ...                     nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]),
        ...                     nn.Linear(4, 2))
        >>> [(g.name, g.kind) for g in tfz.layers(net)]
        [('0', 'stem'), ('1.0', 'block'), ('1.1', 'block'), ('1.2', 'block'), ('2', 'head')]
    """
    require_module(model, "layers")
    idx = ModelIndex(model)
    root = idx.model  # inside torch.compile / DataParallel / DDP wrappers
    stack = _find_stack(idx)
    params = list(idx.params.items())
    shown = _head_names(idx, stack)
    if stack is None:
        children = [(name, child) for name, child in root.named_children()
                    if any(True for _ in child.parameters())]
        # a parameter tied across children (an output layer sharing the input
        # embedding) belongs to the last child that uses it (fastai's ULMFiT split)
        last_owner: dict[int, int] = {}
        for i, (_, child) in enumerate(children):
            for p in child.parameters():
                last_owner[id(p)] = i
        blocks = [
            (name, {id(p) for p in child.parameters() if last_owner[id(p)] == i})
            for i, (name, child) in enumerate(children)
        ]
        own = [(n, p) for n, p in params if any(p is q for q in root.parameters(recurse=False))]
        return _assemble(idx, [], blocks, own, params, kinds=None, shown=shown)
    blocks = [(name, _param_ids(idx.modules[name])) for name in stack.children]
    in_blocks = set().union(*(ids for _, ids in blocks))
    rest = [(n, p) for n, p in params if id(p) not in in_blocks]
    if example_inputs is not None:
        order = _execution_order(root, example_inputs)
        owner: dict[int, int | None] = {}
        for m in idx.modules.values():
            for p in m.parameters(recurse=False):
                pos = order.get(id(m))
                prev = owner.get(id(p))
                if prev is not None and pos is not None:
                    pos = max(pos, prev)  # tied: the last use decides
                owner[id(p)] = pos if pos is not None else owner.get(id(p))
        first_block = min(
            (order[id(idx.modules[n])] for n in stack.children if id(idx.modules[n]) in order),
            default=None,
        )
        blocks.sort(key=lambda b: order.get(id(idx.modules[b[0]]), 1 << 30))
        first_pos = {id(p): i for i, (_, p) in enumerate(params)}
        first_block_pos = min(first_pos[i] for i in in_blocks if i in first_pos)

        def before(name_param: tuple[str, nn.Parameter]) -> bool:
            pos = owner.get(id(name_param[1]))
            if pos is None or first_block is None:
                return first_pos[id(name_param[1])] < first_block_pos
            return pos < first_block

        stem = [np for np in rest if before(np)]
        head = [np for np in rest if not before(np)]
    else:
        first_block_pos = min(i for i, (_, p) in enumerate(params) if id(p) in in_blocks)
        stem = [np for np in rest
                if params.index(np) < first_block_pos and id(np[1]) not in shown]
        head = [np for np in rest
                if params.index(np) > first_block_pos or id(np[1]) in shown]
    return _assemble(idx, stem, blocks, head, params, kinds="stack", shown=shown)


def _head_names(idx: ModelIndex, stack: _Stack | None) -> dict[int, str]:
    """Tied parameters also used after the main stack -> their name there.

    A language-model head tied to the input embedding is the same tensor as the
    embedding; it belongs to the head (last use), as in fastai's ULMFiT split,
    so the head stays a layer group of its own.
    """
    if stack is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, p in idx.param_aliases:
        names.setdefault(id(p), []).append(name)
    last_block = stack.children[-1] + "."
    order = [n for n, _ in idx.param_aliases]
    after = max((i for i, n in enumerate(order) if n.startswith(last_block)), default=None)
    if after is None:
        return {}
    out: dict[int, str] = {}
    position = {n: i for i, n in reversed(list(enumerate(order)))}
    for pid, ns in names.items():
        ns = list(dict.fromkeys(ns))
        if len(ns) > 1 and position[ns[0]] < after:
            late = [n for n in ns if position[n] > after]
            if late:
                out[pid] = late[-1]
    return out


def _assemble(
    idx: ModelIndex,
    stem: list[tuple[str, nn.Parameter]],
    blocks: list[tuple[str, set[int]]],
    head: list[tuple[str, nn.Parameter]],
    params: list[tuple[str, nn.Parameter]],
    kinds: str | None,
    shown: dict[int, str] | None = None,
) -> list[Layer]:
    out: list[Layer] = []
    seen: set[int] = set()
    aliases: dict[int, list[str]] = {}
    for alias, p in idx.model.named_parameters(remove_duplicate=False):  # no wrapper names
        aliases.setdefault(id(p), []).append(alias)

    def add(name: str, kind: _Kind, members: list[tuple[str, nn.Parameter]]) -> None:
        members = [(n, p) for n, p in members if id(p) not in seen]
        if not members:
            return
        seen.update(id(p) for _, p in members)
        out.append(
            Layer(
                index=len(out),
                name=name,
                kind=kind,
                param_names=tuple(n for n, _ in members),
                num_params=sum(p.numel() for _, p in members),
                tied=tuple((n, other) for n, p in members
                           for other in dict.fromkeys(aliases.get(id(p), [])) if other != n),
            )
        )

    def label(members: list[tuple[str, nn.Parameter]], default: str) -> str:
        # a tied head is named where it is used last (lm_head), not by its first name
        names = [(shown or {}).get(id(p), n) for n, p in members]
        prefix = _common_prefix(names)
        covered = prefix in idx.modules and {id(p) for _, p in members} == _param_ids(
            idx.modules[prefix]
        )
        return prefix if prefix and covered else default

    add(label(stem, "stem"), "stem", stem)
    for i, (name, ids) in enumerate(blocks):
        members = [(n, p) for n, p in params if id(p) in ids]
        kind: _Kind
        if kinds is None:
            kind = "stem" if i == 0 and len(blocks) > 1 else (
                "head" if i == len(blocks) - 1 and len(blocks) > 1 else "block"
            )
        else:
            kind = "block"
        add(name, kind, members)
    add(label(head, "head"), "head", head)
    return out
