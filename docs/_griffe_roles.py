"""Griffe extension: Sphinx roles in our docstrings become links in the API reference.

Docstrings use ``:class:`LoadReport``` / ``:func:`~torchfreeze.freeze``` (they also
read well in ``help()``). mkdocstrings does not know these roles, so this extension
rewrites each one after the package is loaded:

* a torchfreeze object (looked up from the docstring's own scope outwards, then at
  the package root) becomes an autorefs cross-reference to its canonical path; if it
  is not rendered anywhere in the reference, autorefs warns and ``mkdocs build
  --strict`` fails, which is the point: a renamed or removed name breaks the build;
* a name that resolves nowhere in torchfreeze and is not from torch, Python or
  another library stays a cross-reference too, so it fails the build the same way;
* torch/Python/third-party names, modules and private helpers become plain code.

It also reads our ``Example:`` sections as Google-style ``Examples:``, so their
doctests render as code blocks (griffe treats the singular as a prose admonition),
and splits a grouped entry ``a, b, c: as in X`` into one entry per name.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|exc|mod|data|obj|const):`(~?)([^`<>]+)`")
# roots that are not ours: render as code (no inventory of their docs is loaded offline)
_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_GROUPED = re.compile(r"^(    )(\w+(?:, \w+)+): (.*)$", re.M)
_FOREIGN = ("torch", "lightning", "transformers", "safetensors", "numpy", "rich", "typing",
            "collections", "os", "pathlib", "warnings", "contextlib", "dataclasses", "abc")


def _lookup(scope: griffe.Object | griffe.Alias | None, dotted: str) -> Any:
    parts = dotted.split(".")
    while scope is not None:
        try:
            obj: Any = scope
            for part in parts:
                obj = obj.members[part]
            return obj
        except (KeyError, AttributeError, griffe.AliasResolutionError,
                griffe.CyclicAliasError):
            scope = scope.parent
    return None


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, pkg, set())

    def _walk(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            text = _GROUPED.sub(
                lambda m: "\n".join(f"{m.group(1)}{n}: {m.group(3)}"
                                    for n in m.group(2).split(", ")), text)
            obj.docstring.value = _ROLE.sub(lambda m: self._link(m, obj, pkg), text)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg, seen)  # type: ignore[arg-type]

    def _link(self, m: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
        _, short, target = m.groups()
        target = target.strip().lstrip(".").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        root = target.split(".", 1)[0]
        if root in _FOREIGN or hasattr(builtins, root):
            return f"`{shown}`"
        rel = target.removeprefix(pkg.name + ".") if root == pkg.name else target
        found = _lookup(obj, rel) or _lookup(pkg, rel)
        if found is None:
            return f"[`{shown}`][{target}]"  # unresolvable: autorefs warns, strict fails
        last = rel.rsplit(".", 1)[-1]
        if found.is_module and last in found.members:
            # `from .freeze import freeze` in __init__: the package attribute is the
            # function, while griffe's member of that name is the submodule
            found = found.members[last]
        try:
            path = found.final_target.path if found.is_alias else found.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return f"`{shown}`"  # imported from outside the package (torch, ...)
        if not path.startswith(pkg.name + ".") and path != pkg.name:
            return f"`{shown}`"
        if found.is_module:
            return f"`{shown}`"  # modules are pages' subjects, not rendered objects
        if any(part.startswith("_") and not part.startswith("__")
               for part in path.split(".")):
            return f"`{shown}`"  # a private helper: not in the reference
        return f"[`{shown}`][{path}]"
