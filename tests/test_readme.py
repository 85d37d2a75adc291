"""The README is a user guide that works: every ```python block of it and of the
guide pages in docs/ (not the API reference, whose examples live in docstrings) runs,
each in a fresh namespace; it starts with the two commands, stays short, and its links
and anchors resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md"))]   # docs/api/ excluded
BLOCKS = [(page, i, code) for page in GUIDES
          for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(),
                                              flags=re.S | re.M))]
MAX_LINES = 350


def test_readme_has_examples() -> None:
    assert sum(page == README for page, _, _ in BLOCKS) >= 8


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:block{i}" for p, i, _ in BLOCKS])
def test_guide_block_runs(page: Path, index: int, code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:block{index}", "exec"), {"__name__": "__readme__"})


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first = re.search(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    assert first is not None and first.group(1) == "bash"
    commands = [line.split("#")[0].strip() for line in first.group(2).splitlines()]
    assert commands == ["make demo", "make test"]
    targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"demo", "test"} <= set(targets)
    assert text.index("```bash") < text.index("\n## "), "the commands come before any section"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, (f"README.md has {lines} lines (at most {MAX_LINES}): move "
                                "evidence and details to docs/guarantees.md or docs/benchmarks.md")


def test_readme_lists_the_versions_ci_pins() -> None:
    section = README.read_text().split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (ROOT / ".ci/constraints.txt").read_text(),
                           flags=re.M))
    for name in ("torch", "transformers", "lightning", "safetensors", "rich"):
        assert pins[name] in section, f"README 'Supported versions' lacks {name} {pins[name]}"


def _anchors(page: Path) -> set[str]:
    """The ids Python-Markdown's toc gives the page's headings (mkdocs' default), and
    explicit ``{ #id }`` ones."""
    ids = set()
    for heading in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.M):
        explicit = re.search(r"\{\s*#([\w-]+)\s*\}\s*$", heading)
        if explicit:
            ids.add(explicit.group(1))
        else:
            ids.add(slugify(heading.replace("`", ""), "-"))
    return ids


@pytest.mark.parametrize("page", GUIDES, ids=[str(p.relative_to(ROOT)) for p in GUIDES])
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md"
                                 and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: broken links {broken}"
