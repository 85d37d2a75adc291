"""What a FeatureCache records in a ``path=`` store, and how it reads it back.

``persist`` owns the files (``meta.json``, ``structure.pt``, the lock); this module
owns what goes in them for one cache: the namespace folders, the metadata a store
is checked against (boundary, prefix, dtype, a content hash of every watched
tensor, the prefix's own and those outside it that reach the boundary), the
prefix a store recorded, resolved on another run's model, and each namespace's
structure (what replay needs besides the rows). :class:`PathStore` is the one
object a cache with ``path=`` holds for all of it: the cache only calls it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CacheError
from ._hook import OutputSpec, PrefixSpec
from .persist import (
    StoreMeta,
    check_store_folder,
    fingerprint,
    load_structure,
    open_meta,
    read_meta,
    save_structure,
    tensor_digest,
)


class _Namespace(Protocol):
    """What a store saves and loads of one of the cache's namespaces (its
    ``_Namespace``: one per boundary call and autocast state)."""

    key: tuple[int, Any]
    saved: bool
    spec: OutputSpec | None
    prefix_specs: dict[int, list[PrefixSpec]] | None
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    signature: Any

__all__ = ["PathStore", "meta_for", "namespace_folder", "recorded_prefix", "wipe_namespaces"]


def namespace_folder(path: str, key: tuple[int, Any]) -> str:
    """``ns-call{N}[-device-dtype]``: one folder per (boundary call, autocast state)."""
    call, autocast = key
    name = f"ns-call{call}"
    if autocast is not None:
        name += f"-{autocast[0]}-{str(autocast[1]).replace('torch.', '')}"
    return os.path.join(path, name)


def meta_for(boundary_name: str, boundary: nn.Module, prefix: list[tuple[str, nn.Module]],
             outside: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None
             ) -> StoreMeta:
    """The metadata a store is checked against: what its entries were computed from."""
    weights: dict[str, str] = {}
    for name, module in [*prefix, (boundary_name, boundary)]:
        for tname, digest in fingerprint(module).items():
            weights[f"{name}.{tname}" if name else tname] = digest
    for name, tensor in outside:
        weights[name] = tensor_digest(tensor)
    return StoreMeta(boundary=boundary_name or type(boundary).__name__, dtype=str(dtype),
                     weights=weights, prefix=[name for name, _ in prefix])


def recorded_prefix(path: str, root: nn.Module, boundary_name: str, *, overwrite: bool
                    ) -> tuple[list[tuple[str, nn.Module]], list[str]] | None:
    """The prefix modules and the outside tensors' names a store recorded, on ``root``;
    None for a new store (or one ``overwrite`` will empty)."""
    try:
        meta = read_meta(path)
    except CacheError:
        if not overwrite:
            raise
        return None
    if meta is None:
        return None  # a new store: meta.json is written once discovery found the prefix
    prefix = []
    for name in meta.prefix:
        try:
            prefix.append((name, root.get_submodule(name)))
        except AttributeError:
            if overwrite:
                return None  # emptied once discovery found this model's prefix
            raise CacheError(
                f"The feature store at {path} was computed with prefix module {name!r}, "
                f"which this {type(root).__name__} does not have, so its entries would be "
                "stale. Pass overwrite=True to empty it and start fresh, or use another "
                "path= for this model."
            ) from None
    inside = [n for n in (*meta.prefix, boundary_name) if n]
    outside = [n for n in meta.weights if not any(n.startswith(p + ".") for p in inside)]
    return prefix, outside


def wipe_namespaces(path: str) -> None:
    """Delete every namespace folder of a store (``clear()``)."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.startswith("ns-"):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _replay_device(modules: Iterable[nn.Module]) -> torch.device:
    """Where a store's rows are replayed to: the device of the first prefix tensor."""
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


class PathStore:
    """One cache's ``path=`` store: checked at construction (a file, or a folder of
    foreign files, is refused before anything is patched), claimed once the prefix is
    known (``meta.json`` written, or checked against this model), and one structure per
    namespace saved and loaded (a namespace another run or rank stored replays from
    the first batch, without a prefix call)."""

    def __init__(self, path: str, *, overwrite: bool) -> None:
        check_store_folder(path)
        self.path = path
        self.overwrite = overwrite
        self.claimed = False  # meta.json matches this cache: namespaces may be read

    def folder(self, key: tuple[int, Any]) -> str:
        return namespace_folder(self.path, key)

    def recorded(self, root: nn.Module, boundary_name: str
                 ) -> tuple[list[tuple[str, nn.Module]], list[str]] | None:
        """The prefix and outside tensors a store recorded, on ``root`` (None: a new store,
        known after discovery)."""
        return recorded_prefix(self.path, root, boundary_name, overwrite=self.overwrite)

    def claim(self, boundary_name: str, boundary: nn.Module,
              prefix: list[tuple[str, nn.Module]],
              outside: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
        """Check ``meta.json`` against what this cache's entries are computed from (or
        write it); a mismatch is refused, naming the difference (``overwrite`` empties)."""
        open_meta(self.path, meta_for(boundary_name, boundary, prefix, outside, dtype),
                  overwrite=self.overwrite)
        self.claimed = True

    def load(self, ns: _Namespace, prefix: list[tuple[str, nn.Module]],
             boundary: nn.Module) -> tuple[bool, set[tuple[bool, ...]]] | None:
        """Fill ``ns`` from the structure the store holds for its key; (whether replays
        hand out outputs that require grad, the train/eval states the writer verified
        free of random ops), or None when there is none (yet)."""
        if not self.claimed:
            return None
        structure = load_structure(self.folder(ns.key))
        if structure is None:
            return None
        by_name = dict(prefix)
        device = _replay_device([boundary, *by_name.values()])
        ns.spec = dataclasses.replace(structure["spec"], device=device)
        ns.prefix_specs = {id(by_name[name]): specs
                           for name, specs in structure["prefix_specs"].items()}
        ns.shapes = [tuple(shape) for shape in structure["shapes"]]
        ns.dtypes = list(structure["dtypes"])
        ns.signature = structure.get("signature")
        ns.saved = True
        return (bool(structure.get("forced_grad", False)),
                set(structure.get("verified", ())))

    def save(self, ns: _Namespace, prefix: list[tuple[str, nn.Module]], *,
             forced_grad: bool, verified: set[tuple[bool, ...]]) -> None:
        """Write ``ns``'s structure once it is known (its first rows are being stored)."""
        if ns.prefix_specs is None or ns.spec is None or not self.claimed:
            return
        names = {id(m): name for name, m in prefix}
        save_structure(self.folder(ns.key), {
            "spec": ns.spec,
            "prefix_specs": {names[k]: v for k, v in ns.prefix_specs.items()},
            "shapes": ns.shapes,
            "dtypes": ns.dtypes,
            "signature": ns.signature,
            "forced_grad": forced_grad,
            "verified": sorted(verified),
        })
        ns.saved = True

    def wipe(self) -> None:
        wipe_namespaces(self.path)
