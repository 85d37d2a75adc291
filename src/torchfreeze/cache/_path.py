"""What a FeatureCache records in a ``path=`` store, and how it reads it back.

``persist`` owns the files (``meta.json``, ``structure.pt``, the lock); this module
owns what goes in them for one cache: the namespace folders, the metadata a store
is checked against (boundary, prefix, dtype, a content hash of every watched
tensor, the prefix's own and those outside it that reach the boundary), and the
prefix a store recorded, resolved on another run's model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import CacheError
from .persist import StoreMeta, fingerprint, read_meta, tensor_digest

__all__ = ["meta_for", "namespace_folder", "recorded_prefix", "wipe_namespaces"]


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
