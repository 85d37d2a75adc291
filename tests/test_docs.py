"""Every public name has a place in the API reference (docs/api/*.md).

`make test` builds the reference with `mkdocs build --strict`, which fails on a
``::: name`` that no longer exists and on broken cross-references; this test covers
the other direction: a new public name that nobody added to the reference.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api"
# modules whose __all__ is public API (the package re-exports most of it)
PUBLIC_MODULES = ("torchfreeze", "torchfreeze.distributed", "torchfreeze.errors",
                  "torchfreeze.cli", "torchfreeze.diff", "torchfreeze.integrations.lightning",
                  "torchfreeze.integrations.transformers")


def _documented() -> set[str]:
    """Fully qualified names rendered by ``::: id`` (a module with a ``members:``
    list renders those members)."""
    names: set[str] = set()
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        for block in re.finditer(r"^::: (\S+)\n((?:    .*\n?)*)", text, flags=re.M):
            ident, options = block.group(1), block.group(2)
            names.add(ident)
            members = re.search(r"members: \[([^\]]*)\]", options)
            if members:
                names |= {f"{ident}.{m.strip()}" for m in members.group(1).split(",")}
    return names


def _canonical(module: str, name: str) -> set[str]:
    obj = getattr(importlib.import_module(module), name)
    spellings = {f"{module}.{name}"}
    owner = getattr(obj, "__module__", None)
    if isinstance(owner, str):
        spellings.add(f"{owner}.{name}")
    return spellings


PUBLIC = [(m, n) for m in PUBLIC_MODULES for n in importlib.import_module(m).__all__
          if n != "__version__"]


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_is_in_the_reference(module: str, name: str) -> None:
    documented = _documented()
    assert _canonical(module, name) & documented, (
        f"{module}.{name} is public but not in the API reference: add "
        f"'::: {module}.{name}' to the right page in docs/api/"
    )



def test_every_readme_section_links_to_the_reference() -> None:
    """Each README section that shows code (a feature's section) links to its page in
    docs/api/; sections without code (the demo's table, versions, development, a
    section still to be written) need not."""
    readme = (DOCS.parents[1] / "README.md").read_text()
    sections = re.split(r"^## ", readme, flags=re.M)[1:]
    featured = [s for s in sections if re.search(r"^```(python|bash)$", s, flags=re.M)]
    assert len(featured) >= 10
    for body in featured:
        name = body.splitlines()[0]
        links = re.findall(r"\]\((docs/api/[\w/]+\.md)\)", body)
        assert links, f"README section {name!r} has no 'API reference: [...](docs/api/...)' link"
        for link in links:
            assert (DOCS.parents[1] / link).is_file(), f"README section {name!r}: {link} missing"
